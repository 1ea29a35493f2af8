"""Sequence packing (data.packing): a packed batch gives every example the logits, loss and intervention gradients it
gets alone, for Llama-, Qwen2- and GPT-2-shaped tiny models; rows are first-fit decreasing and depend only on
(seed, step).

Tolerances (fp32 on the CPU): logits atol 1e-5; summed losses and intervention gradients rtol 1e-4, atol 1e-6. The
packed and the solo forwards differ only in the attention kernel's summation (masked vs causal SDPA)."""

import random
import types

import pytest
import torch
import transformers

from reft_fast.core.config import ReftConfig
from reft_fast.core.hf import head_dim_of
from reft_fast.core.model import get_reft_model
from reft_fast.train.data import IGNORE_INDEX, ReftDataCollator, StepSampler
from reft_fast.train.loading import FLEX_ATTENTION_MIN_HEAD_DIM, check_flex_attention_head_dim
from reft_fast.train.loss import to_device
from reft_fast.train.packing import block_causal_mask, pack_rows, packed_model_inputs

from dist.tiny import make_tokenizer
from memory import profiled_peak_bytes

VOCAB = len(make_tokenizer())
LAYERS = [0, 1]  # of 3: every intervention reaches a labelled token
POSITIONS = "f2+l2"  # two-sided without share_weights: the first copy of the layers edits the first positions


def _base(kind: str, attn: str = "sdpa", hidden_size: int = 32):
    """A tiny model: 4 heads of hidden_size / 4 (8 by default)."""
    shape = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden_size, n_layer=3, n_head=4, n_positions=128, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    else:
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
        config = config_class(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **shape)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).float()


def _reft_model(base):
    torch.manual_seed(1)
    representations = [{"layer": layer, "component": "block_output", "low_rank_dimension": 2,
                        "intervention": "LoreftIntervention"} for layer in LAYERS + LAYERS]
    return get_reft_model(base, ReftConfig(representations, positions=POSITIONS, share_weights=False))


def _items(lengths: list[tuple[int, int]], seed: int = 0, label_prompt: bool = False) -> list[dict]:
    """Items of (prompt, response) token counts; labels cover the response (and the prompt when ``label_prompt``)."""
    rng = random.Random(seed)
    items = []
    for prompt, response in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(prompt + response)]
        labels = list(ids) if label_prompt else [IGNORE_INDEX] * prompt + ids[prompt:]
        items.append({"input_ids": ids, "labels": labels, "prompt_length": prompt})
    return items


def _collator(pack_length=None) -> ReftDataCollator:
    return ReftDataCollator(pad_token_id=0, num_interventions=2 * len(LAYERS), positions=POSITIONS,
                            pack_length=pack_length)


def _summed_loss(reft_model, batch: dict):
    """The batch's summed token loss (its mean times its target count) and the last layer's logits (on the CPU)."""
    batch = to_device(batch, next(reft_model.model.parameters()).device)
    if "segment_ids" in batch:
        inputs = packed_model_inputs(batch, reft_model.model)
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    _, out = reft_model(inputs, intervention_locations=batch["intervention_locations"], labels=batch["labels"])
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return out.loss.cpu() * targets, out.logits.cpu()


def _grads(reft_model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in reft_model.trainable_parameters()]
    reft_model.zero_grad(set_to_none=True)
    return grads


def _check_packed_equals_solo(reft_model, items, pack_length):
    batch = _collator(pack_length)(items)
    packed_loss, packed_logits = _summed_loss(reft_model, batch)
    packed_loss.backward()
    packed_grads = _grads(reft_model)

    solo_total = 0.0
    for i, item in enumerate(items):
        solo_loss, solo_logits = _summed_loss(reft_model, _collator()([item]))
        solo_loss.backward()
        solo_total = solo_total + solo_loss.detach()
        row, start = _place(batch, items, i)
        torch.testing.assert_close(packed_logits[row, start: start + len(item["input_ids"])], solo_logits[0],
                                   atol=1e-5, rtol=1e-5)
    solo_grads = _grads(reft_model)
    torch.testing.assert_close(packed_loss.detach(), solo_total, rtol=1e-4, atol=1e-6)
    for packed, solo in zip(packed_grads, solo_grads, strict=True):
        assert solo.abs().max() > 0  # the interventions really take part
        torch.testing.assert_close(packed, solo, rtol=1e-4, atol=1e-6)
    return batch


def _place(batch: dict, items: list[dict], i: int) -> tuple[int, int]:
    """(row, first column) of item i in a packed batch, found by its tokens and restarting position ids."""
    ids = torch.as_tensor(items[i]["input_ids"])
    n = len(ids)
    for row in range(batch["input_ids"].shape[0]):
        for start in range(batch["input_ids"].shape[1] - n + 1):
            if batch["position_ids"][row, start] == 0 and torch.equal(batch["input_ids"][row, start: start + n], ids):
                return row, start
    raise AssertionError(f"item {i} is not in the packed batch")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_packed_batch_gives_each_example_its_solo_logits_loss_and_gradients(kind):
    items = _items([(5, 4), (3, 2), (8, 6), (4, 1), (6, 5), (2, 3)])
    batch = _check_packed_equals_solo(_reft_model(_base(kind)), items, pack_length=20)
    assert batch["input_ids"].shape[0] < len(items)  # several examples did share a row
    # the same examples padded instead: the same mean loss
    reft_model = _reft_model(_base(kind))
    padded = _collator()(items)
    assert torch.isclose(_summed_loss(reft_model, padded)[0], _summed_loss(reft_model, batch)[0], rtol=1e-4)


def test_eager_attention_gets_an_additive_mask_with_the_same_result():
    items = _items([(5, 4), (3, 2), (6, 3)], seed=2)
    _check_packed_equals_solo(_reft_model(_base("llama", attn="eager")), items, pack_length=16)


def test_no_target_crosses_an_example_boundary():
    # Every token labelled (prompt too): the last token of one example would predict the first of the next.
    items = _items([(4, 3), (3, 3), (2, 4)], seed=3, label_prompt=True)
    batch = _check_packed_equals_solo(_reft_model(_base("llama")), items, pack_length=32)
    assert batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)


def test_examples_that_exactly_fill_a_row():
    items = _items([(6, 4), (3, 3), (4, 4), (5, 3)], seed=4)  # 10 + 6 and 8 + 8 tokens: two full rows of 16
    batch = _check_packed_equals_solo(_reft_model(_base("qwen2")), items, pack_length=16)
    assert batch["input_ids"].shape == (2, 16)
    assert bool((batch["segment_ids"] > 0).all())  # no padding at all


def test_examples_cut_at_max_length_pack_as_they_run_alone():
    """Truncation keeps the prompt (it holds the intervened positions) and cuts the response at max_length: such
    an example fills a row of max_length alone, and a packed batch mixing cut and whole examples still gives each
    one its solo loss and gradients. (A prompt longer than max_length − 1 is refused, or dropped with
    data.drop_long_prompts: test_data.py, so the left side is never cut.)"""
    from reft_fast.train.data import SupervisedDataset

    tokenizer = make_tokenizer()
    words = "red green blue cat dog bird fish cow sky sea sun moon tree big small hot".split()
    examples = [{"prompt": "repeat : " + " ".join(words[:4]), "response": " ".join(words)},  # cut
                {"prompt": "repeat : " + " ".join(words[4:7]), "response": " ".join(words[4:7])},  # whole
                {"prompt": "repeat : " + " ".join(words[:7]), "response": " ".join(words * 2)},  # cut
                {"prompt": "repeat : red", "response": "red"}]  # whole
    dataset = SupervisedDataset(examples, tokenizer, max_length=16, chat_template=False)
    items = [dataset[i] for i in range(len(dataset))]
    assert [len(it["input_ids"]) for it in items][::2] == [16, 16]  # the two cut ones end at max_length
    assert all(len(it["input_ids"]) < 16 for it in items[1::2])
    assert [it["prompt_length"] for it in items][::2] == [6, 9]  # the prompt kept whole ("repeat", ":", words)
    batch = _check_packed_equals_solo(_reft_model(_base("llama")), items, pack_length=16)
    assert batch["input_ids"].shape[1] == 16


def test_intervention_positions_are_shifted_to_each_example_place():
    items = _items([(5, 4), (6, 2), (4, 4)], seed=5)
    batch = _collator(pack_length=30)(items)
    assert batch["input_ids"].shape == (1, 25)
    # first-fit decreasing order: 9, 8, 8 tokens (ties in the given order) at offsets 0, 9, 17
    first_half, last_half = batch["intervention_locations"][0, 0], batch["intervention_locations"][2, 0]
    assert first_half.tolist() == [0, 1, 9, 10, 17, 18]  # "f2" of prompts 5, 6, 4 at their offsets
    assert last_half.tolist() == [3, 4, 13, 14, 19, 20]  # "l2": the last two prompt tokens of each
    assert batch["position_ids"][0].tolist() == list(range(9)) + list(range(8)) + list(range(8))


def test_given_locations_past_an_item_are_refused_when_packing():
    """Items' own locations (pyreft's dataset format) are shifted to the item's place in the row: one past the
    item's last token would edit the next example (or point past the row), so it is refused by name."""
    items = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3], "intervention_locations": [[0, 3]]},
             {"input_ids": [4, 5, 6, 7, 8], "labels": [IGNORE_INDEX, 5, 6, 7, 8], "intervention_locations": [[0, 4]]}]
    collator = ReftDataCollator(pad_token_id=0, num_interventions=1, pack_length=16)
    with pytest.raises(ValueError, match="item 0: intervention location 3 is past its 3 tokens"):
        collator(items)
    items[0]["intervention_locations"] = [[0, 2]]
    assert collator(items)["intervention_locations"].tolist() == [[[0, 4, 5, 7]]]  # the 5-token item first


def test_pack_rows_first_fit_decreasing_and_its_errors():
    assert pack_rows([3, 7, 5, 5, 2], capacity=10) == [[1, 0], [2, 3], [4]]
    assert pack_rows([10, 10], capacity=10) == [[0], [1]]
    with pytest.raises(ValueError, match="more than the packed row length 8"):
        pack_rows([3, 9], capacity=8)


def test_the_additive_mask_rows_are_aligned_for_cuda_sdpa():
    """An odd row length still gives mask rows that start at multiples of 16 elements, with the block mask's values."""
    base = _base("llama")
    segments = torch.tensor([[1] * 7 + [2] * 9 + [0] * 5])
    mask = packed_model_inputs({"input_ids": torch.zeros_like(segments), "position_ids": torch.zeros_like(segments),
                                "segment_ids": segments}, base)["attention_mask"]
    assert mask.shape == (1, 1, 21, 21) and mask.stride()[:-1] == (21 * 32, 21 * 32, 32) and mask.dtype == torch.float32
    assert torch.equal(mask == 0, block_causal_mask(segments))
    assert torch.all(mask[mask != 0] == torch.finfo(torch.float32).min)


def test_block_causal_mask_keeps_segments_apart_and_padding_to_itself():
    mask = block_causal_mask(torch.tensor([[1, 1, 2, 2, 0]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_a_packed_step_keeps_one_mask_for_all_layers():
    """SDPA given a boolean mask converts it to the query's dtype at every call, and each layer keeps its copy for
    backward (1.1 MiB per layer here). The additive mask is made once and shared: what a packed step takes beyond a
    padded one of the same shape is that mask (1.1 MiB) and the boolean one it is made from, whatever the number of
    layers."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    base.requires_grad_(False).get_input_embeddings().weight.requires_grad_(True)
    rows, length = 2, 384
    ids = torch.randint(3, VOCAB, (rows, length))
    halves = torch.arange(length) // (length // 2)
    packed = {"input_ids": ids, "position_ids": (torch.arange(length) % (length // 2)).expand(rows, length),
              "segment_ids": (halves + 1).expand(rows, length)}

    def packed_step():
        base(**packed_model_inputs(packed, base), labels=ids, use_cache=False).loss.backward()

    def padded_step():
        base(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()

    mask = packed_model_inputs(packed, base)["attention_mask"]
    assert mask.shape == (rows, 1, length, length) and mask.stride(-2) % 16 == 0  # CUDA SDPA would copy it if not
    packed_step(), padded_step()  # the embeddings' gradient exists in both measured steps
    extra = profiled_peak_bytes(packed_step) - profiled_peak_bytes(padded_step)
    additive, boolean = rows * length * length * 4, rows * length * length
    assert extra <= 1.25 * (additive + boolean), extra / 2**20


# A flash-like attention in plain torch: the varlen contract of flash_attn_varlen_func (the rows laid end to end, cut
# at cu_seq_lens, each segment causal on its own), registered with flash attention's masks (as transformers registers
# a flash kernel it loads from the hub).
VARLEN_REFERENCE = "varlen_reference"
_varlen_calls = []


def _varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    assert attention_mask is None, "no padding in these batches: flash attention's mask is None"
    batch, heads, seq_len, dim = query.shape
    if "cu_seq_lens_q" in kwargs:
        bounds = kwargs["cu_seq_lens_q"].tolist()
        assert torch.equal(kwargs["cu_seq_lens_k"], kwargs["cu_seq_lens_q"])
        assert kwargs["max_length_q"] == max(b - a for a, b in zip(bounds, bounds[1:]))
        _varlen_calls.append(bounds)
    else:  # an unpacked batch: each row one causal sequence
        bounds = [row * seq_len for row in range(batch + 1)]
    flat = lambda t: t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], dim).transpose(0, 1)  # noqa: E731
    q, k, v = flat(query), flat(key), flat(value)  # [heads, B·T, dim]
    k, v = (t.repeat_interleave(heads // t.shape[0], dim=0) for t in (k, v))
    pieces = [torch.nn.functional.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True,
                                                               scale=scaling)
              for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == batch * seq_len  # every token in exactly one segment
    return torch.cat(pieces, dim=1).transpose(0, 1).reshape(batch, seq_len, heads, dim), None


@pytest.fixture
def varlen_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN_REFERENCE, _varlen_reference_attention)
    AttentionMaskInterface.register(VARLEN_REFERENCE, flash_attention_mask)
    _varlen_calls.clear()
    yield _varlen_calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_flash_attention_gets_varlen_lengths_and_each_example_its_solo_result(varlen_reference, kind):
    items = _items([(5, 4), (3, 2), (8, 6), (4, 1), (6, 5)], seed=6)
    batch = _collator(pack_length=20)(items)
    assert packed_model_inputs(batch, _base(kind, attn=VARLEN_REFERENCE)).keys() >= {"cu_seq_lens_q", "max_length_q"}
    _check_packed_equals_solo(_reft_model(_base(kind, attn=VARLEN_REFERENCE)), items, pack_length=20)
    packed_calls = list(varlen_reference)
    assert packed_calls, "the packed forward reached the varlen attention"
    # the segments: each example, then each row's padding, the rows laid end to end
    width = batch["input_ids"].shape[1]
    expected = [0]
    for row in batch["segment_ids"]:
        for segment in row.unique_consecutive():
            expected.append(expected[-1] + int((row == segment).sum()))
    assert batch["cu_seq_lens"].tolist() == expected and expected[-1] == batch["input_ids"].numel()
    assert batch["max_segment_length"] == max(b - a for a, b in zip(expected, expected[1:])) <= width
    assert all(bounds == expected for bounds in packed_calls)


@pytest.mark.cuda
def test_flex_attention_document_mask_gives_each_example_its_solo_result():
    """flex_attention compiles its kernels (about 50 s on a 2-core CPU): run on CUDA. Heads 16 wide, the narrowest
    torch's GPU kernel for flex attention takes (``FLEX_ATTENTION_MIN_HEAD_DIM``; the default 8 failed to compile)."""
    items = _items([(5, 4), (3, 2), (6, 3)], seed=7)
    batch = _collator(pack_length=16)(items)
    base = _base("llama", attn="flex_attention", hidden_size=4 * FLEX_ATTENTION_MIN_HEAD_DIM).cuda()
    assert head_dim_of(base.config) == FLEX_ATTENTION_MIN_HEAD_DIM
    assert "attention_mask" not in packed_model_inputs(batch, base)
    _check_packed_equals_solo(_reft_model(base), items, pack_length=16)


def test_flex_attention_on_a_gpu_refuses_heads_narrower_than_16(tmp_path, monkeypatch):
    """torch's GPU kernel for flex attention fails to compile for heads under 16 wide (every forward, packed or not):
    the base's loader refuses it first, naming the setting and the head dim, before any weight is read; on the CPU
    any head dim runs. The device is the one the rank will run on (a GPU here, whatever this machine has)."""
    from reft_fast.train import loading
    from reft_fast.train.train_config import ConfigError, config_from_dict

    _base("llama").save_pretrained(tmp_path / "narrow")  # heads 8 wide
    _base("llama", hidden_size=64).save_pretrained(tmp_path / "wide")  # heads 16 wide

    def cfg(model: str, attn: str = "flex_attention"):
        return config_from_dict({"model": {"path": str(tmp_path / model), "attn_implementation": attn,
                                           "dtype": "float32"}, "data": {"packing": True}})

    assert head_dim_of(transformers.AutoConfig.from_pretrained(tmp_path / "narrow")) == 8
    monkeypatch.setattr(loading, "_this_rank_device", lambda: "cuda:0")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights read before the head dim was checked"))
    with pytest.raises(ConfigError, match=r"model.attn_implementation: flex_attention on cuda needs a head dim of "
                                          r"at least 16 .* has head dim 8: use sdpa or eager"):
        loading.load_base_model(str(tmp_path / "narrow"), cfg("narrow"))
    narrow_config = transformers.AutoConfig.from_pretrained(tmp_path / "narrow")
    for accepted in [(cfg("wide"), transformers.AutoConfig.from_pretrained(tmp_path / "wide"), "cuda:0"),
                     (cfg("narrow"), narrow_config, "cpu"), (cfg("narrow", "sdpa"), narrow_config, "cuda")]:
        check_flex_attention_head_dim(*accepted)  # no error


def test_packing_refuses_an_attention_that_ignores_the_mask():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("sdpa_unmasked_custom", sdpa_attention_forward)
    base = _base("llama")
    base.config._attn_implementation = "sdpa_unmasked_custom"
    batch = _collator(pack_length=16)(_items([(3, 2), (4, 2)]))
    with pytest.raises(ValueError, match="data.packing needs model.attn_implementation"):
        packed_model_inputs(batch, base)


def test_same_seed_packs_the_same_rows():
    rng = random.Random(7)
    items = _items([(rng.randint(2, 9), rng.randint(1, 9)) for _ in range(40)], seed=7)

    def rows_of(seed: int, step: int) -> dict:
        sampler = StepSampler(len(items), micro_batch_size=8, world_size=1, accumulation=2, seed=seed)
        return _collator(pack_length=24)([items[i] for i in sampler.indices(step, 1, 0)])

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(a[k] == b[k] if isinstance(a[k], int) else
                                            a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)

    assert same(rows_of(3, 1), rows_of(3, 1))
    assert not same(rows_of(3, 1), rows_of(4, 1))
    assert not same(rows_of(3, 1), rows_of(3, 2))


def test_recipe_with_packing_follows_the_padded_loss_trajectory(tmp_path):
    # One process, ZeRO 0, CPU: the same examples per micro-batch, so the same losses step by step, in fewer slots.
    import json
    import subprocess
    import sys

    from dist.tiny import ROOT, make_run, subprocess_env

    def run(name: str, *overrides: str) -> list[dict]:
        config = make_run(tmp_path / name, n_examples=40)
        args = [sys.executable, "-m", "reft_fast", "train", str(config), "training.max_steps=4",
                "training.global_batch_size=8", "training.log_every=2", "data.eval_fraction=0.2", *overrides]
        proc = subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return [json.loads(line) for line in (tmp_path / name / "out" / "metrics.jsonl").read_text().splitlines()]

    padded, packed = run("padded"), run("packed", "data.packing=true")
    assert [r["step"] for r in packed] == [r["step"] for r in padded] == [0, 1, 2, 3, 4]
    for got, want in zip(packed, padded):
        for key in ("loss", "eval_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key)
    train_rows = [(p, q) for p, q in zip(packed, padded) if "loss" in q]
    assert all(p["packing_efficiency"] > q["packing_efficiency"] for p, q in train_rows)
    assert all(0 < p["packing_efficiency"] <= 1 for p, _ in train_rows)


@pytest.mark.parametrize("config, window", [
    (transformers.MistralConfig(sliding_window=16), 16),
    (transformers.MistralConfig(sliding_window=None), None),
    (transformers.Qwen2Config(use_sliding_window=False, sliding_window=16), None),
    (transformers.Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=0), 16),
    (transformers.Gemma2Config(sliding_window=16), 16),
    (transformers.LlamaConfig(), None),
], ids=["mistral", "mistral-no-window", "qwen2-off", "qwen2-on", "gemma2", "llama"])
def test_the_sliding_window_is_read_from_the_model_config(config, window):
    from reft_fast.train.packing import sliding_window_of

    assert sliding_window_of(config) == window


@pytest.mark.parametrize("config, windowed", [
    (transformers.MistralConfig(sliding_window=16, num_hidden_layers=3), [True] * 3),
    (transformers.Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=2, num_hidden_layers=3),
     [False, False, True]),
    (transformers.LlamaConfig(num_hidden_layers=3), [False] * 3),
], ids=["mistral", "qwen2-from-layer-2", "llama"])
def test_the_windowed_layers_are_read_from_the_layer_types(config, windowed):
    from reft_fast.train.packing import windowed_layers

    assert windowed_layers(config, 3) == windowed


def test_a_router_loss_named_only_by_the_text_config_keeps_the_padding_mask():
    """A multimodal model whose language model adds a router loss says so on its text config: its causal batches keep
    their padding mask (the loss averages over real tokens), and a replayed step gives it no shared mask. Read on the
    top config alone, such a model got neither."""
    from reft_fast.train.loss import causal_model_inputs
    from reft_fast.train.packing import replay_shares_one_mask

    config = transformers.AutoConfig.for_model(
        "llava", text_config={"model_type": "mixtral", "output_router_logits": True, "num_hidden_layers": 2})
    assert not getattr(config, "output_router_logits", False)
    base = types.SimpleNamespace(config=config)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    assert "attention_mask" in causal_model_inputs(batch, base)
    assert not replay_shares_one_mask(config, "sdpa", padding_mask=False)
    config.text_config.output_router_logits = False
    assert "attention_mask" not in causal_model_inputs(batch, base)
    assert replay_shares_one_mask(config, "sdpa", padding_mask=False)


@pytest.mark.parametrize("attention, max_length, refused", [("sdpa", 32, True), ("eager", 32, True),
                                                             ("sdpa", 16, False), ("flex_attention", 32, False)])
def test_block_masked_packing_is_refused_beyond_the_models_window(tmp_path, attention, max_length, refused):
    """Packed rows under SDPA or eager attention get one block-diagonal causal mask, which transformers hands every
    layer unchanged: a layer that attends within a window of 16 tokens would see further in rows of 32 (a silent
    change of the model). Within the window, or where the attention builds its own masks, packing goes on."""
    import yaml

    from reft_fast.train.train_config import ConfigError, load_config, validate

    transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               sliding_window=16).save_pretrained(tmp_path / "model")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tmp_path / "model"), "attn_implementation": attention},
        "interventions": {"layers": [0]}, "data": {"train_file": "t.jsonl", "packing": True, "max_length": max_length},
        "training": {"micro_batch_size": 2, "max_steps": 1}}))
    cfg = load_config(str(config))
    if refused:
        with pytest.raises(ConfigError, match=r"^data.packing: the model's layers attend within a window of 16 "
                                              r"tokens.*data.max_length = 32"):
            validate(cfg, check_data=False)
    else:
        validate(cfg, check_data=False)
