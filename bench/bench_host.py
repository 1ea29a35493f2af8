"""What a ReFT step costs the host over the frozen model: the table of issue 15 as one command.

    python bench/bench_host.py                 # the table: 400 paired repetitions, one thread (a few minutes on a CPU)
    python bench/bench_host.py --smoke         # a few repetitions (the test suite runs this), same columns
    python bench/bench_host.py --base toy      # the same on layers that only add a vector: resolves microseconds

Model: a random tiny Llama (32 layers, hidden 64, vocabulary 256), batch 8 × 32 tokens, fp32, SDPA; LoReFT rank 8 at
all 32 layers, positions f7+l7 of the 16-token prompt, shared weights (one intervention per layer on 14 positions).
So small that the step is all host time: Python, dispatch, launches and synchronizations, the costs a ReFT
implementation adds to the frozen model.

Variants, each on a base of its own (bench/bench_e2e.py's set-ups):
  floor            forward + backward down to layer 0 with one trainable bias there (the least any ReFT step costs)
  reft-fast:torch  reft_fast.get_reft_model with the torch backend (the CPU default)
  hook-loreft      a plain forward hook: gather, edit with a plain R (torch's orthogonal parametrization), scatter
  pyreft           pyreft 0.1.0 on pyvene, when importable (its trainer's ``.tolist()`` of the locations included)
A step is zero_grad, forward with labels, backward and an AdamW step. Each repetition runs one step of every variant
in a shuffled order, and each variant's time is paired with the floor's of the same repetition: the table gives the
median of the paired differences (step − floor), robust to the load of other processes on a shared machine, which is
printed (load average) and written with the results.

The Triton path (reft-fast:triton) cannot be timed on a CPU: its kernels run in Triton's interpreter. Its launches are
counted for one step (tests/launch_count.py: Triton kernels and the aten ops that would be device kernels), and its
host time is measured with the kernel launches stubbed out (the kernels' outputs are then garbage; only the time
counts). On a CPU the stub replaces the interpreter's launch: the host cost of Triton's own JIT launcher (binding the
arguments, the cache lookup: it needs a GPU driver) is not in that figure.

    python bench/bench_host.py --device cuda   # on a GPU: the same table with reft-fast:triton timed for real

On a GPU (``--device cuda``) every variant runs there, reft-fast:triton among the timed ones, each step followed by a
synchronization inside its timed region. The shape is so small that the device finishes each kernel in microseconds,
so a step's time is the host's: step − floor of reft-fast:triton is its host cost with Triton's JIT launcher, and
the stubbed figure beside it the same without the launches (their difference: the launcher and the kernels).
reft-fast:triton-bound is the same step with its kernels bound once per launch plan (REFT_FAST_TRITON_LAUNCH=bound,
kernels/launch.py; reft-fast:triton runs with =jit whatever the environment says), timed in the same repetitions:
its ratio_to_triton_jit is its step − floor over reft-fast:triton's.

Writes bench/results/<machine>_<date>/host_<machine>_<date>.csv (machine, versions, date, load in every row;
host_smoke_... with --smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before reft_fast's Triton kernels are decorated

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_e2e / bench_kernels: the variants' set-ups, the environment and CSV helpers
sys.path.insert(0, str(HERE.parent / "tests"))  # launch_count: the launch and host-sync counter
import bench_e2e  # noqa: E402
from bench_kernels import environment, print_table, result_path, results_folder, write_csv  # noqa: E402

from reft_fast.train.cli import positive_int  # noqa: E402

HOST_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
VARIANTS = ("floor", "reft-fast:torch", "hook-loreft", "pyreft")
# triton timed too, in both launch modes
CUDA_VARIANTS = ("floor", "reft-fast:triton", "reft-fast:triton-bound", "reft-fast:torch", "hook-loreft", "pyreft")
LAUNCH_MODES = {"reft-fast:triton": "jit", "reft-fast:triton-bound": "bound"}  # REFT_FAST_TRITON_LAUNCH per variant
FIELDS = ["machine", "torch", "triton", "transformers", "pyreft", "date", "threads", "load_1min", "reps", "base",
          "clock", "variant",
          "n_interventions", "step_ms", "minus_floor_ms", "minus_floor_q1_ms", "minus_floor_q3_ms",
          "per_intervention_ms", "ratio_to_hook", "ratio_to_triton_jit", "triton_launches", "aten_launches",
          "launches_per_intervention", "host_syncs", "stubbed_minus_floor_ms", "stubbed_per_intervention_ms", "status"]


def _row(variant: str, device: str = "cpu") -> dict:
    return dict(shape="host", config="b", method=variant, batch=8, seq_len=32, dtype="float32", device=device,
                checkpointing=False, fused=False)


def _in_launch_mode(step, mode: str):
    """The step with the Triton kernels launched in ``mode`` (kernels/launch.py; launch plans are kept per mode)."""
    from reft_fast.kernels import launch

    def step_in_mode():
        with launch.using(mode):
            return step()

    return step_in_mode


class ToyLayer(torch.nn.Module):
    """A decoder layer that adds a frozen vector to its hidden states, called exactly as a Llama layer is (same
    arguments, same hooks): ``--base toy`` puts 32 of them in the tiny Llama, whose step then costs the host about
    2 ms instead of about 60, so that step − floor resolves microseconds (for A/B measurements of host-path changes;
    the table itself is taken on the real layers)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("shift", torch.full((hidden_size,), 1e-3))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.shift


def build_base(row: dict, base: str = "llama"):
    model = bench_e2e.build_base(row)
    if base == "toy":
        layers = model.model.layers
        for i in range(len(layers)):
            layers[i] = ToyLayer(model.config.hidden_size).to(row["device"])
    return model


def build_step(variant: str, device: str = "cpu", base: str = "llama"):
    """(one training step of the variant, its number of interventions, its trained parameters) on a base of its own
    (``base``: the tiny Llama, or its ``toy`` form: ToyLayer). On CUDA the step ends with a synchronization: its time
    is then that of the work it issued, done."""
    bench_e2e.SHAPES.setdefault("host", HOST_SHAPE)
    mode = LAUNCH_MODES.get(variant)
    row = _row("reft-fast:triton" if mode else variant, device)
    step, layers, _, params, _ = bench_e2e.training_step(build_base(row, base), row)
    if mode:
        step = _in_launch_mode(step, mode)
    if device == "cuda":
        def synchronized_step():
            loss = step()
            torch.cuda.synchronize()
            return loss

        return synchronized_step, len(layers), params
    return step, len(layers), params


def clock(device: str):
    """The timer of a step: on the CPU this thread's CPU time (what other processes take of a shared core is not
    counted: on 2 shared cores wall time swung the paired figure by 2×), on a GPU wall time (the step's end waits
    for the device)."""
    return time.thread_time if device == "cpu" else time.perf_counter


def paired_times(steps: dict, reps: int, seed: int = 0, device: str = "cpu") -> dict:
    """Milliseconds per step of every variant in each of ``reps`` repetitions, the order shuffled per repetition."""
    order, rng, now = list(steps), random.Random(seed), clock(device)
    times = {name: [] for name in steps}
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start = now()
            steps[name]()
            times[name].append((now() - start) * 1e3)
    return times


def _quartiles(values: list) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, median, q3


@contextlib.contextmanager
def stubbed_launches():
    """Triton kernel launches do nothing inside the block (their outputs keep whatever memory they had), those of
    kernels bound once (kernels/launch.py) included."""
    from launch_count import _kernel_classes

    from reft_fast.kernels import launch

    originals = [(cls, cls.run) for cls in _kernel_classes()]
    bound_run = launch.run_bound
    try:
        for cls, _ in originals:
            cls.run = lambda kernel, *args, **kwargs: None
        launch.run_bound = lambda *args, **kwargs: None
        yield
    finally:
        for cls, run in originals:
            cls.run = run
        launch.run_bound = bound_run


def stubbed_differences(step, params, floor_step, reps: int, device: str = "cpu") -> list[float]:
    """Paired milliseconds (step − floor) with the Triton launches stubbed out. The stubbed kernels leave garbage in
    the gradients, so the parameters are put back after every step (outside the timed region)."""
    saved, now = [p.detach().clone() for p in params], clock(device)
    differences = []
    for _ in range(reps):
        start = now()
        floor_step()
        floor_ms = (now() - start) * 1e3
        with stubbed_launches():
            start = now()
            step()
            differences.append((now() - start) * 1e3 - floor_ms)
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    return differences


def launch_counts(step) -> dict:
    """Triton launches, aten ops that would be device kernels, and host syncs of one step (tests/launch_count.py)."""
    from launch_count import DeviceWork

    with DeviceWork() as work:
        step()
    triton = sum(v for k, v in work.kernels.items() if k.startswith("triton."))
    return dict(triton_launches=triton, aten_launches=work.launches - triton, host_syncs=len(work.syncs))


def _built_variants(variants, device: str, log, base: str) -> tuple[dict, dict, dict]:
    """(steps, numbers of interventions, statuses) of the variants; pyreft, when it cannot be built, gets a status."""
    steps, sizes, statuses = {}, {}, {}
    for variant in variants:
        try:
            if variant == "pyreft" and bench_e2e.skip_reason(_row("pyreft", device)):
                raise ImportError("not importable here (pip install --no-deps pyreft==0.1.0 pyvene==0.1.8)")
            steps[variant], sizes[variant], _ = build_step(variant, device, base)
        except Exception as error:  # pyreft's import pulls optional libraries: report, and time the others
            if variant != "pyreft":
                raise
            statuses[variant] = f"not run: pyreft: {type(error).__name__}: {error}"
            log(statuses[variant])
    return steps, sizes, statuses


def _triton_figures(steps: dict, device: str, reps: int, warmup: int, base: str) -> tuple[dict, int]:
    """The Triton path's launches per step (over the floor's, per intervention) and its host time with the launches
    stubbed: its columns, and its number of interventions."""
    # a base of its own: the stubbed steps leave garbage in its interventions (put back, but not in a timed variant's)
    triton_step, n_triton, triton_params = build_step("reft-fast:triton", device, base)
    for _ in range(warmup):
        triton_step()
    counts, floor_counts = launch_counts(triton_step), launch_counts(steps["floor"])
    # Over the floor's own: what the interventions add (helper ops and the optimizer over their parameters included).
    counts["launches_per_intervention"] = sum(counts[k] - floor_counts[k] for k in ("triton_launches",
                                                                                  "aten_launches")) / n_triton
    stub_median = statistics.median(stubbed_differences(triton_step, triton_params, steps["floor"],
                                                        max(reps // 4, 3), device))
    counts.update(stubbed_minus_floor_ms=stub_median, stubbed_per_intervention_ms=stub_median / n_triton)
    return counts, n_triton


def _timed_rows(variants, times: dict, sizes: dict, statuses: dict, common: dict) -> list[dict]:
    """One row per variant: its median step, and the median, quartiles and per-intervention figure of the paired
    differences with the floor; ratio_to_hook against hook-loreft's."""
    rows, hook_diff, jit_diff = [], None, None
    for variant in variants:
        row = dict(common, variant=variant, status=statuses.get(variant, "ok"))
        if variant in times:
            diffs = [t - f for t, f in zip(times[variant], times["floor"])]
            q1, median, q3 = _quartiles(diffs)
            row.update(n_interventions=sizes[variant] if variant != "floor" else 0,
                       step_ms=statistics.median(times[variant]))
            if variant != "floor":
                row.update(minus_floor_ms=median, minus_floor_q1_ms=q1, minus_floor_q3_ms=q3,
                           per_intervention_ms=median / sizes[variant])
            if variant == "hook-loreft":
                hook_diff = median
            if variant == "reft-fast:triton":
                jit_diff = median
        rows.append(row)
    for row in rows:
        if hook_diff and "minus_floor_ms" in row:
            row["ratio_to_hook"] = row["minus_floor_ms"] / hook_diff
        if jit_diff and row["variant"] in LAUNCH_MODES and "minus_floor_ms" in row:
            row["ratio_to_triton_jit"] = row["minus_floor_ms"] / jit_diff
    return rows


def measure(reps: int, warmup: int, log=print, device: str = "cpu", variants: Optional[tuple] = None,
            base: str = "llama") -> list[dict]:
    """The table's rows: ``variants`` timed in pairs with the floor (default: CUDA_VARIANTS on cuda, VARIANTS on the
    CPU), and the Triton path's launches and stubbed host time (its own row unless it is among those timed), on the
    tiny Llama or its ``toy`` form (``base``)."""
    env = environment()
    versions = bench_e2e._versions()
    common = dict(machine=env["device"], torch=env["torch"], triton=env["triton"],
                  transformers=versions["transformers"], pyreft=versions["pyreft"], date=env["date"],
                  threads=torch.get_num_threads(), load_1min=round(os.getloadavg()[0], 2), reps=reps, base=base,
                  clock="thread" if device == "cpu" else "wall")
    variants = variants or (CUDA_VARIANTS if device == "cuda" else VARIANTS)
    steps, sizes, statuses = _built_variants(variants, device, log, base)
    for step in steps.values():
        for _ in range(warmup):
            step()
    log(f"{reps} paired repetitions of {', '.join(steps)} on {device}; {common['threads']} thread(s), load average "
        f"{common['load_1min']} on {os.cpu_count()} cores")
    times = paired_times(steps, reps, device=device)
    triton, n_triton = _triton_figures(steps, device, reps, warmup, base)
    rows = _timed_rows(variants, times, sizes, statuses, common)
    stubbed = ("launches counted; host time with the kernel launches stubbed (CPU: Triton's interpreter stubbed, the "
               "JIT launcher's own cost not included)" if device == "cpu" else
               "timed with its kernels; launches counted; host time also with the kernel launches stubbed")
    timed_triton = [row for row in rows if row["variant"] == "reft-fast:triton"]
    if timed_triton:
        timed_triton[0].update(triton, status=stubbed)
    else:
        rows.append(dict(common, variant="reft-fast:triton", n_interventions=n_triton, **triton, status=stubbed))
    return rows


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few repetitions: checks that the script runs")
    parser.add_argument("--reps", type=positive_int, default=None, help="paired repetitions (default 400; smoke 4)")
    parser.add_argument("--warmup", type=positive_int, default=None, help="steps per variant before timing (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSV (default bench/results/<machine>_"
                                                               "<date>/)")
    parser.add_argument("--base", choices=("llama", "toy"), default="llama",
                        help="the tiny Llama (the table), or its toy form whose layers only add a vector (ToyLayer: "
                             "resolves microseconds of host time for A/B measurements)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the steps run (default: cuda where there is a GPU; there reft-fast:triton is "
                             "timed with its kernels)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but torch sees no CUDA device here")
    args.reps = args.reps or (4 if args.smoke else 400)
    args.warmup = args.warmup or (1 if args.smoke else 10)
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(1)  # OpenMP threads spin-waiting on a shared 2-core machine make tiny ops swing 100×
    rows = measure(args.reps, args.warmup, device=args.device, base=args.base)
    env = {"device": rows[0]["machine"], "date": rows[0]["date"]}
    folder = args.out or results_folder(bench_e2e.RESULTS, env)
    # a smoke run's file is its own: its few repetitions must not replace the day's measurement
    name = "host_smoke" if args.smoke else "host_toy" if args.base == "toy" else "host"
    path = write_csv(rows, result_path(folder, name, env, ".csv"), FIELDS)
    print_table(rows, ["variant", "n_interventions", "step_ms", "minus_floor_ms", "per_intervention_ms",
                       "ratio_to_hook", "ratio_to_triton_jit", "launches_per_intervention",
                       "stubbed_per_intervention_ms", "status"])
    print(f"wrote {path}")
    bad = [row["variant"] for row in rows if row["status"] == "ok" and not all(
        math.isfinite(row[key]) for key in ("step_ms",))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
