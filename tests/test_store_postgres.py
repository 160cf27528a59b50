"""The PostgreSQL store with many writers: several store instances ("replicas") on one database.

The contract suite (``test_store_contract.py``) runs on PostgreSQL too; this module proves what only
a shared database needs: exactly one final status when replicas race, TTL sweeps that expire each
execution once, outbox leases taken over after they end, an event log every replica follows
without gap or duplicate in commit order, NOTIFY with its polling fallback, the migrations, and the
service itself on PostgreSQL. Every test gets a new database on the test run's throwaway server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from server.app import FleetcmdApp
from server.cli import admin as admin_cli
from server.core.errors import FleetcmdError, Unavailable
from server.core.lifecycle import Outcome, Status, Trigger
from server.core.models import DeviceReport, EventFilter, StateChange
from server.core.validation import SendCommand
from server.store import postgres as pg
from server.store import postgres_batch as pg_batch
from server.store.postgres import PostgresStore
from server.store.postgres_schema import SCHEMA_VERSION
from tests import pgserver
from tests.conftest import make_settings
from tests.pgserver import postgres_server  # noqa: F401 - the session fixture
from tests.test_store_contract import new


@pytest.fixture
def url() -> str:
    return pgserver.fresh_database_url()


class Replica:
    """One open store with its writer running and everything its commit listener was handed."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.seen: list[StateChange] = []
        self.commits: list[tuple[float, int]] = []
        self.arrived = asyncio.Event()
        store.set_commit_listener(self._on_commit)
        store.set_commit_observer(lambda seconds, writes: self.commits.append((seconds, writes)))

    def _on_commit(self, events: object) -> None:
        assert isinstance(events, list)
        self.seen += events
        self.arrived.set()

    async def wait_for(self, sequence: int, timeout: float = 10) -> None:
        """Until the listener was handed ``sequence``."""
        async with asyncio.timeout(timeout):
            while not self.seen or self.seen[-1].sequence < sequence:
                self.arrived.clear()
                await self.arrived.wait()


@asynccontextmanager
async def replicas(url: str, n: int, **kwargs: int) -> AsyncIterator[list[Replica]]:
    """``n`` stores on one database, open, writers running."""
    async with AsyncExitStack() as stack:
        out = []
        for i in range(n):
            store = await stack.enter_async_context(PostgresStore(url, replica=f"r{i}", **kwargs))
            replica = Replica(store)
            writer = asyncio.create_task(store.run_writer())

            async def stop(store: PostgresStore = store, writer: asyncio.Task[None] = writer) -> None:
                store.stop_writer()
                await writer

            stack.push_async_callback(stop)
            out.append(replica)
        yield out


def assert_gap_free(events: list[StateChange], last: int) -> None:
    assert [e.sequence for e in events] == list(range(1, last + 1))


# ---- exactly one final status ------------------------------------------------------------------


async def test_replicas_racing_final_reports_leave_one_final_status_and_record_the_loser_late(url: str) -> None:
    async with replicas(url, 3) as (a, b, c):
        n = 60
        for i in range(n):
            await a.store.create(new(i))
        ok = DeviceReport(Status.SUCCEEDED, '{"by":"a"}')
        failed = DeviceReport(Status.FAILED, '{"by":"b"}')
        racing = []
        for i in range(n):
            racing += [
                a.store.transition_nowait(f"e{i}", Trigger.DEVICE_REPORT, at_ms=50, report=ok),
                b.store.transition_nowait(f"e{i}", Trigger.DEVICE_REPORT, at_ms=50, report=failed),
                c.store.transition_nowait(f"e{i}", Trigger.EXPIRED, at_ms=50),
            ]
        results = await asyncio.gather(*racing)
        for i in range(n):
            mine = results[3 * i : 3 * i + 3]
            winners = [r for r in mine if r.decision.outcome is Outcome.CHANGE]
            assert len(winners) == 1, [r.decision for r in mine]
            got = await a.store.get(f"e{i}", with_history=True)
            assert got is not None and got.status is winners[0].execution.status
            finals = [h for h in got.history if h.status.final and not h.late]
            assert [h.status for h in finals] == [got.status]
            # The device report that lost is kept as late (the expiry that lost is only ignored).
            lost_reports = [r for r in mine[:2] if r.decision.outcome is not Outcome.CHANGE]
            assert all(r.decision.outcome is Outcome.LATE for r in lost_reports)
            assert len([h for h in got.history if h.late]) == len(lost_reports)
        assert await a.store.active() == []
        last = await a.store.last_sequence()
        for replica in (a, b, c):
            await replica.wait_for(last)
            assert_gap_free(replica.seen, last)
            assert replica.seen == await a.store.events_after(0, EventFilter(), 10_000)


async def test_the_database_refuses_a_status_going_backwards_whoever_writes_it(url: str) -> None:
    async with replicas(url, 1) as (a,):
        await a.store.create(new(1))
        await a.store.transition("e1", Trigger.CANCEL, at_ms=5)
        await a.store.create(new(2))
    conn = await asyncpg.connect(url)
    try:
        with pytest.raises(asyncpg.CheckViolationError, match="status 2 cannot follow 9"):
            await conn.execute("UPDATE executions SET status = 2 WHERE execution_id = 'e1'")
        with pytest.raises(asyncpg.CheckViolationError, match="status 5 cannot follow 9"):
            await conn.execute("UPDATE executions SET status = 5 WHERE execution_id = 'e1'")
        with pytest.raises(asyncpg.CheckViolationError, match="status 1 cannot follow 2"):
            await conn.execute("UPDATE executions SET status = 1 WHERE execution_id = 'e2'")
        await conn.execute("UPDATE executions SET status = 3 WHERE execution_id = 'e2'")  # forwards is allowed
    finally:
        await conn.close()


# ---- TTL sweeps ------------------------------------------------------------------------------


async def test_concurrent_ttl_sweeps_expire_each_execution_exactly_once(url: str) -> None:
    async with replicas(url, 3) as group:
        n = 300
        for start in range(0, n, 50):
            await asyncio.gather(*(group[0].store.create(new(i, expires_at_ms=10_000 + i)) for i in range(start, start + 50)))
        await group[0].store.create(new(n, expires_at_ms=20_001))  # not due yet at 20,000

        async def sweep(replica: Replica) -> list[str]:
            mine: list[str] = []
            while expired := await replica.store.expire_due(20_000, 25):
                assert len(expired) <= 25
                mine += [r.execution.execution_id for r in expired]
            return mine

        swept = await asyncio.gather(*(sweep(r) for r in group))
        everything = [eid for mine in swept for eid in mine]
        assert sorted(everything) == sorted(f"e{i}" for i in range(n))  # each once, none left out
        assert sum(1 for mine in swept if mine) >= 2  # the sweeps really ran side by side
        store = group[0].store
        timed_out = await store.events_after(0, EventFilter(), 10_000)
        counts = collections.Counter(e.execution_id for e in timed_out if e.status is Status.TIMED_OUT)
        assert set(counts.values()) == {1} and len(counts) == n
        assert [a.execution_id for a in await store.active()] == [f"e{n}"]
        # The deadline is inclusive: due at exactly its expires_at, not a millisecond before.
        assert await store.expire_due(20_000, 10) == []
        assert [r.execution.execution_id for r in await store.expire_due(20_001, 10)] == [f"e{n}"]


async def test_a_sweep_takes_at_most_its_limit_oldest_deadline_first(url: str) -> None:
    async with replicas(url, 1) as (a,):
        for i in range(5):
            await a.store.create(new(i, expires_at_ms=100 - i))
        assert [r.execution.execution_id for r in await a.store.expire_due(1_000, 3)] == ["e4", "e3", "e2"]
        assert [r.execution.status for r in await a.store.expire_due(1_000, 3)] == [Status.TIMED_OUT] * 2


# ---- outbox leases ---------------------------------------------------------------------------


async def test_outbox_leases_are_taken_over_only_after_they_end(url: str) -> None:
    async with replicas(url, 2, lease_ms=1_000) as (a, b):
        created = await a.store.create(new(1, status=Status.QUEUED))  # created at 1,001: leased to a until 2,001
        assert created.execution.created_at_ms == 1_001
        await a.store.create(new(2, status=Status.QUEUED))
        await a.store.transition("e2", Trigger.ACKED, at_ms=1_100)  # acknowledged: never in the outbox again
        # The creating replica holds a new request for a whole lease: nobody else publishes it meanwhile.
        assert await b.store.claim_unacked(2_000, 10) == []
        taken = await b.store.claim_unacked(2_001, 10)  # a's lease ended (a crashed): b takes it over
        assert [(t.execution.execution_id, t.epoch, t.until_ms) for t in taken] == [("e1", 2, 3_001)]
        # Held by b: a cannot claim it again, nor release b's lease; b's lease ends at 3,001 exactly.
        assert await a.store.claim_unacked(3_000, 10) == []
        assert await a.store.release("e1", 2) is False
        again = await a.store.claim_unacked(3_001, 10)
        assert [(t.execution.execution_id, t.epoch) for t in again] == [("e1", 3)]
        # Released early by its holder (its device went away): claimable at once, with a new epoch.
        assert await b.store.release("e1", 2) is False  # an old lease of b's is not the current one
        assert await a.store.release("e1", 3) is True
        assert [t.epoch for t in await b.store.claim_unacked(3_002, 10)] == [4]
        # A request that becomes final leaves the outbox whoever holds it.
        await a.store.transition("e1", Trigger.CANCEL, at_ms=3_003)
        assert await a.store.claim_unacked(99_999, 10) == []


async def test_replicas_claiming_together_never_hold_one_request_twice(url: str) -> None:
    async with replicas(url, 3, lease_ms=1_000) as group:
        n = 200
        for start in range(0, n, 50):
            await asyncio.gather(*(group[0].store.create(new(i, status=Status.QUEUED)) for i in range(start, start + 50)))

        async def claim(replica: Replica) -> list[str]:
            mine: list[str] = []
            while leases := await replica.store.claim_unacked(10_000, 7):
                assert len(leases) <= 7
                mine += [lease.execution.execution_id for lease in leases]
            return mine

        claimed = await asyncio.gather(*(claim(r) for r in group))
        everything = [eid for mine in claimed for eid in mine]
        assert sorted(everything) == sorted(f"e{i}" for i in range(n))
        only = await group[1].store.claim_unacked(20_000, 10, thing_ids=["t9"])
        assert only == []


# ---- the event log with several writers ---------------------------------------------------------


async def test_readers_resuming_during_concurrent_writes_see_no_gap_no_duplicate_in_commit_order(url: str) -> None:
    async with replicas(url, 3) as group:
        done = asyncio.Event()
        per_writer = 40

        async def write(w: int, replica: Replica) -> None:
            for i in range(per_writer):
                n = w * 1_000 + i
                await asyncio.gather(
                    replica.store.create(new(n, thing=f"t{w}")),
                    replica.store.create(new(n + 500, thing=f"t{w}")),
                )
                await replica.store.transition(f"e{n}", Trigger.ACKED, at_ms=5_000 + n)

        async def read(start: int) -> list[int]:
            # A resuming reader: pages of events_after, each must continue exactly where it stopped.
            seen, last = [], start
            while True:
                finished = done.is_set()
                page = await group[0].store.events_after(last, EventFilter(), 7)
                for event in page:
                    assert event.sequence == last + 1, f"gap or reorder after {last}: {event.sequence}"
                    last = event.sequence
                    seen.append(last)
                if finished and not page:
                    return seen
                await asyncio.sleep(0)

        readers = [asyncio.create_task(read(0)) for _ in range(2)]
        await asyncio.gather(*(write(w, r) for w, r in enumerate(group)))
        done.set()
        total = 3 * per_writer * 3
        assert await group[0].store.last_sequence() == total
        for seen in await asyncio.gather(*readers):
            assert seen == list(range(1, total + 1))
        # A reader resuming in the middle gets exactly the rest.
        assert [e.sequence for e in await group[2].store.events_after(100, EventFilter(), 10_000)] == list(range(101, total + 1))
        # Every replica's listener was handed every event of the database once, in sequence order.
        for replica in group:
            await replica.wait_for(total)
            assert_gap_free(replica.seen, total)
        assert group[0].seen == group[1].seen == group[2].seen


async def test_an_idle_replica_is_woken_by_notify(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "POLL_SECONDS", 60.0)  # only a notification can wake it within the test
    async with replicas(url, 2) as (a, b):
        created = await a.store.create(new(1))
        assert created.event is not None
        await b.wait_for(created.event.sequence, timeout=5)
        assert b.seen == [created.event]


async def test_without_notify_a_replica_still_follows_by_polling(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "POLL_SECONDS", 0.05)
    async with replicas(url, 2) as (a, b):
        listener = b.store._listen_conn  # the test drops the notifications on purpose
        assert listener is not None
        await listener.remove_listener(pg.CHANNEL, b.store._notified)
        monkeypatch.setattr(b.store, "_listen", _never_listen)
        for i in range(3):
            await a.store.create(new(i))
        await b.wait_for(3, timeout=5)
        assert_gap_free(b.seen, 3)


async def _never_listen() -> None:
    return None


async def test_a_replica_announces_other_replicas_events_before_its_own_commit(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "POLL_SECONDS", 60.0)
    async with replicas(url, 2) as (a, b):
        # b hears nothing of a's commits (no notification, no poll): its own commit must bring them first.
        listener = b.store._listen_conn
        assert listener is not None
        await listener.remove_listener(pg.CHANNEL, b.store._notified)
        for i in range(3):
            await a.store.create(new(i))
        assert b.seen == []
        mine = await b.store.create(new(9))
        assert mine.event is not None and mine.event.sequence == 4
        assert [e.sequence for e in b.seen] == [1, 2, 3, 4]  # by the time b's caller resumed


# ---- group commit ------------------------------------------------------------------------------


@pytest.mark.parametrize(("writes", "commits"), [(pg.MAX_BATCH, [pg.MAX_BATCH]), (pg.MAX_BATCH + 1, [pg.MAX_BATCH, 1])])
async def test_a_batch_holds_at_most_max_batch_writes(url: str, writes: int, commits: list[int]) -> None:
    async with replicas(url, 1) as (a,):
        await a.store.create(new(0))
        a.commits.clear()
        await asyncio.gather(*(a.store.transition_nowait("e0", Trigger.ACKED, at_ms=5) for _ in range(writes)))
        assert [n for _, n in a.commits] == commits


async def test_kaa_ids_and_idempotency_keys_hold_across_replicas(url: str) -> None:
    async with replicas(url, 3) as group:
        made = await asyncio.gather(
            *(group[i % 3].store.create(new(i, kaa=True)) for i in range(30)),
            *(group[i % 3].store.create(new(100 + i, key="same", fp="F")) for i in range(6)),
        )
        kaa_ids = sorted(r.execution.kaa_id or 0 for r in made[:30])
        assert kaa_ids == list(range(1, 31))
        keyed = made[30:]
        assert sum(r.created for r in keyed) == 1
        assert len({r.execution.execution_id for r in keyed}) == 1


# ---- migrations ---------------------------------------------------------------------------------


async def test_the_schema_is_versioned_migrated_once_and_a_newer_one_refused(url: str) -> None:
    stores = [PostgresStore(url, replica=f"r{i}") for i in range(3)]
    await asyncio.gather(*(s.open() for s in stores))  # replicas starting together migrate once
    await asyncio.gather(*(s.close() for s in stores))
    conn = await asyncpg.connect(url)
    try:
        assert [tuple(r) for r in await conn.fetch("SELECT version FROM schema_version")] == [(SCHEMA_VERSION,)]
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(FleetcmdError, match=f"schema {SCHEMA_VERSION + 1}, newer than this fleetcmd"):
        async with PostgresStore(url):
            pass


def test_a_postgres_url_must_name_a_database() -> None:
    with pytest.raises(FleetcmdError, match="expected postgresql://user:password@host:port/database"):
        PostgresStore.from_url("postgresql://host:5432/")
    assert PostgresStore.from_url("postgresql://u:p@h:1/db").url == "postgresql://u:p@h:1/db"


# ---- the service on PostgreSQL ------------------------------------------------------------------


async def test_the_service_runs_on_postgresql(tmp_path: Path, url: str) -> None:
    settings = make_settings(tmp_path / "data", database_url=url)
    async with FleetcmdApp(settings) as app:
        assert app.core is not None and isinstance(app.core.store, PostgresStore)
        sent = await app.core.send(SendCommand("t1", "reboot", None, 5, ""))
    assert not settings.db_path.exists()
    async with PostgresStore(url) as reopened:
        got = await reopened.get(sent.execution_id)
        assert got is not None and got.thing_id == "t1"


# ---- the throwaway server: skipped only without binaries, never in CI ----------------------------


def test_without_binaries_the_tests_skip_with_the_reason_or_fail_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pgserver.require_binaries() == pgserver.find_bindir()  # here they are found
    monkeypatch.setattr(pgserver, "find_bindir", lambda: None)
    monkeypatch.delenv(pgserver.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL binaries not found"):
        pgserver.require_binaries()
    monkeypatch.setenv(pgserver.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="FLEETCMD_REQUIRE_POSTGRES=1 and PostgreSQL binaries not found"):
        pgserver.require_binaries()


def test_ci_installs_postgresql_and_requires_its_tests() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert 'missing="$missing postgresql"' in ci
    assert f"export {pgserver.REQUIRE_ENV}=1" in ci
    assert ci.index(f"export {pgserver.REQUIRE_ENV}=1") < ci.index("\nmake test")


def test_the_server_runs_as_the_postgres_user_on_loopback(url: str, postgres_server: pgserver.PgServer) -> None:  # noqa: F811
    server = postgres_server
    assert server.process.poll() is None and f"127.0.0.1:{server.port}/" in url
    if server.user is not None:  # as root: PostgreSQL refuses root
        assert server.user == "postgres"
        assert (server.root / "data").stat().st_uid == pgserver.pwd.getpwnam("postgres").pw_uid


async def test_lost_connections_make_the_store_unavailable_then_it_reconnects(url: str) -> None:
    async with replicas(url, 1) as (a,):
        await a.store.create(new(1))
        admin = await asyncpg.connect(url)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert killed >= 2  # the writer and at least one reader
        # The first write on the dead connection fails as Unavailable (nothing half-done); the next reconnects.
        outcomes = []
        for i in range(2, 5):
            try:
                outcomes.append((await a.store.create(new(i))).created)
            except Unavailable:
                outcomes.append(None)
        assert outcomes[-1] is True and outcomes.count(None) <= 1
        got = await a.store.get("e4")
        assert got is not None


def test_the_admin_cli_manages_api_keys_in_postgresql(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETCMD_DATABASE_URL", url)
    local = {"data_dir": tmp_path / "unused", "json": True}
    assert admin_cli.cmd_apikey(argparse.Namespace(apikey_command="create", name="ci", role="operator", **local)) == 0
    key_id = json.loads(capsys.readouterr().out)["key_id"]
    assert admin_cli.cmd_apikey(argparse.Namespace(apikey_command="revoke", key_id=key_id, **local)) == 0
    assert admin_cli.cmd_apikey(argparse.Namespace(apikey_command="list", **local)) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "revoked" in listed
    assert not (tmp_path / "unused" / "fleetcmd.db").exists()


async def test_a_value_the_database_refuses_fails_its_write_alone(url: str) -> None:
    async with replicas(url, 1) as (a,):
        bad = dataclasses.replace(new(2), params_json='{"n":"\x00"}')  # PostgreSQL text cannot hold NUL
        outcomes = await asyncio.gather(
            a.store.create(new(1)), a.store.create(bad), a.store.create(new(3)), return_exceptions=True
        )
        assert isinstance(outcomes[1], asyncpg.PostgresError)
        assert [e.execution_id for e in await a.store.get_many(["e1", "e2", "e3"])] == ["e1", "e3"]
        assert [e.sequence for e in a.seen] == [1, 2]  # no gap left by the refused write
        assert len(a.commits) == 1  # still one commit for the batch


async def test_a_replica_catches_up_page_by_page(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "FOLLOW_PAGE", 3)
    monkeypatch.setattr(pg, "POLL_SECONDS", 60.0)  # one notification, one catch-up: it must read every page
    async with replicas(url, 2) as (a, b):
        await asyncio.gather(*(a.store.create(new(i)) for i in range(10)))  # one commit, more than three pages
        await b.wait_for(10)
        assert_gap_free(b.seen, 10)


async def test_a_batch_that_keeps_conflicting_runs_retries_times_then_isolated(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pg_batch.Batch._write_rows

    async def conflicting(self: pg_batch.Batch) -> None:
        if not self.isolate:
            raise pg_batch.Retry("another writer got there first")
        await real(self)

    async with replicas(url, 1) as (a,):
        monkeypatch.setattr(pg_batch.Batch, "_write_rows", conflicting)
        done = await asyncio.gather(a.store.create(new(1)), a.store.create(new(2)))
        assert a.store.retries == pg.RETRIES  # the last run is the isolated one, which commits
        assert [r.event.sequence for r in done if r.event] == [1, 2]
