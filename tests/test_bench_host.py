"""bench/bench_host.py in smoke mode: every variant's row, the CSV's columns, finite paired differences."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_host_smoke_writes_finite_paired_differences(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_host.py"), "--smoke", "--out",
                                str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "load average" in completed.stdout
    [path] = tmp_path.glob("host_smoke_*.csv")  # not host_*: a smoke run must not replace the measurement
    with open(path, newline="") as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_host

    with open(path, newline="") as f:
        assert next(csv.reader(f)) == bench_host.FIELDS
    assert list(rows) == [*bench_host.VARIANTS, "reft-fast:triton"]
    for variant in ("reft-fast:torch", "hook-loreft"):
        row = rows[variant]
        assert row["status"] == "ok" and int(row["n_interventions"]) == 32
        for key in ("step_ms", "minus_floor_ms", "per_intervention_ms", "ratio_to_hook"):
            assert math.isfinite(float(row[key])), (variant, key, row[key])
    assert rows["pyreft"]["status"] == "ok" or rows["pyreft"]["status"].startswith("not run: pyreft")
    triton = rows["reft-fast:triton"]
    assert int(triton["triton_launches"]) > 0 and float(triton["launches_per_intervention"]) > 0
    assert math.isfinite(float(triton["stubbed_per_intervention_ms"]))
    assert all(row["machine"] and row["torch"] and row["date"] and row["threads"] == "1" for row in rows.values())


def test_the_gpu_table_times_the_triton_path_among_the_variants(monkeypatch):
    """``--device cuda`` times reft-fast:triton with the others (its kernels run: on a GPU its step − floor is its
    host cost with Triton's launcher) and puts its launch counts and stubbed time on that same row. The code path runs
    here on the CPU with the Triton launches stubbed and a few repetitions (times meaningless)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as the suite runs the kernels (before bench_host imports them)
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_host

    # pyreft's row is covered above, the DeepSpeed variants' by test_the_deepspeed_variants_step_through_the_engine
    variants = tuple(v for v in bench_host.CUDA_VARIANTS if v != "pyreft" and v not in bench_host.DS_VARIANTS)

    def never_built(*args, **kwargs):
        raise AssertionError("a captured variant was built off CUDA")

    monkeypatch.setattr(bench_host, "build_graph_step", never_built)
    eager_tables = []
    with bench_host.stubbed_launches():  # the interpreter would take minutes; the rows' making is what is tested
        rows = {row["variant"]: row for row in bench_host.measure(2, 1, log=lambda *_: None, variants=variants,
                                                                  on_eager_rows=eager_tables.append)}
    assert list(rows) == list(variants)
    # the captured variants (CUDA graphs) get their rows, never built on the CPU; the eager table came first
    for variant in bench_host.GRAPH_VARIANTS:
        assert rows[variant]["status"] == "not run: CUDA graphs need --device cuda" and "step_ms" not in rows[variant]
    [eager_table] = eager_tables
    assert [row["variant"] for row in eager_table] == [v for v in variants if v not in bench_host.GRAPH_VARIANTS]
    triton = rows["reft-fast:triton"]
    assert triton["n_interventions"] == 32 and math.isfinite(triton["per_intervention_ms"])
    assert triton["triton_launches"] > 0 and math.isfinite(triton["stubbed_per_intervention_ms"])
    assert "launches counted" in triton["status"]
    assert math.isfinite(rows["hook-loreft"]["ratio_to_hook"])
    # both launch modes of the Triton path in the same repetitions (REFT_FAST_TRITON_LAUNCH=jit and =bound)
    bound = rows["reft-fast:triton-bound"]
    assert bound["n_interventions"] == 32 and math.isfinite(bound["ratio_to_triton_jit"])
    assert triton["ratio_to_triton_jit"] == 1.0


def test_the_triton_variants_run_in_their_own_launch_mode(monkeypatch):
    """reft-fast:triton is the JIT launch whatever REFT_FAST_TRITON_LAUNCH says, reft-fast:triton-bound the bound
    one: each step runs inside its mode (launch plans are made per mode)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_host

    from reft_fast.kernels import launch

    seen = []
    wrapped = bench_host._in_launch_mode(lambda: seen.append(launch.MODE), "bound")
    before = launch.MODE
    wrapped()
    assert seen == ["bound"] and launch.MODE == before
    assert bench_host.LAUNCH_MODES == {"reft-fast:triton": "jit", "reft-fast:triton-bound": "bound"}


def test_device_cuda_without_a_gpu_is_an_argparse_error(monkeypatch, capsys):
    """It was a bare line on stderr from main(), without the usage, after the imports; bench_packing's is a usage
    error."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_host

    monkeypatch.setattr(bench_host.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench_host._parse_args(["--smoke", "--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "argument --device: cuda, but torch sees no CUDA device here" in err


def _bench_host():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_host

    return bench_host


def test_the_captured_variants_are_cuda_only():
    """floor-graph and reft-fast:triton-graph (CUDA graphs) are in the GPU table only: not in the CPU's variants, not
    accepted by ``--variants`` with ``--device cpu``, and ``_graph_times`` on the CPU gives them a status without
    building them."""
    bench_host = _bench_host()
    graphs = set(bench_host.GRAPH_VARIANTS)
    assert graphs <= set(bench_host.CUDA_VARIANTS) and not graphs & set(bench_host.VARIANTS)
    assert bench_host._parse_args(["--device", "cpu"]).variants is None  # measure() then takes VARIANTS
    assert bench_host._parse_args(["--device", "cpu", "--variants", "floor,hook-loreft"]).variants == (
        "floor", "hook-loreft")
    for variants in ("floor,reft-fast:triton-graph", "hook-loreft"):
        with pytest.raises(SystemExit) as exit_info:
            bench_host._parse_args(["--device", "cpu", "--variants", variants])
        assert exit_info.value.code == 2
    sizes, statuses = {}, {}
    assert bench_host._graph_times(list(graphs), "cpu", 2, 1, "llama", lambda *_: None, sizes, statuses) == {}
    assert statuses == {v: "not run: CUDA graphs need --device cuda" for v in graphs} and sizes == {}


def test_capture_refuses_clearly_on_the_cpu(monkeypatch):
    """The capture helpers name what is missing before touching any CUDA API or building a model: CPU parameters, a
    device other than cuda, an optimizer that is not capturable."""
    bench_host = _bench_host()
    layer = torch.nn.Linear(4, 1)
    calls = []

    def loss_fn():
        calls.append(1)
        return layer(torch.ones(2, 4)).sum()

    optimizer = torch.optim.AdamW(layer.parameters(), capturable=True)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device: the parameters are on \\['cpu'\\]"):
        bench_host.capture_step(loss_fn, optimizer, warmup=1)
    assert calls == []  # no warm-up step ran

    monkeypatch.setattr(bench_host.bench_e2e, "training_parts", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device, not 'cpu'"):
        bench_host.build_graph_step("reft-fast:triton-graph", "cpu")


def test_the_replayed_floor_steps_through_its_graphed_loss(monkeypatch):
    """floor-replayed (the recipe's training.cuda_graphs route for the floor): its loss graphed by the capture it is
    given (here one that returns the module itself: make_graphed_callables needs CUDA), then zero_grad, backward and
    AdamW eagerly; the bias trains and the status compares the replayed loss with the eager one. Without a GPU and
    without a stand-in it refuses before building a model. (reft-fast:triton-replayed's loss is CapturedLoss,
    tests/test_graphs.py; its kernels would take half a minute in Triton's interpreter here.)"""
    bench_host = _bench_host()
    assert set(bench_host.REPLAYED_VARIANTS) <= set(bench_host.GRAPH_VARIANTS) <= set(bench_host.CUDA_VARIANTS)
    assert bench_host.PAIRED_FLOOR["reft-fast:triton-replayed"] == "floor-replayed"
    captured, modules = [], []

    def stand_in(module, sample_args, **kwargs):
        captured.append((type(module).__name__, [tuple(a.shape) for a in sample_args], kwargs))
        modules.append(module)
        return module

    step, n, status, issued = bench_host.build_replayed_step("floor-replayed", "cpu", "toy", 1, capture=stand_in)
    assert captured == [("FloorLoss", [(8, 32)] * 4, {"num_warmup_iters": 1})] and n == 0
    assert [name for name, _ in modules[0].named_parameters()] == ["bias"]  # the base's weights are no graph input
    assert status.startswith("forward and backward graphed; replayed loss − eager 0 (loss "), status
    bias = modules[0].bias.detach().clone()
    step()
    assert len(issued) == 1 and issued[0] > 0 and not torch.equal(modules[0].bias.detach(), bias)
    monkeypatch.setattr(bench_host.bench_e2e, "training_parts", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device, not 'cpu'"):
        bench_host.build_replayed_step("reft-fast:triton-replayed", "cpu")


def _regression(seed: int = 0):
    """A small model, its loss on a fixed batch, its AdamW (the shape of a bench step, cheap on the CPU)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    for _ in range(2):  # optimizer state present, as after a capture's warm-up
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    return loss_fn, optimizer, list(model.parameters())


def test_the_replay_check_tells_a_faithful_replay_from_a_stale_one():
    """``replay_check`` (what the GPU run reports on each captured row): a "replay" that does the eager step matches;
    one whose optimizer step is lost, or whose gradients are stale (the first step's, replayed), is reported as
    differing, from losses and parameters. On the CPU the replay is a Python stand-in, not a CUDA graph."""
    bench_host = _bench_host()
    loss_fn, optimizer, params = _regression()
    eager = bench_host._eager_step_on_static_grads(loss_fn, optimizer)
    static = torch.zeros(())
    matches, status = bench_host.replay_check(lambda: static.copy_(eager()), static, eager, params, optimizer)
    assert matches and status.startswith("replay matches eager: max |Δloss| = 0.0e+00 over 3 steps")

    def without_update():
        optimizer.zero_grad(set_to_none=False)
        static.copy_(loss_fn().detach())

    matches, status = bench_host.replay_check(without_update, static, eager, params, optimizer)
    assert not matches and status.startswith("replay DIFFERS from eager")
    frozen = [p.grad.clone() for p in params]

    def stale_gradients():
        static.copy_(loss_fn().detach())
        for p, g in zip(params, frozen):
            p.grad.copy_(g)
        optimizer.step()

    assert not bench_host.replay_check(stale_gradients, static, eager, params, optimizer)[0]


def test_a_captured_step_is_paired_with_the_captured_floor():
    """reft-fast:triton-graph's step − floor is taken against floor-graph's times (capture takes the floor's Python
    off the host too), its ratio_to_triton_jit against the eager reft-fast:triton's; floor-graph is a floor."""
    bench_host = _bench_host()
    times = {"floor": [10.0] * 3, "reft-fast:triton": [50.0] * 3, "hook-loreft": [90.0] * 3,
             "floor-graph": [1.0] * 3, "reft-fast:triton-graph": [1.8] * 3}
    sizes = {"reft-fast:triton": 32, "hook-loreft": 32, "reft-fast:triton-graph": 32}
    statuses = {"floor-graph": "replay matches eager", "reft-fast:triton-graph": "replay matches eager"}
    rows = {row["variant"]: row for row in bench_host._timed_rows(list(times), times, sizes, statuses, {})}
    graph = rows["reft-fast:triton-graph"]
    assert graph["minus_floor_ms"] == pytest.approx(0.8) and graph["per_intervention_ms"] == pytest.approx(0.8 / 32)
    assert graph["ratio_to_triton_jit"] == pytest.approx(0.8 / 40) and graph["ratio_to_hook"] == pytest.approx(0.01)
    assert graph["status"] == "replay matches eager"
    assert rows["floor-graph"]["n_interventions"] == 0 and "minus_floor_ms" not in rows["floor-graph"]
    assert rows["floor-graph"]["step_ms"] == 1.0
    del times["floor-graph"]  # its capture failed: the captured step keeps its time, without a paired figure
    rows = {row["variant"]: row for row in bench_host._timed_rows(list(times), times, sizes, statuses, {})}
    assert "minus_floor_ms" not in rows["reft-fast:triton-graph"] and rows["reft-fast:triton-graph"]["step_ms"] == 1.8
    assert rows["reft-fast:triton-graph"]["status"].endswith("; floor-graph not timed: no paired figure")


def test_a_failed_capture_status_names_the_phase_and_the_first_error():
    """torch.cuda.graph's exit ends the capture, which fails on its own after an error inside: the status keeps both
    and the phase (``not run: capture failed: ...``)."""
    bench_host = _bench_host()
    with pytest.raises(RuntimeError) as raised:
        with bench_host._phase("capture"):
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
            finally:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    assert bench_host.failure_status(raised.value) == (
        "not run: capture failed: RuntimeError: CUDA error: operation failed due to a previous error during capture "
        "[in capture] (after RuntimeError: CUDA error: operation not permitted when stream is capturing)")


def test_the_captured_reft_step_has_no_dropout(monkeypatch):
    """A ReftModel draws each forward's dropout seed on the host (``ReftModel._seeds``): a captured step would replay
    it as a constant. reft-fast:triton-graph's interventions (the eager reft-fast:triton's config) have none."""
    bench_host = _bench_host()
    import reft_fast

    built = []
    original = reft_fast.get_reft_model
    monkeypatch.setattr(reft_fast, "get_reft_model", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    bench_host.bench_e2e.SHAPES.setdefault("host", bench_host.HOST_SHAPE)
    row = bench_host._row(bench_host.GRAPH_VARIANTS["reft-fast:triton-graph"])
    bench_host.bench_e2e.training_parts(bench_host.build_base(row), row, capturable=True)
    [model] = built
    assert len(model.interventions) == 32
    assert all(intervention.dropout_rate == 0.0 for intervention in model.interventions.values())


def _ds_table(bench_host, monkeypatch, variants):
    """The rows of ``variants`` on the toy base, 2 repetitions, the Triton path's launch counts left out (their
    interpreter runs are test_bench_host_smoke's), and the DeepSpeed engines built."""
    engines = []
    built = bench_host.build_ds_step

    def recorded(*args, **kwargs):
        step, size, engine = built(*args, **kwargs)
        engines.append(engine)
        return step, size, engine

    monkeypatch.setattr(bench_host, "build_ds_step", recorded)
    monkeypatch.setattr(bench_host, "_triton_figures", lambda *args: ({}, 32))
    rows = bench_host.measure(2, 1, log=lambda *_: None, variants=variants, base="toy")
    return {row["variant"]: row for row in rows}, engines


def test_the_deepspeed_variants_step_through_the_engine(monkeypatch):
    """reft-fast:triton-ds0/-ds2 step through a DeepSpeed engine of their own (ZeRO stage 0 with the recipe's
    clipping, stage 2), in a world of one made and torn down by the table; on the CPU with the Triton launches
    stubbed (garbage gradients: ZeRO-2 must still take every step), beside the plain reft-fast:triton (added when not
    asked for), whose step − floor their ratio_to_plain divides by."""
    import torch.distributed as dist

    bench_host = _bench_host()
    assert "reft-fast:triton-ds0" in bench_host.CUDA_VARIANTS and not set(bench_host.DS_VARIANTS) & set(
        bench_host.VARIANTS)
    rendezvous = {name: os.environ.get(name) for name in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    rows, engines = _ds_table(bench_host, monkeypatch, ("floor", "reft-fast:triton-ds0", "reft-fast:triton-ds2"))
    assert list(rows) == ["floor", "reft-fast:triton", "reft-fast:triton-ds0", "reft-fast:triton-ds2"]
    for variant in ("reft-fast:triton-ds0", "reft-fast:triton-ds2"):
        row = rows[variant]
        assert row["status"] == f"ok; {bench_host.STUBBED_STATUS}" and row["n_interventions"] == 32
        for key in ("step_ms", "minus_floor_ms", "per_intervention_ms", "ratio_to_plain"):
            assert math.isfinite(row[key]), (variant, key, row[key])
        plain = rows["reft-fast:triton"]["minus_floor_ms"]
        assert row["ratio_to_plain"] == pytest.approx(row["minus_floor_ms"] / plain)
    assert math.isfinite(plain) and "ratio_to_plain" not in rows["reft-fast:triton"]
    stage0, stage2 = engines
    assert [engine.zero_optimization_stage() for engine in engines] == [0, 2]
    # warm-up and timed steps, each an optimizer step through the engine; none skipped for non-finite gradients
    assert [(engine.global_steps, engine.skipped_steps) for engine in engines] == [(3, 0), (3, 0)]
    assert stage0.gradient_clipping() == 0.0 and not stage0.enable_backward_allreduce  # the recipe's clipping, no
    assert not dist.is_initialized()  # all-reduce on one rank; the world of one is gone, its variables put back
    assert {name: os.environ.get(name) for name in rendezvous} == rendezvous


def test_without_deepspeed_its_variants_say_so(monkeypatch):
    """Where deepspeed is not importable (the GPU image without its wheel), the DeepSpeed variants' rows say so and
    the others are timed."""
    bench_host = _bench_host()
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed: ModuleNotFoundError
    rows, engines = _ds_table(bench_host, monkeypatch, ("floor", "reft-fast:triton-ds0"))
    assert rows["reft-fast:triton-ds0"]["status"] == "not run: deepspeed not installed" and engines == []
    assert "step_ms" not in rows["reft-fast:triton-ds0"] and math.isfinite(rows["reft-fast:triton"]["minus_floor_ms"])


def test_the_deepspeed_variants_are_opt_in_on_a_cpu():
    bench_host = _bench_host()
    args = bench_host._parse_args(["--device", "cpu", "--variants", "floor,reft-fast:torch-ds2,reft-fast:triton"])
    assert args.variants == ("floor", "reft-fast:torch-ds2", "reft-fast:triton")
    assert bench_host._with_plain_variants(args.variants) == (
        "floor", "reft-fast:torch", "reft-fast:torch-ds2", "reft-fast:triton")


def test_a_deepspeed_variant_that_cannot_be_built_is_a_status_not_a_crash(monkeypatch):
    """On the GPU machine an engine or NCCL group that cannot be made must not cost the rest of the host table."""
    bench_host = _bench_host()

    def no_group(*args, **kwargs):
        raise RuntimeError("NCCL error: unhandled system error")

    monkeypatch.setattr(bench_host, "build_ds_step", no_group)
    monkeypatch.setattr(bench_host, "_triton_figures", lambda *args: ({}, 32))
    rows = {row["variant"]: row for row in bench_host.measure(2, 1, log=lambda *_: None, base="toy",
                                                             variants=("floor", "reft-fast:triton-ds0"))}
    assert rows["reft-fast:triton-ds0"]["status"] == "not run: RuntimeError: NCCL error: unhandled system error"
    assert math.isfinite(rows["reft-fast:triton"]["minus_floor_ms"])
