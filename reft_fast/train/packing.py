"""Sequence packing: several whole examples share one row, so a step pays for real tokens, not for padding.

``data.packing: true`` makes the collator (``reft_fast.train.data.ReftDataCollator``) place the examples of each
micro-batch into rows of at most ``data.max_length`` tokens, first-fit decreasing (``pack_rows``). The micro-batch is
the packing window: the step sampler already drew it at random from (seed, step), so the rows are a pure function of
(seed, step) and a resumed run replays them exactly, and every micro-batch holds the same examples as unpacked, so the
mean loss of a step is the same number (both average over the same response tokens).

What each packed example sees is what it sees alone:

* position ids restart at 0 with every example (rotary and learned position embeddings alike);
* attention never crosses examples: a block-diagonal causal mask (``packed_model_inputs``). transformers 5.24 does not
  separate packed examples by itself in training: it infers them from restarting position ids only when no attention
  mask and no cache are given, and a causal LM makes a cache unless ``use_cache=False``; measured on a tiny Llama with
  SDPA (2026-11-28), the second example's logits then differed from running it alone by about 0.2;
* the label of each example's first token is ignored, so the last token of one example never learns to predict the
  first token of the next (alone, the first token has no predecessor and is never a target either);
* its intervention positions are shifted to its place in the row: a row's locations list the positions of all its
  examples, so ``P`` becomes (examples in the row) × (positions per example), −1 padded. The ReftModel is unchanged.

The mask is built on the device from ``segment_ids`` [rows, T] (1, 2, … per example in a row, 0 on padding), so the
host sends T integers per row instead of T² mask entries. Padding tokens attend to the padding before them (and
themselves): no query row is fully masked, which would give NaN in SDPA.

Attention implementations that take no 4-D mask keep the examples apart their own way (``packing_attention``):

* flash attention (``flash_attention_2``/``_3``/``_4``, or a flash kernel loaded from the hub; the ``flash`` extra):
  varlen. The collator lays the rows end to end and lists every segment (each example, then each row's padding) as
  ``cu_seq_lens`` with the longest as a Python int; transformers hands them to ``flash_attn_varlen_func`` as they are
  (``cu_seq_lens_q/k``, ``max_length_q/k``). Given only restarting position ids, it would derive them itself, with a
  ``nonzero`` and a ``.max()`` that synchronize the host in every layer (transformers 5.24,
  modeling_flash_attention_utils.py). An unpacked micro-batch of one row goes the same way, as one segment
  (``loss.one_row_varlen_inputs``);
* ``flex_attention``: position ids alone and no cache; transformers 5.24 then builds a document mask from the
  restarting position ids (masking_utils.find_packed_sequence_indices). Measured on a tiny Llama on this CPU
  (2026-11-29): the second of two packed examples got its solo logits within 2e-7 (SDPA given the same inputs,
  1.5e-7). On a GPU, torch's flex attention kernel needs heads at least 16 wide: the base's loader refuses narrower
  ones (``loading.check_flex_attention_head_dim``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from reft_fast.core.hf import text_config_of

__all__ = ["MASK_ATTENTION", "additive_mask", "block_causal_mask", "pack_rows", "packed_model_inputs",
           "packing_attention", "replay_shares_one_mask", "router_loss_of", "sliding_window_of", "windowed_layers"]

# The attention implementations a block-diagonal 4-D mask reaches unchanged: transformers hands a ready 4-D mask to
# the attention function as is (masking_utils, 5.24); both take it additive (``additive_mask``).
MASK_ATTENTION = ("sdpa", "eager")
MASK_ALIGNMENT = 16  # elements; see additive_mask


def sliding_window_of(config) -> Optional[int]:
    """The window W of a model some or all of whose layers attend only to the last W tokens (Mistral v0.1, Gemma 2
    and 3, Phi-3, Qwen2 with ``use_sliding_window``, ...), else None. Read from the text config: ``sliding_window``,
    and ``layer_types`` where the config lists them (transformers 5), else ``use_sliding_window`` where it has one."""
    text = text_config_of(config)
    window = getattr(text, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    sliding = _sliding_layer_types(text)
    if sliding is not None:
        return window if any(sliding) else None
    return None if getattr(text, "use_sliding_window", True) is False else window


def windowed_layers(config, num_layers: int) -> list[bool]:
    """Which of the model's ``num_layers`` decoder layers attend within ``sliding_window_of(config)``: those the text
    config's ``layer_types`` names sliding, all of them where it lists none, none for a model without a window."""
    if sliding_window_of(config) is None:
        return [False] * num_layers
    sliding = _sliding_layer_types(text_config_of(config))
    return sliding if sliding is not None and len(sliding) == num_layers else [True] * num_layers


def _sliding_layer_types(text) -> Optional[list[bool]]:
    """Per layer, whether the text config's ``layer_types`` names it sliding; None where the config lists none."""
    layer_types = getattr(text, "layer_types", None)
    if not isinstance(layer_types, (list, tuple)):
        return None
    return ["sliding" in str(kind) for kind in layer_types]


def router_loss_of(config) -> bool:
    """Whether the model adds its routers' load-balancing loss (``output_router_logits`` on its config or its text
    config): that loss averages over the tokens the padding mask keeps, so such a model is given its padding mask
    (``loss.causal_model_inputs``)."""
    if config is None:
        return False
    return bool(getattr(config, "output_router_logits", False) or
                getattr(text_config_of(config), "output_router_logits", False))


def replay_shares_one_mask(config, implementation, padding_mask: bool) -> bool:
    """Whether a replayed step (``training.cuda_graphs``) gives a padded batch as one segment per row, so that its
    causal mask is one additive tensor every layer shares (``graphs._as_one_segment``): under SDPA or eager attention
    (``implementation``), for a task whose batches do not keep their ``padding_mask``, and neither for a router loss
    (it needs the padding mask) nor where layers attend within a window (one causal mask would not limit them). Where
    not, transformers builds its own mask for every layer while a stream captures (5.24: under ``is_tracing``,
    ``find_packed_sequence_indices`` returns a segment tensor, which turns ``create_causal_mask``'s is_causal shortcut
    off)."""
    return packing_attention(implementation) == "mask" and not router_loss_of(config) and \
        sliding_window_of(config) is None and not padding_mask


def packing_attention(implementation) -> str | None:
    """How packed examples are kept apart under the attention ``implementation``: "mask" (a block-diagonal 4-D
    mask), "varlen" (flash attention's cumulative sequence lengths), "documents" (flex attention's document mask from
    the position ids), or None where none of these is known to reach it."""
    if implementation in MASK_ATTENTION:
        return "mask"
    if implementation == "flex_attention":
        return "documents"
    if isinstance(implementation, str) and _takes_flash_masks(implementation):
        return "varlen"
    return None


def _takes_flash_masks(implementation: str) -> bool:
    """Whether transformers builds masks for ``implementation`` as for flash attention (a padding mask or none; 5.24
    registers its own flash versions and every flash kernel it loads from the hub so): such an attention takes
    varlen sequence lengths. Where transformers moved that registry, the name decides (it names every flavour of
    flash attention with "flash" in it)."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    except ImportError:
        return "flash" in implementation
    return implementation in ALL_MASK_ATTENTION_FUNCTIONS and \
        ALL_MASK_ATTENTION_FUNCTIONS[implementation] is flash_attention_mask


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of ``lengths`` grouped into rows whose lengths sum to at most ``capacity``.

    Longest first (ties in the given order), each into the first row with room, else a new row: deterministic, and
    never more than 11/9 of the optimal number of rows (+ 1). Within a row the examples keep the order they were placed.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be ≥ 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packed row length "
                         f"{capacity} (data.max_length)")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[rows, 1, T, T] boolean (True = may attend): token q sees token k ≤ q of its own segment only.

    Padding (segment 0) forms one segment of its own, so every query attends to at least itself."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be 2-D [rows, seq], got shape {list(segment_ids.shape)}")
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_segment & causal).unsqueeze(1)


def packed_model_inputs(batch: dict, base_model) -> dict:
    """The base model's inputs for a packed batch (on its device): input_ids, restarting position_ids and what keeps
    the examples apart in the form the model's attention implementation takes (``packing_attention``)."""
    implementation = getattr(base_model.config, "_attn_implementation", None)
    route = packing_attention(implementation)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if route == "varlen":
        lengths, longest = batch["cu_seq_lens"], batch["max_segment_length"]
        return {**inputs, "cu_seq_lens_q": lengths, "cu_seq_lens_k": lengths, "max_length_q": longest,
                "max_length_k": longest, "use_cache": False}
    if route == "documents":  # a cache would make transformers skip the document mask
        return {**inputs, "use_cache": False}
    if route is None:
        raise ValueError(f"data.packing needs model.attn_implementation to be one of {list(MASK_ATTENTION)}, "
                         f"flex_attention or a flash attention (packed examples must not attend to each other), the "
                         f"model uses {implementation!r}")
    return {**inputs, "attention_mask": additive_mask(block_causal_mask(batch["segment_ids"]), base_model)}


def additive_mask(allowed: torch.Tensor, base_model) -> torch.Tensor:
    """``allowed`` as the additive mask both SDPA and eager attention take: 0 where a token may attend, the dtype's
    lowest value elsewhere, in the dtype of the hidden states (the embeddings'), which SDPA needs it in.

    Given a boolean mask, torch's SDPA converts it to the query's dtype at every call, and each layer's attention
    keeps its own converted copy for backward: measured on this CPU (torch 2.13, 2026-11-29, tiny Llama, 4 rows of
    512 tokens, fp32) a packed step took 4 MiB more per layer than with one additive mask, which every layer shares.
    At 4 rows of 4096 tokens in bf16 that copy is 128 MiB per layer.

    Each mask row starts at a multiple of 16 elements (the rows are allocated that long and sliced to T): on CUDA,
    torch's SDPA hands a mask whose strides are not multiples of its alignment (8 or 16 elements, by release) to the
    memory-efficient kernel as a padded copy, made at every call (aten's attention.cpp, ``preprocess_mask``)."""
    dtype = base_model.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    length = allowed.shape[-1]
    rows = torch.zeros(*allowed.shape[:-1], -(-length // MASK_ALIGNMENT) * MASK_ALIGNMENT, dtype=dtype,
                       device=allowed.device)
    return rows[..., :length].masked_fill_(~allowed, torch.finfo(dtype).min)
