"""Smoke run of ``bench/tcp_bench.py``: proves the harness works end to end, never judges a timing.

CI runs the benchmark for 1 s per test against real HAProxy, iperf3, wrk and
nginx; a broken harness (a proxy that no longer starts, a changed config
format, a parser that misses a number) shows up here instead of on the day
someone needs the numbers. The run includes medlb (observed), so it also
proves the admin API answers every scrape while traffic flows, and medlb-w
(``global.workers: N``), so it proves medlb's worker processes relay TCP.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.bench.smoke import check_medlb_w_options, load_script, parse_table, run_smoke

TOOLS = ("haproxy", "iperf3", "wrk", "nginx")
#: Cells that are legitimately not applicable: the direct path has no proxy memory to measure.
NOT_APPLICABLE = {
    ("RSS per idle session (KB)", "direct"),
    ("RSS per idle session (KB)", "medlb/direct"),
    ("RSS per idle session (KB)", "medlb-w/direct"),
}
RATIO_TITLES = ["medlb/direct", "medlb/HAProxy", "observed/medlb", "medlb-w/direct", "medlb-w/HAProxy"]
#: The scrape line under the table: requests, rounds, failures, then median/max latencies per endpoint.
SCRAPE_LINE = re.compile(
    r"^- medlb \(observed\) scrapes: (\d+) requests in (\d+) rounds .*?, (\d+) failed\. (.*)$", re.M
)


@pytest.mark.interop
@pytest.mark.timeout(240)
def test_smoke_produces_complete_numeric_table(tmp_path: Path) -> None:
    bench = load_script("tcp_bench")
    text = run_smoke("tcp_bench", TOOLS, tmp_path)
    main_table = text.split("\n## ")[0]
    header, table = parse_table(main_table)
    assert bench.PATHS == ("direct", "haproxy", "medlb", "medlb-observed", "medlb-copy", "medlb-w")
    assert header == ["Metric", *bench.PATH_TITLES.values(), *RATIO_TITLES]
    assert "medlb (observed)" in header and "medlb-w (splice)" in header
    for title in bench.METRICS.values():
        assert title in table, f"row {title!r} missing:\n{text}"
        for column, cell in zip(header[1:], table[title][1:], strict=True):
            if (title, column) in NOT_APPLICABLE:
                assert cell == "n/a", (title, column, cell)
            else:
                assert re.fullmatch(r"\d+(\.\d+)?x?", cell), f"{title} / {column}: {cell!r}\n{text}"
    targets = re.findall(r"^- .+ — \*\*(met|NOT met|not measured)\*\*$", text, re.M)
    assert len(targets) == 2 * 6 and "not measured" not in targets, text
    assert "## Targets (medlb with splice, 1 process, computed from the table)" in text
    assert re.search(r"^## Targets \(medlb-w: medlb with splice, `global.workers: \d+`, \d+ processes, ", text, re.M)
    assert re.search(r"^- Date \(UTC\): \d{4}-\d\d-\d\d", text, re.M)
    assert "- Machine: " in text
    # medlb (observed) was scraped during each of its tests, every scrape answered 200.
    scrape = SCRAPE_LINE.search(text)
    assert scrape is not None, text
    requests, rounds, failed = (int(x) for x in scrape.groups()[:3])
    assert rounds >= 4 and requests == rounds * len(bench.SCRAPE_ENDPOINTS), scrape.group(0)
    assert failed == 0, text
    assert "scrape failed" not in text
    latencies = scrape.group(4)
    for endpoint in ("/metrics", "/api/v1/status"):  # measured with the idle sessions open, too
        assert len(re.findall(re.escape(endpoint) + r" \d+\.\d/\d+\.\d ms", latencies)) == 2, latencies
    observed = [line for line in text.splitlines() if line.startswith("| medlb (observed) |")]
    assert len(observed) == len(bench.METRICS), text
    for line in observed:
        assert re.search(r"\d+ scrapes \(\d+ rounds\), 0 failed", line), line
    # medlb-w has its proxy CPU (all its processes) under Details for the bulk and rate tests.
    workers = [line for line in text.splitlines() if line.startswith("| medlb-w (splice) |")]
    assert len(workers) == len(bench.METRICS), text
    for line in workers[:3]:
        assert re.fullmatch(r"\d+\.\d\d", line.split("|")[3].strip()), line


def test_render_shows_only_the_paths_that_ran() -> None:
    """``--paths medlb,medlb-observed``: no columns (or FAIL ratios) for paths that were not measured."""
    bench = load_script("tcp_bench")
    b = bench.Bench(bench.Settings(duration=1, idle_n=10, idle_n_requested=10, smoke=True))
    try:
        results = {(p, k): float("nan") for p in bench.PATHS for k in bench.METRICS}
        for key in bench.METRICS:
            results[("medlb", key)] = 2.0
            results[("medlb-observed", key)] = 1.0
        b.scrapes.append(bench.Scrape("bulk1", 1, "/metrics", 0.0, 0.004))
        meta = dict.fromkeys(bench.collect_meta(), "x")
        text = bench.render(b, results, meta, ["medlb", "medlb-observed"])
    finally:
        b.close()
    header, table = parse_table(text.split("\n## ")[0])
    assert header == ["Metric", "medlb (splice)", "medlb (observed)", "observed/medlb"]
    assert table["RSS per idle session (KB)"][1:] == ["2.00", "1.00", "0.50x"]
    scrape = SCRAPE_LINE.search(text)
    assert scrape is not None and scrape.groups()[:3] == ("1", "1", "0"), text


def test_medlb_w_runs_medlb_splice_with_workers() -> None:
    """medlb-w is medlb (splice) with ``global.workers``: a default path with its own ratios and targets."""
    bench = load_script("tcp_bench")
    check_medlb_w_options(bench)
    b = bench.Bench(bench.Settings(duration=1, idle_n=10, idle_n_requested=10, smoke=True, medlb_workers=3))
    try:
        routes = [bench.Route("idle", 1, bench.probe_holder)]
        assert "global: {nofile: 200000, splice: true}\n" in b.medlb_config(routes, {"idle": 2}, splice=True)
        config = b.medlb_config(routes, {"idle": 2}, splice=True, workers=3)
        assert "global: {nofile: 200000, splice: true, workers: 3}\n" in config
        assert "mode: tcp" in config and "admin:" not in config
        meta = dict.fromkeys(bench.collect_meta(), "x")
        results = {(p, k): {"medlb": 0.5, "medlb-w": 2.0}.get(p, 1.0) for p in bench.PATHS for k in bench.METRICS}
        results[("direct", "idle_kb")] = None
        report = bench.render(b, results, meta, list(bench.PATHS))
        header, table = parse_table(report.split("\n## ")[0])
        assert header == ["Metric", *bench.PATH_TITLES.values(), *RATIO_TITLES]
        assert table["Bulk throughput, 1 stream (Gbit/s)"][1:] == [
            *("1.00", "1.00", "0.50", "1.00", "1.00", "2.00"),
            *("0.50x", "0.50x", "2.00x", "2.00x", "2.00x"),
        ]
        assert table["RSS per idle session (KB)"][-2:] == ["n/a", "2.00x"]
        assert "- medlb-w (splice) is medlb (splice) with `global: {nofile: 200000, splice: true, workers: 3}`" in (
            report
        )
        assert "medlb vs medlb-w (3 processes)" in report.splitlines()[0]
        one, workers = report.split("## Targets ")[1:3]
        assert one.startswith("(medlb with splice, 1 process, computed from the table)")
        assert workers.startswith("(medlb-w: medlb with splice, `global.workers: 3`, 3 processes, computed")
        assert "Bulk throughput (1 stream) >= 1.1x HAProxy: 0.50x — **NOT met**" in one
        assert "Bulk throughput (1 stream) >= 1.1x HAProxy: 2.00x — **met**" in workers
        assert "RSS per idle session < 20 KB: 2.00 KB — **met**" in workers
        # A run of medlb-w alone: its columns, ratios and targets only.
        report = bench.render(b, results, meta, ["direct", "haproxy", "medlb-w"])
        header, _ = parse_table(report.split("\n## ")[0])
        assert header == ["Metric", "direct", "HAProxy", "medlb-w (splice)", "medlb-w/direct", "medlb-w/HAProxy"]
        assert report.count("## Targets ") == 1 and "## Targets (medlb-w: " in report
    finally:
        b.close()


def test_wait_processes_waits_for_every_worker(tmp_path: Path) -> None:
    """medlb-w is measured only once all its processes run: the proxy's children count, a shortfall fails."""
    load_script("tcp_bench")
    common = sys.modules["common"]  # bench/common.py, imported by the script from its own directory
    children = common.Children(tmp_path)
    code = (
        "import subprocess, sys, time\n"
        "time.sleep(0.5)\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    try:
        proc = children.start("parent", [sys.executable, "-c", code])
        common.wait_processes(proc, 2, timeout=20)
        assert len(common.proc_group_pids(proc.pgid)) == 2
        with pytest.raises(common.BenchError, match=r"runs 2 process\(es\) after 1 s, want 3"):
            common.wait_processes(proc, 3, timeout=1)
    finally:
        children.close()
