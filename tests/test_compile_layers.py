"""``model.compile: true``: every decoder layer compiled with its interventions' hooks inside, without graph breaks
(``fullgraph=True`` raises on one), and the same loss and gradients as eager."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reft_fast import ReftConfig, ReftModel
from reft_fast.train.loading import compile_layers
from reft_fast.train.train_config import ConfigError, config_from_dict

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
