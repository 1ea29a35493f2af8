"""liger-kernel on the frozen base (reft_fast.train.fused_base): the auto/on/off choice, isolation, and numerical parity.

What runs where. Triton's interpreter (CPU) runs liger's RoPE kernel but not its RMSNorm, SwiGLU or fused linear
cross-entropy kernels: the interpreter hands float kernel arguments over as Python floats, on which those kernels call
``.to()`` (InterpreterError "'float' object has no attribute 'to'"). So on the CPU the parity tests fuse RoPE only, and
the full set (all four operations, fp32 and bf16, with and without checkpointing) is compared on CUDA.

Tolerances (loss: relative difference; gradients: ‖fused − plain‖ / ‖plain‖ per intervention parameter):
  CPU, RoPE only, fp32     1e-6 and 1e-5  (same fp32 arithmetic in another order)
  CUDA, all four, fp32     1e-5 and 1e-4  (chunked cross-entropy, fused RMSNorm reductions)
  CUDA, all four, bf16     1e-2 and 5e-2  (bf16 activations rounded at different points)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from reft_fast import ReftConfig, get_reft_model
from reft_fast.train.loading import enable_gradient_checkpointing
from reft_fast.train.fused_base import FUSED_OPS, apply_fused_base_ops, fused_base_ops, fused_ops_unsupported_reason

pytest.importorskip("liger_kernel")

_LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
_LAYERS = (0, 1)  # layer 2 is the last: its edits at prompt positions cannot reach the loss on the response


def _llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**_LLAMA, **overrides}))


def _twin(model: LlamaForCausalLM) -> LlamaForCausalLM:
    twin = LlamaForCausalLM(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)


def _loss_and_grads(model, *, checkpointing: bool = False, device="cpu"):
    """One ReFT training step's loss and intervention gradients: LoReFT r2 at _LAYERS, loss on the second half."""
    if checkpointing:
        enable_gradient_checkpointing(model, reentrant=False)
    torch.manual_seed(1)  # the same initial interventions for the plain and the fused model
    reft_config = ReftConfig([{"layer": layer, "component": "block_output", "low_rank_dimension": 2,
                               "intervention": "loreft"} for layer in _LAYERS])
    reft_model = get_reft_model(model, reft_config)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, _LLAMA["vocab_size"], (2, 16), generator=generator).to(device)
    labels = input_ids.clone()
    labels[:, :8] = -100
    labels[1, 12] = -100  # a masked token inside the response too
    locations = torch.tensor([[0, 1, 2, 7], [3, 5, 6, -1]]).expand(len(_LAYERS), -1, -1).to(device)
    reft_model.train()
    _, output = reft_model({"input_ids": input_ids}, intervention_locations=locations, labels=labels)
    output.loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in reft_model.interventions.named_parameters()}
    reft_model.remove_hooks()
    return output.loss.detach().float(), grads, output


def _assert_close(plain, fused, loss_rtol: float, grad_rtol: float) -> None:
    (loss_a, grads_a, _), (loss_b, grads_b, _) = plain, fused
    assert torch.isfinite(loss_a) and abs(loss_b - loss_a) <= loss_rtol * abs(loss_a), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, a in grads_a.items():
        assert a.norm() > 0, f"{name}: zero gradient, the comparison would prove nothing"
        error = (grads_b[name] - a).norm() / a.norm()
        assert error <= grad_rtol, f"{name}: relative gradient error {error:.3g} > {grad_rtol}"


# --------------------------------------------------------------------------------------------------------------------
# The choice: auto / on / off
# --------------------------------------------------------------------------------------------------------------------
def test_bad_arguments_are_named():
    model = _llama()
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_fused_base_ops(model, "yes")
    with pytest.raises(ValueError, match=r"unknown fused operations \['flash'\]"):
        apply_fused_base_ops(model, "on", ops=["rope", "flash"])
    with pytest.raises(TypeError, match="ops must be a sequence"):
        apply_fused_base_ops(model, "on", ops="rope")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        apply_fused_base_ops("llama", "on")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of 'auto'")
def test_auto_and_off_leave_a_cpu_model_alone():
    model = _llama()
    assert apply_fused_base_ops(model, "auto") == ()
    assert apply_fused_base_ops(model, "off") == ()
    assert fused_base_ops(model) == ()
    # Nothing was rebound: no instance-level forward anywhere, the class's own forward runs.
    assert not any("forward" in vars(module) for module in model.modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of 'auto'")
def test_auto_on_a_cpu_model_does_not_import_liger():
    # liger-kernel imports peft and bitsandbytes: about 4 s on a 2-core CPU, and a bitsandbytes warning about a
    # kernel hub, in every CPU training launch that cannot use any of it. A fresh interpreter: this one has them.
    code = textwrap.dedent("""
        import sys
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from reft_fast.train.fused_base import apply_fused_base_ops
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
        assert apply_fused_base_ops(model, "auto") == ()
        print(sorted(name for name in ("liger_kernel", "peft", "bitsandbytes") if name in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "[]", proc.stdout


def test_on_refuses_an_architecture_liger_does_not_know(monkeypatch):
    # The model stays on the CPU on every machine; whether the device is refused too depends only on
    # TRITON_INTERPRET, set here both ways, so the test reads the same on a CPU machine and on a GPU one.
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    # First, with the machine's own TRITON_INTERPRET: this imports liger's kernels, and Triton decides when a kernel
    # is defined whether it is interpreted (on a GPU machine, later tests run them on CUDA).
    assert "gpt2" in fused_ops_unsupported_reason(gpt2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the device is accepted: the architecture alone is refused
    with pytest.raises(ValueError, match="no kernels for model_type 'gpt2'") as refused:
        apply_fused_base_ops(gpt2, "on")
    assert "CUDA" not in str(refused.value)
    with pytest.raises(ValueError, match="has no config.model_type"):
        apply_fused_base_ops(torch.nn.Sequential(torch.nn.Linear(2, 2)), "on")
    monkeypatch.delenv("TRITON_INTERPRET")  # the device is refused too: the architecture comes first, then the device
    with pytest.raises(ValueError, match=r"no kernels for model_type 'gpt2'.*; and the model is on cpu.*need CUDA"):
        apply_fused_base_ops(gpt2, "on")
    with pytest.raises(ValueError, match="has no config.model_type.*; and the model is on cpu"):
        apply_fused_base_ops(torch.nn.Sequential(torch.nn.Linear(2, 2)), "on")
    assert apply_fused_base_ops(gpt2, "auto") == ()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of 'on'")
def test_on_refuses_a_cpu_model_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        apply_fused_base_ops(_llama(), "on")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU, under Triton's interpreter")
def test_on_refuses_the_fused_cross_entropy_on_a_zero3_partitioned_head():
    model = _llama()
    model.lm_head.weight.ds_id = 0  # the marker DeepSpeed's zero.Init puts on every partitioned parameter
    with pytest.raises(ValueError, match="ZeRO-3"):
        apply_fused_base_ops(model, "on")
    assert apply_fused_base_ops(model, "on", ops=["rope", "rms_norm"]) == ("rope", "rms_norm")


def _llama_classifier(seed: int = 0):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(**_LLAMA, num_labels=3, pad_token_id=0))


def _classify(model, device="cpu"):
    """A training forward with labels and its backward; the classifier's own output (logits [2, 3] and a loss)."""
    model.train()
    input_ids = torch.randint(1, _LLAMA["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    output = model(input_ids=input_ids, labels=torch.tensor([0, 2], device=device))
    assert output.logits.shape == (2, 3) and torch.isfinite(output.loss)
    output.loss.backward()
    return output


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU, under Triton's interpreter (CUDA: the test below)")
def test_a_sequence_classifier_keeps_its_own_forward():
    """liger's fused linear cross-entropy replaces the model's forward by a causal LM's, which reads lm_head: a Llama
    sequence classifier (task: classification) raised "no attribute 'lm_head'" at its first step on a GPU, where
    model.fused_ops auto applies it. A model without an LM head skips that operation and keeps its forward."""
    model = _llama_classifier()
    assert apply_fused_base_ops(model, "on", ops=["rope", "fused_linear_cross_entropy"]) == ("rope",)
    assert "forward" not in vars(model)
    _classify(model)


@pytest.mark.cuda
def test_auto_fuses_a_sequence_classifier_on_cuda():
    model = _llama_classifier().cuda()
    assert apply_fused_base_ops(model, "auto") == ("rope", "rms_norm", "swiglu")
    _classify(model, device="cuda")


# --------------------------------------------------------------------------------------------------------------------
# Isolation: liger's module-global patches stay with the patched model
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU, under Triton's interpreter")
def test_patches_stay_with_the_patched_model():
    rms_norm_class, mlp_class = modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP
    reference = _llama(seed=3)
    input_ids = torch.randint(0, _LLAMA["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits

    patched = _llama()
    assert apply_fused_base_ops(patched, "on") == FUSED_OPS
    assert apply_fused_base_ops(patched, "on") == FUSED_OPS  # a second call changes nothing
    # Built models are patched one by one; the classes that build new models are transformers' own again.
    assert modeling_llama.LlamaRMSNorm is rms_norm_class and modeling_llama.LlamaMLP is mlp_class
    assert "forward" in vars(patched.model.norm) and "forward" in vars(patched.model.layers[0].mlp)
    assert "forward" in vars(patched)  # the fused linear cross-entropy
    # Another model, built before or after, still runs transformers' code (liger's RMSNorm cannot run here at all).
    assert not any("forward" in vars(module) for module in reference.modules())
    later = _llama(seed=3)
    assert not any("forward" in vars(module) for module in later.modules())
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=input_ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(later(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def _plain_and_rope_fused(monkeypatch):
    """Two twin Llamas, the second with liger's RoPE, and the list that gains an item per fused RoPE call."""
    plain, fused = _llama(), _llama()
    assert apply_fused_base_ops(fused, "on", ops=["rope"]) == ("rope",)
    switch = modeling_llama.apply_rotary_pos_emb
    calls = []
    liger_rope = switch.fused
    monkeypatch.setattr(switch, "fused", lambda *a, **k: calls.append(1) or liger_rope(*a, **k))
    return plain, fused, calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU, under Triton's interpreter")
def test_fused_rope_runs_only_inside_the_patched_model(monkeypatch):
    plain, fused, calls = _plain_and_rope_fused(monkeypatch)
    input_ids = torch.randint(0, _LLAMA["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused(input_ids=input_ids)
        assert len(calls) == _LLAMA["num_hidden_layers"]
        plain(input_ids=input_ids)
        assert len(calls) == _LLAMA["num_hidden_layers"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU, under Triton's interpreter")
def test_compiled_layers_choose_the_rope_as_eager_layers_do(monkeypatch):
    """The switch read a context variable, which dynamo cannot trace: once any model had been patched in the process,
    every compiled Llama layer broke its graph there (fullgraph=True raised), the unpatched models' too."""
    plain, fused, calls = _plain_and_rope_fused(monkeypatch)
    input_ids = torch.randint(0, _LLAMA["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(0))
    layers = _LLAMA["num_hidden_layers"]
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected_plain, expected_fused = plain(input_ids=input_ids).logits, fused(input_ids=input_ids).logits
            assert len(calls) == layers
            for layer in plain.model.layers:
                layer.compile(fullgraph=True, backend="eager")
            torch.testing.assert_close(plain(input_ids=input_ids).logits, expected_plain, rtol=0, atol=0)
            assert len(calls) == layers
            # liger 0.8.5 runs its RoPE outside torch.compile (its dispatch is compiler-disabled): a graph break there
            # by design, after which the switch must still choose the fused RoPE inside this model's layers
            for layer in fused.model.layers:
                layer.compile(backend="eager")
            torch.testing.assert_close(fused(input_ids=input_ids).logits, expected_fused, rtol=1e-6, atol=1e-6)
            assert len(calls) == 2 * layers
            plain(input_ids=input_ids)
            assert len(calls) == 2 * layers
    finally:
        torch._dynamo.reset()


def test_auto_with_compiled_layers_leaves_out_what_breaks_their_graphs():
    """liger's RoPE and SwiGLU go through a dispatcher that torch.compile may not enter (liger-kernel 0.8.5): in a
    compiled layer each split its graph. "auto" with model.compile leaves them out; "on" keeps every operation."""
    import importlib

    from reft_fast.train.fused_base import COMPILE_BREAKING_OPS, fused_ops_wanted

    dispatch = importlib.import_module("liger_kernel.backends.dispatch")  # the package's name is the function's too
    assert getattr(dispatch.dispatch, "_torchdynamo_disable", False)  # the reason, in the installed liger
    assert fused_ops_wanted("auto", compiled_layers=True) == ("rms_norm", "fused_linear_cross_entropy")
    assert set(COMPILE_BREAKING_OPS) == {"rope", "swiglu"}
    assert fused_ops_wanted("auto", compiled_layers=False) == fused_ops_wanted("on", compiled_layers=True) == FUSED_OPS


# --------------------------------------------------------------------------------------------------------------------
# Parity: the loss and the intervention gradients through get_reft_model
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU, under Triton's interpreter (CUDA: the tests below)")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_rope_parity_on_cpu(checkpointing):
    base = _llama()
    fused = _twin(base)
    assert apply_fused_base_ops(fused, "on", ops=["rope"]) == ("rope",)
    _assert_close(_loss_and_grads(base, checkpointing=checkpointing),
                  _loss_and_grads(fused, checkpointing=checkpointing), loss_rtol=1e-6, grad_rtol=1e-5)


@pytest.mark.cuda
def test_auto_fuses_everything_on_cuda():
    model = _llama().cuda()
    assert apply_fused_base_ops(model, "auto") == FUSED_OPS


@pytest.mark.cuda
def test_auto_leaves_the_fused_cross_entropy_out_under_zero3():
    model = _llama().cuda()
    model.lm_head.weight.ds_id = 0  # the marker DeepSpeed's zero.Init puts on every partitioned parameter
    assert apply_fused_base_ops(model, "auto") == ("rope", "rms_norm", "swiglu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,loss_rtol,grad_rtol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 5e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_full_parity_on_cuda(dtype, loss_rtol, grad_rtol, checkpointing):
    base = _llama().to("cuda", dtype)
    fused = _twin(base)
    assert apply_fused_base_ops(fused, "on") == FUSED_OPS
    plain_result = _loss_and_grads(base, checkpointing=checkpointing, device="cuda")
    fused_result = _loss_and_grads(fused, checkpointing=checkpointing, device="cuda")
    _assert_close(plain_result, fused_result, loss_rtol, grad_rtol)
    assert fused_result[2].logits is None  # training mode with labels: the logits are never materialized


@pytest.mark.cuda
def test_eval_mode_still_returns_logits_on_cuda():
    base = _llama().cuda()
    fused = _twin(base)
    apply_fused_base_ops(fused, "on")
    input_ids = torch.randint(0, _LLAMA["vocab_size"], (2, 10), device="cuda")
    labels = input_ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        expected = base.eval()(input_ids=input_ids, labels=labels)
        actual = fused.eval()(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
