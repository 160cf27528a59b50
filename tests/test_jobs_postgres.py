"""Jobs on the PostgreSQL store: what several replicas need, and the engine's tests run again on PostgreSQL.

``test_jobs_store.py`` runs the job store's semantics on both stores; this module proves what only a
shared database needs: replicas dispatching the same targets at once start each target once, a
dispatch whose transaction fails leaves neither an execution nor a mark, and the per-job advisory lock
lets one replica at a time run a job (released when that replica's connection goes). The engine's
tests (``test_jobs_engine.py``: a list job, pacing, max in flight, abort, retries, sequential, pause and
cancel, selectors, rerun, idempotency) are imported unchanged and run here on a new PostgreSQL
database each, with real MQTT devices.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from server.config import Settings
from server.core.errors import Unavailable
from server.core.jobs import JobState
from server.core.models import EventFilter, ListQuery
from server.store import JobDispatch, JobRecord, TargetState
from server.store import postgres as pg
from server.store.postgres import PostgresStore
from tests import pgserver
from tests.conftest import make_settings
from tests.test_jobs_engine import (  # noqa: F401 - collected and run here on PostgreSQL
    test_a_job_over_a_list_sends_one_execution_per_target,
    test_abort_after_failures_cancels_what_is_not_final,
    test_idempotency_key_and_list,
    test_max_in_flight_holds_the_rest_until_executions_are_final,
    test_max_per_minute_spaces_the_dispatches,
    test_pause_resume_and_cancel_mid_rollout,
    test_rerun_failed_targets_only_those,
    test_retries_stop_at_max_attempts,
    test_retries_with_backoff_link_the_new_execution,
    test_sequential_per_thing_waits_for_the_previous_job,
    test_type_and_attribute_selectors_and_a_refusing_type,
)
from tests.test_jobs_store import NOW, new


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """As conftest's ``settings``, on a new PostgreSQL database (the imported engine tests use it)."""
    secure = request.node.get_closest_marker("secure") is not None
    return make_settings(tmp_path / "data", allow_anonymous=not secure, database_url=pgserver.fresh_database_url())


@pytest.fixture
def url() -> str:
    return pgserver.fresh_database_url()


@asynccontextmanager
async def replicas(url: str, n: int) -> AsyncIterator[list[PostgresStore]]:
    """``n`` stores on one database, open, writers running."""
    async with AsyncExitStack() as stack:
        out = []
        for i in range(n):
            store = await stack.enter_async_context(PostgresStore(url, replica=f"r{i}"))
            writer = asyncio.create_task(store.run_writer())

            async def stop(store: PostgresStore = store, writer: asyncio.Task[None] = writer) -> None:
                store.stop_writer()
                await writer

            stack.push_async_callback(stop)
            out.append(store)
        yield out


async def test_replicas_dispatching_the_same_targets_start_each_once(url: str) -> None:
    things = [f"t{i:03}" for i in range(60)]
    async with replicas(url, 3) as stores:
        await stores[0].insert_job(JobRecord("job-1", "{}", JobState.IN_PROGRESS, NOW), "fp")
        assert await stores[0].add_targets("job-1", things, cursor="", resolved=True) == 60

        async def dispatcher(i: int, store: PostgresStore) -> list[str]:
            # Each replica tries every target, in its own order and in several calls, each with its own ids.
            order = things[i::3] + things if i else list(reversed(things))
            started: list[str] = []
            for k in range(0, len(order), 7):
                chunk = [JobDispatch(new(t, n=i)) for t in order[k : k + 7]]
                started += [e.thing_id for e in await store.dispatch("job-1", chunk, [], NOW) if e is not None]
            return started

        results = await asyncio.gather(*(dispatcher(i, s) for i, s in enumerate(stores)))
        started = [t for r in results for t in r]
        assert sorted(started) == things  # every target once, whichever replica won it
        execs = (await stores[1].list_executions(ListQuery(job_id="job-1", page_size=500))).executions
        assert sorted(e.thing_id for e in execs) == things
        assert await stores[2].job_counts("job-1") == {"QUEUED": 60}
        rows = await stores[2].targets("job-1", (TargetState.DISPATCHED,), 100)
        by_thing = {e.thing_id: e.execution_id for e in execs}
        assert all(r.execution_id == by_thing[r.thing_id] and r.attempt == 1 for r in rows) and len(rows) == 60
        # One gap-free log: one "created" event per execution, numbered 1..60.
        events = await stores[0].events_after(0, EventFilter(), 500)
        assert [e.sequence for e in events] == list(range(1, 61))
        assert sorted(e.execution_id for e in events) == sorted(by_thing.values())


async def test_a_dispatch_whose_transaction_fails_leaves_no_execution_and_no_mark(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg, "RETRIES", 1)
    async with replicas(url, 1) as (store,):
        await store.insert_job(JobRecord("job-1", "{}", JobState.IN_PROGRESS, NOW), "fp")
        await store.add_targets("job-1", ["a", "b", "c"], cursor="", resolved=True)
        await store.dispatch("job-1", [JobDispatch(new("a"))], [], NOW)
        # b's execution reuses a's id: its insert fails at the commit, after b's target was marked in the
        # same transaction; c in the same call would be fine alone.
        clash = new("b")
        clash = type(clash)(**{**clash.__dict__, "execution_id": "a-1-0"})
        with pytest.raises(Unavailable):
            await store.dispatch("job-1", [JobDispatch(new("c")), JobDispatch(clash)], [("x", 1, "no")], NOW)
        pending = await store.targets("job-1", (TargetState.PENDING,), 10)
        assert [r.thing_id for r in pending] == ["b", "c"]
        execs = (await store.list_executions(ListQuery(job_id="job-1"))).executions
        assert [e.execution_id for e in execs] == ["a-1-0"]
        assert await store.last_sequence() == 1
        # The same targets dispatched again, sound this time.
        again = await store.dispatch("job-1", [JobDispatch(new("b")), JobDispatch(new("c"))], [], NOW)
        assert [e.thing_id if e else None for e in again] == ["b", "c"]
        assert await store.job_counts("job-1") == {"QUEUED": 3}


async def test_one_replica_at_a_time_holds_a_jobs_lock(url: str) -> None:
    async with replicas(url, 2) as (a, b):
        assert await a.lock_job("job-1") and await a.lock_job("job-1")  # held: asking again keeps it
        assert not await b.lock_job("job-1")
        assert await b.lock_job("job-2")  # another job, another lock
        assert a.jobs_locked() == {"job-1"} and b.jobs_locked() == {"job-2"}
        await a.unlock_job("job-1")
        assert a.jobs_locked() == frozenset()
        assert await b.lock_job("job-1") and not await a.lock_job("job-1")
        # b's lock connection dies (a crash, a network cut): the database releases its locks at once.
        conn = await asyncpg.connect(url)
        try:
            assert b._lock_conn is not None
            # With a timeout, pg_terminate_backend returns once the backend has exited.
            assert await conn.fetchval("SELECT pg_terminate_backend($1, 10000)", b._lock_conn.get_server_pid())
        finally:
            await conn.close()
        assert await a.lock_job("job-1") and await a.lock_job("job-2")
        # b learns it lost them when it next asks (its connection is found closed).
        assert not await b.lock_job("job-2") and b.jobs_locked() == frozenset()
    # Closing a store gives its locks up.
    async with replicas(url, 1) as (c,):
        assert await c.lock_job("job-1") and await c.lock_job("job-2")


async def test_a_job_runs_on_the_replica_that_holds_its_lock_and_moves_when_that_one_stops(tmp_path: Path) -> None:
    """Two services on one database: one rollout per job, taken over by the other once its replica stops."""
    from server.app import FleetcmdApp
    from server.core import jobs as jb
    from server.core.errors import FailedPrecondition

    url = pgserver.fresh_database_url()
    first = FleetcmdApp(make_settings(tmp_path / "a", allow_anonymous=True, database_url=url))
    await first.__aenter__()
    first_stopped = False
    try:
        assert first.jobs is not None
        # Nobody is connected: both executions stay QUEUED and the job IN_PROGRESS.
        spec = jb.JobSpec(action="reboot", params={}, ttl_seconds=60, targets=jb.Targets(thing_ids=("lk-1", "lk-2")))
        job = await first.jobs.create(spec)
        assert job.state is jb.JobState.IN_PROGRESS
        async with FleetcmdApp(make_settings(tmp_path / "b", allow_anonymous=True, database_url=url)) as second:
            assert second.jobs is not None
            assert (await second.jobs.get(job.job_id)).state is jb.JobState.IN_PROGRESS  # reads work anywhere
            with pytest.raises(FailedPrecondition, match="another replica"):
                await second.jobs.pause(job.job_id)
            await first.__aexit__(None, None, None)
            first_stopped = True
            # The first replica's lock went with it: the second takes the job over when asked.
            paused = await second.jobs.pause(job.job_id)
            assert paused.state is jb.JobState.PAUSED
            assert paused.counts.get("QUEUED", 0) == 2
    finally:
        if not first_stopped:
            await first.__aexit__(None, None, None)
