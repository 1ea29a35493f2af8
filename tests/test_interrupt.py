"""Stopping a training run (ctrl-C, or the SIGTERM a scheduler or the deepspeed launcher sends): one line saying what
was kept and how to go on, not a traceback per rank, and the checkpoints intact for --resume."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from reft_fast.train.checkpoints import step_dirs

from dist.tiny import make_run, subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_during_training_says_which_checkpoint_resume_continues_from(tmp_path):
    """With the progress bar on: the line comes on a line of its own, after the bar (it was printed after the bar's
    text, on the bar's line)."""
    config = make_run(tmp_path / "run", progress_bar=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "reft_fast", "train", str(config), "training.max_steps=100000",
                             "training.save_every=2", f"output_dir={out}"], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while (not [step for step, _ in step_dirs(out / "checkpoints") if step >= 4] and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # split at newlines only: the bar redraws itself after a carriage return
    line, = [line for line in stderr.split("\n") if "reft-fast: stopped by ctrl-C or SIGTERM" in line]
    assert line.startswith("reft-fast: stopped"), line
    assert "/100000 [" in stderr.split("\n")[stderr.split("\n").index(line) - 1], stderr[-3000:]  # the bar, left
    _, newest = step_dirs(out / "checkpoints")[-1]
    assert f"the newest checkpoint is {newest}:" in line and "--resume" in line, line
