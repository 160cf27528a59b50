"""Every request bound issue 13 names, at the bound (accepted) and one past it (refused).

Each bound is written here as the number the contract gives (README, docs/devices.md, docs/grpc.md), not imported from the
module that enforces it, so a bound that is removed or moved by one fails a test. Real gRPC
(and REST, and paho devices) on 127.0.0.1, port 0, in development mode (unregistered things).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2

from server.app import FleetcmdApp
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import registry_pb2 as rpb
from tests.clients import admin_key, app_channel
from tests.devices import EmqxDevice
from tests.test_api import field_violations, invalid, rpc_error, send
from tests.test_device_contract import wait_status

ACTION = 128
IDEMPOTENCY_KEY = 256
MAX_TTL = 86400
MAX_WAIT = 60
PARAMS_BYTES = 64 * 1024
PAGE_SIZE = 1000
REASON = 1024


def blob_params(size: int) -> struct_pb2.Struct:
    """Params exactly ``size`` bytes as compact JSON."""
    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    return json_format.ParseDict({"blob": "x" * (size - overhead)}, struct_pb2.Struct())


# ---- Send -----------------------------------------------------------------------------------------


async def test_action_length(stub: pb_grpc.CommandServiceStub) -> None:
    assert (await send(stub, action="a" * ACTION)).action == "a" * ACTION
    assert set(await invalid(stub.Send(pb.SendRequest(thing_id="t", action="a" * (ACTION + 1))))) == {"action"}
    assert set(await invalid(stub.Send(pb.SendRequest(thing_id="t", action="")))) == {"action"}


@pytest.mark.parametrize("action", ["a\x00b", "\x00", "a" * (ACTION - 1) + "\x00"])
async def test_action_with_nul_is_refused(stub: pb_grpc.CommandServiceStub, action: str) -> None:
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="t", action=action)))
    assert violations == {"action": "action must not contain NUL"}
    assert (await stub.List(pb.ListRequest())).executions == []


async def test_idempotency_key_length(stub: pb_grpc.CommandServiceStub) -> None:
    key = "k" * IDEMPOTENCY_KEY
    assert (await send(stub, idempotency_key=key)).idempotency_key == key
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="t", action="act", idempotency_key=key + "k")))
    assert set(violations) == {"idempotency_key"}


async def test_ttl_range(stub: pb_grpc.CommandServiceStub) -> None:
    assert (await send(stub, ttl_seconds=0)).ttl_seconds == 30  # 0: the default
    assert (await send(stub, ttl_seconds=1)).ttl_seconds == 1
    assert (await send(stub, ttl_seconds=MAX_TTL)).ttl_seconds == MAX_TTL
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="t", action="act", ttl_seconds=MAX_TTL + 1)))
    assert set(violations) == {"ttl_seconds"}


async def test_wait_seconds_range(stub: pb_grpc.CommandServiceStub) -> None:
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="t", action="act", wait_seconds=MAX_WAIT + 1)))
    assert set(violations) == {"wait_seconds"}
    # At the bound the call waits; canceling the execution ends the wait at once.
    call = asyncio.ensure_future(stub.Send(pb.SendRequest(thing_id="waiter", action="act", wait_seconds=MAX_WAIT)))
    for _ in range(500):
        listed = (await stub.List(pb.ListRequest(thing_id="waiter"))).executions
        if listed:
            break
        await asyncio.sleep(0.01)
    assert listed and not call.done()
    await stub.Cancel(pb.CancelRequest(execution_id=listed[0].execution_id))
    assert (await asyncio.wait_for(call, 10)).status == pb.CANCELED


async def test_params_size(stub: pb_grpc.CommandServiceStub) -> None:
    ex = await send(stub, params=blob_params(PARAMS_BYTES))
    assert len(json.dumps(json_format.MessageToDict(ex.params), separators=(",", ":"))) == PARAMS_BYTES
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="t", action="act", params=blob_params(PARAMS_BYTES + 1))))
    assert set(violations) == {"params"}


@pytest.mark.parametrize(
    ("thing_id", "ok"),
    [
        ("x" * 128, True),
        ("x" * 129, False),
        ("a$", True),
        ("$a", False),
        ("a/b", False),
        ("a+", False),
        ("#", False),
        ("a\x00", False),
        ("", False),
    ],
)
async def test_thing_id_is_one_topic_level(stub: pb_grpc.CommandServiceStub, thing_id: str, ok: bool) -> None:
    if ok:
        assert (await send(stub, thing_id=thing_id)).thing_id == thing_id
    else:
        assert set(await invalid(stub.Send(pb.SendRequest(thing_id=thing_id, action="act")))) == {"thing_id"}


async def test_page_size(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    await stub.List(pb.ListRequest(page_size=PAGE_SIZE))
    assert set(await invalid(stub.List(pb.ListRequest(page_size=PAGE_SIZE + 1)))) == {"page_size"}
    async with app_channel(app) as channel:
        things = channel.unary_unary(
            "/fleetcmd.v1.ThingService/ListThings",
            request_serializer=rpb.ListThingsRequest.SerializeToString,
            response_deserializer=rpb.ListThingsResponse.FromString,
        )
        await things(rpb.ListThingsRequest(page_size=PAGE_SIZE), timeout=10)
        assert set(await invalid(things(rpb.ListThingsRequest(page_size=PAGE_SIZE + 1), timeout=10))) == {"page_size"}


async def test_rest_refuses_negative_ttl_and_wait(app: FleetcmdApp) -> None:
    assert app.ports is not None
    url = f"http://127.0.0.1:{app.ports.http}/api/v1/commands"
    headers = {"Authorization": f"Bearer {admin_key(app.settings.data_dir)}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for extra, field in (({"ttl": -1}, "ttl"), ({"waitSeconds": -1}, "waitSeconds")):
            async with http.post(url, json={"thingId": "t", "action": "act", **extra}) as reply:
                body = await reply.json()
                assert reply.status == 400, body
                assert [d["field"] for d in body["details"]] == [field]
        async with http.post(url, json={"thingId": "t", "action": "act", "ttl": 0, "waitSeconds": 0}) as reply:
            assert reply.status in (200, 202), await reply.text()


# ---- device reasons (EMQX dialect) --------------------------------------------------------------


async def test_status_reason_length_and_null_code(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    assert app.ports is not None and app.broker is not None
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "reasoner") as dev:
        too_long = await send(stub, thing_id="reasoner")
        at_bound = await send(stub, thing_id="reasoner")
        null_code = await send(stub, thing_id="reasoner")
        for ex in (too_long, at_bound, null_code):
            await wait_status(stub, ex.execution_id, pb.DELIVERED)
        for key in ("reasonCode", "reasonDescription"):
            await dev.arespond(too_long.execution_id, "FAILED", statusReason={key: "r" * (REASON + 1)})
        reason = {"reasonCode": "c" * REASON, "reasonDescription": "d" * REASON}
        await dev.arespond(at_bound.execution_id, "FAILED", statusReason=reason)
        await dev.arespond(null_code.execution_id, "REJECTED", statusReason={"reasonCode": None, "reasonDescription": "no"})
        done = await wait_status(stub, at_bound.execution_id, pb.FAILED)
        assert done.status_reason.reason_code == "c" * REASON
        assert done.status_reason.reason_description == "d" * REASON
        rejected = await wait_status(stub, null_code.execution_id, pb.REJECTED)
        assert rejected.status_reason.reason_code == "" and rejected.status_reason.reason_description == "no"
        # The two answers one past the bound were dropped (and counted); the execution did not move.
        assert app.broker.stats["dropped.invalid_status_reason"] == 2
        assert (await stub.Get(pb.GetRequest(execution_id=too_long.execution_id))).status == pb.DELIVERED


# ---- undecodable requests and echoed values -----------------------------------------------------

BAD_UTF8 = b"\x0a\x02\xff\xfe\x12\x03act"  # thing_id (field 1) holding invalid UTF-8
CORRUPT = b"\xff\xff\xff\xff"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def deep_params_request(levels: int) -> bytes:
    """A SendRequest whose params Struct nests ``levels`` deep (serializing does not check depth)."""
    params = struct_pb2.Struct()
    inner = params
    for _ in range(levels):
        inner = inner.fields["a"].struct_value
    raw = params.SerializeToString()
    number = pb.SendRequest.DESCRIPTOR.fields_by_name["params"].number
    return pb.SendRequest(thing_id="t", action="act").SerializeToString() + varint(number << 3 | 2) + varint(len(raw)) + raw


METHODS = [
    ("/fleetcmd.v1.CommandService/Send", "unary"),
    ("/fleetcmd.v1.CommandService/Get", "unary"),
    ("/fleetcmd.v1.CommandService/Stream", "server-stream"),
    ("/fleetcmd.v1.CommandService/SendStream", "bidi"),
    ("/fleetcmd.v1.ThingService/GetThing", "unary"),
    ("/fleetcmd.v1.ThingTypeService/PutThingType", "unary"),
    ("/fleetcmd.v1.ThingService/WatchPresence", "server-stream"),
    ("/grpc.health.v1.Health/Check", "unary"),
]
CASES = [
    *(pytest.param(m, k, BAD_UTF8, id=f"{m.rsplit('/', 1)[1]}-invalid-utf8") for m, k in METHODS),
    *(pytest.param(m, k, CORRUPT, id=f"{m.rsplit('/', 1)[1]}-corrupt") for m, k in METHODS),
    # Params nested past protobuf's recursion limit: only where a request holds a Struct.
    *(
        pytest.param(m, k, deep_params_request(200), id=f"{m.rsplit('/', 1)[1]}-deep-params")
        for m, k in METHODS
        if m.endswith(("/Send", "/SendStream"))
    ),
]


@pytest.mark.parametrize(("method", "kind", "raw"), CASES)
async def test_undecodable_request_is_invalid_argument(app: FleetcmdApp, method: str, kind: str, raw: bytes) -> None:
    # Raw bytes on the wire: no serializer, so the server's deserializer is what fails.
    async with app_channel(app) as channel:
        if kind == "unary":
            call: Any = channel.unary_unary(method)(raw, timeout=10)
        elif kind == "server-stream":
            call = channel.unary_stream(method)(raw, timeout=10).read()
        else:
            item = pb.SendStreamRequest(request_id="r1").SerializeToString()
            # The item's `send` field (2, length-delimited) holding the undecodable SendRequest bytes.
            bad = item + b"\x12" + varint(len(raw)) + raw
            stream = channel.stream_stream(method)(iter([bad]), timeout=10)
            call = stream.read()
        violations = field_violations(await rpc_error(call, grpc.StatusCode.INVALID_ARGUMENT))
        assert set(violations) == {"request"}


async def test_health_still_answers_after_undecodable_requests(app: FleetcmdApp) -> None:
    async with app_channel(app) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        await rpc_error(check(CORRUPT, timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
        reply = health_pb2.HealthCheckResponse.FromString(await check(b"", timeout=10))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_echoed_values_are_clipped(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    huge = "a" * 10_000
    err = await rpc_error(stub.Send(pb.SendRequest(thing_id="t", action=huge)), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(field_violations(err)) == {"action"}
    async with app_channel(app) as channel:
        put = channel.unary_unary(
            "/fleetcmd.v1.ThingTypeService/PutThingType",
            request_serializer=rpb.PutThingTypeRequest.SerializeToString,
            response_deserializer=rpb.ThingType.FromString,
        )
        # The action name is echoed in the field of each violation: clipped, the status stays small.
        schema = json.dumps({"type": "nonsense"})
        commands = {"é" * 10_000: rpb.CommandDefinition(params_schema=schema, result_schema=schema, default_ttl_seconds=10**9)}
        request = rpb.PutThingTypeRequest(
            thing_type=rpb.ThingType(name="n" * 10_000, description="d" * 10_000, commands=commands)
        )
        err = await rpc_error(put(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
        found = field_violations(err)
        assert "thing_type.name" in found and "thing_type.description" in found
        trailer = sum(len(k) + len(v) for k, v in err.trailing_metadata() or ())
        assert len(err.details().encode()) <= 512 and trailer <= 4096
