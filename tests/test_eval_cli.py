"""Batched generation with the edits and ``reft-fast eval`` on a tiny random Llama (CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from reft_fast import ReftConfig, get_reft_model
from reft_fast.train.generation import generate_answers, generate_answers_batched

from dist.tiny import make_model_dir, make_tokenizer

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
