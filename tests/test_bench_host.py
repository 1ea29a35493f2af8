"""bench/bench_host.py in smoke mode: every variant's row, the CSV's columns, finite paired differences."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

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

    variants = tuple(v for v in bench_host.CUDA_VARIANTS if v != "pyreft")  # its own row is covered above
    with bench_host.stubbed_launches():  # the interpreter would take minutes; the rows' making is what is tested
        rows = {row["variant"]: row for row in bench_host.measure(2, 1, log=lambda *_: None, variants=variants)}
    assert list(rows) == list(variants)
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
