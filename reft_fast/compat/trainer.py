"""pyreft's trainers on today's transformers: a pyreft training script runs after changing only its import.

    data_module = pyreft.make_last_position_supervised_data_module(tokenizer, model, prompts, answers)
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args, **data_module)
    trainer.train()

Thin subclasses of ``transformers.Trainer`` (which drives DDP and DeepSpeed itself through
``TrainingArguments(deepspeed=...)``). What differs from pyreft 0.1.0, which breaks on transformers ≥ 4.46:
``tokenizer=`` is passed on as ``processing_class=``; ``compute_loss`` takes the ``num_items_in_batch`` that
transformers now passes (a subclass's own ``compute_loss`` written to pyreft's signature, as in pyreft's reward
and DPO examples, gets it dropped), and the loss stays pyreft's (each micro-batch's mean, averaged over gradient
accumulation); the locations reach the model as one device tensor (no ``.tolist()`` host sync per step).

Locations. The batch's ``intervention_locations`` is pyreft's [batch, n_interventions, positions] (what
``reft_fast.compat.data``'s collators produce, and what a pyreft collator built on Hugging Face's produces); the
trainers check its shape against the batch and the model and transpose it to the model's layout on the device.
reft_fast's engine collator (``reft_fast.train.data.ReftDataCollator``) produces the model's layout and is refused.

Checkpoints. As pyreft's, ``save_model(dir)`` (each ``checkpoint-N`` too) writes ``dir/intervenable_model`` with the
ReftModel's ``save_intervention``: our directory (config.json, interventions.safetensors, and
``base_trainable.safetensors`` when base parameters were made trainable, e.g. a classifier head), so a pyreft script's
``reft_model.load_intervention(".../checkpoint-N/intervenable_model")`` works, and so does ``ReftModel.load`` on it.
Resuming and ``load_best_model_at_end`` read a checkpoint back in place with ``load_intervention``: ours, pyreft's
trainer's (intkey_*.bin), or one written before this layout (the ReftModel directory directly in ``checkpoint-N``).
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Optional

import torch
import transformers
from torch.nn import functional as F

from reft_fast.compat.pyreft import holds_pyreft_weights
from reft_fast.train import data as engine_data

__all__ = ["ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForCausalLMDistributed",
           "ReftTrainerForSequenceClassification"]

# The folder of a checkpoint (or of save_model's directory) that holds the interventions, named as pyreft's trainer
# names it (pyreft 0.1.0, ReftTrainer.save_model).
INTERVENTIONS_DIR = "intervenable_model"

# The items' and batches' keys a Trainer must keep (it drops the keys that the model's forward does not name, and
# ReftModel.forward takes `base`, not these).
_BATCH_KEYS = ["input_ids", "attention_mask", "labels", "label", "label_ids", "intervention_locations"]


class ReftTrainer(transformers.Trainer):
    """pyreft's base trainer: the loss is the base model's own (``labels`` passed through)."""

    def __init__(self, *args, tokenizer=None, **kwargs):
        if tokenizer is not None and "processing_class" not in kwargs:
            kwargs["processing_class"] = tokenizer  # pyreft's keyword; transformers 5 renamed it
        super().__init__(*args, **kwargs)
        # The loss is each micro-batch's mean; the Trainer then divides by the accumulation steps (pyreft's loss).
        self.model_accepts_loss_kwargs = False
        if isinstance(self.data_collator, engine_data.ReftDataCollator):
            raise TypeError(
                "reft_fast.train.data.ReftDataCollator lays locations out [n_interventions, batch, positions] for "
                "reft_fast's engine; pyreft's trainers take pyreft's [batch, n_interventions, positions]: use "
                "reft_fast.ReftDataCollator(data_collator=transformers.DataCollatorForSeq2Seq(...)) or "
                "make_last_position_supervised_data_module / make_multiple_position_supervised_data_module")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # pyreft's examples subclass its trainer with compute_loss(self, intervenable, inputs, return_outputs=False),
        # which transformers >= 4.46 calls with num_items_in_batch too (a TypeError on the first step).
        if "compute_loss" in vars(cls) and not _takes_num_items_in_batch(cls.compute_loss):
            cls.compute_loss = _dropping_num_items_in_batch(cls.compute_loss)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(_BATCH_KEYS)

    def _reft_model(self):
        return self.accelerator.unwrap_model(self.model)

    def _model_locations(self, inputs: dict) -> torch.Tensor:
        """The batch's pyreft-layout locations, checked, as the model's [n_interventions, batch, positions]."""
        if "subspaces" in inputs:
            raise ValueError("pyreft's per-example 'subspaces' are not supported: every reft_fast intervention edits "
                             "its whole low-rank subspace")
        if "intervention_locations" not in inputs:
            raise ValueError("the batch has no 'intervention_locations': build the data with "
                             "make_last_position_supervised_data_module (or a ReftDataset) and ReftDataCollator")
        locations = inputs["intervention_locations"]
        batch = inputs["input_ids"].shape[0]
        n = len(self._reft_model().interventions)
        if not isinstance(locations, torch.Tensor) or locations.dim() != 3:
            shape = list(locations.shape) if isinstance(locations, torch.Tensor) else type(locations).__name__
            raise ValueError(f"intervention_locations must be a tensor [batch, n_interventions, positions] (pyreft's "
                             f"layout), got {shape}; pyreft's 2-D 'LoRA only' locations are not supported (a "
                             "ReftModel always has interventions)")
        if locations.shape[0] != batch or locations.shape[1] != n:
            hint = ""
            if locations.shape[0] == batch:  # the usual cause: the data module's num_interventions default of 1
                hint = (f" (the data has locations for {locations.shape[1]} intervention(s): build it with "
                        f"num_interventions={n}, e.g. make_last_position_supervised_data_module(..., "
                        f"num_interventions={n}))")
            raise ValueError(f"intervention_locations has shape {list(locations.shape)}; pyreft's layout for this "
                             f"batch is [batch={batch}, n_interventions={n}, positions]{hint}")
        return locations.permute(1, 0, 2)

    def _intervened_forward(self, model, inputs: dict, **model_kwargs):
        base = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        # No KV cache: training never reuses it, and evaluation would try to gather it as a prediction.
        _, outputs = model(base, intervention_locations=self._model_locations(inputs), use_cache=False,
                           **model_kwargs)
        return outputs

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        outputs = self._intervened_forward(model, inputs, labels=inputs["labels"])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        output_dir = output_dir or self.args.output_dir
        if not self.is_world_process_zero():
            return
        self._reft_model().save_intervention(os.path.join(output_dir, INTERVENTIONS_DIR), include_model=True)

    def _load_saved(self, checkpoint: str) -> None:
        """Load the interventions saved in ``checkpoint`` into the trained ReftModel in place (resume, best model at
        the end): its ``intervenable_model`` folder, or the checkpoint itself where that is where they are."""
        directory = os.path.join(checkpoint, INTERVENTIONS_DIR)
        self._reft_model().load_intervention(directory if os.path.isdir(directory) else checkpoint,
                                             include_model=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        interventions = Path(resume_from_checkpoint, INTERVENTIONS_DIR)
        if holds_pyreft_weights(interventions) or holds_pyreft_weights(Path(resume_from_checkpoint)):
            # pyreft's trainer puts every intervention parameter in the no-decay group (its optimizer sees names
            # that its weight-decay filter never lists), ours splits weights from biases as transformers does: its
            # optimizer.pt cannot be loaded here, and Trainer would fail on it after the weights had changed.
            raise ValueError(
                f"{resume_from_checkpoint} was written by pyreft's trainer: its optimizer state groups the parameters "
                "differently and cannot be resumed by reft_fast's trainer. Load its weights and start a new run "
                f"instead: reft_model.load_intervention({str(interventions)!r}); trainer.train()")
        self._load_saved(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_saved(self.state.best_model_checkpoint)


def _takes_num_items_in_batch(compute_loss) -> bool:
    parameters = inspect.signature(compute_loss).parameters.values()
    return any(p.name == "num_items_in_batch" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _dropping_num_items_in_batch(compute_loss):
    @functools.wraps(compute_loss)
    def compute_loss_without_num_items(self, model, inputs, *args, num_items_in_batch=None, **kwargs):
        return compute_loss(self, model, inputs, *args, **kwargs)
    return compute_loss_without_num_items


class ReftTrainerForCausalLM(ReftTrainer):
    """pyreft's causal-LM trainer (the labels' next-token loss)."""


class ReftTrainerForCausalLMDistributed(ReftTrainerForCausalLM):
    """pyreft's multi-process causal-LM trainer. transformers.Trainer already shards the data per process (its
    sampler goes through accelerate) and ``save_model`` writes on the main process only, so it is the same class."""


class ReftTrainerForSequenceClassification(ReftTrainer):
    """pyreft's classification trainer: the loss follows the base config's ``problem_type`` (or, when unset, as
    transformers infers it: regression for one label, single-label for integer labels, multi-label otherwise).

    The base is any sequence-classification model whose layers ReftModel finds: encoders (RoBERTa, BERT, DeBERTa,
    DistilBERT: pyreft's GLUE runs) and decoders (``LlamaForSequenceClassification``). A head made trainable before
    the trainer is built (``requires_grad_(True)``, pyreft's ``allow_cls_grad``; ``task_classification.head_parameters``
    finds it) is in the Trainer's optimizer, and ``save_model`` writes it next to the interventions.
    """

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        outputs = self._intervened_forward(model, inputs)
        loss = _classification_loss(outputs.logits, inputs["labels"], self._reft_model().model.config)
        return (loss, outputs) if return_outputs else loss


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"ReftTrainerForSequenceClassification needs a sequence-classification base (logits "
                         f"[batch, num_labels]); this base returned logits of shape {list(logits.shape)} — use "
                         "ReftTrainerForCausalLM for a causal LM")
    num_labels = logits.shape[-1]
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif not labels.dtype.is_floating_point:
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression" and num_labels == 1:
        return F.mse_loss(logits.view(-1), labels.to(logits.dtype).view(-1))
    if problem == "regression":
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"config.problem_type {problem!r} is not one of regression, single_label_classification, "
                     "multi_label_classification")
