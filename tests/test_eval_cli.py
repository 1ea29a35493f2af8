"""Batched generation with the edits and ``reft-fast eval`` on a tiny random Llama (CPU)."""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from reft_fast import ReftConfig, ReftModel, get_reft_model
from reft_fast.train.cli import main
from reft_fast.train.data import split_examples
from reft_fast.train.generation import generate_answers, generate_answers_batched
from reft_fast.train.train_config import load_config

from dist.tiny import make_examples, make_model_dir, make_run, make_tokenizer, subprocess_env, write_jsonl

PROMPTS = ["repeat : red", "repeat : cat dog bird fish cow", "reverse : one two", "red", "repeat : sky sea sun moon",
           "reverse : big small hot"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("tiny") / "model", layers=2)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = ReftConfig([{"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2},
                         {"layer": 1, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": 2}], positions="f1+l2", share_weights=True)
    reft_model = get_reft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():  # strong edits, so that the answers visibly depend on them
        for p in reft_model.interventions.parameters():
            if p.dim() == 1:
                p.normal_(0, 3.0)
    return base, reft_model, make_tokenizer()


@pytest.mark.parametrize("chat_template", [True, False])
def test_batched_answers_equal_one_at_a_time(tiny, chat_template):
    base, reft_model, tokenizer = tiny
    kwargs = dict(positions="f1+l2", share_weights=True, chat_template=chat_template, max_new_tokens=6)
    edited = generate_answers(reft_model, tokenizer, PROMPTS, **kwargs)
    for batch_size in (4, len(PROMPTS)):
        assert generate_answers_batched(reft_model, tokenizer, PROMPTS, batch_size=batch_size, **kwargs) == edited
    plain = generate_answers(base, tokenizer, PROMPTS, **kwargs)
    assert generate_answers_batched(base, tokenizer, PROMPTS, batch_size=4, **kwargs) == plain
    assert plain != edited  # the edits matter, so equal answers show they landed on each row's own tokens


def test_batched_generation_refuses_a_batch_of_none(tiny):
    base, _, tokenizer = tiny
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        generate_answers_batched(base, tokenizer, PROMPTS, batch_size=0)


# --------------------------------------------------------------------------------------------------------------------
# reft-fast eval
# --------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained through the CLI (6 steps) and an eval set in the LLM-Adapters fields, one row per task."""
    folder = tmp_path_factory.mktemp("evalrun")
    config = make_run(folder, n_examples=24, max_steps=6)
    assert main(["train", str(config)]) == 0
    rows = [{"instruction": ex["instruction"], "output": ex["output"], "answer": ex["output"],
             "task": "repeat-short" if len(ex["output"].split()) < 4 else "repeat-long"} for ex in make_examples(7, 9)]
    return config, folder / "out", write_jsonl(folder / "eval.jsonl", rows), rows


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_at_a_time(config, rows, *, base_only=False) -> list[str]:
    """The answers of ``reft-fast generate``'s path (one prompt per call) with the run's final interventions."""
    cfg = load_config(str(config))
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    model = base if base_only else ReftModel.load(str(Path(cfg.output_dir) / "final"), base)
    return generate_answers(model, make_tokenizer(), [row["instruction"] for row in rows], positions="f1+l1",
                            share_weights=True, max_new_tokens=5)


def test_eval_scores_the_runs_answers_and_writes_them(trained_run, capsys):
    config, out, data, rows = trained_run
    assert main(["eval", str(config), "--data", str(data), "--batch-size", "3", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    predictions = _predictions(out / "eval" / "eval.jsonl")
    assert [p["prompt"] for p in predictions] == [row["instruction"] for row in rows]
    assert [p["gold"] for p in predictions] == [row["answer"] for row in rows]
    assert [p["output"] for p in predictions] == _one_at_a_time(config, rows)
    for p in predictions:  # the gold answers are words, not numbers or options: the exact family
        assert p["extracted"] == (" ".join(p["output"].split()).casefold() or None)
        assert p["correct"] == (p["extracted"] == p["gold"])
    assert "exact accuracy of the interventions in" in printed
    correct = sum(p["correct"] for p in predictions)
    assert re.search(rf"^all\s+7\s+{correct}\s+\d+\s+{100 * correct / 7:.1f}%$", printed, re.MULTILINE), printed
    assert re.search(r"^repeat-short\s+\d+", printed, re.MULTILINE) and "repeat-long" in printed


def test_eval_of_a_run_directory_base_only_and_the_held_out_split(trained_run, capsys):
    config, out, data, rows = trained_run
    assert main(["eval", str(out), "--data", str(data), "--base-only", "--max-new-tokens", "5"]) == 0
    base_answers = [p["output"] for p in _predictions(out / "eval" / "eval-base.jsonl")]
    assert base_answers == _one_at_a_time(config, rows, base_only=True)
    assert base_answers != _one_at_a_time(config, rows)  # the edits change the answers
    # No --data: the examples the training run held out (data.eval_fraction), its gold answers read from "output".
    held_out = out / "eval" / "held.jsonl"
    assert main(["eval", str(out / "final"), "data.eval_fraction=0.25", "--family", "exact", "--out", str(held_out),
                 "--max-new-tokens", "2"]) == 0
    train_rows = [json.loads(line) for line in (config.parent / "train.jsonl").read_text().splitlines()]
    _, expected = split_examples(train_rows, 0.25, load_config(str(config)).training.seed)
    assert [(p["prompt"], p["gold"], p["task"]) for p in _predictions(held_out)] == [
        (row["instruction"], row["output"], "train-heldout") for row in expected]


def test_eval_of_a_causal_run_with_a_selection_part_scores_its_test_part(trained_run, capsys):
    """data.selection_examples: training evaluated a seeded selection part of the held-out examples; eval scores the
    rest, and says so."""
    from reft_fast.train.data import selection_and_test_parts

    config, out, _, _ = trained_run
    seed = load_config(str(config)).training.seed
    assert main(["eval", str(out), "data.eval_fraction=0.25", "data.selection_examples=2", "--family", "exact",
                 "--max-new-tokens", "2"]) == 0
    assert "the test part of the eval set (data.selection_examples=2" in capsys.readouterr().out
    train_rows = [json.loads(line) for line in (config.parent / "train.jsonl").read_text().splitlines()]
    selection, test = selection_and_test_parts(split_examples(train_rows, 0.25, seed)[1], 2, seed)
    scored = [p["prompt"] for p in _predictions(out / "eval" / "train-heldout-test.jsonl")]
    assert len(test) == 4 and scored == [row["instruction"] for row in test]


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "no such file"),
    ([], "--data: required"),
    (["--data", "{data}", "--family", "commonsense"], "not a commonsense option"),
])
def test_eval_errors_name_the_problem(trained_run, capsys, args, message):
    config, _, data, _ = trained_run
    assert main(["eval", str(config), *[a.format(data=data) for a in args]]) == 2
    assert message in capsys.readouterr().err


def test_eval_of_the_configs_eval_file_names_a_bad_row_by_its_line(trained_run, tmp_path, capsys):
    config, _, _, rows = trained_run
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"output": "no prompt here", "answer": "x"}])
    assert main(["eval", str(config), f"data.eval_file={bad}", "--family", "exact"]) == 2
    assert f"config error: data.eval_file: {bad}:2: expected a text field 'instruction'" in capsys.readouterr().err
    # The rows held out of a training file are named by their lines in it too (they were "row i" of the held-out set).
    no_prompts = write_jsonl(tmp_path / "train.jsonl", [{"output": f"o{i}", "answer": "x"} for i in range(8)])
    seed = load_config(str(config)).training.seed
    first_held_out = split_examples(list(range(8)), 0.25, seed)[1][0]
    assert main(["eval", str(config), f"data.train_file={no_prompts}", "data.eval_fraction=0.25", "--family",
                 "exact"]) == 2
    assert f"{no_prompts}:{first_held_out + 1}: expected a text field" in capsys.readouterr().err


def test_eval_names_a_prompt_too_long_for_the_model_before_answering(trained_run, tmp_path, capsys):
    """A prompt that with its answer outgrows the model's 256 positions ran past them (RoPE answers garbage there;
    a learned position table fails midway with an IndexError, every answer lost): it is a config error naming its
    line, raised on every rank before any answer, and no predictions are written."""
    config, _, _, rows = trained_run
    long_row = {**rows[0], "instruction": "repeat : " + "red " * 300}
    data = write_jsonl(tmp_path / "long.jsonl", [rows[0], long_row])
    out = tmp_path / "predictions.jsonl"
    assert main(["eval", str(config), "--data", str(data), "--max-new-tokens", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"config error: eval: {re.escape(str(data))}:2: \d+ prompt tokens \+ max_new_tokens 5 exceed "
                     r"the model's 256 positions", err), err
    assert not out.exists()


def test_ctrl_c_during_eval_leaves_the_earlier_predictions_and_says_so(trained_run, tmp_path, capsys, monkeypatch):
    """ctrl-C halfway through the answers (a real SIGINT, after the first batch) ended eval with a KeyboardInterrupt
    traceback; now one line says that nothing was scored and the earlier predictions file is untouched (the file
    is only ever written whole, at the end)."""
    import os
    import signal

    import reft_fast.train.generation as generation

    config, _, data, _ = trained_run
    out = tmp_path / "predictions.jsonl"
    out.write_text('{"earlier": true}\n')
    answer_batch = generation.generate_answers_batched

    def interrupted_after_one_batch(model, tokenizer, prompts, **kwargs):
        first = answer_batch(model, tokenizer, prompts[:2], **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return first + answer_batch(model, tokenizer, prompts[2:], **kwargs)

    monkeypatch.setattr(generation, "generate_answers_batched", interrupted_after_one_batch)
    # ctrl-C as a terminal delivers it, to Python's handler: a test process started as a background job (`cmd &` in
    # a script) inherits SIGINT ignored, and the signal above then did nothing (a clean-clone run, 2026-11-30)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["eval", str(config), "--data", str(data), "--max-new-tokens", "5", "--out", str(out)])
    except KeyboardInterrupt:
        pytest.fail("ctrl-C during eval ended in a KeyboardInterrupt traceback")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert (f"reft-fast: stopped by ctrl-C or SIGTERM; nothing scored: the results are written whole, at the end, "
            f"and {out} holds an earlier eval's, untouched") in capsys.readouterr().err
    assert out.read_text() == '{"earlier": true}\n'


def test_eval_refuses_a_run_without_interventions(tmp_path, capsys):
    config = make_run(tmp_path)
    assert main(["eval", str(config), "--data", "x.jsonl"]) == 2
    assert "no trained interventions (config.json); train first, or pass --base-only" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no such config file or run directory" in capsys.readouterr().err


def test_eval_refuses_an_out_that_is_a_folder_or_the_data_before_answering(trained_run, tmp_path, capsys,
                                                                          monkeypatch):
    """--out naming a folder was a traceback after every answer; --out naming the --data file (or the config's
    training file) replaced the data by the predictions, silently. Both are config errors before any answer."""
    import reft_fast.train.evaluation as evaluation

    config, _, data, _ = trained_run
    monkeypatch.setattr(evaluation, "generate_and_score", lambda *a, **k: pytest.fail("answered before refusing"))
    copy = tmp_path / "data.jsonl"
    copy.write_text(data.read_text())
    train_file = config.parent / "train.jsonl"
    for out, message in ((tmp_path, "a directory"), (copy, "the data file itself"),
                         (train_file, "the data file itself"), (copy / "x.jsonl", f"cannot be created: {copy}")):
        assert main(["eval", str(config), "--data", str(copy), "--out", str(out)]) == 2
        assert f"config error: --out {out}: {message}" in capsys.readouterr().err
    assert copy.read_text() == data.read_text()


def test_eval_base_only_of_an_output_dir_without_final_writes_into_it(trained_run, tmp_path, capsys):
    """A run directory without final/ (training not finished) was taken for a final/ folder: --base-only wrote its
    predictions into the eval/ of the folder around it."""
    config, out, data, _ = trained_run
    run = tmp_path / "unfinished"
    run.mkdir()
    shutil.copy(out / "train_config.yaml", run)
    assert main(["eval", str(run), "--data", str(data), "--base-only", "--max-new-tokens", "1"]) == 0
    assert (run / "eval" / "eval-base.jsonl").is_file() and not (tmp_path / "eval").exists()


def test_evals_of_two_folders_of_interventions_side_by_side_keep_both_predictions(trained_run, tmp_path, capsys):
    """Each folder's default predictions file is named after it: both were <parent>/eval/<data>.jsonl, and the
    second eval replaced the first's predictions."""
    _, out, data, _ = trained_run
    for name in ("first", "second"):
        shutil.copytree(out / "final", tmp_path / name)
        assert main(["eval", str(tmp_path / name), "--data", str(data), "--max-new-tokens", "1"]) == 0
        assert f"predictions in {tmp_path / 'eval' / f'eval-{name}.jsonl'}" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "eval").iterdir()) == ["eval-first.jsonl", "eval-second.jsonl"]


@pytest.mark.slow
def test_eval_on_two_ranks_equals_one_rank(trained_run, tmp_path):
    """Each rank answers a shard; rank 0 gathers and writes the same file as one rank does."""
    config, out, data, _ = trained_run
    one = tmp_path / "one.jsonl"
    assert main(["eval", str(out), "--data", str(data), "--max-new-tokens", "5", "--out", str(one)]) == 0
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    two = tmp_path / "two.jsonl"
    proc = subprocess.run([launcher, "--master_port", str(_free_port()), "--num_gpus", "2", "--module", "reft_fast",
                           "eval", str(out), "--data", str(data), "--batch-size", "3", "--max-new-tokens", "5",
                           "--out", str(two)], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "(2 ranks)" in proc.stdout
    assert _predictions(two) == _predictions(one)


def test_evaluation_during_training_reports_the_accuracy_eval_reports(tmp_path, capsys):
    """data.eval_family: every evaluation (step 0, eval_every, the end) adds eval_accuracy; the last one is what
    `reft-fast eval` measures on the final interventions and the same held-out examples."""
    config = make_run(tmp_path, n_examples=24, max_steps=4, eval_every=2, max_new_tokens=4)
    assert main(["train", str(config), "data.eval_fraction=0.25", "data.eval_family=exact"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evaluated] == [0, 2, 4]
    assert all(0.0 <= row["eval_accuracy"] <= 1.0 for row in evaluated)
    assert main(["eval", str(tmp_path / "out"), "--max-new-tokens", "4", "--batch-size", "2"]) == 0
    predictions = _predictions(tmp_path / "out" / "eval" / "train-heldout.jsonl")
    assert len(predictions) == 6
    assert evaluated[-1]["eval_accuracy"] == pytest.approx(sum(p["correct"] for p in predictions) / 6)
    assert "exact accuracy" in capsys.readouterr().out  # the family the run's config names


def test_a_wrong_eval_family_is_a_config_error(tmp_path, capsys):
    config = make_run(tmp_path)
    assert main(["train", str(config), "data.eval_family=math"]) == 2
    assert "data.eval_family: expected one of commonsense, arithmetic, exact, got 'math'" in capsys.readouterr().err


def test_eval_holds_out_of_a_hugging_face_training_set_as_training_did(trained_run, tmp_path):
    """data.hf_dataset (a dataset folder here, read by `datasets` offline) with data.eval_fraction: eval scores the
    examples training held out of it (before, it asked for --data)."""
    pytest.importorskip("datasets")
    config, out, _, _ = trained_run
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "train.jsonl").write_text((config.parent / "train.jsonl").read_text())
    held_out = tmp_path / "held.jsonl"
    assert main(["eval", str(out / "final"), "data.train_file=null", f"data.hf_dataset={folder}",
                 "data.eval_fraction=0.25", "--family", "exact", "--out", str(held_out), "--max-new-tokens", "2"]) == 0
    train_rows = [json.loads(line) for line in (config.parent / "train.jsonl").read_text().splitlines()]
    _, expected = split_examples(train_rows, 0.25, load_config(str(config)).training.seed)
    assert [(p["prompt"], p["gold"]) for p in _predictions(held_out)] == [
        (row["instruction"], row["output"]) for row in expected]
    assert {p["task"] for p in _predictions(held_out)} == {"hf-heldout"}


def test_eval_data_reads_a_dataset_folders_split(trained_run, tmp_path, capsys):
    """--data a folder written by Dataset.save_to_disk is scored on the one split it holds (it was refused: "holds
    one split, 'train', not 'test'"); --split picks a split of a dataset and is refused where it would pick nothing."""
    datasets = pytest.importorskip("datasets")
    config, _, _, rows = trained_run
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "saved.jsonl"
    assert main(["eval", str(config), "--data", str(tmp_path / "saved"), "--out", str(out),
                 "--max-new-tokens", "2"]) == 0
    assert [p["prompt"] for p in _predictions(out)] == [row["instruction"] for row in rows]
    # a dataset folder of split files (read by load_dataset): --split names which one
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "test.jsonl", rows[:2])
    write_jsonl(tmp_path / "hub" / "validation.jsonl", rows[2:5])
    assert main(["eval", str(config), "--data", str(tmp_path / "hub"), "--split", "validation", "--out", str(out),
                 "--max-new-tokens", "2"]) == 0
    assert [p["prompt"] for p in _predictions(out)] == [row["instruction"] for row in rows[2:5]]
    capsys.readouterr()
    assert main(["eval", str(config), "--data", str(tmp_path / "saved"), "--split", "test"]) == 2
    assert "holds one split, 'train', not 'test'" in capsys.readouterr().err
    for data in ([], ["--data", str(tmp_path / "hub" / "test.jsonl")]):
        assert main(["eval", str(config), *data, "--split", "validation"]) == 2
        assert "--split: picks the split of a Hugging Face dataset given as --data" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, named", [
    (["data.eval_fraction=0.25", "data.eval_family=exact", "training.max_new_tokens=250"], r"train\.jsonl:\d+"),
    (["training.sample_prompts=['" + "red " * 300 + "']"], r"training\.sample_prompts\[0\]"),
], ids=["eval-set", "sample-prompt"])
def test_training_refuses_a_prompt_it_cannot_answer_before_any_step(tmp_path, capsys, overrides, named):
    """A prompt training will generate for (the eval set's, with data.eval_family; a sample prompt) that with its
    answer outgrows the model's 256 positions is refused on every rank before the first step. Found mid-run, by the
    one rank whose shard of the eval set holds it, it left the others waiting for the ranks' timeout."""
    config = make_run(tmp_path)
    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"config error: (\S*/)?{named}: \d+ prompt tokens \+ max_new_tokens \d+ exceed the model's 256 "
                     r"positions .*\(training\.max_new_tokens sets the answer's length\)", err), err
    assert not (tmp_path / "out" / "checkpoints").exists() and not list((tmp_path / "out").glob("**/*.safetensors"))
