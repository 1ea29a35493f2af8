"""Backend ``torch``: the edit in plain PyTorch ops, the default off CUDA and the readable statement of the math.

Forward gathers the rows of all B·n slots from h padded with a zero row (a −1 slot reads the zero row), edits them
in fp32 and writes them into that padded copy (a −1 slot into the zero row, which the output drops): no shape depends
on how many slots are selected, so neither direction synchronizes with the device. Backward is written out
(the op is a torch.library custom op, whose implementation runs below autograd, so it cannot differentiate through
its own forward); for a selected row x with g_o = keep ⊙ g / (1 − p):

    t  = g_o Qᵀ,   dQ = Σ δᵀ g_o
    dz = t ⊙ act'(z),   dW = Σ dzᵀ x,   db = Σ dz
    dP = −Σ tᵀ x,   dx = g_o + dz W − t P          (the P terms only when P is given)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from reft_fast.ops.backend import EditGrads, EditParams, register_backend

__all__ = ["TorchBackend", "dropout_keep_mask", "reference_edit"]

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
    offsets = torch.arange(0, batch * seq_len, seq_len, device=positions.device).unsqueeze(1)
    return torch.where(positions >= 0, positions + offsets, batch * seq_len).reshape(-1)


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


def _edit_with_rows(h: torch.Tensor, positions: torch.Tensor, edit: EditParams):
    """(the edited copy of h, the selected rows of h [B, n, d]), in ordinary differentiable ops."""
    batch, seq_len, d = h.shape
    index = _slot_index(positions, seq_len)
    padded = _padded(h)
    rows = padded.index_select(0, index)
    x = rows.to(edit.Q.dtype)  # fp32 math (the parameters are fp32)
    delta = _ACT_FUNCTIONS[edit.act](_source(x, edit))
    if edit.P is not None:
        delta = torch.addmm(delta, x, edit.P.t(), alpha=-1)
    o = torch.addmm(x, delta, edit.Q)
    scale = _dropout_scale(positions, edit, d)
    if scale is not None:
        o = o * scale
    out = padded.index_copy_(0, index, o.to(h.dtype))[:-1].view(h.shape)
    return out, rows.view(batch, -1, d)


def reference_edit(h: torch.Tensor, positions: torch.Tensor, edit: EditParams) -> torch.Tensor:
    """The edited copy of h in ordinary (differentiable) torch ops: what the torch backend's forward computes."""
    return _edit_with_rows(h, positions, edit)[0]


class TorchBackend:
    name = "torch"
    forward_is_differentiable = True  # eager calls differentiate forward's ops; backward serves the custom op

    def prefers(self, device: torch.device) -> bool:
        return device.type != "cuda"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None  # ordinary torch ops run wherever torch does

    def forward(self, h, positions, edit: EditParams):
        return _edit_with_rows(h, positions, edit)

    def backward(self, h_rows, grad_out, positions, edit: EditParams) -> EditGrads:
        d = grad_out.shape[-1]
        index = _slot_index(positions, grad_out.shape[1])
        grad_padded = _padded(grad_out)
        g = grad_padded.index_select(0, index).to(edit.Q.dtype)  # zero rows for −1 slots
        x = torch.where((positions >= 0).reshape(-1, 1), h_rows.reshape(-1, d).to(edit.Q.dtype), 0.0)
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
        dQ, dP = delta.t() @ g, None if edit.P is None else -(t.t() @ x)
        if edit.P is edit.Q:  # one tensor: its whole gradient in dQ (see EditGrads)
            dQ, dP = torch.addmm(dQ, t.t(), x, alpha=-1), None
        grad_h = grad_padded.index_copy_(0, index, dx.to(grad_out.dtype))[:-1].view(grad_out.shape)
        return EditGrads(h=grad_h, Q=dQ, P=dP, W=None if edit.W is None else dz.t() @ x,
                         b=None if edit.b is None else dz.sum(0))


register_backend(TorchBackend())
