"""pyreft-compatible ReftTrainerForCausalLM: a pyreft training script with only the import changed."""

import torch
import transformers

from reft_fast.compat import make_last_position_supervised_data_module
from reft_fast.core.config import ReftConfig
from reft_fast.core.interventions import LoreftIntervention
from reft_fast.compat.trainer import ReftTrainerForCausalLM
from reft_fast.core.model import ReftModel, get_reft_model

from dist.tiny import make_examples, make_model_dir


def test_pyreft_style_script_trains_and_saves(tmp_path):
    model_dir = make_model_dir(tmp_path / "model", layers=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    # --- as in pyreft's README, with `pyreft.` replaced by reft_fast imports ---
    reft_config = ReftConfig(representations={
        "layer": 1, "component": "block_output", "low_rank_dimension": 4,
        "intervention": LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4)})
    reft_model = get_reft_model(model, reft_config)
    examples = make_examples(16, seed=1)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": e["instruction"]}], tokenize=False,
                                             add_generation_prompt=True) for e in examples]
    data_module = make_last_position_supervised_data_module(tokenizer, model, prompts,
                                                            [e["output"] for e in examples])
    args = transformers.TrainingArguments(num_train_epochs=4, output_dir=str(tmp_path / "out"),
                                          per_device_train_batch_size=8, learning_rate=2e-2, logging_steps=1,
                                          report_to=[], use_cpu=True, save_strategy="no", seed=0)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **data_module)
    result = trainer.train()
    # ---
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and result.global_step == 8
    assert losses[-1] < losses[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, frozen[key]), key  # the base never moves
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = ReftModel.load(str(tmp_path / "saved"), model)
    for a, b in zip(reft_model.trainable_parameters(), reloaded.trainable_parameters()):
        assert torch.equal(a.detach(), b.detach())
