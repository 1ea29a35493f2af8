"""The contract every backend of the edit implements, and the registry that picks one.

A backend is an object with a ``name``, three methods (``unavailable_reason``, ``forward``, ``backward``) and one
flag (``prefers``), and may have ``differentiates_forward(h)``: True where its forward is ordinary torch ops that
autograd should differentiate for that h (eager calls then do so, out of place; the custom op under torch.compile
still uses ``backward``). A
backend that can edit in place also has ``forward_in_place`` and ``backward_in_place`` (``InPlaceBackend``); the
op's in-place entry falls back to the out-of-place edit on the others. A backend that can edit each example with its
own parameters (several ReFTs in one batch, inference only) has ``forward_multi(h, multi: MultiEdit) -> out``. It registers itself with
:func:`register_backend` in its own module (see ``backend_torch.py``,
``backend_triton.py``, ``backend_cuda.py``). The op (``reft_fast.ops``) owns everything around it: input checks,
keeping what the backend's forward returns for backward, the autograd and torch.compile registration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch

__all__ = ["BACKEND_ENV", "Backend", "EditGrads", "EditParams", "InPlaceBackend", "MultiEdit", "backend_names",
           "get_backend", "register_backend", "resolve_backend", "selected_rows"]

BACKEND_ENV = "REFT_FAST_BACKEND"


class EditParams(NamedTuple):
    """One edit ``out = dropout(h + (act(h Wᵀ + b) − s·h Pᵀ) Q)``, as every backend receives it.

    Q, P, W: [r, d] fp32 (P None: s = 0; W None: z = b); b: [r] fp32 or None; act: activation code (``ACTIVATIONS``);
    dropout: probability in [0, 1); seed: the dropout mask's seed (ignored when dropout is 0).

    A NamedTuple, not a dataclass: one is built per edit and per backward, and a frozen dataclass's ``__init__`` cost
    four times a tuple's (2 against 0.5 µs on the CPU, 2026-11-30); compiled hooks index it like any tuple.
    """

    Q: torch.Tensor
    P: Optional[torch.Tensor]
    W: Optional[torch.Tensor]
    b: Optional[torch.Tensor]
    act: int
    dropout: float
    seed: int

    @property
    def rank(self) -> int:
        return self.Q.shape[0]


@dataclass(frozen=True)
class MultiEdit:
    """Several edits over one batch, each example edited by at most one of them (inference only: no dropout).

    entries: K EditParams (ranks, activations and which of P, W, b exist may differ); positions: K tensors [B, n_k],
    entry k's positions for every example (only the rows of its own examples are read); edit_index: [B] int64, the
    entry that edits each example, −1 for an example left untouched.
    """

    entries: tuple
    positions: tuple
    edit_index: torch.Tensor


class EditGrads(NamedTuple):
    """∂L/∂h [B, T, d] in h's dtype, and the fp32 weight gradients summed over the selected rows: None where the
    matching EditParams field is None, and P None also when P is the same tensor as Q (LoReFT, NoReFT, ConsReFT):
    Q then holds that tensor's whole gradient, both parts summed, so that autograd has no sum left to launch."""

    h: torch.Tensor
    Q: torch.Tensor
    P: Optional[torch.Tensor]
    W: Optional[torch.Tensor]
    b: Optional[torch.Tensor]


@runtime_checkable
class Backend(Protocol):
    """What the op needs from a backend. Tensors arrive checked (shapes, dtypes, devices) and contiguous."""

    name: str

    def prefers(self, device: torch.device) -> bool:
        """True when this backend is the default for tensors on ``device`` (no ``backend=``, no REFT_FAST_BACKEND)."""
        ...

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot take tensors on ``device`` (a sentence naming the fix), or None.

        Cheap: builds and launches nothing; a missing toolchain may still surface on the first forward."""
        ...

    def forward(self, h: torch.Tensor, positions: torch.Tensor, edit: EditParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, h_rows). out: a new tensor equal to h [B, T, d] except at the rows ``h[b, positions[b, j]]``, which
        hold the edit; h itself is never modified. h_rows [B, n, d]: ``selected_rows(h, positions)`` (any values where
        positions is −1), what backward receives; the forward reads those rows anyway, so it hands them over.

        positions [B, n] holds token indices, −1 for "no position"."""
        ...

    def backward(self, h_rows: torch.Tensor, grad_out: torch.Tensor, positions: torch.Tensor,
                 edit: EditParams) -> EditGrads:
        """The gradients of the edit: ∂L/∂h is a new tensor equal to grad_out except at the selected rows.

        h_rows [B, n, d] holds h[b, positions[b, j]] at [b, j] (any values where positions is −1): the op keeps only
        the selected rows of h for backward. The dropout mask is regenerated from ``edit.seed``, never stored."""
        ...


@runtime_checkable
class InPlaceBackend(Backend, Protocol):
    """A backend that can also write the edit into h and its gradient into grad_out (contiguous, checked)."""

    def forward_in_place(self, h: torch.Tensor, positions: torch.Tensor, edit: EditParams) -> torch.Tensor:
        """Write the edit into the selected rows of h; return h_rows (as ``forward``), read before h was written."""
        ...

    def backward_in_place(self, h_rows: torch.Tensor, grad_out: torch.Tensor, positions: torch.Tensor,
                          edit: EditParams) -> EditGrads:
        """``backward`` with ∂L/∂h written into the selected rows of grad_out, which it returns as ``EditGrads.h``;
        the weight gradients are those of the grad_out it was given."""
        ...


def selected_rows(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, n, d] with h[b, positions[b, j]] at [b, j] (a row of h where positions is −1 or past the sequence, which
    select nothing): what backward reads of h."""
    batch_index = torch.arange(h.shape[0], device=h.device).unsqueeze(1)
    # int64 whatever integer dtype positions has: torch indexes with int64/int32 only, and reads uint8 as a mask
    return h[batch_index, positions.long().clamp(0, max(h.shape[1] - 1, 0))]


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` selectable by its name (``backend=`` or REFT_FAST_BACKEND); returns it."""
    if not isinstance(backend, Backend):
        raise TypeError(f"{backend!r} does not implement the Backend protocol (name, prefers, unavailable_reason, "
                        "forward, backward)")
    if backend.name in (None, "auto") or backend.name in _REGISTRY:
        raise ValueError(f"a backend named {backend.name!r} cannot be registered: the name is taken")
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> tuple:
    """The registered backends' names, in registration order."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(_REGISTRY)} (or None/'auto')")
    return _REGISTRY[name]


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Explicit argument, else REFT_FAST_BACKEND, else the backend that prefers ``device``; checked against it."""
    from_environment = backend in (None, "auto") and bool(os.environ.get(BACKEND_ENV))
    name = backend if backend not in (None, "auto") else os.environ.get(BACKEND_ENV) or None
    if from_environment and name != "auto" and name not in _REGISTRY:
        raise ValueError(f"{BACKEND_ENV}={name!r} is no backend; expected one of {list(_REGISTRY)} or 'auto' (or unset)")
    if name in (None, "auto"):
        preferring = [candidate for candidate in _REGISTRY.values() if candidate.prefers(device)]
        if not preferring:
            raise ValueError(f"no registered backend is the default for {device.type} tensors: pass backend=")
        return preferring[0].name
    reason = get_backend(name).unavailable_reason(device)
    if reason is not None:
        raise ValueError(reason)
    return name
