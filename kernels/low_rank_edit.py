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

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from reft_fast.kernels import launch

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Integer arguments that change from batch to batch: rows, positions and sequence length, the launch plan made from
# them, the dropout seed. Triton compiles a kernel per combination of its int arguments being 1, a multiple of 16 or
# neither (the values are compiled in as facts); a packed or variable-length run draws a new combination every few
# steps, each a compile of every kernel (seconds) inside a training step. These are taken as plain values, so each
# kernel compiles once per tiles and flags. d and r stay specialized: d is the row stride, whose alignment lets loads
# vectorize, and both are fixed for a model.
# _COLUMN_FACT: cols_per_program and cols_per_split are multiples of BLOCK_D (≥ 16; _split_grid). Specialized, Triton
# knew them to be multiples of 16; as plain values (below) it does not, and the column offsets of a program lose their
# alignment: compiled for sm_90, the write passes' loads and stores of h went from 2-wide vectors to scalars (the
# forward at rank 32: 10 → 17 global loads, 6 → 12 stores), and on the H200 (2026-11-30) the forward kernel at
# 65 536 rows, rank 32 took 1.84 ms against 1.30 before. The kernels restate the fact as (x // BLOCK_D) * BLOCK_D, the
# same value (tl.multiple_of on a kernel argument compiled to the same scalar accesses); tests/test_triton_compile.py
# checks that the launched kernels' PTX accesses memory as the specialized one did.
PER_BATCH_ARGS = ("n_slots", "n_per_example", "seq_len", "n_splits", "cols_per_program", "slot_blocks", "copy_units",
                  "n_rows", "cols_per_split", "slots_per_split", "seed", "batch", "n_entries", "n_max")

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
    """Slots [slot0, slot0 + BLOCK_M): their flat row index into [B·T, d] and whether each is selected.

    A position outside [0, seq_len) selects nothing, like −1 (the CUDA twin's rule): unchecked positions
    (``validate=False``, e.g. locations already on the GPU) can never make a program read or write another example's
    row, or memory past h."""
    slots = slot0 + tl.arange(0, BLOCK_M)
    in_range = slots < n_slots
    pos = tl.load(positions_ptr + slots, mask=in_range, other=-1).to(tl.int64)
    selected = in_range & (pos >= 0) & (pos < seq_len)
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


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
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
    cols_per_split = (cols_per_split // BLOCK_D) * BLOCK_D  # the same value, known aligned (_COLUMN_FACT)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, d)
    z, u, t = _row_projections(h_ptr, g_ptr, q_ptr, p_ptr, w_ptr, slots if HAS_G else rows, rows, selected, slots,
                               col_begin, col_end, d, ranks, rank_ok, dropout_p, dropout_scale, seed, HAS_P, HAS_W,
                               HAS_G, DROPOUT, BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION)
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
def _copy_unit_rows(unit, n_rows, seq_len, copy_col_chunks, COPY_ROWS: tl.constexpr):
    """The rows of [B·T, d] that copy unit ``unit`` covers, whether each exists, its example and its token."""
    rows = (unit // copy_col_chunks) * COPY_ROWS + tl.arange(0, COPY_ROWS)
    row_ok = rows < n_rows
    return rows, row_ok, rows // seq_len, rows % seq_len


@triton.jit
def _copy_rows_where(src_ptr, dst_ptr, rows, copied, unit, d, copy_col_chunks, cols_per_copy, COPY_D: tl.constexpr):
    """dst = src at the ``copied`` rows, over copy unit ``unit``'s columns."""
    rows = rows.to(tl.int64)
    col_begin = (unit % copy_col_chunks) * cols_per_copy
    col_end = tl.minimum(col_begin + cols_per_copy, d)
    for c0 in range(col_begin, col_end, COPY_D):
        cols = c0 + tl.arange(0, COPY_D)
        mask = copied[:, None] & (cols < col_end)[None, :]
        at = rows[:, None] * d + cols[None, :]
        tl.store(dst_ptr + at, tl.load(src_ptr + at, mask=mask), mask=mask)


@triton.jit
def _copy_unselected_rows(
    src_ptr, dst_ptr, positions_ptr, unit, n_rows, n_per_example, seq_len, d, copy_col_chunks, cols_per_copy,
    COPY_ROWS: tl.constexpr, COPY_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dst = src at the rows of copy unit ``unit`` (COPY_ROWS rows × cols_per_copy columns of [B·T, d]) that no
    position selects. Row (b, t) is selected when positions[b, j] == t for some j: a scan of example b's n positions
    (a few cached bytes per row), so that these programs and the edit programs of the same launch write disjoint rows
    and the op needs no separate copy of the whole tensor."""
    rows, row_ok, example, token = _copy_unit_rows(unit, n_rows, seq_len, copy_col_chunks, COPY_ROWS)
    hit = tl.zeros((COPY_ROWS,), tl.int32)
    for j0 in range(0, n_per_example, BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)
        pos = tl.load(positions_ptr + example[:, None] * n_per_example + js[None, :],
                      mask=row_ok[:, None] & (js < n_per_example)[None, :], other=-1)
        hit = tl.maximum(hit, tl.max(tl.where(pos == token[:, None], 1, 0), axis=1))
    _copy_rows_where(src_ptr, dst_ptr, rows, row_ok & (hit == 0), unit, d, copy_col_chunks, cols_per_copy, COPY_D)


@triton.jit
def _copy_program(src_ptr, dst_ptr, positions_ptr, slot_blocks, copy_units, n_rows, n_per_example, seq_len, d,
                  copy_col_chunks, cols_per_copy,
                  COPY_ROWS: tl.constexpr, COPY_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # The programs past the slot blocks on axis 0, numbered across both grid axes, each take one copy unit.
    unit = (tl.program_id(0) - slot_blocks) * tl.num_programs(1) + tl.program_id(1)
    if unit < copy_units:
        _copy_unselected_rows(src_ptr, dst_ptr, positions_ptr, unit, n_rows, n_per_example, seq_len, d,
                              copy_col_chunks, cols_per_copy, COPY_ROWS, COPY_D, BLOCK_N)


@triton.jit
def _write_edited_rows(
    h_ptr, out_ptr, h_rows_ptr, q_ptr, delta, rows, selected, slots, ranks, rank_ok, col_begin, col_end, d,
    dropout_p, dropout_scale, seed,
    DROPOUT: tl.constexpr, KEEP_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out = h + δ Q (then the dropout factor) at the selected rows, columns [col_begin, col_end); with KEEP_ROWS
    also the rows of h read, into the slots of h_rows."""
    for c0 in range(col_begin, col_end, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < col_end
        io_mask = selected[:, None] & col_ok[None, :]
        raw = tl.load(h_ptr + rows[:, None] * d + cols[None, :], mask=io_mask, other=0.0)
        if KEEP_ROWS:
            tl.store(h_rows_ptr + slots[:, None] * d + cols[None, :], raw, mask=io_mask)
        q = tl.load(q_ptr + ranks[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        o = raw.to(tl.float32) + tl.dot(delta, q, input_precision=DOT_PRECISION)
        if DROPOUT:
            o = o * _keep_scale(seed, slots, cols, d, dropout_p, dropout_scale)
        tl.store(out_ptr + rows[:, None] * d + cols[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _edit_forward_kernel(
    h_ptr, out_ptr, h_rows_ptr, positions_ptr, q_ptr, p_ptr, w_ptr, b_ptr, part_ptr,
    n_slots, n_per_example, seq_len, d, r, n_splits, cols_per_program, slot_blocks, copy_units, n_rows,
    copy_col_chunks, cols_per_copy, dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    FROM_PARTS: tl.constexpr, KEEP_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COPY_ROWS: tl.constexpr, COPY_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Programs on axis 0 below slot_blocks: BLOCK_M slots × columns [pid1·cols_per_program, ...). Fused path: pass 1
    # over all of d for the projections, pass 2 writes (the second read of the rows mostly hits L2). Split path:
    # projections from the parts. Pass 2 also keeps the selected rows of h for backward (KEEP_ROWS). The programs
    # past slot_blocks copy the unselected rows of h into out (none are launched when out already holds them).
    if tl.program_id(0) >= slot_blocks:
        _copy_program(h_ptr, out_ptr, positions_ptr, slot_blocks, copy_units, n_rows, n_per_example, seq_len, d,
                      copy_col_chunks, cols_per_copy, COPY_ROWS, COPY_D, BLOCK_N)
    else:
        slots, rows, selected = _slot_rows(positions_ptr, tl.program_id(0) * BLOCK_M, n_slots, n_per_example,
                                           seq_len, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < r
        z, u, _ = _projections(h_ptr, h_ptr, q_ptr, p_ptr, w_ptr, part_ptr, rows, rows, selected, slots, n_slots, d,
                               n_splits, ranks, rank_ok, dropout_p, dropout_scale, seed, HAS_P, HAS_W, False, DROPOUT,
                               FROM_PARTS, BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION)
        z, delta = _source_and_delta(z, u, b_ptr, ranks, rank_ok, HAS_P, HAS_B, ACT)

        cols_per_program = (cols_per_program // BLOCK_D) * BLOCK_D  # the same value, known aligned (_COLUMN_FACT)
        col_begin = tl.program_id(1) * cols_per_program
        _write_edited_rows(h_ptr, out_ptr, h_rows_ptr, q_ptr, delta, rows, selected, slots, ranks, rank_ok, col_begin,
                           tl.minimum(col_begin + cols_per_program, d), d, dropout_p, dropout_scale, seed, DROPOUT,
                           KEEP_ROWS, BLOCK_D, DOT_PRECISION)


@triton.jit
def _backward_rows(
    h_ptr, g_ptr, dh_ptr, g_rows_ptr, positions_ptr, q_ptr, p_ptr, w_ptr, b_ptr, part_ptr, delta_ptr, dz_ptr, t_ptr,
    n_slots, n_per_example, seq_len, d, r, n_splits, cols_per_program, dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    FROM_PARTS: tl.constexpr, KEEP_G_ROWS: tl.constexpr,
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
    cols_per_program = (cols_per_program // BLOCK_D) * BLOCK_D  # the same value, known aligned (_COLUMN_FACT)
    col_begin = tl.program_id(1) * cols_per_program
    col_end = tl.minimum(col_begin + cols_per_program, d)
    for c0 in range(col_begin, col_end, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < col_end
        io_mask = selected[:, None] & col_ok[None, :]
        par_mask = rank_ok[:, None] & col_ok[None, :]
        raw = tl.load(g_ptr + rows[:, None] * d + cols[None, :], mask=io_mask, other=0.0)
        if KEEP_G_ROWS:  # dh overwrites g (an edit in place): the weight pass reads g's rows from this copy
            tl.store(g_rows_ptr + slots[:, None] * d + cols[None, :], raw, mask=io_mask)
        dh = raw.to(tl.float32)
        if DROPOUT:
            dh = dh * _keep_scale(seed, slots, cols, d, dropout_p, dropout_scale)
        if HAS_W:
            w = tl.load(w_ptr + ranks[:, None] * d + cols[None, :], mask=par_mask, other=0.0)
            dh += tl.dot(dz, w, input_precision=DOT_PRECISION)
        if HAS_P:
            pm = tl.load(p_ptr + ranks[:, None] * d + cols[None, :], mask=par_mask, other=0.0)
            dh -= tl.dot(t, pm, input_precision=DOT_PRECISION)
        tl.store(dh_ptr + rows[:, None] * d + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _edit_backward_rows_kernel(
    h_ptr, g_ptr, dh_ptr, g_rows_ptr, positions_ptr, q_ptr, p_ptr, w_ptr, b_ptr, part_ptr, delta_ptr, dz_ptr, t_ptr,
    n_slots, n_per_example, seq_len, d, r, n_splits, cols_per_program, slot_blocks, copy_units, n_rows,
    copy_col_chunks, cols_per_copy, dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    FROM_PARTS: tl.constexpr, KEEP_G_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COPY_ROWS: tl.constexpr, COPY_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Like the forward: slot-block programs write dh at the selected rows; the programs past slot_blocks copy g into
    # the unselected rows of grad_h.
    if tl.program_id(0) >= slot_blocks:
        _copy_program(g_ptr, dh_ptr, positions_ptr, slot_blocks, copy_units, n_rows, n_per_example, seq_len, d,
                      copy_col_chunks, cols_per_copy, COPY_ROWS, COPY_D, BLOCK_N)
    else:
        _backward_rows(h_ptr, g_ptr, dh_ptr, g_rows_ptr, positions_ptr, q_ptr, p_ptr, w_ptr, b_ptr, part_ptr,
                       delta_ptr, dz_ptr, t_ptr, n_slots, n_per_example, seq_len, d, r, n_splits, cols_per_program,
                       dropout_p, dropout_scale, seed, HAS_P, HAS_W, HAS_B, ACT, DROPOUT, FROM_PARTS, KEEP_G_ROWS,
                       BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION)


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _edit_backward_weights_kernel(
    h_ptr, g_ptr, positions_ptr, delta_ptr, dz_ptr, t_ptr, dq_part_ptr, dw_part_ptr, dp_part_ptr, db_part_ptr,
    n_slots, n_per_example, seq_len, d, r, slots_per_split, dropout_p, dropout_scale, seed,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SAME_PQ: tl.constexpr, DROPOUT: tl.constexpr,
    G_BY_SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: a column tile × one split of the slots; it writes [r, BLOCK_D] partial sums for its split (the
    # gradients themselves when there is one split). SAME_PQ (P is Q, LoReFT): dQ and dP land in one sum, dQ.
    # The first column tile also sums dz over its split: db. G_BY_SLOT: g is the compact [B·n, d] copy of its
    # selected rows that the rows pass kept (the rows pass wrote dh over g in place).
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    acc_q = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc_w = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc_p = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc_b = tl.zeros((BLOCK_R,), tl.float32)
    first = split * slots_per_split
    last = tl.minimum(first + slots_per_split, n_slots)
    for slot0 in range(first, last, BLOCK_M):
        slots, rows, selected = _slot_rows(positions_ptr, slot0, last, n_per_example, seq_len, BLOCK_M)
        io_mask = selected[:, None] & col_ok[None, :]
        buf = slots[:, None] * BLOCK_R + ranks[None, :]
        slot_ok = (slots < last)[:, None]
        g_at = slots if G_BY_SLOT else rows
        g = tl.load(g_ptr + g_at[:, None] * d + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        if DROPOUT:
            g = g * _keep_scale(seed, slots, cols, d, dropout_p, dropout_scale)
        delta = tl.load(delta_ptr + buf, mask=slot_ok, other=0.0)
        acc_q += tl.dot(tl.trans(delta), g, input_precision=DOT_PRECISION)
        if HAS_W or HAS_B:
            dz = tl.load(dz_ptr + buf, mask=slot_ok, other=0.0)
            if HAS_B:
                acc_b += tl.sum(dz, axis=0)
        if HAS_W or HAS_P:
            x = tl.load(h_ptr + slots[:, None] * d + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
            if HAS_W:
                acc_w += tl.dot(tl.trans(dz), x, input_precision=DOT_PRECISION)
            if HAS_P:
                t = tl.load(t_ptr + buf, mask=slot_ok, other=0.0)
                if SAME_PQ:
                    acc_q -= tl.dot(tl.trans(t), x, input_precision=DOT_PRECISION)
                else:
                    acc_p -= tl.dot(tl.trans(t), x, input_precision=DOT_PRECISION)
    rank_ok = ranks < r
    part = split * r * d + ranks[:, None] * d + cols[None, :]
    part_mask = rank_ok[:, None] & col_ok[None, :]
    tl.store(dq_part_ptr + part, acc_q, mask=part_mask)
    if HAS_W:
        tl.store(dw_part_ptr + part, acc_w, mask=part_mask)
    if HAS_P and not SAME_PQ:
        tl.store(dp_part_ptr + part, acc_p, mask=part_mask)
    if HAS_B:
        if tl.program_id(0) == 0:
            tl.store(db_part_ptr + split * r + ranks, acc_b, mask=rank_ok)


@triton.jit
def _sum_splits(part_ptr, out_ptr, offsets, mask, n_splits, numel):
    acc = tl.load(part_ptr + offsets, mask=mask, other=0.0)
    for split in range(1, n_splits):
        acc += tl.load(part_ptr + split * numel + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, acc, mask=mask)


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _sum_weight_splits_kernel(
    dq_part_ptr, dw_part_ptr, dp_part_ptr, db_part_ptr, dq_ptr, dw_ptr, dp_ptr, db_ptr, n_splits, numel, r,
    HAS_W: tl.constexpr, SEPARATE_P: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):
    # The fixed-order sum over the row splits of every weight gradient, in one launch (split 0 first, then 1, ...).
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    _sum_splits(dq_part_ptr, dq_ptr, offsets, mask, n_splits, numel)
    if HAS_W:
        _sum_splits(dw_part_ptr, dw_ptr, offsets, mask, n_splits, numel)
    if SEPARATE_P:
        _sum_splits(dp_part_ptr, dp_ptr, offsets, mask, n_splits, numel)
    if HAS_B:
        if tl.program_id(0) == 0:
            _sum_splits(db_part_ptr, db_ptr, offsets, offsets < r, n_splits, r)


# ----------------------------------------------------------------------------------------------------------------------
# Several edits in one batch (inference): each example edited by its own entry, in one launch
# ----------------------------------------------------------------------------------------------------------------------
# Entry k of the table is the int64 row table[k, :]: the addresses of its Q, P, W, b (fp32, contiguous; Q's address
# for an absent one) and of its positions [B, n_k] (int64), then n_k, its rank, its activation code and which of P,
# b, W it has (bits 1, 2, 4). The parameters are read where they lie: no per-call copy into stacked tensors.
_ENTRY_Q = tl.constexpr(0)
_ENTRY_P = tl.constexpr(1)
_ENTRY_W = tl.constexpr(2)
_ENTRY_B = tl.constexpr(3)
_ENTRY_POSITIONS = tl.constexpr(4)
_ENTRY_N = tl.constexpr(5)
_ENTRY_RANK = tl.constexpr(6)
_ENTRY_ACT = tl.constexpr(7)
_ENTRY_HAS = tl.constexpr(8)
_ENTRY_WIDTH = tl.constexpr(9)


@triton.jit
def _activation_by_code(z, act):
    """``_activation`` for a code known only at run time (each entry has its own): the same formulas, selected."""
    return tl.where(act == 1, _activation(z, 1), tl.where(act == 2, _activation(z, 2), tl.where(
        act == 3, _activation(z, 3), tl.where(act == 4, _activation(z, 4), z))))


@triton.jit
def _multi_edit_rows(
    h_ptr, out_ptr, edit_index_ptr, table_ptr, program, slot_blocks, batch, seq_len, d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (k, block): slots [block·BLOCK_M, ...) of entry k's positions (slot e = b·n_k + j), of the examples
    # whose edit_index is k. Entry k's parameters are this program's alone, so the products stay tl.dot; an absent
    # W, P or b reads Q instead and its result is replaced by zeros (z = b, u = 0: the single edit's math).
    k = program // slot_blocks
    entry = table_ptr + k * _ENTRY_WIDTH
    n = tl.load(entry + _ENTRY_N)
    positions_ptr = tl.load(entry + _ENTRY_POSITIONS).to(tl.pointer_type(tl.int64))
    slots, rows, selected = _slot_rows(positions_ptr, (program % slot_blocks) * BLOCK_M, batch * n,
                                       tl.maximum(n, 1), seq_len, BLOCK_M)
    example = slots // tl.maximum(n, 1)
    selected &= tl.load(edit_index_ptr + example, mask=selected, other=-1) == k
    if tl.max(selected.to(tl.int32), axis=0) > 0:  # a block without examples of entry k reads nothing more
        q_ptr = tl.load(entry + _ENTRY_Q).to(tl.pointer_type(tl.float32))
        p_ptr = tl.load(entry + _ENTRY_P).to(tl.pointer_type(tl.float32))
        w_ptr = tl.load(entry + _ENTRY_W).to(tl.pointer_type(tl.float32))
        b_ptr = tl.load(entry + _ENTRY_B).to(tl.pointer_type(tl.float32))
        has = tl.load(entry + _ENTRY_HAS)
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < tl.load(entry + _ENTRY_RANK)
        z, u, _ = _row_projections(h_ptr, h_ptr, q_ptr, p_ptr, w_ptr, rows, rows, selected, slots, 0, d, d, ranks,
                                   rank_ok, 0.0, 1.0, 0, True, True, False, False, BLOCK_M, BLOCK_D, BLOCK_R,
                                   DOT_PRECISION)
        source_bias = tl.where((has & 2) != 0, tl.load(b_ptr + ranks, mask=rank_ok, other=0.0), 0.0)
        z = tl.where((has & 4) != 0, z, 0.0) + source_bias[None, :]
        delta = _activation_by_code(z, tl.load(entry + _ENTRY_ACT))
        delta = tl.where((has & 1) != 0, delta - u, delta)
        delta = tl.where(rank_ok[None, :], delta, 0.0)
        _write_edited_rows(h_ptr, out_ptr, h_ptr, q_ptr, delta, rows, selected, slots, ranks, rank_ok, 0, d, d, 0.0,
                           1.0, 0, False, False, BLOCK_D, DOT_PRECISION)


@triton.jit
def _multi_copy_unselected_rows(
    src_ptr, dst_ptr, edit_index_ptr, table_ptr, unit, n_entries, n_max, n_rows, seq_len, d, copy_col_chunks,
    cols_per_copy, COPY_ROWS: tl.constexpr, COPY_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``_copy_unselected_rows`` where example b's positions are those of its own entry edit_index[b] (none for −1)."""
    rows, row_ok, example, token = _copy_unit_rows(unit, n_rows, seq_len, copy_col_chunks, COPY_ROWS)
    k = tl.load(edit_index_ptr + example, mask=row_ok, other=-1)
    edited = row_ok & (k >= 0) & (k < n_entries)
    entry = table_ptr + tl.where(edited, k, 0) * _ENTRY_WIDTH
    n = tl.load(entry + _ENTRY_N, mask=edited, other=0)
    own_positions = tl.load(entry + _ENTRY_POSITIONS, mask=edited, other=0).to(tl.pointer_type(tl.int64))
    hit = tl.zeros((COPY_ROWS,), tl.int32)
    for j0 in range(0, n_max, BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)
        pos = tl.load(own_positions[:, None] + example[:, None] * n[:, None] + js[None, :],
                      mask=edited[:, None] & (js[None, :] < n[:, None]), other=-1)
        hit = tl.maximum(hit, tl.max(tl.where(pos == token[:, None], 1, 0), axis=1))
    _copy_rows_where(src_ptr, dst_ptr, rows, row_ok & (hit == 0), unit, d, copy_col_chunks, cols_per_copy, COPY_D)


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _multi_edit_forward_kernel(
    h_ptr, out_ptr, edit_index_ptr, table_ptr, n_entries, n_max, batch, seq_len, d, slot_blocks, copy_units,
    copy_col_chunks, cols_per_copy,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COPY_ROWS: tl.constexpr, COPY_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Axis 0: n_entries · slot_blocks edit programs, then the programs that copy every other row of h into out.
    program = tl.program_id(0)
    if program < n_entries * slot_blocks:
        _multi_edit_rows(h_ptr, out_ptr, edit_index_ptr, table_ptr, program, slot_blocks, batch, seq_len, d,
                         BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION)
    elif program - n_entries * slot_blocks < copy_units:
        _multi_copy_unselected_rows(h_ptr, out_ptr, edit_index_ptr, table_ptr, program - n_entries * slot_blocks,
                                    n_entries, n_max, batch * seq_len, seq_len, d, copy_col_chunks, cols_per_copy,
                                    COPY_ROWS, COPY_D, BLOCK_N)


# ----------------------------------------------------------------------------------------------------------------------
# Launch functions (what reft_fast.ops.backend_triton calls; the cuda backend has the same two) and their plans
# ----------------------------------------------------------------------------------------------------------------------
def launch_config(d: int, r: int, h_dtype: torch.dtype, interpreted: bool = _INTERPRETED):
    """Block sizes, warps and dot precision for one shape: (BLOCK_M, BLOCK_D, BLOCK_R, num_warps, precision).

    tl.dot needs every dimension ≥ 16, so the rank is padded to BLOCK_R ≥ 16. On a GPU the tiles are chosen so that
    no kernel spills registers on sm_90 (tests/test_triton_compile.py compiles them and checks). Products are exact
    fp32 ("ieee", CUDA cores) for fp32 h; bf16/fp16 h uses TF32 tensor cores at every rank, whose 10-bit mantissa is
    still finer than the 8 (bf16) or 10 (fp16) bits the result is rounded to. (Ranks ≤ 16 used "ieee" until the H200
    kernel grid of 2026-11-30 showed it 5× slower than rank 32's TF32 with the same tiles: forward at 4 096 rows, d
    4096, bf16: 0.636 against 0.129 ms; at 65 536 rows 9.79 against 1.84 ms. Triton lowers an fp32 "ieee" dot to
    multiply-adds with layout conversions through shared memory, not the memory-bound loop the rank suggested.) The
    interpreter pays per program, so it gets big blocks.
    """
    block_r = max(16, triton.next_power_of_2(r))
    if interpreted:
        return 32, min(256, max(16, triton.next_power_of_2(d))), block_r, 4, "ieee"
    precision = "ieee" if h_dtype == torch.float32 else "tf32"
    if block_r >= 64:
        block_d = 32 if precision == "tf32" else 16
    else:
        block_d = 64
    return 16, block_d, block_r, 8, precision


def copy_config(d: int, interpreted: bool = _INTERPRETED):
    """(COPY_ROWS, COPY_D, BLOCK_N, columns per copy unit) of the programs that copy the unselected rows.

    On a GPU a unit is 32 rows × 1024 columns (64 KiB of bf16) in [32, 256] tiles: 32 elements per thread of 8 warps
    in flight, since the kernel's registers (150–190 at these tiles) leave one program per SM; a [8·512, 4096]
    hidden state gives 512 units. (A [32, 128] tile made ptxas cap the forward at 128 registers and spill, sm_90,
    triton 3.9, 2026-11-28.) The interpreter copies whole rows, 64 at a time."""
    if interpreted:
        copy_d = min(256, max(16, triton.next_power_of_2(d)))
        return 64, copy_d, 16, triton.cdiv(d, copy_d) * copy_d
    return 32, 256, 16, 1024


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


_SERIAL_SLOT_BLOCKS = 16


def _num_splits(n_slots: int, d: int, block_m: int, block_d: int, device: torch.device) -> int:
    """Row splits of the weight-gradient pass: enough programs to fill the GPU, few under the interpreter.

    Few rows (at most _SERIAL_SLOT_BLOCKS slot blocks, e.g. 112 rows) take one split: each program's loop over the
    slots stays short, and the kernel's output is the gradient itself, with no reduction launch after it."""
    slot_blocks = triton.cdiv(n_slots, block_m)
    if device.type != "cuda":
        return min(slot_blocks, 3)  # the interpreter: few programs, but still more than one split to reduce
    if slot_blocks <= _SERIAL_SLOT_BLOCKS:
        return 1
    col_tiles = triton.cdiv(d, block_d)
    return max(1, min(slot_blocks, triton.cdiv(2 * _sm_count(device), col_tiles)))


_SUM_BLOCK = 1024  # elements per program of the reduction over weight splits


class _Plan(NamedTuple):
    """Everything about a launch that depends only on the shape: grids, the kernels' shape arguments in their order,
    compile-time tiles, and the scratch buffers (projection parts, per-slot vectors, weight partials), which stay
    allocated with the plan. Built once per shape (and stream), then reused by every call."""

    edit_grid: tuple           # the write passes: slot blocks on axis 0, column programs on axis 1
    copy_grid: tuple           # the same with the programs that copy the unselected rows added on axis 0
    split_grid: Optional[tuple]  # the column-split projections (few rows), else None
    weight_grid: tuple
    sum_grid: Optional[tuple]  # the reduction over weight splits, None with one split
    shape_args: tuple          # n_slots ... cols_per_copy, as the write kernels take them
    split_args: tuple          # n_slots, n_per_example, seq_len, d, r, cols_per_split
    weight_args: tuple         # n_slots, n_per_example, seq_len, d, r, slots_per_split
    weight_splits: int
    tiles: dict                # BLOCK_M, BLOCK_D, BLOCK_R, DOT_PRECISION, num_warps
    copy_tiles: dict           # COPY_ROWS, COPY_D, BLOCK_N
    parts: torch.Tensor        # [column splits, 3, n_slots, BLOCK_R] (a placeholder on the fused path)
    per_slot: tuple            # δ, dz, t: [n_slots, BLOCK_R] each
    kept_grad: torch.Tensor    # [n_slots, d] in the hidden dtype: g's selected rows when dh overwrites g in place
    weight_parts: Optional[tuple]  # dQ, dW, dP [splits, r, d] and db [splits, r] partials; None with one split
    stream: int                # the CUDA stream the plan's launches go to (0 on the CPU)
    bindings: Optional[dict]   # REFT_FAST_TRITON_LAUNCH=bound on CUDA: the kernels bound for this plan; else None


@functools.lru_cache(maxsize=32)
def _plan(batch: int, seq_len: int, n_per_example: int, d: int, r: int, dtype: torch.dtype, device: torch.device,
          stream: int, mode: str = "jit") -> _Plan:
    # Scratch buffers are reused by calls in order on one stream, never across streams; the bound launches go to it.
    n_slots = batch * n_per_example
    block_m, block_d, block_r, num_warps, precision = launch_config(d, r, dtype)
    copy_rows, copy_d, block_n, cols_per_copy = copy_config(d)
    slot_blocks = triton.cdiv(n_slots, block_m)
    n_splits, n_col_programs = column_split(n_slots, d, block_m, block_d, device)
    cols_per_program, n_col_programs = _split_grid(d, n_col_programs, block_d)
    copy_col_chunks = triton.cdiv(d, cols_per_copy)
    copy_units = triton.cdiv(batch * seq_len, copy_rows) * copy_col_chunks
    f32 = dict(dtype=torch.float32, device=device)
    split_grid, cols_per_split, parts = None, 0, torch.empty(1, **f32)
    if n_splits:
        cols_per_split, n_splits = _split_grid(d, n_splits, block_d)
        split_grid = (slot_blocks, n_splits)
        parts = torch.empty(n_splits, 3, n_slots, block_r, **f32)
    splits = _num_splits(n_slots, d, block_m, block_d, device)
    slots_per_split = triton.cdiv(triton.cdiv(n_slots, splits), block_m) * block_m
    splits = triton.cdiv(n_slots, slots_per_split)
    weight_parts, sum_grid = None, None
    if splits > 1:
        weight_parts = (*torch.empty(3, splits, r, d, **f32).unbind(0), torch.empty(splits, r, **f32))
        sum_grid = (triton.cdiv(r * d, _SUM_BLOCK),)
    return _Plan(
        edit_grid=(slot_blocks, n_col_programs),
        copy_grid=(slot_blocks + triton.cdiv(copy_units, n_col_programs), n_col_programs), split_grid=split_grid,
        weight_grid=(triton.cdiv(d, block_d), splits), sum_grid=sum_grid,
        shape_args=(n_slots, n_per_example, seq_len, d, r, n_splits, cols_per_program, slot_blocks, copy_units,
                    batch * seq_len, copy_col_chunks, cols_per_copy),
        split_args=(n_slots, n_per_example, seq_len, d, r, cols_per_split),
        weight_args=(n_slots, n_per_example, seq_len, d, r, slots_per_split), weight_splits=splits,
        tiles=dict(BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r, DOT_PRECISION=precision, num_warps=num_warps),
        copy_tiles=dict(COPY_ROWS=copy_rows, COPY_D=copy_d, BLOCK_N=block_n),
        parts=parts, per_slot=tuple(torch.empty(3, n_slots, block_r, **f32).unbind(0)), weight_parts=weight_parts,
        kept_grad=torch.empty(n_slots, d, dtype=dtype, device=device), stream=stream,
        bindings={} if mode == "bound" and device.type == "cuda" and not _INTERPRETED else None)


# The current CUDA stream's handle as an int, the value of ``torch.cuda.current_stream(device).cuda_stream`` without
# building a Stream object (which also switches the current device twice): what torch's own compiled code reads.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_key(device: torch.device) -> int:
    """The current stream of ``device`` as a plan key: its CUDA handle, 0 on the CPU."""
    if device.type != "cuda":
        return 0
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def plan_for(like: torch.Tensor, positions: torch.Tensor, r: int) -> _Plan:
    """The cached plan for hidden states shaped like ``like`` [B, T, d], these positions' shape and rank r, on the
    current stream, in the launch mode of the moment (``launch.MODE``; called twice per edit: its cost is host time
    of every step)."""
    device = like.device
    batch, seq_len, d = like.shape
    return _plan(batch, seq_len, positions.shape[1], d, r, like.dtype, device, stream_key(device), launch.MODE)


def _launch(kernel, plan: _Plan, grid: tuple, args: tuple, constexprs: dict) -> None:
    """``kernel[grid](*args, **constexprs)``, or the same through the plan's binding of it (launch.py)."""
    launch.launch(kernel, grid, plan.bindings, plan.stream, args, constexprs)


def _projection_parts(plan: _Plan, h, g, positions, Q, P, W, flags, dropout_args, seed):
    """Split path (few rows): the column-range partial sums of z, u (and t in backward) into plan.parts."""
    if plan.split_grid is not None:
        _launch(_split_projections_kernel, plan, plan.split_grid,
                (h, h if g is None else g, positions, Q, P, W, plan.parts, *plan.split_args, *dropout_args, seed),
                dict(HAS_G=g is not None, **flags, **plan.tiles))


def edit_forward(h, positions, Q, P, W, b, act: int, dropout: float, seed: int, out, h_rows=None,
                 copy_unselected: bool = False) -> None:
    """Write the edited rows into ``out``; with ``copy_unselected`` also the unselected rows of h (out may then be
    uninitialized; otherwise it already holds them, e.g. a copy of h, or h itself for an edit in place).

    ``h_rows`` [B, n, d] (optional) receives h[b, positions[b, j]] at [b, j], what backward needs (untouched where
    positions is −1). One launch with many rows, two with few (the column-split projections first)."""
    if positions.numel() == 0 or h.numel() == 0:  # nothing to edit (no rows, or no tokens to select)
        if copy_unselected:
            out.copy_(h)
        return
    plan = plan_for(h, positions, Q.shape[0])
    P_arg, W_arg = (Q if P is None else P), (Q if W is None else W)
    flags = dict(HAS_P=P is not None, HAS_W=W is not None, DROPOUT=dropout > 0)
    dropout_args = _dropout_args(dropout)
    _projection_parts(plan, h, None, positions, Q, P_arg, W_arg, flags, dropout_args, seed)
    _launch(_edit_forward_kernel, plan, plan.copy_grid if copy_unselected else plan.edit_grid,
            (h, out, h if h_rows is None else h_rows, positions, Q, P_arg, W_arg, Q if b is None else b, plan.parts,
             *plan.shape_args, *dropout_args, seed),
            dict(flags, HAS_B=b is not None, ACT=act, FROM_PARTS=plan.split_grid is not None,
                 KEEP_ROWS=h_rows is not None, **plan.tiles, **plan.copy_tiles))


def _weight_grads(plan: _Plan, h_rows, grad_out, positions, Q, P, W, b, dropout_args, seed, same_pq: bool,
                  g_by_slot: bool):
    """The weight-gradient pass (and, with several row splits, their fixed-order sum): (dQ, dP, dW, db). With
    ``g_by_slot``, grad_out is the compact [B·n, d] copy of its selected rows."""
    r, d = Q.shape
    f32 = dict(dtype=torch.float32, device=Q.device)
    separate_p = P is not None and not same_pq
    dQ = torch.empty(r, d, **f32)
    dW = torch.empty(r, d, **f32) if W is not None else None
    dP = torch.empty(r, d, **f32) if separate_p else None
    db = torch.empty(r, **f32) if b is not None else None
    # one split: the kernel's partials are the gradients
    targets = (dQ, dW, dP, db) if plan.weight_parts is None else plan.weight_parts
    placeholder = lambda t: dQ if t is None else t  # noqa: E731  (a pointer for an absent gradient, never written)
    delta, dz, t = plan.per_slot
    _launch(_edit_backward_weights_kernel, plan, plan.weight_grid,
            (h_rows, grad_out, positions, delta, dz, t, *(placeholder(x) for x in targets), *plan.weight_args,
             *dropout_args, seed),
            dict(HAS_P=P is not None, HAS_W=W is not None, HAS_B=b is not None, SAME_PQ=same_pq,
                 DROPOUT=dropout_args[0] > 0, G_BY_SLOT=g_by_slot, **plan.tiles))
    if plan.sum_grid is not None:
        _launch(_sum_weight_splits_kernel, plan, plan.sum_grid,
                (*targets, dQ, placeholder(dW), placeholder(dP), placeholder(db), plan.weight_splits, r * d, r),
                dict(HAS_W=W is not None, SEPARATE_P=separate_p, HAS_B=b is not None, BLOCK=_SUM_BLOCK))
    return dQ, dP, dW, db


def edit_backward(h_rows, grad_out, positions, Q, P, W, b, act: int, dropout: float, seed: int, grad_h,
                  copy_unselected: bool = False):
    """Write ∂L/∂h into the selected rows of ``grad_h`` (with ``copy_unselected`` also grad_out into the others;
    otherwise grad_h already holds them, e.g. grad_h is grad_out itself for an edit in place); return (dQ, dP, dW, db).
    In place, the rows pass keeps g's selected rows in a scratch buffer before writing dh over them, and the weight
    pass reads g from there.

    h_rows [B, n, d] holds h[b, positions[b, j]] at [b, j] (anything where positions is −1): forward keeps only the
    selected rows of h for backward, not the whole hidden state. When P is Q (the same tensor: LoReFT, NoReFT,
    ConsReFT), dQ is the whole gradient of that tensor (δᵀg_o − tᵀh summed in the kernel) and dP is None.
    Three launches with one row split (split projections with few rows, rows, weights), plus one fixed-order sum with
    several."""
    r, d = Q.shape
    same_pq = P is Q
    if positions.numel() == 0 or grad_out.numel() == 0:  # (empty tensors share data_ptr 0: no in-place test)
        if copy_unselected:
            grad_h.copy_(grad_out)
        zeros = lambda: torch.zeros(r, d, dtype=torch.float32, device=Q.device)  # noqa: E731
        return (zeros(), None if P is None or same_pq else zeros(), None if W is None else zeros(),
                None if b is None else torch.zeros(r, dtype=torch.float32, device=Q.device))
    plan = plan_for(grad_out, positions, r)
    P_arg, W_arg = (Q if P is None else P), (Q if W is None else W)
    flags = dict(HAS_P=P is not None, HAS_W=W is not None, DROPOUT=dropout > 0)
    dropout_args = _dropout_args(dropout)
    _projection_parts(plan, h_rows, grad_out, positions, Q, P_arg, W_arg, flags, dropout_args, seed)
    in_place = grad_h.data_ptr() == grad_out.data_ptr()
    if in_place and copy_unselected:
        raise ValueError("copy_unselected with grad_h being grad_out: the unselected rows already hold grad_out")
    _launch(_edit_backward_rows_kernel, plan, plan.copy_grid if copy_unselected else plan.edit_grid,
            (h_rows, grad_out, grad_h, plan.kept_grad, positions, Q, P_arg, W_arg, Q if b is None else b, plan.parts,
             *plan.per_slot, *plan.shape_args, *dropout_args, seed),
            dict(flags, HAS_B=b is not None, ACT=act, FROM_PARTS=plan.split_grid is not None, KEEP_G_ROWS=in_place,
                 **plan.tiles, **plan.copy_tiles))
    return _weight_grads(plan, h_rows, plan.kept_grad if in_place else grad_out, positions, Q, P, W, b, dropout_args,
                         seed, same_pq, g_by_slot=in_place)


def multi_edit_forward(h, edit_index, entries, out) -> None:
    """Write into ``out`` (uninitialized is fine) h with each example b edited by entry ``edit_index[b]`` (−1: a
    copy of h): every row of out, in one launch. h is not modified.

    ``entries``: (Q, P, W, b, act, positions) per entry, the single edit's arguments (fp32; P, W, b may be None;
    ranks, activations and members of the family may differ) and that entry's [B, n_k] positions (−1 = none).
    ``edit_index`` [B] int64 on h's device. The launch reads the entries through a table of their addresses (one
    small host→device copy on a GPU); no parameter is copied or stacked."""
    if h.numel() == 0:
        return
    batch, seq_len, d = h.shape
    held, table = [], []  # ``held``: contiguous copies the table points into, alive until the launch is queued
    for Q, P, W, b, act, positions in entries:
        if any(t is not None and t.dtype != torch.float32 for t in (Q, P, W, b)):
            raise TypeError("the entries' Q, P, W, b must be float32 (the table's addresses are read as fp32)")
        tensors = [None if t is None else t.contiguous() for t in (Q, P, W, b)] + [positions.long().contiguous()]
        held.append(tensors)
        Q, P, W, b, positions = tensors
        has = int(P is not None) | int(b is not None) << 1 | int(W is not None) << 2
        table.append([*(Q.data_ptr() if t is None else t.data_ptr() for t in (Q, P, W, b)), positions.data_ptr(),
                      positions.shape[1], Q.shape[0], act, has])
    table = torch.tensor(table, dtype=torch.int64).to(h.device, non_blocking=True)
    r_max, n_max = max(Q.shape[0] for Q, *_ in entries), max(e[-1].shape[1] for e in entries)
    block_m, block_d, block_r, num_warps, precision = launch_config(d, r_max, h.dtype)
    copy_rows, copy_d, block_n, cols_per_copy = copy_config(d)
    slot_blocks = triton.cdiv(batch * n_max, block_m)
    copy_col_chunks = triton.cdiv(d, cols_per_copy)
    copy_units = triton.cdiv(batch * seq_len, copy_rows) * copy_col_chunks
    _multi_edit_forward_kernel[(len(entries) * slot_blocks + copy_units,)](
        h, out, edit_index, table, len(entries), n_max, batch, seq_len, d, slot_blocks, copy_units, copy_col_chunks,
        cols_per_copy, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r, DOT_PRECISION=precision,
        COPY_ROWS=copy_rows, COPY_D=copy_d, BLOCK_N=block_n, num_warps=num_warps,
    )
