"""CPU ranks share the machine's cores: DeepSpeed's launcher (0.19.8) leaves OMP_NUM_THREADS unset without
--bind_cores_to_rank, so each of its ranks computed with one thread per core of the machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist.tiny import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
CORES = len(os.sched_getaffinity(0))
JOIN = ("import torch; from reft_fast.train.distributed import init_distributed, shutdown; init_distributed(1.0); "
        "print('threads', torch.get_num_threads()); shutdown()")


@pytest.mark.parametrize("launcher_env, threads", [
    ({"LOCAL_SIZE": "2"}, max(1, CORES // 2)),  # the deepspeed launcher, 2 ranks per machine
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": str(CORES)}, CORES),  # the user's (or torchrun's) setting wins
    ({}, CORES),  # one rank: torch's own default, every core
], ids=["deepspeed-launcher", "omp-set", "one-rank"])
def test_each_cpu_rank_computes_on_its_share_of_the_cores(launcher_env, threads):
    if CORES < 2:
        pytest.skip("one core: every share is one thread")
    env = subprocess_env(**launcher_env)
    if "OMP_NUM_THREADS" not in launcher_env:
        env.pop("OMP_NUM_THREADS")
    proc = subprocess.run([sys.executable, "-c", JOIN], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"threads {threads}\n" in proc.stdout, proc.stdout
