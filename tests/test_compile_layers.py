"""``model.compile: true``: every decoder layer compiled with its interventions' hooks inside, without graph breaks
(``fullgraph=True`` raises on one), and the same loss and gradients as eager."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reft_fast import ReftConfig, ReftModel
from reft_fast.train.loading import compile_layers
from reft_fast.train.train_config import ConfigError, config_from_dict

from dist.tiny import make_tokenizer

# Compiled and eager graphs may order fp32 sums differently (aot_eager decomposes some ops): a few ulps of the loss.
TOL = dict(rtol=1e-5, atol=1e-6)


def _reft_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    config = ReftConfig([
        {"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2},
        {"layer": 0, "component": "block_output", "intervention": "nodireft", "low_rank_dimension": 2,
         "act_fn": "relu"},  # two at one site: the second edits the first's output
        {"layer": 1, "component": "mlp_input", "intervention": "direft", "low_rank_dimension": 2},
        {"layer": 1, "component": "attention_output", "intervention": "consreft", "low_rank_dimension": 2}])
    reft_model = ReftModel(model, config).train()
    with torch.no_grad():
        for p in reft_model.interventions.parameters():
            if p.dim() == 1:
                p.normal_()
    return reft_model


def _step(reft_model, locations):
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    for p in reft_model.trainable_parameters():
        p.grad = None
    _, out = reft_model({"input_ids": ids}, intervention_locations=locations, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in reft_model.trainable_parameters()]


def test_compiled_layers_trace_whole_and_match_eager():
    reft_model = _reft_model()
    steps = [torch.tensor([[[2, 5], [3, -1], [1, 4]]] * 4), torch.tensor([[[0, -1], [6, 2], [1, 3]]] * 4)]
    eager = [_step(reft_model, locations) for locations in steps]
    torch._dynamo.reset()
    compile_layers(reft_model, fullgraph=True, backend="aot_eager")
    compiled = [_step(reft_model, locations) for locations in steps]  # new positions: the same graphs
    for (loss, grads), (loss_c, grads_c) in zip(eager, compiled):
        torch.testing.assert_close(loss_c, loss, **TOL)
        for a, b in zip(grads_c, grads):
            torch.testing.assert_close(a, b, **TOL)
    assert all(layer._compiled_call_impl is not None for layer in reft_model.model.model.layers)
    torch._dynamo.reset()


def test_model_compile_is_a_validated_boolean():
    base = {"model": {"path": "some/model"}}
    assert config_from_dict(base).model.compile is False
    assert config_from_dict({"model": {"path": "some/model", "compile": True}}).model.compile is True
    with pytest.raises(ConfigError, match="model.compile: expected true or false"):
        config_from_dict({"model": {"path": "some/model", "compile": "yes"}})


def test_more_intervened_layers_than_dynamo_recompiles_by_default():
    """Each site's hook reads its own interventions: with one code object for all hooks, dynamo compiled a version
    per layer and past its recompile limit (8) ran the remaining layers eager (``fullgraph=True`` raised there)."""
    layers = 10
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    config = ReftConfig([{"layer": layer, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": 1} for layer in range(layers)])
    reft_model = ReftModel(model, config).train()
    locations = torch.tensor([[[1, 3], [0, 2], [4, -1]]] * layers)
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(2))

    def step():
        _, out = reft_model({"input_ids": ids}, intervention_locations=locations, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.detach()

    eager = step()
    torch._dynamo.reset()
    compile_layers(reft_model, fullgraph=True, backend="eager")
    try:
        torch.testing.assert_close(step(), eager, **TOL)
    finally:
        torch._dynamo.reset()


def test_generation_keeps_one_compiled_version_per_hook_site():
    """Generating after training steps (twice: the second call meets layers dynamo gave up on), dynamo compiles the
    hooks' frames apart, ``_edit`` among them: every site has code of its own, so no hook code object collects a
    version per layer (the shared ``_edit`` had 8, its limit)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    layers = 10
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    config = ReftConfig([{"layer": layer, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": 1, "dropout": 0.05} for layer in range(layers)])
    model.config.use_cache = False  # as the recipe sets it for training; generate then recomputes every step
    reft_model = ReftModel(model, config)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    locations = torch.tensor([[[1, 3], [0, 2]]] * layers)

    def train_then_generate():
        reft_model.train()
        for _ in range(2):
            _, out = reft_model(inputs, intervention_locations=locations, labels=ids, use_cache=False)
            out.loss.backward()
        reft_model.eval()
        return [reft_model.generate(inputs, intervention_locations=locations, max_new_tokens=3, do_sample=False)[1]
                for _ in range(2)]

    torch.manual_seed(4)
    eager = train_then_generate()
    torch._dynamo.reset()
    compile_layers(reft_model, backend="eager")
    try:
        torch.manual_seed(4)
        compiled = train_then_generate()
        assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
        codes = {hook.func.__code__ for layer in model.model.layers for hook in layer._forward_hooks.values()}
        codes |= {edit.__code__ for layer in model.model.layers for hook in layer._forward_hooks.values()
                  for edit in hook.args[1:2]}
        codes.add(type(reft_model._hooks)._edit.__code__)
        entries = {code.co_name: len(_debug_get_cache_entry_list(code)) for code in codes}
        assert max(entries.values()) <= 4, entries  # train, the dropout seed made dynamic, no_grad: not one per layer
    finally:
        torch._dynamo.reset()


def test_generation_helpers_run_compiled_layers_eager():
    """With a KV cache dynamo would compile a version per layer (each has its own cache slot) up to its limit: the
    answers of a training run (samples, eval_accuracy) are generated with the layers eager, and are the same."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from reft_fast.train.generation import generate_answers_batched

    tokenizer = make_tokenizer()
    layers = 10
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer),
                                         pad_token_id=tokenizer.pad_token_id))
    config = ReftConfig([{"layer": layer, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": 1} for layer in range(layers)], positions="f1+l1")
    reft_model = ReftModel(model, config).eval()
    prompts = ["red green blue", "cat dog"]
    answer = dict(positions="f1+l1", share_weights=True, max_new_tokens=3, chat_template=False)
    eager = generate_answers_batched(reft_model, tokenizer, prompts, **answer)
    torch._dynamo.reset()
    compile_layers(reft_model, backend="eager")
    try:
        assert generate_answers_batched(reft_model, tokenizer, prompts, **answer) == eager
        layer_forward = type(model.model.layers[0]).forward.__code__  # transformers' checkpointing wrapper
        assert _debug_get_cache_entry_list(layer_forward) == []
    finally:
        torch._dynamo.reset()
