"""``bench/lowload_ab.py``: two real services side by side, both APIs, a figure per side (a smoke run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import lowload_ab

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_the_paired_low_load_ab_measures_both_sides_with_both_apis(capsys: pytest.CaptureFixture[str]) -> None:
    assert lowload_ab.main(["--base", str(ROOT), "--rounds", "2", "--count", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["unary", "stream"]
    for line in lines:
        found = re.search(r"A p50 ([\d.]+) ms, B p50 ([\d.]+) ms, B - A [+-]\d+ us \(median of 2 rounds", line)
        assert found, line
        assert all(0 < float(ms) < 1000 for ms in found.groups())  # every round measured commands
