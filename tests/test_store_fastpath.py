"""SqliteStore's batched write path: planned operations written together, isolation kept on failure."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from broker_hooks.broker import Delivery
from broker_hooks.rules import Inbound, LifecycleAction
from server.config import Settings
from server.core.commands import CommandCore
from server.core.errors import AlreadyExists, NotFound, Unavailable
from server.core.lifecycle import Outcome, Status, Trigger
from server.core.models import DeviceReport, Execution, NewExecution, StateChange, ThingRecord
from server.core.registry import Registry
from server.core.validation import SendCommand
from server.dialects import emqx
from server.dialects.emqx import EmqxRoute
from server.store.sqlite import SqliteStore


def new(i: int | str, *, key: str = "", fp: str = "", status: Status = Status.SENT, kaa: bool = False) -> NewExecution:
    return NewExecution(
        execution_id=f"e{i}",
        command_id=f"c{i}",
        thing_id="t1",
        action="reboot",
        params_json='{"n":1}',
        ttl_seconds=30,
        status=status,
        created_at_ms=1_000,
        expires_at_ms=31_000,
        idempotency_key=key,
        fingerprint=fp,
        kaa=kaa,
    )


OK = DeviceReport(Status.SUCCEEDED, '{"ok":true}')


class Running:
    def __init__(self, store: SqliteStore, committed: list[list[StateChange]]) -> None:
        self.store = store
        self.commits = committed

    @property
    def events(self) -> list[StateChange]:
        return [e for commit in self.commits for e in commit]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    commits: list[list[StateChange]] = []
    async with SqliteStore(tmp_path / "f.db", lambda events: commits.append(list(events))) as store:
        writer = asyncio.create_task(store.run_writer())
        yield Running(store, commits)
        store.stop_writer()
        await writer


def rows(path: Path) -> dict[str, tuple[int, str | None, int | None]]:
    conn = sqlite3.connect(path)
    try:
        sql = "SELECT execution_id, status, result, completed_at FROM executions"
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(sql)}
    finally:
        conn.close()


async def test_acked_and_report_in_one_batch_share_a_commit_in_order(running: Running) -> None:
    store = running.store
    await store.create(new(1))
    batches = store.batches
    # Queued in the same loop iteration: the PUBACK first, then the device's answer.
    acked = store.transition_nowait("e1", Trigger.ACKED, at_ms=2_000)
    done = store.transition_nowait("e1", Trigger.DEVICE_REPORT, at_ms=2_001, report=OK, expect_thing="t1")
    a, d = await acked, await done
    assert store.batches == batches + 1
    assert a.execution.status is Status.DELIVERED and d.execution.status is Status.SUCCEEDED
    assert d.event is not None and d.event.previous_status is Status.DELIVERED
    assert [(e.status, e.previous_status) for e in running.commits[-1]] == [
        (Status.DELIVERED, Status.SENT),
        (Status.SUCCEEDED, Status.DELIVERED),
    ]
    got = await store.get("e1", with_history=True)
    assert got is not None and got.status is Status.SUCCEEDED and got.completed_at_ms == 2_001
    assert got.result_json == '{"ok":true}'
    assert [c.status for c in got.history] == [Status.SENT, Status.DELIVERED, Status.SUCCEEDED]


async def test_created_and_finished_in_one_batch_is_written_as_it_ends(running: Running, tmp_path: Path) -> None:
    store = running.store
    created, done = await asyncio.gather(
        store.create(new(1)),
        store.transition("e1", Trigger.DEVICE_REPORT, at_ms=1_500, report=OK),
    )
    assert created.created and done.decision.outcome is Outcome.CHANGE
    assert rows(tmp_path / "f.db")["e1"] == (int(Status.SUCCEEDED), '{"ok":true}', 1_500)
    assert [e.sequence for e in running.events] == [1, 2]


async def test_a_write_failing_in_the_bulk_insert_fails_alone(running: Running, tmp_path: Path) -> None:
    store = running.store
    await store.create(new(1, status=Status.QUEUED))
    outcomes = await asyncio.gather(
        store.transition("e1", Trigger.PUBLISHED, at_ms=2_000),
        store.create(new(2)),
        store.create(new(1)),  # same execution id: only the INSERT itself can tell
        store.transition("e2", Trigger.ACKED, at_ms=2_001),
        store.create(new(3)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[2], sqlite3.IntegrityError)
    assert not any(isinstance(o, BaseException) for i, o in enumerate(outcomes) if i != 2)
    assert [e.sequence for e in running.events] == [1, 2, 3, 4, 5]  # no gap left by the failure
    assert [(e.execution_id, e.status) for e in running.events[1:]] == [
        ("e1", Status.SENT),
        ("e2", Status.SENT),
        ("e2", Status.DELIVERED),
        ("e3", Status.SENT),
    ]
    stored = rows(tmp_path / "f.db")
    assert stored["e1"][0] == Status.SENT and stored["e2"][0] == Status.DELIVERED and "e3" in stored
    # What the failed batch attempt planned was forgotten: the next transition starts from SENT.
    again = await store.transition("e1", Trigger.ACKED, at_ms=2_002)
    assert again.event is not None and again.event.previous_status is Status.SENT and again.event.sequence == 6


async def test_failing_operations_leave_their_neighbours_alone(running: Running) -> None:
    store = running.store
    await store.create(new(1))
    await store.insert_thing(ThingRecord("t1", "", {}, "hash", 1, 1, 1))

    def broken_check(execution: Execution, report: DeviceReport) -> list[str]:
        raise RuntimeError("validator bug")

    outcomes = await asyncio.gather(
        store.create(new(2)),
        store.transition("e1", Trigger.DEVICE_REPORT, at_ms=5, report=OK, result_check=broken_check),
        store.insert_thing(ThingRecord("t1", "", {}, "hash", 1, 1, 1)),  # exists: a savepointed write fails
        store.transition("missing", Trigger.CANCEL, at_ms=5),
        store.transition("e1", Trigger.ACKED, at_ms=6),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[2], AlreadyExists)
    assert isinstance(outcomes[3], NotFound)
    acked = outcomes[4]
    assert not isinstance(acked, BaseException) and acked.execution.status is Status.DELIVERED
    assert [e.sequence for e in running.events] == [1, 2, 3]
    got = await store.get("e1")
    assert got is not None and got.status is Status.DELIVERED and got.result_json is None


async def test_idempotency_keys_and_kaa_ids_within_one_batch(running: Running) -> None:
    store = running.store
    first, retry, conflict, k1, k2 = await asyncio.gather(
        store.create(new(1, key="k", fp="A")),
        store.create(new(2, key="k", fp="A")),
        store.create(new(3, key="k", fp="B")),
        store.create(new(4, kaa=True)),
        store.create(new(5, kaa=True)),
        return_exceptions=True,
    )
    assert not isinstance(first, BaseException) and not isinstance(retry, BaseException)
    assert first.created and not retry.created and retry.execution.execution_id == "e1"
    assert isinstance(conflict, AlreadyExists)
    assert not isinstance(k1, BaseException) and not isinstance(k2, BaseException)
    assert (k1.execution.kaa_id, k2.execution.kaa_id) == (1, 2)
    k3 = await store.create(new(6, kaa=True))
    assert k3.execution.kaa_id == 3
    later = await store.create(new(7, key="k", fp="A"))
    assert not later.created and later.execution.execution_id == "e1"


async def test_cached_state_matches_what_was_committed(running: Running, tmp_path: Path) -> None:
    store = running.store
    await store.create(new(1))
    await store.transition("e1", Trigger.ACKED, at_ms=2_000)
    await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=2_001, report=DeviceReport(Status.IN_PROGRESS))
    # Someone else's view of the file is the same as the writer's.
    assert rows(tmp_path / "f.db")["e1"][0] == Status.IN_PROGRESS
    dup = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=2_002, report=DeviceReport(Status.IN_PROGRESS))
    assert dup.decision.outcome is Outcome.DUPLICATE
    done = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=2_003, report=OK)
    assert done.execution.status is Status.SUCCEEDED
    late = await store.transition("e1", Trigger.DEVICE_REPORT, at_ms=2_004, report=DeviceReport(Status.FAILED))
    assert late.decision.outcome is Outcome.LATE and late.execution.status is Status.SUCCEEDED
    assert rows(tmp_path / "f.db")["e1"] == (int(Status.SUCCEEDED), '{"ok":true}', 2_003)


async def test_a_caller_that_stops_waiting_does_not_undo_its_write(running: Running) -> None:
    store = running.store
    await store.create(new(1))
    waiter = asyncio.ensure_future(store.transition("e1", Trigger.CANCEL, at_ms=9))
    await asyncio.sleep(0)
    waiter.cancel()
    await store.create(new(2))  # committed after the cancel: the cancel is committed by now
    got = await store.get("e1")
    assert got is not None and got.status is Status.CANCELED


async def test_writes_after_stop_are_refused_and_queued_ones_committed(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "f.db") as store:
        writer = asyncio.create_task(store.run_writer())
        pending = [asyncio.ensure_future(store.create(new(i))) for i in range(3)]
        await asyncio.sleep(0)
        store.stop_writer()
        with pytest.raises(Unavailable):
            await store.create(new(9))
        await writer
        assert all(p.result().created for p in pending)
    assert len(rows(tmp_path / "f.db")) == 3


async def test_close_without_a_writer_commits_what_is_queued(tmp_path: Path) -> None:
    committed: list[Sequence[StateChange]] = []
    async with SqliteStore(tmp_path / "f.db", committed.append) as store:
        pending = asyncio.ensure_future(store.create(new(1)))
        await asyncio.sleep(0)
    assert pending.done() and pending.result().created
    assert [e.sequence for batch in committed for e in batch] == [1]


class AnsweringLink:
    """A broker stand-in whose device PUBACKs and answers at once (both read in one go)."""

    def __init__(self) -> None:
        self.core: CommandCore | None = None
        self.reports: list[DeviceReport] = [OK]

    def subscription_qos(self, client_id: str, topic: str) -> int | None:
        return 1

    def is_connected(self, client_id: str) -> bool:
        return True

    def deliver_nowait(self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None) -> None:
        return None  # every publish takes deliver()

    async def deliver(self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None) -> Delivery:
        assert self.core is not None
        await asyncio.sleep(0)
        execution_id = topic.split("/")[-2]
        for report in self.reports:
            message = emqx.ReportMessage(client_id, execution_id, report)
            await self.core.device_message(Inbound("r", LifecycleAction.DEVICE_REPORT, client_id, topic, message, 1))
        return Delivery.ACKED


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[tuple[CommandCore, AnsweringLink]]:
    settings = Settings(bind="127.0.0.1", mqtt_port=0, grpc_port=0, data_dir=tmp_path, allow_anonymous=True)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async with SqliteStore(tmp_path / "f.db") as store:
        writer = asyncio.create_task(store.run_writer())
        registry = Registry(store, allow_unregistered=True)
        await registry.load()
        command_core = CommandCore(settings, store, registry, spawn)
        store.set_commit_listener(command_core.on_commit)
        link = AnsweringLink()
        link.core = command_core
        command_core.outbox.attach(link)
        command_core.add_route(EmqxRoute(link))
        ingest = asyncio.create_task(command_core.run_ingest())
        yield command_core, link
        await command_core.stop_ingest(5)
        await ingest
        store.stop_writer()
        await writer
        for task in tasks:
            task.cancel()


async def test_puback_and_answer_together_commit_once_delivered_first(core: tuple[CommandCore, AnsweringLink]) -> None:
    command_core, _link = core
    sent = await command_core.send(SendCommand("dev1", "reboot", None, 30, ""))
    done = await command_core.wait(sent, 5)
    assert done.status is Status.SUCCEEDED
    got = await command_core.get(sent.execution_id)
    assert [c.status for c in got.history] == [Status.SENT, Status.DELIVERED, Status.SUCCEEDED]
    assert got.history[1].sequence + 1 == got.history[2].sequence
    assert command_core.store.batches == 2  # the create, then the PUBACK and the answer together
    assert command_core.stats["reports.change"] == 1
    assert len(command_core.outbox) == 0 and len(command_core.scheduler) == 0


async def test_reports_without_a_task_are_counted_and_dropped_like_before(core: tuple[CommandCore, AnsweringLink]) -> None:
    command_core, link = core
    link.reports = [OK, OK, DeviceReport(Status.FAILED)]  # a duplicate, then a late answer
    sent = await command_core.send(SendCommand("dev1", "reboot", None, 30, ""))
    await command_core.wait(sent, 5)
    bogus = emqx.ReportMessage("dev1", "0" * 32, OK)
    unknown = await command_core.device_message(Inbound("r", LifecycleAction.DEVICE_REPORT, "dev1", "t", bogus, 1))
    other = emqx.ReportMessage("dev2", sent.execution_id, OK)
    mismatch = await command_core.device_message(Inbound("r", LifecycleAction.DEVICE_REPORT, "dev2", "t", other, 1))
    # Dropped for good (sending them again would not help): handled, so the broker PUBACKs them.
    assert await asyncio.wait_for(unknown, 5) is None and await asyncio.wait_for(mismatch, 5) is None
    await command_core.stop_ingest(5)
    stats = command_core.stats
    assert (stats["reports.change"], stats["reports.duplicate"], stats["reports.late"]) == (1, 1, 1)
    assert stats["dropped.unknown_execution"] == 1 and stats["dropped.thing_mismatch"] == 1
    got = await command_core.get(sent.execution_id)
    assert [(c.status, c.late) for c in got.history][-2:] == [(Status.SUCCEEDED, False), (Status.FAILED, True)]


async def test_a_report_the_control_plane_cannot_take_or_store_is_not_acknowledged(tmp_path: Path) -> None:
    """The future the broker's PUBACK waits for: None when the queue is full, failed when nothing was stored."""
    settings = Settings(bind="127.0.0.1", mqtt_port=0, grpc_port=0, data_dir=tmp_path, allow_anonymous=True, ingest_queue=1)
    async with SqliteStore(tmp_path / "f.db") as store:
        writer = asyncio.create_task(store.run_writer())
        registry = Registry(store, allow_unregistered=True)
        await registry.load()
        command_core = CommandCore(settings, store, registry, lambda coro, name: coro.close())

        def report(n: int) -> Inbound:
            return Inbound("r", LifecycleAction.DEVICE_REPORT, "dev1", "t", emqx.ReportMessage("dev1", f"{n:032x}", OK), 1)

        first = command_core.device_message_nowait(report(1))
        assert first is not None and not first.done()
        assert command_core.device_message_nowait(report(2)) is None  # full: the broker's message loop waits instead
        # The store stops taking writes: the queued report fails, so it is not PUBACKed and comes again.
        store.stop_writer()
        await writer
        ingest = asyncio.create_task(command_core.run_ingest())
        with pytest.raises(Unavailable):
            await asyncio.wait_for(first, 5)
        await command_core.stop_ingest(5)
        await ingest
        # Once stopping, nothing is taken.
        refused = command_core.device_message_nowait(report(3))
        assert refused is not None
        with pytest.raises(Unavailable):
            await refused
        assert command_core.stats["refused.shutting_down"] == 1


async def test_a_deferrable_write_waits_a_moment_for_the_next_one(running: Running) -> None:
    store = running.store
    await store.create(new(1))
    batches = store.batches
    acked = store.transition_nowait("e1", Trigger.ACKED, at_ms=2_000, deferrable=True)
    await asyncio.sleep(0)  # handed to the writer alone: it holds it for what comes next
    await asyncio.sleep(0)
    done = store.transition_nowait("e1", Trigger.DEVICE_REPORT, at_ms=2_001, report=OK)
    assert (await acked).execution.status is Status.DELIVERED
    assert (await done).execution.status is Status.SUCCEEDED
    assert store.batches == batches + 1
    # Alone, it is committed all the same.
    await store.create(new(2))
    alone = await store.transition_nowait("e2", Trigger.ACKED, at_ms=2_002, deferrable=True)
    assert alone.event is not None and alone.execution.status is Status.DELIVERED
