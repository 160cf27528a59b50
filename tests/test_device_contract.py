"""The device side of issue 2: real paho devices against the real service on loopback.

Each test runs its own service (port 0) and asserts exact statuses, history and
drop counters. Waiting is always bounded: state is polled with short sleeps,
device-side waits run in threads so the broker (on this loop) keeps running.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from broker_hooks.broker import Delivery
from server.app import FleetcmdApp
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import app_channel
from tests.conftest import make_settings
from tests.devices import EmqxDevice, wait_for

HOST = "127.0.0.1"
FINAL = {pb.SUCCEEDED, pb.FAILED, pb.REJECTED, pb.TIMED_OUT, pb.CANCELED}
REQUEST_KEYS = {"commandId", "action", "params", "timestamp", "ttl"}


# ---- helpers ----------------------------------------------------------------------------------


def name(status: int) -> str:
    return pb.ExecutionStatus.Name(status)


def history(ex: pb.Execution) -> list[str]:
    """History as status names, late entries marked with a ``late:`` prefix."""
    return [("late:" if c.late else "") + name(c.status) for c in ex.history]


def as_json(value: Any) -> Any:
    return json_format.MessageToDict(value)


async def get(stub: pb_grpc.CommandServiceStub, execution_id: str) -> pb.Execution:
    return await stub.Get(pb.GetRequest(execution_id=execution_id))


async def wait_status(stub: pb_grpc.CommandServiceStub, execution_id: str, status: int, timeout: float = 5) -> pb.Execution:
    """Poll Get until the execution has ``status``; fail with what it has otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        ex = await get(stub, execution_id)
        if ex.status == status:
            return ex
        if ex.status in FINAL or time.monotonic() > deadline:
            pytest.fail(f"{execution_id}: wanted {name(status)}, is {name(ex.status)} (history {history(ex)})")
        await asyncio.sleep(0.02)


async def wait_history_len(stub: pb_grpc.CommandServiceStub, execution_id: str, n: int) -> pb.Execution:
    """Poll Get until the history has ``n`` entries (returns what it has after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        ex = await get(stub, execution_id)
        if len(ex.history) >= n or time.monotonic() > deadline:
            return ex
        await asyncio.sleep(0.02)


async def send(
    stub: pb_grpc.CommandServiceStub, thing: str, action: str = "setTemperature", ttl: int = 30, **params: Any
) -> pb.Execution:
    req = pb.SendRequest(thing_id=thing, action=action, ttl_seconds=ttl)
    if params:
        req.params.CopyFrom(json_format.ParseDict(params, struct_pb2.Struct()))
    return await stub.Send(req)


async def still_quiet(dev: EmqxDevice, seconds: float) -> bool:
    """True when the device receives nothing for ``seconds``."""
    await asyncio.sleep(seconds)
    return dev.received.empty()


def device(app: FleetcmdApp, thing: str, **kw: Any) -> EmqxDevice:
    assert app.ports is not None
    return EmqxDevice(HOST, app.ports.mqtt, thing, **kw)


@pytest.fixture
async def small_app(tmp_path: Path) -> AsyncIterator[FleetcmdApp]:
    """A service with a 1 KiB response limit and a WebSocket listener."""
    async with FleetcmdApp(make_settings(tmp_path / "small", max_response_bytes=1024, ws_port=0)) as running:
        yield running


@pytest.fixture
async def small_stub(small_app: FleetcmdApp) -> AsyncIterator[pb_grpc.CommandServiceStub]:
    assert small_app.ports is not None
    async with app_channel(small_app) as channel:
        yield pb_grpc.CommandServiceStub(channel)


# ---- the request and the happy paths ----------------------------------------------------------


async def test_request_shape_and_success(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    async with device(app, "thermo-1") as dev:
        before = int(time.time())
        ex = await send(stub, "thermo-1", ttl=45, value=24)
        assert ex.status == pb.SENT

        msg = await dev.wait_message()
        assert msg.topic == f"$emqx/commands/things/thermo-1/executions/{ex.execution_id}/request"
        assert msg.qos == 1
        assert not msg.retain
        body = json.loads(msg.payload)
        assert set(body) == REQUEST_KEYS
        assert body["commandId"] == ex.command_id and ex.command_id
        assert body["action"] == "setTemperature"
        assert body["params"] == {"value": 24}
        assert body["ttl"] == 45
        assert isinstance(body["timestamp"], int) and before - 1 <= body["timestamp"] <= int(time.time()) + 1

        # PUBACKed by paho: DELIVERED before the device answers.
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"currentTemperature": 24})
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)

    assert as_json(done.result) == {"currentTemperature": 24}
    assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]
    assert done.HasField("completed_at")
    assert not done.HasField("status_reason") or as_json(done.status_reason) == {}
    assert dev.received.empty(), "the request must be delivered once"


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
async def test_an_answer_is_pubacked_only_once_it_is_committed(
    small_app: FleetcmdApp, small_stub: pb_grpc.CommandServiceStub, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    # A crash between the PUBACK and the commit would lose the answer: the device would not send it again.
    # On TCP fleetcmd's reader PUBACKs; on WebSocket amqtt's reader, whose own flow PUBACKed at once.
    app, stub = small_app, small_stub
    assert app.ports is not None
    port = app.ports.mqtt if transport == "tcp" else app.ports.ws
    store = app.store
    assert store is not None
    gate = threading.Event()
    gate.set()
    commit = store._execute_batch

    def gated(batch: Any) -> Any:
        gate.wait(10)
        return commit(batch)

    monkeypatch.setattr(store, "_execute_batch", gated)
    try:
        async with EmqxDevice(HOST, port, "thermo-ack", transport=transport) as dev:
            ex = await send(stub, "thermo-ack")
            await dev.wait_message()
            await wait_status(stub, ex.execution_id, pb.DELIVERED)
            gate.clear()  # the store's next commit waits
            answer = dev.respond(ex.execution_id, "SUCCEEDED")
            await asyncio.sleep(0.3)
            assert not answer.is_published(), "PUBACKed before the answer was committed"
            assert (await get(stub, ex.execution_id)).status == pb.DELIVERED
            gate.set()
            await asyncio.to_thread(answer.wait_for_publish, 5)
            assert answer.is_published()
            assert (await get(stub, ex.execution_id)).status == pb.SUCCEEDED
    finally:
        gate.set()


@pytest.mark.parametrize(
    ("status", "expected"),
    [("FAILED", pb.FAILED), ("REJECTED", pb.REJECTED)],
)
async def test_failed_and_rejected_keep_status_reason(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, status: str, expected: int
) -> None:
    reason = {"reasonCode": "E_RANGE", "reasonDescription": "value out of range"}
    async with device(app, "thermo-2") as dev:
        ex = await send(stub, "thermo-2", value=99)
        execution_id, _ = await dev.wait_request()
        assert execution_id == ex.execution_id
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev.arespond(ex.execution_id, status, {"max": 30}, statusReason=reason)
        done = await wait_status(stub, ex.execution_id, expected)

    assert history(done) == ["SENT", "DELIVERED", status]
    assert done.status_reason.reason_code == "E_RANGE"
    assert done.status_reason.reason_description == "value out of range"
    assert as_json(done.result) == {"max": 30}
    last = done.history[-1]
    assert last.status_reason.reason_code == "E_RANGE" and not last.late
    assert as_json(last.result) == {"max": 30}


async def test_in_progress_then_succeeded(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    async with device(app, "thermo-3") as dev:
        ex = await send(stub, "thermo-3", action="firmwareUpdate")
        await dev.wait_request()
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev.arespond(ex.execution_id, "IN_PROGRESS", {"percent": 10})
        mid = await wait_status(stub, ex.execution_id, pb.IN_PROGRESS)
        assert as_json(mid.result) == {"percent": 10}
        assert not mid.HasField("completed_at")
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"version": "2.0"})
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)

    assert history(done) == ["SENT", "DELIVERED", "IN_PROGRESS", "SUCCEEDED"]
    assert as_json(done.history[2].result) == {"percent": 10}
    assert as_json(done.result) == {"version": "2.0"}


async def test_delivered_after_puback_without_answer(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    async with device(app, "quiet-1") as dev:
        ex = await send(stub, "quiet-1", action="reboot")
        await dev.wait_request()
        got = await wait_status(stub, ex.execution_id, pb.DELIVERED)
        # Nothing else happens while the device stays silent.
        await asyncio.sleep(0.3)
        got = await get(stub, ex.execution_id)
    assert got.status == pb.DELIVERED
    assert history(got) == ["SENT", "DELIVERED"]
    assert not got.HasField("completed_at")


# ---- TTL --------------------------------------------------------------------------------------


async def test_ttl_expiry_with_silent_device(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    async with device(app, "silent-1") as dev:
        t0 = time.monotonic()
        ex = await send(stub, "silent-1", ttl=1)
        await dev.wait_request()
        done = await wait_status(stub, ex.execution_id, pb.TIMED_OUT, timeout=3)
        elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed <= 2.0, f"TIMED_OUT after {elapsed:.2f}s for a 1 s TTL"
    assert history(done) == ["SENT", "DELIVERED", "TIMED_OUT"]
    assert done.history[-1].note == "ttl expired"
    assert done.HasField("completed_at")


# ---- offline devices and redelivery -----------------------------------------------------------


async def test_offline_device_gets_queued_command_on_connect(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    ex = await send(stub, "late-1", value=21)
    assert ex.status == pb.QUEUED
    await asyncio.sleep(0.2)
    assert (await get(stub, ex.execution_id)).status == pb.QUEUED

    async with device(app, "late-1") as dev:
        msg = await dev.wait_message()
        assert msg.topic.endswith(f"/executions/{ex.execution_id}/request")
        assert msg.qos == 1
        assert json.loads(msg.payload)["params"] == {"value": 21}
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev.arespond(ex.execution_id, "SUCCEEDED")
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
    assert history(done) == ["QUEUED", "SENT", "DELIVERED", "SUCCEEDED"]


async def test_persistent_session_gets_queued_command_without_resubscribing(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub
) -> None:
    assert app.broker is not None
    async with device(app, "persist-1", clean_session=False):
        pass
    await wait_for(lambda: not app.broker.is_connected("persist-1"), what="persist-1 to disconnect")

    ex = await send(stub, "persist-1", action="ping")
    assert ex.status == pb.QUEUED

    # Reconnect with the same persistent session and no SUBSCRIBE at all.
    async with device(app, "persist-1", clean_session=False, subscribe=False) as dev:
        msg = await dev.wait_message()
        assert msg.topic == f"$emqx/commands/things/persist-1/executions/{ex.execution_id}/request"
        assert msg.qos == 1
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"pong": True})
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
    assert history(done) == ["QUEUED", "SENT", "DELIVERED", "SUCCEEDED"]


@pytest.mark.parametrize("how", ["disconnect", "crash"])
async def test_unacked_request_is_published_again_on_reconnect(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, how: str
) -> None:
    """The device receives the request, never PUBACKs it and goes away (a clean DISCONNECT, or a
    crash that just closes the socket); its next connection gets the request again."""
    assert app.broker is not None
    async with device(app, "flaky-1", auto_ack=False) as dev:
        ex = await send(stub, "flaky-1", value=5)
        first = await dev.wait_message()
        assert first.topic.endswith(f"/{ex.execution_id}/request")
        await asyncio.sleep(0.2)
        assert (await get(stub, ex.execution_id)).status == pb.SENT  # no PUBACK, no DELIVERED
        if how == "crash":
            await dev.aabort()
            await wait_for(lambda: not app.broker.is_connected("flaky-1"), what="the broker to notice the crash")
    t0 = time.monotonic()
    async with device(app, "flaky-1") as dev2:
        again = await dev2.wait_message(timeout=3)
        assert json.loads(again.payload) == json.loads(first.payload)
        assert again.topic == first.topic
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev2.arespond(ex.execution_id, "SUCCEEDED")
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
    assert time.monotonic() - t0 < 3, "redelivery must not wait for amqtt's 5 s PUBACK timeout"
    assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
async def test_unacked_request_is_published_again_after_takeover(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, clean_session: bool
) -> None:
    """The device hangs (socket left open, no DISCONNECT) with a request un-acked, then reboots and
    connects again with the same client id: the broker must close the old connection
    ([MQTT-3.1.4-2]) and the new one must get the request again, without waiting out the
    5 s PUBACK timeout of the old one."""
    assert app.broker is not None
    old = device(app, "crashy-1", auto_ack=False, clean_session=clean_session)
    async with old:
        ex = await send(stub, "crashy-1")
        await old.wait_message()
        await asyncio.to_thread(old.client.loop_stop)  # frozen: connected but silent, never PUBACKs
        old_sock = old.client.socket()
        assert old_sock is not None
        t0 = time.monotonic()
        async with device(app, "crashy-1", clean_session=clean_session) as dev:
            again = await dev.wait_message(timeout=4)
            assert again.topic.endswith(f"/{ex.execution_id}/request")
            assert time.monotonic() - t0 < 3, "redelivery waited for the old connection's PUBACK timeout"
            await wait_status(stub, ex.execution_id, pb.DELIVERED)
            await dev.arespond(ex.execution_id, "SUCCEEDED")
            done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
            _alive(app, dev)
            # The old connection was closed by the broker: its socket reads the rest, then EOF.
            assert await asyncio.to_thread(_reads_eof, old_sock, 2.0)
            assert app.broker.stats["takeovers"] == 1
    assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]


def _reads_eof(sock: Any, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset also means closed
    return True


class GatedLink:
    """The broker link, except that the first delivery hangs until released and then fails,
    like a publish to a connection that silently died (no PUBACK, noticed late)."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.calls = 0
        self.first_started = asyncio.Event()
        self.release = asyncio.Event()

    def subscription_qos(self, client_id: str, topic: str) -> int | None:
        return self.broker.subscription_qos(client_id, topic)  # type: ignore[no-any-return]

    def is_connected(self, client_id: str) -> bool:
        return self.broker.is_connected(client_id)  # type: ignore[no-any-return]

    def deliver_nowait(self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None) -> None:
        return None  # every publish takes deliver()

    async def deliver(self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None) -> Delivery:
        self.calls += 1
        if self.calls == 1:
            self.first_started.set()
            await self.release.wait()
            return Delivery.FAILED
        return await self.broker.deliver(client_id, topic, payload, max_qos=max_qos, qos=qos)  # type: ignore[no-any-return]


async def test_request_in_flight_during_resubscribe_is_published_again(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub
) -> None:
    """The device (re)subscribes while the only attempt is still waiting for a PUBACK; that attempt then
    fails. The outbox must publish again at once, not leave it SENT until the device's next connect."""
    assert app.core is not None and app.broker is not None
    link = GatedLink(app.broker)
    async with device(app, "gated-1") as dev:
        app.core.outbox.attach(link)
        try:
            ex = await send(stub, "gated-1")
            assert ex.status == pb.SENT
            await asyncio.wait_for(link.first_started.wait(), 3)
            assert await dev.asubscribe(dev.request_filter) == [1]  # device_available while in flight
            await asyncio.sleep(0.2)
            link.release.set()
            msg = await dev.wait_message(timeout=3)
            assert msg.topic.endswith(f"/{ex.execution_id}/request")
            await wait_status(stub, ex.execution_id, pb.DELIVERED)
            await dev.arespond(ex.execution_id, "SUCCEEDED")
            done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
        finally:
            app.core.outbox.attach(app.broker)
    assert link.calls == 2
    assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]


async def test_cancel_queued_execution(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    ex = await send(stub, "cancel-1")
    assert ex.status == pb.QUEUED
    canceled = await stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id))
    assert canceled.status == pb.CANCELED
    got = await get(stub, ex.execution_id)
    assert history(got) == ["QUEUED", "CANCELED"]
    assert got.HasField("completed_at")

    # The device connecting afterwards must not receive the canceled request.
    async with device(app, "cancel-1") as dev:
        assert await still_quiet(dev, 0.4)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id))
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert history(await get(stub, ex.execution_id)) == ["QUEUED", "CANCELED"]


# ---- duplicate and late responses -------------------------------------------------------------


async def test_duplicate_final_response_is_idempotent(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    assert app.core is not None
    async with device(app, "dup-1") as dev:
        ex = await send(stub, "dup-1")
        await dev.wait_request()
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"ok": 1})
        first = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"ok": 1})
        await wait_for(lambda: app.core.stats["reports.duplicate"] == 1, what="the duplicate to be processed")
        again = await get(stub, ex.execution_id)
    assert history(again) == history(first) == ["SENT", "DELIVERED", "SUCCEEDED"]
    assert [c.sequence for c in again.history] == [c.sequence for c in first.history]
    assert again.updated_at == first.updated_at
    assert app.core.stats["reports.late"] == 0


async def test_different_final_after_final_is_late(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    """The first final status wins; a contradicting one is kept as late."""
    async with device(app, "dup-2") as dev:
        ex = await send(stub, "dup-2")
        await dev.wait_request()
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"ok": 1})
        await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
        await dev.arespond(ex.execution_id, "FAILED", {"ok": 0})
        got = await wait_history_len(stub, ex.execution_id, 4)
    assert got.status == pb.SUCCEEDED
    assert as_json(got.result) == {"ok": 1}
    assert history(got) == ["SENT", "DELIVERED", "SUCCEEDED", "late:FAILED"]
    assert as_json(got.history[-1].result) == {"ok": 0}


async def test_response_after_timeout_is_late(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    assert app.core is not None
    async with device(app, "slow-1") as dev:
        ex = await send(stub, "slow-1", ttl=1)
        await dev.wait_request()
        timed_out = await wait_status(stub, ex.execution_id, pb.TIMED_OUT, timeout=3)
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"took": "too long"}, statusReason={"reasonCode": "SLOW"})
        got = await wait_history_len(stub, ex.execution_id, 4)
    assert got.status == pb.TIMED_OUT
    assert history(got) == ["SENT", "DELIVERED", "TIMED_OUT", "late:SUCCEEDED"]
    late = got.history[-1]
    assert as_json(late.result) == {"took": "too long"}
    assert late.status_reason.reason_code == "SLOW"
    assert late.previous_status == pb.TIMED_OUT
    # The execution itself is unchanged by the late report.
    assert got.completed_at == timed_out.completed_at
    assert got.result == timed_out.result
    assert app.core.stats["reports.late"] == 1


async def test_response_after_cancel_is_late(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    async with device(app, "cancel-2") as dev:
        ex = await send(stub, "cancel-2")
        await dev.wait_request()
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        canceled = await stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id))
        assert canceled.status == pb.CANCELED
        await dev.arespond(ex.execution_id, "FAILED", {"why": "canceled?"})
        got = await wait_history_len(stub, ex.execution_id, 4)
    assert got.status == pb.CANCELED
    assert history(got) == ["SENT", "DELIVERED", "CANCELED", "late:FAILED"]
    assert got.completed_at == canceled.completed_at


# ---- malformed responses ----------------------------------------------------------------------


async def _complete(stub: pb_grpc.CommandServiceStub, dev: EmqxDevice, thing: str) -> pb.Execution:
    """One full, valid round trip on an already connected device."""
    ex = await send(stub, thing, action="check")
    execution_id, _ = await dev.wait_request()
    assert execution_id == ex.execution_id
    await wait_status(stub, ex.execution_id, pb.DELIVERED)
    await dev.arespond(ex.execution_id, "SUCCEEDED", {"fine": True})
    return await wait_status(stub, ex.execution_id, pb.SUCCEEDED)


def _alive(app: FleetcmdApp, dev: EmqxDevice) -> None:
    assert app.broker is not None
    assert app.broker.is_connected(dev.thing_id)
    assert dev.connected.is_set() and not dev.disconnected.is_set()


async def test_malformed_responses_are_dropped_and_counted(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    assert app.broker is not None and app.core is not None
    async with device(app, "mal-1") as dev, device(app, "mal-other") as other:
        ex = await send(stub, "mal-1")
        await dev.wait_request()
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        bystander = await send(stub, "mal-other")
        await other.wait_request()
        await wait_status(stub, bystander.execution_id, pb.DELIVERED)

        good_topic = dev.response_topic(ex.execution_id)
        ok = json.dumps({"status": "SUCCEEDED", "result": {"x": 1}}).encode()
        cases = [
            # (topic, payload): each one must be PUBACKed and dropped, and nothing else happens
            (dev.response_topic(ex.execution_id, thing_id="mal-other"), ok),  # names another thing: the ACL drops it
            (dev.response_topic(bystander.execution_id), ok),  # mal-other's execution under mal-1's topic
            (dev.response_topic(uuid.uuid4().hex), ok),  # unknown execution id
            (dev.response_topic("not-an-id"), ok),  # unknown (malformed) execution id
            (good_topic, b"{not json"),
            (good_topic, b"\xff\xfe\x00"),  # not UTF-8: counted as invalid_unicode
            (good_topic, b"[1, 2, 3]"),
            (good_topic, b'"SUCCEEDED"'),
            (good_topic, b"null"),
            (good_topic, json.dumps({"status": "DONE"}).encode()),
            (good_topic, json.dumps({"status": "TIMED_OUT"}).encode()),  # not a status a device may report
            (good_topic, json.dumps({"result": {"x": 1}}).encode()),  # no status at all
        ]
        for topic, payload in cases:
            await dev.apublish(topic, payload)
            _alive(app, dev)

        # A valid response afterwards still works, on the same connection.
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"x": 2})
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
        # Reports are applied in arrival order: every drop before it is counted by now.
        assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]
        assert as_json(done.result) == {"x": 2}
        untouched = await get(stub, bystander.execution_id)
        assert history(untouched) == ["SENT", "DELIVERED"]

        assert app.broker.stats["dropped.acl"] == 1
        assert app.core.stats["dropped.thing_mismatch"] == 1
        assert app.core.stats["dropped.unknown_execution"] == 2
        assert app.broker.stats["dropped.invalid_json"] == 1
        assert app.broker.stats["dropped.invalid_unicode"] == 1
        assert app.broker.stats["dropped.not_an_object"] == 3
        assert app.broker.stats["dropped.unknown_status"] == 3
        assert app.core.stats["reports.change"] == 1
        assert app.broker.stats["invalid_topic_disconnects"] == 0
        assert app.broker.stats["keepalive_timeouts"] == 0
        _alive(app, dev)
        _alive(app, other)

        # And another execution completes end to end.
        again = await _complete(stub, dev, "mal-1")
        assert history(again) == ["SENT", "DELIVERED", "SUCCEEDED"]


async def test_oversized_response_is_dropped(small_app: FleetcmdApp, small_stub: pb_grpc.CommandServiceStub) -> None:
    app, stub = small_app, small_stub
    assert app.broker is not None and app.core is not None
    async with device(app, "big-1") as dev:
        ex = await send(stub, "big-1")
        await dev.wait_request()
        await wait_status(stub, ex.execution_id, pb.DELIVERED)

        big = json.dumps({"status": "SUCCEEDED", "result": {"blob": "x" * 2000}}).encode()
        assert len(big) > 1024
        await dev.apublish(dev.response_topic(ex.execution_id), big)
        _alive(app, dev)
        await asyncio.sleep(0.2)
        assert app.broker.stats["dropped.oversized"] == 1
        assert (await get(stub, ex.execution_id)).status == pb.DELIVERED

        # Exactly at the limit is accepted.
        pad = 1024 - len(json.dumps({"status": "SUCCEEDED", "result": {"blob": ""}}))
        exact = json.dumps({"status": "SUCCEEDED", "result": {"blob": "y" * pad}}).encode()
        assert len(exact) == 1024
        await dev.apublish(dev.response_topic(ex.execution_id), exact)
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
        assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]
        assert as_json(done.result) == {"blob": "y" * pad}
        assert app.broker.stats["dropped.oversized"] == 1
        _alive(app, dev)
        again = await _complete(stub, dev, "big-1")
        assert history(again) == ["SENT", "DELIVERED", "SUCCEEDED"]


@pytest.mark.parametrize(
    "topic",
    [
        "$SYS/x",
        "$SYS/broker/clients/connected",
        "$emqx/other",
        "$aws/commands/things/dollar-1/executions/abc/response",
        "$emqx/commands/things/dollar-1/executions/abc/request",  # the service's own topic: not for devices
        "$emqx/commands/nothing",
    ],
)
async def test_other_dollar_topics_are_dropped_without_zombie(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, topic: str
) -> None:
    assert app.broker is not None
    async with device(app, "dollar-1") as dev, device(app, "dollar-watch") as watcher:
        # A subscriber that would see the publish if the broker forwarded it: the ACL allows no device that.
        assert await watcher.asubscribe("$SYS/#") == [0x80]
        assert await watcher.asubscribe("$emqx/#") == [0x80]
        assert await watcher.asubscribe("$aws/#") == [0x80]
        ex = await send(stub, "dollar-1")
        await dev.wait_request()
        await wait_status(stub, ex.execution_id, pb.DELIVERED)

        await dev.apublish(topic, b'{"status": "SUCCEEDED"}')
        _alive(app, dev)
        # Not a zombie: a SUBSCRIBE still gets its SUBACK, twice in a row...
        assert await dev.asubscribe("$emqx/commands/things/dollar-1/executions/a/request") == [1]
        assert await dev.asubscribe("$emqx/commands/things/dollar-1/executions/b/request", qos=0) == [0]
        stats = app.broker.stats
        dropped = stats["dropped.dollar_topic"] + stats["dropped.unrouted"] + stats["dropped.acl"]
        assert dropped == 1
        # ...and a response afterwards is routed and applied.
        await dev.arespond(ex.execution_id, "SUCCEEDED")
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
        assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]
        # The request the service sent went to dollar-1 only; the dropped publish reached nobody.
        assert [m.topic for m in _drain(watcher)] == []
        _alive(app, dev)


def _drain(dev: EmqxDevice) -> list[Any]:
    out = []
    while not dev.received.empty():
        out.append(dev.received.get_nowait())
    return out


# ---- keep-alive -------------------------------------------------------------------------------


def _connect_packet(client_id: str, keepalive: int) -> bytes:
    cid = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([4, 0x02]) + struct.pack("!H", keepalive)  # level 4, clean session
    payload = struct.pack("!H", len(cid)) + cid
    body = variable + payload
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


async def test_silent_client_is_disconnected_after_one_and_a_half_keepalive(app: FleetcmdApp) -> None:
    assert app.ports is not None and app.broker is not None
    reader, writer = await asyncio.open_connection(HOST, app.ports.mqtt)
    try:
        writer.write(_connect_packet("raw-silent", keepalive=1))
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), 3)
        assert connack == b"\x20\x02\x00\x00"
        t0 = time.monotonic()
        assert app.broker.is_connected("raw-silent")
        rest = await asyncio.wait_for(reader.read(), 4)  # EOF when the broker closes
        elapsed = time.monotonic() - t0
    finally:
        writer.close()
    assert rest == b""
    # [MQTT-3.1.2-24]: not before 1.5 x keep-alive (a healthy client may be that late), and soon after.
    assert 1.4 <= elapsed <= 2.0, f"disconnected after {elapsed:.2f}s for keep-alive 1 s"
    await wait_for(lambda: not app.broker.is_connected("raw-silent"), timeout=2, what="session to be released")
    assert app.broker.stats["keepalive_timeouts"] == 1


async def test_pinging_client_with_short_keepalive_stays_connected(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    assert app.broker is not None
    async with device(app, "pinger-1", keepalive=1) as dev:
        await asyncio.sleep(3.2)
        _alive(app, dev)
        assert app.broker.stats["keepalive_timeouts"] == 0
        done = await _complete(stub, dev, "pinger-1")
    assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]


async def test_raw_client_that_pings_stays_connected(app: FleetcmdApp) -> None:
    """Keep-alive counts any packet: a hand-written client sending PINGREQ every 0.9 s is not cut off."""
    assert app.ports is not None and app.broker is not None
    reader, writer = await asyncio.open_connection(HOST, app.ports.mqtt)
    try:
        writer.write(_connect_packet("raw-pinger", keepalive=1))
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 3) == b"\x20\x02\x00\x00"
        for _ in range(4):
            await asyncio.sleep(0.9)
            writer.write(b"\xc0\x00")  # PINGREQ
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(2), 1) == b"\xd0\x00"  # PINGRESP
        assert app.broker.is_connected("raw-pinger")
    finally:
        writer.close()
    assert app.broker.stats["keepalive_timeouts"] == 0


# ---- WebSocket --------------------------------------------------------------------------------


async def test_round_trip_over_websocket(small_app: FleetcmdApp, small_stub: pb_grpc.CommandServiceStub) -> None:
    app, stub = small_app, small_stub
    assert app.ports is not None and app.ports.ws is not None and app.ports.ws != app.ports.mqtt
    async with EmqxDevice(HOST, app.ports.ws, "ws-1", transport="websockets") as dev:
        ex = await send(stub, "ws-1", value=7)
        assert ex.status == pb.SENT
        msg = await dev.wait_message()
        assert msg.topic == f"$emqx/commands/things/ws-1/executions/{ex.execution_id}/request"
        assert msg.qos == 1
        assert set(json.loads(msg.payload)) == REQUEST_KEYS
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        await dev.arespond(ex.execution_id, "SUCCEEDED", {"via": "ws"})
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
    assert history(done) == ["SENT", "DELIVERED", "SUCCEEDED"]
    assert as_json(done.result) == {"via": "ws"}
