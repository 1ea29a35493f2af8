"""The benchmark command CI runs (`python bench/bench_kernels.py --smoke`) works and writes what it promises."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from reft_fast.ops import cuda_build as cuda_backend

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FIELDS = ["device", "torch", "triton", "date", "timer", "backend", "level", "pass", "n_rows", "d", "r", "batch",
                 "seq_len", "dtype", "ms", "copy_ms", "rowcopy_ms", "ratio_copy", "ratio_rowcopy", "max_abs_err",
                 "status"]
ORTHOGONAL_FIELDS = ["device", "torch", "triton", "date", "timer", "method", "n", "d", "r", "pass", "ms",
                     "ms_per_intervention", "orthonormality_err", "status"]


def _load_bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_records_this_machine(row: dict) -> None:
    env = _load_bench_kernels().environment()
    assert (row["device"], row["torch"], row["triton"]) == (env["device"], torch.__version__, triton.__version__)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\dZ", row["date"]), row["date"]


def _read(path: Path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kernels.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_kernel_csv_has_the_columns_and_a_row_per_backend_level_pass_and_shape(smoke_run):
    out, stdout = smoke_run
    (path,) = out.glob("kernels_smoke_*.csv")
    fields, rows = _read(path)
    assert fields == KERNEL_FIELDS
    measured = [r for r in rows if r["status"] == "ok"]
    shapes = {(r["n_rows"], r["d"], r["r"]) for r in measured}
    assert shapes == {(n, d, r) for n in ("8", "24") for d in ("64", "96") for r in ("1", "4")}
    for row in measured:
        _assert_records_this_machine(row)
        ms, copy_ms = float(row["ms"]), float(row["copy_ms"])
        assert ms > 0 and copy_ms > 0
        copies = 1 if row["pass"] == "fwd" else 2
        assert float(row["ratio_copy"]) == pytest.approx(ms / (copies * copy_ms), rel=1e-6)
        if row["pass"] == "fwd":
            # bf16 output: at most one bf16 ulp (values up to ~8) from the torch reference.
            assert float(row["max_abs_err"]) <= 0.0625
    torch_rows = {(r["level"], r["pass"]) for r in measured if r["backend"] == "torch"}
    assert torch_rows == {("op", "fwd"), ("op", "fwd+bwd")}
    assert (out / path.name.replace(".csv", ".png")).stat().st_size > 0
    assert "wrote" in stdout


def test_triton_backend_is_timed_when_its_module_imports(smoke_run):
    out, _ = smoke_run
    (path,) = out.glob("kernels_smoke_*.csv")
    _, rows = _read(path)
    triton_rows = [r for r in rows if r["backend"] == "triton"]
    if importlib.util.find_spec("reft_fast.kernels.low_rank_edit") is None:
        assert len(triton_rows) == 1 and triton_rows[0]["status"].startswith("unavailable")
        return
    assert triton_rows and all(r["status"] == "ok" for r in triton_rows), [r["status"] for r in triton_rows]
    assert {(r["level"], r["pass"]) for r in triton_rows} == {(lvl, p) for lvl in ("op", "kernel")
                                                              for p in ("fwd", "fwd+bwd")}


def test_cuda_backend_rows_run_through_the_cpu_simulation(smoke_run):
    """Without a GPU the smoke run builds csrc/ for the CPU (REFT_FAST_CUDA_SIM): the cuda rows run and agree with torch."""
    out, _ = smoke_run
    (path,) = out.glob("kernels_smoke_*.csv")
    _, rows = _read(path)
    cuda_rows = [r for r in rows if r["backend"] == "cuda"]
    if torch.cuda.is_available():
        pytest.skip("the smoke run is a CPU mode")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cuda_backend.SIM_ENV, "1")
        reason = cuda_backend.unavailable_reason()
    if reason is not None:
        assert len(cuda_rows) == 1 and cuda_rows[0]["status"].startswith("unavailable")
        return
    assert cuda_rows and all(r["status"] == "ok" for r in cuda_rows), [r["status"] for r in cuda_rows]
    assert {(r["level"], r["pass"]) for r in cuda_rows} == {(lvl, p) for lvl in ("op", "kernel")
                                                            for p in ("fwd", "fwd+bwd")}
    assert all(float(r["max_abs_err"]) <= 0.0625 for r in cuda_rows if r["pass"] == "fwd")
    # the forced rows-per-block variants (the smoke ranks are ≤ 8, so all three), kernel level
    variants = [r for r in rows if r["backend"].startswith("cuda-")]
    assert {r["backend"] for r in variants} == {"cuda-1row", "cuda-4row", "cuda-tile"}
    assert all(r["status"] == "ok" and r["level"] == "kernel" for r in variants), [r["status"] for r in variants]
    assert all(float(r["max_abs_err"]) <= 0.0625 for r in variants if r["pass"] == "fwd")


def test_orthogonal_csv_covers_every_method_with_orthonormal_results(smoke_run):
    out, _ = smoke_run
    (path,) = out.glob("orthogonal_smoke_*.csv")
    fields, rows = _read(path)
    assert fields == ORTHOGONAL_FIELDS
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    methods = {"polar", "cholesky", "householder", "householder+base", "pyreft-householder"}
    assert {(r["method"], r["pass"]) for r in rows} == {(m, p) for m in methods for p in ("fwd", "fwd+bwd")}
    for row in rows:
        assert float(row["ms"]) > 0
        if row["pass"] == "fwd":
            assert float(row["orthonormality_err"]) < 1e-5


def test_pytest_benchmark_view_checks_its_results_and_records_what_it_timed(tmp_path):
    """bench/test_bench_kernels.py is outside testpaths: run one shape of it here. It passes only if every timed
    variant's output and gradients match the float64 reference; its JSON names each variant with the shape and device
    it timed."""
    report = tmp_path / "bench.json"
    # CPU: the cuda rows skip. pytest-benchmark turns itself off in a process that has an xdist worker's variables
    # (this suite's workers pass them on) or runs xdist (the suite's addopts): neither here.
    env = {k: v for k, v in os.environ.items() if k != cuda_backend.SIM_ENV and not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/test_bench_kernels.py", "-q", "-o", "addopts=",
                           "-p", "no:cacheprovider",
                           "-k", "N8-d64-r1 or orthogonal", f"--benchmark-json={report}", "--benchmark-min-rounds=1",
                           "--benchmark-max-time=0", "--benchmark-warmup=off"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benchmarks = json.loads(report.read_text())["benchmarks"]
    device = _load_bench_kernels().environment()["device"]
    names = {b["name"] for b in benchmarks}
    expected = {f"test_copy[{m}-N8-d64-r1]" for m in ("gather+scatter", "rowcopy")}
    expected |= {f"test_loreft[torch-op-{p}-N8-d64-r1]" for p in ("fwd", "fwd+bwd")}
    expected |= {f"test_loreft[triton-{lvl}-{p}-N8-d64-r1]" for lvl in ("op", "kernel") for p in ("fwd", "fwd+bwd")}
    expected |= {f"test_orthogonal[{m}-{p}]" for m in ("polar", "cholesky", "householder", "householder+base",
                                                        "pyreft-householder") for p in ("fwd", "fwd+bwd")}
    assert names == expected, names ^ expected
    for bench in benchmarks:
        info, params = bench["extra_info"], bench["params"]
        assert info["device"] == device, bench["name"]
        if "shape" in params:  # the shapes read from the timed tensors are the ones the test asked for
            assert [info["n_rows"], info["d"], info["r"]] == params["shape"] and info["dtype"] == "bfloat16"
            assert (info["batch"], info["seq_len"]) == (2, 16)
        for key in ("method", "backend", "level", "pass_"):
            if key in params:
                assert info[key] == params[key], (bench["name"], key)
        assert bench["stats"]["rounds"] >= 1 and bench["stats"]["min"] > 0
