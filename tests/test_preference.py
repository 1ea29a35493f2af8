"""Preference training (task: preference, reft_fast.train.task_preference): the DPO and SimPO objectives, the reference
model (the base without edits), one forward per batch for both responses, learning on a tiny random Llama, and a
2-rank ZeRO-2 run against one rank."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from dist.tiny import WORDS, launch_ranks, make_run, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
# A preference the interventions can learn, whatever the prompt: the chosen answer names colours, the rejected one
# animals (a style, as "answer like a pirate" is).
COLOURS, ANIMALS = "red green blue black white".split(), "cat dog bird fish cow".split()
LEARNING = ["interventions.positions=l1", "preference.beta=0.5", "training.lr=2e-2", "training.max_steps=8",
            "training.eval_every=4", "training.log_every=1"]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words, length = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))], rng.randint(1, 3)
        pairs.append({"instruction": "repeat : " + " ".join(words),
                      "chosen": " ".join(rng.choice(COLOURS) for _ in range(length)),
                      "rejected": " ".join(rng.choice(ANIMALS) for _ in range(length))})
    return pairs


def preference_run(folder: Path, n_pairs: int = 64) -> tuple[Path, list[str]]:
    """A tiny model, a preference set and a config; returns the config and the overrides that make it a preference
    run with a quarter of the pairs held out."""
    config = make_run(folder, n_examples=8)
    write_jsonl(folder / "pairs.jsonl", make_pairs(n_pairs))
    return config, ["task=preference", "data.train_file=pairs.jsonl", "data.eval_fraction=0.25"]


# ----------------------------------------------------------------------------------------------------------------------
# The objectives
# ----------------------------------------------------------------------------------------------------------------------
def test_dpo_loss_and_rewards_match_hand_computed_values():
    from reft_fast.train.task_preference import dpo_loss

    # β(c − c₀) = 0.1·(−5 + 6) = 0.1; β(r − r₀) = 0.1·(−7 + 6.5) = −0.05; x = 0.15; −log σ(0.15) = log(1 + e^−0.15)
    args = [torch.tensor([v]) for v in (-5.0, -7.0, -6.0, -6.5)]
    losses, chosen, rejected = dpo_loss(*args, beta=0.1)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.05)
    assert losses.item() == pytest.approx(0.6209570, rel=1e-6)
    # label smoothing 0.2: 0.8·log(1 + e^−0.15) + 0.2·log(1 + e^0.15) = log(1 + e^−0.15) + 0.2·0.15
    smoothed, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.6509570, rel=1e-6)


def test_simpo_loss_is_length_normalized_with_a_target_margin():
    from reft_fast.train.task_preference import sequence_logps, simpo_loss

    # Mean log-probs −6/3 = −2 and −12/4 = −3; β = 2, γ = 1: x = 2·(−2) − 2·(−3) − 1 = 1; −log σ(1) = log(1 + e^−1)
    losses, chosen, rejected = simpo_loss(torch.tensor([-6.0 / 3]), torch.tensor([-12.0 / 4]), beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(0.3132617, rel=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((-4.0, -6.0))
    # The per-row sums and counts it normalizes with: labelled tokens only, position t predicting label t + 1.
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    sums, counts = sequence_logps(logits, labels)
    log_probs = logits.log_softmax(-1)
    expected = [sum(float(log_probs[b, t - 1, labels[b, t]]) for t in range(1, 5) if labels[b, t] != -100)
                for b in range(2)]
    assert counts.tolist() == [3, 2]
    assert sums.tolist() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# One training run shared by the reference, forward-count and learning tests
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """8 steps of DPO on 48 pairs (16 held out), with every base forward inside the task's loss counted."""
    from reft_fast.train import tasks
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.task_preference import PreferenceTask
    from reft_fast.train.train_config import load_config

    class CountingPreferenceTask(PreferenceTask):
        forwards_per_loss: list = []  # per loss call: the batch size of each base forward it ran
        forwards_before_training: list = []  # the same for before_training

        def _counted(self, engine, log: list, call):
            rows = []
            handle = engine.module.model.register_forward_pre_hook(
                lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
            try:
                return call()
            finally:
                handle.remove()
                log.append(rows)

        def loss(self, engine, batch):
            return self._counted(engine, self.forwards_per_loss, lambda: super(CountingPreferenceTask, self).loss(
                engine, batch))

        def before_training(self, engine):
            return self._counted(engine, self.forwards_before_training,
                                 lambda: super(CountingPreferenceTask, self).before_training(engine))

    folder = tmp_path_factory.mktemp("preference")
    config, overrides = preference_run(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tasks.TASKS, "counted_preference", CountingPreferenceTask)
        cfg = load_config(str(config), overrides + LEARNING + ["task=counted_preference"])
        recipe = ReftTrainingRecipe(cfg)
        try:
            result = recipe.run()
        finally:
            shutdown()
    return folder, recipe, result


def test_the_reference_is_the_plain_base_exactly(learned):
    """The cached reference log-probs of every training pair equal those of the base loaded alone, with no ReftModel
    attached, bitwise; the trained interventions do change the policy's log-probs."""
    from transformers import AutoModelForCausalLM

    from reft_fast.train.task_preference import reference_logps, sequence_logps

    folder, recipe, _ = learned
    task = recipe.task
    train_set = task.train_set
    _, table = task.reference_tables[id(train_set)]
    plain = AutoModelForCausalLM.from_pretrained(folder / "model", torch_dtype=torch.float32,
                                                 attn_implementation="sdpa")
    micro = recipe.cfg.training.micro_batch_size
    for start in range(0, len(train_set), micro):
        batch = task.host_batch(task.pair_collator([train_set[i] for i in range(start, min(start + micro,
                                                                                           len(train_set)))]))
        expected = reference_logps(plain, batch).view(2, -1).T
        assert torch.equal(table[start : start + micro], expected)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            policy = recipe.reft_model(inputs, intervention_locations=batch["intervention_locations"],
                                       logits_to_keep=batch["logits_to_keep"])[1]
        assert not torch.allclose(sequence_logps(policy.logits, batch["labels"])[0].view(2, -1).T, expected)


def test_one_forward_per_batch_for_both_responses(learned):
    """Every loss call runs the base once over the 2B rows (chosen and rejected stacked); the reference table is
    built once, before training: one forward of both responses per chunk of micro_batch_size pairs."""
    _, recipe, result = learned
    calls = recipe.task.forwards_per_loss
    micro = recipe.cfg.training.micro_batch_size
    assert len(calls) == result.steps == 8
    chunks = math.ceil(len(recipe.train_set) / micro)
    assert recipe.task.forwards_before_training == [[2 * micro] * chunks]  # the table's chunks, both responses
    assert all(rows == [2 * micro] for rows in calls)


def test_reward_accuracy_rises_on_a_learnable_rule(learned):
    folder, _, result = learned
    first, last = result.eval_metrics[0], result.eval_metrics[-1]
    assert [m["step"] for m in result.eval_metrics] == [0, 4, 8]
    assert first["eval_reward_accuracy"] <= 0.6 and last["eval_reward_accuracy"] >= 0.9
    assert last["eval_loss"] < first["eval_loss"] - 0.1 and last["eval_reward_margin"] > 0.2
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_reward_accuracy"] == last["eval_reward_accuracy"]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))


# ----------------------------------------------------------------------------------------------------------------------
# Reference modes, SimPO, configuration
# ----------------------------------------------------------------------------------------------------------------------
def test_per_step_reference_trains_like_the_cached_one_and_simpo_runs(tmp_path):
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    config, overrides = preference_run(tmp_path, n_pairs=24)
    results = {}
    try:
        for name, extra in {"cached": [], "per_step": ["preference.reference=per_step"],
                            "simpo": ["preference.loss=simpo"]}.items():
            cfg = load_config(str(config), overrides + extra + ["training.max_steps=3", f"output_dir={tmp_path / name}"])
            recipe = ReftTrainingRecipe(cfg)
            results[name] = (recipe, recipe.run())
    finally:
        shutdown()
    (cached_recipe, cached), (_, per_step) = results["cached"], results["per_step"]
    assert per_step.losses == pytest.approx(cached.losses, rel=1e-5)
    assert per_step.eval_metrics[-1]["eval_loss"] == pytest.approx(cached.eval_metrics[-1]["eval_loss"], rel=1e-5)
    assert len(cached_recipe.task.reference_tables) == 2  # the training and the eval set, each built once
    simpo_recipe, simpo = results["simpo"]
    assert simpo_recipe.task.reference_tables == {}  # SimPO has no reference
    assert simpo.losses[0] != pytest.approx(cached.losses[0], rel=1e-3)
    assert all(math.isfinite(v) for v in simpo.losses) and "eval_reward_accuracy" in simpo.eval_metrics[-1]


@pytest.mark.parametrize("override, message", [
    ("data.packing=true", r"^data.packing: task: preference does not pack"),
    ("preference.loss=ipo", r"^preference.loss: expected one of \['dpo', 'simpo'\], got 'ipo'"),
    ("preference.beta=0", r"^preference.beta: must be a finite number > 0"),
    ("preference.beta=.nan", r"^preference.beta: must be a finite number > 0, got nan"),
    ("preference.simpo_gamma=-0.5", r"^preference.simpo_gamma: must be a finite number >= 0, got -0.5"),
    ("preference.simpo_gamma=.inf", r"^preference.simpo_gamma: must be a finite number >= 0, got inf"),
    ("preference.label_smoothing=0.5", r"^preference.label_smoothing: must be in \[0, 0.5\)"),
    ("preference.reference=never", r"^preference.reference: expected one of \['cached', 'per_step'\]"),
    ("preference.rejected_field=chosen", r"^preference.rejected_field: the same field as preference.chosen_field"),
    # data settings a preference run cannot use (they were silently ignored)
    ("data.response_template='{chosen}'", r"^data.response_template: task: preference reads its two responses"),
    ("data.eval_family=exact", r"^data.eval_family: scores generated answers"),
])
def test_bad_preference_settings_are_config_errors_naming_the_field(tmp_path, override, message):
    from reft_fast.train.train_config import ConfigError, load_config, validate

    config, overrides = preference_run(tmp_path, n_pairs=8)
    with pytest.raises(ConfigError, match=message):
        validate(load_config(str(config), overrides + [override]))


def test_pairs_from_jsonl_with_renamed_fields_and_a_missing_field_named(tmp_path):
    from dist.tiny import make_tokenizer
    from reft_fast.train.task_preference import PreferenceDataset, load_preference_examples

    rows = [{"q": "big : red", "good": "big", "bad": "small"}, {"q": "hot : sky sea", "good": "hot", "bad": "cold"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    examples = load_preference_examples(str(path), "q", "good", "bad")
    assert examples[1] == {"prompt": "hot : sky sea", "chosen": "hot", "rejected": "cold", "where": f"{path}:2"}
    pairs = PreferenceDataset(examples, make_tokenizer(), max_length=32)
    chosen, rejected = pairs[0]["chosen"], pairs[0]["rejected"]
    # The chat template is applied to both sides; they share the prompt tokens and differ in the response.
    assert chosen["prompt_length"] == rejected["prompt_length"]
    prompt = chosen["input_ids"][: chosen["prompt_length"]]
    assert rejected["input_ids"][: rejected["prompt_length"]] == prompt and chosen["input_ids"] != rejected["input_ids"]
    assert make_tokenizer().decode(prompt).startswith("<|user|> big : red")
    with pytest.raises(ValueError, match=r"no field 'worse'.*; set preference.rejected_field$"):  # not response_field
        load_preference_examples(str(path), "q", "good", "worse")


def test_pairs_without_a_preference_are_dropped_and_each_drop_is_said_once(tmp_path, caplog):
    """A pair whose two rows are the same tokens (the same response, or two responses cut at max_length within a
    beginning they share) has a zero margin whatever the edits: no gradient, yet it counted in the mean and in the
    reward accuracy. Such pairs are dropped with one warning naming them; a prompt too long is said once, not once per
    side (both were logged twice)."""
    from dist.tiny import make_tokenizer
    from reft_fast.train.task_preference import PreferenceDataset, load_preference_examples

    shared = " ".join(["red"] * 30)
    rows = [{"instruction": "big : red", "chosen": "big", "rejected": "small"},
            {"instruction": "hot : sky", "chosen": "hot", "rejected": "hot"},  # the same response
            {"instruction": "up : sea", "chosen": shared + " up", "rejected": shared + " down"},  # cut alike at 32
            {"instruction": "repeat : " + " ".join(["red"] * 40), "chosen": "a", "rejected": "b"},  # prompt too long
            {"instruction": "cold : sun", "chosen": "cold", "rejected": "hot"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    examples = load_preference_examples(str(path), "instruction", "chosen", "rejected")
    with caplog.at_level("WARNING"):
        pairs = PreferenceDataset(examples, make_tokenizer(), max_length=32, drop_long_prompts=True)
    assert [pair["where"] for pair in pairs] == [f"{path}:1", f"{path}:5"]
    assert [pair["index"] for pair in pairs] == [0, 1] and pairs.num_dropped == 3
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "prompt alone exceeds" in m]) == 1
    tied = [m for m in messages if "carry no preference" in m]
    assert len(tied) == 1 and "dropped 2 of 4 pairs" in tied[0] and f"{path}:2, {path}:3" in tied[0]
    with pytest.raises(ValueError, match=rf"every pair's chosen and rejected rows are the same tokens \(2 pairs, "
                                         rf"the first {re.escape(str(path))}:2\)"):
        PreferenceDataset(examples[1:3], make_tokenizer(), max_length=32)


def test_a_prompt_template_builds_the_prompt_of_both_responses(tmp_path):
    """data.prompt_template works as for causal_lm (it was ignored: the prompt was data.prompt_field's text)."""
    from dist.tiny import make_tokenizer
    from reft_fast.train.task_preference import PreferenceTask
    from reft_fast.train.train_config import load_config

    rows = [{"instruction": "big : red", "hint": "one", "chosen": "big", "rejected": "small"}] * 4
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    config, overrides = preference_run(tmp_path / "run", n_pairs=4)
    cfg = load_config(str(config), overrides + [f"data.train_file={tmp_path / 'pairs.jsonl'}", "data.eval_fraction=0",
                                                "data.prompt_template='repeat {hint} : {instruction}'"])
    tokenizer = make_tokenizer()
    train_set, _ = PreferenceTask(cfg).datasets(tokenizer, seed=0)
    chosen = train_set[0]["chosen"]
    assert tokenizer.decode(chosen["input_ids"][: chosen["prompt_length"]]).startswith("<|user|> repeat one : big : red")


def test_a_resumed_run_warms_up_with_its_tasks_own_loss(tmp_path):
    """A resume takes one zero-gradient step on its first batches (``checkpoints.zero_gradient_step``), which ran the
    causal-LM loss on them whatever the task. A preference batch is cut to its labelled tail (``logits_to_keep``), and
    liger's fused linear cross-entropy (on CUDA under model.fused_ops auto: a training forward given labels) views the
    kept hidden states [B, K, d] as [B·K, d], which that slice cannot be: the resume of every such run raised. The
    step now runs the task's own loss (no labels to the model: the logits path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reft_fast.train.checkpoints import zero_gradient_step
    from reft_fast.train.fused_base import apply_fused_base_ops
    from reft_fast.train.loading import build_reft_model
    from reft_fast.train.loss import forward_loss, to_device
    from reft_fast.train.task_preference import PreferenceTask
    from reft_fast.train.train_config import load_config

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU, under Triton's interpreter (conftest)
    config, overrides = preference_run(tmp_path, n_pairs=8)
    cfg = load_config(str(config), overrides + ["preference.loss=simpo", "data.eval_fraction=0"])
    base = AutoModelForCausalLM.from_pretrained(config.parent / "model", dtype=torch.float32).to(device)
    assert apply_fused_base_ops(base, "on", ops=["fused_linear_cross_entropy"]) == ("fused_linear_cross_entropy",)
    task = PreferenceTask(cfg)
    tokenizer = AutoTokenizer.from_pretrained(config.parent / "model")
    train_set, _ = task.datasets(tokenizer, seed=0)
    task.bind_base(base)
    reft_model = build_reft_model(base, cfg, [1, 2]).train()
    batch = to_device(task.host_batch(task.collator(tokenizer, len(reft_model.interventions))(
        [train_set[i] for i in range(4)])), device)
    assert "logits_to_keep" in batch  # the cut that the fused cross-entropy cannot view

    class Engine:  # DeepSpeed's engine as the step uses it
        module = reft_model

        def __call__(self, *args, **kwargs):
            return reft_model(*args, **kwargs)

        def backward(self, loss):
            loss.backward()

        def step(self):
            pass

    with pytest.raises(RuntimeError, match="view"):  # what the step ran before
        forward_loss(Engine(), batch)
    zero_gradient_step(Engine(), [batch], task.loss)
    grads = [p.grad for p in reft_model.trainable_parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_the_built_in_example_config_is_valid_and_reads_its_pairs():
    from reft_fast.train.task_preference import load_preference_examples
    from reft_fast.train.train_config import load_config, resolve_data_path, validate

    cfg = load_config(str(ROOT / "reft_fast" / "demo" / "pirate_dpo.yaml"))
    validate(cfg, check_model=False)
    p = cfg.preference
    pairs = load_preference_examples(resolve_data_path(cfg.data.train_file, cfg.base_dir), cfg.data.prompt_field,
                                     p.chosen_field, p.rejected_field)
    assert cfg.task == "preference" and len(pairs) == 48
    assert all(pair["chosen"].startswith("Arr, matey!") and "matey" not in pair["rejected"] for pair in pairs)


# ----------------------------------------------------------------------------------------------------------------------
# Two ranks
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_zero2_match_one_rank(tmp_path):
    """The same global batch of 8 pairs: one rank accumulating 2 micro-batches of 4 against 2 ranks at ZeRO-2 taking 4
    each; the reference table is dealt to the ranks by chunks and summed over them."""
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    config, overrides = preference_run(tmp_path, n_pairs=40)
    common = overrides + ["training.max_steps=3", "training.micro_batch_size=4", "training.global_batch_size=8",
                          "training.eval_every=3", "training.log_every=1"]
    try:
        one = ReftTrainingRecipe(load_config(str(config), common + [f"output_dir={tmp_path / 'one'}"])).run()
    finally:
        shutdown()
    result = tmp_path / "two.json"
    proc = launch_ranks([str(ROOT / "tests" / "dist" / "run_train.py"), str(config), str(result), *common,
                         "deepspeed.stage=2", f"output_dir={tmp_path / 'two'}"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (two,) = json.loads(result.read_text())
    assert two["world"] == 2
    assert two["losses"] == pytest.approx(one.losses, rel=2e-4, abs=1e-5)
    evals = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    for got, want in zip(evals, one.eval_metrics, strict=True):
        for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
            assert got[key] == pytest.approx(want[key], rel=2e-4, abs=1e-5), key


def _reference_logps(config: Path, overrides: list[str]) -> list[list[float]]:
    """The held-out pairs' (chosen, rejected) log-probabilities under the base loaded alone, no ReftModel attached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reft_fast.train.task_preference import PreferenceTask, reference_logps
    from reft_fast.train.train_config import load_config

    cfg = load_config(str(config), overrides)
    task = PreferenceTask(cfg)
    tokenizer = AutoTokenizer.from_pretrained(config.parent / "model")
    _, eval_set = task.datasets(tokenizer, cfg.training.seed)
    collator = task.collator(tokenizer, num_interventions=1)
    plain = AutoModelForCausalLM.from_pretrained(config.parent / "model", torch_dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return reference_logps(plain, collator([eval_set[i] for i in range(len(eval_set))])).view(2, -1).T.tolist()


def test_reft_fast_eval_scores_a_preference_run(tmp_path, capsys):
    """`reft-fast eval RUN_DIR` on a DPO run: reward accuracy and margin over the held-out pairs, equal to the last
    evaluation of training; beside them one line per pair (the policy's log-probabilities under the edits, the
    rewards against the plain base's, the margin, whether it is ranked right), whose means are the metrics."""
    from reft_fast.train.cli import main
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    config, overrides = preference_run(tmp_path, n_pairs=32)
    try:
        result = ReftTrainingRecipe(load_config(str(config), overrides + LEARNING + ["training.max_steps=2"])).run()
    finally:
        shutdown()
    target = tmp_path / "metrics.json"
    assert main(["eval", str(tmp_path / "out"), "--out", str(target)]) == 0
    metrics = json.loads(target.read_text())
    last = result.eval_metrics[-1]
    assert metrics["examples"] == 8
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
        assert metrics[key] == pytest.approx(last[key], rel=1e-6, abs=1e-9), key
    # one line per held-out pair, in order; the reported means are those of the lines
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(8))
    assert metrics["eval_reward_accuracy"] == pytest.approx(sum(line["correct"] for line in lines) / 8, abs=1e-12)
    assert metrics["eval_reward_margin"] == pytest.approx(sum(line["margin"] for line in lines) / 8, abs=1e-12)
    beta = 0.5  # LEARNING's preference.beta; DPO: reward = β·(policy − reference) log-probability of the response
    for line in lines:
        assert line["margin"] == pytest.approx(line["chosen_reward"] - line["rejected_reward"], abs=1e-12)
        assert line["correct"] == (line["chosen_reward"] > line["rejected_reward"])
        assert line["chosen_logp"] < 0 and line["rejected_logp"] < 0
    # the rewards are β times the policy log-probabilities written minus the reference's (the base without edits)
    reference = _reference_logps(config, overrides)
    for line, (chosen_ref, rejected_ref) in zip(lines, reference, strict=True):
        assert line["chosen_reward"] == pytest.approx(beta * (line["chosen_logp"] - chosen_ref), rel=1e-4, abs=1e-6)
        assert line["rejected_reward"] == pytest.approx(beta * (line["rejected_logp"] - rejected_ref), rel=1e-4,
                                                        abs=1e-6)


def test_eval_lines_name_their_source_rows_when_long_prompts_are_dropped(tmp_path):
    """With data.drop_long_prompts, a line's index counts the pairs kept, not the file's rows: each line names its row
    (file and line), so a user can find the pair it scores."""
    from reft_fast.train.cli import main
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    config, overrides = preference_run(tmp_path, n_pairs=16)
    pairs = make_pairs(6, seed=1)
    pairs[0]["instruction"] = "repeat : " + " ".join(["red"] * 40)  # longer than max_length 32: dropped
    write_jsonl(tmp_path / "scored.jsonl", pairs)
    overrides = overrides + ["training.max_steps=1", "data.drop_long_prompts=true"]
    try:
        ReftTrainingRecipe(load_config(str(config), overrides)).run()
    finally:
        shutdown()
    target = tmp_path / "scored_eval.jsonl"
    assert main(["eval", str(tmp_path / "out"), "--data", str(tmp_path / "scored.jsonl"), "--out", str(target)]) == 0
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(5))
    assert [line["where"] for line in lines] == [f"{tmp_path / 'scored.jsonl'}:{row}" for row in range(2, 7)]


def test_eval_with_data_reads_no_training_pairs(tmp_path, caplog):
    """`reft-fast eval RUN --data FILE` scores FILE alone: it read and tokenized the whole training set too (its
    warnings printed as if about the scored pairs), and a training file since moved away made it a `datasets`
    traceback ("Couldn't reach 'pairs.jsonl' on the Hub")."""
    from reft_fast.train.cli import main
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    config, overrides = preference_run(tmp_path, n_pairs=16)
    try:
        ReftTrainingRecipe(load_config(str(config), overrides + ["training.max_steps=1"])).run()
    finally:
        shutdown()
    pairs = make_pairs(4, seed=1)
    pairs[1]["rejected"] = pairs[1]["chosen"]  # a tie: dropped, said once, naming this file's row
    write_jsonl(tmp_path / "scored.jsonl", pairs)
    (tmp_path / "pairs.jsonl").unlink()
    target = tmp_path / "scored_eval.jsonl"
    caplog.clear()
    assert main(["eval", str(tmp_path / "out"), "--data", str(tmp_path / "scored.jsonl"), "--out", str(target)]) == 0
    assert json.loads(target.with_suffix(".json").read_text())["examples"] == 3
    ties = [r.getMessage() for r in caplog.records if "same tokens" in r.getMessage()]
    assert len(ties) == 1 and "dropped 1 of 4 pairs" in ties[0] and f"{tmp_path / 'scored.jsonl'}:2)" in ties[0]


def test_dropped_pairs_are_said_by_rank_0_only(tmp_path, caplog, monkeypatch):
    """Every rank reads the data alike: the drops (ties, prompts too long) are said once per job, by rank 0; each rank
    said them (8 GPUs: 8 copies of each line)."""
    from dist.tiny import make_tokenizer
    from reft_fast.train.task_preference import PreferenceDataset, load_preference_examples

    rows = [{"instruction": "big : red", "chosen": "big", "rejected": "small"},
            {"instruction": "hot : sky", "chosen": "hot", "rejected": "hot"},  # the same response
            {"instruction": "repeat : " + " ".join(["red"] * 40), "chosen": "a", "rejected": "b"}]  # too long
    examples = load_preference_examples(str(write_jsonl(tmp_path / "pairs.jsonl", rows)), "instruction", "chosen",
                                        "rejected")
    for rank, said in (("1", 0), ("0", 2)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level("WARNING"):
            pairs = PreferenceDataset(examples, make_tokenizer(), max_length=32, drop_long_prompts=True)
        assert len(pairs) == 1 and pairs.num_dropped == 2  # dropped alike on every rank
        assert len([r for r in caplog.records if r.getMessage().startswith("dropped ")]) == said, rank
