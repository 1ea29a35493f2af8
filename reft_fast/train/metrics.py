"""What a training step reports: counted FLOPs, the device's peak for MFU, peak memory, and where the metrics line
goes (``metrics.jsonl`` through ``MetricsLog``, TensorBoard, the progress bar).
"""

from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path
from typing import Optional, Sequence

import torch

from reft_fast.core.hf import find_decoder_layers, text_config_of

__all__ = ["METRICS_FSYNC_EVERY", "MetricsLog", "PEAK_TFLOPS", "count_step_flops", "full_numel", "log_metrics",
           "numel_on_this_rank", "open_tensorboard", "peak_memory_gib", "peak_tflops"]

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU when training.peak_tflops is not set.
# metrics.jsonl lines between two fsyncs (MetricsLog): what a crash of the machine (not of the process) may lose.
METRICS_FSYNC_EVERY = 50
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def full_numel(p: torch.nn.Parameter) -> int:
    """The elements of ``p`` over all ranks: ZeRO-3 partitions leave ``p.numel() == 0`` and the count in ds_numel."""
    return getattr(p, "ds_numel", None) or p.numel()


def numel_on_this_rank(p: torch.nn.Parameter) -> int:
    """The elements of ``p`` this rank stores: a ZeRO-3 partitioned parameter is empty but for its shard."""
    shard = getattr(p, "ds_tensor", None)
    return shard.numel() if shard is not None and p.numel() == 0 else p.numel()


def count_step_flops(base, lowest_layer: int, seq_lens: Sequence[int], gradient_checkpointing: bool) -> float:
    """FLOPs of one forward + backward on sequences of the given lengths (counted, not measured).

    Per token: 2 × (parameters of a decoder layer) per layer, 2·T·d per layer for causal attention (scores and the
    weighted sum over on average T/2 keys), 2·d·V for the LM head. Backward only computes input gradients (the base is
    frozen: about one forward's worth) for the layers above the lowest intervened one and the head; gradient
    checkpointing recomputes those layers' forward once more. The ReFT edits themselves are negligible and not counted.
    """
    _, layers = find_decoder_layers(base)
    per_layer = sum(full_numel(p) for p in layers[0].parameters())
    text = text_config_of(base.config)
    d, vocab, n_layers = text.hidden_size, text.vocab_size, len(layers)
    trained = n_layers - lowest_layer
    flops = 0.0
    for T in seq_lens:
        layer = 2 * per_layer + 2 * T * d
        head = 2 * d * vocab
        forward = n_layers * layer + head
        backward = trained * (layer + 2 * T * d) + head  # attention's input gradient costs about twice its forward
        recompute = trained * layer if gradient_checkpointing else 0
        flops += T * (forward + backward + recompute)
    return flops


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    """The peak MFU is measured against: ``training.peak_tflops`` when set, else the table's entry for this GPU, else
    None (no MFU in the metrics)."""
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for fragment, tflops in PEAK_TFLOPS.items():
            if fragment in name:
                return tflops
    return None


def peak_memory_gib() -> float:
    """The GPU's peak allocated memory, or on the CPU the process's peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def open_tensorboard(output: Path):
    """A SummaryWriter into ``output/tensorboard``, or None where tensorboard is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))


class MetricsLog:
    """``metrics.jsonl``, one JSON line per step (and per evaluation), written so that no kill loses a line that a
    resume needs.

    Every line is flushed to the operating system as it is written, so a killed process (SIGKILL, OOM killer) loses
    none of them. Forcing the lines onto the disk (fsync, about a millisecond or more on network file systems) is done
    every ``fsync_every`` lines and at ``sync()``, which the recipe calls before every checkpoint and at the end: a
    crash of the whole machine loses at most the lines written since the last fsync, never a line at or before the
    newest checkpoint, so a resume (which cuts the file back to its checkpoint's step) still shows one trajectory.
    """

    def __init__(self, path: Path, fsync_every: int = METRICS_FSYNC_EVERY):
        if fsync_every < 1:
            raise ValueError(f"fsync_every must be ≥ 1, got {fsync_every}")
        self.fsync_every = fsync_every
        self._file = open(path, "a")
        self._unsynced = 0

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.sync()

    def sync(self) -> None:
        """Force the lines written so far onto the disk."""
        if self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = 0

    def close(self) -> None:
        self.sync()
        self._file.close()


def log_metrics(metrics: dict, metrics_log: MetricsLog, writer, bar, show: bool, total_steps: int) -> None:
    """One step's metrics: a line in ``metrics_log``, scalars for ``writer`` and, when ``show``, the bar's postfix or,
    without a bar (``training.progress_bar: false``, a batch job's log), one logged line (``writer`` and ``bar`` may
    be None). Rates are means over the steps read together, but for a launch's first step, timed alone and marked
    ``"warmup": true`` (``ReftTrainingRecipe.read_metrics``): the others' rates exclude its warm-up. The bar's count
    is the recipe's to move, every step: the metrics are read only every ``log_every`` steps, and a bar moved here
    stood still in between."""
    metrics_log.write(metrics)
    if writer is not None:
        for key, value in metrics.items():
            if key not in ("step", "warmup"):  # the mark of a launch's first step is no figure to plot
                writer.add_scalar(f"train/{key}", value, metrics["step"])
    if not show:
        return
    summary = _step_summary(metrics)
    if bar is not None:
        bar.set_postfix(summary)  # drawn now: the next redraw is the next step's, maybe minutes away
    else:
        logger.info("step %d/%d: %s", metrics["step"], total_steps,
                    ", ".join(f"{name} {value}" for name, value in summary.items()))


def _step_summary(metrics: dict) -> dict[str, str]:
    """The few figures a person watches: loss, tokens/s, peak memory, and packing, MFU and eval loss where known."""
    summary = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}",
               "mem": f"{metrics['peak_mem_gib']:.1f}GiB"}
    if "packing_efficiency" in metrics:  # the share of real tokens in the batch slots, packed or padded
        summary["real"] = f"{100 * metrics['packing_efficiency']:.0f}%"
    if "mfu" in metrics:
        summary["mfu"] = f"{100 * metrics['mfu']:.1f}%"
    if "eval_loss" in metrics:
        summary["eval"] = f"{metrics['eval_loss']:.4f}"
    if metrics.get("warmup"):  # a launch's first step, timed alone: its rates include the warm-up
        summary["warm-up"] = "yes"
    return summary
