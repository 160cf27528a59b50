"""Paired A/B: two services side by side, the same load alternating between them.

On this shared machine the figures move from one minute to the next by more than most single
changes buy (low-load latency by +-0.3 ms, the end-to-end rate by +-15 %), so runs made one after
the other cannot tell two revisions apart. Here two services run at once: A from another checkout
(``--base``, e.g. a git worktree of the revision to compare with; ``.`` for this one with other
settings) and B from this checkout, each with its own devices and its own caller process. The
rounds alternate between them (A B, then B A, ...), so both sides see the same minutes, and the
tool prints each side's median and the median of the per-round differences.

Scenarios:

* ``lowload``: a round is ``--count`` commands one at a time (10 devices), with unary ``Send``
  and with ``SendStream``; the figure is the round's p50 latency. Two copies of the same code
  (A/A) came out within 25 us in 30 rounds.
* ``steady``: a round is ``--seconds`` of closed-loop load, ``--inflight`` commands in flight
  over ``--fleet`` devices (unary ``Send``, or ``--mode stream``); the figures are the rate and
  the service's CPU per command (from ``/proc``). A/A in 12 rounds: within 5 us and 0.5 %
  (11 us and 0.1 % in a noisier hour).

    git worktree add /tmp/base HEAD~1
    .venv/bin/python bench/ab.py --base /tmp/base                      # lowload, 30 rounds
    .venv/bin/python bench/ab.py --base /tmp/base --scenario steady    # 12 rounds of 3 s
    .venv/bin/python bench/ab.py --base . --env-b FLEETCMD_EVENT_LOOP=asyncio   # a setting, same code
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Agent, Procs, Service, cpu_seconds
from bench.run import serve_fleet

SIDES = ("A", "B")


def _order(r: int) -> tuple[str, str]:
    return SIDES if r % 2 == 0 else (SIDES[1], SIDES[0])


def _lowload(sides: dict[str, tuple[Service, Agent, list[str]]], args: argparse.Namespace) -> list[str]:
    modes = args.modes.split(",")
    p50: dict[tuple[str, str], list[float]] = {(side, mode): [] for side in SIDES for mode in modes}
    for r in range(args.rounds):
        for mode in modes:
            for side in _order(r):
                _svc, caller, ids = sides[side]
                out: dict[str, Any] = caller.call("sequential", 120, thing=ids[1], count=args.count, max_s=60, mode=mode)
                p50[(side, mode)].append(out["lat_p50_ms"])
    lines = []
    for mode in modes:
        a, b = p50[("A", mode)], p50[("B", mode)]
        diffs = [y - x for x, y in zip(a, b, strict=True)]
        lines.append(
            f"{mode}: A p50 {statistics.median(a):.3f} ms, B p50 {statistics.median(b):.3f} ms, "
            f"B - A {1000 * statistics.median(diffs):+.0f} us (median of {len(diffs)} rounds; "
            f"B faster in {sum(d < 0 for d in diffs)})"
        )
    return lines


def _steady(sides: dict[str, tuple[Service, Agent, list[str]]], args: argparse.Namespace) -> list[str]:
    rate: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    warmup = 0.5
    for r in range(args.rounds):
        for side in _order(r):
            svc, caller, ids = sides[side]
            start = time.monotonic() + 0.2
            caller.send(
                "run",
                things=ids,
                concurrency=args.inflight,
                warmup=warmup,
                duration=args.seconds,
                start_at=start,
                mode=args.mode,
            )
            time.sleep(max(0.0, start + warmup - time.monotonic()))
            cpu0 = cpu_seconds(svc.pid)
            time.sleep(args.seconds)
            cpu1 = cpu_seconds(svc.pid)
            out: dict[str, Any] = caller.result(args.seconds + 60)
            rate[side].append(out["rate"])
            cpu[side].append(1e6 * (cpu1 - cpu0) / max(1, out["commands"]))
    lines = [
        f"{side}: {statistics.median(rate[side]):.0f} commands/s ({min(rate[side]):.0f}-{max(rate[side]):.0f}), "
        f"service CPU {statistics.median(cpu[side]):.0f} us per command ({min(cpu[side]):.0f}-{max(cpu[side]):.0f})"
        for side in SIDES
    ]
    cpu_diffs = [b - a for a, b in zip(cpu["A"], cpu["B"], strict=True)]
    rate_ratios = [b / a - 1 for a, b in zip(rate["A"], rate["B"], strict=True) if a]
    lines.append(
        f"B - A: {statistics.median(cpu_diffs):+.0f} us per command, {100 * statistics.median(rate_ratios):+.1f} % commands/s "
        f"(medians of {len(cpu_diffs)} rounds; B used less CPU in {sum(d < 0 for d in cpu_diffs)})"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the checkout side A runs from")
    ap.add_argument("--scenario", choices=("lowload", "steady"), default="lowload")
    ap.add_argument("--rounds", type=int, help="rounds (default 30 for lowload, 12 for steady)")
    ap.add_argument("--count", type=int, default=50, help="lowload: commands per round (default 50)")
    ap.add_argument("--modes", default="unary,stream", help="lowload: APIs, unary (Send) and/or stream (SendStream)")
    ap.add_argument("--fleet", type=int, default=200, help="steady: devices per service (default 200)")
    ap.add_argument("--inflight", type=int, default=64, help="steady: commands in flight (default 64)")
    ap.add_argument("--seconds", type=float, default=3.0, help="steady: measured seconds per round (default 3)")
    ap.add_argument("--mode", choices=("unary", "stream"), default="unary", help="steady: Send per command, or SendStream")
    ap.add_argument("--env-a", action="append", default=[], metavar="K=V", help="side A's service environment")
    ap.add_argument("--env-b", action="append", default=[], metavar="K=V", help="side B's service environment")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 30 if args.scenario == "lowload" else 12
    fleet = 10 if args.scenario == "lowload" else args.fleet
    with Procs() as p:
        sides = {
            "A": serve_fleet(p, fleet, env=dict(kv.split("=", 1) for kv in args.env_a), root=args.base.resolve()),
            "B": serve_fleet(p, fleet, env=dict(kv.split("=", 1) for kv in args.env_b)),
        }
        time.sleep(0.5)
        lines = _lowload(sides, args) if args.scenario == "lowload" else _steady(sides, args)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
