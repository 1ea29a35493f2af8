"""``reft-fast plan CONFIG --gpus N``: per-GPU memory of a ReFT run before launching it.

The base model is built on the meta device from its config (no weights are read), so parameter counts are exact for
any architecture. The rest is arithmetic, per GPU:

* base weights: all of them at ZeRO 0–2 (ZeRO partitions only what the optimizer owns, and the base is frozen);
  1/N of them at ZeRO-3, plus a working set of two gathered decoder layers (the one running and the one prefetched);
  none on the GPU with parameter offload (then they live in CPU memory).
* interventions: fp32 parameters (whole on every rank), fp32 gradients (1/N from ZeRO-2) and AdamW's two fp32 moments
  (1/N from ZeRO-1; in CPU memory with optimizer offload).
* activations of one micro-batch, kept for backward only above the lowest intervened layer (below it nothing requires
  grad). Without checkpointing, per token and layer: the saved inputs of the norms, the q/k/v/o projections, the
  attention output and the gated MLP (≈ 6·d + 2·d_kv + 3·d_ff elements in the base dtype; attention is SDPA/flash, so no
  T×T scores are kept). With checkpointing: one d-vector per token per layer, plus one layer recomputed at a time.
  The logits of the micro-batch (fp32, with their gradient) are counted in both cases.

These are estimates: allocator fragmentation, communication buffers and CUDA context (≈ 1–3 GiB) come on top, which is
why a fit is reported against 90 % of the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reft_fast.core.dtypes import bytes_per_element
from reft_fast.core.hf import num_layers_of, text_config_of
from reft_fast.core.interventions import intervention_class
from reft_fast.core.model import find_decoder_layers
from reft_fast.core.positions import intervention_layers
from reft_fast.train.train_config import TrainConfig, layer_list, validate

__all__ = ["MemoryPlan", "StagePlan", "plan_memory", "format_plan"]

GIB = 2**30
USABLE_FRACTION = 0.9


@dataclass
class StagePlan:
    stage: int
    offload: bool
    weights: float  # bytes per GPU
    interventions: float  # parameters + gradients + optimizer states on the GPU
    activations: float
    activations_checkpointed: float
    cpu: float  # bytes of host memory per rank taken by offload

    def total(self, checkpointing: bool) -> float:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.interventions + act


@dataclass
class MemoryPlan:
    model: str
    gpus: int
    base_params: int
    intervention_params: int
    micro_batch_size: int
    seq_len: int
    trained_layers: int
    num_layers: int
    stages: list[StagePlan]
    chosen_stage: int
    chosen_offload: bool
    checkpointing: bool


def _meta_model(model_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def plan_memory(cfg: TrainConfig, gpus: int) -> MemoryPlan:
    if gpus < 1:
        raise ValueError(f"--gpus must be ≥ 1, got {gpus}")
    model_config = validate(cfg, gpus, check_data=False)
    text = text_config_of(model_config)
    num_layers = num_layers_of(model_config)
    d = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    d_ff = getattr(text, "intermediate_size", 4 * d)
    vocab = text.vocab_size

    meta = _meta_model(model_config)
    base_params = sum(p.numel() for p in meta.parameters())
    layer_params = sum(p.numel() for p in find_decoder_layers(meta)[1][0].parameters())
    del meta

    iv = cfg.interventions
    layers = layer_list(iv.layers, num_layers)
    n_interventions = len(intervention_layers(layers, iv.positions, iv.share_weights))
    # One intervention as the engine builds it (a few r×d tensors), counted rather than a formula per type.
    one = intervention_class(iv.intervention)(embed_dim=d, low_rank_dimension=iv.low_rank_dimension)
    per_intervention = sum(p.numel() for p in one.parameters())
    intervention_params = n_interventions * per_intervention

    dtype_bytes = bytes_per_element(cfg.model.dtype)
    B, T = cfg.training.micro_batch_size, cfg.data.max_length
    tokens = B * T
    trained = num_layers - min(layers)
    per_token_layer = (6 * d + 2 * kv_dim + 3 * d_ff) * dtype_bytes
    logits = tokens * vocab * 4 * 2
    activations = tokens * trained * per_token_layer + logits
    checkpointed = tokens * trained * d * dtype_bytes + tokens * per_token_layer + logits

    weights_full = base_params * dtype_bytes
    stages = []
    for stage in (0, 1, 2, 3):
        for offload in ((False, True) if stage else (False,)):
            params_b = intervention_params * 4
            grads_b = params_b / (gpus if stage >= 2 else 1)
            optim_b = 2 * params_b / (gpus if stage >= 1 else 1)
            gathered = 2 * layer_params * dtype_bytes  # the running and the prefetched layer, whole
            if stage == 3:  # offload here means parameters and optimizer states both in CPU memory
                weights = gathered if offload else weights_full / gpus + gathered
                cpu = (weights_full / gpus + optim_b) if offload else 0.0
            else:  # offload here means the optimizer states only
                weights = weights_full
                cpu = optim_b if offload else 0.0
            on_gpu = params_b + grads_b + (0.0 if offload else optim_b)
            stages.append(StagePlan(stage, offload, weights, on_gpu, activations, checkpointed, cpu))
    return MemoryPlan(cfg.model.path, gpus, base_params, intervention_params, B, T, trained, num_layers, stages,
                      cfg.deepspeed.stage, cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_param,
                      cfg.training.gradient_checkpointing)


def format_plan(plan: MemoryPlan, gpu_memory_gib: float = 80.0) -> str:
    usable = gpu_memory_gib * USABLE_FRACTION
    lines = [
        f"model {plan.model}: {plan.base_params / 1e9:.2f} B frozen parameters, {plan.num_layers} layers; "
        f"{plan.intervention_params:,} trainable intervention parameters",
        f"per GPU: micro-batch {plan.micro_batch_size} × {plan.seq_len} tokens, backward through the top "
        f"{plan.trained_layers} layers; {plan.gpus} GPU(s) of {gpu_memory_gib:g} GiB (fit = under "
        f"{USABLE_FRACTION:.0%}: {usable:.1f} GiB)",
        "",
        f"{'ZeRO':<18}{'weights':>10}{'interv.':>10}{'activ.':>10}{'act.ckpt':>10}{'total':>10}{'total ckpt':>12}"
        f"{'CPU/rank':>10}  fits (no ckpt / ckpt)",
    ]
    for s in plan.stages:
        name = f"stage {s.stage}" + (" +offload" if s.offload else "")
        mark = " <- config" if (s.stage, s.offload) == (plan.chosen_stage, plan.chosen_offload and s.stage > 0) else ""
        total, total_ckpt = s.total(False) / GIB, s.total(True) / GIB
        fits = f"{'yes' if total <= usable else 'no'} / {'yes' if total_ckpt <= usable else 'no'}"
        lines.append(f"{name:<18}{s.weights / GIB:>10.2f}{s.interventions / GIB:>10.3f}{s.activations / GIB:>10.2f}"
                     f"{s.activations_checkpointed / GIB:>10.2f}{total:>10.2f}{total_ckpt:>12.2f}{s.cpu / GIB:>10.2f}"
                     f"  {fits}{mark}")
    lines.append("")
    lines.append("(GiB per GPU; estimates without allocator fragmentation, communication buffers and CUDA context)")
    return "\n".join(lines)
