"""The import contract: reft_fast is layered ops → core → train → compat, and every import, module-level or lazy
inside a function, points down or sideways, never up.

    reft_fast.ops     the op (kernels/ is loaded by it as reft_fast.kernels)
    reft_fast.core    interventions, positions, config, ReftModel, hf helpers
    reft_fast.train   the YAML schema, data, recipe, checkpoints, plan, fused base, cli (and the demo's files)
    reft_fast.compat  pyreft: imports anything, and nothing imports it except the package's own __init__

The test reads the sources with ``ast`` (nothing is imported), so a lazy import inside a function that only runs on a
GPU or under DeepSpeed is checked too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reft_fast"

LAYERS = {"reft_fast.kernels": 0, "reft_fast.ops": 0, "reft_fast.core": 1, "reft_fast.train": 2,
          "reft_fast.demo": 2, "reft_fast.compat": 3}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str):
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None  # the package root (reft_fast/__init__.py, __main__.py) sits above every layer


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every reft_fast import in the file; ``from reft_fast import ops`` counts as reft_fast.ops."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "reft_fast"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "reft_fast":
            if node.module == "reft_fast":
                found += [(node.lineno, f"reft_fast.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: use absolute imports (reft_fast.…)")
    return found


SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def test_the_layers_cover_every_subpackage():
    subpackages = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")} - {"reft_fast"}
    assert {s for s in subpackages if _layer(s) is None} == set()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    here = "reft_fast.kernels" if path.is_relative_to(ROOT / "kernels") else _module_name(path)
    mine = _layer(here)
    upward = []
    for line, target in _imports(path):
        theirs = _layer(target)
        if theirs is None:
            upward.append(f"line {line}: {target} (the package root imports every layer; import the module instead)")
        elif mine is not None and theirs > mine:
            upward.append(f"line {line}: {target}")
    assert upward == [], f"{here} imports from a layer above it"


def test_the_contract_catches_an_upward_import(tmp_path):
    # The checker itself: a core module importing the training layer is flagged.
    bad = PACKAGE / "core" / "_contract_probe.py"
    assert _layer(_module_name(bad)) == 1
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from reft_fast.train.recipe import ReftTrainingRecipe\n")
    assert _imports(source) == [(2, "reft_fast.train.recipe")]
    assert _layer("reft_fast.train.recipe") > _layer(_module_name(bad))
