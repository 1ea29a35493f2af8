"""The loss of a batch through the DeepSpeed engine, the batch cut to the labelled tail first, and the mean loss over
an evaluation set.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from reft_fast.train.distributed import all_reduce_sum, rank_chunks
from reft_fast.train.packing import packed_model_inputs, packing_attention, router_loss_of

__all__ = ["accepts_logits_to_keep", "causal_model_inputs", "forward_loss", "mean_eval_loss", "model_loss",
           "one_row_varlen_inputs", "to_device", "trim_to_labels"]


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device``, copied without waiting (truly so from pinned memory), except the
    intervention locations: the ReftModel checks their values on the host, where reading them is free, and then moves
    them itself (once per batch, without waiting). Moved here, they would reach it unchecked or cost a host sync."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k != "intervention_locations" else v
            for k, v in batch.items()}


def accepts_logits_to_keep(base) -> bool:
    """Whether the base's forward can compute logits for the last K positions only (``trim_to_labels`` needs that)."""
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def trim_to_labels(batch: dict, multiple: Optional[int] = None) -> dict:
    """Keep only the tail of the sequence that holds labels for the LM head (on the CPU batch, before the transfer).

    The head and the loss over the vocabulary cost as much as several decoder layers on small models; positions before
    the first response token carry no label, so their logits are never needed. The base computes logits for the last
    K positions only (``logits_to_keep``) and the labels are cut to the same K columns: transformers' shift inside the
    loss then pairs them exactly as on the full sequence, and the mean is over the same tokens.

    ``multiple``: K rounded up to a multiple of it (captured steps, ``train.graphs``: one graph per batch layout, and
    K is part of the layout); the extra columns hold labels −100.
    """
    labelled = (batch["labels"] != -100).any(dim=0).nonzero()
    if labelled.numel() == 0:
        return batch
    keep = batch["labels"].shape[1] - int(labelled[0]) + 1
    if multiple:
        keep = -(-keep // multiple) * multiple
    if keep >= batch["labels"].shape[1]:
        return batch
    return {**batch, "labels": batch["labels"][:, -keep:], "logits_to_keep": keep}


def causal_model_inputs(batch: dict, base_model) -> dict:
    """The causal-LM base's inputs for a collated batch on its device: a packed batch's (``segment_ids``: its
    block-diagonal mask, built here, on the device), else ``input_ids`` alone, with no padding mask.

    The collators pad on the right and label the padding −100. Under causal attention a real token never attends to
    the padding after it, and the padding's outputs reach no loss (an ignored label's gradient is exactly 0), so a
    padding mask changes no real token's logit or any gradient. Given one, transformers (5.24) makes a [B, 1, T, T]
    mask for SDPA, which torch converts to the query's dtype and keeps for backward in every layer (measured on this
    CPU, 2026-11-29, tiny Llama, 2 rows of 384 tokens, 6 layers: 14.3 MiB a step against 7.5 MiB without), and on
    CUDA it rules out the flash kernel and makes transformers repeat k and v for every query head
    (``use_gqa_in_sdpa``).

    Under flash attention (``packing.packing_attention``: "varlen") a single row also gets its varlen lengths
    (``one_row_varlen_inputs``); a mixture of experts given its padding mask (below) does not: transformers then unpads
    by the mask, reading it on the host in every layer (5.24, ``_upad_input``)."""
    config = getattr(base_model, "config", None)
    if "segment_ids" in batch:
        return packed_model_inputs(batch, base_model)
    if router_loss_of(config):
        # a mixture of experts that adds its routers' load-balancing loss, which averages over the tokens the mask
        # keeps (transformers' load_balancing_loss_func): without it the padding would count
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if batch["input_ids"].shape[0] == 1 and \
            packing_attention(getattr(config, "_attn_implementation", None)) == "varlen" and \
            _forward_takes_varlen(type(base_model)):
        return one_row_varlen_inputs(batch["input_ids"])
    return {"input_ids": batch["input_ids"]}


@functools.lru_cache(maxsize=None)
def _forward_takes_varlen(model_class: type) -> bool:
    """Whether a model class's forward takes the varlen arguments (by name, or as ``**kwargs``, as every causal LM of
    transformers 5.24 does): a model's own code (``trust_remote_code``) may not, and then gets the row as before."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cu_seq_lens_q" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def one_row_varlen_inputs(input_ids: torch.Tensor) -> dict:
    """A one-row batch's inputs under flash attention: its one sequence as varlen lengths, [0, T] and T.

    Given one row without them, transformers 5.24 (modeling_flash_attention_utils.py, ``_is_packed_sequence``) reads
    the position ids on the host in every layer, to see whether the row packs several sequences; given all four
    varlen arguments and no mask it skips that and runs ``flash_attn_varlen_func`` on the flattened row: the same
    causal attention (tests/test_flash_one_row.py, 2026-11-30: one read per layer before, none now). The lengths are
    made on the device (a tensor from a Python list would be a host-to-device copy that waits); T is the row's width,
    fixed per captured layout (``train.graphs``). Left to transformers: its mask code reads the position ids once
    per forward when there is no cache (``masking_utils.find_packed_sequence_indices``), which it skips while a stream
    captures; the cache is left as the config says (the recipe's loader turns it off), as it changes no attention."""
    T = input_ids.shape[1]
    lengths = torch.arange(0, 2 * T, T, dtype=torch.int32, device=input_ids.device)
    return {"input_ids": input_ids, "cu_seq_lens_q": lengths, "cu_seq_lens_k": lengths, "max_length_q": T,
            "max_length_k": T}


def forward_loss(engine, batch: dict) -> torch.Tensor:
    """The mean response-token loss of a collated batch (on the engine's device), as a device tensor."""
    return model_loss(engine, batch, engine.module.model)


def model_loss(reft_model, batch: dict, base_model=None) -> torch.Tensor:
    """``forward_loss`` through ``reft_model`` (a ReftModel, or the DeepSpeed engine around one with ``base_model``
    given): a captured step (``train.graphs``) calls the ReftModel itself, the engine's forward staying out of the
    graph."""
    base = causal_model_inputs(batch, reft_model.model if base_model is None else base_model)
    extra = {"logits_to_keep": batch["logits_to_keep"]} if "logits_to_keep" in batch else {}
    _, out = reft_model(base, intervention_locations=batch["intervention_locations"], labels=batch["labels"], **extra)
    return out.loss


@torch.no_grad()
def mean_eval_loss(engine, dataset, collator, micro: int, rank: int, world: int, trim: bool = False) -> float:
    """Mean response-token loss over the whole dataset. Every rank runs the same number of forwards (ZeRO-3 gathers
    parameters collectively, ``rank_chunks``): the last chunk is padded with a zero-weight copy of an example. The
    weighted losses add up on the device; the only host sync is reading the reduced total."""
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens_total = 0
    for mine in rank_chunks(len(dataset), micro, rank, world):
        batch = collator([dataset[i] for i in (mine or [0])])
        batch = trim_to_labels(batch) if trim else batch
        # The tokens the mean loss averages over, counted on the host batch before it moves.
        tokens = int((batch["labels"][:, 1:] != -100).sum()) if mine else 0
        loss = forward_loss(engine, to_device(batch, engine.device))
        loss_sum += loss.detach().double() * tokens
        tokens_total += tokens
    total_loss, total_tokens = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(tokens_total)])).tolist()
    engine.train()
    return total_loss / total_tokens
