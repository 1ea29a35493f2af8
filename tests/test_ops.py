"""The op (reft_fast.ops) on every backend available here, against the float64 reference of tests/reference.py.

The reference edits the selected rows with float64 math; gradients come from autograd through it.
Inputs are fresh random numbers on every run (the seed is printed, so a failure can be replayed).
"""

import pytest
import torch

from reft_fast import ops

from conftest import HAS_CUDA
from reference import DEVICE, FAMILY, assert_weight_grad_close, make_params, make_positions, reference, triton_on_tf32

pytestmark = pytest.mark.usefixtures("fresh_seed")
BACKENDS = ["torch", "triton"] + (["cuda"] if HAS_CUDA else [])

# Output / input-gradient tolerances per dtype of h: the edit is computed in fp32 and rounded once to h's dtype
# (the Triton interpreter truncates instead of rounding, one more ulp). Weight gradients are fp32 sums of fp32
# products of the (exactly representable) h and g values, so they get fp32 tolerances whatever h's dtype.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}
WEIGHT_TOL = dict(rtol=1e-3, atol=1e-3)

ACTS = [None, "relu", "gelu", "silu", "tanh"]


def run_op(h, positions, params, backend, act=None, **kw):
    return ops.low_rank_edit(h, positions, params["Q"], W=params.get("W"), b=params.get("b"), P=params.get("P"),
                             act=act, backend=backend, **kw)


def check_against_reference(backend, family, act, dtype, B, T, n, r, d, empty_row=True):
    positions = make_positions(B, T, n, empty_row=empty_row)
    params = make_params(family, r, d)
    h = torch.randn(B, T, d, device=DEVICE).to(dtype)
    g = torch.randn(B, T, d, device=DEVICE).to(dtype)

    h_in = h.clone().requires_grad_()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    if family in ("loreft", "consreft"):
        leaves["P"] = leaves["Q"]  # the same tensor, as LoReFT/ConsReFT pass it
    out = run_op(h_in, positions, leaves, backend, act)
    out.backward(g)

    h64 = h.double().requires_grad_()
    ref_leaves = {k: v.double().requires_grad_() for k, v in params.items()}
    if family in ("loreft", "consreft"):
        ref_leaves["P"] = ref_leaves["Q"]
    ref = reference(h64, positions, ref_leaves, act)
    ref.backward(g.double())

    assert out.dtype == dtype and out.shape == h.shape
    torch.testing.assert_close(out.double(), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(h_in.grad.double(), h64.grad, **TOL[dtype])
    tf32 = triton_on_tf32(backend, dtype)
    for k in leaves:
        if k == "P" and family in ("loreft", "consreft"):
            continue  # same leaf as Q: its gradient is the sum, checked through Q
        assert_weight_grad_close(leaves[k].grad.double(), ref_leaves[k].grad, tf32, k)

    # rows not selected: bit-identical to h, and their gradient is exactly g
    selected = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    for bi in range(B):
        for pos in positions[bi].tolist():
            if pos >= 0:
                selected[bi, pos] = True
    assert torch.equal(out.detach()[~selected], h[~selected])
    assert torch.equal(h_in.grad[~selected], g[~selected])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,act", [(f, a) for f in FAMILY for a in (ACTS if FAMILY[f][0] else [None])])
def test_family_and_activations_fp32(backend, family, act):
    check_against_reference(backend, family, act, torch.float32, B=3, T=9, n=4, r=5, d=97)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(FAMILY))
def test_half_precision_h(backend, dtype, family):
    act = "gelu" if FAMILY[family][0] else None
    check_against_reference(backend, family, act, dtype, B=3, T=6, n=3, r=4, d=130)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,r", [(1000, 64), (1000, 3), (4097, 1), (4097, 8)])
def test_odd_shapes(backend, d, r):
    check_against_reference(backend, "loreft", None, torch.float32, B=3, T=5, n=3, r=r, d=d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows_every_position(backend):
    # every token of every example selected (the "all positions" case), more slots than one program holds
    B, T, d, r = 2, 40, 64, 8
    positions = torch.arange(T, device=DEVICE).repeat(B, 1)
    positions = positions[:, torch.randperm(T, device=DEVICE)]
    params = make_params("noreft", r, d)
    h = torch.randn(B, T, d, device=DEVICE)
    out = run_op(h, positions, params, backend, "silu")
    torch.testing.assert_close(out.double(), reference(h.double(), positions, {k: v.double() for k, v in params.items()},
                                                       "silu"), **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_h_is_not_modified_and_runs_are_bitwise_equal(backend):
    B, T, d, r = 3, 8, 200, 8
    positions = make_positions(B, T, 4)
    params = make_params("loreft", r, d)
    h = torch.randn(B, T, d, device=DEVICE, dtype=torch.bfloat16)
    h_before = h.clone()
    g = torch.randn_like(h)
    results = []
    for _ in range(2):
        h_in = h.clone().requires_grad_()
        leaves = {k: v.clone().requires_grad_() for k, v in params.items() if k != "P"}
        leaves["P"] = leaves["Q"]
        out = run_op(h_in, positions, leaves, backend, dropout=0.2, seed=1234)
        out.backward(g)
        results.append([out.detach(), h_in.grad, leaves["Q"].grad, leaves["W"].grad, leaves["b"].grad])
    assert torch.equal(h, h_before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("in_place", [False, True])
def test_unchecked_positions_past_the_sequence_select_nothing(backend, in_place):
    """With validate=False (positions already on the GPU are not read back), a position ≥ T selects nothing, as −1:
    it must not edit token p − T of the next example (its flat row) nor touch memory past h."""
    B, T, d, r = 3, 6, 40, 4
    positions = make_positions(B, T, 4, empty_row=False)
    past = positions.clone()
    past[:, 0] = torch.tensor([T, T + 2, 10**6])[:B]
    unselected = positions.clone()
    unselected[:, 0] = -1
    params = make_params("loreft", r, d)
    h, g = torch.randn(B, T, d, device=DEVICE), torch.randn(B, T, d, device=DEVICE)
    results = []
    for pos in (past, unselected):
        h_in = h.clone().requires_grad_()
        leaves = {k: v.clone().requires_grad_() for k, v in params.items() if k != "P"}
        out = run_op(h_in * 1.0, pos.to(DEVICE), {**leaves, "P": leaves["Q"]}, backend, validate=False,
                     in_place=in_place)
        out.backward(g)
        results.append([out.detach(), h_in.grad, leaves["Q"].grad, leaves["W"].grad, leaves["b"].grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("in_place", [False, True])
def test_torch_backend_written_out_paths_never_edit_the_next_example_for_a_position_past_the_sequence(in_place):
    """Above AUTOGRAD_BELOW_NUMEL the torch backend runs its written-out backward (in place where owned): there a
    position T of example 0 was the flat row of example 1's token 0, edited silently."""
    B, d, r = 2, 16, 4
    T = ops.backend_torch.AUTOGRAD_BELOW_NUMEL // (B * d) + 1
    past = torch.tensor([[T, 3, -1], [5, 2, 7]])
    unselected = past.masked_fill(past >= T, -1)
    params = make_params("loreft", r, d)
    h, g = torch.randn(B, T, d), torch.randn(B, T, d)
    results = []
    for pos in (past, unselected):
        h_in = h.clone().requires_grad_()
        leaves = {k: v.clone().requires_grad_() for k, v in params.items() if k != "P"}
        out = run_op(h_in * 1.0, pos, {**leaves, "P": leaves["Q"]}, "torch", validate=False, in_place=in_place)
        out.backward(g)
        results.append([out.detach(), h_in.grad, leaves["Q"].grad, leaves["W"].grad, leaves["b"].grad])
    assert torch.equal(results[0][0][1, 0], h[1, 0])  # example 1's token 0 untouched
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_parameters_give_the_contiguous_result(backend):
    """R, W and b as views with other strides (a transposed QR factor, a slice) are the same numbers: the kernels,
    which read rows of d values, must get them contiguous, not their storage reinterpreted."""
    B, T, d, r = 2, 6, 16, 4
    positions = make_positions(B, T, 3)
    h = torch.randn(B, T, d, device=DEVICE)
    R = torch.linalg.qr(torch.randn(d, r, device=DEVICE))[0]  # [d, r]: R.T is a view, not contiguous
    W, b = torch.randn(d, r, device=DEVICE), torch.randn(2 * r, device=DEVICE)
    strided = [t.requires_grad_() for t in (R.T, W.T, b[::2])]
    dense = [t.contiguous().detach().requires_grad_() for t in strided]
    outs = [ops.loreft(h, positions, *params, backend=backend) for params in (strided, dense)]
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float32])
    g = torch.randn_like(h)
    for out in outs:
        out.backward(g)
    for got, want in zip(strided, dense):
        torch.testing.assert_close(got.grad, want.grad, **WEIGHT_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(0, 5), (2, 0)], ids=["batch0", "seq0"])
def test_empty_batch_or_sequence_gives_h_back(backend, B, T):
    h = torch.randn(B, T, 16, device=DEVICE, requires_grad=True)
    positions = torch.full((B, 2), -1, dtype=torch.long, device=DEVICE)
    R = torch.linalg.qr(torch.randn(16, 3, device=DEVICE))[0].T.contiguous().requires_grad_()
    out = ops.loreft(h, positions, R, torch.randn(3, 16, device=DEVICE), torch.randn(3, device=DEVICE),
                     backend=backend)
    assert torch.equal(out, h)
    out.sum().backward()
    assert torch.equal(h.grad, torch.ones_like(h)) and torch.equal(R.grad, torch.zeros_like(R))


def test_second_order_gradients_are_refused_by_name():
    """The backends' backward is not differentiable: create_graph must end in an error that says so, not in
    torch's "does not require grad" about a gradient that silently came back constant. (The torch backend on small
    h lets autograd differentiate its forward, so the kernels' path is taken with a large h.)"""
    h, positions, R, W, b = _good()
    h = torch.randn(2, ops.backend_torch.AUTOGRAD_BELOW_NUMEL // 32 + 1, 16)
    W.requires_grad_()
    out = ops.loreft(h, positions, R, W, b, backend="torch")
    (grad_W,) = torch.autograd.grad(out.square().sum(), W, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_W.sum().backward()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_selected_rows_reads_any_integer_positions(dtype):
    """What the op keeps for backward: the same rows whatever integer dtype positions has (torch indexes with int64
    and int32 only, and would read uint8 as a boolean mask)."""
    h = torch.randn(2, 5, 4, device=DEVICE)
    positions = torch.tensor([[0, 4, 1], [3, 1, 2]], device=DEVICE)
    torch.testing.assert_close(ops.selected_rows(h, positions.to(dtype)), ops.selected_rows(h, positions),
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_scale_and_backward(backend):
    B, T, d, r, p = 4, 10, 300, 4, 0.3
    positions = make_positions(B, T, 5, empty_row=False)
    params = make_params("direft", r, d)
    h = torch.randn(B, T, d, device=DEVICE)
    g = torch.randn_like(h)
    h_in = h.clone().requires_grad_()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = run_op(h_in, positions, leaves, backend, "relu", dropout=p, seed=77)
    out.backward(g)

    plain = reference(h.double(), positions, {k: v.double() for k, v in params.items()}, "relu")
    # Infer the mask from the output: a kept element is plain/(1−p), a dropped one is exactly 0.
    keep = torch.zeros(B, positions.shape[1], d, dtype=torch.float64, device=DEVICE)
    for bi in range(B):
        for j, pos in enumerate(positions[bi].tolist()):
            if pos >= 0:
                row = out[bi, pos].detach().double()
                keep[bi, j] = (row != 0).double()
                kept = row != 0
                torch.testing.assert_close(row[kept], plain[bi, pos][kept] / (1 - p), rtol=1e-4, atol=1e-4)
    n_selected = int((positions >= 0).sum()) * d
    kept_fraction = float(keep.sum()) / n_selected
    assert abs(kept_fraction - (1 - p)) < 0.05, kept_fraction

    # The backward must use the same mask as the forward.
    h64 = h.double().requires_grad_()
    ref_leaves = {k: v.double().requires_grad_() for k, v in params.items()}
    ref = reference(h64, positions, ref_leaves, "relu", keep=keep, dropout=p)
    ref.backward(g.double())
    torch.testing.assert_close(h_in.grad.double(), h64.grad, **TOL[torch.float32])
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad.double(), ref_leaves[k].grad, **WEIGHT_TOL)

    # Another seed gives another mask; p = 0 is exactly the no-dropout path.
    other = run_op(h, positions, params, backend, "relu", dropout=p, seed=78)
    assert not torch.equal(other, out.detach())
    assert torch.equal(run_op(h, positions, params, backend, "relu", dropout=0.0, seed=5),
                       run_op(h, positions, params, backend, "relu"))


def test_backends_agree_bitwise_on_unselected_and_closely_on_selected():
    B, T, d, r = 2, 6, 128, 4
    positions = make_positions(B, T, 3)
    params = make_params("loreft", r, d)
    h = torch.randn(B, T, d, device=DEVICE)
    outs = [run_op(h, positions, params, be) for be in BACKENDS]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


def test_reference_gradcheck_float64():
    B, T, d, r = 2, 4, 7, 3
    positions = torch.tensor([[0, 3], [2, -1]])
    h = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    Q = torch.randn(r, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(r, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(r, dtype=torch.float64, requires_grad=True)
    for act in (0, 2, 3, 4):
        fn = lambda h, Q, W, b: ops.reference_edit(h, positions, ops.EditParams(Q, Q, W, b, act, 0.0, 0))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (h, Q, W, b))


# ------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem
# ------------------------------------------------------------------------------------------------------------------
def _good():
    h = torch.randn(2, 5, 16)
    positions = torch.tensor([[0, 1], [4, -1]])
    R = torch.linalg.qr(torch.randn(16, 3))[0].T.contiguous()
    return h, positions, R, torch.randn(3, 16), torch.randn(3)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(h=torch.randn(10, 16)), ValueError, "h must be 3-D"),
    (lambda a: a.update(h=torch.randn(2, 5, 16).to(torch.float64)), TypeError, "h must be float32, bfloat16"),
    (lambda a: a.update(h=torch.randn(2, 5, 17)), ValueError, "hidden size"),
    (lambda a: a.update(positions=torch.tensor([[0.0, 1.0], [1.0, 2.0]])), TypeError, "integer dtype"),
    (lambda a: a.update(positions=torch.zeros(2, 2, 1, dtype=torch.long)), ValueError, "positions must be 2-D"),
    (lambda a: a.update(positions=torch.tensor([[0, 1]])), ValueError, "batch"),
    (lambda a: a.update(positions=torch.tensor([[0, 5], [1, -1]])), ValueError, "< the sequence length 5"),
    (lambda a: a.update(positions=torch.tensor([[0, -2], [1, -1]])), ValueError, "≥ −1"),
    (lambda a: a.update(positions=torch.tensor([[3, 3], [1, -1]])), ValueError, "more than once"),
    (lambda a: a.update(R=torch.randn(17, 16)), ValueError, "rank must be between 1 and the hidden size 16"),
    (lambda a: a.update(R=torch.randn(3, 16, dtype=torch.float64)), TypeError, "Q must be float32"),
    (lambda a: a.update(W=torch.randn(3, 16).bfloat16()), TypeError, "W must be float32"),
    (lambda a: a.update(W=torch.randn(4, 16)), ValueError, r"W must have shape \[3, 16\]"),
    (lambda a: a.update(b=torch.randn(4)), ValueError, r"b must have shape \[3\]"),
    (lambda a: a.update(act="swish"), ValueError, "unknown activation 'swish'"),
    (lambda a: a.update(backend="jax"), ValueError, "unknown backend 'jax'"),
    (lambda a: a.update(dropout=1.0), ValueError, "dropout must be a probability"),
])
def test_bad_input(mutate, error, match):
    h, positions, R, W, b = _good()
    args = dict(h=h, positions=positions, R=R, W=W, b=b, act=None, backend="torch", dropout=0.0)
    mutate(args)
    with pytest.raises(error, match=match):
        ops.loreft(args["h"], args["positions"], args["R"], args["W"], args["b"], act=args["act"],
                   backend=args["backend"], dropout=args["dropout"])


def test_a_prepared_edit_names_where_each_tensor_is():
    """prepare_edit has no h: its parameters must be where Q is, and the message says so; apply_edit then checks Q
    against h."""
    Q, W, b = torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2)
    with pytest.raises(ValueError, match="W is on meta but Q is on cpu"):
        ops.prepare_edit(Q, W=W.to("meta"), b=b, P=Q)
    meta = ops.prepare_edit(Q.to("meta"), W=W.to("meta"), b=b.to("meta"))
    with pytest.raises(ValueError, match="Q is on meta but h is on cpu"):
        ops.apply_edit(torch.zeros(1, 3, 8), torch.zeros(1, 1, dtype=torch.long), meta, validate=False)
    with pytest.raises(ValueError, match="Q has hidden size 8 but h has hidden size 4"):
        ops.apply_edit(torch.zeros(1, 3, 4), torch.zeros(1, 1, dtype=torch.long), meta, validate=False)


def test_activation_needs_w_and_source_needs_something():
    h, positions, R, W, b = _good()
    with pytest.raises(ValueError, match="with W=None"):
        ops.low_rank_edit(h, positions, R, b=b, act="relu")
    with pytest.raises(ValueError, match="needs W, b or both"):
        ops.low_rank_edit(h, positions, R, P=R)


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("REFT_FAST_BACKEND", raising=False)
    assert ops.resolve_backend(None, cpu) == "torch"
    assert ops.resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("REFT_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend(None, cpu) == "triton"  # CPU tensors are allowed through the interpreter
    assert ops.resolve_backend("torch", cpu) == "torch"  # the argument wins over the environment
    monkeypatch.setenv("REFT_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="REFT_FAST_BACKEND='nope' is no backend"):
        ops.resolve_backend(None, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", cpu)
    monkeypatch.delenv("REFT_FAST_CUDA_SIM", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.resolve_backend("cuda", cpu)
    monkeypatch.setenv("REFT_FAST_CUDA_SIM", "1")  # the CUDA kernels' CPU simulation takes CPU tensors
    assert ops.resolve_backend("cuda", cpu) == "cuda"


# ------------------------------------------------------------------------------------------------------------------
# torch.library registration: fake kernels and torch.compile
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["loreft", "lobireft"])
def test_fake_kernels_give_shapes_and_dtypes_on_meta_tensors(family):
    B, T, n, r, d = 3, 7, 2, 4, 16
    params = {k: v.to("meta") for k, v in make_params(family, r, d).items()}
    h = torch.empty(B, T, d, dtype=torch.bfloat16, device="meta")
    positions = torch.empty(B, n, dtype=torch.long, device="meta")
    args = (params["Q"], params.get("P"), params.get("W"), params.get("b"), "torch", 0, 0.0, 0)
    out, h_rows = torch.ops.reft_fast.low_rank_edit(h, positions, *args)
    assert out.device.type == "meta" and out.shape == h.shape and out.dtype == torch.bfloat16
    assert h_rows.shape == (B, n, d) and h_rows.dtype == torch.bfloat16  # the rows backward receives
    grad_h, dQ, dP, dW, db = torch.ops.reft_fast.low_rank_edit_backward(h_rows, out, positions, *args)
    assert grad_h.shape == h.shape and grad_h.dtype == torch.bfloat16
    for grad, name, shape in ((dQ, "Q", (r, d)), (dP, "P", (r, d)), (dW, "W", (r, d)), (db, "b", (r,))):
        assert grad.dtype == torch.float32 and grad.device.type == "meta"
        # P is Q (LoReFT): Q's gradient holds both parts and P's is empty
        present = params.get(name) is not None and not (name == "P" and params["P"] is params["Q"])
        assert tuple(grad.shape) == (shape if present else (0,)), name


@pytest.mark.parametrize("family", ["loreft", "nodireft", "consreft"])
def test_opcheck_schema_fake_kernels_and_autograd_registration(family):
    """torch.library.opcheck runs both ops against their fake kernels, the schema and the autograd registration."""
    params = make_params(family, 3, 16)
    positions = make_positions(2, 5, 2)
    h = torch.randn(2, 5, 16, requires_grad=True)
    weights = [params["Q"], params.get("P"), params.get("W"), params.get("b")]
    settings = ("torch", 3 if params.get("W") is not None else 0, 0.2, 9)
    torch.library.opcheck(torch.ops.reft_fast.low_rank_edit.default,
                          (h, positions, *[w if w is None else w.clone().requires_grad_() for w in weights], *settings))
    torch.library.opcheck(torch.ops.reft_fast.low_rank_edit_backward.default,
                          (ops.selected_rows(h.detach(), positions), torch.randn(2, 5, 16), positions, *weights,
                           *settings))


def test_compiles_with_fullgraph_and_matches_eager():
    B, T, n, r, d = 2, 6, 3, 4, 32
    positions = make_positions(B, T, n)
    params = make_params("loreft", r, d)
    h = torch.randn(B, T, d)

    def step(h, Q, W, b):
        edited = ops.loreft(h, positions, Q, W, b, act="gelu", dropout=0.25, seed=11, backend="torch", validate=False)
        return (edited * edited).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # graph breaks raise under fullgraph
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (h, params["Q"], params["W"], params["b"])]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# The backend registry: a backend is one registration away from backend= and REFT_FAST_BACKEND
# ------------------------------------------------------------------------------------------------------------------
def test_a_registered_backend_is_selectable_by_name_and_environment(monkeypatch):
    from reft_fast.ops import backend as registry
    from reft_fast.ops.backend_torch import TorchBackend

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # this test's registration ends with it
    calls = []

    class CountingBackend(TorchBackend):  # the torch math, under its own name, counting what the op asks of it
        name = "counting"
        def differentiates_forward(self, h):
            return False  # the op calls backward, as for any backend of its own kernels

        def prefers(self, device):
            return False

        def forward(self, h, positions, edit):
            calls.append(("forward", edit))
            return super().forward(h, positions, edit)

        def backward(self, h_rows, grad_out, positions, edit):
            calls.append(("backward", edit))
            return super().backward(h_rows, grad_out, positions, edit)

    ops.register_backend(CountingBackend())
    assert "counting" in ops.backend_names()
    positions = make_positions(2, 6, 3)
    params = make_params("noreft", 4, 32)
    h = torch.randn(2, 6, 32)
    expected = run_op(h, positions, params, "torch", "tanh", dropout=0.1, seed=3)
    monkeypatch.setenv("REFT_FAST_BACKEND", "counting")
    for backend in ("counting", None):
        h_in = h.clone().requires_grad_()
        out = run_op(h_in, positions, params, backend, "tanh", dropout=0.1, seed=3)
        out.sum().backward()
        assert torch.equal(out.detach(), expected)
    assert [kind for kind, _ in calls] == ["forward", "backward"] * 2
    edit = calls[0][1]
    assert isinstance(edit, ops.EditParams) and (edit.act, edit.dropout, edit.seed) == (4, 0.1, 3)
    assert edit.P is params["P"] and edit.W is params["W"]

    with pytest.raises(ValueError, match="name is taken"):
        ops.register_backend(CountingBackend())
    with pytest.raises(TypeError, match="does not implement the Backend protocol"):
        ops.register_backend(object())
