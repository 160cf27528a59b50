"""Replicas on PostgreSQL and mosquitto, side by side with the embedded mode, in one run.

    .venv/bin/python -m bench.replicas [--duration 10] [--warmup 3] [--concurrency 64] [--fleet 100]

Three scenarios, each a closed loop of unary ``Send`` calls whose final event a ``StreamBatches``
watcher sees (``bench.loadgen.CallerAgent``), against devices that answer every request at once
(``bench.loadgen.DeviceAgent``, EMQX topics):

* ``embedded``: one ``fleetcmd serve`` with its SQLite store and its embedded broker;
* ``replicas-1``: one replica on PostgreSQL and mosquitto (``FLEETCMD_BROKER_URL``);
* ``replicas-2``: two replicas on one PostgreSQL and one mosquitto, one caller agent per replica
  (the same total concurrency, split).

PostgreSQL is started here with ``fsync=on`` (durable commits, as SQLite's ``synchronous=FULL``),
not the tests' throwaway ``fsync=off`` server. For each scenario: commands/s, the CPU seconds of
each replica per command, and the CPU of PostgreSQL and mosquitto. The results go to
``bench/results/replicas.json``; BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from bench.procs import FIELD, READY, Agent, Managed, Procs, cpu_seconds, find_mosquitto, free_port
from bench.run import connect_fleet, device_agents, machine_info, thing_ids
from tests import pgserver

RESULTS = Path(__file__).resolve().parent / "results" / "replicas.json"


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (PostgreSQL's backends), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree (exited backends are not counted: PostgreSQL keeps its pool's open)."""
    total = 0.0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


@contextlib.contextmanager
def durable_postgres() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A PostgreSQL server with fsync on, in a temporary directory; yields (admin URL, postmaster)."""
    bindir = pgserver.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found: apt-get install postgresql")
    user = pgserver._run_as()
    root = Path(tempfile.mkdtemp(prefix="fleetcmd-bench-pg-"))
    (root / "sock").mkdir()
    if user is not None:
        pw = pwd.getpwnam(user)
        for path in (root, root / "sock"):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": str(root)}
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions"],
        check=True,
        user=user,
        env=env,
        stdout=subprocess.DEVNULL,
        cwd=root,
    )
    port = free_port()
    argv = [str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root / "sock")]
    argv += ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=100", "-c", "shared_buffers=64MB"]
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(argv, user=user, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], check=True, capture_output=True)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("postgres did not start:\n" + (root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.send_signal(2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def create_database(admin_url: str, name: str) -> str:
    """A new empty database; returns its URL."""

    async def run() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()

    asyncio.run(run())
    return admin_url.rsplit("/", 1)[0] + "/" + name


class Replica(Managed):
    """``fleetcmd serve`` as a replica: external broker (no MQTT listener), given store."""

    def __init__(self, data_dir: Path, env: dict[str, str], api_key_from: Path | None = None) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCMD_")}
        full.update(
            {
                "PYTHONUNBUFFERED": "1",
                "FLEETCMD_BIND": "127.0.0.1",
                "FLEETCMD_MQTT_PORT": "-1",
                "FLEETCMD_GRPC_PORT": "0",
                "FLEETCMD_HTTP_PORT": "0",
                "FLEETCMD_DATA_DIR": str(data_dir),
                "FLEETCMD_ALLOW_ANONYMOUS": "true",
                **env,
            }
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__("fleetcmd", [sys.executable, "-m", "server", "serve"], full, data_dir.parent / "service.log")
        deadline = time.monotonic() + 60
        ready: dict[str, str] | None = None
        while ready is None:
            for line in self.log_path.read_text(errors="replace").splitlines():
                m = READY.search(line)
                if m:
                    ready = dict(FIELD.findall(m.group("fields")))
            if ready is None:
                if not self.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"replica not ready:\n{self.log_tail()}")
                time.sleep(0.05)
        self.grpc_target = "127.0.0.1:" + ready["grpc"].rpartition(":")[2]
        self.api_key = ((api_key_from or data_dir) / "admin.key").read_text().strip()


def measure(
    p: Procs,
    callers: list[Agent],
    services: list[int],
    others: dict[str, int],
    ids: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run the callers at once; commands/s, CPU per replica and per command, CPU of the other processes."""
    start = time.monotonic() + 0.5
    share = max(1, args.concurrency // len(callers))
    for caller in callers:
        caller.send("run", things=ids, concurrency=share, warmup=args.warmup, duration=args.duration, start_at=start)
    t_window = start + args.warmup
    time.sleep(max(0.0, t_window - time.monotonic()))
    cpu0 = [cpu_seconds(pid) for pid in services]
    other0 = {name: tree_cpu(pid) for name, pid in others.items()}
    time.sleep(args.duration)
    cpu1 = [cpu_seconds(pid) for pid in services]
    other1 = {name: tree_cpu(pid) for name, pid in others.items()}
    results = [c.result(args.warmup + args.duration + 60) for c in callers]
    commands = sum(r["commands"] for r in results)
    per_replica = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    return {
        "replicas": len(services),
        "commands": commands,
        "rate": commands / args.duration,
        "lat_p50_ms": max(r["lat_p50_ms"] for r in results),
        "lat_p99_ms": max(r["lat_p99_ms"] for r in results),
        "errors": [r["errors"] for r in results],
        "stream_gaps": sum(r["stream_gaps"] for r in results),
        "replica_cpu_s": per_replica,
        "replica_cpu_pct": [100 * c / args.duration for c in per_replica],
        "service_cpu_ms_per_command": 1000 * sum(per_replica) / commands if commands else None,
        "other_cpu_pct": {name: 100 * (other1[name] - other0[name]) / args.duration for name in others},
    }


def embedded(p: Procs, args: argparse.Namespace) -> dict[str, Any]:
    """One process, SQLite, embedded broker."""
    svc = p.service()
    ids = thing_ids(args.fleet)
    devices = device_agents(p, ids, 1)
    connect_fleet(devices, svc.mqtt_port, 60)
    caller = p.agent("caller", target=svc.grpc_target, api_key=svc.api_key)
    caller.call("start", 60, probe_thing=ids[0])
    try:
        return measure(p, [caller], [svc.pid], {}, ids, args)
    finally:
        for agent in (caller, *devices):
            p.stop(agent)
        p.stop(svc)


def replicas(
    p: Procs, n: int, admin_url: str, pg: subprocess.Popen[bytes], mosquitto_binary: str, args: argparse.Namespace
) -> dict[str, Any]:
    """``n`` replicas on one fresh PostgreSQL database and one mosquitto."""
    url = create_database(admin_url, f"bench{n}_{int(time.time())}")
    broker = p.mosquitto(mosquitto_binary)
    services: list[Replica] = []
    first: Path | None = None
    for i in range(n):
        d = p.subdir(f"replica{i}") / "data"
        env = {
            "FLEETCMD_DATABASE_URL": url,
            "FLEETCMD_BROKER_URL": f"mqtt://127.0.0.1:{broker.port}",
            "FLEETCMD_BROKER_CLIENT_ID": f"fleetcmd-bench-{i}",
        }
        replica = Replica(d, env, api_key_from=first)
        p.managed.append(replica)
        services.append(replica)
        first = first or d
    ids = thing_ids(args.fleet)
    devices = device_agents(p, ids, 1)
    connect_fleet(devices, broker.port, 60)
    callers = [p.agent("caller", target=s.grpc_target, api_key=s.api_key) for s in services]
    for caller in callers:
        caller.call("start", 60, probe_thing=ids[0])
    try:
        return measure(p, callers, [s.pid for s in services], {"postgres": pg.pid, "mosquitto": broker.pid}, ids, args)
    finally:
        for agent in (*callers, *devices):
            p.stop(agent)
        for s in services:
            p.stop(s)
        p.stop(broker)


def main(argv: list[str] | None = None) -> int:
    """Run the three scenarios and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--fleet", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    mosquitto_binary = find_mosquitto()
    if mosquitto_binary is None:
        raise SystemExit("mosquitto not found: apt-get install mosquitto")
    out: dict[str, Any] = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "scenarios": {}}
    with Procs() as p:
        out["scenarios"]["embedded"] = embedded(p, args)
        print(json.dumps(out["scenarios"]["embedded"]), flush=True)
        with durable_postgres() as (admin_url, pg):
            for n in (1, 2):
                out["scenarios"][f"replicas-{n}"] = replicas(p, n, admin_url, pg, mosquitto_binary, args)
                print(json.dumps(out["scenarios"][f"replicas-{n}"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
