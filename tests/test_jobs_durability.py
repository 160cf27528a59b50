"""Jobs across restarts (graceful and SIGKILL of the real process) and across dialects (issue 16 §3)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from server.app import FleetcmdApp
from server.core import jobs as jb
from server.core.lifecycle import Status
from server.core.models import ListQuery
from tests.conftest import make_settings
from tests.devices import EmqxDevice
from tests.proc import Service
from tests.test_jobs_engine import final, fleet, jobs_of, spec, until
from tests.test_kaa_mqtt import KaaDevice, cex, endpoint


@pytest.mark.secure
async def test_kaa_and_emqx_devices_in_one_job(app: FleetcmdApp) -> None:
    assert app.registry is not None and app.ports is not None and app.ports.mqtt is not None
    token = await endpoint(app, "kaa-ep")
    _rec, password, _ = await app.registry.create_thing("emqx-dev", "", {})
    emqx = EmqxDevice(
        "127.0.0.1",
        app.ports.mqtt,
        "emqx-dev",
        username="emqx-dev",
        password=password,
        on_request=lambda d, eid, _b: d.respond(eid, "SUCCEEDED"),
    )
    async with emqx, KaaDevice(app) as kaa:
        job = await jobs_of(app).create(spec(("kaa-ep", "emqx-dev"), action="reboot"))
        await until(app, job.job_id, lambda j: not j.counts.get("PENDING"))
        # The Kaa endpoint observes and gets its command like any Send's, then reports its result.
        _msg, body = await kaa.request(cex(token, "command/reboot/1"), {"observe": True})
        assert [c["payload"] for c in body] == [{"delay": 1}]
        await kaa.publish(cex(token, "result/reboot"), {"id": body[0]["id"], "statusCode": 200})
        done = await final(app, job.job_id)
    assert done.counts == {"SUCCEEDED": 2}
    assert app.core is not None
    execs = (await app.core.list_executions(ListQuery(job_id=job.job_id))).executions
    by_thing = {e.thing_id: e for e in execs}
    assert by_thing["kaa-ep"].kaa_id == 1 and by_thing["emqx-dev"].kaa_id is None


async def test_graceful_restart_goes_on_with_counts_pacing_and_retries(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    ids = [f"gr-{i}" for i in range(8)]
    policy = jb.RetryPolicy(jb.FailureType.TIMED_OUT, 1, "fixed", base_seconds=0.2)
    async with FleetcmdApp(settings) as app:
        # Nobody answers "gr-0": it times out and is retried after the restart. The TTL (3 s) leaves the others
        # time for the restart and their devices' connecting on a busy machine (with 1 s one timed out so).
        job = await jobs_of(app).create(
            spec(tuple(ids), ttl_seconds=3, rollout=jb.Rollout(max_per_minute=300), retries=(policy,))
        )
        # Stopped once the first is started (one every 200 ms: the rest wait); on a busy machine a fixed
        # half second could pass before the first.
        await until(app, job.job_id, lambda j: j.counts.get("PENDING", len(ids)) < len(ids))
    async with FleetcmdApp(settings) as app:
        restored = await jobs_of(app).get(job.job_id)
        assert restored.state is jb.JobState.IN_PROGRESS
        assert sum(restored.counts.values()) == 8 and 0 < restored.counts.get("PENDING", 0) < 8
        async with fleet(app, ids[1:]):
            done = await final(app, job.job_id)
        assert app.core is not None
        execs = (await app.core.list_executions(ListQuery(job_id=job.job_id, page_size=100))).executions
    assert done.state is jb.JobState.COMPLETED
    assert done.counts == {"SUCCEEDED": 7, "TIMED_OUT": 1}
    attempts = sorted((e.thing_id, e.job_attempt) for e in execs)
    assert attempts == sorted([(i, 1) for i in ids] + [("gr-0", 2)])
    first = sorted(e.created_at_ms for e in execs if e.job_attempt == 1)
    assert min(b - a for a, b in itertools.pairwise(first)) >= 199  # paced across the restart too


# ---- SIGKILL of the real process in the middle of a rollout ----------------------------------

TARGETS = 200
RATE = 6_000  # per minute: one per 10 ms, about 2 s for the whole job


def _db(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data / 'fleetcmd.db'}?mode=ro", uri=True, timeout=10)


def _job_state(data: Path, job_id: str) -> int:
    with _db(data) as conn:
        row = conn.execute("SELECT state, counts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return int(row[0]) if row and row[1] is not None else 0


async def _wait_dispatched(data: Path, job_id: str, at_least: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _db(data) as conn:
            n = conn.execute("SELECT COUNT(*) FROM executions WHERE job_id = ?", (job_id,)).fetchone()[0]
        if n >= at_least:
            return int(n)
        await asyncio.sleep(0.01)
    pytest.fail(f"fewer than {at_least} executions of the job within {timeout}s")


async def test_sigkill_mid_rollout_neither_duplicates_nor_skips(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = [f"k-{i:03d}" for i in range(TARGETS)]
    answering = ids[-5:]  # real devices for the last few (started after the restart); the others time out (2 s TTL)
    async with FleetcmdApp(make_settings(data)) as app:
        job = await jobs_of(app).create(spec(tuple(ids), ttl_seconds=2, rollout=jb.Rollout(max_per_minute=RATE)))
        assert job.targets_total == TARGETS
    svc1, svc2 = Service(data), Service(data)
    try:
        await asyncio.to_thread(svc1.start)
        # Kill it in the middle: a third of the way through.
        await _wait_dispatched(data, job.job_id, TARGETS // 3)
        os.kill(svc1.pid, signal.SIGKILL)
        await asyncio.to_thread(svc1.wait, 10)
        ready = await asyncio.to_thread(svc2.start)
        devices = [
            EmqxDevice("127.0.0.1", ready.mqtt_port, i, on_request=lambda d, eid, _b: d.respond(eid, "SUCCEEDED"))
            for i in answering
        ]
        await asyncio.gather(*(asyncio.to_thread(d.start) for d in devices))
        deadline = time.monotonic() + 30
        while _job_state(data, job.job_id) != jb.JobState.COMPLETED.value:
            assert time.monotonic() < deadline, svc2.stderr
            await asyncio.sleep(0.1)
        await asyncio.gather(*(asyncio.to_thread(d.stop) for d in devices))
    finally:
        svc1.close()
        svc2.close()
    with _db(data) as conn:
        rows = conn.execute(
            "SELECT thing_id, job_attempt, status, created_at FROM executions WHERE job_id = ? ORDER BY created_at", (job.job_id,)
        ).fetchall()
        targets = conn.execute(
            "SELECT state, COUNT(*) FROM job_targets WHERE job_id = ? GROUP BY state", (job.job_id,)
        ).fetchall()
    things = [r[0] for r in rows]
    assert len(things) == len(set(things)) == TARGETS  # one execution per target: none twice, none missing
    assert all(r[1] == 1 and Status(r[2]).final for r in rows)
    assert targets == [(2, TARGETS)]  # every target DONE
    statuses = {r[0]: Status(r[2]) for r in rows}
    assert all(statuses[i] is Status.SUCCEEDED for i in answering)
    # Paced across the kill: creation times at least 10 ms apart (the slot follows the last durable dispatch).
    created = [r[3] for r in rows]
    assert min(b - a for a, b in itertools.pairwise(created)) >= 10


async def test_a_cancel_cut_short_by_a_crash_is_finished_after_the_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    ids = [f"cc-{i}" for i in range(6)]
    async with FleetcmdApp(settings) as app:
        # Paced: two start (and stay QUEUED: nobody is connected); one is a target resolved but not started.
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_per_minute=120)))
        await until(app, job.job_id, lambda j: j.counts.get("QUEUED", 0) == 2, timeout=10)
    conn = sqlite3.connect(tmp_path / "data" / "fleetcmd.db")
    with conn:
        # As if the process died right after the job's CANCELED state committed and its executions were
        # canceled, before its unstarted targets were skipped.
        conn.execute("UPDATE jobs SET state = ?, ended_at = 1 WHERE job_id = ?", (jb.JobState.CANCELED.value, job.job_id))
        conn.execute("UPDATE executions SET status = ?, completed_at = 1 WHERE job_id = ?", (int(Status.CANCELED), job.job_id))
    conn.close()
    async with FleetcmdApp(settings) as app:
        done = await final(app, job.job_id)
    assert done.state is jb.JobState.CANCELED
    assert done.counts == {"CANCELED": 2, "SKIPPED": 4}
