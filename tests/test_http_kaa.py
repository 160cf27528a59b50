"""Kaa CEX over HTTP polling (issue 4, section 2) with a real aiohttp client on loopback, port 0."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format, struct_pb2

from server.app import FleetcmdApp
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import admin_key, app_channel

TIMEOUT = aiohttp.ClientTimeout(total=30)
AV = "av1"


@dataclass
class Endpoint:
    thing_id: str
    token: str

    def url(self, resource: str, command_type: str, av: str = AV, token: str | None = None) -> str:
        return f"/kp1/{av}/cex/{token or self.token}/{resource}/{command_type}"


@dataclass
class Reply:
    status: int
    body: Any


@pytest.fixture
async def session(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None and app.ports.http
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as s:
        yield s


@pytest.fixture
async def grpc_stub(app: FleetcmdApp) -> AsyncIterator[pb_grpc.CommandServiceStub]:
    async with app_channel(app) as channel:
        yield pb_grpc.CommandServiceStub(channel)


async def endpoint(app: FleetcmdApp, thing_id: str = "kaa-dev") -> Endpoint:
    assert app.registry is not None
    _record, _password, token = await app.registry.create_thing(thing_id, "", {}, kaa_app_version=AV)
    assert token
    return Endpoint(thing_id, token)


async def post(session: aiohttp.ClientSession, path: str, body: Any = None, *, raw: bytes | None = None, **kw: Any) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with session.post(path, data=data, **kw) as resp:
        text = await resp.read()
        return Reply(resp.status, json.loads(text) if text else None)


async def send(
    stub: pb_grpc.CommandServiceStub, thing_id: str, command_type: str, payload: dict[str, Any] | None = None, ttl: int = 60
) -> pb.Execution:
    req = pb.SendRequest(thing_id=thing_id, action=command_type, ttl_seconds=ttl)
    if payload is not None:
        req.params.CopyFrom(json_format.ParseDict(payload, struct_pb2.Struct()))
    return await asyncio.wait_for(stub.Send(req), 10)


async def get(stub: pb_grpc.CommandServiceStub, execution_id: str) -> pb.Execution:
    return await stub.Get(pb.GetRequest(execution_id=execution_id))


def kaa_error(reply: Reply, status: int) -> str:
    assert reply.status == status, reply
    assert set(reply.body) == {"statusCode", "reasonPhrase"}, reply
    assert reply.body["statusCode"] == status and reply.body["reasonPhrase"]
    phrase: str = reply.body["reasonPhrase"]
    return phrase


def result_item(kaa_id: int, code: int = 200, phrase: str = "OK", payload: Any = "Success") -> dict[str, Any]:
    return {"id": kaa_id, "statusCode": code, "reasonPhrase": phrase, "payload": payload}


# ---- polling ------------------------------------------------------------------------------


async def test_poll_returns_outstanding_commands_and_marks_them_sent(
    app: FleetcmdApp, session: aiohttp.ClientSession, grpc_stub: pb_grpc.CommandServiceStub
) -> None:
    ep = await endpoint(app)
    assert (await post(session, ep.url("command", "reboot"), {})) == Reply(200, [])
    first = await send(grpc_stub, ep.thing_id, "reboot", {"delay": 5})
    second = await send(grpc_stub, ep.thing_id, "reboot")
    other = await send(grpc_stub, ep.thing_id, "zero", {"x": 1})
    assert first.status == pb.QUEUED
    assert first.kaa_command_id and second.kaa_command_id and first.kaa_command_id != second.kaa_command_id
    polled = await post(session, ep.url("command", "reboot"), {})
    assert polled.status == 200
    assert polled.body == [{"id": first.kaa_command_id, "payload": {"delay": 5}}, {"id": second.kaa_command_id, "payload": {}}]
    for execution in (first, second):
        assert (await get(grpc_stub, execution.execution_id)).status == pb.SENT
    assert (await get(grpc_stub, other.execution_id)).status == pb.QUEUED
    # Still outstanding until a result arrives; observe is accepted (and means nothing over HTTP).
    again = await post(session, ep.url("command", "reboot"), {"observe": True})
    assert [c["id"] for c in again.body] == [first.kaa_command_id, second.kaa_command_id]
    zero = await post(session, ep.url("command", "zero"), {"observe": False})
    assert zero.body == [{"id": other.kaa_command_id, "payload": {"x": 1}}]
    # An empty body is read as {}.
    assert (await post(session, ep.url("command", "zero"))).body == zero.body


async def test_poll_errors(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    ep = await endpoint(app)
    kaa_error(await post(session, ep.url("command", "reboot", token="wrong-token"), {}), 401)
    kaa_error(await post(session, ep.url("command", "reboot", av="av2"), {}), 401)
    kaa_error(await post(session, ep.url("command", "reboot"), raw=b"{not json"), 400)
    kaa_error(await post(session, ep.url("command", "reboot"), []), 400)
    kaa_error(await post(session, ep.url("command", "reboot"), {"observe": "yes"}), 400)
    kaa_error(await post(session, ep.url("command", "re-boot"), {}), 400)
    kaa_error(await post(session, ep.url("command", "reboot"), raw=b'{"observe": NaN}'), 400)
    kaa_error(await post(session, ep.url("nothing", "reboot"), {}), 404)
    async with session.get(ep.url("command", "reboot")) as resp:
        assert resp.status == 405
        assert (await resp.json())["statusCode"] == 405
    # No API key is involved: an Authorization header changes nothing.
    headers = {"Authorization": "Bearer fck_bogus_bogus"}
    assert (await post(session, ep.url("command", "reboot"), {}, headers=headers)).status == 200


# ---- results ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [(200, pb.SUCCEEDED), (204, pb.SUCCEEDED), (409, pb.REJECTED), (404, pb.REJECTED), (500, pb.FAILED), (302, pb.FAILED)],
)
async def test_result_status_code_decides_the_final_status(
    app: FleetcmdApp, session: aiohttp.ClientSession, grpc_stub: pb_grpc.CommandServiceStub, code: int, status: int
) -> None:
    ep = await endpoint(app)
    ex = await send(grpc_stub, ep.thing_id, "park")
    polled = await post(session, ep.url("command", "park"), {})
    assert [c["id"] for c in polled.body] == [ex.kaa_command_id]
    reply = await post(session, ep.url("result", "park"), [result_item(ex.kaa_command_id, code, "slot taken", {"slot": 7})])
    assert reply == Reply(200, {})
    got = await get(grpc_stub, ex.execution_id)
    assert got.status == status
    assert got.status_reason.reason_code == str(code) and got.status_reason.reason_description == "slot taken"
    assert json_format.MessageToDict(got.result) == {"slot": 7}
    # Executed: no longer handed out.
    assert (await post(session, ep.url("command", "park"), {})).body == []


async def test_result_as_a_single_object(
    app: FleetcmdApp, session: aiohttp.ClientSession, grpc_stub: pb_grpc.CommandServiceStub
) -> None:
    ep = await endpoint(app)
    ex = await send(grpc_stub, ep.thing_id, "zero")
    reply = await post(session, ep.url("result", "zero"), {"id": ex.kaa_command_id, "statusCode": 200})
    assert reply.status == 200
    got = await get(grpc_stub, ex.execution_id)
    assert got.status == pb.SUCCEEDED and got.status_reason.reason_code == "200"
    assert not got.HasField("result")


async def test_bad_result_items_are_named_and_valid_ones_still_count(
    app: FleetcmdApp, session: aiohttp.ClientSession, grpc_stub: pb_grpc.CommandServiceStub
) -> None:
    ep = await endpoint(app)
    good = await send(grpc_stub, ep.thing_id, "reboot")
    await send(grpc_stub, ep.thing_id, "zero")
    other_type = await send(grpc_stub, ep.thing_id, "zero")
    # Ids are per command type: "zero" has 1 and 2, "reboot" only 1.
    assert good.kaa_command_id == 1 and other_type.kaa_command_id == 2
    body = [
        result_item(good.kaa_command_id),
        result_item(9999),
        {"id": good.kaa_command_id, "reasonPhrase": "no code"},
        "not an object",
        result_item(other_type.kaa_command_id),  # an id of another command type only
        {"id": "7", "statusCode": 200},
    ]
    reply = await post(session, ep.url("result", "reboot"), body)
    phrase = kaa_error(reply, 400)
    assert "5 of 6" in phrase and "1 applied" in phrase
    for index in (1, 2, 3, 4, 5):
        assert f"item {index}" in phrase
    assert "item 0" not in phrase and "id 9999" in phrase and "statusCode" in phrase
    assert (await get(grpc_stub, good.execution_id)).status == pb.SUCCEEDED
    assert (await get(grpc_stub, other_type.execution_id)).status == pb.QUEUED
    # An empty array is a no-op (Kaa's sample client answers an empty command list with []).
    assert (await post(session, ep.url("result", "reboot"), [])) == Reply(200, {})
    # Only unknown ids: 404.
    assert "id 9999" in kaa_error(await post(session, ep.url("result", "reboot"), [result_item(9999)]), 404)
    kaa_error(await post(session, ep.url("result", "reboot"), 42), 400)
    kaa_error(await post(session, ep.url("result", "reboot")), 400)
    kaa_error(await post(session, ep.url("result", "reboot"), raw=b"[{"), 400)
    kaa_error(await post(session, ep.url("result", "reboot", token="nope"), [result_item(1)]), 401)
    kaa_error(await post(session, ep.url("result", "bad type"), [result_item(1)]), 400)


async def test_a_repeated_result_keeps_the_first_outcome(
    app: FleetcmdApp, session: aiohttp.ClientSession, grpc_stub: pb_grpc.CommandServiceStub
) -> None:
    ep = await endpoint(app)
    ex = await send(grpc_stub, ep.thing_id, "reboot")
    assert (await post(session, ep.url("result", "reboot"), [result_item(ex.kaa_command_id, 200)])).status == 200
    assert (await post(session, ep.url("result", "reboot"), [result_item(ex.kaa_command_id, 500)])).status == 200
    got = await get(grpc_stub, ex.execution_id)
    assert got.status == pb.SUCCEEDED
    assert got.history[-1].late


async def test_oversized_bodies_are_413(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    ep = await endpoint(app)
    over_results = app.settings.max_response_bytes + 1
    payload = [result_item(1, payload="x" * over_results)]
    kaa_error(await post(session, ep.url("result", "reboot"), payload), 413)
    kaa_error(await post(session, ep.url("command", "reboot"), raw=b" " * (2 * 1024 * 1024)), 413)
    assert (await post(session, ep.url("command", "reboot"), {})).status == 200


# ---- retention ----------------------------------------------------------------------------


async def test_expired_commands_disappear_from_polls(
    app: FleetcmdApp, session: aiohttp.ClientSession, grpc_stub: pb_grpc.CommandServiceStub
) -> None:
    ep = await endpoint(app)
    short = await send(grpc_stub, ep.thing_id, "reboot", ttl=1)
    long = await send(grpc_stub, ep.thing_id, "reboot", ttl=60)
    polled = await post(session, ep.url("command", "reboot"), {})
    assert [c["id"] for c in polled.body] == [short.kaa_command_id, long.kaa_command_id]
    got = short
    for _ in range(150):
        got = await get(grpc_stub, short.execution_id)
        if got.status == pb.TIMED_OUT:
            break
        await asyncio.sleep(0.02)
    assert got.status == pb.TIMED_OUT
    polled = await post(session, ep.url("command", "reboot"), {})
    assert [c["id"] for c in polled.body] == [long.kaa_command_id]
    # A result for the expired command is kept as late; the status stays TIMED_OUT.
    assert (await post(session, ep.url("result", "reboot"), [result_item(short.kaa_command_id)])).status == 200
    assert (await get(grpc_stub, short.execution_id)).status == pb.TIMED_OUT


async def test_canceled_commands_are_not_handed_out(
    app: FleetcmdApp, session: aiohttp.ClientSession, grpc_stub: pb_grpc.CommandServiceStub
) -> None:
    ep = await endpoint(app)
    ex = await send(grpc_stub, ep.thing_id, "reboot")
    await grpc_stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id))
    assert (await post(session, ep.url("command", "reboot"), {})).body == []


# ---- the seed's flow, and the REST view of a Kaa execution --------------------------------


async def test_seed_curl_flow(app: FleetcmdApp, session: aiohttp.ClientSession, grpc_stub: pb_grpc.CommandServiceStub) -> None:
    """As in the seed: curl --request POST .../command/reboot --data-raw '{}', then the result array."""
    ep = await endpoint(app, "seed-kaa")
    ex = await send(grpc_stub, ep.thing_id, "reboot", ttl=3600)
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl --data-raw sends
    polled = await post(session, ep.url("command", "reboot"), raw=b"{}", headers=form)
    assert polled.status == 200
    (command,) = polled.body
    assert command == {"id": ex.kaa_command_id, "payload": {}}
    assert (await get(grpc_stub, ex.execution_id)).status == pb.SENT
    raw = ('[{\n"id": ' + str(command["id"]) + ',\n"statusCode": 200,\n"reasonPhrase": "OK",\n"payload": "Success"\n}]').encode()
    reported = await post(session, ep.url("result", "reboot"), raw=raw, headers=form)
    assert reported.status == 200
    assert (await post(session, ep.url("command", "reboot"), raw=b"{}", headers=form)).body == []
    got = await get(grpc_stub, ex.execution_id)
    assert got.status == pb.SUCCEEDED
    assert got.status_reason.reason_code == "200" and got.status_reason.reason_description == "OK"
    assert json_format.MessageToDict(got.result) == "Success"
    # The REST API shows the same, with the Kaa command id.
    headers = {"Authorization": f"Bearer {admin_key(app.settings.data_dir)}"}
    async with session.get(f"/api/v1/commands/{ex.execution_id}", headers=headers) as resp:
        body = await resp.json()
    assert body["status"] == "SUCCEEDED" and body["kaaCommandId"] == command["id"]
    assert body["statusReason"] == {"reasonCode": "200", "reasonDescription": "OK"} and body["result"] == "Success"
    assert [h["status"] for h in body["history"]] == ["QUEUED", "SENT", "SUCCEEDED"]
