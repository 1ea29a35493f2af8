"""pyreft's data names with its arguments and item format: datasets, collators, supervised data modules, TaskType.

Layout. Every item carries ``intervention_locations`` as nested lists [n_interventions][positions] (pyreft's), so the
collated batch holds one int64 tensor **[batch, n_interventions, positions]** (−1 = no position). That is the one
layout the pyreft trainers (``reft_fast.compat.trainer``) consume; they transpose it to the model's
[n_interventions, batch, positions] on the device. reft_fast's own engine uses ``reft_fast.train.data``'s collator,
which produces the model's layout directly; the trainers refuse it by type rather than guess from the shape.

Same tokens as pyreft. The data modules tokenize ``prompt + response (+ eos)`` as one text and mask the first
``len(tokenizer(prompt))`` labels, as pyreft does; the ``ReftDataset`` family keeps pyreft's "sink": one pad token
before the inputs (``pad_mode="first"``) or after them (``"last"``), with the locations shifted past it.

Deliberate differences (each changes nothing in the loss, and each avoids editing a real token twice):
* A slot without a position stays −1 ("edits nothing"). pyreft points it at the sink token (or, in
  ``make_multiple_position_supervised_data_module``, at the first response token) and edits that token once per slot.
  The sink is masked out of attention and carries no label, so editing it changes nothing else.
* The attention mask is 0 on the sink only. pyreft masks every token equal to the pad id, which also hides real eos
  tokens when the pad token is the eos token.
* pyreft's ``subspaces`` field (per-example subspace selection) is refused with a message; reft_fast interventions
  always edit their whole low-rank subspace.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from reft_fast.core.positions import get_intervention_locations as _locations_for_prompt, parse_positions
from reft_fast.train.data import IGNORE_INDEX

__all__ = ["TaskType", "ReftDataCollator", "ReftDataset", "ReftSupervisedDataset", "ReftGenerationDataset",
           "ReftRawDataset", "ReftPreferenceDataset", "ReftRewardDataset", "ReftRewardCollator",
           "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module"]

# The Stanford Alpaca prompt formats (github.com/tatsu-lab/stanford_alpaca, train.py), which pyreft's supervised and
# preference datasets wrap instructions in.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n%s\n\n### Input:\n%s\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n%s\n\n### Response:\n")

SUBSPACES_UNSUPPORTED = ("pyreft's per-example 'subspaces' are not supported: every reft_fast intervention edits its "
                          "whole low-rank subspace (use one intervention per subspace instead)")


class TaskType(str, enum.Enum):
    """pyreft's task kinds (scripts pass them around; the trainer class decides the loss)."""

    SEQ_CLS = "SEQ_CLS"
    CAUSAL_LM = "CAUSAL_LM"


# --------------------------------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------------------------------
def _pad_locations(per_item: list) -> list:
    """Items' [n][P_i] lists → the same lists −1-padded to one width P, so that any collator can stack them."""
    width = max((len(row) for locations in per_item for row in locations), default=0)
    return [[list(row) + [-1] * (width - len(row)) for row in locations] for locations in per_item]


def pyreft_batch_locations(locations: Any, batch_size: int) -> torch.Tensor:
    """A collated ``intervention_locations`` (tensor or nested lists) as int64 [batch, n_interventions, positions]."""
    if not isinstance(locations, torch.Tensor):
        locations = torch.as_tensor(_pad_locations(locations))
    if locations.dtype.is_floating_point or locations.dtype == torch.bool or locations.dim() != 3:
        raise ValueError("intervention_locations must be integers laid out [batch, n_interventions, positions] "
                         f"(pyreft's), got dtype {locations.dtype} shape {list(locations.shape)}")
    if locations.shape[0] != batch_size:
        raise ValueError(f"intervention_locations has {locations.shape[0]} rows but the batch has {batch_size} "
                         "examples: pyreft's layout is [batch, n_interventions, positions]")
    return locations.long()


def prompt_locations(last_position: int, num_interventions: int, first_n: int, last_n: int,
                      share_weights: bool) -> list[list[int]]:
    """pyreft's per-prompt lists for a prompt whose positions end before ``last_position``; missing slots are −1."""
    if last_position < 1:
        raise ValueError(f"a prompt with last_position {last_position} has no token to intervene on")
    return _locations_for_prompt(last_position=last_position, num_interventions=num_interventions,
                                 first_n=first_n, last_n=last_n, share_weights=share_weights)


# --------------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ReftDataCollator:
    """pyreft's collator: wraps a Hugging Face collator (``DataCollatorForSeq2Seq``, ``DataCollatorWithPadding``, ...)
    and adds the items' ``intervention_locations`` as one int64 tensor [batch, n_interventions, positions]."""

    data_collator: Callable

    def __call__(self, instances: Sequence[dict]) -> dict:
        if not callable(self.data_collator):
            raise TypeError(f"ReftDataCollator(data_collator=...) needs a callable collator, got "
                            f"{type(self.data_collator).__name__}")
        instances = [dict(item) for item in instances]
        if any("intervention_locations" not in item for item in instances):
            raise ValueError("every item must carry 'intervention_locations' ([n_interventions][positions] lists)")
        if any("subspaces" in item for item in instances):
            raise ValueError(SUBSPACES_UNSUPPORTED)
        padded = _pad_locations([item["intervention_locations"] for item in instances])
        for item, locations in zip(instances, padded):
            item["intervention_locations"] = locations
        batch = self.data_collator(instances)
        batch["intervention_locations"] = pyreft_batch_locations(batch["intervention_locations"],
                                                                 batch["input_ids"].shape[0])
        return batch


@dataclass
class ReftRewardCollator:
    """pyreft's reward-model collator: each item's chosen and rejected conversations become two consecutive rows
    (chosen first) with their rewards (1.0 / 0.0 when the item has none)."""

    tokenizer: Any
    padding: Union[bool, str] = True
    max_length: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None
    return_tensors: str = "pt"

    def __call__(self, features: Sequence[dict]) -> dict:
        if any("subspaces" in feature for feature in features):
            raise ValueError(SUBSPACES_UNSUPPORTED)
        rows = []
        for feature in features:
            for side, default_reward in (("chosen", 1.0), ("rejected", 0.0)):
                rows.append({"input_ids": feature[f"{side}_output"],
                             "attention_mask": feature[f"{side}_output_mask"],
                             "reward": feature.get(f"{side}_reward", default_reward),
                             "intervention_locations": feature["intervention_locations"]})
        padded = _pad_locations([row["intervention_locations"] for row in rows])
        for row, locations in zip(rows, padded):
            row["intervention_locations"] = locations
        batch = self.tokenizer.pad(rows, padding=self.padding, max_length=self.max_length,
                                   pad_to_multiple_of=self.pad_to_multiple_of, return_tensors=self.return_tensors)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "reward": batch["reward"],
                "intervention_locations": pyreft_batch_locations(batch["intervention_locations"],
                                                                 batch["input_ids"].shape[0])}


def _seq2seq_collator(tokenizer, model) -> ReftDataCollator:
    import transformers

    return ReftDataCollator(data_collator=transformers.DataCollatorForSeq2Seq(
        tokenizer=tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, padding="longest"))


# --------------------------------------------------------------------------------------------------------------------
# Supervised data modules
# --------------------------------------------------------------------------------------------------------------------
class _ItemList(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def truncation_options(tokenizer) -> dict:
    """pyreft truncates every text at ``tokenizer.model_max_length``; a tokenizer loaded without one reports a huge
    sentinel (about 1e30) that the Rust tokenizers cannot take, and there is nothing to truncate at then."""
    limit = tokenizer.model_max_length
    return {"max_length": limit, "truncation": True} if limit is not None and limit < 2**31 else {}


def _tokenize_pair(tokenizer, prompt: str, response: str, nonstop: bool) -> tuple[list, list, int]:
    """(input_ids, labels, prompt length) as pyreft makes them: ``prompt + response (+ eos)`` tokenized as one text,
    the first ``len(tokenizer(prompt))`` labels masked, both truncated at ``tokenizer.model_max_length``."""
    if not nonstop and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token to end each response with (pass nonstop=True to add none)")
    limit = truncation_options(tokenizer)
    prompt_ids = tokenizer(prompt, **limit)["input_ids"]
    input_ids = tokenizer(prompt + response + ("" if nonstop else tokenizer.eos_token), **limit)["input_ids"]
    if len(input_ids) <= len(prompt_ids):
        raise ValueError(f"a {len(prompt_ids)}-token prompt leaves no response token within the tokenizer's "
                         f"model_max_length={tokenizer.model_max_length} (prompt {prompt[:60]!r}); raise "
                         "model_max_length or shorten the prompt")
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(input_ids[len(prompt_ids):])
    return list(input_ids), labels, len(prompt_ids)


def _supervised_module(tokenizer, model, inputs, outputs, nonstop, locations_of: Callable[[int], list]) -> dict:
    if len(inputs) != len(outputs):
        raise ValueError(f"inputs has {len(inputs)} prompts but outputs has {len(outputs)} responses")
    items = []
    for prompt, response in zip(inputs, outputs):
        input_ids, labels, prompt_length = _tokenize_pair(tokenizer, prompt, response, nonstop)
        items.append({"input_ids": input_ids, "labels": labels,
                      "intervention_locations": locations_of(prompt_length)})
    return {"train_dataset": _ItemList(items), "eval_dataset": None,
            "data_collator": _seq2seq_collator(tokenizer, model)}


def make_last_position_supervised_data_module(tokenizer, model, inputs: Sequence[str], outputs: Sequence[str],
                                              num_interventions: int = 1, nonstop: bool = False) -> dict:
    """pyreft's helper: every intervention edits the last prompt token. ``inputs`` are already-formatted prompts
    (no template is applied), ``outputs`` their responses, each ended by eos unless ``nonstop``."""
    return _supervised_module(tokenizer, model, inputs, outputs, nonstop,
                              lambda prompt_length: [[prompt_length - 1]] * num_interventions)


def make_multiple_position_supervised_data_module(tokenizer, model, inputs: Sequence[str], outputs: Sequence[str],
                                                  positions: str = "f1+l1", num_interventions: int = 1,
                                                  nonstop: bool = False, share_weights: bool = False) -> dict:
    """pyreft's helper: the interventions edit the first/last prompt tokens named by ``positions`` ("f1+l1"); with
    two sides and not ``share_weights``, the first half of the interventions take the first tokens and the second half
    the last ones."""
    first_n, last_n = parse_positions(positions)
    return _supervised_module(
        tokenizer, model, inputs, outputs, nonstop,
        lambda prompt_length: prompt_locations(prompt_length, num_interventions, first_n, last_n, share_weights))
