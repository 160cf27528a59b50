"""The "under attack" scenario: the end-to-end rate with hostile TCP clients on the MQTT port.

One real service, ``--devices`` connected devices and the closed-loop caller of the end-to-end
scenario (``SendStream``, ``--inflight`` commands in flight). Rounds alternate (Q A, A Q, ...):

* quiet: the closed loop alone for ``--window`` seconds (after a warm-up);
* attack: the same, while an attacker PROCESS (``bench.loadgen.AttackerAgent``, connecting from
  ``--source``, another loopback address than the devices') holds ``--half-open`` TCP connections
  that send nothing or the first bytes of a CONNECT (re-opening each one the service closes, so a
  CONNECT deadline always faces that many), and runs a connect-and-close storm (connect, the
  first bytes of a CONNECT, close) at ``--storm-rate`` cycles/s (0: as fast as one process can).

The figures: each round's rate, the attack/quiet ratio of each pair of rounds (target >= 0.90),
the cycles/s the attacker achieved, and the service's open descriptors (``/proc/<pid>/fd``) and
RSS (``VmRSS``) before the first attack, during each attack, after it once the CONNECT deadline
has passed (the attacker still holding its connections, re-opening none), and after the attacker
closed them. ``--fd-check`` measures the issue's sentence instead: 1,000 half-open connections and
1,000 connect-and-close cycles, descriptors and RSS before and after, and an innocent device's round
trip (and a new device's connect) before, during and after.

    .venv/bin/python bench/attack.py                  # the scenario (what bench/run.py --only attack runs)
    .venv/bin/python bench/attack.py --fd-check       # the descriptor/RSS check, printed as figures
    .venv/bin/python bench/attack.py --env FLEETCMD_MQTT_CONNECT_TIMEOUT=5

The service runs with ``FLEETCMD_MQTT_CONNECT_TIMEOUT=2`` unless ``--env`` says otherwise (a
service that does not know the setting ignores it; the figures then show half-open connections
that are never closed). ``--env`` passes any other setting, e.g. a connection cap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Agent, Procs, Service, cpu_seconds
from bench.report import attack_ratios
from bench.run import CpuWindow, connect_fleet, device_agents, raise_nofile, serve_fleet, sleep_until

# The CONNECT deadline the scenario gives the service (seconds): short, so "after the deadline"
# comes soon; the service's default is longer.
CONNECT_TIMEOUT_ENV = "FLEETCMD_MQTT_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 2.0


@dataclass
class AttackPlan:
    """What one run of the scenario does."""

    devices: int = 1000
    half_open: int = 1000
    storm_rate: float = 200.0
    storm_concurrency: int = 8
    reps: int = 3
    warmup: float = 2.0
    window: float = 10.0
    inflight: int = 64
    mode: str = "stream"
    source: str = "127.0.0.2"
    env: dict[str, str] = field(default_factory=dict)
    # Seconds to wait past the CONNECT deadline before the "after" reading.
    settle: float = 1.5
    fd_check_half_open: int = 1000
    fd_check_cycles: int = 1000


def fd_count(pid: int) -> int:
    """Open descriptors of a process (entries of /proc/<pid>/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def vm_rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (``VmRSS`` of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reading(svc: Service) -> dict[str, float]:
    """The service's open descriptors and RSS now."""
    return {"fds": fd_count(svc.pid), "rss_mb": vm_rss_mb(svc.pid)}


def service_env(plan: AttackPlan) -> dict[str, str]:
    """The service's extra environment: the scenario's CONNECT deadline unless ``plan.env`` sets one."""
    env = {CONNECT_TIMEOUT_ENV: f"{DEFAULT_CONNECT_TIMEOUT:g}"}
    env.update(plan.env)
    return env


def connect_timeout(plan: AttackPlan) -> float:
    """The CONNECT deadline the service was given, in seconds."""
    return float(service_env(plan)[CONNECT_TIMEOUT_ENV])


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[attack {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _measure(
    plan: AttackPlan, svc: Service, caller: Agent, ids: list[str], attacker: Agent, devs: list[Agent], attack: bool
) -> dict[str, Any]:
    """One round: the closed loop for warm-up + window, with or without the attack running."""
    start = time.monotonic() + 0.3
    if attack:
        held = attacker.call("hold", 120, port=svc.mqtt_port, n=plan.half_open)
        start = time.monotonic() + 0.3
        # The storm (and the re-opening of closed half-open connections) covers the whole round.
        attacker.send(
            "storm",
            port=svc.mqtt_port,
            duration=0.3 + plan.warmup + plan.window + 0.5,
            rate=plan.storm_rate,
            concurrency=plan.storm_concurrency,
            keep=plan.half_open,
        )
    caller.send(
        "run",
        things=ids,
        concurrency=plan.inflight,
        warmup=plan.warmup,
        duration=plan.window,
        start_at=start,
        mode=plan.mode,
    )
    cpu = CpuWindow({"service": [svc.pid], "attacker": [attacker.pid], "loadgen": [a.pid for a in (*devs, caller)]})
    sleep_until(start + plan.warmup)
    cpu.start()
    sleep_until(start + plan.warmup + plan.window / 2)
    during = reading(svc)
    sleep_until(start + plan.warmup + plan.window)
    usage = cpu.stop()
    r: dict[str, Any] = caller.result(plan.warmup + plan.window + 60)
    out: dict[str, Any] = {
        "kind": "attack" if attack else "quiet",
        "rate": r["rate"],
        "lat_p50_ms": r["lat_p50_ms"],
        "lat_p99_ms": r["lat_p99_ms"],
        "errors": r["errors"],
        "send_stream_error": r.get("send_stream_error", ""),
        "service_cpu_pct": usage["service_cpu_pct"],
        "attacker_cpu_pct": usage["attacker_cpu_pct"],
        "loadgen_cpu_pct": usage["loadgen_cpu_pct"],
        "machine_busy_pct": usage["machine_busy_pct"],
        "service_us_per_cmd": 1e6 * usage["service_cpu_s"] / max(1, r["commands"]),
        "during": during,
    }
    if attack:
        storm = attacker.result(plan.warmup + plan.window + 60)
        out.update(
            {
                "half_open_opened": held["held"],
                "half_open_held_min": storm["held_min"],
                "half_open_reopened": storm["reopened"],
                "half_open_refused": held["refused"] + storm["refused"],
                "storm_cycles": storm["cycles"],
                "storm_cycles_per_s": storm["cycles_per_s"],
                "storm_failed": storm["failed"],
                "attacker_errors": storm["errors"],
            }
        )
        # The storm has stopped and nothing is re-opened: the service's CONNECT deadline (if it has
        # one) closes what is still held; then the attacker closes the rest (FIN, like a client gone).
        time.sleep(connect_timeout(plan) + plan.settle)
        out["after_deadline"] = reading(svc)
        out["after_deadline"]["held_by_attacker"] = attacker.call("held", 30)["held"]
        attacker.call("release", 30)
        time.sleep(plan.settle)
        out["after_release"] = reading(svc)
    log(
        f"{out['kind']}: {out['rate']:.0f} commands/s, p50 {out['lat_p50_ms']:.1f} ms, service CPU "
        f"{out['service_cpu_pct']:.0f}%, fds {during['fds']}, RSS {during['rss_mb']:.0f} MB"
        + (
            f"; storm {out['storm_cycles_per_s']:.0f} cycles/s, half-open held >= {out['half_open_held_min']}, "
            f"re-opened {out['half_open_reopened']}; after the deadline fds {out['after_deadline']['fds']} "
            f"(attacker holds {out['after_deadline']['held_by_attacker']}), after release {out['after_release']['fds']}"
            if attack
            else ""
        )
        + (f", errors {r['errors']}" if r["errors"] else "")
    )
    return out


def scenario(p: Procs, plan: AttackPlan) -> dict[str, Any]:
    """Quiet and attack rounds, alternating, on one service; returns the results (``results["attack"]``)."""
    env = service_env(plan)
    log(f"starting the service ({', '.join(f'{k}={v}' for k, v in env.items())}) and {plan.devices} devices")
    svc, caller, ids = serve_fleet(p, plan.devices, env=env)
    devs = [a for a in p.agents if a.kind == "device"]
    attacker = p.agent("attacker", source=plan.source)
    time.sleep(0.5)
    before = reading(svc)
    rounds: list[dict[str, Any]] = []
    for rep in range(plan.reps):
        for attack in (False, True) if rep % 2 == 0 else (True, False):
            rounds.append(_measure(plan, svc, caller, ids, attacker, devs, attack))
    end = reading(svc)
    p.stop(attacker)
    return {
        "devices": plan.devices,
        "half_open": plan.half_open,
        "storm_rate": plan.storm_rate,
        "storm_concurrency": plan.storm_concurrency,
        "inflight": plan.inflight,
        "mode": plan.mode,
        "window_s": plan.window,
        "source": plan.source,
        "service_env": env,
        "before": before,
        "end": end,
        "rounds": rounds,
    }


def summary_lines(res: dict[str, Any]) -> list[str]:
    """The scenario's figures as lines of text."""

    def med(kind: str, key: str, sub: str | None = None) -> float:
        vals = [(r[sub][key] if sub else r[key]) for r in res["rounds"] if r["kind"] == kind and (sub is None or sub in r)]
        return statistics.median(vals) if vals else 0.0

    rs = attack_ratios({"results": {"attack": res}}) or []
    env = " ".join(f"{k}={v}" for k, v in res["service_env"].items())
    return [
        f"quiet: {med('quiet', 'rate'):.0f} commands/s ({res['mode']}, {res['devices']} devices, {res['inflight']} in flight; "
        f"median of {sum(r['kind'] == 'quiet' for r in res['rounds'])} rounds)",
        f"attack: {med('attack', 'rate'):.0f} commands/s with {res['half_open']} half-open connections and "
        f"{med('attack', 'storm_cycles_per_s'):.0f} connect-close cycles/s (asked {res['storm_rate']:g}/s)",
        f"attack/quiet: {statistics.median(rs) if rs else 0:.2f} (median of {len(rs)} pairs: "
        + ", ".join(f"{x:.2f}" for x in rs)
        + ")",
        f"service fds: before {res['before']['fds']}, during {med('attack', 'fds', 'during'):.0f}, "
        f"after the CONNECT deadline {med('attack', 'fds', 'after_deadline'):.0f} "
        f"(attacker still holding {med('attack', 'held_by_attacker', 'after_deadline'):.0f}), "
        f"after the attacker closed them {med('attack', 'fds', 'after_release'):.0f}",
        f"service RSS MB: before {res['before']['rss_mb']:.0f}, during {med('attack', 'rss_mb', 'during'):.0f}, "
        f"after {med('attack', 'rss_mb', 'after_release'):.0f}",
        f"service environment: {env}",
    ]


# ---- the descriptor / RSS check -------------------------------------------------------------


def fd_check(p: Procs, plan: AttackPlan) -> dict[str, Any]:
    """1,000 half-open and 1,000 connect-close cycles: descriptors, RSS and an innocent device, before/during/after."""
    env = service_env(plan)
    devices = min(plan.devices, 10)
    svc, caller, ids = serve_fleet(p, devices, env=env)
    attacker = p.agent("attacker", source=plan.source)
    innocent = ids[0]

    def round_trip(count: int = 10) -> dict[str, Any]:
        try:
            r = caller.call("sequential", 60, thing=innocent, count=count, max_s=30, mode="unary")
            return {"ok": r["samples"], "of": count, "p50_ms": r["lat_p50_ms"], "max_ms": r["lat_max_ms"]}
        except (RuntimeError, TimeoutError) as exc:
            return {"ok": 0, "of": count, "error": str(exc).splitlines()[-1][:200]}

    def new_device(name: str) -> dict[str, Any]:
        dev = device_agents(p, [name], 1)
        c = connect_fleet(dev, svc.mqtt_port, 20)
        p.stop(dev[0])
        return {"connected": c["connected"], "elapsed_s": c["elapsed_s"], "errors": c["errors"]}

    time.sleep(0.5)
    out: dict[str, Any] = {"service_env": env, "half_open": plan.fd_check_half_open, "cycles": plan.fd_check_cycles}
    out["before"] = reading(svc) | {"round_trip": round_trip()}
    t0 = time.monotonic()
    held = attacker.call("hold", 120, port=svc.mqtt_port, n=plan.fd_check_half_open)
    out["half_open_opened"] = held["held"]
    out["half_open_refused"] = held["refused"]
    out["half_open_errors"] = held["errors"]
    out["with_half_open"] = reading(svc)
    # The storm (as fast as the attacker can) while the innocent device answers commands and a new device connects.
    # The storm at the stated rate (so that it lasts: at full speed 1,000 cycles take a fraction of a
    # second), while the innocent device answers rounds of 5 commands until it ends and a new device
    # connects.
    attacker.send(
        "storm",
        port=svc.mqtt_port,
        duration=120,
        rate=plan.storm_rate,
        max_cycles=plan.fd_check_cycles,
        concurrency=plan.storm_concurrency,
    )
    rts = [round_trip(5)]
    nd = new_device("innocent-during")
    while not attacker.conn.poll(0):
        rts.append(round_trip(5))
    storm = attacker.result(180)
    rt = {"ok": sum(r["ok"] for r in rts), "of": sum(r["of"] for r in rts)}
    measured = [r for r in rts if "error" not in r]
    if measured:
        rt |= {"p50_ms": statistics.median(r["p50_ms"] for r in measured), "max_ms": max(r["max_ms"] for r in measured)}
    if len(measured) < len(rts):
        rt["error"] = next(r["error"] for r in rts if "error" in r)
    out["storm"] = {k: storm[k] for k in ("cycles", "failed", "elapsed_s", "cycles_per_s", "errors")}
    out["during"] = reading(svc) | {"round_trip": rt, "new_device": nd}
    # Past the CONNECT deadline (counted from the first half-open connection), the attacker still holding them.
    sleep_until(t0 + connect_timeout(plan) + plan.settle)
    out["after_deadline"] = reading(svc) | {"held_by_attacker": attacker.call("held", 30)["held"]}
    attacker.call("release", 30)
    time.sleep(plan.settle)
    out["after"] = reading(svc) | {"round_trip": round_trip(), "new_device": new_device("innocent-after")}
    out["fds_delta"] = out["after"]["fds"] - out["before"]["fds"]
    out["rss_delta_mb"] = out["after"]["rss_mb"] - out["before"]["rss_mb"]
    p.stop(attacker)
    with contextlib.suppress(OSError):
        out["service_cpu_s"] = cpu_seconds(svc.pid)
    return out


def fd_check_lines(res: dict[str, Any]) -> list[str]:
    """The check's figures as lines of text."""

    def rt(r: dict[str, Any]) -> str:
        if "error" in r or "p50_ms" not in r:
            return f"{r['ok']}/{r['of']} round trips ({r.get('error', '')})"
        return f"{r['ok']}/{r['of']} round trips, p50 {r['p50_ms']:.1f} ms, max {r['max_ms']:.1f} ms"

    def nd(r: dict[str, Any]) -> str:
        return f"new device {'connected' if r['connected'] else 'NOT connected'} in {r['elapsed_s']:.2f} s"

    b, d, ad, a = res["before"], res["during"], res["after_deadline"], res["after"]
    st = res["storm"]
    return [
        f"before: fds {b['fds']}, RSS {b['rss_mb']:.1f} MB; innocent device {rt(b['round_trip'])}",
        f"with {res['half_open_opened']} half-open: fds {res['with_half_open']['fds']}, "
        f"RSS {res['with_half_open']['rss_mb']:.1f} MB",
        f"{st['cycles']} connect-close cycles ({st['cycles_per_s']:.0f}/s, {st['failed']} failed): during them the innocent "
        f"device {rt(d['round_trip'])}, {nd(d['new_device'])}; right after them fds {d['fds']}, RSS {d['rss_mb']:.1f} MB",
        f"after the CONNECT deadline (attacker still holding {ad['held_by_attacker']}): fds {ad['fds']}, "
        f"RSS {ad['rss_mb']:.1f} MB",
        f"after the attacker closed them: fds {a['fds']} ({res['fds_delta']:+d}), RSS {a['rss_mb']:.1f} MB "
        f"({res['rss_delta_mb']:+.1f}); innocent device {rt(a['round_trip'])}; {nd(a['new_device'])}",
        "service environment: " + " ".join(f"{k}={v}" for k, v in res["service_env"].items()),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the scenario (or ``--fd-check``) once and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = AttackPlan()
    ap.add_argument("--fd-check", action="store_true", help="the descriptor/RSS check instead of the rate scenario")
    ap.add_argument("--devices", type=int, default=d.devices, help=f"connected devices (default {d.devices:,})")
    ap.add_argument("--half-open", type=int, default=d.half_open, help=f"half-open connections held (default {d.half_open:,})")
    ap.add_argument("--storm-rate", type=float, default=d.storm_rate, help="connect-close cycles/s, 0 = as fast as it can")
    ap.add_argument("--storm-concurrency", type=int, default=d.storm_concurrency, help="cycles in flight")
    ap.add_argument("--reps", type=int, default=d.reps, help="quiet/attack pairs (default 3)")
    ap.add_argument("--warmup", type=float, default=d.warmup, help="seconds of load before each window")
    ap.add_argument("--window", type=float, default=d.window, help="measured seconds per round")
    ap.add_argument("--inflight", type=int, default=d.inflight, help="commands in flight (default 64)")
    ap.add_argument("--mode", choices=("unary", "stream"), default=d.mode, help="Send per command, or SendStream (default)")
    ap.add_argument("--source", default=d.source, help="the attacker's source address (default 127.0.0.2)")
    ap.add_argument("--settle", type=float, default=d.settle, help="seconds past the CONNECT deadline before 'after'")
    ap.add_argument("--cycles", type=int, default=d.fd_check_cycles, help="--fd-check: connect-close cycles (default 1,000)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="service environment (repeatable)")
    args = ap.parse_args(argv)
    plan = AttackPlan(
        devices=args.devices,
        half_open=args.half_open,
        storm_rate=args.storm_rate,
        storm_concurrency=args.storm_concurrency,
        reps=max(1, args.reps),
        warmup=args.warmup,
        window=args.window,
        inflight=args.inflight,
        mode=args.mode,
        source=args.source,
        settle=args.settle,
        env=dict(kv.split("=", 1) for kv in args.env),
        fd_check_half_open=args.half_open,
        fd_check_cycles=args.cycles,
    )
    raise_nofile(plan.devices + plan.half_open + 4000)
    with Procs() as p:
        lines = fd_check_lines(fd_check(p, plan)) if args.fd_check else summary_lines(scenario(p, plan))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
