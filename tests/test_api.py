"""The gRPC surface of ``fleetcmd.v1.CommandService`` (issue 2, section 2), on loopback, port 0.

Executions for things with no device connected stay QUEUED, which makes them cheap
to create and cancel; a paho device is used only where delivery matters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from server.app import FleetcmdApp
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import app_channel
from tests.devices import EmqxDevice
from tests.test_stream import wait_watchers

SERVICE = "fleetcmd.v1.CommandService"


# ---- helpers ------------------------------------------------------------------------------


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(data, struct_pb2.Struct())


async def rpc_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await ``call``, expect it to fail with ``code`` and return the error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call, 10)
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


def field_violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """The ``google.rpc.BadRequest`` field violations of an INVALID_ARGUMENT error, by field."""
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status.code == code_pb2.INVALID_ARGUMENT
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                assert v.description, f"violation of {v.field} has no description"
                found[v.field] = v.description
    return found


async def invalid(call: Awaitable[Any]) -> dict[str, str]:
    """Expect INVALID_ARGUMENT with BadRequest details; return the violations by field."""
    return field_violations(await rpc_error(call, grpc.StatusCode.INVALID_ARGUMENT))


async def send(stub: pb_grpc.CommandServiceStub, thing_id: str = "thing-1", action: str = "act", **kw: Any) -> pb.Execution:
    return await asyncio.wait_for(stub.Send(pb.SendRequest(thing_id=thing_id, action=action, **kw)), 10)


async def list_all(stub: pb_grpc.CommandServiceStub, **kw: Any) -> list[pb.Execution]:
    """Every execution matching the filters, following page tokens."""
    out: list[pb.Execution] = []
    token = ""
    for _ in range(1000):
        resp = await stub.List(pb.ListRequest(page_token=token, **kw))
        out.extend(resp.executions)
        token = resp.next_page_token
        if not token:
            return out
    raise AssertionError("pagination does not end")


def ids(executions: Any) -> list[str]:
    return [e.execution_id for e in executions]


def ms(ts: timestamp_pb2.Timestamp) -> int:
    return ts.ToMilliseconds()


def ts_from_ms(value: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(value)
    return ts


# ---- Send: validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "thing_id",
    [
        pytest.param("", id="empty"),
        pytest.param("a/b", id="slash"),
        pytest.param("a+b", id="plus"),
        pytest.param("a#b", id="hash"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("$thing", id="leading-dollar"),
        pytest.param("x" * 129, id="129-chars"),
        pytest.param("/", id="only-slash"),
        pytest.param("+", id="only-plus"),
        pytest.param("#", id="only-hash"),
    ],
)
async def test_send_rejects_bad_thing_id(stub, thing_id: str) -> None:
    violations = await invalid(stub.Send(pb.SendRequest(thing_id=thing_id, action="act")))
    assert set(violations) == {"thing_id"}
    assert (await stub.List(pb.ListRequest())).executions == []


async def test_send_accepts_boundary_thing_id_and_action(stub) -> None:
    ex = await send(stub, "x" * 128, "a" * 128)
    assert ex.thing_id == "x" * 128 and ex.action == "a" * 128
    # '$' is only reserved at the start; unicode is a valid topic level.
    ex = await send(stub, "th$ng-ünï", "act")
    assert ex.thing_id == "th$ng-ünï"
    assert ex.status == pb.QUEUED


@pytest.mark.parametrize("action", [pytest.param("", id="empty"), pytest.param("a" * 129, id="129-chars")])
async def test_send_rejects_bad_action(stub, action: str) -> None:
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="thing-1", action=action)))
    assert set(violations) == {"action"}


async def test_send_rejects_params_over_64_kib(stub) -> None:
    # Just over 64 KiB as JSON; well under the gRPC message limit.
    big = struct({"blob": "x" * (64 * 1024)})
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="thing-1", action="act", params=big)))
    assert set(violations) == {"params"}


async def test_send_accepts_params_just_under_64_kib(stub) -> None:
    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    ok = struct({"blob": "x" * (64 * 1024 - overhead)})
    ex = await send(stub, params=ok)
    assert len(ex.params.fields["blob"].string_value) == 64 * 1024 - overhead


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
async def test_send_rejects_params_json_cannot_hold(stub, number: float) -> None:
    params = struct_pb2.Struct()
    params.fields["n"].number_value = number
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="thing-1", action="act", params=params)))
    assert set(violations) == {"params"}
    assert (await stub.List(pb.ListRequest())).executions == []


async def test_send_ttl_bounds(stub) -> None:
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="thing-1", action="act", ttl_seconds=86401)))
    assert set(violations) == {"ttl_seconds"}
    violations = await invalid(stub.Send(pb.SendRequest(thing_id="thing-1", action="act", ttl_seconds=2**32 - 1)))
    assert set(violations) == {"ttl_seconds"}
    ex = await send(stub, ttl_seconds=86400)
    assert ex.ttl_seconds == 86400
    assert ms(ex.expires_at) - ms(ex.created_at) == 86400 * 1000


async def test_send_reports_every_bad_field_at_once(stub) -> None:
    request = pb.SendRequest(
        thing_id="bad/thing",
        action="",
        params=struct({"blob": "x" * (65 * 1024)}),
        ttl_seconds=100_000,
    )
    err = await rpc_error(stub.Send(request), grpc.StatusCode.INVALID_ARGUMENT)
    violations = field_violations(err)
    assert set(violations) == {"thing_id", "action", "params", "ttl_seconds"}
    # The same details are on the raw trailer, for clients without grpc_status.
    raw = dict(err.trailing_metadata() or ())
    assert "grpc-status-details-bin" in raw
    assert "thing_id" in err.details()


async def test_send_odd_requests_each_get_their_exact_outcome(stub) -> None:
    # A battery of odd requests, each with the one outcome it must have: accepted as sent, or
    # INVALID_ARGUMENT naming exactly the bad field (never UNKNOWN, never the other way round).
    accepted = [
        pb.SendRequest(thing_id="é" * 128, action="act"),
        pb.SendRequest(thing_id="t", action="act", params=struct({"n": 1e308, "neg": -(2**60), "l": [1, 2.5]})),
        pb.SendRequest(thing_id="t", action="act", params=struct({"deep": {"a": {"b": {"c": [None, True]}}}})),
        pb.SendRequest(thing_id=" ", action=" "),
    ]
    for request in accepted:
        ex = await asyncio.wait_for(stub.Send(request), 10)
        assert (ex.thing_id, ex.action, ex.params) == (request.thing_id, request.action, request.params)
    refused = [
        (pb.SendRequest(thing_id="t", action="a\x00b"), "action"),
        (pb.SendRequest(thing_id="t", action="act", idempotency_key="k" * 10_000), "idempotency_key"),
        (pb.SendRequest(thing_id="é" * 129, action="act"), "thing_id"),
    ]
    for request, field in refused:
        violations = await invalid(stub.Send(request))
        assert set(violations) == {field}, (request, violations)
    assert len(await list_all(stub)) == len(accepted)


# ---- Send: defaults and round-trips -------------------------------------------------------


async def test_send_default_ttl_and_fields(stub) -> None:
    ex = await send(stub, "thing-ttl", "reboot")
    assert ex.ttl_seconds == 30
    assert ms(ex.expires_at) - ms(ex.created_at) == 30_000
    assert ex.status == pb.QUEUED
    assert ex.execution_id and ex.command_id and ex.execution_id != ex.command_id
    assert ex.HasField("created_at") and ex.HasField("updated_at") and ex.HasField("expires_at")
    assert not ex.HasField("completed_at")
    assert ex.HasField("params") and not ex.params.fields  # {}: what the device receives
    got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
    assert got.ttl_seconds == 30 and got.expires_at == ex.expires_at and got.created_at == ex.created_at


async def test_send_params_round_trip(stub) -> None:
    params = {"value": 24, "unit": "C", "ratio": 0.5, "on": True, "none": None, "list": [1, "two", {"x": 3}]}
    ex = await send(stub, params=struct(params))
    assert json_format.MessageToDict(ex.params) == params
    got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
    assert json_format.MessageToDict(got.params) == params
    listed = (await stub.List(pb.ListRequest())).executions
    assert json_format.MessageToDict(listed[0].params) == params


async def test_device_receives_integral_numbers_as_integers(app: FleetcmdApp, stub) -> None:
    params = {"value": 24, "nested": {"n": [1, 2, -3]}, "half": 0.5, "big": 2**40}
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "thermo-int") as device:
        ex = await send(stub, "thermo-int", "setTemperature", params=struct(params), ttl_seconds=10)
        execution_id, body = await device.wait_request(5)
    assert execution_id == ex.execution_id
    assert body["params"] == params
    assert type(body["params"]["value"]) is int
    assert type(body["params"]["nested"]["n"][0]) is int
    assert type(body["params"]["big"]) is int
    assert type(body["params"]["half"]) is float
    assert body["commandId"] == ex.command_id
    assert body["action"] == "setTemperature"
    assert body["ttl"] == 10


# ---- Send: idempotency --------------------------------------------------------------------


async def test_idempotent_retry_returns_same_execution(stub) -> None:
    first = await send(stub, "thing-idem", "open", params=struct({"v": 1}), idempotency_key="key-1")
    again = await send(stub, "thing-idem", "open", params=struct({"v": 1}), idempotency_key="key-1")
    assert again.execution_id == first.execution_id
    assert again.command_id == first.command_id
    assert again.idempotency_key == "key-1"
    # ttl 0 is the default 30: the same request as an explicit 30.
    same = await send(stub, "thing-idem", "open", params=struct({"v": 1}), idempotency_key="key-1", ttl_seconds=30)
    assert same.execution_id == first.execution_id
    assert ids(await list_all(stub)) == [first.execution_id]


async def test_idempotent_concurrent_retries_create_one_execution(stub) -> None:
    results = await asyncio.gather(*(send(stub, "thing-idem", "open", idempotency_key="burst") for _ in range(20)))
    assert len({r.execution_id for r in results}) == 1
    assert len(await list_all(stub)) == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"thing_id": "other-thing"}, id="thing_id"),
        pytest.param({"action": "close"}, id="action"),
        pytest.param({"params": struct({"v": 2})}, id="params"),
        pytest.param({"ttl_seconds": 60}, id="ttl"),
    ],
)
async def test_idempotency_key_reused_for_other_request_is_already_exists(stub, change: dict[str, Any]) -> None:
    base: dict[str, Any] = {"thing_id": "thing-idem", "action": "open", "params": struct({"v": 1})}
    first = await send(stub, **base, idempotency_key="key-2")
    await rpc_error(stub.Send(pb.SendRequest(**{**base, **change}, idempotency_key="key-2")), grpc.StatusCode.ALREADY_EXISTS)
    assert ids(await list_all(stub)) == [first.execution_id]
    # Without a key, the same request simply makes another execution.
    other = await send(stub, **base)
    assert other.execution_id != first.execution_id


# ---- Get ----------------------------------------------------------------------------------


async def test_get_unknown_is_not_found(stub) -> None:
    await rpc_error(stub.Get(pb.GetRequest(execution_id="0123456789abcdef0123456789abcdef")), grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "$x", "a\x00", "x" * 300])
async def test_get_bad_id_is_invalid_argument(stub, bad: str) -> None:
    violations = await invalid(stub.Get(pb.GetRequest(execution_id=bad)))
    assert set(violations) == {"execution_id"}


async def test_get_includes_history_in_order(stub) -> None:
    ex = await send(stub, "thing-hist", "act")
    got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
    assert [c.status for c in got.history] == [pb.QUEUED]
    assert got.history[0].previous_status == pb.EXECUTION_STATUS_UNSPECIFIED
    # Interleave another execution so this one's sequences are not contiguous.
    await send(stub, "thing-other", "act")
    await stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id))
    got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
    assert got.status == pb.CANCELED
    assert [c.status for c in got.history] == [pb.QUEUED, pb.CANCELED]
    assert [c.previous_status for c in got.history] == [pb.EXECUTION_STATUS_UNSPECIFIED, pb.QUEUED]
    seqs = [c.sequence for c in got.history]
    assert seqs[0] >= 1 and seqs[1] > seqs[0] + 1
    ats = [ms(c.at) for c in got.history]
    assert ats == sorted(ats)
    assert ats[0] == ms(got.created_at)
    assert ms(got.completed_at) == ats[1]
    assert all(not c.late for c in got.history)


async def test_every_announced_state_is_already_committed(app: FleetcmdApp, stub) -> None:
    """Durable before announced: what Send returns and every event Stream and StreamBatches show are
    already in the database file when they arrive (read through a connection of the test's own)."""
    assert app.ports is not None and app.core is not None
    db = sqlite3.connect(f"file:{app.settings.db_path}?mode=ro", uri=True)

    def committed(sequence: int) -> bool:
        return db.execute("SELECT 1 FROM events WHERE seq = ?", (sequence,)).fetchone() is not None

    def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        dev.respond(execution_id, "IN_PROGRESS")
        dev.respond(execution_id, "SUCCEEDED", {"ok": True})

    count = 20
    events = stub.Stream(pb.StreamRequest(action="durable"))
    batches = stub.StreamBatches(pb.StreamRequest(action="durable"))
    seen: list[int] = []

    async def check_events() -> None:
        finals = 0
        async for event in events:
            assert committed(event.sequence), f"event {event.sequence} announced before it was committed"
            seen.append(event.sequence)
            finals += event.status == pb.SUCCEEDED
            if finals == count:
                return

    async def check_batches() -> None:
        finals = 0
        async for batch in batches:
            for event in batch.events:
                assert committed(event.sequence), f"event {event.sequence} announced before it was committed"
                finals += event.status == pb.SUCCEEDED
            if finals == count:
                return

    try:
        await wait_watchers(app, 2)  # both streams live before the first event
        async with EmqxDevice("127.0.0.1", app.ports.mqtt, "durable-dev", on_request=answer):
            watchers = asyncio.gather(check_events(), check_batches())
            sent = await asyncio.gather(*(send(stub, "durable-dev", "durable") for _ in range(count)))
            for ex in sent:
                row = db.execute("SELECT status FROM executions WHERE execution_id = ?", (ex.execution_id,)).fetchone()
                assert row is not None, "Send returned before the execution was committed"
            await asyncio.wait_for(watchers, 20)
        assert len(seen) >= 3 * count  # SENT, (DELIVERED,) IN_PROGRESS, SUCCEEDED each
    finally:
        events.cancel()
        batches.cancel()
        db.close()


async def test_get_history_with_device(app: FleetcmdApp, stub) -> None:
    def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        dev.respond(execution_id, "IN_PROGRESS", {"pct": 50})
        dev.respond(execution_id, "SUCCEEDED", {"done": True}, statusReason={"reasonCode": "OK", "reasonDescription": "fine"})

    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "hist-dev", on_request=answer):
        ex = await send(stub, "hist-dev", "update")
        got = ex
        for _ in range(250):
            got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
            if got.status == pb.SUCCEEDED:
                break
            await asyncio.sleep(0.02)
    assert got.status == pb.SUCCEEDED
    statuses = [c.status for c in got.history]
    assert statuses[0] == pb.SENT and statuses[-2:] == [pb.IN_PROGRESS, pb.SUCCEEDED]
    assert statuses in ([pb.SENT, pb.DELIVERED, pb.IN_PROGRESS, pb.SUCCEEDED], [pb.SENT, pb.IN_PROGRESS, pb.SUCCEEDED])
    prev = [c.previous_status for c in got.history]
    assert prev[1:] == statuses[:-1]
    seqs = [c.sequence for c in got.history]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert json_format.MessageToDict(got.result) == {"done": True}
    assert got.status_reason.reason_code == "OK" and got.status_reason.reason_description == "fine"
    assert json_format.MessageToDict(got.history[-2].result) == {"pct": 50}
    assert got.HasField("completed_at")


# ---- Cancel -------------------------------------------------------------------------------


async def test_cancel_queued_execution(stub) -> None:
    ex = await send(stub, "thing-cancel", "act")
    assert ex.status == pb.QUEUED
    canceled = await stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id))
    assert canceled.execution_id == ex.execution_id
    assert canceled.status == pb.CANCELED
    assert canceled.HasField("completed_at")
    got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
    assert got.status == pb.CANCELED
    # A final execution cannot be canceled again; it stays as it was.
    await rpc_error(stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id)), grpc.StatusCode.FAILED_PRECONDITION)
    again = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
    assert again.status == pb.CANCELED and len(again.history) == len(got.history)


async def test_cancel_succeeded_execution_is_failed_precondition(app: FleetcmdApp, stub) -> None:
    def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        dev.respond(execution_id, "SUCCEEDED", {"ok": 1})

    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "done-dev", on_request=answer):
        ex = await send(stub, "done-dev", "act")
        for _ in range(250):
            if (await stub.Get(pb.GetRequest(execution_id=ex.execution_id))).status == pb.SUCCEEDED:
                break
            await asyncio.sleep(0.02)
    await rpc_error(stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id)), grpc.StatusCode.FAILED_PRECONDITION)
    assert (await stub.Get(pb.GetRequest(execution_id=ex.execution_id))).status == pb.SUCCEEDED


async def test_cancel_unknown_and_bad_ids(stub) -> None:
    await rpc_error(stub.Cancel(pb.CancelRequest(execution_id="nope")), grpc.StatusCode.NOT_FOUND)
    violations = await invalid(stub.Cancel(pb.CancelRequest(execution_id="")))
    assert set(violations) == {"execution_id"}
    violations = await invalid(stub.Cancel(pb.CancelRequest(execution_id="a/b")))
    assert set(violations) == {"execution_id"}


async def test_concurrent_cancels_one_wins(stub) -> None:
    ex = await send(stub, "thing-race", "act")
    results = await asyncio.gather(
        *(stub.Cancel(pb.CancelRequest(execution_id=ex.execution_id)) for _ in range(10)), return_exceptions=True
    )
    won = [r for r in results if isinstance(r, pb.Execution)]
    lost = [r for r in results if not isinstance(r, pb.Execution)]
    assert len(won) == 1 and won[0].status == pb.CANCELED
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.FAILED_PRECONDITION for r in lost)
    got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
    assert [c.status for c in got.history] == [pb.QUEUED, pb.CANCELED]


# ---- List ---------------------------------------------------------------------------------


async def test_list_newest_first_and_filters(stub) -> None:
    a1 = await send(stub, "alpha", "open")
    b1 = await send(stub, "beta", "open")
    a2 = await send(stub, "alpha", "close")
    b2 = await send(stub, "beta", "close")
    await stub.Cancel(pb.CancelRequest(execution_id=a2.execution_id))

    everything = (await stub.List(pb.ListRequest())).executions
    assert ids(everything) == ids([b2, a2, b1, a1])
    assert (await stub.List(pb.ListRequest())).next_page_token == ""
    assert ids((await stub.List(pb.ListRequest(thing_id="alpha"))).executions) == ids([a2, a1])
    assert ids((await stub.List(pb.ListRequest(action="open"))).executions) == ids([b1, a1])
    assert ids((await stub.List(pb.ListRequest(thing_id="beta", action="close"))).executions) == ids([b2])
    assert ids((await stub.List(pb.ListRequest(status=[pb.CANCELED]))).executions) == ids([a2])
    assert ids((await stub.List(pb.ListRequest(status=[pb.QUEUED]))).executions) == ids([b2, b1, a1])
    both = (await stub.List(pb.ListRequest(status=[pb.QUEUED, pb.CANCELED]))).executions
    assert ids(both) == ids([b2, a2, b1, a1])
    assert (await stub.List(pb.ListRequest(status=[pb.SUCCEEDED, pb.TIMED_OUT]))).executions == []
    assert ids((await stub.List(pb.ListRequest(thing_id="alpha", status=[pb.QUEUED]))).executions) == ids([a1])
    assert (await stub.List(pb.ListRequest(thing_id="gamma"))).executions == []
    # The listed status is the current one.
    listed = {e.execution_id: e.status for e in everything}
    assert listed[a2.execution_id] == pb.CANCELED


async def test_list_created_range(stub) -> None:
    made = []
    for i in range(3):
        made.append(await send(stub, "ranged", f"a{i}"))
        await asyncio.sleep(0.01)  # distinct created_at milliseconds
    created = [ms(e.created_at) for e in made]
    assert created == sorted(created) and len(set(created)) == 3
    first, middle, last = made
    # created_after is inclusive, created_before exclusive.
    after = await stub.List(pb.ListRequest(created_after=middle.created_at))
    assert ids(after.executions) == ids([last, middle])
    before = await stub.List(pb.ListRequest(created_before=middle.created_at))
    assert ids(before.executions) == ids([first])
    window = await stub.List(pb.ListRequest(created_after=middle.created_at, created_before=ts_from_ms(created[2])))
    assert ids(window.executions) == ids([middle])
    both_ends = await stub.List(pb.ListRequest(created_after=ts_from_ms(created[0]), created_before=ts_from_ms(created[2] + 1)))
    assert ids(both_ends.executions) == ids([last, middle, first])
    empty = await stub.List(pb.ListRequest(created_after=ts_from_ms(created[2] + 1)))
    assert empty.executions == []


async def test_list_page_size_default_and_max(stub) -> None:
    await asyncio.gather(*(send(stub, f"thing-{i % 3}", "bulk") for i in range(55)))
    page = await stub.List(pb.ListRequest())
    assert len(page.executions) == 50 and page.next_page_token
    rest = await stub.List(pb.ListRequest(page_token=page.next_page_token))
    assert len(rest.executions) == 5 and rest.next_page_token == ""
    page = await stub.List(pb.ListRequest(page_size=1000))
    assert len(page.executions) == 55 and page.next_page_token == ""
    violations = await invalid(stub.List(pb.ListRequest(page_size=1001)))
    assert set(violations) == {"page_size"}
    violations = await invalid(stub.List(pb.ListRequest(page_size=2**32 - 1)))
    assert set(violations) == {"page_size"}
    # An exact fit does not promise a page that turns out empty.
    page = await stub.List(pb.ListRequest(page_size=55))
    assert len(page.executions) == 55 and page.next_page_token == ""


async def test_list_pagination_collects_each_once(stub) -> None:
    made = [await send(stub, "pager", "act") for _ in range(25)]
    seen: list[str] = []
    sizes = []
    token = ""
    while True:
        page = await stub.List(pb.ListRequest(page_size=10, page_token=token))
        seen += ids(page.executions)
        sizes.append(len(page.executions))
        token = page.next_page_token
        if not token:
            break
    assert sizes == [10, 10, 5]
    assert seen == ids(reversed(made))


async def test_list_pagination_stable_while_executions_arrive(stub) -> None:
    made = [await send(stub, "pager", "act") for _ in range(25)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.List(pb.ListRequest(thing_id="pager", page_size=10, page_token=token))
        pages += 1
        seen += ids(page.executions)
        token = page.next_page_token
        if not token:
            break
        # New executions (newer than everything listed so far) and a status change between pages.
        await send(stub, "pager", "act")
        await send(stub, "pager", "act")
        if pages == 1:
            await stub.Cancel(pb.CancelRequest(execution_id=made[0].execution_id))
    assert pages == 3
    assert seen == ids(reversed(made))
    assert len(await list_all(stub, thing_id="pager")) == 25 + 4


async def test_list_pagination_with_filters(stub) -> None:
    wanted = []
    for i in range(30):
        ex = await send(stub, "even" if i % 2 == 0 else "odd", "act")
        if i % 2 == 0:
            wanted.append(ex.execution_id)
    got = await list_all(stub, thing_id="even", page_size=4)
    assert ids(got) == list(reversed(wanted))
    statuses = [pb.QUEUED, pb.CANCELED]
    got = await list_all(stub, thing_id="even", status=statuses, page_size=7)
    assert ids(got) == list(reversed(wanted))


async def test_list_page_token_bound_to_filters(stub) -> None:
    for i in range(6):
        await send(stub, "tok", f"act{i % 2}")
    first = await stub.List(pb.ListRequest(thing_id="tok", page_size=2))
    token = first.next_page_token
    assert token
    for other in (
        pb.ListRequest(thing_id="other", page_size=2, page_token=token),
        pb.ListRequest(page_size=2, page_token=token),
        pb.ListRequest(thing_id="tok", action="act0", page_size=2, page_token=token),
        pb.ListRequest(thing_id="tok", status=[pb.QUEUED], page_size=2, page_token=token),
        pb.ListRequest(thing_id="tok", created_after=ts_from_ms(1), page_size=2, page_token=token),
    ):
        violations = await invalid(stub.List(other))
        assert set(violations) == {"page_token"}
    # The same filters with another page size are fine.
    nxt = await stub.List(pb.ListRequest(thing_id="tok", page_size=3, page_token=token))
    assert len(nxt.executions) == 3


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("!!!!", id="not-base64"),
        pytest.param("a", id="one-char"),
        pytest.param(_b64(b"\xff\xfe\x00"), id="not-utf8"),
        pytest.param(_b64(b"[1, 2]"), id="json-list"),
        pytest.param(_b64(b'"x"'), id="json-string"),
        pytest.param(_b64(b'{"b": "x", "f": "y"}'), id="non-int-position"),
        pytest.param(_b64(b'{"b": null, "f": "y"}'), id="null-position"),
        pytest.param(_b64(b'{"b": 1}'), id="no-digest"),
        pytest.param(_b64(b'{"b": 1e400, "f": "y"}'), id="infinite-position"),
        pytest.param(_b64(b'{"b": 1, "f": "y"}'), id="foreign-digest"),
    ],
)
async def test_list_garbage_page_token(stub, token: str) -> None:
    await send(stub)
    violations = await invalid(stub.List(pb.ListRequest(page_token=token)))
    assert set(violations) == {"page_token"}


async def test_list_forged_page_token_is_never_unknown(stub) -> None:
    """A token with the right digest but an absurd position must not crash the query."""
    await send(stub)
    for _ in range(2):
        await send(stub)
    first = await stub.List(pb.ListRequest(page_size=1))
    padded = first.next_page_token + "=" * (-len(first.next_page_token) % 4)
    digest = json.loads(base64.urlsafe_b64decode(padded))["f"]
    for position in (10**30, -(10**30), 2**63):
        token = _b64(json.dumps({"b": position, "f": digest}).encode())
        try:
            resp = await stub.List(pb.ListRequest(page_size=1, page_token=token))
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (position, err.code(), err.details())
        else:
            assert len(resp.executions) <= 1


async def test_list_bad_status_and_odd_timestamps_never_unknown(stub) -> None:
    violations = await invalid(stub.List(pb.ListRequest(status=[99])))  # type: ignore[list-item]
    assert set(violations) == {"status"}
    far = timestamp_pb2.Timestamp(seconds=2**62)
    for request in (
        pb.ListRequest(created_after=far),
        pb.ListRequest(created_before=far),
        pb.ListRequest(created_after=timestamp_pb2.Timestamp(seconds=-(2**62))),
        pb.ListRequest(created_after=timestamp_pb2.Timestamp(seconds=1, nanos=-5)),
    ):
        try:
            await stub.List(request)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.code(), err.details())
            assert field_violations(err)


# ---- health and reflection ----------------------------------------------------------------


async def test_health_serving(app: FleetcmdApp) -> None:
    async with app_channel(app) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            resp = await asyncio.wait_for(health.Check(health_pb2.HealthCheckRequest(service=service)), 10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(app: FleetcmdApp) -> None:
    async with app_channel(app) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
            call = refl.ServerReflectionInfo(iter([request]))
            responses = [r async for r in call]
            assert len(responses) == 1
            return responses[0]

        listed = await asyncio.wait_for(ask(reflection_pb2.ServerReflectionRequest(list_services="")), 10)
        names = {s.name for s in listed.list_services_response.service}
        assert SERVICE in names
        assert "grpc.health.v1.Health" in names

        described = await asyncio.wait_for(ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)), 10)
        assert described.file_descriptor_response.file_descriptor_proto, "no descriptor for the service"
