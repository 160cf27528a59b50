"""The SQLite job store: the one-transaction dispatch, the (job, thing, attempt) key, counts, the schema migration."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.core.jobs import JobState
from server.core.lifecycle import Status, Trigger
from server.core.models import ListQuery, NewExecution
from server.store import JobDispatch, JobRecord, TargetSettle, TargetState
from server.store.sqlite import SqliteStore
from server.store.sqlite_schema import SCHEMA, SCHEMA_VERSION

NOW = 1_700_000_000_000


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(path) as s:
        writer = asyncio.create_task(s.run_writer())
        try:
            yield s
        finally:
            s.stop_writer()
            await writer


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with opened(tmp_path / "db.sqlite") as s:
        yield s


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


async def job_with(store: SqliteStore, things: list[str], job_id: str = "job-1") -> None:
    await store.insert_job(JobRecord(job_id, "{}", JobState.IN_PROGRESS, NOW), "fp")
    assert await store.add_targets(job_id, things, cursor=things[-1], resolved=True) == len(things)


async def test_dispatch_creates_and_marks_once_per_attempt(store: SqliteStore) -> None:
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


async def test_the_store_refuses_a_second_execution_of_one_attempt(tmp_path: Path, store: SqliteStore) -> None:
    await job_with(store, ["a"])
    await store.dispatch("job-1", [JobDispatch(new("a"))], [], NOW)
    conn = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO executions (execution_id, command_id, thing_id, action, ttl_seconds, status, created_at,"
            " updated_at, expires_at, job_id, job_attempt) VALUES ('x', 'c', 'a', 'reboot', 1, 1, 0, 0, 0, 'job-1', 1)"
        )
    conn.close()


async def test_settle_retry_and_the_next_attempt(store: SqliteStore) -> None:
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


async def test_targets_keep_their_order_and_a_thing_is_added_once(store: SqliteStore) -> None:
    await job_with(store, ["m", "a"])
    assert await store.add_targets("job-1", ["a", "z"], cursor="z", resolved=True) == 1
    rows = await store.targets("job-1", (TargetState.PENDING,), 10)
    assert [(r.thing_id, r.seq) for r in rows] == [("m", 0), ("a", 1), ("z", 2)]
    rec = await store.get_job("job-1")
    assert rec is not None and rec.targets_total == 3 and rec.resolved and rec.resolve_cursor == "z"
    assert await store.job_counts("job-1", below_seq=2) == {"PENDING": 2}


async def test_a_schema_3_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = SCHEMA
    # Version 5's event columns (tests/test_job_events.py migrates a version 4 file).
    old = old.replace("DEFAULT '',\n    job_id             TEXT,\n    job                TEXT\n);", "DEFAULT ''\n);")
    old = old[: old.index("-- A job's events")] + old[old.index("-- Finished executions") :]
    for line in ("    job_id             TEXT,\n", "    retry_of           TEXT,\n", "    job_attempt        INTEGER\n"):
        old = old.replace(line, "")
    old = old.replace("rerun_of           TEXT,\n);", "rerun_of           TEXT\n);")
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
    assert SCHEMA_VERSION == 5
    async with opened(path) as store:
        ex = await store.get("old")
        assert ex is not None and ex.job_id == "" and ex.job_attempt == 0
        await job_with(store, ["t"])
        assert (await store.dispatch("job-1", [JobDispatch(new("t"))], [], NOW))[0] is not None
