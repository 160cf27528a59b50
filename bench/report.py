"""Tables, plot, profile summary and the generated parts of BENCHMARKS.md."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _summary(values: list[float]) -> tuple[float, float, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def fmt_num(v: float) -> str:
    """A number with sensible precision and thousands separators."""
    if isinstance(v, int):
        return f"{v:,}"  # a count (descriptors, connections) stays a count
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt(values: list[float] | None) -> str:
    """``median (min-max)`` of the repetitions, or ``-``."""
    if not values:
        return "-"
    s = _summary(values)
    if s is None:
        return "-"
    med, lo, hi = s
    if len(values) == 1 or lo == hi:
        return fmt_num(med)
    return f"{fmt_num(med)} ({fmt_num(lo)}-{fmt_num(hi)})"


# Each API a scenario measures with: where its repetitions are kept, the suffix of its rows' keys,
# its name. Unary Send (the issue's own wording), then the same load as items of one SendStream call.
APIS = (("reps", "", "Send"), ("stream_reps", ".stream", "SendStream"))


def _reps(doc: dict[str, Any], *path: str) -> Any:
    cur: Any = doc.get("results", {})
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _e2e_entry(doc: dict[str, Any], fleet: int) -> dict[str, Any] | None:
    for e in _reps(doc, "e2e") or []:
        if e["fleet"] == fleet:
            return e
    return None


def _raw_values(doc: dict[str, Any] | None, system: str, pairs: int, key: str, idle: int = 0) -> list[float]:
    if not doc:
        return []
    return [
        r[key]
        for r in (_reps(doc, "raw", "runs") or [])
        if r["system"] == system and r["pairs"] == pairs and r.get("idle", 0) == idle
    ]


def _connect_values(doc: dict[str, Any], system: str, key: str, devices: int | None = None) -> list[float]:
    if devices is not None and _reps(doc, "connect", "devices") != devices:
        return []  # another fleet size (e.g. a quick baseline against a full run): not comparable
    return [r[key] for r in (_reps(doc, "connect", "runs") or []) if r["system"] == system]


def rows(doc: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[Row]:
    """The table rows: measure, this run's values, a comparison (mosquitto), the baseline's, the target."""
    out: list[Row] = []

    def add(
        key: str,
        measure: str,
        get: Callable[[dict[str, Any]], list[float] | None],
        target: str = "",
        compare: list[float] | None = None,
        compare_label: str = "",
    ) -> None:
        values = get(doc)
        if not values and not compare:
            return
        out.append(
            {
                "key": key,
                "measure": measure,
                "values": values or [],
                "compare": compare or [],
                "compare_label": compare_label,
                "baseline": (get(baseline) if baseline else None) or [],
                "target": target,
            }
        )

    fleets = sorted({e["fleet"] for e in (_reps(doc, "e2e") or [])})
    conc = doc.get("meta", {}).get("plan", {}).get("concurrency", 64)
    targets = {1000: ">= 1,500", 10000: ">= 1,200"}
    for fleet in fleets:
        for reps_key, kp, name in APIS:
            api = f" ({name})" if kp else ""  # the unary rows keep their first, unmarked labels

            def e2e(d: dict[str, Any], k: str, fleet: int = fleet, reps_key: str = reps_key) -> list[float] | None:
                e = _e2e_entry(d, fleet)
                if not e:
                    return None
                # Older results (the baseline) may lack a measure added since.
                return [r[k] for r in e.get(reps_key, []) if k in r] or None

            add(
                f"e2e.{fleet}{kp}.rate",
                f"end-to-end commands/s{api}, {fleet:,} devices",
                lambda d, f=e2e: f(d, "rate"),
                targets.get(fleet, ""),
            )
            add(f"e2e.{fleet}{kp}.p50", f"  latency p50 ms ({conc} in flight)", lambda d, f=e2e: f(d, "lat_p50_ms"))
            add(f"e2e.{fleet}{kp}.p99", f"  latency p99 ms ({conc} in flight)", lambda d, f=e2e: f(d, "lat_p99_ms"))
            add(
                f"e2e.{fleet}{kp}.svc_us",
                "  service CPU per command, us",
                lambda d, f=e2e: f(d, "service_us_per_cmd"),
                "<= 1.3x the 100-device cost" if fleet == 10000 else "",
            )
            add(f"e2e.{fleet}{kp}.svc_cpu", "  service CPU, % of one core", lambda d, f=e2e: f(d, "service_cpu_pct"))
            add(f"e2e.{fleet}{kp}.disk_kb", "  written to disk per command, KB", lambda d, f=e2e: f(d, "store_kb_per_cmd"))
            add(f"e2e.{fleet}{kp}.lg_cpu", "  load generator CPU, % of one core", lambda d, f=e2e: f(d, "loadgen_cpu_pct"))
            add(f"e2e.{fleet}{kp}.busy", "  machine busy, % of all cores", lambda d, f=e2e: f(d, "machine_busy_pct"))

    for reps_key, kp, label in APIS:

        def low(d: dict[str, Any], k: str, reps_key: str = reps_key) -> list[float] | None:
            # Older results (the baseline) have no SendStream repetitions.
            reps = _reps(d, "lowload", reps_key)
            return [r[k] for r in reps] if reps else None

        add(
            f"low{kp}.p50",
            f"low-load latency p50 ms, {label} (1 caller, one at a time)",
            lambda d, f=low: f(d, "lat_p50_ms"),
            "<= 2",
        )
        add(f"low{kp}.p99", f"  low-load latency p99 ms, {label}", lambda d, f=low: f(d, "lat_p99_ms"), "<= 5")

    raw_runs = _reps(doc, "raw", "runs") or []
    raw_kinds = sorted({(r.get("idle", 0), r["pairs"]) for r in raw_runs})
    has_mosq = any(r["system"] == "mosquitto" for r in raw_runs)
    target_note = " [harness]" if _reps(doc, "raw", "fleetcmd_target") == "harness" else ""
    for idle, pairs in raw_kinds:

        def raw(d: dict[str, Any], k: str, pairs: int = pairs, idle: int = idle) -> list[float] | None:
            return _raw_values(d, "fleetcmd", pairs, k, idle) or None

        def ratio(d: dict[str, Any], pairs: int = pairs, idle: int = idle) -> list[float] | None:
            fl = _raw_values(d, "fleetcmd", pairs, "rate", idle)
            mo = _raw_values(d, "mosquitto", pairs, "rate", idle)
            return [f / m for f, m in zip(fl, mo, strict=False) if m] or None

        def mosq(k: str, pairs: int = pairs, idle: int = idle) -> list[float] | None:
            return _raw_values(doc, "mosquitto", pairs, k, idle) if has_mosq else None

        extra = f" + {idle:,} idle subscribed devices" if idle else ""
        key = f"raw.{pairs}" + (f".idle{idle}" if idle else "")
        add(
            f"{key}.rate",
            f"broker round trips/s, {pairs} pair(s){extra}, QoS 1{target_note}",
            lambda d, f=raw: f(d, "rate"),
            ">= 1/3 of mosquitto",
            mosq("rate"),
            "mosquitto",
        )
        if has_mosq:
            add(f"{key}.ratio", "  fleetcmd / mosquitto", ratio, ">= 0.33")
        add(
            f"{key}.us",
            "  broker CPU per round trip, us",
            lambda d, f=raw: f(d, "broker_us_per_rt"),
            "",
            mosq("broker_us_per_rt"),
            "mosquitto",
        )
        add(f"{key}.p50", "  round-trip latency p50 ms", lambda d, f=raw: f(d, "lat_p50_ms"), "", mosq("lat_p50_ms"), "mosquitto")

    n = _reps(doc, "connect", "devices")
    if n:
        has_mosq_c = bool(_connect_values(doc, "mosquitto", "rate"))
        deadline = doc.get("meta", {}).get("plan", {}).get("connect_deadline", 0)
        for system, label in (("fleetcmd-anonymous", "anonymous"), ("fleetcmd-registered", "registered things")):
            if not _connect_values(doc, system, "rate"):
                continue
            sub = [
                # (key suffix, measure, field, target); the first is the scenario's own row.
                ("rate", f"connect+subscribe/s, {n:,} devices, {label}", "rate", ""),
                ("time", f"  seconds to connect {n:,} (or to the deadline)", "elapsed_s", "<= 10 (for 10,000)"),
                ("kb", "  service memory per connected device, KB", "rss_per_device_kb", "<= 15"),
                ("us", "  broker CPU per connect, us", "broker_us_per_connect", ""),
                ("lg", "  load generator CPU, % of one core", "loadgen_cpu_pct", ""),
            ]
            if any(c < n for c in _connect_values(doc, system, "connected")):
                sub.insert(1, ("n", f"  devices connected within the deadline ({deadline:.0f} s)", "connected", f"{n:,}"))
            for suffix, measure, fld, target in sub:
                add(
                    f"connect.{system}.{suffix}",
                    measure,
                    lambda d, s=system, f=fld: _connect_values(d, s, f, n) or None,
                    target,
                    _connect_values(doc, "mosquitto", fld) if has_mosq_c else None,
                    "mosquitto",
                )

    fo = _reps(doc, "fanout")
    if fo:
        # Recorded since session 5 (128); earlier runs used the e2e scenarios' 64.
        inflight = f", {fo.get('concurrency', 64)} in flight"
        # stream_reps: since session 3.
        for kind, kp, name in APIS:
            how = f" (load sent with {name})" if kp else ""

            def fan(d: dict[str, Any], k: str, kind: str = kind) -> list[float] | None:
                reps = _reps(d, "fanout", kind)
                return [r[k] for r in reps] if reps else None

            if kind == "stream_reps" and not fo.get(kind):
                continue
            add(
                f"fanout{kp}.rate",
                f"commands/s with {fo['watchers']} Stream watchers, {fo['fleet']:,} devices{inflight}{how}",
                lambda d, f=fan: f(d, "rate"),
                ">= 1,000 with all watchers complete",
            )
            add(
                f"fanout{kp}.complete",
                "  watchers that received every event",
                lambda d, f=fan: f(d, "watchers_complete"),
                f"{fo['watchers']}",
            )
            add(f"fanout{kp}.events", "  events delivered/s (all watchers)", lambda d, f=fan: f(d, "events_delivered_per_s"))
            add(f"fanout{kp}.age99", "  event age at the watcher p99 ms", lambda d, f=fan: f(d, "event_age_p99_ms"))
            add(f"fanout{kp}.svc_cpu", "  service CPU, % of one core", lambda d, f=fan: f(d, "service_cpu_pct"))

    out += attack_rows(doc, baseline)
    return out


def _attack_values(doc: dict[str, Any] | None, kind: str, key: str, sub: str | None = None) -> list[float] | None:
    rounds = _reps(doc, "attack", "rounds") if doc else None
    if not rounds:
        return None
    # Older results may lack a measure added since.
    vals = [(r[sub][key] if sub else r[key]) for r in rounds if r["kind"] == kind and (key in r if sub is None else sub in r)]
    return vals or None


def attack_ratios(doc: dict[str, Any] | None) -> list[float] | None:
    """Attack/quiet rate of each repetition: the two rounds measured next to each other (Q A, then A Q, ...)."""
    rounds = (_reps(doc, "attack", "rounds") if doc else None) or []
    out = []
    for k in range(0, len(rounds) - 1, 2):
        pair = {r["kind"]: r["rate"] for r in rounds[k : k + 2]}
        if pair.get("quiet") and "attack" in pair:
            out.append(pair["attack"] / pair["quiet"])
    return out or None


def attack_rows(doc: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[Row]:
    """The "under attack" rows (``bench/attack.py``): quiet and attack rates side by side, the attacker, fds and RSS."""
    res = _reps(doc, "attack")
    if not res:
        return []
    api = {"stream": "SendStream", "unary": "Send"}.get(res.get("mode", "stream"), res.get("mode", ""))

    def before(d: dict[str, Any] | None, key: str) -> list[float] | None:
        b = _reps(d, "attack", "before") if d else None
        return [b[key]] if b else None

    specs: list[tuple[str, str, Callable[[dict[str, Any] | None], list[float] | None], str]] = [
        (
            "attack.quiet.rate",
            f"end-to-end commands/s ({api}), {res['devices']:,} devices, quiet rounds",
            lambda d: _attack_values(d, "quiet", "rate"),
            "",
        ),
        (
            "attack.rate",
            f"  under attack: {res['half_open']:,} half-open + connect-close storm ({res['storm_rate']:g}/s asked)",
            lambda d: _attack_values(d, "attack", "rate"),
            ">= 0.90x quiet",
        ),
        ("attack.ratio", "  under attack / quiet (each pair of rounds)", attack_ratios, ">= 0.90"),
        ("attack.quiet.p99", "  latency p99 ms, quiet", lambda d: _attack_values(d, "quiet", "lat_p99_ms"), ""),
        ("attack.p99", "  latency p99 ms, under attack", lambda d: _attack_values(d, "attack", "lat_p99_ms"), ""),
        ("attack.cycles", "  attacker's connect-close cycles/s", lambda d: _attack_values(d, "attack", "storm_cycles_per_s"), ""),
        (
            "attack.held",
            "  half-open connections held (fewest during a round)",
            lambda d: _attack_values(d, "attack", "half_open_held_min"),
            "",
        ),
        (
            "attack.reopened",
            "  half-open connections re-opened after the service closed them",
            lambda d: _attack_values(d, "attack", "half_open_reopened"),
            "",
        ),
        (
            "attack.refused",
            "  half-open connections refused at once (closed within 0.5 s; not re-opened)",
            lambda d: _attack_values(d, "attack", "half_open_refused"),
            "",
        ),
        (
            "attack.quiet.svc_cpu",
            "  service CPU, % of one core, quiet",
            lambda d: _attack_values(d, "quiet", "service_cpu_pct"),
            "",
        ),
        (
            "attack.svc_cpu",
            "  service CPU, % of one core, under attack",
            lambda d: _attack_values(d, "attack", "service_cpu_pct"),
            "",
        ),
        ("attack.att_cpu", "  attacker CPU, % of one core", lambda d: _attack_values(d, "attack", "attacker_cpu_pct"), ""),
        (
            "attack.busy",
            "  machine busy under attack, % of all cores",
            lambda d: _attack_values(d, "attack", "machine_busy_pct"),
            "",
        ),
        ("attack.fds.before", "  service open descriptors before the first attack", lambda d: before(d, "fds"), ""),
        (
            "attack.fds.during",
            "  service open descriptors during an attack",
            lambda d: _attack_values(d, "attack", "fds", "during"),
            "",
        ),
        (
            "attack.fds.deadline",
            "  service open descriptors once the CONNECT deadline passed (attacker still connected)",
            lambda d: _attack_values(d, "attack", "fds", "after_deadline"),
            "= before",
        ),
        (
            "attack.fds.after",
            "  service open descriptors after the attacker closed its connections",
            lambda d: _attack_values(d, "attack", "fds", "after_release"),
            "= before",
        ),
        ("attack.rss.before", "  service RSS MB before the first attack", lambda d: before(d, "rss_mb"), ""),
        ("attack.rss.during", "  service RSS MB during an attack", lambda d: _attack_values(d, "attack", "rss_mb", "during"), ""),
        (
            "attack.rss.after",
            "  service RSS MB after an attack",
            lambda d: _attack_values(d, "attack", "rss_mb", "after_release"),
            "",
        ),
    ]
    out: list[Row] = []
    for key, measure, get, target in specs:
        values = get(doc)
        if not values:
            continue
        out.append(
            {
                "key": key,
                "measure": measure,
                "values": values,
                "compare": [],
                "compare_label": "",
                "baseline": (get(baseline) if baseline else None) or [],
                "target": target,
            }
        )
    return out


def _table(rows_: list[Row], doc: dict[str, Any], md: bool) -> str:
    has_cmp = any(r["compare"] for r in rows_)
    has_base = any(r["baseline"] for r in rows_)
    head = ["measure", "fleetcmd"]
    if has_cmp:
        head.append("mosquitto")
    if has_base:
        head.append("baseline")
    head.append("target")
    body = []
    for r in rows_:
        line = [r["measure"].strip() if md else r["measure"], fmt(r["values"])]
        if has_cmp:
            line.append(fmt(r["compare"]) if r["compare"] else "")
        if has_base:
            line.append(fmt(r["baseline"]) if r["baseline"] else "")
        line.append(r["target"])
        if md and r["measure"].startswith("  "):
            line[0] = "&nbsp;&nbsp;" + line[0]
        body.append(line)
    if md:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in body]
        return "\n".join(out)
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(out)


def text_table(rows_: list[Row], doc: dict[str, Any]) -> str:
    """The console table, with the notes."""
    meta = doc["meta"]
    m = meta["machine"]
    reps = meta["plan"]["reps"]
    lines = [
        "",
        f"fleetcmd bench ({meta['plan']['name']}, {reps} repetitions: median (min-max)), {meta['started']}, "
        f"git {meta['git']}, {meta.get('duration_s', 0):.0f}s",
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, amqtt {m['amqtt']}",
        "",
        _table(rows_, doc, md=False),
    ]
    if doc.get("notes"):
        lines += ["", "notes:"] + [f"- {n}" for n in doc["notes"]]
    prof = _reps(doc, "profile")
    if prof:
        for fleet, top in prof.items():
            lines += ["", f"py-spy, {fleet} devices: top functions by own time (% of samples)"]
            lines += [f"  {p:5.1f}%  {fn}" for fn, p in top["self"][:12]]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path, baseline: dict[str, Any] | None) -> None:
    """Throughput and latency against fleet size, raw round trips and connect costs, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax_t, ax_l, ax_r, ax_c = axes[0][0], axes[0][1], axes[1][0], axes[1][1]

    def series(d: dict[str, Any], key: str, reps_key: str = "reps") -> tuple[list[int], list[float], list[float], list[float]]:
        xs, med, lo, hi = [], [], [], []
        for e in sorted(_reps(d, "e2e") or [], key=lambda e: e["fleet"]):
            s = _summary([r[key] for r in e.get(reps_key, [])])
            if s:
                xs.append(e["fleet"])
                med.append(s[0])
                lo.append(s[0] - s[1])
                hi.append(s[2] - s[0])
        return xs, med, lo, hi

    for d, style, label in ((doc, "-o", "latest"), (baseline, "--s", "baseline")):
        if not d:
            continue
        xs, med, lo, hi = series(d, "rate")
        if xs:
            ax_t.errorbar(xs, med, yerr=[lo, hi], fmt=style, capsize=4, label=f"{label}")
        xs, med, lo, hi = series(d, "rate", "stream_reps")
        if xs:
            ax_t.errorbar(xs, med, yerr=[lo, hi], fmt=style, capsize=4, label=f"{label} SendStream")
        for key, color in (("lat_p50_ms", "tab:blue"), ("lat_p99_ms", "tab:red")):
            xs, med, lo, hi = series(d, key)
            if xs:
                ax_l.errorbar(
                    xs,
                    med,
                    yerr=[lo, hi],
                    fmt=style,
                    color=color,
                    capsize=4,
                    label=f"{label} {key[4:7]}",
                    alpha=1 if d is doc else 0.5,
                )
    low = _reps(doc, "lowload")
    if low:
        for reps_key, kp, name in APIS:
            marker, api = ("P", f" {name}") if kp else ("*", "")
            for key, color in (("lat_p50_ms", "tab:blue"), ("lat_p99_ms", "tab:red")):
                s = _summary([r[key] for r in low.get(reps_key, [])])
                if s:
                    ax_l.plot(
                        [low["fleet"]],
                        [s[0]],
                        marker=marker,
                        markersize=12,
                        color=color,
                        linestyle="none",
                        label=f"1 caller{api} {key[4:7]}",
                    )
    ax_t.axhline(1500, color="grey", linestyle=":", linewidth=1)
    ax_t.text(ax_t.get_xlim()[0] if False else 10, 1500, " target 1,500 (1,000 devices)", va="bottom", fontsize=8, color="grey")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log")
        ax.set_xlabel("connected devices")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("commands/s (durable, end to end)")
    ax_t.set_title("end-to-end throughput")
    ax_t.set_ylim(bottom=0)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("latency, ms")
    ax_l.set_title(f"end-to-end latency ({doc['meta']['plan'].get('concurrency', 64)} in flight; * and + = 1 caller)")

    raw = _reps(doc, "raw", "runs") or []
    if raw:
        kinds = sorted({(r["pairs"], r.get("idle", 0)) for r in raw})
        systems = [s for s in ("fleetcmd", "mosquitto") if any(r["system"] == s for r in raw)]
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            meds, errs_lo, errs_hi = [], [], []
            for pr, idle in kinds:
                s = _summary(_raw_values(doc, system, pr, "rate", idle)) or (0.0, 0.0, 0.0)
                meds.append(s[0])
                errs_lo.append(s[0] - s[1])
                errs_hi.append(s[2] - s[0])
            ax_r.bar([k + i * width for k in range(len(kinds))], meds, width, yerr=[errs_lo, errs_hi], capsize=4, label=system)
        ax_r.set_xticks([k + width * (len(systems) - 1) / 2 for k in range(len(kinds))])
        ax_r.set_xticklabels([f"{p} pair(s)" + (f"\n+{i:,} idle" if i else "") for p, i in kinds])
        ax_r.set_yscale("log")
        ax_r.set_ylabel("round trips/s (QoS 1, log scale)")
        ax_r.set_title(
            "raw broker request/response"
            + (" (fleetcmd: FleetBroker harness)" if _reps(doc, "raw", "fleetcmd_target") == "harness" else "")
        )
        ax_r.legend(fontsize=8)
        ax_r.grid(True, axis="y", alpha=0.3)

    con = _reps(doc, "connect", "runs") or []
    if con:
        systems = [s for s in ("fleetcmd-anonymous", "fleetcmd-registered", "mosquitto") if any(r["system"] == s for r in con)]
        rates = [_summary(_connect_values(doc, s, "rate")) or (0, 0, 0) for s in systems]
        kbs = [_summary(_connect_values(doc, s, "rss_per_device_kb")) or (0, 0, 0) for s in systems]
        xs = list(range(len(systems)))
        ax_c.bar([x - 0.2 for x in xs], [r[0] for r in rates], 0.4, label="connect+subscribe/s", color="tab:green")
        ax_c.set_ylabel("connects/s")
        ax_c2 = ax_c.twinx()
        ax_c2.bar([x + 0.2 for x in xs], [k[0] for k in kbs], 0.4, label="KB per device", color="tab:purple")
        ax_c2.set_ylabel("service memory per device, KB")
        ax_c.set_xticks(xs)
        ax_c.set_xticklabels([s.replace("fleetcmd-", "fleetcmd\n") for s in systems])
        ax_c.set_title(f"connecting {_reps(doc, 'connect', 'devices'):,} devices")
        h1, l1 = ax_c.get_legend_handles_labels()
        h2, l2 = ax_c2.get_legend_handles_labels()
        ax_c.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    m = doc["meta"]["machine"]
    fig.suptitle(
        f"fleetcmd bench ({doc['meta']['plan']['name']}, median of {doc['meta']['plan']['reps']}, bars = min-max) "
        f"- {m['cpu']}, {m['cores']} cores, Python {m['python']}, amqtt {m['amqtt']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('fn')} ({file})"


def profile_top(path: Path, n: int = 20) -> dict[str, Any]:
    """Top functions of a py-spy ``--format raw`` profile: by own samples and by inclusive samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        short = [_short(f) for f in frames]
        own[short[-1]] += count
        for f in set(short):
            incl[f] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    return {
        "samples": total,
        "self": [(f, 100 * c / total) for f, c in own.most_common(n)],
        "inclusive": [(f, 100 * c / total) for f, c in incl.most_common(n)],
    }


BEGIN = "<!-- BEGIN GENERATED: {name} (bench/run.py rewrites this block) -->"
END = "<!-- END GENERATED: {name} -->"


def _block(doc: dict[str, Any], rows_: list[Row], png: str, title: str) -> str:
    meta = doc["meta"]
    m = meta["machine"]
    mosq = meta.get("mosquitto", {})
    lines = [
        f"### {title}",
        "",
        f"{meta['plan']['name']} run, {meta['started']}, git `{meta['git']}`, took {meta.get('duration_s', 0):.0f} s; "
        f"{meta['plan']['reps']} repetitions, median (min-max).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB, Linux {m['kernel']}; Python {m['python']}, "
        f"amqtt {m['amqtt']}, grpcio {m['grpcio']}, uvloop {m['uvloop']}; "
        f"mosquitto: {mosq.get('version') or mosq.get('note') or 'not run'}; open files limit {meta['nofile']['now']}.",
        "",
        _table(rows_, doc, md=True),
        "",
        f"![throughput and latency against fleet size]({png})",
    ]
    if doc.get("notes"):
        lines += ["", "Notes from the run:", ""] + [f"- {n}" for n in doc["notes"]]
    prof = _reps(doc, "profile")
    if prof:
        for fleet, top in prof.items():
            lines += [
                "",
                f"py-spy profile of the service, {fleet} devices ({top['samples']} samples), top functions by own time:",
                "",
                "| % own | function |",
                "|---|---|",
            ]
            lines += [f"| {p:.1f} | `{fn}` |" for fn, p in top["self"][:12]]
    return "\n".join(lines)


def _replace_block(text: str, name: str, content: str) -> str | None:
    b, e = BEGIN.format(name=name), END.format(name=name)
    if b not in text or e not in text:
        return None
    head, rest = text.split(b, 1)
    _, tail = rest.split(e, 1)
    return f"{head}{b}\n{content}\n{e}{tail}"


def attack_block(doc: dict[str, Any]) -> str:
    """The generated "under attack" block: the run's facts, the service's settings and the attack rows."""
    meta = doc["meta"]
    m = meta["machine"]
    res = doc["results"]["attack"]
    env = ", ".join(f"`{k}={v}`" for k, v in res["service_env"].items()) or "none"
    lines = [
        "### Latest run of the attack scenario",
        "",
        f"{meta['plan']['name']} plan, {meta['started']}, service at git `{meta['git']}`, "
        f"took {meta.get('duration_s', 0):.0f} s; "
        f"{len(res['rounds']) // 2} quiet/attack pairs of {res['window_s']:g} s windows, median (min-max).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; Python {m['python']}, amqtt {m['amqtt']}; "
        f"open files limit {meta['nofile']['now']}. Service settings: {env}. The attacker connects from "
        f"{res['source']}, {res['storm_concurrency']} cycles in flight; {res['inflight']} commands in flight.",
        "",
        _table(attack_rows(doc), doc, md=True),
    ]
    notes = [n for n in doc.get("notes", []) if n.startswith("attack")]
    if notes:
        lines += ["", "Notes from the run:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def write_attack_block(path: Path, doc: dict[str, Any]) -> None:
    """Rewrite BENCHMARKS.md's ``attack`` block (appended as a section when the file has none)."""
    text = path.read_text() if path.exists() else ""
    block = attack_block(doc)
    new = _replace_block(text, "attack", block)
    if new is None:
        new = f"{text.rstrip()}\n\n## Under attack\n\n{BEGIN.format(name='attack')}\n{block}\n{END.format(name='attack')}\n"
    path.write_text(new)


def write_benchmarks_md(path: Path, doc: dict[str, Any], rows_: list[Row], baseline: dict[str, Any] | None) -> None:
    """Rewrite the ``latest`` block of BENCHMARKS.md, and the ``baseline`` block when ``baseline is doc``.

    Everything outside the generated blocks is kept.
    """
    latest = _block(doc, rows_, "bench/results/latest.png", "Latest run")
    text = path.read_text() if path.exists() else ""
    if not text or BEGIN.format(name="latest") not in text:
        text = TEMPLATE.format(
            latest_b=BEGIN.format(name="latest"),
            latest_e=END.format(name="latest"),
            base_b=BEGIN.format(name="baseline"),
            base_e=END.format(name="baseline"),
        )
    new = _replace_block(text, "latest", latest)
    assert new is not None
    text = new
    if baseline is not None and baseline is doc:
        block = _block(baseline, rows(baseline, None), "bench/results/baseline.png", "Baseline run")
        replaced = _replace_block(text, "baseline", block)
        if replaced is not None:
            text = replaced
    path.write_text(text)


TEMPLATE = """# fleetcmd benchmarks

```sh
.venv/bin/pip install -e '.[bench]'         # matplotlib for the plot (once)
.venv/bin/python bench/run.py --quick       # smoke: ~3 minutes
.venv/bin/python bench/run.py               # full suite: well under 30 minutes
```

{latest_b}
{latest_e}

## Baseline (before optimisation)

{base_b}
{base_e}
"""
