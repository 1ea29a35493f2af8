"""Triton launches bound once (kernels/launch.py, REFT_FAST_TRITON_LAUNCH=bound; issue 15).

On the CPU: the argument tuple the bound path passes equals Triton's own binding (its binder for sm_90, made without a
GPU, as tests/test_triton_compile.py does) at every launch of forwards and backwards of several shapes, with P, W and
b present and absent; the check that decides whether a launch may take the bound path (``fits``) turns a launch away
when anything that picks another compiled kernel differs; the setting is read and checked. On a GPU: the bound path
gives the JIT path's results bit for bit, and its launches after the first do not go through ``JITFunction.run``.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from reft_fast.kernels import launch  # noqa: E402
from reft_fast.kernels import low_rank_edit as kernels  # noqa: E402

from sm90 import compiled_report  # noqa: E402
from launch_count import DeviceWork  # noqa: E402
from reference import DEVICE, make_params, make_positions  # noqa: E402

# (batch, length, positions per example, seed): few rows (the column-split projections, one slot block), more rows,
# and many (the fused path, several weight splits and their sum kernel)
SHAPES = [(2, 7, 3, 1), (5, 33, 6, 16), (1, 48, 4, 12345), (16, 1024, 14, 32), (3, 1, 1, 7)]
# (P, W, b) present: LoReFT's P-is-Q, a P of its own, and the members without P, W or b
OPTIONAL = [("Q", True, True), ("own", True, False), (None, False, True), (None, True, False)]


def binder_report():
    """Runs in a process without the interpreter: every launch of the launch functions is replaced by Triton's sm_90
    binder and the bound path's own checks (nothing is launched). Returns the (kernel, HAS_P, HAS_W, HAS_B, aligned)
    seen."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    seen = set()

    def checked(kernel, grid, bindings, stream, args, kwargs):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        fast = launch.bound_tuple(kernel, args, kwargs)
        values = tuple(binder(*args, **kwargs)[0].values())
        assert len(values) == len(fast), (kernel.__name__, len(values), len(fast))
        for i, (a, b) in enumerate(zip(values, fast)):
            assert a is b if isinstance(a, torch.Tensor) else (type(a) is type(b) and a == b), (kernel.__name__, i)
        launch.check_binding(kernel, binder, args, kwargs, fast)  # the self-check a GPU runs when it binds
        bound = launch.Bound(name=kernel.__name__, run=None, function=0, packed_metadata=None, compiled=None,
                             tail=fast[len(args):], device=-1, knobs=launch.knob_state(kernel),
                             **launch.describe(kernel, args))
        aligned = all(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))
        assert launch.fits(bound, kernel, args) == aligned, kernel.__name__  # a misaligned launch is not bound
        seen.add((kernel.__name__, *(kwargs.get(flag) for flag in ("HAS_P", "HAS_W", "HAS_B")), aligned))

    launch.launch = checked
    d, r = 64, 8
    torch.manual_seed(0)
    for batch, seq_len, n, seed in SHAPES:
        for p, has_w, has_b in OPTIONAL:
            Q = torch.randn(r, d)
            P = {"Q": Q, "own": torch.randn(r, d), None: None}[p]
            W, b = torch.randn(r, d) if has_w else None, torch.randn(r) if has_b else None
            h = torch.randn(batch, seq_len, d)
            positions = torch.randint(0, seq_len, (batch, n))
            h_rows = torch.empty(batch, n, d)
            kernels.edit_forward(h, positions, Q, P, W, b, 2 if has_w else 0, 0.1, seed, torch.empty_like(h),
                                 h_rows=h_rows, copy_unselected=True)
            g = torch.randn_like(h)
            kernels.edit_backward(h_rows, g, positions, Q, P, W, b, 0, 0.1, seed, torch.empty_like(g),
                                  copy_unselected=True)
            kernels.edit_backward(h_rows, g, positions, Q, P, W, b, 0, 0.0, seed, g)  # in place
    misaligned = torch.empty(2 * 7 * d + 1)[1:].view(2, 7, d)  # 4 bytes off: Triton's "D" attribute is not set
    kernels.edit_forward(misaligned, torch.randint(0, 7, (2, 3)), Q, Q, W, b, 0, 0.0, 3, misaligned.clone())
    return sorted(seen, key=str)


def test_bound_tuples_equal_tritons_binder_at_every_launch():
    seen = [tuple(row) for row in compiled_report("test_triton_launch", "binder_report", timeout=300)]
    names = {row[0] for row in seen}
    assert names == {"_split_projections_kernel", "_edit_forward_kernel", "_edit_backward_rows_kernel",
                     "_edit_backward_weights_kernel", "_sum_weight_splits_kernel"}
    has_p = {row[1] for row in seen if row[0] == "_edit_forward_kernel"}
    has_w = {row[2] for row in seen if row[0] == "_edit_forward_kernel"}
    has_b = {row[3] for row in seen if row[0] == "_edit_forward_kernel"}
    assert has_p == has_w == has_b == {True, False}
    assert {row[4] for row in seen} == {True, False}  # the misaligned launch was checked too


STREAM = 0x5EED


class _FakeDriver:
    """Triton's driver for an sm_90 device that is not there: JITFunction.run compiles for real (ptxas from Triton's
    wheel), and the launcher it would call records its arguments instead of launching."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target, self.calls = GPUTarget("cuda", 90, 32), []
        driver = self

        class Utils:
            def get_device_properties(self, device):
                return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536}

            def load_binary(self, name, kernel, shared, device):
                return 1, hash(name) & 0xFFFF, 128, 0, 1024

            def unload_module(self, module):
                pass

        class Launcher:
            def __init__(self, src, metadata):
                self.name = src.fn.__name__

            def __call__(self, *args):
                driver.calls.append((self.name, args))

        self.utils, self.launcher_cls = Utils(), Launcher

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return STREAM


def fake_driver_report():
    """Forward and backward passes through the launch functions in the bound mode, with ``_FakeDriver`` as Triton's
    active driver (run in a process of its own). Each launch that went through its binding is repeated through
    Triton's own ``kernel[grid](...)`` with the same arguments. Returns [(kernel, bound launcher call, JIT launcher
    call)] for those launches."""
    from triton.runtime.driver import driver

    fake = _FakeDriver()
    driver.set_active(fake)
    launch._current_device = fake.get_current_device
    launch.MODE = "bound"
    real_plan_for, plans, pairs, took_bound = kernels.plan_for, {}, [], []

    def plan_for(*args):  # CPU tensors make CPU plans, which bind nothing: a bindings dict per plan, the fake stream
        plan = real_plan_for(*args)
        return plans.setdefault(id(plan), plan._replace(bindings={}, stream=STREAM))

    def paired(kernel, grid, bindings, stream, args, kwargs):
        took_bound.clear()
        start = len(fake.calls)
        real_launch(kernel, grid, bindings, stream, args, kwargs)
        if took_bound:
            kernel[grid](*args, **kwargs)
            pairs.append((kernel.__name__, *(_comparable(call) for _, call in fake.calls[start:start + 2])))

    real_launch, real_run_bound = launch.launch, launch.run_bound
    kernels.plan_for, launch.launch = plan_for, paired
    launch.run_bound = lambda *a: took_bound.append(1) or real_run_bound(*a)
    d, r = 64, 8
    torch.manual_seed(0)
    Q, W, b = torch.randn(r, d), torch.randn(r, d), torch.randn(r)
    for batch, seq_len, n in [(2, 7, 3), (16, 64, 14)]:  # few rows (split projections), many (several splits)
        h, g = torch.randn(batch, seq_len, d), torch.randn(batch, seq_len, d)
        positions = torch.randint(0, seq_len, (batch, n))
        for _ in range(2):  # the first pass binds, the second launches through the bindings
            h_rows = torch.empty(batch, n, d)
            kernels.edit_forward(h, positions, Q, Q, W, b, 2, 0.1, 7, torch.empty_like(h), h_rows=h_rows,
                                 copy_unselected=True)
            kernels.edit_backward(h_rows, g, positions, Q, Q, W, b, 2, 0.1, 7, torch.empty_like(g),
                                  copy_unselected=True)
    return pairs


def _comparable(call):
    """A launcher call as JSON: tensors by address, launch metadata by type (JIT: a LazyDict; bound: None, with no
    launch hook installed), hooks by identity."""
    if call is None:
        return None
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return [f"tensor@{a.data_ptr()}:{a.dtype}" if isinstance(a, torch.Tensor) else
            f"hook{hooks.index(a)}" if any(a is hook for hook in hooks) else
            "metadata" if i == 6 else a if isinstance(a, (int, float, str, bool)) or a is None else repr(a)
            for i, a in enumerate(call)]


def test_the_bound_launch_calls_the_launcher_as_tritons_jit_run_does():
    """Through Triton's real JITFunction.run (compiling for sm_90 here) and a launcher that records: after the first
    pass, every kernel is launched through its binding, with the same arguments Triton's own launch gave it."""
    rows = compiled_report("test_triton_launch", "fake_driver_report", timeout=600)
    assert {row[0] for row in rows} == {"_split_projections_kernel", "_edit_forward_kernel",
                                        "_edit_backward_rows_kernel", "_edit_backward_weights_kernel",
                                        "_sum_weight_splits_kernel"}
    for name, bound_call, jit_call in rows:
        assert bound_call == jit_call, name
        assert jit_call[3] == STREAM and jit_call[6] == "metadata"


# ---------------------------------------------------------------------------------------------------------------------
# The check of a bound launch, on a kernel of its own (a JITFunction made directly: the suite runs the interpreter)
# ---------------------------------------------------------------------------------------------------------------------
def _toy(x_ptr, y_ptr, n, d, seed, p, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    pass


TOY = JITFunction(_toy, do_not_specialize=["n", "seed"])


def _toy_args(n=5, d=64, seed=7, p=0.1, x=None, y=None):
    x = torch.randn(64) if x is None else x
    return (x, torch.randn(32) if y is None else y, n, d, seed, p)


def _bound_for(args, kwargs=None):
    kwargs = kwargs or dict(FLAG=True, BLOCK=16, num_warps=4)
    return launch.Bound(name="_toy", run=None, function=0, packed_metadata=None, compiled=None,
                        tail=launch.bound_tuple(TOY, args, kwargs)[len(args):], device=launch._current_device(),
                        knobs=launch.knob_state(TOY), **launch.describe(TOY, args))


def test_fits_the_launch_it_was_bound_at_and_new_plain_ints():
    args = _toy_args()
    bound = _bound_for(args)
    assert bound.tail == (True, 16)
    assert bound.fixed_at == (3,) and bound.free_at == (2, 4, 5) and bound.free_int_at == (2, 4)
    assert launch.fits(bound, TOY, args)
    assert launch.fits(bound, TOY, _toy_args(n=1 << 20, seed=2**31 - 1))  # plain ints: any value typed i32


@pytest.mark.parametrize("change", ["misaligned", "none", "dtype", "specialized-int", "wide-seed", "int-for-float",
                                    "fewer-args"])
def test_fits_refuses_what_would_pick_another_compiled_kernel(change):
    bound = _bound_for(_toy_args())
    args = {
        "misaligned": _toy_args(x=torch.randn(65)[1:]),  # 4 bytes past a 16-byte boundary
        "none": _toy_args()[:1] + (None,) + _toy_args()[2:],  # an optional tensor gone
        "dtype": _toy_args(x=torch.randn(64, dtype=torch.float64)),
        "specialized-int": _toy_args(d=48),  # d % 16 is specialized: another value may be another kernel
        "wide-seed": _toy_args(seed=2**31),  # Triton types it i64
        "int-for-float": _toy_args(p=0),
        "fewer-args": _toy_args()[:-1],
    }[change]
    assert not launch.fits(bound, TOY, args)


def test_fits_refuses_after_a_knob_a_hook_or_the_device_changed(monkeypatch):
    args = _toy_args()
    bound = _bound_for(args)
    monkeypatch.setattr(knobs.runtime, "debug", not knobs.runtime.debug)
    assert not launch.fits(bound, TOY, args)
    monkeypatch.undo()
    assert launch.fits(bound, TOY, args)
    monkeypatch.setattr(knobs.compilation, "instrumentation_mode", "something")
    assert not launch.fits(bound, TOY, args)
    monkeypatch.undo()
    monkeypatch.setattr(launch, "_current_device", lambda: bound.device + 1)
    assert not launch.fits(bound, TOY, args)
    monkeypatch.undo()
    TOY.pre_run_hooks.append(lambda *a, **k: None)
    try:
        assert not launch.fits(bound, TOY, args)
    finally:
        TOY.pre_run_hooks.clear()


class _JitRecorder:
    """Stands for a kernel in ``launch.launch``: its ``[grid](...)`` records a JIT launch and returns a token."""

    def __init__(self):
        self.jit = []
        for name in ("params", "signature", "debug", "pre_run_hooks", "__name__"):
            setattr(self, name, getattr(TOY, name))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.jit.append((grid, args, kwargs)) or "compiled"


def test_launch_binds_after_the_jit_launch_and_falls_back_when_the_check_fails(monkeypatch):
    kernel, bindings, fast = _JitRecorder(), {}, []
    # bind as the GPU would, minus the driver: a Bound when every pointer is aligned
    monkeypatch.setattr(launch, "bind", lambda k, compiled, stream, args, kwargs: _bound_for(args, kwargs) if all(
        a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor)) else None)
    monkeypatch.setattr(launch, "run_bound", lambda bound, grid, stream, args: fast.append(args))
    flags = dict(FLAG=True, BLOCK=16, num_warps=4)
    args = _toy_args()
    for _ in range(3):
        launch.launch(kernel, (4,), bindings, 11, args, flags)
    assert len(kernel.jit) == 1 and len(fast) == 2
    launch.launch(kernel, (4,), bindings, 11, _toy_args(x=torch.randn(65)[1:]), flags)  # misaligned: JIT
    launch.launch(kernel, (4,), bindings, 11, args, dict(flags, FLAG=False))  # another constexpr: JIT, then bound
    launch.launch(kernel, (4,), bindings, 11, args, dict(flags, FLAG=False))
    assert len(kernel.jit) == 3 and len(fast) == 3
    launch.launch(kernel, (4,), bindings, 11, args, flags)  # the first binding is still there
    assert len(kernel.jit) == 3 and len(fast) == 4
    launch.launch(kernel, (4,), None, 11, args, flags)  # no bindings (the jit mode, the CPU): always the JIT
    assert len(kernel.jit) == 4


def test_run_bound_calls_the_launcher_as_jit_run_does_and_is_counted():
    calls = []
    args = _toy_args()
    bound = _bound_for(args)._replace(run=lambda *a: calls.append(a), function=1234, packed_metadata="meta")
    with DeviceWork() as work:
        launch.run_bound(bound, (3, 2), 99, args)
    assert work.kernels == {"triton._toy": 1}
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    # no launch hook installed: no launch metadata (the empty hook chains ignore it)
    assert calls == [(3, 2, 1, 99, 1234, "meta", None, enter, leave, *args, True, 16)]


# ---------------------------------------------------------------------------------------------------------------------
# The setting
# ---------------------------------------------------------------------------------------------------------------------
def test_the_setting_defaults_to_bound_and_refuses_other_values():
    # bound is the default since its H200 measurement (2026-11-30: 0.67x the JIT's host cost per intervention)
    assert launch.launch_mode({}) == "bound"
    assert launch.launch_mode({"REFT_FAST_TRITON_LAUNCH": "jit"}) == "jit"
    assert launch.launch_mode({"REFT_FAST_TRITON_LAUNCH": "bound"}) == "bound"
    with pytest.raises(ValueError, match="REFT_FAST_TRITON_LAUNCH='fast': expected one of jit, bound"):
        launch.launch_mode({"REFT_FAST_TRITON_LAUNCH": "fast"})


def test_a_bad_setting_fails_the_import_of_the_kernels():
    env = dict(os.environ, REFT_FAST_TRITON_LAUNCH="Bound")
    proc = subprocess.run([sys.executable, "-c", "import reft_fast.kernels.low_rank_edit"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "REFT_FAST_TRITON_LAUNCH='Bound': expected one of jit, bound" in proc.stderr


def test_bound_on_a_triton_it_was_not_written_for_warns_and_launches_through_the_jit():
    assert launch.written_for("3.6.0") and launch.written_for("3.9.0+git1234abc") and launch.written_for("3.9.1")
    assert not launch.written_for("3.7.0") and not launch.written_for("4.0.0") and not launch.written_for("dev")
    assert launch.resolve("bound", "3.6.0") == "bound" and launch.resolve("jit", "3.7.0") == "jit"
    with pytest.warns(RuntimeWarning, match="written against Triton 3.6, 3.9; this is Triton 3.7.0"):
        assert launch.resolve("bound", "3.7.0") == "jit"
    with warnings.catch_warnings():  # only the default, not asked for: the JIT without a word
        warnings.simplefilter("error")
        assert launch.resolve("bound", "3.7.0", asked=False) == "jit"
        assert launch.resolve("bound", "3.9.0", asked=False) == "bound"


def test_plans_are_kept_apart_by_mode_and_bind_nothing_off_cuda():
    h, positions = torch.randn(2, 5, 32), torch.zeros(2, 3, dtype=torch.long)
    with launch.using("jit"):
        jit_plan = kernels.plan_for(h, positions, 4)
    with launch.using("bound"):
        bound_plan = kernels.plan_for(h, positions, 4)
        assert launch.MODE == "bound"
    assert jit_plan is not bound_plan
    assert jit_plan.bindings is None and bound_plan.bindings is None  # the CPU: the interpreter's JIT path


# ---------------------------------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------------------------------
def _edit_pass(mode, h, g, positions, Q, P, W, b, dropout, seed):
    """Forward (copy and in place) and backward (copy and in place) through the launch functions, in ``mode``."""
    with launch.using(mode):
        # h_rows zeroed: the kernels write the slots of selected rows only (a -1 slot's row is never read), so an
        # empty one differed between two JIT runs too (H200, 2026-11-30); zeros also catch a write to such a slot
        out, h_rows = torch.empty_like(h), torch.zeros(*positions.shape, h.shape[-1], dtype=h.dtype, device=h.device)
        kernels.edit_forward(h, positions, Q, P, W, b, 2, dropout, seed, out, h_rows=h_rows, copy_unselected=True)
        in_place = h.clone()
        kernels.edit_forward(in_place, positions, Q, P, W, b, 2, dropout, seed, in_place, h_rows=torch.empty_like(
            h_rows))
        grad_h = torch.empty_like(g)
        grads = kernels.edit_backward(h_rows, g, positions, Q, P, W, b, 2, dropout, seed, grad_h, copy_unselected=True)
        g_in_place = g.clone()
        grads_in_place = kernels.edit_backward(h_rows, g_in_place, positions, Q, P, W, b, 2, dropout, seed, g_in_place)
    return [out, in_place, h_rows, grad_h, g_in_place, *grads, *grads_in_place]


@pytest.mark.cuda
@pytest.mark.parametrize("B,T,n", [(2, 32, 14), (8, 512, 14), (64, 128, 30)], ids=["few", "many", "more"])
@pytest.mark.parametrize("optional", range(len(OPTIONAL)))
def test_bound_launches_give_the_jit_results_bit_for_bit(monkeypatch, B, T, n, optional):
    p, has_w, has_b = OPTIONAL[optional]
    d, r = 256, 8
    Q = torch.randn(r, d, device=DEVICE)
    P = {"Q": Q, "own": torch.randn(r, d, device=DEVICE), None: None}[p]
    W = torch.randn(r, d, device=DEVICE) / d**0.5 if has_w else None
    b = torch.randn(r, device=DEVICE) if has_b else None
    positions = make_positions(B, T, n)
    h, g = torch.randn(B, T, d, device=DEVICE, dtype=torch.bfloat16), torch.randn(B, T, d, device=DEVICE)
    g = g.to(torch.bfloat16)
    bound_launches = []
    real = launch.run_bound
    monkeypatch.setattr(launch, "run_bound", lambda *a: bound_launches.append(a[0].name) or real(*a))
    for seed in (3, 2**31 - 1):
        expected = _edit_pass("jit", h, g, positions, Q, P, W, b, 0.1, seed)
        for _ in range(2):  # the first pass binds, the second launches through the bindings
            for want, got in zip(expected, _edit_pass("bound", h, g, positions, Q, P, W, b, 0.1, seed)):
                assert (want is None) == (got is None)
                if want is not None:
                    assert torch.equal(want, got)
    assert bound_launches, "no launch went through the bound path"


@pytest.mark.cuda
def test_after_the_first_step_no_launch_goes_through_jit_run(monkeypatch):
    params = make_params("loreft", 8, 128)
    positions = make_positions(8, 32, 14)
    h = torch.randn(8, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    g = torch.randn_like(h)
    args = (h, g, positions, params["Q"], params["P"], params["W"], params["b"], 0.1, 5)
    _edit_pass("bound", *args)  # binds every kernel of the pass

    def refused(*a, **k):
        raise AssertionError("JITFunction.run was called after the kernels were bound")

    monkeypatch.setattr(JITFunction, "run", refused)
    with DeviceWork() as work:
        _edit_pass("bound", *args)
    triton_launches = sum(count for name, count in work.kernels.items() if name.startswith("triton."))
    assert triton_launches >= 6, dict(work.kernels)  # forward twice, backward twice: every kernel ran bound
