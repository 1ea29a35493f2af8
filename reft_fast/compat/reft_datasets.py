"""pyreft's dataset classes with its constructor arguments, hooks and item format (see ``reft_fast.compat.data`` for
the location layout and the deliberate differences).

``ReftDataset`` is the base pyreft users subclass: it loads the rows (``dataset=`` as given, else a Hugging Face
dataset named by ``task``/``data_path`` or a .json file, which needs the ``datasets`` package), calls
``preprocess(kwargs)``, ``postprocess(kwargs)``, then for every row ``tokenize(row)`` → (fields, last_position) and
``compute_intervention_and_subspaces``, which adds ``intervention_locations`` (pyreft's positions for a prompt ending
before ``last_position``), the sink token and the attention mask. Required keyword arguments are pyreft's:
``position`` ("f7+l7") and ``num_interventions``; ``share_weights`` is optional.
"""

from __future__ import annotations

import copy
import random
from typing import Any, Optional

import torch

from reft_fast.compat.data import (ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, SUBSPACES_UNSUPPORTED,
                                   prompt_locations, truncation_options)
from reft_fast.core.positions import parse_positions
from reft_fast.train.data import IGNORE_INDEX

__all__ = ["ReftDataset", "ReftSupervisedDataset", "ReftGenerationDataset", "ReftPreferenceDataset",
           "ReftRewardDataset", "ReftRawDataset"]


def _load_rows(task: Optional[str], data_path: Optional[str], split: str):
    try:
        import datasets
    except ImportError:
        raise ImportError("loading a dataset by name or from a .json file needs the `datasets` package "
                          "(pip install datasets), or pass the rows as dataset=[{...}, ...]") from None
    if data_path is not None and data_path.endswith(".json"):
        return datasets.load_dataset("json", data_files=data_path, split="train")
    if data_path is None:
        return datasets.load_dataset(task, split=split)
    return datasets.load_dataset(task, data_path, split=split)


def _subsample(rows, n: Optional[int], seed: int):
    """``n`` rows drawn with ``seed`` (a Hugging Face dataset's own shuffle, as pyreft; a seeded shuffle otherwise)."""
    if n is None:
        return rows
    if hasattr(rows, "shuffle") and hasattr(rows, "select"):
        return rows.shuffle(seed=seed).select(range(n))
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", **truncation_options(tokenizer))["input_ids"][0]


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("pyreft's datasets add one pad token as an intervention sink: give the tokenizer a pad token "
                         "(e.g. tokenizer.pad_token = tokenizer.unk_token)")
    return tokenizer.pad_token_id


def _location_options(kwargs: dict) -> tuple[int, bool]:
    if "num_interventions" not in kwargs:
        raise ValueError("pass num_interventions=<number of interventions of the model> (pyreft's keyword)")
    return kwargs["num_interventions"], bool(kwargs.get("share_weights", False))


def _add_sink(tokenizer, item: dict, locations: list, pad_mode: str, fields_to_pad, fields_to_mask) -> list:
    """Add pyreft's sink token to ``fields_to_pad`` (before or after the tokens), shift the real locations past a
    leading sink, and write a ``<field>_mask`` (or ``attention_mask`` for one field) that is 0 on the sink only."""
    if pad_mode not in ("first", "last"):
        raise ValueError(f"pad_mode must be 'first' or 'last' (where pyreft's sink token goes), got {pad_mode!r}")
    for field in fields_to_pad:
        if field in item:
            fill = IGNORE_INDEX if field == "labels" else _pad_id(tokenizer)
            sink = torch.tensor([fill], dtype=torch.as_tensor(item[field]).dtype)
            pieces = (sink, torch.as_tensor(item[field])) if pad_mode == "first" else (torch.as_tensor(item[field]),
                                                                                      sink)
            item[field] = torch.cat(pieces)
    if pad_mode == "first":
        locations = [[p + 1 if p >= 0 else -1 for p in row] for row in locations]
    for field in fields_to_mask:
        mask = torch.ones(len(item[field]), dtype=torch.int)
        if field in fields_to_pad:
            mask[0 if pad_mode == "first" else -1] = 0
        item["attention_mask" if len(fields_to_mask) == 1 else f"{field}_mask"] = mask
    return locations


class ReftDataset(torch.utils.data.Dataset):
    """pyreft's dataset base class: subclasses implement ``tokenize`` (and may override ``preprocess``,
    ``postprocess``, ``get_intervention_locations``, or set ``pad_mode``, ``fields_to_pad``, ``fields_to_mask`` in
    ``preprocess``)."""

    def __init__(self, task: str, data_path: Optional[str], tokenizer, data_split: str = "train", dataset=None,
                 seed: int = 42, max_n_example: Optional[int] = None, **kwargs):
        super().__init__()
        if "position" not in kwargs:
            raise ValueError("pass position=<spec such as 'f7+l7' or 'l1'> (pyreft's keyword)")
        self.tokenizer, self.task, self.data_path, self.data_split = tokenizer, task, data_path, data_split
        self.dataset, self.seed, self.max_n_example = dataset, seed, max_n_example
        self.first_n, self.last_n = parse_positions(kwargs["position"])
        self.pad_mode = "first"
        self.fields_to_pad = ["input_ids", "labels"]
        self.fields_to_mask = ["input_ids"]
        self.preprocess(kwargs)
        self.task_dataset = self.load_dataset()
        self.postprocess(kwargs)
        self.result = []
        for index, row in enumerate(self.task_dataset):
            fields, last_position = self.tokenize(row)
            self.result.append(self.compute_intervention_and_subspaces(index, row, fields, last_position, **kwargs))

    def tokenize(self, data_item: dict) -> tuple[dict, int]:
        """Tokenize one row: (fields such as input_ids and labels, the prompt end the positions count back from)."""
        raise NotImplementedError(f"{type(self).__name__} must implement tokenize(data_item)")

    def preprocess(self, kwargs: dict) -> None:
        """Read the subclass's own keyword arguments (before loading)."""

    def postprocess(self, kwargs: dict) -> None:
        """Adjust ``self.task_dataset`` after loading."""

    def load_dataset(self):
        rows = self.dataset if self.dataset is not None else _load_rows(self.task, self.data_path, self.data_split)
        rows = _subsample(rows, self.max_n_example, self.seed)
        self.raw_dataset = rows if self.data_split != "train" else None  # pyreft keeps the raw rows of eval splits
        return rows

    def get_intervention_locations(self, **kwargs) -> list[list[int]]:
        num_interventions, share_weights = _location_options(kwargs)
        return prompt_locations(kwargs["last_position"], num_interventions, kwargs["first_n"], kwargs["last_n"],
                                 share_weights)

    def compute_intervention_and_subspaces(self, id: int, data_item: dict, result: dict, last_position: int,
                                           **kwargs) -> dict:
        if "subspaces" in data_item:
            raise ValueError(SUBSPACES_UNSUPPORTED)
        options = {k: v for k, v in kwargs.items() if k not in ("last_position", "first_n", "last_n", "pad_mode")}
        locations = self.get_intervention_locations(last_position=last_position, first_n=self.first_n,
                                                    last_n=self.last_n, pad_mode=self.pad_mode, **options)
        result["intervention_locations"] = _add_sink(self.tokenizer, result, locations, self.pad_mode,
                                                     self.fields_to_pad, self.fields_to_mask)
        result["id"] = id
        return result

    def __len__(self) -> int:
        return len(self.result)

    def __getitem__(self, index: int) -> dict:
        return copy.deepcopy(self.result[index])


def _prompt_and_labels(tokenizer, prompt: str, full_text: str) -> tuple[dict, int]:
    """input_ids of ``full_text`` with labels masked over the prompt's tokens; the positions end before the prompt's
    last token (pyreft's supervised datasets pass ``prompt_len − 1``)."""
    prompt_length = len(_ids(tokenizer, prompt))
    input_ids = _ids(tokenizer, full_text)
    labels = input_ids.clone()
    labels[:prompt_length] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}, prompt_length - 1


def _alpaca_prompt(row: dict, instruction_field: str, input_field: str) -> str:
    if row.get(input_field, "") == "":
        return ALPACA_PROMPT_NO_INPUT % row[instruction_field]
    return ALPACA_PROMPT_WITH_INPUT % (row[instruction_field], row[input_field])


class ReftSupervisedDataset(ReftDataset):
    """Alpaca-style rows (``instruction_field``, ``input_field``, ``output_field`` keywords) in the Alpaca prompt."""

    def __init__(self, task: str, data_path: Optional[str], tokenizer, data_split: str = "train", dataset=None,
                 seed: int = 42, max_n_example: Optional[int] = None, no_stop: bool = False, **kwargs):
        self.no_stop = no_stop
        super().__init__(task, data_path, tokenizer, data_split=data_split, dataset=dataset, seed=seed,
                         max_n_example=max_n_example, **kwargs)

    def preprocess(self, kwargs: dict) -> None:
        self.input_field = kwargs["input_field"]
        self.output_field = kwargs["output_field"]
        self.instruction_field = kwargs["instruction_field"]

    def tokenize(self, data_item: dict) -> tuple[dict, int]:
        prompt = _alpaca_prompt(data_item, self.instruction_field, self.input_field)
        text = prompt + data_item[self.output_field] + ("" if self.no_stop else self.tokenizer.eos_token)
        return _prompt_and_labels(self.tokenizer, prompt, text)


class ReftGenerationDataset(ReftDataset):
    """Rows with a prompt and a completion (``prompt_field``, ``completion_field`` keywords), used as they are."""

    def preprocess(self, kwargs: dict) -> None:
        self.prompt_field = kwargs["prompt_field"]
        self.completion_field = kwargs["completion_field"]

    def tokenize(self, data_item: dict) -> tuple[dict, int]:
        prompt = data_item[self.prompt_field]
        return _prompt_and_labels(self.tokenizer, prompt,
                                  prompt + data_item[self.completion_field] + self.tokenizer.eos_token)


class ReftPreferenceDataset(ReftDataset):
    """Rows (instruction, input, chosen, rejected): the input is the prompt followed by the rejected answer, the
    labels the prompt followed by the chosen one, so the intervention learns to steer from rejected to chosen."""

    def preprocess(self, kwargs: dict) -> None:
        self.input_field = kwargs["input_field"]
        self.instruction_field = kwargs["instruction_field"]
        self.chosen_output_field = kwargs["chosen_output_field"]
        self.rejected_output_field = kwargs["rejected_output_field"]

    def tokenize(self, data_item: dict) -> tuple[dict, int]:
        prompt = _alpaca_prompt(data_item, self.instruction_field, self.input_field)
        prompt_ids = _ids(self.tokenizer, prompt)
        if self.data_split != "train":
            return {"input_ids": prompt_ids}, len(prompt_ids)
        eos = self.tokenizer.eos_token
        input_ids = _ids(self.tokenizer, prompt + data_item[self.rejected_output_field] + eos)
        labels = _ids(self.tokenizer, prompt + data_item[self.chosen_output_field] + eos)
        labels[: len(prompt_ids)] = IGNORE_INDEX
        length = max(len(input_ids), len(labels))
        input_ids = torch.cat([input_ids, input_ids.new_full((length - len(input_ids),), _pad_id(self.tokenizer))])
        labels = torch.cat([labels, labels.new_full((length - len(labels),), IGNORE_INDEX)])
        return {"input_ids": input_ids, "labels": labels}, len(prompt_ids)


class ReftRewardDataset(ReftDataset):
    """Pairs of chat conversations (``conv_A_field``, ``conv_B_field``; optional ``prompt_field`` and reward fields):
    both are tokenized with the chat template, the better one first; the positions end at the last token the two
    share (plus one)."""

    def preprocess(self, kwargs: dict) -> None:
        self.conv_A_field, self.conv_B_field = kwargs["conv_A_field"], kwargs["conv_B_field"]
        self.prompt_field = kwargs.get("prompt_field")
        self.conv_A_reward_field = kwargs.get("conv_A_reward_field")
        self.conv_B_reward_field = kwargs.get("conv_B_reward_field")
        self.fields_to_pad = ["chosen_output", "rejected_output"]
        self.fields_to_mask = ["chosen_output", "rejected_output"]

    def _render(self, conversation: Any, prompt: Optional[str]) -> str:
        if prompt is not None:
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": conversation}]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        return text.replace(self.tokenizer.bos_token, "") if self.tokenizer.bos_token else text

    def tokenize(self, data_item: dict) -> tuple[dict, int]:
        prompt = data_item[self.prompt_field] if self.prompt_field is not None else None
        chosen = self._render(data_item[self.conv_A_field], prompt)
        rejected = self._render(data_item[self.conv_B_field], prompt)
        result = {}
        if self.conv_A_reward_field is not None:
            rewards = (data_item[self.conv_A_reward_field], data_item[self.conv_B_reward_field])
            if rewards[0] < rewards[1]:
                chosen, rejected, rewards = rejected, chosen, rewards[::-1]
            result["chosen_reward"], result["rejected_reward"] = rewards
        result["chosen_output"] = _ids(self.tokenizer, chosen)
        result["rejected_output"] = _ids(self.tokenizer, rejected)
        shared = 0
        for a, b in zip(result["chosen_output"].tolist(), result["rejected_output"].tolist()):
            shared += 1
            if a != b:
                break
        return result, shared - 1


class ReftRawDataset(torch.utils.data.Dataset):
    """pyreft's raw dataset: rows with ``instruction`` (the prompt, used as it is) and ``output``; train splits get
    labels, others the prompt alone. Takes ``position`` and ``num_interventions`` (and ``share_weights``) keywords."""

    def __init__(self, task: str, data_path: Optional[str], tokenizer, data_split: str = "train", dataset=None,
                 seed: int = 42, max_n_example: Optional[int] = None, **kwargs):
        super().__init__()
        if "position" not in kwargs:
            raise ValueError("pass position=<spec such as 'f7+l7' or 'l1'> (pyreft's keyword)")
        rows = dataset
        if rows is None:
            is_json = data_path is not None and data_path.endswith(".json")
            rows = _load_rows(None, data_path, data_split) if is_json else _load_rows(data_path, None, data_split)
        rows = _subsample(rows, max_n_example, seed)
        self.raw_dataset = rows if data_split != "train" else None
        first_n, last_n = parse_positions(kwargs["position"])
        num_interventions, share_weights = _location_options(kwargs)
        self.items = []
        for index, row in enumerate(rows):
            if "subspaces" in row:
                raise ValueError(SUBSPACES_UNSUPPORTED)
            prompt_ids = _ids(tokenizer, row["instruction"])
            if data_split == "train":
                item, _ = _prompt_and_labels(tokenizer, row["instruction"],
                                             row["instruction"] + row["output"] + tokenizer.eos_token)
            else:
                item = {"input_ids": prompt_ids}
            locations = prompt_locations(len(prompt_ids), num_interventions, first_n, last_n, share_weights)
            fields = ["input_ids", "labels"]
            item["intervention_locations"] = _add_sink(tokenizer, item, locations, "first", fields, ["input_ids"])
            item["id"] = index
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return dict(self.items[index])
