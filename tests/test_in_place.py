"""Edits written into the hidden state and its gradient (``in_place=True``, what the model's hooks use) against the
out-of-place op: bit-identical outputs and gradients, the caller's other gradients untouched, and no [B, T, d] copy
per intervention in a training step, on the Triton backend and on the torch backend.

The Triton kernels run through the interpreter here (TRITON_INTERPRET=1, tests/conftest.py); the shapes take both
of their paths: few rows (column-split projections) and many rows (the fused pass, several weight splits). The torch
backend edits in place only from ``backend_torch.AUTOGRAD_BELOW_NUMEL`` elements (below, autograd through its forward
costs the host less): the ``written_out`` fixture lowers that to 0 so that these small shapes take its in-place path.
"""

import json
import random
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from reft_fast import ReftConfig, ReftModel, ops
from reft_fast.ops import backend_torch, backend_triton

from launch_count import DeviceWork
from reference import DEVICE, make_params, make_positions, reference

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_seed")

ROWS = {"few": dict(B=2, T=32, n=14), "many": dict(B=8, T=32, n=14)}


BACKENDS = ("triton", "torch")
_BACKEND_CLASSES = {"triton": backend_triton.TritonBackend, "torch": backend_torch.TorchBackend}


@pytest.fixture
def written_out(monkeypatch):
    """The torch backend's written-out backward and in-place edits at every size (not only from 2^18 elements)."""
    monkeypatch.setattr(backend_torch, "AUTOGRAD_BELOW_NUMEL", 0)


@pytest.fixture
def backward_paths(monkeypatch, written_out):
    """The backends' backward calls, in order: 'in place' (into grad_out) or 'copy' (into a new tensor)."""
    calls = []
    for backend_class in _BACKEND_CLASSES.values():
        real_in_place, real_copy = backend_class.backward_in_place, backend_class.backward
        monkeypatch.setattr(backend_class, "backward_in_place",
                            lambda self, *a, real=real_in_place: calls.append("in place") or real(self, *a))
        monkeypatch.setattr(backend_class, "backward",
                            lambda self, *a, real=real_copy: calls.append("copy") or real(self, *a))
    return calls


def _edit_and_grads(backend, h, g, positions, params, in_place, dropout, other_branch):
    """(output, grads of h, Q, W, b) of one edit of a non-leaf h; with ``other_branch`` the edit's output is added to
    a tensor computed from h before it, so that the gradient reaching the edit is also pending for that branch."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items() if k != "P"}
    x = h.clone().requires_grad_()
    other = x * 3.0 if other_branch else None
    hidden = x * 1.0  # a non-leaf the caller owns
    out = ops.low_rank_edit(hidden, positions, leaves["Q"], W=leaves.get("W"), b=leaves.get("b"),
                            P=leaves["Q"] if "P" in params else None, act="gelu" if "W" in params else None,
                            dropout=dropout, seed=17, backend=backend, validate=False, in_place=in_place)
    assert (out is hidden) == in_place
    if other_branch:
        out = out + other
    (out * g).sum().backward()
    return [out.detach()] + [x.grad] + [leaves[k].grad for k in sorted(leaves)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("other_branch", [False, True], ids=["gradient owned", "gradient shared"])
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("family,dropout", [("loreft", 0.2), ("nodireft", 0.0), ("lobireft", 0.1)])
def test_in_place_matches_out_of_place_bit_for_bit(family, dropout, rows, other_branch, backend, backward_paths):
    B, T, n = ROWS[rows].values()
    positions = make_positions(B, T, n)
    if rows == "few":  # an example selecting token 0 before and after −1 slots, and one selecting nothing
        others = random.sample([p for p in range(1, T) if p != 5], 3) + [-1] * (n - 7)
        positions[0], positions[1] = torch.tensor([0, -1, 5, -1] + others), -1
    ops.validate_positions(positions, T)  # distinct positions: the ops' contract (both calls skip the check)
    params = make_params(family, 8, 64)
    h = torch.randn(B, T, 64, device=DEVICE)
    g = torch.randn(B, T, 64, device=DEVICE)
    copied = _edit_and_grads(backend, h, g, positions, params, False, dropout, other_branch)
    backward_paths.clear()
    written = _edit_and_grads(backend, h, g, positions, params, True, dropout, other_branch)
    # a gradient that the residual branch still holds is never written into
    assert backward_paths == (["copy"] if other_branch else ["in place"])
    for a, b in zip(written, copied):
        assert torch.equal(a, b)
    if not other_branch and dropout == 0.0:  # and both against the float64 reference
        leaves = {k: v.double().requires_grad_() for k, v in params.items() if k != "P"}
        if "P" in params:
            leaves["P"] = leaves["Q"]
        torch.testing.assert_close(written[0], reference(h.double(), positions, leaves, "gelu" if "W" in params
                                                         else None).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_output_keeps_unselected_rows_and_hands_backward_the_unedited_rows(backend, written_out):
    B, T, n, d = 3, 9, 4, 40
    positions = make_positions(B, T, n)
    params = make_params("loreft", 4, d)
    h = torch.randn(B, T, d, device=DEVICE)
    hidden = h.clone()
    out = ops.loreft(hidden, positions, params["Q"], params["W"], params["b"], backend=backend)
    edited = ops.low_rank_edit(hidden, positions, params["Q"], W=params["W"], b=params["b"], P=params["Q"],
                               backend=backend, in_place=True)
    assert edited is hidden and torch.equal(edited, out)
    selected = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    for bi, row in enumerate(positions.tolist()):
        selected[bi, [p for p in row if p >= 0]] = True
    assert torch.equal(edited[~selected], h[~selected])


def test_the_torch_backend_edits_small_hidden_states_out_of_place():
    # Below 2^18 elements autograd through its forward costs the host less than any written-out backward.
    positions = make_positions(2, 5, 2)
    params = make_params("lobireft", 2, 16)
    h = torch.randn(2, 5, 16, device=DEVICE)
    before = h.clone()
    out = ops.low_rank_edit(h, positions, params["Q"], b=params["b"], backend="torch", in_place=True)
    assert out is not h and torch.equal(h, before)
    assert torch.equal(out, ops.lobireft(h, positions, params["Q"], params["b"], backend="torch"))
    torch_backend = ops.get_backend("torch")
    assert torch_backend.differentiates_forward(h)
    assert not torch_backend.differentiates_forward(torch.empty(2, 512, 256))


def test_sole_owner_refuses_views_saved_tensors_and_leaves():
    fresh = torch.randn(4, 3) + 1
    assert ops.is_sole_owner(fresh)
    assert not ops.is_sole_owner(fresh.view(2, 6))  # a view
    view = fresh[:2]
    assert not ops.is_sole_owner(fresh)  # has a view
    del view
    weight = torch.randn(3, 3, requires_grad=True)
    used = torch.randn(4, 3) + 1
    product = used @ weight  # saves ``used`` for weight's gradient
    assert not ops.is_sole_owner(used)
    assert not ops.is_sole_owner(torch.tanh(product))  # tanh saves its output for its backward
    assert not ops.is_sole_owner(weight)  # a leaf that requires grad
    assert not ops.is_sole_owner(torch.randn(3, 4).t())  # not contiguous


def test_without_torch_private_reference_counts_every_edit_copies(monkeypatch):
    # The ownership check reads private torch counters; a release without them must turn in-place edits off, not
    # break the import or guess.
    from reft_fast.ops import library

    fresh = torch.randn(4, 3) + 1
    assert ops.is_sole_owner(fresh)
    monkeypatch.setattr(library, "_STORAGE_USE_COUNT", None)
    monkeypatch.setattr(library, "_LONE_STORAGE_USERS", library._storage_users(fresh))
    assert library._LONE_STORAGE_USERS is None
    assert not ops.is_sole_owner(fresh)


# ----------------------------------------------------------------------------------------------------------------------
# Through a model's hooks
# ----------------------------------------------------------------------------------------------------------------------
HIDDEN = 32


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96)
    return LlamaForCausalLM(config).eval()


def _two_per_layer_config():
    # Two interventions at one layer output, one at an input (never owned: copied once), dropout included.
    return ReftConfig([
        {"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2, "dropout": 0.3},
        {"layer": 0, "component": "block_output", "intervention": "nodireft", "low_rank_dimension": 2,
         "act_fn": "relu"},
        {"layer": 1, "component": "mlp_output", "intervention": "direft", "low_rank_dimension": 2},
        {"layer": 2, "component": "attention_input", "intervention": "noreft", "low_rank_dimension": 2},
        {"layer": 2, "component": "block_output", "intervention": "consreft", "low_rank_dimension": 2}])


def _inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (3, 7), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


LOCATIONS = torch.tensor([[[2, 5], [3, -1], [1, 4]]] * 5)


def _train_step(model, state, backend, checkpointing=None):
    reft_model = ReftModel(model, _two_per_layer_config(), backend=backend).train()
    reft_model.interventions.load_state_dict(state)
    if checkpointing is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.train()
    base = _inputs()
    torch.manual_seed(5)  # the dropout seeds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant checkpointing warns that no input requires grad
        _, out = reft_model(base, intervention_locations=LOCATIONS, labels=base["input_ids"])
        out.loss.backward()
    reft_model.remove_hooks()
    if checkpointing is not None:
        model.gradient_checkpointing_disable()
    model.eval()
    return out.logits.detach(), [p.grad for p in reft_model.trainable_parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "non-reentrant", "reentrant"])
def test_model_gradients_in_place_equal_out_of_place(checkpointing, backend, monkeypatch, backward_paths):
    model = _tiny_llama()
    state = ReftModel(model, _two_per_layer_config()).interventions.state_dict()
    with torch.no_grad():
        for tensor in state.values():
            if tensor.dim() == 1:
                tensor.normal_()  # non-trivial edits
    model = _tiny_llama()
    logits, grads = _train_step(model, state, backend, checkpointing)
    assert "in place" in backward_paths  # the comparison below covers both paths
    backward_paths.clear()
    monkeypatch.setattr(ops.library, "is_sole_owner", lambda t: False)  # nothing owned: every site copies
    monkeypatch.setattr(ops, "is_sole_owner", lambda t: False)
    logits_copied, grads_copied = _train_step(model, state, backend, checkpointing)
    assert backward_paths and set(backward_paths) == {"copy"}
    assert torch.equal(logits, logits_copied)
    for a, b in zip(grads, grads_copied):
        assert torch.equal(a, b)


class _FullSizeTensors(TorchDispatchMode):
    """Counts the torch ops (outside Triton kernels) whose output is a new tensor of shape ``shape``."""

    def __init__(self, shape, work: DeviceWork):
        super().__init__()
        self.shape, self.work, self.count = tuple(shape), work, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (not self.work._inside_triton and not func.is_view and isinstance(out, torch.Tensor)
                and tuple(out.shape) == self.shape and not any(out is a for a in args)):
            self.count += 1
        return out


def _full_size_tensors_of_a_step(reft_model):
    base = _inputs()
    with DeviceWork() as work, _FullSizeTensors((3, 7, HIDDEN), work) as counter:
        reft_model(base, intervention_locations=LOCATIONS[:3], labels=base["input_ids"])[1].loss.backward()
    return counter.count


def test_a_training_step_makes_no_hidden_state_copy_per_intervention(monkeypatch, backward_paths):
    config = ReftConfig({"layer": "all", "component": "block_output", "intervention": "loreft",
                         "low_rank_dimension": 2})
    reft_model = ReftModel(_tiny_llama(), config, backend="triton").train()
    in_place = _full_size_tensors_of_a_step(reft_model)
    assert backward_paths == ["in place"] * 3
    monkeypatch.setattr(ops.library, "is_sole_owner", lambda t: False)  # what every edit cost before: copies
    monkeypatch.setattr(ops, "is_sole_owner", lambda t: False)
    copying = _full_size_tensors_of_a_step(reft_model)
    # the edited output and its gradient: two [B, T, d] tensors per intervention, none of them left in place
    assert copying - in_place == 2 * 3


def _hidden_state_allocations(reft_model) -> tuple[int, int]:
    """(all, inside the edits' own forward and backward): the allocations of a training step as large as the hidden
    state [B, T, d] or the torch backend's padded copy of it [B·T + 1, d], as the CPU allocator reports them to
    torch.profiler (profile_memory); an allocation is the edits' when an event of their autograd Function (forward or
    backward node, named after the class) encloses it."""
    base = _inputs()
    batch, seq_len = base["input_ids"].shape
    sizes = {batch * seq_len * HIDDEN * 4, (batch * seq_len + 1) * HIDDEN * 4}  # fp32
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reft_model(base, intervention_locations=LOCATIONS[:3], labels=base["input_ids"])[1].loss.backward()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    edits = [e for e in events if e.get("ph") == "X" and ("_EditInPlace" in e["name"] or "_EagerEdit" in e["name"])]
    allocations = [e["ts"] for e in events if e.get("name") == "[memory]" and e["args"]["Bytes"] in sizes]
    inside = sum(1 for ts in allocations if any(e["ts"] <= ts <= e["ts"] + e["dur"] for e in edits))
    return len(allocations), inside


def test_a_torch_backend_step_allocates_no_hidden_state_per_intervention(monkeypatch, backward_paths):
    """The same step as above on the torch backend, profiled on the CPU allocator: the edits allocate nothing the
    size of the hidden state; copying, each adds two (the padded copies of the hidden state and of its gradient)."""
    config = ReftConfig({"layer": "all", "component": "block_output", "intervention": "loreft",
                         "low_rank_dimension": 2})
    reft_model = ReftModel(_tiny_llama(), config, backend="torch").train()
    in_place, by_the_edits = _hidden_state_allocations(reft_model)
    assert backward_paths == ["in place"] * 3 and by_the_edits == 0
    monkeypatch.setattr(ops.library, "is_sole_owner", lambda t: False)  # what every edit cost before: copies
    monkeypatch.setattr(ops, "is_sole_owner", lambda t: False)
    copying, by_the_copying_edits = _hidden_state_allocations(reft_model)
    assert copying - in_place == by_the_copying_edits == 2 * 3
