"""``bench/ab.py``: two real services side by side, a figure per side for each scenario (smoke runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import ab

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_the_paired_low_load_ab_measures_both_sides_with_both_apis(capsys: pytest.CaptureFixture[str]) -> None:
    assert ab.main(["--base", str(ROOT), "--rounds", "2", "--count", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["unary", "stream"]
    for line in lines:
        found = re.search(r"A p50 ([\d.]+) ms, B p50 ([\d.]+) ms, B - A [+-]\d+ us \(median of 2 rounds", line)
        assert found, line
        assert all(0 < float(ms) < 1000 for ms in found.groups())  # every round measured commands


@pytest.mark.timeout(120)
def test_the_paired_steady_ab_measures_rate_and_cpu_per_command_on_both_sides(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--base", str(ROOT), "--scenario", "steady", "--rounds", "2", "--fleet", "20", "--inflight", "8", "--seconds", "1"]
    assert ab.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["A", "B", "B - A"]
    for line in lines[:2]:
        found = re.search(r": (\d+) commands/s .*, service CPU (\d+) us per command", line)
        assert found, line
        assert int(found[1]) > 0 and int(found[2]) > 0
    assert "(medians of 2 rounds;" in lines[2]
