"""SqliteStore on a real file: group commit, per-operation isolation, durable log."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from server.core.errors import AlreadyExists, NotFound, ThingMismatch
from server.core.lifecycle import Outcome, Status, Trigger
from server.core.models import DeviceReport, EventFilter, ListQuery, NewExecution, StateChange
from server.store import TransitionResult
from server.store.sqlite import SqliteStore


def new(i: int, thing: str = "t1", key: str = "", fp: str = "", status: Status = Status.QUEUED) -> NewExecution:
    return NewExecution(
        execution_id=f"e{i}",
        command_id=f"c{i}",
        thing_id=thing,
        action="reboot",
        params_json=f'{{"n":{i}}}',
        ttl_seconds=30,
        status=status,
        created_at_ms=1_000 + i,
        expires_at_ms=31_000 + i,
        idempotency_key=key,
        fingerprint=fp,
    )


class Running:
    def __init__(self, store: SqliteStore, committed: list[StateChange]) -> None:
        self.store = store
        self.committed = committed


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    committed: list[StateChange] = []

    def listener(events: Sequence[StateChange]) -> None:
        committed.extend(events)

    async with SqliteStore(tmp_path / "db" / "f.db", listener) as store:
        writer = asyncio.create_task(store.run_writer())
        yield Running(store, committed)
        store.stop_writer()
        await writer


async def test_concurrent_writes_share_commits_and_number_events_gap_free(running: Running) -> None:
    store = running.store
    results = await asyncio.gather(*(store.create(new(i)) for i in range(200)))
    assert all(r.created for r in results)
    assert store.batches < 200  # group commit: many writes per transaction
    seqs = [e.sequence for e in running.committed]
    assert seqs == list(range(1, 201))
    assert await store.last_sequence() == 200


async def test_failed_operation_does_not_undo_its_batch_neighbours(running: Running) -> None:
    store = running.store
    await store.create(new(1, key="k", fp="A"))
    outcomes = await asyncio.gather(
        store.create(new(2)),
        store.create(new(3, key="k", fp="B")),  # conflicting reuse of the key
        store.transition("nope", Trigger.CANCEL, at_ms=5),
        store.create(new(4)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], AlreadyExists)
    assert isinstance(outcomes[2], NotFound)
    assert not isinstance(outcomes[0], Exception) and not isinstance(outcomes[3], Exception)
    assert [e.sequence for e in running.committed] == [1, 2, 3]  # no gap left by the failures
    assert await store.get("e3") is None
    assert await store.get("e4") is not None


async def test_idempotent_retry_returns_existing(running: Running) -> None:
    first = await running.store.create(new(1, key="k", fp="A"))
    again = await running.store.create(new(2, key="k", fp="A"))
    assert again.created is False and again.event is None
    assert again.execution.execution_id == first.execution.execution_id == "e1"


async def test_transition_rules_and_history(running: Running) -> None:
    store = running.store
    await store.create(new(1))
    r = await store.transition("e1", Trigger.PUBLISHED, at_ms=10)
    assert r.decision.outcome is Outcome.CHANGE and r.execution.status is Status.SENT
    ok = DeviceReport(Status.SUCCEEDED, '{"t":24}')
    r = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=11, report=ok, expect_thing="t1")
    assert r.execution.status is Status.SUCCEEDED and r.execution.completed_at_ms == 11
    dup = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=12, report=ok)
    assert dup.decision.outcome is Outcome.DUPLICATE and dup.event is None
    late = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=13, report=DeviceReport(Status.FAILED))
    assert late.decision.outcome is Outcome.LATE and late.event is not None and late.event.late
    expired = await store.transition("e1", Trigger.EXPIRED, at_ms=14)
    assert expired.decision.outcome is Outcome.IGNORE
    with pytest.raises(ThingMismatch):
        await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=15, report=ok, expect_thing="t2")
    got = await store.get("e1", with_history=True)
    assert got is not None and got.status is Status.SUCCEEDED and got.result_json == '{"t":24}'
    assert [(c.status, c.late) for c in got.history] == [
        (Status.QUEUED, False),
        (Status.SENT, False),
        (Status.SUCCEEDED, False),
        (Status.FAILED, True),
    ]


async def test_list_keyset_pages_and_filters(running: Running) -> None:
    store = running.store
    for i in range(25):
        await store.create(new(i, thing="a" if i % 2 else "b"))
    seen: list[str] = []
    before = None
    while True:
        page = await store.list_executions(ListQuery(page_size=10, before_index=before))
        seen += [e.execution_id for e in page.executions]
        if page.next_before_index is None:
            break
        before = page.next_before_index
        await store.create(new(100 + len(seen)))  # new arrivals do not disturb the pages
    assert seen == [f"e{i}" for i in reversed(range(25))]
    only_a = await store.list_executions(ListQuery(thing_id="a", page_size=100))
    assert {e.thing_id for e in only_a.executions} == {"a"} and len(only_a.executions) == 12
    window = await store.list_executions(ListQuery(created_after_ms=1_005, created_before_ms=1_010, page_size=100))
    assert sorted(e.execution_id for e in window.executions) == [f"e{i}" for i in range(5, 10)]


async def test_events_after_filters(running: Running) -> None:
    store = running.store
    await store.create(new(1, thing="a"))
    await store.create(new(2, thing="b"))
    await store.transition("e1", Trigger.CANCEL, at_ms=9)
    events = await store.events_after(0, EventFilter(thing_id="a"), 100)
    assert [(e.sequence, e.status) for e in events] == [(1, Status.QUEUED), (3, Status.CANCELED)]
    assert [e.sequence for e in await store.events_after(1, EventFilter(), 100)] == [2, 3]


async def test_reopen_keeps_everything_and_continues_the_sequence(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    for round_ in range(2):
        async with SqliteStore(path) as store:
            writer = asyncio.create_task(store.run_writer())
            await store.create(new(round_))
            active = await store.active()
            assert [a.execution_id for a in active] == [f"e{i}" for i in range(round_ + 1)]
            store.stop_writer()
            await writer
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT seq FROM events ORDER BY seq").fetchall() == [(1,), (2,)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_commit_resumes_its_sends_then_its_watchers_then_the_other_callbacks(tmp_path: Path) -> None:
    """The order after a commit: a Send publishes first, a watcher sees the final status next, bookkeeping last."""
    order: list[str] = []
    announced = asyncio.Event()

    def listener(events: Sequence[StateChange]) -> None:
        order.append("listener")
        announced.set()

    async def watcher() -> None:
        await announced.wait()
        order.append("watcher")

    async with SqliteStore(tmp_path / "f.db") as store:
        writer = asyncio.create_task(store.run_writer())
        await store.create(new(1, status=Status.SENT))
        store.set_commit_listener(listener)
        watching = asyncio.create_task(watcher())
        await asyncio.sleep(0)  # the watcher waits

        reports: list[asyncio.Future[TransitionResult]] = []

        async def send() -> None:
            # Both writes are submitted in this one task step, before the loop hands them to the
            # writer thread, so they share one commit whatever the thread scheduling (queued from
            # two different steps, a busy machine let the writer commit the first one alone).
            report = store.transition_nowait("e1", Trigger.DEVICE_REPORT, at_ms=5, report=DeviceReport(Status.SUCCEEDED))
            report.add_done_callback(lambda _f: order.append("report callback"))
            reports.append(report)
            await store.create(new(2))
            order.append("send")

        await asyncio.gather(send(), watching)
        await reports[0]
        assert store.batches == 2
        assert order == ["listener", "send", "watcher", "report callback"]
        store.stop_writer()
        await writer
