"""Backend ``torch``: the edit in plain PyTorch ops, the default off CUDA and the readable statement of the math.

Forward gathers the selected rows, edits them in fp32 and writes them into the copy of h. Backward is written out
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


def _slots(positions: torch.Tensor):
    """(example index, slot index, token index) of every selected position."""
    batch_idx, slot_idx = (positions >= 0).nonzero(as_tuple=True)
    return batch_idx, slot_idx, positions[batch_idx, slot_idx]


def _dropout_scale(positions, edit: EditParams, d: int, batch_idx, slot_idx, device) -> Optional[torch.Tensor]:
    """keep / (1 − p) at the selected slots, or None without dropout."""
    if edit.dropout <= 0:
        return None
    keep = dropout_keep_mask((*positions.shape, d), edit.dropout, edit.seed, device)[batch_idx, slot_idx]
    return keep / (1.0 - edit.dropout)


def _source(x: torch.Tensor, edit: EditParams) -> torch.Tensor:
    return edit.b.expand(x.shape[0], -1) if edit.W is None else F.linear(x, edit.W, edit.b)


def _edited_rows(h: torch.Tensor, positions: torch.Tensor, edit: EditParams):
    """(index of the selected rows of h, their edited values in h's dtype), in ordinary differentiable ops."""
    batch_idx, slot_idx, token_idx = _slots(positions)
    x = h[batch_idx, token_idx].to(edit.Q.dtype)  # fp32 math (the parameters are fp32)
    delta = _ACT_FUNCTIONS[edit.act](_source(x, edit))
    if edit.P is not None:
        delta = delta - x @ edit.P.t()
    o = x + delta @ edit.Q
    scale = _dropout_scale(positions, edit, h.shape[-1], batch_idx, slot_idx, h.device)
    if scale is not None:
        o = o * scale
    return (batch_idx, token_idx), o.to(h.dtype)


def reference_edit(h: torch.Tensor, positions: torch.Tensor, edit: EditParams) -> torch.Tensor:
    """The edited copy of h in ordinary (differentiable) torch ops: what the torch backend's forward computes."""
    index, rows = _edited_rows(h, positions, edit)
    return h.index_put(index, rows)


class TorchBackend:
    name = "torch"
    forward_is_differentiable = True  # eager calls differentiate forward's ops; backward serves the custom op

    def prefers(self, device: torch.device) -> bool:
        return device.type != "cuda"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None  # ordinary torch ops run wherever torch does

    def forward(self, h, positions, edit: EditParams) -> torch.Tensor:
        return reference_edit(h, positions, edit)

    def backward(self, h_rows, grad_out, positions, edit: EditParams) -> EditGrads:
        batch_idx, slot_idx, token_idx = _slots(positions)
        x = h_rows[batch_idx, slot_idx].to(edit.Q.dtype)
        g = grad_out[batch_idx, token_idx].to(edit.Q.dtype)
        scale = _dropout_scale(positions, edit, grad_out.shape[-1], batch_idx, slot_idx, grad_out.device)
        if scale is not None:
            g = g * scale
        z = _source(x, edit)
        delta = _ACT_FUNCTIONS[edit.act](z)
        if edit.P is not None:
            delta = delta - x @ edit.P.t()
        t = g @ edit.Q.t()
        dz = t * _act_grad(edit.act, z)
        dx = g + (dz @ edit.W if edit.W is not None else 0) - (t @ edit.P if edit.P is not None else 0)
        grad_h = grad_out.index_put((batch_idx, token_idx), dx.to(grad_out.dtype))
        return EditGrads(h=grad_h, Q=delta.t() @ g, P=None if edit.P is None else -(t.t() @ x),
                         W=None if edit.W is None else dz.t() @ x, b=None if edit.b is None else dz.sum(0))


register_backend(TorchBackend())
