"""IndexedBroker: per-client work does not walk the fleet (pinned by counting, not by timing)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import pytest
from amqtt.broker import Broker
from amqtt.session import Session

from broker_hooks.acl import DeviceAclPlugin
from server.app import FleetcmdApp
from tests.devices import EmqxDevice

# The amqtt methods broker_hooks copies with a change (IndexedBroker: the first two; FleetBroker's
# _session_from_connect: the third); an amqtt upgrade that alters them must be looked at again, as
# the copies would silently drop the upstream change.
COPIED = {
    "_handle_client_session": "8b1b52a0",
    "_client_message_loop": "916c4647",
    "_initialize_client_session": "5dd89158",
}


def _digest(name: str) -> str:
    return hashlib.sha256(inspect.getsource(getattr(Broker, name)).encode()).hexdigest()[:8]


@pytest.mark.parametrize("name", sorted(COPIED))
def test_copied_amqtt_methods_are_unchanged_upstream(name: str) -> None:
    assert _digest(name) == COPIED[name], f"amqtt's Broker.{name} changed: re-check its copy in broker_hooks/"


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
