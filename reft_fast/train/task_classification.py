"""``task: classification``: ReFT on any ``AutoModelForSequenceClassification`` (encoders such as RoBERTa, BERT,
DeBERTa, DistilBERT, and decoders such as Llama), as the ReFT paper's GLUE runs train it.

    task: classification
    model: {path: FacebookAI/roberta-base}
    interventions: {layers: all, low_rank_dimension: 1, positions: f1}
    data: {hf_dataset: "nyu-mll/glue:sst2", max_length: 128}
    classification: {num_labels: 2, problem_type: single_label, train_head: true, eval_split: validation}

Data. Rows from JSON, JSONL, CSV or a Hugging Face dataset; the text is one field or a pair, found among GLUE's names
when ``classification.text_fields`` is empty (so every GLUE task works without a mapping), tokenized as the tokenizer
joins a pair (RoBERTa: ``<s> a </s></s> b </s>``), truncated to ``data.max_length``. Labels: class indices
(single_label; text labels through ``label_names``), a 0/1 list (multi_label) or a number (regression).

Positions. Each example's locations come from its own real length (``core.positions``), over all of its tokens: "f1"
edits the first token (the ``<s>`` whose final state RoBERTa's head reads), as pyreft's GLUE runs do. Padding is on
the right and never edited.

Loss and metrics. The base's own head computes the loss from the labels (``config.problem_type`` is set at load).
``evaluate`` runs the eval set sharded over the ranks, writes each example's logits into its row of one device buffer,
and sums that buffer over the ranks in one reduction (a gather, since every row is written by one rank only), read once
on the host; then accuracy, F1 and MCC (single-label), exact-match accuracy (multi-label) or Pearson and Spearman
(regression), with ``reft_fast.train.scores``; ``evaluate_examples`` also returns each example's prediction, from
which those scores are computed (``reft-fast eval`` writes them, one JSON line per example).

The head. With ``train_head`` (the default, as the paper) the parameters outside the backbone (``base.base_model``:
RoBERTa's ``classifier``, Llama's ``score``) train with the interventions; they go into the trainer checkpoints and
into ``final/base_trainable.safetensors`` (``run_dir``), and ``run_dir.load_trainable_base`` puts them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from reft_fast.core.positions import intervention_locations
from reft_fast.train import scores
from reft_fast.train.data import data_eval_sources, load_rows, padded_length, train_and_eval_examples, value_type_name
from reft_fast.train.distributed import all_reduce_sum, rank_chunks
from reft_fast.train.loss import to_device
from reft_fast.train.train_config import ClassificationConfig, ConfigError, TrainConfig, padding_multiple, \
    resolve_data_path

__all__ = ["ClassificationCollator", "ClassificationDataset", "ClassificationTask", "GLUE_TEXT_FIELDS", "PROBLEM_TYPES",
           "head_parameters", "read_labelled_texts"]

# classification.problem_type → transformers' config.problem_type
PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                 "regression": "regression"}
# GLUE's text fields, pairs before single fields (QNLI's question/sentence holds a "sentence" too).
GLUE_TEXT_FIELDS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                    ("premise", "hypothesis"), ("sentence",), ("text",))


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def _text_fields(row: dict, configured: Sequence[str], where: str) -> tuple[str, ...]:
    if configured:
        return tuple(configured)
    for fields in GLUE_TEXT_FIELDS:
        if all(name in row for name in fields):
            return fields
    raise ValueError(f"{where}: no text field among GLUE's names {[list(f) for f in GLUE_TEXT_FIELDS]} (fields: "
                     f"{sorted(row)}); set classification.text_fields")


def _label(value, c: ClassificationConfig, where: str):
    """A row's label as the loss takes it: a class index, a list of 0/1 floats, or a float."""
    try:
        if c.problem_type == "regression":
            number = float(value)
            if not math.isfinite(number):  # one NaN or infinite target turns every later weight into NaN
                raise ValueError
            return number
        if c.problem_type == "multi_label":
            if isinstance(value, str):  # a string iterates as characters: "10" is not the list [1, 0]
                raise ValueError
            values = [float(v) for v in value]
            if len(values) != c.num_labels or any(v not in (0.0, 1.0) for v in values):
                raise ValueError
            return values
        named = isinstance(value, str) and value in c.label_names
        # Besides the names, a class index: a Hub dataset's ClassLabel column gives indices, a CSV gives text ("1",
        # or "1.0" where pandas wrote a float column).
        index = c.label_names.index(value) if named else int(float(value) if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinite value
        expected = {"regression": "a finite number", "multi_label": f"a list of {c.num_labels} values 0 or 1"}.get(
            c.problem_type, f"one of {c.label_names} or a class index" if c.label_names
            else "a class index (text labels: list them in classification.label_names)")
        raise ValueError(f"{where}: label {value!r} is not {expected}") from None
    if not 0 <= index < c.num_labels or (not named and float(value) != index):
        raise ValueError(f"{where}: label {value!r} is not a class index in [0, {c.num_labels}) (classification."
                         "num_labels; GLUE's test splits have no labels: −1)")
    return index


def _unlabelled(row: dict, c: ClassificationConfig) -> bool:
    """A row without a label: no label field, null, GLUE's test-split −1, or in a CSV (all text) "-1" or an empty
    cell."""
    value = row.get(c.label_field)
    if isinstance(value, str):
        return value.strip() in ("-1", "")
    return value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and value == -1)


def read_labelled_texts(source, c: ClassificationConfig, *, hf_split: str = "train",
                        unlabelled: bool = False) -> list[dict]:
    """``[{"texts": (a,) or (a, b), "label": ..., "where": the row's file and line}]`` from any source
    ``data.load_rows`` reads.

    ``unlabelled``: a source none of whose rows has a label (GLUE's test splits: −1; or no label field) is read with
    label None (``reft-fast eval`` then predicts without scoring); a source with labels is read as always."""
    rows, where = load_rows(source, hf_split=hf_split)
    without = unlabelled and bool(rows) and all(isinstance(row, dict) and _unlabelled(row, c) for row in rows)
    examples = []
    for i, row in enumerate(rows):
        here = where.at(i)
        if not isinstance(row, dict):
            raise ValueError(f"{here}: a {type(row).__name__}, expected an object")
        fields = _text_fields(row, c.text_fields, here)
        settings = {**dict.fromkeys(fields, "classification.text_fields"),
                    **({} if without else {c.label_field: "classification.label_field"})}
        for name, setting in settings.items():
            if name not in row:
                raise ValueError(f"{here}: no field {name!r} (fields: {sorted(row)}); set {setting}")
        texts = tuple(row[name] for name in fields)
        if not all(isinstance(text, str) for text in texts):
            kinds = ", ".join(f"{name!r} is {value_type_name(text)}"
                              for name, text in zip(fields, texts) if not isinstance(text, str))
            raise ValueError(f"{here}: {kinds}, expected text (classification.text_fields)")
        examples.append({"texts": texts, "label": None if without else _label(row[c.label_field], c, here),
                         "where": here})
    if not examples:
        raise ValueError(f"{where}: no examples")
    return examples


class ClassificationDataset(torch.utils.data.Dataset):
    """Tokenized examples: each item has input_ids, label and where (its source row, for the eval lines)."""

    def __init__(self, examples: Sequence[dict], tokenizer, max_length: int):
        self.items = [{"input_ids": tokenizer(*ex["texts"], truncation=True, max_length=max_length)["input_ids"],
                       "label": ex["label"], "where": ex.get("where", f"example {i}")}
                      for i, ex in enumerate(examples)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@dataclass
class ClassificationCollator:
    """Right-pads items into a batch: input_ids, attention_mask, labels ([B] class indices, [B] floats or
    [B, num_labels] floats) and intervention_locations [n, B, P] from each example's real length (CPU, int64)."""

    pad_token_id: int
    num_interventions: int
    positions: str = "f1"
    share_weights: bool = False
    # the batch's length rounded up to a multiple of this (training.cuda_graphs: few batch layouts), never past
    # max_length (no item is longer)
    pad_to_multiple_of: Optional[int] = None
    max_length: Optional[int] = None

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(it["input_ids"]) for it in items]
        input_ids = torch.full((len(items), padded_length(max(lengths), self.pad_to_multiple_of, self.max_length)),
                               self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, it in enumerate(items):
            input_ids[b, : lengths[b]] = torch.as_tensor(it["input_ids"])
            attention_mask[b, : lengths[b]] = 1
        locations = intervention_locations(torch.as_tensor(lengths), self.positions, self.num_interventions,
                                           share_weights=self.share_weights)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "intervention_locations": locations}
        labels = [it["label"] for it in items]
        if labels[0] is not None:  # unlabelled examples (predictions only) come as a whole set: no labels at all
            label_dtype = torch.long if isinstance(labels[0], int) else torch.float32
            batch["labels"] = torch.as_tensor(labels, dtype=label_dtype)
        return batch


def head_parameters(base) -> list[torch.nn.Parameter]:
    """The parameters of a task model outside its backbone (``base.base_model``): the classifier head (RoBERTa's
    ``classifier``, DistilBERT's ``pre_classifier`` and ``classifier``, Llama's ``score``)."""
    backbone = {id(p) for p in base.base_model.parameters()}
    head = [p for p in base.parameters() if id(p) not in backbone]
    if not head:
        raise ValueError(f"classification.train_head: {type(base).__name__} has no parameters outside its backbone "
                         f"({type(base.base_model).__name__}): no classifier head to train")
    return head


# --------------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------------
def _score_functions(c: ClassificationConfig) -> dict:
    """The scores of a classification config, by name: what evaluation computes and ``training.keep_best`` may name."""
    if c.problem_type == "regression":
        return {"pearson": scores.pearson, "spearman": scores.spearman}
    if c.problem_type == "multi_label":
        return {"accuracy": scores.accuracy}
    binary = {"f1": scores.f1_binary} if c.num_labels == 2 else {}
    return {"accuracy": scores.accuracy, "mcc": scores.matthews, **binary}


class ClassificationTask:
    """Sequence classification and regression on the base's own head (``reft_fast.train.tasks`` lists the methods)."""

    auto_class = "AutoModelForSequenceClassification"
    generates = False
    rows_per_example = 1
    padding_mask = True  # an encoder attends both ways: its padding must be masked
    # Set by ``reft-fast eval`` (``task_eval.evaluate_run``): eval data without labels (GLUE's test splits) is read,
    # and predicted without scores; training refuses it.
    unlabelled_eval = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        c = cfg.classification
        # what from_pretrained sizes and configures the head with
        self.base_kwargs = {"num_labels": c.num_labels, "problem_type": PROBLEM_TYPES.get(c.problem_type)}
        self.pad_token_id: Optional[int] = None  # the tokenizer's, learned in ``datasets``
        self.float_labels_dtype = torch.float32  # the base's dtype, learned in ``bind_base``

    @staticmethod
    def check_config(cfg: TrainConfig) -> None:
        c = cfg.classification
        if c.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"classification.problem_type: expected one of {list(PROBLEM_TYPES)}, got "
                              f"{c.problem_type!r}")
        if c.problem_type == "regression" and c.num_labels != 1:
            raise ConfigError(f"classification.num_labels: regression predicts one number, so 1; got {c.num_labels}")
        if c.num_labels < (2 if c.problem_type == "single_label" else 1):
            raise ConfigError(f"classification.num_labels: must be ≥ 2 for single_label, got {c.num_labels}")
        if len(c.text_fields) > 2:
            raise ConfigError(f"classification.text_fields: one field or a pair, got {c.text_fields}")
        if c.label_names and (c.problem_type != "single_label" or len(c.label_names) != c.num_labels):
            raise ConfigError(f"classification.label_names: {len(c.label_names)} names for a {c.problem_type} task "
                              f"with num_labels {c.num_labels}; names need single_label and one per label")
        if cfg.data.packing:
            raise ConfigError("data.packing: not supported by task classification (each example's head reads its "
                              "own first or last token; packed rows would mix examples); set it to false")
        if c.train_head and cfg.deepspeed.stage == 3:
            raise ConfigError("classification.train_head: ZeRO stage 3 partitions the head, whose checkpointing here "
                              "needs it whole; use deepspeed.stage 0, 1 or 2, or train_head: false")
        if cfg.training.sample_prompts:
            raise ConfigError("training.sample_prompts: a classifier does not generate text; remove them")
        if c.eval_split and cfg.data.eval_file:
            raise ConfigError("classification.eval_split: cannot be combined with data.eval_file; keep one")
        if c.eval_split and cfg.data.train_file and Path(resolve_data_path(cfg.data.train_file, cfg.base_dir)).is_file():
            # a file has no splits: its "validation" split would be the training examples themselves
            raise ConfigError(f"classification.eval_split: {c.eval_split!r} is a split of a Hugging Face dataset, but "
                              f"data.train_file {cfg.data.train_file} is a file; set classification.eval_split: null "
                              "and give data.eval_file (or data.eval_fraction)")

    @staticmethod
    def check_model_config(cfg: TrainConfig, model_config) -> None:
        """A base saved as a sequence classifier has a trained head of its own size: transformers 5.24's from_pretrained
        refuses to load it at another size (a RuntimeError after set-up, naming ``ignore_mismatched_sizes``). A bare
        backbone (roberta-base: RobertaForMaskedLM, whose config still says 2 labels) gets a new head of any size."""
        architectures = getattr(model_config, "architectures", None) or []
        trained_labels = getattr(model_config, "num_labels", None)
        wanted = cfg.classification.num_labels
        if any(name.endswith("ForSequenceClassification") for name in architectures) and trained_labels != wanted:
            raise ConfigError(f"classification.num_labels: {wanted}, but model.path {cfg.model.path} is a sequence "
                              f"classifier whose trained head predicts {trained_labels} (its config.json); set "
                              f"num_labels: {trained_labels} to train on with that head, or start from the base "
                              "model it was fine-tuned from for a new head")

    def _read(self, source, split: str) -> list[dict]:
        try:
            return read_labelled_texts(source, self.cfg.classification, hf_split=split,
                                       unlabelled=self.unlabelled_eval)
        except ValueError as err:
            raise ConfigError(f"data: {err}") from None

    def datasets(self, tokenizer, seed: int, eval_part: str = "selection", read_train: bool = True):
        """The training set and the eval set (an eval file, ``classification.eval_split`` of the Hugging Face
        dataset, else ``eval_fraction`` held out; None without any; with ``data.selection_examples``, its
        ``eval_part``); ``read_train=False``: the eval set only (the training set None)."""
        d, c = self.cfg.data, self.cfg.classification
        self.pad_token_id = tokenizer.pad_token_id
        examples, eval_examples = train_and_eval_examples(d, self.cfg.base_dir, seed, self._read,
                                                          eval_split=c.eval_split, eval_part=eval_part,
                                                          read_train=read_train)
        train_set = ClassificationDataset(examples, tokenizer, d.max_length) if read_train else None
        return train_set, (ClassificationDataset(eval_examples, tokenizer, d.max_length) if eval_examples else None)

    def bind_base(self, base) -> None:
        """A decoder's head reads each row's last non-pad token, found through ``config.pad_token_id``; float labels
        take the base's dtype (its head's loss compares them with its logits)."""
        if base.config.pad_token_id is None:
            base.config.pad_token_id = self.pad_token_id
        self.float_labels_dtype = next(base.parameters()).dtype

    def collator(self, tokenizer, num_interventions: int) -> ClassificationCollator:
        iv = self.cfg.interventions
        return ClassificationCollator(pad_token_id=tokenizer.pad_token_id, num_interventions=num_interventions,
                                      positions=iv.positions, share_weights=iv.share_weights,
                                      pad_to_multiple_of=padding_multiple(self.cfg),
                                      max_length=self.cfg.data.max_length)

    def host_batch(self, batch: dict) -> dict:
        labels = batch.get("labels")
        if labels is None or not labels.is_floating_point():
            return batch
        return {**batch, "labels": labels.to(self.float_labels_dtype)}

    @staticmethod
    def loss(engine, batch: dict) -> torch.Tensor:
        """The mean loss of a training batch on the device, with its padding mask (``padding_mask``): an encoder
        attends both ways, so without it every real token saw the padding in training (``loss.forward_loss`` gives
        a causal batch none), and the head trained on other features than evaluation reads. ``engine``: the
        DeepSpeed engine, or the ReftModel itself (``training.cuda_graphs``, ``train.graphs``)."""
        _, out = engine({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                        intervention_locations=batch["intervention_locations"], labels=batch["labels"])
        return out.loss

    model_loss = loss  # what a captured step calls with the ReftModel

    def before_training(self, engine) -> None:
        """Nothing: the loss needs nothing prepared."""

    @staticmethod
    def metric_names(cfg: TrainConfig) -> tuple[str, ...]:
        """The metrics ``evaluate`` reports for this config (what ``training.keep_best`` may name)."""
        return ("eval_loss", *_score_functions(cfg.classification))

    @staticmethod
    def eval_sources(cfg: TrainConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The keys giving this config an eval set, and every key that could: the data section's, or a split of the
        Hugging Face dataset."""
        given, possible = data_eval_sources(cfg)
        split = ("classification.eval_split",)
        return given + (split if cfg.classification.eval_split else ()), possible + split

    def evaluate(self, engine, dataset, collator, rank: int, world: int) -> dict[str, float]:
        """eval_loss and the task's scores over the whole eval set (``evaluate_examples`` without its rows)."""
        return self.evaluate_examples(engine, dataset, collator, rank, world)[0]

    def evaluate_examples(self, engine, dataset, collator, rank: int,
                          world: int) -> tuple[dict[str, float], list[dict]]:
        """``evaluate``'s metrics and one row per example of ``dataset``, in its order: index, where (its source row:
        a file and line), label, predicted (a class index, a 0/1 list for multi_label, the value for regression),
        predicted_name (with label_names) and, for classes, their probabilities (softmax; sigmoid per label for
        multi_label). The metrics are computed from these same predictions."""
        loss, logits = self._gathered_logits(engine, dataset, collator, rank, world)
        labels = [dataset[i]["label"] for i in range(len(dataset))]
        predicted = self._predicted(logits)
        # without labels (a test split): the predictions alone, nothing to score
        metrics = {} if loss is None else {"eval_loss": loss, **self._scores(predicted, labels)}
        problem, names = self.cfg.classification.problem_type, self.cfg.classification.label_names
        rows = []
        for index, (label, prediction, row) in enumerate(zip(labels, predicted, logits)):
            rows.append({"index": index, "where": dataset[index]["where"], "label": label, "predicted": prediction})
            if names:  # the class's name too (what a GLUE submission file holds for MNLI, RTE, ...)
                rows[-1]["predicted_name"] = names[prediction]
            if problem == "single_label":
                top = max(row)
                exps = [math.exp(value - top) for value in row]
                rows[-1]["probabilities"] = [e / sum(exps) for e in exps]
            elif problem == "multi_label":
                rows[-1]["probabilities"] = [1.0 / (1.0 + math.exp(-value)) for value in row]
        return metrics, rows

    @torch.no_grad()
    def _gathered_logits(self, engine, dataset, collator, rank: int,
                         world: int) -> tuple[Optional[float], list[list[float]]]:
        """The mean eval loss (None for examples without labels) and every example's logits, in the order of
        ``dataset``. Each rank runs its share of every chunk (``rank_chunks``: the same number of forwards on every
        rank) and writes its examples' logits into their rows of one device buffer; one reduction over the ranks then
        holds every row once, with the loss sum in the last one."""
        engine.eval()
        width = self.cfg.classification.num_labels
        gathered = torch.zeros((len(dataset) + 1, width), dtype=torch.float64, device=engine.device)
        micro = self.cfg.training.micro_batch_size
        for mine in rank_chunks(len(dataset), micro, rank, world):
            batch = to_device(self.host_batch(collator([dataset[i] for i in (mine or [0])])), engine.device)
            _, out = engine({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                            intervention_locations=batch["intervention_locations"], labels=batch.get("labels"))
            if mine:  # a contiguous run of rows: written through a slice, no index tensor sent to the device
                gathered[mine.start : mine.stop] = out.logits.double().reshape(len(mine), width)
                if out.loss is not None:
                    gathered[-1, 0] += out.loss.double() * len(mine)
        values = all_reduce_sum(gathered).tolist()
        engine.train()
        labelled = dataset[0]["label"] is not None
        return (values[-1][0] / len(dataset) if labelled else None), values[:-1]

    def _predicted(self, logits: list[list[float]]) -> list:
        problem = self.cfg.classification.problem_type
        if problem == "regression":
            return [row[0] for row in logits]
        if problem == "multi_label":
            return [[1.0 if value > 0 else 0.0 for value in row] for row in logits]
        return [max(range(len(row)), key=row.__getitem__) for row in logits]

    def _scores(self, predicted: list, labels: list) -> dict[str, float]:
        return {name: score(predicted, labels)
                for name, score in _score_functions(self.cfg.classification).items()}

    def trainable_base_parameters(self, base) -> list[torch.nn.Parameter]:
        if not self.cfg.classification.train_head:
            return []
        try:
            head = head_parameters(base)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for p in head:
            p.requires_grad_(True)
        return head

    @staticmethod
    def item_tokens(item: dict) -> int:
        return len(item["input_ids"])
