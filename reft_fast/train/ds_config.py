"""The DeepSpeed config of a training job, and its learning-rate schedule.

DeepSpeed does ZeRO stage 0–3, CPU offload, gradient accumulation, clipping, the optimizer step (a client
torch.optim.AdamW over the intervention parameters only) and the LR schedule (a LambdaLR over ``lr_lambda`` handed to
``deepspeed.initialize``, stepped by DeepSpeed at accumulation boundaries). The config has no bf16/fp16 section: the
interventions train in fp32 over a base loaded in ``model.dtype`` (``reft_fast.train.loading``).

Clipping at ZeRO stage 0 in fp32 is the recipe's (``take_gradient_clipping``): DeepSpeed's engine would clip there
with its ``runtime/utils.clip_grad_norm_``, which makes two blocking host→device copies per optimizer step on CUDA
(its ``max_norm`` and ``1.0`` tensors, DeepSpeed 0.19.8) and reports no norm for a client torch optimizer
(``get_global_grad_norm()`` is None). At the other stages, and with fp16/bf16, DeepSpeed's optimizer wrapper clips.

ZeRO-3: the intervention parameters are kept whole on every rank (the persistence threshold is raised above their
size) because the ReftModel reads them in one batched call per forward, outside ZeRO's per-module gather hooks; they
are small.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional

import torch

from reft_fast.train.train_config import TrainConfig, gradient_accumulation_steps

__all__ = ["build_ds_config", "client_adamw", "clip_gradients", "lr_lambda", "reduce_bucket_elements",
           "reduce_only_trained_gradients", "skip_one_rank_gradient_allreduce", "take_gradient_clipping",
           "warmup_steps_of", "zero_only_trained_gradients"]


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def build_ds_config(cfg: TrainConfig, world_size: int, max_intervention_numel: int = 0,
                    trained_numel: int = 0) -> dict:
    """The config for ``deepspeed.initialize``: ours, with ``deepspeed.config`` merged over it key by key.
    ``max_intervention_numel``: the largest trained tensor's size; ``trained_numel``: all trained tensors' (0 where
    not known yet: DeepSpeed's bucket size is kept)."""
    t, ds = cfg.training, cfg.deepspeed
    accumulation = gradient_accumulation_steps(cfg, world_size)
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 1:
        # DeepSpeed's default copies each gradient into a preallocated flat buffer as it is produced, against memory
        # fragmentation: a per-tensor cost that ReFT's few-MB gradients never repay. Off, a one-rank step cost 143
        # (stage 1), 173 (stage 2) and ≈ 90 µs (stage 3) less host time per intervention (paired, 32 LoReFT
        # interventions, 2-core x86-64 CPU, DeepSpeed 0.19.8, 2026-11-30). Offload turns it back on at stages 1–2
        # by itself; deepspeed.config can too.
        zero["contiguous_gradients"] = False
        if trained_numel > 0:
            zero["reduce_bucket_size"] = reduce_bucket_elements(trained_numel)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.micro_batch_size * world_size * accumulation,
        "gradient_clipping": t.max_grad_norm,  # explicit: DeepSpeed's default changed between releases
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # offload with torch AdamW: no JIT-built CPU Adam needed
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed 0.19.8's throughput timer, started by its engine's forward hook when the engine has no dataloader
        # (the recipe's), synchronizes the device at every forward from the third step on (utils/timer.py) for a
        # figure it prints every steps_per_print steps: the host waited for the device at each micro-batch, and a
        # captured step (training.cuda_graphs) capturing a new layout after step 2 failed. The metrics line has
        # tokens/s without it.
        "timers": {"throughput": {"enabled": False}},
    }
    config = _deep_merge(config, json.loads(json.dumps(ds.config)))
    if ds.stage == 3:
        # The interventions must stay whole on every rank (see the module docstring): parameters smaller than the
        # persistence threshold are never partitioned, so the threshold is raised above the largest of them.
        zero = config["zero_optimization"]
        zero["stage3_param_persistence_threshold"] = max(int(zero.get("stage3_param_persistence_threshold", 100_000)),
                                                         max_intervention_numel + 1)
    return config


def reduce_bucket_elements(trained_numel: int) -> int:
    """DeepSpeed's gradient bucket for ``trained_numel`` trained elements: all of them in one bucket, rounded up to
    2^20 elements (4 MiB in fp32).

    DeepSpeed's default, 5·10^8 elements, is what a contiguous gradient buffer is allocated at on the accelerator
    whatever the model trains (ZeRO-3, and ZeRO 1–2 with optimizer offload, which forces that buffer; two of them
    with overlap_comm): 1.86 GiB of fp32 per buffer and rank for a ReFT's few MB of gradients (measured on a
    one-rank engine, DeepSpeed 0.19.8, 2026-11-30). Every trained gradient still fits one bucket, so the reductions
    are the same: one bucket per backward."""
    return -(-max(trained_numel, 1) // (1 << 20)) * (1 << 20)


def client_adamw(params, **hyperparameters) -> torch.optim.AdamW:
    """torch's AdamW over ``params`` with its fused kernel where torch has one for their device and dtype (CUDA; the
    CPU from torch 2.4), else torch's default implementation.

    An intervention has 2–3 small tensors, so a step has hundreds: per tensor, the single-tensor AdamW (torch's CPU
    default) cost 27 µs of host time and ``foreach`` (its CUDA default, about ten multi-tensor launches) 16 µs,
    against 4 µs fused (96 tensors of 32 rank-8 LoReFTs at hidden size 64, CPU, torch 2.13, 2026-11-29). The fused
    step does the same arithmetic elementwise and keeps its step count on the parameters' device (no read of it).
    DeepSpeed's ZeRO wrappers call this optimizer's step over their fp32 partitions, offloaded ones on the CPU
    included.
    """
    params = list(params)
    # torch checks the devices only at the first step: try each (device, dtype) here, the CPU too (ZeRO-Offload
    # steps partitions there).
    kinds = {(p.device, p.dtype) for p in params} | {(torch.device("cpu"), torch.float32)}
    fused = all(_fused_adamw_runs(device, dtype) for device, dtype in kinds)
    return torch.optim.AdamW(params, fused=fused or None, **hyperparameters)


def _fused_adamw_runs(device: torch.device, dtype: torch.dtype) -> bool:
    probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
    except RuntimeError:  # no fused kernel for this device or dtype in this torch
        return False
    return True


def skip_one_rank_gradient_allreduce(engine) -> bool:
    """Turn off the engine's gradient all-reduce where it can only copy the gradients onto themselves: one process in
    all (``torch.distributed`` world size 1) and the client optimizer unwrapped (ZeRO stage 0 without fp16/bf16; the
    ZeRO and mixed-precision wrappers reduce through their own paths, which also fill their flat buffers). True if it
    was turned off.

    At stage 0 DeepSpeed reduces after every backward (``buffered_allreduce_fallback``): it walks every parameter of
    the module (the frozen base's too), flattens the gradients into one tensor, all-reduces it over a one-rank group
    and copies each gradient back, a Python call and, on a GPU, a device copy per trained tensor. On one rank that is
    ≈ 60 µs of host time per intervention and step (2-core x86-64 CPU, DeepSpeed 0.19.8, torch 2.13, 32 LoReFT
    interventions, 2026-11-30): most of what the engine adds to a plain torch step. The flag is the one DeepSpeed
    itself clears when it runs without a process group; no-op where a DeepSpeed release lacks it."""
    import torch.distributed as dist

    if not hasattr(engine, "enable_backward_allreduce") or getattr(engine, "basic_optimizer", None) is None:
        return False
    if engine.optimizer is not engine.basic_optimizer or not dist.is_initialized() or dist.get_world_size() != 1:
        return False
    engine.enable_backward_allreduce = False
    return True


def zero_only_trained_gradients(engine, set_to_none: bool = True) -> bool:
    """Make the engine's end-of-step ``zero_grad`` reset only the trained tensors' gradients (the client optimizer's
    ``zero_grad(set_to_none=...)``), where it would walk the whole module to do the same: ZeRO stage 0 without
    fp16/bf16 and the client optimizer unwrapped, every parameter that requires grad being one the optimizer steps
    (the frozen base never has a gradient). True if it was replaced. ``set_to_none=False`` (a replayed step,
    ``train.graphs``: each gradient stays a tensor of its own, into which autograd adds) zeroes them in place.

    DeepSpeed's stage-0 ``engine.zero_grad`` sets ``grad = None`` on every parameter of ``module.named_parameters()``:
    on a 32-layer Llama-shaped ReftModel (553 modules, 387 parameters) 887 µs of host time per step, 28 µs per
    intervention with 32 of them, against 20 µs per step through the optimizer (2-core x86-64 CPU, torch 2.13,
    DeepSpeed 0.19.8, 2026-11-30). The other stages and mixed precision zero through their optimizer wrappers
    already."""
    import functools

    if not hasattr(engine, "zero_grad") or _stepped_by_the_client_optimizer(engine) is None:
        return False
    engine.zero_grad = functools.partial(engine.basic_optimizer.zero_grad, set_to_none=set_to_none)
    return True


def _stepped_by_the_client_optimizer(engine) -> Optional[list]:
    """The parameters the engine's client optimizer steps, in its order, where it steps them itself: ZeRO stage 0
    without fp16/bf16, the optimizer unwrapped, and every parameter that requires grad one of them (the frozen base
    never has a gradient). None elsewhere, and with a DeepSpeed release that lacks one of the engine's questions asked
    here (it then keeps its own ways)."""
    optimizer = getattr(engine, "basic_optimizer", None)
    if optimizer is None or engine.optimizer is not optimizer:
        return None
    questions = [getattr(engine, name, None) for name in ("zero_optimization", "fp16_enabled", "bfloat16_enabled")]
    if not all(callable(question) for question in questions) or any(question() for question in questions):
        return None
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    known = {id(p) for p in stepped}
    if any(p.requires_grad and id(p) not in known for p in engine.module.parameters()):
        return None
    return stepped


def reduce_only_trained_gradients(engine) -> bool:
    """Hand the engine's stage-0 gradient all-reduce the trained tensors' gradients directly, as one flat tensor,
    where it would walk the whole module to find them and reduce them through a flattened copy: several ranks at ZeRO
    stage 0 without fp16/bf16 and without experts, the client optimizer unwrapped, every parameter that requires grad
    being one it steps. True if it was replaced (the engine's ``zero_grad`` then too).

    After every backward DeepSpeed's stage-0 ``buffered_allreduce_fallback`` collects the gradients to reduce through
    ``module.parameters()``, the frozen base's included (1.3 ms of host time per step on a 32-layer Llama-shaped
    ReftModel), flattens them into a new tensor, all-reduces it and copies each gradient back (0.5 ms per step for
    96 trained tensors; 2-core x86-64 CPU, DeepSpeed 0.19.8, torch 2.13, 2026-11-30). Here the trained gradients are
    views of one flat tensor that the backward accumulates into and the end of the step zeroes in place
    (``_FlatGradients``), and that tensor is what DeepSpeed reduces: one all-reduce, with DeepSpeed's own averaging,
    nothing walked or copied per tensor. Where the trained tensors differ in dtype or device, they are handed over as a
    list (no walk; DeepSpeed's flatten and copies back)."""
    if hasattr(getattr(engine, "basic_optimizer", None), "get_grads_for_reduction"):
        return False
    if not callable(getattr(engine, "_get_gradients_for_reduction", None)) or getattr(engine, "has_moe_layers", True):
        return False
    stepped = _stepped_by_the_client_optimizer(engine)
    stepped = [p for p in stepped if p.numel() > 0] if stepped is not None else []
    if not stepped:
        return False
    if len({(p.dtype, p.device) for p in stepped}) == 1 and not any(p.is_sparse for p in stepped):
        flat = _FlatGradients(stepped)
        engine._get_gradients_for_reduction = flat.for_reduction
        engine.zero_grad = flat.zero
        return True

    def trained_gradients():
        for p in stepped:
            if p.grad is None:  # every rank must reduce the same sizes: a zero gradient, as DeepSpeed makes
                p.grad = torch.zeros_like(p)
        return [p.grad.data for p in stepped], {}

    engine._get_gradients_for_reduction = trained_gradients
    return True


class _FlatGradients:
    """The gradients of ``params`` (one dtype and device) as views of one flat tensor, which is what the stage-0
    all-reduce then reduces (``reduce_only_trained_gradients``).

    The backward accumulates into a gradient that exists in place (autograd's AccumulateGrad adds to it outside grad
    mode), so the views hold as long as nothing replaces a parameter's ``.grad``; ``zero`` zeroes them in place. A
    gradient replaced since (set to None by a ``zero_grad(set_to_none=True)``, or a new tensor) is copied back into
    its view before the reduction: slower, never wrong."""

    def __init__(self, params: list):
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.views = list(self.flat.split([p.numel() for p in params]))
        for i, (p, view) in enumerate(zip(params, self.views)):
            self.views[i] = view.view_as(p)
            if p.grad is not None:
                self.views[i].copy_(p.grad)
            p.grad = self.views[i]

    def for_reduction(self):
        """(non-expert gradients, expert gradients) as DeepSpeed's ``_get_gradients_for_reduction`` returns them."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view
        return [self.flat], {}

    def zero(self) -> None:
        self.flat.zero_()
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                p.grad = view


def take_gradient_clipping(config: dict) -> Optional[float]:
    """The max gradient norm the recipe clips to itself, taken out of ``config`` (its ``gradient_clipping`` set to 0),
    where DeepSpeed's engine would clip with ``clip_grad_norm_`` of runtime/utils.py: ZeRO stage 0 without fp16, bf16
    or torch_autocast. 0.0: no clipping, the norm is only measured. None elsewhere: DeepSpeed clips, and ``config`` is
    left as it is."""
    stage = config.get("zero_optimization", {}).get("stage", 0)
    # (torch_autocast: DeepSpeed unscales its gradient scaler's gradients before it clips)
    mixed = any(config.get(key, {}).get("enabled", False) for key in ("fp16", "bf16", "bfloat16", "torch_autocast"))
    if stage != 0 or mixed:
        return None
    max_norm = float(config.get("gradient_clipping", 0.0))
    config["gradient_clipping"] = 0.0
    return max_norm


def clip_gradients(params, max_norm: float, device) -> torch.Tensor:
    """Clip the (reduced) gradients of ``params`` to ``max_norm`` (the recipe's stage-0 clipping, in place of
    DeepSpeed's: ``take_gradient_clipping``) and return their total norm as a tensor on ``device``: no value is read
    (no non-finite check) and no host tensor is copied over, unlike DeepSpeed's clipping. 0 clips nothing: the norm is
    only measured.

    Gradients that are views of one flat tensor, the whole of it (``_FlatGradients``: several ranks at stage 0), are
    measured and scaled as that one tensor: two kernels instead of a norm and a product per tensor (the foreach
    versions are one loop per tensor on CPUs: 751 µs per step for 96 tensors against 38 µs, 2-core x86-64, torch 2.13,
    2026-11-30). Same formula as ``clip_grad_norm_``; the norm is summed in another order."""
    flat = _whole_flat_tensor(params)
    if flat is not None:
        norm = torch.linalg.vector_norm(flat)
        if max_norm != 0:
            flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm
    if max_norm == 0:
        grads = [p.grad for p in params if p.grad is not None]
        # (torch.nn.utils.get_total_norm computes the same but exists only from torch 2.6; pyproject allows 2.4)
        if not grads:
            return torch.zeros((), device=device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True, error_if_nonfinite=False)


def _whole_flat_tensor(params) -> Optional[torch.Tensor]:
    """The tensor every parameter's gradient is a view of, where they are the whole of it (and the views do not
    overlap: ``_FlatGradients`` makes them so); None otherwise."""
    params = list(params)
    base = params[0].grad._base if params and params[0].grad is not None else None
    if base is None or base.dim() != 1:
        return None
    numel = 0
    for p in params:
        if p.grad is None or p.grad._base is not base:
            return None
        numel += p.grad.numel()
    return base if numel == base.numel() else None


def warmup_steps_of(warmup_steps: int, warmup_ratio: Optional[float], total_steps: int) -> int:
    """The warmup in optimizer steps: ``warmup_steps``, or ``warmup_ratio`` of the run's steps (rounded, as
    transformers' TrainingArguments.get_warmup_steps rounds up)."""
    return math.ceil(warmup_ratio * total_steps) if warmup_ratio is not None else warmup_steps


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine or linear decay to ``min_ratio`` × peak at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * decay

    return factor
