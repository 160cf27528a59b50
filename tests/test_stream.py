"""``CommandService.Stream``: live events, filters, resume without gap or duplicate, slow subscribers.

Events are produced cheaply: a Send to a thing with no device connected commits one
QUEUED event, a Cancel of it one CANCELED event. Each test runs on a fresh service,
so the global event log starts at sequence 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Self

import grpc
import pytest
from google.protobuf import json_format

from server.app import FleetcmdApp
from server.core import commands
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import app_channel
from tests.conftest import make_settings
from tests.devices import EmqxDevice

TIMEOUT = 10.0

_EOF = object()


class StreamCall:
    """A server-streaming call read by a background task; ``async with`` cancels both when it ends."""

    call: Any
    task: asyncio.Task[None]

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Watcher(StreamCall):
    """One Stream call, read continuously by a background task into a queue."""

    def __init__(self, stub: pb_grpc.CommandServiceStub, **request: Any) -> None:
        self.call = stub.Stream(pb.StreamRequest(**request))
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for event in self.call:
                self.queue.put_nowait(event)
        except grpc.aio.AioRpcError as err:
            self.queue.put_nowait(err)
        else:
            self.queue.put_nowait(_EOF)

    async def take(self, count: int, timeout: float = TIMEOUT) -> list[pb.ExecutionEvent]:
        """Exactly ``count`` events (fails if the stream ends or stalls first)."""
        events: list[pb.ExecutionEvent] = []
        try:
            async with asyncio.timeout(timeout):
                while len(events) < count:
                    item = await self.queue.get()
                    if not isinstance(item, pb.ExecutionEvent):
                        raise AssertionError(f"stream ended after {len(events)} of {count} events: {item!r}")
                    events.append(item)
        except TimeoutError:
            raise AssertionError(f"only {len(events)} of {count} events within {timeout}s") from None
        return events

    async def take_until(self, last: Callable[[pb.ExecutionEvent], bool], timeout: float = TIMEOUT) -> list[pb.ExecutionEvent]:
        """Events up to and including the first one for which ``last`` is true."""
        events: list[pb.ExecutionEvent] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await self.queue.get()
                    if not isinstance(item, pb.ExecutionEvent):
                        raise AssertionError(f"stream ended after {len(events)} events: {item!r}")
                    events.append(item)
                    if last(item):
                        return events
        except TimeoutError:
            raise AssertionError(f"the awaited event did not come within {timeout}s ({len(events)} others)") from None

    async def assert_quiet(self, wait: float = 0.3) -> None:
        """Nothing more arrives (no duplicate, no event that does not match)."""
        await asyncio.sleep(wait)
        assert self.queue.empty(), f"unexpected: {self.queue.get_nowait()!r}"


async def wait_watchers(app: FleetcmdApp, count: int, timeout: float = 5) -> None:
    """Wait until ``count`` live subscriptions exist (a live Stream only sees events after this)."""
    assert app.core is not None
    async with asyncio.timeout(timeout):
        while True:
            if len(app.core.bus) == count:
                return
            await asyncio.sleep(0.005)


async def send(stub: pb_grpc.CommandServiceStub, thing_id: str = "thing", action: str = "act", **kw: Any) -> pb.Execution:
    return await asyncio.wait_for(stub.Send(pb.SendRequest(thing_id=thing_id, action=action, **kw)), TIMEOUT)


async def cancel(stub: pb_grpc.CommandServiceStub, execution_id: str) -> pb.Execution:
    return await asyncio.wait_for(stub.Cancel(pb.CancelRequest(execution_id=execution_id)), TIMEOUT)


async def burst(stub: pb_grpc.CommandServiceStub, count: int, thing_id: str = "thing", action: str = "act") -> int:
    """``count`` concurrent Sends then their Cancels: ``2 * count`` events; returns that number."""
    made = await asyncio.gather(*(send(stub, thing_id, action) for _ in range(count)))
    await asyncio.gather(*(cancel(stub, e.execution_id) for e in made))
    return 2 * count


def seqs(events: Iterable[pb.ExecutionEvent]) -> list[int]:
    return [e.sequence for e in events]


def assert_gap_free(events: list[pb.ExecutionEvent], first: int) -> None:
    assert seqs(events) == list(range(first, first + len(events))), seqs(events)


# ---- live events --------------------------------------------------------------------------


async def test_live_events_for_send_and_cancel(app: FleetcmdApp, stub) -> None:
    async with Watcher(stub) as watcher:
        await wait_watchers(app, 1)
        made = [await send(stub, f"thing-{i}", f"action-{i}") for i in range(3)]
        created = await watcher.take(3)
        for ex in made:
            await cancel(stub, ex.execution_id)
        canceled = await watcher.take(3)
        events = created + canceled
        assert_gap_free(events, 1)
        for ex, ev in zip(made, created, strict=True):
            assert (ev.execution_id, ev.thing_id, ev.action) == (ex.execution_id, ex.thing_id, ex.action)
            assert ev.status == pb.QUEUED
            assert ev.previous_status == pb.EXECUTION_STATUS_UNSPECIFIED
            assert ev.at == ex.created_at
            assert not ev.late
        for ex, ev in zip(made, canceled, strict=True):
            assert (ev.execution_id, ev.thing_id, ev.action) == (ex.execution_id, ex.thing_id, ex.action)
            assert ev.status == pb.CANCELED
            assert ev.previous_status == pb.QUEUED
            assert ev.HasField("at")
        # The events are the log: Get shows the same sequences in each execution's history.
        for ex in made:
            got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
            assert [(c.sequence, c.status) for c in got.history] == [
                (e.sequence, e.status) for e in events if e.execution_id == ex.execution_id
            ]
        # A refused cancel changes nothing and announces nothing.
        with pytest.raises(grpc.aio.AioRpcError):
            await cancel(stub, made[0].execution_id)
        await watcher.assert_quiet()
    await wait_watchers(app, 0)  # the subscription goes away with the call


async def test_live_stream_without_after_sequence_skips_the_past(app: FleetcmdApp, stub) -> None:
    old = await send(stub, "thing", "act")
    async with Watcher(stub) as watcher:
        await wait_watchers(app, 1)
        new = await send(stub, "thing", "act")
        (event,) = await watcher.take(1)
        assert event.execution_id == new.execution_id and event.sequence == 2
        await cancel(stub, old.execution_id)
        (event,) = await watcher.take(1)
        assert event.execution_id == old.execution_id and event.status == pb.CANCELED and event.sequence == 3
        await watcher.assert_quiet()


async def test_live_events_with_a_device(app: FleetcmdApp, stub) -> None:
    def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        dev.respond(execution_id, "IN_PROGRESS", {"pct": 10})
        dev.respond(execution_id, "FAILED", {"err": 7}, statusReason={"reasonCode": "E7", "reasonDescription": "jam"})

    async with Watcher(stub, thing_id="dev-1") as watcher:
        await wait_watchers(app, 1)
        async with EmqxDevice("127.0.0.1", app.ports.mqtt, "dev-1", on_request=answer):
            ex = await send(stub, "dev-1", "print")
            events = await watcher.take_until(lambda e: e.status == pb.FAILED)
    statuses = [e.status for e in events]
    assert statuses in ([pb.SENT, pb.DELIVERED, pb.IN_PROGRESS, pb.FAILED], [pb.SENT, pb.IN_PROGRESS, pb.FAILED])
    assert [e.previous_status for e in events] == [pb.EXECUTION_STATUS_UNSPECIFIED, *statuses[:-1]]
    assert all(e.execution_id == ex.execution_id and e.thing_id == "dev-1" and e.action == "print" for e in events)
    assert seqs(events) == sorted(set(seqs(events)))
    assert json_format.MessageToDict(events[-2].result) == {"pct": 10}
    assert json_format.MessageToDict(events[-1].result) == {"err": 7}
    assert events[-1].status_reason.reason_code == "E7"
    assert events[-1].status_reason.reason_description == "jam"


# ---- filters ------------------------------------------------------------------------------


async def test_filters_thing_execution_and_action(app: FleetcmdApp, stub) -> None:
    target = await send(stub, "th-e", "act-e")  # created before the streams: its QUEUED event is not live
    async with contextlib.AsyncExitStack() as stack:
        everything = await stack.enter_async_context(Watcher(stub))
        by_thing = await stack.enter_async_context(Watcher(stub, thing_id="th-a"))
        by_action = await stack.enter_async_context(Watcher(stub, action="act-x"))
        by_both = await stack.enter_async_context(Watcher(stub, thing_id="th-a", action="act-x"))
        by_execution = await stack.enter_async_context(Watcher(stub, execution_id=target.execution_id))
        nobody = await stack.enter_async_context(Watcher(stub, thing_id="th-none"))
        await wait_watchers(app, 6)

        made = []
        for thing, action in itertools.product(("th-a", "th-b"), ("act-x", "act-y", "act-x")):
            made.append(await send(stub, thing, action))
        for ex in made[::2]:
            await cancel(stub, ex.execution_id)
        await cancel(stub, target.execution_id)
        await send(stub, "th-a", "act-x")
        total = 6 + 3 + 1 + 1

        log = await everything.take(total)
        assert_gap_free(log, 2)
        cases = [
            (by_thing, lambda e: e.thing_id == "th-a"),
            (by_action, lambda e: e.action == "act-x"),
            (by_both, lambda e: e.thing_id == "th-a" and e.action == "act-x"),
            (by_execution, lambda e: e.execution_id == target.execution_id),
        ]
        for watcher, matches in cases:
            wanted = [e for e in log if matches(e)]
            assert wanted, "the scenario must produce matching events"
            got = await watcher.take(len(wanted))
            assert got == wanted
            if watcher is by_execution:
                assert [(e.status, e.previous_status) for e in got] == [(pb.CANCELED, pb.QUEUED)]
        for watcher in (everything, by_thing, by_action, by_both, by_execution, nobody):
            await watcher.assert_quiet(0.1)


async def test_filters_apply_to_replay(app: FleetcmdApp, stub) -> None:
    a = await send(stub, "th-a", "act-x")
    b = await send(stub, "th-b", "act-y")
    await cancel(stub, a.execution_id)
    await cancel(stub, b.execution_id)
    async with contextlib.AsyncExitStack() as stack:
        by_thing = await stack.enter_async_context(Watcher(stub, thing_id="th-b", after_sequence=0))
        by_action = await stack.enter_async_context(Watcher(stub, action="act-x", after_sequence=1))
        by_execution = await stack.enter_async_context(Watcher(stub, execution_id=a.execution_id, after_sequence=0))
        assert seqs(await by_thing.take(2)) == [2, 4]
        assert seqs(await by_action.take(1)) == [3]
        assert seqs(await by_execution.take(2)) == [1, 3]
        await wait_watchers(app, 3)
        c = await send(stub, "th-b", "act-x")
        assert seqs(await by_thing.take(1)) == [5]
        assert seqs(await by_action.take(1)) == [5]
        for watcher in (by_thing, by_action, by_execution):
            await watcher.assert_quiet(0.1)
        assert c.execution_id


async def test_stream_odd_requests_never_unknown(stub) -> None:
    """Filters naming impossible ids match nothing (or are refused); a position past SQLite's range is refused."""
    for request in (pb.StreamRequest(execution_id="a/b", after_sequence=0), pb.StreamRequest(thing_id="#")):
        call = stub.Stream(request)
        try:
            await asyncio.wait_for(call.read(), 0.3)
        except TimeoutError:
            pass  # accepted, nothing to send yet: fine
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.code(), err.details())
        finally:
            call.cancel()
    call = stub.Stream(pb.StreamRequest(after_sequence=2**64 - 1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after_sequence" in (info.value.details() or "")
    # The largest position SQLite can hold is fine: nothing after it.
    call = stub.Stream(pb.StreamRequest(after_sequence=2**63 - 1))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call.read(), 0.3)
    call.cancel()


# ---- resume -------------------------------------------------------------------------------


async def test_after_sequence_zero_replays_the_whole_log(app: FleetcmdApp, stub) -> None:
    made = [await send(stub, f"t{i % 2}", "act") for i in range(4)]
    await cancel(stub, made[1].execution_id)
    await cancel(stub, made[3].execution_id)
    async with Watcher(stub, after_sequence=0) as watcher:
        events = await watcher.take(6)
        assert_gap_free(events, 1)
        assert [e.execution_id for e in events] == [
            *(e.execution_id for e in made),
            made[1].execution_id,
            made[3].execution_id,
        ]
        assert [e.status for e in events] == [pb.QUEUED] * 4 + [pb.CANCELED] * 2
        for ev in events:
            assert ev.thing_id in ("t0", "t1") and ev.action == "act"
        # ... then continues live.
        await wait_watchers(app, 1)
        more = await send(stub, "t9", "act")
        (live,) = await watcher.take(1)
        assert live.sequence == 7 and live.execution_id == more.execution_id
        await watcher.assert_quiet()


async def test_resume_replays_after_n_then_continues_live(app: FleetcmdApp, stub) -> None:
    assert await burst(stub, 5) == 10
    # A client that saw up to 4 resumes: exactly 5..10 replayed, then live 11.. with no gap.
    async with Watcher(stub, after_sequence=4) as watcher:
        replayed = await watcher.take(6)
        assert_gap_free(replayed, 5)
        await wait_watchers(app, 1)
        ex = await send(stub)
        await cancel(stub, ex.execution_id)
        await burst(stub, 3)
        live = await watcher.take(8)
        assert_gap_free(replayed + live, 5)
        assert [(e.execution_id, e.status) for e in live[:2]] == [
            (ex.execution_id, pb.QUEUED),
            (ex.execution_id, pb.CANCELED),
        ]
        await watcher.assert_quiet()
    # Resuming at the head of the log replays nothing and waits for the next event.
    async with Watcher(stub, after_sequence=18) as watcher:
        await wait_watchers(app, 1)
        await watcher.assert_quiet(0.2)
        await send(stub)
        assert seqs(await watcher.take(1)) == [19]
        await watcher.assert_quiet(0.1)


@pytest.mark.parametrize("replay_page", [3, 500])
async def test_resume_while_events_are_produced_concurrently(
    app: FleetcmdApp, stub, monkeypatch: pytest.MonkeyPatch, replay_page: int
) -> None:
    """Subscribers join mid-traffic with several positions; each gets a gap-free, duplicate-free run."""
    monkeypatch.setattr(commands, "REPLAY_PAGE", replay_page)  # small pages: many replay round-trips
    produced = await burst(stub, 30)

    async def producer() -> int:
        count = 0
        for i in range(15):
            count += await burst(stub, 8, f"busy-{i % 3}")
        return count

    producing = asyncio.create_task(producer())
    watchers: list[tuple[int, Watcher]] = []
    try:
        for after in (0, 1, 17, 30, 59, 60):
            watchers.append((after, Watcher(stub, after_sequence=after)))
            await asyncio.sleep(0.01)  # join at different points of the traffic
        assert not producing.done(), "the traffic ended before every subscriber joined: make it longer"
        produced += await asyncio.wait_for(producing, 60)
        head = produced
        tail = await send(stub, "tail", "act")
        head += 1
        for after, watcher in watchers:
            events = await watcher.take(head - after, timeout=30)
            assert_gap_free(events, after + 1)
            assert events[-1].execution_id == tail.execution_id
            await watcher.assert_quiet(0.05)
    finally:
        producing.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await producing
        for _, watcher in watchers:
            await watcher.close()
    await wait_watchers(app, 0)


# ---- slow subscribers ---------------------------------------------------------------------


# A client that does not read: without BDP probing and with a 1 KiB look-ahead its HTTP/2
# window stays tiny, so the server's writes block after a few events and the subscription's
# own buffer (stream_buffer=5) has to absorb what follows, as for a really slow consumer.
# (With default channel options grpc keeps widening the window and buffers megabytes first.)
SLOW_CLIENT_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


@contextlib.asynccontextmanager
async def fast_and_slow_clients(
    tmp_path: Path,
) -> AsyncIterator[tuple[FleetcmdApp, pb_grpc.CommandServiceStub, pb_grpc.CommandServiceStub]]:
    """A service whose streams buffer 5 events, a normal client and one that hardly reads (see above)."""
    settings = make_settings(tmp_path / "data", stream_buffer=5)
    async with (
        FleetcmdApp(settings) as app,
        app_channel(app) as fast_channel,
        app_channel(app, options=SLOW_CLIENT_OPTIONS) as slow_channel,
    ):
        yield app, pb_grpc.CommandServiceStub(fast_channel), pb_grpc.CommandServiceStub(slow_channel)


async def make_large_events(stub: pb_grpc.CommandServiceStub) -> int:
    """200 events of ~400 bytes (long ids), far beyond the slow client's window; one commit at a time."""
    thing, action = "t" * 128, "a" * 128
    made = [await send(stub, thing, action) for _ in range(100)]
    for ex in made:
        await cancel(stub, ex.execution_id)
    return 2 * len(made)


async def read_until_cut_off(call: Any, events: Callable[[Any], Iterable[pb.ExecutionEvent]]) -> list[pb.ExecutionEvent]:
    """What a slow call still delivers (``events`` of each message), which must end with RESOURCE_EXHAUSTED."""
    received: list[pb.ExecutionEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(TIMEOUT):
            async for message in call:
                received.extend(events(message))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "after_sequence" in (info.value.details() or "")
    assert_gap_free(received, 1)
    return received


async def test_slow_subscriber_is_cut_off_and_fast_one_gets_everything(tmp_path: Path) -> None:
    async with fast_and_slow_clients(tmp_path) as (app, stub, slow_stub):
        slow_call = slow_stub.Stream(pb.StreamRequest())
        try:
            async with Watcher(stub) as fast:
                await wait_watchers(app, 2)
                produced = await make_large_events(stub)
                everything = await fast.take(produced, timeout=30)
                assert_gap_free(everything, 1)
                # The fast subscriber is not affected by the slow one being cut off.
                produced += await burst(stub, 2)  # never more than 5 pending: a reader keeping up is never cut
                assert_gap_free(everything + await fast.take(4), 1)
                await fast.assert_quiet(0.1)

            # The slow client reads at last: what was in flight before the cut, then RESOURCE_EXHAUSTED.
            received = await read_until_cut_off(slow_call, lambda event: (event,))
            assert len(received) < produced

            # ... and it resumes from its last sequence with nothing lost.
            last = received[-1].sequence if received else 0
            async with Watcher(slow_stub, after_sequence=last) as resumed:
                rest = await resumed.take(produced - last)
                assert_gap_free(received + rest, 1)
                await resumed.assert_quiet(0.1)
        finally:
            slow_call.cancel()


async def test_one_commit_larger_than_the_buffer_reaches_a_fast_subscriber(tmp_path: Path) -> None:
    """A group commit may hold more events than ``stream_buffer``; a subscriber keeping up gets them all."""
    settings = make_settings(tmp_path / "data", stream_buffer=5)
    async with FleetcmdApp(settings) as app, app_channel(app) as channel:
        assert app.core is not None and app.store is not None
        stub = pb_grpc.CommandServiceStub(channel)
        made = [await send(stub) for _ in range(12)]
        async with Watcher(stub) as fast:
            await wait_watchers(app, 1)
            batches = app.store.batches
            # Cancels queued in the same loop iteration reach the store writer together: one commit.
            await asyncio.gather(*(app.core.cancel(ex.execution_id) for ex in made))
            assert app.store.batches == batches + 1, "the cancels did not share one commit"
            events = await fast.take(12)
            assert_gap_free(events, 13)
            assert {e.execution_id for e in events} == {e.execution_id for e in made}
            await send(stub)
            assert seqs(await fast.take(1)) == [25]
            await fast.assert_quiet(0.1)
