"""task: classification (reft_fast.train.task_classification) on tiny random encoders: layer discovery, scores against
hand-computed values, training that learns a separable set, regression, the head in the final directory and in
checkpoints (resume restores it), a 2-rank run whose gathered eval metrics equal one rank's, and pyreft parity of the
GLUE path's logits."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from dist.tiny import launch_ranks

ROOT = Path(__file__).resolve().parent.parent
POSITIVE = "red green blue sun sky tree big hot up yes".split()
NEGATIVE = "black white cat dog fish cow small cold down no".split()


def make_tokenizer():
    """A word-level tokenizer that joins a pair as RoBERTa does: <s> a </s> </s> b </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + POSITIVE + NEGATIVE)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                        special_tokens=[("<s>", 1), ("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def tiny_roberta_config(num_labels: int = 2, **extra):
    # initializer_range 0.2 (not 0.02): the random encoder then carries the words into <s>'s final state
    return transformers.RobertaConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, type_vocab_size=1,
                                      num_labels=num_labels, **extra)


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """GLUE SST-2's fields: a sentence of positive words (label 1) or of negative words (label 0)."""
    rng = random.Random(seed)
    return [{"sentence": " ".join(rng.choice(POSITIVE if i % 2 else NEGATIVE) for _ in range(rng.randint(2, 6))),
             "label": i % 2} for i in range(n)]


def make_run(folder: Path, rows: list[dict], *, data_file: str = "train.jsonl", num_labels: int = 2,
             **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(tiny_roberta_config(num_labels))
    model.save_pretrained(folder / "model")
    make_tokenizer().save_pretrained(folder / "model")
    path = folder / data_file
    if data_file.endswith(".csv"):
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": "classification",
              "model": {"path": str(folder / "model"), "dtype": "float32", "attn_implementation": "sdpa"},
              "interventions": {"layers": "all", "low_rank_dimension": 1, "positions": "f1"},
              "data": {"train_file": data_file, "max_length": 16, "eval_fraction": 0.25},
              "classification": {"num_labels": 2},
              "training": {"max_steps": 40, "micro_batch_size": 8, "lr": 5.0e-2, "seed": 1, "progress_bar": False,
                           "log_every": 10, "eval_every": 20},
              "output_dir": str(folder / "out")}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "config.yaml"


def train(config: Path, overrides=()):
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    try:
        return ReftTrainingRecipe(load_config(str(config), list(overrides))).run()
    finally:
        shutdown()


# --------------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------------
def test_scores_match_hand_computed_values():
    from reft_fast.train import scores

    predictions, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # TP 2, FP 1, FN 1, TN 2
    assert scores.accuracy(predictions, labels) == pytest.approx(4 / 6)
    assert scores.f1_binary(predictions, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert scores.matthews(predictions, labels) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    # three classes: c = 3 correct of s = 5; predicted counts (2, 2, 1), true counts (1, 2, 2)
    three = scores.matthews([0, 0, 1, 1, 2], [0, 1, 1, 2, 2])
    assert three == pytest.approx((3 * 5 - (2 * 1 + 2 * 2 + 1 * 2)) / math.sqrt((25 - 9) * (25 - 9)))
    assert scores.matthews([1, 1, 1], [0, 1, 1]) == 0.0  # one predicted class: undefined, 0 by convention
    assert scores.f1_binary([0, 0], [0, 0]) == 0.0
    # Pearson: x = 1..4, y = 2, 4, 5, 9 → means 2.5 and 5; Σdx·dy = 11, Σdx² = 5, Σdy² = 26
    assert scores.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    assert scores.average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # Spearman with a tie: ranks x (1, 2, 3, 4), y (1, 2.5, 2.5, 4) → Σdx·dy = 4.5, Σdx² = 5, Σdy² = 4.5
    assert scores.spearman([1, 2, 3, 4], [1, 7, 7, 9]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert math.isnan(scores.pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        scores.accuracy([1, 0], [1, 0, 1])


# --------------------------------------------------------------------------------------------------------------------
# Layer discovery
# --------------------------------------------------------------------------------------------------------------------
ENCODERS = [
    ("RobertaForSequenceClassification", tiny_roberta_config(), "roberta.encoder.layer"),
    ("BertForSequenceClassification", transformers.BertConfig(vocab_size=24, hidden_size=32, num_hidden_layers=3,
                                                              num_attention_heads=2, intermediate_size=64),
     "bert.encoder.layer"),
    ("DistilBertForSequenceClassification", transformers.DistilBertConfig(vocab_size=24, dim=32, n_layers=3, n_heads=2,
                                                                          hidden_dim=64), "distilbert.transformer.layer"),
    ("DebertaV2ForSequenceClassification", transformers.DebertaV2Config(vocab_size=24, hidden_size=32,
                                                                        num_hidden_layers=3, num_attention_heads=2,
                                                                        intermediate_size=64), "deberta.encoder.layer"),
    ("RobertaModel", tiny_roberta_config(), "encoder.layer"),
]


@pytest.mark.parametrize("class_name, config, path", ENCODERS, ids=[e[0] for e in ENCODERS])
def test_encoder_layers_are_found_and_edited(class_name, config, path):
    from reft_fast import ReftConfig, get_reft_model
    from reft_fast.core.hf import find_decoder_layers, hidden_size_of, num_layers_of

    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    found, layers = find_decoder_layers(model)
    assert found == path and len(layers) == num_layers_of(config) and hidden_size_of(config) == 32
    reft_model = get_reft_model(model, ReftConfig([{"layer": i, "intervention": "loreft", "low_rank_dimension": 1}
                                                   for i in range(len(layers))], positions="f1"))
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    base = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        for intervention in reft_model.interventions.values():
            intervention.learned_source.bias.fill_(3.0)
        plain = model(**base)[0]
        _, edited = reft_model(base, intervention_locations=torch.zeros((len(layers), 2, 1), dtype=torch.long))
    assert not torch.allclose(plain, edited[0]), "the edit of the first token must change the output"


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run on the separable set: 40 steps, eval at 0, 20 and 40, checkpoints at 20 and 40."""
    folder = tmp_path_factory.mktemp("sst2")
    config = make_run(folder, sentiment_rows(96), training={"save_every": 20})
    return config, train(config)


def test_training_learns_the_separable_set_and_reports_glue_scores(trained):
    _, result = trained
    first, last = result.eval_metrics[0], result.eval_metrics[-1]
    assert [m["step"] for m in result.eval_metrics] == [0, 20, 40]
    assert set(last) == {"step", "eval_loss", "accuracy", "mcc", "f1"}
    assert first["accuracy"] <= 0.6 and last["accuracy"] >= 0.75, result.eval_metrics
    assert last["eval_loss"] < first["eval_loss"] and last["mcc"] > 0.4


def test_the_trained_head_is_saved_and_loads_back(trained):
    """final/ holds the head next to the interventions; a fresh base with both reproduces the eval accuracy."""
    from reft_fast import ReftModel
    from reft_fast.train.run_dir import BASE_TRAINABLE_NAME, load_trainable_base
    from reft_fast.train.task_classification import ClassificationCollator, ClassificationTask
    from reft_fast.train.train_config import load_config

    config, result = trained
    final = Path(result.final_dir)
    fresh = transformers.RobertaForSequenceClassification.from_pretrained(config.parent / "model").eval()
    before = fresh.classifier.out_proj.weight.clone()
    assert load_trainable_base(fresh, final) == ["classifier.dense.bias", "classifier.dense.weight",
                                                 "classifier.out_proj.bias", "classifier.out_proj.weight"]
    assert (final / BASE_TRAINABLE_NAME).is_file() and not torch.equal(before, fresh.classifier.out_proj.weight)
    reft_model = ReftModel.load(final, fresh)
    cfg = load_config(str(config))
    task = ClassificationTask(cfg)
    _, eval_set = task.datasets(make_tokenizer(), cfg.training.seed)
    batch = ClassificationCollator(0, len(reft_model.interventions), "f1")([eval_set[i] for i in range(len(eval_set))])
    with torch.no_grad():
        _, out = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                            intervention_locations=batch["intervention_locations"])
    accuracy = (out.logits.argmax(-1) == batch["labels"]).double().mean().item()
    assert accuracy == pytest.approx(result.eval_metrics[-1]["accuracy"])


def test_resume_restores_the_head(trained, tmp_path):
    """A run resumed from its step-20 checkpoint ends with the uninterrupted run's head and interventions."""
    from safetensors.torch import load_file

    config, result = trained
    out = Path(yaml.safe_load(config.read_text())["output_dir"])
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step40")
    shutil.rmtree(resumed / "final")
    state = torch.load(resumed / "checkpoints" / "step20" / "trainer_state.pt", weights_only=True)
    assert "model.classifier.out_proj.weight" in state["params"]
    train(config, [f"output_dir={resumed}", "resume=true"])
    for name in ("base_trainable.safetensors", "interventions.safetensors"):
        expected, got = load_file(out / "final" / name), load_file(resumed / "final" / name)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_a_head_the_checkpoint_lacks_starts_the_same_in_every_run_of_a_seed(tmp_path):
    """roberta-base's checkpoint has no classifier: transformers draws it as the base loads. Two set-ups of one config
    in one process (the global random state has moved on between them) load the same head."""
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    config = make_run(tmp_path, sentiment_rows(16))
    transformers.RobertaModel(tiny_roberta_config()).save_pretrained(tmp_path / "model")  # the encoder alone
    heads = []
    for _ in range(2):
        recipe = ReftTrainingRecipe(load_config(str(config)))
        recipe.rank, recipe.world, recipe.accumulation = 0, 1, 1  # what joining a one-rank group sets
        recipe._setup_data()
        recipe._setup_base()
        heads.append(recipe.base.classifier.state_dict())
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_regression_on_sentence_pairs_from_csv(tmp_path):
    """STS-B's shape: sentence1/sentence2 and a float score, num_labels 1; read from a CSV file."""
    rng = random.Random(1)
    rows = []
    for _ in range(64):
        a, b = ([rng.choice(POSITIVE + NEGATIVE) for _ in range(rng.randint(2, 4))] for _ in range(2))
        score = 5.0 * sum(w in POSITIVE for w in a + b) / len(a + b)
        rows.append({"sentence1": " ".join(a), "sentence2": " ".join(b), "label": score})
    config = make_run(tmp_path, rows, data_file="train.csv", num_labels=1,
                      classification={"num_labels": 1, "problem_type": "regression"})
    result = train(config, ["training.max_steps=24", "training.eval_every=12"])
    first, last = result.eval_metrics[0], result.eval_metrics[-1]
    assert set(last) == {"step", "eval_loss", "pearson", "spearman"}
    # the mean squared error falls (the tiny random encoder's step-0 correlation is already about 0.5: too noisy to
    # require it to rise in 24 steps on 16 examples)
    assert last["eval_loss"] < first["eval_loss"] / 2, result.eval_metrics
    assert all(-1 <= m[key] <= 1 for m in result.eval_metrics for key in ("pearson", "spearman"))


@pytest.mark.parametrize("overrides, message", [
    (["classification.problem_type=binary"], r"^classification.problem_type: expected one of"),
    (["classification.problem_type=regression"], r"^classification.num_labels: regression predicts one number"),
    (["data.packing=true"], r"^data.packing: not supported by task classification"),
    (["classification.text_fields=[a, b, c]"], r"^classification.text_fields: one field or a pair"),
    (["classification.train_head=true", "deepspeed.stage=3"], r"^classification.train_head: ZeRO stage 3"),
    # a file has no validation split: the "split" read back was the training file, so the run selected and scored
    # its model on its own training examples
    (["classification.eval_split=validation"], r"^classification.eval_split: 'validation' is a split of a Hugging"),
])
def test_config_errors_name_the_field(tmp_path, overrides, message):
    from reft_fast.train.train_config import ConfigError, load_config, validate

    config = make_run(tmp_path, sentiment_rows(8))
    with pytest.raises(ConfigError, match=message):
        validate(load_config(str(config), overrides))


def test_more_labels_than_a_trained_head_has_is_a_config_error_but_a_bare_encoder_takes_any(tmp_path):
    """A sequence classifier's own head cannot load at another size (transformers' size-mismatch RuntimeError came
    after set-up); an encoder saved without a head (roberta-base) gets a new head of the size asked for."""
    from reft_fast.train.train_config import ConfigError, load_config, validate

    config = make_run(tmp_path, sentiment_rows(8))  # a RobertaForSequenceClassification with 2 labels
    with pytest.raises(ConfigError, match=r"^classification.num_labels: 3, but model.path .* predicts 2 .*"
                                          r"set num_labels: 2"):
        validate(load_config(str(config), ["classification.num_labels=3"]))
    transformers.RobertaModel(tiny_roberta_config()).save_pretrained(tmp_path / "model")  # the encoder alone
    validate(load_config(str(config), ["classification.num_labels=3"]))


def test_an_encoder_without_sdpa_is_a_config_error_naming_eager_and_trains_with_eager(tmp_path):
    """DeBERTa has no SDPA path in transformers 5.24; with the config's default (sdpa) from_pretrained raised a bare
    ValueError after the process group had started."""
    from reft_fast.train.train_config import ConfigError, load_config, validate

    config = make_run(tmp_path, sentiment_rows(32))
    torch.manual_seed(0)
    transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, num_labels=2)).save_pretrained(tmp_path / "model")
    with pytest.raises(ConfigError, match=r"^model.attn_implementation: 'sdpa' \(the default\) is not supported by "
                                          r"DebertaV2ForSequenceClassification .* set model.attn_implementation: eager"):
        validate(load_config(str(config)))
    result = train(config, ["model.attn_implementation=eager", "training.max_steps=2", "training.eval_every=2"])
    assert {"eval_loss", "accuracy", "mcc", "f1"} <= set(result.eval_metrics[-1])


def test_bad_labels_are_named(tmp_path):
    from reft_fast.train.task_classification import read_labelled_texts
    from reft_fast.train.train_config import ClassificationConfig

    with pytest.raises(ValueError, match=r"the given examples: row 1: label -1 is not a class index in \[0, 2\)"):
        read_labelled_texts([{"sentence": "red", "label": 1}, {"sentence": "cat", "label": -1}], ClassificationConfig())
    with pytest.raises(ValueError, match=r"no text field among GLUE's names"):
        read_labelled_texts([{"body": "red", "label": 1}], ClassificationConfig())
    # each error names the setting that reads the field
    with pytest.raises(ValueError, match=r"row 0: no field 'label' \(fields: \['sentence', 'y'\]\); set "
                                         r"classification\.label_field$"):
        read_labelled_texts([{"sentence": "red", "y": 1}], ClassificationConfig())
    with pytest.raises(ValueError, match=r"row 0: no field 'b' .*; set classification\.text_fields$"):
        read_labelled_texts([{"a": "red", "label": 1}], ClassificationConfig(text_fields=["a", "b"]))
    with pytest.raises(ValueError, match=r"row 0: 'sentence' is null, expected text \(classification\.text_fields\)$"):
        read_labelled_texts([{"sentence": None, "label": 1}], ClassificationConfig())
    with pytest.raises(ValueError, match=r"row 0: label 'positive' is not a class index \(text labels: list them "
                                         r"in classification\.label_names\)$"):
        read_labelled_texts([{"sentence": "red", "label": "positive"}], ClassificationConfig())
    pairs = read_labelled_texts([{"question": "q", "sentence": "s", "label": "1"}], ClassificationConfig())
    assert pairs == [{"texts": ("q", "s"), "label": 1, "where": "the given examples: row 0"}]  # QNLI's fields
    regression = ClassificationConfig(num_labels=1, problem_type="regression")
    for target in (float("nan"), "inf"):  # a NaN target would make every weight NaN from the step that reads it
        with pytest.raises(ValueError, match=r"row 0: label .* is not a finite number"):
            read_labelled_texts([{"sentence": "red", "label": target}], regression)
    multi = ClassificationConfig(num_labels=2, problem_type="multi_label")
    with pytest.raises(ValueError, match=r"row 0: label '10' is not a list of 2 values 0 or 1"):
        read_labelled_texts([{"sentence": "red", "label": "10"}], multi)
    assert read_labelled_texts([{"sentence": "red", "label": [1, 0]}], multi)[0]["label"] == [1.0, 0.0]


def test_eval_does_not_advise_training_the_head_it_restores(tmp_path):
    """A base saved without the head (roberta-base is a masked LM) makes transformers report the head as newly
    initialized ("MISSING ... Consider training on your downstream task"): right in training, wrong in `reft-fast eval`,
    which loads the trained head right after. Left out there when the run restores every missing parameter; still shown
    when it restores only some."""
    from reft_fast.train.loading import load_base_model
    from reft_fast.train.train_config import load_config

    config = make_run(tmp_path, sentiment_rows(8))
    transformers.RobertaForMaskedLM(tiny_roberta_config()).save_pretrained(tmp_path / "model")
    cfg = load_config(str(config))
    head = ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias", "classifier.out_proj.weight"]
    shown_messages: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: shown_messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(collect)  # where transformers' own handler prints them
    try:
        for restored, shown in ((head, False), (head[:3], True), ((), True)):
            shown_messages.clear()
            base, _ = load_base_model(str(tmp_path / "model"), cfg, auto_class="AutoModelForSequenceClassification",
                                      model_kwargs={"num_labels": 2}, restored=restored)
            assert isinstance(base, transformers.RobertaForSequenceClassification)
            assert any("classifier.out_proj.weight" in message for message in shown_messages) == shown, restored
        # a load that fails (a 2-label head loaded as 3 labels) still says why: its report is not held back
        transformers.RobertaForSequenceClassification(tiny_roberta_config(2)).save_pretrained(tmp_path / "model")
        shown_messages.clear()
        with pytest.raises(RuntimeError):
            load_base_model(str(tmp_path / "model"), cfg, auto_class="AutoModelForSequenceClassification",
                            model_kwargs={"num_labels": 3}, restored=head)
        assert any("classifier.out_proj.weight" in message for message in shown_messages)
    finally:
        logging.getLogger("transformers").removeHandler(collect)


def test_named_labels_also_take_class_indices():
    """With label_names, a row may give the name or the class index: a Hub dataset's ClassLabel column gives indices
    (GLUE from the Hub), a CSV gives text. Was: every index refused as 'not one of the names'."""
    from reft_fast.train.task_classification import read_labelled_texts
    from reft_fast.train.train_config import ClassificationConfig

    named = ClassificationConfig(label_names=["negative", "positive"])
    rows = [{"sentence": "red", "label": "positive"}, {"sentence": "cat", "label": 0}, {"sentence": "sun", "label": "1"}]
    assert [example["label"] for example in read_labelled_texts(rows, named)] == [1, 0, 1]
    # a CSV's float column ("1.0") is a class index too, with or without names; "inf" is named, not a traceback
    assert [e["label"] for e in read_labelled_texts([{"sentence": "red", "label": "1.0"}], named)] == [1]
    assert [e["label"] for e in read_labelled_texts([{"sentence": "red", "label": "1.0"}],
                                                    ClassificationConfig())] == [1]
    with pytest.raises(ValueError, match=r"label 'inf' is not one of"):
        read_labelled_texts([{"sentence": "red", "label": "inf"}], named)
    for bad, message in (("neutral", r"label 'neutral' is not one of \['negative', 'positive'\] or a class index$"),
                         (2, r"label 2 is not a class index in \[0, 2\)"), (0.5, r"label 0.5 is not a class index")):
        with pytest.raises(ValueError, match=message):
            read_labelled_texts([{"sentence": "red", "label": bad}], named)


def test_eval_lines_name_the_predicted_class_with_label_names(tmp_path):
    from reft_fast.train.cli import main

    names = ["negative", "positive"]
    rows = [{**row, "label": names[row["label"]]} for row in sentiment_rows(16)]
    config = make_run(tmp_path, rows, classification={"label_names": names},
                      training={"max_steps": 2, "eval_every": 2})
    train(config)
    assert main(["eval", str(tmp_path / "out")]) == 0
    lines = _lines(tmp_path / "out" / "eval" / "eval.jsonl")
    assert lines and all(line["predicted_name"] == names[line["predicted"]] for line in lines)


# --------------------------------------------------------------------------------------------------------------------
# pyreft parity
# --------------------------------------------------------------------------------------------------------------------
def test_pyreft_glue_path_gives_the_same_logits():
    """pyreft's GLUE runs: LoReFT rank 1 at roberta.encoder.layer[i].output of every layer, position f1, on a
    RobertaForSequenceClassification; the same weights in reft_fast give the same logits (a batch with padding)."""
    pyreft = pytest.importorskip("pyreft")
    from reft_fast import ReftConfig, get_reft_model
    from reft_fast.compat import load_pyreft_module

    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(tiny_roberta_config(3)).eval()
    theirs = pyreft.get_reft_model(copy.deepcopy(model), pyreft.ReftConfig(representations=[
        {"layer": i, "component": f"roberta.encoder.layer[{i}].output", "low_rank_dimension": 1,
         "intervention": pyreft.LoreftIntervention(embed_dim=32, low_rank_dimension=1, dtype=torch.float32)}
        for i in range(2)]), set_device=False)
    ours = get_reft_model(model, ReftConfig([
        {"layer": i, "component": f"roberta.encoder.layer[{i}].output", "intervention": "LoreftIntervention",
         "low_rank_dimension": 1, "orthogonalization": "householder"} for i in range(2)], positions="f1"))
    with torch.no_grad():
        for p in theirs.interventions.parameters():
            p.add_(0.5 * torch.randn_like(p))
    for mine, pyreft_module in zip(ours.interventions.values(), theirs.interventions.values(), strict=True):
        load_pyreft_module(mine, pyreft_module)
    ids = torch.tensor([[1, 5, 6, 7, 2, 2, 8, 2], [1, 9, 2, 0, 0, 0, 0, 0]])
    base = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        _, expected = theirs(base, unit_locations={"sources->base": (None, [[[0], [0]], [[0], [0]]])})
        _, got = ours(base, intervention_locations=torch.zeros((2, 2, 1), dtype=torch.long))
        plain = model(**base).logits
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, got.logits, atol=1e-3)


def test_the_training_loss_masks_an_encoders_padding():
    """The training loss ran the batch without its padding mask (what a right-padded causal batch can do): every
    real token of an encoder attended to the padding, so training optimized other logits than evaluation scores.
    It is the loss of the masked forward that evaluation runs."""
    from reft_fast import ReftConfig, get_reft_model
    from reft_fast.train.task_classification import ClassificationCollator, ClassificationTask

    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(tiny_roberta_config(2))
    reft_model = get_reft_model(model, ReftConfig([{"layer": 0, "component": "block_output", "low_rank_dimension": 1,
                                                    "intervention": "LoreftIntervention"}], positions="f1"))
    items = [{"input_ids": [1, 5, 6, 7, 2], "label": 1}, {"input_ids": [1, 9, 2], "label": 0}]
    batch = ClassificationCollator(pad_token_id=0, num_interventions=1, positions="f1")(items)
    assert (batch["attention_mask"] == 0).any()  # padded
    reft_model.eval()  # no dropout: the two forwards must see the same network

    class Engine:  # what the task reaches through DeepSpeed's engine: its call and its module
        module = reft_model

        def __call__(self, *args, **kwargs):
            return reft_model(*args, **kwargs)

    loss = ClassificationTask.loss(Engine(), batch)
    _, masked = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                           intervention_locations=batch["intervention_locations"], labels=batch["labels"])
    torch.testing.assert_close(loss, masked.loss, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# Two ranks
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_gather_the_eval_metrics_of_one_rank(trained, tmp_path):
    """The same global batch on 2 ranks (ZeRO-2) as on 1: the same losses and, through the one gather, the same
    eval metrics."""
    config, _ = trained
    common = ["training.max_steps=4", "training.eval_every=2", "training.save_every=0", "training.micro_batch_size=4",
              "training.global_batch_size=8"]
    one = train(config, common + [f"output_dir={tmp_path / 'one'}"])
    result = tmp_path / "two.json"
    proc = launch_ranks([str(ROOT / "tests" / "dist" / "run_train.py"), str(config), str(result), *common,
                         "deepspeed.stage=2", f"output_dir={tmp_path / 'two'}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    two_eval = [{k: v for k, v in row.items() if k in one.eval_metrics[0]} for row in rows if "eval_loss" in row]
    assert len(two_eval) == len(one.eval_metrics) == 3
    for theirs, ours in zip(two_eval, one.eval_metrics):
        assert theirs.keys() == ours.keys()
        for key in ours:
            assert theirs[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), (key, two_eval, one.eval_metrics)


def test_reft_fast_eval_scores_a_finished_run_as_training_did(trained, capsys, tmp_path):
    """`reft-fast eval RUN_DIR` on a classification run: the task's own metrics over the run's held-out split, equal
    to the last evaluation of training (same head, same interventions, same examples); --data scores another file."""
    from reft_fast.train.cli import main

    config, result = trained
    out_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    target = tmp_path / "metrics.json"
    assert main(["eval", str(out_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2  # was a datasets traceback
    assert f"config error: --data {tmp_path / 'missing.jsonl'}: no such file" in capsys.readouterr().err
    assert main(["eval", str(out_dir), "--out", str(target)]) == 0
    metrics = json.loads(target.read_text())
    assert "classification metrics" in capsys.readouterr().out
    last = result.eval_metrics[-1]
    assert metrics["examples"] == 24
    for key in ("eval_loss", "accuracy", "mcc", "f1"):
        assert metrics[key] == pytest.approx(last[key], rel=1e-6, abs=1e-9), key
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(10, seed=5)))
    # (--out other.json wrote its per-example lines to other.jsonl, over the data: refused now)
    assert main(["eval", str(out_dir), "--data", str(other), "--out", str(tmp_path / "other.json")]) == 2
    assert "the data file itself" in capsys.readouterr().err
    assert main(["eval", str(out_dir), "--data", str(other), "--out", str(tmp_path / "scores.json")]) == 0
    examples = json.loads((tmp_path / "scores.json").read_text())["examples"]
    assert examples == 10 and isinstance(examples, int)  # a count, not 10.0
    assert main(["eval", str(out_dir), "--base-only"]) == 2
    assert "--base-only: a classification run" in capsys.readouterr().err
    assert main(["eval", str(out_dir), "--batch-size", "4"]) == 2  # was silently ignored
    assert "--batch-size: sets generate's batch; a classification run is scored in batches of " \
        "training.micro_batch_size" in capsys.readouterr().err
    damaged = shutil.copytree(out_dir / "final", tmp_path / "damaged")
    (damaged / "base_trainable.safetensors").write_text("cut short")  # was safetensors' traceback
    assert main(["eval", str(damaged)]) == 2
    assert f"config error: {damaged}: {damaged / 'base_trainable.safetensors'} cannot be read" in \
        capsys.readouterr().err



# --------------------------------------------------------------------------------------------------------------------
# reft-fast eval: one line per example
# --------------------------------------------------------------------------------------------------------------------
def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _eval_labels(config: Path, overrides=(), eval_part: str = "selection") -> list:
    """The labels of the eval set a config makes, in its order (the task's own datasets, as training builds them)."""
    from reft_fast.train.task_classification import ClassificationTask
    from reft_fast.train.train_config import load_config

    cfg = load_config(str(config), list(overrides))
    _, eval_set = ClassificationTask(cfg).datasets(make_tokenizer(), cfg.training.seed, eval_part)
    return [eval_set[i]["label"] for i in range(len(eval_set))]


def test_eval_predicts_data_without_labels_and_training_refuses_it(trained, capsys, tmp_path):
    """A GLUE test split has no labels (−1; or a file without the label field): `reft-fast eval --data` writes each
    example's prediction, as it would with the labels, and scores nothing (was: refused, so no submission file could
    be made). Rows with and without labels mixed, and training on an eval set without labels, stay errors."""
    from reft_fast.train.cli import main
    from reft_fast.train.train_config import ConfigError

    config, _ = trained
    out_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    rows = sentiment_rows(9, seed=7)

    def write(name: str, body: list) -> None:
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in body))

    write("labelled.jsonl", rows)
    write("test.jsonl", [{**row, "label": -1} for row in rows])
    write("bare.jsonl", [{"sentence": row["sentence"]} for row in rows])
    (tmp_path / "csv.csv").write_text("sentence,label\n" + "".join(f"{row['sentence']},-1\n" for row in rows))
    assert main(["eval", str(out_dir), "--data", str(tmp_path / "labelled.jsonl")]) == 0
    scored = _lines(out_dir / "eval" / "labelled.jsonl")
    for file in ("test.jsonl", "bare.jsonl", "csv.csv"):  # a CSV's labels are text: "-1"
        assert main(["eval", str(out_dir), "--data", str(tmp_path / file)]) == 0
        assert "the data has no labels, so nothing is scored" in capsys.readouterr().out
        predicted = _lines(out_dir / "eval" / f"{Path(file).stem}.jsonl")
        assert [row["label"] for row in predicted] == [None] * 9
        assert [{k: v for k, v in row.items() if k not in ("label", "where")} for row in predicted] == \
            [{k: v for k, v in row.items() if k not in ("label", "where")} for row in scored]
        first_line = 2 if file.endswith(".csv") else 1  # each line names its source row (a CSV has a header)
        assert [row["where"] for row in predicted] == [f"{tmp_path / file}:{first_line + i}" for i in range(9)]
        metrics = json.loads((out_dir / "eval" / f"{Path(file).stem}.json").read_text())
        assert metrics["examples"] == 9 and "accuracy" not in metrics and "eval_loss" not in metrics
    write("mixed.jsonl", [{**row, "label": -1 if i else 1} for i, row in enumerate(rows)])
    assert main(["eval", str(out_dir), "--data", str(tmp_path / "mixed.jsonl")]) == 2
    assert f"{tmp_path / 'mixed.jsonl'}:2: label -1 is not a class index" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"test.jsonl:1: label -1 is not a class index"):
        train(config, [f"data.eval_file={tmp_path / 'test.jsonl'}", "data.eval_fraction=0", "training.max_steps=1",
                       f"output_dir={tmp_path / 'refused'}"])


def test_eval_writes_each_examples_prediction_and_they_make_the_metrics(trained, capsys, tmp_path):
    """`reft-fast eval` on a single-label run: eval/eval.jsonl holds one line per eval example, in the eval set's
    order, with its gold label, predicted class and class probabilities; accuracy, MCC and F1 recomputed from the
    lines are the reported ones."""
    from reft_fast.train import scores
    from reft_fast.train.cli import main

    config, _ = trained
    out_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    assert main(["eval", str(out_dir)]) == 0
    assert "on the eval set" in capsys.readouterr().out
    metrics = json.loads((out_dir / "eval" / "eval.json").read_text())
    rows = _lines(out_dir / "eval" / "eval.jsonl")
    assert [row["index"] for row in rows] == list(range(24)) and metrics["examples"] == 24
    assert [row["label"] for row in rows] == _eval_labels(config)
    predicted, labels = [row["predicted"] for row in rows], [row["label"] for row in rows]
    assert metrics["accuracy"] == pytest.approx(scores.accuracy(predicted, labels), abs=1e-12)
    assert metrics["mcc"] == pytest.approx(scores.matthews(predicted, labels), abs=1e-12)
    assert metrics["f1"] == pytest.approx(scores.f1_binary(predicted, labels), abs=1e-12)
    for row in rows:
        assert sum(row["probabilities"]) == pytest.approx(1.0)
        assert max(range(2), key=row["probabilities"].__getitem__) == row["predicted"]


def test_an_eval_stopped_between_its_two_files_leaves_no_metrics_of_another_eval(trained, capsys, monkeypatch):
    """eval.json (metrics) and eval.jsonl (one line per example) are a pair: a rerun stopped after the metrics were
    written but before the lines (a kill, a full disk) left new metrics beside an earlier eval's lines. The old
    metrics are now removed first and the new ones written last."""
    import reft_fast.train.files as files
    from reft_fast.train.cli import main

    config, _ = trained
    out_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    assert main(["eval", str(out_dir)]) == 0 and (out_dir / "eval" / "eval.json").is_file()

    def disk_full(path, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_jsonl_atomically", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main(["eval", str(out_dir)])
    assert not (out_dir / "eval" / "eval.json").exists() and (out_dir / "eval" / "eval.jsonl").is_file()
    capsys.readouterr()


def test_eval_of_a_regression_run_writes_the_predicted_values(tmp_path):
    """STS-B's shape: each line holds the predicted value; Pearson and Spearman recomputed from the lines are the
    reported ones."""
    from reft_fast.train import scores
    from reft_fast.train.cli import main

    rng = random.Random(2)
    rows = [{"sentence1": " ".join(rng.choice(POSITIVE + NEGATIVE) for _ in range(3)), "sentence2": "sun",
             "label": float(i % 5)} for i in range(32)]
    config = make_run(tmp_path, rows, num_labels=1, classification={"num_labels": 1, "problem_type": "regression"})
    train(config, ["training.max_steps=2", "training.eval_every=0"])
    assert main(["eval", str(tmp_path / "out"), "--out", str(tmp_path / "stsb.jsonl")]) == 0
    metrics, lines = json.loads((tmp_path / "stsb.json").read_text()), _lines(tmp_path / "stsb.jsonl")
    assert [line["index"] for line in lines] == list(range(8)) and metrics["examples"] == 8
    assert [line["label"] for line in lines] == _eval_labels(config)
    assert all(isinstance(line["predicted"], float) and "probabilities" not in line for line in lines)
    predicted, labels = [line["predicted"] for line in lines], [line["label"] for line in lines]
    assert metrics["pearson"] == pytest.approx(scores.pearson(predicted, labels), abs=1e-12)
    assert metrics["spearman"] == pytest.approx(scores.spearman(predicted, labels), abs=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# The paper's GLUE protocol: a selection part and a test part of the eval set, the best evaluation kept
# --------------------------------------------------------------------------------------------------------------------
def test_the_selection_split_is_seeded_disjoint_and_covers_the_eval_set():
    from reft_fast.train.data import selection_and_test_parts, selection_size

    examples = list(range(37))
    selection, test = selection_and_test_parts(examples, 10, seed=3)
    assert len(selection) == 10 and sorted(selection + test) == examples and not set(selection) & set(test)
    assert selection == sorted(selection) and test == sorted(test)  # both keep the eval set's order
    assert selection_and_test_parts(examples, 10, seed=3) == (selection, test)
    assert selection_and_test_parts(examples, 10, seed=4)[0] != selection
    # reft_paper: 1000 examples of a split of more than 5000 (MNLI, QNLI, QQP), else half (SST-2's 872 → 436)
    assert [selection_size(n, "reft_paper") for n in (40_430, 5001, 5000, 872, 3)] == [1000, 1000, 2500, 436, 1]
    with pytest.raises(ValueError, match=r"^data.selection_examples: 37 takes 37 of the 37 eval examples"):
        selection_and_test_parts(examples, 37, seed=3)


def glue_protocol_run(folder: Path) -> Path:
    """Training labels flipped (positive words → 0), eval labels right: the eval loss is lowest early and rises as
    training goes on, so the best evaluation by eval_loss is not the last. 40 eval examples: 16 select, 24 test."""
    rows = sentiment_rows(64)
    config = make_run(folder, [{**row, "label": 1 - row["label"]} for row in rows],
                      data={"eval_file": "eval.jsonl", "eval_fraction": 0.0, "selection_examples": 16},
                      training={"max_steps": 16, "lr": 2e-2, "eval_every": 4, "log_every": 4, "save_every": 8,
                                "keep_checkpoints": 4, "keep_best": "eval_loss"})
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(40, seed=9)))
    return config


def _trainable(reft_model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in reft_model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def kept_best(tmp_path_factory):
    """The GLUE-protocol run, with the trainable weights recorded at every evaluation."""
    config = glue_protocol_run(tmp_path_factory.mktemp("glue_protocol"))
    weights = {}

    def record(step, metrics, engine):
        if "eval_loss" in metrics:
            weights[step] = _trainable(engine.module)

    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    try:
        recipe = ReftTrainingRecipe(load_config(str(config)), callbacks=[record])
        result = recipe.run()
    finally:
        shutdown()
    weights["after the run"] = _trainable(recipe.reft_model)
    return config, result, weights


def _final_weights(config: Path, final: Path, names) -> dict[str, torch.Tensor]:
    from reft_fast import ReftModel
    from reft_fast.train.run_dir import load_trainable_base

    base = transformers.RobertaForSequenceClassification.from_pretrained(config.parent / "model")
    load_trainable_base(base, final)
    loaded = dict(ReftModel.load(final, base).named_parameters())
    return {name: loaded[name].detach() for name in names}


def test_keep_best_puts_the_best_evaluations_weights_in_final(kept_best):
    config, result, weights = kept_best
    scored = [(m["eval_loss"], m["step"]) for m in result.eval_metrics if m["step"] > 0]
    best_step = min(scored)[1]
    assert [step for _, step in scored] == [4, 8, 12, 16] and best_step < 16, scored  # the run this test needs
    assert result.best == {"step": best_step, "metric": "eval_loss", "value": min(scored)[0]}
    final = Path(result.final_dir)
    assert json.loads((final / "best.json").read_text()) == result.best
    assert not (final.parent / "best").exists()  # renamed to final/ at the end
    got = _final_weights(config, final, weights[best_step])
    assert any(name.startswith("model.classifier") for name in got)  # the trained head is kept with the edits
    for name, value in weights[best_step].items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    assert not all(torch.equal(got[name], weights[16][name]) for name in got)  # not the last step's
    # and the model holds them again after the run (what a causal-LM run's sample prompts are answered with)
    for name, value in weights[best_step].items():
        torch.testing.assert_close(weights["after the run"][name], value, rtol=0, atol=0, msg=name)


def test_a_resumed_run_keeps_the_best_record_of_before_the_interruption(kept_best, tmp_path):
    """Interrupted right after its step-8 checkpoint (a callback raising there) and resumed: the evaluations at 12 and
    16 are worse than the one before the interruption, which final/ must still hold."""
    from safetensors.torch import load_file

    config, result, _ = kept_best
    assert result.best["step"] <= 8, result.eval_metrics  # the run this test needs

    class Interrupted(Exception):
        pass

    def interrupt(step, metrics, engine):
        if step == 8:
            raise Interrupted

    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    out = tmp_path / "out"
    try:
        with pytest.raises(Interrupted):
            ReftTrainingRecipe(load_config(str(config), [f"output_dir={out}"]), callbacks=[interrupt]).run()
    finally:
        shutdown()
    assert (out / "best" / "best.json").is_file() and not (out / "final").exists()
    try:
        recipe = ReftTrainingRecipe(load_config(str(config), [f"output_dir={out}", "resume=true"]))
        resumed = recipe.run()
    finally:
        shutdown()
    assert resumed.best == result.best
    for name in ("interventions.safetensors", "base_trainable.safetensors"):
        expected, got = load_file(Path(result.final_dir) / name), load_file(out / "final" / name)
        assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected), name
    # The best evaluation was the first launch's: the resumed run's model holds it again, read from final/.
    held = _trainable(recipe.reft_model)
    for name, value in _final_weights(config, out / "final", held).items():
        torch.testing.assert_close(held[name], value, rtol=0, atol=0, msg=name)


def test_eval_scores_the_test_part_only(kept_best, capsys):
    """Training evaluated the 16 selection examples; `reft-fast eval RUN_DIR` scores the other 24 and says so."""
    from reft_fast.train import scores
    from reft_fast.train.cli import main

    config, _, _ = kept_best
    out_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    assert len(_eval_labels(config)) == 16
    assert main(["eval", str(out_dir)]) == 0
    assert "on the test part of the eval set (data.selection_examples=16" in capsys.readouterr().out
    metrics = json.loads((out_dir / "eval" / "test.json").read_text())
    lines = _lines(out_dir / "eval" / "test.jsonl")
    assert metrics["examples"] == 24 and metrics["scored"].startswith("the test part")
    assert [line["label"] for line in lines] == _eval_labels(config, eval_part="test")
    predicted = [line["predicted"] for line in lines]
    assert metrics["accuracy"] == pytest.approx(scores.accuracy(predicted, [line["label"] for line in lines]))


@pytest.mark.parametrize("overrides, message", [
    (["data.selection_examples=0"], r"^data.selection_examples: a number of examples ≥ 1, one of \['reft_paper'\]"),
    (["data.selection_examples=half"], r"^data.selection_examples: a number of examples ≥ 1"),
    (["data.selection_examples=4", "data.eval_fraction=0"], r"^data.selection_examples: cuts the eval set in two, "
                                                             r"and the config names none"),
    (["training.keep_best=matthews_correlation"], r"^training.keep_best: task classification here reports "
                                                  r"\['eval_loss', 'accuracy', 'mcc', 'f1'\]"),
    (["training.keep_best=pearson"], r"^training.keep_best: task classification here reports"),
    (["training.keep_best=accuracy", "data.eval_fraction=0"], r"^training.keep_best: chooses among the evaluations"),
])
def test_bad_protocol_options_are_config_errors(tmp_path, overrides, message):
    from reft_fast.train.train_config import ConfigError, load_config, validate

    config = make_run(tmp_path, sentiment_rows(8))
    with pytest.raises(ConfigError, match=message):
        validate(load_config(str(config), overrides))


def test_a_selection_part_as_large_as_the_eval_set_is_a_config_error(tmp_path):
    from reft_fast.train.tasks import make_task, task_datasets
    from reft_fast.train.train_config import ConfigError, load_config

    config = make_run(tmp_path, sentiment_rows(16))  # eval_fraction 0.25: 4 eval examples
    cfg = load_config(str(config), ["data.selection_examples=4"])
    with pytest.raises(ConfigError, match=r"^data.selection_examples: 4 takes 4 of the 4 eval examples"):
        task_datasets(make_task(cfg), make_tokenizer(), cfg.training.seed)


def test_the_eval_sets_alone_read_no_training_file(tmp_path):
    """`reft-fast eval` asks for the eval set only (read_train=False): with data.eval_file the training file is
    neither read nor needed (it was read and tokenized whole, and a training file since moved away made eval fail)."""
    from reft_fast.train.task_classification import ClassificationTask
    from reft_fast.train.train_config import load_config

    config = make_run(tmp_path, sentiment_rows(16))
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(6, seed=3)))
    cfg = load_config(str(config), ["data.eval_file=other.jsonl", "data.eval_fraction=0"])
    (tmp_path / "train.jsonl").unlink()
    train_set, eval_set = ClassificationTask(cfg).datasets(make_tokenizer(), cfg.training.seed, "test",
                                                           read_train=False)
    assert train_set is None and len(eval_set) == 6


def test_eval_data_may_be_a_saved_dataset_folder_and_its_split(trained, capsys, tmp_path):
    """`reft-fast eval RUN --data FOLDER [--split S]` on a classification run: a folder written by save_to_disk (a
    DatasetDict, GLUE's splits with a ClassLabel column) is scored at --split, as the README's Evaluate section says
    --data may be; it was refused as "no such file" although the folder is there."""
    import datasets

    from reft_fast.train.cli import main

    config, _ = trained
    out_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    splits = {"validation": sentiment_rows(6, seed=4), "test": [{**r, "label": -1} for r in sentiment_rows(3)]}
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows, features=features)
                          for name, rows in splits.items()}).save_to_disk(str(tmp_path / "glue"))
    assert main(["eval", str(out_dir), "--data", str(tmp_path / "glue"), "--split", "validation"]) == 0
    assert "(split validation)" in capsys.readouterr().out
    lines = _lines(out_dir / "eval" / "glue-validation.jsonl")
    assert [line["label"] for line in lines] == [r["label"] for r in splits["validation"]]
    assert main(["eval", str(out_dir), "--data", str(tmp_path / "glue")]) == 0  # test, GLUE's: no labels
    assert "(split test)" in capsys.readouterr().out  # predicted, not scored
    lines = _lines(out_dir / "eval" / "glue-test.jsonl")
    assert [line["label"] for line in lines] == [None] * 3 and all(line["predicted"] in (0, 1) for line in lines)
