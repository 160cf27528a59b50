"""The job stores (SQLite and PostgreSQL): the one-transaction dispatch, the (job, thing, attempt) key, counts, the migration.

Parametrized by :data:`STORE_URLS` as the store contract suite is; what only several PostgreSQL
replicas need is in ``test_jobs_postgres.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import asyncpg
import pytest

from server.core.errors import AlreadyExists, NotFound
from server.core.jobs import JobState
from server.core.lifecycle import Status, Trigger
from server.core.models import EventFilter, ListQuery, NewExecution, ThingRecord
from server.store import JobDispatch, JobRecord, JobStore, ServiceStore, TargetSettle, TargetState, job_store, store_from_url
from server.store import postgres_schema as pg_schema
from server.store.sqlite_schema import SCHEMA, SCHEMA_VERSION
from tests.test_store_contract import STORE_URLS

NOW = 1_700_000_000_000


class Jobs(ServiceStore, JobStore, Protocol):
    """A service store that keeps jobs (both implementations)."""


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Jobs]:
    s = store_from_url(url)
    assert job_store(s) is not None  # the store keeps jobs
    async with s:
        writer = asyncio.create_task(s.run_writer())
        try:
            yield s  # type: ignore[misc]  # a JobStore too (asserted above)
        finally:
            s.stop_writer()
            await writer


@pytest.fixture(params=sorted(STORE_URLS))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return STORE_URLS[request.param](tmp_path)


@pytest.fixture
async def store(url: str) -> AsyncIterator[Jobs]:
    async with opened(url) as s:
        yield s


async def raw_insert(url: str, sql: str) -> None:
    """Run one statement on the store's database behind its back (sqlite3 or asyncpg)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
        return
    pconn = await asyncpg.connect(url)
    try:
        await pconn.execute(sql)
    finally:
        await pconn.close()


def new(thing: str, job: str = "job-1", attempt: int = 1, n: int = 0, retry_of: str = "") -> NewExecution:
    return NewExecution(
        execution_id=f"{thing}-{attempt}-{n}",
        command_id="c",
        thing_id=thing,
        action="reboot",
        params_json=None,
        ttl_seconds=30,
        status=Status.QUEUED,
        created_at_ms=NOW,
        expires_at_ms=NOW + 30_000,
        job_id=job,
        job_attempt=attempt,
        retry_of=retry_of,
    )


async def job_with(store: Jobs, things: list[str], job_id: str = "job-1") -> None:
    await store.insert_job(JobRecord(job_id, "{}", JobState.IN_PROGRESS, NOW), "fp")
    assert await store.add_targets(job_id, things, cursor=things[-1], resolved=True) == len(things)


async def test_dispatch_creates_and_marks_once_per_attempt(store: Jobs) -> None:
    await job_with(store, ["a", "b", "c"])
    created = await store.dispatch("job-1", [JobDispatch(new("a")), JobDispatch(new("b"))], [("c", 1, "refused")], NOW)
    assert [e.execution_id if e else None for e in created] == ["a-1-0", "b-1-0"]
    assert created[0] is not None and created[0].job_id == "job-1" and created[0].job_attempt == 1
    # The same attempt again (a second dispatcher, a replay after a crash): nothing new.
    again = await store.dispatch("job-1", [JobDispatch(new("a", n=1))], [("c", 1, "again")], NOW)
    assert again == [None]
    execs = (await store.list_executions(ListQuery(job_id="job-1"))).executions
    assert sorted(e.execution_id for e in execs) == ["a-1-0", "b-1-0"]
    assert await store.job_counts("job-1") == {"QUEUED": 2, "REJECTED": 1}
    rows = await store.targets("job-1", (TargetState.REJECTED,), 10)
    assert rows[0].reason == "refused" and rows[0].attempt == 1


async def test_the_store_refuses_a_second_execution_of_one_attempt(url: str, store: Jobs) -> None:
    await job_with(store, ["a"])
    await store.dispatch("job-1", [JobDispatch(new("a"))], [], NOW)
    insert = (
        "INSERT INTO executions (execution_id, command_id, thing_id, action, ttl_seconds, status, created_at,"
        " updated_at, expires_at, job_id, job_attempt) VALUES ('{}', 'c', 'a', 'reboot', 1, 1, 0, 0, 0, 'job-1', {})"
    )
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        await raw_insert(url, insert.format("x", 1))
    await raw_insert(url, insert.format("y", 2))  # the next attempt is another key


async def test_dispatch_events_are_numbered_in_the_log_and_list_filters_by_job(store: Jobs) -> None:
    await job_with(store, ["a", "b"])
    await job_with(store, ["a"], job_id="job-2")
    seen: list[int] = []
    store.set_commit_listener(lambda events: seen.extend(e.sequence for e in events))
    before = await store.last_sequence()
    await store.dispatch("job-1", [JobDispatch(new("a")), JobDispatch(new("b"))], [], NOW)
    await store.dispatch("job-2", [JobDispatch(new("a", job="job-2", n=2))], [], NOW)
    events = await store.events_after(before, EventFilter(), 10)
    assert [e.sequence for e in events] == [before + 1, before + 2, before + 3] == seen
    assert [(e.execution_id, e.status, e.note) for e in events] == [
        ("a-1-0", Status.QUEUED, "created"),
        ("b-1-0", Status.QUEUED, "created"),
        ("a-1-2", Status.QUEUED, "created"),
    ]
    page = await store.list_executions(ListQuery(job_id="job-2"))
    assert [e.execution_id for e in page.executions] == ["a-1-2"]
    assert (await store.list_executions(ListQuery(job_id="job-3"))).executions == []
    one = await store.list_executions(ListQuery(job_id="job-1", page_size=1))
    assert [e.execution_id for e in one.executions] == ["b-1-0"] and one.next_before_index is not None
    rest = await store.list_executions(ListQuery(job_id="job-1", page_size=1, before_index=one.next_before_index))
    assert [e.execution_id for e in rest.executions] == ["a-1-0"]


async def test_settle_retry_and_the_next_attempt(store: Jobs) -> None:
    await job_with(store, ["a", "b"])
    await store.dispatch("job-1", [JobDispatch(new("a")), JobDispatch(new("b"))], [], NOW)
    await store.transition("a-1-0", Trigger.EXPIRED, at_ms=NOW + 1)
    await store.transition("b-1-0", Trigger.CANCEL, at_ms=NOW + 1)
    assert await store.job_counts("job-1") == {"TIMED_OUT": 1, "CANCELED": 1}
    await store.settle(
        "job-1",
        [
            TargetSettle("a", 1, TargetState.RETRY, Status.TIMED_OUT, NOW + 500),
            TargetSettle("b", 1, TargetState.DONE, Status.CANCELED),
        ],
    )
    assert await store.job_counts("job-1") == {"RETRYING": 1, "CANCELED": 1}
    assert await store.next_due_ms("job-1") == NOW + 500
    assert await store.targets("job-1", (), 10, due_by_ms=NOW + 499) == []
    due = await store.targets("job-1", (), 10, due_by_ms=NOW + 500)
    assert [r.thing_id for r in due] == ["a"]
    # The retry must name the attempt that follows the stored one.
    assert await store.dispatch("job-1", [JobDispatch(new("a", attempt=3))], [], NOW) == [None]
    retry = await store.dispatch("job-1", [JobDispatch(new("a", attempt=2, retry_of="a-1-0"))], [], NOW + 600)
    assert retry[0] is not None and retry[0].retry_of == "a-1-0"
    assert await store.last_dispatch_ms("job-1") == NOW + 600
    assert await store.job_counts("job-1") == {"QUEUED": 1, "CANCELED": 1}
    # skip_unstarted leaves dispatched targets alone.
    assert await store.skip_unstarted("job-1", "canceled") == 0


async def test_targets_keep_their_order_and_a_thing_is_added_once(store: Jobs) -> None:
    await job_with(store, ["m", "a"])
    assert await store.add_targets("job-1", ["a", "z"], cursor="z", resolved=True) == 1
    rows = await store.targets("job-1", (TargetState.PENDING,), 10)
    assert [(r.thing_id, r.seq) for r in rows] == [("m", 0), ("a", 1), ("z", 2)]
    rec = await store.get_job("job-1")
    assert rec is not None and rec.targets_total == 3 and rec.resolved and rec.resolve_cursor == "z"
    assert await store.job_counts("job-1", below_seq=2) == {"PENDING": 2}


async def test_jobs_idempotency_listing_states_and_selection(store: Jobs) -> None:
    rec = JobRecord("job-1", "{}", JobState.IN_PROGRESS, NOW, idempotency_key="k", sequential=True, created_by="bob")
    assert await store.insert_job(rec, "fp") == (rec, True)
    again, created = await store.insert_job(JobRecord("job-x", "{}", JobState.IN_PROGRESS, NOW, idempotency_key="k"), "fp")
    assert not created and again.job_id == "job-1" and again.sequential and again.created_by == "bob"
    with pytest.raises(AlreadyExists, match="different job"):
        await store.insert_job(JobRecord("job-y", "{}", JobState.IN_PROGRESS, NOW, idempotency_key="k"), "other")
    await store.insert_job(JobRecord("job-2", "{}", JobState.SCHEDULED, NOW + 1), "fp2")
    listed = await store.list_jobs((), 10, None)
    assert [r.job_id for _, r in listed] == ["job-2", "job-1"]
    assert [r.job_id for _, r in await store.list_jobs((), 10, listed[0][0])] == ["job-1"]
    assert [r.job_id for _, r in await store.list_jobs((JobState.SCHEDULED,), 10, None)] == ["job-2"]
    with pytest.raises(NotFound):
        await store.update_job("nope", state=JobState.PAUSED, started_at_ms=None, ended_at_ms=None, abort_reason="")
    await store.add_targets("job-1", ["a", "b", "c"], cursor="", resolved=True)
    await store.dispatch("job-1", [JobDispatch(new("a")), JobDispatch(new("b"))], [], NOW)
    assert sorted(await store.sequential_busy()) == [("a", "a-1-0"), ("b", "b-1-0")]
    await store.transition("a-1-0", Trigger.CANCEL, at_ms=NOW + 1)
    assert await store.target_ids("job-1", (Status.CANCELED,), "", 10) == ["a"]
    assert await store.target_ids("job-1", (Status.CANCELED, Status.QUEUED), "a", 10) == ["b"]
    assert await store.skip_unstarted("job-1", "canceled") == 1
    assert await store.job_counts("job-1") == {"CANCELED": 1, "QUEUED": 1, "SKIPPED": 1}
    await store.update_job(
        "job-1", state=JobState.CANCELED, started_at_ms=NOW, ended_at_ms=NOW + 2, abort_reason="", counts_json='{"x": 1}'
    )
    assert [r.job_id for r in await store.unfinished_jobs()] == ["job-2"]
    assert await store.sequential_busy() == []
    done = await store.get_job("job-1")
    assert done is not None and done.state is JobState.CANCELED and done.counts_json == '{"x": 1}' and done.ended_at_ms == NOW + 2
    for thing, kind in (("t1", "lamp"), ("t2", "meter"), ("t3", "lamp")):
        await store.insert_thing(ThingRecord(thing, kind, {"site": "n"}, "h", NOW, NOW, NOW))
    assert await store.thing_page("t1", 10, "lamp") == [("t3", "lamp", {"site": "n"})]
    assert [t for t, _, _ in await store.thing_page("", 2, "")] == ["t1", "t2"]


async def test_a_schema_3_postgresql_database_is_migrated() -> None:
    url = STORE_URLS["postgresql"](Path())
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)")
        await conn.execute(pg_schema.MIGRATIONS[3])
        await conn.execute("INSERT INTO schema_version (version) VALUES (3)")
        await conn.execute(
            "INSERT INTO executions (execution_id, command_id, thing_id, action, ttl_seconds, status, created_at,"
            " updated_at, expires_at) VALUES ('old', 'c', 't', 'a', 1, 5, 0, 0, 0)"
        )
    finally:
        await conn.close()
    assert pg_schema.SCHEMA_VERSION == SCHEMA_VERSION == 7
    async with opened(url) as store:
        ex = await store.get("old")
        assert ex is not None and ex.job_id == "" and ex.job_attempt == 0
        await job_with(store, ["t"])
        assert (await store.dispatch("job-1", [JobDispatch(new("t"))], [], NOW))[0] is not None
    conn = await asyncpg.connect(url)
    try:
        assert [r[0] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY version")] == [3, SCHEMA_VERSION]
    finally:
        await conn.close()


async def test_a_schema_3_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = SCHEMA.replace("INTEGER,\n    handed             INTEGER NOT NULL DEFAULT 0\n", "INTEGER\n")  # schema 5
    # Version 6's event columns (tests/test_job_events.py migrates a version 5 file).
    old = old.replace("DEFAULT '',\n    job_id             TEXT,\n    job                TEXT\n);", "DEFAULT ''\n);")
    old = old[: old.index("-- A job's events")] + old[old.index("-- Finished executions") :]
    for line in ("    job_id             TEXT,\n", "    retry_of           TEXT,\n", "    job_attempt        INTEGER\n"):
        old = old.replace(line, "")
    old = old.replace("rerun_of           TEXT,\n);", "rerun_of           TEXT\n);")
    old = old.replace("    broker_password_hash   TEXT NOT NULL DEFAULT ''\n", "").replace(
        "kaa_token_hash         TEXT,\n);", "kaa_token_hash         TEXT\n);"
    )
    old = old[: old.index("-- Jobs")] + old[old.index("CREATE TABLE IF NOT EXISTS api_keys") :]
    conn = sqlite3.connect(path)
    conn.executescript(old)
    conn.execute(
        "INSERT INTO executions (execution_id, command_id, thing_id, action, ttl_seconds, status, created_at,"
        " updated_at, expires_at) VALUES ('old', 'c', 't', 'a', 1, 5, 0, 0, 0)"
    )
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    assert SCHEMA_VERSION == 7
    async with opened(f"sqlite:///{path}") as store:
        ex = await store.get("old")
        assert ex is not None and ex.job_id == "" and ex.job_attempt == 0
        await job_with(store, ["t"])
        assert (await store.dispatch("job-1", [JobDispatch(new("t"))], [], NOW))[0] is not None
