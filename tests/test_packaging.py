"""What a user installs from: a built wheel holds every package of the source tree (pyproject lists packages
explicitly, kernels/ and csrc/ mapped into reft_fast, so a new sub-package that is not listed works in the editable
install and is missing from a wheel), and the source distribution holds the whole project."""

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_reft_fast_package_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "reft_fast").rglob("__init__.py")}
    mapped = {f"reft_fast.{name}" for name in ("kernels", "csrc") if f"reft_fast.{name}" in setuptools["package-dir"]}
    assert on_disk - listed == set(), "sub-packages missing from pyproject's [tool.setuptools] packages"
    assert listed - on_disk - mapped == set(), "pyproject lists packages that do not exist"


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the project's git checkout (the list of its files)")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.splitlines() if (ROOT / name).is_file()]


def _build(kind: str, tmp_path: Path, tracked: list[str]) -> Path:
    """Build a "wheel" or an "sdist" from a copy of the tracked files, so that the checkout's own state (build/,
    egg-info, untracked files) plays no part."""
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    build = f"from setuptools import build_meta; print(build_meta.build_{kind}(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", f"import sys; {build}", str(tmp_path / "dist")], cwd=source,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "dist" / done.stdout.split()[-1]


def test_the_source_distribution_holds_every_file_of_the_project(tmp_path):
    """setuptools alone packed the packages and tests/test_*.py only: the tests' conftest.py and helpers, configs/,
    scripts/setup.sh and requirements-lock.txt were missing, so neither the tests nor the README's commands ran from
    an unpacked sdist."""
    tracked = _tracked_files()
    with tarfile.open(_build("sdist", tmp_path, tracked)) as sdist:
        packed = {member.name.partition("/")[2] for member in sdist.getmembers() if member.isfile()}
    project_only = {".gitignore", ".ci/run"}  # the repository's own machinery, not the project's
    assert set(tracked) - project_only - packed == set()


def test_the_wheel_holds_the_licence_and_every_file_the_package_reads(tmp_path):
    """pyproject declared Apache-2.0 but the project had no licence text, so the wheel carried none (the licence
    asks every copy to carry it). Every source file of the installed packages travels too: the kernels, the CUDA
    sources and their CPU simulation, the demo's data and configs."""
    tracked = _tracked_files()
    with zipfile.ZipFile(_build("wheel", tmp_path, tracked)) as wheel:
        packed = set(wheel.namelist())
    assert "reft_fast-0.1.0.dist-info/licenses/LICENSE" in packed
    installed_as = {"reft_fast/": "reft_fast/", "kernels/": "reft_fast/kernels/", "csrc/": "reft_fast/csrc/"}
    expected = {installed_as[prefix] + name[len(prefix):] for name in tracked for prefix in installed_as
                if name.startswith(prefix) and not name.endswith(".md")}
    assert expected - packed == set()
