"""A padded causal batch runs without a padding mask (``loss.causal_model_inputs``): the collators pad on the right
and ignore the padding's labels, so every real token's logits, the loss and the intervention gradients are those
of the masked run, for Llama-, Qwen2- and GPT-2-shaped tiny models; and a step keeps no per-layer copy of a mask.

Tolerances (fp32 on the CPU): logits atol 1e-5; loss and gradients rtol 1e-5, atol 1e-7 (the masked and unmasked
attention kernels sum in different orders)."""

import pytest
import torch
import transformers

from reft_fast.core.config import ReftConfig
from reft_fast.core.model import get_reft_model
from reft_fast.train.data import IGNORE_INDEX, ReftDataCollator
from reft_fast.train.loss import causal_model_inputs

from memory import profiled_peak_bytes

VOCAB = 50


def _base(kind: str, layers: int = 3, hidden: int = 32):
    shape = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    else:
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
        config = config_class(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **shape)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def _batch(lengths: list[int], seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=generator).tolist()
        prompt = n // 2
        items.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "prompt_length": prompt})
    return ReftDataCollator(pad_token_id=0, num_interventions=2, positions="f2+l2")(items)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_a_padded_batch_without_its_mask_gives_the_masked_logits_loss_and_gradients(kind):
    reft_model = get_reft_model(_base(kind), ReftConfig([
        {"layer": layer, "component": "block_output", "low_rank_dimension": 2, "intervention": "LoreftIntervention"}
        for layer in (0, 1)], positions="f2+l2"))
    batch = _batch([9, 4, 7, 12])
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    runs = []
    for inputs in (causal_model_inputs(batch, reft_model.model),
                   {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}):
        reft_model.zero_grad(set_to_none=True)
        _, out = reft_model(inputs, intervention_locations=batch["intervention_locations"], labels=batch["labels"])
        out.loss.backward()
        runs.append((out.logits.detach(), out.loss.detach(), [p.grad.clone() for p in reft_model.trainable_parameters()]))
    assert "attention_mask" not in causal_model_inputs(batch, reft_model.model)
    (logits, loss, grads), (masked_logits, masked_loss, masked_grads) = runs
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], masked_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, masked_loss, rtol=1e-5, atol=1e-7)
    for grad, masked in zip(grads, masked_grads, strict=True):
        assert masked.abs().max() > 0
        torch.testing.assert_close(grad, masked, rtol=1e-5, atol=1e-7)


def test_a_padded_step_takes_the_memory_of_an_unpadded_one():
    """Given the padding mask, SDPA converted transformers' [B, 1, T, T] mask and kept a copy in every layer
    (14.3 MiB a step here against 7.5 MiB)."""
    base = _base("llama", layers=6)
    base.requires_grad_(False).get_input_embeddings().weight.requires_grad_(True)
    padded, full = _batch([384, 192], seed=1), _batch([384, 384], seed=1)
    assert padded["input_ids"].shape == full["input_ids"].shape

    def step(batch):
        return lambda: base(**causal_model_inputs(batch, base), labels=batch["labels"]).loss.backward()

    step(full)()  # the embeddings' gradient exists in both measured steps
    assert profiled_peak_bytes(step(padded)) <= 1.02 * profiled_peak_bytes(step(full))


# Tiny configs of decoder families transformers ships (eager where it has no SDPA path), beyond the three above.
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
_FAMILIES = {
    "gemma": ({}, "sdpa"), "gemma2": (dict(head_dim=8, sliding_window=4), "eager"),
    "gemma3_text": (dict(head_dim=8, sliding_window=4), "sdpa"), "mistral": (dict(sliding_window=4), "sdpa"),
    "phi3": ({}, "sdpa"), "falcon": ({}, "sdpa"), "olmo2": ({}, "sdpa"), "mixtral": ({}, "sdpa"),
    "gpt_neox": ({}, "sdpa"), "opt": (dict(ffn_dim=64, word_embed_proj_dim=32), "sdpa"),
    "bloom": (dict(n_layer=2, n_head=4), "eager"),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_every_family_gives_real_tokens_the_same_logits_without_the_padding_mask(family):
    """Sliding windows (Mistral, Gemma 2/3), ALiBi built from the mask (Bloom), positions counted from the mask (OPT),
    experts (Mixtral): right padding without its mask changes no real token's logits."""
    options, attention = _FAMILIES[family]
    config = transformers.AutoConfig.for_model(family, **_COMMON, **options)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).float().eval()
    batch = _batch([12, 7, 3])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        masked = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        unmasked = base(**causal_model_inputs(batch, base)).logits
    torch.testing.assert_close(unmasked[real], masked[real], atol=1e-6, rtol=1e-6)


def test_a_mixture_of_experts_with_its_load_balancing_loss_keeps_the_mask():
    """That loss averages over the tokens the mask keeps: without it the padding would count in it."""
    config = transformers.AutoConfig.for_model("mixtral", **_COMMON, output_router_logits=True)
    base = transformers.AutoModelForCausalLM.from_config(config)
    batch = _batch([6, 3])
    assert torch.equal(causal_model_inputs(batch, base)["attention_mask"], batch["attention_mask"])


@pytest.mark.cuda
def test_on_cuda_a_padded_step_without_its_mask_keeps_no_mask_copies():
    """bf16 Llama of 8 layers, 8 rows of 1024 tokens, half of the rows half padding: with the padding mask SDPA keeps
    a converted [8, 1, 1024, 1024] bf16 copy (16 MiB) in each layer and repeats k and v; without it, neither. The
    loss is the same to bf16's precision."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                                      pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda",
                                                                                                torch.bfloat16)
    base.requires_grad_(False).get_input_embeddings().weight.requires_grad_(True)
    batch = {k: v.cuda() for k, v in _batch([1024, 512] * 4).items() if isinstance(v, torch.Tensor)}

    def peak_and_loss(inputs):
        base.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = base(**inputs, labels=batch["labels"]).loss
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, loss.item()

    masked = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    peak_and_loss(masked)  # warm-up: kernels chosen, the embeddings' gradient allocated once
    with_mask, masked_loss = peak_and_loss(masked)
    without_mask, loss = peak_and_loss(causal_model_inputs(batch, base))
    mask_copies = 8 * 8 * 1024 * 1024 * 2
    assert without_mask <= with_mask - mask_copies / 2, (with_mask / 2**20, without_mask / 2**20)
    assert loss == pytest.approx(masked_loss, rel=1e-2)
