"""pyreft-compatible trainers: a pyreft training script runs after changing only its import.

    data_module = reft_fast.make_last_position_supervised_data_module(tokenizer, model, prompts, answers)
    trainer = reft_fast.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args, **data_module)
    trainer.train()

A thin subclass of ``transformers.Trainer`` (which drives DeepSpeed itself through ``TrainingArguments(deepspeed=...)``):
the loss is the ReftModel's forward with the collator's ``intervention_locations`` tensor, the same data and model
code the reft_fast engine uses. Saving writes the interventions in the ReftModel format.
"""

from __future__ import annotations

from typing import Optional

import transformers

__all__ = ["ReftTrainer", "ReftTrainerForCausalLM"]

# The dataset items' keys (Trainer drops item keys that are not listed) and the collated batch's.
_BATCH_KEYS = ["input_ids", "attention_mask", "labels", "prompt_length", "intervention_locations"]


class ReftTrainer(transformers.Trainer):
    def __init__(self, *args, tokenizer=None, **kwargs):
        # pyreft passes tokenizer=, which transformers ≥ 5 renamed processing_class.
        if tokenizer is not None and "processing_class" not in kwargs:
            kwargs["processing_class"] = tokenizer
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        # The ReftModel's forward takes `base`, not the batch's keys: keep the collator's columns as they are.
        if self._signature_columns is None:
            self._signature_columns = list(_BATCH_KEYS)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch: Optional[int] = None):
        base = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        _, outputs = model(base, intervention_locations=inputs["intervention_locations"], labels=inputs["labels"])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        output_dir = output_dir or self.args.output_dir
        if self.is_world_process_zero():
            self.accelerator.unwrap_model(self.model).save(output_dir)


class ReftTrainerForCausalLM(ReftTrainer):
    """pyreft's name for the causal-LM trainer."""
