"""The training engine on a tiny random Llama (CPU, gloo).

One reference run through the CLI (one rank, gradient accumulation 2) is shared by:
  * the CLI end to end: metrics.jsonl, evaluation, pruned checkpoints, final save, `reft-fast generate`;
  * resume: a run SIGKILLed after step 5 and resumed from its step-4 checkpoint reproduces the reference losses;
  * 2 ranks through the deepspeed launcher, ZeRO-2 then ZeRO-3 in one launch (same global batch, no accumulation):
    the same losses as the one-rank reference, frozen weights unchanged, the base partitioned by zero.Init.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist.tiny import make_run

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RUN_TRAIN = str(ROOT / "tests" / "dist" / "run_train.py")
STEPS = 8
# Same global batch (8) for every run: one rank accumulates 2 micro-batches of 4, two ranks take one each.
COMMON = [f"training.max_steps={STEPS}", "training.micro_batch_size=4", "training.global_batch_size=8",
          "training.save_every=2", "training.eval_every=4", "data.eval_fraction=0.2", "interventions.dropout=0.1"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(args, timeout=240, check=True):
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    config = make_run(folder, n_examples=40)
    _run([PY, "-m", "reft_fast", "train", str(config), *COMMON])
    return config, folder / "out"


def test_cli_train_end_to_end(reference):
    config, out = reference
    rows = _metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    for r in train_rows:
        assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["lr"] > 0 and r["step_time_s"] > 0
    # Warmup (1 step) to the peak, then cosine decay towards 0: the rate each step used.
    lrs = [r["lr"] for r in train_rows]
    assert lrs[:2] == pytest.approx([1e-2, 1e-2]) and all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 4, 8]
    assert evals[-1][1] < evals[0][1]  # the held-out loss of the copy task went down
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step6", "step8"]
    final = out / "final"
    saved = json.loads((final / "config.json").read_text())
    assert [e["layer"] for e in saved["interventions"]] == [1, 2] and saved["positions"] == "f1+l1"

    gen = _run([PY, "-m", "reft_fast", "generate", "--reft", str(final), "--max-new-tokens", "4",
                "repeat : red cat", "repeat : sky"])
    answers = [line for line in gen.stdout.splitlines() if line.startswith("A:")]
    assert len(answers) == 2, gen.stdout


def test_resume_after_sigkill_reproduces_the_trajectory(reference, tmp_path):
    config, out = reference
    killed_out = tmp_path / "killed"
    proc = _run([PY, RUN_TRAIN, str(config), str(tmp_path / "r.json"), *COMMON, f"output_dir={killed_out}",
                 "--kill-at", "5"], check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _losses(_metrics(killed_out))[-1] is not None and len(_losses(_metrics(killed_out))) == 5
    assert (killed_out / "checkpoints" / "latest").read_text().strip() == "step4"
    _run([PY, "-m", "reft_fast", "train", str(config), *COMMON, f"output_dir={killed_out}", "--resume"])
    resumed, reference_rows = _metrics(killed_out), _metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference_rows]
    assert _losses(resumed) == pytest.approx(_losses(reference_rows), rel=1e-5, abs=1e-6)
    evals = [r["eval_loss"] for r in resumed if "eval_loss" in r]
    assert evals == pytest.approx([r["eval_loss"] for r in reference_rows if "eval_loss" in r], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_zero2_and_zero3_match_one_rank(reference, tmp_path):
    if shutil.which("deepspeed") is None and not (Path(PY).parent / "deepspeed").exists():
        pytest.skip("the deepspeed launcher is not installed")
    launcher = shutil.which("deepspeed") or str(Path(PY).parent / "deepspeed")
    config, out = reference
    result = tmp_path / "dist.json"
    # A low persistence threshold so that the tiny base really is partitioned (the engine keeps the interventions
    # whole regardless).
    zero3 = ["deepspeed.stage=3", "deepspeed.config.zero_optimization.stage3_param_persistence_threshold=100",
             f"output_dir={tmp_path / 'z3'}"]
    _run([launcher, "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000), RUN_TRAIN, str(config),
          str(result), *COMMON, "deepspeed.stage=2", f"output_dir={tmp_path / 'z2'}", "--then", *COMMON, *zero3,
          "--check-frozen"], timeout=400)
    zero2_run, zero3_run = json.loads(result.read_text())
    reference_losses = _losses(_metrics(out))
    for run in (zero2_run, zero3_run):
        assert run["world"] == 2
        assert run["losses"] == pytest.approx(reference_losses, rel=2e-4, abs=1e-5)
        assert run["frozen_max_diff"] == 0.0
    full = zero3_run["full_base_numel"]
    assert zero2_run["base_numel_at_load"] == full  # ZeRO-2 replicates the (frozen) base
    assert zero3_run["base_numel_at_load"] < 0.1 * full  # zero.Init: only persistent scraps are materialized
    assert abs(zero3_run["shard_numel"] - full / 2) < 0.1 * full  # each of the 2 ranks holds about half


def test_fused_ops_off_and_auto_train_alike_on_cpu(tmp_path):
    # Both runs in one process (the launch is the slow part): "auto" must resolve to no fused operation on a CPU.
    config = make_run(tmp_path, n_examples=16)
    result = tmp_path / "fused.json"
    _run([PY, RUN_TRAIN, str(config), str(result), "model.fused_ops=off", f"output_dir={tmp_path / 'off'}",
          "--then", "model.fused_ops=auto", f"output_dir={tmp_path / 'auto'}"])
    off_run, auto_run = json.loads(result.read_text())
    assert off_run["fused_ops"] == auto_run["fused_ops"] == []
    assert len(off_run["losses"]) == 4 and all(math.isfinite(x) for x in off_run["losses"])
    assert auto_run["losses"] == off_run["losses"]  # the same unfused computation, bit for bit
    for mode in ("off", "auto"):
        info = json.loads((tmp_path / mode / "run.json").read_text())
        assert info == {"fused_ops_mode": mode, "fused_ops": []}
    if not torch.cuda.is_available():  # "on" where liger's kernels cannot run is a config error naming the field
        refused = _run([PY, "-m", "reft_fast", "train", str(config), "model.fused_ops=on",
                        f"output_dir={tmp_path / 'on'}"], check=False)
        assert refused.returncode == 2 and "config error: model.fused_ops:" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize("component", ["block_output", "mlp_output"])
def test_gradient_checkpointing_gives_equal_gradients(tmp_path, component):
    from reft_fast.engine import build_reft_model, enable_gradient_checkpointing
    from reft_fast.train_config import load_config

    config = make_run(tmp_path, n_examples=8)
    from transformers import AutoModelForCausalLM

    from reft_fast.data import ReftDataCollator, SupervisedDataset, load_examples
    from reft_fast.engine import load_tokenizer

    cfg = load_config(str(config), ["interventions.layers=[0, 2, 3]", "interventions.positions=f2+l2",
                                    f"interventions.component={component}"])
    tokenizer = load_tokenizer(cfg.model.path)
    items = SupervisedDataset(load_examples(tmp_path / "train.jsonl"), tokenizer, max_length=32)
    grads = {}
    for mode in ("off", "non-reentrant", "reentrant"):
        base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        base.requires_grad_(False)
        if mode != "off":
            enable_gradient_checkpointing(base, reentrant=mode == "reentrant")
        torch.manual_seed(0)
        reft = build_reft_model(base, cfg, [0, 2, 3])
        reft.train()
        collator = ReftDataCollator(tokenizer.pad_token_id, len(reft.interventions), "f2+l2", share_weights=True)
        batch = collator([items[i] for i in range(6)])
        calls = []
        # transformers checkpoints a layer's forward (its own hooks stay outside); its submodules run again. A
        # pre-hook counts: non-reentrant recomputation stops once the saved tensors it needs are back, mid-module.
        base.model.layers[2].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        _, out = reft({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                      intervention_locations=batch["intervention_locations"], labels=batch["labels"])
        out.loss.backward()
        assert len(calls) == (1 if mode == "off" else 2)  # checkpointed layers really were recomputed
        grads[mode] = [p.grad.clone() for p in reft.trainable_parameters()]
        assert all(g.abs().sum() > 0 for g in grads[mode])
    for mode in ("non-reentrant", "reentrant"):
        for a, b in zip(grads["off"], grads[mode]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
