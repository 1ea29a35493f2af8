"""What one edit costs the device beyond its arithmetic: launches, host synchronizations, host work per call.

Counted on the CPU (tests/launch_count.py): Triton launches through the interpreter, and torch ops that would be
device kernels on a GPU. The shapes take each path of the Triton kernels here: few rows (the column-split
projections; f7+l7 at batch 2 fits one slot block of the interpreter) and many rows (the fused pass, with several
row splits of the weight gradients to sum).
"""

import pytest
import torch

from reft_fast import ops
from reft_fast.kernels import low_rank_edit as kernels

from launch_count import DeviceWork
from reference import DEVICE, FAMILY, make_params, make_positions

pytestmark = pytest.mark.usefixtures("fresh_seed")

ROWS = {"few": dict(B=2, T=32, n=14), "many": dict(B=8, T=32, n=14)}  # f7+l7 positions per example


def _edit_step(family, backend, B, T, n, r=8, d=64, dropout=0.0):
    """(forward DeviceWork, backward DeviceWork) of one edit on leaves, as a training step runs it."""
    positions = make_positions(B, T, n)
    params = make_params(family, r, d)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items() if k != "P"}
    if "P" in params:
        leaves["P"] = leaves["Q"]  # one tensor, as LoReFT/NoReFT/ConsReFT pass it
    h = torch.randn(B, T, d, device=DEVICE, requires_grad=True)
    g = torch.randn(B, T, d, device=DEVICE)
    act = "gelu" if FAMILY[family][0] else None
    with DeviceWork() as forward:
        out = ops.low_rank_edit(h, positions, leaves["Q"], W=leaves.get("W"), b=leaves.get("b"), P=leaves.get("P"),
                                act=act, dropout=dropout, seed=5, backend=backend, validate=False)
    with DeviceWork() as backward:
        out.backward(g)
    assert h.grad is not None and all(leaf.grad is not None for leaf in leaves.values())
    return forward, backward


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("family", ["loreft", "nodireft", "lobireft"])
def test_triton_edit_takes_at_most_five_launches_per_step(family, rows):
    forward, backward = _edit_step(family, "triton", **ROWS[rows])
    kinds = {**forward.kernels, **backward.kernels}
    assert all(name.startswith("triton.") for name in kinds), f"torch ops around the kernels: {kinds}"
    assert forward.launches + backward.launches <= 5, (dict(forward.kernels), dict(backward.kernels))
    # the forward is the column-split projections and the write with few rows, the write alone with many
    assert forward.launches == (2 if rows == "few" else 1), dict(forward.kernels)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["loreft", "direft", "consreft"])
def test_no_host_synchronization_in_forward_and_backward(backend, family):
    forward, backward = _edit_step(family, backend, **ROWS["many"], dropout=0.1)
    assert forward.syncs + backward.syncs == [], f"host synchronizations: {forward.syncs + backward.syncs}"


def test_launch_plan_is_built_once_per_shape(monkeypatch):
    # A second call of the same shape finds its grids, tiles and scratch buffers ready: no triton.cdiv, no
    # allocation beyond its outputs (out and the kept rows; grad_h and the weight gradients).
    _edit_step("loreft", "triton", **ROWS["few"])
    cdiv_calls = []
    real_cdiv = kernels.triton.cdiv
    monkeypatch.setattr(kernels.triton, "cdiv", lambda *a: cdiv_calls.append(a) or real_cdiv(*a))
    allocations = []
    for factory in ("empty", "zeros", "full"):
        real = getattr(torch, factory)
        monkeypatch.setattr(torch, factory, lambda *a, _real=real, _name=factory, **k: allocations.append(_name)
                            or _real(*a, **k))
    _edit_step("loreft", "triton", **ROWS["few"])
    assert cdiv_calls == []
    assert allocations == ["empty"] * 3, allocations  # dQ, dW, db (out, h_rows, grad_h: empty_like, new_empty)
