"""The edit as two torch.library custom ops, ``reft_fast::low_rank_edit`` and its backward, over any backend.

Registering through torch.library gives the op fake (meta) kernels, which return outputs of the right shape and
dtype without computing them, so ``torch.compile(fullgraph=True)`` traces a model that calls the op (forward and
backward) without graph breaks, whatever backend runs inside. The autograd formula is registered with the forward op;
the backward is an op of its own so that compiled backward graphs call it opaquely too. Eager calls skip the
dispatcher and run the same forward, setup and backward through a plain autograd.Function (``edit`` picks).

Schemas cannot hold a dataclass or an optional output: the ops take EditParams' fields flat, and the backward op
returns an empty tensor for a gradient whose parameter is absent (or is Q itself: see EditGrads). The forward op
returns the rows of h that backward needs as a second, non-differentiable output: the backend's forward reads them
anyway, so keeping them costs no gather of its own.

In place (``edit_in_place``, what the model's hooks call on hidden states they own): eager calls write the edit into
h (``mark_dirty``) on backends that can (``InPlaceBackend``), and the backward writes ∂L/∂h into grad_out when
nothing else holds that gradient (``is_sole_owner``), else into a new tensor. Under torch.compile it is the
functional op above (the compiler decides about buffers).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from reft_fast.ops.backend import EditGrads, EditParams, get_backend, selected_rows

__all__ = ["apply_function", "edit", "edit_in_place", "is_sole_owner", "selected_rows"]


def _forward(h, positions, Q, P, W, b, backend, act, dropout, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h_rows): the edited copy of h, and the selected rows of h that backward needs."""
    edit = EditParams(Q, P, W, b, act, dropout, seed)
    return get_backend(backend).forward(h.contiguous(), positions.contiguous(), edit)


def _backward_impl(h_rows, grad_out, positions, Q, P, W, b, backend, act, dropout, seed) -> EditGrads:
    edit = EditParams(Q, P, W, b, act, dropout, seed)
    return get_backend(backend).backward(h_rows, grad_out.contiguous(), positions, edit)


def _setup_context(ctx, inputs, output):
    h, positions, Q, P, W, b, backend, act, dropout, seed = inputs
    _, h_rows = output
    ctx.mark_non_differentiable(h_rows)
    ctx.set_materialize_grads(False)  # no zeros launched for the gradient of h_rows, which is never used
    # Backward needs h only at the selected rows: keep those, not the whole hidden state. P is saved only when it is
    # not Q: backward then hands the backend P = Q again, which sums both parts of that tensor's gradient itself.
    ctx.same_pq = P is Q
    ctx.save_for_backward(h_rows, positions.contiguous(), Q, None if ctx.same_pq else P, W, b)
    ctx.settings = (backend, act, dropout, seed)
    # Q, P, W, b: which have a gradient of their own (not P when it is Q: Q's gradient holds both parts)
    ctx.has_weight = (True, P is not None and not ctx.same_pq, W is not None, b is not None)


def _saved(ctx):
    """(h_rows, positions, Q, P, W, b) as forward had them, P being Q again where it was."""
    h_rows, positions, Q, P, W, b = ctx.saved_tensors  # read once: checkpointing unpacks each saved tensor once
    return h_rows, positions, Q, Q if ctx.same_pq else P, W, b


def _differentiable_once(backward):
    """``once_differentiable``'s guarantee (a gradient of these gradients is an error naming it, not a silent None)
    at the price of one grad-mode test on the common path.

    The backward of a plain ``.backward()`` runs with grad mode off; ``once_differentiable`` then adds nothing but its
    ``torch.no_grad()`` block, which cost 15–30 µs per backward on the CPU (torch 2.13, 2026-11-30), more than a
    tenth of an edit's host time. Only a backward with ``create_graph=True`` (grad mode on) goes through it."""
    guarded = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return guarded(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


# ``Function.apply``'s Python layer (torch 2.13: arguments bound for a separate setup_context, functorch's checks,
# functorch's dead wrappers unwrapped) cost about 10 µs per call on the CPU (2026-11-30); outside functorch
# transforms, for Functions without a separate setup_context, it only hands the arguments to this C++ entry.
# Read defensively: where a torch release moves it, ``Function.apply`` is called.
_C_APPLY = vars(getattr(torch._C, "_FunctionBase", object)).get("apply")


def apply_function(function: type, *args):
    """``function.apply(*args)`` for an autograd.Function whose ``forward`` takes ctx (no separate setup_context),
    straight into torch's C++ entry where no functorch transform is active."""
    if _C_APPLY is None or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return _C_APPLY.__get__(None, function)(*args)


def _input_grads(ctx, grad_h, dQ, dP, dW, db) -> tuple:
    """The gradients of the forward's ten inputs: None for non-tensors, absent parameters and those not needed."""
    needs = ctx.needs_input_grad
    weights = [grad if present and needed else None
               for grad, present, needed in zip((dQ, dP, dW, db), ctx.has_weight, needs[2:6])]
    return (grad_h if needs[0] else None, None, *weights, None, None, None, None)


@torch.library.custom_op("reft_fast::low_rank_edit", mutates_args=())
def _edit_op(h: torch.Tensor, positions: torch.Tensor, Q: torch.Tensor, P: Optional[torch.Tensor],
             W: Optional[torch.Tensor], b: Optional[torch.Tensor], backend: str, act: int, dropout: float,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(h, positions, Q, P, W, b, backend, act, dropout, seed)


@_edit_op.register_fake
def _edit_op_fake(h, positions, Q, P, W, b, backend, act, dropout, seed):
    return h.new_empty(h.shape), h.new_empty(positions.shape[0], positions.shape[1], h.shape[2])


@torch.library.custom_op("reft_fast::low_rank_edit_backward", mutates_args=())
def _edit_backward_op(h_rows: torch.Tensor, grad_out: torch.Tensor, positions: torch.Tensor, Q: torch.Tensor,
                      P: Optional[torch.Tensor], W: Optional[torch.Tensor], b: Optional[torch.Tensor], backend: str,
                      act: int, dropout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    grads = _backward_impl(h_rows, grad_out, positions, Q, P, W, b, backend, act, dropout, seed)
    absent = lambda: Q.new_empty(0)  # noqa: E731  (a fresh tensor each: outputs must not alias)
    return (grads.h, grads.Q, absent() if grads.P is None else grads.P, absent() if grads.W is None else grads.W,
            absent() if grads.b is None else grads.b)


@_edit_backward_op.register_fake
def _edit_backward_op_fake(h_rows, grad_out, positions, Q, P, W, b, backend, act, dropout, seed):
    like = lambda t: Q.new_empty(0) if t is None else t.new_empty(t.shape, dtype=torch.float32)  # noqa: E731
    return grad_out.new_empty(grad_out.shape), like(Q), like(None if P is Q else P), like(W), like(b)


def _op_backward(ctx, grad_out, grad_rows):
    del grad_rows  # h_rows is not differentiable
    h_rows, positions, Q, P, W, b = _saved(ctx)
    return _input_grads(ctx, *_edit_backward_op(h_rows, grad_out, positions, Q, P, W, b, *ctx.settings))


_edit_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerEdit(torch.autograd.Function):
    """The same forward, setup and backward without the dispatcher round trips of a Python custom op, which cost
    about 0.13 ms per edit forward+backward on the CPU (torch 2.13, measured 2026-11-28): what eager code runs."""

    @staticmethod
    def forward(ctx, *inputs):  # ctx first: a separate setup_context makes apply() bind arguments with inspect
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @_differentiable_once  # a gradient of these gradients (create_graph) is an error naming this, not a silent None
    def backward(ctx, grad_out, grad_rows):
        del grad_rows  # h_rows is not differentiable
        h_rows, positions, Q, P, W, b = _saved(ctx)
        grads = _backward_impl(h_rows, grad_out, positions, Q, P, W, b, *ctx.settings)
        return _input_grads(ctx, grads.h, grads.Q, grads.P, grads.W, grads.b)


def edit(h: torch.Tensor, positions: torch.Tensor, params: EditParams, backend: str) -> torch.Tensor:
    """The edited copy of h computed by the registered backend ``backend``, differentiable; under torch.compile the
    custom op, which the compiler traces through its fake kernels."""
    if torch.compiler.is_compiling():
        return _edit_op(h, positions, params.Q, params.P, params.W, params.b, backend, params.act, params.dropout,
                        params.seed)[0]
    implementation = get_backend(backend)
    if _differentiates_forward(implementation, h):
        return implementation.forward(h.contiguous(), positions.contiguous(), params)[0]
    return apply_function(_EagerEdit, h, positions, params.Q, params.P, params.W, params.b, backend, params.act,
                          params.dropout, params.seed)[0]


def _differentiates_forward(implementation, h: torch.Tensor) -> bool:
    """Whether an eager edit of h lets autograd differentiate the backend's forward (ordinary torch ops) instead of
    calling its backward: the backend's ``differentiates_forward(h)`` says, where it has one."""
    differentiates = getattr(implementation, "differentiates_forward", None)
    return differentiates is not None and differentiates(h)


# torch has no public API for "does anything else refer to this tensor" (2.13, 2026-11); the two reference counts
# below are private. Read defensively: where a torch release renames or drops them, in-place edits turn off (every
# edit copies, as the out-of-place op does) instead of failing or guessing.
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_users(t: torch.Tensor) -> Optional[int]:
    if _STORAGE_USE_COUNT is None:
        return None
    try:
        return _STORAGE_USE_COUNT(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, TypeError):
        return None


# What a tensor that nothing else refers to reads as (the untyped_storage() handle itself counts once; measured
# here rather than assumed, so that a torch that counts differently only makes the check refuse).
_LONE_STORAGE_USERS = _storage_users(torch.empty(1))


def is_sole_owner(t: torch.Tensor) -> bool:
    """Whether t may be written in place without anyone else seeing it: a dense contiguous tensor that is no view,
    whose storage no other tensor shares (views of it, a copy an autograd node saved of it as its output) and that no
    C++ holder refers to besides its Python object (an autograd node that saved it as an input, a pending gradient
    buffer, ``.grad`` of ``retain_grad``). Python-level references are not seen: callers must know that no other
    Python object holds it (a hook's own output, a gradient handed to a backward). False when unsure, also when
    torch lacks the reference counts read here (``Tensor._use_count``, torch ≥ 2.4).
    """
    use_count = getattr(t, "_use_count", None)
    if use_count is None or _LONE_STORAGE_USERS is None or t.layout != torch.strided or (t.is_leaf and t.requires_grad):
        return False
    return (t._base is None and t.is_contiguous() and use_count() == 1
            and _storage_users(t) == _LONE_STORAGE_USERS)


class _EditInPlace(torch.autograd.Function):
    """The edit written into h (and, when the gradient is ours alone, its backward written into grad_out)."""

    @staticmethod
    def forward(ctx, h, positions, Q, P, W, b, backend, params):
        # ``params`` is the caller's EditParams of these Q, P, W, b (handed through rather than built again; the
        # tensors are also passed on their own, for autograd to see them)
        h_rows = get_backend(backend).forward_in_place(h, positions, params)
        ctx.mark_dirty(h)
        _setup_context(ctx, (h, positions, Q, P, W, b, backend, params.act, params.dropout, params.seed), (h, h_rows))
        return h, h_rows

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out, grad_rows):
        del grad_rows  # h_rows is not differentiable
        h_rows, positions, Q, P, W, b = _saved(ctx)
        edit = EditParams(Q, P, W, b, *ctx.settings[1:])
        implementation = get_backend(ctx.settings[0])
        # The engine hands the same gradient tensor to every input of an op like a + b (the residual stream): while
        # another node still holds it, writing into it would change that node's gradient.
        if is_sole_owner(grad_out) and not grad_out.requires_grad:
            grads = implementation.backward_in_place(h_rows, grad_out, positions, edit)
        else:
            grads = implementation.backward(h_rows, grad_out.contiguous(), positions, edit)
        return _input_grads(ctx, grads.h, grads.Q, grads.P, grads.W, grads.b)[:8]  # forward's 8 inputs


def edit_in_place(h: torch.Tensor, positions: torch.Tensor, params: EditParams, backend: str) -> torch.Tensor:
    """``edit`` written into h itself, returned, where the backend can (``backend.InPlaceBackend``), h is contiguous
    and the backend does not let autograd differentiate its forward for h (``differentiates_forward``); otherwise
    (and under torch.compile) the edited copy. The caller must own h: nothing else may read it later."""
    # (an attribute test: isinstance against a runtime-checkable Protocol costs microseconds on every call)
    implementation = get_backend(backend)
    if torch.compiler.is_compiling() or not h.is_contiguous() \
            or getattr(implementation, "forward_in_place", None) is None or _differentiates_forward(implementation, h):
        return edit(h, positions, params, backend)
    return apply_function(_EditInPlace, h, positions.contiguous(), params.Q, params.P, params.W, params.b, backend,
                          params)[0]
