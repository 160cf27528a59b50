"""The jobs scenario (issue 16 §5): ``.venv/bin/python bench/jobs.py [--fleet 10000] [--paced 1000] [--paced-rate 6000]``.

Runs the service in this process (the jobs engine through its Python API, ``JobsCore``; so the RSS
measured is the service's own, plus this script's few kilobytes) and ``--fleet`` devices in
load-generator processes (``bench.loadgen.DeviceAgent``, answering SUCCEEDED at once). Then:

1. an unpaced job to every device: the dispatch-to-final rate (targets / seconds from create to
   the last final execution) and the service RSS before, during (peak, sampled every 100 ms) and after;
2. a job paced at ``--paced-rate`` per minute to the first ``--paced`` devices: the pacing accuracy, the most
   executions created in any 1-second window against ``rate / 60`` (bound: one more), from the
   executions' creation times in the store.

With ``--memory N`` it runs instead the memory scenario (issue 16 §3): ``N`` things registered in bulk
(written straight into the store's ``things`` table before the service starts, as a registry restore
would read them), nobody connected, and one job over an attribute selector matching them all, with
``max_in_flight`` ``--window`` and a 1 s TTL, so every execution times out and the rollout moves on as
fast as the window turns. It reports the service RSS before the job, at each tenth of the targets
final, the peak (sampled every 100 ms) and after, the growth per target, and with ``--tracemalloc`` the
top allocation sites live at half-way (against a snapshot taken before the job).

Prints one JSON document; figures go to BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import os
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Procs, rss_bytes
from bench.run import connect_fleet, device_agents, raise_nofile, thing_ids
from server.app import FleetcmdApp
from server.config import Settings
from server.core import jobs as jb
from server.core.job_runner import JobsCore
from server.core.lifecycle import Status
from server.core.models import ListQuery

MB = 1024 * 1024


def max_per_window(times_ms: list[int], window_ms: int = 1000) -> int:
    """The most timestamps in any half-open window ``[t, t + window_ms)`` (windows start at a timestamp)."""
    times = sorted(times_ms)
    return max((bisect.bisect_left(times, t + window_ms) - i for i, t in enumerate(times)), default=0)


class PeakRss:
    """The highest RSS of this process, sampled every 100 ms while used as ``async with``."""

    def __init__(self, start: int) -> None:
        self.peak = start
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(os.getpid()))
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def run_job(jobs: JobsCore, spec: jb.JobSpec, timeout: float) -> tuple[jb.Job, float, int, float]:
    """Create a job and wait until it is final.

    Returns:
        The job, the seconds it took, the peak RSS seen meanwhile, the seconds until every target had started.
    """
    before = rss_bytes(os.getpid())
    dispatched: float | None = None
    started = time.perf_counter()
    job = await jobs.create(spec)
    async with PeakRss(before) as sampler:
        async with asyncio.timeout(timeout):
            async for snap in jobs.watch(job.job_id):
                job = snap
                if dispatched is None and not job.counts.get("PENDING"):
                    dispatched = time.perf_counter() - started
    return job, time.perf_counter() - started, sampler.peak, dispatched or 0.0


async def scenario(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start the service and the fleet, run the unpaced and the paced job; returns the figures."""
    settings = Settings(
        bind="127.0.0.1",
        mqtt_port=0,
        grpc_port=0,
        http_port=-1,
        data_dir=workdir / "data",
        allow_anonymous=True,
        default_ttl=60,
    )
    out: dict[str, Any] = {"fleet": args.fleet}
    with Procs(workdir) as procs:
        async with FleetcmdApp(settings) as app:
            assert app.jobs is not None and app.ports is not None and app.ports.mqtt is not None and app.core is not None
            ids = thing_ids(args.fleet)
            agents = device_agents(procs, ids, max(1, args.fleet // 5000))
            connected = await asyncio.to_thread(connect_fleet, agents, app.ports.mqtt, 120.0)
            out["connected"] = connected["connected"]
            targets = jb.Targets(thing_ids=tuple(ids[: jb.MAX_TARGET_IDS]))
            if args.fleet > jb.MAX_TARGET_IDS:
                targets = jb.Targets(attributes=(("fleet", "bench"),))  # registered things only (not used by default)
            before = rss_bytes(os.getpid())

            job, seconds, peak, dispatch_s = await run_job(app.jobs, jb.JobSpec("bench", {"n": 1}, 60, targets), args.timeout)
            await asyncio.sleep(1.0)
            after = rss_bytes(os.getpid())
            out["unpaced"] = {
                "state": job.state.name,
                "counts": dict(job.counts),
                "seconds": round(seconds, 3),
                "all_started_s": round(dispatch_s, 3),
                "dispatch_to_final_per_s": round(job.targets_total / seconds, 1),
                "rss_mb": {"before": round(before / MB, 1), "peak": round(peak / MB, 1), "after": round(after / MB, 1)},
                "rss_growth_mb": round((peak - before) / MB, 1),
            }

            rate = args.paced_rate
            paced_targets = jb.Targets(thing_ids=tuple(ids[: args.paced]))
            paced_spec = jb.JobSpec("bench-paced", {"n": 2}, 60, paced_targets, rollout=jb.Rollout(max_per_minute=rate))
            job, seconds, _peak, _dispatch_s = await run_job(app.jobs, paced_spec, args.timeout + job.targets_total * 60 / rate)
            created: list[int] = []
            token: int | None = None
            while True:
                page = await app.core.list_executions(ListQuery(job_id=job.job_id, page_size=1000, before_index=token))
                created += [e.created_at_ms for e in page.executions]
                token = page.next_before_index
                if token is None:
                    break
            busiest = max_per_window(created)
            out["paced"] = {
                "state": job.state.name,
                "max_per_minute": rate,
                "seconds": round(seconds, 3),
                "achieved_per_s": round(job.targets_total / seconds, 1),
                "busiest_1s_window": busiest,
                "allowed_1s": rate / 60,
                "excess_over_rate": round(busiest - rate / 60, 2),
            }
            for agent in agents:
                procs.stop(agent)
    return out


def seed_things(db: Path, n: int) -> None:
    """Register ``n`` things (``fleet=bench``, no type, no credentials) in one transaction of the stopped service's store."""
    now = int(time.time() * 1000)
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO things (thing_id, thing_type, attributes, token_hash, created_at, updated_at,"
                " credentials_rotated_at, kaa_app_version, kaa_token_hash) VALUES (?,?,?,?,?,?,?,?,?)",
                ((f"mem-{i:06d}", "", '{"fleet": "bench"}', "", now, now, now, "", None) for i in range(n)),
            )
    finally:
        conn.close()


async def memory_scenario(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One job over ``args.memory`` registered things nobody answers: the service's RSS along the rollout."""
    settings = Settings(bind="127.0.0.1", mqtt_port=0, grpc_port=0, http_port=-1, data_dir=workdir / "data", allow_anonymous=True)
    async with FleetcmdApp(settings):
        pass  # creates the store
    seed_things(settings.data_dir / "fleetcmd.db", args.memory)
    out: dict[str, Any] = {"targets": args.memory, "max_in_flight": args.window}
    async with FleetcmdApp(settings) as app:
        assert app.jobs is not None
        gc.collect()
        await asyncio.sleep(1.0)
        before = rss_bytes(os.getpid())
        spec = jb.JobSpec(
            "bench-memory",
            {"n": 1},
            1,
            jb.Targets(attributes=(("fleet", "bench"),)),
            rollout=jb.Rollout(max_in_flight=args.window),
        )
        baseline = None
        if args.tracemalloc:
            tracemalloc.start(1)
            baseline = tracemalloc.take_snapshot()
        steps: list[dict[str, Any]] = []
        top: list[str] = []
        started = time.perf_counter()
        async with PeakRss(before) as sampler:
            job = await app.jobs.create(spec)
            async with asyncio.timeout(args.timeout):
                async for snap in app.jobs.watch(job.job_id):
                    job = snap
                    done = sum(job.counts.get(status.name, 0) for status in Status if status.final)
                    tenth = done * 10 // max(1, args.memory)
                    if tenth > len(steps):
                        rss = rss_bytes(os.getpid())
                        steps.append(
                            {
                                "final": done,
                                "rss_mb": round(rss / MB, 1),
                                "in_flight": app.jobs.metrics()["job_executions_in_flight"],
                            }
                        )
                        if baseline is not None and tenth >= 5 and not top:
                            stats = tracemalloc.take_snapshot().compare_to(baseline, "lineno")
                            top = [f"{st.size_diff / MB:.1f} MB {st.count_diff:+d} {st.traceback}" for st in stats[:12]]
        peak = sampler.peak
        seconds = time.perf_counter() - started
        if baseline is not None:
            tracemalloc.stop()
        gc.collect()
        await asyncio.sleep(1.0)
        after = rss_bytes(os.getpid())
        out.update(
            state=job.state.name,
            counts=dict(job.counts),
            seconds=round(seconds, 1),
            rss_mb={"before": round(before / MB, 1), "peak": round(peak / MB, 1), "after": round(after / MB, 1)},
            growth_mb=round((peak - before) / MB, 1),
            growth_bytes_per_target=round((peak - before) / args.memory),
            steps=steps,
        )
        if top:
            out["tracemalloc_top_at_half"] = top
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the scenario and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=int, default=10_000, help="devices and targets (at most 10,000: one explicit list)")
    parser.add_argument("--paced", type=int, default=1_000, help="targets of the paced job")
    parser.add_argument("--paced-rate", type=int, default=6_000, help="max_per_minute of the paced job")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a job may take")
    parser.add_argument("--profile", action="store_true", help="profile the service (cProfile, to stderr)")
    parser.add_argument("--memory", type=int, default=0, help="run the memory scenario instead: one job over this many things")
    parser.add_argument("--window", type=int, default=5_000, help="memory scenario: the job's max_in_flight")
    parser.add_argument("--tracemalloc", action="store_true", help="memory scenario: top allocation sites at half-way")
    args = parser.parse_args(argv)
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="fleetcmd-bench-jobs-memory-") as tmp:
            print(json.dumps(asyncio.run(memory_scenario(args, Path(tmp))), indent=2))
        return 0
    raise_nofile(args.fleet * 2 + 2000)
    with tempfile.TemporaryDirectory(prefix="fleetcmd-bench-jobs-") as tmp:
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            result = profiler.runcall(asyncio.run, scenario(args, Path(tmp)))
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(40)
        else:
            result = asyncio.run(scenario(args, Path(tmp)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
