"""training.cuda_graphs: each micro-batch's forward and backward replayed from a graph of its batch layout
(reft_fast.train.graphs).

A CUDA graph cannot be captured on this CPU. What a capture does to the step's Python is emulated instead by
``capture_stand_in.traced_capture`` (tests/capture_stand_in.py: a make_fx trace with every Python value frozen and
every value read and device synchronize refused, handing out its loss and gradients from buffers of its own). A step
whose Python followed a batch's values (a location read on the host, a length turned into an int) fails the trace or
gives another batch the traced batch's result, which these tests compare with an eager step over each batch. The real
capture runs in the cuda-marked tests at the end.
"""

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capture_stand_in import traced_capture, values_on_the_device
from dist.tiny import make_run, subprocess_env
from flash_reference import as_flash, reference_flash
from reft_fast.train.data import ReftDataCollator
from reft_fast.train.fused_base import FUSED_OPS, fused_ops_wanted
from reft_fast.train.graphs import CapturedLoss, batch_layout, plan_layouts
from reft_fast.train.loss import model_loss, trim_to_labels

ROOT = Path(__file__).resolve().parents[1]
RUN_TRAIN = str(ROOT / "tests" / "dist" / "run_train.py")
VOCAB, N_INTERVENTIONS = 96, 2


@pytest.fixture
def device_locations():
    with values_on_the_device():
        yield


def _model(seed: int = 0, family: str = "llama", backend: str = "torch", **config_options):
    import transformers

    from reft_fast.core.config import ReftConfig
    from reft_fast.core.model import get_reft_model

    torch.manual_seed(seed)
    prefix = {"llama": "Llama", "mistral": "Mistral"}[family]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa", **config_options)
    base = getattr(transformers, f"{prefix}ForCausalLM")(config)
    base.requires_grad_(False)
    reft_config = ReftConfig(representations=[{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
                                                "intervention": "loreft"} for layer in range(N_INTERVENTIONS)])
    return get_reft_model(base, reft_config, backend=backend)


def _items(seed: int, lengths: list[int]) -> list[dict]:
    """Collator items: random tokens, the second half of each labelled, prompt lengths for f2+l2 positions."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        prompt = n // 2
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_length": prompt})
    return items


def _batch(seed: int, lengths: list[int], multiple=None, trim=False) -> dict:
    collate = ReftDataCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f2+l2",
                               pad_to_multiple_of=multiple)
    batch = collate(_items(seed, lengths))
    return trim_to_labels(batch, multiple) if trim else batch


def _loss_and_grads(loss, params):
    return float(loss.detach()), [g.clone() for g in torch.autograd.grad(loss, params)]


def _assert_same_step(got, expected, atol=1e-6):
    assert got[0] == pytest.approx(expected[0], abs=atol)
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_each_batch_replays_its_own_step_not_the_captured_ones(device_locations):
    model = _model()
    params = model.trainable_parameters()
    captured = CapturedLoss(model, params, "cpu", max_shapes=2, capture=traced_capture)
    # two layouts (rows of 16 and of 32 tokens after padding to 16), each met again with other tokens and positions
    plan = [(1, [9, 13, 16]), (2, [20, 31, 25]), (3, [11, 7, 14]), (4, [30, 18, 22]), (5, [16, 5, 12])]
    for seed, lengths in plan:
        batch = _batch(seed, lengths, multiple=16, trim=True)
        expected = _loss_and_grads(model_loss(model, batch), params)
        _assert_same_step(_loss_and_grads(captured(batch), params), expected)
        assert all(not p.grad.any() for p in params)  # nothing accumulated but what the caller's backward does
    assert len(captured.graphs) == 2 and captured.replayed_micro_steps == 5 and captured.eager_micro_steps == 0
    assert all(graph.checked for graph in captured.graphs.values())


def test_gradients_accumulate_over_replayed_micro_batches(device_locations):
    """Three micro-batches of one layout (the capture, the checked replay, a replay), each backpropagated as the
    recipe does, from gradients set to None: the sum of the three eager gradients. (The replay hands autograd its
    static gradient buffers: taken as the .grad, the next replay would overwrite it before adding.)"""
    model = _model()
    params = model.trainable_parameters()
    batches = [_batch(seed, [9, 13, 16], multiple=16) for seed in (1, 2, 3)]
    for batch in batches:
        model_loss(model, batch).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    captured = CapturedLoss(model, params, "cpu", max_shapes=1, capture=traced_capture)
    for batch in batches:
        captured(batch).backward()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-6)


def test_a_padded_batch_replays_as_one_segment_whose_fixed_tensors_are_copied_once(device_locations):
    """Under SDPA a padded batch gets segment ids of ones and positions 0…T−1 (one additive mask for all layers): the
    layout determines them, so only the collated tensors are copied into the graph at each step (the added ones are
    pageable: copying them would make the host wait for the device)."""
    from reft_fast.train.graphs import _Graph

    model = _model()
    captured = CapturedLoss(model, model.trainable_parameters(), "cpu", max_shapes=1, capture=traced_capture)
    captured(_batch(1, [9, 13, 16], multiple=16))
    [graph] = captured.graphs.values()
    key = next(iter(captured.graphs))
    # the padding mask is no input: the segments replace it, and an unread input would still be copied at every step
    assert [name for name, _, _ in key[0]] == ["input_ids", "intervention_locations", "labels", "position_ids",
                                              "segment_ids"]
    inputs = tuple(torch.zeros(2) for _ in range(3))
    fake = _Graph(loss=None, inputs=inputs, module=None)
    CapturedLoss._copy_in(fake, {"a": torch.ones(2), "position_ids": torch.ones(2), "segment_ids": torch.ones(2)},
                          ("a", "position_ids", "segment_ids"), ("position_ids", "segment_ids"))
    assert [float(t.sum()) for t in inputs] == [2.0, 0.0, 0.0]


def test_an_eager_micro_batch_gets_its_segments_made_on_its_device():
    """A layout run eagerly (not captured): the segment ids and positions are made where its tensors went, not
    copied from pageable host memory (a copy that waits for the device)."""
    from reft_fast.train.graphs import _as_one_segment

    batch = _batch(1, [9, 13], multiple=16)
    on_meta = _as_one_segment({k: v.to("meta") for k, v in batch.items()})
    assert {v.device.type for v in on_meta.values()} == {"meta"} and "attention_mask" not in on_meta
    made = []
    model = _model()
    captured = CapturedLoss(model, model.trainable_parameters(), "cpu", max_shapes=1, capture=traced_capture)
    captured.capture_only([])  # nothing captured: every micro-batch eager
    real = _as_one_segment
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("reft_fast.train.graphs._as_one_segment", lambda b: made.append(dict(b)) or real(b))
        _assert_same_step(_loss_and_grads(captured(batch), model.trainable_parameters()),
                          _loss_and_grads(model_loss(model, batch), model.trainable_parameters()))
    # once for the layout's key (on the host batch), once more for the moved tensors, without the host-made ones
    assert len(made) == 2 and "segment_ids" not in made[1] and captured.eager_micro_steps == 1


def test_a_windowed_model_keeps_its_window_when_replayed(device_locations):
    """Layers that attend within a window (Mistral's sliding_window, 8 tokens here, rows of 32) must not get the one
    causal mask of a segment: transformers builds their masks (while a stream captures too)."""
    model = _model(family="mistral", sliding_window=8)
    params = model.trainable_parameters()
    captured = CapturedLoss(model, params, "cpu", max_shapes=1, capture=traced_capture)
    for seed in (1, 2):
        batch = _batch(seed, [20, 31, 25], multiple=16)
        expected = _loss_and_grads(model_loss(model, batch), params)
        _assert_same_step(_loss_and_grads(captured(batch), params), expected)
    key = next(iter(captured.graphs))
    assert "segment_ids" not in [name for name, _, _ in key[0]]


def test_a_step_that_draws_random_numbers_is_not_compared_and_says_so(device_locations, caplog):
    """Dropout in the base: a replay and an eager pass draw different masks, so the check would report a difference
    that is none; it says why it did not compare instead, and training goes on."""
    model = _model(attention_dropout=0.2)
    captured = CapturedLoss(model, model.trainable_parameters(), "cpu", max_shapes=1, capture=traced_capture)
    with caplog.at_level(logging.WARNING, logger="reft_fast.train.graphs"):
        for seed in (1, 2, 3):
            loss = captured(_batch(seed, [9, 13, 16], multiple=16))
            assert torch.isfinite(loss)
    assert captured.checks == ["not compared: the step draws random numbers (dropout in the base), which a replay "
                               "and an eager pass draw differently"]
    assert any("not compared" in r.getMessage() for r in caplog.records)


def test_padding_to_a_multiple_changes_no_loss_or_gradient():
    model = _model()
    params = model.trainable_parameters()
    for seed, lengths in [(1, [9, 13, 15]), (2, [20, 31, 25])]:
        plain = _loss_and_grads(model_loss(model, _batch(seed, lengths, trim=True)), params)
        padded_batch = _batch(seed, lengths, multiple=16, trim=True)
        assert padded_batch["input_ids"].shape[1] % 16 == 0
        assert padded_batch.get("logits_to_keep", 16) % 16 == 0
        _assert_same_step(_loss_and_grads(model_loss(model, padded_batch), params), plain, atol=1e-5)


def test_padding_to_a_multiple_stops_at_max_length():
    """Rows of 33 tokens padded to 64 would pass data.max_length 40: a model whose learned positions end there would
    index past them. The padding stops at max_length (packed rows at their length)."""
    capped = ReftDataCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f2+l2",
                              pad_to_multiple_of=64, max_length=40)
    assert capped(_items(0, [33, 20]))["input_ids"].shape == (2, 40)
    assert capped(_items(0, [13, 20]))["input_ids"].shape == (2, 40)
    packed = ReftDataCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f2+l2",
                              pad_to_multiple_of=64, pack_length=32)
    assert packed(_items(0, [13, 10]))["input_ids"].shape == (1, 32)
    uncapped = ReftDataCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f2+l2",
                                pad_to_multiple_of=64)
    assert uncapped(_items(0, [33, 20]))["input_ids"].shape == (2, 64)


def test_the_kept_logits_round_up_to_the_multiple_and_the_layouts_stay_few():
    keys = {batch_layout(_batch(seed, lengths, multiple=16, trim=True))[0]
            for seed in range(12) for lengths in ([9, 13, 15], [11, 16, 3], [6, 7, 12])}
    # every length pads to 16; half of each example is labelled, so 16 − (first labelled) + 1 rounds up to 16: no trim
    assert len(keys) == 1, keys
    batch = _batch(0, [40, 34, 38], multiple=16, trim=True)
    assert batch["input_ids"].shape[1] == 48 and batch["logits_to_keep"] == 32 and batch["labels"].shape[1] == 32


def test_layouts_beyond_the_limit_run_eagerly_and_say_so_once(device_locations, caplog):
    model = _model()
    params = model.trainable_parameters()
    captured = CapturedLoss(model, params, "cpu", max_shapes=1, capture=traced_capture)
    with caplog.at_level(logging.WARNING, logger="reft_fast.train.graphs"):
        for seed, lengths in [(1, [9, 13]), (2, [20, 31]), (3, [30, 18]), (4, [5, 12])]:
            batch = _batch(seed, lengths, multiple=16)
            _assert_same_step(_loss_and_grads(captured(batch), params),
                              _loss_and_grads(model_loss(model, batch), params))
    assert len(captured.graphs) == 1 and captured.replayed_micro_steps == 2 and captured.eager_micro_steps == 2
    said = [r.getMessage() for r in caplog.records if "run eagerly" in r.getMessage()]
    assert len(said) == 1 and "input_ids 2×32" in said[0], said


def test_a_plan_captures_its_layouts_only_and_runs_the_others_eagerly_without_a_warning(device_locations, caplog):
    model = _model()
    params = model.trainable_parameters()
    captured = CapturedLoss(model, params, "cpu", max_shapes=1, capture=traced_capture)
    plan_of = [(1, [9, 13]), (2, [20, 31]), (3, [30, 18]), (4, [5, 12]), (5, [25, 17])]  # layouts 16, 32, 32, 16, 32
    plan = plan_layouts((captured.layout_key(_batch(seed, lengths, multiple=16)) for seed, lengths in plan_of),
                        max_shapes=1)
    assert plan.counted == plan.total == 5 and sorted(plan.counts.values()) == [2, 3] and plan.covered == 0.6
    assert plan.summary() == {"layouts": 2, "counted": 5, "covered": 0.6}
    captured.capture_only(plan.chosen)
    with caplog.at_level(logging.WARNING, logger="reft_fast.train.graphs"):
        for seed, lengths in plan_of:
            batch = _batch(seed, lengths, multiple=16)
            _assert_same_step(_loss_and_grads(captured(batch), params),
                              _loss_and_grads(model_loss(model, batch), params))
    assert list(captured.graphs) == plan.chosen and captured.graphs[plan.chosen[0]].module.names[0] == "input_ids"
    assert captured.replayed_micro_steps == 3 and captured.eager_micro_steps == 2
    assert not [r for r in caplog.records if "run eagerly" in r.getMessage()]
    with pytest.raises(ValueError, match="2 layouts to capture, more than max_shapes=1"):
        captured.capture_only(plan.counts)


def test_a_plan_of_equally_frequent_layouts_keeps_the_first_met_and_says_what_replays():
    plan = plan_layouts(["b", "a", "a", "b", "c"], max_shapes=2, total=9)
    assert plan.chosen == ["b", "a"] and plan.covered == 0.8
    said = plan.describe(64)
    assert said.startswith("the first 5 of 9 micro-batches this rank trains fall into 3 batch layouts; the 2 most "
                           "frequent are captured and replay 80% of them, the rest run eagerly") and "now 64" in said
    assert plan_layouts(["a", "a"], max_shapes=4).describe(64) == (
        "the 2 micro-batches this rank trains fall into 1 batch layout; the 1 most frequent are captured and replay "
        "100% of them")


def test_a_replay_that_keeps_the_captured_batch_is_caught_on_the_next_batch(device_locations):
    def capture_that_keeps_its_inputs(module, sample_args, **_):
        kept = tuple(a.clone() for a in sample_args)
        return lambda *args: module(*kept)

    model = _model()
    captured = CapturedLoss(model, model.trainable_parameters(), "cpu", max_shapes=2,
                            capture=capture_that_keeps_its_inputs)
    captured(_batch(1, [9, 13, 16], multiple=16))  # the captured batch itself: nothing to tell apart yet
    with pytest.raises(RuntimeError, match=r"differs from the eager step over the same batch: \|Δloss\| = .*"
                                           r"training.cuda_graphs: false"):
        captured(_batch(2, [11, 7, 14], multiple=16))


def test_a_host_read_inside_the_step_fails_the_capture_naming_the_layout():
    # Without device_locations the model checks its (CPU) locations' values inside the step: a read the trace
    # refuses, as a capturing CUDA stream does.
    model = _model()
    captured = CapturedLoss(model, model.trainable_parameters(), "cpu", max_shapes=2, capture=traced_capture)
    with pytest.raises(RuntimeError, match=r"capturing the step of batch layout input_ids 3×16, "
                                           r"intervention_locations 2×3×2, labels 3×16, position_ids 3×16, "
                                           r"segment_ids 3×16 failed .*cuda_graphs: false"):
        captured(_batch(1, [9, 13, 16], multiple=16))


def test_bad_locations_are_refused_on_the_host_before_any_replay(device_locations):
    model = _model()
    captured = CapturedLoss(model, model.trainable_parameters(), "cpu", max_shapes=2, capture=traced_capture)
    batch = _batch(1, [9, 13, 16], multiple=16)
    batch["intervention_locations"][0, 1, 0] = 16  # past the row
    with pytest.raises(ValueError, match="intervention_locations"):
        captured(batch)
    assert not captured.graphs


def test_a_device_other_than_cuda_is_refused_without_a_stand_in_capture():
    model = _model()
    with pytest.raises(ValueError, match="needs a CUDA device; this rank trains on cpu"):
        CapturedLoss(model, model.trainable_parameters(), "cpu", max_shapes=2)


def test_fused_ops_auto_leaves_the_fused_cross_entropy_out_of_a_captured_step():
    assert fused_ops_wanted("auto", compiled_layers=False, captured=True) == ("rope", "rms_norm", "swiglu")
    assert fused_ops_wanted("auto", compiled_layers=True, captured=True) == ("rms_norm",)
    assert fused_ops_wanted("on", compiled_layers=False, captured=True) == FUSED_OPS


@pytest.mark.parametrize("overrides, why", [
    (["deepspeed.stage=2"], "deepspeed.stage 2"),
    (["deepspeed.config.zero_optimization.stage=1"], "deepspeed.stage 1"),
    (["training.gradient_checkpointing=true"], "training.gradient_checkpointing"),
    (["model.compile=true"], "model.compile"),
    (["interventions.dropout=0.05"], "interventions.dropout 0.05"),
    (["interventions.orthogonalization=polar"], "interventions.orthogonalization polar"),
    (["deepspeed.config.torch_autocast={enabled: true}"], "deepspeed.config.torch_autocast"),
    (["deepspeed.config.wall_clock_breakdown=true"], "deepspeed.config flops_profiler, wall_clock_breakdown"),
    (["deepspeed.config.flops_profiler={enabled: true}"], "deepspeed.config flops_profiler, wall_clock_breakdown"),
    (["deepspeed.config.timers={throughput: {enabled: true}}"], "deepspeed.config flops_profiler, wall_clock"),
    (["model.fused_ops=on"], "model.fused_ops on"),
    (["data.packing=true", "model.attn_implementation=flex_attention"], "data.packing with"),
])
def test_what_a_replay_cannot_hold_is_refused_with_the_config(tmp_path, overrides, why):
    from reft_fast.train.train_config import ConfigError, load_config, validate

    config = make_run(tmp_path)
    with pytest.raises(ConfigError, match=f"^training.cuda_graphs: {why}"):  # (flash-attn is not installed here)
        validate(load_config(str(config), ["training.cuda_graphs=true", *overrides]), check_data=False)


def test_flash_attention_with_one_row_per_micro_batch_is_captured(tmp_path):
    """Accepted now that a single row reaches flash attention as varlen lengths made on the device
    (``loss.one_row_varlen_inputs``): transformers reads no position ids in its layers then, and skips its one read
    per forward while a stream captures. (flash-attn itself is checked only where a run reads the data.)"""
    from reft_fast.train.train_config import load_config, validate

    for implementation in ("flash_attention_2", "flash_attention_3"):
        cfg = load_config(str(make_run(tmp_path)), ["training.cuda_graphs=true", "training.micro_batch_size=1",
                                                    f"model.attn_implementation={implementation}"])
        validate(cfg, check_data=False)
        assert cfg.training.cuda_graphs and cfg.training.micro_batch_size == 1


def test_a_padding_mask_under_flash_attention_is_refused_with_the_config(tmp_path):
    """A classifier's padding mask, or a router loss's, makes transformers read the mask on the host under flash
    attention (the first capture failed, after the model had loaded): refused when the model's config is read."""
    from test_classification import make_run as classification_run, sentiment_rows

    from reft_fast.train.train_config import ConfigError, load_config, validate

    flash = ["training.cuda_graphs=true", "model.attn_implementation=flash_attention_2"]
    config = classification_run(tmp_path / "classifier", sentiment_rows(8))
    with pytest.raises(ConfigError, match="^training.cuda_graphs: task classification keeps its padding mask"):
        validate(load_config(str(config), flash), check_data=False)
    validate(load_config(str(config), flash[:1]), check_data=False)  # sdpa: the mask is built on the device

    config = make_run(tmp_path / "moe")
    model_config = tmp_path / "moe" / "model" / "config.json"
    model_config.write_text(json.dumps({**json.loads(model_config.read_text()), "output_router_logits": True}))
    with pytest.raises(ConfigError, match=r"^training.cuda_graphs: the model's router loss \(output_router_logits"):
        validate(load_config(str(config), flash), check_data=False)


def test_one_row_under_flash_attention_replays_each_batch_its_own_step(device_locations):
    """One row per micro-batch through transformers' flash attention path (plain-torch kernels on the CPU,
    tests/flash_reference.py): the stand-in capture, which refuses any value read, traces it, and each batch of the
    layout replays its own step. Before, transformers read the position ids in every layer: the capture failed."""
    with reference_flash() as calls:
        model = as_flash(_model())
        params = model.trainable_parameters()
        captured = CapturedLoss(model, params, "cpu", max_shapes=1, capture=traced_capture)
        for seed, length in [(1, 13), (2, 16), (3, 9), (4, 11)]:
            batch = _batch(seed, [length], multiple=16, trim=True)
            expected = _loss_and_grads(model_loss(model, batch), params)
            _assert_same_step(_loss_and_grads(captured(batch), params), expected)
    assert len(captured.graphs) == 1 and captured.replayed_micro_steps == 4 and captured.eager_micro_steps == 0
    assert set(calls) == {("varlen", 16, 16)}


@pytest.mark.parametrize("override, field", [("training.cuda_graph_shapes=0", "training.cuda_graph_shapes"),
                                             ("data.pad_to_multiple_of=0", "data.pad_to_multiple_of"),
                                             ("data.pad_to_multiple_of=true", "data.pad_to_multiple_of")])
def test_bad_graph_settings_are_named(tmp_path, override, field):
    from reft_fast.train.train_config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=f"^{field}:"):
        validate(load_config(str(make_run(tmp_path)), [override]))


def _recipe_run(folder: Path, recipe_class, *overrides: str):
    """(losses, grad norms, the final interventions' tensors, the recipe) of a tiny stage-0 run with accumulation 2
    and clipping, trained in this process."""
    from safetensors.torch import load_file

    from reft_fast.train.train_config import load_config

    config = make_run(folder, n_examples=24)
    cfg = load_config(str(config), ["training.max_steps=4", "training.global_batch_size=8", "data.eval_fraction=0",
                                    "training.max_grad_norm=0.05", f"output_dir={folder / 'out'}", *overrides])
    recipe = recipe_class(cfg)
    recipe.run()
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    final = load_file(str(folder / "out" / "final" / "interventions.safetensors"))
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], final, recipe


def _traced_recipe(batch_seconds: float = 0.0):
    """The recipe with the stand-in capture (on a GPU the accelerator is CUDA and the capture torch's), recording at
    each capture whether the batch thread had built every batch it was given, and the engine's step; each host batch
    takes ``batch_seconds`` more to build."""
    from reft_fast.train.recipe import ReftTrainingRecipe

    class TracedRecipe(ReftTrainingRecipe):
        settled, at_steps = [], []

        def _check_graph_device(self):
            pass

        def _host_batch(self, key):
            time.sleep(batch_seconds)
            return super()._host_batch(key)

        def _captured_loss(self, params):
            def capture(module, sample_args, **kwargs):
                self.settled.append(all(future.done() for future in self._batches._ahead))
                self.at_steps.append(self.engine.global_steps)
                return traced_capture(module, sample_args, **kwargs)

            return super()._captured_loss(params, capture=capture)

    return TracedRecipe


def test_the_recipe_trains_through_replayed_steps_as_through_eager_ones(tmp_path, device_locations):
    """The recipe's own loop (DeepSpeed's engine.backward and step, accumulation over 2 micro-batches, the recipe's
    clipping) over replayed steps: the same losses, norms and final interventions as the eager run (whose batches are
    not padded: the padding to 64 tokens and the kept logits change nothing but rounding)."""
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe

    # batches slow enough that the thread is still at work when the first one is captured
    TracedRecipe = _traced_recipe(batch_seconds=0.2)
    try:
        eager = _recipe_run(tmp_path / "eager", ReftTrainingRecipe)
        replayed = _recipe_run(tmp_path / "replayed", TracedRecipe, "training.cuda_graphs=true")
    finally:
        shutdown()
    assert eager[3].captured is None and eager[3].result.cuda_graphs is None
    # replayed steps keep each gradient a tensor of its own, zeroed in place (eager steps set them to None)
    assert all(p.grad is None for p in eager[3].trainable_params)
    assert all(p.grad is not None and not p.grad.any() for p in replayed[3].trainable_params)
    captured = replayed[3].captured
    assert replayed[3].result.cuda_graphs == {"layouts": 1, "replayed": 8, "eager": 0, "checks": captured.checks,
                                              "planned": {"layouts": 1, "counted": 8, "covered": 1.0}}
    assert len(captured.checks) == 1 and captured.checks[0].startswith("replay matches eager: |Δloss| = ")
    assert len(captured.graphs) == 1 and captured.replayed_micro_steps == 8 and captured.eager_micro_steps == 0
    assert TracedRecipe.settled == [True]
    assert replayed[0] == pytest.approx(eager[0], rel=1e-5) and replayed[1] == pytest.approx(eager[1], rel=1e-5)
    assert all(norm > 0.05 for norm in eager[1])  # the clipping acted at every step
    assert eager[2].keys() == replayed[2].keys()
    for name, tensor in eager[2].items():
        torch.testing.assert_close(replayed[2][name], tensor, rtol=1e-5, atol=1e-6)


def test_layouts_first_met_after_the_second_step_are_captured_as_well(tmp_path, device_locations):
    """Rows of 2 examples padded to multiples of 2 tokens: new layouts appear in later steps, captured then
    (DeepSpeed's throughput timer, on by default, synchronized the device in its forward hook from the third step:
    inside such a capture). The run trains as the eager one does."""
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe

    TracedRecipe = _traced_recipe()
    more = ("training.max_steps=6", "data.pad_to_multiple_of=2", "training.cuda_graph_shapes=16",
            "training.micro_batch_size=2", "training.global_batch_size=4")
    try:
        eager = _recipe_run(tmp_path / "eager", ReftTrainingRecipe, *more)
        replayed = _recipe_run(tmp_path / "replayed", TracedRecipe, "training.cuda_graphs=true", *more)
    finally:
        shutdown()
    summary = replayed[3].result.cuda_graphs
    assert summary["layouts"] >= 2 and summary["eager"] == 0 and max(TracedRecipe.at_steps) >= 2, \
        (summary, TracedRecipe.at_steps)
    assert replayed[0] == pytest.approx(eager[0], rel=1e-5) and replayed[1] == pytest.approx(eager[1], rel=1e-5)


def test_the_recipe_captures_the_most_frequent_layouts_not_the_first_met(tmp_path, device_locations, caplog):
    """One graph for a run of many layouts (rows of 2 examples padded to multiples of 2 tokens): the layouts of the
    coming micro-batches are counted before training, and the graph is the most frequent one's, even where another
    comes first; every other micro-batch runs eagerly, as the plan said."""
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe

    TracedRecipe = _traced_recipe()
    more = ("training.max_steps=12", "data.pad_to_multiple_of=2", "training.cuda_graph_shapes=1",
            "training.micro_batch_size=2", "training.global_batch_size=2")
    try:
        eager = _recipe_run(tmp_path / "eager", ReftTrainingRecipe, *more)
        with caplog.at_level(logging.INFO, logger="reft_fast.train.recipe"):
            replayed = _recipe_run(tmp_path / "replayed", TracedRecipe, "training.cuda_graphs=true", *more)
    finally:
        shutdown()
    recipe = replayed[3]
    plan, captured = recipe.layout_plan, recipe.captured
    first_met, (most, most_count) = next(iter(plan.counts)), plan.counts.most_common(1)[0]
    assert plan.counted == plan.total == 12 and len(plan.counts) >= 3, plan.counts
    assert plan.counts[first_met] < most_count  # what this test is about: capturing the first would replay fewer
    assert list(captured.graphs) == [most] and captured.replayed_micro_steps == most_count
    assert captured.eager_micro_steps == 12 - most_count
    assert recipe.result.cuda_graphs["planned"] == {"layouts": len(plan.counts), "counted": 12,
                                                    "covered": round(most_count / 12, 4)}
    said = [r.getMessage() for r in caplog.records if "most frequent" in r.getMessage()]
    assert len(said) == 1 and f"fall into {len(plan.counts)} batch layouts" in said[0] and \
        f"replay {most_count / 12:.0%}" in said[0] and "data.pad_to_multiple_of, now 2" in said[0], said
    assert replayed[0] == pytest.approx(eager[0], rel=1e-5) and replayed[1] == pytest.approx(eager[1], rel=1e-5)


def test_packed_batches_keep_one_location_width_and_replay_their_own_steps(device_locations):
    """Packed rows under cuda_graphs: the locations are laid out for ``pack_examples`` examples per row whatever the
    row holds, so the batches of one row count and width share a layout, and each replays its own step."""
    model = _model()
    params = model.trainable_parameters()
    collate = ReftDataCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f2+l2",
                               pad_to_multiple_of=16, pack_length=32, pack_examples=4)
    captured = CapturedLoss(model, params, "cpu", max_shapes=1, capture=traced_capture)
    # rows of 32: two rows each time, holding 3 + 1, 2 + 2 and 1 + 1 examples
    plan = [(1, [5, 6, 7, 20]), (2, [14, 15, 12, 16]), (3, [30, 25])]
    for seed, lengths in plan:
        batch = collate(_items(seed, lengths))
        assert batch["input_ids"].shape == (2, 32) and batch["intervention_locations"].shape == (2, 2, 8)
        _assert_same_step(_loss_and_grads(captured(batch), params),
                          _loss_and_grads(model_loss(model, batch), params), atol=1e-5)
    assert len(captured.graphs) == 1 and captured.replayed_micro_steps == 3 and captured.eager_micro_steps == 0
    unfixed = ReftDataCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f2+l2", pack_length=32)
    assert [unfixed(_items(seed, lengths))["intervention_locations"].shape[-1] for seed, lengths in plan] == [6, 4, 2]
    with pytest.raises(ValueError, match="a packed row holds 3 examples, more than pack_examples=2"):
        ReftDataCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f2+l2", pack_length=32,
                         pack_examples=2)(_items(1, [5, 6, 7, 20]))


def test_the_recipe_packs_through_replayed_steps_as_through_eager_ones(tmp_path, device_locations):
    """data.packing with cuda_graphs (SDPA's block mask): the rows' locations are laid out for the whole micro-batch and
    their logits are not trimmed, so the layouts are the row counts; the run trains as the eager packed one."""
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe

    TracedRecipe = _traced_recipe()
    try:
        eager = _recipe_run(tmp_path / "eager", ReftTrainingRecipe, "data.packing=true")
        replayed = _recipe_run(tmp_path / "replayed", TracedRecipe, "data.packing=true", "training.cuda_graphs=true")
    finally:
        shutdown()
    recipe = replayed[3]
    assert recipe.collator.pack_examples == 4 and not recipe.task.trim_train and eager[3].collator.pack_examples is None
    widths = {key[0][[name for name, _, _ in key[0]].index("intervention_locations")][1][-1]
              for key in recipe.layout_plan.counts}
    assert widths == {4 * 2}, widths  # 4 examples × f1+l1's 2 positions (shared weights)
    # rows of data.max_length 32, not padded to 64 past it
    assert {key[0][[name for name, _, _ in key[0]].index("input_ids")][1][-1] for key in recipe.layout_plan.counts} \
        == {32}
    assert "logits_to_keep" not in str(list(recipe.layout_plan.counts))
    assert recipe.result.cuda_graphs["eager"] == 0 and recipe.result.cuda_graphs["replayed"] == 8
    assert replayed[0] == pytest.approx(eager[0], rel=1e-5) and replayed[1] == pytest.approx(eager[1], rel=1e-5)


def _classifier(kind: str):
    """A tiny sequence classifier without dropout (a step that draws random numbers is not compared): a RoBERTa
    encoder, whose padding must stay masked (it attends both ways), or a Llama with its score head on the last token."""
    import transformers

    from reft_fast.core.config import ReftConfig
    from reft_fast.core.model import get_reft_model

    torch.manual_seed(0)
    if kind == "roberta":
        config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                                            type_vocab_size=1, num_labels=3, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
        base = transformers.RobertaForSequenceClassification(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3,
                                          attn_implementation="sdpa")
        base = transformers.LlamaForSequenceClassification(config)
    base.requires_grad_(False)
    reft_config = ReftConfig(representations=[{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
                                                "intervention": "loreft"} for layer in range(N_INTERVENTIONS)])
    model = get_reft_model(base, reft_config, backend="torch")
    head = [p for name, p in base.named_parameters() if "classifier" in name or "score" in name]
    for p in head:
        p.requires_grad_(True)
    return model, list(model.trainable_parameters()) + head


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_classification_batches_replay_their_own_steps_with_their_padding_mask(device_locations, kind):
    from reft_fast.train.task_classification import ClassificationCollator, ClassificationTask

    model, params = _classifier(kind)
    collate = ClassificationCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f1+l1",
                                     pad_to_multiple_of=8, max_length=20)
    captured = CapturedLoss(model, params, "cpu", max_shapes=1, capture=traced_capture,
                            loss_fn=ClassificationTask.model_loss, padding_mask=ClassificationTask.padding_mask)
    g = torch.Generator().manual_seed(1)
    for lengths in ([3, 7, 5], [8, 2, 6], [4, 4, 7]):  # all padded to 8: one layout
        items = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist(),
                  "label": int(torch.randint(0, 3, (), generator=g))} for n in lengths]
        batch = collate(items)
        assert batch["input_ids"].shape == (3, 8)
        _assert_same_step(_loss_and_grads(captured(batch), params),
                          _loss_and_grads(ClassificationTask.model_loss(model, batch), params), atol=1e-5)
    [key] = captured.graphs
    assert [name for name, _, _ in key[0]] == ["attention_mask", "input_ids", "intervention_locations", "labels"]
    assert captured.replayed_micro_steps == 3 and captured.checks[0].startswith("replay matches eager")
    # the encoder's padding is masked in the replay too: a padded token changed no real token's loss
    assert collate(items[:1])["input_ids"].shape == (1, 8)


def test_the_recipe_trains_a_classifier_through_replayed_steps_as_through_eager_ones(tmp_path, device_locations):
    """task classification (a RoBERTa encoder and its trained head) with cuda_graphs: the same losses and final
    interventions as the eager run."""
    from test_classification import make_run as classification_run, sentiment_rows

    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    def run(name: str, recipe_class, *overrides: str):
        config = classification_run(tmp_path / name, sentiment_rows(24))
        model_config = tmp_path / name / "model" / "config.json"
        settings = json.loads(model_config.read_text())
        model_config.write_text(json.dumps({**settings, "hidden_dropout_prob": 0.0,
                                            "attention_probs_dropout_prob": 0.0}))
        cfg = load_config(str(config), ["training.max_steps=4", "training.eval_every=0", "data.eval_fraction=0",
                                        "classification.train_head=true", *overrides])
        recipe = recipe_class(cfg)
        recipe.run()
        rows = [json.loads(line) for line in (tmp_path / name / "out" / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], recipe

    try:
        eager = run("eager", ReftTrainingRecipe)
        replayed = run("replayed", _traced_recipe(), "training.cuda_graphs=true")
    finally:
        shutdown()
    summary = replayed[1].result.cuda_graphs
    assert summary["eager"] == 0 and summary["replayed"] == 4 and summary["layouts"] == 1, summary
    assert replayed[1].collator.pad_to_multiple_of == 64 and len(eager[0]) == 4
    assert replayed[0] == pytest.approx(eager[0], rel=1e-5)
    trained = {name: p.detach().clone() for name, p in eager[1].reft_model.named_parameters() if p.requires_grad}
    for name, p in replayed[1].reft_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), trained[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", [[], ["preference.reference=per_step"], ["preference.loss=simpo"]],
                         ids=["dpo-cached", "dpo-per-step", "simpo"])
def test_the_recipe_trains_on_preference_pairs_through_replayed_steps_as_through_eager_ones(tmp_path, device_locations,
                                                                                          objective):
    """task preference: a pair's two rows in one replayed forward, the reference from the table built before training
    (dpo, cached), from a no_grad forward of the base inside the graph (per_step), or none (simpo): the losses and
    final interventions of the eager run."""
    from test_preference import preference_run

    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    def run(name: str, recipe_class, *extra: str):
        config, overrides = preference_run(tmp_path / name, n_pairs=24)
        cfg = load_config(str(config), [*overrides, *objective, "training.max_steps=4", "data.eval_fraction=0",
                                        "training.max_grad_norm=0", f"output_dir={tmp_path / name / 'out'}", *extra])
        recipe = recipe_class(cfg)
        return recipe, recipe.run()

    try:
        eager = run("eager", ReftTrainingRecipe)
        replayed = run("replayed", _traced_recipe(), "training.cuda_graphs=true")
    finally:
        shutdown()
    summary = replayed[1].cuda_graphs
    assert summary["eager"] == 0 and summary["replayed"] == 4 and summary["checks"][0].startswith("replay matches"), \
        summary
    assert replayed[1].losses == pytest.approx(eager[1].losses, rel=1e-5)
    trained = dict(eager[0].reft_model.named_parameters())
    for name, p in replayed[0].reft_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), trained[name].detach(), rtol=1e-5, atol=1e-6)


def test_a_task_written_before_the_captured_hooks_trains_eagerly_and_is_refused_under_graphs(tmp_path, monkeypatch,
                                                                                               device_locations):
    """A task class registered with the methods tasks had before ``before_training`` and ``model_loss``: it still
    trains (the recipe asks for the hook only where there is one), and cuda_graphs says what it lacks."""
    from reft_fast.train import tasks
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import ConfigError

    monkeypatch.delattr(tasks.CausalLMTask, "before_training")
    monkeypatch.delattr(tasks.CausalLMTask, "model_loss")
    try:
        losses = _recipe_run(tmp_path / "eager", ReftTrainingRecipe, "training.max_steps=1")[0]
        assert len(losses) == 1
        with pytest.raises(ConfigError, match=r"^training.cuda_graphs: task 'causal_lm' \(CausalLMTask\) has no "
                                              r"model_loss\(reft_model, batch\)"):
            _recipe_run(tmp_path / "replayed", _traced_recipe(), "training.cuda_graphs=true")
    finally:
        shutdown()


def test_two_ranks_at_stage_0_train_through_replayed_steps_as_through_eager_ones(tmp_path):
    """Two ranks (gloo) at ZeRO stage 0: DeepSpeed all-reduces the trained gradients, which the recipe keeps as views
    of one flat tensor (``ds_config.reduce_only_trained_gradients``); replayed backwards add into those views. The
    replayed run's losses are the eager run's, and its gradients still live in one storage."""
    from dist.tiny import launch_ranks

    config, result = make_run(tmp_path, n_examples=24), tmp_path / "r.json"
    common = ["training.max_steps=3", "data.eval_fraction=0", "training.max_grad_norm=0.05"]
    proc = launch_ranks([RUN_TRAIN, str(config), str(result), *common, f"output_dir={tmp_path / 'eager'}", "--then",
                         *common, f"output_dir={tmp_path / 'replayed'}", "training.cuda_graphs=true",
                         "--stand-in-capture"], world=2)
    assert proc.returncode == 0, proc.stderr[-5000:]
    eager, replayed = json.loads(result.read_text())
    assert eager["world"] == replayed["world"] == 2 and eager["cuda_graphs"] is None
    assert replayed["cuda_graphs"]["layouts"] == 1 and replayed["cuda_graphs"]["eager"] == 0
    assert replayed["trained_gradients"]["storages"] == 1 and replayed["trained_gradients"]["none"] == 0
    assert replayed["losses"] == pytest.approx(eager["losses"], rel=1e-5)


def _train(config: Path, result: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, RUN_TRAIN, str(config), str(result), *overrides], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"{overrides} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a CPU run")
def test_a_cpu_run_is_refused_before_the_model_is_read(tmp_path):
    proc = _train(make_run(tmp_path), tmp_path / "r.json", "training.cuda_graphs=true", check=False)
    assert proc.returncode != 0
    said = "training.cuda_graphs: needs CUDA devices; this run's accelerator is 'cpu'"
    assert said in proc.stderr, proc.stderr[-3000:]
    assert "base loaded" not in proc.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_captured_steps_on_a_gpu_follow_each_batch(backend):
    model = _model(backend=backend).cuda()
    params = model.trainable_parameters()
    captured = CapturedLoss(model, params, "cuda", max_shapes=2)
    plan = [(1, [9, 13, 16]), (2, [20, 31, 25]), (3, [11, 7, 14]), (4, [30, 18, 22]), (5, [16, 5, 12])]
    for seed, lengths in plan:
        batch = _batch(seed, lengths, multiple=16, trim=True)
        expected = _loss_and_grads(model_loss(model, {k: v.cuda() if isinstance(v, torch.Tensor) else v
                                                      for k, v in batch.items()}), params)
        _assert_same_step(_loss_and_grads(captured(batch), params), expected, atol=1e-4)
    assert len(captured.graphs) == 2 and captured.replayed_micro_steps == 5


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_classification_steps_captured_on_a_gpu_follow_each_batch(kind):
    """A classifier's step (its padding mask, its head trained) through torch's own capture: transformers builds the
    padding mask on the device while a stream captures (``is_tracing``), which eagerly it may skip."""
    from reft_fast.train.task_classification import ClassificationCollator, ClassificationTask

    model, params = _classifier(kind)
    model = model.cuda()
    collate = ClassificationCollator(pad_token_id=0, num_interventions=N_INTERVENTIONS, positions="f1+l1",
                                     pad_to_multiple_of=8, max_length=20)
    captured = CapturedLoss(model, params, "cuda", max_shapes=2, loss_fn=ClassificationTask.model_loss,
                            padding_mask=True)
    g = torch.Generator().manual_seed(1)
    for lengths in ([3, 7, 5], [8, 8, 8], [9, 2, 6], [4, 4, 7], [12, 3, 3]):  # lengths 8 and 16: two layouts
        items = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist(),
                  "label": int(torch.randint(0, 3, (), generator=g))} for n in lengths]
        batch = collate(items)
        on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        expected = _loss_and_grads(ClassificationTask.model_loss(model, on_gpu), params)
        _assert_same_step(_loss_and_grads(captured(batch), params), expected, atol=1e-4)
    assert len(captured.graphs) == 2 and captured.replayed_micro_steps == 5


@pytest.mark.cuda
def test_one_row_under_flash_attn_is_captured_on_a_gpu_and_follows_each_batch():
    """flash-attn's own kernels (bf16: they take no fp32), one row per micro-batch: captured without a host read
    (the capture fails on one) and each replay equal to its eager step."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (the flash extra)")
    model = as_flash(_model()).to("cuda")
    model.model.to(torch.bfloat16)
    params = model.trainable_parameters()
    captured = CapturedLoss(model, params, "cuda", max_shapes=1)
    for seed, length in [(1, 13), (2, 16), (3, 9), (4, 11)]:
        batch = _batch(seed, [length], multiple=16, trim=True)
        expected = _loss_and_grads(model_loss(model, {k: v.cuda() if isinstance(v, torch.Tensor) else v
                                                      for k, v in batch.items()}), params)
        loss, grads = _loss_and_grads(captured(batch), params)
        assert loss == pytest.approx(expected[0], rel=1e-2)
        for a, b in zip(grads, expected[1]):  # flash-attn's backward adds in no fixed order
            torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()))
    assert len(captured.graphs) == 1 and captured.replayed_micro_steps == 4 and captured.eager_micro_steps == 0


@pytest.mark.cuda
def test_a_captured_run_trains_as_an_eager_one(tmp_path):
    """The recipe on a GPU, accumulation 2, fp32: the replayed run's losses are the eager run's (to the rounding of
    other kernels: padded to 64 tokens, liger's fused cross-entropy in the eager run only)."""
    config = make_run(tmp_path, n_examples=24)
    runs = {}
    for graphs in ("false", "true"):
        result = tmp_path / f"{graphs}.json"
        _train(config, result, f"training.cuda_graphs={graphs}", f"output_dir={tmp_path / graphs}",
               "training.global_batch_size=8", "training.max_steps=5")
        runs[graphs] = json.loads(result.read_text())[0]
    assert runs["false"]["cuda_graphs"] is None
    summary = runs["true"]["cuda_graphs"]
    assert summary["layouts"] == 1 and summary["replayed"] == 10 and summary["eager"] == 0, summary
    assert len(summary["checks"]) == 1 and summary["checks"][0].startswith("replay matches eager"), summary
    assert "fused_linear_cross_entropy" not in runs["true"]["fused_ops"]
    assert runs["true"]["losses"] == pytest.approx(runs["false"]["losses"], rel=1e-4)


@pytest.mark.cuda
def test_a_captured_preference_run_trains_as_an_eager_one(tmp_path):
    """DPO on a GPU with the cached reference table (built before training, outside any capture): the replayed
    run's losses are the eager run's."""
    from test_preference import preference_run

    config, overrides = preference_run(tmp_path, n_pairs=24)
    runs = {}
    for graphs in ("false", "true"):
        result = tmp_path / f"{graphs}.json"
        _train(config, result, *overrides, f"training.cuda_graphs={graphs}", f"output_dir={tmp_path / graphs}",
               "data.eval_fraction=0", "training.max_steps=4", "model.fused_ops=off")
        runs[graphs] = json.loads(result.read_text())[0]
    summary = runs["true"]["cuda_graphs"]
    assert summary["eager"] == 0 and summary["checks"][0].startswith("replay matches eager"), summary
    assert runs["true"]["losses"] == pytest.approx(runs["false"]["losses"], rel=1e-4)
