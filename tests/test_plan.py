"""`reft-fast plan`: the memory estimate shows Llama-2-70B LoReFT fitting 8×80 GB only with ZeRO-3."""

from pathlib import Path

import pytest

from reft_fast.train.cli import main
from reft_fast.train.plan import GIB, format_plan, plan_memory
from reft_fast.train.train_config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def plan_70b():
    return plan_memory(load_config(str(CONFIGS / "llama2-70b-8xgpu-plan.yaml")), gpus=8)


def test_70b_fits_only_with_zero3(plan_70b):
    assert 68e9 < plan_70b.base_params < 70e9  # Llama-2-70B, counted from a meta-device model
    usable = 80 * 0.9 * GIB
    by_stage = {(s.stage, s.offload): s for s in plan_70b.stages}
    for stage in (0, 1, 2):
        assert by_stage[(stage, False)].total(checkpointing=True) > usable  # 138 GB of bf16 weights on every GPU
    zero3 = by_stage[(3, False)]
    assert zero3.weights < 25 * GIB and zero3.total(checkpointing=True) < usable
    assert zero3.activations_checkpointed < zero3.activations / 5


def test_plan_scales_with_gpus_and_batch():
    cfg = load_config(str(CONFIGS / "llama2-70b-8xgpu-plan.yaml"))
    four = {s.stage: s for s in plan_memory(cfg, 4).stages if not s.offload}
    eight = {s.stage: s for s in plan_memory(cfg, 8).stages if not s.offload}
    assert four[3].weights > eight[3].weights and four[0].weights == eight[0].weights
    half = {s.stage: s for s in plan_memory(load_config(str(CONFIGS / "llama2-70b-8xgpu-plan.yaml"),
                                                        ["training.micro_batch_size=2"]), 8).stages}
    assert half[3].activations < eight[3].activations


def test_cli_plan_prints_the_table(capsys, plan_70b):
    assert main(["plan", str(CONFIGS / "llama2-70b-8xgpu-plan.yaml"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_plan(plan_70b).strip()
    line = next(l for l in out.splitlines() if l.startswith("stage 3 ") and "offload" not in l)
    assert line.split("fits")[0] and "no / yes" in line and "<- config" in line
