"""Time the fused ReFT edit against a copy of the same rows; also the orthogonal map (bench_orthogonal.py).

    python bench/bench_kernels.py            # CUDA: the issue's grid, triton.testing.do_bench (median)
    python bench/bench_kernels.py --grid session --backends torch,triton   # the GPU session's reduced grid
    python bench/bench_kernels.py --smoke    # CPU: tiny shapes, Triton through TRITON_INTERPRET=1 and the CUDA C++
                                             # kernels through csrc/sim (REFT_FAST_CUDA_SIM=1), wall-clock median
    pytest bench/ --benchmark-only           # the same cases through pytest-benchmark (bench/test_bench_kernels.py)

For every backend that can run here ("torch": the unfused reference; "triton"; "cuda" when reft_fast.ops.cuda_build
imports, plus "cuda-1row", "cuda-4row" (ranks ≤ 8) and "cuda-tile", its kernels forced to one row, four rows or the
16-row tensor-core tile per block, kernel level only) and every shape (N selected rows,
hidden d, rank r; h in bf16) it times LoReFT forward and forward+backward:
  level "op"      the public reft_fast.ops.loreft (includes the op's one clone of h, which the API's "h is never
                  modified" contract needs: it is part of what a caller pays),
  level "kernel"  the fused backend's launch functions alone on preallocated outputs (what the kernels cost),
against two copies of the same rows:
  copy            gather + scatter of the selected rows in PyTorch (index_select + index_copy_),
  rowcopy         one Triton kernel that reads each selected row once and writes it once (the memory floor).
Ratios divide by one copy for forward and by two copies for forward+backward. A backend that fails is reported in
its row (status) and the run goes on. Writes bench/results/kernels_<device>_<date>.csv row by row (with the device name, torch
and triton versions and the date in every row) and a PNG plot of the ratios beside it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

# The Triton kernels run on a CPU only through the interpreter, which must be chosen before they are decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from reft_fast import ops  # noqa: E402
from reft_fast.core.orthogonal import random_orthonormal_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# The forced rows-per-block variants of the cuda backend timed beside its default (REFT_FAST_CUDA_ROWS_PER_BLOCK).
CUDA_ROWS_VARIANTS = (("cuda-1row", "1"), ("cuda-4row", "4"), ("cuda-tile", "16"))
FULL = dict(rows=(112, 4096, 65536), d=(4096, 8192), r=(4, 8, 32), batch=8, min_seq=512)
# Smoke: d not a power of two and a rank below 16 exercise the kernels' masks; a few programs per launch only.
SMOKE = dict(rows=(8, 24), d=(64, 96), r=(1, 4), batch=2, min_seq=16)
# The part of FULL that fits the GPU session's minute (bench/gpu_session.sh): the Llama-2-7B width, a rank below and
# one above the tile threshold; and its CPU twin for the session's dry run.
SESSION = dict(rows=(112, 4096, 65536), d=(4096,), r=(8, 32), batch=8, min_seq=512)
SESSION_SMOKE = dict(rows=(8, 24), d=(64,), r=(4,), batch=2, min_seq=16)
GRIDS = {"full": FULL, "session": SESSION}

# Targets from the issue, as ratios in this file's convention (forward: × one copy; forward+backward: × two copies;
# the "≤ 1.5 × the 5-pass floor (2.5 copies)" is 3.75 copies, i.e. 1.875 here).
TARGET_RATIO = {"fwd": 1.25, "fwd+bwd": 1.875}

FIELDS = ["device", "torch", "triton", "date", "timer", "backend", "level", "pass", "n_rows", "d", "r", "batch",
          "seq_len", "dtype", "ms", "copy_ms", "rowcopy_ms", "ratio_copy", "ratio_rowcopy", "max_abs_err", "status"]


# --------------------------------------------------------------------------------------------------------------------
# Environment and timing (shared with bench_orthogonal.py and test_bench_kernels.py)
# --------------------------------------------------------------------------------------------------------------------
def machine_name() -> str:
    """The GPU's name, else the CPU's architecture and core count: what every result row and folder is named by."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()} ({os.cpu_count()} cores)"


def environment() -> dict:
    return dict(device=machine_name(), torch=torch.__version__, triton=triton.__version__,
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                timer="do_bench median" if torch.cuda.is_available() else "wall-clock median")


def bench_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    # On a small shared CPU, OpenMP threads spin-waiting on each other make tiny ops swing by 100×.
    torch.set_num_threads(1)
    return torch.device("cpu")


def measure_ms(fn, grad_to_none=None, *, reps: int = 5) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA (L2 flushed between runs), else wall clock."""
    if torch.cuda.is_available():
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    fn()  # warm-up (the interpreter's first call also builds the kernel's Python form)
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class CsvAppender:
    """A CSV file that grows one row at a time (flushed), so that a run killed at its time limit keeps every row
    it finished."""

    def __init__(self, path: Path, fields: list[str]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self._file = path, open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="raise")
        self._writer.writeheader()
        self._file.flush()

    def append(self, row: dict) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_csv(rows: list[dict], path: Path, fields: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _machine_and_day(env: dict) -> str:
    """"nvidia-h200_2026-11-28" from environment()'s device and UTC date."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', env['device']).strip('-').lower()}_{env['date'][:10]}"


def results_folder(root: Path, env: dict) -> Path:
    """root/<machine>_<day>/: a run never writes over another machine's or another day's measurement."""
    return root / _machine_and_day(env)


def result_path(out_dir: Path, prefix: str, env: dict, suffix: str) -> Path:
    return out_dir / f"{prefix}_{_machine_and_day(env)}{suffix}"


def print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = {c: max([len(c)] + [len(cell(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(cell(r.get(c, "")).rjust(widths[c]) for c in columns))


# --------------------------------------------------------------------------------------------------------------------
# The copies the edit is compared with
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, positions_ptr, n_per_example, seq_len, d, BLOCK_D: tl.constexpr):
    # One program per slot (b, j): read row positions[b, j] of example b once, write it once; −1 slots do nothing.
    slot = tl.program_id(0)
    pos = tl.load(positions_ptr + slot)
    if pos >= 0:
        row = ((slot // n_per_example) * seq_len + pos).to(tl.int64) * d
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < d
            tl.store(dst_ptr + row + cols, tl.load(src_ptr + row + cols, mask=mask), mask=mask)


def copy_rows_triton(src: torch.Tensor, dst: torch.Tensor, positions: torch.Tensor) -> None:
    d = src.shape[-1]
    _copy_rows_kernel[(positions.numel(),)](src, dst, positions, positions.shape[1], src.shape[1], d,
                                           BLOCK_D=min(1024, triton.next_power_of_2(d)))


def flat_rows(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Row indices into h.view(-1, d) of the selected positions (−1 dropped); computed once, outside the timing."""
    batch_idx, slot_idx = (positions >= 0).nonzero(as_tuple=True)
    return batch_idx * seq_len + positions[batch_idx, slot_idx]


def copy_rows_torch(src_flat: torch.Tensor, dst_flat: torch.Tensor, rows: torch.Tensor) -> None:
    dst_flat.index_copy_(0, rows, src_flat.index_select(0, rows))


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------
def make_case(n_rows: int, d: int, r: int, *, batch: int, min_seq: int, device, dtype=torch.bfloat16, seed=0):
    """h [B, T, d], positions [B, N/B] (distinct, random), LoReFT parameters R (orthonormal rows), W, b in fp32.

    The large tensors (h and the output gradient, up to 0.5 G elements each) are drawn on ``device`` itself: on a
    GPU, drawing them on the CPU first took longer than timing them. The small ones come from a CPU generator."""
    if n_rows % batch:
        raise ValueError(f"n_rows={n_rows} must be a multiple of batch={batch}")
    per_example = n_rows // batch
    seq_len = max(min_seq, 2 * per_example)
    gen = torch.Generator().manual_seed(seed)
    device_gen = torch.Generator(device=device).manual_seed(seed)
    positions = torch.stack([torch.randperm(seq_len, generator=gen)[:per_example].sort().values
                             for _ in range(batch)])
    return dict(
        h=torch.randn(batch, seq_len, d, generator=device_gen, device=device, dtype=dtype),
        positions=positions.to(device),
        R=random_orthonormal_rows(r, d, generator=gen, device=device),
        W=(torch.randn(r, d, generator=gen) / math.sqrt(d)).to(device),
        b=torch.randn(r, generator=gen).to(device),
        grad=torch.randn(batch, seq_len, d, generator=device_gen, device=device, dtype=dtype),
    )


# --------------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------------
def available_backends(device: torch.device, names=("torch", "triton", "cuda")) -> dict:
    """name -> launch module (None for the torch reference) or the reason it cannot run here, for the backends
    ``names`` (leaving "cuda" out spares its nvcc build, about a minute, when its rows are not wanted)."""
    found = {"torch": None} if "torch" in names else {}
    for name in [n for n in ("triton", "cuda") if n in names]:
        try:
            ops.resolve_backend(name, device)
            found[name] = ops.get_backend(name).kernels()
        except Exception as exc:  # any import or set-up failure is reported, not fatal
            found[name] = f"unavailable: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
    return found


def op_runners(case: dict, backend: str):
    """(forward, forward+backward, tensors whose .grad to reset) for the public op."""
    h = case["h"].detach().requires_grad_()
    R, W, b = (case[k].detach().requires_grad_() for k in ("R", "W", "b"))

    def forward():
        return ops.loreft(h, case["positions"], R, W, b, backend=backend, validate=False)

    def forward_backward():
        forward().backward(case["grad"])

    return forward, forward_backward, [h, R, W, b]


def kernel_runners(case: dict, module):
    """(forward, forward+backward) of a fused backend's launch functions on preallocated outputs; forward returns
    its output buffer (a copy of h whose selected rows it overwrites), forward+backward the gradient of h (a buffer
    likewise) and the kernels' (dQ, dP, dW, db), where the gradient of LoReFT's R is dQ + dP (the Triton kernels
    sum both into dQ when P is Q and return dP None)."""
    h, positions, R, W, b = (case[k] for k in ("h", "positions", "R", "W", "b"))
    out, grad_h = h.clone(), case["grad"].clone()

    def forward():
        module.edit_forward(h, positions, R, R, W, b, 0, 0.0, 0, out)
        return out

    def forward_backward():
        module.edit_forward(h, positions, R, R, W, b, 0, 0.0, 0, out)
        # the op keeps only the selected rows of h for backward: that gather is part of the cost
        dQ, dP, dW, db = module.edit_backward(ops.selected_rows(h, positions), case["grad"], positions, R, R, W, b,
                                              0, 0.0, 0, grad_h)
        return grad_h, dQ, dP, dW, db

    return forward, forward_backward


def with_env(fn, values: dict):
    """fn run with the environment variables `values` set (restored afterwards); the backends read them per call."""
    def wrapped():
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return wrapped


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------
def run_kernels(grid: dict, device: torch.device, env: dict, *, reps: int = 5, log=print,
                backends=("torch", "triton", "cuda"), deadline: float | None = None, on_row=None) -> list[dict]:
    """Every row of the grid (``on_row(row)`` as each is finished); no shape is started after ``deadline``
    (time.monotonic())."""
    rows = []

    def add(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    base = {k: env[k] for k in ("device", "torch", "triton", "date", "timer")}
    found = available_backends(device, backends)
    for name, module in found.items():
        if isinstance(module, str):
            log(f"[{name}] {module}")
            add(dict(base, backend=name, status=module))
    runnable = {k: v for k, v in found.items() if not isinstance(v, str)}

    for n_rows in grid["rows"]:
        for d in grid["d"]:
            for r in grid["r"]:
                if deadline is not None and time.monotonic() > deadline:
                    log(f"deadline: N={n_rows} d={d} r={r} not run")
                    add(dict(base, n_rows=n_rows, d=d, r=r, status="not run: deadline"))
                    continue
                case = make_case(n_rows, d, r, batch=grid["batch"], min_seq=grid["min_seq"], device=device)
                h, positions = case["h"], case["positions"]
                shape = dict(n_rows=n_rows, d=d, r=r, batch=h.shape[0], seq_len=h.shape[1], dtype=str(h.dtype)[6:])
                dst = h.clone()
                rows_idx = flat_rows(positions, h.shape[1])
                copy_ms = measure_ms(lambda: copy_rows_torch(h.view(-1, d), dst.view(-1, d), rows_idx), reps=reps)
                try:
                    rowcopy_ms = measure_ms(lambda: copy_rows_triton(h, dst, positions), reps=reps)
                except Exception as exc:
                    log(f"[rowcopy] N={n_rows} d={d}: {type(exc).__name__}: {exc}")
                    rowcopy_ms = float("nan")
                with torch.no_grad():
                    reference = ops.loreft(h, positions, case["R"], case["W"], case["b"], backend="torch",
                                           validate=False).float()

                def record(backend, level, pass_, fn, grads=None, output=None):
                    row = dict(base, backend=backend, level=level, **shape, copy_ms=copy_ms, rowcopy_ms=rowcopy_ms)
                    row["pass"] = pass_
                    try:
                        if output is not None:
                            with torch.no_grad():
                                row["max_abs_err"] = (output().float() - reference).abs().max().item()
                        row["ms"] = measure_ms(fn, grads, reps=reps)
                        copies = 1 if pass_ == "fwd" else 2
                        row["ratio_copy"] = row["ms"] / (copies * copy_ms)
                        row["ratio_rowcopy"] = row["ms"] / (copies * rowcopy_ms)
                        row["status"] = "ok"
                    except Exception as exc:  # report and go on with the other backends and shapes
                        row["status"] = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
                        log(f"[{backend}/{level}/{pass_}] N={n_rows} d={d} r={r}: {row['status']}")
                    add(row)

                for name, module in runnable.items():
                    forward, forward_backward, grads = op_runners(case, name)
                    record(name, "op", "fwd", forward, output=forward)
                    record(name, "op", "fwd+bwd", forward_backward, grads)
                    if module is not None:
                        k_forward, k_forward_backward = kernel_runners(case, module)
                        record(name, "kernel", "fwd", k_forward, output=k_forward)
                        record(name, "kernel", "fwd+bwd", k_forward_backward)
                    if name == "cuda":
                        # The cuda kernels forced to each rows-per-block choice (csrc/README.md): one row, four rows
                        # (ranks ≤ 8), the tensor-core tile (16 rows, bf16 h): the A/B of the shape rule, in one run.
                        k_forward, k_forward_backward = kernel_runners(case, module)
                        for label, rows_env in CUDA_ROWS_VARIANTS:
                            if rows_env == "4" and r > 8:
                                continue
                            forced = {"REFT_FAST_CUDA_ROWS_PER_BLOCK": rows_env}
                            record(label, "kernel", "fwd", with_env(k_forward, forced),
                                   output=with_env(k_forward, forced))
                            record(label, "kernel", "fwd+bwd", with_env(k_forward_backward, forced))
                del case, dst, reference
    return rows


def plot_ratios(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    shapes = sorted({(r["n_rows"], r["d"], r["r"]) for r in ok})
    series = sorted({(r["backend"], r["level"]) for r in ok})
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(shapes) + 3), 8), sharex=True)
    width = 0.8 / max(1, len(series))
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
        for i, (backend, level) in enumerate(series):
            values = {(r["n_rows"], r["d"], r["r"]): r["ratio_copy"] for r in ok
                      if r["pass"] == pass_ and r["backend"] == backend and r["level"] == level}
            xs = [j + i * width for j, s in enumerate(shapes) if s in values]
            ax.bar(xs, [values[s] for s in shapes if s in values], width, label=f"{backend} ({level})")
        ax.axhline(TARGET_RATIO[pass_], color="k", linestyle="--", linewidth=1, label=f"target {TARGET_RATIO[pass_]}×")
        ax.set_yscale("log")
        copies = "one copy" if pass_ == "fwd" else "two copies"
        ax.set_ylabel(f"{pass_}: time / {copies}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    axes[1].set_xticklabels([f"N{n}\nd{d} r{r}" for n, d, r in shapes], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, Triton interpreter); for CI")
    parser.add_argument("--grid", choices=list(GRIDS), default="full",
                        help="full: the issue's grid; session: its d=4096, r∈{8,32} part (bench/gpu_session.sh)")
    parser.add_argument("--backends", default="torch,triton,cuda",
                        help="comma-separated from torch,triton,cuda (default all three)")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no shape after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and PNG (default bench/results)")
    parser.add_argument("--no-orthogonal", action="store_true", help="skip the orthogonal-map section")
    parser.add_argument("--no-plot", action="store_true", help="write the CSV only")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or set(backends) - {"torch", "triton", "cuda"}:
        parser.error(f"--backends: {args.backends!r}: expected names from torch, triton, cuda")

    started = time.monotonic()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("the full grid needs a CUDA GPU (its h tensors are up to 2 GB); on a CPU use --smoke")
    if not cuda:
        # The CUDA C++ kernels run on a CPU through their simulation (csrc/sim; read at each call, so set here rather
        # than at import, where it would leak into importers). Smoke timings mean nothing; they check the rows.
        os.environ.setdefault("REFT_FAST_CUDA_SIM", "1")
    device = bench_device()
    if args.smoke:
        grid = SESSION_SMOKE if args.grid == "session" else SMOKE
    else:
        grid = GRIDS[args.grid]
    env = environment()
    prefix = "kernels_smoke" if args.smoke else "kernels"
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | {env['timer']}")

    csv_file = CsvAppender(result_path(args.out, prefix, env, ".csv"), FIELDS)
    deadline = started + args.deadline_s if args.deadline_s is not None else None
    try:
        rows = run_kernels(grid, device, env, reps=3 if args.smoke else 5, backends=backends, deadline=deadline,
                           on_row=csv_file.append)
    finally:
        csv_file.close()
    columns = ["backend", "level", "pass", "n_rows", "d", "r", "ms", "copy_ms", "rowcopy_ms", "ratio_copy",
               "ratio_rowcopy", "max_abs_err", "status"]
    print_table([r for r in rows if "level" in r], columns)
    print(f"wrote {csv_file.path}")
    if not args.no_plot and any(r.get("status") == "ok" for r in rows):
        png = plot_ratios(rows, csv_file.path.with_suffix(".png"),
                          f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
        print(f"wrote {png}")

    if not args.no_orthogonal:
        # The sibling script, whichever folder this one was started or imported from.
        if str(Path(__file__).resolve().parent) not in sys.path:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
        bench_orthogonal = importlib.import_module("bench_orthogonal")
        bench_orthogonal.main(["--smoke"] if args.smoke else [], out=args.out, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
