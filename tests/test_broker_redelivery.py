"""Un-acknowledged QoS 1/2 publishes are redelivered when a persistent session comes back [MQTT-4.4.0-1].

The broker keeps the messages it routed to a subscriber until their PUBACK; when a
``clean_session=false`` client reconnects, they go out again first, with the same packet id
and the DUP flag, at most ``handler.MAX_KEPT_INFLIGHT`` per session. The control plane's own
publishes are not kept: fleetcmd's outbox publishes an un-acked request again itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import pytest

from broker_hooks.amqtt_fork import handler
from broker_hooks.broker import Delivery, FleetBroker
from broker_hooks.rules import Inbound
from server.app import FleetcmdApp
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.brokers import broker_client, drain, running_broker
from tests.devices import EmqxDevice, Received, wait_for
from tests.test_device_contract import device, history, send, wait_status


class _NullSink:
    def device_connected(self, client_id: str, remote_address: str) -> None:
        pass

    def device_subscribed(self, client_id: str, filters: Sequence[tuple[str, int]]) -> None:
        pass

    def device_disconnected(self, client_id: str) -> None:
        pass

    def device_message_nowait(self, inbound: Inbound) -> asyncio.Future[None] | None:
        return None

    async def device_message(self, inbound: Inbound) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@pytest.fixture
async def broker() -> AsyncIterator[FleetBroker]:
    # WebSocket too: there amqtt's own flows carry the messages (the handler's slow path).
    async with running_broker(_NullSink(), ws_port=0, max_payload_bytes=256 * 1024) as running:
        yield running


def _payload(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


async def _leave(dev: EmqxDevice, how: str) -> None:
    if how == "disconnect":
        await asyncio.to_thread(dev.stop)
    else:
        await dev.aabort()


async def _unacked(broker: FleetBroker, sub: EmqxDevice, pub: EmqxDevice, count: int, qos: int = 1) -> list[Received]:
    """``pub`` publishes ``count`` messages on r/x; ``sub`` (manual ack) receives them and never acks."""
    for n in range(count):
        await pub.apublish("r/x", _payload(n), qos=qos)
    got = [await sub.wait_message() for _ in range(count)]
    assert [json.loads(r.payload)["n"] for r in got] == list(range(count))
    return got


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
@pytest.mark.parametrize("how", ["disconnect", "crash"])
async def test_unacked_messages_come_again_first_with_the_same_packet_id_and_dup(
    broker: FleetBroker, transport: str, how: str
) -> None:
    async with broker_client(broker, "pub-r") as pub:
        sub = broker_client(broker, "sub-r", transport, clean_session=False, auto_ack=False)
        await sub.__aenter__()
        assert await sub.asubscribe("r/x", qos=1) == [1]
        first = await _unacked(broker, sub, pub, 3)
        assert not any(r.dup for r in first)
        await _leave(sub, how)
        await wait_for(lambda: not broker.is_connected("sub-r"), what="the broker to see the client go")
        await pub.apublish("r/x", _payload(9), qos=1)  # queued for the offline session: after the redelivery
        async with broker_client(broker, "sub-r", transport, clean_session=False) as again:
            got = await drain(again, 0.5)
    assert [(r.mid, r.qos, r.dup, r.payload) for r in got[:3]] == [(r.mid, 1, True, r.payload) for r in first]
    assert [json.loads(r.payload)["n"] for r in got] == [0, 1, 2, 9]
    assert not got[3].dup
    session = broker._sessions["sub-r"][0]
    await wait_for(lambda: not session.inflight_out, what="the PUBACKs of the redelivered messages")
    assert broker.stats["dropped.inflight_overflow"] == 0


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
async def test_messages_a_stalled_client_never_read_come_again_at_qos_1_and_2(broker: FleetBroker, transport: str) -> None:
    """The client stops reading (no PUBACK, no PUBREC), then sends DISCONNECT: both messages come again, DUP set."""
    async with broker_client(broker, "pub-s") as pub:
        sub = broker_client(broker, "sub-s", transport, clean_session=False)
        await sub.__aenter__()
        assert await sub.asubscribe("r/one", qos=1) == [1]
        assert await sub.asubscribe("r/two", qos=2) == [2]
        await asyncio.to_thread(sub.client.loop_stop)  # paho reads nothing more
        await pub.apublish("r/one", _payload(1), qos=1)
        await pub.apublish("r/two", _payload(2), qos=2)
        session = broker._sessions["sub-s"][0]
        await wait_for(lambda: len(session.inflight_out) == 2, what="both messages in flight")
        sock = sub.client.socket()
        assert sock is not None
        if transport == "tcp":
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        sock.close()
        await wait_for(lambda: not broker.is_connected("sub-s"), what="the broker to see the client go")
        async with broker_client(broker, "sub-s", transport, clean_session=False) as again:
            got = await drain(again, 0.5)
    assert sorted((r.topic, r.qos, r.dup) for r in got) == [("r/one", 1, True), ("r/two", 2, True)]


async def test_a_take_over_gets_the_unacked_messages_of_the_connection_it_replaced(broker: FleetBroker) -> None:
    """The client hangs (socket open, nothing acked) and connects again with the same id: the new connection gets them."""
    async with broker_client(broker, "pub-t") as pub:
        old = broker_client(broker, "sub-t", clean_session=False, auto_ack=False)
        await old.__aenter__()
        assert await old.asubscribe("r/x") == [1]
        first = await _unacked(broker, old, pub, 2)
        await asyncio.to_thread(old.client.loop_stop)  # frozen
        try:
            async with broker_client(broker, "sub-t", clean_session=False) as again:
                got = await drain(again, 0.5)
                session = broker._sessions["sub-t"][0]
                await wait_for(lambda: not session.inflight_out, what="the PUBACKs of the redelivered messages")
        finally:
            sock = old.client.socket()
            if sock is not None:
                sock.close()
    assert [(r.mid, r.dup, r.payload) for r in got] == [(r.mid, True, r.payload) for r in first]


async def test_a_clean_session_gets_nothing_again(broker: FleetBroker) -> None:
    async with broker_client(broker, "pub-c") as pub:
        sub = broker_client(broker, "sub-c", clean_session=False, auto_ack=False)
        await sub.__aenter__()
        assert await sub.asubscribe("r/x") == [1]
        await _unacked(broker, sub, pub, 2)
        await _leave(sub, "disconnect")
        await wait_for(lambda: not broker.is_connected("sub-c"), what="the broker to see the client go")
        async with broker_client(broker, "sub-c", clean_session=True) as again:
            assert await drain(again, 0.5) == []


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
@pytest.mark.parametrize("count", [3, 4], ids=["at-the-bound", "one-over"])
async def test_kept_messages_are_bounded_and_the_oldest_dropped_is_counted(
    broker: FleetBroker, monkeypatch: pytest.MonkeyPatch, transport: str, count: int
) -> None:
    monkeypatch.setattr(handler, "MAX_KEPT_INFLIGHT", 3)
    async with broker_client(broker, "pub-b") as pub:
        sub = broker_client(broker, "sub-b", transport, clean_session=False, auto_ack=False)
        await sub.__aenter__()
        assert await sub.asubscribe("r/x") == [1]
        await _unacked(broker, sub, pub, count)
        assert len(broker._sessions["sub-b"][0].inflight_out) == 3
        await _leave(sub, "disconnect")
        await wait_for(lambda: not broker.is_connected("sub-b"), what="the broker to see the client go")
        async with broker_client(broker, "sub-b", transport, clean_session=False) as again:
            got = await drain(again, 0.5)
    assert [json.loads(r.payload)["n"] for r in got] == list(range(count))[-3:]
    assert all(r.dup for r in got)
    assert broker.stats["dropped.inflight_overflow"] == count - 3


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
async def test_the_control_planes_publishes_are_not_kept(broker: FleetBroker, transport: str) -> None:
    """deliver/deliver_nowait: the caller owns the message (fleetcmd's outbox publishes it again)."""
    sub = broker_client(broker, "dev-k", transport, clean_session=False, auto_ack=False)
    await sub.__aenter__()
    assert await sub.asubscribe("d/+/req") == [1]
    nowait = broker.deliver_nowait("dev-k", "d/1/req", _payload(1))
    # On WebSocket (amqtt's flows) deliver_nowait does not write: deliver then does, through publish_owned.
    assert isinstance(nowait, asyncio.Future) == (transport == "tcp")
    first = asyncio.ensure_future(broker.deliver("dev-k", "d/1/req", _payload(1))) if nowait is None else None
    waited = asyncio.ensure_future(broker.deliver("dev-k", "d/2/req", _payload(2)))
    got = [await sub.wait_message(), await sub.wait_message()]
    assert sorted(r.topic for r in got) == ["d/1/req", "d/2/req"]
    await _leave(sub, "disconnect")
    assert await waited is Delivery.FAILED
    if first is not None:
        assert await first is Delivery.FAILED
    else:
        assert isinstance(nowait, asyncio.Future)
        with pytest.raises(asyncio.CancelledError):
            await nowait
    async with broker_client(broker, "dev-k", transport, clean_session=False) as again:
        assert await drain(again, 0.5) == []


async def test_a_persistent_device_gets_an_unacked_request_once_on_reconnect(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub
) -> None:
    """The outbox's republish is the only copy: the session did not keep the request for a DUP resend too."""
    assert app.broker is not None
    async with device(app, "persist-1", auto_ack=False, clean_session=False) as dev:
        ex = await send(stub, "persist-1", value=5)
        first = await dev.wait_message()
    async with device(app, "persist-1", clean_session=False) as dev2:
        again = await dev2.wait_message(timeout=3)
        assert json.loads(again.payload) == json.loads(first.payload)
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev2.arespond(ex.execution_id, "SUCCEEDED")
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
        assert [r.topic for r in await drain(dev2, 0.5)] == []  # no second copy (a DUP resend)
    assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]
