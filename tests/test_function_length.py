"""No function in the package is over 80 lines (decorators, signature and docstring included): a longer
one is doing more than one thing, and is split into named steps."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def function_lengths(folder: Path) -> dict[str, int]:
    """``path:line name`` -> line count of every function and method under ``folder``."""
    lengths = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
                lengths[f"{path.relative_to(folder.parent)}:{node.lineno} {node.name}"] = node.end_lineno - start + 1
    return lengths


def test_the_counter_measures_a_function_from_its_decorator_to_its_last_line(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("@decorator\ndef f():\n    '''Doc.'''\n\n    return 1\n\n\nx = 2\n")
    assert list(function_lengths(tmp_path).values()) == [5]


def test_no_function_in_the_package_is_over_80_lines():
    lengths = {**function_lengths(ROOT / "lift3d"), **function_lengths(ROOT / "plugins")}
    assert len(lengths) > 100  # the walk found the package
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
