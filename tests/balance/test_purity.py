"""The balance package is in the pure ring: no asyncio, sockets, clock or uvloop (ARCHITECTURE.md §2)."""

from __future__ import annotations

import ast
from pathlib import Path

import medlb.balance

FORBIDDEN = {"asyncio", "socket", "time", "uvloop", "selectors", "threading"}
PACKAGE = Path(medlb.balance.__file__).parent


def imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_checker_sees_imports() -> None:
    assert imported_roots("import time\nfrom asyncio import sleep\nimport os.path") == {"time", "asyncio", "os"}


def test_balance_modules_import_nothing_impure() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 7
    for module in modules:
        bad = imported_roots(module.read_text()) & FORBIDDEN
        assert not bad, f"{module.name} imports {sorted(bad)}"
