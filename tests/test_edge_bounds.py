"""Issue 13: every JSON value is bounded and normalised at the edge, once, on every surface.

For each rule of :mod:`broker_hooks.jsonvalue` the value AT the bound is accepted and the value one
past it is refused, through real clients: paho devices (EMQX and Kaa MQTT), aiohttp (Kaa HTTP and
REST) and gRPC. The worst value the rules admit is stored and read back through gRPC Get, List,
Stream and StreamBatches, REST and the ``fleetcmd`` CLI; rows an older version may have written
(a 400-digit integer, a 200-deep value, NaN) are served without failing any read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2

from broker_hooks import jsonvalue
from broker_hooks.jsonvalue import MAX_DEPTH, MAX_SAFE_INTEGER, JsonProblem
from server.api import convert
from server.app import FleetcmdApp
from server.config import Settings
from server.core.errors import InvalidArgument
from server.core.validation import validate_send
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import admin_key, app_channel
from tests.devices import EmqxDevice, wait_for
from tests.proc import run_cli
from tests.test_kaa_mqtt import KaaDevice, cex, endpoint

HOST = "127.0.0.1"
COMMANDS = "/api/v1/commands"
TIMEOUT = aiohttp.ClientTimeout(total=30)


def deep(levels: int, leaf: Any = 1) -> Any:
    """A value of exactly ``levels`` nested containers (alternating arrays and objects)."""
    value = leaf
    for i in range(levels):
        value = [value] if i % 2 == 0 else {"k": value}
    return value


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


# The worst value every rule admits: MAX_DEPTH levels, the extreme integers and doubles, the widest
# Unicode (a non-BMP character, NUL, quotes and backslashes, a key that needs escaping).
WORST: dict[str, Any] = {
    "deep": deep(MAX_DEPTH - 1, "leaf"),
    "max": MAX_SAFE_INTEGER,
    "min": -MAX_SAFE_INTEGER,
    "huge": 1.7976931348623157e308,
    "tiny": 5e-324,
    "neg": -2.5e-300,
    "text": 'é€😀\x00"\\/\n\u2028',
    "😀 \x01": [True, False, None, "", [], {}],
}
assert depth(WORST) == MAX_DEPTH


# ---- the codec: at the bound accepted, one past refused ------------------------------------------


@pytest.mark.parametrize(
    ("ok", "bad", "reason"),
    [
        (str(MAX_SAFE_INTEGER), str(MAX_SAFE_INTEGER + 1), jsonvalue.NUMBER_OUT_OF_RANGE),
        (str(-MAX_SAFE_INTEGER), str(-MAX_SAFE_INTEGER - 1), jsonvalue.NUMBER_OUT_OF_RANGE),
        ("[" + str(MAX_SAFE_INTEGER) + "]", "[1, " + "9" * 400 + "]", jsonvalue.NUMBER_OUT_OF_RANGE),
        ("1" * 15, "1" * 5000, jsonvalue.NUMBER_OUT_OF_RANGE),  # beyond int()'s digit limit: refused, not a crash
        ("1.7976931348623157e308", "1.8e308", jsonvalue.NOT_FINITE),
        ("1e308", "1e400", jsonvalue.NOT_FINITE),
        ("-1e308", "[-1e400]", jsonvalue.NOT_FINITE),
        ("1" * 309 + ".0", "2" * 309 + ".0", jsonvalue.NOT_FINITE),
        ('"NaN"', "NaN", jsonvalue.NOT_FINITE),
        ('{"Infinity": 1}', '{"a": Infinity}', jsonvalue.NOT_FINITE),
        ("[1]", "[-Infinity]", jsonvalue.NOT_FINITE),
        ('"\\ud83d\\ude00"', '"\\ud83d"', jsonvalue.INVALID_UNICODE),  # a pair is fine, a lone half is not
        ('{"\\ud83d\\ude00": 1}', '{"\\udc00": 1}', jsonvalue.INVALID_UNICODE),
        ('"\\u00e9"', '["x", "\\ude00y"]', jsonvalue.INVALID_UNICODE),
        (json.dumps(deep(MAX_DEPTH)), json.dumps(deep(MAX_DEPTH + 1)), jsonvalue.TOO_DEEP),
        ("[" * MAX_DEPTH + "]" * MAX_DEPTH, "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), jsonvalue.TOO_DEEP),
        # More brackets than levels: the depth is measured, not guessed from the count.
        (json.dumps([deep(MAX_DEPTH - 1), [[]], {"a": {}}]), json.dumps([[], deep(MAX_DEPTH)]), jsonvalue.TOO_DEEP),
        ('"' + "[" * 40 + '"', '[{"a": "' + "{" * 40 + '"}, ' + json.dumps(deep(MAX_DEPTH)) + "]", jsonvalue.TOO_DEEP),
        ('"' + "[" * 1000 + '"', "[" * 100_000 + "]" * 100_000, jsonvalue.TOO_DEEP),  # RecursionError is "too deep"
        ("{}", "{", jsonvalue.INVALID_JSON),
    ],
)
def test_codec_bounds(ok: str, bad: str, reason: str) -> None:
    assert jsonvalue.loads(ok) == json.loads(ok)
    assert jsonvalue.loads(ok.encode()) == json.loads(ok)
    with pytest.raises(JsonProblem) as caught:
        jsonvalue.loads(bad)
    assert caught.value.reason == reason


def test_codec_bytes_must_be_strict_utf8() -> None:
    assert jsonvalue.loads('"é😀"'.encode()) == "é😀"
    for raw in (b'"\xed\xa0\x80"', b'"\xff"', b'"\xc3"'):  # an encoded surrogate, invalid bytes, a truncated sequence
        with pytest.raises(JsonProblem) as caught:
            jsonvalue.loads(raw)
        assert caught.value.reason == jsonvalue.INVALID_UNICODE


def test_codec_depth_allowance_and_parsed_values() -> None:
    wrapped = json.dumps({"result": deep(MAX_DEPTH)})
    assert jsonvalue.loads(wrapped, MAX_DEPTH + 1)
    with pytest.raises(JsonProblem):
        jsonvalue.loads(wrapped)
    jsonvalue.check(WORST)
    for bad, reason, path in [
        ({"a": [1, MAX_SAFE_INTEGER + 1]}, jsonvalue.NUMBER_OUT_OF_RANGE, ("a", 1)),
        ({"a": {"b": math.nan}}, jsonvalue.NOT_FINITE, ("a", "b")),
        ({"a": -math.inf}, jsonvalue.NOT_FINITE, ("a",)),
        ({"a": "\ud800"}, jsonvalue.INVALID_UNICODE, ("a",)),
        ({"\udfff": 1}, jsonvalue.INVALID_UNICODE, ()),
        ({"a": deep(MAX_DEPTH)}, jsonvalue.TOO_DEEP, ("a",) + ("k", 0) * (MAX_DEPTH // 2 - 1) + ("k",)),
        ({"a": b"bytes"}, jsonvalue.NOT_JSON, ("a",)),
        ({1: 2}, jsonvalue.NOT_JSON, ()),
    ]:
        with pytest.raises(JsonProblem) as caught:
            jsonvalue.check(bad)
        assert (caught.value.reason, caught.value.path) == (reason, path), bad
    assert jsonvalue.where(("a", 1, "b"), "params") == "params.a[1].b"


def test_struct_to_dict_refuses_what_json_cannot_hold() -> None:
    assert convert.struct_to_dict(struct({"n": [2.0, 2.5, 1e300], "d": deep(MAX_DEPTH - 1)})) == {
        "n": [2, 2.5, 1e300],
        "d": deep(MAX_DEPTH - 1),
    }
    for number in (math.nan, math.inf, -math.inf):
        st = struct({"a": {"n": 1}})
        st.fields["a"].struct_value.fields["n"].number_value = number
        with pytest.raises(InvalidArgument) as caught:
            convert.struct_to_dict(st)
        assert caught.value.violations[0].field == "params"
        assert caught.value.violations[0].description.startswith("params.a.n is refused (not_finite)")
    with pytest.raises(InvalidArgument):
        convert.struct_to_dict(struct({"d": deep(MAX_DEPTH)}))


def test_validate_send_refuses_non_finite_params_from_any_caller(settings: Settings) -> None:
    """A last net behind the surfaces' parsers: the canonical text has no NaN or Infinity."""
    validate_send(settings, thing_id="t", action="a", params={"n": 1e308}, ttl_seconds=0, idempotency_key="")
    with pytest.raises(InvalidArgument) as caught:
        validate_send(settings, thing_id="t", action="a", params={"n": math.inf}, ttl_seconds=0, idempotency_key="")
    assert [v.field for v in caught.value.violations] == ["params"]


def test_protobuf_carries_the_deepest_accepted_value_in_every_message() -> None:
    """MAX_DEPTH is below what protobuf decodes (100 levels) in every message that carries a value."""
    text = json.dumps(WORST)
    value = convert._value(text)
    st = convert._struct(text)
    messages = [
        pb.Execution(params=st, result=value, history=[pb.StateChange(result=value)]),
        pb.EventBatch(events=[pb.ExecutionEvent(result=value)]),
        pb.SendStreamResponse(execution=pb.Execution(history=[pb.StateChange(result=value)])),
        pb.SendStreamRequest(send=pb.SendRequest(params=st)),
    ]
    for message in messages:
        assert type(message).FromString(message.SerializeToString()) == message
    assert convert.to_python(value) == WORST and convert.struct_to_dict(st) == WORST


# ---- one service for the surface tests ---------------------------------------------------------


@pytest.fixture
async def stub(app: FleetcmdApp) -> AsyncIterator[pb_grpc.CommandServiceStub]:
    async with app_channel(app) as channel:
        yield pb_grpc.CommandServiceStub(channel)


@pytest.fixture
async def http(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None and app.ports.http
    headers = {"Authorization": f"Bearer {admin_key(app.settings.data_dir)}"}
    async with aiohttp.ClientSession(f"http://{HOST}:{app.ports.http}", timeout=TIMEOUT, headers=headers) as session:
        yield session


async def http_call(session: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with session.request(method, path, **kw) as resp:
        raw = await resp.read()
        # What the server answers is always strict JSON (no NaN/Infinity), whatever it stores.
        return resp.status, (jsonvalue.loads(raw, 1000) if raw else None)


def device(app: FleetcmdApp, thing: str) -> EmqxDevice:
    assert app.ports is not None and app.ports.mqtt is not None
    return EmqxDevice(HOST, app.ports.mqtt, thing)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    st = struct_pb2.Struct()
    st.update(value)
    return st


async def wait_status(stub: pb_grpc.CommandServiceStub, execution_id: str, status: int) -> pb.Execution:
    async def reached() -> pb.Execution | None:
        ex = await stub.Get(pb.GetRequest(execution_id=execution_id))
        return ex if ex.status == status else None

    for _ in range(250):
        ex = await reached()
        if ex is not None:
            return ex
        await asyncio.sleep(0.02)
    pytest.fail(f"{execution_id} never reached {pb.ExecutionStatus.Name(status)}")


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Expected garbage is logged without a traceback."""
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


# ---- EMQX devices --------------------------------------------------------------------------------


def _report(result: str, reason: str = '{"reasonCode": "ok"}') -> bytes:
    return f'{{"status": "SUCCEEDED", "result": {result}, "statusReason": {reason}}}'.encode()


REFUSED_REPORTS = [
    (_report(str(MAX_SAFE_INTEGER + 1)), "number_out_of_range"),
    (_report("[" + str(-MAX_SAFE_INTEGER - 1) + "]"), "number_out_of_range"),
    (_report("9" * 400), "number_out_of_range"),
    (_report("NaN"), "not_finite"),
    (_report('{"t": Infinity}'), "not_finite"),
    (_report("-Infinity"), "not_finite"),
    (_report("1e400"), "not_finite"),
    (_report('"\\ud800"'), "invalid_unicode"),
    (_report('{"\\udc00": 1}'), "invalid_unicode"),
    (_report("1", '{"reasonCode": "x", "reasonDescription": "\\ud800"}'), "invalid_unicode"),
    (b'{"status": "SUCCEEDED", "result": "\xff"}', "invalid_unicode"),
    (_report(json.dumps(deep(MAX_DEPTH + 1))), "too_deep"),
    (_report("[" * 100_000 + "]" * 100_000), "too_deep"),
]


async def test_emqx_reports_at_the_bounds(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    assert app.broker is not None
    async with device(app, "edge-emqx") as dev:
        ex = await stub.Send(pb.SendRequest(thing_id="edge-emqx", action="a", ttl_seconds=60))
        await dev.wait_request()
        await wait_status(stub, ex.execution_id, pb.DELIVERED)
        topic = dev.response_topic(ex.execution_id)
        for payload, _reason in REFUSED_REPORTS:
            await dev.apublish(topic, payload)
        expected: dict[str, int] = {}
        for _payload, reason in REFUSED_REPORTS:
            expected[reason] = expected.get(reason, 0) + 1
        await wait_for(
            lambda: all(app.broker is not None and app.broker.stats[f"dropped.{r}"] == n for r, n in expected.items()),
            what="every refused report to be counted",
        )
        assert (await stub.Get(pb.GetRequest(execution_id=ex.execution_id))).status == pb.DELIVERED
        # At every bound: accepted, and the connection that sent the garbage still works.
        await dev.apublish(topic, _report(json.dumps(WORST, ensure_ascii=False)))
        done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
        assert convert.to_python(done.result) == WORST
    no_tracebacks(caplog)


# ---- Kaa over MQTT and HTTP ----------------------------------------------------------------------


async def _kaa_sends(stub: pb_grpc.CommandServiceStub, thing: str, n: int) -> list[pb.Execution]:
    return [await stub.Send(pb.SendRequest(thing_id=thing, action="park", ttl_seconds=60)) for _ in range(n)]


@pytest.mark.secure
async def test_kaa_mqtt_results_at_the_bounds(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    assert app.core is not None
    token = await endpoint(app, "edge-kaa")
    sent = await _kaa_sends(stub, "edge-kaa", 2)
    topic = cex(token, "result/park/1")

    def item(kaa_id: Any = 1, code: Any = 200, payload: str = '"ok"') -> str:
        return f'{{"id": {kaa_id}, "statusCode": {code}, "reasonPhrase": "r", "payload": {payload}}}'

    async with KaaDevice(app) as dev:
        # Take the commands and stop pushes of the type: every later message is an answer.
        _msg, listed = await dev.request(cex(token, "command/park/1"), {"observe": False})
        assert [c["id"] for c in listed] == [ex.kaa_command_id for ex in sent]
        refused_bodies = [
            ("[" + item(payload="NaN") + "]", "not_finite"),
            ("[" + item(payload="1e400") + "]", "not_finite"),
            ("[" + item(payload=str(MAX_SAFE_INTEGER + 1)) + "]", "number_out_of_range"),
            ("[" + item(kaa_id=2**63) + "]", "number_out_of_range"),  # was an HTTP 500 / SQLite OverflowError
            ("[" + item(payload='"\\udfff"') + "]", "invalid_unicode"),
            ("[" + item(payload="[" * 100_000 + "]" * 100_000) + "]", "too_deep"),
            ("[" + item(payload=json.dumps(deep(MAX_DEPTH + 1))) + "]", "too_deep"),
            # Not only the payload: the whole body is bounded (an array, an item, then the value).
            ('[{"id": 1, "statusCode": 200, "x": ' + json.dumps(deep(MAX_DEPTH + 1)) + "}]", "too_deep"),
        ]
        for body, reason in refused_bodies:
            before = app.core.stats[f"dropped.{reason}"]
            _msg, answer = await dev.request(topic, body.encode())
            assert answer["statusCode"] == 400 and reason in answer["reasonPhrase"], answer
            assert app.core.stats[f"dropped.{reason}"] == before + 1
        # A single object leaves room for one more level: the payload itself is bounded per item.
        _msg, answer = await dev.request(topic, item(payload=json.dumps(deep(MAX_DEPTH + 1))).encode())
        assert answer["statusCode"] == 400 and "too_deep" in answer["reasonPhrase"], answer
        for bad_item, words in [
            (item(kaa_id=MAX_SAFE_INTEGER + 0), "no command"),  # at the bound: a valid id, not issued
            (item(kaa_id=0), "id must be"),
            (item(code=99), "statusCode must be"),
            (item(code=600), "statusCode must be"),
        ]:
            _msg, answer = await dev.request(topic, f"[{bad_item}]".encode())
            assert answer["statusCode"] in (400, 404) and words in answer["reasonPhrase"], answer
        for ex in sent:
            assert (await stub.Get(pb.GetRequest(execution_id=ex.execution_id))).status != pb.FAILED
        # At the bounds: statusCode 100 and 599, the worst payload.
        worst = json.dumps(WORST, ensure_ascii=False)
        ids = [ex.kaa_command_id for ex in sent]
        body = f"[{item(ids[0], 599, worst)}, {item(ids[1], 100, worst)}]"
        _msg, answer = await dev.request(topic, body.encode())
        assert answer == {}
    for ex in sent:
        done = await wait_status(stub, ex.execution_id, pb.FAILED)
        assert convert.to_python(done.result) == WORST
    no_tracebacks(caplog)


@pytest.mark.secure
async def test_kaa_http_results_at_the_bounds(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    assert app.ports is not None and app.core is not None
    token = await endpoint(app, "edge-kaa-http")
    (ex,) = await _kaa_sends(stub, "edge-kaa-http", 1)
    url = f"/kp1/av1/cex/{token}/result/park"
    async with aiohttp.ClientSession(f"http://{HOST}:{app.ports.http}", timeout=TIMEOUT) as session:

        async def post(raw: bytes) -> tuple[int, Any]:
            return await http_call(session, "POST", url, data=raw)

        for raw, reason in [
            (b'[{"id": 9223372036854775808, "statusCode": 200}]', "number_out_of_range"),  # was HTTP 500
            (b'[{"id": 1, "statusCode": 200, "payload": NaN}]', "not_finite"),
            (b'[{"id": 1, "statusCode": 200, "payload": "\\ud800"}]', "invalid_unicode"),
            (b'[{"id": 1, "statusCode": 200, "payload": "\xff"}]', "invalid_unicode"),
            (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        ]:
            before = app.core.stats[f"dropped.{reason}"]
            status, body = await post(raw)
            assert (status, body["statusCode"]) == (400, 400) and reason in body["reasonPhrase"], body
            assert app.core.stats[f"dropped.{reason}"] == before + 1
        status, body = await post(json.dumps([{"id": 2**53 + 0, "statusCode": 200}]).encode())
        assert status == 404, body  # at the bound: a valid id this endpoint was never issued
        status, body = await post(
            json.dumps({"id": ex.kaa_command_id, "statusCode": 200, "payload": deep(MAX_DEPTH + 1)}).encode()
        )
        assert status == 400 and "too_deep" in body["reasonPhrase"], body
        item = {"id": ex.kaa_command_id, "statusCode": 200, "payload": WORST}
        assert await post(json.dumps([item], ensure_ascii=False).encode()) == (200, {})
    done = await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
    assert convert.to_python(done.result) == WORST


# ---- operators: REST and gRPC --------------------------------------------------------------------


async def test_rest_params_at_the_bounds(http: aiohttp.ClientSession) -> None:
    def body(params: str) -> bytes:
        return f'{{"thingId": "edge-rest", "action": "a", "params": {params}}}'.encode()

    for params, where, reason in [
        ('{"n": ' + str(MAX_SAFE_INTEGER + 1) + "}", "params.n ", "number_out_of_range"),
        ('{"n": [1, ' + "9" * 400 + "]}", "params.n[1] ", "number_out_of_range"),
        ('{"n": NaN}', "params.n ", "not_finite"),
        ('{"n": [-Infinity]}', "params.n[0] ", "not_finite"),
        ('{"n": 1e400}', "params.n ", "not_finite"),
        ('{"s": "\\ud800"}', "params.s ", "invalid_unicode"),
        ('{"\\udc00": 1}', "params ", "invalid_unicode"),
        (json.dumps({"d": deep(MAX_DEPTH)}), "params.d.k[0].k[0]", "too_deep"),
        ("[" * 100_000 + "]" * 100_000, "", "too_deep"),
    ]:
        status, answer = await http_call(http, "POST", COMMANDS, data=body(params))
        assert status == 400, (params[:40], answer)
        assert answer["code"] == "INVALID_ARGUMENT"
        (detail,) = answer["details"]
        assert detail["field"] == ("params" if where else "body"), (params[:40], answer)
        assert detail["description"].startswith(where) and reason in detail["description"], (params[:40], answer)
    at_bound = json.dumps({"d": deep(MAX_DEPTH - 1), "n": [MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 1e308]})
    status, answer = await http_call(http, "POST", COMMANDS, data=body(at_bound))
    assert status == 202 and answer["params"] == json.loads(at_bound), answer
    status, answer = await http_call(http, "POST", COMMANDS, data=body(json.dumps(WORST, ensure_ascii=False)))
    assert status == 202, answer
    assert answer["params"] == WORST


async def test_grpc_params_at_the_bounds(stub: pb_grpc.CommandServiceStub) -> None:
    unset = struct_pb2.Struct()
    unset.fields["a"].list_value.values.add()  # a Value with no kind: was stored as null
    unset_top = struct_pb2.Struct()
    unset_top.fields["b"].SetInParent()
    nan = struct({"n": 1})
    nan.fields["n"].number_value = math.nan
    inf = struct({"n": 1})
    inf.fields["n"].number_value = -math.inf
    for params, field in [
        (unset, "params.a[0]"),
        (unset_top, "params.b"),
        (nan, "params.n"),
        (inf, "params.n"),
        (struct({"d": deep(MAX_DEPTH)}), "params.d.k[0].k[0]"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Send(pb.SendRequest(thing_id="edge-grpc", action="a", params=params))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert details.startswith(f"params: {field}") and " is refused " in details, details
    at_bound = struct({"d": deep(MAX_DEPTH - 1), "n": [MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 1e308]})
    ex = await stub.Send(pb.SendRequest(thing_id="edge-grpc", action="a", params=at_bound))
    assert convert.to_python(ex.params) == convert.struct_to_dict(at_bound)
    ex = await stub.Send(pb.SendRequest(thing_id="edge-grpc", action="a", params=struct(WORST)))
    assert convert.to_python(ex.params) == WORST


# ---- the worst accepted value, read back everywhere ---------------------------------------------


async def _every_read(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, http: aiohttp.ClientSession, thing: str, execution_id: str
) -> list[tuple[str, Any, Any]]:
    """(surface, params, result) of one final execution as every reader shows it."""
    out: list[tuple[str, Any, Any]] = []
    got = await stub.Get(pb.GetRequest(execution_id=execution_id))
    out.append(("grpc get", convert.to_python(got.params), convert.to_python(got.result)))
    out.append(("grpc history", None, convert.to_python(got.history[-1].result)))
    listed = await stub.List(pb.ListRequest(thing_id=thing))
    (row,) = [e for e in listed.executions if e.execution_id == execution_id]
    out.append(("grpc list", convert.to_python(row.params), convert.to_python(row.result)))
    unfiltered = await stub.List(pb.ListRequest())  # a page holding it, with other things' rows
    assert any(e.execution_id == execution_id for e in unfiltered.executions)

    stream = stub.Stream(pb.StreamRequest(after_sequence=0))
    async for event in stream:
        if event.execution_id == execution_id and event.status == got.status:
            out.append(("grpc stream", None, convert.to_python(event.result)))
            break
    stream.cancel()
    batches = stub.StreamBatches(pb.StreamRequest(after_sequence=0))
    found = False
    async for batch in batches:
        for event in batch.events:
            if event.execution_id == execution_id and event.status == got.status:
                out.append(("grpc batches", None, convert.to_python(event.result)))
                found = True
        if found:
            break
    batches.cancel()

    status, one = await http_call(http, "GET", f"{COMMANDS}/{execution_id}")
    assert status == 200, one
    out.append(("rest get", one["params"], one["result"]))
    out.append(("rest history", None, one["history"][-1]["result"]))
    status, page = await http_call(http, "GET", COMMANDS, params={"thingId": thing})
    assert status == 200, page
    (rest_row,) = [e for e in page["executions"] if e["executionId"] == execution_id]
    out.append(("rest list", rest_row["params"], rest_row["result"]))

    assert app.ports is not None
    target, key = f"{HOST}:{app.ports.grpc}", admin_key(app.settings.data_dir)
    cli_get = await asyncio.to_thread(run_cli, "get", execution_id, "--json", target=target, api_key=key)
    assert cli_get.returncode == 0, cli_get.stderr
    shown = json.loads(cli_get.stdout)
    out.append(("cli get", shown["params"], shown["result"]))
    cli_list = await asyncio.to_thread(run_cli, "list", "--thing", thing, "--json", target=target, api_key=key)
    assert cli_list.returncode == 0, cli_list.stderr
    (cli_row,) = [e for e in json.loads(cli_list.stdout)["executions"] if e["execution_id"] == execution_id]
    out.append(("cli list", cli_row["params"], cli_row["result"]))
    return out


async def test_the_worst_accepted_value_reads_back_everywhere(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, http: aiohttp.ClientSession
) -> None:
    status, sent = await http_call(
        http,
        "POST",
        COMMANDS,
        data=json.dumps({"thingId": "edge-worst", "action": "a", "params": WORST, "ttl": 60}, ensure_ascii=False).encode(),
    )
    assert status == 202, sent
    async with device(app, "edge-worst") as dev:
        _topic, request = await dev.wait_request()
        assert request["params"] == WORST  # what the device gets is the same value
        await dev.apublish(dev.response_topic(sent["executionId"]), _report(json.dumps(WORST, ensure_ascii=False)))
        await wait_status(stub, sent["executionId"], pb.SUCCEEDED)
    reads = await _every_read(app, stub, http, "edge-worst", sent["executionId"])
    assert {surface for surface, _p, _r in reads} >= {"grpc stream", "grpc batches", "cli list"}
    for surface, params, result in reads:
        assert result == WORST, surface
        assert params in (None, WORST), surface


async def test_rows_an_older_version_wrote_never_fail_a_read(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Values today's edge refuses, written straight into the database, are served as their JSON text."""
    legacy = {
        "edge-legacy-int": "9" * 400,
        "edge-legacy-deep": json.dumps(deep(200)),
        "edge-legacy-nan": '{"x": NaN}',
    }
    ids = {}
    async with device(app, "edge-legacy") as dev:
        for marker in legacy:
            ex = await stub.Send(pb.SendRequest(thing_id="edge-legacy", action=marker, params=struct({"p": 1})))
            await dev.wait_request()
            await dev.arespond(ex.execution_id, "SUCCEEDED", {"ok": 1})
            await wait_status(stub, ex.execution_id, pb.SUCCEEDED)
            ids[marker] = ex.execution_id
    # Final executions are read from the database, where an older version could have put these.
    with sqlite3.connect(app.settings.data_dir / "fleetcmd.db") as db:
        for marker, text in legacy.items():
            db.execute("UPDATE executions SET result = ?, params = ? WHERE execution_id = ?", (text, text, ids[marker]))
            db.execute("UPDATE events SET result = ? WHERE execution_id = ?", (text, ids[marker]))
    db.close()
    caplog.set_level(logging.WARNING, logger="broker_hooks.jsonvalue")
    jsonvalue._unreadable_logged.clear()
    for marker, text in legacy.items():
        for surface, params, result in await _every_read(app, stub, http, "edge-legacy", ids[marker]):
            assert result == text, (marker, surface)
            assert params in (None, text, {convert.UNREADABLE_KEY: text}), (marker, surface)
    warnings = [r for r in caplog.records if r.name == "broker_hooks.jsonvalue"]
    assert len(warnings) == 3 and not any(r.exc_info for r in warnings)  # once per kind of problem
