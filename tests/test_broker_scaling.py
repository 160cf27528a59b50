"""IndexedBroker: per-client work does not walk the fleet (pinned by counting, not by timing)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import re
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

from broker_hooks import amqtt_fork
from broker_hooks.acl import DeviceAclPlugin
from broker_hooks.amqtt_fork import broker as fork_broker
from broker_hooks.amqtt_fork import handler as fork_handler
from broker_hooks.amqtt_fork import indexed, limits
from broker_hooks.amqtt_fork import session as fork_session
from server.app import FleetcmdApp
from tests.conftest import make_settings
from tests.devices import EmqxDevice

# Every amqtt 0.12.1 function the fork (broker_hooks/amqtt_fork/) copies, overrides, relies on or
# re-implements: "Class.method" -> (fork module holding the copy, hash of the upstream source it was made
# from). An amqtt upgrade that alters one must be looked at again, as the copy would silently drop the
# upstream change. The fork's header (broker_hooks/amqtt_fork/__init__.py) lists the same functions.
UPSTREAM: dict[str, type] = {
    "Broker": Broker,
    "Session": Session,
    "BrokerProtocolHandler": BrokerProtocolHandler,
    "ProtocolHandler": ProtocolHandler,
    "MQTTFixedHeader": MQTTFixedHeader,
    "MQTTPacket": MQTTPacket,
    "PublishVariableHeader": PublishVariableHeader,
    "PublishPayload": PublishPayload,
    "PluginManager": PluginManager,
    "StreamReaderAdapter": StreamReaderAdapter,
    "WebSocketsReader": WebSocketsReader,
}
PINS: dict[str, tuple[str, str]] = {
    "Broker.__init__": ("indexed", "5158ff3c"),
    "Broker.start": ("indexed", "bd1c1651"),
    "Broker.add_subscription": ("indexed", "07757b63"),
    "Broker._del_subscription": ("indexed", "415f3492"),
    "Broker._del_all_subscriptions": ("indexed", "61557981"),
    "Broker._topic_filtering": ("indexed", "9259ae5e"),
    "Broker._handle_message_delivery": ("indexed", "89727723"),
    "Broker._run_broadcast": ("indexed", "e852128b"),
    "Broker._broadcast_message": ("indexed", "78ad4edb"),
    "Broker._matches": ("router", "c03b25d9"),
    "Broker._shutdown_broadcast_loop": ("indexed", "0667eb74"),
    "Broker._handle_client_session": ("indexed", "8b1b52a0"),
    "Broker._client_message_loop": ("indexed", "916c4647"),
    "Broker._create_server_instance": ("broker", "3925f482"),
    "Broker._client_connected": ("broker", "432b724b"),
    "Broker._initialize_client_session": ("broker", "5dd89158"),
    "Broker._authenticate": ("broker", "4d7db8cc"),
    "Broker._handle_disconnect": ("broker", "8c3b8702"),
    "Broker._handle_subscription": ("broker", "3dae18af"),
    "Broker._delete_session": ("broker", "a8333dde"),
    "Session.__init__": ("session", "ad7888c0"),
    "Session._init_states": ("session", "63c76988"),
    "BrokerProtocolHandler.__init__": ("handler", "95a1c78f"),
    "BrokerProtocolHandler.start": ("session", "f7637c34"),
    "BrokerProtocolHandler.init_from_connect": ("session", "036dc04c"),
    "BrokerProtocolHandler.handle_read_timeout": ("handler", "ffd79f12"),
    "ProtocolHandler.start": ("session", "684c58c1"),
    "ProtocolHandler._init_session": ("session", "d8f69797"),
    "ProtocolHandler.attach": ("handler", "ff8ecc04"),
    "ProtocolHandler._reader_loop": ("handler", "93f3b8e4"),
    "ProtocolHandler.mqtt_publish": ("handler", "30cb8f65"),
    "ProtocolHandler._handle_qos0_message_flow": ("handler", "e7a88a9f"),
    "ProtocolHandler._handle_qos1_message_flow": ("handler", "944e6a81"),
    "ProtocolHandler._handle_qos2_message_flow": ("handler", "f2d96f1f"),
    "ProtocolHandler._retry_deliveries": ("handler", "16fd2ca8"),
    "ProtocolHandler._stop_waiters": ("handler", "78a59ebc"),
    "ProtocolHandler.stop": ("handler", "874ae887"),
    "ProtocolHandler._send_packet": ("handler", "9f0ae4e3"),
    "ProtocolHandler.handle_puback": ("handler", "7d8487de"),
    "ProtocolHandler.handle_publish": ("handler", "b8f1fd32"),
    "MQTTFixedHeader.from_stream": ("handler", "3fc24bce"),
    "MQTTPacket.from_stream": ("limits", "b9b086f8"),
    "PublishVariableHeader.from_stream": ("handler", "469ec610"),
    "PublishPayload.from_stream": ("handler", "54b078cb"),
    "PluginManager.fire_event": ("indexed", "31212e4f"),
    "StreamReaderAdapter.__init__": ("limits", "2594a16c"),
    "StreamReaderAdapter.read": ("limits", "e4455345"),
    "WebSocketsReader.__init__": ("limits", "90c0412c"),
    "WebSocketsReader.read": ("limits", "7e5322a8"),
}
FORK_MODULES = {"indexed", "broker", "session", "handler", "limits", "router"}


def upstream_source(name: str) -> str:
    cls_name, method = name.split(".")
    return inspect.getsource(vars(UPSTREAM[cls_name])[method])


@pytest.mark.parametrize("name", sorted(PINS))
def test_amqtt_code_the_fork_copies_is_unchanged_upstream(name: str) -> None:
    module, pinned = PINS[name]
    digest = hashlib.sha256(upstream_source(name).encode()).hexdigest()[:8]
    where = f"broker_hooks/{module}.py" if module == "router" else f"broker_hooks/amqtt_fork/{module}.py"
    assert digest == pinned, f"amqtt's {name} changed: re-check its copy in {where}"


def header_rows() -> dict[str, tuple[str, str]]:
    """The fork header's table: upstream "Class.method" -> (fork module, kind)."""
    doc = amqtt_fork.__doc__ or ""
    kinds = "copy|override|relied on|re-implemented"
    rows = re.findall(rf"^\* ``(\w+\.\w+)`` \((\w+), ({kinds})\): \S", doc, flags=re.MULTILINE)
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)), "a function is listed twice in the fork's header"
    return {name: (module, kind) for name, module, kind in rows}


def test_the_fork_header_lists_exactly_the_pinned_functions() -> None:
    rows = header_rows()
    assert set(rows) - set(PINS) == set(), "listed in broker_hooks/amqtt_fork/__init__.py but not pinned here"
    assert set(PINS) - set(rows) == set(), "pinned here but not listed in broker_hooks/amqtt_fork/__init__.py"
    for name, (module, kind) in rows.items():
        assert module == PINS[name][0], f"{name}: the header and the pin name different fork modules"
        assert module in FORK_MODULES and kind in {"copy", "override", "relied on", "re-implemented"}, name


def test_every_upstream_method_the_fork_overrides_is_listed() -> None:
    """A fork class that defines a method its amqtt base has must have that method in the header (and so a pin)."""
    listed = set(header_rows())
    missing = []
    for module in (indexed, fork_broker, fork_session, fork_handler, limits):
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and cls.__module__ == module.__name__):
                continue
            for method, value in vars(cls).items():
                if not inspect.isfunction(value) or (method.startswith("__") and method != "__init__"):
                    continue
                owner = next(
                    (b for b in cls.__mro__[1:] if b.__module__.startswith("amqtt") and method in vars(b)),
                    None,
                )
                if owner is not None and f"{owner.__name__}.{method}" not in listed:
                    missing.append(f"{cls.__name__}.{method} overrides {owner.__name__}.{method}")
    assert not missing, missing


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
