"""The ReFT edit as differentiable functions, with a choice of backend.

One parameterized low-rank edit covers the whole LoReFT family. For a selected row h (d values, fp32 math):

    u = h Pᵀ              projection to subtract (only when P is given)
    z = h Wᵀ + b          learned source (z = b when W is None)
    δ = act(z) − s·u      s = 1 when P is given, else 0
    o = h + δ Q
    out = dropout(o)      pyreft drops out the whole edited vector, not only δQ

Rows are selected by ``positions`` [B, P] (−1 = no position); every other row of the output is bit-identical to h,
and h itself is never modified.

Backends share one contract (see ``kernels/low_rank_edit.py`` for the launch functions):
  ``triton``  fused kernels, default on CUDA; on CPU only under ``TRITON_INTERPRET=1`` (tests).
  ``torch``   the plain PyTorch reference (autograd through ordinary ops); default on CPU.
  ``cuda``    the CUDA C++ twin in csrc/ (built on first use).
Pick one with ``backend=`` or the environment variable ``REFT_FAST_BACKEND``.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "low_rank_edit",
    "loreft",
    "noreft",
    "direft",
    "nodireft",
    "consreft",
    "lobireft",
    "resolve_backend",
    "selected_rows",
    "validate_positions",
]

# pyreft's ACT2FN names (None means identity in pyreft) -> the code the kernels use.
ACTIVATIONS = {"linear": 0, "identity": 0, None: 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4}
BACKENDS = ("triton", "torch", "cuda")
_H_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------------------
# Input checks: every failure names the argument and what was expected.
# --------------------------------------------------------------------------------------------------------------------
def _activation_code(act) -> int:
    if act not in ACTIVATIONS:
        names = sorted(k for k in ACTIVATIONS if k is not None)
        raise ValueError(f"unknown activation {act!r}; expected one of {names} or None")
    return ACTIVATIONS[act]


def _check_param(name: str, t, shape: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (intervention parameters are kept in fp32), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but h is on {device}")


def validate_positions(positions: torch.Tensor, seq_len: int) -> None:
    """Check position values: −1 ≤ p < seq_len and no repeated position within one row (−1 may repeat).

    Reads the values, so on a GPU it synchronizes with the host: callers that check positions once per batch on the CPU
    (the model layer does) pass ``validate=False`` to the ops.
    """
    if positions.numel() == 0:
        return
    lo, hi = int(positions.min()), int(positions.max())
    if lo < -1:
        raise ValueError(f"positions must be ≥ −1 (−1 means no position), found {lo}")
    if hi >= seq_len:
        raise ValueError(f"positions must be < the sequence length {seq_len}, found {hi}")
    ordered, _ = positions.sort(dim=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        row = int(repeated.any(dim=1).nonzero()[0])
        raise ValueError(f"positions row {row} selects the same token more than once: {positions[row].tolist()}")


def _check_inputs(h, positions, Q, P, W, b, dropout) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() != 3:
        raise ValueError(f"h must be 3-D [batch, seq, hidden], got shape {list(h.shape)}")
    if h.dtype not in _H_DTYPES:
        raise TypeError(f"h must be float32, bfloat16 or float16, got {h.dtype}")
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer torch.Tensor, got {type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"positions must have an integer dtype, got {positions.dtype}")
    if positions.dim() != 2:
        raise ValueError(f"positions must be 2-D [batch, n_positions], got shape {list(positions.shape)}")
    if positions.shape[0] != h.shape[0]:
        raise ValueError(f"positions has batch {positions.shape[0]} but h has batch {h.shape[0]}")
    if positions.device != h.device:
        raise ValueError(f"positions is on {positions.device} but h is on {h.device}")
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"Q must be a torch.Tensor, got {type(Q).__name__}")
    if Q.dim() != 2:
        raise ValueError(f"Q must be 2-D [rank, hidden], got shape {list(Q.shape)}")
    r, d = Q.shape
    if d != h.shape[-1]:
        raise ValueError(f"Q has hidden size {d} but h has hidden size {h.shape[-1]}")
    if not 1 <= r <= d:
        raise ValueError(f"rank must be between 1 and the hidden size {d}, got {r}")
    _check_param("Q", Q, (r, d), h.device)
    if P is not None:
        _check_param("P", P, (r, d), h.device)
    if W is not None:
        _check_param("W", W, (r, d), h.device)
    if b is not None:
        _check_param("b", b, (r,), h.device)
    if W is None and b is None:
        raise ValueError("the learned source needs W, b or both (z = h Wᵀ + b, or z = b when W is None)")
    if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


# --------------------------------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------------------------------
def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Explicit argument, else REFT_FAST_BACKEND, else triton on CUDA and torch elsewhere."""
    name = backend if backend not in (None, "auto") else os.environ.get("REFT_FAST_BACKEND") or None
    if name in (None, "auto"):
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)} (or None/'auto')")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend 'triton' needs CUDA tensors (h is on {device}); on the CPU it runs only through Triton's "
            "interpreter: set TRITON_INTERPRET=1 before importing reft_fast"
        )
    if name == "cuda":
        from reft_fast.cuda_backend import SIM_ENV, simulation

        if simulation() is not None and device.type != "cpu":
            raise ValueError(f"backend 'cuda' under {SIM_ENV} (the CPU simulation) needs CPU tensors, h is on {device}")
        if simulation() is None and device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors, but h is on {device} (or set {SIM_ENV}=1 to run its "
                             "kernels on the CPU through csrc/sim)")
    return name


def _kernel_module(name: str):
    """The launch functions of a fused backend: ``edit_forward`` and ``edit_backward`` with one contract."""
    module = {"triton": "reft_fast.kernels.low_rank_edit", "cuda": "reft_fast.cuda_backend"}[name]
    return importlib.import_module(module)


# --------------------------------------------------------------------------------------------------------------------
# The plain PyTorch reference (autograd through ordinary ops)
# --------------------------------------------------------------------------------------------------------------------
_ACT_FUNCTIONS = {0: lambda z: z, 1: F.relu, 2: F.gelu, 3: F.silu, 4: torch.tanh}


def dropout_keep_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """The torch backend's keep-mask over [B, P, d]: element (b, j, c) depends only on seed and its index."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def _edit_torch(h, positions, Q, P, W, b, act: int, dropout: float, seed: int):
    batch_idx, slot_idx = (positions >= 0).nonzero(as_tuple=True)
    token_idx = positions[batch_idx, slot_idx]
    x = h[batch_idx, token_idx].to(Q.dtype)  # fp32 math (the parameters are fp32)
    z = b.expand(x.shape[0], -1) if W is None else F.linear(x, W, b)
    delta = _ACT_FUNCTIONS[act](z)
    if P is not None:
        delta = delta - x @ P.t()
    o = x + delta @ Q
    if dropout > 0:
        keep = dropout_keep_mask((*positions.shape, h.shape[-1]), dropout, seed, h.device)[batch_idx, slot_idx]
        o = o * keep / (1.0 - dropout)
    return h.index_put((batch_idx, token_idx), o.to(h.dtype))


# --------------------------------------------------------------------------------------------------------------------
# The fused path: one autograd.Function for every fused backend
# --------------------------------------------------------------------------------------------------------------------
def selected_rows(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, n, d] with h[b, positions[b, j]] at [b, j] (row 0 where positions is −1): what a fused backward reads of h."""
    batch_index = torch.arange(h.shape[0], device=h.device).unsqueeze(1)
    return h[batch_index, positions.clamp(min=0)]


class _FusedEdit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, positions, Q, P, W, b, backend, act, dropout, seed):
        kernels = _kernel_module(backend)
        h_c = h.contiguous()
        positions_c = positions.contiguous()
        out = h_c.clone()  # the one copy: unselected rows are this copy of h, selected rows are overwritten
        kernels.edit_forward(h_c, positions_c, Q, P, W, b, act, dropout, seed, out)
        # Backward needs h only at the selected rows: keep those, not the whole hidden state.
        ctx.save_for_backward(selected_rows(h_c, positions_c), positions_c, Q, P, W, b)
        ctx.config = (backend, act, dropout, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h_rows, positions, Q, P, W, b = ctx.saved_tensors
        backend, act, dropout, seed = ctx.config
        kernels = _kernel_module(backend)
        grad_out = grad_out.contiguous()
        grad_h = grad_out.clone()  # unselected rows pass the gradient straight through
        dQ, dP, dW, db = kernels.edit_backward(h_rows, grad_out, positions, Q, P, W, b, act, dropout, seed, grad_h)
        needs = ctx.needs_input_grad
        return (grad_h if needs[0] else None, None, dQ if needs[2] else None, dP if needs[3] else None,
                dW if needs[4] else None, db if needs[5] else None, None, None, None, None)


def _draw_seed() -> int:
    # From torch's CPU generator: reproducible under torch.manual_seed, and no device synchronization.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def low_rank_edit(
    h: torch.Tensor,
    positions: torch.Tensor,
    Q: torch.Tensor,
    *,
    W: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    P: Optional[torch.Tensor] = None,
    act=None,
    dropout: float = 0.0,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Apply ``out = dropout(h + (act(h Wᵀ + b) − s·h Pᵀ) Q)`` at the selected rows of h; every other row is h.

    Args:
        h: [B, T, d] hidden states, float32/bfloat16/float16 (math is fp32; the output has h's dtype).
        positions: [B, n] integer token indices per example; −1 means "no position".
        Q: [r, d] float32, the rows the edit is written along (R for LoReFT).
        W, b: [r, d] and [r] float32, the learned source; W=None gives z = b.
        P: [r, d] float32 projection to subtract (s = 1); None for the additive members (s = 0).
        act: pyreft activation name: None/'linear'/'identity', 'relu', 'gelu', 'silu', 'tanh'.
        dropout: probability applied to the whole edited vector; its mask is a function of ``seed`` (drawn from torch's
            CPU generator when None) and is regenerated, not stored, by the fused backends.
        backend: 'triton', 'torch', 'cuda', or None/'auto' (REFT_FAST_BACKEND, else triton on CUDA, torch on CPU).
        validate: check position values (reads them: a host sync on GPU). Shapes and dtypes are always checked.
    """
    _check_inputs(h, positions, Q, P, W, b, dropout)
    act_code = _activation_code(act)
    if W is None and act_code != 0:
        raise ValueError("an activation applies to h Wᵀ + b; with W=None (z = b) use act=None")
    if validate:
        validate_positions(positions, h.shape[1])
    dropout = float(dropout)
    if dropout > 0 and seed is None:
        seed = _draw_seed()
    seed = int(seed or 0)
    name = resolve_backend(backend, h.device)
    if name == "torch":
        return _edit_torch(h, positions, Q, P, W, b, act_code, dropout, seed)
    return _FusedEdit.apply(h, positions, Q, P, W, b, name, act_code, dropout, seed)


def loreft(h, positions, R, W, b, *, act=None, dropout=0.0, seed=None, backend=None, validate=True):
    """LoReFT: h + Rᵀ(act(W h + b) − R h), R [r, d] with orthonormal rows."""
    return low_rank_edit(h, positions, R, W=W, b=b, P=R, act=act, dropout=dropout, seed=seed, backend=backend,
                         validate=validate)


def noreft(h, positions, W1, b, W2, *, act=None, dropout=0.0, seed=None, backend=None, validate=True):
    """NoReFT: h + W2ᵀ(act(W1 h + b) − W2 h), no orthogonality constraint."""
    return low_rank_edit(h, positions, W2, W=W1, b=b, P=W2, act=act, dropout=dropout, seed=seed, backend=backend,
                         validate=validate)


def direft(h, positions, R, W, b, *, act=None, dropout=0.0, seed=None, backend=None, validate=True):
    """DiReFT (pyreft): h + Rᵀ act(W h + b), R with orthonormal rows, no subtraction."""
    return low_rank_edit(h, positions, R, W=W, b=b, act=act, dropout=dropout, seed=seed, backend=backend,
                         validate=validate)


def nodireft(h, positions, W1, b, W2, *, act=None, dropout=0.0, seed=None, backend=None, validate=True):
    """NodiReFT (the paper's DiReFT): h + W2ᵀ act(W1 h + b)."""
    return low_rank_edit(h, positions, W2, W=W1, b=b, act=act, dropout=dropout, seed=seed, backend=backend,
                         validate=validate)


def consreft(h, positions, R, b, *, dropout=0.0, seed=None, backend=None, validate=True):
    """ConsReFT: h + Rᵀ(b − R h), a constant target in the subspace."""
    return low_rank_edit(h, positions, R, b=b, P=R, dropout=dropout, seed=seed, backend=backend, validate=validate)


def lobireft(h, positions, R, b, *, dropout=0.0, seed=None, backend=None, validate=True):
    """LobiReFT: h + Rᵀ b, a learned bias along R."""
    return low_rank_edit(h, positions, R, b=b, dropout=dropout, seed=seed, backend=backend, validate=validate)
