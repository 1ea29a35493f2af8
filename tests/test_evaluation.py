import json
import math
import re

import pytest

from reft_fast.train.evaluation import (EvalExample, accuracy, check_gold_answers, eval_examples_from_rows,
                                        extract_answer, infer_family, is_correct, load_eval_examples, score,
                                        summary_table, write_predictions)

PIQA_PROMPT = ("Please choose the correct solution to the question: keep a door open\n\nSolution1: wedge it\n"
               "Solution2: paint it\n\nAnswer format: solution1/solution2")


@pytest.mark.parametrize("text, gold, prompt, expected", [
    ("the correct answer is true", "false", "", "true"),
    ("The correct answer is False. Because the", "true", "", "false"),
    ("the correct answer is solution2", "solution1", PIQA_PROMPT, "solution2"),
    ("I think Solution 1 works; the correct answer is solution2 the correct answer is solution1", "solution1",
     PIQA_PROMPT, "solution2"),  # the first stated answer, not the first option named
    ("option2", "option1", "", "option2"),
    ("the correct answer is ending4", "ending1", "", "ending4"),
    ("the correct answer is answer3\nQuestion: ... answer5", "answer1", "", "answer3"),
    ("answer12 is not one", "answer1", "Answer format: answer1/answer2/answer3", None),
    ("the correct answer is (C).", "A", "", "C"),
    ("A cat says B", "A", "", "B"),  # no phrase: the last standalone letter
    ("I cannot tell", "solution1", PIQA_PROMPT, None),
])
def test_commonsense_extraction(text, gold, prompt, expected):
    assert extract_answer(text, "commonsense", gold=gold, prompt=prompt) == expected


@pytest.mark.parametrize("text, gold, expected", [
    ("She has 3 apples and buys 4, so 3 + 4 = 7. The answer is 7.", "7", "7"),
    ("so 1,250 + 30 = 1,280", "1280", "1280"),
    ("The answer is 12.50 dollars, not 13", "12.5", "12.5"),
    ("The answer is -3. Next question: 5 + 5 = 10", "-3", "-3"),
    ("half of it is .75", "0.75", ".75"),
    ("pick 3, 4", "4", "4"),
    ("no number here", "4", None),
    ("The answer is (D) 42", "D", "D"),
])
def test_arithmetic_extraction(text, gold, expected):
    assert extract_answer(text, "arithmetic", gold=gold) == expected


@pytest.mark.parametrize("extracted, gold, expected", [
    ("7", "7", True), ("7.0", "7", True), ("33.333", "33.33", True), ("33.34", "33.33", False),
    ("1001", "1000", False), ("1000.05", "1000", True), ("0.0005", "0", True), ("0.002", "0", False),
    (".75", "0.75", True), (None, "7", False), ("D", "d", True), ("C", "D", False), ("1280", "1,280", True),
])
def test_arithmetic_correctness(extracted, gold, expected):
    assert is_correct(extracted, gold, "arithmetic") is expected


@pytest.mark.parametrize("family, reference, expected", [
    ("commonsense", "the correct answer is Ending3", "ending3"),
    ("commonsense", "the correct answer is false", "false"),
    ("commonsense", "the correct answer is B", "B"),
    ("arithmetic", "5 + 13 = 18. The answer is 18.", "18"),
    ("arithmetic", "12 is (C), so the answer is C", "C"),
])
def test_gold_answers_read_from_reference_responses(family, reference, expected):
    assert extract_answer(reference, family) == expected


def test_commonsense_and_exact_correctness():
    assert is_correct("solution1", "Solution1", "commonsense")
    assert not is_correct("solution2", "solution1", "commonsense")
    assert is_correct("a", "A", "commonsense")
    assert extract_answer("  Positive.\nmore text", "exact", gold="positive") == "positive"
    assert is_correct("positive", "Positive", "exact")
    assert not is_correct(extract_answer("positive review", "exact", gold="positive"), "positive", "exact")
    assert extract_answer("   \n", "exact", gold="x") is None


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a commonsense option"):
        extract_answer("blue", "commonsense", gold="blue")
    with pytest.raises(ValueError, match="unknown answer family 'math'"):
        extract_answer("1", "math", gold="1")
    with pytest.raises(ValueError, match="neither a number nor an option letter"):
        is_correct("3", "three", "arithmetic")


def test_infer_family():
    def make(*golds):
        return [EvalExample("p", gold, "t") for gold in golds]

    assert infer_family(make("18", "2.5", "-1")) == "arithmetic"
    assert infer_family(make("true", "solution2", "B", "ending3")) == "commonsense"
    assert infer_family(make("true", "positive")) == "exact"


def test_score_accuracy_table_and_jsonl(tmp_path):
    examples = [EvalExample("q1", "true", "boolq"), EvalExample("q2", "false", "boolq"),
                EvalExample("q3", "solution1", "piqa"), EvalExample("q4", "solution2", "piqa"),
                EvalExample("q5", "solution2", "piqa")]
    outputs = ["the correct answer is true", "the correct answer is true", "the correct answer is solution1",
               "no idea", "solution2"]
    predictions = score(examples, outputs, "commonsense")
    assert [p.correct for p in predictions] == [True, False, True, False, True]
    assert accuracy(predictions) == pytest.approx(3 / 5)
    assert math.isnan(accuracy([]))
    table = summary_table(predictions).splitlines()
    assert table[0].split() == ["task", "n", "correct", "no", "answer", "accuracy"]
    assert table[1].split() == ["boolq", "2", "1", "0", "50.0%"]
    assert table[2].split() == ["piqa", "3", "2", "1", "66.7%"]
    assert table[3].split() == ["all", "5", "3", "1", "60.0%"]
    out = tmp_path / "sub" / "predictions.jsonl"
    write_predictions(out, predictions)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[3] == {"task": "piqa", "prompt": "q4", "gold": "solution2", "output": "no idea", "extracted": None,
                       "correct": False}
    with pytest.raises(ValueError, match="5 examples but 4 outputs"):
        score(examples, outputs[:4], "commonsense")


def test_load_eval_examples(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([
        {"instruction": "a?", "input": "", "output": "the correct answer is true", "answer": "true", "task": "boolq"},
        {"instruction": "b?", "output": "the correct answer is solution2"},
        {"instruction": "c?", "output": "...", "answer": 18.0},
    ]))
    examples = load_eval_examples(path, family="commonsense")
    assert [(e.prompt, e.gold, e.task) for e in examples] == [("a?", "true", "boolq"), ("b?", "solution2", "mixed"),
                                                              ("c?", "18.0", "mixed")]
    with pytest.raises(ValueError, match="give --family"):
        load_eval_examples(path)
    with pytest.raises(ValueError, match="no such file"):
        load_eval_examples(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="missing.csv: no such file"):  # not looked up on the Hub
        load_eval_examples(tmp_path / "missing.csv")
    path.write_text(json.dumps([{"question": "a?", "answer": "1"}]))
    with pytest.raises(ValueError, match="text field 'instruction'"):
        load_eval_examples(path)
    path.write_text(json.dumps([{"instruction": "a?", "answer": " "}]))
    with pytest.raises(ValueError, match=r"mixed\.json:1: no gold answer"):
        load_eval_examples(path)



def test_check_gold_answers_names_the_example():
    examples = [EvalExample("p", "true", "boolq"), EvalExample("p", "blue", "colors")]
    check_gold_answers(examples[:1], "commonsense")
    check_gold_answers([EvalExample("p", "C", "aqua"), EvalExample("p", "-2.5", "svamp")], "arithmetic")
    with pytest.raises(ValueError, match=r"example 1 \(colors\): gold answer 'blue' is not a commonsense option"):
        check_gold_answers(examples, "commonsense")
    with pytest.raises(ValueError, match=r"example 0 \(boolq\): gold answer 'true' is neither a number"):
        check_gold_answers(examples, "arithmetic")


def test_prompts_and_gold_answers_follow_the_training_templates():
    rows = [{"instruction": "is ice cold?", "answer": "true"}, {"instruction": "is fire cold?", "label": "false"}]
    examples = eval_examples_from_rows(rows, "rows", default_task="t", prompt_template="Q: {instruction}\n",
                                       response_template="the correct answer is {label}", family="commonsense")
    assert [(e.prompt, e.gold) for e in examples] == [("Q: is ice cold?\n", "true"), ("Q: is fire cold?\n", "false")]
    with pytest.raises(ValueError, match=r"^rows: row 0: no field 'question' \(fields: \['answer', 'instruction'\]\); "
                                         "data.prompt_template names it$"):
        eval_examples_from_rows(rows, "rows", default_task="t", prompt_template="Q: {question}")


def test_a_template_error_reads_as_in_training(tmp_path):
    """Evaluation fills a template with the same helper as training, so the same row gives the same message: the
    file and line, the setting and the template (a bad format spec was a bare "Unknown format code" here)."""
    from reft_fast.train.data import load_examples

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a?", "answer": "1"}) + "\n" +
                    json.dumps({"instruction": "b?", "answer": "2", "tags": ["x"]}) + "\n")
    for template, message in (("Q {instruction:.2f}", r":1: data\.prompt_template 'Q \{instruction:\.2f\}': "
                                                      r"Unknown format code 'f' for object of type 'str'$"),
                              ("Q {tags}", r":1: no field 'tags' \(fields: \['answer', 'instruction'\]\); "
                                           r"data\.prompt_template names it$")):
        for read in (lambda: load_eval_examples(path, prompt_template=template),
                     lambda: load_examples(path, prompt_template=template, response_field="answer")):
            with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}{message}"):
                read()


def test_gold_answer_errors_name_the_file_and_line(tmp_path):
    from reft_fast.train.data import load_examples
    from reft_fast.train.evaluation import gold_from_responses

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"instruction": "a?", "answer": "true"},
                                                       {"instruction": "b?", "answer": "blue"}]) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2 \(d\): gold answer 'blue' is not a commonsense"):
        check_gold_answers(load_eval_examples(path), "commonsense")
    path.write_text(json.dumps({"instruction": "a?", "output": "the answer is 3"}) + "\n" +
                    json.dumps({"instruction": "b?", "output": "no idea"}) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: its response 'no idea' states no arithmetic"):
        gold_from_responses(load_examples(path), "arithmetic")


def test_a_missing_eval_file_names_where_it_was_looked_for(tmp_path, monkeypatch):
    """A relative --data that names no file: the message names it absolute, relative to the working directory."""
    from reft_fast.train.data import load_rows

    monkeypatch.chdir(tmp_path)
    where = f"{tmp_path.resolve() / 'missing.jsonl'} (relative to the working directory)"
    with pytest.raises(ValueError, match=re.escape(f"missing.jsonl: no such file (a JSON list, JSONL or CSV file; "
                                                   f"looked for {where})")):
        load_eval_examples("missing.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"missing.jsonl: no such file (looked for {where})")):
        load_rows("missing.jsonl")
