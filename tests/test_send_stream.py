"""``CommandService.SendStream``: many Sends on one bidirectional call, each answered with its request_id.

A real service on loopback (port 0). Things have no device connected, so executions
stay QUEUED: committed, cheap, and readable with Get.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest

from server.api import grpc_api
from server.app import FleetcmdApp
from server.core.apikeys import Role
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc
from tests.clients import app_channel

DEADLINE = 20.0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]


def item(request_id: str, thing_id: str = "t1", action: str = "on", **fields: Any) -> pb.SendStreamRequest:
    return pb.SendStreamRequest(request_id=request_id, send=pb.SendRequest(thing_id=thing_id, action=action, **fields))


async def exchange(stub: pb_grpc.CommandServiceStub, items: Iterable[pb.SendStreamRequest]) -> list[pb.SendStreamResponse]:
    """Send ``items``, half-close, and read every answer; the call must end OK."""
    call = stub.SendStream(iter(list(items)), timeout=DEADLINE)

    async def read() -> list[pb.SendStreamResponse]:
        return [r async for r in call]

    answers = await asyncio.wait_for(read(), DEADLINE)
    assert await call.code() == grpc.StatusCode.OK, await call.details()
    return answers


def by_id(answers: list[pb.SendStreamResponse]) -> dict[str, pb.SendStreamResponse]:
    out = {a.request_id: a for a in answers}
    assert len(out) == len(answers), "a request_id was answered twice"
    return out


def violations(answer: pb.SendStreamResponse) -> dict[str, str]:
    assert answer.WhichOneof("outcome") == "error", answer
    assert answer.error.code == INVALID_ARGUMENT, answer.error
    return {v.field: v.description for v in answer.error.violations}


async def test_many_items_on_one_stream_are_committed_and_answered_by_request_id(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub
) -> None:
    n = 600  # more than the window: the server must keep reading as it answers
    answers = by_id(await exchange(stub, (item(f"r{i}", f"thing-{i % 37}", f"act-{i}") for i in range(n))))
    assert set(answers) == {f"r{i}" for i in range(n)}
    for i in range(n):
        answer = answers[f"r{i}"]
        assert answer.WhichOneof("outcome") == "execution", answer
        ex = answer.execution
        assert (ex.thing_id, ex.action, ex.status) == (f"thing-{i % 37}", f"act-{i}", pb.QUEUED)
    assert len({a.execution.execution_id for a in answers.values()}) == n

    # Durable: every answered execution is in the store (Get reads it back with its history).
    got = await asyncio.gather(
        *(stub.Get(pb.GetRequest(execution_id=a.execution.execution_id), timeout=DEADLINE) for a in answers.values())
    )
    for answer, execution in zip(answers.values(), got, strict=True):
        assert execution.execution_id == answer.execution.execution_id
        assert execution.action == answer.execution.action
        assert [c.status for c in execution.history] == [pb.QUEUED]
    assert app.core is not None
    assert app.core.stats["sent"] >= n


async def test_an_empty_stream_ends_cleanly(stub: pb_grpc.CommandServiceStub) -> None:
    assert await exchange(stub, []) == []


async def test_bad_items_are_answered_with_their_error_and_the_stream_goes_on(stub: pb_grpc.CommandServiceStub) -> None:
    items = [
        item("good-1"),
        item("bad-thing", thing_id="a/b"),
        item("bad-action", action=""),
        item("bad-wait", wait_seconds=61),
        item("bad-ttl-and-thing", thing_id="", ttl_seconds=10**6),
        pb.SendStreamRequest(request_id="no-send"),
        item("good-2", thing_id="t2"),
    ]
    answers = by_id(await exchange(stub, items))
    assert set(answers) == {i.request_id for i in items}
    assert set(violations(answers["bad-thing"])) == {"thing_id"}
    assert set(violations(answers["bad-action"])) == {"action"}
    assert set(violations(answers["bad-wait"])) == {"wait_seconds"}
    assert set(violations(answers["bad-ttl-and-thing"])) == {"thing_id", "ttl_seconds"}
    assert set(violations(answers["no-send"])) == {"thing_id", "action"}
    assert "thing_id" in answers["bad-thing"].error.message  # the unary status message, field included
    for good, thing in (("good-1", "t1"), ("good-2", "t2")):
        assert answers[good].execution.thing_id == thing
        assert answers[good].execution.status == pb.QUEUED

    # The same request on the unary Send fails with the same code and message.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Send(items[1].send, timeout=DEADLINE)
    assert info.value.code().value[0] == answers["bad-thing"].error.code
    assert info.value.details() == answers["bad-thing"].error.message


@pytest.mark.secure
async def test_unregistered_thing_is_not_found_without_ending_the_stream(app: FleetcmdApp) -> None:
    async with app_channel(app) as ch:
        await rpb_grpc.ThingServiceStub(ch).CreateThing(rpb.CreateThingRequest(thing_id="known"), timeout=DEADLINE)
        answers = by_id(
            await exchange(
                pb_grpc.CommandServiceStub(ch),
                [item("a", thing_id="known"), item("b", thing_id="stranger"), item("c", thing_id="known")],
            )
        )
    assert answers["b"].WhichOneof("outcome") == "error"
    assert answers["b"].error.code == NOT_FOUND
    assert "stranger" in answers["b"].error.message
    assert list(answers["b"].error.violations) == []
    assert answers["a"].execution.thing_id == answers["c"].execution.thing_id == "known"


async def test_idempotency_key_reuse_behaves_as_unary_send(stub: pb_grpc.CommandServiceStub) -> None:
    first = await stub.Send(pb.SendRequest(thing_id="t1", action="on", idempotency_key="k1"), timeout=DEADLINE)
    answers = by_id(
        await exchange(
            stub,
            [
                # A retry of the unary Send, and a burst of concurrent retries of one new key on the stream.
                item("retry", idempotency_key="k1"),
                *(item(f"burst-{i}", action="off", idempotency_key="k2") for i in range(10)),
                # The key with another request.
                item("reuse", action="other", idempotency_key="k1"),
            ],
        )
    )
    assert answers["retry"].execution.execution_id == first.execution_id
    assert len({answers[f"burst-{i}"].execution.execution_id for i in range(10)}) == 1
    assert answers["reuse"].WhichOneof("outcome") == "error"
    assert answers["reuse"].error.code == ALREADY_EXISTS
    again = await stub.Send(pb.SendRequest(thing_id="t1", action="off", idempotency_key="k2"), timeout=DEADLINE)
    assert again.execution_id == answers["burst-0"].execution.execution_id


async def test_answers_come_as_they_are_ready_and_wait_seconds_is_honoured(stub: pb_grpc.CommandServiceStub) -> None:
    # No device: the waiting item ends its wait with the execution still QUEUED, after the other one.
    answers = await exchange(stub, [item("slow", wait_seconds=1), item("fast")])
    assert [a.request_id for a in answers] == ["fast", "slow"]
    assert answers[1].execution.status == pb.QUEUED


async def test_viewer_key_is_refused(app: FleetcmdApp) -> None:
    assert app.keys is not None
    _record, viewer = await app.keys.create("viewer", Role.VIEWER)
    async with app_channel(app, key=viewer) as ch:
        call = pb_grpc.CommandServiceStub(ch).SendStream(iter([item("x")]), timeout=DEADLINE)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), DEADLINE)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "operator" in (info.value.details() or "")
    async with app_channel(app) as ch:
        listed = await pb_grpc.CommandServiceStub(ch).List(pb.ListRequest(), timeout=DEADLINE)
    assert list(listed.executions) == []


async def test_at_most_the_window_is_in_flight(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = grpc_api.SEND_STREAM_WINDOW
    n = window + 150
    assert app.core is not None
    core = app.core
    send = core.send
    gate = asyncio.Event()
    inside = peak = entered = 0

    async def gated(*args: Any, **kwargs: Any) -> Any:
        # Every item here is valid, so each one read reaches CommandCore.send.
        nonlocal inside, peak, entered
        inside += 1
        entered += 1
        peak = max(peak, inside)
        try:
            await gate.wait()
            return await send(*args, **kwargs)
        finally:
            inside -= 1

    monkeypatch.setattr(core, "send", gated)

    async def requests() -> AsyncIterator[pb.SendStreamRequest]:
        for i in range(n):
            yield item(f"r{i}", f"thing-{i}")

    call = stub.SendStream(requests(), timeout=DEADLINE)
    answers: list[pb.SendStreamResponse] = []

    async def read() -> None:
        async for answer in call:
            answers.append(answer)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        async with asyncio.timeout(DEADLINE):
            while entered < window:  # noqa: ASYNC110 - bounded poll of a counter
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # room for a server that reads on past its window to do so
        assert (entered, inside, answers) == (window, window, [])
        gate.set()
        await asyncio.wait_for(reader, DEADLINE)
    finally:
        reader.cancel()
    assert await call.code() == grpc.StatusCode.OK
    assert peak == window
    assert entered == n
    assert {a.request_id for a in answers} == {f"r{i}" for i in range(n)}
    assert all(a.WhichOneof("outcome") == "execution" for a in answers)


async def test_a_canceled_call_cancels_its_unanswered_items(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert app.core is not None
    send = app.core.send
    inside = 0

    async def stuck(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside
        inside += 1
        try:
            await asyncio.Event().wait()  # until canceled
        finally:
            inside -= 1

    monkeypatch.setattr(app.core, "send", stuck)

    async def requests() -> AsyncIterator[pb.SendStreamRequest]:
        for i in range(5):
            yield item(f"r{i}")
        await asyncio.Event().wait()  # never half-closes

    call = stub.SendStream(requests(), timeout=DEADLINE)
    async with asyncio.timeout(DEADLINE):
        while inside < 5:  # noqa: ASYNC110 - bounded poll of a counter
            await asyncio.sleep(0.01)
    call.cancel()
    async with asyncio.timeout(DEADLINE):
        while inside:  # noqa: ASYNC110 - bounded poll of a counter
            await asyncio.sleep(0.01)
    monkeypatch.setattr(app.core, "send", send)
    answers = await exchange(stub, [item("after")])
    assert answers[0].execution.status == pb.QUEUED


async def test_responses_are_framed_as_the_message_would_serialize(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    from server.api import convert

    assert app.core is not None
    sent = await stub.Send(pb.SendRequest(thing_id="t1", action="on"), timeout=DEADLINE)
    execution = await app.core.get(sent.execution_id)
    for request_id in ("", "r-1", "é" * 200):
        framed = convert.send_stream_execution(request_id, execution)
        expected = pb.SendStreamResponse(request_id=request_id, execution=convert.execution(execution))
        assert pb.SendStreamResponse.FromString(framed) == expected
        assert framed == expected.SerializeToString()
