"""Greedy answers to prompts, with or without the interventions: the samples a training run shows before and after,
``reft-fast generate`` and the demo; and batched answers where each prompt names its own ReFT (``mixed_answers``).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from reft_fast.core.hf import text_config_of
from reft_fast.core.positions import intervention_locations
from reft_fast.train.data import encode_prompt

__all__ = ["PromptError", "check_prompts", "generate_answers", "generate_answers_batched", "mixed_answers"]

# Generation runs the layers eager even where ``model.compile`` compiled them for training: with a KV cache dynamo
# guards on each layer's cache slot, so it would compile a version per layer, stop at its recompile limit (8, torch
# 2.13) with a warning, and run the later layers eager anyway; the answers are the same either way.
_eager = torch.compiler.set_stance("force_eager")


class PromptError(ValueError):
    """A prompt that cannot be answered (no tokens, or too long for the model); the message names it."""


def _context_length(model) -> Optional[int]:
    """The most positions the base's config declares (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    config = text_config_of((model.model if hasattr(model, "interventions") else model).config)
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def _encode_checked(model, tokenizer, prompts: Sequence[str], encodings: Sequence[Mapping], max_new_tokens: int,
                    names: Optional[Sequence[str]] = None) -> list[list[int]]:
    """Each prompt's ids (``encode_prompt`` with its encoding), refused with a PromptError naming it when it has no
    tokens (generate would fail on an empty row, or answer from padding alone) or when it and its answer do not fit
    the model's context (learned position tables fail with an IndexError midway, every answer lost)."""
    limit = _context_length(model)
    encoded = []
    for i, (prompt, encoding) in enumerate(zip(prompts, encodings)):
        ids = encode_prompt(tokenizer, prompt, **encoding)
        name = names[i] if names is not None else f"prompt {i + 1} ({prompt[:40]!r})"
        if not ids:
            raise PromptError(f"{name}: encodes to no tokens, so there is nothing to answer")
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise PromptError(f"{name}: {len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                              f"model's {limit} positions (max_position_embeddings): shorten it or answer less")
        encoded.append(ids)
    return encoded


def check_prompts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  chat_template: Optional[bool] = None, system_prompt: Optional[str] = None,
                  names: Optional[Sequence[str]] = None) -> None:
    """Raise a PromptError naming the first prompt that cannot be answered (see ``_encode_checked``): run it on all
    prompts on every rank before sharding them, so that the ranks refuse together instead of waiting for each other."""
    encoding = dict(chat_template=chat_template, system_prompt=system_prompt)
    _encode_checked(model, tokenizer, prompts, [encoding] * len(prompts), max_new_tokens, names)


@torch.no_grad()
@_eager
def generate_answers(model, tokenizer, prompts: Sequence[str], *, positions: Optional[str] = None,
                     share_weights: bool = False, chat_template: Optional[bool] = None,
                     system_prompt: Optional[str] = None, max_new_tokens: int = 64,
                     synced_gpus: bool = False) -> list[str]:
    """Greedy answers, one prompt at a time. ``model`` is a ReftModel (then ``positions`` is required and the
    interventions edit the prompt) or a plain transformers model (answers of the base alone).

    Fused base operations (``model.fused_ops``) are a training-speed feature and nothing here applies them, so
    ``reft-fast generate`` runs the stock transformers base: liger's gains come from the backward pass and from never
    materializing the training logits, while greedy decoding is one token at a time through the KV cache (and its
    fused cross-entropy is inactive in eval mode anyway). A base the training recipe fused keeps its kernels for the
    samples it generates; in eval mode they compute the same logits up to rounding.
    """
    answers = []
    device = next(p for p in model.parameters()).device
    encoding = dict(chat_template=chat_template, system_prompt=system_prompt)
    for ids in _encode_checked(model, tokenizer, prompts, [encoding] * len(prompts), max_new_tokens):
        inputs = {"input_ids": torch.tensor([ids], device=device),
                  "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device)}
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        if synced_gpus:
            kwargs["synced_gpus"] = True
        if hasattr(model, "interventions"):
            locations = intervention_locations([len(ids)], positions, len(model.interventions),
                                               share_weights=share_weights)
            _, out = model.generate(inputs, intervention_locations=locations, use_cache=True, **kwargs)
        else:
            out = model.generate(**inputs, use_cache=True, **kwargs)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
@_eager
def mixed_answers(reft_model, tokenizer, prompts: Sequence[str], adapter_names: Sequence[Optional[str]], *,
                  chat_template: Optional[bool] = None, system_prompt: Optional[str] = None,
                  encodings: Optional[Mapping[Optional[str], dict]] = None, max_new_tokens: int = 64,
                  batch_size: int = 8, names: Optional[Sequence[str]] = None) -> list[str]:
    """Greedy answers, ``batch_size`` prompts per generate call, each prompt edited by the ReFT it names (a name
    loaded into ``reft_model``, or None for the plain base) at the positions of that ReFT's saved spec. Prompts are
    left padded, so every answer starts at the same column; prompts of similar length share a batch (less padding),
    the answers come back in the order of ``prompts``. A prompt is encoded as its ReFT was trained:
    ``encodings[name]`` (``encode_prompt``'s chat_template and system_prompt) where given, else ``chat_template``
    and ``system_prompt``. ``names`` name the prompts in a PromptError (default: their number and start)."""
    if len(adapter_names) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(adapter_names)} adapter names: one per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(p for p in reft_model.model.parameters()).device
    default = dict(chat_template=chat_template, system_prompt=system_prompt)
    encodings = encodings or {}
    all_encoded = _encode_checked(reft_model, tokenizer, prompts,
                                  [encodings.get(name, default) for name in adapter_names], max_new_tokens, names)
    order = sorted(range(len(prompts)), key=lambda i: len(all_encoded[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        encoded = [all_encoded[i] for i in rows]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded], device=device)
        _, out = reft_model.generate({"input_ids": ids, "attention_mask": mask},
                                     adapter_names=[adapter_names[i] for i in rows],
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                     eos_token_id=tokenizer.eos_token_id, use_cache=True)
        for row, i in enumerate(rows):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


@torch.no_grad()
@_eager
def generate_answers_batched(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8,
                             positions: Optional[str] = None, share_weights: bool = False,
                             chat_template: Optional[bool] = None, system_prompt: Optional[str] = None,
                             max_new_tokens: int = 64, synced_gpus: bool = False) -> list[str]:
    """Greedy answers, ``batch_size`` prompts per ``generate`` call, left padded (so every row's next token follows
    its last prompt token), in the order of ``prompts``; the same answers as ``generate_answers`` up to the rounding
    of a padded batch. Prompts of similar length share a batch (less padding). The edits index each row's own
    tokens: the locations are shifted by its number of pad tokens."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(p for p in model.parameters()).device
    encoding = dict(chat_template=chat_template, system_prompt=system_prompt)
    encoded = _encode_checked(model, tokenizer, prompts, [encoding] * len(prompts), max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if synced_gpus:
        kwargs["synced_gpus"] = True
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        lengths = [len(encoded[i]) for i in rows]
        width = max(lengths)
        pads = [width - length for length in lengths]
        ids = torch.tensor([[tokenizer.pad_token_id] * pad + encoded[i] for i, pad in zip(rows, pads)], device=device)
        mask = torch.tensor([[0] * pad + [1] * length for pad, length in zip(pads, lengths)], device=device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if hasattr(model, "interventions"):
            locations = intervention_locations(lengths, positions, len(model.interventions),
                                               share_weights=share_weights, offsets=pads)
            _, out = model.generate(inputs, intervention_locations=locations, **kwargs)
        else:
            out = model.generate(**inputs, **kwargs)
        for row, i in enumerate(rows):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers
