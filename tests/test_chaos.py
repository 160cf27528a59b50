"""The SIGKILL loop of ``scripts/chaos.py``, a few cycles: no accepted execution lost, none stuck, no gap, no duplicate."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"


def _chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(150)
async def test_three_sigkill_cycles_under_mixed_load(tmp_path: Path) -> None:
    chaos = _chaos()
    seed = int(os.environ.get("FLEETCMD_TEST_SEED", "20261204"))
    fig = await chaos.run(3, data=tmp_path / "data", seed=seed, per_kind=2, callers=4)
    print(fig.line())
    assert fig.cycles == 3
    # The load really ran and really was cut: executions were accepted, events logged, calls killed.
    assert fig.accepted > 50 and fig.events > fig.accepted, fig.line()
    assert sum(fig.failed_calls.values()) > 0, fig.line()
    assert fig.unexpected_errors == [], fig.unexpected_errors
    assert (fig.lost, fig.stuck, fig.gaps, fig.duplicates, fig.mismatched, fig.out_of_order) == (0,) * 6, fig.line()
    assert fig.tracebacks == 0, fig.line()


def test_the_comparison_counts_gaps_duplicates_and_mismatches() -> None:
    # The checks the loop relies on, against a watcher that missed, repeated and misnamed events.
    chaos = _chaos()
    log = [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
    watcher = chaos.Watcher(batches=False)
    watcher.seen = [(2, "b"), (1, "a"), (2, "b"), (4, "x")]
    fig = chaos.Figures()
    chaos._compare(fig, log, watcher)
    assert (fig.gaps, fig.duplicates, fig.mismatched, fig.out_of_order) == (1, 1, 1, 1)
    assert not fig.ok
    clean = chaos.Figures()
    watcher.seen = list(log)
    chaos._compare(clean, log, watcher)
    assert clean.ok
