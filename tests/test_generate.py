import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reft_fast import ReftConfig, get_reft_model
from reft_fast.core.positions import intervention_locations

VOCAB = 64
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).eval()
    model.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens
    model.generation_config.pad_token_id = 0
    config = ReftConfig([{"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 4},
                         {"layer": 1, "component": "mlp_output", "intervention": "lobireft",
                          "low_rank_dimension": 4}], positions="f1+l2", share_weights=True)
    reft_model = get_reft_model(model, config)
    with torch.no_grad():  # strong edits, so that generation visibly depends on them
        for p in reft_model.interventions.parameters():
            if p.dim() == 1:
                p.normal_(0, 3.0)
    # Three prompts of lengths 6, 3, 5, left padded to 6.
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([6, 3, 5])
    ids = torch.randint(3, VOCAB, (3, 6), generator=g)
    mask = (torch.arange(6)[None, :] >= (6 - lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    locations = intervention_locations(lengths, "f1+l2", 2, share_weights=True, offsets=6 - lengths)
    return model, reft_model, {"input_ids": ids, "attention_mask": mask}, locations


def _no_cache_greedy(reft_model, base, locations):
    """Greedy decoding by hand: the full sequence every step, the edit re-applied at the prompt positions."""
    ids, mask = base["input_ids"], base["attention_mask"]
    for _ in range(NEW_TOKENS):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            _, out = reft_model({"input_ids": ids, "attention_mask": mask}, intervention_locations=locations,
                                position_ids=position_ids, use_cache=False)
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def test_greedy_with_cache_equals_the_no_cache_loop(setup):
    model, reft_model, base, locations = setup
    _, generated = reft_model.generate(base, intervention_locations=locations, max_new_tokens=NEW_TOKENS,
                                       do_sample=False)
    assert torch.equal(generated, _no_cache_greedy(reft_model, base, locations))
    unit = {"sources->base": (None, locations.tolist())}
    original, again = reft_model.generate(base, unit, max_new_tokens=NEW_TOKENS, do_sample=False,
                                          output_original_output=True)
    assert torch.equal(again, generated)
    assert torch.equal(original, model.generate(**base, max_new_tokens=NEW_TOKENS, do_sample=False))
    assert not torch.equal(original, generated)


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search_with_cache_equals_without(setup, num_return_sequences):
    _, reft_model, base, locations = setup
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False, num_return_sequences=num_return_sequences)
    _, cached = reft_model.generate(base, intervention_locations=locations, use_cache=True, **kwargs)
    _, uncached = reft_model.generate(base, intervention_locations=locations, use_cache=False, **kwargs)
    assert cached.shape == (3 * num_return_sequences, 6 + NEW_TOKENS)
    assert torch.equal(cached, uncached)


def test_generate_rejects_unsupported_modes(setup):
    _, reft_model, base, locations = setup
    with pytest.raises(ValueError, match="intervene_on_prompt=False is not supported"):
        reft_model.generate(base, intervention_locations=locations, intervene_on_prompt=False)
    with pytest.raises(ValueError, match="must be < the sequence length 6"):
        reft_model.generate(base, intervention_locations=locations + 6, max_new_tokens=1)


class _Sealed:
    """Hides a KV cache behind an object the code under test cannot recognize as one."""

    def __init__(self, cache):
        self.cache = cache


class _RenamedCacheLlama(LlamaForCausalLM):
    """A Llama whose generate hands the KV cache to forward under a keyword no release has used (optionally sealed).

    transformers renamed ``past_key_values`` to ``cache`` in 5.24.0 and a keyword-based check then edited every
    decode step; this model stands for the next rename.
    """

    UNSEEN = "kv_state_under_a_new_name"
    seal = False

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        for name in [n for n, v in inputs.items() if hasattr(v, "get_seq_length")]:
            cache = inputs.pop(name)
            inputs[self.UNSEEN] = (name, _Sealed(cache) if self.seal else cache)
        return inputs

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # generate checks these names exist
        if self.UNSEEN in kwargs:
            name, cache = kwargs.pop(self.UNSEEN)
            kwargs[name] = cache.cache if isinstance(cache, _Sealed) else cache
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("seal", [False, True], ids=["renamed", "renamed-and-unrecognizable"])
def test_generate_finds_the_prompt_pass_whatever_the_cache_is_called(setup, seal):
    model, reft_model, base, locations = setup
    renamed = _RenamedCacheLlama(model.config).eval()
    renamed.load_state_dict(model.state_dict())
    renamed.generation_config = model.generation_config
    renamed.seal = seal
    config = ReftConfig([{"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 4},
                         {"layer": 1, "component": "mlp_output", "intervention": "lobireft",
                          "low_rank_dimension": 4}], positions="f1+l2", share_weights=True)
    renamed_reft = get_reft_model(renamed, config)
    renamed_reft.interventions.load_state_dict(reft_model.interventions.state_dict())
    seen = []
    renamed.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    _, generated = renamed_reft.generate(base, intervention_locations=locations, max_new_tokens=NEW_TOKENS,
                                         do_sample=False)
    assert all(_RenamedCacheLlama.UNSEEN in names and "past_key_values" not in names and "cache" not in names
               for names in seen)  # the test really hides the cache's usual names
    assert torch.equal(generated, _no_cache_greedy(reft_model, base, locations))
