"""Stream fan-out: events serialized once for every watcher, and ``StreamBatches``.

Events are produced as in ``test_stream.py``: a Send to a thing with no device
commits one QUEUED event, a Cancel of it one CANCELED event; each test runs on a
fresh service, so the event log starts at sequence 1.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.api import convert
from server.app import FleetcmdApp
from server.core import commands
from server.core.events import EventBus
from server.core.lifecycle import Status
from server.core.models import EventFilter, Reason, StateChange
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import app_channel
from tests.test_stream import (
    StreamCall,
    Watcher,
    assert_gap_free,
    burst,
    cancel,
    fast_and_slow_clients,
    make_large_events,
    read_until_cut_off,
    send,
    seqs,
    wait_watchers,
)

TIMEOUT = 10.0
STREAM_BATCHES = "/fleetcmd.v1.CommandService/StreamBatches"


class BatchWatcher(StreamCall):
    """One StreamBatches call, read continuously; keeps the events and how many messages carried them."""

    def __init__(self, stub: pb_grpc.CommandServiceStub, **request: Any) -> None:
        self.call = stub.StreamBatches(pb.StreamRequest(**request))
        self.events: list[pb.ExecutionEvent] = []
        self.messages = 0
        self.error: grpc.aio.AioRpcError | None = None
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for batch in self.call:
                assert batch.events, "an empty batch was sent"
                self.messages += 1
                self.events.extend(batch.events)
                self._changed.set()
        except grpc.aio.AioRpcError as err:
            self.error = err
        self._changed.set()

    async def take(self, count: int, timeout: float = TIMEOUT) -> list[pb.ExecutionEvent]:
        """The first ``count`` events (fails if the stream ends or stalls first)."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.events) < count:
                    if self.task.done():
                        raise AssertionError(f"stream ended after {len(self.events)} of {count} events: {self.error!r}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"only {len(self.events)} of {count} events within {timeout}s") from None
        return self.events[:count]

    async def assert_quiet(self, count: int, wait: float = 0.2) -> None:
        """No more than ``count`` events arrive."""
        await asyncio.sleep(wait)
        assert len(self.events) == count, seqs(self.events[count:])


def change(sequence: int, **kw: Any) -> StateChange:
    values: dict[str, Any] = {
        "execution_id": f"ex-{sequence}",
        "thing_id": "thing",
        "action": "act",
        "status": Status.SUCCEEDED,
        "previous_status": Status.SENT,
        "at_ms": 1_700_000_000_123 + sequence,
        **kw,
    }
    return StateChange(sequence=sequence, **values)


SAMPLES = [
    change(1, status=Status.QUEUED, previous_status=None),
    change(2, result_json='{"temp": 21.5, "ok": true, "list": [1, "two", null]}', note="device response"),
    change(3, status=Status.FAILED, result_json='"jammed"', reason=Reason("E7", "jam"), late=True),
    change(2**40, thing_id="t" * 128, action="a" * 128, result_json="null", note="ü" * 300),
]


# ---- the shared encoding ------------------------------------------------------------------


# Struct is a map: its entries may be serialized in any order, so bytes are compared only without one.
PLAIN = [s for s in SAMPLES if not (s.result_json or "").startswith("{")]


def test_event_bytes_are_a_plain_protobuf_serialization() -> None:
    wire = convert.EventWire()
    for sample in SAMPLES:
        raw = wire.message(sample)
        assert pb.ExecutionEvent.FromString(raw) == convert.event(sample)
        if sample in PLAIN:
            assert raw == convert.event(sample).SerializeToString()


def test_a_batch_is_exactly_what_protobuf_makes_of_the_events() -> None:
    wire = convert.EventWire()
    (raw,) = wire.batches(SAMPLES)
    assert pb.EventBatch.FromString(raw) == pb.EventBatch(events=[convert.event(s) for s in SAMPLES])
    (raw,) = wire.batches(PLAIN)
    assert raw == pb.EventBatch(events=[convert.event(s) for s in PLAIN]).SerializeToString()
    assert wire.batches([]) == []


def test_batches_split_before_max_bytes_and_keep_the_order() -> None:
    wire = convert.EventWire()
    many = [change(i, execution_id=f"ex-{i:03}", note="n" * 100) for i in range(1, 101)]
    one = len(wire.batches(many[:1])[0])
    messages = wire.batches(many, max_bytes=10 * one + 5)
    assert [len(pb.EventBatch.FromString(m).events) for m in messages] == [10] * 10
    assert all(len(m) <= 10 * one + 5 for m in messages)
    parsed = [e for m in messages for e in pb.EventBatch.FromString(m).events]
    assert [e.sequence for e in parsed] == list(range(1, 101))
    # An event larger than the limit still travels, alone.
    assert [len(pb.EventBatch.FromString(m).events) for m in wire.batches(many[:3], max_bytes=1)] == [1, 1, 1]


def test_live_events_are_encoded_once_and_replayed_ones_are_not_kept() -> None:
    wire = convert.EventWire(size=2)
    a, b, c = SAMPLES[:3]
    assert wire.message(a) is wire.message(a)  # the second watcher reuses the first one's bytes
    assert wire.batches([a, b]) == wire.batches([a, b])
    assert len(wire) == 2
    wire.message(c)  # the oldest entry goes
    assert len(wire) == 2
    assert wire.message(a) == convert.event(a).SerializeToString()
    # An equal but distinct object (as a replay reads it) is encoded on its own.
    twin = change(1, status=Status.QUEUED, previous_status=None)
    assert twin == a and wire.message(twin) == wire.message(a)
    before = len(wire)
    replay = change(99)
    assert wire.message(replay, shared=False) == convert.event(replay).SerializeToString()
    wire.batches([change(100)], shared=False)
    assert len(wire) == before


# ---- the bus ------------------------------------------------------------------------------


async def test_bus_indexes_execution_subscriptions_and_filters_once_per_filter() -> None:
    bus = EventBus()
    everything = bus.subscribe(EventFilter(), 100)
    by_action = [bus.subscribe(EventFilter(action="x"), 100) for _ in range(3)]
    one = bus.subscribe(EventFilter(execution_id="ex-2"), 100)
    one_x = bus.subscribe(EventFilter(execution_id="ex-2", action="x"), 100)
    assert len(bus) == 6
    events = [change(1, action="x"), change(2), change(3, action="x"), change(2, execution_id="ex-2", action="x")]
    bus.publish(events)
    assert await everything.next_batch() == events
    for sub in by_action:
        assert await sub.next_batch() == [events[0], events[2], events[3]]
    assert await one.next_batch() == [events[1], events[3]]
    assert await one_x.next_batch() == [events[3]]
    one.close()
    one.close()  # idempotent
    assert len(bus) == 5
    bus.publish([change(5, execution_id="ex-2", action="x")])
    assert seqs(await one_x.next_batch()) == [5]
    bus.close()
    assert len(bus) == 0
    with pytest.raises(Exception, match="shutting down"):
        await one_x.next_batch()


# ---- over gRPC ----------------------------------------------------------------------------


async def test_every_watcher_gets_every_event_in_order(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    """30 StreamBatches and 10 Stream watchers while commits of several events each are made."""
    async with contextlib.AsyncExitStack() as stack:
        batched = [await stack.enter_async_context(BatchWatcher(stub)) for _ in range(30)]
        single = [Watcher(stub) for _ in range(10)]
        for w in single:
            stack.push_async_callback(w.close)
        await wait_watchers(app, 40)
        produced = 0
        for _ in range(4):
            produced += sum(await asyncio.gather(*(burst(stub, 25, f"thing-{k}") for k in range(3))))
        reference = await single[0].take(produced, timeout=30)
        assert_gap_free(reference, 1)
        for w in single[1:]:
            assert await w.take(produced, timeout=30) == reference
        for w in batched:
            assert await w.take(produced, timeout=30) == reference  # the same events, field for field
            await w.assert_quiet(produced, 0.05)
        # The events committed together shared a message.
        assert max(w.messages for w in batched) < produced


async def test_stream_batches_bytes_parse_back_exactly(app: FleetcmdApp) -> None:
    """What the server writes is a plain serialization: parsing and serializing again gives the same bytes."""
    async with app_channel(app) as channel:
        stub = pb_grpc.CommandServiceStub(channel)
        produced = await burst(stub, 20)
        raw_batches = channel.unary_stream(STREAM_BATCHES, request_serializer=pb.StreamRequest.SerializeToString)
        raw_events = channel.unary_stream(
            "/fleetcmd.v1.CommandService/Stream", request_serializer=pb.StreamRequest.SerializeToString
        )
        batches: list[bytes] = []
        call = raw_batches(pb.StreamRequest(after_sequence=0))
        async with asyncio.timeout(TIMEOUT):
            async for message in call:
                batches.append(message)
                if pb.EventBatch.FromString(message).events[-1].sequence == produced:
                    break
        call.cancel()
        events: list[bytes] = []
        call = raw_events(pb.StreamRequest(after_sequence=0))
        async with asyncio.timeout(TIMEOUT):
            async for message in call:
                events.append(message)
                if len(events) == produced:
                    break
        call.cancel()
    parsed = [pb.EventBatch.FromString(m) for m in batches]
    for message, batch in zip(batches, parsed, strict=True):
        assert batch.SerializeToString() == message
    for message in events:
        assert pb.ExecutionEvent.FromString(message).SerializeToString() == message
    flat = [e for b in parsed for e in b.events]
    assert_gap_free(flat, 1)
    assert [e.SerializeToString() for e in flat] == events


async def test_stream_batches_filters_replay_and_live(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "REPLAY_PAGE", 3)  # the replay takes several pages
    a = await send(stub, "th-a", "act-x")
    b = await send(stub, "th-b", "act-y")
    await cancel(stub, a.execution_id)
    await cancel(stub, b.execution_id)
    async with contextlib.AsyncExitStack() as stack:
        everything = await stack.enter_async_context(BatchWatcher(stub, after_sequence=0))
        by_thing = await stack.enter_async_context(BatchWatcher(stub, thing_id="th-b", after_sequence=0))
        by_action = await stack.enter_async_context(BatchWatcher(stub, action="act-x", after_sequence=1))
        by_execution = await stack.enter_async_context(BatchWatcher(stub, execution_id=a.execution_id, after_sequence=0))
        by_both = await stack.enter_async_context(BatchWatcher(stub, thing_id="th-b", action="act-x"))
        assert seqs(await everything.take(4)) == [1, 2, 3, 4]
        assert seqs(await by_thing.take(2)) == [2, 4]
        assert seqs(await by_action.take(1)) == [3]
        assert seqs(await by_execution.take(2)) == [1, 3]
        await wait_watchers(app, 5)
        await send(stub, "th-b", "act-x")
        await send(stub, "th-a", "act-y")
        assert seqs(await everything.take(6)) == [1, 2, 3, 4, 5, 6]
        assert seqs(await by_thing.take(3)) == [2, 4, 5]
        assert seqs(await by_action.take(2)) == [3, 5]
        assert seqs(await by_both.take(1)) == [5]
        for watcher, count in ((everything, 6), (by_thing, 3), (by_action, 2), (by_execution, 2), (by_both, 1)):
            await watcher.assert_quiet(count, 0.1)


async def test_stream_batches_refuses_what_stream_refuses(stub: pb_grpc.CommandServiceStub) -> None:
    call = stub.StreamBatches(pb.StreamRequest(after_sequence=2**64 - 1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_slow_batch_watcher_is_cut_off_and_resumes(tmp_path: Path) -> None:
    """As for Stream: a StreamBatches reader that does not keep up gets RESOURCE_EXHAUSTED, the others everything."""
    async with fast_and_slow_clients(tmp_path) as (app, stub, slow_stub):
        slow_call = slow_stub.StreamBatches(pb.StreamRequest())
        try:
            async with BatchWatcher(stub) as fast:
                await wait_watchers(app, 2)
                produced = await make_large_events(stub)
                assert_gap_free(await fast.take(produced, timeout=30), 1)
                await fast.assert_quiet(produced, 0.1)

            received = await read_until_cut_off(slow_call, lambda batch: batch.events)
            assert len(received) < produced

            last = received[-1].sequence if received else 0
            async with BatchWatcher(slow_stub, after_sequence=last) as resumed:
                rest = await resumed.take(produced - last)
                assert_gap_free(received + rest, 1)
                await resumed.assert_quiet(produced - last, 0.1)
        finally:
            slow_call.cancel()
