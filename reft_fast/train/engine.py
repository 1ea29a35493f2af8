"""The training engine: ``train(cfg)`` runs the recipe (``reft_fast.train.recipe.ReftTrainingRecipe``), a short loop over
a DeepSpeed engine that holds a ReftModel; this module holds the parts the recipe is made of.

    batch (CPU, positions computed by the collator) → engine(...) → engine.backward → engine.step → metrics

DeepSpeed does ZeRO stage 0–3, CPU offload, gradient accumulation, clipping, the optimizer step (a client
torch.optim.AdamW over the intervention parameters only) and the LR schedule (a LambdaLR handed to
``deepspeed.initialize``, stepped by DeepSpeed at accumulation boundaries). One process on a CPU or one GPU is the same
loop at stage 0 with a world of one.

Precision: the frozen base is loaded in ``model.dtype`` (bf16 on GPUs) while the intervention parameters, their
gradients and the optimizer stay float32: the ReFT ops compute in fp32 and cast at the boundary. DeepSpeed's own
bf16/fp16 modes would cast the whole module (interventions included) to half precision, so they are not used; under
ZeRO-3 the base is partitioned by zero.Init directly in ``model.dtype``.

ZeRO-3: HfDeepSpeedConfig is alive before ``from_pretrained``, so transformers builds the base inside zero.Init and no
rank ever holds all of it. The intervention parameters are kept whole on every rank (the persistence threshold is
raised above their size) because the ReftModel reads them in one batched call per forward, outside ZeRO's per-module
gather hooks; they are small.

Resume: the batch order depends only on (seed, step) (data.StepSampler) and the random state is reseeded from
(seed, step) before every step, so a run resumed from a checkpoint at step k replays steps k+1… exactly as an
uninterrupted run does. Checkpoints (reft_fast.train.checkpoints) hold the whole trainable state in one file that rank 0
publishes atomically, so any rank count and ZeRO stage resumes them, and resume skips (and names) a damaged one.
``metrics.jsonl`` gets each step's line before that step's checkpoint and is cut back to step k on resume, so the file
always shows one trajectory. A non-empty output_dir is refused unless the launch resumes or overwrites it.

Collectives: every reduction goes through ``_all_reduce_sum``, on the accelerator's device (NCCL reduces no host
tensors); the step's loss stays on the device until the metrics line reads it, once per optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

from reft_fast.train.checkpoints import gather_trainer_state, load_newest_intact, prune_checkpoints, \
    restore_trainer_state, write_checkpoint
from reft_fast.train.data import encode_prompt
from reft_fast.core.dtypes import model_dtype
from reft_fast.core.hf import text_config_of
from reft_fast.core.positions import intervention_layers, intervention_locations
from reft_fast.train.train_config import ConfigError, TrainConfig, gradient_accumulation_steps, gguf_cache_dir, \
    resolve_model_source

__all__ = ["TrainResult", "build_ds_config", "build_reft_model", "check_output_dir", "enable_gradient_checkpointing",
           "generate_answers", "load_base_model", "load_tokenizer", "train",
           "count_step_flops", "materialize_gguf", "RUN_INFO_FILE", "TRAIN_CONFIG_FILE"]

logger = logging.getLogger(__name__)
TRAIN_CONFIG_FILE = "train_config.yaml"  # written next to the final interventions; `reft-fast generate` reads it
RUN_INFO_FILE = "run.json"  # what this launch resolved from the config (the fused base operations), in output_dir

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU when training.peak_tflops is not set.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


# --------------------------------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Join the process group the launcher prepared, or make a world of one (CPU, a single GPU, a notebook).

    ``timeout_minutes`` bounds every wait for the other ranks (joining, each collective): a rank that hangs makes the
    others fail with a timeout error instead of blocking the job forever.
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        timeout = timedelta(minutes=timeout_minutes)
        # DeepSpeed makes its data-parallel and ZeRO groups with torch.distributed.new_group and no timeout, so they
        # would wait torch's default (30 min on gloo, 10 on NCCL) whatever init_distributed got: torch reads that
        # default from these module globals each time a group is made (DeepSpeed 0.19.8, torch 2.13, 2026-11-28).
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = timeout
        if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
            distributed_c10d.default_pg_nccl_timeout = timeout
        deepspeed.init_distributed(verbose=False, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _announced_world_size() -> int:
    """The number of ranks, known before joining the process group: the launchers announce it in WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all ranks, as a tensor on the accelerator's current device; every reduction of the engine
    goes through here.

    On GPUs DeepSpeed's process group is NCCL, which cannot reduce tensors in host memory ("No backend type associated
    with device type cpu"); gloo, on CPU machines, can, so a host tensor there would hide the bug until the first
    multi-GPU run. Reading the result (``.tolist()``) is the one host sync of the caller.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    values = values.to(get_accelerator().current_device_name())
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


# --------------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------------------------------------
def materialize_gguf(folder: str, gguf_file: str) -> str:
    """Convert a GGUF file once into a safetensors checkpoint in the cache and return its directory.

    transformers can read GGUF directly, but only through accelerate and never under zero.Init; an ordinary
    checkpoint loads everywhere (and in 0.4 s instead of 16 s for SmolLM2-135M). Rank 0 converts, the others wait.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    file = Path(folder) / gguf_file
    target = gguf_cache_dir(file)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (target / "config.json").is_file():
        logger.info("converting %s to a safetensors checkpoint in %s (once)", file, target)
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"GGUF {file}: missing tensors {sorted(set(missing) - tied)}, unexpected {unexpected}")
        model.tie_weights()
        partial = target.with_name(target.name + f".partial{os.getpid()}")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)  # atomic: a killed conversion never leaves a half-written checkpoint behind
    _barrier()
    return str(target)


def _model_source(cfg: TrainConfig) -> str:
    source, gguf_file = resolve_model_source(cfg.model.path, cfg.base_dir)
    return materialize_gguf(source, gguf_file) if gguf_file else source


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_base_model(source: str, cfg: TrainConfig, ds_config: Optional[dict] = None):
    """The frozen base, in ``model.dtype``; under ZeRO-3 built inside zero.Init (partitioned as it is created).

    Returns (model, hf_deepspeed_config): keep the second alive until training ends (transformers holds it weakly).
    """
    from transformers import AutoModelForCausalLM

    dtype = model_dtype(cfg.model.dtype)
    hf_ds = None
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        init_config = json.loads(json.dumps(ds_config))
        # zero.Init takes its dtype from the mixed-precision section; the engine itself runs without one (see above).
        init_config["bf16"] = {"enabled": dtype == torch.bfloat16}
        init_config["fp16"] = {"enabled": dtype == torch.float16}
        hf_ds = HfDeepSpeedConfig(init_config)
    kwargs = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                                                 **kwargs)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, hf_ds


def enable_gradient_checkpointing(base, *, reentrant: bool = False) -> None:
    """transformers' per-layer checkpointing; the ReftModel's hooks redo their edits when a layer is recomputed."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.x renamed it
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        # Reentrant checkpointing back-propagates into a segment only when one of its inputs requires grad; the
        # interventions inside the layers need that, and the frozen embeddings would not give it.
        base.enable_input_require_grads()


def build_reft_model(base, cfg: TrainConfig, layers: list[int]):
    """Attach the configured interventions at ``layers`` (twice for a two-sided position spec without share_weights:
    ``positions.intervention_layers``)."""
    from reft_fast.core.config import ReftConfig
    from reft_fast.core.interventions import intervention_class
    from reft_fast.core.model import get_reft_model

    iv = cfg.interventions
    layers = intervention_layers(layers, iv.positions, iv.share_weights)
    options = {"dropout": iv.dropout, "act_fn": iv.act}
    if intervention_class(iv.type).uses_rotation:  # only the rotation-based types accept it
        options["orthogonalization"] = iv.orthogonalization
    representations = [{"layer": layer, "component": iv.component, "low_rank_dimension": iv.rank,
                        "intervention": iv.type, **options} for layer in layers]
    reft_config = ReftConfig(representations, positions=iv.positions, share_weights=iv.share_weights)
    return get_reft_model(base, reft_config)


def _num_interventions(reft_model) -> int:
    return len(reft_model.interventions)


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed config, optimizer, schedule
# --------------------------------------------------------------------------------------------------------------------
def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def build_ds_config(cfg: TrainConfig, world_size: int, max_intervention_numel: int = 0) -> dict:
    t, ds = cfg.training, cfg.deepspeed
    accumulation = gradient_accumulation_steps(cfg, world_size)
    zero: dict[str, Any] = {"stage": ds.stage}
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
    }
    config = _deep_merge(config, json.loads(json.dumps(ds.config)))
    if ds.stage == 3:
        # The interventions must stay whole on every rank (see the module docstring): parameters smaller than the
        # persistence threshold are never partitioned, so the threshold is raised above the largest of them.
        zero = config["zero_optimization"]
        zero["stage3_param_persistence_threshold"] = max(int(zero.get("stage3_param_persistence_threshold", 100_000)),
                                                         max_intervention_numel + 1)
    return config


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


# --------------------------------------------------------------------------------------------------------------------
# FLOPs and device facts for the metrics
# --------------------------------------------------------------------------------------------------------------------
def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions leave p.numel() == 0


def _numel_on_this_rank(p: torch.nn.Parameter) -> int:
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
    from reft_fast.core.model import find_decoder_layers

    _, layers = find_decoder_layers(base)
    per_layer = sum(_numel(p) for p in layers[0].parameters())
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


def _peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for fragment, tflops in _PEAK_TFLOPS.items():
            if fragment in name:
                return tflops
    return None


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


# --------------------------------------------------------------------------------------------------------------------
# Generation (shared by the engine, `reft-fast generate` and the demo)
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], *, positions: Optional[str] = None,
                     share_weights: bool = False, chat_template: Optional[bool] = None,
                     system_prompt: Optional[str] = None, max_new_tokens: int = 64,
                     synced_gpus: bool = False) -> list[str]:
    """Greedy answers, one prompt at a time. ``model`` is a ReftModel (then ``positions`` is required and the
    interventions edit the prompt) or a plain transformers model (answers of the base alone).

    Fused base operations (``model.fused_ops``) are a training-speed feature and nothing here applies them, so
    ``reft-fast generate`` runs the stock transformers base: liger's gains come from the backward pass and from never
    materializing the training logits, while greedy decoding is one token at a time through the KV cache (and its
    fused cross-entropy is inactive in eval mode anyway). A base the training engine fused keeps its kernels for the
    samples it generates; in eval mode they compute the same logits up to rounding.
    """
    answers = []
    device = next(p for p in model.parameters()).device
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, chat_template=chat_template, system_prompt=system_prompt)
        inputs = {"input_ids": torch.tensor([ids], device=device),
                  "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device)}
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        if synced_gpus:
            kwargs["synced_gpus"] = True
        if hasattr(model, "interventions"):
            locations = intervention_locations([len(ids)], positions, _num_interventions(model),
                                               share_weights=share_weights)
            _, out = model.generate(inputs, intervention_locations=locations, use_cache=True, **kwargs)
        else:
            out = model.generate(**inputs, use_cache=True, **kwargs)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return answers


# --------------------------------------------------------------------------------------------------------------------
# The loop's parts (the loop itself: reft_fast.train.recipe)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, as logged
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    final_dir: Optional[str] = None
    samples: list[tuple[str, str]] = field(default_factory=list)
    samples_before: list[tuple[str, str]] = field(default_factory=list)
    base_numel_at_load: int = 0  # base elements materialized right after loading (ZeRO-3: only unpartitioned ones)
    fused_ops: tuple[str, ...] = ()  # the liger-kernel operations fused into the base (model.fused_ops)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _accepts_logits_to_keep(base) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _trim_to_labels(batch: dict) -> dict:
    """Keep only the tail of the sequence that holds labels for the LM head (on the CPU batch, before the transfer).

    The head and the loss over the vocabulary cost as much as several decoder layers on small models; positions before
    the first response token carry no label, so their logits are never needed. The base computes logits for the last
    K positions only (``logits_to_keep``) and the labels are cut to the same K columns: transformers' shift inside the
    loss then pairs them exactly as on the full sequence, and the mean is over the same tokens.
    """
    labelled = (batch["labels"] != -100).any(dim=0).nonzero()
    if labelled.numel() == 0:
        return batch
    keep = batch["labels"].shape[1] - int(labelled[0]) + 1
    if keep >= batch["labels"].shape[1]:
        return batch
    return {**batch, "labels": batch["labels"][:, -keep:], "logits_to_keep": keep}


def _forward_loss(engine, batch: dict) -> torch.Tensor:
    base = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    extra = {"logits_to_keep": batch["logits_to_keep"]} if "logits_to_keep" in batch else {}
    _, out = engine(base, intervention_locations=batch["intervention_locations"], labels=batch["labels"], **extra)
    return out.loss


@torch.no_grad()
def evaluate(engine, dataset, collator, micro: int, rank: int, world: int, trim: bool = False) -> float:
    """Mean response-token loss over the whole dataset. Every rank runs the same number of forwards (ZeRO-3 gathers
    parameters collectively): the last chunk is padded with a zero-weight copy of an example. The weighted losses add
    up on the device; the only host sync is reading the reduced total."""
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens_total = 0
    chunk = micro * world
    for start in range(0, len(dataset), chunk):
        mine = list(range(start + rank * micro, min(start + (rank + 1) * micro, len(dataset))))
        batch = collator([dataset[i] for i in (mine or [0])])
        batch = _trim_to_labels(batch) if trim else batch
        # The tokens the mean loss averages over, counted on the host batch before it moves.
        tokens = int((batch["labels"][:, 1:] != -100).sum()) if mine else 0
        loss = _forward_loss(engine, _to(batch, engine.device))
        loss_sum += loss.detach().double() * tokens
        tokens_total += tokens
    total_loss, total_tokens = _all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(tokens_total)])).tolist()
    engine.train()
    return total_loss / total_tokens


def _config_yaml(cfg: TrainConfig) -> str:
    # overwrite_output_dir is what one launch was told, not a property of the run: a copy of this file used as the
    # config of a later launch must not delete this run.
    return yaml.safe_dump({**cfg.to_dict(), "overwrite_output_dir": False}, sort_keys=False)


def _save_interventions(reft_model, directory: Path, cfg: TrainConfig, rank: int) -> None:
    # The interventions are whole on every rank at every stage (see the module docstring). Under ZeRO-3 they must not
    # go through GatheredParameters: leaving it partitions (frees) even persistent parameters (DeepSpeed 0.19.8), and
    # the samples generated after this save would run on empty weights.
    if rank == 0:
        reft_model.save(str(directory))
        (directory / TRAIN_CONFIG_FILE).write_text(_config_yaml(cfg))
    _barrier()


def _rewind_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------------------------------------------------
# The output directory, checkpoints and resume
# --------------------------------------------------------------------------------------------------------------------
# What a run writes into output_dir; --overwrite removes these (and nothing else) before starting.
_RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "tensorboard", TRAIN_CONFIG_FILE, RUN_INFO_FILE)


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse a launch that would lose an earlier run's files: a non-empty output_dir needs ``resume`` (continue the
    run there) or ``overwrite_output_dir`` (replace its outputs). Reads the file system only; every rank runs it before
    any rank writes there."""
    output = Path(cfg.output_dir)
    if cfg.resume and cfg.overwrite_output_dir:
        raise ConfigError("overwrite_output_dir: cannot be combined with resume (continue the run in output_dir, or "
                          "replace it: not both)")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output_dir: {output} exists and is not a directory")
    if cfg.resume or cfg.overwrite_output_dir or not output.is_dir():
        return
    entries = sorted(path.name for path in output.iterdir())
    if entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise ConfigError(f"output_dir: {output} is not empty ({shown}); pass --resume (resume=true) to continue the "
                          "run there, --overwrite (overwrite_output_dir=true) to replace its outputs, or choose "
                          "another output_dir")


def _remove_previous_run(output: Path) -> None:
    removed = [name for name in _RUN_OUTPUTS if (output / name).exists()]
    for name in removed:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        logger.warning("overwrite_output_dir: removed the previous run's %s from %s", ", ".join(removed), output)


def _zero_gradient_step(engine, batches: Sequence[dict]) -> None:
    """One optimizer step whose gradients are all zero. torch's AdamW and DeepSpeed's ZeRO partitions of its state are
    created on the first step; a resumed run takes this step so that there is a state to load the checkpoint into
    (restore_trainer_state then overwrites every part of it: parameters, moments, step count, schedule)."""
    for batch in batches:  # one per micro-step: DeepSpeed steps the optimizer at the accumulation boundary
        engine.backward(_forward_loss(engine, batch) * 0.0)
        engine.step()


def _resume(ckpt_dir: Path, engine, reft_model, optimizer, scheduler, data_order: dict, rank: int,
            warm_up_batches: Callable[[], Sequence[dict]]) -> int:
    """Load the newest intact checkpoint (any rank count, any ZeRO stage) and return its step; 0 when there is none."""

    def warn(message: str) -> None:
        if rank == 0:
            logger.warning("%s", message)

    found = load_newest_intact(ckpt_dir, warn)
    if found is None:
        warn(f"resume: nothing to resume in {ckpt_dir} (no checkpoint yet): starting at step 0")
        return 0
    path, state = found
    _zero_gradient_step(engine, warm_up_batches())
    restore_trainer_state(reft_model, optimizer, scheduler, state)
    step = int(state["step"])
    engine.global_steps, engine.global_samples = step, step * engine.train_batch_size()
    if state["data_order"] != data_order:
        warn(f"resume: the data order differs from the checkpoint's ({state['data_order']} then, {data_order} now): "
             "the steps after the resume will not be those of the interrupted run")
    saved_by = state["saved_by"]
    if rank == 0:
        logger.info("resumed from %s at step %d (saved by %d ranks at ZeRO-%d)", path, step, saved_by["ranks"],
                    saved_by["zero_stage"])
    return step


def _save_checkpoint(ckpt_dir: Path, step: int, reft_model, optimizer, scheduler, rank: int, keep: int,
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
    failed = _all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)).tolist()[0]
    if failed:
        message = f"writing checkpoint step{step} to {ckpt_dir} failed"
        raise RuntimeError(f"{message}: {error}" if error else f"{message} on rank 0 (its log has the cause)") \
            from error


def train(cfg: TrainConfig, *, callbacks: Sequence[Callable[[int, dict, Any], None]] = ()) -> TrainResult:
    """Run one training job described by ``cfg``; every rank calls this. ``callback(step, metrics, engine)`` runs on
    every rank after each optimizer step (after that step's checkpoint, if any, was written); ``engine.module`` is the
    ReftModel. The job itself is ``reft_fast.train.recipe.ReftTrainingRecipe``."""
    from reft_fast.train.recipe import ReftTrainingRecipe  # the recipe builds on this module's helpers

    recipe = ReftTrainingRecipe(cfg, callbacks=callbacks)
    try:
        recipe.setup()
        recipe.train()
        result = recipe.finish()
    finally:
        recipe.cleanup()
    _barrier()
    return result


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(output / "tensorboard"))


def _log(metrics: dict, metrics_file, writer, bar, show: bool) -> None:
    metrics_file.write(json.dumps(metrics) + "\n")
    metrics_file.flush()
    os.fsync(metrics_file.fileno())  # a SIGKILL right after this step keeps its line
    if writer is not None:
        for key, value in metrics.items():
            if key != "step":
                writer.add_scalar(f"train/{key}", value, metrics["step"])
    if bar is not None:
        bar.update(1)
        if show:
            postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}",
                       "mem": f"{metrics['peak_mem_gib']:.1f}GiB"}
            if "mfu" in metrics:
                postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
            if "eval_loss" in metrics:
                postfix["eval"] = f"{metrics['eval_loss']:.4f}"
            bar.set_postfix(postfix, refresh=False)


def shutdown(wait_for_others: bool = True) -> None:
    """Barrier, then tear down the process group (DeepSpeed on gloo sometimes aborts at exit otherwise).

    After a failure pass ``wait_for_others=False``: the other ranks may be gone or stuck, and a barrier would hold
    this one until the timeout instead of letting it exit (the launcher then stops the rest of the job).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
