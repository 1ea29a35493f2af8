"""The built-in multiple-choice set (reft_fast/demo/commonsense_{train,test}.json) measures learning honestly: the
held-out questions are about words training never shows, and answering the option in one place (the first, the
second) every time scores exactly chance in each task kind."""

import collections
import json
import re

import pytest

from reft_fast.demo import DEMO_DIR
from reft_fast.train.evaluation import extract_answer

_OPTION_LINE = re.compile(r"^(?:option|solution|answer|ending)\d+:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_FIELDS = {"instruction", "input", "output", "answer", "task"}


def _split(name):
    return json.loads((DEMO_DIR / f"commonsense_{name}.json").read_text())


def _options(row):
    return _OPTION_LINE.findall(row["instruction"])


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.parametrize("name", ["train", "test"])
def test_rows_are_llm_adapters_multiple_choice(name):
    rows = _split(name)
    for index, row in enumerate(rows):
        assert set(row) == _FIELDS, f"{name} row {index}"
        options = [option.lower() for option in _options(row)]
        assert len(options) >= 2, f"{name} row {index}: fewer than two options"
        assert row["instruction"].endswith("Answer format: " + "/".join(options)), f"{name} row {index}"
        assert row["answer"] in options, f"{name} row {index}: the answer is not one of the options"
        assert row["output"] == f"the correct answer is {row['answer']}", f"{name} row {index}"
        # The evaluator reads the gold answer back out of the reference response, within the prompt's option set.
        assert extract_answer(row["output"], "commonsense", gold=row["answer"], prompt=row["instruction"]) \
            == row["answer"], f"{name} row {index}"


def test_sizes_fit_a_short_cpu_run():
    assert len(_split("train")) <= 300
    assert 40 <= len(_split("test")) <= 80


@pytest.mark.parametrize("name", ["train", "test"])
def test_each_task_kind_has_its_answers_balanced(name):
    by_task = collections.defaultdict(collections.Counter)  # task kind -> the gold option's place -> count
    for row in _split(name):
        by_task[row["task"]][[option.lower() for option in _options(row)].index(row["answer"])] += 1
    assert len(by_task) >= 2
    for task, answers in by_task.items():
        n_options = {len(_options(row)) for row in _split(name) if row["task"] == task}
        assert len(n_options) == 1, f"{name}/{task}: questions with different numbers of options"
        assert len(answers) == n_options.pop(), f"{name}/{task}: some place never holds the answer: {dict(answers)}"
        assert len(set(answers.values())) == 1, f"{name}/{task}: answers not balanced: {dict(answers)}"


def test_held_out_questions_name_nothing_training_shows():
    train, test = _split("train"), _split("test")
    train_words = set().union(*(_words(row["instruction"]) for row in train))
    train_prompts = {row["instruction"] for row in train}
    for index, row in enumerate(test):
        assert row["instruction"] not in train_prompts, f"test row {index} is a training question"
        seen = [option for option in _options(row) if _words(option) & train_words]
        assert not seen, f"test row {index}: options {seen} appear in training"
