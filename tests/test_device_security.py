"""Device security at the broker: credentials, topic ACL, forced disconnects, TLS listeners.

Real paho clients and a real service on 127.0.0.1 (port 0), secure mode
(``allow_anonymous=False``) unless a test says otherwise. Things are registered
straight through the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from amqtt.contexts import BrokerConfig, ListenerType
from amqtt.session import Session
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker_hooks.acl import TopicAcl
from broker_hooks.auth import DeviceAuthPlugin
from broker_hooks.config import broker_config
from broker_hooks.rules import Dialect, TopicPattern
from server.app import FleetcmdApp
from server.config import Settings, SettingsError
from server.core.lifecycle import Status
from server.core.models import Execution
from server.core.validation import SendCommand
from server.dialects import emqx
from tests.certs import TlsFiles, self_signed
from tests.conftest import make_settings
from tests.devices import EmqxDevice, wait_for

HOST = "127.0.0.1"
NOT_AUTHORIZED = "Not authorized"


# ---- helpers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[FleetcmdApp]:
    async with FleetcmdApp(settings) as app:
        yield app


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FleetcmdApp]:
    async with running(make_settings(tmp_path / "data", allow_anonymous=False)) as svc:
        yield svc


async def register(app: FleetcmdApp, thing_id: str) -> str:
    """Register a thing; returns its password."""
    assert app.registry is not None
    _record, password, _kaa = await app.registry.create_thing(thing_id, "", {})
    return password


def device(app: FleetcmdApp, thing: str, password: str | None, *, port: int | None = None, **kw: Any) -> EmqxDevice:
    """A device that logs in as itself (username = client id = thing id) unless told otherwise."""
    assert app.ports is not None
    kw.setdefault("username", thing if password is not None else None)
    return EmqxDevice(HOST, port if port is not None else app.ports.mqtt, thing, password=password, **kw)  # type: ignore[arg-type]


async def refused(dev: EmqxDevice) -> Any:
    """Connect and expect a refusal; returns paho's reason code."""
    with pytest.raises(ConnectionRefusedError):
        await dev.__aenter__()
    await asyncio.to_thread(dev.client.loop_stop)
    return dev.connect_rc


async def send(app: FleetcmdApp, thing: str, action: str = "reboot") -> Execution:
    assert app.core is not None
    return await app.core.send(SendCommand(thing, action, {"n": 1}, 30, ""))


async def wait_status(app: FleetcmdApp, execution_id: str, status: Status, timeout: float = 5) -> Execution:
    assert app.core is not None
    deadline = time.monotonic() + timeout
    while True:
        ex = await app.core.get(execution_id)
        if ex.status == status:
            return ex
        if ex.status.final or time.monotonic() > deadline:
            pytest.fail(f"{execution_id}: wanted {status.name}, is {ex.status.name}")
        await asyncio.sleep(0.02)


async def wait_event(event: Any, timeout: float = 5) -> bool:
    return bool(await asyncio.to_thread(event.wait, timeout))


def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
    dev.respond(execution_id, "SUCCEEDED", {"ok": True})


async def healthy(app: FleetcmdApp, dev: EmqxDevice) -> None:
    """The connection is alive and not a zombie: a SUBSCRIBE to its own topic still gets a SUBACK."""
    assert app.broker is not None and app.broker.is_connected(dev.thing_id)
    assert await dev.asubscribe(f"$emqx/commands/things/{dev.thing_id}/executions/probe/request") == [1]


def request_topic(thing: str, execution: str = "e1") -> str:
    return f"$emqx/commands/things/{thing}/executions/{execution}/request"


def response_topic(thing: str, execution: str = "e1") -> str:
    return f"$emqx/commands/things/{thing}/executions/{execution}/response"


# ---- authentication ---------------------------------------------------------------------------


async def test_registered_thing_with_its_token_connects_and_round_trips(app: FleetcmdApp) -> None:
    password = await register(app, "sec-1")
    async with device(app, "sec-1", password, on_request=answer) as dev:
        assert str(dev.connect_rc) == "Success"
        ex = await send(app, "sec-1")
        done = await wait_status(app, ex.execution_id, Status.SUCCEEDED)
        assert json.loads(done.result_json or "null") == {"ok": True}
    assert app.broker is not None and app.broker.stats["auth_failures"] == 0


@pytest.mark.parametrize(
    ("case", "client_id", "username", "password"),
    [
        ("wrong password", "sec-a", "sec-a", "not-the-token"),
        ("unknown thing", "ghost", "ghost", "whatever"),
        ("no credentials", "sec-a", None, None),
        ("username only", "sec-a", "sec-a", None),
        # sec-b's own, valid credentials, but presented under sec-a's client id.
        ("username is not the client id", "sec-a", "sec-b", "<b>"),
        ("token of another thing", "sec-a", "sec-a", "<b>"),
        ("empty client id", "", "sec-a", "<a>"),
    ],
)
async def test_bad_credentials_are_refused_not_authorized(
    app: FleetcmdApp, caplog: pytest.LogCaptureFixture, case: str, client_id: str, username: str | None, password: str | None
) -> None:
    assert app.broker is not None and app.ports is not None
    tokens = {"<a>": await register(app, "sec-a"), "<b>": await register(app, "sec-b")}
    password = tokens.get(password or "", password)
    dev = EmqxDevice(HOST, app.ports.mqtt, client_id, username=username, password=password, subscribe=False)
    with caplog.at_level(logging.INFO, logger="broker_hooks"):
        rc = await refused(dev)
    assert str(rc) == NOT_AUTHORIZED, case
    assert app.broker.stats["auth_failures"] == 1
    assert not app.broker.is_connected("sec-a")
    refusals = [r.getMessage() for r in caplog.records if "device refused" in r.getMessage()]
    assert len(refusals) == 1 and all(r.levelno == logging.INFO for r in caplog.records if "device refused" in r.getMessage())
    if password:
        assert password not in caplog.text  # never log the password


async def test_refused_connect_does_not_disturb_the_connected_thing(app: FleetcmdApp) -> None:
    """A CONNECT with a connected thing's client id but a wrong token must neither take over nor end
    the real device's connection (amqtt's take-over runs before authentication)."""
    assert app.broker is not None and app.ports is not None
    password = await register(app, "victim")
    async with device(app, "victim", password, on_request=answer, clean_session=False) as real:
        for clean in (True, False):
            intruder = EmqxDevice(HOST, app.ports.mqtt, "victim", username="victim", password="guess", clean_session=clean)
            assert str(await refused(intruder)) == NOT_AUTHORIZED
            await asyncio.sleep(0.1)
            assert not real.disconnected.is_set(), f"clean_session={clean}: the real device was disconnected"
            await healthy(app, real)
            ex = await send(app, "victim")
            await wait_status(app, ex.execution_id, Status.SUCCEEDED)
        assert app.broker.stats["takeovers"] == 0
        assert app.broker.stats["auth_failures"] == 2


async def test_allow_anonymous_admits_anyone_and_keeps_persistent_sessions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fleetcmd"):
        async with running(make_settings(tmp_path / "data", allow_anonymous=True)) as app:
            assert app.broker is not None and app.ports is not None
            assert any(r.levelno == logging.WARNING and "allow_anonymous" in r.getMessage() for r in caplog.records)
            # No credentials at all, and credentials nobody checks: both admitted.
            async with EmqxDevice(HOST, app.ports.mqtt, "anon-1", on_request=answer) as dev:
                ex = await send(app, "anon-1")
                await wait_status(app, ex.execution_id, Status.SUCCEEDED)
                await healthy(app, dev)
            async with EmqxDevice(HOST, app.ports.mqtt, "anon-2", username="x", password="y"):
                pass
            # A persistent session keeps its subscription (session not marked anonymous): the device
            # reconnects without subscribing and still gets what was sent while it was away.
            persistent = EmqxDevice(HOST, app.ports.mqtt, "anon-p", clean_session=False)
            async with persistent:
                session, _handler = app.broker._sessions["anon-p"]
                assert session.is_anonymous is False
            ex = await send(app, "anon-p")
            await asyncio.sleep(1.2)  # amqtt's session monitor drops anonymous sessions within ~1 s
            async with EmqxDevice(HOST, app.ports.mqtt, "anon-p", clean_session=False, subscribe=False) as again:
                _topic, body = await again.wait_request()
                assert body["commandId"] == ex.command_id
            # The ACL applies in development mode too.
            async with EmqxDevice(HOST, app.ports.mqtt, "anon-3", subscribe=False) as other:
                assert await other.asubscribe([request_filter("anon-1"), request_filter("anon-3")]) == [0x80, 1]
            assert app.broker.stats["auth_failures"] == 0


def request_filter(thing: str) -> str:
    return f"$emqx/commands/things/{thing}/executions/+/request"


async def test_second_connection_with_same_credentials_takes_over(app: FleetcmdApp) -> None:
    assert app.broker is not None
    password = await register(app, "twin")
    async with device(app, "twin", password) as first, device(app, "twin", password, on_request=answer) as second:
        assert await wait_event(first.disconnected), "the first connection was not ended"
        await asyncio.to_thread(first.client.loop_stop)  # paho would reconnect and take it back
        ex = await send(app, "twin")
        await wait_status(app, ex.execution_id, Status.SUCCEEDED)
        await healthy(app, second)
        assert app.broker.stats["takeovers"] == 1


# ---- ACL ----------------------------------------------------------------------------------------


async def test_subscribe_to_another_things_topics_gets_suback_failure(app: FleetcmdApp) -> None:
    assert app.broker is not None
    pa, pb = await register(app, "acl-a"), await register(app, "acl-b")
    async with device(app, "acl-a", pa, subscribe=False) as a, device(app, "acl-b", pb) as b:
        filters = {
            request_filter("acl-a"): 1,  # own, any execution
            request_topic("acl-a", "exec-9"): 1,  # own, one execution
            request_filter("acl-b"): 0x80,  # another thing's requests
            request_topic("acl-b", "exec-9"): 0x80,
            "$emqx/commands/things/+/executions/+/request": 0x80,  # everyone's
            "$emqx/commands/things/acl-a/executions/#": 0x80,  # own, but widened past the request topics
            "$emqx/commands/things/acl-a/+/+/request": 0x80,
            response_topic("acl-b"): 0x80,  # responses are not for devices to read
            response_topic("acl-a"): 0x80,
            "#": 0x80,
            "$emqx/#": 0x80,
            "$SYS/#": 0x80,
            "fleet/anything": 0x80,
        }
        # One SUBSCRIBE packet: the denied filters fail, the others in the same packet are granted.
        assert await a.asubscribe(list(filters)) == list(filters.values())
        assert app.broker.stats["denied.subscribe"] == sum(1 for v in filters.values() if v == 0x80)
        # acl-b's request goes to acl-b only.
        ex = await send(app, "acl-b")
        await b.wait_request()
        await wait_status(app, ex.execution_id, Status.DELIVERED)
        await asyncio.sleep(0.2)
        assert a.received.empty()
        await healthy(app, a)


async def test_publish_to_another_things_response_is_dropped(app: FleetcmdApp) -> None:
    assert app.broker is not None
    pa, pb = await register(app, "acl-c"), await register(app, "acl-d")
    async with device(app, "acl-c", pa, on_request=answer) as c, device(app, "acl-d", pb) as d:
        ex = await send(app, "acl-d")
        await d.wait_request()
        await wait_status(app, ex.execution_id, Status.DELIVERED)
        # acl-c forges acl-d's answer: PUBACKed (MQTT 3.1.1 has no way to refuse), dropped, counted.
        await c.apublish(response_topic("acl-d", ex.execution_id), b'{"status": "SUCCEEDED"}')
        await wait_for(lambda: app.broker is not None and app.broker.stats["dropped.acl"] == 1, what="the ACL drop")
        await healthy(app, c)
        await asyncio.sleep(0.2)
        assert app.core is not None
        untouched = await app.core.get(ex.execution_id)
        assert untouched.status == Status.DELIVERED
        assert [h.status for h in untouched.history] == [Status.SENT, Status.DELIVERED]
        # acl-c's own traffic still works after the drop.
        own = await send(app, "acl-c")
        await wait_status(app, own.execution_id, Status.SUCCEEDED)
        assert app.broker.stats["dropped.acl"] == 1


async def test_no_device_may_publish_to_a_request_topic(app: FleetcmdApp) -> None:
    assert app.broker is not None
    pa, pb = await register(app, "acl-e"), await register(app, "acl-f")
    async with device(app, "acl-e", pa) as e, device(app, "acl-f", pb) as f:
        forged = json.dumps({"commandId": "x", "action": "unlock", "params": {}, "timestamp": 1, "ttl": 30}).encode()
        await e.apublish(request_topic("acl-f", "forged"), forged)  # another thing's request
        await e.apublish(request_topic("acl-e", "forged"), forged)  # its own request topic
        await e.apublish("fleet/other", b"x")  # anything else
        await wait_for(lambda: app.broker is not None and app.broker.stats["dropped.acl"] == 3, what="the ACL drops")
        assert app.broker.stats["dropped.unrouted"] == 0
        await asyncio.sleep(0.2)
        assert f.received.empty() and e.received.empty()
        await healthy(app, e)
        await healthy(app, f)


# ---- forced disconnects -----------------------------------------------------------------------


async def test_rotated_credentials_end_the_connection_and_the_old_token(app: FleetcmdApp) -> None:
    assert app.broker is not None and app.registry is not None
    old = await register(app, "rot-1")
    dev = device(app, "rot-1", old)
    async with dev:
        new, _kaa = await app.registry.rotate_credentials("rot-1")
        assert await wait_event(dev.disconnected), "the live connection was not closed"
        # paho reconnects on its own with the old token: refused.
        await wait_for(lambda: dev.connect_rc is not None and str(dev.connect_rc) == NOT_AUTHORIZED, what="refusal")
        await asyncio.to_thread(dev.client.loop_stop)
        assert app.broker.stats["forced_disconnects"] == 1
    assert str(await refused(device(app, "rot-1", old))) == NOT_AUTHORIZED
    async with device(app, "rot-1", new, on_request=answer):
        ex = await send(app, "rot-1")
        await wait_status(app, ex.execution_id, Status.SUCCEEDED)


async def test_deleted_thing_is_disconnected_and_refused(app: FleetcmdApp) -> None:
    assert app.broker is not None and app.registry is not None
    password = await register(app, "del-1")
    dev = device(app, "del-1", password)
    async with dev:
        await app.registry.delete_thing("del-1")
        assert await wait_event(dev.disconnected), "the live connection was not closed"
        await asyncio.to_thread(dev.client.loop_stop)
        await wait_for(lambda: app.broker is not None and not app.broker.is_connected("del-1"), what="disconnect")
    assert str(await refused(device(app, "del-1", password))) == NOT_AUTHORIZED


# ---- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return self_signed(tmp_path / "tls")


def tls_settings(tmp_path: Path, tls: TlsFiles, **overrides: Any) -> Settings:
    base = make_settings(tmp_path / "data", allow_anonymous=False, tls_cert_file=str(tls.cert), tls_key_file=str(tls.key))
    return base.replace(**overrides)


def plain_connect_fails(port: int) -> bool:
    """A plaintext MQTT CONNECT to ``port`` gets no CONNACK (nothing listens, or TLS wants a handshake)."""
    connect = bytes.fromhex("101000044d5154540402003c0004") + b"test"
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.settimeout(2)
            sock.sendall(connect)
            data = sock.recv(4)
    except OSError:
        return True
    return not data.startswith(b"\x20\x02")


async def test_tls_listeners_only(tmp_path: Path, tls: TlsFiles, caplog: pytest.LogCaptureFixture) -> None:
    """mqtt_port=-1: only MQTT over TLS and secure WebSocket; gRPC with TLS."""
    settings = tls_settings(tmp_path, tls, mqtt_port=-1, mqtts_port=0, wss_port=0, grpc_tls=True)
    with caplog.at_level(logging.INFO, logger="fleetcmd"):
        async with running(settings) as app:
            assert app.ports is not None and app.broker is not None
            assert app.ports.mqtt is None and app.ports.ws is None
            assert app.ports.mqtts and app.ports.wss and app.ports.mqtts != app.ports.wss
            assert sorted(app.broker.listener_ports()) == ["mqtts", "wss"]
            ready = next(r.getMessage() for r in caplog.records if "fleetcmd ready" in r.getMessage())
            assert "mqtt=off ws=off" in ready
            assert f"mqtts={HOST}:{app.ports.mqtts} wss={HOST}:{app.ports.wss}" in ready and "grpc_tls=on" in ready

            password = await register(app, "tls-1")
            for port, transport in ((app.ports.mqtts, "tcp"), (app.ports.wss, "websockets")):
                dev = device(app, "tls-1", password, port=port, transport=transport, tls_ca=str(tls.ca), on_request=answer)
                async with dev:
                    ex = await send(app, "tls-1")
                    await wait_status(app, ex.execution_id, Status.SUCCEEDED)
            # Wrong token over TLS: still refused.
            bad = device(app, "tls-1", "nope", port=app.ports.mqtts, tls_ca=str(tls.ca))
            assert str(await refused(bad)) == NOT_AUTHORIZED
            # The TLS port does not speak plaintext MQTT.
            assert await asyncio.to_thread(plain_connect_fails, app.ports.mqtts)

            creds = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())
            async with grpc.aio.secure_channel(f"{HOST}:{app.ports.grpc}", creds) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async with grpc.aio.insecure_channel(f"{HOST}:{app.ports.grpc}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plain_websocket_next_to_tls_keeps_every_listener_as_configured(tmp_path: Path, tls: TlsFiles) -> None:
    """amqtt's inheritance pitfall: with the plain WebSocket listener as ``default``, the MQTT-over-TLS
    listener must stay TCP, and the plain one must not turn into TLS."""
    settings = tls_settings(tmp_path, tls, mqtt_port=-1, ws_port=0, mqtts_port=0)
    async with running(settings) as app:
        assert app.ports is not None and app.ports.ws and app.ports.mqtts and app.ports.mqtt is None
        password = await register(app, "mix-1")
        async with device(app, "mix-1", password, port=app.ports.ws, transport="websockets", on_request=answer):
            ex = await send(app, "mix-1")
            await wait_status(app, ex.execution_id, Status.SUCCEEDED)
        async with device(app, "mix-1", password, port=app.ports.mqtts, tls_ca=str(tls.ca), on_request=answer):
            ex = await send(app, "mix-1")
            await wait_status(app, ex.execution_id, Status.SUCCEEDED)


def test_broker_config_listeners_inherit_nothing(tls: TlsFiles) -> None:
    cases = {
        # (mqtt, ws, mqtts, wss) -> expected {amqtt name: (type, ssl)}
        (0, -1, -1, -1): {"default": (ListenerType.TCP, False)},
        (0, 0, 0, 0): {
            "default": (ListenerType.TCP, False),
            "ws": (ListenerType.WS, False),
            "mqtts": (ListenerType.TCP, True),
            "wss": (ListenerType.WS, True),
        },
        (-1, 0, 0, 0): {"default": (ListenerType.WS, False), "mqtts": (ListenerType.TCP, True), "wss": (ListenerType.WS, True)},
        (-1, -1, 0, 0): {"default": (ListenerType.TCP, True), "wss": (ListenerType.WS, True)},
        (-1, 0, -1, 0): {"default": (ListenerType.WS, False), "wss": (ListenerType.WS, True)},
        (-1, -1, -1, 0): {"default": (ListenerType.WS, True)},
    }
    for (mqtt, ws, mqtts, wss), expected in cases.items():
        config = broker_config(
            bind=HOST,
            mqtt_port=mqtt,
            ws_port=ws,
            mqtts_port=mqtts,
            wss_port=wss,
            tls_cert_file=str(tls.cert),
            tls_key_file=str(tls.key),
            sys_interval=0,
        )
        assert isinstance(config, BrokerConfig)
        got = {name: (listener.type, listener.ssl) for name, listener in config.listeners.items()}
        assert got == expected, (mqtt, ws, mqtts, wss)
        for listener in config.listeners.values():
            assert listener.bind.startswith(f"{HOST}:")
            assert (listener.certfile is not None) == listener.ssl
    with pytest.raises(ValueError, match="at least one"):
        broker_config(bind=HOST, mqtt_port=-1, ws_port=-1, sys_interval=0)
    with pytest.raises(ValueError, match="TLS"):
        broker_config(bind=HOST, mqtt_port=-1, ws_port=-1, mqtts_port=0, sys_interval=0)


def test_tls_settings_are_validated(tmp_path: Path, tls: TlsFiles) -> None:
    base: dict[str, Any] = {"data_dir": tmp_path}
    for bad in (
        {"mqtts_port": 8883},
        {"wss_port": 8443, "tls_cert_file": str(tls.cert)},
        {"grpc_tls": True, "tls_key_file": str(tls.key)},
        {"mqtts_port": 8883, "tls_cert_file": str(tmp_path / "missing.pem"), "tls_key_file": str(tls.key)},
        {"mqtt_port": -1},  # no MQTT listener left
        {"mqtts_port": -2},
    ):
        with pytest.raises(SettingsError):
            Settings(**base, **bad)
    ok = Settings(**base, mqtt_port=-1, mqtts_port=8883, grpc_tls=True, tls_cert_file=str(tls.cert), tls_key_file=str(tls.key))
    assert ok.tls_enabled
    env = {
        "FLEETCMD_MQTT_PORT": "-1",
        "FLEETCMD_WSS_PORT": "8443",
        "FLEETCMD_GRPC_TLS": "true",
        "FLEETCMD_TLS_CERT_FILE": str(tls.cert),
        "FLEETCMD_TLS_KEY_FILE": str(tls.key),
    }
    from_env = Settings.from_env(env, data_dir=tmp_path)
    assert (from_env.mqtt_port, from_env.wss_port, from_env.grpc_tls, from_env.tls_cert_file) == (-1, 8443, True, str(tls.cert))


# ---- units: ACL from the dialects, cost of authentication ---------------------------------------


def test_acl_comes_from_the_dialects() -> None:
    acl = TopicAcl.of([emqx.DIALECT])
    assert acl.may_subscribe("t1", request_filter("t1"))
    assert acl.may_subscribe("t1", request_topic("t1", "x"))
    assert acl.may_publish("t1", response_topic("t1", "x"))
    for topic in (response_topic("t2"), request_topic("t1"), request_topic("t2"), "t1/x", "$emqx/commands/things/t1"):
        assert not acl.may_publish("t1", topic), topic
    widened = ("#", "+/#", "$emqx/commands/things/t1/executions/x+/request", "$emqx/commands/things/t1/#")
    for topic_filter in (request_filter("t2"), *widened):
        assert not acl.may_subscribe("t1", topic_filter), topic_filter
    # Client ids that are not a single plain topic level never get anything.
    for client_id in ("+", "#", "a/b", "$t", ""):
        assert not acl.may_subscribe(client_id, f"$emqx/commands/things/{client_id}/executions/+/request")
        assert not acl.may_subscribe(client_id, "$emqx/commands/things/+/executions/+/request")
        assert not acl.may_publish(client_id, f"$emqx/commands/things/{client_id}/executions/e/response")

    # Another dialect (a Kaa-like one) brings its own device topics.
    kaa = Dialect(
        name="kaa",
        rules=(),
        device_publish=(TopicPattern("kp1/{av}/cex/{thing}/result/{command}"),),
        device_subscribe=(TopicPattern("kp1/{av}/cex/{thing}/command/{command}"),),
    )
    both = TopicAcl.of([emqx.DIALECT, kaa])
    assert both.may_subscribe("t1", "kp1/app1/cex/t1/command/+") and both.may_subscribe("t1", request_filter("t1"))
    assert both.may_publish("t1", "kp1/app1/cex/t1/result/reboot")
    assert not both.may_publish("t1", "kp1/app1/cex/t2/result/reboot")
    assert not both.may_publish("t1", "kp1/app1/cex/t1/command/reboot")

    with pytest.raises(ValueError, match="thing"):
        Dialect("bad", (), (TopicPattern("x/{id}/response"),), ())
    with pytest.raises(ValueError, match="subscribe topic"):
        # A device could publish where devices receive requests.
        Dialect("bad", (), (TopicPattern("c/{thing}/{kind}"),), (TopicPattern("c/{thing}/request"),))
    assert [r.pattern for r in emqx.DIALECT.rules] == [emqx.RESPONSE]


async def test_thousand_device_authentications_take_milliseconds(app: FleetcmdApp) -> None:
    """10,000 device connects must cost seconds at most in authentication: measure 1,000."""
    assert app.broker is not None
    plugin = app.broker.plugins_manager.get_plugin("DeviceAuthPlugin")
    assert isinstance(plugin, DeviceAuthPlugin)
    tokens = {f"perf-{i}": await register(app, f"perf-{i}") for i in range(50)}
    sessions = []
    for i in range(1000):
        thing = f"perf-{i % 50}"
        session = Session()
        session.client_id, session.username, session.password = thing, thing, tokens[thing]
        sessions.append(session)
    t0 = time.perf_counter()
    results = [await plugin.authenticate(session=s) for s in sessions]
    elapsed = time.perf_counter() - t0
    assert all(results)
    print(f"\n1,000 device authentications: {elapsed * 1000:.1f} ms ({elapsed * 1e6 / 1000:.1f} us each)")
    assert elapsed < 1.0  # 10,000 connects -> well under 10 s (typically a few ms per 1,000)
