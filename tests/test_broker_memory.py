"""Per-connection cost of the embedded broker: light sessions, queues and message loop.

Unit tests pin :class:`~broker_hooks.amqtt_fork.session.SessionState` to amqtt's ``transitions``
machine and the light queue/event to asyncio's; the broker tests run a real
``FleetBroker`` on 127.0.0.1 (port 0) with raw MQTT clients, and measure what a
connected, subscribed device costs (tracemalloc, and asyncio tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from amqtt.session import Session
from transitions import MachineError

from broker_hooks import mqtt_codec as codec
from broker_hooks.amqtt_fork.session import FleetSession, LightEvent, LightQueue, SessionState, light_queue
from broker_hooks.broker import Delivery, FleetBroker
from broker_hooks.rules import Inbound
from tests.brokers import running_broker

HOST = "127.0.0.1"

# ---- the state machine ------------------------------------------------------------------------


def _run(session: Session, ops: Sequence[str]) -> list[str]:
    """Apply transitions; record the state after each, or the refusal."""
    out = []
    for op in ops:
        try:
            getattr(session.transitions, op)()
            out.append(session.transitions.state)
        except (MachineError, ValueError) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


@pytest.mark.parametrize(
    "ops",
    [
        ["connect", "disconnect", "connect", "disconnect"],
        ["connect", "connect"],
        ["disconnect", "disconnect", "connect", "connect", "disconnect"],
        ["disconnect", "connect"],
    ],
)
def test_session_state_matches_amqtts_machine(ops: list[str]) -> None:
    assert _run(FleetSession(), ops) == _run(Session(), ops)


def test_session_state_transitions_and_callbacks() -> None:
    session = FleetSession()
    state = session.transitions
    assert isinstance(state, SessionState)
    assert state.state == "new" and state.is_new() and not state.is_connected() and not state.is_disconnected()
    assert state.connect() is True
    assert state.is_connected() and session.last_connect_time is not None and session.last_disconnect_time is None
    with pytest.raises(MachineError, match="Can't trigger event connect from state connected!"):
        state.connect()
    assert state.state == "connected"  # a refused transition changes nothing
    state.disconnect()
    assert state.is_disconnected() and session.last_disconnect_time is not None
    state.disconnect()  # disconnected -> disconnected is allowed, as in amqtt
    state.connect()
    assert state.is_connected() and session.last_disconnect_time is None
    assert "state=connected" in repr(session)


def test_fleet_session_has_no_transitions_machine_and_light_queues() -> None:
    session = FleetSession()
    assert type(session.transitions) is SessionState
    assert isinstance(session.delivered_message_queue, LightQueue)
    assert isinstance(session.retained_messages, LightQueue)


# ---- light queue and event ---------------------------------------------------------------------


async def test_light_queue_is_a_fifo_with_asyncio_queue_semantics() -> None:
    queue: LightQueue[int] = LightQueue()
    assert queue.empty() and queue.qsize() == 0 and not queue.full() and queue.maxsize == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    await queue.put(1)
    queue.put_nowait(2)
    assert await getter == 1
    assert queue.qsize() == 1 and await queue.get() == 2 and queue.empty()

    # A cancelled getter strands no item; the other getter gets it.
    first, second = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(3)
    first.cancel()
    assert await second == 3
    assert first.cancelled()

    joined = asyncio.ensure_future(queue.join())
    await asyncio.sleep(0)
    assert not joined.done()
    for _ in range(3):
        queue.task_done()
    await asyncio.wait_for(joined, 1)
    with pytest.raises(ValueError):
        queue.task_done()


async def test_light_queue_waiters_are_woken_by_a_put_and_can_be_withdrawn() -> None:
    loop = asyncio.get_running_loop()
    queue: LightQueue[str] = LightQueue()
    woken, withdrawn = loop.create_future(), loop.create_future()
    queue.add_waiter(woken)
    queue.add_waiter(withdrawn)
    queue.discard_waiter(withdrawn)
    queue.put_nowait("x")
    assert woken.done() and not withdrawn.done()
    assert queue.get_nowait() == "x"


async def test_light_queue_swaps_in_for_an_asyncio_queue_keeping_items() -> None:
    session = Session()  # amqtt's own: asyncio.Queues
    session.delivered_message_queue.put_nowait("a")  # type: ignore[arg-type]
    session.delivered_message_queue.put_nowait("b")  # type: ignore[arg-type]
    light = light_queue(session, "delivered_message_queue")
    assert session.delivered_message_queue is light
    assert light_queue(session, "delivered_message_queue") is light
    assert [light.get_nowait(), light.get_nowait()] == ["a", "b"]


async def test_light_event() -> None:
    event = LightEvent()
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.sleep(0)
    assert not waiter.done() and not event.is_set()
    event.set()
    assert await waiter is True and event.is_set()
    assert await event.wait() is True
    event.clear()
    assert not event.is_set()


# ---- a real broker with raw clients -------------------------------------------------------------


class RecordingSink:
    """A DeviceSink that records connects and disconnects."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def device_connected(self, client_id: str, remote_address: str) -> None:
        self.events.append(("connected", client_id))

    def device_subscribed(self, client_id: str, filters: Sequence[tuple[str, int]]) -> None:
        self.events.append(("subscribed", client_id))

    def device_disconnected(self, client_id: str) -> None:
        self.events.append(("disconnected", client_id))

    def device_message_nowait(self, inbound: Inbound) -> asyncio.Future[None] | None:
        self.events.append(("message", inbound.client_id))
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        applied.set_result(None)
        return applied

    async def device_message(self, inbound: Inbound) -> asyncio.Future[None]:
        applied = self.device_message_nowait(inbound)
        assert applied is not None
        return applied


@pytest.fixture
async def broker() -> AsyncIterator[FleetBroker]:
    async with running_broker(RecordingSink(), max_payload_bytes=64 * 1024) as instance:
        yield instance


def _port(broker: FleetBroker) -> int:
    return broker.listener_ports()["mqtt"]


def _sink(broker: FleetBroker) -> RecordingSink:
    sink = broker._sink
    assert isinstance(sink, RecordingSink)
    return sink


DISCONNECT = codec.DISCONNECT_PACKET


class RawClient:
    """Just enough MQTT 3.1.1 over asyncio streams to drive the broker packet by packet."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, client_id: str, clean: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        client = cls(reader, writer)
        writer.write(codec.encode_connect(client_id, clean_session=clean))
        first, body = await client.read()
        assert first >> 4 == 2 and body[1] == 0, (first, body)  # CONNACK accepted
        return client

    async def read(self, timeout: float = 5) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        header = codec.parse_fixed_header(head)
        assert header is not None and header.size == 2
        return head[0], await asyncio.wait_for(self.reader.readexactly(header.length), timeout)

    async def subscribe(self, topic_filter: str, packet_id: int = 1, qos: int = 1) -> int:
        self.writer.write(codec.encode_subscribe(packet_id, [(topic_filter, qos)]))
        first, body = await self.read()
        assert first >> 4 == codec.SUBACK
        suback_id, codes = codec.decode_suback(body)
        assert suback_id == packet_id
        return codes[0]

    async def closed(self, timeout: float = 5) -> bool:
        """Whether the broker closed the connection (EOF) within ``timeout``."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except (TimeoutError, ConnectionError):
            return False

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError):
            self.writer.write(DISCONNECT)
            self.writer.close()
            await self.writer.wait_closed()


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _state(broker: FleetBroker, client_id: str) -> str:
    return str(broker._sessions[client_id][0].transitions.state)


async def test_broker_sessions_are_light(broker: FleetBroker) -> None:
    client = await RawClient.connect(_port(broker), "light-1")
    try:
        assert await client.subscribe("light/1/req") == 1
        session, handler = broker._sessions["light-1"]
        assert type(session) is FleetSession
        assert type(session.transitions) is SessionState
        assert isinstance(session.delivered_message_queue, LightQueue)
        assert isinstance(handler._pending_subscriptions, LightQueue)
        assert broker.is_connected("light-1")
        # Their instance dicts still share keys with the class (a few hundred bytes): an attribute
        # too many turns one into a plain dict of ~1.6 KB, on every connection.
        for obj in (session, handler):
            assert sys.getsizeof(vars(obj)) < 600, f"{type(obj).__name__}: {len(vars(obj))} attributes in its dict"
    finally:
        await client.close()


async def test_connect_disconnect_reconnect(broker: FleetBroker) -> None:
    port = _port(broker)
    client = await RawClient.connect(port, "cycle-1")
    assert await client.subscribe("cycle/1/req") == 1
    await client.close()
    await until(lambda: ("disconnected", "cycle-1") in _sink(broker).events)
    # A clean session is forgotten at the next CONNECT; until then it is marked disconnected.
    assert _state(broker, "cycle-1") == "disconnected" and not broker.is_connected("cycle-1")

    again = await RawClient.connect(port, "cycle-1")
    try:
        assert _state(broker, "cycle-1") == "connected"
        assert await again.subscribe("cycle/1/req") == 1
        assert broker.subscription_qos("cycle-1", "cycle/1/req") == 1
    finally:
        await again.close()
    await until(lambda: _sink(broker).events.count(("disconnected", "cycle-1")) == 2)


def _await_chain(task: asyncio.Task[Any]) -> list[str]:
    """The coroutines ``task`` is suspended in, outermost first."""
    names = []
    coro: Any = task.get_coro()
    while inspect.iscoroutine(coro):
        names.append(coro.cr_code.co_qualname)
        coro = coro.cr_await
    return names


async def test_an_idle_connection_holds_no_wrapping_coroutine_nor_finished_task(broker: FleetBroker) -> None:
    # Every coroutine in a connection's await chain lives, frame and all, as long as the connection:
    # subclasses hook in through plain methods (_connect_verdict, _session_connected) instead.
    client = await RawClient.connect(_port(broker), "frames-1")
    try:
        assert await client.subscribe("frames/1/req") == 1
        chains = [_await_chain(t) for t in asyncio.all_tasks() if "stream_connected" in _await_chain(t)[0]]
        assert chains == [
            [
                "Broker.stream_connected",
                "FleetBroker._client_connected",  # a copy of amqtt's, not a wrapper: no extra frame
                "IndexedBroker._handle_client_session",
                "IndexedBroker._client_message_loop",
            ]
        ]
        assert ("connected", "frames-1") in _sink(broker).events
        # One reference to the broker, no closure of its own (a partial and a lambda were ~600 B).
        handler = broker._sessions["frames-1"][1]
        assert getattr(handler, "broker", None) is broker and "handle_read_timeout" not in vars(handler)

        # The reader let go of its SUBSCRIBE's task once done, though no packet came after it.
        def subscribe_tasks() -> list[asyncio.Task[Any]]:
            return [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and "handle_subscribe" in repr(o.get_coro())]

        await until(lambda: not subscribe_tasks())
    finally:
        await client.close()


async def test_abrupt_close_is_a_disconnect(broker: FleetBroker) -> None:
    client = await RawClient.connect(_port(broker), "abrupt-1")
    client.writer.close()  # no DISCONNECT packet
    await until(lambda: ("disconnected", "abrupt-1") in _sink(broker).events)
    assert _state(broker, "abrupt-1") == "disconnected"


async def test_persistent_session_takeover(broker: FleetBroker) -> None:
    port = _port(broker)
    first = await RawClient.connect(port, "persist-1", clean=False)
    assert await first.subscribe("persist/1/req") == 1
    session = broker._sessions["persist-1"][0]

    second = await RawClient.connect(port, "persist-1", clean=False)
    try:
        assert await first.closed(), "the taken-over connection must be closed"
        assert broker.stats["takeovers"] == 1
        assert broker._sessions["persist-1"][0] is session and _state(broker, "persist-1") == "connected"
        # The new connection works: SUBSCRIBE gets its SUBACK, and deliveries reach it.
        assert await second.subscribe("persist/1/other", packet_id=2) == 1
        assert await broker.deliver("persist-1", "persist/1/req", b"hi", max_qos=0) == Delivery.SENT
        first_byte, body = await second.read()
        assert first_byte >> 4 == 3 and body.endswith(b"hi")
    finally:
        await second.close()


async def test_clean_session_takeover_closes_the_old_connection(broker: FleetBroker) -> None:
    port = _port(broker)
    first = await RawClient.connect(port, "clean-1")
    second = await RawClient.connect(port, "clean-1")
    try:
        assert await first.closed()
        assert _state(broker, "clean-1") == "connected"
        assert await second.subscribe("clean/1/req") == 1
    finally:
        await second.close()


async def test_subscriptions_are_handled_in_order(broker: FleetBroker) -> None:
    client = await RawClient.connect(_port(broker), "order-1")
    try:
        # Three SUBSCRIBEs in one write: three SUBACKs, in order.
        client.writer.write(b"".join(codec.encode_subscribe(i, [(f"order/1/{i}", 1)]) for i in (1, 2, 3)))
        acks = [await client.read() for _ in range(3)]
        assert [codec.decode_suback(body)[0] for _, body in acks] == [1, 2, 3]
        assert set(broker.client_filters("order-1")) == {"order/1/1", "order/1/2", "order/1/3"}
    finally:
        await client.close()


async def test_publishes_sent_just_before_disconnect_are_all_handled(broker: FleetBroker) -> None:
    port = _port(broker)
    listener = await RawClient.connect(port, "listener-1")
    try:
        assert await listener.subscribe("burst/topic", qos=0) == 0  # QoS 0: this client sends no PUBACKs
        talker = await RawClient.connect(port, "talker-1")
        # PUBLISHes and the DISCONNECT in one write: amqtt handled at most one of them.
        talker.writer.write(b"".join(codec.encode_publish("burst/topic", b"m%d" % i, 0, None) for i in range(3)) + DISCONNECT)
        received = []
        for _ in range(3):
            first, body = await listener.read()
            assert first >> 4 == 3
            received.append(body[-2:])
        assert received == [b"m0", b"m1", b"m2"]
        talker.writer.close()
    finally:
        await listener.close()


# ---- what a connected device costs -----------------------------------------------------------------

# Opens N connections, each CONNECT + SUBSCRIBE, prints "ready", holds them until stdin closes.
CLIENTS = r"""
import socket, sys
from broker_hooks import mqtt_codec as codec
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(codec.encode_connect(f"mem-{i}"))
    assert c.recv(4)[3] == 0
    c.sendall(codec.encode_subscribe(1, [(f"mem/{i}/req", 1)]))
    assert c.recv(5)[4] == 1
    socks.append(c)
print("ready", flush=True)
sys.stdin.read()
for c in socks:
    c.sendall(codec.DISCONNECT_PACKET); c.close()
"""

DEVICES = 200
# Measured: about 11 KiB per device on either loop (amqtt 0.12.1 as shipped: about 51 KB, most
# of it the transitions.Machine of each session, four asyncio.Queues and four waiter tasks). The
# bound leaves room for a patch release of Python, not for another task or closure per device.
MAX_TRACED_BYTES_PER_DEVICE = 13 * 1024
# The connection's own task and the protocol handler's reader (amqtt: six).
MAX_TASKS_PER_DEVICE = 2


def _traced(snapshot: tracemalloc.Snapshot) -> int:
    # Only what the broker holds: not the log records pytest captures, nor tracemalloc itself.
    ignored = [tracemalloc.Filter(False, pattern) for pattern in ("*/logging/*", "*/_pytest/*", "*/tracemalloc.py")]
    return sum(stat.size for stat in snapshot.filter_traces(ignored).statistics("filename"))


@pytest.mark.timeout(60)
async def test_memory_and_tasks_per_connected_device(broker: FleetBroker) -> None:
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    tracemalloc.start()
    try:
        before = _traced(tracemalloc.take_snapshot())
        clients = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENTS,
            str(_port(broker)),
            str(DEVICES),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert clients.stdin is not None and clients.stdout is not None
        try:
            assert await asyncio.wait_for(clients.stdout.readline(), 40) == b"ready\n"
            await until(lambda: sum(1 for s, _ in broker._sessions.values() if s.transitions.state == "connected") == DEVICES)
            await asyncio.sleep(0.2)  # let the last SUBACK's bookkeeping settle
            gc.collect()
            per_device = (_traced(tracemalloc.take_snapshot()) - before) / DEVICES
            tasks_per_device = (len(asyncio.all_tasks()) - tasks_before) / DEVICES
        finally:
            clients.stdin.close()
            await asyncio.wait_for(clients.wait(), 20)
    finally:
        tracemalloc.stop()
    print(f"traced per connected device: {per_device / 1024:.1f} KiB, tasks per device: {tasks_per_device:.2f}")
    assert per_device < MAX_TRACED_BYTES_PER_DEVICE, f"{per_device / 1024:.1f} KiB per connected device"
    assert tasks_per_device <= MAX_TASKS_PER_DEVICE, f"{tasks_per_device:.2f} tasks per connected device"
