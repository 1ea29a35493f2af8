"""A lock file that a killed build of reft-fast's own extension (the cuda backend, or its CPU simulation) left in
torch's extension cache made every later load wait forever without a word: a CI run killed mid-build left one, and
the next sat idle for 15 minutes. The build now looks at the lock first (reft_fast.ops.build_lock): a dead build's
raises StaleBuildLock, naming the file and how to clear it, as itself and not as CudaBackendUnavailable; a live
build's is waited for, saying so.

torch's cache (TORCH_EXTENSIONS_DIR, and XDG_CACHE_HOME where the CPU simulation writes its translated sources) is a
temporary folder in every test; only the first one runs torch's loader, the others replace it with a stand-in."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from reft_fast.ops import build_lock, cuda_build
from reft_fast.ops.build_lock import StaleBuildLock

ROOT = Path(__file__).resolve().parent.parent

LOAD = textwrap.dedent("""
    import sys
    from reft_fast.ops import cuda_build
    try:
        cuda_build.load()
    except Exception as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(3)
    print("LOADED")
""")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """torch's extension cache in tmp_path, and no build loaded yet in this process."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    monkeypatch.setattr(cuda_build, "_extensions", {})
    return tmp_path


@pytest.fixture
def simulated(monkeypatch):
    monkeypatch.setenv(cuda_build.SIM_ENV, "1")
    reason = cuda_build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CPU simulation cannot be built here: {reason}")


def _dead_builds_lock(cache: Path, name: str) -> Path:
    """An empty file that no process holds, made 10 minutes ago: what a build killed midway leaves."""
    lock = cache / "torch_extensions" / name / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    ten_minutes_ago = time.time() - 600
    os.utime(lock, (ten_minutes_ago, ten_minutes_ago))
    return lock


def test_a_killed_builds_lock_stops_the_cpu_simulations_load_at_once_naming_the_file_and_the_fix(cache, simulated):
    """torch's own loader, in a process of its own: before, it waited on the lock forever."""
    name = cuda_build.simulated_extension_name()
    lock = _dead_builds_lock(cache, name)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        proc = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("loading the CPU simulation waited on the dead build's lock instead of naming it")
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert proc.stderr.startswith("StaleBuildLock: "), proc.stderr[-3000:]
    assert f"rm {lock}" in proc.stderr and "reft-fast's cuda backend" in proc.stderr, proc.stderr[-3000:]
    assert lock.exists()  # the user decides: nothing removed
    # stopped before writing anything: the translated sources come after the lock
    assert not (cache / "torch_extensions" / f"{name}_sources").exists()
    assert not (cache / "xdg_cache" / "torch_extensions" / f"{name}_sources").exists()


def test_a_live_build_of_the_cpu_simulation_is_waited_for_however_old_its_lock_and_its_process_named(
        cache, simulated, monkeypatch, caplog):
    monkeypatch.setattr(build_lock, "LIVE_BUILD_QUIET_S", 0.0)  # said at once (a rank's short load: after 10 s)
    lock = cache / "torch_extensions" / cuda_build.simulated_extension_name() / "lock"
    lock.parent.mkdir(parents=True)
    baton = FileBaton(str(lock))  # as torch's loader takes it, held by this process
    assert baton.try_acquire()
    ten_minutes_ago = time.time() - 600
    os.utime(lock, (ten_minutes_ago, ten_minutes_ago))  # older than the stale window: held, so a live build's
    built = object()
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: built)  # the wait is the subject, not the compiler
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(cuda_build.load()), daemon=True)
    thread.start()
    try:
        time.sleep(1.5)
        assert thread.is_alive() and not outcome, "the load went on while a live build held the lock"
        assert (f"waiting for process {os.getpid()}, which holds the lock of torch's build of {lock.parent.name} "
                f"({lock})") in caplog.text
    finally:
        baton.release()
    thread.join(timeout=10)
    assert outcome == [built]


def test_a_killed_builds_lock_of_the_gpu_build_raises_as_itself_not_as_the_backend_being_unavailable(
        cache, monkeypatch):
    """On a GPU machine (here its stand-ins): a caller that skips an unavailable backend must not skip this quietly."""
    monkeypatch.delenv(cuda_build.SIM_ENV, raising=False)
    monkeypatch.setattr(cuda_build, "unavailable_reason", lambda: None)  # a GPU, nvcc, ninja and the sources
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: loads.append(kwargs["name"]))
    lock = _dead_builds_lock(cache, "reft_fast_cuda_sm_90")
    with pytest.raises(StaleBuildLock) as raised:
        cuda_build.load()
    assert not isinstance(raised.value, cuda_build.CudaBackendUnavailable)
    assert f"rm {lock}" in str(raised.value) and "torch would wait for it forever" in str(raised.value)
    assert loads == [] and lock.exists()


def test_the_cpu_simulations_translated_sources_go_beside_its_build_in_torch_extensions_dir(
        cache, simulated, monkeypatch):
    """They went to ~/.cache/torch_extensions (XDG_CACHE_HOME) whatever TORCH_EXTENSIONS_DIR said, shared by every run
    that had moved its builds elsewhere."""
    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: loads.append(kwargs) or object())
    cuda_build.load()
    name = cuda_build.simulated_extension_name()
    translated = [Path(source) for source in loads[0]["sources"] if source.endswith("edit_forward.cpp")]
    assert translated and translated[0].parent == cache / "torch_extensions" / f"{name}_sources"
    assert not (cache / "xdg_cache").exists()
