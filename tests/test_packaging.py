"""A built wheel holds every package of the source tree: pyproject lists packages explicitly (kernels/ and csrc/ are
mapped into reft_fast), so a new sub-package that is not listed works in the editable install and is missing from a
wheel."""

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
