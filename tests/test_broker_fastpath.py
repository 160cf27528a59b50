"""The broker's message path: indexed routing (broker_hooks/router.py) and the fast handler (broker_hooks/amqtt_fork/handler.py).

A real FleetBroker (acl=None, as bench/harness_broker.py runs it) on 127.0.0.1 port 0 and real
paho clients. Routing must be amqtt's (Broker._matches, _run_broadcast), minus the scan.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker

from broker_hooks.amqtt_fork import handler
from broker_hooks.broker import Delivery, FleetBroker
from broker_hooks.router import TopicRouter
from broker_hooks.rules import Inbound
from tests.brokers import broker_client, drain, running_broker
from tests.devices import wait_for


class _NullSink:
    """Records device messages; each is applied at once, or when the test says (``hold``).

    ``full`` plays a control plane whose queue has no room: the reader must leave the message to
    the message loop, which waits on :meth:`device_message`.
    """

    def __init__(self) -> None:
        self.inbound: list[Inbound] = []
        self.applied: list[asyncio.Future[None]] = []
        self.via_loop: list[Inbound] = []
        self.hold = False
        self.full = False

    def device_connected(self, client_id: str, remote_address: str) -> None:
        pass

    def device_subscribed(self, client_id: str, filters: Sequence[tuple[str, int]]) -> None:
        pass

    def device_disconnected(self, client_id: str) -> None:
        pass

    def device_message_nowait(self, inbound: Inbound) -> asyncio.Future[None] | None:
        return None if self.full else self._take(inbound)

    async def device_message(self, inbound: Inbound) -> asyncio.Future[None]:
        self.via_loop.append(inbound)
        return self._take(inbound)

    def _take(self, inbound: Inbound) -> asyncio.Future[None]:
        self.inbound.append(inbound)
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.hold:
            applied.set_result(None)
        self.applied.append(applied)
        return applied


@pytest.fixture
async def broker() -> AsyncIterator[FleetBroker]:
    # WebSocket too: amqtt's own reader, where the PUBACK rules must hold as on fleetcmd's.
    async with running_broker(_NullSink(), ws_port=0, max_payload_bytes=256 * 1024) as running:
        yield running


def _payload(n: int) -> bytes:
    # EmqxDevice decodes every payload as JSON.
    return json.dumps({"n": n}).encode()


# ---- the router alone ---------------------------------------------------------------------

_LEVELS = ["a", "b", "", "$x", "c"]


def _random_filter(rng: random.Random) -> str:
    levels = [rng.choice([*_LEVELS, "+", "+"]) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        levels.append("#")
    return "/".join(levels)


def _random_topic(rng: random.Random) -> str:
    return "/".join(rng.choice(_LEVELS) for _ in range(rng.randint(1, 5)))


def test_router_matches_exactly_what_amqtt_matches() -> None:
    rng = random.Random(7)
    stock = Broker.__new__(Broker)  # amqtt's _matches needs nothing but a logger
    stock.logger = logging.getLogger("stock")
    filters = {_random_filter(rng) for _ in range(400)} | {"#", "+", "a/#", "$x/#", "$x/+", "+/a", "a", "a/b", "/"}
    router = TopicRouter()
    for f in filters:
        router.add(f)
    topics = {_random_topic(rng) for _ in range(600)} | {"a", "$x", "$x/a", "/", "", "a/"}
    for topic in topics:
        got = router.match(topic)
        assert len(got) == len(set(got)), topic
        assert set(got) == {f for f in filters if stock._matches(topic, f)}, topic
    # Removing every filter leaves nothing behind, not even trie nodes.
    for f in filters:
        router.discard(f)
    assert len(router) == 0
    assert all(router.match(t) == [] for t in topics)
    assert router._root.empty()


def test_router_discard_keeps_other_filters() -> None:
    router = TopicRouter()
    for f in ("a/+/c", "a/+/#", "a/b/c", "a/#"):
        router.add(f)
    router.discard("a/+/c")
    assert sorted(router.match("a/b/c")) == ["a/#", "a/+/#", "a/b/c"]
    router.discard("a/#")
    router.discard("a/nothing/#")  # not there: no-op
    assert sorted(router.match("a/b/c")) == ["a/+/#", "a/b/c"]


# ---- routing through the broker ------------------------------------------------------------


async def test_exact_and_wildcard_filters(broker: FleetBroker) -> None:
    filters = {"exact": "t/a/b", "plus": "t/+/b", "hash": "t/#", "all": "#", "lead": "+/a/b", "other": "t/a/c"}
    subs = {name: broker_client(broker, f"sub-{name}") for name in filters}
    pub = broker_client(broker, "pub-1")
    async with pub:
        for name, dev in subs.items():
            await dev.__aenter__()
            assert await dev.asubscribe(filters[name]) == [1]
        await pub.apublish("t/a/b", _payload(1))
        await pub.apublish("t/x", _payload(2))
        got = {name: [r.topic for r in await drain(dev, 0.3)] for name, dev in subs.items()}
        for dev in subs.values():
            await dev.__aexit__(None, None, None)
    assert got == {
        "exact": ["t/a/b"],
        "plus": ["t/a/b"],
        "hash": ["t/a/b", "t/x"],
        "all": ["t/a/b", "t/x"],
        "lead": ["t/a/b"],
        "other": [],
    }


async def test_dollar_topics_are_not_matched_by_leading_wildcards(broker: FleetBroker) -> None:
    filters = {"dollar": "$test/+", "all": "#", "lead": "+/a", "sys": "$test/#"}
    subs = {name: broker_client(broker, f"sub-{name}") for name in filters}
    for name, dev in subs.items():
        await dev.__aenter__()
        assert await dev.asubscribe(filters[name]) == [1]
    await broker.internal_message_broadcast("$test/a", _payload(1), 1)
    got = {name: [r.topic for r in await drain(dev, 0.3)] for name, dev in subs.items()}
    for dev in subs.values():
        await dev.__aexit__(None, None, None)
    assert got == {"dollar": ["$test/a"], "all": [], "lead": [], "sys": ["$test/a"]}


async def test_overlapping_filters_of_one_client_get_a_copy_each(broker: FleetBroker) -> None:
    # amqtt 0.12.1 delivers once per matching filter (its _run_broadcast loops over filters).
    async with broker_client(broker, "overlap") as sub, broker_client(broker, "pub-2") as pub:
        assert await sub.asubscribe(["o/+", "o/#", "o/x"]) == [1, 1, 1]
        await pub.apublish("o/x", _payload(1))
        assert [r.topic for r in await drain(sub, 0.3)] == ["o/x"] * 3


async def test_unsubscribe_removes_the_route(broker: FleetBroker) -> None:
    async with broker_client(broker, "unsub") as sub, broker_client(broker, "pub-3") as pub:
        assert await sub.asubscribe("u/+") == [1]
        await pub.apublish("u/1", _payload(1))
        assert [r.topic for r in await drain(sub, 0.3)] == ["u/1"]
        sub.client.unsubscribe("u/+")
        await wait_for(lambda: "u/+" not in broker._router, what="unsubscribe")
        assert "u/+" not in broker._subscriptions
        await pub.apublish("u/2", _payload(2))
        assert await drain(sub, 0.3) == []


async def test_clean_session_disconnect_removes_its_routes(broker: FleetBroker) -> None:
    async with broker_client(broker, "keeper") as keeper:
        assert await keeper.asubscribe("c/shared/+") == [1]
        async with broker_client(broker, "leaver") as leaver:
            assert await leaver.asubscribe(["c/own/#", "c/exact", "c/shared/+"]) == [1, 1, 1]
            assert {"c/own/#", "c/exact", "c/shared/+"} <= set(broker._subscriptions)
        # The session monitor (every second) drops the disconnected clean session.
        await wait_for(lambda: "c/own/#" not in broker._router, timeout=5, what="routes dropped")
        assert "c/exact" not in broker._router and "c/exact" not in broker._subscriptions
        assert "c/shared/+" in broker._router
        assert [s.client_id for s, _ in broker._subscriptions["c/shared/+"]] == ["keeper"]


async def test_offline_persistent_session_keeps_qos1_messages(broker: FleetBroker) -> None:
    sub = broker_client(broker, "persistent", clean_session=False)
    async with sub:
        assert await sub.asubscribe("p/one", qos=1) == [1]
        assert await sub.asubscribe("p/zero", qos=0) == [0]
    session = broker._sessions["persistent"][0]
    await wait_for(lambda: session.transitions.state == "disconnected", what="offline")
    async with broker_client(broker, "pub-4") as pub:
        await pub.apublish("p/one", _payload(1), qos=1)
        await pub.apublish("p/one", _payload(2), qos=0)  # delivered at the subscription's QoS 1: kept too
        await pub.apublish("p/zero", _payload(3), qos=1)  # QoS 0 subscription: not kept, as amqtt
    assert "p/one" in broker._router  # the offline session keeps its routes
    await wait_for(lambda: session.retained_messages.qsize() == 2, what="queued for the offline session")
    again = broker_client(broker, "persistent", clean_session=False)
    async with again:
        got = await drain(again, 0.3)
    assert [(r.topic, json.loads(r.payload)["n"], r.qos) for r in got] == [("p/one", 1, 1), ("p/one", 2, 1)]


async def test_publish_does_not_touch_filters_that_do_not_match(broker: FleetBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cost independence: a publish looks at its own subscribers only (counted, not timed)."""
    touched = 0

    class CountingList(list[Any]):
        def __iter__(self) -> Any:
            nonlocal touched
            touched += 1
            return super().__iter__()

    context = broker.plugins_manager.context
    for i in range(2000):
        await context.add_subscription(f"idle-{i}", f"fleet/idle-{i}/req" if i % 2 else f"fleet/idle-{i}/+/req", 1)
    for topic_filter, subscriptions in broker._subscriptions.items():
        broker._subscriptions[topic_filter] = CountingList(subscriptions)

    def no_scan(self: Broker, topic: str, a_filter: str) -> bool:
        raise AssertionError("the broadcast scanned the subscription table")

    monkeypatch.setattr(Broker, "_matches", no_scan)
    async with broker_client(broker, "target") as sub, broker_client(broker, "pub-5") as pub:
        assert await sub.asubscribe("fleet/target/req") == [1]
        for n in range(20):
            await pub.apublish("fleet/target/req", _payload(n))
        assert len(await drain(sub, 0.3)) == 20
    assert touched == 0


# ---- the handler --------------------------------------------------------------------------


async def test_qos1_stream_keeps_order_and_clears_inflight(broker: FleetBroker) -> None:
    async with broker_client(broker, "order-sub") as sub, broker_client(broker, "order-pub") as pub:
        assert await sub.asubscribe("ord/x") == [1]
        infos = [pub.publish_raw("ord/x", _payload(n), qos=1) for n in range(300)]
        await asyncio.to_thread(lambda: [i.wait_for_publish(10) for i in infos])
        got = await drain(sub, 0.5)
        assert [json.loads(r.payload)["n"] for r in got] == list(range(300))
        session, fast = broker._sessions["order-sub"]
        assert isinstance(fast, handler.FastProtocolHandler) and fast._fast
        await wait_for(lambda: not session.inflight_out and not fast._unacked, what="PUBACKs")


async def test_qos0_and_qos2_are_forwarded(broker: FleetBroker) -> None:
    async with broker_client(broker, "q-sub") as sub, broker_client(broker, "q-pub") as pub:
        assert await sub.asubscribe("q/+", qos=2) == [2]
        await pub.apublish("q/zero", _payload(0), qos=0)
        await pub.apublish("q/two", _payload(2), qos=2)
        got = sorted((r.topic, r.qos) for r in await drain(sub, 0.3))
    # Delivered at the subscription's QoS, as amqtt does.
    assert got == [("q/two", 2), ("q/zero", 2)]


async def test_unacked_routed_qos1_publish_is_kept_past_the_timeout_until_its_puback(
    broker: FleetBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MQTT resends only on reconnect [MQTT-4.4.0-1]: a routed message is not given up after the PUBACK timeout."""
    monkeypatch.setattr(handler, "PUBACK_TIMEOUT", 0.3)
    async with broker_client(broker, "silent", auto_ack=False) as sub, broker_client(broker, "pub-6") as pub:
        assert await sub.asubscribe("s/x") == [1]
        session, fast = broker._sessions["silent"]
        assert isinstance(fast, handler.FastProtocolHandler)
        await pub.apublish("s/x", _payload(1))
        got = await sub.wait_message()
        await asyncio.sleep(0.6)  # twice the (patched) PUBACK timeout: nothing to await, that is the point
        assert [type(m) for m in session.inflight_out.values()] == [handler.KeptMessage]
        assert not fast._unacked
        sub.client.ack(got.mid, 1)
        await wait_for(lambda: not session.inflight_out, timeout=3, what="the late PUBACK")


async def test_deliver_still_reports_the_puback(broker: FleetBroker) -> None:
    async with broker_client(broker, "dev-1") as dev:
        assert await dev.asubscribe("d/+/req") == [1]
        assert await broker.deliver("dev-1", "d/1/req", _payload(1)) is Delivery.ACKED
        assert await broker.deliver("dev-1", "d/1/other", _payload(2)) is Delivery.NOT_SUBSCRIBED
        assert await broker.deliver("dev-1", "d/2/req", _payload(3), qos=0) is Delivery.SENT
        got = await drain(dev, 0.3)
    assert [r.topic for r in got] == ["d/1/req", "d/2/req"]


async def test_deliver_nowait_writes_at_once_and_reports_the_puback_on_a_future(broker: FleetBroker) -> None:
    async with broker_client(broker, "dev-2") as dev:
        assert await dev.asubscribe("n/+/req") == [1]
        waiter = broker.deliver_nowait("dev-2", "n/1/req", _payload(1))
        assert isinstance(waiter, asyncio.Future)
        await asyncio.wait_for(waiter, 5)  # the device's PUBACK
        assert broker.deliver_nowait("dev-2", "n/1/other", _payload(2)) is Delivery.NOT_SUBSCRIBED
        assert broker.deliver_nowait("dev-2", "n/2/req", _payload(3), qos=0) is Delivery.SENT
        assert broker.deliver_nowait("nobody", "n/2/req", _payload(4)) is Delivery.NOT_CONNECTED
        got = await drain(dev, 0.3)
    assert [r.topic for r in got] == ["n/1/req", "n/2/req"]


async def test_deliver_nowait_fails_without_a_puback(broker: FleetBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler, "PUBACK_TIMEOUT", 0.3)
    async with broker_client(broker, "mute-2", auto_ack=False) as dev:
        assert await dev.asubscribe("m/+") == [1]
        waiter = broker.deliver_nowait("mute-2", "m/1", _payload(1))
        assert isinstance(waiter, asyncio.Future)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(waiter, 5)


async def test_deliver_fails_without_a_puback(broker: FleetBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler, "PUBACK_TIMEOUT", 0.3)
    async with broker_client(broker, "mute", auto_ack=False) as dev:
        assert await dev.asubscribe("m/+") == [1]
        assert await broker.deliver("mute", "m/1", _payload(1)) is Delivery.FAILED
        assert not broker._sessions["mute"][0].inflight_out


async def test_deliver_fails_when_the_connection_drops(broker: FleetBroker) -> None:
    dev = broker_client(broker, "dropper", auto_ack=False)
    await dev.__aenter__()
    assert await dev.asubscribe("x/+") == [1]
    pending = asyncio.ensure_future(broker.deliver("dropper", "x/1", _payload(1)))
    await dev.wait_message()
    await dev.aabort()
    assert await asyncio.wait_for(pending, 3) is Delivery.FAILED


def _sink(broker: FleetBroker) -> _NullSink:
    sink = broker._sink
    assert isinstance(sink, _NullSink)
    return sink


async def _settled(what: str, check: Any, quiet: float = 0.3) -> None:
    """``check()`` is still true after ``quiet`` seconds (a PUBACK that must not come)."""
    await asyncio.sleep(quiet)
    assert check(), what


async def test_control_plane_messages_are_handled_in_the_reader_and_order_is_kept(broker: FleetBroker) -> None:
    sink = _sink(broker)
    async with broker_client(broker, "mixed-sub") as sub, broker_client(broker, "thing-7") as dev:
        assert await sub.asubscribe("plain/#") == [1]
        fast = broker._sessions["thing-7"][1]
        assert isinstance(fast, handler.FastProtocolHandler)
        # A response is claimed by the EMQX rule and handed to the control plane from the reader.
        dev.respond("e1", "SUCCEEDED")
        infos = [dev.publish_raw(f"plain/{n}", _payload(n)) for n in range(20)]
        await asyncio.to_thread(lambda: [i.wait_for_publish(5) for i in infos])
        assert [json.loads(r.payload)["n"] for r in await drain(sub, 0.3)] == list(range(20))
        assert [i.topic for i in sink.inbound] == [dev.response_topic("e1")]
        assert not sink.via_loop and not fast._deferred and not fast._acks


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
async def test_a_report_is_pubacked_only_once_it_is_stored_and_pubacks_keep_their_order(
    broker: FleetBroker, transport: str
) -> None:
    sink = _sink(broker)
    sink.hold = True
    async with broker_client(broker, "order-sub2") as sub, broker_client(broker, "thing-8", transport) as dev:
        assert await sub.asubscribe("plain/#") == [1]
        report = dev.respond("e1", "SUCCEEDED")
        await wait_for(lambda: len(sink.applied) == 1, what="the report reaches the control plane")
        later = dev.publish_raw("plain/1", _payload(1))
        # The later message is routed at once, but its PUBACK may not overtake the report's [MQTT-4.6.0-2].
        assert json.loads((await sub.wait_message()).payload) == {"n": 1}
        await _settled("no PUBACK before the report is stored", lambda: not report.is_published() and not later.is_published())
        sink.applied[0].set_result(None)
        await asyncio.to_thread(later.wait_for_publish, 5)
        assert report.is_published() and later.is_published()
        assert not broker._sessions["thing-8"][1]._acks


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
async def test_a_report_the_store_could_not_write_is_not_pubacked(broker: FleetBroker, transport: str) -> None:
    from server.core.errors import Unavailable

    sink = _sink(broker)
    sink.hold = True
    async with broker_client(broker, "thing-9", transport) as dev:
        report = dev.respond("e1", "SUCCEEDED")
        await wait_for(lambda: len(sink.applied) == 1, what="the report reaches the control plane")
        sink.applied[0].set_exception(Unavailable("store write failed: disk full"))
        # The connection is closed without the PUBACK: the device sends the report again after it reconnects.
        await asyncio.to_thread(dev.disconnected.wait, 5)
        assert dev.disconnected.is_set()
        assert not report.is_published()


async def test_with_a_full_control_plane_queue_the_report_waits_in_the_message_loop(broker: FleetBroker) -> None:
    sink = _sink(broker)
    sink.full = sink.hold = True
    async with broker_client(broker, "thing-10") as dev:
        report = dev.respond("e1", "SUCCEEDED")
        await wait_for(lambda: len(sink.via_loop) == 1, what="the message loop hands the report over")
        await _settled("no PUBACK before the report is stored", lambda: not report.is_published())
        sink.applied[0].set_result(None)
        await asyncio.to_thread(report.wait_for_publish, 5)
        assert report.is_published()
        assert broker.stats["ingest_full"] == 1


async def test_many_pairs_round_trip(broker: FleetBroker) -> None:
    """Request/response between 20 pairs at once, as the raw bench does (nothing lost or crossed)."""
    pairs = 20
    port = broker.listener_ports()["mqtt"]

    def echo(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        client.publish(msg.topic[: -len("req")] + "resp", msg.payload, qos=1)

    responders: list[mqtt.Client] = []
    for i in range(pairs):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"echo-{i}")
        c.on_message = echo
        c.connect_async("127.0.0.1", port)
        c.loop_start()
        responders.append(c)
    requesters = [broker_client(broker, f"req-{i}") for i in range(pairs)]
    try:
        for i, c in enumerate(responders):
            await wait_for(c.is_connected, what="responder")
            c.subscribe(f"rt/{i}/req", qos=1)
        await wait_for(lambda: all(f"rt/{i}/req" in broker._router for i in range(pairs)), what="responders subscribed")
        for i, r in enumerate(requesters):
            await r.__aenter__()
            assert await r.asubscribe(f"rt/{i}/resp") == [1]
        for n, (i, r) in itertools.product(range(5), enumerate(requesters)):
            r.publish_raw(f"rt/{i}/req", _payload(n))
        for i, r in enumerate(requesters):
            got = [json.loads(m.payload)["n"] for m in await drain(r, 0.5)]
            assert got == list(range(5)), i
    finally:
        for r in requesters:
            await r.__aexit__(None, None, None)
        for c in responders:
            c.disconnect()
            c.loop_stop()
