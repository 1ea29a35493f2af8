"""The host path of one edit: what is resolved once (per process, per ReftModel, per forward) is not looked up again
on every hook call (bench/NOTES.md, "Where one intervention's host time goes"). Each test counts a call that the
per-edit path used to make; the values are the other tests' business (test_ops, test_kernels, test_in_place)."""

import importlib

import pytest
import torch

from reft_fast import ops
from reft_fast.ops import backend_triton, library

from reference import make_params, make_positions

pytest.importorskip("triton")
from reft_fast.kernels import low_rank_edit as kernels  # noqa: E402


def _loreft_step(h, positions, params, in_place=True):
    x = h * 1.0  # a tensor of our own, which the edit may write into
    out = ops.low_rank_edit(x, positions, params["Q"], W=params["W"], b=params["b"], P=params["Q"],
                            backend="triton", validate=False, in_place=in_place)
    out.sum().backward()


@pytest.fixture
def loreft_case():
    B, T, n, r, d = 2, 8, 3, 4, 32
    params = {k: v.requires_grad_() for k, v in make_params("loreft", r, d).items() if v is not None}
    return torch.randn(B, T, d, requires_grad=True), make_positions(B, T, n), params


def test_the_stream_key_reads_the_raw_handle_without_a_stream_object(monkeypatch):
    def no_stream_object(*args, **kwargs):
        raise AssertionError("torch.cuda.current_stream builds a Stream object (and switches devices) per call")

    monkeypatch.setattr(torch.cuda, "current_stream", no_stream_object)
    monkeypatch.setattr(kernels, "_raw_stream", lambda index: 1000 + index)
    assert kernels.stream_key(torch.device("cuda", 1)) == 1001
    assert kernels.stream_key(torch.device("cpu")) == 0


def test_the_kernels_module_is_looked_up_once(monkeypatch, loreft_case):
    _loreft_step(*loreft_case)  # the first edit may import it
    calls = []
    real = importlib.import_module
    monkeypatch.setattr(backend_triton.importlib, "import_module",
                        lambda name, *a: calls.append(name) or real(name, *a))
    _loreft_step(*loreft_case)
    _loreft_step(*loreft_case, in_place=False)
    assert calls == []


def test_triton_availability_is_not_searched_on_the_path_per_edit(monkeypatch, loreft_case):
    _loreft_step(*loreft_case)
    calls = []
    monkeypatch.setattr(backend_triton.importlib.util, "find_spec", lambda name, *a: calls.append(name))
    _loreft_step(*loreft_case)
    assert calls == []


def test_p_that_is_q_is_checked_once(monkeypatch, loreft_case):
    checked = []
    real = ops._check_param
    monkeypatch.setattr(ops, "_check_param", lambda name, *a: checked.append(name) or real(name, *a))
    _loreft_step(*loreft_case)
    assert sorted(checked) == ["Q", "W", "b"]


def test_the_in_place_forward_hands_its_edit_params_through(monkeypatch, loreft_case):
    built = []

    class Counted(library.EditParams):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(library, "EditParams", Counted)
    h, positions, params = loreft_case
    with torch.no_grad():  # forward only: the op's own EditParams (ops.low_rank_edit) is the only one
        ops.low_rank_edit(h * 1.0, positions, params["Q"], W=params["W"], b=params["b"], P=params["Q"],
                          backend="triton", validate=False, in_place=True)
    assert built == []
