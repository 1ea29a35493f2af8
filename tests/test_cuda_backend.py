"""The cuda backend (csrc/, reft_fast.ops.cuda_build) against the float64 reference of tests/reference.py and against
the triton backend: outputs and every gradient, the whole family, activations, h dtypes, odd shapes, −1 positions,
rows left untouched, outputs fully written, bitwise determinism, the dropout mask shared by forward and backward, and
one memory-checked run.

On a GPU the kernels run there (and the memory check is compute-sanitizer's memcheck). Without one they run on the CPU
through csrc/sim (REFT_FAST_CUDA_SIM=1, set here), as the triton backend runs through Triton's interpreter: the same
kernel code with its own indexing, barriers, warp shuffles and reductions, and the memory check is the CPU build under
AddressSanitizer. The last test checks, on machines without CUDA, that the GPU build says what is missing.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from reft_fast import ops
from reft_fast.ops import cuda_build as cuda_backend

from conftest import HAS_CUDA
from reference import DEVICE, FAMILY, make_params, make_positions, reference, selected_mask

pytestmark = pytest.mark.usefixtures("fresh_seed")

# Outputs and grad_h are rounded once to h's dtype; weight gradients are fp32 sums of products of exactly
# representable h and g values, so they get fp32 tolerances whatever h's dtype. Errors are taken relative to the
# largest reference magnitude of each tensor, floored at 1 (a lone bias gradient can be a near-cancelling sum).
OUT_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
WEIGHT_TOL = 2e-5
# Against triton: both errors add up, and triton runs its dots on TF32 tensor cores for half-precision h at every rank
# (kernels/low_rank_edit.py, launch_config), a 2^-11 relative error per product.
TRITON_EXTRA_TOL = {torch.float32: 0.0, torch.bfloat16: 5e-3, torch.float16: 5e-3}
# The tensor-core tile path (16-bit h, REFT_FAST_CUDA_ROWS_PER_BLOCK=16 or B·n ≥ 2112): its products take the
# parameters rounded to TF32 (h itself is exact in TF32), a 2^-11 relative error per element, which reaches the
# coefficients δ, dz, t and through them every weight gradient.
TILE_OUT_TOL = {torch.float32: OUT_TOL[torch.float32], torch.bfloat16: 8e-3, torch.float16: 2e-3}
TILE_WEIGHT_TOL = 2e-3


@pytest.fixture(scope="module", autouse=True)
def simulate_without_gpu():
    """Without a GPU every test of this module (but the last) runs the kernels through the CPU simulation."""
    if HAS_CUDA:
        yield
        return
    previous = os.environ.get(cuda_backend.SIM_ENV)
    os.environ[cuda_backend.SIM_ENV] = "1"
    yield
    if previous is None:
        del os.environ[cuda_backend.SIM_ENV]
    else:
        os.environ[cuda_backend.SIM_ENV] = previous


@pytest.fixture(scope="module")
def built():
    """Build (or load from torch's cache) once; missing tools skip, a failing build fails."""
    reason = cuda_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cuda backend cannot be built here: {reason}")
    return cuda_backend.load()


# ----------------------------------------------------------------------------------------------------------------------
# Running the op and comparing with the float64 reference (tests/reference.py)
# ----------------------------------------------------------------------------------------------------------------------
def leaves(params):
    """Fresh leaf tensors (Q and P stay one tensor when they are one), so gradients accumulate like the op's; an
    input the family does not use is None."""
    P = params.get("P")
    out = {"Q": params["Q"].detach().clone().requires_grad_()}
    out["P"] = out["Q"] if P is params["Q"] else (None if P is None else P.detach().clone().requires_grad_())
    for k in ("W", "b"):
        out[k] = None if params.get(k) is None else params[k].detach().clone().requires_grad_()
    return out


def run_cuda(h, positions, p, act=None, backend="cuda", **kw):
    return ops.low_rank_edit(h, positions, p["Q"], W=p.get("W"), b=p["b"], P=p.get("P"), act=act, backend=backend,
                             **kw)


def close(actual, expected, tol, what):
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item() / scale
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= tol, f"{what}: max error {err:.3g} of the largest magnitude (tolerance {tol:.3g})"


def forward_backward(h0, positions, params, act, backend, grad_out, **kw):
    h = h0.detach().requires_grad_()  # shares h0's memory: a misaligned h0 stays misaligned
    p = leaves(params)
    out = run_cuda(h, positions, p, act, backend=backend, **kw)
    out.backward(grad_out)
    grads = {"h": h.grad, **{k: p[k].grad for k in ("Q", "W", "b") if p[k] is not None}}
    if p["P"] is not None and p["P"] is not p["Q"]:
        grads["P"] = p["P"].grad
    return out.detach(), grads


def reference_forward_backward(h0, positions, params, act, grad_out, keep=None, dropout=0.0):
    h = h0.detach().double().requires_grad_()
    q64 = params["Q"].double()
    p64 = leaves({"Q": q64, "P": q64 if params.get("P") is params["Q"] else None,
                  "W": None if params.get("W") is None else params["W"].double(), "b": params["b"].double()})
    out = reference(h, positions, p64, act, keep, dropout)
    out.backward(grad_out.double())
    grads = {"h": h.grad, **{k: p64[k].grad for k in ("Q", "W", "b") if p64[k] is not None}}
    if p64["P"] is not None and p64["P"] is not p64["Q"]:
        grads["P"] = p64["P"].grad
    return out.detach(), grads


def check_case(family, act, dtype, B, T, n, r, d, *, against_triton=True, h=None, tile=False):
    out_tol = (TILE_OUT_TOL if tile else OUT_TOL)[dtype]
    weight_tol = TILE_WEIGHT_TOL if tile else WEIGHT_TOL
    params = make_params(family, r, d)
    positions = make_positions(B, T, n)
    h = torch.randn(B, T, d, device=DEVICE).to(dtype) if h is None else h
    grad_out = torch.randn(B, T, d, device=DEVICE).to(dtype)
    out, grads = forward_backward(h, positions, params, act, "cuda", grad_out)
    ref_out, ref_grads = reference_forward_backward(h, positions, params, act, grad_out)
    assert out.dtype == dtype and out.shape == h.shape
    close(out, ref_out, out_tol, f"{family}/{act}/{dtype} out")
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        tol = out_tol if name == "h" else weight_tol
        close(g, ref_grads[name], tol, f"{family}/{act}/{dtype} d{name}")
    if against_triton:
        t_out, t_grads = forward_backward(h, positions, params, act, "triton", grad_out)
        extra = TRITON_EXTRA_TOL[dtype]
        close(out, t_out, 2 * out_tol + extra, f"{family}/{act}/{dtype} out vs triton")
        for name, g in grads.items():
            tol = 2 * (out_tol if name == "h" else weight_tol) + extra
            close(g, t_grads[name], tol, f"{family}/{act}/{dtype} d{name} vs triton")


# ----------------------------------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", list(FAMILY))
def test_family_matches_reference_and_triton(built, family, dtype):
    act = "gelu" if FAMILY[family][0] else None
    check_case(family, act, dtype, B=4, T=11, n=5, r=3, d=1000)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh", None])
@pytest.mark.parametrize("family", ["loreft", "nodireft"])
def test_activations(built, family, act):
    check_case(family, act, torch.float32, B=3, T=9, n=4, r=8, d=256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d,r", [(1000, 1), (1000, 64), (4097, 3), (4097, 8), (4096, 64), (64, 8), (8, 4)])
def test_odd_shapes(built, d, r, dtype):
    """d = 4097 runs the scalar path; 1000, 4096, 64 and 8 the 16-byte path; r = 1, 3, 8, 64 pad to 4, 4, 8, 64."""
    check_case("loreft", "silu", dtype, B=3, T=5, n=3, r=min(r, d), d=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_storage_takes_the_scalar_path_correctly(built, dtype):
    """h starting one element past a 16-byte boundary (a contiguous view with an offset) cannot use vector loads."""
    B, T, d = 3, 6, 1000
    storage = torch.randn(B * T * d + 1, device=DEVICE).to(dtype)
    h = storage[1:].view(B, T, d)
    assert h.is_contiguous() and h.data_ptr() % 16 != 0
    check_case("noreft", "relu", dtype, B=B, T=T, n=4, r=8, d=d, h=h)


def test_many_rows_use_several_splits_and_stay_exact(built):
    """B·n = 1088 slots: the weight gradients are summed over several row splits in a fixed order, and the per-row
    kernels take four rows per block (chosen from the shape at padded rank ≤ 8)."""
    check_case("loreft", "gelu", torch.bfloat16, B=17, T=80, n=64, r=8, d=1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d,r", [(1000, 3), (4097, 8), (4097, 3), (520, 4)])
def test_four_rows_per_block_match_one_row_per_block_bit_for_bit(built, monkeypatch, dtype, d, r):
    """REFT_FAST_CUDA_ROWS_PER_BLOCK=4 against 1: each row's sums are formed in the same order and rounded the same way
    either way, so outputs and gradients are bitwise equal. 15 slots (a partial last block), two example rows with no
    position (a block of four empty slots), dropout, vector (d = 1000, 520) and scalar (4097, padded ranks 8 and 4)
    paths; and the reference still holds. On a GPU, fp32 at d = 4097 is where a multiply-add that nvcc fuses in one
    instantiation and not the other shows (grad_h's dropout product, csrc/README.md "fma contraction"); the CPU
    simulation cannot fuse, and tests/test_csrc_compile.py checks the PTX for it."""
    B, T, n = 5, 9, 3
    params = make_params("loreft", r, d)
    positions = make_positions(B, T, n, empty_row=False)
    positions[2:4] = -1
    h = torch.randn(B, T, d, device=DEVICE).to(dtype)
    grad_out = torch.randn_like(h)
    kw = dict(dropout=0.15, seed=21)
    results = {}
    for rows in ("1", "4"):
        monkeypatch.setenv(cuda_backend.ROWS_ENV, rows)
        results[rows] = forward_backward(h, positions, params, "gelu", "cuda", grad_out, **kw)
    (out1, g1), (out4, g4) = results["1"], results["4"]
    assert torch.equal(out1, out4)
    assert g1.keys() == g4.keys()
    for name in g1:
        assert torch.equal(g1[name], g4[name]), name
    monkeypatch.setenv(cuda_backend.ROWS_ENV, "4")
    check_case("nodireft", "silu", dtype, B=B, T=T, n=n, r=r, d=d, against_triton=False)


# ----------------------------------------------------------------------------------------------------------------------
# The tensor-core tile path (edit_tile.cuh): 16 slots per block, TF32 products
# ----------------------------------------------------------------------------------------------------------------------
# family, act, B, T, n, r, d: partial last blocks (B·n not a multiple of 16), −1 slots and an empty example, every
# padded rank (3 and 8 → 16, 20 → 32, 33/40/64 → 64), d not a multiple of the 32/64/128-column chunks (4097, 1000,
# 130, 72), the whole family.
TILE_CASES = [
    ("loreft", "gelu", 5, 11, 7, 3, 1000),
    ("loreft", "silu", 3, 9, 6, 16, 4097),
    ("noreft", "relu", 4, 7, 5, 20, 520),
    ("loreft", "tanh", 3, 8, 6, 64, 256),
    ("direft", None, 4, 9, 5, 33, 200),
    ("nodireft", "gelu", 3, 6, 4, 8, 96),
    ("consreft", None, 3, 6, 5, 12, 130),
    ("lobireft", None, 3, 6, 5, 40, 72),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: f"{c[0]}-r{c[5]}-d{c[6]}")
def test_tile_path_matches_reference_and_triton(built, monkeypatch, case, dtype):
    family, act, B, T, n, r, d = case
    monkeypatch.setenv(cuda_backend.ROWS_ENV, "16")
    check_case(family, act, dtype, B=B, T=T, n=n, r=r, d=d, tile=True)


@pytest.mark.parametrize("d", [1000, 4097])
def test_tile_path_draws_the_same_dropout_mask_as_the_per_row_kernels(built, monkeypatch, d):
    """The mask depends on (seed, slot, column) only: the tile kernels drop exactly the elements the per-row kernels
    drop, and their gradients match the float64 reference under that mask."""
    B, T, n, r, p = 3, 8, 7, 12, 0.3
    params = make_params("loreft", r, d)
    positions = make_positions(B, T, n, empty_row=False)
    h = torch.randn(B, T, d, device=DEVICE).to(torch.bfloat16)
    grad_out = torch.randn_like(h)
    b_idx, j_idx = (positions >= 0).nonzero(as_tuple=True)
    kept = {}
    for rows in ("1", "16"):
        monkeypatch.setenv(cuda_backend.ROWS_ENV, rows)
        out, grads = forward_backward(h, positions, params, "silu", "cuda", grad_out, dropout=p, seed=77)
        kept[rows] = out[b_idx, positions[b_idx, j_idx]] != 0
    assert torch.equal(kept["1"], kept["16"])
    keep = torch.zeros(B, n, d, dtype=torch.float64, device=DEVICE)
    keep[b_idx, j_idx] = kept["16"].double()
    assert abs(keep[b_idx, j_idx].mean().item() - (1 - p)) < 0.03
    ref_out, ref_grads = reference_forward_backward(h, positions, params, "silu", grad_out, keep=keep, dropout=p)
    close(out, ref_out, TILE_OUT_TOL[torch.bfloat16], "tile out with dropout")
    for name, g in grads.items():
        tol = TILE_OUT_TOL[torch.bfloat16] if name == "h" else TILE_WEIGHT_TOL
        close(g, ref_grads[name], tol, f"tile d{name} with dropout")


def test_tile_path_is_chosen_from_the_shape(built, monkeypatch):
    """By default 16-bit h takes the tile kernels from B·n ≥ 2112 slots (a wave of 132 tile blocks) and the four-row
    kernels below; fp32 h never takes them. Checked by bitwise equality with the forced choices (which differ)."""
    T, n, d, r = 3, 64, 64, 8
    params = make_params("loreft", r, d)

    def forward(h, positions, rows):
        monkeypatch.setenv(cuda_backend.ROWS_ENV, rows)
        with torch.no_grad():
            return run_cuda(h, positions, params, "gelu")

    for B, expected in ((33, "16"), (32, "4")):  # 2112 and 2048 slots
        positions = make_positions(B, T, n)  # T = 3: at most three selected rows per example, 64 slots
        h = torch.randn(B, T, d, device=DEVICE).to(torch.bfloat16)
        results = {rows: forward(h, positions, rows) for rows in ("0", "4", "16")}
        other = "4" if expected == "16" else "16"
        assert torch.equal(results["0"], results[expected]), f"B·n = {B * n}: not the {expected}-row kernels"
        assert not torch.equal(results["0"], results[other])
    h = torch.randn(B, T, d, device=DEVICE)
    assert torch.equal(forward(h, positions, "16"), forward(h, positions, "4"))  # fp32: no tile kernel


def test_rows_per_block_setting_is_checked(monkeypatch):
    monkeypatch.setenv(cuda_backend.ROWS_ENV, "3")
    with pytest.raises(ValueError, match="REFT_FAST_CUDA_ROWS_PER_BLOCK='3'"):
        cuda_backend.rows_per_block()
    monkeypatch.setenv(cuda_backend.ROWS_ENV, "16")
    assert cuda_backend.rows_per_block() == 16


def test_no_position_at_all(built):
    """All −1 (and n = 0): out is h, grad_h is grad_out, every weight gradient is exactly zero."""
    params = make_params("loreft", 4, 128)
    h = torch.randn(2, 5, 128, device=DEVICE)
    grad_out = torch.randn_like(h)
    for positions in (torch.full((2, 3), -1, device=DEVICE), torch.empty(2, 0, dtype=torch.long, device=DEVICE)):
        out, grads = forward_backward(h, positions, params, None, "cuda", grad_out, dropout=0.1, seed=3)
        assert torch.equal(out, h)
        assert torch.equal(grads["h"], grad_out)
        for name in ("Q", "W", "b"):
            assert torch.equal(grads[name], torch.zeros_like(grads[name])), name


# ----------------------------------------------------------------------------------------------------------------------
# Contract details: untouched rows, every selected row written, determinism, dropout
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rows", [(torch.float32, "0"), (torch.bfloat16, "0"), (torch.bfloat16, "16")],
                         ids=["fp32", "bf16", "bf16-tile"])
def test_unselected_rows_are_bit_identical_and_h_is_untouched(built, monkeypatch, dtype, rows):
    monkeypatch.setenv(cuda_backend.ROWS_ENV, rows)
    B, T, d = 4, 12, 520
    params = make_params("loreft", 8, d)
    positions = make_positions(B, T, 5)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    h_before = torch.randn(B, T, d, device=DEVICE).to(dtype)
    h_before[0, 1, :3] = torch.tensor([float("nan"), float("inf"), -0.0])  # odd bits, in a row left unselected
    positions[0][positions[0] == 1] = -1
    grad_out = torch.randn_like(h_before)
    grad_out[0, 1, :2] = torch.tensor([float("nan"), -0.0])
    h = h_before.clone().requires_grad_()
    p = leaves(params)
    out = run_cuda(h, positions, p, "relu", dropout=0.25, seed=11)
    out.backward(grad_out)
    sel = selected_mask(positions, T)
    assert torch.equal(h.detach().view(bits), h_before.view(bits)), "the op wrote into h"
    assert torch.equal(out.detach()[~sel].view(bits), h_before[~sel].view(bits))
    assert torch.equal(h.grad[~sel].view(bits), grad_out[~sel].view(bits))
    assert torch.isfinite(out.detach()[sel]).all() and torch.isfinite(h.grad[sel]).all()


def _poison_allocator(nbytes_hint: int) -> None:
    """Leave NaN-filled free blocks in torch's caching allocator, so that buffers the binding allocates with
    torch.empty (workspace, gradients) start as NaN: any element a kernel fails to write shows up as NaN. (The CPU
    simulation's binding fills those buffers with NaN itself.)"""
    if DEVICE != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((max(nbytes_hint // 4, 1) * k,), float("nan"), device=DEVICE) for k in (1, 2, 4)]
    blocks += [torch.full((256 * 1024 // 4,), float("nan"), device=DEVICE) for _ in range(8)]  # small-pool segments
    del blocks


@pytest.mark.parametrize("dtype,rows", [(torch.float32, "0"), (torch.bfloat16, "0"), (torch.bfloat16, "16")],
                         ids=["fp32", "bf16", "bf16-tile"])
@pytest.mark.parametrize("d", [1000, 4097])
def test_every_selected_row_and_gradient_element_is_written(built, monkeypatch, dtype, rows, d):
    """Call the launch functions directly with NaN at the selected rows of out and grad_h (and NaN-poisoned scratch):
    after the call those rows must equal the reference and nothing may be NaN."""
    monkeypatch.setenv(cuda_backend.ROWS_ENV, rows)
    out_tol = (TILE_OUT_TOL if rows == "16" else OUT_TOL)[dtype]
    weight_tol = TILE_WEIGHT_TOL if rows == "16" else WEIGHT_TOL
    B, T, r = 3, 7, 8
    params = make_params("loreft", r, d)
    positions = make_positions(B, T, 4)
    sel = selected_mask(positions, T)
    h = torch.randn(B, T, d, device=DEVICE).to(dtype)
    out = h.clone()
    out[sel] = float("nan")
    cuda_backend.edit_forward(h, positions, params["Q"], params["P"], params["W"], params["b"], 2, 0.0, 0, out)
    ref_out, ref_grads = reference_forward_backward(h, positions, params, "gelu", torch.ones_like(h))
    close(out, ref_out, out_tol, "out with NaN-poisoned selected rows")

    grad_out = torch.randn(B, T, d, device=DEVICE).to(dtype)
    ref_out, ref_grads = reference_forward_backward(h, positions, params, "gelu", grad_out)
    grad_h = grad_out.clone()
    grad_h[sel] = float("nan")
    _poison_allocator(4 * B * 4 * r * d * 3)
    h_rows = ops.selected_rows(h, positions)  # what the op keeps of h for backward
    dQ, dP, dW, db = cuda_backend.edit_backward(h_rows, grad_out, positions, params["Q"], params["P"], params["W"],
                                                params["b"], 2, 0.0, 0, grad_h)
    close(grad_h, ref_grads["h"], out_tol, "grad_h with NaN-poisoned selected rows")
    close(dQ + dP, ref_grads["Q"], weight_tol, "dQ + dP (Q is P)")
    close(dW, ref_grads["W"], weight_tol, "dW")
    close(db, ref_grads["b"], weight_tol, "db")


@pytest.mark.parametrize("rows", ["0", "16"])
def test_two_runs_are_bitwise_equal(built, monkeypatch, rows):
    monkeypatch.setenv(cuda_backend.ROWS_ENV, rows)
    B, T, n, d = 16, 40, 32, 1000  # 512 slots: several row splits
    params = make_params("noreft", 8, d)
    positions = make_positions(B, T, n)
    h = torch.randn(B, T, d, device=DEVICE).to(torch.bfloat16)
    grad_out = torch.randn_like(h)
    runs = [forward_backward(h, positions, params, "tanh", "cuda", grad_out, dropout=0.2, seed=99) for _ in range(2)]
    (out0, g0), (out1, g1) = runs
    assert torch.equal(out0, out1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


@pytest.mark.parametrize("d", [1000, 4097])  # vector and scalar paths draw the same stream
def test_dropout_mask_is_shared_by_forward_and_backward(built, d):
    B, T, n, r, p = 4, 9, 5, 4, 0.3
    params = make_params("loreft", r, d)
    positions = make_positions(B, T, n, empty_row=False)
    h = torch.randn(B, T, d, device=DEVICE)
    grad_out = torch.randn_like(h)
    out, grads = forward_backward(h, positions, params, "silu", "cuda", grad_out, dropout=p, seed=1234)

    # The forward's mask, read off its output: a dropped element is exactly 0 (a kept one is almost surely not).
    keep = torch.zeros(B, n, d, dtype=torch.float64, device=DEVICE)
    b_idx, j_idx = (positions >= 0).nonzero(as_tuple=True)
    keep[b_idx, j_idx] = (out[b_idx, positions[b_idx, j_idx]] != 0).double()
    kept = keep[b_idx, j_idx].mean().item()
    assert abs(kept - (1 - p)) < 0.03, f"kept fraction {kept:.3f}, expected {1 - p}"

    ref_out, ref_grads = reference_forward_backward(h, positions, params, "silu", grad_out, keep=keep, dropout=p)
    close(out, ref_out, OUT_TOL[torch.float32], "out with dropout")
    for name, g in grads.items():
        close(g, ref_grads[name], OUT_TOL[torch.float32] if name == "h" else WEIGHT_TOL, f"d{name} with dropout")

    again, _ = forward_backward(h, positions, params, "silu", "cuda", grad_out, dropout=p, seed=1234)
    other, _ = forward_backward(h, positions, params, "silu", "cuda", grad_out, dropout=p, seed=1235)
    assert torch.equal(out, again)
    assert not torch.equal(out, other)


def test_bad_arguments_are_named(built):
    params = make_params("loreft", 4, 64)
    h = torch.randn(2, 3, 64, device=DEVICE)
    positions = torch.zeros(2, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="out must not share memory with h"):
        cuda_backend.edit_forward(h, positions, params["Q"], params["P"], params["W"], params["b"], 0, 0.0, 0, h)
    wide = torch.randn(65, 64, device=DEVICE)
    with pytest.raises(ValueError, match="rank 1 to 64"):
        cuda_backend.edit_forward(h, positions, wide, None, None, torch.zeros(65, device=DEVICE), 0, 0.0, 0,
                                  h.clone())
    with pytest.raises(TypeError, match="Q must be float32"):
        cuda_backend.edit_forward(h, positions, params["Q"].double(), None, None, params["b"], 0, 0.0, 0, h.clone())


# ----------------------------------------------------------------------------------------------------------------------
# compute-sanitizer
# ----------------------------------------------------------------------------------------------------------------------
SANITIZED_RUN = textwrap.dedent("""
    import itertools
    import os
    import sys
    import torch
    from reft_fast import ops
    device = sys.argv[1]
    torch.manual_seed(0)
    cases = ((torch.bfloat16, 1000, 0, 8), (torch.float32, 4097, 0, 3), (torch.float16, 520, 1, 8),
             (torch.float32, 256, 0, 64), (torch.bfloat16, 200, 1, 40))
    for rows_per_block, (dtype, d, offset, r) in itertools.product(("1", "4", "16"), cases):
        os.environ["REFT_FAST_CUDA_ROWS_PER_BLOCK"] = rows_per_block
        storage = torch.randn(3 * 5 * d + offset, device=device).to(dtype)
        h = storage[offset:].view(3, 5, d).requires_grad_()
        positions = torch.tensor([[0, 4, -1], [-1, -1, -1], [2, -1, 3]], device=device)
        R = torch.linalg.qr(torch.randn(d, r))[0].t().contiguous().to(device).requires_grad_()
        W = (torch.randn(r, d, device=device) / d**0.5).requires_grad_()
        b = torch.randn(r, device=device, requires_grad=True)
        out = ops.loreft(h, positions, R, W, b, act="gelu", dropout=0.1, seed=5, backend="cuda")
        out.float().square().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    else:  # the CPU build must be the instrumented one
        from pathlib import Path
        from reft_fast.ops import cuda_build as cuda_backend
        print("INSTRUMENTED" if b"__asan_report_load" in Path(cuda_backend.load().__file__).read_bytes() else "PLAIN")
    print("SANITIZED RUN DONE")
""")


def _compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    candidate = Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.exists() else None


@pytest.mark.cuda
def test_compute_sanitizer_memcheck_is_clean(built):
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "97", sys.executable, "-c",
                          SANITIZED_RUN, "cuda"], capture_output=True, text=True, timeout=900, env=env)
    report = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, report
    assert "SANITIZED RUN DONE" in run.stdout, report
    assert "ERROR SUMMARY: 0 errors" in run.stdout + run.stderr, report


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the memory check is compute-sanitizer's")
def test_address_sanitizer_run_is_clean():
    """The CPU simulation built with AddressSanitizer (REFT_FAST_CUDA_SIM=asan, its runtime preloaded): every access the
    kernels make to h, the parameters, the outputs, the workspace and shared memory is checked; scalar and vector paths,
    a misaligned h, empty rows, dropout, ranks 3 to 64."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    libasan = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not libasan or not Path(libasan).is_file():
        pytest.skip("the compiler has no AddressSanitizer runtime")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]),
               LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0", **{cuda_backend.SIM_ENV: "asan"})
    run = subprocess.run([sys.executable, "-c", SANITIZED_RUN, "cpu"], capture_output=True, text=True, timeout=900,
                         env=env)
    report = run.stdout[-4000:] + run.stderr[-6000:]
    assert run.returncode == 0, report
    assert "SANITIZED RUN DONE" in run.stdout and "INSTRUMENTED" in run.stdout, report
    assert "AddressSanitizer" not in run.stderr, report


def _same_bits_under_order(monkeypatch, order, family, act, B, T, n, r, d, **kw):
    """Forward and backward under REFT_FAST_CUDA_SIM_ORDER=forward and then `order`: bitwise the same results."""
    params = make_params(family, r, d)
    positions = make_positions(B, T, n)
    h = torch.randn(B, T, d).to(torch.bfloat16)
    grad_out = torch.randn_like(h)
    monkeypatch.setenv("REFT_FAST_CUDA_SIM_ORDER", "forward")
    out0, g0 = forward_backward(h, positions, params, act, "cuda", grad_out, **kw)
    monkeypatch.setenv("REFT_FAST_CUDA_SIM_ORDER", order)
    out1, g1 = forward_backward(h, positions, params, act, "cuda", grad_out, **kw)
    assert torch.equal(out0, out1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


@pytest.mark.skipif(HAS_CUDA, reason="the thread order is the CPU simulation's to choose")
@pytest.mark.parametrize("rows_per_block", ["1", "4", "16"])
@pytest.mark.parametrize("order", ["reverse", "shuffle", "warps"])
def test_results_do_not_depend_on_thread_order(built, order, rows_per_block, monkeypatch):
    """The simulation resumes a block's threads in another order (REFT_FAST_CUDA_SIM_ORDER): a missing barrier or a
    read of a value another thread has not yet written would change the results; race-free kernels give the same bits.
    64 slots: two row splits in the weight-gradient kernel."""
    monkeypatch.setenv(cuda_backend.ROWS_ENV, rows_per_block)
    _same_bits_under_order(monkeypatch, order, "noreft", "tanh", B=8, T=12, n=8, r=8, d=520, dropout=0.2, seed=7)


@pytest.mark.skipif(HAS_CUDA, reason="the thread order is the CPU simulation's to choose")
@pytest.mark.parametrize("order", ["reverse", "shuffle", "warps"])
def test_tile_weight_gradients_do_not_depend_on_thread_order(built, order, monkeypatch):
    """The tile path with splits of several 32-slot chunks (256 slots, d = 2048, r = 20: 16 column tiles × 3 matrices
    take 6 splits of ~43 slots), so the tensor-core weight-gradient kernel restages its shared memory within a block."""
    monkeypatch.setenv(cuda_backend.ROWS_ENV, "16")
    _same_bits_under_order(monkeypatch, order, "noreft", "gelu", B=4, T=40, n=64, r=20, d=2048, dropout=0.1, seed=5)


# ----------------------------------------------------------------------------------------------------------------------
# Without CUDA: a clear message, not a traceback from the compiler
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="checks the message given on machines without CUDA")
def test_without_cuda_the_backend_says_what_is_missing(monkeypatch):
    monkeypatch.delenv(cuda_backend.SIM_ENV, raising=False)
    reason = cuda_backend.unavailable_reason()
    assert reason is not None
    assert "without CUDA" in reason or "no CUDA GPU" in reason
    with pytest.raises(cuda_backend.CudaBackendUnavailable, match="backend 'cuda' is unavailable"):
        cuda_backend.load()
    h = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.low_rank_edit(h, torch.zeros(1, 1, dtype=torch.long), torch.randn(1, 8), b=torch.randn(1),
                          backend="cuda")
