"""The import contract: reft_fast is layered ops → core → train → compat, and every import, module-level or lazy
inside a function, points down or sideways, never up.

    reft_fast.ops     the op (kernels/ is loaded by it as reft_fast.kernels)
    reft_fast.core    interventions, positions, config, ReftModel, hf helpers
    reft_fast.train   the YAML schema, data, recipe, checkpoints, plan, fused base, cli (and the demo's files)
    reft_fast.compat  pyreft: imports anything, and nothing imports it except the package's own __init__

A second rule: a name with a leading underscore is private to its module, so no module takes one from another
reft_fast module, neither by ``from reft_fast.x import _name`` nor as ``x._name`` on an imported module. There is no
exception for modules of the same subpackage (not even a package's ``__init__``): a helper another module needs is
part of its module's interface and gets a public name (it may still stay out of ``__all__``). Binding a public name
to a private local one (``from reft_fast.ops.library import edit as _edit``) is fine.

The tests read the sources with ``ast`` (nothing is imported), so a lazy import inside a function that only runs on a
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


# --------------------------------------------------------------------------------------------------------------------
# No private names across modules
# --------------------------------------------------------------------------------------------------------------------
def _is_module(name: str) -> bool:
    """Whether ``name`` (reft_fast.…) is a module or package of this repository (reft_fast.kernels is kernels/)."""
    parts = name.split(".")
    if parts[0] != "reft_fast":
        return False
    path = ROOT / "kernels" / Path(*parts[2:]) if parts[:2] == ["reft_fast", "kernels"] else ROOT / Path(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST):
    """``a.b.c`` for a chain of attributes on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _private_uses(path: Path) -> list[tuple[int, str]]:
    """(line, module._name) of every private name the file takes from a reft_fast module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = {}  # local name → the reft_fast module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "reft_fast":
                    local = alias.asname or alias.name.split(".")[0]
                    modules[local] = alias.name if alias.asname else "reft_fast"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "reft_fast":
            for alias in node.names:
                if _is_private(alias.name):
                    found.append((node.lineno, f"{node.module}.{alias.name}"))
                elif _is_module(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            chain = _dotted(node.value)
            if chain is None or chain.split(".")[0] not in modules:
                continue
            head, _, rest = chain.partition(".")
            target = modules[head] + (f".{rest}" if rest else "")
            if _is_module(target):
                found.append((node.lineno, f"{target}.{node.attr}"))
    return sorted(found)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_takes_a_private_name_from_another(path):
    assert _private_uses(path) == [], f"{path.relative_to(ROOT)} uses private names of other reft_fast modules"


def test_the_contract_catches_a_private_name_taken_from_another_module(tmp_path):
    # The checker itself: both spellings are flagged; public names, aliases, dunders and other objects' privates pass.
    source = tmp_path / "probe.py"
    source.write_text("import torch\n"
                      "import reft_fast.train.loading as loading\n"
                      "from reft_fast import ops\n"
                      "from reft_fast.ops.library import edit as _edit\n"
                      "import reft_fast.core.model\n"
                      "def f(self):\n"
                      "    from reft_fast.ops import _draw_seed, draw_seed\n"
                      "    self._seeds(), torch._C, ops.__name__, ops.draw_seed(), ops.Backend._x\n"
                      "    return ops._draw_seed(), loading._model_source, reft_fast.core.model._helper\n")
    assert _private_uses(source) == [(7, "reft_fast.ops._draw_seed"), (9, "reft_fast.core.model._helper"),
                                     (9, "reft_fast.ops._draw_seed"), (9, "reft_fast.train.loading._model_source")]
