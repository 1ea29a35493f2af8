"""A run's output directory: the guard against overwriting an earlier run, the files a run writes next to its
checkpoints, and the final interventions.

    output_dir/  train_config.yaml  the config of the run (``reft-fast generate`` reads the copy in final/)
                 run.json           what this launch resolved from the config (the fused base operations)
                 samples_before.json
                                    the base's answers to training.sample_prompts before training (a resumed run
                                    shows them instead of answering again)
                 metrics.jsonl      one line per step (and per evaluation), cut back to the step a resume starts from
                 checkpoints/       reft_fast.train.checkpoints
                 tensorboard/       when tensorboard is installed
                 final/             the trained interventions (ReftModel.save) and train_config.yaml, and the base
                                    parameters trained with them (a classifier head) in base_trainable.safetensors
                 best/              with training.keep_best, while training: the same files as final/ for the best
                                    evaluation so far and its record (best.json); renamed to final/ at the end
                 eval/              the predictions of ``reft-fast eval`` (by default)

A non-empty output_dir is refused unless the launch resumes or overwrites it; overwriting removes the files above and
nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from reft_fast.core.saving import BASE_TRAINABLE_NAME, load_trainable_base, save_trainable_base
from reft_fast.train.checkpoints import step_dirs
from reft_fast.train.distributed import barrier
from reft_fast.train.files import publish_directory, replace_atomically
from reft_fast.train.train_config import ConfigError, TrainConfig

__all__ = ["BASE_TRAINABLE_NAME", "FinishedRunWithoutCheckpoint", "RUN_INFO_FILE", "SAMPLES_BEFORE_FILE",
           "TRAIN_CONFIG_FILE", "check_output_dir", "load_trainable_base", "prepare_output_dir", "read_samples_before",
           "rewind_metrics", "save_interventions", "save_trainable_base", "write_samples_before"]

logger = logging.getLogger(__name__)
TRAIN_CONFIG_FILE = "train_config.yaml"  # written next to the final interventions; `reft-fast generate` reads it
RUN_INFO_FILE = "run.json"  # what this launch resolved from the config (the fused base operations), in output_dir
SAMPLES_BEFORE_FILE = "samples_before.json"  # the base's answers before training, in output_dir
# What a run writes into output_dir; --overwrite removes these (and nothing else) before starting. The hidden ones
# are scratch names of writes a kill interrupted (reft_fast.train.files).
_RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "best", "tensorboard", "eval", TRAIN_CONFIG_FILE,
                RUN_INFO_FILE, SAMPLES_BEFORE_FILE, ".final.partial", ".final.deleting", ".best.partial",
                ".best.deleting", f".{TRAIN_CONFIG_FILE}.tmp", f".{RUN_INFO_FILE}.tmp", f".{SAMPLES_BEFORE_FILE}.tmp",
                ".metrics.jsonl.tmp")


class FinishedRunWithoutCheckpoint(ConfigError):
    """``resume`` where a run finished (final/) without writing a checkpoint: nothing to continue. ``output`` is that
    directory, for a command that has no --overwrite (``reft-fast demo``) to say its own way out."""

    def __init__(self, output: Path):
        super().__init__(f"resume: {output} holds a finished run (final/) but no checkpoint to continue from "
                         "(training.save_every was 0); starting at step 0 would replace its final interventions "
                         "and metrics: pass --overwrite (overwrite_output_dir=true) to train it again, or choose "
                         "another output_dir")
        self.output = output


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse a launch that would lose an earlier run's files: a non-empty output_dir needs ``resume`` (continue the
    run there) or ``overwrite_output_dir`` (replace its outputs), and one that cannot write there. Every rank runs it
    before any rank writes there; it leaves nothing behind."""
    if not cfg.output_dir.strip():  # Path("") is the working directory: an unset variable wrote the run there
        raise ConfigError(f"output_dir: empty ({cfg.output_dir!r}); name the run's folder (\".\" for the working "
                          "directory)")
    output = Path(cfg.output_dir)
    if cfg.resume and cfg.overwrite_output_dir:
        raise ConfigError("overwrite_output_dir: cannot be combined with resume (continue the run in output_dir, or "
                          "replace it: not both)")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output_dir: {output} exists and is not a directory")
    nearest = next(path for path in (output, *output.parents) if path.exists())
    if not nearest.is_dir():
        raise ConfigError(f"output_dir: {output} cannot be created: {nearest} is a file, not a directory")
    _check_writable(output, nearest)
    # a finished run without checkpoints cannot be continued
    finished = (output / "final").is_dir() and not step_dirs(output / "checkpoints")
    if cfg.resume and finished:
        raise FinishedRunWithoutCheckpoint(output)
    if cfg.resume or cfg.overwrite_output_dir or not output.is_dir():
        return
    entries = sorted(path.name for path in output.iterdir())
    # eval/ alone: the base model's scores (``reft-fast eval --base-only``), which training never writes over
    if entries and entries != ["eval"]:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        resume = "" if finished else "pass --resume (resume=true) to continue the run there, "
        replace = ("it holds a finished run without checkpoints; pass " if finished else "") + \
            "--overwrite (overwrite_output_dir=true) to replace its outputs"
        raise ConfigError(f"output_dir: {output} is not empty ({shown}); {resume}{replace}, or choose another "
                          "output_dir")


def _check_writable(output: Path, nearest: Path) -> None:
    """A directory the run cannot write in (read-only, another user's, on a read-only mount) stopped the run at its
    first write, after the model had loaded, with a traceback: try one scratch directory there now instead. (Asking
    os.access is not enough: it answers yes to root on a directory that is read-only by its mode bits or its kind.)"""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".reft-fast-write-test-", dir=nearest))
    except OSError as err:
        raise ConfigError(f"output_dir: {output} cannot be written: {nearest} accepts no new entries "
                          f"({err.strerror or err}); choose another output_dir") from None


def prepare_output_dir(cfg: TrainConfig, fused_ops: tuple[str, ...]) -> None:
    """Rank 0, before training: remove an earlier run's outputs when overwriting, then write the config of this run
    and what this launch fused into the base."""
    output = Path(cfg.output_dir)
    if cfg.overwrite_output_dir:
        _remove_previous_run(output)
    output.mkdir(parents=True, exist_ok=True)
    replace_atomically(output / TRAIN_CONFIG_FILE, _config_yaml(cfg))
    # Rewritten by every launch: a resumed run may land on other hardware and fuse something else.
    replace_atomically(output / RUN_INFO_FILE, json.dumps(
        {"fused_ops_mode": cfg.model.fused_ops, "fused_ops": list(fused_ops)}, indent=1) + "\n")


def write_samples_before(output: Path, samples: list[tuple[str, str]]) -> None:
    """Rank 0: the base's answers to training.sample_prompts, for a resumed run to show (``read_samples_before``)."""
    replace_atomically(output / SAMPLES_BEFORE_FILE, json.dumps(
        [{"prompt": prompt, "answer": answer} for prompt, answer in samples], indent=1, ensure_ascii=False) + "\n")


def read_samples_before(output: Path) -> Optional[list[tuple[str, str]]]:
    """The answers ``write_samples_before`` saved in ``output``, or None where there are none to read (a run of a
    version that did not save them, a file damaged by hand)."""
    try:
        rows = json.loads((output / SAMPLES_BEFORE_FILE).read_text(encoding="utf-8"))
        return [(str(row["prompt"]), str(row["answer"])) for row in rows]
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _remove_previous_run(output: Path) -> None:
    removed = [name for name in _RUN_OUTPUTS if (output / name).exists()]
    for name in removed:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        logger.warning("overwrite_output_dir: removed the previous run's %s from %s", ", ".join(removed), output)


def _config_yaml(cfg: TrainConfig) -> str:
    # overwrite_output_dir is what one launch was told, not a property of the run: a copy of this file used as the
    # config of a later launch must not delete this run.
    return yaml.safe_dump({**cfg.to_dict(), "overwrite_output_dir": False}, sort_keys=False)


def rewind_metrics(path: Path, step: int) -> None:
    """Cut ``metrics.jsonl`` back to the lines of steps up to ``step`` (a resume from step ``step`` replays the rest),
    so that the file always shows one trajectory."""
    if not path.exists():
        return
    kept = []
    for line in filter(None, path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a machine crash can tear the unsynced tail (MetricsLog): past any checkpoint
            break
        if row.get("step", 0) <= step:
            kept.append(line)
    replace_atomically(path, "".join(line + "\n" for line in kept))  # a kill here must not lose the steps kept


def save_interventions(reft_model, directory: Path, cfg: TrainConfig, rank: int,
                       extra_files: Optional[dict[str, str]] = None) -> None:
    """The trained interventions and the run's config, and ``extra_files`` ({name: text}), into ``directory``
    (rank 0 writes, every rank waits)."""
    # The interventions are whole on every rank at every stage (reft_fast.train.ds_config keeps them out of ZeRO-3's
    # partitioning). Under ZeRO-3 they must not go through GatheredParameters: leaving it partitions (frees) even
    # persistent parameters (DeepSpeed 0.19.8), and the samples generated after this save would run on empty weights.
    # Written whole under a scratch name and then renamed: a kill never leaves a final/ that loads with some of its
    # files missing (or an earlier run's files beside this one's).
    if rank == 0:
        scratch = directory.with_name(f".{directory.name}.partial")
        shutil.rmtree(scratch, ignore_errors=True)
        reft_model.save(str(scratch))
        save_trainable_base(reft_model.model, scratch)
        (scratch / TRAIN_CONFIG_FILE).write_text(_config_yaml(cfg))
        for name, text in (extra_files or {}).items():
            (scratch / name).write_text(text)
        publish_directory(scratch, directory)
    barrier()


def load_interventions(reft_model, directory: Path) -> None:
    """Put the weights ``save_interventions`` wrote into ``directory`` back into ``reft_model``'s interventions and
    trainable base parameters (copied onto their devices; every rank reads them: a filesystem all ranks see)."""
    from safetensors.torch import load_file

    from reft_fast.core.saving import WEIGHTS_NAME

    reft_model.interventions.load_state_dict(load_file(str(Path(directory) / WEIGHTS_NAME), device="cpu"),
                                             strict=True)
    load_trainable_base(reft_model.model, directory)
