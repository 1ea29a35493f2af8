"""bench/bench_e2e.py: the CPU smoke run writes every row it can run, with consistent numbers; planning and skipping."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_e2e.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *extra: str) -> tuple[list[dict], str]:
    completed = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), *extra],
                               capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    [csv_path] = tmp_path.glob("e2e_smoke_*.csv")  # its own file, not the measurement's e2e_<device>_<date>
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f)), completed.stdout


def test_smoke_run_writes_every_row_with_consistent_numbers(tmp_path):
    bench = _load_bench()
    # With checkpointing only, the rows run both paths of the base (the forward, and its recomputation in backward),
    # at half the suite time of the whole smoke grid (93 s on 2 cores, 2026-11-29). Without checkpointing, the same
    # set-ups run in test_bench_host's and test_bench_session's smoke runs.
    rows, stdout = _run(tmp_path, "--checkpointing", "on")
    assert list(rows[0]) == bench.FIELDS
    assert (tmp_path / next(tmp_path.glob("e2e_*.csv")).with_suffix(".png").name).is_file()
    # 2 configurations × 6 methods; fused rows are CUDA-only and not planned on a CPU.
    assert len(rows) == 2 * len(bench.SMOKE_METHODS)
    assert {(r["config"], r["checkpointing"]) for r in rows} == {(c, "on") for c in "ab"}
    assert {r["fused"] for r in rows} == {"off"}
    expected_status = {"ok"} if importlib.util.find_spec("pyreft") and importlib.util.find_spec("peft") else None
    if expected_status:
        assert {r["status"] for r in rows} == expected_status, [(r["method"], r["status"]) for r in rows]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["method"] for r in ok} >= {"floor", "reft-fast:triton", "reft-fast:torch", "hook-loreft"}

    for r in ok:
        assert float(r["step_s"]) > 0 and float(r["tokens_per_s"]) > 0 and math.isfinite(float(r["first_loss"]))
        assert float(r["step_s_min"]) <= float(r["step_s"])
        assert 0 < float(r["cpu_issue_s"]) <= float(r["step_s"])  # the host's share of the step
        assert r["device"] and r["torch"] and r["transformers"] and r["date"]
        assert float(r["tflops"]) > 0
        if r["method"] == "floor":
            assert float(r["ratio_floor"]) == 1.0 and int(r["trainable_params"]) == 64  # one bias of hidden size
        if r["method"] in ("reft-fast:triton", "reft-fast:torch", "hook-loreft"):
            assert float(r["orth_ms"]) > 0 and float(r["edit_ms"]) > 0

    for (config, ckpt) in {(r["config"], r["checkpointing"]) for r in ok}:
        group = {r["method"]: r for r in ok if (r["config"], r["checkpointing"]) == (config, ckpt)}
        # (a): 2 layers listed twice (first / last positions); (b): all 4 layers, shared weights.
        assert int(group["floor"]["n_interventions"]) == 4
        rank = bench.CONFIGS[config]["rank"]
        loreft_params = 4 * (2 * rank * 64 + rank)  # per intervention: R (or its parameter) [r, d], W [r, d], b [r]
        for method in ("reft-fast:triton", "reft-fast:torch", "hook-loreft", "pyreft"):
            if method in group:
                assert int(group[method]["trainable_params"]) == loreft_params, method
        # Same initial interventions, two backends: the same first loss; a fresh LoReFT edit changes the loss.
        triton_loss, torch_loss = float(group["reft-fast:triton"]["first_loss"]), float(
            group["reft-fast:torch"]["first_loss"])
        assert abs(triton_loss - torch_loss) <= 1e-2 * abs(torch_loss)
        assert triton_loss != float(group["floor"]["first_loss"])
        if "lora" in group:  # LoRA's B starts at zero: its first step is the plain model's
            assert float(group["lora"]["first_loss"]) == pytest.approx(float(group["floor"]["first_loss"]), rel=1e-3)

    assert "| method | config | ckpt | fused | step s |" in stdout
    assert stdout.count("\n| ") >= len(rows) + 1


def test_deadline_leaves_valid_rows_marked_not_run(tmp_path):
    rows, _ = _run(tmp_path, "--deadline-s", "0", "--no-plot", "--configs", "a", "--checkpointing", "off")
    assert len(rows) > 0 and {r["status"] for r in rows} == {"not run: deadline"}
    assert not list(tmp_path.glob("*.png"))


def test_rows_that_cannot_run_here_are_skipped_with_a_reason():
    bench = _load_bench()
    row = dict(method="reft-fast:cuda", fused=False, device="cpu")
    assert bench.skip_reason(row) == "skipped: the cuda backend needs CUDA"
    assert "need CUDA" in bench.skip_reason(dict(row, method="floor", fused=True))
    assert bench.skip_reason(dict(row, method="floor")) is None


def test_replayed_rows_are_skipped_where_the_recipe_cannot_capture():
    """training.cuda_graphs' rows run only where the recipe would capture (train_config's ``_check_cuda_graphs``): on
    CUDA (on a CPU only with a capture stand-in), without gradient checkpointing, without liger's fused cross-entropy
    (the fused base here fuses it: ``fused_base.CAPTURE_BREAKING_OPS``)."""
    from capture_stand_in import traced_capture

    bench = _load_bench()
    for method in ("floor-replayed", "reft-fast:triton-replayed"):
        row = dict(method=method, device="cuda", fused=False, checkpointing=False)
        assert bench.skip_reason(row) is None
        assert bench.skip_reason(dict(row, device="cpu")).startswith("skipped: CUDA graphs need CUDA")
        assert bench.skip_reason(dict(row, device="cpu"), capture=traced_capture) is None
        assert "gradient checkpointing" in bench.skip_reason(dict(row, checkpointing=True))
        assert "fused cross-entropy" in bench.skip_reason(dict(row, fused=True))
        assert "fused cross-entropy" in bench.skip_reason(dict(row, device="cpu", fused=True), traced_capture)
    assert bench.skip_reason(dict(row, method="reft-fast:triton", device="cpu", checkpointing=True)) is None


def test_a_replayed_row_runs_through_the_capture_stand_in():
    """floor-replayed and reft-fast:torch-replayed on the tiny shape, (b), through tests/capture_stand_in.py in place
    of make_graphed_callables (the recipe's route: CapturedLoss given the host batch each step, zero_grad in place,
    AdamW eager): finite step times, the capture's check in the status, ratio_floor against the replayed floor.
    (reft-fast:triton-replayed is the same route: on a CPU make_fx cannot trace Triton's interpreter.)"""
    from capture_stand_in import traced_capture, values_on_the_device

    bench = _load_bench()
    args = bench._parse_args(["--smoke", "--configs", "b", "--checkpointing", "off", "--methods",
                              "floor,floor-replayed,reft-fast:torch-replayed"])
    rows = bench.plan_rows(args)
    assert [r["method"] for r in rows] == ["floor", "floor-replayed", "reft-fast:torch-replayed"]
    for row in rows:
        with values_on_the_device():  # the locations are checked by CapturedLoss on the host, as on a GPU
            row.update(bench.row_result("row", row, capture=traced_capture))
    floor, floor_replayed, replayed = rows
    assert floor["status"] == "ok"
    assert floor_replayed["status"].startswith("ok; forward and backward graphed; replayed loss − eager 0 (loss ")
    assert replayed["status"].startswith("ok; forward and backward replayed (CapturedLoss): replay matches eager: "
                                         "|Δloss| = "), replayed["status"]
    for row in rows:
        assert math.isfinite(row["step_s"]) and 0 < row["cpu_issue_s"] <= row["step_s"] and row["tflops"] > 0
    # the same first loss as the eager floor's (bias 0); the interventions change it
    assert floor_replayed["first_loss"] == pytest.approx(floor["first_loss"], rel=1e-5)
    assert replayed["first_loss"] != pytest.approx(floor["first_loss"], rel=1e-4)
    assert replayed["n_interventions"] == 4 and replayed["trainable_params"] == 4 * (2 * 8 * 64 + 8)
    records = {r["method"]: r for r in bench.records(rows, {}, math.nan)}
    assert records["floor-replayed"]["ratio_floor"] == 1.0
    assert records["reft-fast:torch-replayed"]["ratio_floor"] == pytest.approx(
        replayed["step_s"] / floor_replayed["step_s"])
    assert records["reft-fast:torch-replayed"]["ratio_plain_floor"] == records["reft-fast:torch-replayed"][
        "ratio_floor"]  # the plain floor of a replayed row is the replayed one too
    table = bench.markdown_table(list(records.values()))
    assert "\\|Δloss\\|" in table and all(line.count(" | ") == len(bench.TABLE) - 1 for line in
                                            table.splitlines() if line.startswith("| "))


def test_plan_puts_the_floor_first_in_each_group():
    bench = _load_bench()
    args = bench._parse_args(["--smoke", "--methods", "hook-loreft,floor", "--checkpointing", "on,off"])
    rows = bench.plan_rows(args)
    assert [r["method"] for r in rows[:2]] == ["floor", "hook-loreft"]
    assert [r["checkpointing"] for r in rows] == [False] * 4 + [True] * 4  # without checkpointing first
    with pytest.raises(SystemExit):
        bench._parse_args(["--smoke", "--configs", "c"])


def test_session_plan_keeps_its_order_on_a_gpu_and_unfuses_on_a_cpu():
    bench = _load_bench()
    args = bench._parse_args(["--smoke", "--plan", "session"])
    on_cpu = [(r["config"], r["checkpointing"], r["fused"], r["method"]) for r in bench.plan_rows(args)]
    assert on_cpu == list(dict.fromkeys((c, k, False, m) for c, k, _, m in bench.SESSION_ROWS))
    args.device = "cuda"
    on_gpu = [(r["config"], r["checkpointing"], r["fused"], r["method"]) for r in bench.plan_rows(args)]
    assert on_gpu == list(bench.SESSION_ROWS)
    assert on_gpu[:5] == [("b", False, True, "floor"), ("b", False, True, "reft-fast:triton"),
                          ("b", False, True, "pyreft"), ("b", False, True, "hook-loreft"), ("b", False, False, "floor")]
    assert on_gpu[-1] == ("b", False, True, "reft-fast:cuda")  # its nvcc build last
    # training.cuda_graphs' rows right after the headline, on the plain base (no fused cross-entropy under capture),
    # with the eager reft-fast:triton of that base: the four of (triton-replayed − floor-replayed) / (triton − floor)
    assert on_gpu[5:8] == [("b", False, False, "floor-replayed"), ("b", False, False, "reft-fast:triton-replayed"),
                           ("b", False, False, "reft-fast:triton")]
    assert ("b", False, False, "floor") in on_gpu[:5]
    runnable = [r for r in bench.plan_rows(args) if r["method"] in bench.REPLAYED_METHODS]
    assert len(runnable) == 2 and all(bench.skip_reason(r) is None for r in runnable)
    args.device = "cpu"
    on_cpu = [r for r in bench.plan_rows(args) if r["method"] in bench.REPLAYED_METHODS]
    assert [bench.skip_reason(r).split(" (")[0] for r in on_cpu] == ["skipped: CUDA graphs need CUDA"] * 2


@pytest.mark.parametrize("argv, message", [
    (["--fused", "on"], "argument --fused: 'on': the fused base operations"),
    (["--fused", "on,off"], "argument --fused: 'on,off': the fused base operations"),
    (["--row-timeout-s", "0"], "argument --row-timeout-s: must be a finite number above 0"),
    (["--row-timeout-s", "-5"], "argument --row-timeout-s: must be a finite number above 0")])
def test_a_cpu_run_refuses_fused_rows_and_a_row_timeout_not_above_zero(argv, message, capsys):
    """On a CPU `--fused on` planned only rows skipped for want of CUDA, and a zero row timeout was replaced by the
    default (a negative one stopped every row at once): both are refused before anything starts."""
    bench = _load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench._parse_args(["--smoke", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_smoke_run_plans_no_fused_rows_even_where_there_is_a_gpu(monkeypatch):
    bench = _load_bench()
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    args = bench._parse_args(["--smoke"])
    assert args.device == "cpu" and args.fused == [False]


def test_rows_are_forked_from_a_server_that_imported_their_libraries(tmp_path):
    """The forkserver imports ROW_LIBRARIES before it forks a row. Its preload of "__main__" imported nothing on
    Python 3.11 and 3.12, and every row imported them itself (8 s each on 2 cores). A parent without a main script
    (python -c), so that the row does not re-run one: what it holds at its start is what the server imported."""
    bench = _load_bench()
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        found = set({bench.ROW_LIBRARIES!r}) & set(sys.modules)
        Path({str(tmp_path / "found.txt")!r}).write_text(" ".join(sorted(found)))
    """))
    script = textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import bench_e2e
        process = bench_e2e._context("forkserver").Process(target=runpy.run_path, args=({str(probe)!r},))
        process.start()
        process.join(timeout=240)
        sys.exit(process.exitcode)
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = set((tmp_path / "found.txt").read_text().split())
    installed = {name for name in bench.ROW_LIBRARIES if importlib.util.find_spec(name.split(".")[0]) is not None}
    assert "reft_fast.core.model" in installed and found == installed, installed - found


def test_the_preload_names_an_import_that_initializes_cuda(monkeypatch, capsys):
    """On the H200 (2026-11-30) an import of the server's preload initialized CUDA, so no forked row could use it and
    every row was spawned (its imports again, most of the e2e stage): the preload names that import."""
    bench = _load_bench()
    state = {"initialized": False}
    monkeypatch.setattr(bench, "ROW_LIBRARIES", ("json", "textwrap"))
    monkeypatch.setattr(bench.torch.cuda, "is_initialized", lambda: state["initialized"])
    real_import = bench.importlib.import_module

    def importing(name):
        module = real_import(name)
        state["initialized"] = state["initialized"] or name == "json"
        return module

    monkeypatch.setattr(bench.importlib, "import_module", importing)
    bench._import_row_libraries()
    err = capsys.readouterr().err
    assert "preload: import json initialized CUDA: the rows will be spawned instead" in err
    assert "textwrap" not in err  # named once, at the import that did it
