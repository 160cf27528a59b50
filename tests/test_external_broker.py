"""External broker mode on Debian's mosquitto: the real service as an MQTT 5 client, real paho devices.

Each test starts mosquitto on a free loopback port (tests/mosquitto.py) and the real service
(in-process ``FleetcmdApp``, or the ``fleetcmd serve`` process for the crash test) with
``broker_url`` pointing at it. Devices are paho clients connected to mosquitto, not to fleetcmd.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker_hooks.rules import RuleSet
from server.app import FleetcmdApp
from server.config import MAX_SESSION_EXPIRY, MIN_BROKER_AUTH_SECRET, Settings, SettingsError
from server.core.lifecycle import Status
from server.core.models import Execution
from server.core.validation import SendCommand
from server.dialects import DIALECTS
from server.external_broker import events
from server.external_broker.link import MAX_INFLIGHT, MAX_RECEIVE_MAXIMUM, ExternalBroker, remaining_seconds, subscriptions
from server.external_broker.url import BrokerUrlError, parse_broker_url
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.certs import self_signed
from tests.conftest import make_settings
from tests.devices import wait_for
from tests.mosquitto import HOST, Mosquitto, free_port, mosquitto
from tests.proc import Service

WAIT = 10.0
QUIET = 0.5  # how long "nothing arrives" is watched for
RESPONSE = "$emqx/commands/things/{thing}/executions/{execution}/response"


# ---- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Got:
    """One message a device received, with the MQTT 5 properties that matter here."""

    topic: str
    payload: bytes
    qos: int
    expiry: int | None
    user: dict[str, str]


class Device:
    """A paho MQTT 5 client connected to mosquitto; records what it receives."""

    def __init__(self, port: int, client_id: str, *, clean_start: bool = True, auto_ack: bool = True) -> None:
        self.client_id = client_id
        self.received: queue.Queue[Got] = queue.Queue()
        self.connack = threading.Event()
        self._subacks: queue.Queue[int] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=not auto_ack)
        self.client.on_connect = lambda *_a: self.connack.set()
        self.client.on_subscribe = lambda _c, _u, mid, *_a: self._subacks.put(mid)
        self.client.on_message = self._on_message
        self.port = port
        self.clean_start = clean_start

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        user = dict(getattr(props, "UserProperty", []) or []) if props is not None else {}
        self.received.put(Got(msg.topic, bytes(msg.payload), msg.qos, expiry, user))

    def start(self, *filters: str) -> Device:
        properties = None
        if not self.clean_start:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        self.client.connect(HOST, self.port, keepalive=30, clean_start=self.clean_start, properties=properties)
        self.client.loop_start()
        assert self.connack.wait(WAIT), "no CONNACK"
        for topic_filter in filters:
            _rc, mid = self.client.subscribe(topic_filter, qos=1)
            assert self._subacks.get(timeout=WAIT) == mid
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        """Publish and wait until mosquitto took it."""
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    async def next(self, timeout: float = WAIT) -> Got:
        return await asyncio.to_thread(self.received.get, True, timeout)

    async def nothing(self, within: float = QUIET) -> None:
        with pytest.raises(queue.Empty):
            await asyncio.to_thread(self.received.get, True, within)


class EmqxFirmware(Device):
    """EMQX Fleets firmware: subscribes to its requests and answers each with ``status``."""

    def __init__(self, port: int, thing_id: str, status: str = "SUCCEEDED", **kw: Any) -> None:
        super().__init__(port, thing_id, **kw)
        self.status = status
        self.answer = True
        self.requests: queue.Queue[Got] = queue.Queue()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        super()._on_message(client, userdata, msg)
        if self.answer:
            body = json.dumps({"status": self.status, "result": {"echo": json.loads(msg.payload)["params"]}})
            client.publish(msg.topic.rsplit("/", 1)[0] + "/response", body, qos=1)

    def begin(self) -> EmqxFirmware:
        self.start(f"$emqx/commands/things/{self.client_id}/executions/+/request")
        return self


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with mosquitto(tmp_path / "mosquitto") as running:
        yield running


def external_settings(tmp_path: Path, broker: Mosquitto, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "broker_url": broker.url,
        "broker_client_id": "fleetcmd-" + uuid.uuid4().hex[:8],
        **overrides,
    }
    return make_settings(tmp_path / "data", **values)


@pytest.fixture
async def app(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[FleetcmdApp]:
    async with FleetcmdApp(external_settings(tmp_path, broker)) as running:
        assert running.external is not None and running.external.connected
        yield running


async def send(
    app: FleetcmdApp, thing: str, action: str = "reboot", params: dict[str, Any] | None = None, ttl: int = 30
) -> Execution:
    assert app.core is not None
    return await app.core.send(SendCommand(thing, action, params, ttl, ""))


async def final(app: FleetcmdApp, execution: Execution) -> Execution:
    assert app.core is not None
    done = await app.core.wait(execution, WAIT)
    assert done.status.final, done.status
    return await app.core.get(done.execution_id)


# ---- the path of a command ------------------------------------------------------------------------


async def test_a_command_reaches_the_device_with_its_ttl_as_message_expiry_and_ends_succeeded(
    app: FleetcmdApp, broker: Mosquitto
) -> None:
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "thermo-1").begin)
    try:
        execution = await send(app, "thermo-1", "setTemperature", {"value": 24}, ttl=20)
        assert execution.status is Status.SENT  # the broker takes requests while the link is up
        got = await device.next()
        assert got.topic == f"$emqx/commands/things/thermo-1/executions/{execution.execution_id}/request"
        assert got.qos == 1
        # MQTT 5 Message Expiry Interval: the TTL left (the broker counts down what it held).
        assert got.expiry is not None and 18 <= got.expiry <= 20
        assert got.user == {events.EXECUTION_PROPERTY: execution.execution_id}
        done = await final(app, execution)
        assert done.status is Status.SUCCEEDED
        assert json.loads(done.result_json or "") == {"echo": {"value": 24}}
        # Without EMQX's event topics there is no DELIVERED: SENT -> final.
        assert [e.status for e in done.history] == [Status.SENT, Status.SUCCEEDED]
    finally:
        await asyncio.to_thread(device.stop)


async def test_a_kaa_endpoint_gets_its_commands_and_reports_through_the_broker(app: FleetcmdApp, broker: Mosquitto) -> None:
    assert app.registry is not None
    _record, _password, token = await app.registry.create_thing("kaa-1", "", {}, kaa_app_version="av1")
    base = f"kp1/av1/cex/{token}"
    device = await asyncio.to_thread(
        Device(broker.port, "K" + uuid.uuid4().hex[:8]).start, f"{base}/command/reboot/#", f"{base}/result/#"
    )
    try:
        execution = await send(app, "kaa-1", "reboot", {"delay": 1})
        assert execution.status is Status.QUEUED  # a Kaa endpoint is reached once it has shown itself
        # The firmware asks for its outstanding commands (request id 1) and gets them on .../1/status.
        await asyncio.to_thread(device.publish, f"{base}/command/reboot/1", json.dumps({"observe": True}))
        got = await device.next()
        while got.topic != f"{base}/command/reboot/1/status":
            got = await device.next()
        commands = json.loads(got.payload)
        assert [c["payload"] for c in commands] == [{"delay": 1}]
        result = [{"id": commands[0]["id"], "statusCode": 200, "reasonPhrase": "done", "payload": {"ok": True}}]
        await asyncio.to_thread(device.publish, f"{base}/result/reboot/2", json.dumps(result))
        done = await final(app, execution)
        assert done.status is Status.SUCCEEDED
        ack = await device.next()
        while ack.topic != f"{base}/result/reboot/2/status":
            ack = await device.next()
        assert json.loads(ack.payload) == {}
        # Now that it has shown itself (observe: true), a new command is pushed at once, with its TTL as expiry.
        pushed = await send(app, "kaa-1", "reboot", {"delay": 2}, ttl=40)
        assert pushed.status is Status.SENT
        push = await device.next()
        while push.topic != f"{base}/command/reboot/status":
            push = await device.next()
        assert [c["payload"] for c in json.loads(push.payload)] == [{"delay": 2}]
        assert push.expiry is not None and 38 <= push.expiry <= 40
        assert push.user == {events.EXECUTION_PROPERTY: pushed.execution_id}
    finally:
        await asyncio.to_thread(device.stop)


# ---- acknowledgements after commit; duplicates ----------------------------------------------------------


async def test_a_report_is_acknowledged_to_the_broker_only_after_its_commit(app: FleetcmdApp, broker: Mosquitto) -> None:
    link, core = app.external, app.core
    assert link is not None and core is not None
    # A spy on the real client where it writes a PUBACK (paho's one path for automatic and manual
    # acks): is the report's execution already final (retired from the TTL scheduler by the commit)?
    seen: list[bool] = []
    real_puback = link._client._send_puback
    pending: dict[str, Execution] = {}

    def puback(mid: int) -> Any:
        seen.append(all(e.execution_id not in core.scheduler for e in pending.values()))
        return real_puback(mid)

    link._client._send_puback = puback  # type: ignore[method-assign]
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "acker").begin)
    try:
        for i in range(5):
            execution = await send(app, "acker", params={"i": i})
            pending[execution.execution_id] = execution
            assert (await final(app, execution)).status is Status.SUCCEEDED
        await wait_for(lambda: len(seen) == 5, WAIT, "five acks")
        assert seen == [True] * 5
    finally:
        await asyncio.to_thread(device.stop)


async def test_a_report_received_by_two_ingest_clients_is_applied_once(app: FleetcmdApp, broker: Mosquitto) -> None:
    # Two replicas on plain subscriptions (what auto does for $ topics on mosquitto) both receive
    # every report; here two links feed one store, as two replicas feed one database.
    core = app.core
    assert core is not None
    second = ExternalBroker(
        parse_broker_url(broker.url),
        client_id="fleetcmd-second",
        rules=RuleSet.of([d.wire for d in DIALECTS]),
        sink=core,
        delivered=core.mark_delivered_nowait,
        spawn=lambda coro, name: asyncio.ensure_future(coro) and None,
    )
    assert await second.start(WAIT)
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "twice").begin)
    try:
        execution = await send(app, "twice")
        done = await final(app, execution)
        assert done.status is Status.SUCCEEDED
        assert app.external is not None
        await wait_for(
            lambda: second.stats["acked"] == 1 and app.external is not None and app.external.stats["acked"] == 1,
            WAIT,
            "both acks",
        )
        assert core.stats["reports.change"] == 1 and core.stats["reports.duplicate"] == 1
        # One final status, one event for it.
        assert [e.status for e in (await app.core.get(execution.execution_id)).history] == [Status.SENT, Status.SUCCEEDED]  # type: ignore[union-attr]
    finally:
        await asyncio.to_thread(device.stop)
        await second.stop()


# ---- shared subscriptions -----------------------------------------------------------------------


def test_auto_shares_the_filters_without_dollar_only() -> None:
    subs = subscriptions(["$emqx/commands/things/+/executions/+/response", "kp1/+/cex/+/result/+"], "auto", "g")
    assert [(s.topic, s.shared) for s in subs] == [
        ("$emqx/commands/things/+/executions/+/response", False),
        ("$share/g/kp1/+/cex/+/result/+", True),
    ]
    assert all(s.shared for s in subscriptions(["$a/b", "c"], "on", "g"))
    assert not any(s.shared for s in subscriptions(["$a/b", "c"], "off", "g"))


async def test_mosquitto_delivers_no_dollar_topic_to_a_shared_subscription(broker: Mosquitto) -> None:
    """Why ``auto`` subscribes plainly to ``$`` filters: Debian's mosquitto 2.0.11 shares none of them."""
    topic = "$emqx/commands/things/t/executions/e/response"
    shared = Device(broker.port, "shared")
    plain = Device(broker.port, "plain")
    shared_plain_topic = Device(broker.port, "shared-kp1")
    publisher = Device(broker.port, "pub")
    await asyncio.to_thread(shared.start, "$share/g/$emqx/commands/things/+/executions/+/response", "$share/g/$emqx/#")
    await asyncio.to_thread(plain.start, "$emqx/commands/things/+/executions/+/response")
    await asyncio.to_thread(shared_plain_topic.start, "$share/g2/kp1/+/cex/+/result/+")
    await asyncio.to_thread(publisher.start)
    try:
        await asyncio.to_thread(publisher.publish, topic, b"{}")
        await asyncio.to_thread(publisher.publish, "kp1/av/cex/tok/result/x", b"[]")
        assert (await plain.next()).topic == topic
        assert (await shared_plain_topic.next()).topic == "kp1/av/cex/tok/result/x"
        await shared.nothing()
    finally:
        for d in (shared, plain, shared_plain_topic, publisher):
            await asyncio.to_thread(d.stop)


async def test_a_shared_report_topic_goes_to_one_replica_only(tmp_path: Path, broker: Mosquitto) -> None:
    # broker_shared=on: every filter is $share'd; mosquitto shares the Kaa (non-$) topics, so a report
    # published there reaches exactly one of two links of the same group.
    async with FleetcmdApp(external_settings(tmp_path, broker, broker_shared="on")) as running:
        core = running.core
        assert core is not None and running.external is not None
        second = ExternalBroker(
            parse_broker_url(broker.url),
            client_id="fleetcmd-second",
            rules=RuleSet.of([d.wire for d in DIALECTS]),
            sink=core,
            delivered=core.mark_delivered_nowait,
            spawn=lambda coro, name: asyncio.ensure_future(coro) and None,
            shared="on",
        )
        assert await second.start(WAIT)
        publisher = await asyncio.to_thread(Device(broker.port, "pub").start)
        try:
            for i in range(4):
                await asyncio.to_thread(publisher.publish, f"kp1/av1/cex/unknown{i}/result/reboot", b"[]")
            first = running.external
            await wait_for(lambda: first.stats["routed"] + second.stats["routed"] == 4, WAIT, "four reports")
            await asyncio.sleep(QUIET)  # and no fifth copy
            assert first.stats["routed"] + second.stats["routed"] == 4
        finally:
            await asyncio.to_thread(publisher.stop)
            await second.stop()


# ---- EMQX's event topics --------------------------------------------------------------------------


async def test_emqx_presence_and_puback_events_record_presence_and_delivered(app: FleetcmdApp, broker: Mosquitto) -> None:
    assert app.registry is not None and app.core is not None
    await app.registry.create_thing("evented", "", {})
    # mosquitto has no event topics: a client publishes what EMQX's rule would republish.
    emqx = await asyncio.to_thread(Device(broker.port, "emqx-rule").start)
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "evented").begin)
    device.answer = False
    try:
        await asyncio.to_thread(emqx.publish, events.CONNECTED, json.dumps({"clientid": "evented", "peername": "10.0.0.7:5000"}))
        await wait_for(lambda: app.registry.presence("evented").online, WAIT, "online")  # type: ignore[union-attr]
        execution = await send(app, "evented")
        got = await device.next()
        acked = {"clientid": "evented", "topic": got.topic, "pub_props": {"User-Property": got.user}}
        await asyncio.to_thread(emqx.publish, events.ACKED, json.dumps(acked))
        await wait_for(lambda: app.core.stats.get("x", 0) == 0, 0.1)  # type: ignore[union-attr]

        async def delivered() -> bool:
            current = await app.core.get(execution.execution_id)  # type: ignore[union-attr]
            return current.status is Status.DELIVERED

        deadline = time.monotonic() + WAIT
        while not await delivered():
            assert time.monotonic() < deadline, "never DELIVERED"
            await asyncio.sleep(0.02)
        await asyncio.to_thread(emqx.publish, events.DISCONNECTED, json.dumps({"clientid": "evented", "reason": "normal"}))
        await wait_for(lambda: not app.registry.presence("evented").online, WAIT, "offline")  # type: ignore[union-attr]
        # Garbage on an event topic is dropped and counted, never applied.
        await asyncio.to_thread(emqx.publish, events.CONNECTED, b'{"clientid": "a/b"}')
        await asyncio.to_thread(emqx.publish, events.CONNECTED, b"[1]")
        assert app.external is not None
        stats = app.external.stats
        await wait_for(lambda: stats["dropped.invalid_event"] == 1 and stats["dropped.not_an_object"] == 1, WAIT, "drops")
    finally:
        await asyncio.to_thread(device.stop)
        await asyncio.to_thread(emqx.stop)


# ---- crashes, outages ---------------------------------------------------------------------------


async def test_a_report_redelivered_after_the_service_is_killed_before_its_commit_lands_once(
    tmp_path: Path, broker: Mosquitto
) -> None:
    env = {"FLEETCMD_BROKER_URL": broker.url, "FLEETCMD_BROKER_CLIENT_ID": "fleetcmd-crash"}
    data = tmp_path / "svc"
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "crashy").begin)
    device.answer = False
    first = Service(data, flags=("--grpc-port", "0"), env=env)
    try:
        await asyncio.to_thread(first.start)
        async with first.channel() as channel:
            execution = await pb_grpc.CommandServiceStub(channel).Send(
                pb.SendRequest(thing_id="crashy", action="reboot", ttl_seconds=120), timeout=WAIT
            )
        got = await device.next()
        # Frozen: it can neither commit nor acknowledge what arrives now.
        first.send_signal(signal.SIGSTOP)
        body = json.dumps({"status": "SUCCEEDED", "result": {"once": True}})
        await asyncio.to_thread(device.publish, got.topic.rsplit("/", 1)[0] + "/response", body)
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, WAIT)
    finally:
        first.close()
    # The same client id: mosquitto kept the session and delivers the unacknowledged report again.
    with Service(data, flags=("--grpc-port", "0"), env=env) as second:
        async with second.channel() as channel:
            stub = pb_grpc.CommandServiceStub(channel)
            deadline = time.monotonic() + WAIT
            while True:
                current = await stub.Get(pb.GetRequest(execution_id=execution.execution_id), timeout=WAIT)
                if current.status == pb.SUCCEEDED or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert current.status == pb.SUCCEEDED
            assert [h.status for h in current.history] == [pb.SENT, pb.SUCCEEDED]
    await asyncio.to_thread(device.stop)


async def test_requests_wait_in_the_outbox_while_the_broker_is_away_and_go_out_after_it_returns(tmp_path: Path) -> None:
    with mosquitto(tmp_path / "m1") as first_run:
        port = first_run.port
        running = FleetcmdApp(external_settings(tmp_path, first_run))
        await running.__aenter__()
    try:
        link = running.external
        assert link is not None
        await wait_for(lambda: not link.connected, WAIT, "the link to notice")
        assert "broker" in await running.readiness()
        execution = await send(running, "patient", ttl=60)
        assert execution.status is Status.QUEUED
        with mosquitto(tmp_path / "m2", port=port) as second_run:
            device = await asyncio.to_thread(EmqxFirmware(second_run.port, "patient").begin)
            try:
                done = await final(running, execution)
                assert done.status is Status.SUCCEEDED
                assert [e.status for e in done.history] == [Status.QUEUED, Status.SENT, Status.SUCCEEDED]
                assert "broker" not in await running.readiness()
            finally:
                await asyncio.to_thread(device.stop)
    finally:
        await running.__aexit__(None, None, None)


# ---- bounds ------------------------------------------------------------------------------------


async def test_a_report_larger_than_max_response_bytes_is_dropped_and_counted(tmp_path: Path, broker: Mosquitto) -> None:
    limit = 1024
    async with FleetcmdApp(external_settings(tmp_path, broker, max_response_bytes=limit)) as running:
        link = running.external
        assert link is not None
        publisher = await asyncio.to_thread(Device(broker.port, "big").start)
        try:
            topic = RESPONSE.format(thing="big", execution="0" * 32)
            head = b'{"status":"SUCCEEDED","result":"'
            at_limit = head + b"x" * (limit - len(head) - 2) + b'"}'
            assert len(at_limit) == limit
            await asyncio.to_thread(publisher.publish, topic, at_limit)
            await wait_for(lambda: link.stats["routed"] == 1, WAIT, "the report at the limit")
            await asyncio.to_thread(publisher.publish, topic, at_limit[:-2] + b'x"}')
            await wait_for(lambda: link.stats["dropped.oversized"] == 1, WAIT, "the report above it")
            assert link.stats["routed"] == 1
        finally:
            await asyncio.to_thread(publisher.stop)


def test_message_expiry_is_the_ttl_left_rounded_up_and_never_zero() -> None:
    assert remaining_seconds(20_000, 0) == 20
    assert remaining_seconds(20_001, 0) == 21
    assert remaining_seconds(1, 0) == 1
    assert remaining_seconds(0, 0) == 1  # 0 would mean "never expires"
    assert remaining_seconds(-5_000, 0) == 1


def test_broker_url_parsing() -> None:
    target = parse_broker_url("mqtts://svc:p%40ss@broker.example")
    assert (target.host, target.port, target.tls, target.username, target.password) == (
        "broker.example",
        8883,
        True,
        "svc",
        "p@ss",
    )
    assert str(target) == "mqtts://broker.example:8883"  # never the credentials
    assert parse_broker_url("mqtt://127.0.0.1:1884").port == 1884
    assert parse_broker_url("mqtt://h").port == 1883
    for bad in ("http://h", "mqtt://", "mqtt://h:0", "mqtt://h:70000", "mqtt://h/x", "mqtt://h?x=1", "h:1883"):
        with pytest.raises(BrokerUrlError):
            parse_broker_url(bad)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"broker_url": "amqp://h"}, "mqtt:// or mqtts://"),
        ({"broker_shared": "sometimes"}, "broker_shared"),
        ({"broker_share_group": "a/b"}, "broker_share_group"),
        ({"broker_share_group": ""}, "broker_share_group"),
        ({"broker_session_expiry": MAX_SESSION_EXPIRY + 1}, "broker_session_expiry"),
        ({"broker_session_expiry": -1}, "broker_session_expiry"),
        ({"broker_auth_secret": "x" * (MIN_BROKER_AUTH_SECRET - 1)}, "broker_auth_secret"),
    ],
)
def test_broker_settings_out_of_range_are_refused(tmp_path: Path, changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        make_settings(tmp_path, **changes)


def test_broker_settings_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    s = Settings(
        data_dir=tmp_path,
        broker_url="mqtt://h",
        mqtt_port=-1,
        broker_session_expiry=MAX_SESSION_EXPIRY,
        broker_auth_secret="x" * MIN_BROKER_AUTH_SECRET,
    )
    assert s.broker_session_expiry == MAX_SESSION_EXPIRY
    # Secrets stay out of the settings' repr (logged by tools and tracebacks).
    secret = make_settings(tmp_path, broker_url="mqtt://u:hunter2@h", broker_password="pw-xyz", broker_auth_secret="s" * 16)
    assert "hunter2" not in repr(secret) and "pw-xyz" not in repr(secret) and "s" * 16 not in repr(secret)
    # Without the embedded listeners the service still starts in external mode, not without it.
    with pytest.raises(SettingsError, match="at least one of mqtt_port"):
        Settings(data_dir=tmp_path, mqtt_port=-1)


# ---- two services, credentials ---------------------------------------------------------------------


async def test_two_fleetcmd_processes_on_one_mosquitto_each_finish_their_own_commands(tmp_path: Path, broker: Mosquitto) -> None:
    # Each its own SQLite file (replicas sharing one database need the PostgreSQL store) and its own
    # share group; on the plain $emqx subscriptions each also receives the other's reports and drops them.
    services = [
        Service(
            tmp_path / f"svc{i}",
            flags=("--grpc-port", "0"),
            env={
                "FLEETCMD_BROKER_URL": broker.url,
                "FLEETCMD_BROKER_CLIENT_ID": f"fleetcmd-{i}",
                "FLEETCMD_BROKER_SHARE_GROUP": f"service{i}",
            },
        )
        for i in range(2)
    ]
    devices = [EmqxFirmware(broker.port, f"dev-{i}") for i in range(2)]
    try:
        for service in services:
            await asyncio.to_thread(service.start)
        for device in devices:
            await asyncio.to_thread(device.begin)
        for i, service in enumerate(services):
            async with service.channel() as channel:
                stub = pb_grpc.CommandServiceStub(channel)
                reply = await stub.Send(
                    pb.SendRequest(thing_id=f"dev-{i}", action="reboot", ttl_seconds=30, wait_seconds=int(WAIT)), timeout=WAIT + 5
                )
                assert reply.status == pb.SUCCEEDED, reply
                assert [h.status for h in (await stub.Get(pb.GetRequest(execution_id=reply.execution_id))).history] == [
                    pb.SENT,
                    pb.SUCCEEDED,
                ]
    finally:
        for device in devices:
            await asyncio.to_thread(device.stop)
        for service in services:
            service.close()


async def test_the_service_logs_in_with_its_account_and_stays_unready_with_a_wrong_one(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    passwords.write_text("")
    await asyncio.to_thread(
        subprocess.run, ["mosquitto_passwd", "-b", str(passwords), "svc", "right-password"], check=True, capture_output=True
    )
    # mosquitto reads the last allow_anonymous: the fixture's "true" is overridden.
    extra = ["allow_anonymous false", f"password_file {passwords}"]
    with mosquitto(tmp_path / "auth", extra=extra) as guarded:
        good = external_settings(tmp_path / "good", guarded, broker_username="svc", broker_password="right-password")
        async with FleetcmdApp(good) as running:
            assert running.external is not None and running.external.connected
            assert "broker" not in await running.readiness()
        url = guarded.url.replace("mqtt://", "mqtt://svc:wrong@")
        bad = external_settings(tmp_path / "bad", guarded, broker_url=url, mqtt_connect_timeout=1.0)
        async with FleetcmdApp(bad) as running:
            assert running.external is not None and not running.external.connected
            assert "not connected" in (await running.readiness())["broker"]


async def test_a_burst_larger_than_the_requests_in_flight_all_go_out(app: FleetcmdApp, broker: Mosquitto) -> None:
    # Beyond MAX_INFLIGHT unacknowledged publishes paho queues the rest: none is lost or left pending.
    # (Whether a broker enforces its Receive Maximum is not shown here: mosquitto 2.0.11 took 60 at once.)
    link = app.external
    assert link is not None
    # And it tells the broker to hold back reports beyond what the ingest queue takes.
    assert link._connect_properties.ReceiveMaximum == app.settings.ingest_queue
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "bursty").begin)
    try:
        executions = await asyncio.gather(*(send(app, "bursty", params={"i": i}) for i in range(3 * MAX_INFLIGHT)))
        done = await asyncio.gather(*(final(app, e) for e in executions))
        assert {e.status for e in done} == {Status.SUCCEEDED}
        assert link.stats["connects"] == 1
    finally:
        await asyncio.to_thread(device.stop)


def test_the_receive_maximum_announced_is_the_ingest_queue_up_to_mqtts_limit() -> None:
    def announced(receive_maximum: int) -> int:
        link = ExternalBroker(
            parse_broker_url("mqtt://127.0.0.1:1"),
            client_id="x",
            rules=RuleSet([]),
            sink=None,  # type: ignore[arg-type]  # never started: only its CONNECT properties are read
            delivered=None,  # type: ignore[arg-type]
            spawn=None,  # type: ignore[arg-type]
            receive_maximum=receive_maximum,
        )
        value: int = link._connect_properties.ReceiveMaximum
        return value

    assert announced(7) == 7
    assert announced(MAX_RECEIVE_MAXIMUM) == MAX_RECEIVE_MAXIMUM
    assert announced(MAX_RECEIVE_MAXIMUM + 1) == MAX_RECEIVE_MAXIMUM


async def test_mqtts_verifies_the_broker_with_the_ca_file(tmp_path: Path) -> None:
    tls = self_signed(tmp_path / "tls")
    tls_port = free_port()
    extra = [f"listener {tls_port} {HOST}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
    with mosquitto(tmp_path / "m", extra=extra) as running:
        url = f"mqtts://{HOST}:{tls_port}"
        trusted = external_settings(tmp_path / "trusted", running, broker_url=url, broker_ca_file=str(tls.ca))
        async with FleetcmdApp(trusted) as app:
            assert app.external is not None and app.external.connected
            device = await asyncio.to_thread(EmqxFirmware(running.port, "tls-dev").begin)
            try:
                assert (await final(app, await send(app, "tls-dev"))).status is Status.SUCCEEDED
            finally:
                await asyncio.to_thread(device.stop)
        # The system's CAs do not know this certificate: no connection, not ready.
        untrusted = external_settings(tmp_path / "untrusted", running, broker_url=url, mqtt_connect_timeout=1.0)
        async with FleetcmdApp(untrusted) as app:
            assert app.external is not None and not app.external.connected
            assert "broker" in await app.readiness()
