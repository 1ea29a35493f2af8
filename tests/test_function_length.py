"""Every function of the reft_fast package fits on a screen (60 lines, docstring and decorators included), read from
the source with ``ast`` so that nested functions and methods count on their own. The Triton kernels (kernels/, outside
the package's folder) are not checked: a kernel is one launch and reads best whole."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60
NOT_CHECKED: set = set()
CHECKED = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "reft_fast").rglob("*.py")
                 if str(path.relative_to(ROOT)) not in NOT_CHECKED)


def _function_spans(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from its first decorator to its last line) for every function and method in ``path``."""
    spans = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                spans.append((prefix + child.name, child.end_lineno - first + 1))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return spans


@pytest.mark.parametrize("relative", CHECKED)
def test_no_function_is_longer_than_a_screen(relative):
    spans = _function_spans(ROOT / relative)
    too_long = {name: lines for name, lines in spans if lines > MAX_LINES}
    assert not too_long, f"{relative}: functions over {MAX_LINES} lines: {too_long}"


def test_every_module_of_the_package_is_checked():
    assert "reft_fast/train/recipe.py" in CHECKED and "reft_fast/core/model.py" in CHECKED
    assert len(CHECKED) >= 25, CHECKED  # the package's modules, not a handful


def test_the_span_counter_sees_methods_nested_functions_and_decorators(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("@staticmethod\ndef top():\n    def inner():\n        pass\n    return inner\n\n"
                      "class Job:\n    def step(self):\n        x = 1\n        return x\n")
    assert sorted(_function_spans(source)) == [("Job.step", 3), ("top", 5), ("top.inner", 2)]


def test_the_recipe_has_the_documented_steps():
    from reft_fast.train.recipe import ReftTrainingRecipe

    for step in ("setup", "train", "train_step", "evaluate", "save_checkpoint", "finish", "cleanup", "run"):
        assert callable(getattr(ReftTrainingRecipe, step, None)), step
    assert "Features:" in ReftTrainingRecipe.__doc__
