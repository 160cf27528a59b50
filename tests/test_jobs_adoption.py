"""Jobs whose replica stopped are taken over by another replica on its own (issue 16 §3, PostgreSQL).

Every replica's jobs loop looks every ``job_adopt_seconds`` for unfinished jobs whose advisory lock
nobody holds (``PostgresStore.unlocked_jobs``), locks them (one replica wins each) and rebuilds them
from the store (``JobsCore.adopt_orphans``). The services here are real ``FleetcmdApp`` instances (and
one ``fleetcmd serve`` process killed with SIGKILL) on one PostgreSQL database; the rollouts that must
finish use one mosquitto as the external broker, so that whichever replica is left reaches the devices.
No test calls the jobs API of the replica that takes over: the rollout goes on by itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from server.app import FleetcmdApp
from server.config import MAX_JOB_ADOPT, Settings, SettingsError
from server.core import jobs as jb
from server.core.clock import now_ms
from server.core.errors import Unavailable
from server.core.job_runner import ADOPT_PER_PASS, JobsCore
from server.core.lifecycle import Status
from server.core.models import EventFilter, Execution, ListQuery
from server.pb import jobs_pb2 as jpb
from server.pb import jobs_pb2_grpc as jpb_grpc
from server.store import JobLockLost, TargetState, postgres_batch, postgres_jobs
from server.store.postgres import PostgresStore
from server.store.postgres_jobs import JOB_LOCK_SEED, UNLOCKED_JOBS
from tests import pgserver
from tests.conftest import make_settings
from tests.mosquitto import Mosquitto, mosquitto
from tests.proc import Service
from tests.test_external_broker import EmqxFirmware

pytestmark = pytest.mark.timeout(90)

WAIT = 30.0


def replica(tmp_path: Path, name: str, url: str, broker: Mosquitto | None = None, **kw: Any) -> Settings:
    """One replica's settings on the database ``url`` (and the external ``broker`` when given)."""
    values: dict[str, Any] = {"allow_anonymous": True, "database_url": url, "job_adopt_seconds": 1, **kw}
    if broker is not None:
        values.update(broker_url=broker.url, broker_client_id=f"fleetcmd-{name}", outbox_lease_seconds=1)
    return make_settings(tmp_path / name, **values)


@asynccontextmanager
async def running(*settings: Settings) -> AsyncIterator[list[FleetcmdApp]]:
    """The services started in order; each stopped at the end unless the test stopped it (``stop``)."""
    async with AsyncExitStack() as stack:
        apps = []
        for s in settings:
            app = FleetcmdApp(s)
            await app.__aenter__()
            apps.append(app)
            stack.push_async_callback(stop, app)
        try:
            yield apps
        finally:
            _STOPPED.difference_update(id(app) for app in apps)


_STOPPED: set[int] = set()


async def stop(app: FleetcmdApp) -> None:
    """Stop ``app`` gracefully (once)."""
    if id(app) not in _STOPPED:
        _STOPPED.add(id(app))
        await app.__aexit__(None, None, None)


def jobs(app: FleetcmdApp) -> JobsCore:
    assert app.jobs is not None
    return app.jobs


def ids_of(runner: JobsCore) -> set[str]:
    return set(runner._runs)


async def job_executions(app: FleetcmdApp, job_id: str) -> list[Execution]:
    assert app.core is not None
    return (await app.core.list_executions(ListQuery(job_id=job_id, page_size=1000))).executions


async def eventually(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll the store-reading ``check`` (an awaitable factory) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def url() -> str:
    return pgserver.fresh_database_url()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with mosquitto(tmp_path / "mosquitto") as running_broker:
        yield running_broker


@asynccontextmanager
async def devices(broker: Mosquitto, ids: list[str]) -> AsyncIterator[list[EmqxFirmware]]:
    """Firmware on the shared broker answering SUCCEEDED at once."""
    fleet = [EmqxFirmware(broker.port, i) for i in ids]
    await asyncio.gather(*(asyncio.to_thread(d.begin) for d in fleet))
    try:
        yield fleet
    finally:
        await asyncio.gather(*(asyncio.to_thread(d.stop) for d in fleet))


def assert_one_execution_each(execs: list[Execution], ids: list[str]) -> None:
    things = [e.thing_id for e in execs]
    assert sorted(things) == sorted(ids) and len(set(things)) == len(ids)  # none twice, none missing
    assert all(e.job_attempt == 1 and e.status is Status.SUCCEEDED for e in execs), [(e.thing_id, e.status) for e in execs]


async def job_snapshots(app: FleetcmdApp, job_id: str) -> list[jb.Job]:
    """The job's events in the log, in order (whichever replica wrote them)."""
    assert app.store is not None
    events = await app.store.events_after(0, EventFilter(job_id=job_id), 10_000)
    return [e.job for e in events if e.job is not None]


def assert_no_repeat(snapshots: list[jb.Job]) -> None:
    """No job event shows what the one before it showed (an event is written only on a real change)."""
    repeats = [(i, x.state.name, dict(x.counts)) for i, (x, y) in enumerate(itertools.pairwise(snapshots)) if x == y]
    assert not repeats, repeats


async def settled(app: FleetcmdApp, job_id: str) -> jb.Job | None:
    """The job as the store holds it once it is final and settled (read on a replica that does not run it)."""
    assert app.core is not None
    job = await jobs(app).get(job_id)
    return job if job.state.final and job_id not in ids_of(jobs(app)) else None


# ---- a rollout goes on after its replica stops -----------------------------------------------------


async def test_a_job_whose_replica_stops_is_taken_over_by_one_replica_and_finished_without_any_call(
    tmp_path: Path, url: str, broker: Mosquitto
) -> None:
    ids = [f"ad-{i:02d}" for i in range(12)]
    rate = 240  # one every 250 ms: 3 s for the whole job
    async with devices(broker, ids), running(*(replica(tmp_path, n, url, broker) for n in "abc")) as (a, b, c):
        job = await jobs(a).create(
            jb.JobSpec("reboot", {}, 30, jb.Targets(thing_ids=tuple(ids)), rollout=jb.Rollout(max_per_minute=rate))
        )

        async def some_started() -> bool:
            return len(await job_executions(b, job.job_id)) >= 4

        await eventually(some_started, "four targets started on the first replica")
        assert ids_of(jobs(b)) == ids_of(jobs(c)) == set()  # while it runs, the others leave it alone
        await stop(a)
        by_a = len(await job_executions(b, job.job_id))
        assert by_a < len(ids)
        done = await eventually(lambda: settled(b, job.job_id), "the job finished on another replica")
        assert done.state is jb.JobState.COMPLETED and done.counts == {"SUCCEEDED": len(ids)}
        execs = await job_executions(c, job.job_id)
    assert_one_execution_each(execs, ids)
    # Exactly one of the others took it over and started the rest; the other started nothing.
    taken = sorted((jobs(r).stats["adopted"], jobs(r).stats["dispatched"]) for r in (b, c))
    # (What a dispatched by its own count: the executions listed after its stop may include the adopter's first.)
    assert taken[0] == (0, 0) and taken[1][0] == 1 and 0 < taken[1][1] <= len(ids) - jobs(a).stats["dispatched"]
    # Paced across the takeover: the new owner's first slot follows the last durable dispatch.
    created = sorted(e.created_at_ms for e in execs)
    assert min(y - x for x, y in itertools.pairwise(created)) >= 60_000 // rate - 1


async def test_a_paused_job_stays_paused_when_taken_over_and_a_scheduled_one_starts_when_due(tmp_path: Path, url: str) -> None:
    # Nobody is connected: started executions stay QUEUED, so the jobs stay IN_PROGRESS / PAUSED.
    async with running(replica(tmp_path, "a", url), replica(tmp_path, "b", url)) as (a, b):
        paced = jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=("p-0", "p-1", "p-2")), rollout=jb.Rollout(max_per_minute=120))
        paused = await jobs(a).create(paced)

        async def first_slot() -> bool:
            return len(await job_executions(b, paused.job_id)) >= 1

        await eventually(first_slot, "the paced job's first slot")
        await jobs(a).pause(paused.job_id)
        start_at = now_ms() + 2_500
        later = jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=("s-0", "s-1")), schedule=jb.Schedule(start_at_ms=start_at))
        scheduled = await jobs(a).create(later)
        assert scheduled.state is jb.JobState.SCHEDULED
        await stop(a)
        before_pause = len(await job_executions(b, paused.job_id))
        assert before_pause < 3

        async def both_taken() -> bool:
            return ids_of(jobs(b)) == {paused.job_id, scheduled.job_id}

        await eventually(both_taken, "both jobs taken over")
        assert jobs(b).stats["adopted"] == 2

        # The scheduled one starts at its time, on its own.
        async def started() -> bool:
            return len(await job_executions(b, scheduled.job_id)) == 2

        await eventually(started, "the scheduled job started")
        execs = await job_executions(b, scheduled.job_id)
        assert min(e.created_at_ms for e in execs) >= start_at
        # The paused one started nothing in the meantime (more than four adoption passes and eight 500 ms slots).
        assert (await jobs(b).get(paused.job_id)).state is jb.JobState.PAUSED
        assert len(await job_executions(b, paused.job_id)) == before_pause
        # And it is this replica's now: resuming it needs no other.
        await jobs(b).resume(paused.job_id)

        async def resumed() -> bool:
            return len(await job_executions(b, paused.job_id)) == 3

        await eventually(resumed, "the resumed job started its other targets")
        things = sorted(e.thing_id for e in await job_executions(b, paused.job_id))
    assert things == ["p-0", "p-1", "p-2"]


# ---- one pass: bounded, one winner per job, a lost lock gives the jobs up ------------------------------


async def test_an_adoption_pass_takes_at_most_its_bound_each_job_once_and_a_lost_lock_gives_jobs_up(
    tmp_path: Path, url: str
) -> None:
    n = ADOPT_PER_PASS + 1
    # The loops of b and c never look on their own here (an hour apart): the test runs each pass.
    quiet = {"job_adopt_seconds": MAX_JOB_ADOPT}
    async with running(
        replica(tmp_path, "a", url), replica(tmp_path, "b", url, **quiet), replica(tmp_path, "c", url, **quiet)
    ) as (a, b, c):
        created = [
            (await jobs(a).create(jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=(f"o-{i}",))))).job_id for i in range(n)
        ]
        assert isinstance(b.store, PostgresStore)
        assert await b.store.unlocked_jobs(100) == []  # a holds every lock (both signs of the 64-bit key among them)
        assert await jobs(b).adopt_orphans() == 0
        await stop(a)
        assert sorted(r.job_id for r in await b.store.unlocked_jobs(100)) == sorted(created)
        assert await jobs(b).adopt_orphans() == ADOPT_PER_PASS  # the bound: one more waits for the next pass
        assert await jobs(c).adopt_orphans() == 1
        assert await jobs(b).adopt_orphans() == 0 and await jobs(c).adopt_orphans() == 0
        assert ids_of(jobs(b)) | ids_of(jobs(c)) == set(created) and not ids_of(jobs(b)) & ids_of(jobs(c))
        assert await b.store.unlocked_jobs(100) == []
        # b's lock connection dies (a network cut): its jobs go to c, and b stops running them at its next pass.
        assert b.store._lock_conn is not None
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1, 10000)", b.store._lock_conn.get_server_pid())
        finally:
            await conn.close()
        assert await jobs(c).adopt_orphans() == ADOPT_PER_PASS
        assert await jobs(b).adopt_orphans() == 0
        assert ids_of(jobs(b)) == set() and ids_of(jobs(c)) == set(created)
        # Every job still has its one execution, QUEUED (nobody is connected).
        for job_id in created:
            assert [e.status for e in await job_executions(c, job_id)] == [Status.QUEUED]


async def test_a_new_job_won_by_another_replicas_pass_before_its_creator_locks_it_runs_there_only(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job's row commits before its creator locks it: another replica's pass in between wins it.
    quiet = {"job_adopt_seconds": MAX_JOB_ADOPT}
    async with running(replica(tmp_path, "a", url, **quiet), replica(tmp_path, "b", url, **quiet)) as (a, b):
        assert isinstance(a.store, PostgresStore)
        lock_job = a.store.lock_job
        won: list[int] = []

        async def late_lock(job_id: str) -> bool:
            won.append(await jobs(b).adopt_orphans())
            return await lock_job(job_id)

        monkeypatch.setattr(a.store, "lock_job", late_lock)
        job = await jobs(a).create(jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=("r-0", "r-1"))))
        assert won == [1]
        assert ids_of(jobs(a)) == set() and ids_of(jobs(b)) == {job.job_id}

        async def started() -> bool:
            return len(await job_executions(a, job.job_id)) == 2

        await eventually(started, "the job started on the replica that won it")
        assert jobs(a).stats["dispatched"] == 0 and jobs(b).stats["dispatched"] == 2


async def test_a_takeover_that_fails_half_way_gives_the_job_up_for_a_later_pass(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet = {"job_adopt_seconds": MAX_JOB_ADOPT}
    async with running(replica(tmp_path, "a", url), replica(tmp_path, "b", url, **quiet)) as (a, b):
        job = await jobs(a).create(jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=("h-0",))))
        await stop(a)
        assert isinstance(b.store, PostgresStore)
        read_targets = b.store.targets

        async def cut(*args: Any, **kw: Any) -> Any:
            raise Unavailable("store read failed: cut")

        monkeypatch.setattr(b.store, "targets", cut)  # the rebuild reads the job's started targets
        with pytest.raises(Unavailable):
            await jobs(b).adopt_orphans()
        assert ids_of(jobs(b)) == set() and jobs(b).metrics()["job_executions_in_flight"] == 0
        assert [r.job_id for r in await b.store.unlocked_jobs(10)] == [job.job_id]  # its lock given up
        monkeypatch.setattr(b.store, "targets", read_targets)
        assert await jobs(b).adopt_orphans() == 1
        assert ids_of(jobs(b)) == {job.job_id}

        async def started_once() -> bool:
            return (await jobs(b).get(job.job_id)).counts == {"QUEUED": 1}

        await eventually(started_once, "the job's one target started")
        assert len(await job_executions(b, job.job_id)) == 1


# ---- what the adopter writes and dispatches ------------------------------------------------------------


async def test_the_replica_that_takes_a_job_over_writes_no_job_event_repeating_the_last_one(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet = {"job_adopt_seconds": MAX_JOB_ADOPT}
    async with running(replica(tmp_path, "a", url), replica(tmp_path, "b", url, **quiet)) as (a, b):
        assert a.core is not None and isinstance(b.store, PostgresStore)
        job = await jobs(a).create(jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=("e-0", "e-1", "e-2"))))

        async def all_started() -> bool:
            return len(await job_executions(a, job.job_id)) == 3

        await eventually(all_started, "the job's three targets started")

        # a stops after the job event showing a final status and before the settle of its target is committed
        # (as a replica dying between those two commits does): the replica taking over settles it.
        async def not_committed(job_id: str, settles: Any) -> None:
            return None

        monkeypatch.setattr(a.store, "settle", not_committed)
        await a.core.cancel((await job_executions(a, job.job_id))[0].execution_id)

        async def shown() -> bool:
            last = (await job_snapshots(b, job.job_id))[-1]
            return last.counts == {"CANCELED": 1, "QUEUED": 2}

        await eventually(shown, "the job event showing the canceled execution")
        await stop(a)
        assert await jobs(b).adopt_orphans() == 1

        async def settled_by_b() -> bool:
            done = await b.store.targets(job.job_id, (TargetState.DONE,), 10)
            return len(done) == 1 and not jobs(b)._unpublished and not jobs(b)._publishing

        await eventually(settled_by_b, "the adopter settled the target its last replica left")
        await jobs(b).cancel(job.job_id)  # a real change after it: the log shows it last
        snapshots = await job_snapshots(b, job.job_id)
    assert_no_repeat(snapshots)
    shown_once = [s for s in snapshots if s.state is jb.JobState.IN_PROGRESS and s.counts == {"CANCELED": 1, "QUEUED": 2}]
    assert len(shown_once) == 1 and snapshots[-1].state is jb.JobState.CANCELED


async def cut_lock_connection(url: str, store: PostgresStore) -> None:
    """End the backend of ``store``'s job-lock connection (a network cut): its advisory locks go with it."""
    assert store._lock_conn is not None
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 10000)", store._lock_conn.get_server_pid())
    finally:
        await conn.close()


async def not_final(app: FleetcmdApp, job_id: str) -> int:
    return sum(not e.status.final for e in await job_executions(app, job_id))


async def test_a_dispatch_sent_after_its_job_was_taken_over_commits_nothing_and_max_in_flight_holds(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody is connected: started executions stay QUEUED, in flight, so max_in_flight bounds how many exist.
    ids, limit = tuple(f"f-{i}" for i in range(8)), 4
    quiet = {"job_adopt_seconds": MAX_JOB_ADOPT}
    async with running(replica(tmp_path, "a", url, **quiet), replica(tmp_path, "b", url, **quiet)) as (a, b):
        assert isinstance(a.store, PostgresStore) and isinstance(b.store, PostgresStore)
        a_dispatch, b_dispatch = a.store.dispatch, b.store.dispatch
        under_way, go, a_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        refused: list[BaseException] = []

        async def a_held(*args: Any) -> Any:
            if under_way.is_set():
                return await a_dispatch(*args)
            under_way.set()  # a's first dispatch (four targets) waits here, sent but not submitted yet
            await go.wait()
            try:
                return await a_dispatch(*args)
            except JobLockLost as exc:
                refused.append(exc)
                raise
            finally:
                a_done.set()

        async def b_after_a(*args: Any) -> Any:
            await a_done.wait()  # the worst order: a's dispatch reaches the database first
            return await b_dispatch(*args)

        monkeypatch.setattr(a.store, "dispatch", a_held)
        monkeypatch.setattr(b.store, "dispatch", b_after_a)
        spec = jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=ids), rollout=jb.Rollout(max_in_flight=limit))
        job = await jobs(a).create(spec)
        await asyncio.wait_for(under_way.wait(), WAIT)
        try:
            await cut_lock_connection(url, a.store)
            assert await jobs(b).adopt_orphans() == 1  # b rebuilt the job: nothing started yet
        finally:
            go.set()

        async def b_started() -> bool:
            return jobs(b).stats["dispatched"] >= limit

        await eventually(b_started, "the replica that took the job over started its targets")
        assert len(await job_executions(b, job.job_id)) == limit and await not_final(b, job.job_id) == limit
        assert len(refused) == 1  # a's late dispatch: refused whole
        assert jobs(a).stats["dispatched"] == 0

        async def a_gave_up() -> bool:
            return not ids_of(jobs(a))

        await eventually(a_gave_up, "the replica whose dispatch was refused stopped running the job")
        assert ids_of(jobs(b)) == {job.job_id}


def hold_first_dispatch_transaction(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """The next job dispatch (of any replica here) stops with its transaction open until ``go``; ``inside`` is set then."""
    plan = postgres_batch.PLANS["job_dispatch"]
    inside, go = asyncio.Event(), asyncio.Event()

    async def held_in_transaction(batch: Any, *args: Any) -> Any:
        result = await plan(batch, *args)  # planned (the lock owner checked): its transaction is open
        if not inside.is_set():
            inside.set()
            await go.wait()
        return result

    monkeypatch.setitem(postgres_batch.PLANS, "job_dispatch", held_in_transaction)
    return inside, go


async def test_taking_a_job_over_waits_for_the_dispatch_its_last_replica_has_in_its_transaction(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, limit = tuple(f"g-{i}" for i in range(8)), 4
    quiet = {"job_adopt_seconds": MAX_JOB_ADOPT}
    async with running(replica(tmp_path, "a", url, **quiet), replica(tmp_path, "b", url, **quiet)) as (a, b):
        assert a.core is not None and isinstance(a.store, PostgresStore) and isinstance(b.store, PostgresStore)
        inside, go = hold_first_dispatch_transaction(monkeypatch)
        spec = jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=ids), rollout=jb.Rollout(max_in_flight=limit))
        job = await jobs(a).create(spec)
        await asyncio.wait_for(inside.wait(), WAIT)
        await cut_lock_connection(url, a.store)
        adoption = asyncio.ensure_future(jobs(b).adopt_orphans())
        probe = await asyncpg.connect(url)
        try:

            async def waiting_or_done() -> bool:
                conn = b.store._lock_conn  # type: ignore[union-attr]
                if adoption.done() or conn is None:
                    return adoption.done()
                sql = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
                return bool(await probe.fetchval(sql, conn.get_server_pid()))

            await eventually(waiting_or_done, "b's takeover either done or waiting for a row lock")
            assert not adoption.done()  # b locked the job and waits for a's dispatch to commit before rebuilding it
        finally:
            go.set()  # (a's writer is held until then: released whatever the test found)
            await probe.close()
        assert await adoption == 1
        assert len(await job_executions(b, job.job_id)) == limit  # a's dispatch committed, b rebuilt it in flight
        # One execution ends: there is room for one more, which the job's new replica starts (a's try is refused).
        await a.core.cancel((await job_executions(b, job.job_id))[0].execution_id)

        async def one_more() -> bool:
            return jobs(b).stats["dispatched"] >= 1

        await eventually(one_more, "the replica that took the job over started one target")
        assert len(await job_executions(b, job.job_id)) == limit + 1 and await not_final(b, job.job_id) == limit
        assert jobs(a).stats["dispatched"] == limit and jobs(b).stats["dispatched"] == 1


async def test_a_takeover_whose_wait_for_that_dispatch_passes_the_check_time_gives_the_job_up_for_a_later_pass(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A replica cut off in the middle of its dispatch transaction holds the job's row until the database ends it.
    monkeypatch.setattr(postgres_jobs, "LOCK_CHECK_SECONDS", 0.5)
    quiet = {"job_adopt_seconds": MAX_JOB_ADOPT}
    async with running(replica(tmp_path, "a", url, **quiet), replica(tmp_path, "b", url, **quiet)) as (a, b):
        assert isinstance(a.store, PostgresStore) and isinstance(b.store, PostgresStore)
        inside, go = hold_first_dispatch_transaction(monkeypatch)
        job = await jobs(a).create(jb.JobSpec("reboot", {}, 60, jb.Targets(thing_ids=("w-0", "w-1"))))
        await asyncio.wait_for(inside.wait(), WAIT)
        try:
            await cut_lock_connection(url, a.store)
            began = time.monotonic()
            assert await jobs(b).adopt_orphans() == 0
            assert time.monotonic() - began >= 0.5
            assert ids_of(jobs(b)) == set()
            assert [r.job_id for r in await b.store.unlocked_jobs(10)] == [job.job_id]  # its lock given up again
        finally:
            go.set()
        assert await jobs(b).adopt_orphans() == 1  # once a's dispatch committed, a later pass takes the job
        assert len(await job_executions(b, job.job_id)) == 2 and jobs(b).stats["dispatched"] == 0


async def test_the_adoption_query_reads_the_partial_index_of_unsettled_jobs(tmp_path: Path, url: str) -> None:
    async with running(replica(tmp_path, "a", url, job_adopt_seconds=MAX_JOB_ADOPT)) as (a,):
        assert isinstance(a.store, PostgresStore)
        conn = await asyncpg.connect(url)
        try:
            # Months of settled jobs and a few running ones.
            await conn.execute(
                "INSERT INTO jobs (job_id, spec, state, created_at, counts)"
                " SELECT 'old-' || i, '{}', 4, i, '{}' FROM generate_series(1, 20000) AS i"
            )
            await conn.execute(
                "INSERT INTO jobs (job_id, spec, state, created_at) VALUES ('run-1', '{}', 2, 1), ('run-2', '{}', 3, 2)"
            )
            await conn.execute("ANALYZE jobs")
            [[plan]] = await conn.fetch(f"EXPLAIN (FORMAT JSON) {UNLOCKED_JOBS}", ADOPT_PER_PASS, JOB_LOCK_SEED)
        finally:
            await conn.close()
        scans = list(plan_nodes(json.loads(plan)[0]["Plan"]))
        on_jobs = [(n["Node Type"], n.get("Index Name")) for n in scans if n.get("Relation Name") == "jobs"]
        assert on_jobs == [("Index Scan", "jobs_unsettled")], on_jobs
        assert [r.job_id for r in await a.store.unlocked_jobs(ADOPT_PER_PASS)] == ["run-1", "run-2"]


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


# ---- SIGKILL of the real process that runs the job -----------------------------------------------------


async def test_a_job_whose_process_is_killed_is_finished_by_the_other_replica(
    tmp_path: Path, url: str, broker: Mosquitto
) -> None:
    ids = [f"k-{i:02d}" for i in range(20)]
    rate = 600  # one every 100 ms
    killed = Service(
        tmp_path / "killed",
        flags=("--grpc-port", "0"),
        env={
            "FLEETCMD_DATABASE_URL": url,
            "FLEETCMD_BROKER_URL": broker.url,
            "FLEETCMD_BROKER_CLIENT_ID": "fleetcmd-killed",
            "FLEETCMD_OUTBOX_LEASE_SECONDS": "1",
        },
    )
    try:
        await asyncio.to_thread(killed.start)
        async with devices(broker, ids), running(replica(tmp_path, "b", url, broker)) as (b,):
            async with killed.channel() as channel:
                spec = jpb.JobSpec(
                    action="reboot",
                    ttl_seconds=30,
                    targets=jpb.JobTargets(thing_ids=ids),
                    rollout=jpb.JobRollout(max_per_minute=rate),
                )
                reply = await jpb_grpc.JobServiceStub(channel).CreateJob(jpb.CreateJobRequest(spec=spec), timeout=10)
            job_id = reply.job.job_id

            async def some_started() -> bool:
                return len(await job_executions(b, job_id)) >= 5

            await eventually(some_started, "five targets started in the process")
            os.kill(killed.pid, signal.SIGKILL)
            await asyncio.to_thread(killed.wait, 10)
            done = await eventually(lambda: settled(b, job_id), "the job finished on the other replica")
            assert done.state is jb.JobState.COMPLETED and done.counts == {"SUCCEEDED": len(ids)}
            execs = await job_executions(b, job_id)
            assert jobs(b).stats["adopted"] == 1
            assert 0 < jobs(b).stats["dispatched"] <= len(ids) - 5
    finally:
        killed.close()
    assert_one_execution_each(execs, ids)


# ---- the setting ----------------------------------------------------------------------------------------


def test_the_adoption_interval_is_1_to_3600_seconds(tmp_path: Path) -> None:
    assert make_settings(tmp_path, job_adopt_seconds=1).job_adopt_seconds == 1
    assert make_settings(tmp_path, job_adopt_seconds=MAX_JOB_ADOPT).job_adopt_seconds == MAX_JOB_ADOPT == 3600
    for bad in (0, MAX_JOB_ADOPT + 1):
        with pytest.raises(SettingsError, match="job_adopt_seconds"):
            make_settings(tmp_path, job_adopt_seconds=bad)
