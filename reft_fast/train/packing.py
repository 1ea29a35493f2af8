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

flash-attn (not installed by default) would not need the mask: transformers' flash-attention path builds varlen
``cu_seqlens`` from restarting ``position_ids`` when no attention mask is passed, so ``packed_model_inputs`` would
return the position ids alone for ``flash_attention_2``; until that path is tested here, packing refuses it.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["PACKING_ATTENTION", "pack_rows", "packed_model_inputs", "block_causal_mask"]

# The attention implementations a block-diagonal 4-D mask reaches unchanged: transformers hands a ready 4-D mask to
# the attention function as is (masking_utils, 5.24); SDPA takes it as a boolean mask, eager adds it to the scores.
PACKING_ATTENTION = ("sdpa", "eager")


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
    """The base model's inputs for a packed batch (on its device): input_ids, restarting position_ids and the
    block-diagonal causal mask in the form the model's attention implementation takes."""
    implementation = getattr(base_model.config, "_attn_implementation", None)
    if implementation not in PACKING_ATTENTION:
        raise ValueError(f"data.packing needs model.attn_implementation in {list(PACKING_ATTENTION)} (a block-diagonal "
                         f"mask keeps packed examples apart), the model uses {implementation!r}")
    allowed = block_causal_mask(batch["segment_ids"])
    if implementation == "eager":  # eager attention adds the mask to the scores
        dtype = next(base_model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        mask = allowed
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": mask}
