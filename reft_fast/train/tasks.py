"""Training tasks: what the recipe asks of a kind of job (its model class, data, objective and evaluation).

The recipe (``reft_fast.train.recipe``) is one loop for every task; ``task:`` in the YAML picks the class here that
supplies the parts that differ:

    causal_lm       prompt → response pairs; the loss over the response tokens; the eval loss, and with
                    data.eval_family the accuracy of generated answers (reft_fast.train.evaluation)
                    (what pyreft's supervised data modules and ``ReftTrainerForCausalLM`` train)
    classification  texts → a class or a number on an AutoModelForSequenceClassification (GLUE;
                    ``reft_fast.train.task_classification``)

A task is a class registered in ``TASKS`` with these methods (``CausalLMTask`` is the model to follow):

    check_config(cfg)                                  task-specific ConfigErrors, before any weight loads
    check_model_config(cfg, model_config)              those that need the base's config.json (not its weights)
    auto_class                                         the transformers Auto class the frozen base loads with
    base_kwargs                                        more keyword arguments of its from_pretrained (a head's size)
    datasets(tokenizer, seed, eval_part, read_train) → (train, eval)
                                                       map-style datasets of items (eval may be None; its
                                                       ``data.selection_examples`` part: selection | test;
                                                       train None with read_train=False: ``reft-fast eval``)
    bind_base(base)                                    learn what the loaded base can do (before the engine)
    collator(tokenizer, num_interventions)             items → a CPU batch with ``intervention_locations``
    host_batch(batch) → batch                          CPU-side preparation before the transfer (no device work)
    loss(engine, batch) → tensor                       the scalar loss of a batch already on the device
    model_loss(reft_model, batch) → tensor             the same through the ReftModel itself (a captured step,
                                                       ``training.cuda_graphs``: the engine's forward stays out)
    before_training(engine)                            work the loss needs once, before the first step (every rank
                                                       together): what a captured step could not do (a reduction)
    evaluate(engine, dataset, collator, rank, world)   {"eval_loss": ..., other metrics}: every rank takes part
    metric_names(cfg)                                  the names ``evaluate`` reports (``training.keep_best``)
    eval_sources(cfg)                                  the config keys that give this config an eval set (empty:
                                                       it has none), and all the keys that could, for the message
    evaluate_examples(...) → (metrics, rows)           ``reft-fast eval`` of a task scored by its own metrics
                                                       (classification, preference): ``evaluate``'s metrics and one
                                                       row per example, in the dataset's order
    trainable_base_parameters(base)                    base parameters trained with the interventions (a head)
    item_tokens(item)                                  real tokens of an item, for tokens/s and MFU
    generates                                          whether sample prompts are answered before/after training
    rows_per_example                                   batch rows one example runs as (a preference pair: 2), for
                                                       ``reft-fast plan``'s activations
    padding_mask                                       whether the base gets the batch's padding mask (a causal
                                                       batch needs none: ``loss.causal_model_inputs``), for the plan
"""

from __future__ import annotations

from typing import Optional

import torch

from reft_fast.train.data import (ReftDataCollator, SupervisedDataset, data_eval_sources, load_examples,
                                  train_and_eval_examples)
from reft_fast.train.evaluation import accuracy, generate_and_score, gold_from_responses
from reft_fast.train.fused_base import fused_base_ops
from reft_fast.train.generation import PromptError, check_prompts
from reft_fast.train.loss import accepts_logits_to_keep, forward_loss, mean_eval_loss, model_loss, trim_to_labels
from reft_fast.train.task_classification import ClassificationTask
from reft_fast.train.task_preference import PreferenceTask
from reft_fast.train.train_config import ConfigError, TrainConfig, padding_multiple

__all__ = ["CausalLMTask", "TASKS", "check_task", "make_task", "task_datasets"]


class CausalLMTask:
    """Supervised causal-LM fine-tuning: the loss covers the response tokens only."""

    auto_class = "AutoModelForCausalLM"
    base_kwargs: dict = {}
    generates = True
    rows_per_example = 1
    padding_mask = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.trim = False  # set once the base is known (``bind_base``)
        self.trim_train = False  # the same for training batches (``bind_base``)
        self.eval_answers = None  # with data.eval_family: the eval set's prompts and gold answers (``datasets``)

    @staticmethod
    def check_config(cfg: TrainConfig) -> None:
        """Nothing beyond the common sections: every key of them applies to causal-LM training."""

    @staticmethod
    def check_model_config(cfg: TrainConfig, model_config) -> None:
        """Nothing beyond the common checks of the model's shape (``train_config``)."""

    def datasets(self, tokenizer, seed: int, eval_part: str = "selection", read_train: bool = True):
        """The training set and the eval set (an eval file, else ``eval_fraction`` held out; None without either;
        with ``data.selection_examples``, its ``eval_part``); ``read_train=False``: the eval set only (the training
        set None; its data read only where the eval set is held out of it)."""
        d = self.cfg.data
        fields = dict(prompt_field=d.prompt_field, response_field=d.response_field,
                      prompt_template=d.prompt_template, response_template=d.response_template)
        examples, eval_examples = train_and_eval_examples(
            d, self.cfg.base_dir, seed, lambda source, split: load_examples(source, hf_split=split, **fields),
            eval_part=eval_part, read_train=read_train)
        kwargs = dict(max_length=d.max_length, chat_template=d.chat_template, system_prompt=d.system_prompt,
                      drop_long_prompts=d.drop_long_prompts)
        train_set = SupervisedDataset(examples, tokenizer, **kwargs) if read_train else None
        self.tokenizer = tokenizer
        if d.eval_family and eval_examples:
            try:
                self.eval_answers = gold_from_responses(eval_examples, d.eval_family)
            except ValueError as err:
                raise ConfigError(f"data.eval_family: {err}") from None
        return train_set, (SupervisedDataset(eval_examples, tokenizer, **kwargs) if eval_examples else None)

    def bind_base(self, base) -> None:
        """Learn what the loaded base can do: logits for the labelled tail only (``loss.trim_to_labels``); and check,
        before any step, that the model can answer every prompt training will generate for (data.eval_family's eval
        set, training.sample_prompts). Every rank checks all of them, so all refuse together: found by the rank whose
        shard of the eval set holds the prompt, mid-run, it left the others waiting until the ranks' timeout."""
        self.trim = accepts_logits_to_keep(base)
        # liger-kernel's fused linear cross-entropy (0.8.5: a training forward with labels) views the kept hidden
        # states [B, K, d] as [B·K, d], which a slice of the last K < T positions cannot be: the first step of every
        # trimmed batch raised (H200, 2026-11-30). That loss never makes the logits, so training gives up only the head's
        # products over the prompt; evaluation (logits and transformers' loss) keeps the trim.
        self.trim_train = self.trim and "fused_linear_cross_entropy" not in fused_base_ops(base)
        # Packed rows under training.cuda_graphs keep all their logits: packed examples are labelled along the whole
        # row, so trimming saves little of the head, and its varying count multiplied the layouts (8 examples packed
        # into rows of 1024, the width fixed: 19 layouts with the trim, 5 without; ``pack_examples``)
        self.trim_train = self.trim_train and not (self.cfg.data.packing and self.cfg.training.cuda_graphs)
        cfg = self.cfg
        encoding = dict(max_new_tokens=cfg.training.max_new_tokens, chat_template=cfg.data.chat_template,
                        system_prompt=cfg.data.system_prompt)
        try:
            if self.eval_answers:
                check_prompts(base, self.tokenizer, [example.prompt for example in self.eval_answers],
                              names=[example.where for example in self.eval_answers], **encoding)
            check_prompts(base, self.tokenizer, cfg.training.sample_prompts,
                          names=[f"training.sample_prompts[{i}]" for i in range(len(cfg.training.sample_prompts))],
                          **encoding)
        except PromptError as err:
            raise ConfigError(f"{err} (training.max_new_tokens sets the answer's length)") from None

    def collator(self, tokenizer, num_interventions: int) -> ReftDataCollator:
        iv, d = self.cfg.interventions, self.cfg.data
        return ReftDataCollator(pad_token_id=tokenizer.pad_token_id, num_interventions=num_interventions,
                                positions=iv.positions, share_weights=iv.share_weights,
                                pack_length=d.max_length if d.packing else None,
                                pad_to_multiple_of=padding_multiple(self.cfg), pack_examples=self.pack_examples(),
                                max_length=d.max_length)

    def pack_examples(self) -> Optional[int]:
        """Packed rows under training.cuda_graphs: their locations laid out for a whole micro-batch in one row (the
        most a row can hold), so that the location width is the same in every batch. Over 1000 micro-batches of 8
        examples of 40–400 tokens packed into rows of 1024 (32 interventions, f7+l7; 2-core CPU, 2026-11-30), the
        width took 6 values and the batches fell into 30 layouts; with it fixed and the logits untrimmed
        (``bind_base``), 5 layouts, the 4 most frequent 99.9 % of the micro-batches."""
        cfg = self.cfg
        return cfg.training.micro_batch_size if cfg.data.packing and cfg.training.cuda_graphs else None

    def host_batch(self, batch: dict) -> dict:
        return trim_to_labels(batch, padding_multiple(self.cfg)) if self.trim_train else batch

    @staticmethod
    def loss(engine, batch: dict) -> torch.Tensor:
        return forward_loss(engine, batch)

    model_loss = staticmethod(model_loss)  # what a captured step calls with the ReftModel (``train.graphs``)

    def before_training(self, engine) -> None:
        """Nothing: the loss needs nothing prepared."""

    @staticmethod
    def metric_names(cfg: TrainConfig) -> tuple[str, ...]:
        return ("eval_loss", "eval_accuracy") if cfg.data.eval_family else ("eval_loss",)

    @staticmethod
    def eval_sources(cfg: TrainConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return data_eval_sources(cfg)

    def evaluate(self, engine, dataset, collator, rank: int, world: int) -> dict[str, float]:
        """The eval loss; with ``data.eval_family`` also the accuracy of the answers generated greedily."""
        t = self.cfg.training
        metrics = {"eval_loss": mean_eval_loss(engine, dataset, collator, t.micro_batch_size, rank, world, self.trim)}
        if self.eval_answers:
            cfg, iv = self.cfg, self.cfg.interventions
            engine.eval()
            predictions = generate_and_score(
                engine.module, self.tokenizer, self.eval_answers, cfg.data.eval_family, rank=rank, world=world,
                batch_size=t.micro_batch_size, synced_gpus=cfg.deepspeed.stage == 3 and world > 1,
                positions=iv.positions, share_weights=iv.share_weights, chat_template=cfg.data.chat_template,
                system_prompt=cfg.data.system_prompt, max_new_tokens=t.max_new_tokens)
            engine.train()
            metrics["eval_accuracy"] = accuracy(predictions)
        return metrics

    @staticmethod
    def trainable_base_parameters(base) -> list[torch.nn.Parameter]:
        return []  # the base stays frozen: only the interventions train

    @staticmethod
    def item_tokens(item: dict) -> int:
        return len(item["input_ids"])


# task name (the YAML's ``task:``) → its class
TASKS: dict[str, type] = {"causal_lm": CausalLMTask, "classification": ClassificationTask,
                         "preference": PreferenceTask}


def check_task(cfg: TrainConfig) -> None:
    """``task`` names a registered task, the task's own checks pass, and what needs an eval set has one."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task: expected one of {sorted(TASKS)}, got {cfg.task!r}")
    task = TASKS[cfg.task]
    task.check_config(cfg)
    given, possible = task.eval_sources(cfg)
    if len(given) > 1:  # one was read and the others silently ignored (an eval file won over a held-out fraction)
        raise ConfigError(f"{given[0]}: the config names {len(given)} eval sets ({', '.join(given)}); keep one")
    if cfg.data.selection_examples is not None and not given:
        raise ConfigError(f"data.selection_examples: cuts the eval set in two, and the config names none "
                          f"({' or '.join(possible)})")
    metric = cfg.training.keep_best
    if metric is None:
        return
    names = task.metric_names(cfg)
    if metric not in names:
        raise ConfigError(f"training.keep_best: task {cfg.task} here reports {list(names)}, got {metric!r}")
    if not given:
        raise ConfigError("training.keep_best: chooses among the evaluations during training, and the config names "
                          f"no eval set ({' or '.join(possible)})")


def make_task(cfg: TrainConfig, task: Optional[str] = None):
    """The task object for ``cfg`` (its ``task:`` unless ``task`` is given)."""
    name = task or cfg.task
    if name not in TASKS:
        raise ConfigError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](cfg)


def task_datasets(task, tokenizer, seed: int, eval_part: str = "selection", read_train: bool = True):
    """``task.datasets``, with a ValueError about the data's content (bad JSON, a missing field, a prompt too long)
    raised as the ConfigError it is: the user's to fix, reported like the config (training and ``reft-fast eval``,
    which reads no training data it does not score: ``read_train=False``)."""
    try:
        return task.datasets(tokenizer, seed, eval_part, read_train)
    except ConfigError:
        raise
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("data.") else f"data: {message}") from None
