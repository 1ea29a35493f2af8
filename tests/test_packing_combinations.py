"""Sequence packing combined with the rest of training: gradient checkpointing (both modes), resume after a kill,
and 2 ranks at ZeRO-2 and ZeRO-3 (gloo, CPU).

Tolerances: checkpointed packed batches against solo examples as in test_packing (fp32; summed losses and gradients
rtol 1e-4, atol 1e-6); a resumed run against the uninterrupted one as in test_engine (rel 1e-5); two ranks against one
rank accumulating the same two micro-batches (rel 2e-4: the gradients are summed in another order).
"""

import json

import pytest

from dist.tiny import launch_ranks, make_run
from test_engine import COMMON, PARTITION_THE_BASE, PY, RUN_TRAIN, _assert_reference_trajectory, _losses, _metrics, \
    _one_launch, _run
from test_packing import _base, _check_packed_equals_solo, _items, _reft_model

from reft_fast.train.loading import enable_gradient_checkpointing

PACKED = [*COMMON, "data.packing=true"]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_packed_batch_under_gradient_checkpointing_gives_solo_losses_and_gradients(reentrant):
    base = _base("llama")
    enable_gradient_checkpointing(base, reentrant=reentrant)
    reft_model = _reft_model(base)
    reft_model.train()  # transformers checkpoints only in training mode
    recomputed = []
    base.model.layers[1].mlp.register_forward_pre_hook(lambda *args: recomputed.append(1))
    items = _items([(5, 4), (3, 2), (8, 6), (4, 1), (6, 5)], seed=11)
    batch = _check_packed_equals_solo(reft_model, items, pack_length=20)
    assert batch["input_ids"].shape[0] < len(items)  # several examples did share a row
    # one packed and 5 solo forwards, each layer recomputed once in its backward
    assert len(recomputed) == 2 * (1 + len(items))


@pytest.fixture(scope="module")
def packed_reference(tmp_path_factory):
    """One rank, ZeRO-0, accumulation 2, packing on: the uninterrupted trajectory."""
    folder = tmp_path_factory.mktemp("packed")
    config = make_run(folder, n_examples=40)
    _run([PY, "-m", "reft_fast", "train", str(config), *PACKED])
    return config, folder / "out"


def test_packed_run_killed_and_resumed_replays_the_same_trajectory(packed_reference, tmp_path):
    config, out = packed_reference
    rows = _metrics(out)
    assert all(r["packing_efficiency"] > 0 for r in rows if "loss" in r)
    killed_out = tmp_path / "killed"
    overrides = [*PACKED, "training.log_every=3", "training.save_every=4", f"output_dir={killed_out}"]
    proc = _run([PY, RUN_TRAIN, str(config), str(tmp_path / "r.json"), *overrides, "--kill-before-step", "7"],
                check=False)
    assert proc.returncode != 0  # SIGKILLed
    assert (killed_out / "checkpoints" / "latest").read_text().strip() == "step4"
    resumed = _run([PY, "-m", "reft_fast", "train", str(config), *overrides, "--resume"])
    assert f"resumed from {killed_out / 'checkpoints' / 'step4'} at step 4" in resumed.stderr, resumed.stderr[-3000:]
    _assert_reference_trajectory(killed_out, out)


@pytest.mark.slow
def test_two_ranks_zero2_and_zero3_packed_match_one_rank(packed_reference, tmp_path):
    config, out = packed_reference
    result = tmp_path / "dist.json"
    runs = [[*PACKED, "deepspeed.stage=2", f"output_dir={tmp_path / 'z2'}"],
            [*PACKED, "deepspeed.stage=3", PARTITION_THE_BASE, f"output_dir={tmp_path / 'z3'}"]]
    launched = launch_ranks([RUN_TRAIN, str(config), str(result), *_one_launch(runs), "--check-frozen"], timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
    reference_losses = _losses(_metrics(out))
    for stage, run in zip((2, 3), json.loads(result.read_text())):
        assert run["world"] == 2 and run["frozen_max_diff"] == 0.0
        assert run["losses"] == pytest.approx(reference_losses, rel=2e-4, abs=1e-5), stage
        assert all(r["packing_efficiency"] > 0 for r in _metrics(tmp_path / f"z{stage}") if "loss" in r)
