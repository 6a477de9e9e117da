"""The rings of ARCHITECTURE.md, enforced: imports point inward only, and the
pure rings never touch asyncio, sockets, threads or the clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "medlb"

#: Ring number of each top-level module or package; lower is more inward.
RINGS = {
    "errors": 0,
    "config": 0,
    "proto": 1,
    "model": 2,
    "balance": 2,
    "layers": 3,
    "io": 4,
    "checks": 4,
    "admin": 4,
    "kernel": 4,
    "supervisor": 5,
    "demo": 5,
    "cli": 5,
    "ctl": 5,
    "__main__": 5,
    "__init__": 0,
}
PURE = ("proto", "model", "balance", "layers")
IMPURE_MODULES = {"asyncio", "socket", "time", "uvloop", "selectors", "threading", "ssl", "subprocess"}


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def top_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_every_module_has_a_ring() -> None:
    unknown = {top_of(p) for p in modules()} - set(RINGS)
    assert not unknown, f"add these to RINGS: {unknown}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_inward(path: Path) -> None:
    mine = RINGS[top_of(path)]
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] != "medlb" or len(parts) < 2:
            continue
        theirs = RINGS[parts[1]]
        assert theirs <= mine, f"{path.relative_to(SRC)} (ring {mine}) imports {name} (ring {theirs})"


@pytest.mark.parametrize("path", [p for p in modules() if top_of(p) in PURE], ids=lambda p: str(p.relative_to(SRC)))
def test_pure_rings_do_no_io(path: Path) -> None:
    bad = {n.split(".")[0] for n in imports_of(path)} & IMPURE_MODULES
    assert not bad, f"{path.relative_to(SRC)} imports {bad}"
