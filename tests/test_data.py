"""Data: loading, chat template, response-only labels, truncation that keeps the prompt, the collator's locations,
and the step sampler (pyreft's data modules: test_compat.py)."""

import csv
import json
import re

import pytest
import torch

from reft_fast.train.data import IGNORE_INDEX, ReftDataCollator, StepSampler, SupervisedDataset, encode_prompt, \
    load_examples, split_examples
from reft_fast.core.positions import intervention_locations

from dist.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_load_json_list_and_jsonl_with_field_names(tmp_path):
    rows = [{"q": "repeat : red", "a": "red"}, {"q": "repeat : cat dog", "a": "cat dog"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name, lines in (("d.json", (1, 1)), ("d.jsonl", (1, 2))):
        assert load_examples(tmp_path / name, "q", "a") == [{"prompt": r["q"], "response": r["a"],
                                                             "where": f"{tmp_path / name}:{line}"}
                                                            for r, line in zip(rows, lines)]
    with pytest.raises(ValueError, match="no field 'instruction'"):
        load_examples(tmp_path / "d.json")
    (tmp_path / "bad.jsonl").write_text('{"q": "x", "a": "y"}\n{broken\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_examples(tmp_path / "bad.jsonl", "q", "a")


def test_templates_build_prompt_and_response_from_the_row(tmp_path):
    """The ReFT paper's commonsense rows: the prompt is the instruction and a newline, the response the trigger
    phrase and the answer; a number prints through a template; a missing field is named with its example."""
    rows = [{"instruction": "Is fire hot? Answer format: true/false", "answer": "true", "output": "..."},
            {"instruction": "What is 6 * 7?", "answer": 42, "output": "..."}]
    (tmp_path / "cs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_examples(tmp_path / "cs.jsonl", prompt_template="{instruction}\n",
                        response_template="the correct answer is {answer}")
    assert [(e["prompt"], e["response"]) for e in got] == [
        (rows[0]["instruction"] + "\n", "the correct answer is true"),
        (rows[1]["instruction"] + "\n", "the correct answer is 42")]
    with pytest.raises(ValueError, match=r"cs.jsonl:2: field 'answer' is int, expected text"):
        load_examples(tmp_path / "cs.jsonl", "instruction", "answer")  # without a template the field is the text
    with pytest.raises(ValueError, match=r"cs.jsonl:1: no field 'question'.*; data.prompt_template names it$"):
        load_examples(tmp_path / "cs.jsonl", prompt_template="Q: {question}\nA: ")
    # each missing field names the setting to change, and only that one
    with pytest.raises(ValueError, match=r"cs.jsonl:1: no field 'reply'.*; set data.response_field$"):
        load_examples(tmp_path / "cs.jsonl", "instruction", "reply")
    with pytest.raises(ValueError, match=r"cs.jsonl:1: no field 'ask'.*; set data.prompt_field$"):
        load_examples(tmp_path / "cs.jsonl", "ask", "output")


def test_a_bad_row_is_named_by_its_file_and_line(tmp_path):
    """JSONL: the line in the file (blank lines counted); CSV: the line its record starts on (a quoted field may span
    lines); a JSON list: the line its object starts on; given rows: the row's index."""
    from reft_fast.train.task_classification import read_labelled_texts
    from reft_fast.train.train_config import ClassificationConfig

    (tmp_path / "a.csv").write_text('instruction,output\n"two\nlines",ok\nthird,\n"fourth",\n')
    rows = load_examples(tmp_path / "a.csv")  # an empty cell is an empty text
    assert [r["prompt"] for r in rows] == ["two\nlines", "third", "fourth"]
    (tmp_path / "b.csv").write_text('instruction,output\n"two\nlines",ok\nthird\n')
    with pytest.raises(ValueError, match=r"b\.csv:4: 1 value\(s\), but the header names 2 columns"):
        load_examples(tmp_path / "b.csv")  # a short record: DictReader would give its missing cell as None
    (tmp_path / "twice.csv").write_text('instruction,output,output\nq,right,wrong\n')  # DictReader kept "wrong"
    with pytest.raises(ValueError, match=r"twice\.csv:1: the header names 'output' more than once"):
        load_examples(tmp_path / "twice.csv")
    (tmp_path / "c.csv").write_text('sentence,label\n"a\nb\nc",1\n\n\nd,x\n')  # blank lines: skipped, counted
    with pytest.raises(ValueError, match=r"c\.csv:7: label 'x' is not"):
        read_labelled_texts(tmp_path / "c.csv", ClassificationConfig())
    (tmp_path / "d.jsonl").write_text('\n{"instruction": "a", "output": "b"}\n\n\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:5: no field 'output'"):
        load_examples(tmp_path / "d.jsonl")
    (tmp_path / "e.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}], indent=1))
    with pytest.raises(ValueError, match=r"e\.json:6: no field 'output'"):
        load_examples(tmp_path / "e.json")
    with pytest.raises(ValueError, match=r"^the given examples: row 1: no field 'output'"):
        load_examples([{"instruction": "a", "output": "b"}, {"instruction": "c"}])


@pytest.mark.parametrize("template, message", [
    ("{instruction", "expected '}' before end of string"),
    ("{0} and {1}", r"\{0\} in '\{0\} and \{1\}' is not a field name"),
    ("no placeholder", "names no field"),
])
def test_a_bad_template_is_a_config_error_before_anything_loads(template, message):
    from reft_fast.train.train_config import ConfigError, TrainConfig, validate

    cfg = TrainConfig()
    cfg.model.path = "unused"
    cfg.data.train_file = "unused.jsonl"
    cfg.data.response_template = template
    with pytest.raises(ConfigError, match=rf"^data\.response_template: .*{message}"):
        validate(cfg, check_model=False, check_data=False)


def test_utf8_byte_order_mark_is_accepted_and_other_encodings_are_named(tmp_path):
    rows = [{"q": "repeat : café", "a": "café"}]
    bom = "\ufeff".encode()  # some Windows editors start UTF-8 files with it
    (tmp_path / "bom.json").write_bytes(bom + json.dumps(rows, ensure_ascii=False).encode())
    (tmp_path / "bom.jsonl").write_bytes(bom + (json.dumps(rows[0], ensure_ascii=False) + "\n").encode())
    for name in ("bom.json", "bom.jsonl"):
        assert load_examples(tmp_path / name, "q", "a") == [{"prompt": "repeat : café", "response": "café",
                                                             "where": f"{tmp_path / name}:1"}]
    latin1 = '{"q": "repeat : red", "a": "red"}\n{"q": "repeat : café", "a": "café"}\n'.encode("latin-1")
    (tmp_path / "latin1.jsonl").write_bytes(latin1)
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9, byte 20 of the line\)"):
        load_examples(tmp_path / "latin1.jsonl", "q", "a")


def test_a_csv_file_is_read_as_utf8_like_a_json_file_and_its_values_may_be_long(tmp_path):
    """A CSV file saved in a Windows code page is named by its file and line, as a JSON file is; a value past csv's
    own 128 KiB limit (a long document) is read, not a csv.Error traceback."""
    text = 'instruction,output\nrepeat : red,red\nrepeat : café,café\n'
    (tmp_path / "cp1252.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(ValueError, match=r"cp1252\.csv:3: not UTF-8 text \(byte 0xe9, byte 13 of the line\)"):
        load_examples(tmp_path / "cp1252.csv")
    long = " ".join(["red"] * 50_000)
    (tmp_path / "long.csv").write_text(f'instruction,output\nrepeat : red,"{long}"\nrepeat : sun,sun\n')
    rows = load_examples(tmp_path / "long.csv")
    assert rows[0]["response"] == long and rows[1]["where"] == f"{tmp_path / 'long.csv'}:3"
    assert csv.field_size_limit() == 131072  # the process's own limit is put back


def test_a_jsonl_line_ends_only_at_a_newline(tmp_path):
    """JSON writes U+2028 and U+0085 inside strings unescaped (ensure_ascii=False); they end no JSONL line."""
    rows = [{"instruction": "a\u2028b", "output": "c\x85d"}, {"instruction": "e", "output": "f"}]
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                                      encoding="utf-8", newline="")
    examples = load_examples(tmp_path / "u.jsonl")
    assert [(e["prompt"], e["response"], e["where"][-2:]) for e in examples] == [("a\u2028b", "c\x85d", ":1"),
                                                                                ("e", "f", ":2")]


def test_chat_template_and_response_only_labels(tokenizer):
    ds = SupervisedDataset([{"prompt": "repeat : red cat", "response": "red cat"}], tokenizer, max_length=64)
    item = ds[0]
    prompt_ids = encode_prompt(tokenizer, "repeat : red cat")
    assert tokenizer.decode(prompt_ids) == "<|user|> repeat : red cat </s> <|assistant|>"
    assert item["input_ids"][: len(prompt_ids)] == prompt_ids and item["prompt_length"] == len(prompt_ids)
    assert item["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    response = item["labels"][len(prompt_ids):]
    # The template's end-of-turn token closes the response and is learned, so the model learns to stop.
    assert tokenizer.decode(response) == "red cat </s>"
    plain = SupervisedDataset([{"prompt": "repeat : red cat", "response": "red cat"}], tokenizer, chat_template=False)
    assert plain[0]["input_ids"] == tokenizer("repeat : red cat red cat")["input_ids"] + [tokenizer.eos_token_id]


def test_truncation_cuts_the_response_never_the_prompt(tokenizer):
    ex = [{"prompt": "repeat : red cat dog", "response": "red cat dog red cat dog"}]
    n_prompt = len(encode_prompt(tokenizer, ex[0]["prompt"]))
    ds = SupervisedDataset(ex, tokenizer, max_length=n_prompt + 2)
    assert len(ds[0]["input_ids"]) == n_prompt + 2 and ds[0]["prompt_length"] == n_prompt
    with pytest.raises(ValueError, match=r"^example 0: data\.max_length: a \d+-token prompt \(it starts 'repeat : red"):
        SupervisedDataset(ex, tokenizer, max_length=n_prompt)
    short = [{"prompt": "repeat : red", "response": "red"}]
    kept = SupervisedDataset(ex + short, tokenizer, max_length=n_prompt - 1, drop_long_prompts=True)
    assert len(kept) == 1 and kept.num_dropped == 1


def test_an_empty_prompt_is_refused(tokenizer):
    # Without a chat template an empty prompt has no token: prompt_length 0, so the example trained with no edit.
    examples = [{"prompt": "repeat : red", "response": "red"}, {"prompt": "", "response": "blue sky"}]
    with pytest.raises(ValueError, match=r"^example 1: an empty prompt \(no token to intervene on; its response "
                                         r"starts 'blue sky'\)"):
        SupervisedDataset(examples, tokenizer, chat_template=False)
    assert SupervisedDataset(examples, tokenizer)[1]["prompt_length"] > 0  # a chat template's tokens are a prompt


def test_collator_pads_right_and_builds_one_location_tensor(tokenizer):
    ds = SupervisedDataset([{"prompt": "repeat : red", "response": "red"},
                            {"prompt": "repeat : red cat dog fish", "response": "red cat dog fish"}], tokenizer)
    collator = ReftDataCollator(pad_token_id=tokenizer.pad_token_id, num_interventions=4, positions="f2+l2")
    batch = collator([ds[0], ds[1]])
    lengths = [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][0, lengths[0]:] == IGNORE_INDEX).all()
    loc = batch["intervention_locations"]
    assert loc.dtype == torch.long and loc.device.type == "cpu" and loc.shape == (4, 2, 2)
    expected = intervention_locations([ds[0]["prompt_length"], ds[1]["prompt_length"]], "f2+l2", 4)
    assert torch.equal(loc, expected)
    # Every edited position lies inside its example's prompt.
    for b in range(2):
        valid = loc[:, b][loc[:, b] >= 0]
        assert valid.max() < ds[b]["prompt_length"]


def test_split_is_seeded_and_disjoint():
    examples = [{"prompt": str(i), "response": str(i)} for i in range(20)]
    train, held = split_examples(examples, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15 and not {e["prompt"] for e in held} & {e["prompt"] for e in train}
    assert split_examples(examples, 0.25, seed=1) == (train, held)


def test_step_sampler_same_micro_batches_for_ranks_and_accumulation():
    one_rank = StepSampler(50, micro_batch_size=3, world_size=1, accumulation=4, seed=7)
    two_ranks = StepSampler(50, micro_batch_size=3, world_size=2, accumulation=2, seed=7)
    assert one_rank.steps_per_epoch == two_ranks.steps_per_epoch == 4
    for step in range(9):  # crosses epochs
        flat = [one_rank.indices(step, a, 0) for a in range(4)]
        dist = [two_ranks.indices(step, a, r) for a in range(2) for r in range(2)]
        assert flat == dist
        assert len({i for batch in flat for i in batch}) == 12  # no repeats within a step
    assert one_rank.indices(0, 0, 0) != one_rank.indices(4, 0, 0)  # the next epoch reshuffles
    with pytest.raises(ValueError, match="global_batch_size"):
        StepSampler(5, micro_batch_size=3, world_size=2, accumulation=1, seed=0)


def test_step_sampler_draws_each_epochs_shuffle_once_and_the_same_one_again(monkeypatch):
    """Drawn per micro-batch, the shuffle of a million examples cost 4.7 ms each time (on the batch thread, and 19 s
    for cuda_graphs' count of 4096 coming micro-batches); an epoch met again (a resume, another epoch between) draws
    the same order."""
    sampler = StepSampler(50, micro_batch_size=3, world_size=1, accumulation=4, seed=7)
    fresh = StepSampler(50, micro_batch_size=3, world_size=1, accumulation=4, seed=7)
    expected = {(step, a): fresh.indices(step, a, 0) for step in range(12) for a in range(4)}
    draws = []
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *args, **kwargs: draws.append(args) or randperm(*args, **kwargs))
    got = {(step, a): sampler.indices(step, a, 0) for step in range(12) for a in range(4)}
    assert got == expected and len(draws) == 3  # 3 epochs of 4 steps
    assert sampler.indices(0, 0, 0) == expected[(0, 0)] and len(draws) == 4  # back to epoch 0: drawn again, the same


def test_hf_dataset_reads_a_folder_written_by_save_to_disk(tmp_path):
    """A single split saved with ``Dataset.save_to_disk`` (datasets' load_dataset refuses such a folder): read as the
    train split, and never handed out for another split."""
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "repeat : red", "output": "red"}, {"instruction": "repeat : é 🐱", "output": "é 🐱"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_examples(str(tmp_path / "saved")) == [
        {"prompt": r["instruction"], "response": r["output"], "where": f"{tmp_path / 'saved'}[train]: row {i}"}
        for i, r in enumerate(rows)]
    with pytest.raises(ValueError, match="holds one split, 'train', not 'validation' .*or evaluate on a held-out part "
                                         "of this one: data.eval_fraction"):
        load_examples(str(tmp_path / "saved"), hf_split="validation")


@pytest.mark.parametrize("chat_template, has_template", [(False, True), (None, False)])
def test_a_system_prompt_without_a_chat_template_is_refused(chat_template, has_template):
    """Plain-text prompts have no place for data.system_prompt: training would leave it out without a word."""
    tokenizer = make_tokenizer()
    if not has_template:
        tokenizer.chat_template = None
    with pytest.raises(ValueError, match="data.system_prompt: the prompts are plain text"):
        SupervisedDataset([{"prompt": "repeat : red", "response": "red"}], tokenizer, chat_template=chat_template,
                          system_prompt="be brief")


def test_chat_template_true_on_a_tokenizer_without_one_names_the_tokenizer_and_the_way_out():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    tokenizer.name_or_path = "runs/tiny-tokenizer"
    with pytest.raises(ValueError, match=r"^data.chat_template is true but the tokenizer \(runs/tiny-tokenizer\) has "
                                         r"no chat template; set it to auto"):
        SupervisedDataset([{"prompt": "repeat : red", "response": "red"}], tokenizer, chat_template=True)


def test_a_format_spec_that_does_not_fit_a_value_names_the_row(tmp_path):
    """``{answer:.2f}`` formats a JSON number; over a CSV's text value it fails, and the error says where."""
    (tmp_path / "d.csv").write_text("instruction,answer\nrepeat : one,1.5\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "repeat : one", "answer": 1.5}) + "\n")
    assert load_examples(tmp_path / "d.jsonl", response_template="{answer:.2f}")[0]["response"] == "1.50"
    with pytest.raises(ValueError, match=r"d.csv:2: data.response_template '\{answer:.2f\}': Unknown format code"):
        load_examples(tmp_path / "d.csv", response_template="{answer:.2f}")


def test_a_local_hf_dataset_folder_is_found_next_to_the_config(tmp_path, monkeypatch):
    """data.hf_dataset naming a dataset folder beside the config is found from another working directory, as
    data.train_file is (it was looked up on the Hub)."""
    datasets = pytest.importorskip("datasets")
    from reft_fast.train.data import train_and_eval_examples
    from reft_fast.train.train_config import DataConfig

    rows = [{"instruction": f"repeat : {w}", "output": w} for w in ("red", "cat", "dog", "sun")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "config_dir" / "saved"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    train, held = train_and_eval_examples(DataConfig(hf_dataset="saved", eval_fraction=0.25),
                                          str(tmp_path / "config_dir"), 0, lambda source, split: load_examples(source))
    assert sorted(e["prompt"] for e in train + held) == sorted(r["instruction"] for r in rows) and len(held) == 1


@pytest.mark.parametrize("text, message", [
    ('{\n "data": [\n  {"instruction": "a", "output": "b"}\n ]\n}\n',
     r": one JSON object over several lines \(keys: \['data'\]\); a data file holds a JSON list of objects .* or JSONL "
     r"\(one object per line\); its 'data' is a list of objects \(1\): make that list the file$"),
    ('{\n "instruction": ["a", "c"],\n "output": ["b", "d"]\n}\n',
     r": one JSON object over several lines .*; it holds a list per field \(columns\): write one object per row"),
    ('{\n "instruction": "a", "output": "b"}\n{\n "instruction": "c", "output": "d"}\n',
     r":1:2: not valid JSON \(.*; JSONL holds each object whole on one line, else write a JSON list of objects"),
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"},\n]\n',
     r":4:1: not valid JSON \(Expecting value; remove the trailing comma before this '\]'\)$"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d",}\n',
     r":2:36: not valid JSON \(.*; remove the trailing comma before this '\}'\)$"),
    ('[{"instruction": "a", "output": "b"}] [3]', r":1:39: not valid JSON \(Extra data after the list\)$"),
    (" \n", r": the file is empty; a data file holds a JSON list of objects"),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_json_file_of_another_shape_is_refused_saying_what_to_write(tmp_path, text, message, suffix):
    """The shape is read from the content, whatever the suffix: a list, else JSONL; one object over several lines,
    an empty file or a trailing comma each get a message that says what to write instead."""
    path = tmp_path / f"data{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}{message}"):
        load_examples(path)


def test_byte_order_mark_and_windows_line_ends_keep_the_line_numbers(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\r\n\r\n{"instruction": "c", "output": "d"}\r\n')
    assert [e["where"] for e in load_examples(path)] == [f"{path}:1", f"{path}:3"]


def test_a_too_long_or_empty_prompt_is_named_by_its_file_and_line(tmp_path, tokenizer):
    """The user opens the file at the line the message names (JSONL: the row's line; a JSON list: the line its
    object starts on); rows given in code or read from a dataset are named by their index."""
    rows = [{"instruction": "repeat : red", "output": "red"}, {"instruction": "repeat : " + "red " * 40, "output": "x"}]
    (tmp_path / "d.jsonl").write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
    for name, line in (("d.jsonl", 3), ("d.json", 6)):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}:{line}: data\.max_length: a \d+-"):
            SupervisedDataset(load_examples(tmp_path / name), tokenizer, max_length=16)
    with pytest.raises(ValueError, match=r"^the given examples: row 1: data\.max_length: a \d+-token prompt"):
        SupervisedDataset(load_examples(rows), tokenizer, max_length=16)
    (tmp_path / "e.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "", "output": "x"}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'e.jsonl'))}:2: an empty prompt"):
        SupervisedDataset(load_examples(tmp_path / "e.jsonl"), tokenizer, chat_template=False)


def test_chat_template_auto_is_the_tokenizers_own_template_when_it_has_one():
    """auto is kept as null (what the tokenizer has decides), as model.fused_ops spells its default."""
    from reft_fast.train.train_config import config_from_dict

    read = [config_from_dict({"data": {"chat_template": value}}).data.chat_template
            for value in ("auto", None, True, False)]
    assert read == [None, None, True, False]


def test_an_unknown_chat_template_value_names_the_accepted_ones():
    from reft_fast.train.train_config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"^data\.chat_template: expected true, false or auto \(the tokenizer's own "
                                          r"template when it has one\), got 'chatml'$"):
        config_from_dict({"data": {"chat_template": "chatml"}})


def test_a_csv_record_with_more_or_fewer_values_than_columns_is_refused(tmp_path):
    """An unquoted comma splits a value in two: csv.DictReader would put the second part in the next column and
    keep the rest apart, so the example trained on a cut prompt and a wrong response without a word."""
    (tmp_path / "d.csv").write_text('instruction,output\n"repeat : red, blue",red blue\nrepeat : sun, sky,sun sky\n')
    with pytest.raises(ValueError, match=r"d\.csv:3: 3 value\(s\), but the header names 2 columns \(instruction, "
                                         r"output\); put a value that holds a comma in double quotes"):
        load_examples(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text('instruction,output\n"a\nb",c\nonly one\n')
    with pytest.raises(ValueError, match=r"e\.csv:4: 1 value\(s\), but the header names 2 columns .*give each "
                                         r"column a value"):
        load_examples(tmp_path / "e.csv")


def test_a_field_of_the_wrong_type_names_the_setting_that_reads_it(tmp_path):
    rows = [{"instruction": "repeat : red", "output": "red"}, {"instruction": None, "output": "x"},
            {"instruction": "repeat : sun", "output": 7}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"d\.jsonl:2: field 'instruction' is null, expected text "
                                         r"\(data\.prompt_field\)$"):
        load_examples(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match=r"d\.jsonl:3: field 'output' is int, expected text \(data\.response_field\)$"):
        load_examples(tmp_path / "d.jsonl", prompt_template="{output}")


def test_a_field_inside_a_format_spec_is_read_like_any_other(tmp_path):
    """``{answer:>{width}}`` reads ``width`` from the row too: a row without it is named, not a KeyError."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "i", "answer": 7, "width": 3}) + "\n"
                                      + json.dumps({"instruction": "i", "answer": 7}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: no field 'width' .*; data\.response_template names it$"):
        load_examples(tmp_path / "d.jsonl", response_template="{answer:>{width}}")
    rows = [{"instruction": "i", "answer": 7, "width": 3}]
    assert load_examples(rows, response_template="{answer:>{width}}")[0]["response"] == "  7"


@pytest.mark.parametrize("override", ["data.prompt_template={instruction}", "data.response_template={answer}"])
def test_a_template_read_as_a_yaml_mapping_says_to_quote_it(override):
    from reft_fast.train.train_config import ConfigError, apply_overrides, config_from_dict

    with pytest.raises(ConfigError, match=r"expected a string or null, got dict .*; YAML reads text that starts "
                                          r"with \{ as a mapping: quote it"):
        config_from_dict(apply_overrides({}, [override]))


def test_a_folder_given_as_a_data_file_is_named_as_a_folder(tmp_path):
    from reft_fast.train.train_config import ConfigError, TrainConfig, validate

    (tmp_path / "saved").mkdir()
    for name, message in (("train_file", "data.hf_dataset reads a dataset folder"),
                          ("eval_file", "give a JSON, JSONL or CSV file")):
        cfg = TrainConfig()
        cfg.model.path = "unused"
        cfg.data.train_file = cfg.data.eval_file = None
        setattr(cfg.data, name, str(tmp_path / "saved"))
        if name == "eval_file":
            (tmp_path / "t.jsonl").write_text("")
            cfg.data.train_file = str(tmp_path / "t.jsonl")
        with pytest.raises(ConfigError, match=rf"^data\.{name}: '.*saved' is a folder, not a data file; {message}"):
            validate(cfg, check_model=False)
