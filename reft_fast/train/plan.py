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
  output: 2·d + 2·kv, where kv is the grouped k/v width when SDPA gets no mask (a padded causal-LM or preference
  batch: ``loss.causal_model_inputs``; transformers then passes ``enable_gqa``) or under flash attention, and d when a
  mask makes transformers repeat k and v to every query head (a packed batch, a padding mask, a window the rows
  reach: ``_attention_masks``)), the mask itself where SDPA converts transformers' boolean one in each layer (rows ×
  T × T in the base dtype per layer: measured on this CPU, 2026-11-30, for windowed models and a classifier's
  padding mask) and what the gated MLP keeps (gate, act(gate), up: 3·d_ff); SDPA and flash attention keep no T×T
  scores, eager attention keeps its probabilities (``_eager_scores_bytes``). With checkpointing: one d-vector per
  token for each layer from the lowest edited one up (that layer's checkpointed call holds the edit, so it keeps its
  input too), plus one layer recomputed at a time. Backward then runs in two phases (``_activation_bytes``):
  - the loss: transformers upcasts the logits to fp32 for the cross-entropy, whose backward holds three fp32 logits
    tensors at once (log_softmax's output, kept for backward; the gradient nll_loss hands it; the gradient it returns),
    with the final norm's fp32 input (every saved activation of the layers, or their checkpoints, still held);
  - the layers: the logits are gone; one layer's gradients in flight (counted as one layer's activations), and with
    checkpointing the layer being recomputed.
  The larger phase counts. Measured on this CPU (torch 2.13, 2026-11-30) for the shape of tests/test_plan.py's CUDA
  step (bf16 Llama, 8 layers, d 512, vocab 4096, 8 × 256 tokens): the peak is in log_softmax's backward, 0.3 % above
  this count (the plan without the third logits tensor and the final norm was 2.5 % under it). These are the plain
  operations: liger-kernel's (``model.fused_ops``, applied by training on a GPU to the architectures it knows) are
  not modelled, so for such a run the plan overestimates, most of all the loss, whose fused linear cross-entropy
  never holds the whole logits. A packed micro-batch (``data.packing``) under SDPA or eager attention adds its
  block-diagonal mask: rows × T × T in the base dtype, made once and shared by every layer (``packing.additive_mask``);
  flash and flex attention take none. A replayed step (``training.cuda_graphs``) gives padded causal batches the same
  mask (while a stream captures, transformers takes no ``is_causal`` shortcut: ``train.graphs``), except where
  ``packing.replay_shares_one_mask`` says it cannot (a window, a router loss, a padding mask kept): there transformers
  builds a mask for every layer while capturing, counted in each.
* cuBLAS's workspaces (``cublas_workspace_bytes``): torch gives each cuBLAS handle one for the life of the process,
  and a step uses two handles (``CUBLAS_WORKSPACE_DEFAULT``): 64 MiB on Hopper, 16.25 MiB on earlier GPUs. The plan
  asks no GPU which it is (``initialized_gpu_capability``): it counts Hopper's, the largest, and says so, unless the
  process already uses CUDA.

Quantized bases (``model.quantization``, bitsandbytes). Every ``nn.Linear`` of the backbone is stored quantized, as
``train.loading`` loads it; the LM head or classifier head, embeddings, norms and biases stay in model.dtype. Bytes of
one out×in weight:

* int8: out·in int8 values + one fp32 scale per output row (4·out);
* nf4/fp4: two 4-bit codes per byte (⌈out·in/2⌉), a 16-entry fp32 code table, and one fp32 scale per block of 64
  weights; with double quantization the block scales are 8-bit codes (1 byte per block) with an fp32 offset, one fp32
  scale per 256 blocks and a 256-entry fp32 code table.

Each matmul dequantizes its weight into a temporary (the largest one is counted once, in the compute dtype). The 8-bit
matmul keeps its input for backward (a frozen full-precision linear keeps none): per token and layer above the edit,
the two norms' outputs and the MLP's down-projection input in the base dtype (``_int8_saved_inputs``); the 4-bit
matmul keeps only its weight.

A ZeRO stage that validation refuses for the config (stage 3 for a quantized base, which it cannot partition, for a
trained classifier head, or with ``model.fused_ops: on``) has no rows: the plan lists only what a run can use.

These are estimates: allocator fragmentation, communication buffers and CUDA context (≈ 1–3 GiB) come on top, which is
why a fit is reported against 90 % of the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import math
import os
import re
from typing import Optional

import torch
from torch import nn

from reft_fast.core.dtypes import bytes_per_element
from reft_fast.core.hf import find_decoder_layers, head_dim_of, num_layers_of, text_config_of
from reft_fast.core.interventions import intervention_class
from reft_fast.core.positions import intervention_layers
from reft_fast.train.loading import linears_outside_backbone, meta_model
from reft_fast.train.packing import (packing_attention, replay_shares_one_mask, router_loss_of, sliding_window_of,
                                     windowed_layers)
from reft_fast.train.train_config import ConfigError, TrainConfig, layer_list, validate
from reft_fast.train.tasks import make_task

__all__ = ["CUBLAS_HANDLES_PER_STEP", "CUBLAS_WORKSPACE_BEFORE_HOPPER", "CUBLAS_WORKSPACE_DEFAULT", "MemoryPlan",
           "StagePlan", "cublas_workspace_bytes", "plan_memory", "format_plan", "quantized_weight_bytes"]

GIB = 2**30
USABLE_FRACTION = 0.9
# bitsandbytes' 4-bit layout (0.50): weights per fp32 block scale, block scales per second-level scale with double
# quantization, and the sizes of the code tables kept with each weight.
QUANT_BLOCK = 64
NESTED_BLOCK = 256
FOUR_BIT_CODES = 16
NESTED_CODES = 256
# cuBLAS workspaces. torch gives every (cuBLAS handle, stream) a workspace from its caching allocator when the handle
# first runs, kept for the life of the process and counted by torch.cuda.memory_allocated: 32 MiB on Hopper (sm90),
# 8 MiB + 128 KiB (":4096:2:16:8") on earlier GPUs, or what CUBLAS_WORKSPACE_CONFIG sets (aten/src/ATen/cuda/
# CublasHandlePool.cpp, torch 2.11; cuBLASLt shares it by default). A handle serves one thread, and a training step
# runs its matmuls on two: the forward on the Python thread, the backward on autograd's thread for the device. Found
# 2026-11-30: on an H200 (torch 2.11) a step of tests/test_plan.py's CUDA test took 78 MiB more than the plan without
# them, 64 MiB of which are these two workspaces (the rest: the loss phase's third fp32 logits tensor and the final
# norm's input, now counted, and about 9 MB not accounted for). Where the planning process does not use CUDA already
# (it asks no GPU: initialized_gpu_capability) or its GPU is newer than Hopper, the plan counts Hopper's size, the
# largest default.
CUBLAS_WORKSPACE_DEFAULT = 32 * 2**20
CUBLAS_WORKSPACE_BEFORE_HOPPER = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_HANDLES_PER_STEP = 2


@dataclass
class StagePlan:
    stage: int
    offload: bool
    weights: float  # bytes per GPU
    interventions: float  # parameters + gradients + optimizer states on the GPU
    activations: float
    activations_checkpointed: float
    cpu: float  # bytes of host memory per rank taken by offload
    workspaces: float = 0.0  # cuBLAS's, on the GPU (cublas_workspace_bytes)

    def total(self, checkpointing: bool) -> float:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.interventions + act + self.workspaces


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
    quantization: str = "none"
    rows_per_example: int = 1  # a preference pair is two rows (chosen, rejected) of one forward
    workspaces_from: str = ""  # where the cuBLAS workspaces' size comes from (_cublas_workspaces)


def cublas_workspace_bytes(config: Optional[str] = None, capability: Optional[tuple[int, int]] = None) -> int:
    """Bytes of the cuBLAS workspaces of one training process on its GPU: ``CUBLAS_HANDLES_PER_STEP`` handles, each
    with the workspace ``config`` sets (CUBLAS_WORKSPACE_CONFIG's syntax, ":SIZE_KiB:COUNT" pairs, summed, as torch
    reads it; the environment's when None), else torch's default for a GPU of compute ``capability`` (this process's
    GPU when None, if the process already uses CUDA; else Hopper's: ``initialized_gpu_capability``)."""
    return _cublas_workspaces(config, capability)[0]


def _cublas_workspaces(config: Optional[str] = None, capability: Optional[tuple[int, int]] = None) -> tuple[int, str]:
    """(``cublas_workspace_bytes``, where that figure comes from, as the plan prints it)."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG") if config is None else config
    pairs = re.findall(r":([0-9]+):([0-9]+)", config or "")
    if pairs:
        per_handle = sum(int(size) * 1024 * int(count) for size, count in pairs)
        return CUBLAS_HANDLES_PER_STEP * per_handle, "as CUBLAS_WORKSPACE_CONFIG sets them"
    if capability is None:
        capability = initialized_gpu_capability()
    if capability is None:
        before_hopper = CUBLAS_HANDLES_PER_STEP * CUBLAS_WORKSPACE_BEFORE_HOPPER / 2**20
        return (CUBLAS_HANDLES_PER_STEP * CUBLAS_WORKSPACE_DEFAULT,
                f"Hopper's, the largest default, as no GPU was asked; {before_hopper:g} MiB before Hopper")
    before_hopper = capability[0] < 9
    return (CUBLAS_HANDLES_PER_STEP * (CUBLAS_WORKSPACE_BEFORE_HOPPER if before_hopper else CUBLAS_WORKSPACE_DEFAULT),
            f"those of this process's GPU, compute capability {capability[0]}.{capability[1]}")


def initialized_gpu_capability() -> Optional[tuple[int, int]]:
    """The compute capability of this process's GPU where the process already uses CUDA, else None without asking.

    Asking would set CUDA up in a process that needs no device (``reft-fast plan`` on a login node, or a launcher that
    plans before it forks its workers): ``torch.cuda.get_device_capability`` initializes torch's CUDA state, and even
    ``torch.cuda.is_available`` asks the CUDA runtime (``cudaGetDeviceCount``, which initializes the driver) unless
    PYTORCH_NVML_BASED_CUDA_CHECK=1. A process forked from one that did either cannot use CUDA (torch: "Cannot
    re-initialize CUDA in forked subprocess"); bench/NOTES.md records it for the benchmark's forked rows. Only the
    cuBLAS workspaces depend on the answer (16.25 against 64 MiB): the plan counts Hopper's, the larger, and says so
    (``format_plan``). ``torch.cuda.is_initialized`` reads torch's own flag and asks the device nothing."""
    return torch.cuda.get_device_capability() if torch.cuda.is_initialized() else None


def _weight_bytes_per_element(cfg: TrainConfig, model_config) -> int:
    """Bytes of one base weight as loaded: model.dtype, or for "auto" the dtype the checkpoint's config records."""
    if cfg.model.dtype == "auto":
        saved = getattr(model_config, "dtype", None) or getattr(text_config_of(model_config), "dtype", None)
        if isinstance(saved, torch.dtype):
            return saved.itemsize
    return bytes_per_element(cfg.model.dtype)


def quantized_weight_bytes(mode: str, out_features: int, in_features: int, double_quant: bool = False) -> int:
    """Bytes bitsandbytes stores for one out×in linear weight quantized as ``mode`` (see the module docstring)."""
    numel = out_features * in_features
    if mode == "int8":
        return numel + 4 * out_features
    blocks = math.ceil(numel / QUANT_BLOCK)
    packed = math.ceil(numel / 2) + 4 * FOUR_BIT_CODES
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * NESTED_CODES


def _base_bytes(cfg: TrainConfig, meta: nn.Module, dtype_bytes: int) -> tuple[float, float, float]:
    """(all base weights, one decoder layer's, the largest dequantized temporary) in bytes, as loaded."""
    mode = cfg.model.quantization
    layer = find_decoder_layers(meta)[1][0]
    if mode == "none":
        return (sum(p.numel() for p in meta.parameters()) * dtype_bytes,
                sum(p.numel() for p in layer.parameters()) * dtype_bytes, 0.0)
    whole = set(linears_outside_backbone(meta))
    quantized = {id(m.weight): quantized_weight_bytes(mode, m.out_features, m.in_features,
                                                      cfg.model.quantization_double_quant)
                 for name, m in meta.named_modules() if isinstance(m, nn.Linear) and name not in whole}

    def stored(module: nn.Module) -> float:
        return sum(quantized.get(id(p), p.numel() * dtype_bytes) for p in module.parameters())

    compute = cfg.model.quantization_compute_dtype
    compute_bytes = bytes_per_element(compute) if compute else dtype_bytes
    largest = max(m.weight.numel() for m in meta.modules() if id(getattr(m, "weight", None)) in quantized)
    return stored(meta), stored(layer), largest * compute_bytes


def _int8_saved_inputs(text) -> int:
    """Elements per token and layer that the 8-bit matmuls keep for backward beyond what the layer keeps anyway: the
    two norms' outputs (q/k/v and gate/up share one input each) and the down projection's input. The attention
    output adds nothing: it is SDPA's own saved output (transformers' transpose back is a view of it)."""
    return 2 * text.hidden_size + getattr(text, "intermediate_size", 4 * text.hidden_size)


def _intervention_numel(iv, d: int) -> int:
    """Trainable elements of one intervention as the recipe builds it (a few r×d tensors), counted from a built one
    rather than from a formula per type, so a new intervention type is planned correctly without an edit here."""
    one = intervention_class(iv.intervention)(embed_dim=d, low_rank_dimension=iv.low_rank_dimension)
    return sum(p.numel() for p in one.parameters())


def _attention_masks(cfg: TrainConfig, model_config, layers: range, padding_mask: bool) -> list[str]:
    """What attention gets in each of ``layers`` (the trained ones), at a micro-batch's worst (padded, rows of
    ``data.max_length``):

    * "shared": one additive mask all layers share (``data.packing``, or a replayed step's one segment per row:
      ``packing.replay_shares_one_mask``), counted once (``_activation_bytes``);
    * "own": under SDPA, a boolean mask that transformers built, which torch converts to the query's dtype in every
      call (``convert_boolean_attn_mask``) and keeps for backward: rows × T × T per layer. transformers (5.24) builds
      one for a padding mask (a task that keeps it; a router loss's, ``loss.causal_model_inputs``), for a layer whose
      window the rows reach (T ≥ W: ``masking_utils._ignore_causal_mask_sdpa``) and, in every layer, while a stream
      captures a step that is not given the shared mask (``is_tracing``);
    * "none": SDPA given no mask (its ``is_causal``); eager attention (its additive mask is made once per forward and
      not kept for backward); flash and flex attention (they take no T × T mask).
    Under any mask SDPA gets k and v repeated to every query head (``_activation_bytes``)."""
    implementation = cfg.model.attn_implementation or ""
    replayed = cfg.training.cuda_graphs
    if packing_attention(implementation) == "mask" and (cfg.data.packing or (
            replayed and replay_shares_one_mask(model_config, implementation, padding_mask))):
        return ["shared"] * len(layers)
    if implementation != "sdpa":
        return ["none"] * len(layers)
    masked = padding_mask or router_loss_of(model_config) or replayed
    window = sliding_window_of(model_config)
    windowed = windowed_layers(model_config, num_layers_of(model_config))
    reached = window is not None and cfg.data.max_length >= window
    return ["own" if masked or (reached and windowed[i]) else "none" for i in layers]


def _activation_bytes(cfg: TrainConfig, text, masks: list[str], checkpoints: int, dtype_bytes: int,
                      dequantized: float = 0.0, lm_logits: bool = True,
                      rows_per_example: int = 1) -> tuple[float, float]:
    """(without, with checkpointing) bytes of one micro-batch's activations, backward running through the layers
    whose attention gets ``masks`` (``_attention_masks``) and ``checkpoints`` layers keeping their input under
    checkpointing; see the module docstring."""
    d = text.hidden_size
    heads = text.num_attention_heads
    head_dim = head_dim_of(text) or d // heads
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    d_ff = getattr(text, "intermediate_size", 4 * d)
    implementation = cfg.model.attn_implementation or ""
    rows = cfg.training.micro_batch_size * rows_per_example
    tokens = rows * cfg.data.max_length
    mask_bytes = tokens * cfg.data.max_length * dtype_bytes  # one [rows, 1, T, T] mask in the base dtype
    int8_inputs = _int8_saved_inputs(text) * dtype_bytes if cfg.model.quantization == "int8" else 0
    scores = _eager_scores_bytes(cfg, rows, heads, dtype_bytes)

    def layer_bytes(mask: str) -> tuple[float, float]:
        """(what one layer keeps for backward, what is in flight while its gradients are computed)"""
        # flash-attn takes grouped k/v as they are, and so does SDPA given no mask (transformers 5.24's
        # use_gqa_in_sdpa, up to a head dim of 256); under a mask transformers repeats them to every head.
        grouped = implementation.startswith("flash") or (
            implementation == "sdpa" and mask == "none" and head_dim <= 256)
        kv_saved = kv_dim if grouped else d
        per_token_layer = (2 * d + 2 * kv_saved + 3 * d_ff) * dtype_bytes + 2 * d * 4  # + the norms' fp32 inputs
        own = mask_bytes if mask == "own" else 0
        return tokens * (per_token_layer + int8_inputs) + scores + own, tokens * per_token_layer + scores

    per_layer = [layer_bytes(mask) for mask in masks]
    shared = mask_bytes if "shared" in masks else 0
    # the largest layer (an unmasked one where backward runs through no layer), and one layer's gradients in flight
    unmasked_kept, unmasked_in_flight = layer_bytes("none")
    layer = max((kept for kept, _ in per_layer), default=unmasked_kept)
    in_flight = max((flight for _, flight in per_layer), default=unmasked_in_flight)
    # The loss phase of backward: three fp32 logits tensors (a classifier's logits are a few per example) and the
    # final norm's fp32 input; the layer phase: what is in flight there (see the module docstring).
    loss_phase = (3 * tokens * text.vocab_size * 4 if lm_logits else 0) + tokens * d * 4
    activations = sum(kept for kept, _ in per_layer) + max(loss_phase, in_flight) + dequantized + shared
    checkpointed = tokens * checkpoints * d * dtype_bytes + max(loss_phase, layer + in_flight) + dequantized + shared
    return activations, checkpointed


def _eager_scores_bytes(cfg: TrainConfig, rows: int, heads: int, dtype_bytes: int) -> int:
    """Bytes of attention probabilities one layer keeps for backward under ``model.attn_implementation: eager`` (SDPA
    and flash attention keep none): transformers' eager attention takes the softmax in fp32 (kept: softmax's backward
    reads its output) and casts it to the base dtype for the product with v (kept again, unless the base is fp32),
    rows × heads × T × T each."""
    if cfg.model.attn_implementation != "eager":
        return 0
    per_score = 4 + (dtype_bytes if dtype_bytes != 4 else 0)
    return rows * heads * cfg.data.max_length ** 2 * per_score


def _accepted_stages(cfg: TrainConfig, gpus: int) -> list[int]:
    """The ZeRO stages validation accepts for ``cfg`` with only the stage changed (offload off: it is a row of each)."""
    accepted = []
    for stage in (0, 1, 2, 3):
        at_stage = replace(cfg, deepspeed=replace(cfg.deepspeed, stage=stage, offload_optimizer=False,
                                                  offload_param=False))
        try:
            validate(at_stage, gpus, check_model=False, check_data=False)
        except ConfigError:
            continue
        accepted.append(stage)
    return accepted


def _stage_plans(gpus: int, weights_full: float, layer_bytes: float, intervention_params: int,
                 activations: tuple[float, float], accepted_stages=(0, 1, 2, 3), workspaces: float = 0.0
                 ) -> list[StagePlan]:
    stages = []
    for stage in accepted_stages:
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
            stages.append(StagePlan(stage, offload, weights, on_gpu, *activations, cpu, workspaces))
    return stages


def plan_memory(cfg: TrainConfig, gpus: int) -> MemoryPlan:
    if gpus < 1:
        raise ValueError(f"--gpus must be ≥ 1, got {gpus}")
    model_config = validate(cfg, gpus, check_data=False)
    text = text_config_of(model_config)
    num_layers = num_layers_of(model_config)

    dtype_bytes = _weight_bytes_per_element(cfg, model_config)
    task = make_task(cfg)
    meta = meta_model(model_config, task.auto_class, task.base_kwargs)
    base_params = sum(p.numel() for p in meta.parameters())
    weights_full, layer_bytes, dequantized = _base_bytes(cfg, meta, dtype_bytes)
    trained_base_params = sum(p.numel() for p in task.trainable_base_parameters(meta))  # a classifier head
    del meta

    iv = cfg.interventions
    layers = layer_list(iv.layers, num_layers)
    n_interventions = len(intervention_layers(layers, iv.positions, iv.share_weights))
    # fp32 like the interventions, with their gradients and AdamW states (a trained head in bf16 is counted as fp32:
    # a small overestimate)
    intervention_params = n_interventions * _intervention_numel(iv, text.hidden_size) + trained_base_params
    # Backward runs through the layers above the lowest edit, and through that layer too unless its output is edited.
    trained = num_layers - min(layers) - (1 if iv.component == "block_output" else 0)

    # Checkpointed, every layer from the lowest edited one up keeps its input: that layer's call holds the edit.
    masks = _attention_masks(cfg, model_config, range(num_layers - trained, num_layers), task.padding_mask)
    activations = _activation_bytes(cfg, text, masks, num_layers - min(layers), dtype_bytes, dequantized,
                                    lm_logits=task.auto_class == "AutoModelForCausalLM",
                                    rows_per_example=task.rows_per_example)
    workspaces, workspaces_from = _cublas_workspaces()  # the same GPU for every stage
    stages = _stage_plans(gpus, weights_full, layer_bytes, intervention_params, activations,
                          _accepted_stages(cfg, gpus), workspaces)
    return MemoryPlan(cfg.model.path, gpus, base_params, intervention_params, cfg.training.micro_batch_size,
                      cfg.data.max_length, trained, num_layers, stages, cfg.deepspeed.stage,
                      cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_param,
                      cfg.training.gradient_checkpointing, cfg.model.quantization, task.rows_per_example,
                      workspaces_from)


def _micro_batch_rows(plan: MemoryPlan) -> str:
    if plan.rows_per_example == 1:
        return str(plan.micro_batch_size)
    return f"{plan.micro_batch_size} pairs = {plan.micro_batch_size * plan.rows_per_example} rows"


def format_plan(plan: MemoryPlan, gpu_memory_gib: float = 80.0) -> str:
    usable = gpu_memory_gib * USABLE_FRACTION
    quantized = "" if plan.quantization == "none" else f" ({plan.quantization}; ZeRO-3 cannot partition it)"
    lines = [
        f"model {plan.model}: {plan.base_params / 1e9:.2f} B frozen parameters{quantized}, {plan.num_layers} layers; "
        f"{plan.intervention_params:,} trainable intervention parameters",
        f"per GPU: micro-batch {_micro_batch_rows(plan)} × {plan.seq_len} tokens, backward through the top "
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
    workspaces = plan.stages[0].workspaces / 2**20 if plan.stages else 0.0
    lines.append(f"(GiB per GPU; totals include {workspaces:g} MiB of cuBLAS workspaces; estimates without allocator "
                 "fragmentation, communication buffers and CUDA context)")
    if plan.workspaces_from:
        lines.append(f"(cuBLAS workspaces: {plan.workspaces_from})")
    return "\n".join(lines)
