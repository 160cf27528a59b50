"""Job events on the event streams (issue 16, section 3): a job's state and count changes in the durable event log.

Real surfaces on 127.0.0.1: gRPC ``Stream``/``StreamBatches`` and SSE ``GET /api/v1/events`` see a job's
events live, filter them (``job_id``: the job's events and its executions'; a thing/action filter: none),
resume mid-job with no gap and no duplicate, and replay them after a SIGKILL of the real process. Also:
a CANCELED job's ``only_undelivered`` is stored, so a restart cancels again as the cancel did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sqlite3
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest

from server.api import convert_jobs, http_events
from server.app import FleetcmdApp
from server.core import jobs as jb
from server.core.errors import NotFound
from server.core.lifecycle import Status
from server.core.models import EventFilter, StateChange, job_event_json, later_job_event
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import jobs_pb2 as jpb
from server.store import JobDispatch
from server.store import postgres_schema as pg_schema
from server.store.sqlite_schema import SCHEMA, SCHEMA_VERSION
from tests import clients
from tests.clients import admin_key
from tests.conftest import make_settings
from tests.proc import Service
from tests.test_http_rest import conforms
from tests.test_jobs_engine import fleet, jobs_of, spec, until
from tests.test_jobs_store import NOW, Jobs, new, opened
from tests.test_store_contract import STORE_URLS
from tests.test_stream import wait_watchers

TIMEOUT = 20


def store_of(app: FleetcmdApp) -> Any:
    assert app.core is not None
    return app.core.store


async def read_until(call: Any, stop: Any, timeout: float = TIMEOUT) -> list[pb.ExecutionEvent]:
    """Events of a Stream call up to and including the first for which ``stop`` is true."""
    out: list[pb.ExecutionEvent] = []
    async with asyncio.timeout(timeout):
        while True:
            event = await call.read()
            assert event is not grpc.aio.EOF, "the stream ended"
            out.append(event)
            if stop(event):
                return out


def job_final(job_id: str, state: int) -> Any:
    return lambda e: e.HasField("job") and e.job_id == job_id and e.job.state == state


def sequences(events: list[pb.ExecutionEvent]) -> list[int]:
    return [e.sequence for e in events]


# ---- gRPC --------------------------------------------------------------------------------------------


async def test_grpc_stream_shows_a_jobs_state_and_count_changes_live(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    ids = [f"live-{i}" for i in range(3)]
    start = await store_of(app).last_sequence()
    call = stub.Stream(pb.StreamRequest(after_sequence=start), timeout=TIMEOUT)
    async with fleet(app, ids):
        job = await jobs_of(app).create(spec(tuple(ids)))
        events = await read_until(call, job_final(job.job_id, jpb.JOB_STATE_COMPLETED))
        done = await until(app, job.job_id, lambda j: j.job_id not in jobs_of(app)._runs)
    # And the rest of the log once it settled: no older snapshot after the final one (a count write that
    # raced the completion must not show the job IN_PROGRESS again).
    end = await store_of(app).last_sequence()
    if events[-1].sequence < end:
        events += await read_until(call, lambda e: e.sequence == end)
    call.cancel()
    assert sequences(events) == sorted(set(sequences(events)))
    job_events = [e for e in events if e.HasField("job")]
    # The first is the job as created (written with its row), the state before any count, with its spec.
    first = job_events[0]
    assert first.job_id == job.job_id and first.job.job_id == job.job_id
    assert first.job.state == jpb.JOB_STATE_IN_PROGRESS and first.job.spec.action == "reboot"
    assert not first.execution_id and not first.thing_id and not first.action and not first.status
    # Every later one (count changes, the state move) leaves the spec out: the watcher has it.
    assert len(job_events) > 2 and not any(e.job.HasField("spec") for e in job_events[1:])
    assert all(e.job.created_at == first.job.created_at for e in job_events)
    # Counts move through the statuses: all pending, then in flight, then all succeeded.
    assert any(e.job.counts.pending == 3 for e in job_events)
    assert any(e.job.counts.queued + e.job.counts.sent + e.job.counts.delivered > 0 for e in job_events)
    assert job_events[-1].job.counts.succeeded == 3
    # The executions' events name the job.
    execution_events = [e for e in events if not e.HasField("job")]
    assert {e.thing_id for e in execution_events} == set(ids)
    assert {e.job_id for e in execution_events} == {job.job_id}
    # The last is the job as GetJob shows it once settled (but its spec); nothing after the completion shows another state.
    assert job_events[-1].job == convert_jobs.job(dataclasses.replace(done, spec=None))
    completed = [e.job.state == jpb.JOB_STATE_COMPLETED for e in job_events]
    assert completed == sorted(completed)
    # A reader resuming from before the job, once it ran, reads the same back from the store.
    replay = stub.Stream(pb.StreamRequest(after_sequence=start, job_id=job.job_id), timeout=TIMEOUT)
    replayed = await read_until(replay, lambda e: e.sequence == job_events[-1].sequence)
    replay.cancel()
    assert [e for e in replayed if e.HasField("job")] == job_events


async def test_stream_batches_carries_job_events_like_stream(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    things = [f"sb-{i}" for i in range(2)]
    start = await store_of(app).last_sequence()
    job = await jobs_of(app).create(spec(tuple(things)))
    await jobs_of(app).cancel(job.job_id)
    call = stub.StreamBatches(pb.StreamRequest(after_sequence=start, job_id=job.job_id), timeout=TIMEOUT)
    batched: list[pb.ExecutionEvent] = []
    async with asyncio.timeout(TIMEOUT):
        while not batched or not job_final(job.job_id, jpb.JOB_STATE_CANCELED)(batched[-1]):
            batched += (await call.read()).events
    call.cancel()
    one = stub.Stream(pb.StreamRequest(after_sequence=start, job_id=job.job_id), timeout=TIMEOUT)
    single = await read_until(one, lambda e: e.sequence == batched[-1].sequence)
    one.cancel()
    assert batched == single
    # The job's first event shows its spec, the later ones (counts, the cancel) do not.
    job_events = [e.job for e in batched if e.HasField("job")]
    assert len(job_events) > 2 and job_events[0].spec.action == "reboot"
    assert not any(j.HasField("spec") for j in job_events[1:]) and job_events[-1].state == jpb.JOB_STATE_CANCELED


async def _events_of_three_kinds(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> tuple[str, str, str, int, int]:
    """Job A started over two offline things then canceled, job B scheduled later, one single command."""
    start = await store_of(app).last_sequence()
    a = await jobs_of(app).create(spec(("fa-1", "fa-2")))
    await until(app, a.job_id, lambda j: j.counts.get("QUEUED", 0) == 2)
    later = jb.Schedule(start_at_ms=int(time.time() * 1000) + 3_600_000)
    b = await jobs_of(app).create(spec(("fb-1",), schedule=later))
    await stub.Send(pb.SendRequest(thing_id="fa-1", action="reboot"))
    await jobs_of(app).cancel(a.job_id)
    await until(app, a.job_id, lambda j: j.job_id not in jobs_of(app)._runs)
    return a.job_id, b.job_id, "fa-1", start, await store_of(app).last_sequence()


async def test_grpc_filters_job_events_by_job_and_keeps_them_from_thing_and_action_watchers(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub
) -> None:
    job_a, job_b, thing, start, end = await _events_of_three_kinds(app, stub)
    everything = await read_until(stub.Stream(pb.StreamRequest(after_sequence=start)), lambda e: e.sequence == end)
    assert {e.job_id for e in everything if e.HasField("job")} == {job_a, job_b}

    async def filtered(expected: list[pb.ExecutionEvent], **flt: str) -> None:
        call = stub.Stream(pb.StreamRequest(after_sequence=start, **flt), timeout=TIMEOUT)
        got = [await call.read() for _ in expected]
        call.cancel()
        assert got == expected

    of_a = [e for e in everything if e.job_id == job_a]
    assert any(e.HasField("job") for e in of_a) and any(e.execution_id for e in of_a)
    await filtered(of_a, job_id=job_a)
    of_thing = [e for e in everything if e.thing_id == thing]
    assert len({e.job_id for e in of_thing}) == 2  # the job's execution and the single command's
    await filtered(of_thing, thing_id=thing)
    by_action = [e for e in everything if e.action == "reboot"]
    assert not any(e.HasField("job") for e in by_action)
    await filtered(by_action, action="reboot")
    # The live side of the bus filters alike (the replay above is the store's SQL).
    flt = EventFilter(job_id=job_a)
    job_event = StateChange(1, "", "", "", Status.QUEUED, None, 0, job_id=job_a)
    assert flt.matches(job_event) and not EventFilter(job_id=job_b).matches(job_event)
    assert not EventFilter(thing_id=thing).matches(job_event) and not EventFilter(action="reboot").matches(job_event)


async def test_grpc_resume_mid_job_has_no_gap_and_no_duplicate(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    ids = [f"rs-{i}" for i in range(12)]
    start = await store_of(app).last_sequence()
    async with fleet(app, ids):
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_per_minute=1200)))
        first = stub.Stream(pb.StreamRequest(after_sequence=start, job_id=job.job_id), timeout=TIMEOUT)
        # Disconnect in the middle of the rollout: after the third target's success.
        seen = await read_until(first, lambda e: e.HasField("job") and e.job.counts.succeeded >= 3)
        first.cancel()
        assert not job_final(job.job_id, jpb.JOB_STATE_COMPLETED)(seen[-1])
        second = stub.Stream(pb.StreamRequest(after_sequence=seen[-1].sequence, job_id=job.job_id), timeout=TIMEOUT)
        seen += await read_until(second, job_final(job.job_id, jpb.JOB_STATE_COMPLETED))
        second.cancel()
    replay = stub.Stream(pb.StreamRequest(after_sequence=start, job_id=job.job_id), timeout=TIMEOUT)
    whole = await read_until(replay, lambda e: e.sequence == seen[-1].sequence)
    replay.cancel()
    assert seen == whole  # resumed: every event once, in order
    assert seen[-1].job.counts.succeeded == 12


async def test_grpc_a_bad_job_id_filter_is_refused_naming_it(stub: pb_grpc.CommandServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Stream(pb.StreamRequest(job_id="a/b"), timeout=TIMEOUT).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id" in str(refused.value.details())


# ---- SSE ---------------------------------------------------------------------------------------------


@pytest.fixture
async def http(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None and app.ports.http
    headers = {"Authorization": f"Bearer {admin_key(app.settings.data_dir)}"}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", headers=headers) as s:
        yield s


async def sse_until(resp: aiohttp.ClientResponse, stop: Any) -> list[tuple[int, str, dict[str, Any]]]:
    """``(id, event, data)`` of an SSE response up to and including the first for which ``stop`` is true."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(TIMEOUT):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "data" in fields:
                out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                if stop(out[-1]):
                    return out
            fields = {}
    raise AssertionError("the event stream ended")


def strip(item: tuple[int, str, dict[str, Any]]) -> tuple[int, str, Any]:
    seq, kind, data = item
    return seq, kind, data["job"] if kind == "job" else data["change"]


async def test_sse_job_events_live_filtered_and_resumed(app: FleetcmdApp, http: aiohttp.ClientSession) -> None:
    ids = [f"sse-{i}" for i in range(4)]
    start = await store_of(app).last_sequence()

    def completed(item: tuple[int, str, dict[str, Any]]) -> bool:
        return item[1] == "job" and item[2]["job"]["state"] == "COMPLETED"

    async with http.get("/api/v1/events", params={"after": str(start)}) as resp:
        assert resp.status == 200
        async with fleet(app, ids):
            job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_per_minute=1200)))
            live = await sse_until(resp, completed)
    job_items = [i for i in live if i[1] == "job"]
    assert job_items[0][2]["job"]["jobId"] == job.job_id and job_items[0][2]["job"]["state"] == "IN_PROGRESS"
    # Only the first shows the spec: no "spec" key in the later ones.
    assert job_items[0][2]["job"]["spec"]["action"] == "reboot"
    assert len(job_items) > 2 and not any("spec" in d["job"] for _s, _k, d in job_items[1:])
    assert all(d["seq"] == seq for seq, _kind, d in live)
    assert {d["change"]["jobId"] for _s, kind, d in live if kind == "execution"} == {job.job_id}
    for _seq, kind, data in live:  # as the OpenAPI document says
        conforms("JobEvent" if kind == "job" else "ExecutionEvent", data)
    got = await (await http.get(f"/api/v1/jobs/{job.job_id}")).json()
    assert job_items[-1][2]["job"]["counts"] == got["counts"] and got["counts"]["SUCCEEDED"] == 4

    # jobId filter, resumed from the middle with Last-Event-ID: exactly the rest.
    of_job = [i for i in live if i[1] == "job" or i[2]["change"].get("jobId") == job.job_id]
    middle = len(of_job) // 2
    headers = {"Last-Event-ID": str(of_job[middle][0])}
    async with http.get("/api/v1/events", params={"jobId": job.job_id}, headers=headers) as resp:
        rest = await sse_until(resp, completed)
    # (An execution's event shows the execution as it is when sent: compare the changes.)
    assert [strip(i) for i in rest] == [strip(i) for i in of_job[middle + 1 :]]
    # Resumed from before the job once it ran: its job events read back from the store, alike.
    async with http.get("/api/v1/events", params={"jobId": job.job_id, "after": str(start)}) as resp:
        replayed = await sse_until(resp, completed)
    assert [strip(i) for i in replayed if i[1] == "job"] == [strip(i) for i in job_items]
    # A thing's watcher gets its executions' events and no job event.
    async with http.get("/api/v1/events", params={"thingId": ids[0], "after": str(start)}) as resp:
        mine = await sse_until(resp, lambda i: i[2]["change"]["status"] == "SUCCEEDED")
    assert {kind for _s, kind, _d in mine} == {"execution"}
    # A bad jobId is refused naming it.
    async with http.get("/api/v1/events", params={"jobId": "a/b"}) as bad:
        assert bad.status == 400 and "jobId" in await bad.text()


async def _leave_mid_event(app: FleetcmdApp, query: str, *, reset: bool) -> bytes:
    """A raw client with a 4 KiB receive window: GET /api/v1/events, read the start of a big event, then go away.

    ``reset``: close with SO_LINGER 0 (the peer gets a TCP RST), else a plain close (FIN).
    """
    assert app.ports is not None and app.ports.http
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    got = b""
    try:
        await loop.sock_connect(sock, ("127.0.0.1", app.ports.http))
        key = admin_key(app.settings.data_dir)
        request = f"GET /api/v1/events?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        async with asyncio.timeout(TIMEOUT):
            while b"event: job" not in got or len(got) < got.index(b"event: job") + 16384:
                chunk = await loop.sock_recv(sock, 4096)
                assert chunk, got[:300]
                got += chunk
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return got


@pytest.mark.parametrize("reset", [True, False])
async def test_a_client_leaving_mid_event_is_no_error(app: FleetcmdApp, caplog: pytest.LogCaptureFixture, reset: bool) -> None:
    # Three jobs whose first events are about 2.6 MB each (10,000 thing ids and as many exclusions of 128
    # characters): replayed in one write, more than the kernel's socket buffers take, so the service is
    # waiting for the client to read when it goes away.
    ids = tuple(f"{i:05d}".ljust(128, "x") for i in range(jb.MAX_TARGET_IDS))
    targets = jb.Targets(thing_ids=ids, exclude=tuple(f"e{i:05d}".ljust(128, "y") for i in range(jb.MAX_TARGET_IDS)))
    start = await store_of(app).last_sequence()
    later = jb.Schedule(start_at_ms=int(time.time() * 1000) + 3_600_000)
    for _ in range(3):
        await jobs_of(app).create(spec(targets=targets, schedule=later))
    caplog.set_level(logging.DEBUG, logger=http_events.__name__)
    got = await _leave_mid_event(app, f"after={start}", reset=reset)
    assert got.startswith(b"HTTP/1.1 200") and len(got) < 1_000_000  # (it left mid-event)
    await wait_watchers(app, 0)  # the handler ended
    mine = [r for r in caplog.records if r.name == http_events.__name__]
    assert [r.getMessage() for r in mine if r.levelno >= logging.WARNING] == []
    assert any("left" in r.getMessage() and r.levelno <= logging.INFO and r.exc_info is None for r in mine), mine


async def test_a_real_failure_of_an_event_stream_is_still_an_error(
    app: FleetcmdApp, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(events: Any, executions: Any) -> bytes:
        raise RuntimeError("encoding broke")

    monkeypatch.setattr(http_events, "encode", broken)
    start = await store_of(app).last_sequence()
    await jobs_of(app).create(spec(("broken-1",), schedule=jb.Schedule(start_at_ms=int(time.time() * 1000) + 3_600_000)))
    async with http.get("/api/v1/events", params={"after": str(start)}) as resp:
        text = await resp.text()
    assert "event: error" in text and "INTERNAL" in text
    [failed] = [r for r in caplog.records if r.name == http_events.__name__ and r.levelno >= logging.WARNING]
    assert failed.levelno == logging.ERROR and failed.exc_info is not None


# ---- durability ----------------------------------------------------------------------------------------


async def test_job_events_survive_a_sigkill_and_replay(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = [f"kill-{i:02d}" for i in range(30)]
    async with FleetcmdApp(make_settings(data)) as app:
        # Paced (20 per second), nobody answers: executions stay QUEUED, the counts move with each start.
        job = await jobs_of(app).create(spec(tuple(ids), ttl_seconds=600, rollout=jb.Rollout(max_per_minute=1200)))
    svc1, svc2 = Service(data), Service(data)
    try:
        ready = await asyncio.to_thread(svc1.start)
        key = admin_key(data)
        async with clients.channel(ready.grpc_target, key) as channel:
            call = pb_grpc.CommandServiceStub(channel).Stream(pb.StreamRequest(after_sequence=0, job_id=job.job_id))
            before = await read_until(call, lambda e: e.HasField("job") and e.job.counts.queued >= 5)
            call.cancel()
        os.kill(svc1.pid, signal.SIGKILL)
        await asyncio.to_thread(svc1.wait, 10)
        ready = await asyncio.to_thread(svc2.start)
        async with clients.channel(ready.grpc_target, key) as channel:
            stub = pb_grpc.CommandServiceStub(channel)
            replay = stub.Stream(pb.StreamRequest(after_sequence=0, job_id=job.job_id), timeout=TIMEOUT)
            replayed = await read_until(replay, lambda e: e.sequence == before[-1].sequence)
            # ... and goes on: the job's rollout continues after the restart, its events with it.
            after = await read_until(replay, lambda e: e.HasField("job") and e.job.counts.queued == len(ids))
            replay.cancel()
            await stub.Cancel(pb.CancelRequest(execution_id=next(e.execution_id for e in after if e.execution_id)))
    finally:
        svc1.close()
        svc2.close()
    assert replayed == before  # what the killed process streamed is in the log, whole
    assert replayed[0].job.state == jpb.JOB_STATE_IN_PROGRESS  # created
    assert any(e.job.counts.pending == len(ids) for e in replayed if e.HasField("job"))  # resolved
    assert after[0].sequence > before[-1].sequence


# ---- the store ------------------------------------------------------------------------------------------


async def test_a_schema_5_database_gets_job_events_and_only_undelivered(tmp_path: Path) -> None:
    path = tmp_path / "v5.sqlite"
    old = SCHEMA.replace("DEFAULT '',\n    job_id             TEXT,\n    job                TEXT\n);", "DEFAULT ''\n);")
    old = old[: old.index("-- A job's events")] + old[old.index("-- Finished executions") :]
    cut = old.index("    sequential      INTEGER NOT NULL DEFAULT 0,")
    old = (
        old[:cut]
        + "    sequential      INTEGER NOT NULL DEFAULT 0\n);"
        + old[old.index("CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency") - 1 :]
    )
    conn = sqlite3.connect(path)
    conn.executescript(old)
    conn.execute("INSERT INTO events (seq, execution_id, thing_id, action, status, at) VALUES (1, 'e', 't', 'a', 1, 0)")
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    assert SCHEMA_VERSION == 7
    async with opened(f"sqlite:///{path}") as store:
        [old_event] = await store.events_after(0, EventFilter(), 10)
        assert old_event.execution_id == "e" and old_event.job_id == "" and old_event.job is None
        rec = jb_record("j-1")
        job = jb.Job("j-1", spec(("t",)), jb.JobState.IN_PROGRESS, {"PENDING": 1}, 1, 5, 5, None, "", "bob")
        await store.insert_job(rec, "fp", event=job)
        await store.update_job(
            "j-1", state=jb.JobState.CANCELED, started_at_ms=5, ended_at_ms=9, abort_reason="", only_undelivered=True
        )
        stored = await store.get_job("j-1")
        assert stored is not None and stored.only_undelivered
        [event] = await store.events_after(1, EventFilter(job_id="j-1"), 10)
        assert event.sequence == 2 and event.job == job
        assert await store.events_after(1, EventFilter(thing_id="t"), 10) == []


async def test_a_schema_5_postgresql_database_gets_job_events_and_only_undelivered(tmp_path: Path) -> None:
    url = STORE_URLS["postgresql"](tmp_path)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)")
        for version in (3, 4, 5):
            await conn.execute(pg_schema.MIGRATIONS[version])
        await conn.execute("INSERT INTO schema_version (version) VALUES (5)")
        await conn.execute("INSERT INTO events (seq, execution_id, thing_id, action, status, at) VALUES (1, 'e', 't', 'a', 1, 0)")
        await conn.execute("UPDATE event_counter SET last_seq = 1")
    finally:
        await conn.close()
    assert pg_schema.SCHEMA_VERSION == 7
    async with opened(url) as store:
        [old_event] = await store.events_after(0, EventFilter(), 10)
        assert old_event.execution_id == "e" and old_event.job_id == "" and old_event.job is None
        job = jb.Job("j-1", spec(("t",)), jb.JobState.IN_PROGRESS, {"PENDING": 1}, 1, 5, 5, None, "", "bob")
        await store.insert_job(jb_record("j-1"), "fp", event=job)
        await store.update_job(
            "j-1", state=jb.JobState.CANCELED, started_at_ms=5, ended_at_ms=9, abort_reason="", only_undelivered=True
        )
        stored = await store.get_job("j-1")
        assert stored is not None and stored.only_undelivered
        [event] = await store.events_after(1, EventFilter(job_id="j-1"), 10)
        assert event.sequence == 2 and event.job == job
        assert await store.events_after(1, EventFilter(thing_id="t"), 10) == []


@pytest.fixture(params=sorted(STORE_URLS))
async def jobs_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Jobs]:
    """A job store of each implementation (SQLite, PostgreSQL: a new database)."""
    async with opened(STORE_URLS[request.param](tmp_path)) as s:
        yield s


async def test_job_events_are_written_with_the_jobs_row_and_numbered_with_the_other_events(jobs_store: Jobs) -> None:
    start = await jobs_store.last_sequence()
    created = jb.Job("j-1", spec(("t",)), jb.JobState.IN_PROGRESS, {}, 0, 5, 5, None, "", "bob")
    rec = jb_record("j-1")
    assert await jobs_store.insert_job(rec, "fp", event=created) == (rec, True)
    await jobs_store.add_targets("j-1", ["t"], cursor="t", resolved=True)
    [dispatched] = await jobs_store.dispatch("j-1", [JobDispatch(new("t", job="j-1"))], [], NOW)
    assert dispatched is not None
    counted = dataclasses.replace(created, counts={"QUEUED": 1}, targets_total=1)
    single = dataclasses.replace(new("s"), job_id="", job_attempt=0)
    # A job event and an execution's event queued together: numbered with no gap between them.
    await asyncio.gather(jobs_store.job_events([counted], 7), jobs_store.create(single))
    canceled = dataclasses.replace(counted, state=jb.JobState.CANCELED, ended_at_ms=9)
    await jobs_store.update_job(
        "j-1",
        state=canceled.state,
        started_at_ms=5,
        ended_at_ms=9,
        abort_reason="",
        only_undelivered=True,
        event=canceled,
        at_ms=9,
    )
    # A write that fails writes no event (nor takes a number).
    with pytest.raises(NotFound):
        await jobs_store.update_job(
            "nope", state=canceled.state, started_at_ms=5, ended_at_ms=9, abort_reason="", event=canceled, at_ms=9
        )
    # An idempotent repeat of a create writes none either.
    keyed = dataclasses.replace(jb_record("j-2"), idempotency_key="k")
    await jobs_store.insert_job(keyed, "fp")
    assert (await jobs_store.insert_job(dataclasses.replace(keyed, job_id="j-3"), "fp", event=created))[1] is False
    events = await jobs_store.events_after(start, EventFilter(), 100)
    assert [e.sequence for e in events] == list(range(start + 1, start + 1 + len(events)))  # no gap
    assert await jobs_store.last_sequence() == events[-1].sequence
    jobs = [e for e in events if e.job is not None]
    # Only the first (the creation's) shows the spec.
    assert [e.job for e in jobs] == [created, later_job_event(counted), later_job_event(canceled)]
    assert [e.at_ms for e in jobs] == [5, 7, 9]
    assert all(e.job_id == "j-1" and not (e.execution_id or e.thing_id or e.action) for e in jobs)
    # The job's events and its execution's, in log order; not the single command's.
    of_job = await jobs_store.events_after(start, EventFilter(job_id="j-1"), 100)
    assert of_job == [e for e in events if e.job_id == "j-1"] and len(of_job) == 4
    assert [e.execution_id for e in of_job if e.job is None] == ["t-1-0"]
    assert [e.job_id for e in await jobs_store.events_after(start, EventFilter(thing_id="s"), 100)] == [""]
    assert all(e.job is None for e in await jobs_store.events_after(start, EventFilter(action="reboot"), 100))
    stored = await jobs_store.get_job("j-1")
    assert stored is not None and stored.only_undelivered and stored.state is jb.JobState.CANCELED


async def raw_sql(url: str, sql: str, *args: Any) -> None:
    """Run one statement on a store's database beside the store (as another process would)."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=10)
        with conn:
            conn.execute(sql.replace("$1", "?").replace("$2", "?"), args)
        conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await pg.execute(sql, *args)
    finally:
        await pg.close()


@pytest.mark.parametrize("store", sorted(STORE_URLS))
async def test_only_the_first_job_event_reads_the_spec_back(tmp_path: Path, store: str) -> None:
    url = STORE_URLS[store](tmp_path)
    async with opened(url) as jobs_store:
        start = await jobs_store.last_sequence()
        created = jb.Job("j-1", spec(("t",)), jb.JobState.IN_PROGRESS, {}, 0, 5, 5, None, "", "bob")
        await jobs_store.insert_job(jb_record("j-1"), "fp", event=created)
        paused = dataclasses.replace(created, state=jb.JobState.PAUSED)
        await jobs_store.update_job(
            "j-1", state=paused.state, started_at_ms=5, ended_at_ms=None, abort_reason="", event=paused, at_ms=6
        )
        counted = dataclasses.replace(paused, counts={"PENDING": 1}, targets_total=1)
        await jobs_store.job_events([counted], 7)
        first, *later = await jobs_store.events_after(start, EventFilter(job_id="j-1"), 10)
        assert first.job == created and [e.job for e in later] == [later_job_event(paused), later_job_event(counted)]
        assert all(e.job is not None and e.job.spec is None and e.job.created_by == "bob" for e in later)
        # An event stored before events told which was first (no creation in it) is read back as then: with the spec.
        legacy = {k: v for k, v in json.loads(job_event_json(counted)).items() if k not in ("created_at_ms", "created_by")}
        await raw_sql(url, "UPDATE events SET job = $1 WHERE seq = $2", json.dumps(legacy), later[-1].sequence)
        [old] = await jobs_store.events_after(later[0].sequence, EventFilter(job_id="j-1"), 10)
        assert old.job == counted
        # The later events never read the job's spec: they read back whatever became of it.
        await raw_sql(
            url, "UPDATE events SET job = $1 WHERE seq = $2", job_event_json(later_job_event(counted)), later[-1].sequence
        )
        await raw_sql(url, "UPDATE jobs SET spec = 'not a spec' WHERE job_id = 'j-1'")
        assert await jobs_store.events_after(first.sequence, EventFilter(job_id="j-1"), 10) == later
        with pytest.raises(ValueError):  # (the first does: a spec that is no JSON fails to parse)
            await jobs_store.events_after(start, EventFilter(job_id="j-1"), 10)


def jb_record(job_id: str) -> Any:
    from server.store import JobRecord

    return JobRecord(job_id, jb.spec_to_json(spec(("t",))), jb.JobState.IN_PROGRESS, 5, 5, created_by="bob")


@pytest.mark.parametrize("only_undelivered", [True, False])
async def test_a_restart_cancels_again_as_the_cancel_did(tmp_path: Path, only_undelivered: bool) -> None:
    settings = make_settings(tmp_path / "data")
    ids = ("ou-1", "ou-2")
    async with FleetcmdApp(settings) as app:
        job = await jobs_of(app).create(spec(ids, ttl_seconds=3))
        await until(app, job.job_id, lambda j: j.counts.get("QUEUED", 0) == 2)
    conn = sqlite3.connect(tmp_path / "data" / "fleetcmd.db")
    with conn:
        # As if the process died right after the job's CANCELED state committed: one execution had reached
        # its device (DELIVERED), the other not (QUEUED); neither canceled yet.
        conn.execute("UPDATE executions SET status = ? WHERE thing_id = 'ou-1'", (int(Status.DELIVERED),))
        conn.execute(
            "UPDATE jobs SET state = ?, ended_at = 1, only_undelivered = ? WHERE job_id = ?",
            (jb.JobState.CANCELED.value, int(only_undelivered), job.job_id),
        )
    conn.close()
    async with FleetcmdApp(settings) as app:
        done = await until(app, job.job_id, lambda j: j.job_id not in jobs_of(app)._runs)
    # Spared by an only_undelivered cancel, the delivered one runs to its end (its TTL).
    assert done.counts == ({"TIMED_OUT": 1, "CANCELED": 1} if only_undelivered else {"CANCELED": 2})


async def test_cancel_stores_only_undelivered(app: FleetcmdApp) -> None:
    job = await jobs_of(app).create(spec(("st-1",), schedule=jb.Schedule(start_at_ms=int(time.time() * 1000) + 3_600_000)))
    await jobs_of(app).cancel(job.job_id, only_undelivered=True)
    rec = await store_of(app).get_job(job.job_id)
    assert rec is not None and rec.only_undelivered


async def test_each_change_is_one_event_and_no_change_none(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    start = await store_of(app).last_sequence()
    later = jb.Schedule(start_at_ms=int(time.time() * 1000) + 3_600_000)
    job = await jobs_of(app).create(spec(("one-1", "one-2"), schedule=later))
    await jobs_of(app).pause(job.job_id)
    await jobs_of(app).resume(job.job_id)
    # Canceled before it started: nothing was resolved, so nothing is skipped (no count changes).
    await jobs_of(app).cancel(job.job_id)
    call = stub.Stream(pb.StreamRequest(after_sequence=start, job_id=job.job_id), timeout=TIMEOUT)
    events = await read_until(call, job_final(job.job_id, jpb.JOB_STATE_CANCELED))
    await stub.Send(pb.SendRequest(thing_id="marker", action="reboot"))  # a later event, not the job's
    marker = await read_until(stub.Stream(pb.StreamRequest(after_sequence=start)), lambda e: e.thing_id == "marker")
    call.cancel()
    states = [e.job.state for e in events]
    assert states == [jpb.JOB_STATE_SCHEDULED, jpb.JOB_STATE_PAUSED, jpb.JOB_STATE_SCHEDULED, jpb.JOB_STATE_CANCELED]
    # Nothing of the job after its CANCELED event: the whole log up to the marker has no other event of it.
    assert [e for e in marker if e.job_id == job.job_id] == events
