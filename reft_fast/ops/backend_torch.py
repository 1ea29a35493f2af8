"""Backend ``torch``: the edit in plain PyTorch ops, the default off CUDA and the readable statement of the math.

Forward gathers the rows of all B·n slots from h padded with a zero row (a −1 slot reads the zero row), edits them
in fp32 and writes them into that padded copy (a −1 slot into the zero row, which the output drops): no shape depends
on how many slots are selected, so neither direction synchronizes with the device. Backward is written out
(the op is a torch.library custom op, whose implementation runs below autograd, so it cannot differentiate through
its own forward); for a selected row x with g_o = keep ⊙ g / (1 − p):

    t  = g_o Qᵀ,   dQ = Σ δᵀ g_o
    dz = t ⊙ act'(z),   dW = Σ dzᵀ x,   db = Σ dz
    dP = −Σ tᵀ x,   dx = g_o + dz W − t P          (the P terms only when P is given)

Which backward an eager edit runs depends on h's size (``differentiates_forward``). On a small h, autograd through
the forward's ops costs the host least, but its formulas copy the whole hidden state and its gradient several times
(the padded copy; ``index_copy_``'s backward ``grad.index_fill``; ``index_select``'s backward ``zeros.index_add``).
From ``AUTOGRAD_BELOW_NUMEL`` elements on, those copies cost more than the written-out backward's extra host ops, so
the op runs ``backward``, and where the caller owns h (the model's hooks) the edit and its gradient are written in
place (``forward_in_place``, ``backward_in_place``): no [B, T, d] tensor per edit at all. In place, the slots read
the rows ``b·T + max(p, 0)`` of h; a −1 slot cannot be left out of the write without a shape that depends on the data,
so it writes what the slot of its example's largest position writes (``_write_rows``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from reft_fast.ops.backend import EditGrads, EditParams, MultiEdit, register_backend

__all__ = ["AUTOGRAD_BELOW_NUMEL", "TorchBackend", "dropout_keep_mask", "reference_edit"]

# h.numel() from which eager edits run the written-out backward (in place where owned) instead of autograd through
# the forward. One LoReFT r8 edit of 112 rows, forward + backward, paired medians, one thread, torch 2.13, 2026-11-28
# (bench/bench_edit_paths.py; autograd / written-out with copies / in place): B·T·d 16k: 0.29 / 0.41 / 0.44 ms;
# 131k: 0.58 / 0.61 / 0.61 ms; 262k: 1.49 / 1.04 / 0.83 ms; 524k: 2.6 / 2.0 / 1.8 ms; 2M: 10.4 / 4.5 / 3.1 ms.
AUTOGRAD_BELOW_NUMEL = 1 << 18

# Activation code (reft_fast.ops.ACTIVATIONS) -> the function and its derivative as a function of z.
_ACT_FUNCTIONS = {0: lambda z: z, 1: F.relu, 2: F.gelu, 3: F.silu, 4: torch.tanh}


def _act_grad(act: int, z: torch.Tensor) -> torch.Tensor:
    if act == 0:
        return torch.ones_like(z)
    if act == 1:
        return (z > 0).to(z.dtype)  # 0 at z = 0, as torch's relu backward
    if act == 2:  # exact (erf) gelu: Φ(z) + z φ(z)
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if act == 3:
        sigmoid = torch.sigmoid(z)
        return sigmoid * (1.0 + z * (1.0 - sigmoid))
    return 1.0 - torch.tanh(z) ** 2


def dropout_keep_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """The torch backend's keep-mask over [B, P, d]: element (b, j, c) depends only on seed and its index."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def _slot_index(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B·n]: the row of the padded [B·T + 1, d] rows (``_padded``) each slot reads and writes: b·T + p, or the extra
    zero row B·T for a −1 slot. Shapes follow positions' shape alone, so nothing waits for the device to count the
    selected slots, and a −1 slot reads zeros and writes into a row the output drops."""
    batch = positions.shape[0]
    offsets = torch.arange(batch, device=positions.device).unsqueeze(1) * seq_len  # (arange's step may not be 0)
    return torch.where(positions >= 0, positions + offsets, batch * seq_len).reshape(-1)


def _in_sequence(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """positions with those past the sequence made −1 (no position): what the triton and cuda kernels select for them.
    Unchecked positions (``validate=False``: already on the GPU, not read back) may hold such values; as flat rows
    b·T + p they named a token of the next example (edited silently) or a row past h (an index error)."""
    return positions.masked_fill(positions >= seq_len, -1)


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t [B, T, d] as [B·T + 1, d] rows, a zero row last: a new tensor, which the edit then writes into."""
    return F.pad(t.reshape(-1, t.shape[-1]), (0, 0, 0, 1))


def _dropout_scale(positions, edit: EditParams, d: int) -> Optional[torch.Tensor]:
    """keep / (1 − p) for the [B·n, d] slot rows, or None without dropout."""
    if edit.dropout <= 0:
        return None
    keep = dropout_keep_mask((*positions.shape, d), edit.dropout, edit.seed, positions.device)
    return keep.reshape(-1, d) / (1.0 - edit.dropout)


def _source(x: torch.Tensor, edit: EditParams) -> torch.Tensor:
    return edit.b.expand(x.shape[0], -1) if edit.W is None else F.linear(x, edit.W, edit.b)


def _edited(x: torch.Tensor, positions: torch.Tensor, edit: EditParams) -> torch.Tensor:
    """The edited slot rows [B·n, d] in fp32 from the selected rows x [B·n, d] in fp32 (zeros at −1 slots)."""
    delta = _ACT_FUNCTIONS[edit.act](_source(x, edit))
    if edit.P is not None:
        delta = torch.addmm(delta, x, edit.P.t(), alpha=-1)
    o = torch.addmm(x, delta, edit.Q)
    scale = _dropout_scale(positions, edit, x.shape[1])
    return o if scale is None else o * scale


def _edit_with_rows(h: torch.Tensor, positions: torch.Tensor, edit: EditParams):
    """(the edited copy of h, the selected rows of h [B, n, d]), in ordinary differentiable ops."""
    seq_len, d = h.shape[1:]
    index = _slot_index(positions, seq_len)
    padded = _padded(h)
    rows = padded.index_select(0, index)
    o = _edited(rows.to(edit.Q.dtype), positions, edit)  # fp32 math (the parameters are fp32)
    out = padded.index_copy_(0, index, o.to(h.dtype))[:-1].view(h.shape)
    return out, rows.view(*positions.shape, d)


def _row_index(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B·n]: the row of t.view(B·T, d) each slot reads in place: b·T + p, a −1 slot its example's row 0."""
    offsets = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1) * seq_len
    return (positions.clamp(min=0) + offsets).reshape(-1)


def _write_rows(flat: torch.Tensor, index: torch.Tensor, positions: torch.Tensor, values: torch.Tensor,
                read: torch.Tensor) -> None:
    """Write ``values`` [B·n, d] into the rows ``index`` of ``flat`` [B·T, d] at the selected slots, where ``read``
    holds what the slots read of flat (a −1 slot: its example's row 0).

    A −1 slot cannot be left out without a shape that depends on the data, and writing its own row 0 back would race
    with a slot that edits row 0: so it writes what the slot of its example's largest position writes (the same
    row, the same value), or, in an example without positions, the row 0 it read. Rows written twice then get one
    value whatever the order of the writes."""
    batch, n = positions.shape
    selected = positions >= 0
    stand_in = positions.argmax(dim=1, keepdim=True)  # the slot of the largest position (any slot when none)
    source = torch.where(selected, torch.arange(n, device=positions.device), stand_in)  # [B, n]
    values = torch.where(selected.view(-1, 1), values, read).view(batch, n, -1)
    values = values.gather(1, source.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    flat.index_copy_(0, index.view(batch, n).gather(1, source).view(-1), values.view(-1, flat.shape[1]))


def _edit_in_place(h: torch.Tensor, positions: torch.Tensor, edit: EditParams) -> torch.Tensor:
    """Edit h's selected rows in place; the rows it read [B, n, d]. positions are already within the sequence
    (``_in_sequence``)."""
    flat = h.view(-1, h.shape[-1])
    index = _row_index(positions, h.shape[1])
    rows = flat.index_select(0, index)
    x = torch.where((positions >= 0).view(-1, 1), rows.to(edit.Q.dtype), 0.0)  # zeros at −1 slots, as forward
    _write_rows(flat, index, positions, _edited(x, positions, edit).to(h.dtype), rows)
    return rows.view(*positions.shape, h.shape[-1])


def reference_edit(h: torch.Tensor, positions: torch.Tensor, edit: EditParams) -> torch.Tensor:
    """The edited copy of h in ordinary (differentiable) torch ops: what the torch backend's forward computes."""
    return _edit_with_rows(h, positions, edit)[0]


class TorchBackend:
    name = "torch"

    def differentiates_forward(self, h: torch.Tensor) -> bool:
        return h.numel() < AUTOGRAD_BELOW_NUMEL  # (the module docstring)

    def prefers(self, device: torch.device) -> bool:
        return device.type != "cuda"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None  # ordinary torch ops run wherever torch does

    def forward(self, h, positions, edit: EditParams):
        positions = _in_sequence(positions, h.shape[1])
        if self.differentiates_forward(h):
            return _edit_with_rows(h, positions, edit)
        # A new tensor, not a view of a padded one: the model's hooks write a site's further edits into it.
        out = h.clone()
        return out, _edit_in_place(out, positions, edit)

    def forward_in_place(self, h, positions, edit: EditParams) -> torch.Tensor:
        return _edit_in_place(h, _in_sequence(positions, h.shape[1]), edit)

    def forward_multi(self, h, multi: MultiEdit) -> torch.Tensor:
        """Each entry's edit at its own examples' rows, into one copy of h.

        Entry k is computed as the single edit computes it, over all B·n_k slots of its own positions tensor (the
        other examples' slots read the zero row): a matrix product's row depends on how many rows it has, not on the
        other rows' values, so each example's result is bitwise the one of that entry alone on the same batch. The
        cost is one edit's worth of rows per entry; the Triton kernel instead reads each example's own parameters
        in one pass."""
        seq_len = h.shape[1]
        padded = _padded(h)
        for k, (edit, positions) in enumerate(zip(multi.entries, multi.positions)):
            own = torch.where((multi.edit_index == k).unsqueeze(1) & (positions < seq_len), positions, -1)
            index = _slot_index(own, seq_len)
            rows = padded.index_select(0, index).to(edit.Q.dtype)
            padded.index_copy_(0, index, _edited(rows, own, edit).to(h.dtype))
        return padded[:-1].view(h.shape)

    def backward(self, h_rows, grad_out, positions, edit: EditParams) -> EditGrads:
        positions = _in_sequence(positions, grad_out.shape[1])
        index = _slot_index(positions, grad_out.shape[1])
        grad_padded = _padded(grad_out)
        dx, grads = _row_grads(h_rows, grad_padded.index_select(0, index), positions, edit)
        grad_h = grad_padded.index_copy_(0, index, dx.to(grad_out.dtype))[:-1].view(grad_out.shape)
        return EditGrads(grad_h, *grads)

    def backward_in_place(self, h_rows, grad_out, positions, edit: EditParams) -> EditGrads:
        positions = _in_sequence(positions, grad_out.shape[1])
        flat = grad_out.view(-1, grad_out.shape[-1])
        index = _row_index(positions, grad_out.shape[1])
        grad_rows = flat.index_select(0, index)
        dx, grads = _row_grads(h_rows, grad_rows, positions, edit)
        _write_rows(flat, index, positions, dx.to(grad_out.dtype), grad_rows)
        return EditGrads(grad_out, *grads)


def _row_grads(h_rows, grad_rows, positions, edit: EditParams):
    """(dx [B·n, d] fp32, (dQ, dP, dW, db)) from the slots' rows of h and of grad_out (any values at −1 slots)."""
    d = grad_rows.shape[-1]
    selected = (positions >= 0).reshape(-1, 1)
    g = torch.where(selected, grad_rows.to(edit.Q.dtype), 0.0)
    x = torch.where(selected, h_rows.reshape(-1, d).to(edit.Q.dtype), 0.0)
    scale = _dropout_scale(positions, edit, d)
    if scale is not None:
        g = g * scale
    z = _source(x, edit)
    delta = _ACT_FUNCTIONS[edit.act](z)
    if edit.P is not None:
        delta = torch.addmm(delta, x, edit.P.t(), alpha=-1)
    t = g @ edit.Q.t()
    dz = t * _act_grad(edit.act, z)
    dx = g if edit.W is None else torch.addmm(g, dz, edit.W)
    if edit.P is not None:
        dx = torch.addmm(dx, t, edit.P, alpha=-1)
    dQ, dP = delta.t() @ g, None
    if edit.P is edit.Q:  # one tensor: its whole gradient in dQ (see EditGrads)
        dQ = torch.addmm(dQ, t.t(), x, alpha=-1)
    elif edit.P is not None:
        dP = -(t.t() @ x)
    return dx, (dQ, dP, None if edit.W is None else dz.t() @ x, None if edit.b is None else dz.sum(0))


register_backend(TorchBackend())
