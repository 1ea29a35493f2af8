"""Checkpoint files (reft_fast.train.checkpoints) and the output-directory check, without training: publishing, damage
found on resume and named, ``latest`` that is empty or wrong, pruning by step number, a used output_dir refused.

Training through them (kills, resume across rank counts and ZeRO stages) is in test_engine.py.
"""

import os
from pathlib import Path

import pytest
import torch

from reft_fast.train.checkpoints import LATEST_FILE, STATE_FILE, load_newest_intact, prune_checkpoints, read_checkpoint, \
    step_dirs, write_checkpoint
from reft_fast.train.run_dir import check_output_dir
from reft_fast.train.train_config import ConfigError, TrainConfig


def _state(step: int) -> dict:
    return {"step": step, "params": {"0.weight": torch.full((2, 3), float(step))}, "scheduler": {"last_epoch": step}}


def _saved(ckpt_dir: Path, *steps: int) -> Path:
    for step in steps:
        write_checkpoint(ckpt_dir, step, _state(step))
    return ckpt_dir


def _newest(ckpt_dir: Path) -> tuple[int, list[str]]:
    warnings = []
    found = load_newest_intact(ckpt_dir, warnings.append)
    return (found[1]["step"] if found else None), warnings


def test_a_published_checkpoint_reads_back_and_moves_latest(tmp_path):
    ckpt_dir = _saved(tmp_path / "checkpoints", 2, 4)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [LATEST_FILE, "step2", "step4"]  # no scratch left behind
    assert (ckpt_dir / LATEST_FILE).read_text() == "step4\n"
    state = read_checkpoint(ckpt_dir / "step4")
    assert state["step"] == 4 and torch.equal(state["params"]["0.weight"], torch.full((2, 3), 4.0))
    assert _newest(ckpt_dir) == (4, [])


@pytest.mark.parametrize("damage, reason", [
    (lambda f: f.write_bytes(b""), "has 0 bytes, its manifest says"),
    (lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]), "does not match the checksum"),
    (lambda f: f.unlink(), "is missing"),
    (lambda f: (f.parent / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda f: (f.parent / "manifest.json").write_text("{"), "manifest.json is unreadable"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage, reason):
    ckpt_dir = _saved(tmp_path / "checkpoints", 2, 4)
    damage(ckpt_dir / "step4" / STATE_FILE)
    step, warnings = _newest(ckpt_dir)
    assert step == 2
    assert len(warnings) == 1 and str(ckpt_dir / "step4") in warnings[0] and reason in warnings[0], warnings


def test_every_checkpoint_damaged_is_an_error_naming_each(tmp_path):
    ckpt_dir = _saved(tmp_path / "checkpoints", 9, 10)
    for step in (9, 10):
        (ckpt_dir / f"step{step}" / STATE_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"resume: no intact checkpoint .*step10: .*step9: .*--overwrite"):
        load_newest_intact(ckpt_dir, lambda message: None)


@pytest.mark.parametrize("latest, complaint", [(b"", "is empty"), (b"step99\n", "names 'step99'"),
                                               (b"\x00garbage", "which is not a checkpoint"),
                                               (b"\xff\xfe", "is unreadable"), (None, "is missing")])
def test_a_wrong_latest_is_reported_and_the_newest_intact_checkpoint_used(tmp_path, latest, complaint):
    ckpt_dir = _saved(tmp_path / "checkpoints", 2, 4)
    if latest is None:
        (ckpt_dir / LATEST_FILE).unlink()
    else:
        (ckpt_dir / LATEST_FILE).write_bytes(latest)
    step, warnings = _newest(ckpt_dir)
    assert step == 4 and len(warnings) == 1 and complaint in warnings[0], warnings


def test_nothing_to_resume(tmp_path):
    assert _newest(tmp_path / "checkpoints") == (None, [])
    (tmp_path / "checkpoints").mkdir()
    assert _newest(tmp_path / "checkpoints") == (None, [])


def test_pruning_goes_by_step_number_and_drops_what_lies_past_the_current_step(tmp_path):
    # "step10" sorts before "step9" as text. step100 is a damaged leftover of a trajectory the resume replaced.
    ckpt_dir = _saved(tmp_path / "checkpoints", 8, 9, 10, 100)
    (ckpt_dir / ".step12.partial").mkdir()  # an interrupted save's scratch directory
    prune_checkpoints(ckpt_dir, keep=2, current_step=10)
    assert [step for step, _ in step_dirs(ckpt_dir)] == [9, 10]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [LATEST_FILE, "step10", "step9"]


def test_saving_a_step_again_replaces_its_damaged_directory(tmp_path):
    ckpt_dir = _saved(tmp_path / "checkpoints", 2, 4)
    (ckpt_dir / "step4" / STATE_FILE).write_bytes(b"")
    write_checkpoint(ckpt_dir, 4, _state(4))
    assert _newest(ckpt_dir) == (4, [])


def _config(output: Path, **fields) -> TrainConfig:
    cfg = TrainConfig(output_dir=str(output))
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


def test_a_used_output_dir_is_refused_without_resume_or_overwrite(tmp_path):
    check_output_dir(_config(tmp_path / "new"))  # does not exist yet
    (tmp_path / "empty").mkdir()
    check_output_dir(_config(tmp_path / "empty"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"output_dir: .*used is not empty \(metrics.jsonl\); pass --resume .*"
                                          r"--overwrite"):
        check_output_dir(_config(used))
    check_output_dir(_config(used, resume=True))
    check_output_dir(_config(used, overwrite_output_dir=True))
    # the base's scores written first (`reft-fast eval CONFIG --base-only`): training there overwrites nothing
    baseline = tmp_path / "baseline"
    (baseline / "eval").mkdir(parents=True)
    (baseline / "eval" / "test-base.jsonl").write_text("{}\n")
    check_output_dir(_config(baseline))
    (baseline / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"baseline is not empty \(eval, metrics.jsonl\)"):
        check_output_dir(_config(baseline))
    with pytest.raises(ConfigError, match="overwrite_output_dir: cannot be combined with resume"):
        check_output_dir(_config(used, resume=True, overwrite_output_dir=True))
    # A finished run without checkpoints: --resume is not a way on (it is refused), so it is not offered.
    finished = tmp_path / "finished"
    (finished / "final").mkdir(parents=True)
    (finished / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError) as err:
        check_output_dir(_config(finished))
    assert "--resume" not in str(err.value) and "it holds a finished run without checkpoints; pass --overwrite" \
        in str(err.value), str(err.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        check_output_dir(_config(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"output_dir: .*file/run/out cannot be created: .*file is a file"):
        check_output_dir(_config(tmp_path / "file" / "run" / "out"))


def test_resume_without_a_checkpoint_never_replaces_a_finished_runs_final_interventions(tmp_path):
    """A run trained with save_every 0 has final/ and no checkpoint: --resume there would start at step 0 and replace
    final/ (the finished run's result) with a new one; it is refused before anything loads, naming --overwrite."""
    finished = tmp_path / "finished"
    (finished / "final").mkdir(parents=True)
    (finished / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"resume: .*finished holds a finished run \(final/\) but no checkpoint.*"
                                          r"--overwrite"):
        check_output_dir(_config(finished, resume=True))
    check_output_dir(_config(finished, overwrite_output_dir=True))
    _saved(finished / "checkpoints", 4)  # with a checkpoint the resume continues from it (and replays to the end)
    check_output_dir(_config(finished, resume=True))
    interrupted = tmp_path / "interrupted"  # killed before its first checkpoint and before final/: step 0 is right
    interrupted.mkdir()
    (interrupted / "metrics.jsonl").write_text('{"step": 1}\n')
    check_output_dir(_config(interrupted, resume=True))


class _InterruptedSave:
    """A ReftModel stand-in whose save writes its config and is killed before the weights (the real ReftModel.save
    writes in that order)."""

    model = torch.nn.Linear(1, 1).requires_grad_(False)  # the frozen base: nothing of it is saved

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text('{"new": true}')
        raise KeyboardInterrupt("killed during the save")


def test_a_kill_while_the_final_interventions_are_saved_keeps_the_previous_ones_whole(tmp_path, monkeypatch):
    from reft_fast.train import run_dir

    monkeypatch.setattr(run_dir, "barrier", lambda: None)
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text('{"old": true}')
    (final / "interventions.safetensors").write_bytes(b"old weights")
    with pytest.raises(KeyboardInterrupt):
        run_dir.save_interventions(_InterruptedSave(), final, TrainConfig(output_dir=str(tmp_path)), rank=0)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "interventions.safetensors"]
    assert (final / "config.json").read_text() == '{"old": true}'
    # The next save replaces the scratch left behind and publishes a complete directory.

    class _Save:
        model = torch.nn.Linear(1, 1).requires_grad_(False)

        def save(self, directory: str) -> None:
            (Path(directory)).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "config.json").write_text('{"new": true}')

    run_dir.save_interventions(_Save(), final, TrainConfig(output_dir=str(tmp_path)), rank=0)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", run_dir.TRAIN_CONFIG_FILE]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_kill_while_metrics_are_rewound_keeps_the_file(tmp_path, monkeypatch):
    """Resuming at step 2 cuts metrics.jsonl back to steps ≤ 2; a kill during that write must not lose the file."""
    from reft_fast.core import files  # where replace_atomically, which rewind_metrics writes through, lives
    from reft_fast.train import run_dir

    metrics = tmp_path / "metrics.jsonl"
    lines = "".join(f'{{"step": {k}}}\n' for k in range(5))
    metrics.write_text(lines)

    def torn_write(path, data):
        Path(path).write_bytes(data[:3])
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(files, "write_durably", torn_write)
    with pytest.raises(KeyboardInterrupt):
        run_dir.rewind_metrics(metrics, 2)
    assert metrics.read_text() == lines
    monkeypatch.undo()
    run_dir.rewind_metrics(metrics, 2)
    assert metrics.read_text() == "".join(f'{{"step": {k}}}\n' for k in range(3))


def _resume_on_rank(rank: int, world: int, init_file: str, dirs: list, results: str) -> None:
    import json as json_module

    import torch.distributed as dist

    from reft_fast.train.checkpoints import resume_from_checkpoint
    from reft_fast.train.distributed import same_on_every_rank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        outcome = {"same_4": same_on_every_rank(4), "differing": same_on_every_rank(rank * 10)}
        try:  # refused before the engine is touched: None stands for each of them
            resume_from_checkpoint(Path(dirs[rank]), None, None, None, None, {}, rank, lambda: [], {"total_steps": 8})
            outcome["resume"] = "resumed"
        except RuntimeError as error:
            outcome["resume"] = str(error)
        Path(results, f"{rank}.json").write_text(json_module.dumps(outcome))
        dist.barrier()  # neither rank tears its connections down while the other still reduces over them
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalization. torch 2.13's gloo backend outlives destroy_process_group, and its
    # worker thread may still be releasing a finished collective's tensor then; that needs the GIL, which a thread
    # cannot take once finalization has begun, so the process aborts (SIGABRT, "terminate called without an active
    # exception"; seen 1 in 30 spawns under load, 2026-11-29, the core's backtrace ending in ~AsyncWork).
    os._exit(0)


def test_ranks_that_see_different_checkpoints_fail_together_instead_of_hanging(tmp_path):
    """output_dir on a disk of each node's own: rank 0 finds its step-4 checkpoint, rank 1 none (a rank starting at
    step 0 would wait forever in its first collective). Two gloo ranks: both raise, naming the cause."""
    import torch.multiprocessing as mp

    dirs = [str(_saved(tmp_path / "node0", 4)), str(tmp_path / "node1")]
    (tmp_path / "out").mkdir()
    mp.spawn(_resume_on_rank, args=(2, str(tmp_path / "init"), dirs, str(tmp_path / "out")), nprocs=2, join=True)
    import json

    outcomes = [json.loads((tmp_path / "out" / f"{rank}.json").read_text()) for rank in range(2)]
    assert all(o["same_4"] is True and o["differing"] is False for o in outcomes)
    for rank, outcome in enumerate(outcomes):
        assert outcome["resume"].startswith("resume: the ranks found different checkpoints"), outcome
        assert f"this rank, {rank}: " in outcome["resume"] and "filesystem that every node sees" in outcome["resume"]


@pytest.mark.parametrize("saved_ranks, said", [(1, "saved by 1 rank at ZeRO-2"), (4, "saved by 4 ranks at ZeRO-2")])
def test_the_resume_line_says_rank_for_one(tmp_path, monkeypatch, caplog, saved_ranks, said):
    """It said "saved by 1 ranks"."""
    import logging
    import types

    from reft_fast.train import checkpoints

    saved_by = {"ranks": saved_ranks, "zero_stage": 2, "total_steps": 8}
    write_checkpoint(tmp_path, 4, {**_state(4), "scheduler": {"base_lrs": [1e-3]}, "data_order": {},
                                   "saved_by": saved_by})
    monkeypatch.setattr(checkpoints, "zero_gradient_step", lambda *args: None)  # no engine: nothing to load into
    monkeypatch.setattr(checkpoints, "restore_trainer_state", lambda *args: None)
    engine = types.SimpleNamespace(train_batch_size=lambda: 2)
    scheduler = types.SimpleNamespace(base_lrs=[1e-3])
    with caplog.at_level(logging.INFO, logger="reft_fast.train.checkpoints"):
        step = checkpoints.resume_from_checkpoint(tmp_path, engine, None, None, scheduler, {}, 0, lambda: [],
                                                  {"total_steps": 8})
    assert step == 4 and f"resumed from {tmp_path / 'step4'} at step 4 ({said})" in caplog.text, caplog.text


_FULL_DISK_RUN = """
import resource, signal, sys, types
from pathlib import Path
import torch
from reft_fast.train.checkpoints import CheckpointWriteError, save_trainer_checkpoint

torch.manual_seed(0)
trained = torch.nn.Linear(128, 128)  # params and two Adam moments: about 200 KB of checkpoint
optimizer = torch.optim.AdamW(trained.parameters())
trained(torch.ones(1, 128)).sum().backward()
optimizer.step()
run = types.SimpleNamespace(interventions=trained, model=torch.nn.Module())
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
ckpt_dir = Path(sys.argv[1])
save_trainer_checkpoint(ckpt_dir, 4, run, optimizer, schedule, rank=0, keep=3, extra={})
# A real write failure from the kernel: past RLIMIT_FSIZE a write fails with EFBIG ("File too large"), as a full disk
# fails with ENOSPC, once SIGXFSZ (which would kill the process) is ignored.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
try:
    save_trainer_checkpoint(ckpt_dir, 8, run, optimizer, schedule, rank=0, keep=3, extra={})
except CheckpointWriteError as err:
    print(err)
"""


def test_a_checkpoint_write_that_fails_leaves_no_partial_files_and_the_earlier_checkpoint_whole(tmp_path):
    import subprocess
    import sys

    from dist.tiny import subprocess_env

    ckpt_dir = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_RUN, str(ckpt_dir)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"writing checkpoint step8 to {ckpt_dir} failed: [Errno 27] File too large" in proc.stdout, proc.stdout
    assert "run the same command again with --resume" in proc.stdout
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [LATEST_FILE, "step4"]  # no .step8.partial left
    assert _newest(ckpt_dir) == (4, [])


def test_the_cli_reports_a_failed_checkpoint_write_without_a_traceback(monkeypatch, capsys):
    from reft_fast.train import cli
    from reft_fast.train.checkpoints import CheckpointWriteError

    def failing_run(*args, **kwargs):
        raise CheckpointWriteError("writing checkpoint step8 to out/checkpoints failed: [Errno 28] No space left")

    monkeypatch.setattr(cli, "_train", failing_run)
    assert cli.main(["train", "config.yaml"]) == 1
    err = capsys.readouterr().err
    assert err == "reft-fast: writing checkpoint step8 to out/checkpoints failed: [Errno 28] No space left\n"


def test_a_checkpoint_of_other_interventions_is_refused_naming_only_what_differs(tmp_path):
    """Resuming with another low_rank_dimension: the error names the tensors whose shapes differ, a few of them, not
    the whole lists of both sides (hundreds of names on a real model: several tensors per intervention and layer)."""
    from dist.tiny import make_run
    from reft_fast.train.checkpoints import restore_trainer_state
    from reft_fast.train.loading import build_reft_model, load_base_model
    from reft_fast.train.train_config import layer_list, load_config

    config = make_run(tmp_path / "run")

    def trainable(rank: int) -> tuple:
        cfg = load_config(str(config), [f"interventions.low_rank_dimension={rank}", "interventions.layers=all"])
        base, _ = load_base_model(cfg.model.path, cfg)
        reft_model = build_reft_model(base, cfg, layer_list(cfg.interventions.layers, 4))
        return reft_model, {name: p.detach().clone() for name, p in reft_model.interventions.named_parameters()}

    _, saved = trainable(2)
    now, _ = trainable(3)
    with pytest.raises(ConfigError) as refused:
        restore_trainer_state(now, None, None, {"params": saved})
    message = str(refused.value)
    assert message.startswith("resume: the checkpoint's interventions differ from those this config builds ("), message
    assert "(64, 2) saved, (64, 3) now" in message and " more); resume with the interventions: section" in message
    assert len(message) < 600, message
