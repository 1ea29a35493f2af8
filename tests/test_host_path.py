"""The host path of one edit: what is resolved once (per process, per ReftModel, per forward) is not looked up again
on every hook call (bench/NOTES.md, "Where one intervention's host time goes"). Each test counts a call that the
per-edit path used to make; the values are the other tests' business (test_ops, test_kernels, test_in_place)."""

import importlib
import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from reft_fast import ReftConfig, ReftModel, ops
from reft_fast.core.hooks import ForwardState
from reft_fast.core import interventions
from reft_fast.core.interventions import LoreftIntervention
from reft_fast.core.model import _module_device
from reft_fast.core.orthogonal import HouseholderOrthogonal
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


def test_the_backward_enters_no_no_grad_block_outside_create_graph(monkeypatch, loreft_case):
    """once_differentiable's torch.no_grad() block (15–30 µs per backward here) is skipped where grad mode is off."""
    entered = []
    real = torch.no_grad

    class Counting(real):
        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    _loreft_step(*loreft_case)
    monkeypatch.setattr(torch, "no_grad", Counting)
    _loreft_step(*loreft_case)
    _loreft_step(*loreft_case, in_place=False)
    assert entered == []


@pytest.mark.parametrize("in_place", [True, False])
def test_a_gradient_of_the_gradients_is_still_refused_by_name(loreft_case, in_place):
    h, positions, params = loreft_case
    out = ops.low_rank_edit(h * 1.0, positions, params["Q"], W=params["W"], b=params["b"], P=params["Q"],
                            backend="triton", validate=False, in_place=in_place)
    (grad_W,) = torch.autograd.grad(out.square().sum(), params["W"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_W.sum().backward()


def test_the_edit_enters_torchs_c_apply_directly_outside_functorch(monkeypatch, loreft_case):
    """Function.apply's Python layer (≈ 10 µs) is skipped; under a functorch transform it is what runs."""
    calls = []
    for function in (library._EditInPlace, library._EagerEdit):
        real = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, real=real: calls.append(1) or real(*a))
    _loreft_step(*loreft_case)
    _loreft_step(*loreft_case, in_place=False)
    assert calls == []
    h, positions, params = loreft_case
    direct = library.apply_function(library._EditInPlace, h * 1.0, positions, params["Q"], params["Q"], params["W"],
                                    params["b"], "triton", ops.prepare_edit(params["Q"], W=params["W"],
                                                                            b=params["b"], P=params["Q"]))[0]
    monkeypatch.setattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    with pytest.raises(RuntimeError, match="setup_context"):  # Function.apply's answer under a transform, as before
        _loreft_step(*loreft_case)
    assert calls == [1]
    monkeypatch.undo()
    expected = ops.low_rank_edit(h, positions, params["Q"], W=params["W"], b=params["b"], P=params["Q"],
                                 backend="triton", validate=False)
    torch.testing.assert_close(direct, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Per forward, in the model layer
# ----------------------------------------------------------------------------------------------------------------------
class _Passthrough(nn.Module):
    """A layer that returns its input itself (the hook must not write into what the caller still holds)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states


class _Stack(nn.Module):
    def __init__(self, d=16, n=2):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=d, num_hidden_layers=n)
        self.embed = nn.Embedding(32, d)
        self.layers = nn.ModuleList(_Passthrough() for _ in range(n))
        self.seen = []

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids) * 1.0
        for layer in self.layers:
            self.seen.append(h)
            h = layer(h, attention_mask=attention_mask)
        return types.SimpleNamespace(loss=h.sum())


def test_a_layer_returning_its_input_is_never_edited_in_place():
    model = _Stack()
    reft_model = ReftModel(model, ReftConfig([{"layer": 0, "component": "block_output", "low_rank_dimension": 2,
                                               "intervention": "loreft"}]), backend="triton")
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        _, out = reft_model({"input_ids": ids}, intervention_locations=torch.tensor([[[1, 3], [0, 2]]]))
        before = model.embed(ids) * 1.0
    torch.testing.assert_close(model.seen[0], before, rtol=0, atol=0)  # the caller's tensor as it was


class _Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states * self.weight


class _CheckpointedStack(_Stack):
    """Every layer under non-reentrant checkpointing: the backward runs each layer, hooks included, a second time."""

    def __init__(self, d=16, n=3):
        super().__init__(d, n)
        self.layers = nn.ModuleList(_Scale(d) for _ in range(n))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids) * 1.0
        for layer in self.layers:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
        return {"loss": h.sum()}  # (the hooks find the tensors of a mapping, as of a ModelOutput)


def test_each_edit_is_checked_once_per_forward_not_per_hook_call(monkeypatch):
    """The parameters are checked when the forward prepares the edits; the hooks (three interventions, each run
    twice: forward and checkpoint recomputation) apply them without checking them again."""
    model = _CheckpointedStack()
    reft_model = ReftModel(model, ReftConfig([{"layer": i, "component": "block_output", "low_rank_dimension": 2,
                                               "intervention": "loreft"} for i in range(3)]), backend="triton")
    checked, calls = [], []
    real = ops._check_param
    monkeypatch.setattr(ops, "_check_param", lambda name, *a: checked.append(name) or real(name, *a))
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda *args: calls.append(1))
    _, out = reft_model({"input_ids": torch.randint(0, 32, (2, 5))},
                        intervention_locations=torch.tensor([[[1, 3], [0, 2]]] * 3))
    out["loss"].backward()
    assert len(calls) == 6  # the layers ran twice: the recomputation happened
    assert sorted(checked) == sorted(["Q", "W", "b"] * 3)


def test_rotations_replay_only_where_transformers_checkpointing_may_recompute_the_edits(monkeypatch):
    """R's map goes through the replayable node (a second autograd pass per step) only when a layer is under
    gradient checkpointing; otherwise autograd differentiates it directly, with the same gradients."""
    model = _CheckpointedStack()
    reft_model = ReftModel(model, ReftConfig([{"layer": i, "component": "block_output", "low_rank_dimension": 2,
                                               "intervention": "loreft"} for i in range(3)]), backend="triton")
    replays = []
    real = interventions._ReplayableGraph.apply
    monkeypatch.setattr(interventions._ReplayableGraph, "apply", lambda *a: replays.append(1) or real(*a))
    ids, locations = torch.randint(0, 32, (2, 5)), torch.tensor([[[1, 3], [0, 2]]] * 3)
    grads = []
    for checkpointed in (False, True):
        for layer in model.layers:
            layer.gradient_checkpointing = checkpointed  # what transformers' gradient_checkpointing_enable sets
        reft_model.zero_grad(set_to_none=True)
        _, out = reft_model({"input_ids": ids}, intervention_locations=locations)
        out["loss"].backward()
        grads.append([p.grad.clone() for p in reft_model.trainable_parameters()])
        assert len(replays) == int(checkpointed)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_forward_state_positions_dispatch_nothing_per_hook_call():
    locations = torch.arange(3 * 2 * 4).reshape(3, 2, 4)
    state = ForwardState({torch.device("cpu"): locations}, [None] * 3, ("torch",) * 3)
    with _AtenCalls() as calls:
        rows = [state.positions(i, torch.device("cpu"), 2) for i in range(3)]
    assert calls.names == []  # no aten select per call: cut once when the state is built
    for i, row in enumerate(rows):
        torch.testing.assert_close(row, locations[i], rtol=0, atol=0)


def _old_module_device(module):
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def test_module_device_walks_the_modules_dicts_in_parameters_order(monkeypatch):
    nested = nn.Sequential(nn.Sequential(), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), nn.Linear(2, 2))
    with_buffer = nn.BatchNorm1d(3).requires_grad_(False)
    del with_buffer.weight, with_buffer.bias
    with_buffer.weight = with_buffer.bias = None
    modules = [LoreftIntervention(embed_dim=8, low_rank_dimension=2), nested, with_buffer, nn.ReLU(), nn.Sequential()]
    expected = [_old_module_device(m) for m in modules]

    def no_generators(self, *args, **kwargs):
        raise AssertionError("parameters()/buffers() walk named_modules with generators: µs per intervention")

    monkeypatch.setattr(nn.Module, "parameters", no_generators)
    monkeypatch.setattr(nn.Module, "buffers", no_generators)
    assert [_module_device(m) for m in modules] == expected


def test_rotation_inputs_are_read_from_the_modules_dicts(monkeypatch):
    intervention = LoreftIntervention(embed_dim=8, low_rank_dimension=2)
    layer = intervention.rotate_layer
    expected = (layer.original, layer.base_reflectors, layer.base_tau)
    monkeypatch.setattr(HouseholderOrthogonal, "__getattr__", lambda self, name: pytest.fail(f"__getattr__({name})"))
    assert all(a is b for a, b in zip(layer.rotation_inputs(), expected, strict=True))
