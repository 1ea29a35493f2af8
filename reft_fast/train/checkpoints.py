"""Training checkpoints that a kill cannot tear and that any number of ranks can resume from.

Layout, under ``output_dir/checkpoints``::

    step40/  trainer_state.pt   every trainable number of the run, whole (below)
             manifest.json      size and SHA-256 of trainer_state.pt, written after it
    step50/  ...
    latest                      "step50": the newest published checkpoint, for people and tools

What is saved. The trainable state of a ReFT run is small (the interventions), so one file holds all of it whole: the
intervention parameters, the client AdamW's moments and step count, the LR schedule, the step and the data-order
facts; base parameters trained with them (a classifier head: ``task: classification``) are saved alongside. Under
ZeRO 1–3 DeepSpeed keeps the parameters' fp32 copies and the moments in per-rank flat partitions;
``gather_trainer_state`` assembles them with DeepSpeed's public ``safe_get_full_*`` functions (collectives: every
rank calls it) and ``restore_trainer_state`` cuts them back with ``safe_set_full_*`` into whatever partitions the
resumed run has. A checkpoint therefore does not depend on the number of ranks or the ZeRO stage that wrote it.

Why it cannot be torn. Only rank 0 writes. It writes into a hidden ``.stepN.partial`` directory, fsyncs the files,
the manifest and the directory, renames the directory to ``stepN`` (atomic) and only then replaces ``latest``
(written to a temporary file and renamed: atomic too). A kill at any moment leaves either the previous checkpoint as
the newest one or the new one complete. Resume verifies the manifest (sizes and checksums) of the newest checkpoint
and falls back to the next older one, naming the one it skipped and why, so a checkpoint damaged after it was written
(a truncated file, a disk error) costs only the steps since the previous one.

Resume. The batch order depends only on (seed, step) (``data.StepSampler``) and the training recipe reseeds the random
state from (seed, step) before every step, so a run resumed from a checkpoint at step k replays steps k+1… exactly as
an uninterrupted run does (``resume_from_checkpoint``; ``metrics.jsonl`` is cut back to step k by
``run_dir.rewind_metrics``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from reft_fast.train.distributed import all_reduce_sum, ranks, same_on_every_rank
from reft_fast.train.files import fsync_dir, remove_atomically, replace_atomically, write_durably
from reft_fast.train.loss import forward_loss
from reft_fast.train.train_config import ConfigError

__all__ = ["LATEST_FILE", "STATE_FILE", "MANIFEST_FILE", "CheckpointError", "gather_trainer_state",
           "load_newest_intact", "prune_checkpoints", "read_checkpoint", "restore_trainer_state",
           "resume_from_checkpoint", "save_trainer_checkpoint", "write_checkpoint", "zero_gradient_step"]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
FORMAT = 1
_STEP_DIR = re.compile(r"step(\d+)")
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # the client torch.optim.AdamW's per-parameter tensors


class CheckpointWriteError(RuntimeError):
    """Saving a checkpoint failed (a full disk, a quota, a lost mount): the run stops on every rank, and the
    checkpoints published before it are intact."""


class CheckpointError(Exception):
    """A checkpoint directory that is incomplete or damaged; the message says what is wrong with it."""


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------
def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """The ``stepN`` directories, in increasing N (a number: step100 comes after step99)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_checkpoint(ckpt_dir: Path, step: int, state: dict) -> Path:
    """Publish ``state`` as ``ckpt_dir/step{step}`` and point ``latest`` at it (rank 0 only; see the module doc)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tag = f"step{step}"
    partial = ckpt_dir / f".{tag}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    manifest = {"format": FORMAT, "step": step,
                "files": {STATE_FILE: {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}}
    try:
        write_durably(partial / STATE_FILE, payload)
        write_durably(partial / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
        fsync_dir(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a full disk gets back what the failed write took
        raise
    final = ckpt_dir / tag
    if final.exists():  # a damaged leftover of this step from before the resume that replays it
        remove_atomically(final)
    os.replace(partial, final)
    fsync_dir(ckpt_dir)
    replace_atomically(ckpt_dir / LATEST_FILE, f"{tag}\n".encode())
    return final


def read_checkpoint(path: Path) -> dict:
    """The state saved in checkpoint directory ``path``, after checking it against its manifest."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        expected = manifest["files"][STATE_FILE]
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST_FILE} is missing (the save did not finish, or an older format)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{MANIFEST_FILE} is unreadable ({err})") from None
    try:
        payload = (path / STATE_FILE).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{STATE_FILE} is missing") from None
    if len(payload) != expected["bytes"]:
        raise CheckpointError(f"{STATE_FILE} has {len(payload)} bytes, its manifest says {expected['bytes']}")
    if hashlib.sha256(payload).hexdigest() != expected["sha256"]:
        raise CheckpointError(f"{STATE_FILE} does not match the checksum in its manifest")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever unpickling raises, the file is unusable
        raise CheckpointError(f"{STATE_FILE} cannot be read ({type(err).__name__}: {err})") from None


def load_newest_intact(ckpt_dir: Path, warn: Callable[[str], None]) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that passes ``read_checkpoint``, with its state; None when there is none at all.

    ``warn`` receives one line per problem met on the way (a damaged checkpoint, named, and why it was skipped; a
    ``latest`` that is empty or names something else). Checkpoints that exist but are all damaged raise ConfigError:
    starting from step 0 over them would be a silent loss of the run.
    """
    candidates = step_dirs(ckpt_dir)
    _check_latest_pointer(ckpt_dir, candidates, warn)
    problems = []
    for step, path in reversed(candidates):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as err:
            problems.append(f"{path.name}: {err}")
            warn(f"checkpoint {path} is damaged and is skipped: {err}")
    if problems:
        raise ConfigError(f"resume: no intact checkpoint in {ckpt_dir} ({'; '.join(problems)}); remove the damaged "
                          "ones, or start over with --overwrite (overwrite_output_dir=true)")
    return None


def _check_latest_pointer(ckpt_dir: Path, candidates: list[tuple[int, Path]], warn: Callable[[str], None]) -> None:
    """``latest`` is informative only (resume takes the newest intact checkpoint); say when it looks wrong."""
    latest = ckpt_dir / LATEST_FILE
    if not latest.exists():
        if candidates:
            warn(f"{latest} is missing; choosing among {', '.join(p.name for _, p in candidates)} by step number")
        return
    try:
        named = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        warn(f"{latest} is unreadable ({err}); choosing the checkpoint by step number")
        return
    if not named:
        warn(f"{latest} is empty; choosing the checkpoint by step number")
    elif not _STEP_DIR.fullmatch(named) or not (ckpt_dir / named).is_dir():
        warn(f"{latest} names {named[:80]!r}, which is not a checkpoint here; choosing the checkpoint by step number")


def prune_checkpoints(ckpt_dir: Path, keep: int, current_step: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``current_step`` (by step number); delete the rest, the scratch
    directories of interrupted saves, and checkpoints past ``current_step`` (a resume skipped them as damaged: they
    belong to a trajectory this run has replaced)."""
    for path in ckpt_dir.iterdir():
        if path.name.startswith(".") and path.name.endswith((".partial", ".deleting")):
            shutil.rmtree(path, ignore_errors=True)
    kept = [(step, path) for step, path in step_dirs(ckpt_dir) if step <= current_step]
    stale = [path for step, path in step_dirs(ckpt_dir) if step > current_step] + [path for _, path in kept[:-keep]]
    for path in stale:
        remove_atomically(path)


# --------------------------------------------------------------------------------------------------------------------
# The trainable state, in and out of DeepSpeed
# --------------------------------------------------------------------------------------------------------------------
def _named_trainable(reft_model) -> list[tuple[str, torch.nn.Parameter]]:
    """The intervention parameters, then the base's trainable ones (a classifier head), as ``model.<name>``."""
    return [(name, p) for name, p in reft_model.interventions.named_parameters() if p.requires_grad] + \
        [(f"model.{name}", p) for name, p in reft_model.model.named_parameters() if p.requires_grad]


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _steps_parameters_directly(optimizer, params) -> bool:
    """ZeRO stage 0 steps the parameters themselves; stages 1–3 step flat fp32 partitions DeepSpeed made of them."""
    return all(p in optimizer.state for p in params)


def gather_trainer_state(reft_model, optimizer, scheduler) -> dict:
    """Every trainable tensor of the run, whole, on the host. Collective under ZeRO: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    named = _named_trainable(reft_model)
    direct = _steps_parameters_directly(optimizer, [p for _, p in named])
    params, moments = {}, {key: {} for key in _ADAM_MOMENTS}
    for name, p in named:
        params[name] = _host_copy(p if direct else safe_get_full_fp32_param(p))
        for key in _ADAM_MOMENTS:
            moments[key][name] = _host_copy(optimizer.state[p][key] if direct
                                            else safe_get_full_optimizer_state(p, key))
    adam_step = int(next(iter(optimizer.state.values()))["step"])
    return {"format": FORMAT, "params": params, "optimizer": {"step": adam_step, **moments},
            "scheduler": scheduler.state_dict()}


def restore_trainer_state(reft_model, optimizer, scheduler, state: dict) -> None:
    """Load a ``gather_trainer_state`` result into this run's (possibly differently partitioned) engine.

    The optimizer must already hold its state: torch's AdamW and DeepSpeed's partitions of it are created on the first
    step, so the caller takes one step with zero gradients first; every part of what it created is overwritten here.
    The intervention parameters are whole on every rank at every ZeRO stage (reft_fast.train.ds_config keeps them out
    of ZeRO-3's partitioning), so each rank writes the full value into them; DeepSpeed's fp32 copies and moments get
    this rank's partition of it.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = _named_trainable(reft_model)
    _check_same_parameters(named, state["params"])
    direct = _steps_parameters_directly(optimizer, [p for _, p in named])
    device = named[0][1].device
    with torch.no_grad():
        for name, p in named:
            value = state["params"][name].to(device)
            p.copy_(value)
            if not direct:
                safe_set_full_fp32_param(p, value)
            for key in _ADAM_MOMENTS:
                moment = state["optimizer"][key][name].to(device)
                if direct:
                    optimizer.state[p][key].copy_(moment)
                else:
                    safe_set_full_optimizer_state(p, moment, key)
    for entry in optimizer.state.values():
        entry["step"].fill_(state["optimizer"]["step"])
    scheduler.load_state_dict(state["scheduler"])
    # The schedule continues at the saved step, but it is this run's: its peak rate (training.lr, each group's
    # initial_lr) and its shape (this run's lr_lambda: max_steps, warmup, schedule). LambdaLR.load_state_dict would
    # keep the checkpoint's peak and the last rate it computed: a changed training.lr was ignored, and after a changed
    # max_steps the first step ran at the old schedule's rate and the next ones at the new one's. With an unchanged
    # config this is the same product as the saved rate, bit for bit.
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler._last_lr = [peak * factor(scheduler.last_epoch)
                          for peak, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    # The rate the next step uses lives in the param groups.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def _check_same_parameters(named, saved: dict) -> None:
    have = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in named}  # ds_shape: ZeRO-3's full shape
    stored = {name: tuple(t.shape) for name, t in saved.items()}
    if have != stored:
        # Only what differs: the whole lists run to hundreds of names (several tensors per intervention and layer).
        differences = [f"{name}: {stored.get(name, 'absent')} saved, {have.get(name, 'absent')} now"
                       for name in sorted(have.keys() | stored.keys()) if have.get(name) != stored.get(name)]
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise ConfigError(f"resume: the checkpoint's interventions differ from those this config builds "
                          f"({'; '.join(differences[:3])}{more}); resume with the interventions: section of the "
                          "config that wrote it")


# --------------------------------------------------------------------------------------------------------------------
# Saving and resuming a training run (every rank calls these)
# --------------------------------------------------------------------------------------------------------------------
def save_trainer_checkpoint(ckpt_dir: Path, step: int, reft_model, optimizer, scheduler, rank: int, keep: int,
                            extra: dict) -> None:
    """Gather the trainable state (every rank), publish it as ``stepN`` and prune (rank 0). A failure on rank 0 stops
    every rank with an error, instead of leaving the others waiting in the next collective."""
    state = {**gather_trainer_state(reft_model, optimizer, scheduler), "step": step, **extra}
    error = None
    if rank == 0:
        try:
            write_checkpoint(ckpt_dir, step, state)
            prune_checkpoints(ckpt_dir, keep, step)
        except Exception as err:  # noqa: BLE001 - reported to every rank below, raised here
            error = err
    failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)).tolist()[0]
    if failed:
        cause = f": {error}" if error else " on rank 0 (its log has the cause)"
        raise CheckpointWriteError(f"writing checkpoint step{step} to {ckpt_dir} failed{cause}. The run stopped; the "
                                   "checkpoints saved before it are intact: fix the cause (free disk space) and run "
                                   "the same command again with --resume") from error


def zero_gradient_step(engine, batches: Sequence[dict], loss: Callable = forward_loss) -> None:
    """One optimizer step whose gradients are all zero. torch's AdamW and DeepSpeed's ZeRO partitions of its state are
    created on the first step; a resumed run takes this step so that there is a state to load the checkpoint into
    (restore_trainer_state then overwrites every part of it: parameters, moments, step count, schedule).

    ``loss(engine, batch)`` is the run's task's own (``task.loss``): the batches are that task's host batches, and
    another task's loss can fail on them (a preference batch, cut to its labelled tail, given to the causal-LM loss
    with labels: liger's fused cross-entropy on a GPU cannot view that cut as [B·K, d])."""
    for batch in batches:  # one per micro-step: DeepSpeed steps the optimizer at the accumulation boundary
        engine.backward(loss(engine, batch) * 0.0)
        engine.step()


def resume_from_checkpoint(ckpt_dir: Path, engine, reft_model, optimizer, scheduler, data_order: dict, rank: int,
                           warm_up_batches: Callable[[], Sequence[dict]], this_run: dict,
                           loss: Callable = forward_loss) -> int:
    """Load the newest intact checkpoint (any rank count, any ZeRO stage) and return its step; 0 when there is none.
    ``this_run`` is what this run saves as ``saved_by`` (ranks, ZeRO stage, total steps), to say what changed;
    ``loss`` the task's loss of a warm-up batch (``zero_gradient_step``)."""

    def warn(message: str) -> None:
        if rank == 0:
            logger.warning("%s", message)

    found = load_newest_intact(ckpt_dir, warn)
    # Every rank reads the checkpoints rank 0 wrote. Where a rank sees other files (output_dir on a disk of each
    # node's own), the ranks would resume at different steps and hang in their first collective: fail instead.
    if not same_on_every_rank(int(found[1]["step"]) if found else 0):
        raise RuntimeError(f"resume: the ranks found different checkpoints in {ckpt_dir} (this rank, {rank}: "
                           f"{found[0] if found else 'none'}). Every rank reads the checkpoints that rank 0 writes: "
                           "output_dir must be on a filesystem that every node sees")
    if found is None:
        warn(f"resume: nothing to resume in {ckpt_dir} (no checkpoint yet): starting at step 0")
        return 0
    path, state = found
    step = int(state["step"])
    if step > this_run["total_steps"]:  # the same on every rank (checked above): all raise together, before any load
        raise ConfigError(f"resume: the newest checkpoint in {ckpt_dir} is at step {step}, past this run's last step "
                          f"{this_run['total_steps']} (training.max_steps or training.epochs); raise it to continue "
                          "the run, or start over with --overwrite")
    zero_gradient_step(engine, warm_up_batches(), loss)
    restore_trainer_state(reft_model, optimizer, scheduler, state)
    engine.global_steps, engine.global_samples = step, step * engine.train_batch_size()
    saved_peaks = state["scheduler"].get("base_lrs")
    if saved_peaks is not None and list(saved_peaks) != list(scheduler.base_lrs):
        warn(f"resume: training.lr is {scheduler.base_lrs[0]:g}, the checkpoint's run had {saved_peaks[0]:g}: the "
             "schedule continues from the saved step at this run's rate")
    if state["data_order"] != data_order:
        warn(f"resume: the data order differs from the checkpoint's ({state['data_order']} then, {data_order} now): "
             "the steps after the resume will not be those of the interrupted run")
    saved_by = state["saved_by"]
    if saved_by.get("total_steps", this_run["total_steps"]) != this_run["total_steps"]:  # not saved before 2026-11-29
        warn(f"resume: this run ends at step {this_run['total_steps']}, the checkpoint's run was to end at step "
             f"{saved_by['total_steps']} (training.max_steps or epochs): the learning-rate schedule continues from "
             "the saved step along this run's warmup and decay")
    if rank == 0:
        logger.info("resumed from %s at step %d (saved by %s at ZeRO-%d)", path, step, ranks(saved_by["ranks"]),
                    saved_by["zero_stage"])
    return step
