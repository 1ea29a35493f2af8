"""Host time of one edit (forward + backward) on the torch backend's three paths, by hidden-state size: the numbers
behind ``backend_torch.AUTOGRAD_BELOW_NUMEL``.

    python bench/bench_edit_paths.py            # 300 paired repetitions per size, one thread (a few minutes)
    python bench/bench_edit_paths.py --smoke    # a few repetitions

Paths:
  autograd          autograd through the forward's ops (padded copy; its backward formulas copy the gradient)
  written-out copy  the written-out backward into a new tensor (what an edit of a hidden state it does not own runs)
  in place          the edit written into h and its gradient into grad_out (a hook that owns its module's output)
One edit: LoReFT rank 8, f7+l7 positions (14 per example, one −1 slot), B = 8, fp32; h is the output of an op, and
the next op's backward hands the edit a gradient of its own, as in a model. Each repetition times every path once in
turn; an edit's time is the step's minus that of the same step without the edit (paired), the median over repetitions.

Writes bench/results/<machine>_<date>/edit_paths_<machine>_<date>.csv (edit_paths_smoke_... with --smoke).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_e2e  # noqa: E402
from bench_kernels import environment, print_table, result_path, results_folder, write_csv  # noqa: E402

from reft_fast import ops  # noqa: E402
from reft_fast.ops import backend_torch  # noqa: E402
from reft_fast.train.cli import positive_int  # noqa: E402

SHAPES = ((8, 32, 64), (8, 128, 128), (8, 128, 256), (8, 128, 512), (8, 256, 1024))  # (B, T, d)
PATHS = {"autograd": (1 << 62, False), "written-out copy": (0, False), "in place": (0, True)}  # (threshold, in_place)
FIELDS = ["device", "torch", "date", "threads", "reps", "B", "T", "d", "numel", "path", "edit_ms", "ratio_to_autograd"]


def _edit_inputs(B, T, d, r=8, side=7):
    gen = torch.Generator().manual_seed(0)
    R = torch.linalg.qr(torch.randn(d, r, generator=gen))[0].t().contiguous().requires_grad_()
    W = (torch.randn(r, d, generator=gen) * 0.1).requires_grad_()
    b = torch.randn(r, generator=gen).requires_grad_()
    positions = torch.cat([torch.arange(side).expand(B, side), torch.arange(T - side, T).expand(B, side)], 1).clone()
    positions[0, 3] = -1
    x = torch.randn(B, T, d, generator=gen, requires_grad=True)
    return x, torch.randn(B, T, d, generator=gen), positions, (R, W, b)


def _paired_edit_seconds(path: str, x, grad, positions, params) -> float:
    backend_torch.AUTOGRAD_BELOW_NUMEL, in_place = PATHS[path]
    R, W, b = params
    started = time.perf_counter()
    hidden = x * 1.0  # an op's output, owned by the caller
    edited = ops.low_rank_edit(hidden, positions, R, W=W, b=b, P=R, backend="torch", validate=False,
                               in_place=in_place)
    (edited * 1.0).backward(grad)
    with_edit = time.perf_counter() - started
    started = time.perf_counter()
    ((x * 1.0) * 1.0).backward(grad)
    return with_edit - (time.perf_counter() - started)


def measure(reps: int, warmup: int) -> list[dict]:
    env = environment()
    saved_threshold = backend_torch.AUTOGRAD_BELOW_NUMEL
    rows = []
    try:
        for B, T, d in SHAPES:
            inputs = _edit_inputs(B, T, d)
            for path in PATHS:
                for _ in range(warmup):
                    _paired_edit_seconds(path, *inputs)
            times = {path: [] for path in PATHS}
            for _ in range(reps):
                for path in PATHS:
                    times[path].append(_paired_edit_seconds(path, *inputs))
            autograd_ms = statistics.median(times["autograd"]) * 1e3
            for path, seconds in times.items():
                edit_ms = statistics.median(seconds) * 1e3
                rows.append(dict(device=env["device"], torch=env["torch"], date=env["date"],
                                 threads=torch.get_num_threads(), reps=reps, B=B, T=T, d=d, numel=B * T * d,
                                 path=path, edit_ms=edit_ms, ratio_to_autograd=edit_ms / autograd_ms))
    finally:
        backend_torch.AUTOGRAD_BELOW_NUMEL = saved_threshold
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few repetitions: checks that the script runs")
    parser.add_argument("--reps", type=positive_int, default=None, help="paired repetitions per size (default 300; smoke 3)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSV (default bench/results/<machine>_"
                                                               "<date>/)")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.smoke else 300)
    torch.set_num_threads(1)  # as bench_host: spinning OpenMP threads on a shared machine swamp tiny ops
    rows = measure(reps, warmup=1 if args.smoke else 20)
    env = {"device": rows[0]["device"], "date": rows[0]["date"]}
    folder = args.out or results_folder(bench_e2e.RESULTS, env)
    prefix = "edit_paths_smoke" if args.smoke else "edit_paths"  # a smoke run never replaces the measurement
    path = write_csv(rows, result_path(folder, prefix, env, ".csv"), FIELDS)
    print_table(rows, ["numel", "B", "T", "d", "path", "edit_ms", "ratio_to_autograd"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
