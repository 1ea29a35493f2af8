"""configs/paper/: one recipe per row of the ReFT paper's tables. Each validates, `reft-fast plan` runs on it without
the weights (the model's shape from configs/shapes), and its data templates turn a row of the data format it names
into the prompt and response the paper trained on."""

from pathlib import Path

import pytest
import yaml

from reft_fast.train.cli import main
from reft_fast.train.data import load_examples
from reft_fast.train.train_config import load_config, validate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))
# the base each row names → the folder holding its config.json (the shape plan needs, no weights)
SHAPES = {"yahma/llama-7b-hf": "llama-7b", "meta-llama/Llama-2-7b-hf": "llama-2-7b",
          "FacebookAI/roberta-base": "roberta-base", "FacebookAI/roberta-large": "roberta-large"}


def _shape_override(path: Path) -> str:
    model = yaml.safe_load(path.read_text())["model"]["path"]
    return f"model.path={CONFIGS / 'shapes' / SHAPES[model]}"


def test_every_table_row_has_a_recipe():
    assert {p.stem for p in PAPER} >= {"commonsense-llama-7b", "arithmetic-llama-7b", "instruct-llama2-7b",
                                    "glue-roberta-base", "glue-roberta-large"}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_each_recipe_validates_and_plans_without_weights(path, capsys):
    text = path.read_text()
    assert "Reported:" in text and "Data:" in text, "each recipe states the paper's number and its data format"
    cfg = load_config(str(path), [_shape_override(path)])
    validate(cfg, world_size=1, check_data=False)
    assert main(["plan", str(path), "--gpus", "1", _shape_override(path)]) == 0
    assert "stage 0" in capsys.readouterr().out


def test_the_commonsense_template_gives_the_papers_prompt_and_response():
    cfg = load_config(str(CONFIGS / "paper" / "commonsense-llama-7b.yaml"))
    row = {"instruction": "Please answer the following question with true or false. Question: is water wet?",
           "input": "", "output": "the correct answer is true", "answer": "true"}
    (example,) = load_examples([row], prompt_template=cfg.data.prompt_template,
                               response_template=cfg.data.response_template)
    assert example == {"prompt": row["instruction"] + "\n", "response": "the correct answer is true",
                       "where": "the given examples: row 0"}


@pytest.mark.parametrize("name", ["arithmetic-llama-7b", "instruct-llama2-7b"])
def test_the_alpaca_template_wraps_the_instruction(name):
    cfg = load_config(str(CONFIGS / "paper" / f"{name}.yaml"))
    row = {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"}
    (example,) = load_examples([row], prompt_template=cfg.data.prompt_template, response_field=cfg.data.response_field)
    assert example["prompt"].endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert example["prompt"].startswith("Below is an instruction that describes a task.")
    assert example["response"] == row["output"]


def test_the_glue_plan_counts_the_trained_head_and_no_vocabulary_logits():
    from reft_fast.train.plan import plan_memory

    path = CONFIGS / "paper" / "glue-roberta-base.yaml"
    plan = plan_memory(load_config(str(path), [_shape_override(path)]), gpus=1)
    loreft_r1 = 768 + 768 + 1  # R (1×768), W (1×768), b (1) at each of the 12 layers
    head = (768 * 768 + 768) + (768 * 2 + 2)  # RobertaClassificationHead: dense, out_proj (2 labels)
    assert plan.intervention_params == 12 * loreft_r1 + head
    assert 124e6 < plan.base_params < 126e6  # RoBERTa-base with a classification head, not an LM head
    frozen = load_config(str(path), [_shape_override(path), "classification.train_head=false"])
    assert plan_memory(frozen, gpus=1).intervention_params == 12 * loreft_r1
    # no [tokens × vocabulary] logits: 32 × 256 tokens × 50265 × fp32 × 2 alone would be 3.1 GiB
    stage0 = next(s for s in plan.stages if s.stage == 0)
    assert stage0.activations < 5.5 * 2**30


@pytest.mark.parametrize("name", ["glue-roberta-base", "glue-roberta-large"])
def test_the_glue_recipes_follow_the_papers_selection_protocol(name):
    """A selection part of the validation split chooses the kept model by the task's metric (CoLA's MCC); the header
    names the protocol's source."""
    path = CONFIGS / "paper" / f"{name}.yaml"
    cfg = load_config(str(path), [_shape_override(path)])
    validate(cfg, world_size=1, check_data=False)
    assert cfg.data.selection_examples == "reft_paper" and cfg.training.keep_best == "mcc"
    assert "original_code/task_steer.py" in path.read_text() and "issue #114 (2024-06-25)" in path.read_text()
