import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import reft_fast
from reft_fast import LoreftIntervention, ReftConfig, ReftModel, get_reft_model
from reft_fast.core.config import COMPONENTS

HIDDEN, LAYERS, VOCAB = 32, 3, 96
_COMMON = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB)


def _tiny(arch: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**_COMMON))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))
    elif arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**_COMMON, head_dim=8))
    elif arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**_COMMON, pad_token_id=0))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB))
    else:
        raise AssertionError(arch)
    return model.to(dtype).eval()


# Where each component lives, written out per architecture (independently of the structural search in model.py).
def _site(model, arch, layer, component):
    block = model.transformer.h[layer] if arch == "gpt2" else model.model.layers[layer]
    if component.startswith("block"):
        return block
    if component.startswith("attention"):
        return block.attn if arch == "gpt2" else block.self_attn
    return block.mlp


def _all_components_config(rank=2, **options):
    # Two interventions per layer, every component once, mixed types.
    types = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"]
    return ReftConfig([{"layer": i // 2, "component": comp, "intervention": types[i], "low_rank_dimension": rank,
                        **options} for i, comp in enumerate(COMPONENTS)])


def _inputs(batch=3, seq=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in example 1
    mask[2, -1] = 0  # right padding in example 2
    return {"input_ids": ids, "attention_mask": mask}


def _locations(n, first=(2, 3, 1)):
    # Different positions per example; −1 slots; first edited token per example given by `first`.
    rows = [[first[0], 5], [first[1], -1], [first[2], 4]]
    return torch.tensor([rows] * n)


def _randomize(reft_model):
    # Non-trivial edits: pyreft's initialization makes some members (zero-mean sources) nearly silent.
    with torch.no_grad():
        for p in reft_model.interventions.parameters():
            if p.dim() == 1:
                p.normal_(0, 1.0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"])
def test_every_component_on_every_architecture(arch):
    model = _tiny(arch)
    reft_model = get_reft_model(model, _all_components_config())
    _randomize(reft_model)
    base = _inputs()
    locations = _locations(len(COMPONENTS))
    _, out = reft_model(base, intervention_locations=locations, labels=base["input_ids"])
    out.loss.backward()

    # Reference: the same interventions applied by hooks placed by hand on the expected modules.
    reft_model.remove_hooks()
    handles = []
    for (layer, component), (i, inter) in zip(reft_model.placements, enumerate(reft_model.interventions.values())):
        module = _site(model, arch, layer, component)
        if component.endswith("_input"):
            def pre(mod, args, kwargs, inter=inter, i=i):
                if args:
                    return (inter(args[0], locations[i]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": inter(kwargs["hidden_states"], locations[i])}
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod, args, output, inter=inter, i=i):
                if isinstance(output, tuple):
                    return (inter(output[0], locations[i]), *output[1:])
                return inter(output, locations[i])
            handles.append(module.register_forward_hook(post))
    with torch.no_grad():
        expected = model(**base).logits
        for h in handles:
            h.remove()
        plain = model(**base).logits
    torch.testing.assert_close(out.logits.detach(), expected, atol=1e-5, rtol=1e-5)
    # Causality: nothing changes before an example's first edited token; something changes after it.
    for b, first in enumerate((2, 3, 1)):
        assert torch.equal(out.logits[b, :first].detach(), plain[b, :first])
        assert not torch.allclose(out.logits[b, first:].detach(), plain[b, first:])
    for name, p in reft_model.interventions.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_pyreft_readme_snippet_with_fp32_base_and_defaults():
    model = _tiny("llama")
    reft_config = reft_fast.ReftConfig(representations={
        "layer": 1, "component": "block_output", "low_rank_dimension": 4,
        "intervention": reft_fast.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4)})
    reft_model = reft_fast.get_reft_model(model, reft_config)
    reft_model.print_trainable_parameters()
    base = _inputs()
    nested = [[[6], [6], [5]]]
    _, out = reft_model(base, unit_locations={"sources->base": (None, nested)}, labels=base["input_ids"])
    _, same = reft_model(base, intervention_locations=torch.tensor(nested), labels=base["input_ids"])
    assert torch.equal(out.logits, same.logits)
    out.loss.backward()
    assert [p.dtype for p in reft_model.trainable_parameters()] == [torch.float32] * 3
    assert len(reft_model.trainable_parameters()) == 3  # rotation, W, b
    original, edited = reft_model(base, unit_locations={"sources->base": (None, nested)},
                                  output_original_output=True)
    assert torch.equal(original.logits, model(**base).logits)
    assert not torch.equal(original.logits, edited.logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    model = _tiny("llama", dtype)
    reft_model = get_reft_model(model, ReftConfig({"layer": 0, "intervention": "loreft", "low_rank_dimension": 2}))
    base = _inputs()
    _, out = reft_model(base, intervention_locations=_locations(1), labels=base["input_ids"])
    out.loss.backward()
    assert out.logits.dtype == dtype
    for p in reft_model.trainable_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_hooks_are_registered_once_and_leave_foreign_hooks_alone():
    model = _tiny("llama")
    calls = {"layer": 0, "pre": 0, "base": 0}
    model.model.layers[1].register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
    model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.__setitem__("pre", calls["pre"] + 1))
    model.register_forward_pre_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1))
    layer_hooks_before = len(model.model.layers[1]._forward_hooks)
    reft_model = get_reft_model(model, ReftConfig([
        {"layer": 1, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2},
        {"layer": 1, "component": "block_output", "intervention": "noreft", "low_rank_dimension": 2}]))
    # Two interventions at one site share one hook.
    assert len(model.model.layers[1]._forward_hooks) == layer_hooks_before + 1
    for _ in range(3):
        reft_model(_inputs(), intervention_locations=_locations(2))
    assert len(model.model.layers[1]._forward_hooks) == layer_hooks_before + 1
    assert calls == {"layer": 3, "pre": 3, "base": 3}
    reft_model.remove_hooks()
    model(**_inputs())
    assert calls == {"layer": 4, "pre": 4, "base": 4}
    assert len(model.model.layers[1]._forward_hooks) == layer_hooks_before


def test_plain_base_calls_are_not_edited():
    model = _tiny("llama")
    reft_model = get_reft_model(model, ReftConfig({"layer": 0, "intervention": "lobireft", "low_rank_dimension": 2}))
    _randomize(reft_model)
    base = _inputs()
    with torch.no_grad():
        before = model(**base).logits
        reft_model(base, intervention_locations=_locations(1))
        assert torch.equal(model(**base).logits, before)


# Sites inside the layers (recomputed under checkpointing) and at a layer's output, dropout included.
def _checkpointing_config():
    return ReftConfig([
        {"layer": 0, "component": "mlp_output", "intervention": "loreft", "low_rank_dimension": 2, "dropout": 0.3},
        {"layer": 1, "component": "attention_output", "intervention": "direft", "low_rank_dimension": 2},
        {"layer": 1, "component": "attention_input", "intervention": "noreft", "low_rank_dimension": 2},
        {"layer": 2, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2},
        {"layer": 2, "component": "mlp_input", "intervention": "consreft", "low_rank_dimension": 2,
         "orthogonalization": "householder"}])


def _enable_checkpointing(model, use_reentrant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.model.layers[0].gradient_checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    model = _tiny("llama")
    reft_model = get_reft_model(model, _checkpointing_config()).train()
    base = _inputs()

    def run():
        for p in reft_model.trainable_parameters():
            p.grad = None
        torch.manual_seed(5)  # the dropout seeds
        _, out = reft_model(base, intervention_locations=_locations(5), labels=base["input_ids"])
        # An unrelated no-grad forward between forward and backward must not disturb the recomputation.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reentrant checkpointing warns that no input requires grad
            reft_model(base, intervention_locations=_locations(5, first=(0, 2, 0)))
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in reft_model.trainable_parameters()]

    loss, grads = run()
    _enable_checkpointing(model, use_reentrant)
    loss_ckpt, grads_ckpt = run()
    assert torch.equal(loss_ckpt, loss)
    for a, b in zip(grads_ckpt, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _reft_loss(reft_model, base, first, seed):
    torch.manual_seed(seed)  # the dropout seeds
    _, out = reft_model(base, intervention_locations=_locations(5, first=first), labels=base["input_ids"])
    return out.loss


def _backward(scenario, reft_model, base):
    """Run a training pattern in which another forward separates a forward from its backward; the gradients."""
    for p in reft_model.trainable_parameters():
        p.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant checkpointing warns when no input requires grad
        if scenario == "two forwards, one backward":  # chosen/rejected pairs, one summed loss
            (_reft_loss(reft_model, base, (2, 3, 1), 5) + _reft_loss(reft_model, base, (0, 2, 0), 6)).backward()
        elif scenario == "two forwards, two backwards":
            first, second = _reft_loss(reft_model, base, (2, 3, 1), 5), _reft_loss(reft_model, base, (0, 2, 0), 6)
            first.backward()
            second.backward()
        elif scenario == "plain call between":  # a reference model sharing the base
            loss = _reft_loss(reft_model, base, (2, 3, 1), 5)
            (loss + reft_model.model(**base).logits.pow(2).mean()).backward()
        else:
            plain = reft_model.model(**base).logits.pow(2).mean()
            (plain + _reft_loss(reft_model, base, (2, 3, 1), 5)).backward()
    return [p.grad.clone() for p in reft_model.trainable_parameters()]


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("scenario", ["two forwards, one backward", "two forwards, two backwards",
                                      "plain call between", "plain call before"])
def test_gradient_checkpointing_recomputes_the_edits_of_the_forward_being_backpropagated(scenario, use_reentrant):
    model = _tiny("llama")
    reft_model = get_reft_model(model, _checkpointing_config()).train()
    _randomize(reft_model)
    base = _inputs()
    model.enable_input_require_grads()  # as checkpointing does: the plain call's logits then have a graph too
    grads = _backward(scenario, reft_model, base)
    _enable_checkpointing(model, use_reentrant)
    for a, b in zip(_backward(scenario, reft_model, base), grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_hidden_state_copy_per_intervention():
    class CountFullSize(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = tuple(shape), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
                self.count += 1
            return out

    model = _tiny("llama")
    base = _inputs()
    counts = []
    for n in (0, 3):
        config = ReftConfig({"layer": "all", "component": "block_output", "intervention": "loreft",
                             "low_rank_dimension": 2})
        reft_model = get_reft_model(model, config) if n else None
        with torch.no_grad(), CountFullSize((3, 7, HIDDEN)) as counter:
            if n:
                reft_model(base, intervention_locations=_locations(n))
            else:
                model(**base)
        counts.append(counter.count)
        if reft_model is not None:
            reft_model.remove_hooks()
    assert counts[1] - counts[0] == 3


def test_triton_backend_through_the_hooks():
    pytest.importorskip("triton")
    model = _tiny("llama")
    config = ReftConfig([{"layer": 0, "component": "mlp_output", "intervention": "loreft", "low_rank_dimension": 2},
                         {"layer": 2, "component": "block_input", "intervention": "nodireft",
                          "low_rank_dimension": 2, "act_fn": "relu"}])
    results = []
    for backend in ("torch", "triton"):
        reft_model = ReftModel(model, config, backend=backend)
        if not results:
            _randomize(reft_model)
            state = {k: v.clone() for k, v in reft_model.interventions.state_dict().items()}
        reft_model.interventions.load_state_dict(state)
        base = _inputs()
        _, out = reft_model(base, intervention_locations=_locations(2), labels=base["input_ids"])
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad for p in reft_model.trainable_parameters()]))
        reft_model.remove_hooks()
    (logits_t, grads_t), (logits_k, grads_k) = results
    torch.testing.assert_close(logits_k, logits_t, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_k, grads_t):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="layer 3 is out of range: the model has 3 decoder layers"):
        get_reft_model(model, ReftConfig({"layer": 3, "intervention": "loreft", "low_rank_dimension": 2}))
    with pytest.raises(ValueError, match="unknown component 'residual'"):
        ReftConfig({"layer": 0, "component": "residual", "intervention": "loreft", "low_rank_dimension": 2})
    with pytest.raises(ValueError, match="low_rank_dimension 33 is larger than embed_dim 32"):
        get_reft_model(model, ReftConfig({"layer": 0, "intervention": "loreft", "low_rank_dimension": 33}))
    with pytest.raises(ValueError, match="embed_dim 16 differs from the model's hidden size 32"):
        get_reft_model(model, ReftConfig({"layer": 0, "intervention": LoreftIntervention(embed_dim=16,
                                                                                          low_rank_dimension=2)}))

    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"unsupported model structure: NotADecoder has no decoder layer list at any "
                                         r"of \['model.layers', 'transformer.h'"):
        get_reft_model(NotADecoder(), ReftConfig({"layer": 0, "intervention": "loreft", "low_rank_dimension": 2}))

    reft_model = get_reft_model(model, ReftConfig([{"layer": 0, "intervention": "loreft", "low_rank_dimension": 2}]))
    base = _inputs()
    with pytest.raises(ValueError, match="locations for 2 interventions but the model has 1"):
        reft_model(base, intervention_locations=_locations(2))
    with pytest.raises(ValueError, match="locations for 2 interventions but the model has 1"):
        reft_model(base, unit_locations={"sources->base": (None, _locations(2).tolist())})
    with pytest.raises(ValueError, match="must be < the sequence length 7, found 7"):
        reft_model(base, intervention_locations=torch.tensor([[[7], [0], [0]]]))
    with pytest.raises(ValueError, match="no positions to edit were given: pass unit_locations="):
        reft_model(base)
    with pytest.raises(ValueError, match="sources are not supported"):
        reft_model(base, intervention_locations=_locations(1), sources=[base])
    with pytest.raises(ValueError, match="disable_model_grads=False is not supported"):
        get_reft_model(model, ReftConfig({"layer": 0, "intervention": "loreft", "low_rank_dimension": 2}),
                       disable_model_grads=False)


def test_a_batch_with_no_positions_runs_the_plain_model():
    # Zero position slots ([n, B, 0]) is a batch that edits nothing: the plain model's logits, zero gradients.
    model = _tiny("llama")
    base = _inputs()
    with torch.no_grad():
        plain = model(**base).logits
    reft_model = get_reft_model(model, _all_components_config())
    _randomize(reft_model)
    n = len(reft_model.interventions)
    _, out = reft_model(base, intervention_locations=torch.empty(n, 3, 0, dtype=torch.long))
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)
    out.logits.square().mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in reft_model.trainable_parameters())
