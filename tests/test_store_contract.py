"""The store contract: every promise the control plane relies on, for every store implementation.

Parametrized by :data:`STORE_URLS` (one URL maker per implementation: SQLite, PostgreSQL): a
second store adds its URL there and must pass this suite unchanged. Everything goes through
the public protocol (:func:`server.store.store_from_url`, :class:`server.store.Store`,
:class:`server.store.KaaStore`), nothing through an implementation. What only SQLite does
(group commit, the write cache, savepoint isolation, the order of resumption within a commit)
is in ``test_store.py`` and ``test_store_fastpath.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.app import FleetcmdApp
from server.cli import admin as admin_cli
from server.config import Settings, SettingsError
from server.core.errors import AlreadyExists, FleetcmdError, NotFound, ThingMismatch, Unavailable
from server.core.lifecycle import Outcome, Status, Trigger
from server.core.models import DeviceReport, EventFilter, ListQuery, NewExecution, StateChange
from server.core.validation import SendCommand
from server.store import STORES, ServiceStore, TransitionResult, kaa_store, store_from_url
from tests import pgserver
from tests.conftest import make_settings

# Implementation -> a fresh, empty store's URL for one test (given the test's own directory).
STORE_URLS: dict[str, Callable[[Path], str]] = {
    "sqlite": lambda tmp: f"sqlite:///{tmp.as_posix()}/db/contract.db",
    # A new database on the test run's throwaway server (tests/pgserver.py).
    "postgresql": lambda _tmp: pgserver.fresh_database_url(),
}


@pytest.fixture(params=sorted(STORE_URLS))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return STORE_URLS[request.param](tmp_path)


def new(
    i: int,
    *,
    thing: str = "t1",
    action: str = "reboot",
    key: str = "",
    fp: str = "",
    status: Status = Status.SENT,
    kaa: bool = False,
    expires_at_ms: int | None = None,
) -> NewExecution:
    return NewExecution(
        execution_id=f"e{i}",
        command_id=f"c{i}",
        thing_id=thing,
        action=action,
        params_json=f'{{"n":{i}}}',
        ttl_seconds=30,
        status=status,
        created_at_ms=1_000 + i,
        expires_at_ms=31_000 + i if expires_at_ms is None else expires_at_ms,
        idempotency_key=key,
        fingerprint=fp,
        kaa=kaa,
    )


@dataclass
class Open:
    store: ServiceStore
    commits: list[list[StateChange]] = field(default_factory=list)

    @property
    def events(self) -> list[StateChange]:
        return [e for commit in self.commits for e in commit]


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Open]:
    """The store ``url`` names, open, with its writer running and every commit recorded."""
    store = store_from_url(url)
    async with store:
        running = Open(store)
        store.set_commit_listener(lambda events: running.commits.append(list(events)))
        writer = asyncio.create_task(store.run_writer())
        try:
            yield running
        finally:
            store.stop_writer()
            await writer


@pytest.fixture
async def db(url: str) -> AsyncIterator[Open]:
    async with opened(url) as running:
        yield running


# ---- choosing the store -------------------------------------------------------------------


def test_the_default_store_is_the_sqlite_file_in_the_data_directory(tmp_path: Path) -> None:
    assert Settings(data_dir=Path("data")).store_url == "sqlite:///data/fleetcmd.db"
    assert Settings(data_dir=tmp_path).store_url == f"sqlite:///{tmp_path}/fleetcmd.db"
    assert Settings(data_dir=tmp_path, database_url="sqlite:///x.db").store_url == "sqlite:///x.db"
    assert "sqlite" in STORES


def test_an_unknown_scheme_is_refused_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="database_url 'mysql://db/fleet' names no known store"):
        Settings(database_url="mysql://db/fleet")
    with pytest.raises(FleetcmdError, match="database_url 'nope:/x'"):
        store_from_url("nope:/x")
    with pytest.raises(FleetcmdError, match="database_url 'sqlite://'"):
        store_from_url("sqlite://")


async def test_a_url_names_its_file(tmp_path: Path) -> None:
    async with opened(f"sqlite:///{tmp_path}/a/b.db") as running:
        await running.store.create(new(1))
    assert (tmp_path / "a" / "b.db").is_file()


# ---- atomic create --------------------------------------------------------------------------


async def test_a_create_commits_the_execution_and_its_first_event_together(db: Open) -> None:
    result = await db.store.create(new(1, status=Status.QUEUED))
    assert result.created and result.event is not None and result.event.sequence == 1
    assert db.events == [result.event]  # announced by the time the caller resumes
    got = await db.store.get("e1", with_history=True)
    assert got is not None and got.status is Status.QUEUED and got.params_json == '{"n":1}'
    assert [(c.sequence, c.status, c.previous_status, c.note) for c in got.history] == [(1, Status.QUEUED, None, "created")]
    assert await db.store.last_sequence() == 1
    assert db.store.commits >= 1


async def test_a_failing_write_does_not_undo_the_writes_beside_it(db: Open) -> None:
    await db.store.create(new(1, key="k", fp="A"))
    outcomes = await asyncio.gather(
        db.store.create(new(2)),
        db.store.create(new(3, key="k", fp="B")),
        db.store.transition("missing", Trigger.CANCEL, at_ms=5),
        db.store.transition("e1", Trigger.DEVICE_REPORT, at_ms=5, report=DeviceReport(Status.FAILED), expect_thing="t9"),
        db.store.create(new(4)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], AlreadyExists)
    assert isinstance(outcomes[2], NotFound)
    assert isinstance(outcomes[3], ThingMismatch)
    assert [e.execution_id for e in db.events] == ["e1", "e2", "e4"]
    assert [e.sequence for e in db.events] == [1, 2, 3]  # no gap left by the failures
    assert await db.store.get("e3") is None
    assert [e.execution_id for e in await db.store.get_many(["e4", "e3", "e2", "e1"])] == ["e1", "e2", "e4"]


# ---- the lifecycle as the store persists it -------------------------------------------------


async def test_duplicate_and_late_reports(db: Open) -> None:
    store = db.store
    await store.create(new(1, status=Status.QUEUED))
    sent = await store.transition("e1", Trigger.PUBLISHED, at_ms=10)
    assert sent.decision.outcome is Outcome.CHANGE and sent.execution.status is Status.SENT
    ok = DeviceReport(Status.SUCCEEDED, '{"t":24}')
    done = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=11, report=ok, expect_thing="t1")
    assert done.execution.status is Status.SUCCEEDED and done.execution.completed_at_ms == 11
    dup = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=12, report=ok)
    assert dup.decision.outcome is Outcome.DUPLICATE and dup.event is None
    late = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=13, report=DeviceReport(Status.FAILED, '{"x":1}'))
    assert late.decision.outcome is Outcome.LATE and late.event is not None and late.event.late
    assert late.execution.status is Status.SUCCEEDED
    assert (await store.transition("e1", Trigger.EXPIRED, at_ms=14)).decision.outcome is Outcome.IGNORE
    assert (await store.transition("e1", Trigger.CANCEL, at_ms=15)).decision.outcome is Outcome.REFUSE
    got = await store.get("e1", with_history=True)
    assert got is not None and got.status is Status.SUCCEEDED and got.result_json == '{"t":24}'
    assert [(c.status, c.late) for c in got.history] == [
        (Status.QUEUED, False),
        (Status.SENT, False),
        (Status.SUCCEEDED, False),
        (Status.FAILED, True),
    ]
    assert [e.sequence for e in db.events] == [1, 2, 3, 4]  # only changes and late reports are logged


@pytest.mark.parametrize("order", list(itertools.permutations(["report", "expire", "cancel"])))
async def test_the_first_final_status_wins(db: Open, order: tuple[str, ...]) -> None:
    store = db.store
    await store.create(new(1))
    writes = {
        "report": lambda: store.transition_nowait(
            "e1", Trigger.DEVICE_REPORT, at_ms=20, report=DeviceReport(Status.SUCCEEDED), expect_thing="t1"
        ),
        "expire": lambda: store.transition_nowait("e1", Trigger.EXPIRED, at_ms=20),
        "cancel": lambda: store.transition_nowait("e1", Trigger.CANCEL, at_ms=20),
    }
    results: list[TransitionResult] = await asyncio.gather(*(writes[name]() for name in order))
    winners = [r for r in results if r.decision.outcome is Outcome.CHANGE]
    assert len(winners) == 1 and winners[0].execution.status.final
    got = await store.get("e1", with_history=True)
    assert got is not None and got.status is winners[0].execution.status
    finals = [c for c in got.history if c.status.final and not c.late]
    assert [c.status for c in finals] == [got.status]
    assert len(await store.active()) == 0


async def test_a_report_records_its_result_and_the_result_checks_violations(db: Open) -> None:
    await db.store.create(new(1))
    report = DeviceReport(Status.SUCCEEDED, '{"t":"hot"}')
    result = await db.store.transition(
        "e1", Trigger.DEVICE_REPORT, at_ms=9, report=report, result_check=lambda ex, rep: [f"{ex.execution_id}: bad"]
    )
    assert result.execution.result_violations == ("e1: bad",)
    got = await db.store.get("e1")
    assert got is not None and got.result_json == '{"t":"hot"}' and got.result_violations == ("e1: bad",)


# ---- the event log ---------------------------------------------------------------------------


async def test_concurrent_writers_get_a_gap_free_sequence_in_commit_order(db: Open) -> None:
    store = db.store

    async def writer(w: int) -> None:
        for i in range(20):
            n = w * 100 + i
            await store.create(new(n, thing=f"t{w}"))
            await store.transition(f"e{n}", Trigger.ACKED, at_ms=5_000 + n)

    await asyncio.gather(*(writer(w) for w in range(5)))
    seqs = [e.sequence for e in db.events]
    assert seqs == list(range(1, 201))  # announced in commit order, without gaps
    assert all(commit for commit in db.commits)
    logged = await store.events_after(0, EventFilter(), 1_000)
    assert logged == db.events
    assert await store.last_sequence() == 200


async def test_events_after_resumes_after_a_sequence_with_filters_and_pages(db: Open) -> None:
    store = db.store
    await store.create(new(1, thing="a"))
    await store.create(new(2, thing="b", action="unlock"))
    await store.transition("e1", Trigger.CANCEL, at_ms=9)
    await store.transition("e2", Trigger.CANCEL, at_ms=9)
    assert [(e.sequence, e.status) for e in await store.events_after(0, EventFilter(thing_id="a"), 10)] == [
        (1, Status.SENT),
        (3, Status.CANCELED),
    ]
    assert [e.sequence for e in await store.events_after(2, EventFilter(), 10)] == [3, 4]
    assert [e.sequence for e in await store.events_after(4, EventFilter(), 10)] == []
    assert [e.sequence for e in await store.events_after(0, EventFilter(action="unlock"), 10)] == [2, 4]
    assert [e.sequence for e in await store.events_after(0, EventFilter(execution_id="e2"), 10)] == [2, 4]
    pages, last = [], 0
    while page := await store.events_after(last, EventFilter(), 3):
        pages.append([e.sequence for e in page])
        last = page[-1].sequence
    assert pages == [[1, 2, 3], [4]]


async def test_list_pages_newest_first_with_filters(db: Open) -> None:
    for i in range(7):
        await db.store.create(new(i, thing="a" if i % 2 else "b"))
    seen, before = [], None
    while True:
        page = await db.store.list_executions(ListQuery(page_size=3, before_index=before))
        seen += [e.execution_id for e in page.executions]
        if page.next_before_index is None:
            break
        before = page.next_before_index
    assert seen == [f"e{i}" for i in reversed(range(7))]
    only_a = await db.store.list_executions(ListQuery(thing_id="a", page_size=100))
    assert [e.execution_id for e in only_a.executions] == ["e5", "e3", "e1"]


# ---- idempotency -----------------------------------------------------------------------------


async def test_an_idempotency_key_returns_the_same_execution_for_the_same_request(db: Open) -> None:
    first = await db.store.create(new(1, key="k", fp="A"))
    again = await db.store.create(new(2, key="k", fp="A"))
    assert again.created is False and again.event is None
    assert again.execution.execution_id == first.execution.execution_id == "e1"
    with pytest.raises(AlreadyExists, match="idempotency_key 'k' was used for a different request"):
        await db.store.create(new(3, key="k", fp="B"))
    # Retries racing each other: one execution, whichever commit they share.
    racing = await asyncio.gather(*(db.store.create(new(10 + i, key="r", fp="R")) for i in range(5)))
    assert sum(r.created for r in racing) == 1
    assert {r.execution.execution_id for r in racing} == {"e10"}
    assert [e.execution_id for e in db.events] == ["e1", "e10"]


# ---- restart recovery and what the outbox restores -------------------------------------------


async def test_a_reopened_store_keeps_everything_and_continues_the_sequence(url: str) -> None:
    async with opened(url) as first:
        await first.store.create(new(1, status=Status.QUEUED))
        await first.store.create(new(2, status=Status.SENT))
        await first.store.create(new(3))
        await first.store.create(new(4, kaa=True))
        await first.store.transition("e2", Trigger.ACKED, at_ms=50)
        await first.store.transition("e3", Trigger.CANCEL, at_ms=50)
        # Queued and not awaited: the close still commits it.
        pending = first.store.transition_nowait("e1", Trigger.PUBLISHED, at_ms=60)
    assert (await pending).execution.status is Status.SENT
    async with opened(url) as second:
        active = await second.store.active()
        assert [(a.execution_id, a.thing_id, a.status, a.expires_at_ms) for a in active] == [
            ("e1", "t1", Status.SENT, 31_001),
            ("e2", "t1", Status.DELIVERED, 31_002),
            ("e4", "t1", Status.SENT, 31_004),
        ]
        assert await second.store.last_sequence() == 7
        created = await second.store.create(new(5, kaa=True))
        assert created.event is not None and created.event.sequence == 8
        assert created.execution.kaa_id == 2  # Kaa ids continue too
        got = await second.store.get("e3", with_history=True)
        assert got is not None and got.status is Status.CANCELED and len(got.history) == 2


async def test_writes_are_refused_once_the_writer_is_stopped(url: str) -> None:
    async with opened(url) as running:
        running.store.stop_writer()
        with pytest.raises(Unavailable):
            await running.store.create(new(1))


# ---- retention -------------------------------------------------------------------------------


async def test_retention_deletes_old_final_executions_and_their_events_in_batches(url: str) -> None:
    async with opened(url) as running:
        store = running.store
        assert store.purged_through() == 0
        for i in range(1, 6):
            await store.create(new(i, status=Status.QUEUED))
        # e1..e3 final at 100, 200, 300; e4 final at 5,000 (too recent); e5 stays QUEUED (never deleted).
        for i, at in ((1, 100), (2, 200), (3, 300), (4, 5_000)):
            await store.transition(f"e{i}", Trigger.CANCEL, at_ms=at)
        await store.create(new(6, status=Status.QUEUED))  # the newest event (seq 10) belongs to a kept one
        # The cutoff is exclusive: completed at 300 is kept by a cutoff of 300, deleted by 301.
        assert await store.delete_finished(300, 10) == 2
        assert await store.get("e1") is None and await store.get("e2") is None
        assert await store.get("e3") is not None
        # A batch stops at its limit; the next one goes on.
        assert await store.delete_finished(10_000, 1) == 1
        assert await store.delete_finished(10_000, 1) == 1
        assert await store.delete_finished(10_000, 1) == 0
        assert {e.execution_id for e in await store.events_after(0, EventFilter(), 100)} == {"e5", "e6"}
        got = await store.get("e5", with_history=True)
        assert got is not None and got.status is Status.QUEUED and len(got.history) == 1
        # e4's CANCELED event was sequence 9: everything at or below may be gone.
        assert store.purged_through() == 9
        await store.transition("e6", Trigger.CANCEL, at_ms=6_000)
        assert await store.delete_finished(10_000, 10) == 1  # e6, holding the newest event (11)
        assert store.purged_through() == 11 and await store.last_sequence() == 11
    async with opened(url) as again:
        # Reopened with the log's tail deleted: the watermark and the sequence carry on, never reused.
        assert again.store.purged_through() == 11 and await again.store.last_sequence() == 11
        created = await again.store.create(new(7, status=Status.QUEUED))
        assert created.event is not None and created.event.sequence == 12


async def test_ping_commits_through_the_writer_and_fails_once_it_is_stopped(url: str) -> None:
    async with opened(url) as running:
        commits = running.store.commits
        await running.store.ping()
        assert running.store.commits == commits + 1
        running.store.stop_writer()
        with pytest.raises(Unavailable):
            await running.store.ping()


# ---- Kaa command ids --------------------------------------------------------------------------


async def test_kaa_ids_count_per_thing_and_action_and_find_their_execution(db: Open) -> None:
    store = db.store
    created = await asyncio.gather(
        store.create(new(1, kaa=True)),
        store.create(new(2, kaa=True)),
        store.create(new(3, kaa=True, action="unlock")),
        store.create(new(4, kaa=True, thing="t2")),
        store.create(new(5)),
    )
    assert [c.execution.kaa_id for c in created] == [1, 2, 1, 1, None]
    assert (await store.create(new(6, kaa=True))).execution.kaa_id == 3
    kaa = kaa_store(store)
    assert await kaa.execution_id_for_kaa("t1", "reboot", 2) == "e2"
    assert await kaa.execution_id_for_kaa("t1", "unlock", 1) == "e3"
    assert await kaa.execution_id_for_kaa("t1", "reboot", 9) is None
    await store.transition("e2", Trigger.CANCEL, at_ms=5)
    await store.create(new(7, kaa=True, expires_at_ms=1_500))
    outstanding = await kaa.outstanding("t1", "reboot", now_ms=2_000)
    assert [(e.execution_id, e.kaa_id) for e in outstanding] == [("e1", 1), ("e6", 3)]


def test_a_store_without_the_kaa_queries_is_named() -> None:
    with pytest.raises(FleetcmdError, match="does not implement the Kaa queries"):
        kaa_store(object())


# ---- commit notification ------------------------------------------------------------------------


async def test_the_listener_sees_a_commit_before_its_callers_resume(db: Open) -> None:
    seen_by_caller: list[int] = []

    async def create(i: int) -> None:
        result = await db.store.create(new(i))
        assert result.event is not None
        seen_by_caller.append(len([e for e in db.events if e.sequence == result.event.sequence]))

    await asyncio.gather(*(create(i) for i in range(10)))
    futures: list[asyncio.Future[TransitionResult]] = [
        db.store.transition_nowait(f"e{i}", Trigger.ACKED, at_ms=9) for i in range(10)
    ]
    for future in futures:
        result = await future
        assert result.event is not None and result.event in db.events
    assert seen_by_caller == [1] * 10


# ---- the service and the admin CLI open the store the setting names ----------------------------


async def test_the_service_runs_on_the_store_its_url_names(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/elsewhere/fleet.db"
    settings = make_settings(tmp_path / "data", database_url=url)
    async with FleetcmdApp(settings) as app:
        assert app.core is not None
        sent = await app.core.send(SendCommand("t1", "reboot", None, 5, ""))
    assert not settings.db_path.exists()
    async with opened(url) as reopened:
        got = await reopened.store.get(sent.execution_id)
        assert got is not None and got.thing_id == "t1"


def test_the_admin_cli_opens_the_store_the_setting_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETCMD_DATABASE_URL", f"sqlite:///{tmp_path}/keys/k.db")
    local = {"data_dir": tmp_path / "unused", "json": True}
    assert admin_cli.cmd_apikey(argparse.Namespace(apikey_command="create", name="ci", role="operator", **local)) == 0
    key_id = json.loads(capsys.readouterr().out)["key_id"]
    assert (tmp_path / "keys" / "k.db").is_file() and not (tmp_path / "unused").exists()
    assert admin_cli.cmd_apikey(argparse.Namespace(apikey_command="list", **local)) == 0
    assert key_id in capsys.readouterr().out
    monkeypatch.setenv("FLEETCMD_DATABASE_URL", "nope:/x")
    assert admin_cli.cmd_apikey(argparse.Namespace(apikey_command="list", **local)) == 1
    assert "database_url 'nope:/x'" in capsys.readouterr().err
