"""Triton kernels for the fused low-rank ReFT edit (forward and backward) and their launch functions.

Pure functions over tensors: no nn.Module, nothing from reft_fast. reft_fast.ops.backend_triton adapts them to the
op's backend contract; the math (for a selected row h, fp32):

    u = h Pᵀ,  z = h Wᵀ + b (or b),  δ = act(z) − s·u,  o = h + δ Q,  out = keep ⊙ o / (1 − p)

Rows are addressed through a flat list of "slots": slot e = b·n + j stands for token positions[b, j] of example b;
a slot holding −1 (or past the end) is skipped, so no host-side compaction (and no device→host sync) is needed.
The dropout mask of element (slot e, column c) is Philox(seed, e·d + c): regenerated in backward, never stored.

Backward, for g = ∂L/∂out at a selected row (g_o = keep ⊙ g / (1 − p)):
    t  = g_o Qᵀ                      (r)
    dz = t ⊙ act'(z)                 (r)
    dh = g_o + dz W − s·t P          (d)   written into the selected rows of grad_h (a copy of grad_out)
    dQ = Σ δᵀ g_o,  dW = Σ dzᵀ h,  dP = −s Σ tᵀ h,  db = Σ dz      (sums over selected rows)
The rows pass (a program per slot block × column range) computes dh and keeps δ, dz, t per slot in small fp32
buffers; the weight pass (a program per column tile × row split) forms the weight gradients as [r, tile] partials per
split; the splits are then summed in a fixed order. No atomics: the result is bitwise reproducible.

Two paths, chosen by shape (column_split): with many rows, one program per slot block does the projections over all
of d and then writes; with few rows, the projections are first split over column ranges (a partial-sum kernel, then a
fixed-order sum of the parts), so that the serial loop over d does not set the latency.

Matrix products use tl.dot with fp32 operands, in exact fp32 or TF32 (see launch_config). The CPU interpreter runs
them in plain fp32; it also truncates fp32→bf16 conversions instead of rounding, which the tests allow for.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _activation(z, ACT: tl.constexpr):
    # codes: 0 identity, 1 relu, 2 gelu (exact, erf), 3 silu, 4 tanh
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 3:
        z = z * tl.sigmoid(z)
    elif ACT == 4:
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    return z


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        grad = tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        grad = tl.where(z > 0.0, 1.0, 0.0)  # like torch: relu'(0) = 0
    elif ACT == 2:
        grad = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == 3:
        sig = tl.sigmoid(z)
        grad = sig * (1.0 + z * (1.0 - sig))
    else:
        th = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        grad = 1.0 - th * th
    return grad


@triton.jit
def _slot_rows(positions_ptr, slot0, n_slots, n_per_example, seq_len, BLOCK_M: tl.constexpr):
    """Slots [slot0, slot0 + BLOCK_M): their flat row index into [B·T, d] and whether each is selected."""
    slots = slot0 + tl.arange(0, BLOCK_M)
    in_range = slots < n_slots
    pos = tl.load(positions_ptr + slots, mask=in_range, other=-1).to(tl.int64)
    selected = in_range & (pos >= 0)
    rows = (slots // n_per_example).to(tl.int64) * seq_len + tl.where(selected, pos, 0)
    return slots.to(tl.int64), rows, selected


@triton.jit
def _keep_scale(seed, slots, cols, d, p, scale):
    """Dropout factor per element: 0 where dropped, 1/(1 − p) where kept; a pure function of (seed, slot, column)."""
    rnd = tl.rand(seed, slots[:, None] * d + cols[None, :])
    return tl.where(rnd >= p, scale, 0.0)


@triton.jit
def _row_projections(
    h_ptr, g_ptr, q_ptr, p_ptr, w_ptr, h_rows, rows, selected, slots, col_begin, col_end, d, ranks, rank_ok,
    dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_G: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Sums over columns [col_begin, col_end) of z = h Wᵀ, u = h Pᵀ and (when HAS_G) t = g_o Qᵀ, for BLOCK_M slots.

    h is read at row index h_rows (the token rows of [B·T, d], or the slots of the compact [B·n, d] copy that
    backward keeps); g at rows."""
    z = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for c0 in range(col_begin, col_end, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < col_end
        io_mask = selected[:, None] & col_ok[None, :]
        par_mask = rank_ok[:, None] & col_ok[None, :]
        if HAS_W or HAS_P:
            x = tl.load(h_ptr + h_rows[:, None] * d + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
            if HAS_W:
                w = tl.load(w_ptr + ranks[:, None] * d + cols[None, :], mask=par_mask, other=0.0)
                z += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
            if HAS_P:
                pm = tl.load(p_ptr + ranks[:, None] * d + cols[None, :], mask=par_mask, other=0.0)
                u += tl.dot(x, tl.trans(pm), input_precision=DOT_PRECISION)
        if HAS_G:
            g = tl.load(g_ptr + rows[:, None] * d + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
            if DROPOUT:
                g = g * _keep_scale(seed, slots, cols, d, dropout_p, dropout_scale)
            q = tl.load(q_ptr + ranks[:, None] * d + cols[None, :], mask=par_mask, other=0.0)
            t += tl.dot(g, tl.trans(q), input_precision=DOT_PRECISION)
    return z, u, t


@triton.jit
def _projections(
    h_ptr, g_ptr, q_ptr, p_ptr, w_ptr, part_ptr, h_rows, rows, selected, slots, n_slots, d, n_splits, ranks, rank_ok,
    dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_G: tl.constexpr, DROPOUT: tl.constexpr, FROM_PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """z, u, t over all d columns: computed here (fused path) or summed from the column splits in a fixed order."""
    if FROM_PARTS:
        z = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        t = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        at = slots[:, None] * BLOCK_R + ranks[None, :]
        ok = (slots < n_slots)[:, None]
        plane = n_slots * BLOCK_R
        for split in range(0, n_splits):
            base = part_ptr + split * 3 * plane
            z += tl.load(base + at, mask=ok, other=0.0)
            u += tl.load(base + plane + at, mask=ok, other=0.0)
            t += tl.load(base + 2 * plane + at, mask=ok, other=0.0)
    else:
        z, u, t = _row_projections(h_ptr, g_ptr, q_ptr, p_ptr, w_ptr, h_rows, rows, selected, slots, 0, d, d, ranks,
                                   rank_ok,
                                   dropout_p, dropout_scale, seed, HAS_P, HAS_W, HAS_G, DROPOUT,
                                   BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION)
    return z, u, t


@triton.jit
def _split_projections_kernel(
    h_ptr, g_ptr, positions_ptr, q_ptr, p_ptr, w_ptr, part_ptr,
    n_slots, n_per_example, seq_len, d, r, cols_per_split, dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_G: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # HAS_G (backward): h is the compact [B·n, d] copy of the selected rows, addressed by slot.
    # Few rows (the f7+l7 case): the r-length projections are split over column ranges, one program per
    # (slot block, column range), so that the serial loop over d does not set the latency. Parts: [split, 3, slot, r].
    slots, rows, selected = _slot_rows(positions_ptr, tl.program_id(0) * BLOCK_M, n_slots, n_per_example, seq_len,
                                       BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < r
    split = tl.program_id(1)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, d)
    z, u, t = _row_projections(h_ptr, g_ptr, q_ptr, p_ptr, w_ptr, slots if HAS_G else rows, rows, selected, slots,
                               col_begin, col_end, d, ranks, rank_ok, dropout_p, dropout_scale, seed, HAS_P, HAS_W, HAS_G, DROPOUT,
                               BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION)
    plane = n_slots * BLOCK_R
    at = part_ptr + split * 3 * plane + slots[:, None] * BLOCK_R + ranks[None, :]
    ok = (slots < n_slots)[:, None]
    tl.store(at, z, mask=ok)
    tl.store(at + plane, u, mask=ok)
    tl.store(at + 2 * plane, t, mask=ok)


@triton.jit
def _source_and_delta(z, u, b_ptr, ranks, rank_ok, HAS_P: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """z ← h Wᵀ + b, and δ = act(z) − s·u (zero in the padded ranks)."""
    if HAS_B:
        z += tl.load(b_ptr + ranks, mask=rank_ok, other=0.0)[None, :]
    delta = _activation(z, ACT)
    if HAS_P:
        delta -= u
    return z, tl.where(rank_ok[None, :], delta, 0.0)


@triton.jit
def _edit_forward_kernel(
    h_ptr, out_ptr, positions_ptr, q_ptr, p_ptr, w_ptr, b_ptr, part_ptr,
    n_slots, n_per_example, seq_len, d, r, n_splits, cols_per_program, dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    FROM_PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M slots × columns [pid1·cols_per_program, ...). Fused path: pass 1 over all of d for the
    # projections, pass 2 writes (the second read of the rows mostly hits L2). Split path: projections from the parts.
    slots, rows, selected = _slot_rows(positions_ptr, tl.program_id(0) * BLOCK_M, n_slots, n_per_example, seq_len,
                                       BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < r
    z, u, _ = _projections(h_ptr, h_ptr, q_ptr, p_ptr, w_ptr, part_ptr, rows, rows, selected, slots, n_slots, d,
                           n_splits, ranks, rank_ok, dropout_p, dropout_scale, seed, HAS_P, HAS_W, False, DROPOUT,
                           FROM_PARTS, BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION)
    z, delta = _source_and_delta(z, u, b_ptr, ranks, rank_ok, HAS_P, HAS_B, ACT)

    col_begin = tl.program_id(1) * cols_per_program
    col_end = tl.minimum(col_begin + cols_per_program, d)
    for c0 in range(col_begin, col_end, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < col_end
        io_mask = selected[:, None] & col_ok[None, :]
        x = tl.load(h_ptr + rows[:, None] * d + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + ranks[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        o = x + tl.dot(delta, q, input_precision=DOT_PRECISION)
        if DROPOUT:
            o = o * _keep_scale(seed, slots, cols, d, dropout_p, dropout_scale)
        tl.store(out_ptr + rows[:, None] * d + cols[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _edit_backward_rows_kernel(
    h_ptr, g_ptr, dh_ptr, positions_ptr, q_ptr, p_ptr, w_ptr, b_ptr, part_ptr, delta_ptr, dz_ptr, t_ptr,
    n_slots, n_per_example, seq_len, d, r, n_splits, cols_per_program, dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    FROM_PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    slots, rows, selected = _slot_rows(positions_ptr, tl.program_id(0) * BLOCK_M, n_slots, n_per_example, seq_len,
                                       BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < r
    # z and u are recomputed from the compact copy of the selected rows of h (addressed by slot); t = g_o Qᵀ
    z, u, t = _projections(h_ptr, g_ptr, q_ptr, p_ptr, w_ptr, part_ptr, slots, rows, selected, slots, n_slots, d,
                           n_splits, ranks, rank_ok, dropout_p, dropout_scale, seed, HAS_P, HAS_W, True, DROPOUT,
                           FROM_PARTS, BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION)
    z, delta = _source_and_delta(z, u, b_ptr, ranks, rank_ok, HAS_P, HAS_B, ACT)
    keep_rows = selected[:, None] & rank_ok[None, :]
    delta = tl.where(keep_rows, delta, 0.0)
    t = tl.where(keep_rows, t, 0.0)
    dz = tl.where(keep_rows, t * _activation_grad(z, ACT), 0.0)

    # The per-slot vectors the weight-gradient pass needs (zeros for unselected slots); one column program writes them.
    if tl.program_id(1) == 0:
        buf = slots[:, None] * BLOCK_R + ranks[None, :]
        slot_ok = (slots < n_slots)[:, None]
        tl.store(delta_ptr + buf, delta, mask=slot_ok)
        tl.store(dz_ptr + buf, dz, mask=slot_ok)
        tl.store(t_ptr + buf, t, mask=slot_ok)

    # dh = g_o + dz W − s·t P at the selected rows, for this program's columns.
    col_begin = tl.program_id(1) * cols_per_program
    col_end = tl.minimum(col_begin + cols_per_program, d)
    for c0 in range(col_begin, col_end, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < col_end
        io_mask = selected[:, None] & col_ok[None, :]
        par_mask = rank_ok[:, None] & col_ok[None, :]
        dh = tl.load(g_ptr + rows[:, None] * d + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        if DROPOUT:
            dh = dh * _keep_scale(seed, slots, cols, d, dropout_p, dropout_scale)
        if HAS_W:
            w = tl.load(w_ptr + ranks[:, None] * d + cols[None, :], mask=par_mask, other=0.0)
            dh += tl.dot(dz, w, input_precision=DOT_PRECISION)
        if HAS_P:
            pm = tl.load(p_ptr + ranks[:, None] * d + cols[None, :], mask=par_mask, other=0.0)
            dh -= tl.dot(t, pm, input_precision=DOT_PRECISION)
        tl.store(dh_ptr + rows[:, None] * d + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _edit_backward_weights_kernel(
    h_ptr, g_ptr, positions_ptr, delta_ptr, dz_ptr, t_ptr, dq_part_ptr, dw_part_ptr, dp_part_ptr,
    n_slots, n_per_example, seq_len, d, slots_per_split, dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: a column tile × one split of the slots; it writes [BLOCK_R, BLOCK_D] partial sums for its split.
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    acc_q = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc_w = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc_p = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    first = split * slots_per_split
    last = tl.minimum(first + slots_per_split, n_slots)
    for slot0 in range(first, last, BLOCK_M):
        slots, rows, selected = _slot_rows(positions_ptr, slot0, last, n_per_example, seq_len, BLOCK_M)
        io_mask = selected[:, None] & col_ok[None, :]
        buf = slots[:, None] * BLOCK_R + ranks[None, :]
        slot_ok = (slots < last)[:, None]
        g = tl.load(g_ptr + rows[:, None] * d + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        if DROPOUT:
            g = g * _keep_scale(seed, slots, cols, d, dropout_p, dropout_scale)
        delta = tl.load(delta_ptr + buf, mask=slot_ok, other=0.0)
        acc_q += tl.dot(tl.trans(delta), g, input_precision=DOT_PRECISION)
        if HAS_W or HAS_P:
            x = tl.load(h_ptr + slots[:, None] * d + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
            if HAS_W:
                dz = tl.load(dz_ptr + buf, mask=slot_ok, other=0.0)
                acc_w += tl.dot(tl.trans(dz), x, input_precision=DOT_PRECISION)
            if HAS_P:
                t = tl.load(t_ptr + buf, mask=slot_ok, other=0.0)
                acc_p -= tl.dot(tl.trans(t), x, input_precision=DOT_PRECISION)
    part = split * BLOCK_R * d + ranks[:, None] * d + cols[None, :]
    tl.store(dq_part_ptr + part, acc_q, mask=col_ok[None, :])
    if HAS_W:
        tl.store(dw_part_ptr + part, acc_w, mask=col_ok[None, :])
    if HAS_P:
        tl.store(dp_part_ptr + part, acc_p, mask=col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Launch functions (what reft_fast.ops.backend_triton calls; the cuda backend has the same two)
# ----------------------------------------------------------------------------------------------------------------------
def launch_config(d: int, r: int, h_dtype: torch.dtype, interpreted: bool = _INTERPRETED):
    """Block sizes, warps and dot precision for one shape: (BLOCK_M, BLOCK_D, BLOCK_R, num_warps, precision).

    tl.dot needs every dimension ≥ 16, so the rank is padded to BLOCK_R ≥ 16. On a GPU the tiles are chosen so that
    no kernel spills registers on sm_90 (tests/test_triton_compile.py compiles them and checks). Products are exact
    fp32 ("ieee", CUDA cores) for fp32 h and for ranks ≤ 16, where the 3·r multiply-adds per element stay below the
    memory time; bf16/fp16 h with a larger rank uses TF32 tensor cores, whose 10-bit mantissa is still finer than the
    8 (bf16) or 10 (fp16) bits the result is rounded to. The interpreter pays per program, so it gets big blocks.
    """
    block_r = max(16, triton.next_power_of_2(r))
    if interpreted:
        return 32, min(256, max(16, triton.next_power_of_2(d))), block_r, 4, "ieee"
    precision = "ieee" if (h_dtype == torch.float32 or block_r <= 16) else "tf32"
    if block_r >= 64:
        block_d = 32 if precision == "tf32" else 16
    else:
        block_d = 64
    return 16, block_d, block_r, 8, precision


def _dropout_args(dropout: float):
    return float(dropout), (1.0 / (1.0 - dropout) if dropout > 0 else 1.0)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def column_split(n_slots: int, d: int, block_m: int, block_d: int, device: torch.device):
    """(column splits of the projections, column programs of the write pass); (0, 1) = the fused single pass.

    With many rows there are enough slot blocks to fill the GPU: one program per slot block reads its rows, forms
    the projections and writes, and the second read of the rows mostly hits L2. With few rows (112 for f7+l7 at
    batch 8) that would leave most SMs idle behind a serial loop over d, so the projections are split over column
    ranges (partial sums, then a fixed-order sum) and the write pass over column programs. The interpreter takes the
    split path when all slots fit one block, so that the tests run both paths.
    """
    slot_blocks = triton.cdiv(n_slots, block_m)
    col_tiles = triton.cdiv(d, block_d)
    if device.type != "cuda":
        return (min(col_tiles, 3), min(col_tiles, 2)) if slot_blocks == 1 else (0, 1)
    sms = _sm_count(device)
    if slot_blocks >= sms:
        return 0, 1
    per_block = min(col_tiles, triton.cdiv(2 * sms, slot_blocks))
    return per_block, per_block


def _split_grid(d: int, pieces: int, block_d: int):
    """Columns per program (a multiple of BLOCK_D) and the number of programs that covers d."""
    cols = triton.cdiv(triton.cdiv(d, pieces), block_d) * block_d
    return cols, triton.cdiv(d, cols)


class _Launch(NamedTuple):
    """What forward and backward launch with: grid, the pointers standing in for absent P and W, the projection
    parts (split path), the kernels' scalar arguments in their order, the compile-time flags, and the block sizes."""

    grid: tuple
    P: torch.Tensor
    W: torch.Tensor
    parts: torch.Tensor
    scalars: tuple
    flags: dict
    block_m: int
    block_d: int
    block_r: int


def _launch(h, positions, Q, P, W, b, act, dropout, seed, g=None) -> _Launch:
    """Shared set-up of forward and backward: block sizes, the column split and (split path) the projection parts.

    Forward passes h [B, T, d]; backward passes the compact rows h_rows [B, n, d] and g [B, T, d]."""
    batch, seq_len, d = (h if g is None else g).shape
    r = Q.shape[0]
    n_slots = positions.numel()
    block_m, block_d, block_r, num_warps, precision = launch_config(d, r, h.dtype)
    p, scale = _dropout_args(dropout)
    n_splits, n_col_programs = column_split(n_slots, d, block_m, block_d, h.device)
    slot_blocks = triton.cdiv(n_slots, block_m)
    common = dict(HAS_P=P is not None, HAS_W=W is not None, DROPOUT=dropout > 0, BLOCK_M=block_m, BLOCK_D=block_d,
                  BLOCK_R=block_r, DOT_PRECISION=precision, num_warps=num_warps)
    P_arg, W_arg = (Q if P is None else P), (Q if W is None else W)
    parts = Q  # a placeholder pointer on the fused path
    if n_splits:
        cols_per_split, n_splits = _split_grid(d, n_splits, block_d)
        parts = torch.empty(n_splits, 3, n_slots, block_r, dtype=torch.float32, device=h.device)
        _split_projections_kernel[(slot_blocks, n_splits)](
            h, h if g is None else g, positions, Q, P_arg, W_arg, parts,
            n_slots, positions.shape[1], seq_len, d, r, cols_per_split, p, scale, seed, HAS_G=g is not None, **common,
        )
    cols_per_program, n_col_programs = _split_grid(d, n_col_programs, block_d)
    scalars = (n_slots, positions.shape[1], seq_len, d, r, n_splits, cols_per_program, p, scale, seed)
    return _Launch(grid=(slot_blocks, n_col_programs), P=P_arg, W=W_arg, parts=parts, scalars=scalars,
                   flags=dict(common, HAS_B=b is not None, ACT=act, FROM_PARTS=n_splits > 0),
                   block_m=block_m, block_d=block_d, block_r=block_r)


def edit_forward(h, positions, Q, P, W, b, act: int, dropout: float, seed: int, out) -> None:
    """Overwrite the selected rows of ``out`` (a copy of h) with the edited rows."""
    if positions.numel() == 0:
        return
    L = _launch(h, positions, Q, P, W, b, act, dropout, seed)
    _edit_forward_kernel[L.grid](
        h, out, positions, Q, L.P, L.W, Q if b is None else b, L.parts, *L.scalars, **L.flags,
    )


_SERIAL_SLOT_BLOCKS = 16


def _num_splits(n_slots: int, d: int, block_m: int, block_d: int, device: torch.device) -> int:
    """Row splits of the weight-gradient pass: enough programs to fill the GPU, few under the interpreter.

    Few rows (at most _SERIAL_SLOT_BLOCKS slot blocks, e.g. 112 rows) take one split: each program's loop over the
    slots stays short, and the kernel's output is the gradient itself, with no reduction launches after it."""
    slot_blocks = triton.cdiv(n_slots, block_m)
    if device.type != "cuda":
        return min(slot_blocks, 3)  # the interpreter: few programs, but still more than one split to reduce
    if slot_blocks <= _SERIAL_SLOT_BLOCKS:
        return 1
    col_tiles = triton.cdiv(d, block_d)
    return max(1, min(slot_blocks, triton.cdiv(2 * _sm_count(device), col_tiles)))


def edit_backward(h_rows, grad_out, positions, Q, P, W, b, act: int, dropout: float, seed: int, grad_h):
    """Overwrite the selected rows of ``grad_h`` (a copy of grad_out) with ∂L/∂h; return (dQ, dP, dW, db).

    h_rows [B, n, d] holds h[b, positions[b, j]] at [b, j] (anything where positions is −1): forward keeps only the
    selected rows of h for backward, not the whole hidden state."""
    batch, seq_len, d = grad_out.shape
    r = Q.shape[0]
    n_slots = positions.numel()
    if n_slots == 0:
        zeros = lambda: torch.zeros(r, d, dtype=torch.float32, device=h_rows.device)  # noqa: E731
        return (zeros(), None if P is None else zeros(), None if W is None else zeros(),
                None if b is None else torch.zeros(r, dtype=torch.float32, device=h_rows.device))
    L = _launch(h_rows, positions, Q, P, W, b, act, dropout, seed, g=grad_out)
    block_m, block_d, block_r = L.block_m, L.block_d, L.block_r
    per_slot = lambda: torch.empty(n_slots, block_r, dtype=torch.float32, device=h_rows.device)  # noqa: E731
    delta, dz, t = per_slot(), per_slot(), per_slot()
    _edit_backward_rows_kernel[L.grid](
        h_rows, grad_out, grad_h, positions, Q, L.P, L.W, Q if b is None else b, L.parts, delta, dz, t,
        *L.scalars, **L.flags,
    )

    splits = _num_splits(n_slots, d, block_m, block_d, h_rows.device)
    slots_per_split = triton.cdiv(triton.cdiv(n_slots, splits), block_m) * block_m
    splits = triton.cdiv(n_slots, slots_per_split)
    partial = lambda: torch.empty(splits, block_r, d, dtype=torch.float32, device=h_rows.device)  # noqa: E731
    dq_part = partial()
    dw_part = partial() if W is not None else dq_part
    dp_part = partial() if P is not None else dq_part
    flags = {k: L.flags[k] for k in ("HAS_P", "HAS_W", "DROPOUT", "BLOCK_M", "BLOCK_D", "BLOCK_R",
                                        "DOT_PRECISION", "num_warps")}
    p, scale = _dropout_args(dropout)
    _edit_backward_weights_kernel[(triton.cdiv(d, block_d), splits)](
        h_rows, grad_out, positions, delta, dz, t, dq_part, dw_part, dp_part,
        n_slots, positions.shape[1], seq_len, d, slots_per_split, p, scale, seed, **flags,
    )
    # Fixed-order reduction over the splits (torch's reduction over a dimension is deterministic); with one split
    # the partials are the gradients (a contiguous view: rows :r of the [BLOCK_R, d] block).
    total = (lambda part: part[0, :r]) if splits == 1 else (lambda part: part[:, :r].sum(0))
    dQ = total(dq_part)
    dP = total(dp_part) if P is not None else None
    dW = total(dw_part) if W is not None else None
    db = dz[:, :r].sum(0) if b is not None else None
    return dQ, dP, dW, db
