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
    # pyreft's layout (its trainer saves into <dir>/intervenable_model), which both loaders read.
    reloaded = ReftModel.load(str(tmp_path / "saved" / "intervenable_model"), model)
    for a, b in zip(reft_model.trainable_parameters(), reloaded.trainable_parameters()):
        assert torch.equal(a.detach(), b.detach())
    fresh = get_reft_model(model, reft_config := ReftConfig(representations={
        "layer": 1, "component": "block_output", "low_rank_dimension": 4,
        "intervention": LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4)}))
    fresh.load_intervention(str(tmp_path / "saved" / "intervenable_model"))
    assert fresh.reft_config is reft_config
    for a, b in zip(reft_model.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(a.detach(), b.detach())


def _weights(reft_model) -> dict:
    return {k: v.detach().clone() for k, v in reft_model.interventions.state_dict().items()}


def test_checkpoints_and_load_best_model_at_end_as_pyreft(tmp_path):
    # pyreft's trainer writes checkpoint-N/intervenable_model (pyvene's save_intervention) and its
    # _load_best_model calls reft_model.load_intervention on it; scripts load checkpoints from that path. reft_fast's
    # trainer wrote the ReftModel directory into checkpoint-N itself.
    model_dir = make_model_dir(tmp_path / "model", layers=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reft_config = ReftConfig(representations={
        "layer": 1, "component": "block_output", "low_rank_dimension": 4,
        "intervention": LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4)})
    reft_model = get_reft_model(model, reft_config)
    examples = make_examples(8, seed=2)
    data_module = make_last_position_supervised_data_module(tokenizer, model, [e["instruction"] for e in examples],
                                                            [e["output"] for e in examples])
    evaluations = iter(range(100))
    args = transformers.TrainingArguments(num_train_epochs=3, output_dir=str(tmp_path / "out"),
                                          per_device_train_batch_size=8, learning_rate=2e-2, report_to=[],
                                          use_cpu=True, eval_strategy="epoch", save_strategy="epoch",
                                          load_best_model_at_end=True, metric_for_best_model="first",
                                          greater_is_better=True, seed=0)
    data_module["eval_dataset"] = data_module["train_dataset"]
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **data_module,
                                     compute_metrics=lambda _: {"first": -next(evaluations)})  # the 1st is best
    trainer.train()
    checkpoints = [tmp_path / "out" / f"checkpoint-{step}" / "intervenable_model" for step in (1, 2, 3)]
    assert trainer.state.best_model_checkpoint == str(checkpoints[0].parent)
    saved = []
    for checkpoint in checkpoints:
        loaded = ReftModel.load(checkpoint, transformers.AutoModelForCausalLM.from_pretrained(model_dir))
        saved.append(_weights(loaded))
    final = _weights(reft_model)
    assert not all(torch.equal(final[k], v) for k, v in saved[2].items())  # not the last checkpoint's weights
    assert all(torch.equal(final[k], v) for k, v in saved[0].items())  # the best one's, loaded in place


def test_resuming_from_a_pyreft_trainer_checkpoint_is_refused_before_any_weight_changes(tmp_path):
    # pyreft's trainer puts every intervention parameter in the no-decay optimizer group; reft_fast's splits weights
    # from biases. Resuming from pyreft's checkpoint loaded its weights in place, then failed in Trainer on
    # optimizer.pt ("loaded state dict contains a parameter group that doesn't match the size of optimizer's group").
    import shutil
    from types import SimpleNamespace

    import pytest

    pyreft = pytest.importorskip("pyreft")
    model_dir = make_model_dir(tmp_path / "model", layers=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    theirs = pyreft.get_reft_model(model, pyreft.ReftConfig(representations={
        "layer": 1, "component": "block_output", "low_rank_dimension": 4,
        "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4,
                                                  dtype=torch.float32)}), set_device=False)
    reft_model = get_reft_model(model, ReftConfig(representations={
        "layer": 1, "component": "block_output", "low_rank_dimension": 4,
        "intervention": LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4)}))
    examples = make_examples(8, seed=2)
    data_module = make_last_position_supervised_data_module(tokenizer, model, [e["instruction"] for e in examples],
                                                            [e["output"] for e in examples])
    args = transformers.TrainingArguments(num_train_epochs=2, output_dir=str(tmp_path / "out"),
                                          per_device_train_batch_size=8, learning_rate=2e-2, report_to=[],
                                          use_cpu=True, save_strategy="epoch", seed=0)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **data_module)
    trainer.train()
    ours, pyreft_checkpoint = tmp_path / "out" / "checkpoint-1", tmp_path / "pyreft" / "checkpoint-1"
    shutil.copytree(ours, pyreft_checkpoint, ignore=shutil.ignore_patterns("intervenable_model", "optimizer.pt"))
    pyreft.ReftTrainer.save_model(SimpleNamespace(model=theirs), str(pyreft_checkpoint))  # pyreft 0.1.0's own
    optimizer = torch.optim.AdamW([{"params": [], "weight_decay": 0.0},  # pyreft's trainer's groups
                                   {"params": list(theirs.parameters()), "weight_decay": 0.0}])
    torch.save(optimizer.state_dict(), pyreft_checkpoint / "optimizer.pt")

    before = _weights(reft_model)
    with pytest.raises(ValueError, match="written by pyreft's trainer.*reft_model.load_intervention\\("):
        trainer.train(resume_from_checkpoint=str(pyreft_checkpoint))
    assert all(torch.equal(before[k], v) for k, v in _weights(reft_model).items())
