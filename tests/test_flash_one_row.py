"""One row per micro-batch under flash attention (reft_fast.train.loss.one_row_varlen_inputs).

Given a single row and no varlen lengths, transformers 5.24 reads the row's position ids on the host in every layer
(``_is_packed_sequence``), a host synchronization per layer of every forward. The row now reaches it as one varlen
sequence, [0, T], which it hands to ``flash_attn_varlen_func`` as is. On the CPU, transformers' flash attention path
runs with plain-torch stand-ins for flash-attn's two kernels (tests/flash_reference.py); the real ones run in the
cuda-marked test.
"""

import pytest
import torch

from flash_reference import FLASH, as_flash, reference_flash
from reft_fast.train.data import ReftDataCollator
from reft_fast.train.loss import causal_model_inputs, model_loss, to_device
from test_step_sync import _count

VOCAB, N_INTERVENTIONS, LAYERS = 96, 2, 3


def _model(attn: str = "sdpa", seed: int = 0, device: str = "cpu", dtype=torch.float32, **config_options):
    """A tiny Llama ReftModel with a LoReFT at each of the first two layers; the same weights for the same seed.
    No cache, as the recipe's loader sets it (``loading``)."""
    import transformers

    from reft_fast.core.config import ReftConfig
    from reft_fast.core.model import get_reft_model

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa", use_cache=False,
        **config_options)
    base = transformers.LlamaForCausalLM(config).to(device, dtype)
    base.requires_grad_(False)
    reft_config = ReftConfig(representations=[{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
                                                "intervention": "loreft"} for layer in range(N_INTERVENTIONS)])
    model = get_reft_model(base, reft_config, backend="torch")
    return as_flash(model) if attn == FLASH else model


def _batch(seed: int, lengths: list[int], multiple=None) -> dict:
    """A collated batch: random tokens, the second half of each example labelled, f2+l2 positions."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:], "prompt_length": n // 2})
    collate = ReftDataCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f2+l2",
                               pad_to_multiple_of=multiple)
    return collate(items)


def _step(model, batch: dict) -> tuple[float, list]:
    """The loss and every trained gradient of one micro-batch through the recipe's loss."""
    loss = model_loss(model, batch)
    return float(loss.detach()), [g.clone() for g in torch.autograd.grad(loss, model.trainable_parameters())]


def _assert_same_step(got, expected, rtol: float, atol: float) -> None:
    assert got[0] == pytest.approx(expected[0], rel=rtol, abs=atol)
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _flash_and_sdpa_steps(batch: dict, device: str = "cpu", dtype=torch.float32):
    """(flash step, SDPA step) of the same ReftModel over ``batch`` (moved to ``device``)."""
    moved = to_device(batch, device)
    return tuple(_step(_model(attn, device=device, dtype=dtype), moved) for attn in (FLASH, "sdpa"))


def test_a_single_row_reaches_flash_attention_as_one_varlen_sequence():
    model = _model(FLASH)
    batch = _batch(1, [13], multiple=16)
    inputs = causal_model_inputs(batch, model.model)
    assert set(inputs) == {"input_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert inputs["input_ids"] is batch["input_ids"]
    lengths = inputs["cu_seq_lens_q"]
    assert lengths is inputs["cu_seq_lens_k"] and lengths.dtype == torch.int32 and lengths.tolist() == [0, 16]
    assert inputs["max_length_q"] == inputs["max_length_k"] == 16 and type(inputs["max_length_q"]) is int
    # Every other case as before: two rows under flash attention, one row under another attention.
    assert set(causal_model_inputs(_batch(1, [13, 9]), model.model)) == {"input_ids"}
    for other in ("sdpa", "eager", "flex_attention"):
        model.model.config._attn_implementation = other
        assert set(causal_model_inputs(batch, model.model)) == {"input_ids"}, other


def test_a_model_whose_forward_takes_no_varlen_arguments_gets_its_row_as_before():
    """A model's own code (trust_remote_code) may list its forward's arguments without ``**kwargs``: given the varlen
    lengths it would raise a TypeError at the first step."""
    import transformers

    class Strict(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, logits_to_keep=0):
            return super().forward(input_ids=input_ids, labels=labels, logits_to_keep=logits_to_keep)

    model = _model(FLASH)
    strict = as_flash(Strict(_model("sdpa").model.config))  # built under SDPA: flash-attn is not installed here
    batch = _batch(1, [13], multiple=16)
    assert set(causal_model_inputs(batch, strict)) == {"input_ids"}
    assert "cu_seq_lens_q" in causal_model_inputs(batch, model.model)


def test_a_one_row_step_under_flash_attention_reads_no_device_value_in_any_layer():
    """Forward and backward of one row: no host read per layer (before: one in each of the 3 layers, transformers'
    packed-sequence check on the position ids). What is left is transformers' one read per forward of the position
    ids in its mask code (``masking_utils.find_packed_sequence_indices``, given no mask and no cache; counted apart
    by ``_count`` as in tests/test_step_sync.py), which it skips while a stream captures (``train.graphs``)."""
    batch = _batch(1, [13], multiple=16)
    with reference_flash() as calls:
        model = _model(FLASH)
        _, device_syncs, cuda_syncs, library_syncs = _count(lambda: model_loss(model, batch).backward())
    assert device_syncs == [] and cuda_syncs == [], device_syncs
    assert len(library_syncs) == 1, library_syncs
    assert calls == [("varlen", 16, 16)] * LAYERS


@pytest.mark.parametrize("lengths", [[13], [40], [16]], ids=["padded", "long", "full"])
def test_a_one_row_step_under_flash_attention_equals_the_sdpa_step(lengths):
    batch = _batch(2, lengths, multiple=16)
    with reference_flash() as calls:
        flash, sdpa = _flash_and_sdpa_steps(batch)
    width = batch["input_ids"].shape[1]
    assert calls == [("varlen", width, width)] * LAYERS
    _assert_same_step(flash, sdpa, rtol=1e-5, atol=1e-5)


def test_two_rows_under_flash_attention_take_the_plain_kernel_as_before():
    """Rows of one batch are not laid end to end: transformers gets input_ids alone, checks nothing per layer for a
    batch of two (its packed-sequence check reads only for one row) and runs flash_attn_func."""
    batch = _batch(3, [13, 9], multiple=16)
    with reference_flash() as calls:
        flash, sdpa = _flash_and_sdpa_steps(batch)
        model = _model(FLASH)
        _, device_syncs, _, _ = _count(lambda: model_loss(model, batch).backward())
    assert calls == [("flash", 16)] * LAYERS * 2 and device_syncs == []
    _assert_same_step(flash, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_flash_attn_on_a_gpu_steps_a_single_row_as_sdpa_does():
    """The real flash-attn (bf16: it takes no fp32) against SDPA, one row: the same loss and gradients to bf16's
    rounding (the two kernels sum in other orders)."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (the flash extra)")
    batch = _batch(4, [45], multiple=16)
    assert set(causal_model_inputs(batch, _model(FLASH).model)) >= {"cu_seq_lens_q", "max_length_q"}
    flash, sdpa = _flash_and_sdpa_steps(batch, "cuda", torch.bfloat16)
    scale = max(float(g.abs().max()) for g in sdpa[1])
    _assert_same_step(flash, sdpa, rtol=2e-2, atol=2e-2 * scale)
