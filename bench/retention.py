"""Retention under a steady load: the database file stops growing once old executions are deleted.

Starts the service with a tiny retention (``--retention`` seconds, as fractional
``FLEETCMD_RETENTION_DAYS``), then Sends ``--rate`` commands per second with ``--params-bytes`` of
params and a 1 s TTL to things that are not connected, so every execution becomes final
(TIMED_OUT) a second later without any device. Every ``--every`` seconds it prints the size of
the database file and its WAL. The sweep deletes in batches of 500 executions; SQLite puts the
freed pages on its free list and reuses them for new rows, so the file plateaus instead of
shrinking (a ``VACUUM`` would shrink it, but rewrites the whole file while holding the writer).

    .venv/bin/python bench/retention.py --seconds 90 --rate 200 --retention 10
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from google.protobuf import struct_pb2

from bench.procs import Procs
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc


def size(path: Path) -> int:
    """Bytes of ``path`` (0 when it does not exist yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def load(target: str, key: str, db: Path, args: argparse.Namespace) -> list[tuple[float, int, int, int]]:
    """Send at ``args.rate`` per second for ``args.seconds``; returns (elapsed, sent, db bytes, wal bytes) samples."""
    params = struct_pb2.Struct()
    params.update({"blob": "x" * args.params_bytes})
    metadata = (("authorization", f"Bearer {key}"),)
    samples: list[tuple[float, int, int, int]] = []
    sent = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CommandServiceStub(channel)
        start = time.monotonic()
        next_sample = 0.0
        while (elapsed := time.monotonic() - start) < args.seconds:
            due = int(elapsed * args.rate)
            batch = [
                stub.Send(
                    pb.SendRequest(thing_id=f"offline-{i % 100}", action="log", params=params, ttl_seconds=1), metadata=metadata
                )
                for i in range(sent, due)
            ]
            if batch:
                await asyncio.gather(*batch)
                sent = due
            if elapsed >= next_sample:
                sample = (elapsed, sent, size(db), size(db.with_name(db.name + "-wal")))
                samples.append(sample)
                print(
                    f"{sample[0]:6.1f} s  sent {sample[1]:7d}  db {sample[2] / 1e6:8.2f} MB  wal {sample[3] / 1e6:8.2f} MB",
                    flush=True,
                )
                next_sample += args.every
            await asyncio.sleep(0.01)
    return samples


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; exit 1 when the last third of the run grew the file by more than 10 %."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--rate", type=int, default=200, help="Sends per second")
    parser.add_argument("--params-bytes", type=int, default=1000)
    parser.add_argument("--retention", type=float, default=10.0, help="retention in seconds")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between two size samples")
    args = parser.parse_args(argv)
    with Procs() as procs:
        svc = procs.service(extra_env={"FLEETCMD_RETENTION_DAYS": repr(args.retention / 86400)})
        db = svc.data_dir / "fleetcmd.db"
        samples = asyncio.run(load(svc.grpc_target, svc.api_key, db, args))
    third = [s for s in samples if s[0] >= args.seconds * 2 / 3]
    if len(third) < 2:
        print("run too short to judge the plateau")
        return 0
    first, last = third[0][2] + third[0][3], third[-1][2] + third[-1][3]
    growth = (last - first) / first if first else 0.0
    print(f"last third: db+wal {first / 1e6:.2f} -> {last / 1e6:.2f} MB ({growth:+.1%})")
    return 0 if growth <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
