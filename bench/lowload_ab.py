"""Paired low-load A/B: two services side by side, one command at a time, alternating between them.

On this shared machine low-load latency moves by +-0.3 ms from one minute to the next, more than
most single changes buy, so runs one after the other cannot tell them apart. Here two services run
at once: A from another checkout (``--base``, e.g. a git worktree of the revision to compare with)
and B from this one, each with its own 10 devices and its own caller process. The rounds alternate
between them (A B, then B A, ...), so both sides see the same minute of the machine; each round is
``--count`` sequential commands on one side. It prints each side's median p50 over the rounds and
the median of the per-round differences. Two copies of the same code (A/A) came out within 25 us in
30 rounds.

    git worktree add /tmp/base HEAD~1
    .venv/bin/python bench/lowload_ab.py --base /tmp/base --rounds 30
    .venv/bin/python bench/lowload_ab.py --base . --env-b FLEETCMD_EVENT_LOOP=asyncio   # a setting, same code
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

from bench.procs import ROOT, Agent, Procs
from bench.run import connect_fleet, device_agents, thing_ids


def _side(p: Procs, root: Path, env: dict[str, str]) -> tuple[Agent, str]:
    """Start one service from ``root`` with 10 devices and a caller; returns the caller and its thing."""
    svc = p.service(extra_env=env, root=root)
    ids = thing_ids(10)
    devices = device_agents(p, ids, 1)
    caller = p.agent("caller", target=svc.grpc_target, api_key=svc.api_key)
    connect_fleet(devices, svc.mqtt_port, 30)
    caller.call("start", 60, probe_thing=ids[0])
    return caller, ids[1]


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print one line per API."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the checkout side A runs from")
    ap.add_argument("--rounds", type=int, default=30, help="rounds per API (default 30)")
    ap.add_argument("--count", type=int, default=50, help="sequential commands per round (default 50)")
    ap.add_argument("--modes", default="unary,stream", help="APIs to measure: unary (Send), stream (SendStream)")
    ap.add_argument("--env-a", action="append", default=[], metavar="K=V", help="side A's service environment")
    ap.add_argument("--env-b", action="append", default=[], metavar="K=V", help="side B's service environment")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    with Procs() as p:
        sides = {
            "A": _side(p, args.base.resolve(), dict(kv.split("=", 1) for kv in args.env_a)),
            "B": _side(p, ROOT, dict(kv.split("=", 1) for kv in args.env_b)),
        }
        time.sleep(0.5)
        p50: dict[tuple[str, str], list[float]] = {(side, mode): [] for side in sides for mode in modes}
        for r in range(args.rounds):
            for mode in modes:
                for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    caller, thing = sides[side]
                    out: dict[str, Any] = caller.call("sequential", 120, thing=thing, count=args.count, max_s=60, mode=mode)
                    p50[(side, mode)].append(out["lat_p50_ms"])
    for mode in modes:
        a, b = p50[("A", mode)], p50[("B", mode)]
        diffs = [y - x for x, y in zip(a, b, strict=True)]
        print(
            f"{mode}: A p50 {statistics.median(a):.3f} ms, B p50 {statistics.median(b):.3f} ms, "
            f"B - A {1000 * statistics.median(diffs):+.0f} us (median of {len(diffs)} rounds; "
            f"B faster in {sum(d < 0 for d in diffs)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
