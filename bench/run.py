"""fleetcmd benchmark suite: ``.venv/bin/python bench/run.py [--quick]``.

Starts the real service (``python -m server serve``) on 127.0.0.1 with port 0
in a temporary data directory, drives it from load-generator processes
(``bench/loadgen.py``), and compares the broker with mosquitto in the same run.
Prints a table (median and min-max of the repetitions), writes
``bench/results/latest.json`` and ``bench/results/latest.png``, and regenerates
the generated part of ``BENCHMARKS.md``. See BENCHMARKS.md for what each
scenario measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.procs import ROOT, Agent, Procs, Service, cpu_seconds, install_mosquitto, rss_bytes, written_bytes

RESULTS = ROOT / "bench" / "results"
SCENARIOS = ("e2e", "lowload", "raw", "connect", "fanout", "attack")


@dataclass
class Plan:
    """What one run does; ``quick`` and ``full`` below."""

    name: str
    reps: int
    e2e_fleets: list[int]
    e2e_warmup: float
    e2e_window: float
    concurrency: int
    lowload_count: int
    raw_pairs: list[int]
    raw_warmup: float
    raw_window: float
    raw_idle_devices: int
    connect_devices: int
    connect_deadline: float
    e2e_connect_deadline: float
    fanout_watchers: int
    fanout_fleet: int
    # Commands in flight while the watchers run. With 50 streams open each message waits up to
    # LINGER_MANY (20 ms) to gather events, the caller's own watcher included, so a closed loop of
    # 64 measures that pause: session 5 measured the service at 86-92 % of a core there and
    # at 94-98 % with 128 in flight (1,111-1,152 commands/s against 972-1,088).
    fanout_concurrency: int = 128
    device_agents: int = 2
    watcher_agents: int = 2
    # Under attack (bench/attack.py): quiet and attack rounds alternating on one service with
    # attack_devices devices; the attacker holds attack_half_open half-open connections and runs
    # attack_storm_rate connect-close cycles/s. The rounds use the e2e warm-up and window.
    attack_devices: int = 1000
    attack_half_open: int = 1000
    attack_storm_rate: float = 200.0
    attack_env: dict[str, str] = field(default_factory=dict)
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))


QUICK = Plan(
    name="quick",
    reps=3,
    e2e_fleets=[10, 1000],
    e2e_warmup=1.0,
    e2e_window=3.0,
    concurrency=64,
    lowload_count=200,
    raw_pairs=[1, 100],
    raw_warmup=0.5,
    raw_window=2.0,
    raw_idle_devices=1000,
    connect_devices=2000,
    connect_deadline=90,
    e2e_connect_deadline=90,
    fanout_watchers=50,
    fanout_fleet=1000,
)
FULL = Plan(
    name="full",
    reps=3,
    e2e_fleets=[10, 1000, 10000],
    e2e_warmup=2.0,
    e2e_window=10.0,
    concurrency=64,
    lowload_count=500,
    raw_pairs=[1, 100],
    raw_warmup=1.0,
    raw_window=5.0,
    raw_idle_devices=2000,
    connect_devices=10000,
    connect_deadline=75,
    e2e_connect_deadline=180,
    fanout_watchers=50,
    fanout_fleet=1000,
)


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total


class CpuWindow:
    """CPU seconds of some processes (and machine busy share) between :meth:`start` and :meth:`stop`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.t0 = 0.0
        self.c0: dict[str, float] = {}
        self.m0 = (0.0, 0.0)
        self.result: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out = {}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(OSError):
                    total += cpu_seconds(pid)
            out[name] = total
        return out

    def start(self) -> None:
        """Take the first reading."""
        self.t0 = time.monotonic()
        self.c0 = self._read()
        self.m0 = machine_cpu()

    def stop(self) -> dict[str, float]:
        """Take the second reading: ``<group>_cpu_s``, ``<group>_cpu_pct`` (of one core), ``machine_busy_pct``."""
        dt = time.monotonic() - self.t0
        c1 = self._read()
        m1 = machine_cpu()
        res: dict[str, float] = {"window_s": dt}
        for name in self.groups:
            res[f"{name}_cpu_s"] = c1[name] - self.c0[name]
            res[f"{name}_cpu_pct"] = 100 * (c1[name] - self.c0[name]) / dt if dt else 0.0
        busy, total = m1[0] - self.m0[0], m1[1] - self.m0[1]
        res["machine_busy_pct"] = 100 * busy / total if total else 0.0
        self.result = res
        return res


def sleep_until(t: float) -> None:
    """Sleep until monotonic time ``t``."""
    time.sleep(max(0.0, t - time.monotonic()))


def split(ids: list[str], n: int) -> list[list[str]]:
    """``ids`` dealt into ``n`` lists."""
    return [ids[k::n] for k in range(n) if ids[k::n]]


def thing_ids(n: int, prefix: str = "dev") -> list[str]:
    """``n`` thing ids."""
    return [f"{prefix}-{i:05d}" for i in range(n)]


def connect_fleet(agents: list[Agent], port: int, deadline_s: float, passwords: dict[str, str] | None = None) -> dict[str, Any]:
    """Connect every agent's devices at once; returns the counts and the rate."""
    start = time.monotonic() + 0.3
    for a in agents:
        pw = {t: passwords[t] for t in a_ids(a)} if passwords else None
        a.send("connect", port=port, start_at=start, deadline_s=deadline_s, passwords=pw)
    res = [a.result(deadline_s + 60) for a in agents]
    connected = sum(r["connected"] for r in res)
    failed = sum(r["failed"] for r in res)
    elapsed = max(r["t_done"] for r in res) - start
    errors: dict[str, int] = {}
    for r in res:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "connected": connected,
        "failed": failed,
        "errors": errors,
        "elapsed_s": elapsed,
        "failed_ids": [t for r in res for t in r["failed_ids"]][:20000],
        "rate": connected / elapsed if elapsed > 0 else 0.0,
        "loadgen_cpu_s": sum(r["cpu_s"] for r in res),
    }


_AGENT_IDS: dict[int, list[str]] = {}


def a_ids(agent: Agent) -> list[str]:
    """The device ids an agent was started with."""
    return _AGENT_IDS[id(agent)]


def device_agents(p: Procs, ids: list[str], n: int, mode: str = "emqx") -> list[Agent]:
    """Start ``n`` device agents sharing ``ids``."""
    agents = []
    for part in split(ids, n):
        a = p.agent("device", ids=part, mode=mode)
        _AGENT_IDS[id(a)] = part
        agents.append(a)
    return agents


def serve_fleet(
    p: Procs, fleet: int, *, env: dict[str, str] | None = None, root: Path = ROOT, connect_s: float = 60.0
) -> tuple[Service, Agent, list[str]]:
    """A service (from the checkout ``root``) with ``fleet`` connected devices and a caller whose Stream is proven live."""
    svc = p.service(extra_env=env, root=root)
    ids = thing_ids(fleet)
    devices = device_agents(p, ids, 1 if fleet <= 100 else 2)
    caller = p.agent("caller", target=svc.grpc_target, api_key=svc.api_key)
    connect_fleet(devices, svc.mqtt_port, connect_s)
    caller.call("start", 60, probe_thing=ids[0])
    return svc, caller, ids


# ---- scenarios ------------------------------------------------------------------------------


class Suite:
    """Runs the scenarios of a :class:`Plan` and collects their results."""

    def __init__(self, plan: Plan, procs: Procs, *, profile: bool = False) -> None:
        self.plan = plan
        self.p = procs
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []
        self.profile = profile

    # -- 1, 2 and 5: end to end on the real service

    def e2e(self) -> None:
        """End-to-end commands/s and latency at each fleet size; low-load latency and fan-out on the way."""
        plan = self.plan
        out: list[dict[str, Any]] = []
        self.results["e2e"] = out
        fleets = set(plan.e2e_fleets) if "e2e" in plan.scenarios else set()
        if "lowload" in plan.scenarios:
            fleets.add(min(plan.e2e_fleets))
        if "fanout" in plan.scenarios:
            fleets.add(plan.fanout_fleet)
        for fleet in sorted(fleets):
            log(f"e2e: fleet {fleet}: starting the service")
            svc = self.p.service()
            ids = thing_ids(fleet)
            devs = device_agents(self.p, ids, 1 if fleet <= 100 else plan.device_agents)
            caller = self.p.agent("caller", target=svc.grpc_target, api_key=svc.api_key)
            time.sleep(0.5)
            rss0 = rss_bytes(svc.pid)
            conn = connect_fleet(devs, svc.mqtt_port, plan.e2e_connect_deadline)
            log(f"e2e: fleet {fleet}: {conn['connected']} devices connected in {conn['elapsed_s']:.1f}s")
            time.sleep(0.5)
            conn["rss_per_device_kb"] = (rss_bytes(svc.pid) - rss0) / max(1, conn["connected"]) / 1024
            failed = set(conn.pop("failed_ids"))
            live = [t for t in ids if t not in failed] or ids[:1]
            probe = caller.call("start", 60, probe_thing=live[0])
            # reps: unary Send callers; stream_reps: the same load as items of one SendStream call.
            entry: dict[str, Any] = {"fleet": fleet, "connect": conn, "probe": probe, "reps": [], "stream_reps": []}
            out.append(entry)
            if conn["connected"] < fleet:
                self.notes.append(
                    f"e2e at {fleet} devices ran with the {conn['connected']} that connected "
                    f"within {plan.e2e_connect_deadline:.0f} s; errors {conn['errors']}"
                )
            if "lowload" in plan.scenarios and fleet == min(plan.e2e_fleets):
                self._lowload(caller, live[1 % len(live)])
            groups = {"service": [svc.pid], "loadgen": [a.pid for a in (*devs, caller)]}
            if "e2e" in plan.scenarios:
                for rep in range(plan.reps):
                    # Both APIs in every repetition, alternating which goes first (the machine is shared and noisy).
                    for mode in ("unary", "stream") if rep % 2 == 0 else ("stream", "unary"):
                        r = self._e2e_rep(caller, live, groups, rep, fleet, svc, mode=mode)
                        entry["reps" if mode == "unary" else "stream_reps"].append(r)
            if "fanout" in plan.scenarios and fleet == plan.fanout_fleet:
                self._fanout(svc, caller, live, groups)
            self.p.stop(caller)
            for a in devs:
                self.p.stop(a)
            self.p.stop(svc)

    def _e2e_rep(
        self,
        caller: Agent,
        ids: list[str],
        groups: dict[str, list[int]],
        rep: int,
        fleet: int,
        svc: Service,
        label: str = "e2e",
        mode: str = "unary",
        concurrency: int | None = None,
    ) -> dict[str, Any]:
        """One closed-loop measurement; ``mode`` ``unary`` (a ``Send`` per command) or ``stream`` (one ``SendStream``)."""
        plan = self.plan
        if mode == "stream":
            label += "-sendstream"
        start = time.monotonic() + 0.3
        caller.send(
            "run",
            things=ids,
            concurrency=concurrency or plan.concurrency,
            warmup=plan.e2e_warmup,
            duration=plan.e2e_window,
            start_at=start,
            mode=mode,
        )
        cpu = CpuWindow(groups)
        sleep_until(start + plan.e2e_warmup)
        cpu.start()
        written0 = written_bytes(svc.pid)
        prof = self._start_profile(svc, plan.e2e_window, f"{label}-{fleet}") if self.profile and rep == 0 else None
        sleep_until(start + plan.e2e_warmup + plan.e2e_window)
        usage = cpu.stop()
        written = written_bytes(svc.pid) - written0
        r = caller.result(plan.e2e_warmup + plan.e2e_window + 60)
        if prof is not None:
            self._finish_profile(prof, f"{label}-{fleet}")
        r.update(usage)
        r["service_us_per_cmd"] = 1e6 * usage["service_cpu_s"] / max(1, r["commands"])
        # What reached the disk (WAL, checkpoints) per command completed in the window.
        r["store_kb_per_cmd"] = written / 1024 / max(1, r["commands"])
        r["loadgen_us_per_cmd"] = 1e6 * usage["loadgen_cpu_s"] / max(1, r["commands"])
        r["service_rss_mb"] = rss_bytes(svc.pid) / 2**20
        log(
            f"{label}: fleet {fleet} rep {rep + 1}: {r['rate']:.0f} commands/s, p50 {r['lat_p50_ms']:.1f} ms, "
            f"p99 {r['lat_p99_ms']:.1f} ms, service CPU {usage['service_cpu_pct']:.0f}%, "
            f"loadgen CPU {usage['loadgen_cpu_pct']:.0f}%, errors {r['errors'] or 0}"
            + (f", SendStream ended: {r['send_stream_error']}" if r.get("send_stream_error") else "")
        )
        return r

    def _lowload(self, caller: Agent, thing: str) -> None:
        plan = self.plan
        # reps: each command a unary Send; stream_reps: each an item of one SendStream call.
        out: dict[str, Any] = {"fleet": min(plan.e2e_fleets), "reps": [], "stream_reps": []}
        for rep in range(plan.reps):
            # Both APIs in every repetition, alternating which goes first (the machine is shared and noisy).
            for mode in ("unary", "stream") if rep % 2 == 0 else ("stream", "unary"):
                r = caller.call("sequential", 120, thing=thing, count=plan.lowload_count, max_s=60, mode=mode)
                log(
                    f"lowload {mode} rep {rep + 1}: p50 {r['lat_p50_ms']:.2f} ms, p99 {r['lat_p99_ms']:.2f} ms "
                    f"({r['samples']} commands)"
                )
                out["reps" if mode == "unary" else "stream_reps"].append(r)
        self.results["lowload"] = out

    def _start_profile(self, svc: Service, seconds: float, name: str) -> subprocess.Popen[bytes] | None:
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            self.notes.append("--profile: py-spy is not installed in the venv (pip install py-spy)")
            return None
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"profile-{name}.txt"
        return subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(svc.pid),
                "--duration",
                str(max(1, int(seconds))),
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def _finish_profile(self, prof: subprocess.Popen[bytes], name: str) -> None:
        try:
            _, err = prof.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            prof.kill()
            prof.communicate()
            return
        out = RESULTS / f"profile-{name}.txt"
        if prof.returncode != 0 or not out.exists():
            self.notes.append(f"py-spy failed: {err.decode(errors='replace')[-200:]}")
            return
        self.results.setdefault("profile", {})[name] = report.profile_top(out)

    def _fanout(self, svc: Service, caller: Agent, ids: list[str], groups: dict[str, list[int]]) -> None:
        plan = self.plan
        log(f"fanout: opening {plan.fanout_watchers} Stream watchers")
        per = [
            plan.fanout_watchers // plan.watcher_agents + (1 if k < plan.fanout_watchers % plan.watcher_agents else 0)
            for k in range(plan.watcher_agents)
        ]
        watchers = [self.p.agent("watcher", target=svc.grpc_target, api_key=svc.api_key, n=n) for n in per if n]
        for w in watchers:
            w.call("start", 30)
        caller.call("sequential", 30, thing=ids[0], count=1, max_s=10)  # one event for every stream
        ready = sum(w.call("wait_ready", 30, timeout=20) for w in watchers)
        if ready < plan.fanout_watchers:
            self.notes.append(f"fanout: only {ready} of {plan.fanout_watchers} watchers saw the first event")
        g = {"service": groups["service"], "loadgen": groups["loadgen"] + [w.pid for w in watchers]}
        # reps: the load sent with unary Send; stream_reps: the same load as items of one SendStream
        # call. The watchers are the same in both; the order alternates (the machine is noisy).
        out: dict[str, list[dict[str, Any]]] = {"unary": [], "stream": []}
        for rep in range(plan.reps):
            for mode in ("unary", "stream") if rep % 2 == 0 else ("stream", "unary"):
                out[mode].append(self._fanout_rep(svc, caller, watchers, ids, g, rep, mode))
        self.results["fanout"] = {
            "fleet": plan.fanout_fleet,
            "watchers": plan.fanout_watchers,
            "concurrency": plan.fanout_concurrency,
            "reps": out["unary"],
            "stream_reps": out["stream"],
        }
        for w in watchers:
            self.p.stop(w)

    def _fanout_rep(
        self, svc: Service, caller: Agent, watchers: list[Agent], ids: list[str], g: dict[str, list[int]], rep: int, mode: str
    ) -> dict[str, Any]:
        """One fan-out measurement: the e2e load (``mode``) while every watcher counts its events."""
        plan = self.plan
        for w in watchers:
            w.call("reset", 10)
        seq0 = caller.call("last_seq", 10)
        r = self._e2e_rep(caller, ids, g, rep, plan.fanout_fleet, svc, "fanout", mode=mode, concurrency=plan.fanout_concurrency)
        seq1 = caller.call("last_seq", 10)
        stats = [w.call("settle", 60, last_seq=seq1, timeout=30) for w in watchers]
        expected = seq1 - seq0
        counts = [c for s in stats for c in s["count"]]
        # Complete: no gap since the reset (checked against the last event before it too), and the
        # contiguous run of events it saw covers every sequence of this rep, (seq0, seq1].
        complete = sum(
            1
            for s in stats
            for first, g_, last in zip(s["first"], s["gaps"], s["last"], strict=True)
            if g_ == 0 and first and first <= seq0 + 1 and last >= seq1
        )
        r.update(
            {
                "watchers": len(counts),
                "watchers_complete": complete,
                "events_expected_per_watcher": expected,
                "events_min_per_watcher": min(counts) if counts else 0,
                "stream_errors": [e for s in stats for e in s["errors"]][:5],
                "event_age_p50_ms": statistics.median([s["age_p50_ms"] for s in stats]),
                "event_age_p99_ms": max(s["age_p99_ms"] for s in stats),
                "events_delivered_per_s": sum(counts) / (r["window_s"] or 1),
            }
        )
        log(
            f"fanout ({mode}) rep {rep + 1}: {complete}/{len(counts)} watchers got all {expected} events; "
            f"{r['rate']:.0f} commands/s; event age p99 {r['event_age_p99_ms']:.1f} ms"
        )
        return r

    # -- 3: raw broker round trips, alternating with mosquitto

    def raw(self, mosquitto: str | None) -> None:
        """Request/response round trips through the broker, fleetcmd and mosquitto alternately."""
        plan = self.plan
        maxpairs = max(plan.raw_pairs)
        target, why = self._raw_target()
        res: dict[str, Any] = {"fleetcmd_target": target, "target_note": why, "runs": []}
        self.results["raw"] = res
        ids = thing_ids(maxpairs, "rt")
        responders = device_agents(self.p, ids, 1, mode="raw")
        requester = self.p.agent("requester", ids=ids)
        idle = (
            device_agents(self.p, thing_ids(plan.raw_idle_devices, "idle"), plan.device_agents) if plan.raw_idle_devices else []
        )
        systems = ["fleetcmd"] + (["mosquitto"] if mosquitto else [])
        for rep in range(plan.reps):
            order = systems if rep % 2 == 0 else list(reversed(systems))
            for system in order:
                if system == "mosquitto":
                    assert mosquitto is not None
                    broker: Any = self.p.mosquitto(mosquitto)
                    port = broker.port
                elif target == "service":
                    broker = self.p.service(extra_env={"FLEETCMD_ACL": "off"})
                    port = broker.mqtt_port
                else:
                    broker = self.p.harness()
                    port = broker.port
                c = connect_fleet(responders, port, 60)
                if c["connected"] != maxpairs:
                    raise RuntimeError(f"raw: {system}: only {c['connected']} responders connected: {c['errors']}")
                requester.call("connect", 60, port=port)
                if not requester.call("probe", 20):
                    raise RuntimeError(f"raw: {system}: no round trip")
                runs = [(pairs, 0) for pairs in plan.raw_pairs]
                if idle:
                    runs.append((maxpairs, plan.raw_idle_devices))
                for pairs, idle_n in runs:
                    if idle_n:
                        ci = connect_fleet(idle, port, plan.connect_deadline)
                        if ci["connected"] < idle_n:
                            self.notes.append(f"raw: {system}: {ci['connected']} of {idle_n} idle devices connected")
                        idle_n = ci["connected"]
                    start = time.monotonic() + 0.2
                    requester.send("run", start_at=start, warmup=plan.raw_warmup, duration=plan.raw_window, pairs=pairs)
                    cpu = CpuWindow({"broker": [broker.pid], "loadgen": [requester.pid] + [a.pid for a in responders]})
                    sleep_until(start + plan.raw_warmup)
                    cpu.start()
                    sleep_until(start + plan.raw_warmup + plan.raw_window)
                    usage = cpu.stop()
                    r = requester.result(plan.raw_window + 60)
                    r.update(usage)
                    r.update(
                        {
                            "system": system,
                            "rep": rep,
                            "idle": idle_n,
                            "broker_us_per_rt": 1e6 * usage["broker_cpu_s"] / max(1, r["round_trips"]),
                            "broker_rss_mb": rss_bytes(broker.pid) / 2**20,
                        }
                    )
                    log(
                        f"raw rep {rep + 1} {system} {pairs} pair(s), {idle_n} idle: {r['rate']:.0f} round trips/s, "
                        f"p50 {r['lat_p50_ms']:.2f} ms, broker CPU {usage['broker_cpu_pct']:.0f}% "
                        f"({r['broker_us_per_rt']:.0f} us/rt), loadgen CPU {usage['loadgen_cpu_pct']:.0f}%"
                    )
                    res["runs"].append(r)
                requester.call("close", 20)
                for a in (*responders, *idle):
                    a.call("close", 60)
                self.p.stop(broker)
        self.p.stop(requester)
        for a in (*responders, *idle):
            self.p.stop(a)

    def _raw_target(self) -> tuple[str, str]:
        """Whether the real service lets devices exchange plain topics (it may grow an ACL switch)."""
        svc = self.p.service(extra_env={"FLEETCMD_ACL": "off"})
        dev = device_agents(self.p, ["probe-0"], 1, mode="raw")
        c = connect_fleet(dev, svc.mqtt_port, 20)
        self.p.stop(dev[0])
        self.p.stop(svc)
        if c["connected"] == 1:
            return "service", "the service (FLEETCMD_ACL=off) lets devices use plain topics"
        why = (
            f"the service's topic ACL refuses a device's plain-topic subscription ({c['errors']}), even with "
            "FLEETCMD_ACL=off: the raw scenario runs fleetcmd's FleetBroker in bench/harness_broker.py "
            "(same class and broker_config, acl=None)"
        )
        self.notes.append(why)
        return "harness", why

    def _alive(self, agents: list[Agent]) -> list[Agent]:
        """The same device agents, a dead one replaced by a new one with the same devices (and a note)."""
        out = []
        for a in agents:
            if a.proc.is_alive():
                out.append(a)
                continue
            self.notes.append(f"device agent pid {a.pid} had died (exit code {a.proc.exitcode}); started a new one")
            log(self.notes[-1])
            ids = a_ids(a)
            self.p.stop(a)
            new = self.p.agent("device", ids=ids, mode="emqx")
            _AGENT_IDS[id(new)] = ids
            out.append(new)
        return out

    # -- 6: the end-to-end rate under attack, next to the quiet rate

    def attack(self) -> None:
        """Quiet and attack rounds alternating on one service (``bench/attack.py``)."""
        from bench.attack import AttackPlan, scenario

        plan = self.plan
        ap = AttackPlan(
            devices=plan.attack_devices,
            half_open=plan.attack_half_open,
            storm_rate=plan.attack_storm_rate,
            reps=plan.reps,
            warmup=plan.e2e_warmup,
            window=plan.e2e_window,
            inflight=plan.concurrency,
            env=dict(plan.attack_env),
        )
        self.results["attack"] = res = scenario(self.p, ap)
        errors = [r["errors"] for r in res["rounds"] if r["errors"]]
        if errors:
            self.notes.append(f"attack: caller errors in {len(errors)} rounds: {errors[:3]}")

    # -- 4: connect + subscribe rate and memory per device

    def connect(self, mosquitto: str | None) -> None:
        """Connect + subscribe rate and memory per connected device, alternating the systems."""
        plan = self.plan
        n = plan.connect_devices
        ids = thing_ids(n, "con")
        agents = device_agents(self.p, ids, plan.device_agents)
        runs: list[dict[str, Any]] = []
        self.results["connect"] = {"devices": n, "runs": runs}
        registered_dir = self.p.subdir("registered") / "data"
        passwords: dict[str, str] = {}
        systems = ["fleetcmd-anonymous", "fleetcmd-registered"] + (["mosquitto"] if mosquitto else [])
        for rep in range(plan.reps):
            order = systems if rep % 2 == 0 else list(reversed(systems))
            for system in order:
                broker: Any
                if system == "mosquitto":
                    assert mosquitto is not None
                    broker = self.p.mosquitto(mosquitto)
                    port = broker.port
                elif system == "fleetcmd-anonymous":
                    broker = self.p.service()
                    port = broker.mqtt_port
                else:
                    broker = self.p.service(data_dir=registered_dir, anonymous=False)
                    port = broker.mqtt_port
                    if not passwords:
                        caller = self.p.agent("caller", target=broker.grpc_target, api_key=broker.api_key)
                        t0 = time.monotonic()
                        passwords = caller.call("create_things", 600, ids=ids)
                        dt = time.monotonic() - t0
                        self.results["connect"]["create_things_per_s"] = n / dt
                        log(f"connect: registered {n} things in {dt:.1f}s ({n / dt:.0f}/s)")
                        self.p.stop(caller)
                        # Restart: the registered variant starts like a production service, things loaded from disk.
                        self.p.stop(broker)
                        broker = self.p.service(data_dir=registered_dir, anonymous=False)
                        port = broker.mqtt_port
                time.sleep(0.5)
                agents = self._alive(agents)
                rss0 = rss_bytes(broker.pid)
                cpu = CpuWindow({"broker": [broker.pid], "loadgen": [a.pid for a in agents]})
                cpu.start()
                c = connect_fleet(agents, port, plan.connect_deadline, passwords if system == "fleetcmd-registered" else None)
                usage = cpu.stop()
                time.sleep(1.0)
                c.pop("failed_ids", None)
                c.update(usage)
                c.update(
                    {
                        "system": system,
                        "rep": rep,
                        "rss_per_device_kb": (rss_bytes(broker.pid) - rss0) / max(1, c["connected"]) / 1024,
                        "broker_rss_mb": rss_bytes(broker.pid) / 2**20,
                        "broker_us_per_connect": 1e6 * usage["broker_cpu_s"] / max(1, c["connected"]),
                    }
                )
                log(
                    f"connect rep {rep + 1} {system}: {c['connected']}/{n} in {c['elapsed_s']:.1f}s "
                    f"({c['rate']:.0f}/s), {c['rss_per_device_kb']:.1f} KB/device, errors {c['errors'] or 0}"
                )
                if c["connected"] < n:
                    self.notes.append(
                        f"connect: {system} connected {c['connected']} of {n} within {plan.connect_deadline:.0f}s: {c['errors']}"
                    )
                runs.append(c)
                for a in agents:
                    a.call("close", 60)
                self.p.stop(broker)
        for a in agents:
            self.p.stop(a)


# ---- main -----------------------------------------------------------------------------------


def raise_nofile(need: int) -> dict[str, Any]:
    """Raise the open-files limit towards the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    new = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return {"before": soft, "hard": hard, "now": new, "enough": new >= need}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, Python, amqtt version, kernel."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "mem_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "amqtt": ver("amqtt"),
        "grpcio": ver("grpcio"),
        "uvloop": ver("uvloop"),
    }


def git_rev() -> str:
    """Short commit of the tree (``+dirty`` when it has changes)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "server", "broker_hooks"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """SIGINT (also when a non-interactive shell started us ignoring it), SIGTERM and SIGHUP end the run; cleanup runs."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    """Run the suite."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (~3 min): fleets 10 and 1,000, 2,000 connects")
    ap.add_argument("--reps", type=int, help="repetitions of each measurement (default 3)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    ap.add_argument(
        "--attack-env", action="append", default=[], metavar="K=V", help="the attack scenario's service environment (repeatable)"
    )
    ap.add_argument("--attack-storm-rate", type=float, help="attack: connect-close cycles/s (default 200; 0 = as fast as it can)")
    ap.add_argument("--attack-devices", type=int, help="attack: connected devices (default 1,000)")
    ap.add_argument("--attack-half-open", type=int, help="attack: half-open connections held (default 1,000)")
    ap.add_argument("--concurrency", type=int, help="commands in flight in the e2e scenarios (default 64)")
    ap.add_argument("--connect-devices", type=int, help="devices in the connect scenario (quick 2,000, full 10,000)")
    ap.add_argument("--connect-deadline", type=float, help="seconds one connect phase may take (quick 90, full 75)")
    ap.add_argument("--watcher-procs", type=int, help="processes sharing the fan-out watchers (default 2)")
    ap.add_argument("--no-mosquitto", action="store_true", help="do not look for or run mosquitto")
    ap.add_argument("--profile", action="store_true", help="py-spy the service during the first e2e rep of each fleet")
    ap.add_argument("--save-baseline", action="store_true", help="also store this run as the baseline the table compares with")
    ap.add_argument("--no-write", action="store_true", help="print only; leave results/ and BENCHMARKS.md alone")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON to this file")
    ap.add_argument(
        "--render",
        action="store_true",
        help="run nothing: redraw the table, plots and BENCHMARKS.md from results/latest.json and baseline.json",
    )
    args = ap.parse_args(argv)

    if args.render:
        return render()
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan.reps = max(1, args.reps)
    if args.concurrency:
        plan.concurrency = args.concurrency
    if args.connect_devices:
        plan.connect_devices = args.connect_devices
    if args.connect_deadline:
        plan.connect_deadline = args.connect_deadline
    if args.watcher_procs:
        plan.watcher_agents = max(1, args.watcher_procs)
    plan.attack_env = dict(kv.split("=", 1) for kv in args.attack_env)
    if args.attack_storm_rate is not None:
        plan.attack_storm_rate = args.attack_storm_rate
    if args.attack_devices:
        plan.attack_devices = args.attack_devices
    if args.attack_half_open is not None:
        plan.attack_half_open = args.attack_half_open
    if args.only:
        plan.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(plan.scenarios) - set(SCENARIOS)
        if unknown:
            ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    largest = max([*plan.e2e_fleets, plan.connect_devices]) if {"e2e", "connect"} & set(plan.scenarios) else 1000
    if "attack" in plan.scenarios:
        largest = max(largest, plan.attack_devices + plan.attack_half_open + 2000)
    nofile = raise_nofile(largest + 2000)
    if not nofile["enough"]:
        log(f"open-files limit {nofile['now']} is below {largest + 2000}: large fleets will fail (ulimit -n)")

    mosquitto, mosq_note = (None, "skipped (--no-mosquitto)") if args.no_mosquitto else (None, "")
    if not args.no_mosquitto and {"raw", "connect"} & set(plan.scenarios):
        mosquitto, mosq_note = install_mosquitto()
        log(f"mosquitto: {mosquitto or 'NOT AVAILABLE'} ({mosq_note})")
    mosq_version = ""
    if mosquitto:
        with contextlib.suppress(Exception):
            out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, timeout=10)
            mosq_version = (out.stdout or out.stderr).splitlines()[0]

    t_start = time.time()
    meta = {
        "plan": plan.__dict__,
        "machine": machine_info(),
        "nofile": nofile,
        "git": git_rev(),
        "mosquitto": {"binary": mosquitto, "note": mosq_note, "version": mosq_version},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t_start)),
    }
    log(f"{plan.name} run: {', '.join(plan.scenarios)}; {plan.reps} repetitions; machine {meta['machine']}")
    suite: Suite | None = None
    interrupted = False
    with terminate_on_signals(), Procs() as procs:
        suite = Suite(plan, procs, profile=args.profile)
        steps: list[tuple[str, Callable[[], None]]] = []
        if {"e2e", "lowload", "fanout"} & set(plan.scenarios):
            steps.append(("e2e", suite.e2e))
        if "raw" in plan.scenarios:
            steps.append(("raw", lambda: suite.raw(mosquitto)))  # type: ignore[union-attr]
        if "connect" in plan.scenarios:
            steps.append(("connect", lambda: suite.connect(mosquitto)))  # type: ignore[union-attr]
        if "attack" in plan.scenarios:
            steps.append(("attack", suite.attack))
        try:
            for name, step in steps:
                t0 = time.monotonic()
                try:
                    step()
                except (RuntimeError, TimeoutError, OSError) as exc:
                    suite.notes.append(f"{name} failed: {exc}".splitlines()[0][:500])
                    log(f"{name} FAILED: {exc}")
                    traceback.print_exc()
                    procs.stop_agents()
                    for m in list(procs.managed):
                        procs.stop(m)
                suite.results.setdefault("timings", {})[name] = time.monotonic() - t0
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: stopping everything")
    assert suite is not None
    meta["duration_s"] = time.time() - t_start
    if interrupted:
        meta["interrupted"] = True
    doc = {"meta": meta, "results": suite.results, "notes": suite.notes}
    baseline_path = RESULTS / "baseline.json"
    baseline = json.loads(baseline_path.read_text()) if baseline_path.exists() and not args.save_baseline else None
    rows = report.rows(doc, baseline)
    print(report.text_table(rows, doc))
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if args.no_write or interrupted:
        return 130 if interrupted else 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "attack" in suite.results:
        (RESULTS / "attack.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        report.write_attack_block(ROOT / "BENCHMARKS.md", doc)
        if plan.scenarios == ["attack"]:
            # The attack scenario alone: latest.json and the "Latest run" block keep the last suite run.
            log(f"wrote {RESULTS / 'attack.json'} and BENCHMARKS.md's attack block in {meta['duration_s']:.0f}s")
            return 0
    (RESULTS / "latest.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    report.plot(doc, RESULTS / "latest.png", baseline)
    if args.save_baseline:
        baseline_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        report.plot(doc, RESULTS / "baseline.png", None)
    report.write_benchmarks_md(ROOT / "BENCHMARKS.md", doc, rows, baseline=doc if args.save_baseline else baseline)
    log(f"wrote {RESULTS / 'latest.json'}, {RESULTS / 'latest.png'} and BENCHMARKS.md in {meta['duration_s']:.0f}s")
    return 0


def render() -> int:
    """Redraw everything from the stored results."""
    latest = json.loads((RESULTS / "latest.json").read_text())
    base_path = RESULTS / "baseline.json"
    baseline = json.loads(base_path.read_text()) if base_path.exists() else None
    same = baseline is not None and baseline["meta"]["started"] == latest["meta"]["started"]
    rows = report.rows(latest, None if same else baseline)
    print(report.text_table(rows, latest))
    report.plot(latest, RESULTS / "latest.png", None if same else baseline)
    if baseline is not None:
        report.plot(baseline, RESULTS / "baseline.png", None)
        report.write_benchmarks_md(ROOT / "BENCHMARKS.md", baseline, report.rows(baseline, None), baseline=baseline)
    report.write_benchmarks_md(ROOT / "BENCHMARKS.md", latest, rows, baseline=None)
    attack_path = RESULTS / "attack.json"
    if attack_path.exists():
        report.write_attack_block(ROOT / "BENCHMARKS.md", json.loads(attack_path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
