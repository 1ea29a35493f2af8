"""A lock file that a killed build of DeepSpeed's CPU shared-memory op left behind (torch's extension loader) makes
every later CPU run wait forever without a word. The start-up check names it and says how to clear it, and still
waits for a build that is alive."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from reft_fast.ops import build_lock
from reft_fast.train.distributed import StaleBuildLock, wait_for_build_lock

from dist.tiny import make_run, subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_a_killed_builds_lock_stops_the_run_at_once_naming_the_file_and_the_fix(tmp_path):
    # The loader's directory comes from TORCH_EXTENSIONS_DIR, as torch computes it; the lock is an empty file that no
    # process holds, made 10 minutes ago: what ctrl-C during the first CPU run's build leaves.
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    ten_minutes_ago = time.time() - 600
    os.utime(lock, (ten_minutes_ago, ten_minutes_ago))
    config = make_run(tmp_path / "run")
    try:
        proc = subprocess.run([sys.executable, "-m", "reft_fast", "train", str(config),
                               f"output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=240, env=subprocess_env(TORCH_EXTENSIONS_DIR=str(extensions)))
    except subprocess.TimeoutExpired:
        pytest.fail("the run waited on the dead build's lock instead of naming it")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"rm {lock}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lock.exists()  # the user decides: nothing removed
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def _waiter(lock: Path, **kwargs) -> tuple[threading.Thread, list]:
    outcome = []

    def wait():
        try:
            wait_for_build_lock(lock, poll_s=0.05, **kwargs)
            outcome.append("returned")
        except StaleBuildLock as err:
            outcome.append(err)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for_a_held_lock(tmp_path: Path) -> Path:
    """Wait on a lock held for half a second by a living builder (torch's own FileBaton, as the loader takes it), even
    past the age at which a lock nobody holds is refused; the lock's path once the wait returned."""
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    thread, outcome = _waiter(lock, stale_after_s=0.0)
    time.sleep(0.5)
    assert thread.is_alive() and not outcome
    baton.release()
    thread.join(timeout=10)
    assert outcome == ["returned"]
    return lock


def test_a_live_build_is_waited_for_however_old_its_lock_and_its_process_named(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(build_lock, "LIVE_BUILD_QUIET_S", 0.0)
    lock = _wait_for_a_held_lock(tmp_path)
    assert (f"waiting for process {os.getpid()}, which holds the lock of torch's build of deepspeed_shm_comm "
            f"({lock})") in caplog.text


def test_another_ranks_short_load_is_waited_for_without_a_word(tmp_path, caplog):
    """Every rank of a CPU launch loads the op at once, and an up-to-date op's load holds the lock a few seconds: each
    two-rank launch printed "waiting for process ..." before training. Only a wait past LIVE_BUILD_QUIET_S says so."""
    _wait_for_a_held_lock(tmp_path)
    assert "waiting for process" not in caplog.text, caplog.text


def test_a_lock_nobody_here_holds_is_waited_for_with_advice_then_refused(tmp_path, caplog):
    """A build on another machine sharing the directory may hold it: waited for until it is stale_after_s old, the
    wait saying how to clear it; then refused with the same advice."""
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    thread, outcome = _waiter(lock, stale_after_s=1.0)
    thread.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], StaleBuildLock), outcome
    assert f"rm {lock}" in str(outcome[0])
    assert "held by no process of this machine" in caplog.text and f"rm {lock}" in caplog.text
    assert lock.exists()


def test_a_lock_nobody_here_holds_that_goes_away_lets_the_run_go_on(tmp_path):
    """A build on another machine that ends (its lock removed) within the wait: the run goes on."""
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    thread, outcome = _waiter(lock, stale_after_s=60.0)
    time.sleep(0.3)
    lock.unlink()
    thread.join(timeout=10)
    assert outcome == ["returned"]
