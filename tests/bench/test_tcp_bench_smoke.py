"""Smoke run of ``bench/tcp_bench.py``: proves the harness works end to end, never judges a timing.

CI runs the benchmark for 1 s per test against real HAProxy, iperf3, wrk and
nginx; a broken harness (a proxy that no longer starts, a changed config
format, a parser that misses a number) shows up here instead of on the day
someone needs the numbers. The run includes medlb (observed), so it also
proves the admin API answers every scrape while traffic flows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench.smoke import load_script, parse_table, run_smoke

TOOLS = ("haproxy", "iperf3", "wrk", "nginx")
#: Cells that are legitimately not applicable: the direct path has no proxy memory to measure.
NOT_APPLICABLE = {("RSS per idle session (KB)", "direct"), ("RSS per idle session (KB)", "medlb/direct")}
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
    expected_columns = ["Metric", *bench.PATH_TITLES.values(), "medlb/direct", "medlb/HAProxy", "observed/medlb"]
    assert header == expected_columns
    assert "medlb (observed)" in header
    for title in bench.METRICS.values():
        assert title in table, f"row {title!r} missing:\n{text}"
        for column, cell in zip(header[1:], table[title][1:], strict=True):
            if (title, column) in NOT_APPLICABLE:
                assert cell == "n/a", (title, column, cell)
            else:
                assert re.fullmatch(r"\d+(\.\d+)?x?", cell), f"{title} / {column}: {cell!r}\n{text}"
    targets = re.findall(r"^- .+ — \*\*(met|NOT met|not measured)\*\*$", text, re.M)
    assert len(targets) == 6 and "not measured" not in targets, text
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
