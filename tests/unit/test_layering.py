"""Shape-of-the-code checks that import-linter cannot express: Kopf handlers stay thin, and the
handlers package holds no number crunching (that belongs to the pure planners)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HANDLERS = Path(__file__).resolve().parents[2] / "operator" / "llama4_operator" / "handlers"
MAX_HANDLER_LINES = 30
NUMERIC_LIBRARIES = {"numpy", "scipy", "torch"}


def _kopf_handlers(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if any(d.startswith("kopf.") for d in decorators):
                found.append(node)
    return found


def _modules() -> list[Path]:
    return sorted(HANDLERS.glob("*.py"))


def test_there_are_kopf_handlers_to_check() -> None:
    handlers = [h for path in _modules() for h in _kopf_handlers(ast.parse(path.read_text()))]
    assert len(handlers) >= 4


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_kopf_handlers_are_thin(path: Path) -> None:
    for handler in _kopf_handlers(ast.parse(path.read_text())):
        length = (handler.end_lineno or handler.lineno) - handler.lineno + 1
        assert length <= MAX_HANDLER_LINES, (
            f"{path.name}:{handler.name} is {length} lines; move the logic into a planner, "
            "renderer or the reconciler and keep the Kopf handler a thin call"
        )


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_handlers_do_no_number_crunching(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in NUMERIC_LIBRARIES, f"{path.name} imports {name}"
