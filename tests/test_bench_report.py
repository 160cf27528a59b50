"""The benchmark suite's report: every target of the performance issue has a row, and BENCHMARKS.md keeps its prose.

Reads the committed ``bench/results/latest.json`` (what the last full run measured), so a run
that left a scenario out, or a report that drops a target's row, fails here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import report

ROOT = Path(__file__).resolve().parent.parent
LATEST = ROOT / "bench" / "results" / "latest.json"


@pytest.fixture(scope="module")
def latest() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(LATEST.read_text())
    return doc


def _targets(doc: dict[str, Any]) -> dict[str, list[report.Row]]:
    by_target: dict[str, list[report.Row]] = {}
    for row in report.rows(doc):
        if row["target"]:
            by_target.setdefault(row["target"], []).append(row)
    return by_target


def test_the_latest_full_run_reports_every_target_with_values(latest: dict[str, Any]) -> None:
    assert latest["meta"]["plan"]["name"] == "full"
    assert latest["meta"]["plan"]["reps"] >= 3
    targets = _targets(latest)
    expected = {
        ">= 1,500": 2,  # e2e at 1,000 devices: unary Send and SendStream
        ">= 1,200": 2,  # e2e at 10,000 devices
        "<= 1.3x the 100-device cost": 2,
        "<= 2": 2,  # low-load p50: unary Send and SendStream
        "<= 5": 2,  # low-load p99
        ">= 0.33": 3,  # raw round trips against mosquitto: 1 pair, 100 pairs, 100 pairs + idle devices
        "<= 10 (for 10,000)": 2,  # connect: anonymous and registered
        "<= 15": 2,  # KB per connected device
        ">= 1,000 with all watchers complete": 2,  # fan-out, unary and SendStream load
        "50": 2,  # watchers that received every event
    }
    assert {t: len(rows) for t, rows in targets.items() if t in expected} == expected
    for rows in targets.values():
        for row in rows:
            assert len(row["values"]) == latest["meta"]["plan"]["reps"], row["measure"]
    # The mosquitto comparison is measured in the same run, alternately.
    raw = [r for r in report.rows(latest) if r["key"].startswith("raw") and r["compare"]]
    assert raw, "no mosquitto figures next to fleetcmd's"


def test_the_load_generator_cpu_is_reported_next_to_the_service(latest: dict[str, Any]) -> None:
    measures = [r["measure"] for r in report.rows(latest)]
    assert sum("load generator CPU" in m for m in measures) >= 6
    assert sum("service CPU" in m for m in measures) >= 6


def test_rewriting_benchmarks_md_keeps_everything_outside_the_generated_block(latest: dict[str, Any], tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", md)
    before = md.read_text()
    begin, end = report.BEGIN.format(name="latest"), report.END.format(name="latest")
    head, tail = before.split(begin)[0], before.split(end)[1]
    assert "Where the issue's targets stand" in before and head and tail
    doc = dict(latest, meta=dict(latest["meta"], git="0123abc"))
    report.write_benchmarks_md(md, doc, report.rows(doc), None)
    after = md.read_text()
    assert after.startswith(head + begin) and after.endswith(end + tail)
    block = after.split(begin)[1].split(end)[0]
    assert "git `0123abc`" in block and "| measure | fleetcmd |" in block
