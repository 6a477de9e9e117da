"""Smoke run of ``bench/http_bench.py``: proves the harness works end to end, never judges a timing.

CI runs the HTTP benchmark for 1 s per test against real HAProxy (``mode
http``), nginx (plain and TLS) and wrk; a broken harness (a proxy that no
longer starts, a changed config format, a wrk report the parser misses) shows
up here instead of on the day someone needs the numbers. A medlb that answers
with errors fails it too: the bench refuses non-2xx responses as throughput.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.bench.smoke import check_medlb_w_options, load_script, parse_table, run_smoke

TOOLS = ("haproxy", "wrk", "nginx", "openssl")
NUMBER = r"\d+(\.\d+)?x?"


def expected_cell(bench: ModuleType, column: str, test: str) -> str | None:
    """What a cell must say when it is not a number: TLS cells of a path without TLS yet, and their ratios."""
    paths = {title: path for path, title in bench.PATH_TITLES.items()}
    ratios = {title: (a, b) for title, a, b in bench.RATIOS}
    if column in paths:
        return None if bench.applies(paths[column], test) else bench.TLS_PENDING
    a, b = ratios[column]
    return None if bench.applies(a, test) and bench.applies(b, test) else "n/a"


@pytest.mark.interop
@pytest.mark.timeout(240)
def test_smoke_produces_complete_numeric_table(tmp_path: Path) -> None:
    bench = load_script("http_bench")
    text = run_smoke("http_bench", TOOLS, tmp_path)
    header, table = parse_table(text.split("\n## ")[0])
    assert bench.PATHS == ("direct", "haproxy", "medlb", "medlb-w")
    ratio_titles = ["medlb/direct", "medlb/HAProxy", "medlb-w/direct", "medlb-w/HAProxy"]
    assert header == ["Metric", *bench.PATH_TITLES.values(), *ratio_titles]
    for test, title in bench.METRICS.values():
        assert title in table, f"row {title!r} missing:\n{text}"
        for column, cell in zip(header[1:], table[title][1:], strict=True):
            want = expected_cell(bench, column, test)
            if want is None:
                assert re.fullmatch(NUMBER, cell), f"{title} / {column}: {cell!r}\n{text}"
            else:
                assert cell == want, (title, column, cell)
    dummy = dict.fromkeys(((p, k) for p in bench.PATHS for k in bench.METRICS), 1.0)
    verdicts = re.findall(r"^- .+ — \*\*(met|NOT met|not measured)\*\*$", text, re.M)
    want = sum(len(bench.targets(dummy, path)) for path in bench.MEDLB_PATHS)
    assert len(verdicts) == want >= 8 and "not measured" not in verdicts, text
    assert "## Targets: medlb (1 process) against HAProxy" in text
    assert re.search(r"^## Targets: medlb-w \(`global.workers: \d+`, \d+ processes\) against HAProxy", text, re.M)
    assert re.search(r"^- Date \(UTC\): \d{4}-\d\d-\d\d", text, re.M)
    assert "- Machine: " in text
    # Every test that ran has its row under Details, with the proxy's CPU and wrk's error counts.
    for path, path_title in bench.PATH_TITLES.items():
        for test in bench.TESTS:
            rows = [line for line in text.splitlines() if line.startswith(f"| {path_title} | {test.title} |")]
            if not bench.applies(path, test.name):
                assert rows == [], rows
                continue
            assert len(rows) == 1, (path, test.name, text)
            cpu = rows[0].split("|")[3].strip()
            assert cpu == "" if path == "direct" else re.fullmatch(r"\d+\.\d\d", cpu), rows[0]
            assert "wrk errors: " in rows[0], rows[0]


def test_parse_wrk_reads_rates_units_latencies_and_errors() -> None:
    common = load_script("http_bench").common
    result = common.parse_wrk(
        """Running 1s test @ http://127.0.0.1:8080/large
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    86.51ms   20.02ms 370.00ms   80.00%
    Req/Sec    41.10     10.00    60.00     70.00%
  Latency Distribution
     50%  860.00us
     75%   90.00ms
     90%  120.00ms
     99%    1.20s
  83 requests in 1.01s, 830.12MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:     82.18
Transfer/sec:      1.50GB
"""
    )
    assert result.requests_per_s == 82.18
    assert result.requests == 83
    assert result.bytes_per_s == 1.5 * 2**30
    assert result.latency_ms == {"50": pytest.approx(0.86), "75": 90.0, "90": 120.0, "99": 1200.0}
    assert result.socket_errors == (0, 3, 0, 1)
    assert result.non_2xx == 7
    assert result.errors() == "connect/read/write/timeout 0/3/0/1 non-2xx 7"
    with pytest.raises(common.BenchError, match="unexpected wrk output"):
        common.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_medlb_is_measured_over_tls() -> None:
    """medlb terminates TLS now: its TLS cells and targets are measurements, none pending."""
    bench = load_script("http_bench")
    assert "medlb" in bench.TLS_PATHS
    b = bench.Bench(bench.Settings(duration=1, smoke=True))
    try:
        meta = dict.fromkeys(bench.collect_meta(), "x")
        results = {(p, k): 2.0 if p == "medlb" else 1.0 for p in bench.PATHS for k in bench.METRICS}
        report = bench.render(b, results, meta, list(bench.PATHS))
        assert bench.TLS_PENDING not in report
        assert "Small-response throughput over TLS >= 0.8x HAProxy: 2.00x — **met**" in report
        assert f'tls: {{certificates: [{{cert: "{b.cert}", key: "{b.key}"}}]' in b.medlb_config(1, 2)
        assert "tls:" not in b.medlb_config(1, None)
    finally:
        b.close()


def test_medlb_w_runs_medlb_with_workers_everywhere_medlb_runs() -> None:
    """medlb-w is medlb with ``global.workers``: a default path, a TLS path, with its own ratios and targets."""
    bench = load_script("http_bench")
    assert "medlb-w" in bench.PATHS and "medlb-w" in bench.TLS_PATHS
    check_medlb_w_options(bench)
    b = bench.Bench(bench.Settings(duration=1, smoke=True, medlb_workers=3))
    try:
        assert "global: {nofile: 200000}\n" in b.medlb_config(1, 2)
        assert "global: {nofile: 200000, workers: 3}\n" in b.medlb_config(1, 2, 3)
        meta = dict.fromkeys(bench.collect_meta(), "x")
        results = {(p, k): {"medlb": 0.5, "medlb-w": 2.0}.get(p, 1.0) for p in bench.PATHS for k in bench.METRICS}
        report = bench.render(b, results, meta, list(bench.PATHS))
        header, table = parse_table(report.split("\n## ")[0])
        assert header[-2:] == ["medlb-w/direct", "medlb-w/HAProxy"]
        assert table["Small responses: requests/s"][1:] == [
            *("1.0", "1.0", "0.5", "2.0"),
            *("0.50x", "0.50x", "2.00x", "2.00x"),
        ]
        assert "- medlb-w: the same medlb configuration with `global: {nofile: 200000, workers: 3}`" in report
        one, workers = report.split("## Targets: ")[1:3]
        assert one.startswith("medlb (1 process) against HAProxy")
        assert workers.startswith("medlb-w (`global.workers: 3`, 3 processes) against HAProxy")
        assert "Small-response throughput over TLS >= 0.8x HAProxy: 0.50x — **NOT met**" in one
        assert "Small-response throughput over TLS >= 0.8x HAProxy: 2.00x — **met**" in workers
        # A run of medlb-w alone: its columns, ratios and targets only.
        report = bench.render(b, results, meta, ["haproxy", "medlb-w"])
        header, _ = parse_table(report.split("\n## ")[0])
        assert header == ["Metric", "HAProxy", "medlb-w", "medlb-w/HAProxy"]
        assert report.count("## Targets: ") == 1 and "## Targets: medlb-w (" in report
    finally:
        b.close()


def test_proxy_cpu_counts_the_children_of_the_proxy(tmp_path: Path) -> None:
    """Proxy CPU covers medlb's worker processes: children of the proxy, here one that left the group."""
    common = load_script("http_bench").common
    children = common.Children(tmp_path)
    code = (
        "import os, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import os, time\\nos.setsid()\\n"
        "t = time.monotonic()\\nwhile time.monotonic() - t < 30: pass'])\n"
        "print(kid.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    kid = 0
    proc = children.start("parent", [sys.executable, "-c", code], stdout_pipe=True)
    try:
        assert proc.popen.stdout is not None
        kid = int(common.read_line(proc.popen.stdout, 20, proc.popen))
        assert kid in common.proc_group_pids(proc.pgid)
        _, cpu = common.with_cpu(proc, lambda: time.sleep(1.0))
        # The busy child, though the parent sleeps (well below 1 core: the machine may be loaded).
        assert cpu is not None and cpu > 0.2, cpu
    finally:
        children.close()
        if kid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
