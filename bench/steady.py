"""Steady end-to-end load on one service, with CPU per command for each of its threads.

For A/B work between suite runs: the service, ``--fleet`` devices and one caller (``--inflight``
commands at once, unary ``Send`` or ``SendStream``) for ``--seconds``, then one line with the rate,
latency, and CPU per command of the event-loop thread, the SQLite writer and gRPC's own threads
(from ``/proc``). Alternate the two variants a few times in one window; the machine is noisy.

    .venv/bin/python bench/steady.py --fleet 1000 --seconds 8
    .venv/bin/python bench/steady.py --env FLEETCMD_EVENT_LOOP=asyncio
    .venv/bin/python bench/steady.py --py-spy profile.txt   # also sample the service (raw format, threads)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Procs, cpu_seconds
from bench.run import serve_fleet


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread name.

    The event-loop thread (tid == pid) is ``main``; Python's own threads (the SQLite writer and
    reader) keep the process name and add up as ``py-threads``; gRPC's threads are ``event_engine``.
    """
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = "main" if int(task.name) == pid else (task / "comm").read_text().strip()
            name = "py-threads" if name.startswith("python") else name
        except OSError:  # the thread ended meanwhile
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the load once and print one line of figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleet", type=int, default=1000, help="connected devices (default 1,000)")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window after 1 s of warm-up")
    ap.add_argument("--inflight", type=int, default=64, help="commands in flight (default 64)")
    ap.add_argument("--mode", choices=("unary", "stream"), default="unary", help="Send per command, or SendStream")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="service environment (repeatable)")
    ap.add_argument("--py-spy", type=Path, help="also record the service with py-spy into this file")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.env)
    with Procs() as p:
        svc, caller, ids = serve_fleet(p, args.fleet, env=extra)
        start = time.monotonic() + 0.3
        caller.send(
            "run", things=ids, concurrency=args.inflight, warmup=1.0, duration=args.seconds, start_at=start, mode=args.mode
        )
        time.sleep(max(0.0, start + 1.0 - time.monotonic()))
        cpu0, threads0 = cpu_seconds(svc.pid), thread_cpu(svc.pid)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(svc.pid),
                    "--duration",
                    str(max(1, int(args.seconds) - 1)),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--threads",
                    "-o",
                    str(args.py_spy),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(args.seconds)
        cpu1, threads1 = cpu_seconds(svc.pid), thread_cpu(svc.pid)
        r = caller.result(args.seconds + 60)
        if spy is not None:
            spy.wait()
    n = max(1, r["commands"])
    per_thread = " ".join(
        f"{name}={1e6 * (threads1[name] - threads0.get(name, 0.0)) / n:.0f}"
        for name in sorted(threads1)
        if threads1[name] - threads0.get(name, 0.0) > 0.05
    )
    print(
        f"{r['rate']:.0f} commands/s, p50 {r['lat_p50_ms']:.1f} ms, p99 {r['lat_p99_ms']:.1f} ms, "
        f"service CPU {1e6 * (cpu1 - cpu0) / n:.0f} us/command ({per_thread}), errors {r['errors'] or 0}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
