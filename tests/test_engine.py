"""The training engine on a tiny random Llama (CPU, gloo).

One reference run through the CLI (one rank, ZeRO-0, gradient accumulation 2) is shared by:
  * the CLI end to end: metrics.jsonl, evaluation, pruned checkpoints, final save, `reft-fast generate`;
  * resume: a run SIGKILLed while it saves step 6 resumes from step 4; a damaged step-8 checkpoint is named and step 6
    used; both reproduce the reference losses;
  * output directories: a used one is refused, --overwrite replaces only a run's own outputs, --resume with nothing to
    resume starts at step 0; every reduction goes through one helper, on the accelerator's device;
  * 2 ranks through the deepspeed launcher (same global batch, no accumulation), one launch: ZeRO-2 and ZeRO-3 from
    scratch give the reference losses, frozen weights unchanged, the base partitioned by zero.Init, samples generated
    after the final ZeRO-3 save; ZeRO-0, 2 and 3 resume the one-rank reference's step-4 checkpoint (1 → 2 ranks), and
    one rank resumes their step-6 checkpoints (2 → 1 ranks), on the reference trajectory and with its state.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist.tiny import make_run, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RUN_TRAIN = str(ROOT / "tests" / "dist" / "run_train.py")
STEPS = 8
# Same global batch (8) for every run: one rank accumulates 2 micro-batches of 4, two ranks take one each.
COMMON = [f"training.max_steps={STEPS}", "training.micro_batch_size=4", "training.global_batch_size=8",
          "training.save_every=2", "training.keep_checkpoints=3", "training.eval_every=4", "data.eval_fraction=0.2",
          "interventions.dropout=0.1"]
STAGES = (0, 2, 3)
# A low persistence threshold so that the tiny base really is partitioned under ZeRO-3 (the engine keeps the
# interventions whole regardless).
PARTITION_THE_BASE = "deepspeed.config.zero_optimization.stage3_param_persistence_threshold=100"


def _run(args, timeout=240, check=True):
    proc = subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


def _checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _copy_run_until(source: Path, target: Path, step: int) -> Path:
    """``target`` as ``source`` was right after saving step ``step`` (its metrics lines past ``step`` included, as a
    run killed later leaves them)."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy(source / "metrics.jsonl", target / "metrics.jsonl")
    shutil.copytree(source / "checkpoints" / f"step{step}", target / "checkpoints" / f"step{step}")
    (target / "checkpoints" / "latest").write_text(f"step{step}\n")
    return target


def _assert_same_state(checkpoint: Path, expected: Path, rtol: float = 1e-4) -> None:
    from reft_fast.train.checkpoints import read_checkpoint

    got, want = read_checkpoint(checkpoint), read_checkpoint(expected)
    assert got["step"] == want["step"] and got["optimizer"]["step"] == want["optimizer"]["step"]
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"]
    for part in ("params", "exp_avg", "exp_avg_sq"):
        tensors = got[part] if part == "params" else got["optimizer"][part]
        wanted = want[part] if part == "params" else want["optimizer"][part]
        assert tensors.keys() == wanted.keys()
        for name in tensors:
            scale = float(wanted[name].abs().max())
            torch.testing.assert_close(tensors[name], wanted[name], rtol=rtol, atol=rtol * scale, msg=f"{part} {name}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    config = make_run(folder, n_examples=40)
    _run([PY, "-m", "reft_fast", "train", str(config), *COMMON])
    return config, folder / "out"


def test_cli_train_end_to_end(reference):
    config, out = reference
    rows = _metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    for r in train_rows:
        assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["lr"] > 0 and r["step_time_s"] > 0
    # Warmup (1 step) to the peak, then cosine decay towards 0: the rate each step used.
    lrs = [r["lr"] for r in train_rows]
    assert lrs[:2] == pytest.approx([1e-2, 1e-2]) and all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 4, 8]
    assert evals[-1][1] < evals[0][1]  # the held-out loss of the copy task went down
    assert _checkpoint_names(out) == ["latest", "step4", "step6", "step8"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step8"
    final = out / "final"
    saved = json.loads((final / "config.json").read_text())
    assert [e["layer"] for e in saved["interventions"]] == [1, 2] and saved["positions"] == "f1+l1"

    gen = _run([PY, "-m", "reft_fast", "generate", "--reft", str(final), "--max-new-tokens", "4",
                "repeat : red cat", "repeat : sky"])
    answers = [line for line in gen.stdout.splitlines() if line.startswith("A:")]
    assert len(answers) == 2, gen.stdout


def _assert_reference_trajectory(out: Path, reference_out: Path) -> None:
    resumed, reference_rows = _metrics(out), _metrics(reference_out)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference_rows]
    assert _losses(resumed) == pytest.approx(_losses(reference_rows), rel=1e-5, abs=1e-6)
    evals = [r["eval_loss"] for r in resumed if "eval_loss" in r]
    assert evals == pytest.approx([r["eval_loss"] for r in reference_rows if "eval_loss" in r], rel=1e-5)


def test_a_kill_during_a_save_loses_nothing(reference, tmp_path):
    config, out = reference
    killed_out = tmp_path / "killed"
    proc = _run([PY, RUN_TRAIN, str(config), str(tmp_path / "r.json"), *COMMON, f"output_dir={killed_out}",
                 "--kill-in-save", "6"], check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Step 6's metrics line was written before its checkpoint, and step 4 is still the newest published checkpoint.
    assert [r["step"] for r in _metrics(killed_out) if "loss" in r] == list(range(1, 7))
    assert (killed_out / "checkpoints" / "latest").read_text().strip() == "step4"
    resumed = _run([PY, "-m", "reft_fast", "train", str(config), *COMMON, f"output_dir={killed_out}", "--resume"])
    assert f"resumed from {killed_out / 'checkpoints' / 'step4'} at step 4" in resumed.stderr, resumed.stderr[-3000:]
    _assert_reference_trajectory(killed_out, out)
    assert _checkpoint_names(killed_out) == ["latest", "step4", "step6", "step8"]  # the killed save's scratch: gone


def test_resuming_a_checkpoint_past_the_runs_last_step_is_refused(reference, tmp_path):
    """It used to "train -2 steps" and publish the step-6 interventions as the final ones of a 4-step run."""
    config, out = reference
    copied = _copy_run_until(out, tmp_path / "past", 6)
    proc = _run([PY, "-m", "reft_fast", "train", str(config), *COMMON, f"output_dir={copied}", "--resume",
                 "training.max_steps=4"], check=False)
    assert proc.returncode != 0
    assert f"resume: the newest checkpoint in {copied / 'checkpoints'} is at step 6, past this run's last step 4" \
        in proc.stderr, proc.stderr[-3000:]
    # refused before anything was restored: no "resumed from" line, no schedule warning before the error
    assert "resumed from" not in proc.stderr and "schedule continues" not in proc.stderr, proc.stderr[-3000:]
    assert not (copied / "final").exists() and _checkpoint_names(copied) == ["latest", "step6"]


def test_a_resume_with_a_new_rate_and_length_follows_the_new_schedule_from_the_saved_step(reference, tmp_path):
    # Extending a run (more steps) or changing its rate on resume: the schedule is this run's config at the saved
    # step. The scheduler's saved state used to win: the new training.lr was ignored, and step 5 ran at the old
    # schedule's rate, step 6 on at the new one's.
    from reft_fast.train.ds_config import lr_lambda, warmup_steps_of
    from reft_fast.train.train_config import load_config

    config, out = reference
    resumed_out = _copy_run_until(out, tmp_path / "resumed", 4)
    overrides = [*COMMON, "training.max_steps=12", "training.lr=5e-3", f"output_dir={resumed_out}"]
    proc = _run([PY, "-m", "reft_fast", "train", str(config), *overrides, "--resume"])
    assert "training.lr is 0.005, the checkpoint's run had 0.01" in proc.stderr, proc.stderr[-3000:]
    assert "resume: this run ends at step 12, the checkpoint's run was to end at step 8" in proc.stderr
    t = load_config(str(config), overrides).training
    factor = lr_lambda(t.schedule, warmup_steps_of(t.warmup_steps, t.warmup_ratio, 12), 12, t.min_lr_ratio)
    rows = [r for r in _metrics(resumed_out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["lr"] for r in rows[4:]] == pytest.approx([5e-3 * factor(step - 1) for step in range(5, 13)], rel=1e-12)
    assert [r["lr"] for r in rows[:4]] == [r["lr"] for r in _metrics(out) if "loss" in r][:4]  # the first run's


def test_a_kill_between_metrics_reads_resumes_on_one_trajectory(reference, tmp_path):
    # Metrics are read every 3 steps and before each checkpoint (steps 4, 8): lines 1…6 are written when the run is
    # killed before step 8, step 7's metrics were never read, and the newest checkpoint is step 4's.
    config, out = reference
    killed_out = tmp_path / "killed"
    overrides = [*COMMON, "training.log_every=3", "training.save_every=4", f"output_dir={killed_out}"]
    proc = _run([PY, RUN_TRAIN, str(config), str(tmp_path / "r.json"), *overrides, "--kill-before-step", "8"],
                check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [r["step"] for r in _metrics(killed_out) if "loss" in r] == list(range(1, 7))
    assert (killed_out / "checkpoints" / "latest").read_text().strip() == "step4"
    _run([PY, "-m", "reft_fast", "train", str(config), *overrides, "--resume"])
    _assert_reference_trajectory(killed_out, out)  # lines 5 and 6 cut back, steps 5…8 replayed once


def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(reference, tmp_path):
    config, out = reference
    damaged_out = tmp_path / "damaged"
    shutil.copytree(out, damaged_out)
    newest = damaged_out / "checkpoints" / "step8"
    largest = max(newest.iterdir(), key=lambda p: p.stat().st_size)
    largest.write_bytes(b"")  # truncated to 0 bytes, as a disk-full or a kill mid-write leaves a file
    resumed = _run([PY, "-m", "reft_fast", "train", str(config), *COMMON, f"output_dir={damaged_out}", "--resume"])
    assert f"checkpoint {newest} is damaged" in resumed.stderr, resumed.stderr[-3000:]
    assert f"resumed from {newest.with_name('step6')} at step 6" in resumed.stderr
    _assert_reference_trajectory(damaged_out, out)
    _assert_same_state(newest, out / "checkpoints" / "step8", rtol=1e-6)  # step 8 saved again, whole


def _nothing_may_start(*args, **kwargs):
    raise AssertionError("a process group was started or weights were loaded before the output folder was checked")


def test_a_used_output_dir_is_refused_unless_overwritten(reference, tmp_path, capsys, monkeypatch):
    import deepspeed
    import transformers

    from reft_fast.train.cli import main

    config, out = reference
    used = tmp_path / "used"
    shutil.copytree(out, used)
    (used / "notes.txt").write_text("the user's own file")
    before = {p: p.read_bytes() for p in used.rglob("*") if p.is_file()}
    # Refused before anything starts, so in this process (a launch costs seconds of imports): no process group, no
    # weights read.
    for owner, name in ((deepspeed, "init_distributed"), (torch.distributed, "init_process_group"),
                        (transformers.AutoModelForCausalLM, "from_pretrained")):
        monkeypatch.setattr(owner, name, _nothing_may_start)
    assert main(["train", str(config), *COMMON, f"output_dir={used}"]) == 2
    err = capsys.readouterr().err
    assert f"config error: output_dir: {used} is not empty" in err, err[-3000:]
    assert "--resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in used.rglob("*") if p.is_file()} == before  # nothing touched
    monkeypatch.undo()

    _run([PY, "-m", "reft_fast", "train", str(config), *COMMON, "training.max_steps=2", f"output_dir={used}",
          "--overwrite"])
    assert [r["step"] for r in _metrics(used)] == [0, 1, 2]  # only the new run's lines
    assert _checkpoint_names(used) == ["latest", "step2"]  # the earlier run's step4…step8 went with it
    assert (used / "notes.txt").read_text() == "the user's own file"


@pytest.fixture(scope="module")
def resume_in_an_empty_dir(reference, tmp_path_factory):
    """`resume: true` where there is nothing to resume, every collective that reft_fast calls recorded."""
    config, _ = reference
    folder = tmp_path_factory.mktemp("fresh")
    proc = _run([PY, RUN_TRAIN, str(config), str(folder / "r.json"), *COMMON, "training.max_steps=4", "resume=true",
                 f"output_dir={folder / 'out'}", "--record-collectives", "--count-module-walks"])
    return proc, json.loads((folder / "r.json").read_text())[0], folder / "out"


def test_resume_with_nothing_to_resume_says_so_and_starts_at_step_0(resume_in_an_empty_dir):
    proc, run, out = resume_in_an_empty_dir
    assert f"resume: nothing to resume in {out / 'checkpoints'}" in proc.stderr, proc.stderr[-3000:]
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2, 3, 4] and len(run["losses"]) == 4


def test_every_reduction_goes_through_one_helper_on_the_accelerator_device(resume_in_an_empty_dir):
    _, run, _ = resume_in_an_empty_dir
    calls = run["collectives"]
    # The resume's check that every rank found the same checkpoint, 4 steps read in 2 windows (before each
    # checkpoint: one reduction each, not one per step), evaluations at steps 0 and 4, and 2 checkpoints.
    assert len(calls) == 7
    assert {c["caller"] for c in calls} == {"reft_fast.train.distributed.all_reduce_sum"}, calls
    assert all(device == c["accelerator_device"] for c in calls for device in c["devices"]), calls


def test_one_rank_at_zero_0_makes_no_gradient_all_reduce(resume_in_an_empty_dir):
    # DeepSpeed's stage-0 gradient all-reduce walks every parameter, flattens, reduces over the one rank and copies
    # each gradient back after every backward (≈ 60 µs of host time per intervention and step): skipped on one rank.
    _, run, _ = resume_in_an_empty_dir
    reductions = [c for c in run["deepspeed_collectives"] if c["collective"] == "all_reduce"]
    assert not any(c["caller"].startswith("deepspeed.runtime.engine") for c in reductions), reductions


def test_a_stage_0_step_never_walks_the_whole_model(resume_in_an_empty_dir):
    # DeepSpeed's stage-0 zero_grad set each parameter's grad to None through module.named_parameters(), the frozen
    # base's included, at every step (887 µs per step on a 32-layer Llama-shaped model): the optimizer's is enough.
    _, run, _ = resume_in_an_empty_dir
    assert run["module_walks"] == {"steps": 4}, run["module_walks"]


def test_the_reduction_helper_moves_host_values_to_the_accelerator_device(monkeypatch):
    # On a GPU node the accelerator's device is cuda:<local rank> and NCCL rejects host tensors; "meta" stands for
    # a device other than the host here, where torch has no other.
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from reft_fast.train.distributed import all_reduce_sum

    handed = []
    monkeypatch.setattr(get_accelerator(), "current_device_name", lambda: "meta")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: handed.append(tensor.device))
    summed = all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert handed == [torch.device("meta")] and summed.device == torch.device("meta")


@pytest.mark.cuda
def test_one_gpu_run_reduces_on_the_gpu(tmp_path):
    # DeepSpeed makes an NCCL process group on GPUs, even for one rank: a host tensor in a collective raises there.
    config = make_run(tmp_path, n_examples=16)
    _run([PY, RUN_TRAIN, str(config), str(tmp_path / "r.json"), "training.save_every=2", "data.eval_fraction=0.25",
          "--record-collectives"])
    calls = json.loads((tmp_path / "r.json").read_text())[0]["collectives"]
    assert calls and all(c["accelerator_device"].startswith("cuda") for c in calls)
    assert all(device == c["accelerator_device"] for c in calls for device in c["devices"]), calls


def _one_launch(runs: list[list[str]]) -> list[str]:
    """run_train.py's arguments for several runs in one launch."""
    return [arg for i, run in enumerate(runs) for arg in (["--then"] if i else []) + run]


def _launcher() -> str:
    if shutil.which("deepspeed") is None and not (Path(PY).parent / "deepspeed").exists():
        pytest.skip("the deepspeed launcher is not installed")
    return shutil.which("deepspeed") or str(Path(PY).parent / "deepspeed")


@pytest.fixture(scope="module")
def two_rank_launch(reference, tmp_path_factory):
    """One launch of 2 ranks: ZeRO-2 and ZeRO-3 from scratch, then ZeRO-0, 2 and 3 resuming the one-rank reference's
    step-4 checkpoint (1 → 2 ranks)."""
    launcher = _launcher()
    config, out = reference
    folder = tmp_path_factory.mktemp("dist")
    result = folder / "dist.json"
    runs = [[*COMMON, "deepspeed.stage=2", f"output_dir={folder / 'z2'}"],
            [*COMMON, "deepspeed.stage=3", PARTITION_THE_BASE, f"output_dir={folder / 'z3'}",
             "training.sample_prompts=['repeat : red cat']", "training.max_new_tokens=3"]]
    for stage in STAGES:
        resumed = _copy_run_until(out, folder / f"to2_z{stage}", step=4)
        runs.append([*COMMON, f"deepspeed.stage={stage}", PARTITION_THE_BASE, "resume=true", f"output_dir={resumed}"])
    _run([launcher, "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000), RUN_TRAIN, str(config),
          str(result), *_one_launch(runs), "--check-frozen", "--count-module-walks"], timeout=600)
    return folder, json.loads(result.read_text())


@pytest.mark.slow
def test_two_ranks_zero2_and_zero3_match_one_rank(reference, two_rank_launch):
    config, out = reference
    zero2_run, zero3_run = two_rank_launch[1][:2]
    reference_losses = _losses(_metrics(out))
    for run in (zero2_run, zero3_run):
        assert run["world"] == 2
        assert run["losses"] == pytest.approx(reference_losses, rel=2e-4, abs=1e-5)
        assert run["frozen_max_diff"] == 0.0
    full = zero3_run["full_base_numel"]
    assert zero2_run["base_numel_at_load"] == full  # ZeRO-2 replicates the (frozen) base
    assert zero3_run["base_numel_at_load"] < 0.1 * full  # zero.Init: only persistent scraps are materialized
    assert abs(zero3_run["shard_numel"] - full / 2) < 0.1 * full  # each of the 2 ranks holds about half
    # Generation after the final save runs on the interventions' weights (the save once released them under ZeRO-3).
    assert [prompt for prompt, _ in zero3_run["samples"]] == ["repeat : red cat"]
    # DeepSpeed's shared-memory allreduce buffers (one 69 MB file per CPU rank) are not left behind in /dev/shm.
    leftover = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{29500 + os.getpid() % 1000}_*"))
    assert leftover == [], leftover
    assert [run["shm_buffer_named"] for run in (zero2_run, zero3_run)] == [False, False]  # not even during the run


@pytest.mark.slow
def test_resume_across_rank_counts_at_zero_0_2_and_3(reference, two_rank_launch, tmp_path):
    config, out = reference
    folder, dist_runs = two_rank_launch
    reference_losses = _losses(_metrics(out))
    for stage, run in zip(STAGES, dist_runs[2:]):  # 1 → 2 ranks, from step 4
        assert run["world"] == 2 and run["frozen_max_diff"] == 0.0
        assert run["losses"] == pytest.approx(reference_losses[4:], rel=2e-4, abs=1e-5), stage
        assert _losses(_metrics(folder / f"to2_z{stage}")) == pytest.approx(reference_losses, rel=2e-4, abs=1e-5)
    # DeepSpeed's stage-0 all-reduce found the gradients through module.parameters() after every backward, the frozen
    # base's walked too (≈ 0.9 ms per step on a 32-layer Llama-shaped model): it is handed the trained ones instead.
    assert "walks" not in dist_runs[2]["module_walks"] and dist_runs[2]["module_walks"]["steps"] > 0, dist_runs[2]
    # ... and reduced as one flat tensor they are views of (no flattened copy, no copy back per tensor): after a step
    # they are still there, zeroed in place, all in one storage.
    assert dist_runs[2]["trained_gradients"]["storages"] == 1, dist_runs[2]["trained_gradients"]
    assert dist_runs[2]["trained_gradients"]["none"] == 0, dist_runs[2]["trained_gradients"]

    result = tmp_path / "one.json"
    runs = []
    for stage in STAGES:  # 2 → 1 rank, from the two-rank runs' step 6
        resumed = _copy_run_until(folder / f"to2_z{stage}", tmp_path / f"to1_z{stage}", step=6)
        runs.append([*COMMON, f"deepspeed.stage={stage}", PARTITION_THE_BASE, "resume=true", f"output_dir={resumed}"])
    _run([PY, RUN_TRAIN, str(config), str(result), *_one_launch(runs)])
    for stage, run in zip(STAGES, json.loads(result.read_text())):
        assert run["world"] == 1
        assert run["losses"] == pytest.approx(reference_losses[6:], rel=2e-4, abs=1e-5), stage
        # The state itself, saved again at step 8: parameters, Adam's moments and step, the schedule.
        _assert_same_state(tmp_path / f"to1_z{stage}" / "checkpoints" / "step8", out / "checkpoints" / "step8")


def test_fused_ops_off_and_auto_train_alike_on_cpu(tmp_path):
    # Both runs in one process (the launch is the slow part): "auto" must resolve to no fused operation on a CPU.
    config = make_run(tmp_path, n_examples=16)
    result = tmp_path / "fused.json"
    _run([PY, RUN_TRAIN, str(config), str(result), "model.fused_ops=off", f"output_dir={tmp_path / 'off'}",
          "--then", "model.fused_ops=auto", f"output_dir={tmp_path / 'auto'}"])
    off_run, auto_run = json.loads(result.read_text())
    assert off_run["fused_ops"] == auto_run["fused_ops"] == []
    assert len(off_run["losses"]) == 4 and all(math.isfinite(x) for x in off_run["losses"])
    assert auto_run["losses"] == off_run["losses"]  # the same unfused computation, bit for bit
    for mode in ("off", "auto"):
        info = json.loads((tmp_path / mode / "run.json").read_text())
        assert info == {"fused_ops_mode": mode, "fused_ops": []}
    if not torch.cuda.is_available():  # "on" where liger's kernels cannot run is a config error naming the field
        refused = _run([PY, "-m", "reft_fast", "train", str(config), "model.fused_ops=on",
                        f"output_dir={tmp_path / 'on'}"], check=False)
        assert refused.returncode == 2 and "config error: model.fused_ops:" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize("component", ["block_output", "mlp_output"])
def test_gradient_checkpointing_gives_equal_gradients(tmp_path, component):
    from reft_fast.train.loading import build_reft_model, enable_gradient_checkpointing, load_tokenizer
    from reft_fast.train.train_config import load_config

    config = make_run(tmp_path, n_examples=8)
    from transformers import AutoModelForCausalLM

    from reft_fast.train.data import ReftDataCollator, SupervisedDataset, load_examples

    cfg = load_config(str(config), ["interventions.layers=[0, 2, 3]", "interventions.positions=f2+l2",
                                    f"interventions.component={component}"])
    tokenizer = load_tokenizer(cfg.model.path)
    items = SupervisedDataset(load_examples(tmp_path / "train.jsonl"), tokenizer, max_length=32)
    grads = {}
    for mode in ("off", "non-reentrant", "reentrant"):
        base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        base.requires_grad_(False)
        if mode != "off":
            enable_gradient_checkpointing(base, reentrant=mode == "reentrant")
        torch.manual_seed(0)
        reft = build_reft_model(base, cfg, [0, 2, 3])
        reft.train()
        collator = ReftDataCollator(tokenizer.pad_token_id, len(reft.interventions), "f2+l2", share_weights=True)
        batch = collator([items[i] for i in range(6)])
        calls = []
        # transformers checkpoints a layer's forward (its own hooks stay outside); its submodules run again. A
        # pre-hook counts: non-reentrant recomputation stops once the saved tensors it needs are back, mid-module.
        base.model.layers[2].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        _, out = reft({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                      intervention_locations=batch["intervention_locations"], labels=batch["labels"])
        out.loss.backward()
        assert len(calls) == (1 if mode == "off" else 2)  # checkpointed layers really were recomputed
        grads[mode] = [p.grad.clone() for p in reft.trainable_parameters()]
        assert all(g.abs().sum() > 0 for g in grads[mode])
    for mode in ("non-reentrant", "reentrant"):
        for a, b in zip(grads["off"], grads[mode]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_optimizer_offload_at_zero_2_and_3_trains_like_stage_0(tmp_path):
    """deepspeed.offload_optimizer: the recipe's AdamW (fused where torch has the kernel, the CPU's included) steps
    DeepSpeed's fp32 partitions in host memory; the losses follow the un-offloaded run's. And DeepSpeed allocates no
    gradient bucket sized for another model: offload forces its contiguous gradient buffer at stage 2, and ZeRO-3
    kept one by default, each of 5·10^8 elements (1.86 GiB of fp32 on the accelerator) at DeepSpeed's default bucket
    size, for a ReFT's few thousand trained elements here."""
    config = make_run(tmp_path, n_examples=16)
    result = tmp_path / "offload.json"
    runs = [["deepspeed.stage=0", f"output_dir={tmp_path / 'z0'}"],
            ["deepspeed.stage=2", "deepspeed.offload_optimizer=true", f"output_dir={tmp_path / 'z2'}"],
            ["deepspeed.stage=3", "deepspeed.offload_optimizer=true", PARTITION_THE_BASE,
             f"output_dir={tmp_path / 'z3'}"],
            ["deepspeed.stage=3", PARTITION_THE_BASE, f"output_dir={tmp_path / 'z3-on-device'}"]]
    _run([PY, RUN_TRAIN, str(config), str(result), "--record-deepspeed-buffers", *_one_launch(runs)])
    reference, *others = json.loads(result.read_text())
    assert len(reference["losses"]) == 4 and all(math.isfinite(x) for x in reference["losses"])
    for run in others:
        assert run["losses"] == pytest.approx(reference["losses"], rel=2e-4, abs=1e-5)
    for run in others:  # (ZeRO 2–3 allocate their partitions: the record is not empty)
        # the tiny model's largest tensor (its embedding) and the trained gradients fit in far less than 2^21
        assert 0 < run["largest_deepspeed_buffer"].get("numel", 0) <= 1 << 21, run["largest_deepspeed_buffer"]
