"""Accuracy of generated answers: the answer read out of a model's text per task family, scored against the gold one,
a per-example predictions file and a summary table.

Families (how the ReFT paper scores its generative benchmarks; data in the LLM-Adapters JSON format: ``instruction``,
``output`` = "the correct answer is X" for commonsense or a worked solution for arithmetic, ``answer``):

    commonsense  one option of a closed set: true/false (BoolQ), solution1-2 (PIQA), answer1-3 (SIQA), ending1-4
                 (HellaSwag), option1-2 (WinoGrande), answer1-5 (ARC, OBQA) or a letter A-E. The set comes from the
                 prompt's "Answer format: a/b/c" line when it has one, else from the gold answer's kind.
    arithmetic   a number (GSM8K, MAWPS, SVAMP), equal to the gold one within a tolerance, or an option letter A-E
                 (AQuA, whose gold answer is a letter).
    exact        the output's first line equals the gold label (case, surrounding spaces and final punctuation aside).

Where the text says "... answer is X", X is read from the words after the first such phrase: a model that does not
stop at its end-of-sequence token goes on writing, often more questions and answers, and the first stated answer is
its answer. Otherwise a commonsense option is the first one named, an arithmetic number the last number written (a
worked solution ends with its result), an option letter the last standalone capital A-E.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from reft_fast.train.files import write_jsonl_atomically

__all__ = ["ARITHMETIC_ABS_TOL", "ARITHMETIC_REL_TOL", "FAMILIES", "EvalExample", "Prediction", "accuracy",
           "check_gold_answers", "eval_examples_from_rows", "extract_answer", "gather_predictions",
           "generate_and_score", "gold_from_responses", "infer_family",
           "is_correct", "load_eval_examples", "score", "summary_table", "write_predictions"]

FAMILIES = ("commonsense", "arithmetic", "exact")
# A number is right when |predicted − gold| ≤ max(ARITHMETIC_REL_TOL·|gold|, ARITHMETIC_ABS_TOL): generous enough for
# a gold written to two decimals (33.33 against 33.333), strict enough that 1001 is not 1000.
ARITHMETIC_REL_TOL = 1e-4
ARITHMETIC_ABS_TOL = 1e-3

_ANSWER_PHRASE = re.compile(r"\banswer\s+is\b\s*:?", re.IGNORECASE)
_ANSWER_FORMAT = re.compile(r"answer\s+format\s*:\s*([^\n]+)", re.IGNORECASE)
_OPTION_WORD = re.compile(r"^(solution|answer|ending|option)\s*(\d)$", re.IGNORECASE)
_LETTERS = "ABCDE"
_LETTER = re.compile(r"(?<![A-Za-z0-9])\(?([A-E])\)?(?![A-Za-z0-9])")
# 1,234.5 / -3 / .75 / 12. ; a comma inside a number only between digit groups, so "3, 4" stays two numbers.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


@dataclass
class EvalExample:
    prompt: str
    gold: str
    task: str  # the group the summary table counts it in (a "task" field of the data, else the file's name)
    where: Optional[str] = None  # the row it was read from in messages (its file and line, or its index)


@dataclass
class Prediction:
    task: str
    prompt: str
    gold: str
    output: str  # the generated text, as decoded
    extracted: Optional[str]  # the answer read from it; None when it names none
    correct: bool


# --------------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------------
def _after_answer_phrase(text: str) -> Optional[str]:
    match = _ANSWER_PHRASE.search(text)
    return text[match.end():] if match else None


def _option_set(prompt: str, gold: Optional[str]) -> Union[list[str], str]:
    """The closed set of commonsense answers: a list of words, or the letters ``"ABCDE"``. Without a gold answer (when
    reading it from a reference response) every option word of the LLM-Adapters sets."""
    match = _ANSWER_FORMAT.search(prompt or "")
    if match:
        listed = [word.strip().rstrip(".").lower() for word in match.group(1).split("/")]
        if all(len(word) == 1 and word.upper() in _LETTERS for word in listed):
            return _LETTERS
        if all(listed):
            return [re.sub(r"\s+", "", word) for word in listed]
    if gold is None:
        return ["true", "false"] + [f"{word}{n}" for word in ("solution", "answer", "ending", "option")
                                    for n in range(1, 10)]
    if gold.strip().lower() in ("true", "false"):
        return ["true", "false"]
    word = _OPTION_WORD.match(gold.strip())
    if word:
        return [f"{word.group(1).lower()}{n}" for n in range(1, 10)]
    if _is_letter(gold):
        return _LETTERS
    raise ValueError(f"gold answer {gold!r} is not a commonsense option (true/false, solutionN, answerN, endingN, "
                     "optionN or a letter A-E) and the prompt has no 'Answer format: a/b/...' line; use --family exact")


def _first_option(text: str, options: Sequence[str]) -> Optional[str]:
    # "solution 1" and "Solution1" name the same option; a longer option wins over its prefix (answer10 > answer1).
    pattern = "|".join(r"\s*".join(map(re.escape, re.split(r"(?<=\D)(?=\d)", option)))
                       for option in sorted(options, key=len, reverse=True))
    match = re.search(rf"(?<![A-Za-z0-9])({pattern})(?![A-Za-z0-9])", text, re.IGNORECASE)
    return re.sub(r"\s+", "", match.group(1)).lower() if match else None


def _letter(text: str) -> Optional[str]:
    tail = _after_answer_phrase(text)
    if tail is not None:
        match = _LETTER.search(tail)
        if match:
            return match.group(1)
    letters = _LETTER.findall(text)
    return letters[-1] if letters else None


def _number(text: str) -> Optional[str]:
    tail = _after_answer_phrase(text)
    found = _NUMBER.findall(tail) if tail is not None else []
    found = found[:1] if found else _NUMBER.findall(text)[-1:]
    if not found:
        return None
    value = found[0].replace(",", "")
    return value.rstrip("0").rstrip(".") if "." in value else value


def _first_line(text: str) -> str:
    line = next((line for line in text.strip().splitlines() if line.strip()), "")
    return " ".join(line.split()).rstrip(".!").strip().casefold()


def extract_answer(text: str, family: str, *, gold: Optional[str] = None, prompt: str = "") -> Optional[str]:
    """The answer ``text`` gives, in the gold answer's spelling (lower-case option words, capital letters, numbers
    without thousands separators), or None when it gives none. ``gold`` and ``prompt`` say which kind of answer to
    look for (the commonsense option set; a letter or a number). Without ``gold`` (reading the gold answer out of a
    reference response): any commonsense option word, else a letter; for arithmetic a letter when the words after
    "answer is" start with one, else a number."""
    if family == "commonsense":
        options = _option_set(prompt, gold)
        if options == _LETTERS:
            return _letter(text)
        tail = _after_answer_phrase(text)
        found = _first_option(tail, options) if tail is not None else None
        found = found if found is not None else _first_option(text, options)
        return found if found is not None or gold is not None else _letter(text)
    if family == "arithmetic":
        if gold is None:
            tail = _after_answer_phrase(text)
            starts_with_letter = tail is not None and re.match(r"\s*\(?[A-E]\)?(?![A-Za-z0-9])", tail)
            return _letter(text) if starts_with_letter else _number(text)
        return _letter(text) if _is_letter(gold) else _number(text)
    if family == "exact":
        return _first_line(text) or None
    raise ValueError(f"unknown answer family {family!r}; expected one of {', '.join(FAMILIES)}")


def _is_letter(gold: str) -> bool:
    return len(gold.strip()) == 1 and gold.strip().upper() in _LETTERS


def _as_number(text: str) -> Optional[float]:
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _option_spelling(gold: str) -> str:
    text = re.sub(r"\s+", "", gold.strip())
    return text.upper() if _is_letter(text) else text.lower()


def is_correct(extracted: Optional[str], gold: str, family: str) -> bool:
    """Whether the extracted answer is the gold one (numbers within the arithmetic tolerance)."""
    if extracted is None:
        return False
    if family == "commonsense" or (family == "arithmetic" and _is_letter(gold)):
        return _option_spelling(extracted) == _option_spelling(gold)
    if family == "arithmetic":
        predicted, expected = _as_number(extracted), _as_number(gold)
        if expected is None:
            raise ValueError(f"arithmetic gold answer {gold!r} is neither a number nor an option letter A-E")
        return predicted is not None and abs(predicted - expected) <= max(ARITHMETIC_REL_TOL * abs(expected),
                                                                          ARITHMETIC_ABS_TOL)
    if family == "exact":
        return extracted == _first_line(gold)
    raise ValueError(f"unknown answer family {family!r}; expected one of {', '.join(FAMILIES)}")


def check_gold_answers(examples: Sequence[EvalExample], family: str) -> None:
    """Raise ValueError, naming the first example that ``family`` cannot score, before any answer is generated."""
    for i, example in enumerate(examples):
        try:
            if family == "commonsense":
                _option_set(example.prompt, example.gold)
            elif family == "arithmetic" and not _is_letter(example.gold) and _as_number(example.gold) is None:
                raise ValueError(f"gold answer {example.gold!r} is neither a number nor an option letter A-E")
            elif family not in FAMILIES:
                raise ValueError(f"unknown answer family {family!r}; expected one of {', '.join(FAMILIES)}")
        except ValueError as err:
            raise ValueError(f"{example.where or f'example {i}'} ({example.task}): {err}") from None


def infer_family(examples: Sequence[EvalExample]) -> str:
    """arithmetic when every gold answer is a number, commonsense when every one is an option (true/false, an option
    word, a letter A-E; AQuA's letters score the same in both), else exact."""
    golds = [example.gold for example in examples]
    if golds and all(_as_number(gold) is not None for gold in golds):
        return "arithmetic"
    if golds and all(gold.strip().lower() in ("true", "false") or _OPTION_WORD.match(gold.strip()) or _is_letter(gold)
                     for gold in golds):
        return "commonsense"
    return "exact"


# --------------------------------------------------------------------------------------------------------------------
# Data, scoring, reports
# --------------------------------------------------------------------------------------------------------------------
def load_eval_examples(source: Union[str, Path], *, hf_split: str = "test", **fields) -> list[EvalExample]:
    """The examples of a JSON/JSONL file or a Hugging Face dataset's split (``eval_examples_from_rows`` says which
    fields it reads)."""
    from reft_fast.train.data import DATA_FILE_SUFFIXES, load_rows
    from reft_fast.train.train_config import data_path_tried  # the config module builds on this one

    named_file = isinstance(source, (str, Path)) and Path(source).suffix.lower() in DATA_FILE_SUFFIXES
    if named_file and not Path(source).is_file():
        raise ValueError(f"evaluation data {source}: no such file (a JSON list, JSONL or CSV file; "
                         f"{data_path_tried(source)})")
    rows, where = load_rows(source, hf_split=hf_split)
    return eval_examples_from_rows(rows, where, default_task=Path(str(source)).stem, **fields)


def eval_examples_from_rows(rows: Sequence, where: str, *, default_task: str, prompt_field: str = "instruction",
                            answer_field: str = "answer", response_field: str = "output",
                            prompt_template: Optional[str] = None, response_template: Optional[str] = None,
                            family: Optional[str] = None) -> list[EvalExample]:
    """Examples from data rows, their prompts built as training built them (``prompt_field``, or ``prompt_template``
    over the row's fields: ``data.fill_template``, with its errors). The gold answer is the ``answer_field`` (a
    string or a number); a row without it has its gold answer read from its response (``response_field`` or
    ``response_template``, e.g. "the correct answer is true") with ``family``'s rule. The summary groups examples by
    their ``task`` (or ``dataset``) field, else under ``default_task``."""
    from reft_fast.train.data import fill_template, row_at

    examples = []
    for i, row in enumerate(rows):
        at = row_at(where, i)
        if not isinstance(row, dict):
            raise ValueError(f"{at}: a {type(row).__name__}, expected an object")
        prompt = (fill_template(prompt_template, row, at, "data.prompt_template") if prompt_template
                  else row.get(prompt_field))
        if not isinstance(prompt, str):
            raise ValueError(f"{at}: expected a text field {prompt_field!r} (fields: {sorted(row)}; "
                             "data.prompt_field / data.prompt_template)")
        gold = row.get(answer_field)
        if gold is None:
            gold = _gold_from_response(row, at, prompt, answer_field, response_field, response_template, family)
        if isinstance(gold, bool) or not isinstance(gold, (str, int, float)) or not str(gold).strip():
            raise ValueError(f"{at}: no gold answer (field {answer_field!r}, or one its response states)")
        task = str(row.get("task") or row.get("dataset") or default_task)
        examples.append(EvalExample(prompt=prompt, gold=str(gold).strip(), task=task, where=at))
    if not examples:
        raise ValueError(f"evaluation data {where}: no examples")
    return examples


def _gold_from_response(row: dict, at: str, prompt: str, answer_field: str, response_field: str,
                        response_template: Optional[str], family: Optional[str]) -> Optional[str]:
    """The gold answer a row without ``answer_field`` states in its response; None when it has no response."""
    from reft_fast.train.data import fill_template

    if response_template:
        response = fill_template(response_template, row, at, "data.response_template")
    else:
        response = row.get(response_field)
    if not isinstance(response, str):
        return None
    if family is None:
        raise ValueError(f"{at}: no {answer_field!r} field; give --family to read the gold answer from its response")
    return extract_answer(response, family, prompt=prompt)


def score(examples: Sequence[EvalExample], outputs: Sequence[str], family: str) -> list[Prediction]:
    """One Prediction per example and generated output."""
    if len(examples) != len(outputs):
        raise ValueError(f"{len(examples)} examples but {len(outputs)} outputs")
    predictions = []
    for example, output in zip(examples, outputs):
        extracted = extract_answer(output, family, gold=example.gold, prompt=example.prompt)
        predictions.append(Prediction(task=example.task, prompt=example.prompt, gold=example.gold, output=output,
                                      extracted=extracted, correct=is_correct(extracted, example.gold, family)))
    return predictions


def gather_predictions(shard: list[Prediction]) -> list[Prediction]:
    """Every rank's predictions, in the order of the examples, when rank r scored examples r, r + world, ...; every
    rank takes part (outside a process group: ``shard`` itself)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(shard)
    shards: list = [None] * dist.get_world_size()
    # Objects, not tensors: the texts differ in length. On NCCL the pickled bytes travel on the current device.
    dist.all_gather_object(shards, list(shard))
    ordered = []
    for j in range(max(len(s) for s in shards)):
        ordered.extend(s[j] for s in shards if j < len(s))
    return ordered


def generate_and_score(model, tokenizer, examples: Sequence[EvalExample], family: str, *, rank: int = 0,
                       world: int = 1, batch_size: int = 8, synced_gpus: bool = False,
                       **generate_kwargs) -> list[Prediction]:
    """Answer every example with ``model`` (rank r the examples r, r + world, ...; ``generate_answers_batched`` with
    ``generate_kwargs``), score the answers and return all ranks' predictions in the order of ``examples``.

    With ``synced_gpus`` (ZeRO-3: every forward gathers parameters from all ranks) each rank makes the same number of
    generate calls: a shorter shard repeats its last example, whose extra answer is dropped."""
    from reft_fast.train.generation import generate_answers_batched

    shard = list(examples[rank::world])
    padded = shard
    if synced_gpus and world > 1:
        longest = -(-len(examples) // world)
        padded = shard + [shard[-1] if shard else examples[0]] * (longest - len(shard))
    outputs = generate_answers_batched(model, tokenizer, [example.prompt for example in padded],
                                       batch_size=batch_size, synced_gpus=synced_gpus, **generate_kwargs)
    return gather_predictions(score(shard, outputs[:len(shard)], family))


def gold_from_responses(examples: Sequence[dict], family: str) -> list[EvalExample]:
    """Evaluation examples from training-style ``{"prompt", "response"}`` pairs: the gold answer is the one the
    response states (the LLM-Adapters "the correct answer is X", a worked solution's number, an exact label)."""
    answered = []
    for i, example in enumerate(examples):
        at = example.get("where", f"eval example {i}")  # load_examples names the file and line
        gold = extract_answer(example["response"], family, prompt=example["prompt"])
        if gold is None:
            raise ValueError(f"{at}: its response {example['response'][:80]!r} states no {family} answer "
                             "(data.eval_family)")
        answered.append(EvalExample(prompt=example["prompt"], gold=gold, task="eval", where=at))
    check_gold_answers(answered, family)
    return answered


def accuracy(predictions: Iterable[Prediction]) -> float:
    """The share of correct predictions (NaN for none)."""
    predictions = list(predictions)
    return sum(p.correct for p in predictions) / len(predictions) if predictions else math.nan


def write_predictions(path: Union[str, Path], predictions: Iterable[Prediction]) -> None:
    """One JSON object per line: task, prompt, gold, output, extracted, correct (written whole, then renamed into
    place: ``files.write_jsonl_atomically``)."""
    write_jsonl_atomically(Path(path), (asdict(prediction) for prediction in predictions))


def summary_table(predictions: Sequence[Prediction]) -> str:
    """Per task and overall: examples, correct, unanswered (no answer found in the output) and accuracy."""
    groups: dict[str, list[Prediction]] = collections.defaultdict(list)
    for prediction in predictions:
        groups[prediction.task].append(prediction)
    rows = [(task, group) for task, group in groups.items()]
    if len(groups) > 1:
        rows.append(("all", list(predictions)))
    width = max([len("task")] + [len(task) for task, _ in rows])
    lines = [f"{'task':<{width}}  {'n':>6}  {'correct':>7}  {'no answer':>9}  {'accuracy':>8}"]
    for task, group in rows:
        unanswered = sum(p.extracted is None for p in group)
        lines.append(f"{task:<{width}}  {len(group):>6}  {sum(p.correct for p in group):>7}  {unanswered:>9}  "
                     f"{100 * accuracy(group):>7.1f}%")
    return "\n".join(lines)
