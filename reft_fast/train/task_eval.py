"""``reft-fast eval`` for the tasks scored by their own metrics rather than by generated answers (classification:
accuracy, F1, MCC, Pearson/Spearman; preference: reward accuracy and margin).

A finished run is evaluated exactly as training evaluated it: the base loaded by the task's model class, the trained
base parameters (a classifier head) put back, the interventions loaded, the whole wrapped by ``deepspeed.initialize``
as in training (any rank count; each rank takes its share of the examples) and the task's own ``evaluate_examples``
run over the eval set the config names (``data.eval_file``, the task's eval split, or the held-out
``data.eval_fraction``); with ``data.selection_examples``, over its test part only (training evaluated, and chose the
kept model, on the other part). Besides the metrics, one row per example (``write_predictions``), in the eval set's
order whatever the rank count (``cli`` writes them as JSONL beside the metrics).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from reft_fast.train.files import replace_atomically
from reft_fast.train.train_config import ConfigError, TrainConfig

__all__ = ["evaluate_run", "metrics_table", "scored_part", "write_metrics"]


def scored_part(cfg: TrainConfig) -> str:
    """What ``evaluate_run`` scores, in words."""
    rule = cfg.data.selection_examples
    if rule is None:
        return "the eval set"
    return (f"the test part of the eval set (data.selection_examples={rule}: training evaluated only the selection "
            "part)")


def evaluate_run(cfg: TrainConfig, reft_dir: Path, rank: int, world: int) -> tuple[dict[str, float], list[dict]]:
    """The task's eval metrics of the interventions (and trained base parameters) saved in ``reft_dir``, and one row
    per evaluated example, in the eval set's order (every rank gets both)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from reft_fast.core.model import ReftModel
    from reft_fast.core.saving import ReftLoadError, trainable_base_names
    from reft_fast.train.ds_config import build_ds_config
    from reft_fast.train.loading import load_base_model, load_tokenizer, model_source
    from reft_fast.train.run_dir import load_trainable_base
    from reft_fast.train.tasks import make_task, task_datasets

    task = make_task(cfg)
    if hasattr(task, "unlabelled_eval"):  # classification: data without labels (a GLUE test split) is predicted
        task.unlabelled_eval = True
    source = model_source(cfg)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    # the training data is read only where the eval set is held out of it (not for --data or data.eval_file)
    _, eval_set = task_datasets(task, tokenizer, cfg.training.seed, eval_part="test", read_train=False)
    if eval_set is None:
        raise ConfigError("--data: required (the config names no eval data: data.eval_file, an eval split or "
                          "data.eval_fraction)")
    ds_config = build_ds_config(cfg, world)
    base, _ = load_base_model(source, cfg, ds_config, auto_class=task.auto_class, model_kwargs=task.base_kwargs,
                              restored=trainable_base_names(reft_dir))
    if ds_config["zero_optimization"]["stage"] < 3:
        base.to(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    try:
        load_trainable_base(base, reft_dir)
        task.bind_base(base)
        reft_model = ReftModel.load(str(reft_dir), base)
    except ReftLoadError as err:  # a damaged or foreign directory: said plainly, as a bad path is
        raise ConfigError(f"{reft_dir}: {err}") from None
    engine, *_ = deepspeed.initialize(model=reft_model, config=ds_config)
    collator = task.collator(tokenizer, len(reft_model.interventions))
    metrics, rows = task.evaluate_examples(engine, eval_set, collator, rank, world)
    return {"examples": len(eval_set), **metrics}, rows


def metrics_table(metrics: dict[str, float]) -> str:
    width = max(map(len, metrics))
    return "\n".join(f"{name:<{width}}  {value:.4f}" if name != "examples" else f"{name:<{width}}  {int(value)}"
                     for name, value in metrics.items())


def write_metrics(path: Path, metrics: dict[str, float], reft_dir: Path, scored: str) -> None:
    """The metrics as one JSON object, with the interventions' directory and what was scored (``scored_part``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, json.dumps({"interventions": str(reft_dir), "scored": scored, **metrics}, indent=1)
                       + "\n")
