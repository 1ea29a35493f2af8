"""The frozen base, its tokenizer and the ReftModel over it, as a training config describes them.

Precision: the frozen base is loaded in ``model.dtype`` (bf16 on GPUs) while the intervention parameters, their
gradients and the optimizer stay float32: the ReFT ops compute in fp32 and cast at the boundary. DeepSpeed's own
bf16/fp16 modes would cast the whole module (interventions included) to half precision, so the DeepSpeed config has
none (``reft_fast.train.ds_config``); under ZeRO-3 the base is partitioned by zero.Init directly in ``model.dtype``.

ZeRO-3: HfDeepSpeedConfig is alive before ``from_pretrained``, so transformers builds the base inside zero.Init and no
rank ever holds all of it.

Quantized bases (``model.quantization``): transformers' bitsandbytes integration replaces every ``nn.Linear`` of the
decoder layers by an 8-bit (``Linear8bitLt``: int8 weights, one fp32 scale per output row) or 4-bit (``Linear4bit``:
nf4/fp4 codes packed two per byte, one scale per block of 64 weights) layer as the checkpoint is read; the embeddings,
the norms and every linear outside the backbone (the LM head, a classifier head: ``linears_outside_backbone``) stay in
``model.dtype``. The gradient with
respect to the hidden states flows through them (bitsandbytes dequantizes the weight for the backward matmul), which
is all ReFT needs from a frozen base. Each rank loads its own quantized copy straight onto its device; ZeRO-3 is
refused at validation, since zero.Init cannot partition packed weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Collection, Optional

import torch

from reft_fast.core.config import ReftConfig
from reft_fast.core.dtypes import model_dtype
from reft_fast.core.hf import head_dim_of
from reft_fast.core.model import get_reft_model
from reft_fast.core.positions import intervention_layers
from reft_fast.train.distributed import barrier
from reft_fast.train.train_config import (QUANTIZATION_EXTRA, ConfigError, TrainConfig, gguf_cache_dir,
                                          resolve_model_source)

__all__ = ["FLEX_ATTENTION_MIN_HEAD_DIM", "build_reft_model", "check_flex_attention_head_dim", "compile_layers",
           "enable_gradient_checkpointing", "load_base_model",
           "linears_outside_backbone", "load_tokenizer", "materialize_gguf", "meta_model", "model_source",
           "quantization_config"]

logger = logging.getLogger(__name__)


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
    barrier()
    return str(target)


def model_source(cfg: TrainConfig) -> str:
    """The directory or hub name ``from_pretrained`` loads the base from; a GGUF file is converted once first."""
    source, gguf_file = resolve_model_source(cfg.model.path, cfg.base_dir)
    return materialize_gguf(source, gguf_file) if gguf_file else source


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The base's tokenizer, with a pad token (its EOS, else its UNK, where it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_base_model(source: str, cfg: TrainConfig, ds_config: Optional[dict] = None,
                    auto_class: str = "AutoModelForCausalLM", model_kwargs: Optional[dict] = None,
                    restored: Collection[str] = ()):
    """The frozen base, in ``model.dtype``, loaded by the transformers Auto class named (the task's, with its
    ``model_kwargs``: a head's size); under ZeRO-3 built inside zero.Init (partitioned as it is created).

    ``restored``: the names of parameters the caller loads right after (a run's trained head): when they are all the
    checkpoint lacks, transformers' report of "newly initialized" parameters, which advises training them, is not
    shown (``_load_report_unless_restored``).

    Returns (model, hf_deepspeed_config): keep the second alive until training ends (transformers holds it weakly).
    """
    import transformers

    dtype = model_dtype(cfg.model.dtype)
    hf_ds = None
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        init_config = json.loads(json.dumps(ds_config))
        # zero.Init takes its dtype from the mixed-precision section; the engine itself runs without one (see the
        # module docstring).
        init_config["bf16"] = {"enabled": dtype == torch.bfloat16}
        init_config["fp16"] = {"enabled": dtype == torch.float16}
        hf_ds = HfDeepSpeedConfig(init_config)
    flex = cfg.model.attn_implementation == "flex_attention"
    quantization = quantization_config(cfg)
    # the model's config, read once, where something must be known before any weight is read
    config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code) \
        if flex or quantization is not None else None
    if flex:
        check_flex_attention_head_dim(cfg, config, _this_rank_device())
    kwargs = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    kwargs.update(model_kwargs or {})
    if quantization is not None:
        quantization.llm_int8_skip_modules = linears_outside_backbone(meta_model(config, auto_class, model_kwargs))
        # bitsandbytes quantizes each weight as it is placed: straight onto this rank's device, so the whole
        # full-precision base never sits there.
        kwargs.update(quantization_config=quantization, device_map={"": _this_rank_device()})
        _say_bitsandbytes_casts_once()
    load = getattr(transformers, auto_class).from_pretrained
    kwargs.update(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    model = _load_report_unless_restored(load, source, kwargs, restored) if restored else load(source, **kwargs)
    model.requires_grad_(False)
    model.config.use_cache = False
    _keep_4bit_weights_differentiable(model)
    return model, hf_ds


# torch's flex attention kernel for GPUs (inductor's Triton template, which serves every device but cpu and mps) needs
# heads at least 16 wide, the smallest block of tl.dot: below that, every call fails while compiling with "NYI:
# embedding dimension of the query, key, and value must be at least 16" (torch 2.11 on an H200, 2026-11-30; the same
# check in torch 2.13's torch/_inductor/kernel/flex/flex_attention.py). transformers (5.17, 5.24) always runs flex
# attention compiled, in training, evaluation and generate alike. Its CPU kernel takes any head dim.
FLEX_ATTENTION_MIN_HEAD_DIM = 16


def check_flex_attention_head_dim(cfg: TrainConfig, model_config, device) -> None:
    """A ConfigError where ``model.attn_implementation: flex_attention`` cannot run: a model whose heads are narrower
    than ``FLEX_ATTENTION_MIN_HEAD_DIM`` on a ``device`` other than the CPU (or mps)."""
    device_type = torch.device(device).type
    if cfg.model.attn_implementation != "flex_attention" or device_type in ("cpu", "mps"):
        return
    head_dim = head_dim_of(model_config)
    if head_dim is None or head_dim >= FLEX_ATTENTION_MIN_HEAD_DIM:
        return
    raise ConfigError(f"model.attn_implementation: flex_attention on {device_type} needs a head dim of at least "
                      f"{FLEX_ATTENTION_MIN_HEAD_DIM} (torch's GPU kernel for flex attention refuses narrower heads); "
                      f"{cfg.model.path!r} has head dim {head_dim}: use sdpa or eager (under either, data.packing "
                      "keeps the examples apart with a block-diagonal mask)")


class _Held(logging.Filter):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _load_report_unless_restored(load, source: str, kwargs: dict, restored: Collection[str]):
    """``load(source, **kwargs)`` with transformers' messages about parameters the checkpoint lacks left out when the
    caller restores every one of them (``restored``): 5.x's LOAD REPORT table ("MISSING: newly initialized ...
    Consider training"), 4.x's "Some weights ... are newly initialized ... You should probably TRAIN this model".
    The loader's messages are held back while it runs, and all but those are logged after it."""
    chatty = logging.getLogger("transformers.modeling_utils")
    held, info = _Held(), None
    chatty.addFilter(held)
    try:
        model, info = load(source, output_loading_info=True, **kwargs)
    finally:  # a load that raised (its report says why) has every message said
        chatty.removeFilter(held)
        missing = set((info or {}).get("missing_keys") or ())
        covered = bool(missing) and missing <= set(restored) and not info.get("mismatched_keys")
        for record in held.records:
            if not (covered and any(name in record.getMessage() for name in missing)):
                chatty.handle(record)
    if covered:
        logger.info("the %d base parameters %s lacks (%s) are the run's trained ones, loaded next", len(missing),
                    source, ", ".join(sorted(missing)[:4]) + (", ..." if len(missing) > 4 else ""))
    return model


def meta_model(model_config, auto_class: str, model_kwargs: Optional[dict] = None):
    """The base as ``auto_class`` builds it with ``model_kwargs`` (a head's size), on the meta device: its modules
    and shapes without memory."""
    import copy

    import transformers

    config = copy.deepcopy(model_config)
    for name, value in (model_kwargs or {}).items():  # from_pretrained takes them as config overrides; from_config not
        setattr(config, name, value)
    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(config)


def linears_outside_backbone(model) -> list[str]:
    """The names of the linear layers outside ``model.base_model`` (the LM head, a classifier head), which a quantized
    base keeps in ``model.dtype``. transformers' default keeps only the output embeddings and the last module whole:
    RoBERTa's ``classifier.out_proj`` but not its ``classifier.dense``, which a trained head needs in floating point."""
    backbone = {id(module) for module in model.base_model.modules()}
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and id(module) not in backbone]


class _EachMessageOnce(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _say_bitsandbytes_casts_once() -> None:
    """bitsandbytes 0.50's 8-bit matmul logs "inputs will be cast from torch.float32 to float16" (or bfloat16) at
    every call of every quantized linear outside training (on CUDA in training too): 364 lines for the evaluations of
    a 4-step run of a 4-layer model on a CPU. Each of its messages is said once per loaded base instead (a filter
    replacing the previous load's)."""
    chatty = logging.getLogger("bitsandbytes.autograd._functions")
    for old in [f for f in chatty.filters if isinstance(f, _EachMessageOnce)]:
        chatty.removeFilter(old)
    chatty.addFilter(_EachMessageOnce())


def _keep_4bit_weights_differentiable(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel the first time the layer runs in eval
    mode without gradients (a generation before training does that) on a CPU with AVX512-BF16, and from then on
    calls that kernel, which has no backward, in training too: the gradient would no longer pass through the layer.
    The layers keep the differentiable matmul instead."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantization_config(cfg: TrainConfig):
    """``model.quantization`` and its options → transformers' BitsAndBytesConfig, or None for "none"."""
    mode = cfg.model.quantization
    if mode == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401  (transformers' own message names no install command)
    except ImportError as err:
        raise ImportError(f"model.quantization {mode!r} needs bitsandbytes: {QUANTIZATION_EXTRA} ({err})") from err
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # The dequantized weights meet the activations in model.dtype unless told otherwise; for "auto" the dtype is not
    # known before loading, and bitsandbytes' default (float32) is always correct.
    compute = cfg.model.quantization_compute_dtype or (None if cfg.model.dtype == "auto" else cfg.model.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode,
                              bnb_4bit_use_double_quant=cfg.model.quantization_double_quant,
                              bnb_4bit_compute_dtype=model_dtype(compute) if compute else None)


def _this_rank_device() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0")))


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


def compile_layers(reft_model, **compile_kwargs) -> None:
    """torch.compile every decoder layer of the ReftModel's base in place (``nn.Module.compile``), the hooks of its
    interventions inside: they trace without graph breaks (the op is a torch.library custom op with fake kernels,
    and the hooks take its functional form when compiling). The loss, the embeddings and the LM head stay eager.
    Each site's hook has a code object of its own (``hooks._own_code``), so that dynamo's limit of 8 compiled
    versions per code object (torch 2.13) is not reached however many layers are intervened."""
    from reft_fast.core.hf import find_decoder_layers

    _, layers = find_decoder_layers(reft_model.model)
    for layer in layers:
        layer.compile(**compile_kwargs)


def build_reft_model(base, cfg: TrainConfig, layers: list[int]):
    """Attach the configured interventions at ``layers`` (twice for a two-sided position spec without share_weights:
    ``positions.intervention_layers``)."""
    iv = cfg.interventions
    layers = intervention_layers(layers, iv.positions, iv.share_weights)
    representations = [{"layer": layer, "component": iv.component, "low_rank_dimension": iv.low_rank_dimension,
                        "intervention": iv.intervention, **iv.options()} for layer in layers]
    reft_config = ReftConfig(representations, positions=iv.positions, share_weights=iv.share_weights)
    return get_reft_model(base, reft_config)
