"""Counting what an edit costs the device, on a CPU machine: launches and host synchronizations.

A ``DeviceWork`` context counts (1) every Triton kernel launch, by wrapping the launch method of Triton's kernel
class (the interpreter's under TRITON_INTERPRET=1, the JIT's otherwise) and the launches of kernels bound once
(``reft_fast.kernels.launch.run_bound``, REFT_FAST_TRITON_LAUNCH=bound on a GPU), and (2) every aten op that reaches the
dispatcher and would be a device kernel on a GPU, through a TorchDispatchMode: views and bare allocations launch
nothing and are not counted. While a Triton kernel runs, the torch ops the interpreter itself issues (copies of its
arguments to numpy) are not counted: a compiled kernel on a GPU issues none.

It also records the ops that make the host wait for the device: reading a value (``_local_scalar_dense``, which
``.item()``, ``int()``, ``bool()`` reach), and ops whose output shape depends on the data (``nonzero``, ...), and
calls of ``Tensor.tolist`` (which on CPU tensors reads memory without passing the dispatcher).
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate without writing (no kernel) or only change metadata.
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_unsafe_view", "_reshape_alias", "set_", "resize_", "resolve_conj", "resolve_neg"}
# Ops after which the host has waited for the device: a value read back, or an output shape that depends on data.
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "nonzero_numpy", "masked_select", "_unique", "_unique2",
                 "unique_dim", "unique_consecutive", "argwhere", "is_nonzero", "equal", "allclose", "tolist"}


def _kernel_classes():
    import triton
    from triton.runtime import interpreter, jit

    del triton
    return [jit.JITFunction, interpreter.InterpretedFunction]


class DeviceWork(TorchDispatchMode):
    """``with DeviceWork() as work: ...``; then ``work.launches`` (total), ``work.kernels`` (Counter of names) and
    ``work.syncs`` (list of host-synchronizing op names)."""

    def __init__(self):
        super().__init__()
        self.kernels = collections.Counter()
        self.syncs = []
        self._inside_triton = 0
        self._patches = contextlib.ExitStack()

    @property
    def launches(self) -> int:
        return sum(self.kernels.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside_triton:
            if name in HOST_SYNC_OPS:
                self.syncs.append(name)
            if name not in _NO_LAUNCH and not func.is_view:
                self.kernels["aten." + name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        from reft_fast.kernels import launch

        for cls in _kernel_classes():
            self._patch(cls, "run", lambda kernel, *args, **kwargs: getattr(kernel, "__name__", "?"),
                        skip=lambda kwargs: kwargs.get("warmup"))
        self._patch(launch, "run_bound", lambda bound, *args, **kwargs: bound.name)  # launches bound once per plan
        work, original_tolist = self, torch.Tensor.tolist

        def counted_tolist(tensor, *args, **kwargs):
            if not work._inside_triton:
                work.syncs.append("tolist")
            return original_tolist(tensor, *args, **kwargs)

        self._patches.callback(setattr, torch.Tensor, "tolist", original_tolist)
        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def _patch(self, owner, attribute: str, name_of, skip=lambda kwargs: False) -> None:
        """Count each call of ``owner.attribute`` as a Triton launch named ``name_of(*call)``; what it dispatches
        inside is the kernel's own business, not aten launches or host syncs."""
        work, original = self, getattr(owner, attribute)

        def counted(*args, **kwargs):
            if skip(kwargs):
                return original(*args, **kwargs)
            work.kernels["triton." + name_of(*args, **kwargs)] += 1
            work._inside_triton += 1
            try:
                return original(*args, **kwargs)
            finally:
                work._inside_triton -= 1

        self._patches.callback(setattr, owner, attribute, original)
        setattr(owner, attribute, counted)

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()
