"""pyreft compatibility: the names the README promises, the one-way import rule, pyreft's data modules."""

import re
from pathlib import Path

import pytest
import transformers

import reft_fast as pyreft
from reft_fast.compat import make_last_position_supervised_data_module, make_multiple_position_supervised_data_module
from reft_fast.train.data import IGNORE_INDEX

from dist.tiny import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _readme_pyreft_promises() -> tuple[set, set]:
    """(top-level names, ReftModel methods) that the README's "Use it like pyreft" section and its training bullet
    use or list."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it like pyreft", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    names = set(re.findall(r"\bpyreft\.(\w+)", code))
    methods = set(re.findall(r"\breft_model\.(\w+)\(", code))
    interventions_bullet = section.split("- Interventions:", 1)[1].split("\n- ", 1)[0]
    names |= set(re.findall(r"`(\w+Intervention)`", interventions_bullet))
    training_bullet = readme.split("- pyreft's training scripts:", 1)[1].split("\n- ", 1)[0].split("\n\n", 1)[0]
    names |= set(re.findall(r"`(\w+)`", training_bullet))
    return names, methods


def test_import_as_pyreft_exposes_every_name_the_readme_promises():
    names, methods = _readme_pyreft_promises()
    # The parse found what the README shows today (a README rewrite that breaks it should fail here, not pass empty).
    assert {"ReftConfig", "get_reft_model", "ReftModel", "NodireftIntervention", "ReftTrainerForCausalLM",
            "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module"} <= names
    assert {"print_trainable_parameters", "save", "generate"} <= methods
    missing = sorted(name for name in names if not hasattr(pyreft, name))
    assert not missing, f"`import reft_fast as pyreft` lacks {missing}"
    missing_methods = sorted(m for m in methods if not callable(getattr(pyreft.ReftModel, m, None)))
    assert not missing_methods, f"ReftModel lacks {missing_methods}"
    assert issubclass(pyreft.ReftTrainerForCausalLM, transformers.Trainer)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_pyreft_data_modules(tokenizer):
    prompts, answers = ["<|user|> repeat : red </s> <|assistant|>"], ["red"]
    module = make_last_position_supervised_data_module(tokenizer, None, prompts, answers, num_interventions=2)
    batch = module["data_collator"]([module["train_dataset"][0]])
    n_prompt = len(tokenizer(prompts[0])["input_ids"])
    # pyreft's layout [batch, n_interventions, positions]
    assert batch["intervention_locations"].tolist() == [[[n_prompt - 1], [n_prompt - 1]]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * n_prompt + tokenizer("red")["input_ids"] + [
        tokenizer.eos_token_id]
    module = make_multiple_position_supervised_data_module(tokenizer, None, prompts, answers, positions="f1+l1",
                                                           num_interventions=2, nonstop=True)
    batch = module["data_collator"]([module["train_dataset"][0]])
    assert batch["intervention_locations"].tolist() == [[[0], [n_prompt - 1]]]
    assert batch["input_ids"][0, -1].item() != tokenizer.eos_token_id
