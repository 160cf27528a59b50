"""Adding a dialect means adding one bundle and registering it in one list (issue 14, item 2).

A tiny dialect, defined only here: requests on ``probe/{thing}/{execution}/req`` as ``{"do": action}``,
answers on ``probe/{thing}/{execution}/resp`` as a bare status name. Its decoder produces the core's
neutral :class:`ExecutionReport`, so the core's report path applies it; its route claims the things
whose id starts with ``probe-``. It is registered by building the app with ``DIALECTS`` plus it, and
a real MQTT client (authenticated, so the dialect's ACL grants are what let it in) runs a command
round trip through it while an EMQX device of the same app keeps the default route.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import pytest

from broker_hooks.rules import DecodeError, Dialect, LifecycleAction, Rule, TopicPattern
from server.app import FleetcmdApp
from server.core.delivery import DeviceLink, Message
from server.core.errors import FleetcmdError
from server.core.lifecycle import DEVICE_REPORTABLE, Status
from server.core.models import DeviceReport, Execution, ExecutionReport
from server.core.validation import SendCommand
from server.dialects import DIALECTS
from server.dialects.bundle import DialectBundle, DialectContext, DialectRuntime
from tests.conftest import make_settings
from tests.devices import EmqxDevice

HOST = "127.0.0.1"
REQUEST = TopicPattern("probe/{thing}/{execution}/req")
RESPONSE = TopicPattern("probe/{thing}/{execution}/resp")
_REPORTABLE = {s.name: s for s in DEVICE_REPORTABLE}


def decode(captured: Mapping[str, str], payload: bytes) -> ExecutionReport:
    status = _REPORTABLE.get(payload.decode("ascii", "replace"))
    if status is None:
        raise DecodeError("unknown_status", repr(payload[:32]))
    return ExecutionReport(captured["thing"], captured["execution"], DeviceReport(Status(status)))


class ProbeRoute:
    """The thing's own client, on its request topic, if it subscribed to it."""

    def __init__(self, link: DeviceLink) -> None:
        self._link = link

    def ready(self, thing_id: str) -> bool:
        return self._link.subscription_qos(thing_id, REQUEST.format(thing=thing_id, execution="x")) is not None

    def messages(self, execution: Execution) -> list[Message]:
        topic = REQUEST.format(thing=execution.thing_id, execution=execution.execution_id)
        return [Message(execution.thing_id, topic, json.dumps({"do": execution.action}).encode())]


def attach(ctx: DialectContext) -> DialectRuntime:
    return DialectRuntime(route=ProbeRoute(ctx.link), claims=lambda thing_id: thing_id.startswith("probe-"))


PROBE = DialectBundle(
    name="probe",
    wire=Dialect(
        name="probe",
        rules=(Rule("probe.response", RESPONSE, decode, LifecycleAction.DEVICE_REPORT),),
        device_publish=(RESPONSE,),
        device_subscribe=(REQUEST,),
    ),
    attach=attach,
)


@pytest.fixture
async def probe_app(tmp_path: Path) -> AsyncIterator[FleetcmdApp]:
    async with FleetcmdApp(make_settings(tmp_path / "data", allow_anonymous=False), dialects=(*DIALECTS, PROBE)) as app:
        yield app


async def _device(app: FleetcmdApp, thing_id: str) -> EmqxDevice:
    assert app.registry is not None and app.ports is not None and app.ports.mqtt is not None
    _record, password, _kaa = await app.registry.create_thing(thing_id, "", {})
    return EmqxDevice(HOST, app.ports.mqtt, thing_id, username=thing_id, password=password, subscribe=False)


async def test_a_command_round_trip_through_a_dialect_added_by_one_bundle(probe_app: FleetcmdApp) -> None:
    core = probe_app.core
    assert core is not None
    async with await _device(probe_app, "probe-1") as device:
        assert await device.asubscribe("probe/probe-1/+/req") == [1]  # granted by the bundle's ACL
        assert await device.asubscribe("probe/probe-2/+/req") == [0x80]  # another thing's topic: not
        sent = await core.send(SendCommand("probe-1", "blink", None, 30, ""))
        assert sent.status is Status.SENT  # the probe route claimed the thing and found it subscribed
        execution_id, body = await device.wait_request()
        assert (execution_id, body) == (sent.execution_id, {"do": "blink"})
        await device.apublish(RESPONSE.format(thing="probe-1", execution=execution_id), b"SUCCEEDED")
        done = await core.wait(sent, 5)
    assert done.status is Status.SUCCEEDED
    assert core.stats["reports.change"] >= 1


async def test_the_default_route_still_serves_the_things_no_bundle_claims(probe_app: FleetcmdApp) -> None:
    core = probe_app.core
    assert core is not None
    async with await _device(probe_app, "plain-1") as device:
        await device.asubscribe(device.request_filter)
        sent = await core.send(SendCommand("plain-1", "reboot", None, 30, ""))
        execution_id, body = await device.wait_request()
        assert execution_id == sent.execution_id and body["action"] == "reboot"
        await device.arespond(execution_id, "SUCCEEDED")
        done = await core.wait(sent, 5)
    assert done.status is Status.SUCCEEDED


@runtime_checkable
class _NoStoreHasThis(Protocol):
    def probe_only_query(self) -> None: ...


async def test_a_bundle_whose_store_needs_are_not_met_stops_the_start(tmp_path: Path) -> None:
    needy = DialectBundle(name="needy", wire=PROBE.wire, store_needs=(_NoStoreHasThis,))
    with pytest.raises(FleetcmdError, match="dialect needy needs a store implementing _NoStoreHasThis"):
        async with FleetcmdApp(make_settings(tmp_path / "data"), dialects=(*DIALECTS, needy)):
            pass
