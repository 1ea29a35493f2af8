"""The ReFT edit as differentiable functions, with a choice of backend.

One parameterized low-rank edit covers the whole LoReFT family. For a selected row h (d values, fp32 math):

    u = h Pᵀ              projection to subtract (only when P is given)
    z = h Wᵀ + b          learned source (z = b when W is None)
    δ = act(z) − s·u      s = 1 when P is given, else 0
    o = h + δ Q
    out = dropout(o)      pyreft drops out the whole edited vector, not only δQ

Rows are selected by ``positions`` [B, P] (−1 = no position); every other row of the output is bit-identical to h,
and h itself is never modified, unless ``in_place=True`` asks for the edit to be written into h (where the backend
can; the model's hooks do so on hidden states that nothing else holds, ``is_sole_owner``).

Backends implement one contract, ``Backend`` (``backend.py``: forward, backward and why a backend cannot run on a
device), and register themselves in their own module:
  ``triton``  fused kernels, default on CUDA; on CPU only under ``TRITON_INTERPRET=1`` (tests).    backend_triton.py
  ``torch``   the plain PyTorch edit with its backward written out; default elsewhere.            backend_torch.py
  ``cuda``    the CUDA C++ twin in csrc/ (built on first use).                                     backend_cuda.py
``multi_low_rank_edit`` edits each example of a batch with its own parameters (several ReFTs served in one batch):
inference only, on the backends that have ``forward_multi`` (torch, triton).
Pick one with ``backend=`` or the environment variable ``REFT_FAST_BACKEND``. ``REFT_FAST_TRITON_LAUNCH`` (read
once, when the kernels are first imported) sets how ``triton`` launches its kernels on CUDA: ``bound`` (default:
each kernel bound once per launch plan and then launched through the compiled kernel's launcher, less host time per
launch; kernels/launch.py) or ``jit`` (Triton's launcher every time). Under torch.compile every backend runs
inside the torch.library custom op ``reft_fast::low_rank_edit`` (``library.py``), traced through its fake kernel;
the position check (``validate=True``) and drawing a dropout seed read values on the host, so compiled callers
pass ``validate=False`` and a ``seed``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

# Each backend module registers itself on import; their order is the order of BACKENDS.
from reft_fast.ops import backend_triton, backend_torch, backend_cuda  # noqa: F401,I001
from reft_fast.ops.backend import (Backend, EditGrads, EditParams, MultiEdit, backend_names, get_backend,
                                   register_backend, resolve_backend)
from reft_fast.ops.backend_torch import dropout_keep_mask, reference_edit
from reft_fast.ops.library import edit as _edit, edit_in_place as _edit_in_place, is_sole_owner, selected_rows

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "apply_edit",
    "Backend",
    "EditGrads",
    "EditParams",
    "backend_names",
    "dropout_keep_mask",
    "draw_seed",
    "get_backend",
    "is_sole_owner",
    "reference_edit",
    "register_backend",
    "low_rank_edit",
    "MultiEdit",
    "multi_low_rank_edit",
    "prepare_edit",
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
BACKENDS = backend_names()  # the built-in ones; backend_names() also lists any registered later
_H_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------------------
# Input checks: every failure names the argument and what was expected.
# --------------------------------------------------------------------------------------------------------------------
def _activation_code(act) -> int:
    if act not in ACTIVATIONS:
        names = sorted(k for k in ACTIVATIONS if k is not None)
        raise ValueError(f"unknown activation {act!r}; expected one of {names} or None")
    return ACTIVATIONS[act]


def _check_param(name: str, t, shape: tuple, device: torch.device, holder: str = "h") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (intervention parameters are kept in fp32), got {t.dtype}")
    if t.shape != shape:  # torch.Size is a tuple: compared without building one
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {holder} is on {device}")


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


def _check_hidden(h, positions) -> None:
    """h [B, T, d] and positions [B, n]: what varies from one edited hidden state to the next."""
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


def _check_params(Q, P, W, b, dropout, device: Optional[torch.device] = None) -> None:
    """The edit's parameters: Q [r, d] fp32 and P, W [r, d], b [r] like it, on ``device`` (Q's when None)."""
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"Q must be a torch.Tensor, got {type(Q).__name__}")
    if Q.dim() != 2:
        raise ValueError(f"Q must be 2-D [rank, hidden], got shape {list(Q.shape)}")
    r, d = Q.shape
    if not 1 <= r <= d:
        raise ValueError(f"rank must be between 1 and the hidden size {d}, got {r}")
    # checked alone (prepare_edit), the parameters must be where Q is; with h, where h is
    holder, device = ("Q", Q.device) if device is None else ("h", device)
    _check_param("Q", Q, (r, d), device, holder)
    if P is not None and P is not Q:  # LoReFT's P is its Q: checked once
        _check_param("P", P, (r, d), device, holder)
    if W is not None:
        _check_param("W", W, (r, d), device, holder)
    if b is not None:
        _check_param("b", b, (r,), device, holder)
    if W is None and b is None:
        raise ValueError("the learned source needs W, b or both (z = h Wᵀ + b, or z = b when W is None)")
    if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def _check_inputs(h, positions, Q, P, W, b, dropout) -> None:
    _check_hidden(h, positions)
    if isinstance(Q, torch.Tensor) and Q.dim() == 2:
        _check_fits(h, Q)  # first: a Q of another hidden size is named as such, not as W's wrong shape
    _check_params(Q, P, W, b, dropout, h.device)


def _check_fits(h, Q: torch.Tensor) -> None:
    """Q [r, d] (and so the parameters checked against it, ``prepare_edit``) against the hidden state it edits."""
    if Q.shape[1] != h.shape[-1]:
        raise ValueError(f"Q has hidden size {Q.shape[1]} but h has hidden size {h.shape[-1]}")
    if Q.device != h.device:
        raise ValueError(f"Q is on {Q.device} but h is on {h.device}")


def _contiguous_params(Q, P, W, b) -> tuple:
    """Q, P, W, b as the backends take them (contiguous: the kernels read rows of d values), P still being Q where
    it was (LoReFT's one R); a no-op for contiguous parameters, and autograd passes gradients through the copies."""
    Q_contiguous = Q.contiguous()
    P = Q_contiguous if P is Q else (None if P is None else P.contiguous())
    return Q_contiguous, P, None if W is None else W.contiguous(), None if b is None else b.contiguous()


def draw_seed() -> int:
    """A dropout seed from torch's CPU generator: reproducible under torch.manual_seed, no device synchronization."""
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
    in_place: bool = False,
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
            CPU generator when None) and is regenerated in backward, not stored.
        backend: 'triton', 'torch', 'cuda', or None/'auto' (REFT_FAST_BACKEND, else triton on CUDA, torch on CPU).
        validate: check position values (reads them: a host sync on GPU). Shapes and dtypes are always checked.
            Unchecked, a position past the sequence selects nothing, as −1, on every backend (the kernels never
            touch memory a position does not name).
        in_place: write the edit into h and return h (its backward writes into the incoming gradient when nothing
            else holds it), on backends that can and for a contiguous h; otherwise the edited copy is returned, so
            always use the return value. h must not be read afterwards by anyone expecting the unedited values, nor
            be a leaf that requires grad (torch refuses in-place writes into those).
    """
    _check_inputs(h, positions, Q, P, W, b, dropout)
    params = prepare_edit(Q, W=W, b=b, P=P, act=act, dropout=dropout, seed=seed, checked=True)
    return apply_edit(h, positions, params, backend=backend, validate=validate, in_place=in_place, checked=True)


def prepare_edit(Q: torch.Tensor, *, W: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None,
                 P: Optional[torch.Tensor] = None, act=None, dropout: float = 0.0, seed: Optional[int] = None,
                 checked: bool = False) -> EditParams:
    """``low_rank_edit``'s parameters (same meaning), checked and made contiguous once, for ``apply_edit``: a model
    prepares each intervention's edit once per forward and applies it at every hidden state its hooks see (several
    under gradient checkpointing), instead of checking the same parameters at every call. ``checked``: the caller
    has already run the checks."""
    if not checked:
        _check_params(Q, P, W, b, dropout)
    act_code = _activation_code(act)
    if W is None and act_code != 0:
        raise ValueError("an activation applies to h Wᵀ + b; with W=None (z = b) use act=None")
    dropout = float(dropout)
    if dropout > 0 and seed is None:
        seed = draw_seed()
    return EditParams(*_contiguous_params(Q, P, W, b), act_code, dropout, int(seed or 0))


def apply_edit(h: torch.Tensor, positions: torch.Tensor, params: EditParams, *, backend: Optional[str] = None,
               validate: bool = True, in_place: bool = False, checked: bool = False) -> torch.Tensor:
    """The edit ``params`` (from ``prepare_edit``) at the rows ``positions`` of h: ``low_rank_edit``'s result, with
    its arguments ``backend``, ``validate`` and ``in_place``."""
    if not checked:
        _check_hidden(h, positions)
        _check_fits(h, params.Q)
    if validate:
        validate_positions(positions, h.shape[1])
    return (_edit_in_place if in_place else _edit)(h, positions, params, resolve_backend(backend, h.device))


def multi_low_rank_edit(h: torch.Tensor, positions: Sequence[torch.Tensor], edit_index: torch.Tensor,
                        edits: Sequence[Mapping], *, backend: Optional[str] = None,
                        validate: bool = True) -> torch.Tensor:
    """Edit each example of h with its own entry of ``edits``; a new tensor (h is not modified). Inference only.

    Args:
        h: [B, T, d] hidden states.
        positions: one [B, n_k] integer tensor per entry: entry k's positions (−1 = none); only the rows of the
            examples that entry k edits are read.
        edit_index: [B] integer tensor: the entry that edits each example, −1 to leave it untouched.
        edits: K mappings of ``low_rank_edit``'s parameters: ``Q`` and any of ``W``, ``b``, ``P``, ``act``
            (ranks, activations and members of the family may differ).
        backend: as ``low_rank_edit``; 'cuda' has no per-example edit and refuses.
        validate: check position and index values (reads them: a host sync on GPU).

    Every example edited by entry k gets exactly what ``low_rank_edit`` with that entry gives it (bitwise on the
    torch backend, one edit per entry; within float rounding on triton, one launch for all entries, which reads each
    entry's parameters where they lie); no gradient flows: call it under ``torch.no_grad()``.
    """
    if not edits:
        raise ValueError("edits is empty: give at least one entry (Q and its source)")
    if len(positions) != len(edits):
        raise ValueError(f"positions has {len(positions)} tensors but edits has {len(edits)} entries: one each")
    unknown = sorted(set().union(*edits) - {"Q", "W", "b", "P", "act"})
    if unknown:
        raise ValueError(f"edits take Q, W, b, P and act (serving has no dropout), got {unknown}")
    entries = []
    for k, (entry, entry_positions) in enumerate(zip(edits, positions)):
        try:
            _check_inputs(h, entry_positions, entry["Q"], entry.get("P"), entry.get("W"), entry.get("b"), 0.0)
            act = _activation_code(entry.get("act"))
            if entry.get("W") is None and act != 0:
                raise ValueError("an activation applies to h Wᵀ + b; with W=None (z = b) use act=None")
        except (KeyError, TypeError, ValueError) as err:
            raise type(err)(f"edits[{k}]: {err}") from None
        if validate:
            validate_positions(entry_positions, h.shape[1])
        entries.append(EditParams(entry["Q"], entry.get("P"), entry.get("W"), entry.get("b"), act, 0.0, 0))
    _check_edit_index(edit_index, h, len(edits), validate)
    if torch.is_grad_enabled() and (h.requires_grad or any(t is not None and t.requires_grad for e in entries
                                                           for t in (e.Q, e.P, e.W, e.b))):
        raise RuntimeError("multi_low_rank_edit is inference only (no backward): call it under torch.no_grad(), or "
                           "edit one ReFT at a time with low_rank_edit to train")
    name = resolve_backend(backend, h.device)
    implementation = get_backend(name)
    if getattr(implementation, "forward_multi", None) is None:
        raise ValueError(f"backend {name!r} cannot edit each example with its own parameters (several ReFTs in one "
                         "batch): use backend='triton' or 'torch'")
    multi = MultiEdit(tuple(entries), tuple(p.contiguous() for p in positions), edit_index.long().contiguous())
    return implementation.forward_multi(h.contiguous(), multi)


def _check_edit_index(edit_index, h: torch.Tensor, n_edits: int, validate: bool) -> None:
    if not isinstance(edit_index, torch.Tensor) or edit_index.dtype.is_floating_point \
            or edit_index.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"edit_index must be an integer torch.Tensor, got {getattr(edit_index, 'dtype', edit_index)!r}")
    if edit_index.shape != (h.shape[0],):
        raise ValueError(f"edit_index must have shape [batch] = [{h.shape[0]}], got {list(edit_index.shape)}")
    if edit_index.device != h.device:
        raise ValueError(f"edit_index is on {edit_index.device} but h is on {h.device}")
    if validate and edit_index.numel() and not (-1 <= int(edit_index.min()) and int(edit_index.max()) < n_edits):
        raise ValueError(f"edit_index values must be −1 (untouched) or an entry 0..{n_edits - 1}, got "
                         f"{edit_index.tolist()}")


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
