"""``reft-fast plan CONFIG --gpus N``: per-GPU memory of a ReFT run before launching it.

The base model is built on the meta device from its config (no weights are read), so parameter counts are exact for
any architecture. The rest is arithmetic, per GPU:

* base weights: all of them at ZeRO 0–2 (ZeRO partitions only what the optimizer owns, and the base is frozen);
  1/N of them at ZeRO-3, plus a working set of two gathered decoder layers (the one running and the one prefetched);
  none on the GPU with parameter offload (then they live in CPU memory).
* interventions: fp32 parameters (whole on every rank), fp32 gradients (1/N from ZeRO-2) and AdamW's two fp32 moments
  (1/N from ZeRO-1; in CPU memory with optimizer offload).
* activations of one micro-batch, kept for backward only above the intervention (below it nothing requires grad;
  an edit of a layer's block output leaves that layer's own activations unsaved too). The base is frozen, so its
  linear layers keep none of their inputs. Without checkpointing, per token and layer: the fp32 inputs of the two
  RMSNorms (they compute in fp32 whatever the base dtype), and in the base dtype what SDPA keeps (q, k, v and its
  output; k and v repeated to every query head, as transformers' SDPA path does whenever a padding mask is present:
  2·d + 2·d) and what the gated MLP keeps (gate, act(gate), up: 3·d_ff); attention is SDPA/flash, so no T×T
  scores are kept. With checkpointing: one d-vector per token per layer, plus one layer recomputed at a time.
  Backward holds one layer's gradients in flight on top (counted as one layer's activations, in both cases), and
  the logits of the micro-batch (fp32, with their gradient) are counted in both cases. With checkpointing that sum
  is an upper bound: the logits are freed before the first layer is recomputed (tests/test_plan.py measures it).

These are estimates: allocator fragmentation, communication buffers and CUDA context (≈ 1–3 GiB) come on top, which is
why a fit is reported against 90 % of the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reft_fast.core.dtypes import bytes_per_element
from reft_fast.core.hf import find_decoder_layers, num_layers_of, text_config_of
from reft_fast.core.interventions import intervention_class
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


def _weight_bytes_per_element(cfg: TrainConfig, model_config) -> int:
    """Bytes of one base weight as loaded: model.dtype, or for "auto" the dtype the checkpoint's config records."""
    if cfg.model.dtype == "auto":
        saved = getattr(model_config, "dtype", None) or getattr(text_config_of(model_config), "dtype", None)
        if isinstance(saved, torch.dtype):
            return saved.itemsize
    return bytes_per_element(cfg.model.dtype)


def _intervention_numel(iv, d: int) -> int:
    """Trainable elements of one intervention as the recipe builds it (a few r×d tensors), counted from a built one
    rather than from a formula per type, so a new intervention type is planned correctly without an edit here."""
    one = intervention_class(iv.intervention)(embed_dim=d, low_rank_dimension=iv.low_rank_dimension)
    return sum(p.numel() for p in one.parameters())


def _activation_bytes(cfg: TrainConfig, text, trained: int, dtype_bytes: int) -> tuple[float, float]:
    """(without, with checkpointing) bytes of one micro-batch's activations; see the module docstring."""
    d = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    d_ff = getattr(text, "intermediate_size", 4 * d)
    # flash-attn takes grouped k/v as they are; SDPA gets them repeated to every head whenever a mask is passed.
    kv_saved = kv_dim if (cfg.model.attn_implementation or "").startswith("flash") else d
    per_token_layer = (2 * d + 2 * kv_saved + 3 * d_ff) * dtype_bytes + 2 * d * 4  # + the norms' fp32 inputs
    tokens = cfg.training.micro_batch_size * cfg.data.max_length
    logits = tokens * text.vocab_size * 4 * 2
    in_flight = tokens * per_token_layer  # one layer's gradients during backward
    activations = tokens * trained * per_token_layer + in_flight + logits
    checkpointed = tokens * trained * d * dtype_bytes + tokens * per_token_layer + in_flight + logits
    return activations, checkpointed


def _stage_plans(gpus: int, weights_full: float, layer_bytes: float, intervention_params: int,
                 activations: tuple[float, float]) -> list[StagePlan]:
    stages = []
    for stage in (0, 1, 2, 3):
        for offload in ((False, True) if stage else (False,)):
            params_b = intervention_params * 4
            grads_b = params_b / (gpus if stage >= 2 else 1)
            optim_b = 2 * params_b / (gpus if stage >= 1 else 1)
            gathered = 2 * layer_bytes  # the running and the prefetched layer, whole
            if stage == 3:  # offload here means parameters and optimizer states both in CPU memory
                weights = gathered if offload else weights_full / gpus + gathered
                cpu = (weights_full / gpus + optim_b) if offload else 0.0
            else:  # offload here means the optimizer states only
                weights = weights_full
                cpu = optim_b if offload else 0.0
            on_gpu = params_b + grads_b + (0.0 if offload else optim_b)
            stages.append(StagePlan(stage, offload, weights, on_gpu, *activations, cpu))
    return stages


def plan_memory(cfg: TrainConfig, gpus: int) -> MemoryPlan:
    if gpus < 1:
        raise ValueError(f"--gpus must be ≥ 1, got {gpus}")
    model_config = validate(cfg, gpus, check_data=False)
    text = text_config_of(model_config)
    num_layers = num_layers_of(model_config)

    meta = _meta_model(model_config)
    base_params = sum(p.numel() for p in meta.parameters())
    layer_params = sum(p.numel() for p in find_decoder_layers(meta)[1][0].parameters())
    del meta

    iv = cfg.interventions
    layers = layer_list(iv.layers, num_layers)
    n_interventions = len(intervention_layers(layers, iv.positions, iv.share_weights))
    intervention_params = n_interventions * _intervention_numel(iv, text.hidden_size)
    # Backward runs through the layers above the lowest edit, and through that layer too unless its output is edited.
    trained = num_layers - min(layers) - (1 if iv.component == "block_output" else 0)

    dtype_bytes = _weight_bytes_per_element(cfg, model_config)
    activations = _activation_bytes(cfg, text, trained, dtype_bytes)
    stages = _stage_plans(gpus, base_params * dtype_bytes, layer_params * dtype_bytes, intervention_params,
                          activations)
    return MemoryPlan(cfg.model.path, gpus, base_params, intervention_params, cfg.training.micro_batch_size,
                      cfg.data.max_length, trained, num_layers, stages, cfg.deepspeed.stage,
                      cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_param,
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
