import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from reft_fast import ops
from reft_fast.compat import load_pyreft_state
from reft_fast.core.config import ReftConfig
from reft_fast.core.interventions import (
    INTERVENTION_TYPES,
    ConsreftIntervention,
    DireftIntervention,
    InterventionSpec,
    LobireftIntervention,
    LoreftIntervention,
    NodireftIntervention,
    NoreftIntervention,
    ReftIntervention,
    intervention_class,
    intervention_from_config,
    register_intervention,
)
from reft_fast.core.model import ReftModel, get_reft_model

from reference import reference

D, R_ = 24, 3
ACTS = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu}


def _positions():
    return torch.tensor([[0, 3, -1], [5, -1, -1], [1, 2, 4]])


def _reference(inter, h, positions):
    """The pyreft formulas of the module docstring, written out on the selected rows (dropout 0)."""
    out = h.clone()
    act = ACTS[inter.act_fn_name]
    for b in range(h.shape[0]):
        for p in positions[b].tolist():
            if p < 0:
                continue
            x = h[b, p].float()
            if inter.uses_rotation:
                R = inter.rotation_matrix()
            name = type(inter).__name__
            if name == "LoreftIntervention":
                o = x + (act(inter.learned_source(x)) - R @ x) @ R
            elif name == "DireftIntervention":
                o = x + act(inter.learned_source(x)) @ R
            elif name == "NoreftIntervention":
                o = x + (act(inter.learned_source(x)) - inter.proj_layer(x)) @ inter.proj_layer.weight
            elif name == "NodireftIntervention":
                o = x + act(inter.learned_source(x)) @ inter.proj_layer.weight
            elif name == "ConsreftIntervention":
                o = x + (inter.learned_source - R @ x) @ R
            else:
                o = x + inter.learned_source @ R
            out[b, p] = o.to(h.dtype)
    return out


CASES = [
    (LoreftIntervention, {}), (LoreftIntervention, {"act_fn": "relu", "orthogonalization": "householder"}),
    (LoreftIntervention, {"orthogonalization": "cholesky"}),
    (DireftIntervention, {"act_fn": "gelu"}), (NoreftIntervention, {}), (NoreftIntervention, {"add_bias": True}),
    (NoreftIntervention, {"add_bias": True, "act_fn": "relu"}), (NodireftIntervention, {"act_fn": "relu"}),
    (ConsreftIntervention, {}), (LobireftIntervention, {"orthogonalization": "householder"}),
]


@pytest.mark.parametrize("cls, kwargs", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edit_matches_formula_and_grads_flow(cls, kwargs, dtype):
    torch.manual_seed(0)
    inter = cls(embed_dim=D, low_rank_dimension=R_, **kwargs)
    h = torch.randn(3, 6, D, dtype=dtype, requires_grad=True)
    out = inter(h, _positions())
    expected = _reference(inter, h.detach(), _positions())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, expected, **tol)
    untouched = torch.ones(3, 6, dtype=torch.bool)
    for b, row in enumerate(_positions().tolist()):
        for p in row:
            if p >= 0:
                untouched[b, p] = False
    assert torch.equal(out.detach()[untouched], h.detach()[untouched])
    out.float().square().sum().backward()
    h_ref = h.detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(_reference(inter, h_ref, _positions()).float().square().sum(), h_ref)
    torch.testing.assert_close(h.grad, expected_grad, **tol)
    for name, param in inter.named_parameters():
        assert param.dtype == torch.float32
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_rotation_is_orthonormal_for_every_method():
    for method in ("polar", "cholesky", "householder"):
        R = LoreftIntervention(embed_dim=D, low_rank_dimension=R_, orthogonalization=method).rotation_matrix()
        torch.testing.assert_close(R @ R.T, torch.eye(R_), atol=1e-5, rtol=0)


def test_noreft_bias_with_activation_applies_dropout_once():
    # add_bias with an activation runs two edits; dropout must act once, on the whole edited vector.
    torch.manual_seed(0)
    inter = NoreftIntervention(embed_dim=D, low_rank_dimension=R_, add_bias=True, act_fn="relu", dropout=0.4).train()
    h = torch.randn(3, 6, D)
    positions = _positions()
    out = inter(h, positions, seed=123, backend="torch")
    keep = ops.dropout_keep_mask((*positions.shape, D), 0.4, 123, h.device)
    expected = _reference(inter, h, positions)
    for b, row in enumerate(positions.tolist()):
        for j, p in enumerate(row):
            if p >= 0:
                expected[b, p] = expected[b, p] * keep[b, j] / 0.6
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    inter.eval()
    torch.testing.assert_close(inter(h, positions), _reference(inter, h, positions), atol=1e-5, rtol=1e-5)


def test_parameters_stay_float32_under_casts():
    inter = LoreftIntervention(embed_dim=D, low_rank_dimension=R_, orthogonalization="householder")
    inter.to(torch.bfloat16)
    inter.half()
    assert {t.dtype for t in (*inter.parameters(), *inter.buffers())} == {torch.float32}


def test_one_hidden_sized_copy_per_edit():
    class CountFullSize(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.count = numel, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # a new tensor at least as large as h: views and in-place ops allocate nothing
            if (isinstance(out, torch.Tensor) and out.numel() >= self.numel and not func.is_view
                    and not func._schema.is_mutable):
                self.count += 1
            return out

    inter = LoreftIntervention(embed_dim=D, low_rank_dimension=R_)
    h = torch.randn(3, 6, D)
    R = inter.rotation_matrix()
    with CountFullSize(h.numel()) as counter:
        inter.edit(h, _positions(), rotation=R, validate=False)
    assert counter.count == 1


@pytest.mark.parametrize("bad, match", [
    ({"low_rank_dimension": D + 1}, "larger than embed_dim"),
    ({"embed_dim": 0}, "embed_dim must be a positive int"),
    ({"dropout": 1.0}, "dropout must be a probability"),
    ({"act_fn": "swish2"}, "act_fn must be None or one of"),
    ({"orthogonalization": "qr"}, "orthogonalization must be one of"),
    ({"dtype": "int8"}, "dtype must be a torch floating dtype"),
])
def test_bad_arguments(bad, match):
    kwargs = {"embed_dim": D, "low_rank_dimension": R_, **bad}
    with pytest.raises(ValueError, match=match):
        LoreftIntervention(**kwargs)


def test_pyreft_callables_under_pyreft_names():
    # A forward copied from pyreft calls self.act_fn(x) and self.dropout(x); the edit reads the hyperparameters.
    inter = LoreftIntervention(embed_dim=D, low_rank_dimension=R_, act_fn="gelu", dropout=0.25)
    x = torch.randn(3, R_)
    torch.testing.assert_close(inter.act_fn(x), F.gelu(x))
    assert isinstance(inter.dropout, torch.nn.Dropout) and inter.dropout.p == 0.25
    assert (inter.act_fn_name, inter.dropout_rate) == ("gelu", 0.25)
    assert (inter.config_dict()["act_fn"], inter.config_dict()["dropout"]) == ("gelu", 0.25)
    inter.eval()
    torch.testing.assert_close(inter.dropout(x), x, rtol=0, atol=0)
    assert ConsreftIntervention(embed_dim=D, low_rank_dimension=R_, act_fn="relu").config_dict()["act_fn"] is None


def test_names_and_config_round_trip():
    assert intervention_class("loreft") is LoreftIntervention
    assert intervention_class("NodiReFT") is NodireftIntervention
    assert intervention_class("<class 'pyreft.interventions.ConsreftIntervention'>") is ConsreftIntervention
    with pytest.raises(ValueError, match="unknown intervention type"):
        intervention_class("lora")
    for cls in INTERVENTION_TYPES.values():
        inter = cls(embed_dim=D, low_rank_dimension=R_, dropout=0.1)
        assert intervention_from_config(inter.config_dict()).config_dict() == inter.config_dict()


def test_triton_backend_matches_torch():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    inter = LoreftIntervention(embed_dim=D, low_rank_dimension=R_, act_fn="relu")
    h = torch.randn(3, 6, D, requires_grad=True)
    results = []
    for backend in ("torch", "triton"):
        h.grad = None
        for p in inter.parameters():
            p.grad = None
        out = inter(h, _positions(), backend=backend)
        out.square().sum().backward()
        results.append((out.detach(), h.grad.clone(), [p.grad.clone() for p in inter.parameters()]))
    (o1, g1, p1), (o2, g2, p2) = results
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-5)
    for a, b in zip(p2, p1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# One pyreft module at a time: weights copied, same output on the same rows
# ---------------------------------------------------------------------------------------------------------------------
_PYREFT_CASES = [
    ("LoreftIntervention", {"act_fn": "relu"}), ("NoreftIntervention", {"add_bias": True, "act_fn": "relu"}),
    ("NoreftIntervention", {"add_bias": False}), ("DireftIntervention", {"act_fn": "gelu"}),
    ("NodireftIntervention", {"add_bias": True}), ("ConsreftIntervention", {}), ("LobireftIntervention", {}),
]


@pytest.mark.parametrize("name, kwargs, orthogonalization", [
    (name, kwargs, method) for name, kwargs in _PYREFT_CASES
    for method in (("polar", "householder") if INTERVENTION_TYPES[name].uses_rotation else (None,))])
def test_load_pyreft_state_gives_pyreft_output(name, kwargs, orthogonalization):
    pyreft = pytest.importorskip("pyreft")
    torch.manual_seed(0)
    theirs = getattr(pyreft, name)(embed_dim=D, low_rank_dimension=R_, dtype=torch.float32, **kwargs)
    ours_cls = INTERVENTION_TYPES[name]
    extra = {"orthogonalization": orthogonalization} if ours_cls.uses_rotation else {}
    ours = ours_cls(embed_dim=D, low_rank_dimension=R_, **{k: v for k, v in kwargs.items()}, **extra)
    # Give pyreft's constant sources and biases non-trivial values.
    with torch.no_grad():
        for param_name, p in theirs.named_parameters():
            if not param_name.startswith("rotate_layer"):  # the rotation's diagonal holds signs: leave it
                p.add_(0.1 * torch.randn_like(p))
    load_pyreft_state(ours, theirs.state_dict())
    h = torch.randn(4, 5, D)
    positions = torch.tensor([[0, 1], [4, -1], [2, 3], [1, 4]])
    out = ours(h, positions)
    expected = h.clone()
    for b, row in enumerate(positions.tolist()):
        rows = [p for p in row if p >= 0]
        expected[b, rows] = theirs(h[b, rows]).detach()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# A member the package does not define: one spec entry is all it takes
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def free_constant_type():
    """h + (b − (W2 h + b2)) W2: a free basis W2 (with its bias b2) and a constant source b, subtracting."""
    cls = register_intervention("FreeconsreftIntervention", InterventionSpec("free", "constant", subtract=True))
    yield cls
    del INTERVENTION_TYPES[cls.__name__]


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=D, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64)).eval()


def test_a_new_spec_entry_builds_by_name_runs_like_the_reference_and_saves(free_constant_type, tmp_path):
    config = ReftConfig([{"layer": 1, "component": "block_output", "intervention": "freeconsreft",
                          "low_rank_dimension": R_, "add_bias": True, "dtype": "bfloat16"}])
    reft_model = get_reft_model(_tiny_llama(), config)
    (inter,) = reft_model.interventions.values()
    assert type(inter) is free_constant_type and intervention_class("FreeconsReFT") is free_constant_type
    assert sorted(name for name, _ in inter.named_parameters()) == ["learned_source", "proj_layer.bias",
                                                                   "proj_layer.weight"]
    with torch.no_grad():
        for param in inter.parameters():
            param.add_(0.3 * torch.randn_like(param))

    h = torch.randn(3, 6, D, requires_grad=True)
    grad_out = torch.randn(3, 6, D)
    inter(h, _positions(), backend="torch").backward(grad_out)
    W2, b2, b = (t.detach().double().requires_grad_() for t in (inter.proj_layer.weight, inter.proj_layer.bias,
                                                              inter.learned_source))
    h64 = h.detach().double().requires_grad_()
    expected = reference(h64, _positions(), {"Q": W2, "P": W2, "b": b - b2})
    expected.backward(grad_out.double())
    for ours, theirs in ((h.grad, h64.grad), (inter.proj_layer.weight.grad, W2.grad),
                         (inter.proj_layer.bias.grad, b2.grad), (inter.learned_source.grad, b.grad)):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inter(h, _positions()).double(), expected, atol=1e-5, rtol=1e-5)

    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    locations = torch.tensor([[[0, 4], [2, -1]]])
    with torch.no_grad():
        _, before = reft_model({"input_ids": ids}, intervention_locations=locations)
    reft_model.save(tmp_path)
    loaded = ReftModel.load(tmp_path, _tiny_llama()).eval()
    assert [i.config_dict() for i in loaded.interventions.values()] == [inter.config_dict()]
    with torch.no_grad():
        _, after = loaded({"input_ids": ids}, intervention_locations=locations)
    assert torch.equal(after.logits, before.logits)


def test_spec_options_are_checked_by_basis():
    # add_bias on a rotation type is ignored, as pyreft does (tests/test_pyreft_intervention_kwargs.py).
    with pytest.raises(TypeError, match="unexpected keyword argument 'orthogonalization'"):
        NoreftIntervention(embed_dim=D, low_rank_dimension=R_, orthogonalization="householder")
    with pytest.raises(ValueError, match="already registered"):
        register_intervention("LoreftIntervention", InterventionSpec("rotation", "linear", subtract=True))
    # "LoReFT" shortens to "loreft", as LoreftIntervention does: by-name lookups would silently build the newer one.
    with pytest.raises(ValueError, match="would share the short name 'loreft' of the registered 'LoreftIntervention'"):
        register_intervention("LoReFT", InterventionSpec("free", "constant", subtract=True))
    assert intervention_class("loreft") is LoreftIntervention
    import reft_fast  # as the README writes them: top-level names

    assert (reft_fast.register_intervention, reft_fast.InterventionSpec) == (register_intervention, InterventionSpec)
    with pytest.raises(ValueError, match="basis must be one of"):
        InterventionSpec("orthogonal", "linear", subtract=True)
    with pytest.raises(TypeError, match="instantiate a member"):
        ReftIntervention(embed_dim=D, low_rank_dimension=R_)
