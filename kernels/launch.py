"""How the Triton kernels are launched: through Triton's JIT launcher, or bound once and then through the compiled
kernel's own launcher. Chosen by the environment variable ``REFT_FAST_TRITON_LAUNCH``, read once at import:

    bound  (default) on CUDA, the first launch of a kernel at a given specialization goes through
           ``JITFunction.run`` (which compiles it, or finds it compiled) and is then bound: the compiled kernel, its
           launcher and the argument tuple in Triton's bound order are kept in the launch plan; the later launches of
           that plan call the launcher directly, after a check that nothing that picks a compiled kernel has changed.
    jit    ``kernel[grid](*args, **constexprs)``: Triton's ``JITFunction.run`` on every launch.

Measured on an H200 (bench/bench_host.py, tiny 32-layer Llama, LoReFT r8 at 32 layers, 20 paired repetitions,
torch 2.11, Triton 3.6, 2026-11-30): a step costs 0.78 ms per intervention over the frozen floor bound, 1.17 ms
through the JIT (ratio 0.67); outputs and gradients equal to the JIT's bit for bit there at one batch shape and four
parameter sets (tests/test_triton_launch.py's cuda test runs three shapes).

Why: a ReFT training step of a small model is host time, and its Triton launches cost ≈ 55–70 µs each on the H200
host (issue 15: 0.36 ms per intervention at ≈ 5.7 launches, measured by stubbing ``JITFunction.run``). Before the
compiled kernel's launcher, ``JITFunction.run`` reads the knobs, asks the driver for the current device and stream,
binds and specializes every argument (its binder), turns the specialization and the options into a cache key (``str``
of the options dict), looks it up, checks the kernel's globals and builds the launch metadata: ≈ 25–30 µs a launch of
these kernels on a 2-core EPYC VM, against ≈ 9–11 µs for the bound path's checks and call (both with a launcher that
does nothing; bench/NOTES.md). The plan already knows the stream, the tiles and every shape argument; what can still
differ between two launches at one plan and one set of constexprs is checked by ``fits``:

* the dtypes of the tensor arguments (the plan is per hidden dtype, but Q, P, W, b, positions come from the caller);
* their 16-byte alignment: Triton specializes pointer arguments on ``data_ptr() % 16 == 0`` (the "D" attribute), which
  lets the compiler vectorize loads and stores of these memory-bound kernels. Marking the pointers
  ``do_not_specialize_on_alignment`` would make that check unneeded but give up the vector accesses on the device
  for every launch, so the check stays on the host (one ``data_ptr()`` per tensor, or-ed) and only aligned
  launches are ever bound; a misaligned one takes the JIT path;
* which optional tensors are present (P, W, b): the launch functions pass a placeholder pointer and a constexpr flag
  (HAS_P, HAS_W, HAS_B), and the constexprs are part of the binding's key; a None where the binding had a tensor
  also fails the check;
* the plain (``do_not_specialize``) int arguments keep Triton's 32-bit type (a seed ≥ 2³¹ is typed i64 by Triton);
  the specialized ones (d, r, ...) equal the bound values; floats stay floats;
* the current device, the knobs that enter the compile options (``TRITON_DEBUG`` and the kernel's own ``debug``, the
  instrumentation mode, and on Triton 3.9 the fpsan casts and a stages-inspection hook) and pre-run hooks.
Anything else falls back to the JIT launch, and a fitting new binding replaces the old one. The kernel's globals are
this module's constants (Triton's per-launch check that they did not change is not repeated). Launch hooks
(``knobs.runtime.launch_enter_hook``/``exit_hook``, e.g. a profiler's) are passed as Triton passes them; the launch
metadata is built only when a hook is installed (an empty hook chain ignores it).

The first binding of a (kernel, specialization) checks itself against Triton: the tuple the bound path passes must be
``tuple(bound_args.values())`` of Triton's own binder called as ``JITFunction.run`` calls it, the alignment and int
types the checks assume must be the binder's, and the compiled kernel must be the one Triton's cache holds for that
key; otherwise a RuntimeError names the Triton version (never a launch with a wrong argument order). The code reads
``JITFunction.run`` and ``CompiledKernel`` of Triton 3.6 and 3.9 (identical in what is used here, save 3.9's extra
fpsan option and stages hook); on another version the default launches through the JIT, and an explicit
``REFT_FAST_TRITON_LAUNCH=bound`` warns once and does the same.

On the CPU (the interpreter, TRITON_INTERPRET=1) every launch is a JIT launch whatever the setting.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import triton
from triton import knobs

ENV = "REFT_FAST_TRITON_LAUNCH"
MODES = ("jit", "bound")
WRITTEN_FOR = ((3, 6), (3, 9))  # Triton versions (major, minor) whose launch path the bound mode was written against
_I32 = (-2**31, 2**31)  # Triton types a plain int argument i32 in [lo, hi), i64 or u64 outside


def launch_mode(environ=os.environ) -> str:
    """The launch mode the environment asks for: ``bound`` when unset."""
    value = environ.get(ENV, "bound")
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)} (bound, the default: bind once per "
                         "launch plan, then call the compiled kernel's launcher; jit: Triton's launcher on every "
                         "launch)")
    return value


def written_for(version: str) -> bool:
    """Whether the bound path was written against this Triton version (its major.minor)."""
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in WRITTEN_FOR


def resolve(mode: str, version: str = triton.__version__, asked: bool = True) -> str:
    """The mode that runs: ``bound`` falls back to ``jit`` on a Triton it was not written against, with a warning
    when it was ``asked`` for (not when it is only the default)."""
    if mode not in MODES:
        raise ValueError(f"launch mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "bound" and not written_for(version):
        if not asked:
            return "jit"
        warnings.warn(f"{ENV}=bound was written against Triton {', '.join('%d.%d' % v for v in WRITTEN_FOR)}; this "
                      f"is Triton {version}: launching through Triton's JIT launcher instead", RuntimeWarning,
                      stacklevel=2)
        return "jit"
    return mode


# Read once, at import (the kernels module is imported on the first edit): plan_for passes it into each new plan.
MODE = resolve(launch_mode(), asked=ENV in os.environ)


@contextlib.contextmanager
def using(mode: str):
    """Launch plans made inside the block use ``mode`` (bench/bench_host.py times both modes in one process; plans
    are keyed by mode, so those of the other mode are not reused)."""
    global MODE
    before, MODE = MODE, resolve(mode)
    try:
        yield
    finally:
        MODE = before


class Bound(NamedTuple):
    """One kernel bound at one specialization, in one plan (so one stream and one set of shape arguments)."""

    name: str
    run: Callable              # the compiled kernel's launcher (CompiledKernel.run)
    function: int              # its CUfunction handle
    packed_metadata: object
    compiled: object           # the CompiledKernel (for launch metadata, when a launch hook is installed)
    tail: tuple                # the arguments after the positional ones, in signature order: constexprs, defaults
    n_args: int
    tensor_at: tuple           # positions of the tensor arguments ...
    dtypes: tuple              # ... and their dtypes
    fixed_at: tuple            # positions of the specialized int arguments ...
    fixed: tuple               # ... and their values
    free_at: tuple             # positions of the other scalars (plain ints, floats) ...
    free_types: tuple          # ... and their Python types
    free_int_at: tuple         # positions of the plain ints (which must stay i32)
    take: tuple                # for each of the four position tuples, a function: args -> those arguments (a tuple)
    device: int
    knobs: tuple


_current_device = getattr(torch._C, "_cuda_getDevice", lambda: -1)
_dtype = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr  # (a TypeError on anything but a tensor)


def _taker(positions: tuple) -> Callable:
    """args -> the arguments at ``positions``, as a tuple (itemgetter: a few hundred ns for a dozen of them)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return (lambda args: (args[positions[0]],)) if positions else (lambda args: ())


def knob_state(kernel) -> tuple:
    """What JITFunction.run reads per launch that enters the compile options or the specialization, and whether the
    kernel has pre-run hooks (run calls them; the bound path does not)."""
    runtime, compilation = knobs.runtime, knobs.compilation
    return (kernel.debug, runtime.debug, compilation.instrumentation_mode,
            getattr(compilation, "fpsan_homomorphic_casts", None),  # Triton 3.9
            getattr(runtime, "add_stages_inspection_hook", None),  # Triton 3.9: appended to the specialization
            bool(kernel.pre_run_hooks))


def describe(kernel, args: tuple) -> dict:
    """The fields of a Bound that ``fits`` compares, taken from one launch's positional arguments."""
    tensor_at = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    scalar_at = [i for i in range(len(args)) if i not in tensor_at]
    fixed_at = tuple(i for i in scalar_at if type(args[i]) is int and not kernel.params[i].do_not_specialize)
    free_at = tuple(i for i in scalar_at if i not in fixed_at)
    free_int_at = tuple(i for i in free_at if type(args[i]) is int)
    return dict(n_args=len(args), tensor_at=tensor_at, dtypes=tuple(args[i].dtype for i in tensor_at),
                fixed_at=fixed_at, fixed=tuple(args[i] for i in fixed_at), free_at=free_at,
                free_types=tuple(type(args[i]) for i in free_at), free_int_at=free_int_at,
                take=tuple(map(_taker, (tensor_at, fixed_at, free_at, free_int_at))))


def fits(bound: Bound, kernel, args: tuple) -> bool:
    """Whether this launch would get the bound compiled kernel from Triton's JIT (see the module docstring)."""
    if len(args) != bound.n_args or knob_state(kernel) != bound.knobs or _current_device() != bound.device:
        return False
    take_tensors, take_fixed, take_free, take_ints = bound.take
    tensors = take_tensors(args)
    try:
        if tuple(map(_dtype, tensors)) != bound.dtypes:
            return False
        if functools.reduce(operator.or_, map(_data_ptr, tensors), 0) & 15:  # one misaligned pointer sets a low bit
            return False
    except (AttributeError, TypeError):  # None (or another non-tensor) where the binding had a tensor
        return False
    if take_fixed(args) != bound.fixed or tuple(map(type, take_free(args))) != bound.free_types:
        return False
    ints = take_ints(args)
    return not ints or (_I32[0] <= min(ints) and max(ints) < _I32[1])


def bound_tuple(kernel, args: tuple, kwargs: dict) -> tuple:
    """The launcher's argument tuple for ``kernel[grid](*args, **kwargs)``: every parameter in signature order (what
    Triton's binder gives as ``bound_args.values()``), keyword ones and defaults included; other keywords are
    options (num_warps) and not arguments."""
    rest = list(kernel.signature.parameters.values())[len(args):]
    return tuple(args) + tuple(kwargs[p.name] if p.name in kwargs else p.default for p in rest)


def _same(a, b) -> bool:
    return a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else type(a) is type(b) and a == b


def _mismatch(kernel, what: str) -> RuntimeError:
    return RuntimeError(f"{ENV}=bound: {what} for kernel {kernel.__name__} on Triton {triton.__version__}; the bound "
                        f"launch path does not match this Triton's own launch (set {ENV}=jit)")


def jit_options(kernel, kwargs: dict) -> dict:
    """The keywords JITFunction.run hands its binder: the call's, with the knobs it adds."""
    options = dict(kwargs)
    options["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    options["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton 3.9
        options["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return options


def check_binding(kernel, binder, args: tuple, kwargs: dict, fast: tuple):
    """Triton's own binding of this launch (``binder`` called as JITFunction.run calls it), checked against what the
    bound path assumes: the argument tuple ``fast``, and for each argument the alignment and int type that ``fits``
    keeps. Returns (specialization, options); raises RuntimeError on a difference."""
    params, specialization, options = binder(*args, **jit_options(kernel, kwargs))
    values = tuple(params.values())
    if len(values) != len(fast) or not all(_same(a, b) for a, b in zip(values, fast)):
        raise _mismatch(kernel, f"argument tuple {len(fast)} values, Triton's binder {len(values)} (or another order)")
    for i, (arg, spec) in enumerate(zip(args, specialization)):
        on_alignment = not (kernel.params[i].do_not_specialize or kernel.params[i].do_not_specialize_on_alignment)
        if isinstance(arg, torch.Tensor) and on_alignment and (spec[1] == "D") != (arg.data_ptr() % 16 == 0):
            raise _mismatch(kernel, f"argument {i} specialized {spec}, not on 16-byte alignment")
        plain_int = type(arg) is int and kernel.params[i].do_not_specialize
        if plain_int and _I32[0] <= arg < _I32[1] and spec[0] != "i32":
            raise _mismatch(kernel, f"plain int argument {i} = {arg} typed {spec[0]}, not i32")
    return specialization, options


def bind(kernel, compiled, stream: int, args: tuple, kwargs: dict) -> Optional[Bound]:
    """A Bound for the launch that JITFunction.run just made (``compiled``: what it returned), checked against Triton;
    None when this launch is one the bound path does not serve (misaligned, a wide int, hooks, another device)."""
    from triton.compiler import CompiledKernel
    from triton.runtime.driver import driver
    from triton.runtime.jit import compute_cache_key

    if not isinstance(compiled, CompiledKernel) or knob_state(kernel)[-2:] != (None, False):
        return None
    if not all(p.is_constexpr for p in kernel.params[len(args):]):
        return None  # a run-time argument by keyword would be frozen into the tail (and its value into the key)
    device = driver.active.get_current_device()
    if stream != driver.active.get_current_stream(device):
        return None  # the tensors' device is not the current one: Triton launches on the current device's stream
    kernel_cache, key_cache, _, _, binder = kernel.device_caches[device]
    fast = bound_tuple(kernel, args, kwargs)
    specialization, options = check_binding(kernel, binder, args, kwargs, fast)
    if kernel_cache.get(compute_cache_key(key_cache, specialization, options)) is not compiled:
        raise _mismatch(kernel, "the compiled kernel returned is not the one Triton's cache holds for its key")
    fields = describe(kernel, args)
    ints = [args[i] for i in fields["free_int_at"]]
    aligned = all(args[i].data_ptr() % 16 == 0 for i in fields["tensor_at"])
    if not aligned or (ints and not (_I32[0] <= min(ints) and max(ints) < _I32[1])):
        return None
    return Bound(name=kernel.__name__, run=compiled.run, function=compiled.function,
                 packed_metadata=compiled.packed_metadata, compiled=compiled, tail=fast[len(args):], device=device,
                 knobs=knob_state(kernel), **fields)


def run_bound(bound: Bound, grid: tuple, stream: int, args: tuple) -> None:
    """The launch JITFunction.run ends with, for a bound kernel."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    full = args + bound.tail
    hooked = getattr(enter, "calls", True) or getattr(leave, "calls", True)  # not an empty HookChain
    metadata = bound.compiled.launch_metadata(grid, stream, *full) if hooked else None
    bound.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, bound.function,
              bound.packed_metadata, metadata, enter, leave, *full)


def launch(kernel, grid: tuple, bindings: Optional[dict], stream: int, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``: through a binding of ``bindings`` (a plan's; None: always the JIT) when one
    fits, else through Triton's JIT, binding the launch for the next ones."""
    if bindings is None:
        kernel[grid](*args, **kwargs)
        return
    key = (id(kernel), *kwargs.items())
    bound = bindings.get(key)
    if bound is not None and fits(bound, kernel, args):
        run_bound(bound, grid, stream, args)
        return
    compiled = kernel[grid](*args, **kwargs)
    fresh = bind(kernel, compiled, stream, args, kwargs)
    if fresh is not None:
        bindings[key] = fresh
