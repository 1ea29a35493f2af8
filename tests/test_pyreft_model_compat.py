"""pyreft's and pyvene's model-level API on a ReftModel: the calls pyreft's README, notebooks and scripts make.

Each test uses pyreft's spelling of the call (BatchEncoding inputs, string components, pad_mode="last",
interventions[key][0], rotate_layer, set_device, count_parameters, load from the Hub, a forward() override) and checks
the result against reft_fast's own spelling of the same thing or against a hand-written reference.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import reft_fast as pyreft
from reft_fast import LoreftIntervention, NoreftIntervention, ReftConfig, ReftModel, get_reft_model

from dist.tiny import make_tokenizer

HIDDEN, RANK = 32, 4


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _llama(vocab=96, layers=3):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)).eval()


def _randomized(reft_model):
    # Move every intervention away from its initial (near-identity) edit, so that a wrong site or row shows.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in reft_model.interventions.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return reft_model


def _loreft():
    return LoreftIntervention(embed_dim=HIDDEN, low_rank_dimension=RANK)


def _inputs(vocab=96, batch=2, seq=6):
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------------------------------------
# Inputs straight from the tokenizer
# ----------------------------------------------------------------------------------------------------------------------
def test_forward_and_generate_take_the_tokenizers_batch_encoding(tokenizer):
    model = _llama(vocab=len(tokenizer))
    reft_model = _randomized(get_reft_model(model, ReftConfig({"layer": 1, "component": "block_output",
                                                               "intervention": _loreft()})))
    prompt = tokenizer("repeat : red green blue", return_tensors="pt").to("cpu")  # pyreft's examples' form
    last = prompt["input_ids"].shape[-1] - 1
    locations = {"sources->base": (None, [[[last]]])}
    _, from_encoding = reft_model(prompt, unit_locations=locations)
    _, from_dict = reft_model(dict(prompt), unit_locations=locations)
    torch.testing.assert_close(from_encoding.logits, from_dict.logits, rtol=0, atol=0)
    _, generated = reft_model.generate(prompt, unit_locations=locations, intervene_on_prompt=True, max_new_tokens=4,
                                       do_sample=False)
    _, expected = reft_model.generate(dict(prompt), unit_locations=locations, intervene_on_prompt=True,
                                      max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert torch.equal(generated, expected)


def test_missing_locations_say_how_to_give_them():
    reft_model = get_reft_model(_llama(), ReftConfig({"layer": 0, "intervention": _loreft()}))
    with pytest.raises(ValueError, match=r"no positions to edit were given: pass unit_locations=\{'sources->base'"):
        reft_model(_inputs())
    with pytest.raises(ValueError, match="not both"):
        reft_model(_inputs(), unit_locations=[[[0], [0]]], intervention_locations=torch.zeros(1, 2, 1).long())


# ----------------------------------------------------------------------------------------------------------------------
# pyvene's model methods
# ----------------------------------------------------------------------------------------------------------------------
def test_set_device_get_device_count_parameters_disable_model_gradients():
    model = _llama()
    reft_model = get_reft_model(model, ReftConfig([{"layer": 0, "intervention": _loreft()},
                                                   {"layer": 2, "component": "mlp_output", "intervention":
                                                    NoreftIntervention(embed_dim=HIDDEN, low_rank_dimension=2)}]))
    intervention_params = sum(p.numel() for p in reft_model.interventions.parameters())
    assert reft_model.count_parameters() == intervention_params == reft_model.count_parameters(include_model=True)
    model.lm_head.weight.requires_grad_(True)  # pyreft's GLUE script unfreezes the classifier head like this
    model.train()
    assert reft_model.count_parameters(include_model=True) == intervention_params + model.lm_head.weight.numel()
    assert reft_model.count_parameters() == intervention_params
    reft_model.disable_model_gradients()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert reft_model.get_device() == torch.device("cpu")

    reft_model.set_device("meta", set_model=False)  # interventions only
    assert {p.device.type for p in reft_model.interventions.parameters()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    reft_model.set_device("meta")
    assert {p.device.type for p in reft_model.parameters()} == {"meta"}
    assert reft_model.get_device() == torch.device("meta")
    assert {p.dtype for p in reft_model.interventions.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------------------------------------------------
# Components written as module paths (pyvene's string access)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, path, layer, component", [
    ("llama", "model.layers[1].output", 1, "block_output"),
    ("llama", "model.layers[2].input", 2, "block_input"),
    ("llama", "model.layers[0].mlp.output", 0, "mlp_output"),
    ("llama", "model.layers[1].mlp.input", 1, "mlp_input"),
    ("llama", "model.layers[2].self_attn.output", 2, "attention_output"),
    ("gpt2", "transformer.h[1].attn.output", 1, "attention_output"),
    ("gpt2", "transformer.h[0].output", 0, "block_output"),
])
def test_component_paths_edit_the_same_site_as_the_named_component(arch, path, layer, component):
    def build(spec):
        if arch == "gpt2":
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=3, n_head=4, vocab_size=96)).eval()
        else:
            model = _llama()
        torch.manual_seed(5)
        return _randomized(get_reft_model(model, ReftConfig({**spec, "intervention": _loreft()})))

    # pyreft's README writes "layer": 15 next to a path naming another layer: the path decides, as in pyvene.
    by_path = build({"layer": (layer + 1) % 3, "component": path})
    by_name = build({"layer": layer, "component": component})
    assert by_path.placements == [(layer, component)]
    locations = {"sources->base": (None, [[[1, 4], [0, 5]]])}
    _, ours = by_path(_inputs(), unit_locations=locations)
    _, expected = by_name(_inputs(), unit_locations=locations)
    torch.testing.assert_close(ours.logits, expected.logits, rtol=0, atol=0)
    assert not torch.allclose(ours.logits, by_name.model(**_inputs()).logits)  # the edit did something


@pytest.mark.parametrize("component, message", [
    ("model.layers[1].self_attn.o_proj.input", r"names a Linear, which reft_fast cannot edit"),
    ("model.embed_tokens.output", r"names a Embedding, which reft_fast cannot edit"),
    ("model.layers[7].output", r"component 'model.layers\[7\].output': ModuleList has no \[7\]"),
    ("model.blocks[0].output", r"LlamaModel has no attribute 'blocks'"),
    ("model.layers[1].outputs", r"neither a named component .* nor a module path"),
    ("query_output", r"pyvene's component 'query_output' is not supported"),
    ("head_attention_value_output", r"pyvene's component 'head_attention_value_output' is not supported"),
])
def test_component_paths_that_cannot_be_mapped_are_refused_clearly(component, message):
    with pytest.raises(ValueError, match=message):
        get_reft_model(_llama(), ReftConfig({"layer": 1, "component": component, "intervention": _loreft()}))


def test_component_path_round_trips_through_save_and_load(tmp_path):
    reft_model = _randomized(get_reft_model(_llama(), ReftConfig({"layer": 0, "component": "model.layers[2].mlp.output",
                                                                  "intervention": _loreft()})))
    reft_model.save(tmp_path)
    loaded = ReftModel.load(tmp_path, _llama())
    assert loaded.placements == [(2, "mlp_output")]
    locations = {"sources->base": (None, [[[3], [1]]])}
    torch.testing.assert_close(loaded(_inputs(), unit_locations=locations)[1].logits,
                               reft_model(_inputs(), unit_locations=locations)[1].logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# pyreft's pad modes
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, padded_last, padded_first", [
    # last_position 3 caps each side at 1: pyreft fills the 4 empty slots with last_position (3) or −1.
    (dict(last_position=3, first_n=3, last_n=3, num_interventions=2, share_weights=True),
     [[0, 2, 3, 3, 3, 3]] * 2, [[0, 2, -1, -1, -1, -1]] * 2),
    (dict(last_position=3, first_n=2, last_n=3, num_interventions=2), [[0, 3, 3], [2, 3, 3]],
     [[0, -1, -1], [2, -1, -1]]),
    (dict(last_position=10, positions="f2+l2", num_interventions=2), [[0, 1], [8, 9]], [[0, 1], [8, 9]]),
])
def test_pad_mode_last_pads_with_last_position_as_pyreft(kwargs, padded_last, padded_first):
    assert pyreft.get_intervention_locations(pad_mode="last", **kwargs) == padded_last
    assert pyreft.get_intervention_locations(pad_mode="first", **kwargs) == padded_first
    with pytest.raises(ValueError, match="pad_mode must be 'first'"):
        pyreft.get_intervention_locations(pad_mode="middle", **kwargs)


def test_pad_modes_match_pyreft_itself():
    real = pytest.importorskip("pyreft.dataset")
    for last_position in (2, 3, 4, 5, 9):
        for first_n, last_n in ((3, 3), (2, 0), (0, 4), (1, 5), (5, 1)):
            for share_weights in (False, True):
                for pad_mode in ("first", "last"):
                    kwargs = dict(last_position=last_position, first_n=first_n, last_n=last_n, num_interventions=4,
                                  share_weights=share_weights, pad_mode=pad_mode)
                    assert pyreft.get_intervention_locations(**kwargs) == real.get_intervention_locations(**kwargs), \
                        kwargs


def test_pad_mode_last_locations_run_and_edit_the_repeated_token_once():
    # pyreft's agent notebook: locations from pad_mode="last", permuted to [intervention][example][position].
    reft_model = _randomized(get_reft_model(_llama(), ReftConfig(
        [{"layer": layer, "intervention": _loreft()} for layer in (0, 2)])))
    base = _inputs(batch=1, seq=6)
    per_example = pyreft.get_intervention_locations(last_position=3, first_n=3, last_n=3, pad_mode="last",
                                                    num_interventions=2, share_weights=True)
    unit_locations = torch.IntTensor([per_example]).permute(1, 0, 2).tolist()
    assert unit_locations[0][0] == [0, 2, 3, 3, 3, 3]
    _, padded_last = reft_model(base, unit_locations={"sources->base": (None, unit_locations)})
    _, once = reft_model(base, unit_locations={"sources->base": (None, [[[0, 2, 3]], [[0, 2, 3]]])})
    # Equal up to rounding (the two calls batch different slot counts); a token edited twice would differ by O(1).
    torch.testing.assert_close(padded_last.logits, once.logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# pyreft's ways of reaching into an intervention
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orthogonalization", ["polar", "householder"])
def test_pyvene_pair_index_and_rotate_layer(orthogonalization):
    reft_model = get_reft_model(_llama(), ReftConfig([
        {"layer": 0, "intervention": LoreftIntervention(embed_dim=HIDDEN, low_rank_dimension=RANK,
                                                         orthogonalization=orthogonalization)},
        {"layer": 1, "intervention": NoreftIntervention(embed_dim=HIDDEN, low_rank_dimension=RANK)}]))
    keys = list(reft_model.interventions.keys())
    loreft, noreft = (reft_model.interventions[k] for k in keys)
    for k, v in reft_model.interventions.items():  # examples/loreft/train.py
        assert v[0] is reft_model.interventions[k]
        _ = v[0].eval()
    with pytest.raises(IndexError, match=r"only \[0\] is kept"):
        loreft[1]

    weight = reft_model.interventions[keys[0]][0].rotate_layer.weight  # the memorisation notebook's read
    R = loreft.rotation_matrix()
    assert weight.shape == (HIDDEN, RANK)
    torch.testing.assert_close(weight, R.mT, rtol=0, atol=0)
    torch.testing.assert_close(weight.T @ weight, torch.eye(RANK), rtol=0, atol=1e-5)
    x = torch.randn(2, 5, HIDDEN, dtype=torch.bfloat16)
    torch.testing.assert_close(loreft.rotate_layer(x), x.float() @ R.mT, rtol=0, atol=0)
    weight.sum().backward()  # differentiable, as pyreft's parametrized weight
    assert all(t.grad is not None for t in loreft.rotation_inputs() if t.requires_grad)
    assert not hasattr(noreft, "rotate_layer")
    assert list(loreft.state_dict()) == list(type(loreft)(embed_dim=HIDDEN, low_rank_dimension=RANK,
                                                          orthogonalization=orthogonalization).state_dict())
    if orthogonalization == "householder":  # its pyreft-shaped state stays reachable
        assert loreft.rotate_layer.original is loreft._modules["rotate_layer"].original


# ----------------------------------------------------------------------------------------------------------------------
# A subclass that overrides forward() (pyreft users' custom edits)
# ----------------------------------------------------------------------------------------------------------------------
class DoubledLoreft(LoreftIntervention):
    """A custom edit written as pyreft users write them: forward(base, source, subspaces) on the selected rows."""

    def forward(self, base, source=None, subspaces=None):
        rotated_base = self.rotate_layer(base)
        source = self.learned_source(base.float())
        return (base.float() + 2.0 * (source - rotated_base) @ self.rotate_layer.weight.T).to(base.dtype)


def _hand_run(reft_model, base, rows):
    """The base model with DoubledLoreft's math applied by a hook of our own at layer 1's output, rows [B, P]."""
    intervention = next(iter(reft_model.interventions.values()))
    reft_model.remove_hooks()

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        for b, positions in enumerate(rows):
            for p in positions:
                h[b, p] = DoubledLoreft.forward(intervention, h[b, p][None])[0]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = reft_model.model.model.layers[1].register_forward_hook(hook)
    try:
        return reft_model.model(**base).logits
    finally:
        handle.remove()


def test_a_forward_override_runs_instead_of_the_fused_op():
    base = _inputs()
    rows = [[1, 4], [0]]
    locations = {"sources->base": (None, [[[1, 4], [0, -1]]])}
    torch.manual_seed(5)
    custom = _randomized(get_reft_model(_llama(), ReftConfig({"layer": 1, "intervention": DoubledLoreft(
        embed_dim=HIDDEN, low_rank_dimension=RANK)})))
    torch.manual_seed(5)
    plain = _randomized(get_reft_model(_llama(), ReftConfig({"layer": 1, "intervention": _loreft()})))
    _, edited = custom(base, unit_locations=locations)
    _, plain_out = plain(base, unit_locations=locations)
    assert (edited.logits - plain_out.logits).abs().max() > 1e-2

    (edited.logits.square().mean()).backward()  # the override trains: its parameters get gradients
    intervention = next(iter(custom.interventions.values()))
    assert intervention.learned_source.weight.grad.abs().sum() > 0
    assert all(t.grad.abs().sum() > 0 for t in intervention.rotation_inputs() if t.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(edited.logits.detach(), _hand_run(custom, base, rows), rtol=1e-5, atol=1e-5)


def test_a_forward_override_with_a_wrong_shape_is_refused():
    class Pooled(LoreftIntervention):
        def forward(self, base, source=None, subspaces=None):
            return base.mean(dim=1)

    reft_model = get_reft_model(_llama(), ReftConfig({"layer": 0, "intervention": Pooled(
        embed_dim=HIDDEN, low_rank_dimension=RANK)}))
    with pytest.raises(TypeError, match=r"Pooled.forward must return the edited rows, a tensor of shape \[2, 1, 32\]"):
        reft_model(_inputs(), unit_locations=[[[0], [1]]])


# ----------------------------------------------------------------------------------------------------------------------
# ReftModel.load from the Hugging Face Hub (offline here: from a Hub cache, a local copy, or a clear error)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _saved(directory):
    reft_model = _randomized(get_reft_model(_llama(), ReftConfig({"layer": 1, "intervention": _loreft()})))
    reft_model.save(directory)
    return reft_model


def _same_edits(loaded, reference):
    locations = {"sources->base": (None, [[[2], [5]]])}
    torch.testing.assert_close(loaded(_inputs(), unit_locations=locations)[1].logits,
                               reference(_inputs(), unit_locations=locations)[1].logits, rtol=0, atol=0)


def test_load_from_huggingface_hub_reads_the_hub_cache(offline_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--someone--reft-tiny"
    reference = _saved(repo / "snapshots" / commit)  # the layout snapshot_download leaves in the cache
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _same_edits(ReftModel.load("someone/reft-tiny", _llama(), from_huggingface_hub=True), reference)
    _same_edits(pyreft.ReftModel.load("someone/reft-tiny", _llama()), reference)  # no such local directory → Hub


def test_load_from_huggingface_hub_into_a_local_directory(offline_hub, tmp_path):
    reference = _saved(tmp_path / "downloaded")
    loaded = ReftModel.load("someone/reft-tiny", _llama(), local_directory=tmp_path / "downloaded",
                            from_huggingface_hub=True)
    _same_edits(loaded, reference)


def test_load_from_huggingface_hub_offline_without_a_copy_says_why(offline_hub, tmp_path):
    with pytest.raises(ValueError, match=r"downloading the Hugging Face Hub repo 'someone/missing' failed "
                                         r"\(LocalEntryNotFoundError.*HF_HUB_OFFLINE=1"):
        ReftModel.load("someone/missing", _llama(), from_huggingface_hub=True)
    with pytest.raises(ValueError, match=r"no_such_reft is not a local directory, and downloading"):
        ReftModel.load("no_such_reft", _llama())  # could be a repo id: the Hub is tried, offline
    with pytest.raises(ValueError, match=r"no/such/dir holds no config.json"):
        ReftModel.load(str(tmp_path / "no/such/dir"), _llama())  # cannot be a repo id: a local path
