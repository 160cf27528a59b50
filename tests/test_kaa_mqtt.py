"""Kaa CEX over MQTT (KP1): observe, request ids, pushes, results, errors, the endpoint-token ACL.

Real paho clients and a real service on 127.0.0.1 (port 0) in secure mode. Kaa devices connect
as Kaa firmware does: a random client id and no MQTT credentials, the endpoint token in the topic.
The last test runs the Python client of the Kaa seed, unchanged but for its settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from google.protobuf import json_format, struct_pb2

from broker_hooks.acl import TopicAcl
from broker_hooks.rules import DecodeError, RuleSet
from server.app import FleetcmdApp
from server.core.lifecycle import Status
from server.core.models import Execution
from server.core.validation import SendCommand
from server.dialects import emqx
from server.dialects.kaa import topics as kaa
from server.dialects.kaa.cex import KaaMqtt
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import app_channel
from tests.devices import EmqxDevice, Received, wait_for

pytestmark = pytest.mark.secure

HOST = "127.0.0.1"
AV = "av1"
QUIET = 0.4  # how long "nothing arrives" is watched for


# ---- helpers ----------------------------------------------------------------------------------


@pytest.fixture
async def stub(app: FleetcmdApp) -> AsyncIterator[pb_grpc.CommandServiceStub]:
    async with app_channel(app) as channel:
        yield pb_grpc.CommandServiceStub(channel)


async def endpoint(app: FleetcmdApp, thing_id: str, app_version: str = AV) -> str:
    """Register a Kaa endpoint; returns its endpoint token."""
    assert app.registry is not None
    _record, _password, token = await app.registry.create_thing(thing_id, "", {}, kaa_app_version=app_version)
    assert token
    return token


def cex(token: str, rest: str, app_version: str = AV) -> str:
    return f"kp1/{app_version}/cex/{token}/{rest}"


class KaaDevice:
    """A paho client speaking KP1 like Kaa firmware: random client id, no credentials by default.

    Every message is recorded whatever its topic (pushes arrive without a subscription).
    """

    def __init__(
        self, app: FleetcmdApp, *, client_id: str | None = None, username: str | None = None, password: str | None = None
    ) -> None:
        assert app.ports is not None and app.ports.mqtt is not None
        self.port = app.ports.mqtt
        self.client_id = client_id if client_id is not None else "K" + uuid.uuid4().hex[:8].upper()
        self.received: queue.Queue[Received] = queue.Queue()
        self.connack = threading.Event()
        self.connect_rc: Any = None
        self.disconnected = threading.Event()
        self._subacks: dict[int, list[int]] = {}
        self._cv = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        if username is not None or password is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *_a: self.disconnected.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connect_rc = rc
        self.connack.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received.put(Received(msg.topic, msg.qos, bool(msg.retain), bool(msg.dup), msg.mid, bytes(msg.payload)))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        with self._cv:
            self._subacks[mid] = [int(rc.value) for rc in rcs]
            self._cv.notify_all()

    def start(self, timeout: float = 5) -> KaaDevice:
        self.client.connect_async(HOST, self.port, keepalive=60)
        self.client.loop_start()
        if not self.connack.wait(timeout):
            self.client.loop_stop()
            raise TimeoutError("no CONNACK")
        if self.connect_rc.is_failure:
            self.client.loop_stop()  # paho would retry the refused CONNECT forever
            raise ConnectionRefusedError(str(self.connect_rc))
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    async def __aenter__(self) -> KaaDevice:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    async def publish(self, topic: str, body: Any, qos: int = 1) -> None:
        """Publish (JSON unless bytes) and wait until it is sent (PUBACKed at QoS 1)."""
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        info = self.client.publish(topic, payload, qos=qos)
        await asyncio.to_thread(info.wait_for_publish, 5)

    def _subscribe(self, topic_filter: str, qos: int) -> list[int]:
        _rc, mid = self.client.subscribe(topic_filter, qos=qos)
        with self._cv:
            if not self._cv.wait_for(lambda: mid in self._subacks, 5):
                raise TimeoutError("no SUBACK")
            return self._subacks.pop(mid)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> list[int]:
        return await asyncio.to_thread(self._subscribe, topic_filter, qos)

    async def next(self, timeout: float = 5) -> Received:
        try:
            return await asyncio.to_thread(self.received.get, True, timeout)
        except queue.Empty:
            pytest.fail(f"{self.client_id}: nothing received within {timeout}s")

    async def expect(self, topic: str, timeout: float = 5) -> tuple[Received, Any]:
        """The next message, which must be on ``topic``; with its JSON body."""
        msg = await self.next(timeout)
        assert msg.topic == topic, (msg.topic, msg.payload)
        return msg, json.loads(msg.payload)

    async def quiet(self, seconds: float = QUIET) -> None:
        """Nothing arrives for ``seconds``."""
        await asyncio.sleep(seconds)
        assert self.received.empty(), self.received.get_nowait()

    async def request(self, topic: str, body: Any, qos: int = 1) -> tuple[Received, Any]:
        """Publish a request with a request id and return its answer (``/status`` or ``/error``)."""
        await self.publish(topic, body, qos)
        msg = await self.next()
        assert msg.topic in (topic + "/status", topic + "/error"), (msg.topic, msg.payload)
        return msg, json.loads(msg.payload)


async def send(app: FleetcmdApp, thing: str, action: str, params: dict[str, Any] | None = None, ttl: int = 60) -> Execution:
    assert app.core is not None
    return await app.core.send(SendCommand(thing, action, params if params is not None else {"n": 1}, ttl, ""))


async def get(app: FleetcmdApp, execution_id: str) -> Execution:
    assert app.core is not None
    return await app.core.get(execution_id)


async def wait_status(app: FleetcmdApp, execution_id: str, status: Status, timeout: float = 5) -> Execution:
    deadline = time.monotonic() + timeout
    while True:
        ex = await get(app, execution_id)
        if ex.status == status:
            return ex
        if ex.status.final or time.monotonic() > deadline:
            pytest.fail(f"{execution_id}: wanted {status.name}, is {ex.status.name}")
        await asyncio.sleep(0.02)


def kaa_mqtt(app: FleetcmdApp) -> KaaMqtt:
    state = app.runtimes["kaa"].state
    assert isinstance(state, KaaMqtt)
    return state


def bound(app: FleetcmdApp, thing: str, client_id: str) -> bool:
    return client_id in kaa_mqtt(app).route.clients(thing)


def stat(app: FleetcmdApp, key: str) -> int:
    assert app.core is not None and app.broker is not None
    return int(app.core.stats[key] or app.broker.stats[key])


# ---- observe, request ids, pushes ---------------------------------------------------------------


async def test_observe_with_request_id_answers_outstanding_then_new_commands_are_pushed(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-1")
    early = [await send(app, "ep-1", "reboot", {"delay": i}) for i in range(2)]
    other = await send(app, "ep-1", "zero")
    assert [e.status for e in early] == [Status.QUEUED, Status.QUEUED]  # nobody bound yet
    assert [e.kaa_id for e in early] == [1, 2]
    async with KaaDevice(app) as dev:
        msg, body = await dev.request(cex(token, "command/reboot/7"), {"observe": True})
        assert msg.topic == cex(token, "command/reboot/7/status") and msg.qos == 1
        assert body == [{"id": 1, "payload": {"delay": 0}}, {"id": 2, "payload": {"delay": 1}}]
        for e in early:  # handed over in the answer, which was PUBACKed
            await wait_status(app, e.execution_id, Status.DELIVERED)
        # The first bind also pushes what waited of other types (the client never asked for "zero").
        msg, body = await dev.expect(cex(token, "command/zero/status"))
        assert msg.qos == 1 and body == [{"id": 1, "payload": {"n": 1}}]
        await wait_status(app, other.execution_id, Status.DELIVERED)

        # From now on, every new command is pushed as it is sent (SENT, then DELIVERED on PUBACK).
        new = await send(app, "ep-1", "reboot", {"delay": 9})
        assert new.status == Status.SENT
        msg, body = await dev.expect(cex(token, "command/reboot/status"))
        assert msg.qos == 1 and body == [{"id": 3, "payload": {"delay": 9}}]
        await wait_status(app, new.execution_id, Status.DELIVERED)

        # Delivered is still outstanding (Kaa's "pending") until a result arrives.
        _msg, body = await dev.request(cex(token, "command/reboot/8"), {})
        assert [c["id"] for c in body] == [1, 2, 3]
        await dev.quiet()


async def test_replies_use_the_request_qos(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-qos")
    async with KaaDevice(app) as dev:
        for qos in (0, 1):
            msg, body = await dev.request(cex(token, f"command/reboot/{qos + 1}"), {"observe": True}, qos=qos)
            assert (msg.qos, body) == (qos, [])
            msg, body = await dev.request(cex(token, f"command/reboot/{qos + 1}"), b"not json", qos=qos)
            assert msg.topic.endswith("/error") and msg.qos == qos


async def test_observe_without_request_id_gets_no_reply_but_the_commands(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-2")
    async with KaaDevice(app) as dev:
        # Nothing outstanding: no request id, no reply at all.
        await dev.publish(cex(token, "command/zero"), {"observe": True})
        await wait_for(lambda: bound(app, "ep-2", dev.client_id), what="the binding")
        await dev.quiet()
        ex = await send(app, "ep-2", "zero", {"a": 1})
        _msg, body = await dev.expect(cex(token, "command/zero/status"))
        assert body == [{"id": 1, "payload": {"a": 1}}]
        await wait_status(app, ex.execution_id, Status.DELIVERED)
        # Asking again without a request id: the outstanding ones come on the push topic.
        await dev.publish(cex(token, "command/zero"), {})
        _msg, body = await dev.expect(cex(token, "command/zero/status"))
        assert body == [{"id": 1, "payload": {"a": 1}}]
        # An empty payload is read as {} (the object may be empty).
        await dev.publish(cex(token, "command/zero"), b"")
        _msg, body = await dev.expect(cex(token, "command/zero/status"))
        assert [c["id"] for c in body] == [1]
        await dev.quiet()


async def test_observe_false_stops_pushes_of_that_type_only(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-3")
    async with KaaDevice(app) as dev:
        _msg, body = await dev.request(cex(token, "command/reboot/1"), {"observe": False})
        assert body == []
        muted = await send(app, "ep-3", "reboot")
        # A bound client that never said anything about "zero" still gets it pushed.
        pushed = await send(app, "ep-3", "zero")
        _msg, body = await dev.expect(cex(token, "command/zero/status"))
        assert body == [{"id": 1, "payload": {"n": 1}}]
        await wait_status(app, pushed.execution_id, Status.DELIVERED)
        await dev.quiet()
        assert (await get(app, muted.execution_id)).status in (Status.QUEUED, Status.SENT)
        # Polling still returns it, and observe true turns pushes back on.
        _msg, body = await dev.request(cex(token, "command/reboot/2"), {"observe": True})
        assert body == [{"id": 1, "payload": {"n": 1}}]
        await wait_status(app, muted.execution_id, Status.DELIVERED)
        await send(app, "ep-3", "reboot")
        _msg, body = await dev.expect(cex(token, "command/reboot/status"))
        assert [c["id"] for c in body] == [2]
        # observe false without a request id: no reply, and no more pushes.
        await dev.publish(cex(token, "command/reboot"), {"observe": False})
        await dev.quiet(0.2)
        await send(app, "ep-3", "reboot")
        await dev.quiet()


async def test_every_bound_client_gets_the_push(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-4")
    async with KaaDevice(app) as a, KaaDevice(app) as b:
        # One binds by subscribing (with + in the command-type level), one by a request.
        assert await a.subscribe(cex(token, "command/+/status")) == [1]
        await b.publish(cex(token, "command/reboot"), {"observe": True})
        await wait_for(lambda: bound(app, "ep-4", a.client_id) and bound(app, "ep-4", b.client_id), what="bindings")
        ex = await send(app, "ep-4", "reboot")
        for dev in (a, b):
            _msg, body = await dev.expect(cex(token, "command/reboot/status"))
            assert body[0]["id"] == 1
        await wait_status(app, ex.execution_id, Status.DELIVERED)
    # Disconnected clients are forgotten: a new command waits, QUEUED.
    await wait_for(lambda: not bound(app, "ep-4", a.client_id) and not bound(app, "ep-4", b.client_id), what="unbinding")
    assert (await send(app, "ep-4", "reboot")).status == Status.QUEUED


# ---- results ---------------------------------------------------------------------------------------


async def test_results_as_array_and_as_single_object(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-5")
    exs = [await send(app, "ep-5", "reboot") for _ in range(3)]
    async with KaaDevice(app) as dev:
        _msg, body = await dev.request(cex(token, "command/reboot/4"), {"observe": True})
        assert [c["id"] for c in body] == [1, 2, 3]
        # An array, with a request id: acknowledged on /status.
        items = [{"id": 1, "statusCode": 200, "reasonPhrase": "OK", "payload": "done"}, {"id": 2, "statusCode": 200}]
        msg, body = await dev.request(cex(token, "result/reboot/5"), items)
        assert msg.topic == cex(token, "result/reboot/5/status") and body == {}
        # A single object, without a request id: applied, not answered.
        await dev.publish(cex(token, "result/reboot"), {"id": 3, "statusCode": 204, "reasonPhrase": "No Content"})
        for ex in exs:
            await wait_status(app, ex.execution_id, Status.SUCCEEDED)
        await dev.quiet()
        # Executed commands are no longer outstanding.
        _msg, body = await dev.request(cex(token, "command/reboot/6"), {})
        assert body == []
        # An empty array (Kaa's sample client answers an empty command list so) is acknowledged.
        msg, body = await dev.request(cex(token, "result/reboot/7"), [])
        assert msg.topic.endswith("/status")
    one = await get(app, exs[0].execution_id)
    assert json.loads(one.result_json or "null") == "done"
    assert one.reason is not None and (one.reason.code, one.reason.description) == ("200", "OK")
    three = await get(app, exs[2].execution_id)
    assert three.reason is not None and three.reason.code == "204" and three.result_json is None


async def test_bad_items_answer_error_and_the_valid_ones_still_count(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-6")
    good, other = await send(app, "ep-6", "reboot"), await send(app, "ep-6", "reboot")
    async with KaaDevice(app) as dev:
        _msg, body = await dev.request(cex(token, "command/reboot/1"), {"observe": True})
        assert [c["id"] for c in body] == [1, 2]
        items = [
            {"id": 1, "statusCode": 200, "reasonPhrase": "OK"},
            {"id": 99, "statusCode": 200},  # unknown id
            {"id": 2},  # no statusCode
            {"id": "2", "statusCode": 200},  # not an integer id
            "junk",
        ]
        msg, body = await dev.request(cex(token, "result/reboot/3"), items)
        assert msg.topic == cex(token, "result/reboot/3/error")
        assert body["statusCode"] == 400
        phrase = body["reasonPhrase"]
        assert "item 1 (id 99)" in phrase and "item 2 (id 2)" in phrase and "item 3" in phrase and "item 4" in phrase
        assert "item 0" not in phrase
        await wait_status(app, good.execution_id, Status.SUCCEEDED)
        # Delivered by the first answer (its PUBACK may still be on its way under load).
        await wait_status(app, other.execution_id, Status.DELIVERED)
        # Only unknown ids: 404.
        msg, body = await dev.request(cex(token, "result/reboot/4"), {"id": 42, "statusCode": 200})
        assert msg.topic.endswith("/error") and body["statusCode"] == 404 and "42" in body["reasonPhrase"]
        # The same id under another command type is unknown too (ids are per type).
        msg, body = await dev.request(cex(token, "result/zero/5"), {"id": 2, "statusCode": 200})
        assert body["statusCode"] == 404
        # Neither an object nor an array.
        msg, body = await dev.request(cex(token, "result/reboot/6"), 17)
        assert body["statusCode"] == 400
        # Without a request id nothing is answered, and the valid item still counts.
        await dev.publish(cex(token, "result/reboot"), [{"id": 2, "statusCode": 200}, {"id": 77, "statusCode": 200}])
        await wait_status(app, other.execution_id, Status.SUCCEEDED)
        await dev.quiet()
    assert stat(app, "kaa.bad_items") >= 6


async def test_status_codes_map_to_statuses_visible_through_get_and_stream(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub
) -> None:
    token = await endpoint(app, "ep-7")
    stream = stub.Stream(pb.StreamRequest(thing_id="ep-7"))
    try:
        sent = []
        for i in range(3):
            reply = await stub.Send(pb.SendRequest(thing_id="ep-7", action="park", params=_struct({"slot": i}), ttl_seconds=60))
            sent.append(reply)
        cases = [
            (200, "OK", {"parked": True}, pb.SUCCEEDED),
            (409, "Slot taken", "busy", pb.REJECTED),
            (500, "Boom", None, pb.FAILED),
        ]
        async with KaaDevice(app) as dev:
            _msg, body = await dev.request(cex(token, "command/park/1"), {"observe": True})
            assert [c["id"] for c in body] == [1, 2, 3] and body[2]["payload"] == {"slot": 2}
            items = []
            for (code, phrase, payload, _status), execution in zip(cases, sent, strict=True):
                item: dict[str, Any] = {"id": execution.kaa_command_id, "statusCode": code, "reasonPhrase": phrase}
                if payload is not None:
                    item["payload"] = payload
                items.append(item)
            msg, _body = await dev.request(cex(token, "result/park/2"), items)
            assert msg.topic.endswith("/status")
        finals: dict[str, pb.ExecutionEvent] = {}
        async with asyncio.timeout(5):
            async for event in stream:
                if event.status in (pb.SUCCEEDED, pb.REJECTED, pb.FAILED):
                    finals[event.execution_id] = event
                if len(finals) == 3:
                    break
        for (code, phrase, payload, status), execution in zip(cases, sent, strict=True):
            got = await stub.Get(pb.GetRequest(execution_id=execution.execution_id))
            assert got.status == status and got.kaa_command_id == execution.kaa_command_id
            assert (got.status_reason.reason_code, got.status_reason.reason_description) == (str(code), phrase)
            event = finals[execution.execution_id]
            assert event.status == status and event.status_reason.reason_code == str(code)
            assert event.status_reason.reason_description == phrase
            if payload is None:
                assert not got.HasField("result")
            else:
                assert json_format.MessageToDict(got.result) == payload
                assert json_format.MessageToDict(event.result) == payload
            assert [h.status for h in got.history][-1] == status
    finally:
        stream.cancel()


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def test_a_late_result_does_not_change_an_expired_command(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-8")
    ex = await send(app, "ep-8", "reboot", ttl=1)
    keep = await send(app, "ep-8", "reboot", ttl=60)
    async with KaaDevice(app) as dev:
        _msg, body = await dev.request(cex(token, "command/reboot/1"), {})
        assert [c["id"] for c in body] == [1, 2]
        await wait_status(app, ex.execution_id, Status.TIMED_OUT, timeout=4)
        # Expired: no longer outstanding.
        _msg, body = await dev.request(cex(token, "command/reboot/2"), {})
        assert [c["id"] for c in body] == [2]
        # A result for it is kept in the history but changes nothing.
        msg, _body = await dev.request(cex(token, "result/reboot/3"), {"id": 1, "statusCode": 200})
        assert msg.topic.endswith("/status")
    expired = await get(app, ex.execution_id)
    assert expired.status == Status.TIMED_OUT
    assert (await get(app, keep.execution_id)).status == Status.DELIVERED


async def test_ids_are_unique_and_increasing_per_endpoint_and_type(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    await endpoint(app, "ep-a")
    await endpoint(app, "ep-b")
    ids: dict[tuple[str, str], list[int]] = {}
    for thing, action in [("ep-a", "reboot")] * 3 + [("ep-a", "zero")] * 2 + [("ep-b", "reboot")] * 2 + [("ep-a", "reboot")]:
        reply = await stub.Send(pb.SendRequest(thing_id=thing, action=action, ttl_seconds=60))
        ids.setdefault((thing, action), []).append(reply.kaa_command_id)
    assert ids == {("ep-a", "reboot"): [1, 2, 3, 4], ("ep-a", "zero"): [1, 2], ("ep-b", "reboot"): [1, 2]}
    # A final command keeps its id; the next one still gets a new, higher id.
    assert app.core is not None
    listed = await stub.List(pb.ListRequest(thing_id="ep-a", action="reboot"))
    await app.core.cancel(next(e.execution_id for e in listed.executions if e.kaa_command_id == 4))
    reply = await stub.Send(pb.SendRequest(thing_id="ep-a", action="reboot", ttl_seconds=60))
    assert reply.kaa_command_id == 5


# ---- errors ------------------------------------------------------------------------------------


async def test_bad_json_bad_type_and_bad_observe_answer_400(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-9")
    async with KaaDevice(app) as dev:
        for topic, payload in [
            (cex(token, "command/reboot/1"), b"{not json"),
            (cex(token, "command/re_boot/2"), b"{}"),  # a command type is alphanumeric
            (cex(token, "command/reboot/3"), b'{"observe": "yes"}'),
            (cex(token, "command/reboot/4"), b"[]"),
            (cex(token, "result/reboot/5"), b"\xff\xfe"),
            (cex(token, "result/re-boot/6"), b"[]"),
        ]:
            msg, body = await dev.request(topic, payload)
            assert msg.topic == topic + "/error", topic
            assert body["statusCode"] == 400 and isinstance(body["reasonPhrase"], str) and body["reasonPhrase"], topic
        # Without a request id the same errors are not answered.
        await dev.publish(cex(token, "command/reboot"), b"{not json")
        await dev.quiet()
        assert app.broker is not None and app.broker.is_connected(dev.client_id)


async def test_unknown_token_or_other_app_version_is_denied(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-10")
    await endpoint(app, "ep-11", app_version="av2")
    assert app.broker is not None
    async with KaaDevice(app) as dev:
        before = app.broker.stats["dropped.acl"]
        for topic in (
            cex("no-such-token", "command/reboot/1"),
            cex(token, "command/reboot/1", app_version="av2"),  # the token of another application version
            cex(token, "command/reboot/status"),  # an answer topic is not a request
            cex(token, "command/reboot/0"),  # request ids are positive
            cex(token, "command/reboot/1/status"),
            f"kp1/{AV}/other/{token}/x",
            "$emqx/commands/things/ep-10/executions/e1/response",  # no thing identity without credentials
            "fleet/anything",
        ):
            await dev.publish(topic, {"observe": True})
        await wait_for(lambda: app.broker is not None and app.broker.stats["dropped.acl"] == before + 8, what="ACL drops")
        await dev.quiet()
        # Subscriptions: only below a registered endpoint's own cex/dcx topics.
        assert await dev.subscribe(cex("no-such-token", "command/+/status")) == [0x80]
        assert await dev.subscribe(f"kp1/{AV}/cex/+/command/+/status") == [0x80]
        assert await dev.subscribe("kp1/#") == [0x80]
        assert await dev.subscribe("$emqx/commands/things/ep-10/executions/+/request") == [0x80]
        assert await dev.subscribe(cex(token, "command/+/status")) == [1]
        assert await dev.subscribe(f"kp1/{AV}/dcx/{token}/#") == [1]
        # The connection is healthy and the right token works.
        _msg, body = await dev.request(cex(token, "command/reboot/9"), {})
        assert body == []
        # Data collection topics of the endpoint are open to it (the seed publishes telemetry there).
        await dev.publish(f"kp1/{AV}/dcx/{token}/json/32", {"t": 1})
        msg, _ = await dev.expect(f"kp1/{AV}/dcx/{token}/json/32")
        assert msg.topic.endswith("/json/32")


async def test_rotated_token_ends_kaa_connections_and_stops_pushes(app: FleetcmdApp) -> None:
    token = await endpoint(app, "ep-rot")
    assert app.registry is not None
    async with KaaDevice(app) as dev:
        await dev.request(cex(token, "command/reboot/1"), {"observe": True})
        _password, new_token = await app.registry.rotate_credentials("ep-rot")
        assert new_token and new_token != token
        assert await asyncio.to_thread(dev.disconnected.wait, 5)
        await asyncio.to_thread(dev.client.loop_stop)
    assert (await send(app, "ep-rot", "reboot")).status == Status.QUEUED
    async with KaaDevice(app) as again:
        _msg, body = await again.request(cex(new_token, "command/reboot/1"), {})
        assert [c["id"] for c in body] == [1]


# ---- authentication ---------------------------------------------------------------------------


async def test_credential_less_connects_only_while_a_kaa_endpoint_exists(app: FleetcmdApp) -> None:
    assert app.registry is not None and app.broker is not None
    with pytest.raises(ConnectionRefusedError):
        await KaaDevice(app).__aenter__()
    _record, password, _ = await app.registry.create_thing("plain", "", {})
    await endpoint(app, "ep-12")
    async with KaaDevice(app):
        pass
    # Not with a registered thing's client id: that would take over the thing's connection.
    async with EmqxDevice(HOST, app.ports.mqtt if app.ports else 0, "plain", username="plain", password=password) as real:
        with pytest.raises(ConnectionRefusedError):
            await KaaDevice(app, client_id="plain").__aenter__()
        await asyncio.sleep(0.1)
        assert not real.disconnected.is_set()
    # Presented credentials must be valid ones.
    with pytest.raises(ConnectionRefusedError):
        await KaaDevice(app, client_id="nobody", username="nobody", password="x").__aenter__()
    assert app.broker.stats["auth_failures"] == 3


async def test_a_kaa_thing_with_credentials_keeps_its_emqx_topics_and_gets_its_own_kp1_topics(app: FleetcmdApp) -> None:
    assert app.registry is not None and app.ports is not None
    _record, password, token = await app.registry.create_thing("both", "", {}, kaa_app_version=AV)
    other = await endpoint(app, "ep-13")
    async with KaaDevice(app, client_id="both", username="both", password=password) as dev:
        assert await dev.subscribe("$emqx/commands/things/both/executions/+/request") == [1]
        assert await dev.subscribe(cex(token, "command/+/status")) == [1]
        assert await dev.subscribe(cex(other, "command/+/status")) == [0x80]  # not its endpoint
        ex = await send(app, "both", "reboot")
        _msg, body = await dev.expect(cex(token, "command/reboot/status"))  # a Kaa endpoint: the Kaa route
        assert body == [{"id": 1, "payload": {"n": 1}}]
        msg, _body = await dev.request(cex(token, "result/reboot/1"), [{"id": 1, "statusCode": 200}])
        assert msg.topic.endswith("/status")
        await wait_status(app, ex.execution_id, Status.SUCCEEDED)


# ---- units: the endpoint-token ACL and decoding --------------------------------------------------


def test_kaa_acl_scopes_topics_by_registered_endpoint_token() -> None:
    @dataclass(frozen=True)
    class Ep:
        thing_id: str

    class Lookup:
        def kaa_endpoint(self, app_version: str, endpoint_token: str) -> Ep | None:
            return {("av1", "tok"): Ep("t1"), ("av1", "tok2"): Ep("t2")}.get((app_version, endpoint_token))

    acl = TopicAcl.of([emqx.DIALECT, kaa.DIALECT], [kaa.KaaAcl(Lookup())])
    for topic in ("command/reboot", "command/reboot/1", "result/reboot", "result/reboot/42", "result/x-y/3"):
        assert acl.may_publish(None, f"kp1/av1/cex/tok/{topic}"), topic
        assert acl.may_publish("t1", f"kp1/av1/cex/tok/{topic}"), topic  # its own endpoint
        assert not acl.may_publish("t2", f"kp1/av1/cex/tok/{topic}"), topic  # another thing's endpoint
        assert acl.may_publish("t2", f"kp1/av1/cex/tok/{topic}", any_endpoint=True), topic  # development mode
    assert acl.may_publish(None, "kp1/av1/dcx/tok/json/32")
    for topic in (
        "kp1/av1/cex/tok/command/reboot/status",
        "kp1/av1/cex/tok/command/reboot/1/status",
        "kp1/av1/cex/tok/command/reboot/0",
        "kp1/av1/cex/tok/command/reboot/-1",
        "kp1/av1/cex/tok/command",
        "kp1/av1/cex/tok/other/reboot",
        "kp1/av2/cex/tok/command/reboot",
        "kp1/av1/cex/nope/command/reboot",
        "kp1/av1/dcx/nope/json",
        "kp1/av1/dcx/tok",
        "$emqx/commands/things/t1/executions/e/response",
    ):
        assert not acl.may_publish(None, topic), topic
    assert acl.may_publish("t1", "$emqx/commands/things/t1/executions/e/response")
    for topic_filter in ("command/+/status", "command/reboot/1/status", "#", "+/+/+", "result/+/+/error"):
        assert acl.may_subscribe(None, f"kp1/av1/cex/tok/{topic_filter}"), topic_filter
    for topic_filter in (
        "kp1/av1/cex/+/command/+/status",
        "kp1/+/cex/tok/#",
        "kp1/#",
        "kp1/av1/cex/tok/#/x",
        "kp1/av1/cex/tok/co+",
    ):
        assert not acl.may_subscribe(None, topic_filter), topic_filter
    assert not acl.may_subscribe(None, "$emqx/commands/things/t1/executions/+/request")


def test_kaa_decoding() -> None:
    rules = RuleSet(kaa.RULES)
    inbound = rules.route("c", "kp1/av/cex/tok/command/reboot/12", b'{"observe": true}', 1)
    assert inbound is not None and inbound.action is kaa.KaaAction.COMMAND and inbound.qos == 1
    request = inbound.message
    assert (request.app_version, request.token, request.command_type, request.request_id) == ("av", "tok", "reboot", 12)
    assert request.observe is True and request.problem is None
    inbound = rules.route("c", "kp1/av/cex/tok/result/reboot", b'{"id": 1, "statusCode": 200}')
    assert inbound is not None and inbound.action is kaa.KaaAction.RESULT and inbound.message.request_id is None
    bad = rules.route("c", "kp1/av/cex/tok/command/reboot/1", b'{"observe": 1}')
    assert bad is not None and bad.message.problem and bad.message.body is None
    with pytest.raises(DecodeError):
        rules.route("c", "kp1/av/cex/tok/command/reboot/status", b"[]")
    assert rules.route("c", "kp1/av/cex/tok/command/reboot/1/status", b"[]") is None
    assert kaa.encode_commands([(3, '{"b":1,"a":2}'), (4, None)]) == b'[{"id":3,"payload":{"b":1,"a":2}},{"id":4,"payload":{}}]'


# ---- the seed's client ----------------------------------------------------------------------------

SEED_CLIENT = Path(__file__).with_name("kaa_seed_client.py")


@contextlib.contextmanager
def seed_client(port: int, token: str, log_path: Path) -> Any:
    env = {
        **os.environ,
        "KPC_HOST": HOST,
        "KPC_PORT": str(port),
        "ENDPOINT_TOKEN": token,
        "APPLICATION_VERSION": AV,
        "KPC_RUN_SECONDS": "60",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-u", str(SEED_CLIENT)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the seed's own shutdown path
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


async def test_the_seed_client_executes_reboot_and_zero(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, tmp_path: Path
) -> None:
    assert app.ports is not None and app.ports.mqtt is not None and "kaa" in app.runtimes
    token = await endpoint(app, "tesla")
    # One "zero" waits before the device is up: it arrives in the answer to the client's observe request.
    waiting = await stub.Send(pb.SendRequest(thing_id="tesla", action="zero", ttl_seconds=60))
    # And a "reboot": the client never asks for that type, so it is pushed once the client is bound.
    waiting_reboot = await stub.Send(pb.SendRequest(thing_id="tesla", action="reboot", ttl_seconds=60))
    log_path = tmp_path / "seed.log"
    with seed_client(app.ports.mqtt, token, log_path) as proc:
        try:
            await wait_for(lambda: bool(kaa_mqtt(app).route.clients("tesla")), timeout=15, what="the seed client")
            reboot = await stub.Send(pb.SendRequest(thing_id="tesla", action="reboot", ttl_seconds=60))
            zero = await stub.Send(pb.SendRequest(thing_id="tesla", action="zero", params=_struct({"x": 1}), ttl_seconds=60))
            for sent in (waiting, waiting_reboot, reboot, zero):
                got = await _wait_final(stub, sent.execution_id)
                assert got.status == pb.SUCCEEDED, (sent.action, got)
                assert (got.status_reason.reason_code, got.status_reason.reason_description) == ("200", "OK")
                assert json_format.MessageToJson(got.result) == '"Success"'
            assert proc.poll() is None
        finally:
            output = log_path.read_text(errors="replace")
    # Each command was handed over once: the waiting "zero" in the answer to the observe request,
    # the others pushed on the topics the client handles by callback without subscribing.
    assert output.count('Received "reboot" command on topic') == 2, output
    assert output.count('Received "zero" command on topic') == 2, output
    assert f"on topic kp1/{AV}/cex/{token}/command/zero/1/status" in output, output
    assert f"on topic kp1/{AV}/cex/{token}/command/zero/status" in output, output
    assert f"on topic kp1/{AV}/cex/{token}/command/reboot/status" in output, output
    assert app.core is not None and app.core.stats["reports.duplicate"] == 0
    assert app.broker is not None and app.broker.stats["dropped.acl"] == 0


async def _wait_final(stub: pb_grpc.CommandServiceStub, execution_id: str, timeout: float = 15) -> pb.Execution:
    deadline = time.monotonic() + timeout
    while True:
        got = await stub.Get(pb.GetRequest(execution_id=execution_id))
        if got.status in (pb.SUCCEEDED, pb.FAILED, pb.REJECTED, pb.TIMED_OUT, pb.CANCELED) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)
