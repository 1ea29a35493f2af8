"""The benchmark scripts refuse a count that is not a positive whole number at once, naming the argument (a zero
was silently replaced by the default or crashed after the models were built: `--rounds 0` of bench_packing and
bench_multi_reft, `--reps -1` of bench_host; bench_packing's `--max-length 4` cut every response away and reported
NaN loss differences; bench_orthogonal_convergence's `--steps 0` ran the default steps, `--seeds 0` nothing, after
minutes of the cost grid), and bench_multi_reft's default CSV is this machine's and today's, one
per model (it overwrote the recorded SmolLM2 measurement of 2026-11-28, whatever the day, machine or model)."""

import datetime
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_with(module, argv, monkeypatch):
    if module.__name__ in ("bench_host", "bench_e2e"):
        return module._parse_args(argv)
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    return module.main(argv) if module.__name__ in ("bench_packing", "bench_orthogonal_convergence") else module.main()


@pytest.mark.parametrize("script, argv, name", [
    ("bench_host", ["--smoke", "--reps", "0"], "--reps"), ("bench_host", ["--smoke", "--reps", "-1"], "--reps"),
    ("bench_e2e", ["--smoke", "--steps", "0"], "--steps"), ("bench_e2e", ["--smoke", "--batch", "-2"], "--batch"),
    ("bench_packing", ["--tiny", "--rounds", "0"], "--rounds"), ("bench_packing", ["--tiny", "--steps", "0"], "--steps"),
    ("bench_multi_reft", ["--tiny", "--rounds", "0"], "--rounds"), ("bench_edit_paths", ["--smoke", "--reps", "0"], "--reps"),
    ("bench_multi_reft", ["--tiny", "--new-tokens", "0"], "--new-tokens"),
    ("bench_packing", ["--tiny", "--max-length", "4"], "--max-length"),
    ("bench_orthogonal_convergence", ["--no-cost", "--seeds", "0"], "--seeds"),
    ("bench_orthogonal_convergence", ["--no-cost", "--steps", "0"], "--steps"),
    ("bench_orthogonal_convergence", ["--no-cost", "--steps", "-1"], "--steps")])
def test_a_bad_count_is_refused_before_any_work(script, argv, name, monkeypatch, capsys):
    module = _load(script)
    with pytest.raises(SystemExit) as exit_info:
        _parse_with(module, argv, monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {name}: must be at least" in err, err


def test_orthogonal_convergence_refuses_skipping_both_parts(monkeypatch, capsys):
    """`--no-cost --cost-only` skipped the training runs and the cost grid alike: it ran nothing and exited 0."""
    with pytest.raises(SystemExit) as exit_info:
        _parse_with(_load("bench_orthogonal_convergence"), ["--no-cost", "--cost-only"], monkeypatch)
    assert exit_info.value.code == 2
    assert "argument --cost-only: not allowed with argument --no-cost" in capsys.readouterr().err


def test_multi_reft_results_are_this_days_and_one_file_per_model():
    module = _load("bench_multi_reft")
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    full, tiny = module.default_out(False), module.default_out(True)
    assert full.parent == tiny.parent and full.parent.name.endswith("_" + today)
    assert (full.name, tiny.name) == ("multi_reft.csv", "multi_reft_tiny.csv")


def test_smoke_and_tiny_results_are_ignored_by_git():
    """Smoke and tiny runs write beside the measurements under bench/results/ (bench_packing --tiny, bench_kernels
    --smoke, ...): git ignores their files, so a `git add` never records them as measurements; real results it keeps."""
    root = BENCH.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    smoke = ["bench/results/m_2026-11-29/host_smoke_m_2026-11-29.csv", "bench/results/kernels_smoke_m_2026-11-29.csv",
             "bench/results/m_2026-11-29/packing_tiny_len96.csv", "bench/results/m_2026-11-29/multi_reft_tiny.csv"]
    kept = ["bench/results/m_2026-11-29/host_m_2026-11-29.csv", "bench/results/m_2026-11-29/packing_len512.csv"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *smoke, *kept], cwd=root, capture_output=True,
                             text=True).stdout.split()
    assert ignored == smoke


def test_edit_paths_help_describes_the_script_in_whole_sentences():
    """Its description was the docstring's first line, cut mid-sentence at "the numbers"."""
    completed = subprocess.run([sys.executable, str(BENCH / "bench_edit_paths.py"), "--help"], capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "AUTOGRAD_BELOW_NUMEL" in " ".join(completed.stdout.split())
