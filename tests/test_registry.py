"""The registry (issue 3, sections 1, 2 and 5): things, thing types, presence, and the checks Send makes.

Real gRPC calls on 127.0.0.1 (port 0) with the admin key, real paho devices logging in with the
credentials CreateThing issued; secure mode (``allow_anonymous=False``) throughout, so a Send to a
thing nobody registered is NOT_FOUND. The CLI tests at the end run ``fleetcmd serve`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, struct_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from server.app import FleetcmdApp
from server.core.models import CommandDef
from server.core.schemas import CompiledSchema
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc
from tests.clients import app_channel
from tests.conftest import make_settings
from tests.devices import EmqxDevice
from tests.proc import Service, run_cli
from tests.test_schemas import DIMMING, listener

pytestmark = pytest.mark.secure

HOST = "127.0.0.1"
DEADLINE = 10.0  # seconds, for every RPC

# The Kaa seed's LoRaWAN dimming command.
OPERATOR_PARAMS = {"priority": "NORMAL", "output_mode": "blinking", "dimming": 50, "period_s": 5}
# The seed's payload, in the seed's key order.
SEED_PARAMS = {
    "f_port": 60,
    "priority": "NORMAL",
    "confirmed": "false",
    "command": "dimming",
    "output_mode": "blinking",
    "dimming": 50,
    "period_s": 5,
}
SEED_PARAMS_JSON = json.dumps(SEED_PARAMS, separators=(",", ":"))

LEVEL_RESULT = {"type": "object", "properties": {"level": {"type": "integer", "minimum": 0}}, "required": ["level"]}


# ---- helpers ----------------------------------------------------------------------------------


def value(data: Any) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(data, struct_pb2.Struct())


def plain(message: Any) -> Any:
    return json_format.MessageToDict(message)


def command(params_schema: Any = None, result_schema: Any = None, ttl: int = 0, description: str = "") -> rpb.CommandDefinition:
    c = rpb.CommandDefinition(description=description, default_ttl_seconds=ttl)
    if params_schema is not None:
        c.params_schema = json.dumps(params_schema)
    if result_schema is not None:
        c.result_schema = json.dumps(result_schema)
    return c


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def rpc_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await ``call``, expect it to fail with ``code`` and return the error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call, DEADLINE)
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


def violations(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """Every ``google.rpc.BadRequest`` field violation, in order (duplicates kept)."""
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status.code == code_pb2.INVALID_ARGUMENT
    found: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                assert v.description, f"violation of {v.field} has no description"
                found.append((v.field, v.description))
    assert found, f"INVALID_ARGUMENT without field violations: {err.details()}"
    return found


async def invalid(call: Awaitable[Any]) -> list[tuple[str, str]]:
    """Expect INVALID_ARGUMENT with BadRequest details; return them."""
    return violations(await rpc_error(call, grpc.StatusCode.INVALID_ARGUMENT))


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Api:
    """The three services on one authenticated channel, plus the app they talk to."""

    def __init__(self, app: FleetcmdApp, channel: grpc.aio.Channel) -> None:
        self.app = app
        self.things = rpb_grpc.ThingServiceStub(channel)
        self.types = rpb_grpc.ThingTypeServiceStub(channel)
        self.commands = pb_grpc.CommandServiceStub(channel)

    async def create(self, thing_id: str, thing_type: str = "", **attributes: str) -> rpb.CreateThingResponse:
        req = rpb.CreateThingRequest(thing_id=thing_id, thing_type=thing_type, attributes=attributes)
        return await self.things.CreateThing(req, timeout=DEADLINE)

    async def get(self, thing_id: str) -> rpb.Thing:
        return await self.things.GetThing(rpb.GetThingRequest(thing_id=thing_id), timeout=DEADLINE)

    async def put_type(self, name: str, commands: dict[str, rpb.CommandDefinition] | None = None, **kw: Any) -> rpb.ThingType:
        tt = rpb.ThingType(name=name, commands=commands or {}, **kw)
        return await self.types.PutThingType(rpb.PutThingTypeRequest(thing_type=tt), timeout=DEADLINE)

    async def send(self, thing_id: str, action: str, params: dict[str, Any] | None = None, ttl: int = 0) -> pb.Execution:
        req = pb.SendRequest(thing_id=thing_id, action=action, ttl_seconds=ttl)
        if params is not None:
            req.params.CopyFrom(struct(params))
        return await self.commands.Send(req, timeout=DEADLINE)

    async def execution(self, execution_id: str) -> pb.Execution:
        return await self.commands.Get(pb.GetRequest(execution_id=execution_id), timeout=DEADLINE)

    async def list_things(self, **kw: Any) -> list[rpb.Thing]:
        """Every thing matching the filters, following page tokens."""
        out: list[rpb.Thing] = []
        token = ""
        for _ in range(1000):
            resp = await self.things.ListThings(rpb.ListThingsRequest(page_token=token, **kw), timeout=DEADLINE)
            out.extend(resp.things)
            token = resp.next_page_token
            if not token:
                return out
        raise AssertionError("pagination does not end")

    async def wait_thing(self, thing_id: str, predicate: Callable[[rpb.Thing], bool], what: str) -> rpb.Thing:
        found: list[rpb.Thing] = []

        async def check() -> bool:
            found[:] = [await self.get(thing_id)]
            return predicate(found[0])

        await wait_for(check, f"{thing_id}: {what}")
        return found[0]

    async def wait_final(self, execution_id: str, timeout: float = 5) -> pb.Execution:
        final = {pb.SUCCEEDED, pb.FAILED, pb.REJECTED, pb.TIMED_OUT, pb.CANCELED}
        got: list[pb.Execution] = []

        async def check() -> bool:
            got[:] = [await self.execution(execution_id)]
            return got[0].status in final

        await wait_for(check, f"{execution_id} final", timeout)
        return got[0]

    def device(self, thing_id: str, password: str | None, **kw: Any) -> EmqxDevice:
        """A paho device logging in as its thing (client id = username = thing id)."""
        assert self.app.ports is not None and self.app.ports.mqtt is not None
        return EmqxDevice(HOST, self.app.ports.mqtt, thing_id, username=thing_id, password=password, **kw)


@pytest.fixture
async def api(app: FleetcmdApp) -> AsyncIterator[Api]:
    async with app_channel(app) as channel:
        yield Api(app, channel)


async def refused(dev: EmqxDevice) -> None:
    """Expect the broker to refuse the device's CONNECT."""
    with pytest.raises(ConnectionRefusedError):
        await dev.__aenter__()
    await asyncio.to_thread(dev.client.loop_stop)


def local_address(dev: EmqxDevice) -> str:
    sock = dev.client.socket()
    assert sock is not None
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


# ---- ThingService: create, get ----------------------------------------------------------------


async def test_create_thing_returns_credentials_once(api: Api) -> None:
    before = now_ms()
    created = await api.create("lamp-1", room="kitchen", floor="2")
    thing, creds = created.thing, created.credentials
    assert thing.thing_id == "lamp-1" and thing.thing_type == ""
    assert dict(thing.attributes) == {"room": "kitchen", "floor": "2"}
    assert before <= thing.created_at.ToMilliseconds() <= now_ms()
    assert thing.credentials_rotated_at.ToMilliseconds() == thing.created_at.ToMilliseconds()
    assert not thing.presence.online
    assert (creds.client_id, creds.username) == ("lamp-1", "lamp-1")
    # At least 128 bits of randomness: a base64url token of at least 16 random bytes.
    assert len(base64.urlsafe_b64decode(creds.password + "=" * (-len(creds.password) % 4))) >= 16

    # Never shown again: not by GetThing, not by ListThings, not anywhere in their bytes.
    got = await api.get("lamp-1")
    listed = await api.things.ListThings(rpb.ListThingsRequest(), timeout=DEADLINE)
    for message in (got, listed):
        assert creds.password.encode() not in message.SerializeToString()
        assert creds.password not in json.dumps(plain(message))
    assert got.thing_id == "lamp-1" and dict(got.attributes) == dict(thing.attributes)

    # The credentials work at the broker.
    async with api.device("lamp-1", creds.password) as dev:
        assert dev.connected.is_set()


async def test_passwords_are_distinct(api: Api) -> None:
    passwords = {(await api.create(f"t{i}")).credentials.password for i in range(20)}
    assert len(passwords) == 20


async def test_create_duplicate_is_already_exists(api: Api) -> None:
    first = await api.create("dup", a="1")
    await rpc_error(api.create("dup", b="2"), grpc.StatusCode.ALREADY_EXISTS)
    got = await api.get("dup")
    assert dict(got.attributes) == {"a": "1"}  # the first one is untouched
    async with api.device("dup", first.credentials.password):
        pass  # and so are its credentials


@pytest.mark.parametrize(
    "thing_id",
    [
        pytest.param("", id="empty"),
        pytest.param("a/b", id="slash"),
        pytest.param("a+b", id="plus"),
        pytest.param("a#b", id="hash"),
        pytest.param("$sys", id="leading-dollar"),
        pytest.param("x" * 129, id="129-chars"),
    ],
)
async def test_create_bad_thing_id_is_invalid_argument(api: Api, thing_id: str) -> None:
    found = await invalid(api.create(thing_id))
    assert [f for f, _ in found] == ["thing_id"]
    assert await api.list_things() == []


async def test_create_with_unknown_type_is_invalid_argument(api: Api) -> None:
    found = await invalid(api.create("t1", "no-such-type"))
    assert [f for f, _ in found] == ["thing_type"]
    assert "no-such-type" in found[0][1]
    await rpc_error(api.get("t1"), grpc.StatusCode.NOT_FOUND)


async def test_get_unknown_thing_is_not_found(api: Api) -> None:
    await rpc_error(api.get("nobody"), grpc.StatusCode.NOT_FOUND)
    await invalid(api.get("a/b"))


# ---- ThingService: list ------------------------------------------------------------------------


async def test_list_things_filters_by_type_and_attribute(api: Api) -> None:
    await api.put_type("lamp")
    await api.put_type("meter")
    await api.create("a1", "lamp", site="north", floor="1")
    await api.create("a2", "lamp", site="south", floor="1")
    await api.create("b1", "meter", site="north", floor="2")
    await api.create("c1", "", site="north")

    def ids(things: list[rpb.Thing]) -> list[str]:
        return [t.thing_id for t in things]

    assert ids(await api.list_things()) == ["a1", "a2", "b1", "c1"]
    assert ids(await api.list_things(thing_type="lamp")) == ["a1", "a2"]
    assert ids(await api.list_things(thing_type="meter")) == ["b1"]
    assert ids(await api.list_things(thing_type="unknown")) == []
    assert ids(await api.list_things(attributes={"site": "north"})) == ["a1", "b1", "c1"]
    assert ids(await api.list_things(attributes={"site": "north", "floor": "1"})) == ["a1"]
    assert ids(await api.list_things(thing_type="lamp", attributes={"site": "south"})) == ["a2"]
    assert ids(await api.list_things(attributes={"floor": "3"})) == []


async def test_list_things_by_presence(api: Api) -> None:
    on = await api.create("on-1")
    await api.create("off-1")
    assert [t.thing_id for t in await api.list_things(presence=rpb.OFFLINE)] == ["off-1", "on-1"]
    async with api.device("on-1", on.credentials.password):
        await api.wait_thing("on-1", lambda t: t.presence.online, "online")
        assert [t.thing_id for t in await api.list_things(presence=rpb.ONLINE)] == ["on-1"]
        assert [t.thing_id for t in await api.list_things(presence=rpb.OFFLINE)] == ["off-1"]
        assert [t.thing_id for t in await api.list_things()] == ["off-1", "on-1"]
    await api.wait_thing("on-1", lambda t: not t.presence.online, "offline")
    assert [t.thing_id for t in await api.list_things(presence=rpb.ONLINE)] == []
    assert [t.thing_id for t in await api.list_things(presence=rpb.OFFLINE)] == ["off-1", "on-1"]


async def test_list_things_pagination(api: Api) -> None:
    await api.put_type("even")
    all_ids = [f"thing-{i:02d}" for i in range(23)]
    for i, thing_id in enumerate(all_ids):
        await api.create(thing_id, "even" if i % 2 == 0 else "", parity=str(i % 2))

    # Every page size: every thing exactly once, in id order, no empty trailing page.
    for size in (1, 5, 7, 22, 23, 24):
        pages: list[list[str]] = []
        token = ""
        while True:
            resp = await api.things.ListThings(rpb.ListThingsRequest(page_size=size, page_token=token), timeout=DEADLINE)
            pages.append([t.thing_id for t in resp.things])
            token = resp.next_page_token
            if not token:
                break
        assert [t for page in pages for t in page] == all_ids, size
        assert all(len(p) == size for p in pages[:-1]) and 0 < len(pages[-1]) <= size, (size, pages)

    evens = all_ids[::2]
    assert [t.thing_id for t in await api.list_things(thing_type="even", page_size=3)] == evens
    assert [t.thing_id for t in await api.list_things(attributes={"parity": "1"}, page_size=4)] == all_ids[1::2]

    # Default page size is 50: all 23 on one page.
    resp = await api.things.ListThings(rpb.ListThingsRequest(), timeout=DEADLINE)
    assert len(resp.things) == 23 and resp.next_page_token == ""

    # A token is bound to the filters it was issued for.
    first = await api.things.ListThings(rpb.ListThingsRequest(page_size=2), timeout=DEADLINE)
    assert first.next_page_token
    token = first.next_page_token
    for other in (
        rpb.ListThingsRequest(page_size=2, page_token=token, thing_type="even"),
        rpb.ListThingsRequest(page_size=2, page_token=token, attributes={"parity": "0"}),
        rpb.ListThingsRequest(page_size=2, page_token=token, presence=rpb.OFFLINE),
    ):
        found = await invalid(api.things.ListThings(other, timeout=DEADLINE))
        assert [f for f, _ in found] == ["page_token"]
    # The same filters with another page size are fine.
    resp = await api.things.ListThings(rpb.ListThingsRequest(page_size=5, page_token=token), timeout=DEADLINE)
    assert [t.thing_id for t in resp.things] == all_ids[2:7]

    for garbage in ("garbage", "eyJ4IjoxfQ", "!!!"):
        found = await invalid(api.things.ListThings(rpb.ListThingsRequest(page_token=garbage), timeout=DEADLINE))
        assert [f for f, _ in found] == ["page_token"]
    found = await invalid(api.things.ListThings(rpb.ListThingsRequest(page_size=1001), timeout=DEADLINE))
    assert [f for f, _ in found] == ["page_size"]


# ---- ThingService: update, delete, rotate -----------------------------------------------------


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def test_update_thing_with_update_mask(api: Api) -> None:
    await api.put_type("lamp")
    await api.put_type("meter")
    created = await api.create("u1", "lamp", room="a")
    t0 = created.thing.updated_at.ToMilliseconds()

    async def update(thing: rpb.Thing, *paths: str) -> rpb.Thing:
        req = rpb.UpdateThingRequest(thing=thing, update_mask=mask(*paths))
        return await api.things.UpdateThing(req, timeout=DEADLINE)

    # Type only: the attributes in the request are ignored.
    got = await update(rpb.Thing(thing_id="u1", thing_type="meter", attributes={"ignored": "x"}), "thing_type")
    assert got.thing_type == "meter" and dict(got.attributes) == {"room": "a"}
    assert got.updated_at.ToMilliseconds() >= t0
    assert got.created_at == created.thing.created_at

    # Attributes only (replaced as a whole): the type in the request is ignored.
    got = await update(rpb.Thing(thing_id="u1", thing_type="", attributes={"room": "b", "x": "1"}), "attributes")
    assert got.thing_type == "meter" and dict(got.attributes) == {"room": "b", "x": "1"}

    # Both, named explicitly.
    got = await update(rpb.Thing(thing_id="u1", thing_type="lamp", attributes={"room": "c"}), "thing_type", "attributes")
    assert got.thing_type == "lamp" and dict(got.attributes) == {"room": "c"}

    # An empty mask means both; an empty type removes the type.
    got = await update(rpb.Thing(thing_id="u1", thing_type="", attributes={}))
    assert got.thing_type == "" and dict(got.attributes) == {}

    stored = await api.get("u1")
    assert stored.thing_type == "" and dict(stored.attributes) == {}
    # Credentials are not touched by an update.
    assert stored.credentials_rotated_at == created.thing.credentials_rotated_at

    # A path that is not updatable, an unknown type, an unknown thing.
    for paths in (("thing_id",), ("presence",), ("attributes", "nonsense")):
        found = await invalid(update(rpb.Thing(thing_id="u1", thing_type="lamp"), *paths))
        assert [f for f, _ in found] == ["update_mask"]
    found = await invalid(update(rpb.Thing(thing_id="u1", thing_type="nope"), "thing_type"))
    assert [f for f, _ in found] == ["thing.thing_type"]
    await rpc_error(update(rpb.Thing(thing_id="ghost", thing_type="lamp"), "thing_type"), grpc.StatusCode.NOT_FOUND)
    found = await invalid(update(rpb.Thing(thing_id="a/b"), "thing_type"))
    assert [f for f, _ in found] == ["thing.thing_id"]
    stored = await api.get("u1")
    assert stored.thing_type == "" and dict(stored.attributes) == {}


async def test_delete_thing(api: Api) -> None:
    created = await api.create("gone", site="x")
    queued = await api.send("gone", "reboot", ttl=60)
    dev = api.device("gone", created.credentials.password)
    async with dev:
        await api.wait_thing("gone", lambda t: t.presence.online, "online")
        await api.things.DeleteThing(rpb.DeleteThingRequest(thing_id="gone"), timeout=DEADLINE)
        # Deleting a thing ends its connection.
        assert await asyncio.to_thread(dev.disconnected.wait, 5), "the deleted thing's device is still connected"
        await rpc_error(api.get("gone"), grpc.StatusCode.NOT_FOUND)
        assert await api.list_things() == []
    # Its executions stay in the history; new Sends find no thing; it can no longer log in.
    assert (await api.execution(queued.execution_id)).thing_id == "gone"
    await rpc_error(api.send("gone", "reboot"), grpc.StatusCode.NOT_FOUND)
    await refused(api.device("gone", created.credentials.password))
    await rpc_error(api.things.DeleteThing(rpb.DeleteThingRequest(thing_id="gone"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)
    # The id is free again, with new credentials.
    again = await api.create("gone")
    assert again.credentials.password != created.credentials.password


async def test_rotate_credentials(api: Api) -> None:
    created = await api.create("rot")
    old = created.credentials.password
    dev = api.device("rot", old)
    async with dev:
        await api.wait_thing("rot", lambda t: t.presence.online, "online")
        creds = await api.things.RotateCredentials(rpb.RotateCredentialsRequest(thing_id="rot"), timeout=DEADLINE)
        # The current connection is ended.
        assert await asyncio.to_thread(dev.disconnected.wait, 5), "still connected after a rotation"
    assert (creds.client_id, creds.username) == ("rot", "rot")
    assert creds.password and creds.password != old
    assert len(base64.urlsafe_b64decode(creds.password + "=" * (-len(creds.password) % 4))) >= 16

    got = await api.get("rot")
    assert got.credentials_rotated_at.ToMilliseconds() >= created.thing.credentials_rotated_at.ToMilliseconds()
    assert creds.password.encode() not in got.SerializeToString()

    await refused(api.device("rot", old))
    async with api.device("rot", creds.password) as fresh:
        assert fresh.connected.is_set()

    await rpc_error(
        api.things.RotateCredentials(rpb.RotateCredentialsRequest(thing_id="ghost"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND
    )


# ---- presence --------------------------------------------------------------------------------


async def test_presence_fields_after_connect_and_disconnect(api: Api) -> None:
    created = await api.create("p1")
    fresh = created.thing.presence
    assert not fresh.online and fresh.client_id == "" and not fresh.HasField("connected_at") and not fresh.HasField("last_seen")

    before = now_ms()
    async with api.device("p1", created.credentials.password) as dev:
        address = local_address(dev)
        online = await api.wait_thing("p1", lambda t: t.presence.online, "online")
        p = online.presence
        assert p.client_id == "p1"
        assert p.remote_address == address
        connected_at = p.connected_at.ToMilliseconds()
        assert before <= connected_at <= now_ms()
        assert p.last_seen.ToMilliseconds() >= connected_at
    disconnected_at = now_ms()

    offline = await api.wait_thing("p1", lambda t: not t.presence.online, "offline")
    q = offline.presence
    # The last connection is still described.
    assert q.client_id == "p1" and q.remote_address == address
    assert q.connected_at.ToMilliseconds() == connected_at
    assert connected_at <= q.last_seen.ToMilliseconds() <= now_ms()
    assert q.last_seen.ToMilliseconds() >= disconnected_at - 1000


async def test_presence_last_seen_follows_device_messages(api: Api) -> None:
    created = await api.create("p2")
    async with api.device("p2", created.credentials.password) as dev:
        online = await api.wait_thing("p2", lambda t: t.presence.online, "online")
        seen = online.presence.last_seen.ToMilliseconds()
        await asyncio.sleep(0.05)
        execution = await api.send("p2", "ping", ttl=10)
        eid, _ = await dev.wait_request()
        assert eid == execution.execution_id
        await dev.arespond(eid, "SUCCEEDED")
        later = await api.wait_thing("p2", lambda t: t.presence.last_seen.ToMilliseconds() > seen, "last_seen to move")
        assert later.presence.online and later.presence.connected_at == online.presence.connected_at


async def _next_event(events: asyncio.Queue[rpb.PresenceEvent], thing_id: str, online: bool) -> rpb.PresenceEvent:
    """The next event of ``thing_id`` (others skipped); it must have the expected online state."""
    while True:
        event = await asyncio.wait_for(events.get(), 5)
        if event.thing_id == thing_id:
            assert event.presence.online is online, event
            return event


async def test_watch_presence_sees_connect_and_disconnect(api: Api) -> None:
    assert api.app.registry is not None
    first = await api.create("w1")
    second = await api.create("w2")
    everything: asyncio.Queue[rpb.PresenceEvent] = asyncio.Queue()
    only_w2: asyncio.Queue[rpb.PresenceEvent] = asyncio.Queue()
    calls = [
        api.things.WatchPresence(rpb.WatchPresenceRequest(), timeout=30),
        api.things.WatchPresence(rpb.WatchPresenceRequest(thing_id="w2"), timeout=30),
    ]

    async def pump(call: Any, into: asyncio.Queue[rpb.PresenceEvent]) -> None:
        async for event in call:
            into.put_nowait(event)

    pumps = [asyncio.create_task(pump(c, q)) for c, q in zip(calls, (everything, only_w2), strict=True)]
    try:
        # The stream is live only: wait until both watchers are registered (no event to show it).
        registry = api.app.registry

        async def registered() -> bool:
            return len(registry._watchers) == 2

        await wait_for(registered, "two presence watchers")

        before = now_ms()
        async with api.device("w1", first.credentials.password) as dev:
            address = local_address(dev)
            connect = await _next_event(everything, "w1", True)
            assert connect.presence.client_id == "w1" and connect.presence.remote_address == address
            assert connect.presence.connected_at.ToMilliseconds() >= before
        disconnect = await _next_event(everything, "w1", False)
        assert disconnect.presence.client_id == "w1"
        assert disconnect.presence.connected_at == connect.presence.connected_at
        assert disconnect.presence.last_seen.ToMilliseconds() >= connect.presence.connected_at.ToMilliseconds()

        async with api.device("w2", second.credentials.password):
            await _next_event(everything, "w2", True)
        await _next_event(everything, "w2", False)

        # The filtered watcher saw w2's connect and disconnect and nothing of w1.
        got = [await asyncio.wait_for(only_w2.get(), 5) for _ in range(2)]
        assert [(e.thing_id, e.presence.online) for e in got] == [("w2", True), ("w2", False)]
        assert only_w2.empty()
    finally:
        for c in calls:
            c.cancel()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


# ---- ThingTypeService ------------------------------------------------------------------------


async def test_put_get_thing_type_versions(api: Api) -> None:
    before = now_ms()
    v1 = await api.put_type(
        "lamp",
        {"dim": command(DIMMING, LEVEL_RESULT, ttl=20, description="set dimming")},
        description="a street lamp",
    )
    assert (v1.name, v1.version, v1.description, v1.allow_undefined_actions) == ("lamp", 1, "a street lamp", False)
    assert before <= v1.created_at.ToMilliseconds() <= now_ms()
    dim = v1.commands["dim"]
    assert dim.description == "set dimming" and dim.default_ttl_seconds == 20
    assert json.loads(dim.params_schema) == DIMMING
    assert json.loads(dim.result_schema) == LEVEL_RESULT

    got = await api.types.GetThingType(rpb.GetThingTypeRequest(name="lamp"), timeout=DEADLINE)
    assert got == v1

    v2 = await api.put_type("lamp", {"on": command()}, allow_undefined_actions=True)
    assert v2.version == 2 and v2.created_at == v1.created_at
    assert v2.updated_at.ToMilliseconds() >= v1.updated_at.ToMilliseconds()
    assert set(v2.commands) == {"on"} and v2.allow_undefined_actions
    assert v2.commands["on"].params_schema == ""
    v3 = await api.put_type("lamp", {"on": command()}, allow_undefined_actions=True)
    assert v3.version == 3
    assert (await api.types.GetThingType(rpb.GetThingTypeRequest(name="lamp"), timeout=DEADLINE)).version == 3
    # Another type has its own version counter.
    assert (await api.put_type("meter")).version == 1

    await rpc_error(api.types.GetThingType(rpb.GetThingTypeRequest(name="nope"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)


async def test_list_thing_types_pagination(api: Api) -> None:
    names = [f"type-{i:02d}" for i in range(11)]
    for name in reversed(names):
        await api.put_type(name)
    for size in (1, 3, 10, 11, 12):
        seen: list[str] = []
        token = ""
        for _ in range(100):
            resp = await api.types.ListThingTypes(rpb.ListThingTypesRequest(page_size=size, page_token=token), timeout=DEADLINE)
            assert 0 < len(resp.thing_types) <= size
            seen.extend(t.name for t in resp.thing_types)
            token = resp.next_page_token
            if not token:
                break
        assert seen == names, size
    found = await invalid(api.types.ListThingTypes(rpb.ListThingTypesRequest(page_token="garbage"), timeout=DEADLINE))
    assert [f for f, _ in found] == ["page_token"]
    found = await invalid(api.types.ListThingTypes(rpb.ListThingTypesRequest(page_size=1001), timeout=DEADLINE))
    assert [f for f, _ in found] == ["page_size"]


async def test_delete_thing_type_refused_while_used(api: Api) -> None:
    await api.put_type("lamp")
    await api.create("l1", "lamp")
    await api.create("l2", "lamp")
    delete = rpb.DeleteThingTypeRequest(name="lamp")

    err = await rpc_error(api.types.DeleteThingType(delete, timeout=DEADLINE), grpc.StatusCode.FAILED_PRECONDITION)
    assert "2" in err.details()
    await api.things.DeleteThing(rpb.DeleteThingRequest(thing_id="l1"), timeout=DEADLINE)
    await rpc_error(api.types.DeleteThingType(delete, timeout=DEADLINE), grpc.StatusCode.FAILED_PRECONDITION)
    # Taking the type off the last user frees it.
    await api.things.UpdateThing(
        rpb.UpdateThingRequest(thing=rpb.Thing(thing_id="l2"), update_mask=mask("thing_type")), timeout=DEADLINE
    )
    await api.types.DeleteThingType(delete, timeout=DEADLINE)

    await rpc_error(api.types.GetThingType(rpb.GetThingTypeRequest(name="lamp"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)
    await rpc_error(api.types.DeleteThingType(delete, timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)
    found = await invalid(api.create("l3", "lamp"))
    assert [f for f, _ in found] == ["thing_type"]
    # Put again: a new type, starting over at version 1.
    assert (await api.put_type("lamp")).version == 1


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"type": "nonsense"}, id="unknown-type"),
        pytest.param({"properties": {"a": {"minimum": "x"}}}, id="minimum-not-a-number"),
        pytest.param({"required": "a"}, id="required-not-a-list"),
        pytest.param([1, 2], id="not-an-object"),
        pytest.param("string", id="a-string"),
    ],
)
async def test_put_thing_type_with_invalid_schema(api: Api, bad: Any) -> None:
    broken = rpb.CommandDefinition(params_schema=json.dumps(bad))
    tt = rpb.ThingType(name="broken", commands={"ok": command(DIMMING), "x": broken})
    found = await invalid(api.types.PutThingType(rpb.PutThingTypeRequest(thing_type=tt), timeout=DEADLINE))
    assert [f for f, _ in found] == ["thing_type.commands['x'].params_schema"]
    assert "not a valid JSON Schema" in found[0][1] and len(found[0][1]) > len("not a valid JSON Schema: ")
    await rpc_error(api.types.GetThingType(rpb.GetThingTypeRequest(name="broken"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)


async def test_put_thing_type_reports_every_problem(api: Api) -> None:
    tt = rpb.ThingType(
        name="bad name!",
        commands={
            "x": rpb.CommandDefinition(params_schema=json.dumps({"type": 5}), result_schema=json.dumps({"enum": 3})),
            "y": rpb.CommandDefinition(default_ttl_seconds=86401),
        },
    )
    found = await invalid(api.types.PutThingType(rpb.PutThingTypeRequest(thing_type=tt), timeout=DEADLINE))
    assert {f for f, _ in found} == {
        "thing_type.name",
        "thing_type.commands['x'].params_schema",
        "thing_type.commands['x'].result_schema",
        "thing_type.commands['y'].default_ttl_seconds",
    }
    # A rejected Put leaves an existing type as it was.
    good = await api.put_type("keep", {"a": command({"type": "object"})})
    tt = rpb.ThingType(name="keep", commands={"a": rpb.CommandDefinition(params_schema=json.dumps({"type": "nonsense"}))})
    await invalid(api.types.PutThingType(rpb.PutThingTypeRequest(thing_type=tt), timeout=DEADLINE))
    assert await api.types.GetThingType(rpb.GetThingTypeRequest(name="keep"), timeout=DEADLINE) == good


async def test_put_thing_type_with_a_remote_ref_is_refused_without_fetching(api: Api) -> None:
    with listener() as (port, accepted):
        remote = {"type": "object", "properties": {"v": {"$ref": f"http://127.0.0.1:{port}/v.json"}}}
        tt = rpb.ThingType(name="fetcher", commands={"set": command(remote)})
        found = await invalid(api.types.PutThingType(rpb.PutThingTypeRequest(thing_type=tt), timeout=DEADLINE))
        assert [f for f, _ in found] == ["thing_type.commands['set'].params_schema"]
        assert "only '#...' references are allowed" in found[0][1]
    assert accepted == [], "the server connected to the schema's URL"
    await rpc_error(api.types.GetThingType(rpb.GetThingTypeRequest(name="fetcher"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("levels", [40, 5000])
async def test_put_thing_type_with_a_deeply_nested_schema_is_invalid_argument(api: Api, levels: int) -> None:
    # 5,000 levels is past what the JSON parser recurses into; 40 parses, past MAX_SCHEMA_DEPTH (32).
    text = '{"not":' * levels + "{}" + "}" * levels
    tt = rpb.ThingType(name="deep", commands={"x": rpb.CommandDefinition(result_schema=text)})
    found = await invalid(api.types.PutThingType(rpb.PutThingTypeRequest(thing_type=tt), timeout=DEADLINE))
    assert [f for f, _ in found] == ["thing_type.commands['x'].result_schema"]
    assert "nested deeper than 32 levels" in found[0][1]


async def test_send_whose_params_cost_too_much_to_check_is_invalid_argument(api: Api) -> None:
    item = {"type": "integer", "minimum": 0}  # two steps per item
    await api.put_type("lister", {"set": command({"type": "object", "properties": {"l": {"items": item}}})})
    await api.create("lister-1", "lister")
    found = await invalid(api.send("lister-1", "set", {"l": [0] * 30_000}))  # under 64 KiB as JSON
    assert found == [("params", "checking it against the schema takes more than 50000 steps")]
    assert (await api.send("lister-1", "set", {"l": list(range(100))})).status == pb.QUEUED


# ---- Send checks -----------------------------------------------------------------------------


async def test_send_to_unknown_thing_is_not_found(api: Api) -> None:
    await rpc_error(api.send("nobody", "reboot"), grpc.StatusCode.NOT_FOUND)
    listed = await api.commands.List(pb.ListRequest(), timeout=DEADLINE)
    assert list(listed.executions) == []
    # Registered: accepted (no type, so any action).
    await api.create("somebody")
    ex = await api.send("somebody", "reboot")
    assert ex.status == pb.QUEUED and ex.thing_type == ""


async def test_send_undefined_action_is_refused(api: Api) -> None:
    await api.put_type("lamp", {"on": command(), "off": command()})
    await api.create("l1", "lamp")
    found = await invalid(api.send("l1", "explode"))
    assert [f for f, _ in found] == ["action"]
    assert "explode" in found[0][1]
    ok = await api.send("l1", "on", {"anything": [1, 2]})
    assert ok.thing_type == "lamp" and ok.action == "on"

    # Unless the type allows undefined actions (their params are not checked).
    await api.put_type("lamp", {"on": command({"type": "object", "maxProperties": 0})}, allow_undefined_actions=True)
    ex = await api.send("l1", "explode", {"x": 1})
    assert ex.action == "explode" and ex.thing_type == "lamp"
    assert json_format.MessageToDict(ex.params) == {"x": 1}
    # ...while defined actions still are.
    found = await invalid(api.send("l1", "on", {"x": 1}))
    assert [f for f, _ in found] == ["params"]


async def test_untyped_thing_and_type_without_commands_accept_any_action(api: Api) -> None:
    await api.put_type("empty")
    await api.create("bare")
    await api.create("typed", "empty")
    for thing, expected_type in (("bare", ""), ("typed", "empty")):
        for action in ("reboot", "a" * 128, "x.y-z"):
            ex = await api.send(thing, action, {"free": {"form": True}})
            assert ex.action == action and ex.thing_type == expected_type
            assert json_format.MessageToDict(ex.params) == {"free": {"form": True}}


async def test_send_params_violations_with_paths(api: Api) -> None:
    await api.put_type("lamp", {"dim": command(DIMMING)})
    await api.create("l1", "lamp")

    found = await invalid(api.send("l1", "dim", {"output_mode": "strobe", "dimming": "fifty"}))
    assert sorted(f for f, _ in found) == ["params.dimming", "params.output_mode"]
    descriptions = dict(found)
    assert "strobe" in descriptions["params.output_mode"] and "fifty" in descriptions["params.dimming"]

    # A missing required property is named by its own path; an enum on a filled default too.
    found = await invalid(api.send("l1", "dim", {"priority": "URGENT", "dimming": 5}))
    assert sorted(f for f, _ in found) == ["params.output_mode", "params.priority"]
    # No params at all: everything required that has no const/default is missing.
    found = await invalid(api.send("l1", "dim"))
    assert sorted(f for f, _ in found) == ["params.dimming", "params.output_mode"]

    # Nested paths.
    await api.put_type(
        "robot",
        {
            "move": command(
                {
                    "type": "object",
                    "properties": {
                        "waypoints": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}},
                        "speed": {"type": "object", "properties": {"max": {"type": "integer", "maximum": 10}}},
                    },
                    "additionalProperties": False,
                }
            )
        },
    )
    await api.create("r1", "robot")
    found = await invalid(api.send("r1", "move", {"waypoints": [{"x": 1}, {"x": "far"}], "speed": {"max": 11}, "extra": 1}))
    assert sorted(f for f, _ in found) == ["params", "params.speed.max", "params.waypoints[1].x"]
    listed = await api.commands.List(pb.ListRequest(), timeout=DEADLINE)
    assert list(listed.executions) == []  # nothing was created by a refused Send


async def test_dimming_seed_example_end_to_end(api: Api) -> None:
    """The type is put through the API; params and payload equal the seed's (values; see the key-order test)."""
    assert api.app.store is not None
    await api.put_type("lora-lamp", {"dimming": command(DIMMING)})
    created = await api.create("lamp-7", "lora-lamp")
    async with api.device("lamp-7", created.credentials.password) as dev:
        ex = await api.send("lamp-7", "dimming", OPERATOR_PARAMS, ttl=10)
        assert ex.thing_type == "lora-lamp"
        assert json_format.MessageToDict(ex.params) == SEED_PARAMS
        msg = await dev.wait_message()
        body = json.loads(msg.payload)
        assert body["params"] == SEED_PARAMS
        assert {k: type(v) for k, v in body["params"].items()} == {k: type(v) for k, v in SEED_PARAMS.items()}  # 60, not 60.0
        stored = await api.app.store.get(ex.execution_id)
        assert stored is not None and stored.params_json is not None
        assert json.loads(stored.params_json) == SEED_PARAMS
        got = await api.execution(ex.execution_id)
        assert json_format.MessageToDict(got.params) == SEED_PARAMS


async def _dimming_order(api: Api) -> None:
    """Send the operator's params to a ``lora-lamp`` device: stored and received JSON are the seed's, byte for byte."""
    assert api.app.store is not None
    created = await api.create("lamp-9", "lora-lamp")
    async with api.device("lamp-9", created.credentials.password) as dev:
        ex = await api.send("lamp-9", "dimming", OPERATOR_PARAMS, ttl=10)
        stored = await api.app.store.get(ex.execution_id)
        assert stored is not None
        assert stored.params_json == SEED_PARAMS_JSON
        msg = await dev.wait_message()
    pairs = json.loads(msg.payload, object_pairs_hook=list)
    params = dict(pairs)["params"]
    assert params == list(SEED_PARAMS.items())  # same keys, same values, same order
    assert b'"params":' + SEED_PARAMS_JSON.encode() + b"," in msg.payload


async def test_dimming_payload_key_order_with_type_defined_in_process(api: Api) -> None:
    """The schema engine and the wire path keep the seed's order when the schema keeps its property order."""
    assert api.app.registry is not None
    await api.app.registry.put_type(
        "lora-lamp",
        description="",
        commands={"dimming": CommandDef(params_schema=DIMMING)},
        allow_undefined_actions=False,
        max_ttl=86400,
    )
    await _dimming_order(api)


async def test_dimming_payload_key_order_with_type_put_through_the_api(api: Api) -> None:
    await api.put_type("lora-lamp", {"dimming": command(DIMMING)})
    await _dimming_order(api)


async def test_validators_are_compiled_once_per_type_version(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[Any] = []
    original = CompiledSchema.compile.__func__  # type: ignore[attr-defined]

    def counting(cls: type[CompiledSchema], schema: Any) -> CompiledSchema:
        compiled.append(schema)
        return original(cls, schema)  # type: ignore[no-any-return]

    monkeypatch.setattr(CompiledSchema, "compile", classmethod(counting))
    await api.put_type("lora-lamp", {"dimming": command(DIMMING, LEVEL_RESULT)})
    assert len(compiled) == 2  # params and result schema, once each
    await api.create("lamp-c", "lora-lamp")
    for _ in range(5):
        await api.send("lamp-c", "dimming", OPERATOR_PARAMS)
    assert len(compiled) == 2  # Send reuses them
    await api.put_type("lora-lamp", {"dimming": command(DIMMING)})
    assert len(compiled) == 3  # a new version compiles its schemas again


async def test_command_default_ttl_applies_when_send_gives_zero(api: Api) -> None:
    await api.put_type("lamp", {"slow": command(ttl=120), "plain": command()})
    await api.create("l1", "lamp")
    ex = await api.send("l1", "slow")
    assert ex.ttl_seconds == 120
    assert ex.expires_at.ToMilliseconds() - ex.created_at.ToMilliseconds() == 120_000
    assert (await api.send("l1", "slow", ttl=7)).ttl_seconds == 7  # an explicit TTL wins
    assert (await api.send("l1", "plain")).ttl_seconds == 30  # no command default: the server's


async def test_result_schema_violations_are_stored_and_flagged(api: Api) -> None:
    await api.put_type("lamp", {"level": command(result_schema=LEVEL_RESULT), "free": command()})
    created = await api.create("l1", "lamp")

    def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        dev.respond(execution_id, "SUCCEEDED", body["params"]["result"])

    async with api.device("l1", created.credentials.password, on_request=answer):
        bad = await api.send("l1", "level", {"result": {"level": -1, "note": "x"}}, ttl=10)
        wrong_type = await api.send("l1", "level", {"result": {"level": "high"}}, ttl=10)
        good = await api.send("l1", "level", {"result": {"level": 3}}, ttl=10)
        unchecked = await api.send("l1", "free", {"result": {"level": -1}}, ttl=10)

        done = await api.wait_final(bad.execution_id)
        assert done.status == pb.SUCCEEDED  # stored, never lost
        assert json_format.MessageToDict(done.result) == {"level": -1, "note": "x"}
        assert done.thing_type == "lamp"
        assert len(done.result_violations) == 1 and done.result_violations[0].startswith("result.level:")

        done = await api.wait_final(wrong_type.execution_id)
        assert done.status == pb.SUCCEEDED and [v.split(":")[0] for v in done.result_violations] == ["result.level"]

        done = await api.wait_final(good.execution_id)
        assert done.status == pb.SUCCEEDED and list(done.result_violations) == []
        assert json_format.MessageToDict(done.result) == {"level": 3}

        done = await api.wait_final(unchecked.execution_id)
        assert done.status == pb.SUCCEEDED and list(done.result_violations) == []

    # The flag is also listed and kept.
    listed = await api.commands.List(pb.ListRequest(thing_id="l1"), timeout=DEADLINE)
    flagged = {e.execution_id for e in listed.executions if e.result_violations}
    assert flagged == {bad.execution_id, wrong_type.execution_id}


async def test_execution_records_thing_type_at_creation(api: Api) -> None:
    await api.put_type("lamp")
    await api.put_type("meter")
    await api.create("t1", "lamp")
    first = await api.send("t1", "a")
    await api.things.UpdateThing(
        rpb.UpdateThingRequest(thing=rpb.Thing(thing_id="t1", thing_type="meter"), update_mask=mask("thing_type")),
        timeout=DEADLINE,
    )
    second = await api.send("t1", "a")
    assert (first.thing_type, second.thing_type) == ("lamp", "meter")
    assert (await api.execution(first.execution_id)).thing_type == "lamp"
    assert (await api.execution(second.execution_id)).thing_type == "meter"


# ---- durability ------------------------------------------------------------------------------


async def test_presence_changes_are_written_by_one_writer_latest_per_thing(tmp_path: Path) -> None:
    """A fleet connecting at once: one writer task, a few store writes, each thing's last change kept."""
    from server.core.registry import Registry
    from server.store.sqlite import SqliteStore

    async with SqliteStore(tmp_path / "f.db") as store:
        writer = asyncio.create_task(store.run_writer())
        try:
            registry = Registry(store)
            await registry.load()
            for i in range(50):
                await registry.create_thing(f"p{i}", thing_type="", attributes={})
            writes: list[int] = []
            record = store.record_presence

            async def counted(connections: Any) -> None:
                writes.append(len(connections))
                await record(connections)

            store.record_presence = counted  # type: ignore[method-assign]
            writers: list[asyncio.Task[None]] = []
            for i in range(50):
                for change in (registry.device_connected(f"p{i}", f"10.0.0.{i}:1"), registry.device_disconnected(f"p{i}")):
                    assert change is not None
                    if registry.persist_later(change):
                        writers.append(asyncio.create_task(registry.write_presence()))
            await asyncio.gather(*writers)
            assert len(writers) == 1 and writes == [50]  # 100 changes, one entry per thing, one write
            stored = {t.thing_id: t for t in await store.load_things()}
            for i in range(50):
                thing = stored[f"p{i}"]
                assert thing.last_remote_address == f"10.0.0.{i}:1" and thing.last_seen_ms is not None
            # A change while the writer runs is written by it, in a round of its own.
            assert registry.persist_later(registry.device_connected("p0", "10.0.0.99:1") or pytest.fail("unknown"))
            task = asyncio.create_task(registry.write_presence())
            assert not registry.persist_later(registry.device_disconnected("p1") or pytest.fail("unknown"))
            await task
            assert sum(writes[1:]) == 2
            stored = {t.thing_id: t for t in await store.load_things()}
            assert stored["p0"].last_remote_address == "10.0.0.99:1"
        finally:
            store.stop_writer()
            await writer


async def test_registry_survives_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", allow_anonymous=False)
    async with FleetcmdApp(settings) as app, app_channel(app) as channel:
        api = Api(app, channel)
        await api.put_type("lamp", {"dim": command(DIMMING, LEVEL_RESULT, ttl=20, description="dim it")})
        lamp = await api.put_type("lamp", {"dim": command(DIMMING, LEVEL_RESULT, ttl=25, description="dim it")}, description="v2")
        assert lamp.version == 2
        meter = await api.put_type("meter", allow_undefined_actions=True)
        created = await api.create("l1", "lamp", site="north", pole="17")
        await api.create("m1", "meter")
        await api.create("bare")
        async with api.device("l1", created.credentials.password):
            await api.wait_thing("l1", lambda t: t.presence.online, "online")
        before = await api.wait_thing("l1", lambda t: not t.presence.online, "offline")
        last_seen = before.presence.last_seen.ToMilliseconds()
        store = app.store
        assert store is not None

        async def persisted() -> bool:
            return any(t.thing_id == "l1" and t.last_seen_ms == last_seen for t in await store.load_things())

        await wait_for(persisted, "the disconnect to reach the store")
        things_before = await api.list_things()

    async with FleetcmdApp(settings) as app, app_channel(app) as channel:
        api = Api(app, channel)
        things_after = await api.list_things()
        assert [t.thing_id for t in things_after] == ["bare", "l1", "m1"]
        assert things_after == things_before  # types, attributes, timestamps, presence
        after = await api.get("l1")
        assert after.thing_type == "lamp" and dict(after.attributes) == {"site": "north", "pole": "17"}
        p = after.presence
        assert not p.online and p.client_id == "l1" and p.remote_address == before.presence.remote_address
        assert p.connected_at == before.presence.connected_at and p.last_seen.ToMilliseconds() == last_seen

        assert await api.types.GetThingType(rpb.GetThingTypeRequest(name="lamp"), timeout=DEADLINE) == lamp
        assert await api.types.GetThingType(rpb.GetThingTypeRequest(name="meter"), timeout=DEADLINE) == meter
        assert (await api.put_type("lamp", {"dim": command(DIMMING)})).version == 3

        # The password still works (only its hash was stored) and the type's checks are back.
        async with api.device("l1", created.credentials.password):
            pass
        assert (await api.send("m1", "anything")).thing_type == "meter"
        found = await invalid(api.send("l1", "dim", {"dimming": "x", "output_mode": "on"}))
        assert [f for f, _ in found] == ["params.dimming"]
        await rpc_error(api.send("ghost", "dim"), grpc.StatusCode.NOT_FOUND)


# ---- CLI against a ``fleetcmd serve`` subprocess ----------------------------------------------


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with Service(tmp_path_factory.mktemp("registry-cli") / "data", anonymous=False) as service:
        yield service


def cli(svc: Service, *args: str) -> subprocess.CompletedProcess[str]:
    assert svc.ready is not None
    return run_cli(*args, target=svc.ready.grpc_target, api_key=svc.api_key)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc))


def failed(proc: subprocess.CompletedProcess[str], code: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert code in proc.stderr, proc.stderr
    return proc.stderr


def test_cli_types_put_get_list_delete(svc: Service, tmp_path: Path) -> None:
    name = unique("cli-lamp")
    spec = {
        "name": name,
        "description": "LoRaWAN street lamp",
        "commands": {"dimming": {"description": "set dimming", "params_schema": DIMMING, "default_ttl_seconds": 20}},
    }
    path = tmp_path / "lamp.json"
    path.write_text(json.dumps(spec))
    assert ok(cli(svc, "types", "put", str(path))).strip() == f"{name} version 1"
    stored = ok_json(cli(svc, "types", "put", str(path), "--json"))
    assert stored["name"] == name and int(stored["version"]) == 2

    got = ok_json(cli(svc, "types", "get", name))
    assert got["description"] == "LoRaWAN street lamp" and int(got["version"]) == 2
    assert got["commands"]["dimming"]["params_schema"] == DIMMING  # an object, as the file had it
    assert got["commands"]["dimming"]["default_ttl_seconds"] == 20

    listed = ok_json(cli(svc, "types", "list", "--json"))
    assert name in [t["name"] for t in listed["thing_types"]]
    table = ok(cli(svc, "types", "list"))
    assert any(line.startswith(name) and "v2" in line and "dimming" in line for line in table.splitlines()), table

    # Used by a thing: refused; after the thing is gone: deleted.
    thing = unique("cli-typed")
    ok(cli(svc, "things", "create", thing, "--type", name))
    failed(cli(svc, "types", "delete", name), "FAILED_PRECONDITION")
    ok(cli(svc, "things", "delete", thing))
    assert ok(cli(svc, "types", "delete", name)).strip() == f"deleted {name}"
    failed(cli(svc, "types", "get", name), "NOT_FOUND")

    # An invalid schema is refused with its field and reason; a file that is not a type is a usage error.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": name, "commands": {"x": {"params_schema": {"type": "nonsense"}}}}))
    err = failed(cli(svc, "types", "put", str(bad)), "INVALID_ARGUMENT")
    assert "thing_type.commands['x'].params_schema" in err and "not a valid JSON Schema" in err
    (tmp_path / "garbage.json").write_text("{not json")
    assert cli(svc, "types", "put", str(tmp_path / "garbage.json")).returncode == 2
    assert cli(svc, "types", "put", str(tmp_path / "missing.json")).returncode == 2


def test_cli_things_create_get_list_rotate_delete(svc: Service) -> None:
    assert svc.ready is not None
    thing = unique("cli-thing")
    site = unique("site")
    created = ok_json(cli(svc, "things", "create", thing, "--attr", f"site={site}", "--attr", "pole=17", "--json"))
    password = created["credentials"]["password"]
    assert created["thing"]["thing_id"] == thing and created["credentials"]["username"] == thing
    assert created["thing"]["attributes"] == {"site": site, "pole": "17"}

    text = ok(cli(svc, "things", "create", unique("cli-text")))
    assert "password" in text and "shown once" in text

    got = ok_json(cli(svc, "things", "get", thing, "--json"))
    assert got["thing_id"] == thing and got["attributes"] == {"site": site, "pole": "17"}
    assert password not in json.dumps(got)
    assert got.get("presence", {}).get("online", False) is False

    listed = ok_json(cli(svc, "things", "list", "--attr", f"site={site}", "--json"))
    assert [t["thing_id"] for t in listed["things"]] == [thing]
    assert password not in json.dumps(listed)

    # Online with the CLI-issued credentials; the presence filter and the table show it.
    dev = EmqxDevice(HOST, svc.ready.mqtt_port, thing, username=thing, password=password).start()
    try:
        deadline = time.monotonic() + 5
        while True:
            online = ok_json(cli(svc, "things", "list", "--presence", "online", "--attr", f"site={site}", "--json"))
            if [t["thing_id"] for t in online.get("things", [])] == [thing]:
                break
            assert time.monotonic() < deadline, online
            time.sleep(0.05)
        table = ok(cli(svc, "things", "get", thing))
        assert thing in table and "online" in table and "site=" + site in table

        rotated = ok_json(cli(svc, "things", "rotate", thing, "--json"))
        assert rotated["password"] and rotated["password"] != password
        assert dev.disconnected.wait(5), "rotation did not end the connection"
    finally:
        dev.stop()
    fresh = EmqxDevice(HOST, svc.ready.mqtt_port, thing, username=thing, password=rotated["password"]).start()
    fresh.stop()
    stale = EmqxDevice(HOST, svc.ready.mqtt_port, thing, username=thing, password=password, subscribe=False)
    with pytest.raises(ConnectionRefusedError):
        stale.start()

    failed(cli(svc, "things", "create", thing), "ALREADY_EXISTS")
    failed(cli(svc, "things", "create", "a/b"), "INVALID_ARGUMENT")
    failed(cli(svc, "send", unique("ghost"), "reboot"), "NOT_FOUND")

    assert ok(cli(svc, "things", "delete", thing)).strip() == f"deleted {thing}"
    failed(cli(svc, "things", "get", thing), "NOT_FOUND")
    assert ok_json(cli(svc, "things", "list", "--attr", f"site={site}", "--json")).get("things", []) == []
