"""torch builds DeepSpeed's CPU shared-memory op with the ``ninja`` it finds on PATH. Run as ``.venv/bin/reft-fast``
(README: "or write them as `.venv/bin/reft-fast ...`"), the environment's own ninja is not on PATH: on a machine
without another one DeepSpeed refused to build the op ("ninja not being installed") and no CPU run could start; with
another version on PATH, each switch to and from an activated environment rebuilt the op."""

import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.utils.cpp_extension import is_ninja_available

from reft_fast.train import distributed
from reft_fast.train.distributed import use_environment_ninja

SCRIPTS = Path(sysconfig.get_path("scripts"))
ENV_NINJA = shutil.which("ninja", path=str(SCRIPTS))

pytestmark = pytest.mark.skipif(ENV_NINJA is None, reason=f"no ninja installed in {SCRIPTS}")


def _is_env_ninja(found) -> bool:
    return found is not None and os.path.samefile(found, ENV_NINJA)


def test_without_a_ninja_on_path_the_environments_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine with no ninja of its own, the environment not activated
    assert not is_ninja_available()
    use_environment_ninja()
    assert is_ninja_available() and _is_env_ninja(shutil.which("ninja"))
    assert os.environ["PATH"].split(os.pathsep)[1:] == [str(tmp_path)]  # the rest of PATH kept, in its order


def test_the_environments_ninja_goes_before_another_on_path(tmp_path, monkeypatch):
    other = tmp_path / "ninja"
    other.write_text("#!/bin/sh\necho 1.11.1\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    use_environment_ninja()
    assert _is_env_ninja(shutil.which("ninja"))
    before = os.environ["PATH"]
    use_environment_ninja()  # already first: PATH unchanged
    assert os.environ["PATH"] == before


def test_joining_the_group_puts_it_first_before_deepspeed_builds_the_op(tmp_path, monkeypatch):
    class Joined(Exception):
        pass

    seen = []

    def join(**kwargs):  # deepspeed.init_distributed: where the op is built
        seen.append(shutil.which("ninja"))
        raise Joined

    import deepspeed

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "share_cpu_cores", lambda: None)
    monkeypatch.setattr(distributed, "shared_memory_op_build_lock", lambda: tmp_path / "deepspeed_shm_comm" / "lock")
    monkeypatch.setattr(distributed, "wait_for_build_lock", lambda lock: None)
    monkeypatch.setattr(distributed, "say_first_build", lambda lock: None)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(deepspeed, "init_distributed", join)
    with pytest.raises(Joined):
        distributed.init_distributed()
    assert len(seen) == 1 and _is_env_ninja(seen[0])
