"""Fused kernels for the frozen base model: liger-kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy.

The base model's own step is most of a ReFT step: liger-kernel 0.8.5 takes the frozen base's forward + backward
(through all 32 layers, one trainable bias) from 0.276 s to 0.199 s, at a peak of 23.9 GiB (measured on one H100 80GB,
2026-11-23: torch 2.11, transformers 5.17, Llama-2-7B shape, random weights, bf16, SDPA, batch 8 × 512). This module
applies liger-kernel to a model that already exists, with one switch:

    apply_fused_base_ops(model, "auto")   # CUDA and an architecture liger supports: on; otherwise off
    apply_fused_base_ops(model, "on")     # on, or a ValueError saying why it cannot be
    apply_fused_base_ops(model, "off")    # nothing

It returns the names of the operations it fused (empty when it did nothing); ``fused_base_ops(model)`` reads them back.

How it patches. liger's per-architecture ``apply_liger_kernel_to_<arch>(model=...)`` rebinds the forward of the
model's own norm and MLP instances and of the model's ``forward`` (the fused linear cross-entropy), which touches only
this model. It also assigns module globals of transformers (``modeling_llama.apply_rotary_pos_emb``, the classes
``LlamaRMSNorm`` and ``LlamaMLP``), which would silently change every other model of that architecture in the process,
including ones built later (a plain reference model in a test, a CPU copy on which liger's Triton kernels cannot run).
So every module global liger changes is put back, except functions, which become a switch: the fused function runs
inside this model's decoder layers (each layer's parts count themselves in a module global), the original elsewhere. The
switch is per call, so gradient checkpointing, which re-runs a layer during backward, recomputes it with the same
fused RoPE (the mark sits on the layer's parts, which the recomputation calls again).

The loss. With the fused linear cross-entropy, a model in training mode given ``labels`` returns the usual shifted,
mean-over-unmasked-tokens LM loss (−100 masks a token) without materializing the [batch, seq, vocab] logits
(``output.logits`` is None); in eval mode, or without labels, it computes logits as before.

ZeRO-3. The fused cross-entropy reads ``lm_head.weight`` outside ``lm_head``'s own forward, where a ZeRO-3 partitioned
weight is empty; "auto" leaves that one operation out when the weight is partitioned, and "on" refuses.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from typing import Optional, Sequence

import torch
from torch import nn

from reft_fast.core.hf import find_decoder_layers

__all__ = ["CAPTURE_BREAKING_OPS", "COMPILE_BREAKING_OPS", "FUSED_OPS", "FUSED_OPS_MODES", "apply_fused_base_ops",
           "fused_base_ops", "fused_ops_unsupported_reason", "fused_ops_wanted"]

logger = logging.getLogger(__name__)

FUSED_OPS_MODES = ("auto", "on", "off")
# Our names for liger's switches; "swiglu" also stands for the gated MLP of architectures whose switch is "geglu".
FUSED_OPS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")
_MLP_SWITCHES = ("swiglu", "geglu")
# liger-kernel 0.8.5 runs its RoPE and SwiGLU through a dispatcher marked torch.compiler.disable
# (liger_kernel/backends/dispatch.py): in a compiled decoder layer each is a graph break that splits the layer's graph,
# while the compiler fuses these elementwise operations itself. With compiled layers, "auto" leaves them out.
COMPILE_BREAKING_OPS = ("rope", "swiglu")
# What a captured step (training.cuda_graphs) cannot hold: liger-kernel 0.8.5's fused linear cross-entropy reads the
# number of labelled tokens with .item() (ops/fused_linear_cross_entropy.py), which a capturing stream refuses.
CAPTURE_BREAKING_OPS = ("fused_linear_cross_entropy",)
_APPLIED_ATTR = "_reft_fast_fused_ops"

# How many parts (attention, MLP, norm) of decoder layers of models patched here are running (see
# _LayerScopedFunction). A plain module global, not a context variable: torch.compile (torch 2.13) cannot trace
# ContextVar.get or .set, and with one the switch broke the graph of every compiled decoder layer of the architecture
# once any model of it had been patched in the process (fullgraph=True raised); dynamo reads and writes a global as
# part of its trace, and a frame it runs eagerly (around a graph break) sees the same value. The mark is per process:
# two threads running at once, one inside a patched model's layer, would both get the fused functions.
_IN_FUSED_LAYER = 0


def _run_in_fused_layer(forward, args, kwargs):
    """``forward(*args, **kwargs)`` with the mark set."""
    global _IN_FUSED_LAYER
    _IN_FUSED_LAYER += 1
    try:
        return forward(*args, **kwargs)
    finally:
        _IN_FUSED_LAYER -= 1


# --------------------------------------------------------------------------------------------------------------------
# Support
# --------------------------------------------------------------------------------------------------------------------
def _liger_apply_functions() -> dict:
    """liger's table model_type -> apply function, or raise ImportError."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN


def _model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


def fused_ops_unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why liger-kernel cannot be applied to ``model`` (liger missing, architecture unknown to it), or None.

    The device is not considered here: see ``apply_fused_base_ops``.
    """
    try:
        table = _liger_apply_functions()
    except ImportError as error:
        return f"liger-kernel is not importable ({error}); install it with `pip install liger-kernel`"
    model_type = _model_type(model)
    if model_type is None:
        return f"{type(model).__name__} has no config.model_type, so liger-kernel cannot tell its architecture"
    if model_type not in table:
        return f"liger-kernel has no kernels for model_type {model_type!r} (it supports {sorted(table)})"
    return None


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _device_reason(device: torch.device, mode: str) -> Optional[str]:
    # "on" also accepts a CPU model under Triton's interpreter, which runs liger's RoPE kernel (tests do that); its
    # RMSNorm, SwiGLU and cross-entropy kernels fail there (the interpreter passes float arguments as Python floats).
    if device.type == "cuda" or (mode == "on" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return (f"the model is on {device}: liger-kernel's Triton kernels need CUDA tensors (on a CPU, Triton's "
            "interpreter, TRITON_INTERPRET=1, runs only its RoPE kernel)")


def _unavailable_reason(model: nn.Module, mode: str) -> Optional[str]:
    """Why the fused operations cannot run on ``model`` in ``mode`` ("auto" or "on"), or None.

    "on" names the architecture first, the device after it when both stand in the way: an architecture liger-kernel
    has no kernels for cannot be fused on any device, and a message naming only the device would send the user to a
    GPU to meet the next refusal there. "auto" looks at the device first and stops there: importing liger-kernel
    (with the peft and bitsandbytes it imports) takes about 4 s on a 2-core CPU (2026-11-29), which a CPU run that
    cannot use it should not pay.
    """
    device_reason = _device_reason(_model_device(model), mode)
    if mode != "on":
        return device_reason or fused_ops_unsupported_reason(model)
    reasons = [reason for reason in (fused_ops_unsupported_reason(model), device_reason) if reason is not None]
    return "; and ".join(reasons) or None


def _lm_head(model: nn.Module) -> Optional[nn.Module]:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _lm_head_is_partitioned(model: nn.Module) -> bool:
    weight = getattr(_lm_head(model), "weight", None)
    return weight is not None and hasattr(weight, "ds_id")  # DeepSpeed marks ZeRO-3 parameters with ds_id


def fused_ops_wanted(mode: str, compiled_layers: bool, captured: bool = False) -> tuple[str, ...]:
    """The operations a run asks ``apply_fused_base_ops`` for in ``mode``: all, except that "auto" with compiled
    decoder layers (``model.compile``) leaves out ``COMPILE_BREAKING_OPS``, and with a captured step
    (``training.cuda_graphs``) ``CAPTURE_BREAKING_OPS``; "on" means every one."""
    if mode != "auto":
        return FUSED_OPS
    left_out = (COMPILE_BREAKING_OPS if compiled_layers else ()) + (CAPTURE_BREAKING_OPS if captured else ())
    return tuple(name for name in FUSED_OPS if name not in left_out)


def fused_base_ops(model: nn.Module) -> tuple[str, ...]:
    """The fused operations ``apply_fused_base_ops`` applied to ``model`` (empty if none)."""
    return getattr(model, _APPLIED_ATTR, ())


# --------------------------------------------------------------------------------------------------------------------
# Keeping liger's module-global patches to the patched model
# --------------------------------------------------------------------------------------------------------------------
class _LayerScopedFunction:
    """Stands in a transformers module for a function liger replaced: the fused one inside patched decoder layers."""

    def __init__(self, original, fused):
        self.original = original
        self.fused = fused
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        return (self.fused if _IN_FUSED_LAYER else self.original)(*args, **kwargs)


def _transformers_modules() -> dict:
    return {name: module for name, module in list(sys.modules.items())
            if name.startswith("transformers.") and module is not None}


def _snapshot(modules: dict) -> dict:
    return {name: dict(vars(module)) for name, module in modules.items()}


def _confine_module_patches(before: dict) -> int:
    """Undo liger's changes to module globals, turning replaced functions into layer-scoped switches.

    Returns how many switches now route to a fused function (0: nothing needs the decoder layers to be marked).
    """
    switches = 0
    for name, module in _transformers_modules().items():
        old = before.get(name)
        if old is None:  # imported by liger's call: nothing of ours lived there before
            continue
        now = vars(module)
        for attr, old_value in old.items():
            new_value = now.get(attr, old_value)
            # Only functions and classes are liger's; attributes added meanwhile are lazy imports, left alone.
            if new_value is old_value or not (inspect.isfunction(old_value) or inspect.isclass(old_value)
                                              or isinstance(old_value, _LayerScopedFunction)):
                continue
            if isinstance(old_value, _LayerScopedFunction):
                setattr(module, attr, old_value)  # already a switch (another model was patched before)
                switches += 1
            elif inspect.isfunction(old_value) and callable(new_value) and not inspect.isclass(new_value):
                setattr(module, attr, _LayerScopedFunction(old_value, new_value))
                switches += 1
            else:  # a class, used when models are built: models built before are patched one by one already
                setattr(module, attr, old_value)
    return switches


def _mark_decoder_layers(model: nn.Module) -> None:
    def in_fused_layer(forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            return _run_in_fused_layer(forward, args, kwargs)

        return run

    # The parts of each layer (attention, MLP, norms) are marked, not the layer: transformers' gradient checkpointing
    # recomputes the layer's class-level forward, around any instance attribute, but calls its parts as modules.
    _, layers = find_decoder_layers(model)
    for layer in layers:
        for part in layer.children():
            part.forward = in_fused_layer(part.forward)  # an instance attribute: only this model's modules


# --------------------------------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------------------------------
def _check_arguments(model, mode: str, ops: Sequence[str]) -> None:
    if mode not in FUSED_OPS_MODES:
        raise ValueError(f"mode must be one of {list(FUSED_OPS_MODES)}, got {mode!r}")
    if isinstance(ops, str):
        raise TypeError(f"ops must be a sequence of operation names such as {list(FUSED_OPS)}, not a string")
    unknown = sorted(set(ops) - set(FUSED_OPS))
    if unknown:
        raise ValueError(f"unknown fused operations {unknown}; expected names from {list(FUSED_OPS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def apply_fused_base_ops(model: nn.Module, mode: str = "auto", *, ops: Sequence[str] = FUSED_OPS) -> tuple[str, ...]:
    """Patch liger-kernel's fused operations into ``model`` (a Hugging Face causal LM, already built and placed).

    Args:
        model: the frozen base model (e.g. ``LlamaForCausalLM``), on its final device; call this before wrapping it
            (``get_reft_model``, PEFT) and before ``deepspeed.initialize``.
        mode: "auto" (on for a CUDA model of an architecture liger-kernel supports, off otherwise), "on" (a
            ValueError when it cannot be applied) or "off".
        ops: which of ``FUSED_OPS`` to fuse (all by default); architectures without one of them skip it, and a
            model without an LM head (a sequence classifier) skips the fused linear cross-entropy.

    Returns:
        The names of the operations now fused, in ``FUSED_OPS`` order (empty when nothing was applied).
    """
    _check_arguments(model, mode, ops)
    if mode == "off":
        return ()
    if fused_base_ops(model):
        return fused_base_ops(model)  # applied before: patching twice would nest the layer markers

    reason = _unavailable_reason(model, mode)
    if reason is not None:
        if mode == "on":
            raise ValueError(f"fused base operations (mode 'on') cannot be applied: {reason}")
        logger.info("fused base operations off: %s", reason)
        return ()
    wanted = set(ops)
    if "fused_linear_cross_entropy" in wanted and _lm_head_is_partitioned(model):
        if mode == "on":
            raise ValueError("fused base operations (mode 'on'): the fused linear cross-entropy reads lm_head.weight "
                             "outside lm_head's forward, where ZeRO-3 leaves only a partition; use mode 'auto' "
                             "(which leaves it out under ZeRO-3) or leave fused_linear_cross_entropy out of ops")
        wanted.discard("fused_linear_cross_entropy")
    if _lm_head(model) is None:
        # liger's fused linear cross-entropy replaces the model's whole forward by a causal LM's (lm_head, next-token
        # loss): a sequence classifier of a supported architecture (task: classification) lost its own forward and
        # raised "no attribute 'lm_head'" at its first step on every GPU. Without an LM head there is nothing to fuse.
        wanted.discard("fused_linear_cross_entropy")

    apply_function = _liger_apply_functions()[_model_type(model)]
    accepted = inspect.signature(apply_function).parameters
    switches = {}
    for name in FUSED_OPS:
        for switch in (_MLP_SWITCHES if name == "swiglu" else (name,)):
            if switch in accepted:
                switches[switch] = name in wanted
    if "cross_entropy" in accepted:
        switches["cross_entropy"] = False  # the fused linear cross-entropy supersedes it (liger refuses both)

    before = _snapshot(_transformers_modules())
    apply_function(model=model, **switches)
    if _confine_module_patches(before):
        _mark_decoder_layers(model)

    applied = tuple(name for name in FUSED_OPS
                    if any(switches.get(s) for s in (_MLP_SWITCHES if name == "swiglu" else (name,))))
    setattr(model, _APPLIED_ATTR, applied)
    logger.info("fused base operations (liger-kernel) on %s: %s", type(model).__name__, ", ".join(applied))
    return applied
