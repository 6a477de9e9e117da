"""Shared by the smoke tests of ``bench/``: load a script as a module, run it with ``--smoke``, read its table."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` as a module to share its row and column titles (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"medlb_bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_smoke(name: str, tools: tuple[str, ...], tmp_path: Path) -> str:
    """``bench/<name>.py --smoke``: its markdown report; fails without the peers or on a non-zero exit."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"benchmark peers not installed: {', '.join(missing)} (make test installs them)")
    out = tmp_path / "smoke.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{name}.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


def parse_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first markdown table: its header and its rows keyed by the first cell."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) >= 3, text
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table: dict[str, list[str]] = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table (Details) starts after a blank line; stop at the first mismatch
        table[cells[0]] = cells
    return header, table


def check_medlb_w_options(bench: ModuleType) -> None:
    """Both relay benches run every path by default, rate ``medlb-w`` against direct and HAProxy,
    and take ``--medlb-workers`` (2..64, default: the cores, at least 2)."""
    assert bench.parse_args([]).paths.split(",") == list(bench.PATHS)
    assert {("medlb-w/direct", "medlb-w", "direct"), ("medlb-w/HAProxy", "medlb-w", "haproxy")} <= set(bench.RATIOS)
    assert bench.parse_args([]).medlb_workers == max(2, os.cpu_count() or 1)
    assert bench.parse_args(["--medlb-workers", "3"]).medlb_workers == 3
    for bad in ("1", "65"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--medlb-workers", bad])
