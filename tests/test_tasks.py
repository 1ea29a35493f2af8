"""The task seam (reft_fast.train.tasks): ``task:`` picks the class that supplies a job's data, loss and metrics, and
the recipe runs whatever task is registered."""

from __future__ import annotations

import json

import pytest
import torch

from dist.tiny import make_run


def test_an_unknown_task_is_a_config_error_naming_the_choices(tmp_path):
    from reft_fast.train.train_config import ConfigError, load_config, validate

    cfg = load_config(str(make_run(tmp_path)), ["task=summarization"])
    with pytest.raises(ConfigError, match=r"^task: expected one of \['causal_lm'.*got 'summarization'"):
        validate(cfg)


def test_causal_lm_is_the_default_task(tmp_path):
    from reft_fast.train.tasks import CausalLMTask, make_task
    from reft_fast.train.train_config import load_config

    cfg = load_config(str(make_run(tmp_path)))
    assert cfg.task == "causal_lm" and type(make_task(cfg)) is CausalLMTask


def test_the_recipe_runs_a_registered_task_and_logs_its_metrics(tmp_path, monkeypatch):
    """A task registered at run time: its loss is what trains (halved here, so the logged losses are half the plain
    task's), its evaluate's metrics reach metrics.jsonl and the result, and its config check runs in validation."""
    from reft_fast.train import tasks
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import ConfigError, load_config

    checked = []

    class HalfLossTask(tasks.CausalLMTask):
        @staticmethod
        def check_config(cfg):
            checked.append(cfg.task)
            if cfg.training.max_steps > 2:
                raise ConfigError("training.max_steps: at most 2 for this task")

        @staticmethod
        def loss(engine, batch):
            return tasks.CausalLMTask.loss(engine, batch) * 0.5

        def evaluate(self, engine, dataset, collator, rank, world):
            metrics = super().evaluate(engine, dataset, collator, rank, world)
            return {**metrics, "eval_examples": float(len(dataset))}

    monkeypatch.setitem(tasks.TASKS, "half", HalfLossTask)
    config = make_run(tmp_path, n_examples=20)
    overrides = ["training.max_steps=2", "data.eval_fraction=0.2", "training.log_every=1"]
    results = {}
    try:
        for task in ("causal_lm", "half"):
            cfg = load_config(str(config), overrides + [f"task={task}", f"output_dir={tmp_path / task}"])
            results[task] = ReftTrainingRecipe(cfg).run()
        with pytest.raises(ConfigError, match="at most 2"):
            ReftTrainingRecipe(load_config(str(config), ["task=half", "training.max_steps=3",
                                                         f"output_dir={tmp_path / 'refused'}"])).run()
    finally:
        shutdown()
    assert checked == ["half", "half"]
    plain, half = results["causal_lm"], results["half"]
    # Step 1 starts from the same weights, so its loss is exactly half; step 2 follows a different gradient scale
    # through AdamW (nearly scale-free), so only close.
    assert half.losses[0] == pytest.approx(plain.losses[0] / 2, rel=1e-6)
    assert [m["step"] for m in half.eval_metrics] == [0, 2]
    assert all(m["eval_examples"] == 4.0 for m in half.eval_metrics)
    assert "eval_examples" not in plain.eval_metrics[-1]
    # the eval loss is the plain task's (evaluate is not halved), at step 0 exactly
    assert half.eval_metrics[0]["eval_loss"] == pytest.approx(plain.eval_metrics[0]["eval_loss"], rel=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "eval_loss": half.eval_metrics[0]["eval_loss"], "eval_examples": 4.0}
    assert rows[-1]["step"] == 2 and rows[-1]["eval_examples"] == 4.0
    assert torch.isfinite(torch.tensor(half.losses)).all()


def test_every_registered_task_has_what_the_recipe_and_plan_ask_of_it():
    """The seam's contract (tasks.py docstring), checked on every task class: a task missing one fails here rather
    than in the middle of a run."""
    from reft_fast.train.tasks import TASKS
    from reft_fast.train.train_config import TrainConfig

    needed = ("auto_class", "base_kwargs", "generates", "check_config", "datasets", "bind_base", "collator",
              "host_batch", "loss", "evaluate", "metric_names", "eval_sources", "trainable_base_parameters",
              "item_tokens")
    for name, task_class in TASKS.items():
        task = task_class(TrainConfig(task=name))
        missing = [attribute for attribute in needed if not hasattr(task, attribute)]
        assert not missing, (name, missing)
        assert isinstance(task.base_kwargs, dict) and isinstance(task.auto_class, str), name


@pytest.mark.parametrize("total,micro,world", [(1, 4, 1), (7, 2, 3), (8, 2, 2), (9, 4, 2), (3, 4, 4), (13, 3, 5)])
def test_rank_chunks_give_every_example_to_one_rank_and_every_rank_the_same_forwards(total, micro, world):
    from reft_fast.train.distributed import rank_chunks

    shares = [list(rank_chunks(total, micro, rank, world)) for rank in range(world)]
    assert len({len(chunks) for chunks in shares}) == 1  # the same number of forwards on every rank (ZeRO-3)
    seen = [i for chunks in shares for mine in chunks for i in mine]
    assert sorted(seen) == list(range(total))  # each example once
    for chunks in shares:
        assert all(len(mine) <= micro and mine.step == 1 for mine in chunks)
        # chunk k of every rank lies in the k-th window of micro × world examples
        assert all(k * micro * world <= i < (k + 1) * micro * world for k, mine in enumerate(chunks) for i in mine)


def test_an_eval_file_beside_a_held_out_fraction_is_a_config_error(tmp_path):
    """Both named: the eval file was read and the fraction silently ignored (no example held out of training)."""
    from reft_fast.train.train_config import ConfigError, load_config, validate

    config = make_run(tmp_path)
    with pytest.raises(ConfigError, match=r"^data.eval_file: the config names 2 eval sets \(data.eval_file, "
                                          r"data.eval_fraction\); keep one$"):
        validate(load_config(str(config), ["data.eval_fraction=0.25", "data.eval_file=train.jsonl"]))
    validate(load_config(str(config), ["data.eval_fraction=0", "data.eval_file=train.jsonl"]))


@pytest.mark.parametrize("overrides, given", [
    ([], ()), (["data.eval_fraction=0.25"], ("data.eval_fraction",)),
    (["data.eval_file=train.jsonl"], ("data.eval_file",)),
])
def test_a_causal_lm_config_names_its_eval_set_in_the_data_section_only(tmp_path, overrides, given):
    from reft_fast.train.tasks import TASKS
    from reft_fast.train.train_config import ConfigError, load_config, validate

    config = make_run(tmp_path)
    cfg = load_config(str(config), ["data.eval_fraction=0", *overrides])
    assert TASKS["causal_lm"].eval_sources(cfg) == (given, ("data.eval_file", "data.eval_fraction"))
    if not given:  # the message names what this task can take: no classification key
        with pytest.raises(ConfigError, match=r"no eval set \(data.eval_file or data.eval_fraction\)$"):
            validate(load_config(str(config), ["data.eval_fraction=0", "training.keep_best=eval_loss"]))


def test_training_batches_keep_every_position_under_liger_fused_loss(tmp_path):
    """liger-kernel's fused linear cross-entropy views the kept hidden states [B, K, d] as [B·K, d]; a slice of the
    last K < T positions cannot be viewed so, and every trimmed training step raised on the GPU (H200, 2026-11-30).
    Training batches keep all positions when that loss is applied; evaluation, which makes logits, still trims."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reft_fast.train.fused_base import _APPLIED_ATTR
    from reft_fast.train.tasks import CausalLMTask
    from reft_fast.train.train_config import load_config

    cfg = load_config(str(make_run(tmp_path)), ["training.sample_prompts=[]"])
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    batch = {"input_ids": torch.ones(2, 6, dtype=torch.long),
             "labels": torch.tensor([[-100] * 4 + [5, 6], [-100] * 3 + [5, 6, 7]])}
    trimmed, full = [], []
    for applied, into in (((), trimmed), (("rms_norm", "fused_linear_cross_entropy"), full)):
        setattr(base, _APPLIED_ATTR, applied)  # what apply_fused_base_ops records (liger needs CUDA to apply it)
        task = CausalLMTask(cfg)
        task.tokenizer = None  # no prompt to check: datasets() sets it in a run
        task.bind_base(base)
        into.append((task.trim, task.host_batch(dict(batch))))
    assert trimmed[0][0] and trimmed[0][1]["labels"].shape[1] == 4 and trimmed[0][1]["logits_to_keep"] == 4
    assert full[0][0] and "logits_to_keep" not in full[0][1] and full[0][1]["labels"].shape[1] == 6


@pytest.mark.parametrize("bar", [False, True], ids=["logged", "bar"])
def test_an_evaluation_says_it_runs(tmp_path, caplog, capsys, bar):
    """The baseline evaluation runs before step 1 (38 s on a CPU with a bar at 0 and no word): rank 0 names what it
    evaluates, on the bar (its label and postfix) or, without one, in a logged line."""
    import logging

    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    overrides = ["training.max_steps=1", "data.eval_fraction=0.2", f"training.progress_bar={str(bar).lower()}",
                 f"output_dir={tmp_path / 'run'}"]
    caplog.set_level(logging.INFO, logger="reft_fast.train.recipe")
    try:
        ReftTrainingRecipe(load_config(str(make_run(tmp_path, n_examples=20)), overrides)).run()
    finally:
        shutdown()
    said = capsys.readouterr().err if bar else caplog.text
    assert "evaluating the untrained interventions on 4 examples" in said, said[-2000:]
    assert "evaluating step 1 on 4 examples" in said
    if bar:
        assert "eval:" in said and said.rstrip().split("\r")[-1].startswith("train:")  # labelled train again after
