"""IndexedBroker: per-client work does not walk the fleet (pinned by counting, not by timing)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from amqtt.adapters import StreamReaderAdapter, WebSocketsReader
from amqtt.broker import Broker
from amqtt.mqtt.packet import MQTTFixedHeader, MQTTPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.mqtt.publish import PublishPayload, PublishVariableHeader
from amqtt.plugins.manager import PluginManager
from amqtt.session import Session

from broker_hooks.acl import DeviceAclPlugin
from server.app import FleetcmdApp
from tests.conftest import make_settings
from tests.devices import EmqxDevice

# The amqtt methods broker_hooks copies with a change (IndexedBroker: the first two; FleetBroker's
# _session_from_connect: the third); an amqtt upgrade that alters them must be looked at again, as
# the copies would silently drop the upstream change.
COPIED = {
    "_handle_client_session": "8b1b52a0",
    "_client_message_loop": "916c4647",
    "_initialize_client_session": "5dd89158",
    # FleetBroker's listeners: the same start_server call with a backlog, websockets.serve with a max_size.
    "_create_server_instance": "3925f482",
    # FleetBroker's copy adds the connection caps, the bounded reader, rate-limited logging and the
    # socket released at the end.
    "_client_connected": "432b724b",
}


def _digest(name: str) -> str:
    return hashlib.sha256(inspect.getsource(getattr(Broker, name)).encode()).hexdigest()[:8]


@pytest.mark.parametrize("name", sorted(COPIED))
def test_copied_amqtt_methods_are_unchanged_upstream(name: str) -> None:
    assert _digest(name) == COPIED[name], f"amqtt's Broker.{name} changed: re-check its copy in broker_hooks/"


# Other amqtt code broker_hooks/session.py copies or mirrors: FleetProtocolHandler.init_from_connect and
# .start are copies; SessionState mirrors Session._init_states; FleetSession swaps the queues that
# Session.__init__ creates.
COPIED_ELSEWHERE = {
    "BrokerProtocolHandler.init_from_connect": (BrokerProtocolHandler.init_from_connect, "036dc04c"),
    "BrokerProtocolHandler.start": (BrokerProtocolHandler.start, "f7637c34"),
    "ProtocolHandler.start": (ProtocolHandler.start, "684c58c1"),
    "Session._init_states": (Session._init_states, "63c76988"),
    "Session.__init__": (Session.__init__, "ad7888c0"),
}


@pytest.mark.parametrize("name", sorted(COPIED_ELSEWHERE))
def test_amqtt_code_mirrored_by_the_light_session_is_unchanged_upstream(name: str) -> None:
    code, pinned = COPIED_ELSEWHERE[name]
    digest = hashlib.sha256(inspect.getsource(code).encode()).hexdigest()[:8]
    assert digest == pinned, f"amqtt's {name} changed: re-check broker_hooks/session.py"


# amqtt code the message path re-implements: IndexedBroker._process_message/_broadcast_message
# (copies of _handle_message_delivery and _run_broadcast, routing with router.TopicRouter, which
# implements _matches; _del_all_subscriptions and _topic_filtering are replaced or short-cut, and
# fire_event is skipped when nobody listens), and handler.FastProtocolHandler (its _reader_loop is a
# copy; it decodes PUBLISH/PUBACK itself, publishes QoS 0/1 without mqtt_publish, and takes over the
# PUBACK of an incoming QoS 1 message in _handle_qos1_message_flow).
FAST_PATH_COPIES = {
    "Broker._handle_message_delivery": (Broker._handle_message_delivery, "89727723"),
    "Broker._run_broadcast": (Broker._run_broadcast, "e852128b"),
    "Broker._broadcast_message": (Broker._broadcast_message, "78ad4edb"),
    "Broker._matches": (Broker._matches, "c03b25d9"),
    "Broker._del_all_subscriptions": (Broker._del_all_subscriptions, "61557981"),
    "Broker._topic_filtering": (Broker._topic_filtering, "9259ae5e"),
    "ProtocolHandler._reader_loop": (ProtocolHandler._reader_loop, "93f3b8e4"),
    "ProtocolHandler.mqtt_publish": (ProtocolHandler.mqtt_publish, "30cb8f65"),
    "ProtocolHandler._handle_qos0_message_flow": (ProtocolHandler._handle_qos0_message_flow, "e7a88a9f"),
    "ProtocolHandler._handle_qos1_message_flow": (ProtocolHandler._handle_qos1_message_flow, "944e6a81"),
    "ProtocolHandler._send_packet": (ProtocolHandler._send_packet, "9f0ae4e3"),
    # Redelivery [MQTT-4.4.0-1]: FastProtocolHandler._retry_deliveries is a copy; it keeps routed messages
    # across a disconnect by relying on what the QoS 1/2 flows put into and take out of inflight_out, and
    # on _stop_waiters being the first thing stop() does.
    "ProtocolHandler._retry_deliveries": (ProtocolHandler._retry_deliveries, "16fd2ca8"),
    "ProtocolHandler._handle_qos2_message_flow": (ProtocolHandler._handle_qos2_message_flow, "f2d96f1f"),
    "ProtocolHandler._stop_waiters": (ProtocolHandler._stop_waiters, "78a59ebc"),
    "ProtocolHandler.stop": (ProtocolHandler.stop, "874ae887"),
    "ProtocolHandler.handle_puback": (ProtocolHandler.handle_puback, "7d8487de"),
    "ProtocolHandler.handle_publish": (ProtocolHandler.handle_publish, "b8f1fd32"),
    "MQTTFixedHeader.from_stream": (MQTTFixedHeader.from_stream, "3fc24bce"),
    "PublishVariableHeader.from_stream": (PublishVariableHeader.from_stream, "469ec610"),
    "PublishPayload.from_stream": (PublishPayload.from_stream, "54b078cb"),
    "PluginManager.fire_event": (PluginManager.fire_event, "31212e4f"),
}


# amqtt code broker_hooks/limits.py relies on or replaces: read_connect decodes the first packet's fixed
# header itself (MQTTPacket.from_stream did) and then the CONNECT from memory; the bounded readers
# subclass amqtt's TCP and WebSocket adapters (their read, and the WebSocket one's buffer).
FAST_PATH_COPIES |= {
    "MQTTPacket.from_stream": (MQTTPacket.from_stream, "b9b086f8"),
    "StreamReaderAdapter.read": (StreamReaderAdapter.read, "e4455345"),
    "WebSocketsReader.__init__": (WebSocketsReader.__init__, "90c0412c"),
    "WebSocketsReader.read": (WebSocketsReader.read, "7e5322a8"),
}


@pytest.mark.parametrize("name", sorted(FAST_PATH_COPIES))
def test_amqtt_code_reimplemented_by_the_fast_path_is_unchanged_upstream(name: str) -> None:
    code, pinned = FAST_PATH_COPIES[name]
    digest = hashlib.sha256(inspect.getsource(code).encode()).hexdigest()[:8]
    assert digest == pinned, f"amqtt's {name} changed: re-check broker_hooks/indexed.py, router.py and handler.py"


async def test_subscribe_connect_and_disconnect_do_not_touch_other_sessions(
    app: FleetcmdApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert app.ports is not None and app.broker is not None
    devices = [EmqxDevice("127.0.0.1", app.ports.mqtt, f"scale-{i}") for i in range(12)]
    for dev in devices[:10]:
        await dev.__aenter__()
    reprs = 0
    original = Session.__repr__

    def counting(self: Session) -> str:
        nonlocal reprs
        reprs += 1
        return original(self)

    monkeypatch.setattr(Session, "__repr__", counting)
    # amqtt 0.12.1 builds repr() of every subscribed session on each SUBSCRIBE and awaits a
    # retained-message lookup for every filter in the broker on each CONNECT.
    for dev in devices[10:]:
        await dev.__aenter__()
    assert reprs == 0
    # Disconnecting a clean session removes its own filters only.
    before = dict(app.broker._subscriptions)
    await devices[10].__aexit__(None, None, None)
    # The session monitor (every second) drops a disconnected clean session with its subscriptions.
    for _ in range(150):
        if devices[10].request_filter not in app.broker._subscriptions:
            break
        await asyncio.sleep(0.02)
    gone = set(before) - set(app.broker._subscriptions)
    assert gone == {devices[10].request_filter}
    assert app.broker.client_filters("scale-11") == {devices[11].request_filter: 1}
    for dev in devices[:10] + devices[11:]:
        await dev.__aexit__(None, None, None)


async def test_acl_is_evaluated_without_the_plugin_manager(app: FleetcmdApp, monkeypatch: pytest.MonkeyPatch) -> None:
    assert app.ports is not None and app.broker is not None
    assert any(isinstance(p, DeviceAclPlugin) for p in app.broker.plugins_manager.plugins)
    calls = 0

    async def counted(**kwargs: object) -> dict[object, object]:
        nonlocal calls
        calls += 1
        return {}

    monkeypatch.setattr(app.broker.plugins_manager, "map_plugin_topic", counted)
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "acl-direct") as dev:
        assert await dev.asubscribe("$emqx/commands/things/other/executions/+/request") == [0x80]
        assert await dev.asubscribe(dev.request_filter) == [1]
    assert calls == 0


async def test_mqtt_listener_backlog_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncio's default backlog (100) drops SYNs when a fleet reconnects at once; the setting reaches listen().
    backlogs: list[int | None] = []
    real_start_server = asyncio.start_server

    async def spy(*args: Any, **kwargs: Any) -> asyncio.Server:
        backlogs.append(kwargs.get("backlog"))
        return await real_start_server(*args, **kwargs)

    monkeypatch.setattr(asyncio, "start_server", spy)
    async with FleetcmdApp(make_settings(tmp_path / "data", mqtt_backlog=777)) as app:
        assert app.ports is not None and app.ports.mqtt
        assert backlogs == [777]
        if shutil.which("ss"):
            # For a listening socket, ss shows the backlog as Send-Q.
            command = ["ss", "-ltnH", f"sport = :{app.ports.mqtt}"]
            done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=10, check=True)
            out = done.stdout.split()
            assert out[0] == "LISTEN" and out[2] == "777", out
