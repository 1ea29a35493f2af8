"""Preference training (``task: preference``): DPO or SimPO on (prompt, chosen, rejected) triples.

The policy is the base with the interventions; the base is frozen, so DPO's reference model is the same base with the
interventions switched off, and no second copy of the model is loaded. A plain call of the base model
(``ReftModel.model``) runs it without edits: the hooks edit only during a ReftModel forward (reft_fast.core.hooks).

One forward per pair. A batch of B pairs is one batch of 2B rows: the B chosen responses, then the B rejected ones,
each after its pair's prompt. Chosen and rejected share the prompt tokens, so the intervened positions (which lie in
the prompt) are the same for both rows of a pair. A row's log-probability is the sum over its response tokens (labels
−100 on the prompt and the padding), from one forward of the 2B rows.

Objectives, with c and r the summed log-probabilities of the chosen and rejected responses under the policy, c₀ and r₀
under the reference, |y| a response's token count and ε the label smoothing (the assumed share of flipped pairs):

    dpo     x = β·((c − c₀) − (r − r₀))                 rewards β·(c − c₀), β·(r − r₀)    (arXiv 2305.18290)
    simpo   x = β·(c/|y_c| − r/|y_r|) − γ              rewards β·c/|y_c|, β·r/|y_r|       (arXiv 2405.14734)
    loss    −(1 − ε)·log σ(x) − ε·log σ(−x), averaged over the pairs

Reference log-probabilities (dpo). The base never changes, so a pair's c₀ and r₀ never change either. With
``preference.reference: cached`` (the default) they are computed once per dataset, before its first use: one no_grad
forward of the base per pair, once, shared by the ranks through one reduction, then read from a device table by pair
index. One extra no_grad forward per micro-batch (``per_step``) pays the same forward again in every epoch: about
45% on top of a training step (forward 0.124 s against forward + backward 0.276 s, Llama-2-7B shape on an H100,
measured 2026-11-23). It is cheaper only for a run that visits a small part of a large set, since the cache covers
the whole set. The table is computed in fixed chunks of ``micro_batch_size`` pairs dealt out to the ranks in turn, so
its values do not depend on the number of ranks.

Evaluation reports ``eval_loss``, ``eval_reward_accuracy`` (the share of pairs whose chosen reward is higher) and
``eval_reward_margin`` (the mean chosen − rejected reward), from a per-pair device table reduced once; ``reft-fast
eval`` writes that table's rows (``evaluate_examples``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from reft_fast.train.data import IGNORE_INDEX, ReftDataCollator, SupervisedDataset, data_eval_sources, \
    load_examples, train_and_eval_examples
from reft_fast.train.distributed import all_reduce_sum, rank_chunks
from reft_fast.train.loss import accepts_logits_to_keep, causal_model_inputs, to_device, trim_to_labels
from reft_fast.train.train_config import ConfigError, TrainConfig, padding_multiple, warn_once_per_job

logger = logging.getLogger(__name__)

__all__ = ["PreferenceCollator", "PreferenceDataset", "PreferenceTask", "dpo_loss", "load_preference_examples",
           "reference_logps", "sequence_logps", "simpo_loss"]

# preference.beta when unset: DPO's usual 0.1; SimPO's settings use 2.0 to 2.5 (arXiv 2405.14734, table of
# hyperparameters)
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


# --------------------------------------------------------------------------------------------------------------------
# The objectives, on per-pair log-probabilities
# --------------------------------------------------------------------------------------------------------------------
def _smoothed_logistic_loss(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1.0 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """DPO per pair from summed log-probabilities [B]: (losses, chosen rewards, rejected rewards), each [B]."""
    chosen_rewards = beta * (chosen - reference_chosen)
    rejected_rewards = beta * (rejected - reference_rejected)
    return _smoothed_logistic_loss(chosen_rewards - rejected_rewards, label_smoothing), chosen_rewards, rejected_rewards


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0):
    """SimPO per pair from length-normalized (per-token mean) log-probabilities [B]: (losses, chosen rewards,
    rejected rewards), each [B]; no reference model."""
    chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    return (_smoothed_logistic_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing), chosen_rewards,
            rejected_rewards)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens and their count, both [rows], fp32.

    ``logits`` [rows, K, V] may be the last K positions only (``logits_to_keep``) with ``labels`` cut to the same K
    columns; position t predicts label t + 1, as in the causal-LM loss."""
    targets = labels[:, 1:]
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    token_logps = -F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return token_logps.view(targets.shape).sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def _model_inputs(batch: dict, base) -> tuple[dict, dict]:
    """The inputs of ``base`` for the right-padded rows (``loss.causal_model_inputs``: no padding mask), and
    ``logits_to_keep``."""
    extra = {"logits_to_keep": batch["logits_to_keep"]} if "logits_to_keep" in batch else {}
    return causal_model_inputs(batch, base), extra


@torch.no_grad()
def reference_logps(base, batch: dict) -> torch.Tensor:
    """[2B] summed response log-probabilities under the base without edits (a plain call: the ReftModel's hooks edit
    only during its own forward), in eval mode (no dropout of the base)."""
    inputs, extra = _model_inputs(batch, base)
    was_training = base.training
    base.train(False)
    try:
        logits = base(**inputs, **extra).logits
    finally:
        base.train(was_training)
    return sequence_logps(logits, batch["labels"])[0]


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def load_preference_examples(source, prompt_field: str, chosen_field: str, rejected_field: str, *,
                             hf_split: str = "train", prompt_template: Optional[str] = None) -> list[dict]:
    """``[{"prompt", "chosen", "rejected", "where"}]`` from what ``data.load_examples`` reads (a JSON/JSONL file, a
    list of dicts or a Hugging Face dataset; ``where`` names the row); the prompt is ``prompt_template`` over the
    row's fields when given."""
    chosen = load_examples(source, prompt_field, chosen_field, hf_split=hf_split, prompt_template=prompt_template,
                           response_setting="preference.chosen_field")
    rejected = load_examples(source, prompt_field, rejected_field, hf_split=hf_split, prompt_template=prompt_template,
                             response_setting="preference.rejected_field")
    return [{"prompt": c["prompt"], "chosen": c["response"], "rejected": r["response"], "where": c["where"]}
            for c, r in zip(chosen, rejected)]


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs: item i is ``{"index": i, "where": ..., "chosen": ..., "rejected": ...}``, each side a
    ``SupervisedDataset`` item (input_ids, labels −100 on the prompt, prompt_length) with the same prompt tokens;
    ``where`` names the pair's row (a file and line): with ``data.drop_long_prompts`` i is not the row's position."""

    def __init__(self, examples: list[dict], tokenizer, **encoding):
        # Both sides drop the same examples (a prompt too long for max_length), so they stay aligned; the chosen
        # side says so (once, not once per side).
        chosen = SupervisedDataset([{**e, "response": e["chosen"]} for e in examples], tokenizer, **encoding)
        rejected = SupervisedDataset([{**e, "response": e["rejected"]} for e in examples], tokenizer,
                                     warn_dropped=False, **encoding)
        pairs, tied = [], []
        for where, c, r in zip(chosen.sources, chosen, rejected):
            (tied if c["input_ids"] == r["input_ids"] else pairs).append((where, c, r))
        if tied:  # the same tokens on both sides: a zero margin whatever the edits, so no gradient, yet counted
            warn_once_per_job(logger, "dropped %d of %d pairs whose chosen and rejected rows are the same tokens "
                              "(the same response, or two responses cut at data.max_length within a beginning they "
                              "share): they carry no preference (first: %s)", len(tied), len(chosen),
                              ", ".join(where for where, *_ in tied[:5]))
        if not pairs:
            raise ValueError(f"every pair's chosen and rejected rows are the same tokens ({len(tied)} pairs, the "
                             f"first {tied[0][0]}): nothing to prefer (check preference.chosen_field and "
                             "preference.rejected_field, or raise data.max_length)")
        self.items = [{"index": i, "where": where, "chosen": c, "rejected": r} for i, (where, c, r) in enumerate(pairs)]
        self.num_dropped = chosen.num_dropped + len(tied)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@dataclass
class PreferenceCollator:
    """B pairs → one batch of 2B rows (the chosen responses, then the rejected ones; ``ReftDataCollator`` pads them
    and places the positions, which the prompt shared by a pair's two rows fixes) and ``pair_index`` [B]."""

    rows: ReftDataCollator

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.rows([it["chosen"] for it in items] + [it["rejected"] for it in items])
        batch["pair_index"] = torch.as_tensor([it["index"] for it in items], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------------
def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class PreferenceTask:
    """DPO or SimPO (``preference.loss``) on chosen/rejected pairs; the methods are those of ``tasks.CausalLMTask``."""

    auto_class = "AutoModelForCausalLM"
    base_kwargs: dict = {}  # nothing beyond the causal LM's own loading
    generates = True
    rows_per_example = 2  # a pair's chosen and rejected rows run in one forward
    padding_mask = False  # right-padded causal rows: loss.causal_model_inputs

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        p = cfg.preference
        self.beta = p.beta if p.beta is not None else DEFAULT_BETA[p.loss]
        self.trim = False  # set once the base is known (``bind_base``)
        self.pair_collator: Optional[PreferenceCollator] = None  # set by ``collator``
        self.train_set: Optional[PreferenceDataset] = None  # what the training batches index (``datasets``)
        self.reference_tables: dict[int, tuple] = {}  # id(dataset) → (dataset, [N, 2] device table): cached mode

    @staticmethod
    def check_config(cfg: TrainConfig) -> None:
        if cfg.data.packing:
            raise ConfigError("data.packing: task: preference does not pack (a pair's chosen and rejected rows each "
                              "need their own summed log-probability); set data.packing: false")
        if cfg.data.response_template:
            raise ConfigError("data.response_template: task: preference reads its two responses as they are, from "
                              "preference.chosen_field and preference.rejected_field; remove the template")
        if cfg.data.eval_family:
            raise ConfigError("data.eval_family: scores generated answers (causal_lm); a preference run is scored by "
                              "its reward accuracy and margin; remove it")

    @staticmethod
    def check_model_config(cfg: TrainConfig, model_config) -> None:
        """Nothing beyond the common checks of the model's shape (``train_config``)."""

    def datasets(self, tokenizer, seed: int, eval_part: str = "selection", read_train: bool = True):
        """The training pairs and the eval pairs (an eval file, else ``eval_fraction`` held out; None without; with
        ``data.selection_examples``, its ``eval_part``); ``read_train=False``: the eval pairs only (the training
        pairs None)."""
        d, p = self.cfg.data, self.cfg.preference
        fields = (d.prompt_field, p.chosen_field, p.rejected_field)
        examples, eval_examples = train_and_eval_examples(
            d, self.cfg.base_dir, seed,
            lambda source, split: load_preference_examples(source, *fields, hf_split=split,
                                                           prompt_template=d.prompt_template), eval_part=eval_part,
            read_train=read_train)
        encoding = dict(max_length=d.max_length, chat_template=d.chat_template, system_prompt=d.system_prompt,
                        drop_long_prompts=d.drop_long_prompts)
        self.train_set = PreferenceDataset(examples, tokenizer, **encoding) if read_train else None
        return self.train_set, (PreferenceDataset(eval_examples, tokenizer, **encoding) if eval_examples else None)

    def bind_base(self, base) -> None:
        self.trim = accepts_logits_to_keep(base)

    def collator(self, tokenizer, num_interventions: int) -> PreferenceCollator:
        iv, d = self.cfg.interventions, self.cfg.data
        self.pair_collator = PreferenceCollator(ReftDataCollator(
            pad_token_id=tokenizer.pad_token_id, num_interventions=num_interventions, positions=iv.positions,
            share_weights=iv.share_weights, pad_to_multiple_of=padding_multiple(self.cfg), max_length=d.max_length))
        return self.pair_collator

    def host_batch(self, batch: dict) -> dict:
        return trim_to_labels(batch, padding_multiple(self.cfg)) if self.trim else batch

    def before_training(self, engine) -> None:
        """DPO's cached reference: the training pairs' table, built now rather than at the first step (every rank
        takes part in its reduction; a captured step, ``training.cuda_graphs``, could not build it)."""
        if self.cfg.preference.loss == "dpo" and self.train_set:
            self._ensure_table(engine, self.train_set)

    def loss(self, engine, batch: dict) -> torch.Tensor:
        """The mean pair loss of a training batch already on the device."""
        return self.pair_losses(engine, batch, self.train_set)[0].mean()

    def model_loss(self, reft_model, batch: dict) -> torch.Tensor:
        """``loss`` through the ReftModel itself (a captured step, ``train.graphs``): the training pairs' reference
        table is built before training (``before_training``)."""
        dpo = self.cfg.preference.loss == "dpo"
        reference = self._reference_rows(reft_model.model, batch, self.train_set) if dpo else None
        return self._pair_losses(reft_model, reft_model.model, batch, reference)[0].mean()

    def pair_losses(self, engine, batch: dict, dataset):
        """(losses, chosen rewards, rejected rewards, policy log-probabilities [B, 2] (chosen, rejected: summed over
        each response)) per pair of a batch of ``dataset``, on the device: one forward of the policy over the 2B rows
        (with ``per_step``, one no_grad forward of the base before it)."""
        reference = self.reference(engine, batch, dataset) if self.cfg.preference.loss == "dpo" else None
        return self._pair_losses(engine, engine.module.model, batch, reference)

    def _pair_losses(self, policy, base, batch: dict, reference: Optional[torch.Tensor]):
        """``pair_losses`` with the policy (the engine or the ReftModel), its base and the [B, 2] reference given."""
        p = self.cfg.preference
        inputs, extra = _model_inputs(batch, base)
        _, out = policy(inputs, intervention_locations=batch["intervention_locations"], **extra)
        logps, counts = sequence_logps(out.logits, batch["labels"])
        pair_logps = logps.view(2, -1).T
        if p.loss == "simpo":
            chosen_mean, rejected_mean = (logps / counts.clamp(min=1)).chunk(2)
            return (*simpo_loss(chosen_mean, rejected_mean, self.beta, p.simpo_gamma, p.label_smoothing), pair_logps)
        chosen, rejected = logps.chunk(2)
        return (*dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.beta, p.label_smoothing),
                pair_logps)

    def reference(self, engine, batch: dict, dataset) -> torch.Tensor:
        """[B, 2]: the reference log-probabilities (chosen, rejected) of the batch's pairs, from the dataset's table
        (built on its first use: every rank must call this together) or, with ``per_step``, a forward of the base."""
        self._ensure_table(engine, dataset)
        return self._reference_rows(engine.module.model, batch, dataset)

    def _ensure_table(self, engine, dataset) -> None:
        """With ``cached``: the dataset's reference table, built once (every rank takes part in its reduction)."""
        if self.cfg.preference.reference == "cached" and id(dataset) not in self.reference_tables:
            self.reference_tables[id(dataset)] = (dataset, self.reference_table(engine, dataset))

    def _reference_rows(self, base, batch: dict, dataset) -> torch.Tensor:
        """``reference`` once the table exists: its rows of the batch's pairs, or ``per_step``'s forward of ``base``."""
        if self.cfg.preference.reference == "per_step":
            return reference_logps(base, batch).view(2, -1).T
        return self.reference_tables[id(dataset)][1][batch["pair_index"]]

    @torch.no_grad()
    def reference_table(self, engine, dataset) -> torch.Tensor:
        """[N, 2] on the device: every pair's reference log-probabilities (chosen, rejected). Chunks of
        ``micro_batch_size`` pairs are dealt to the ranks in turn (the same chunks for any number of ranks); each rank
        fills its chunks' rows and one sum over the ranks completes the table. Every rank runs as many forwards
        (``rank_chunks``: a rank without a chunk in the last round runs one on pair 0 and keeps nothing), as ZeRO-3
        needs."""
        rank, world = _rank_and_world()
        micro = self.cfg.training.micro_batch_size
        table = torch.zeros((len(dataset), 2), dtype=torch.float32, device=engine.device)
        for mine in rank_chunks(len(dataset), micro, rank, world):
            batch = self.host_batch(self.pair_collator([dataset[i] for i in (mine or [0])]))
            logps = reference_logps(engine.module.model, to_device(batch, engine.device))
            if mine:
                table[mine.start : mine.stop] = logps.view(2, -1).T
        return all_reduce_sum(table)

    @staticmethod
    def metric_names(cfg: TrainConfig) -> tuple[str, ...]:
        """The metrics ``evaluate`` reports (what ``training.keep_best`` may name)."""
        return "eval_loss", "eval_reward_accuracy", "eval_reward_margin"

    @staticmethod
    def eval_sources(cfg: TrainConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return data_eval_sources(cfg)

    def evaluate(self, engine, dataset, collator, rank: int, world: int) -> dict[str, float]:
        """eval_loss (the mean pair loss), eval_reward_accuracy and eval_reward_margin over the whole dataset
        (``evaluate_examples`` without its rows)."""
        return self.evaluate_examples(engine, dataset, collator, rank, world)[0]

    @torch.no_grad()
    def evaluate_examples(self, engine, dataset, collator, rank: int,
                          world: int) -> tuple[dict[str, float], list[dict]]:
        """``evaluate``'s metrics and one row per pair of ``dataset``, in its order: index, where (its source row), the
        chosen and rejected log-probabilities under the edits (summed over each response), their rewards, the reward
        margin (chosen − rejected), whether the pair is ranked right (the chosen reward higher) and its loss; the
        metrics are the means of these rows. Each rank writes its pairs' rows of one device table and one reduction
        over the ranks fills it (every row is written by one rank only), read once; every rank runs as many forwards
        (see ``reference_table``)."""
        micro = self.cfg.training.micro_batch_size
        # per pair: loss, chosen and rejected log-probabilities, chosen and rejected rewards
        table = torch.zeros((len(dataset), 5), dtype=torch.float64, device=engine.device)
        engine.eval()
        for mine in rank_chunks(len(dataset), micro, rank, world):
            batch = to_device(self.host_batch(collator([dataset[i] for i in (mine or [0])])), engine.device)
            losses, chosen, rejected, logps = self.pair_losses(engine, batch, dataset)
            if mine:  # a contiguous run of rows: written through a slice, no index tensor sent to the device
                table[mine.start : mine.stop] = torch.cat([losses[:, None], logps, chosen[:, None],
                                                           rejected[:, None]], dim=1).double()
        engine.train()
        rows = [{"index": index, "where": dataset[index]["where"], "chosen_logp": chosen_logp,
                 "rejected_logp": rejected_logp, "chosen_reward": chosen, "rejected_reward": rejected,
                 "margin": chosen - rejected, "correct": chosen > rejected, "loss": loss}
                for index, (loss, chosen_logp, rejected_logp, chosen, rejected)
                in enumerate(all_reduce_sum(table).tolist())]
        metrics = {"eval_loss": sum(row["loss"] for row in rows) / len(rows),
                   "eval_reward_accuracy": sum(row["correct"] for row in rows) / len(rows),
                   "eval_reward_margin": sum(row["margin"] for row in rows) / len(rows)}
        return metrics, rows

    def trainable_base_parameters(self, base) -> list[torch.nn.Parameter]:
        return []  # the base stays frozen: only the interventions train

    @staticmethod
    def item_tokens(item: dict) -> int:
        return len(item["chosen"]["input_ids"]) + len(item["rejected"]["input_ids"])
