"""The Triton launch functions directly: they write the selected rows and nothing else.

`out` and `grad_h` are poisoned with NaN before the launch, so a selected row the kernel fails to write stays NaN and
an unselected row it wrongly writes loses its NaN.
"""

import pytest
import torch

from reft_fast import ops
from reft_fast.kernels import low_rank_edit as kernels

from reference import (DEVICE, assert_weight_grad_close, make_params, make_positions, reference, selected_mask,
                       triton_on_tf32)

pytestmark = pytest.mark.usefixtures("fresh_seed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["loreft", "nodireft", "lobireft"])
def test_poisoned_outputs_forward_and_backward(dtype, family):
    B, T, n, r, d = 4, 7, 5, 6, 150
    positions = make_positions(B, T, n)
    params = make_params(family, r, d)
    act = 2 if "W" in params else 0
    h = torch.randn(B, T, d, device=DEVICE).to(dtype)
    g = torch.randn(B, T, d, device=DEVICE).to(dtype)
    selected = selected_mask(positions, T)
    args = (params["Q"], params.get("P"), params.get("W"), params.get("b"), act, 0.0, 0)

    out = torch.full_like(h, float("nan"))
    kernels.edit_forward(h, positions, *args[:4], act, 0.0, 0, out)
    assert torch.isnan(out[~selected]).all(), "the kernel wrote a row that is not selected"
    assert not torch.isnan(out[selected]).any(), "the kernel left a selected row unwritten"
    ref = reference(h.double(), positions, {k: v.double() for k, v in params.items()}, "gelu" if act else None)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[selected].double(), ref[selected], **tol)

    grad_h = torch.full_like(g, float("nan"))
    h_rows = ops.selected_rows(h, positions)  # what the op keeps of h for backward
    dQ, dP, dW, db = kernels.edit_backward(h_rows, g, positions, *args[:4], act, 0.0, 0, grad_h)
    assert torch.isnan(grad_h[~selected]).all()
    assert not torch.isnan(grad_h[selected]).any()
    # P is Q (LoReFT): Q's gradient holds both parts, and there is no separate dP
    assert dP is None
    h64 = h.double().requires_grad_()
    leaves = {k: v.double().requires_grad_() for k, v in params.items() if k != "P"}
    if "P" in params:
        leaves["P"] = leaves["Q"]
    reference(h64, positions, leaves, "gelu" if act else None).backward(g.double())
    for name, grad in (("Q", dQ), ("W", dW), ("b", db)):
        assert (grad is None) == (name not in params), name
        if grad is not None:
            assert grad.dtype == torch.float32 and grad.shape == params[name].shape
            assert_weight_grad_close(grad.double(), leaves[name].grad, triton_on_tf32("triton", dtype), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ["few", "many"])
def test_copy_unselected_writes_every_row_once(dtype, rows):
    # out, grad_h and h_rows start as NaN: the one launch must write every row of out/grad_h (the unselected ones
    # bit-identical to h/g, NaN and −0.0 included) and every selected slot of h_rows.
    B, T, n, r, d = (2, 9, 4, 4, 300) if rows == "few" else (6, 12, 8, 4, 70)
    positions = make_positions(B, T, n)
    params = make_params("noreft", r, d)
    P = params["P"].clone()  # a tensor of its own: dP comes back separately
    h = torch.randn(B, T, d, device=DEVICE).to(dtype)
    g = torch.randn(B, T, d, device=DEVICE).to(dtype)
    selected = selected_mask(positions, T)
    unselected_row = (~selected).nonzero()[0]
    h[unselected_row[0], unselected_row[1], :2] = torch.tensor([float("nan"), -0.0])
    g[unselected_row[0], unselected_row[1], :2] = torch.tensor([float("inf"), -0.0])
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    out = torch.full_like(h, float("nan"))
    h_rows = torch.full((B, n, d), float("nan"), dtype=dtype, device=DEVICE)
    kernels.edit_forward(h, positions, params["Q"], P, params["W"], params["b"], 3, 0.0, 0, out, h_rows=h_rows,
                         copy_unselected=True)
    assert torch.equal(out[~selected].view(bits), h[~selected].view(bits))
    slot_ok = positions >= 0
    assert torch.equal(h_rows[slot_ok].view(bits), ops.selected_rows(h, positions)[slot_ok].view(bits))
    leaves = {"Q": params["Q"].double(), "P": P.double(), "W": params["W"].double(), "b": params["b"].double()}
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    clean_h = h.double().nan_to_num()
    torch.testing.assert_close(out[selected].double(), reference(clean_h, positions, leaves, "silu")[selected], **tol)

    grad_h = torch.full_like(g, float("nan"))
    dQ, dP, dW, db = kernels.edit_backward(h_rows, g, positions, params["Q"], P, params["W"], params["b"], 3, 0.0, 0,
                                           grad_h, copy_unselected=True)
    assert torch.equal(grad_h[~selected].view(bits), g[~selected].view(bits))
    assert not torch.isnan(grad_h[selected]).any() and dP is not None
    h64 = clean_h.requires_grad_()
    ref_leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    reference(h64, positions, ref_leaves, "silu").backward(g.double().nan_to_num(posinf=0.0))
    torch.testing.assert_close(grad_h[selected].double(), h64.grad[selected], **tol)
    for name, grad in (("Q", dQ), ("P", dP), ("W", dW), ("b", db)):
        assert_weight_grad_close(grad.double(), ref_leaves[name].grad, triton_on_tf32("triton", dtype), name)


def test_edit_in_place_keeps_the_original_rows():
    # out may be h itself (an edit in place): h_rows still receives the rows as they were before the edit
    B, T, n, r, d = 3, 8, 3, 4, 96
    positions = make_positions(B, T, n)
    params = make_params("loreft", r, d)
    h = torch.randn(B, T, d, device=DEVICE)
    before = h.clone()
    h_rows = torch.empty(B, n, d, device=DEVICE)
    kernels.edit_forward(h, positions, params["Q"], params["P"], params["W"], params["b"], 0, 0.0, 0, h,
                         h_rows=h_rows)
    slot_ok = positions >= 0
    assert torch.equal(h_rows[slot_ok], ops.selected_rows(before, positions)[slot_ok])
    expected = reference(before.double(), positions, {k: v.double() for k, v in params.items()})
    torch.testing.assert_close(h.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("same_pq", [False, True], ids=["P-own", "P-is-Q"])
def test_weight_gradients_reduce_over_several_splits_deterministically(same_pq):
    # enough slots for several row splits of the weight-gradient pass, each with several slot blocks
    B, T, r, d = 8, 64, 8, 96
    positions = torch.stack([torch.randperm(T, device=DEVICE)[:40] for _ in range(B)])
    block_m, block_d = kernels.launch_config(d, r, torch.float32)[:2]
    assert kernels._num_splits(positions.numel(), d, block_m, block_d, torch.device(DEVICE)) > 1
    params = make_params("noreft", r, d)
    if not same_pq:
        params["P"] = params["P"].clone()
    h = torch.randn(B, T, d, device=DEVICE)
    g = torch.randn(B, T, d, device=DEVICE)
    runs = []
    for _ in range(2):
        grad_h = g.clone()
        runs.append((grad_h,) + kernels.edit_backward(ops.selected_rows(h, positions), g, positions, params["Q"],
                                                       params["P"], params["W"], params["b"], 3, 0.0, 0, grad_h))
    for a, b in zip(*runs):
        assert (a is None and b is None) or torch.equal(a, b)

    h64 = h.double().requires_grad_()
    leaves = {k: v.double().requires_grad_() for k, v in params.items() if k != "P"}
    leaves["P"] = leaves["Q"] if same_pq else params["P"].double().requires_grad_()
    reference(h64, positions, leaves, "silu").backward(g.double())
    _, dQ, dP, dW, db = runs[0]
    # separate leaves get a part each; one tensor gets the sum, in dQ
    torch.testing.assert_close(dQ.double(), leaves["Q"].grad, rtol=1e-4, atol=1e-4)
    if same_pq:
        assert dP is None
    else:
        torch.testing.assert_close(dP.double(), leaves["P"].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dW.double(), leaves["W"].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), leaves["b"].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runs[0][0].double(), h64.grad, rtol=1e-4, atol=1e-4)


def test_no_slot_at_all():
    h = torch.randn(2, 3, 32, device=DEVICE)
    positions = torch.full((2, 2), -1, dtype=torch.long, device=DEVICE)
    params = make_params("loreft", 2, 32)
    h_in = h.clone().requires_grad_()
    R = params["Q"].clone().requires_grad_()
    out = ops.loreft(h_in, positions, R, params["W"], params["b"], backend="triton")
    assert torch.equal(out, h)
    out.sum().backward()
    assert torch.equal(h_in.grad, torch.ones_like(h))
    assert torch.equal(R.grad, torch.zeros_like(R))


@pytest.mark.cuda
def test_triton_on_gpu_matches_reference_large_rows():
    # on a GPU the kernels run compiled (tf32x3 dots, GPU block sizes): the same contract on a bigger case
    B, T, n, r, d = 8, 512, 14, 8, 4096
    positions = make_positions(B, T, n)
    params = make_params("loreft", r, d)
    h = torch.randn(B, T, d, device="cuda", dtype=torch.bfloat16)
    out = ops.loreft(h, positions, params["Q"], params["W"], params["b"], backend="triton")
    ref = ops.loreft(h, positions, params["Q"], params["W"], params["b"], backend="torch")
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.fixture
def fresh_plans():
    """Launch plans are cached per shape: a test that changes how they are made starts and ends with none."""
    kernels._plan.cache_clear()
    yield
    kernels._plan.cache_clear()


@pytest.mark.parametrize("split", [(0, 1), (3, 2), (5, 4)], ids=["fused", "split3x2", "split5x4"])
def test_fused_and_column_split_paths_agree(monkeypatch, fresh_plans, split):
    # The path is chosen by shape (many rows: fused; few rows: column splits). Force each on the same input.
    monkeypatch.setattr(kernels, "column_split", lambda *args: split)
    B, T, n, r, d = 3, 9, 4, 5, 200
    positions = make_positions(B, T, n)
    params = make_params("noreft", r, d)
    h = torch.randn(B, T, d, device=DEVICE)
    g = torch.randn(B, T, d, device=DEVICE)
    h_in = h.clone().requires_grad_()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = ops.low_rank_edit(h_in, positions, leaves["Q"], W=leaves["W"], b=leaves["b"], P=leaves["P"], act="tanh",
                            dropout=0.25, seed=9, backend="triton")
    out.backward(g)
    # the reference with the mask read off the output (dropout on, so the regenerated mask is exercised too)
    keep = torch.zeros(B, n, d, dtype=torch.float64, device=DEVICE)
    for bi in range(B):
        for j, pos in enumerate(positions[bi].tolist()):
            if pos >= 0:
                keep[bi, j] = (out[bi, pos].detach() != 0).double()
    h64 = h.double().requires_grad_()
    ref_leaves = {k: v.double().requires_grad_() for k, v in params.items()}
    ref = reference(h64, positions, ref_leaves, "tanh", keep=keep, dropout=0.25)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h_in.grad.double(), h64.grad, rtol=1e-4, atol=1e-4)
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad.double(), ref_leaves[k].grad, rtol=1e-4, atol=1e-4)
