"""``GET /api/v1/events`` (issue 15 §1): gRPC Stream as Server-Sent Events.

Real HTTP on 127.0.0.1 (port 0): aiohttp clients that read the stream as a browser's fetch() reader
does, and, for the slow reader, a raw socket with a small receive buffer that reads nothing until
the end. Events are produced by real Sends and Cancels (gRPC, to load the service) and one resume
crosses a retention sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.api import http_events
from server.app import FleetcmdApp
from server.core.apikeys import Role
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import admin_key, app_channel
from tests.conftest import make_settings
from tests.devices import wait_for
from tests.test_http_rest import TIMEOUT, conforms
from tests.test_stream import cancel, send, wait_watchers

EVENTS = "/api/v1/events"
COMMANDS = "/api/v1/commands"


class Sse:
    """An event stream read line by line; comments are kept apart."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next(self, timeout: float = 10) -> dict[str, str]:
        """The next event's fields (``id``, ``event``, ``data``)."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError(f"stream ended; comments {self.comments}")
                line = raw.decode().rstrip("\n")
                if not line:
                    if fields:
                        return fields
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")

    async def take(self, count: int) -> list[dict[str, Any]]:
        """``count`` execution events' data, each checked against the document's ExecutionEvent."""
        out = []
        for _ in range(count):
            event = await self.next()
            assert event["event"] == "execution", event
            data = json.loads(event["data"])
            conforms("ExecutionEvent", data)
            assert event["id"] == str(data["seq"])
            out.append(data)
        return out

    async def ended_with(self, code: str) -> dict[str, Any]:
        """The stream's last event: an error of ``code``; then the response ends."""
        event = await self.next()
        assert event["event"] == "error", event
        body = json.loads(event["data"])
        conforms("Error", body)
        assert body["code"] == code, body
        assert await self.response.content.read() == b""
        return body  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def stream(
    app: FleetcmdApp, query: str = "", *, key: str | None = "admin", headers: dict[str, str] | None = None
) -> AsyncIterator[Sse]:
    """One GET /api/v1/events, answered 200 with an event stream."""
    assert app.ports is not None
    token = admin_key(app.settings.data_dir) if key == "admin" else key
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.get(f"{EVENTS}?{query}", headers=sent) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        yield Sse(response)


async def refused(app: FleetcmdApp, query: str = "", *, key: str | None = "admin", headers: dict[str, str] | None = None) -> Any:
    """A GET /api/v1/events refused before the stream: (status, JSON error body)."""
    assert app.ports is not None
    token = admin_key(app.settings.data_dir) if key == "admin" else key
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as session,
        session.get(f"{EVENTS}?{query}", headers=sent) as response,
    ):
        body = await response.json()
        conforms("Error", body)
        return response.status, body


@pytest.fixture
async def stub(app: FleetcmdApp) -> AsyncIterator[pb_grpc.CommandServiceStub]:
    async with app_channel(app) as channel:
        yield pb_grpc.CommandServiceStub(channel)


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


# ---- what an event is -----------------------------------------------------------------------


async def test_events_carry_the_execution_and_the_change(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    async with stream(app) as sse:
        await wait_watchers(app, 1)
        made = await send(stub, "thing-1", "reboot")
        await cancel(stub, made.execution_id)
        queued, canceled = await sse.take(2)
        assert sse.comments == ["connected"]
    assert queued["seq"] + 1 == canceled["seq"]
    for event in (queued, canceled):
        change = event["change"]
        assert (change["executionId"], change["thingId"], change["action"]) == (made.execution_id, "thing-1", "reboot")
        assert change["sequence"] == event["seq"]
        assert event["execution"]["executionId"] == made.execution_id and event["execution"]["params"] == {}
        assert "history" not in event["execution"]
    assert (queued["change"]["status"], queued["change"]["previousStatus"]) == ("QUEUED", None)
    assert (canceled["change"]["status"], canceled["change"]["previousStatus"]) == ("CANCELED", "QUEUED")
    assert canceled["execution"]["status"] == "CANCELED"


async def test_filters_are_streams(app: FleetcmdApp, stub: pb_grpc.CommandServiceStub) -> None:
    async with (
        stream(app, "thingId=t1") as by_thing,
        stream(app, "action=b") as by_action,
        stream(app, "thingId=t2&action=a") as by_both,
    ):
        await wait_watchers(app, 3)
        first = await send(stub, "t1", "a")
        async with stream(app, f"executionId={first.execution_id}") as by_execution:
            await wait_watchers(app, 4)
            for thing, action in (("t2", "a"), ("t1", "b"), ("t2", "b")):
                await send(stub, thing, action)
            await cancel(stub, first.execution_id)
            ids = [(e["change"]["thingId"], e["change"]["action"], e["change"]["status"]) for e in await by_thing.take(3)]
            assert ids == [("t1", "a", "QUEUED"), ("t1", "b", "QUEUED"), ("t1", "a", "CANCELED")]
            ids = [(e["change"]["thingId"], e["change"]["action"]) for e in await by_action.take(2)]
            assert ids == [("t1", "b"), ("t2", "b")]
            assert [e["change"]["status"] for e in await by_execution.take(1)] == ["CANCELED"]
            assert [(e["change"]["thingId"], e["change"]["action"]) for e in await by_both.take(1)] == [("t2", "a")]
            # Nothing else came: the next event each one gets is the marker sent to everyone last.
            marker = await send(stub, "t1", "b")
            for sse in (by_thing, by_action):
                assert [e["change"]["executionId"] for e in await sse.take(1)] == [marker.execution_id]


# ---- resume -------------------------------------------------------------------------------


async def test_reconnect_mid_flow_under_load_gets_exactly_the_events_after_it(
    app: FleetcmdApp, stub: pb_grpc.CommandServiceStub
) -> None:
    assert app.store is not None
    start = await app.store.last_sequence()
    stop = asyncio.Event()

    async def produce(worker: int) -> None:
        # Until told to stop, which is after the reconnection: the load runs across the disconnection.
        i = 0
        while not stop.is_set():
            made = await send(stub, f"load-{worker}", "act")
            if i % 2:
                await cancel(stub, made.execution_id)
            i += 1

    producers = [asyncio.ensure_future(produce(w)) for w in range(6)]
    try:
        received: list[dict[str, Any]] = []
        async with stream(app, f"after={start}") as sse:
            received += await sse.take(120)
        resumed_at = received[-1]["seq"]
        # The header wins over the URL's after (as an EventSource reconnects).
        async with stream(app, f"after={start}", headers={"Last-Event-ID": str(resumed_at)}) as sse:
            received += await sse.take(120)
            stop.set()
            await asyncio.gather(*producers)
            last = await app.store.last_sequence()
            received += await sse.take(last - received[-1]["seq"])
        assert seqs(received) == list(range(start + 1, last + 1))
        # `after` alone resumes alike, from any point.
        middle = received[len(received) // 2]["seq"]
        async with stream(app, f"after={middle}") as sse:
            assert seqs(await sse.take(last - middle)) == list(range(middle + 1, last + 1))
    finally:
        stop.set()
        for p in producers:
            p.cancel()


async def test_bad_resume_points_are_refused_by_name(app: FleetcmdApp) -> None:
    top = http_events.MAX_SEQUENCE
    for query, headers, field in (
        ("after=-1", {}, "after"),
        ("after=1.5", {}, "after"),
        ("after=", {}, "after"),
        ("", {"Last-Event-ID": ""}, "Last-Event-ID"),
        (f"after={top + 1}", {}, "after"),
        ("after=1", {"Last-Event-ID": "x"}, "Last-Event-ID"),
        (f"after={top + 1}", {"Last-Event-ID": "1"}, "after"),  # checked even when the header wins
        ("", {"Last-Event-ID": str(top + 1)}, "Last-Event-ID"),
    ):
        status, body = await refused(app, query, headers=headers)
        assert (status, body["code"]) == (400, "INVALID_ARGUMENT"), (query, headers)
        assert [d["field"] for d in body["details"]] == [field]
    # The largest sequence is a resume point (nothing after it yet).
    async with stream(app, f"after={top}"), stream(app, headers={"Last-Event-ID": str(top)}):
        await wait_watchers(app, 2)


async def test_a_resume_point_retention_deleted_is_refused_before_the_stream(tmp_path: Path) -> None:
    # 0.2 s of retention: finished executions go at the next sweep.
    settings = make_settings(tmp_path / "data", retention_days=0.2 / 86400)
    async with FleetcmdApp(settings) as app, app_channel(app) as channel:
        assert app.store is not None
        stub = pb_grpc.CommandServiceStub(channel)
        done = await send(stub, "t-gone", "act")
        await cancel(stub, done.execution_id)
        pending = await send(stub, "t-kept", "act")
        store = app.store
        await wait_for(lambda: store.purged_through() > 0, what="retention sweep")
        purged = store.purged_through()
        status, body = await refused(app, f"after={purged - 1}")
        assert (status, body["code"]) == (409, "FAILED_PRECONDITION")
        assert f"Last-Event-ID (or after) >= {purged}" in body["message"]
        status, _ = await refused(app, headers={"Last-Event-ID": "0"})
        assert status == 409
        async with stream(app, f"after={purged}") as sse:
            (first,) = await sse.take(1)
        assert first["change"]["executionId"] == pending.execution_id and first["execution"]["status"] == "QUEUED"


# ---- bounds -------------------------------------------------------------------------------


async def _raw_stream(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET /api/v1/events over HTTP/1.0 (the server closes at the end) with a 4 KiB receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(f"GET {EVENTS} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


def _parse(raw: bytes) -> list[dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head[:200]
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            events.append(fields)
    return events


async def test_a_slow_reader_is_cut_off_and_resumes_a_fast_one_gets_everything(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", stream_buffer=5)
    async with FleetcmdApp(settings) as app, app_channel(app) as channel:
        assert app.ports is not None and app.ports.http and app.store is not None
        stub = pb_grpc.CommandServiceStub(channel)
        key = admin_key(settings.data_dir)
        start = await app.store.last_sequence()
        async with stream(app) as fast:
            reader, writer = await _raw_stream(app.ports.http, key)
            try:
                await wait_watchers(app, 2)
                # The fast reader takes each event before the next is made: it never falls behind, even on
                # a loaded machine (the slow one never reads and must be cut off all the same).
                fast_got: list[dict[str, Any]] = []
                # ~12 MB of events (each carries its execution's 60 KB params): far more than the socket buffers hold.
                blob = {"blob": "x" * 60_000}
                made = []
                async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as http:
                    for _ in range(100):
                        async with http.post(
                            COMMANDS,
                            json={"thingId": "slow", "action": "act", "params": blob},
                            headers={"Authorization": f"Bearer {key}"},
                        ) as response:
                            assert response.status == 202
                            made.append((await response.json())["executionId"])
                        fast_got += await fast.take(1)
                for execution_id in made:
                    await cancel(stub, execution_id)
                    fast_got += await fast.take(1)
                last = await app.store.last_sequence()
                assert last - start == 200
                assert seqs(fast_got) == list(range(start + 1, last + 1))

                # The slow reader reads at last: what was in flight before the cut, then the error; then the end.
                async with asyncio.timeout(30):
                    raw = await reader.read()
            finally:
                writer.close()
        events = _parse(raw)
        error = events.pop()
        assert error["event"] == "error", error
        body = json.loads(error["data"])
        assert body["code"] == "RESOURCE_EXHAUSTED" and "Last-Event-ID" in body["message"]
        got = [int(e["id"]) for e in events]
        assert got == list(range(start + 1, start + 1 + len(got)))
        assert len(got) < last - start
        # ... and it resumes with nothing lost.
        resume = got[-1] if got else start
        async with stream(app, headers={"Last-Event-ID": str(resume)}) as sse:
            assert seqs(await sse.take(last - resume)) == list(range(resume + 1, last + 1))
        await wait_watchers(app, 0)


# ---- keys, heartbeats, leaving, stopping --------------------------------------------------------


async def test_every_role_may_stream_and_no_key_is_401(app: FleetcmdApp) -> None:
    assert app.keys is not None
    status, body = await refused(app, key=None)
    assert (status, body["code"]) == (401, "UNAUTHENTICATED")
    status, body = await refused(app, key="fck_nope_nope")
    assert (status, body["code"]) == (401, "UNAUTHENTICATED")
    # The viewer role is the least there is, and it may stream: no key gets a 403 here.
    assert min(Role) is Role.VIEWER
    for role in Role:
        _, key = await app.keys.create(role.name, role)
        async with stream(app, key=key):
            await wait_watchers(app, 1)
        await wait_watchers(app, 0)


async def test_head_answers_the_headers_and_holds_nothing_open(app: FleetcmdApp) -> None:
    assert app.ports is not None
    headers = {"Authorization": f"Bearer {admin_key(app.settings.data_dir)}"}
    async with (
        aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as session,
        session.head(EVENTS, headers=headers) as response,
    ):
        assert (response.status, response.headers["Content-Type"]) == (200, "text/event-stream")
    assert app.core is not None and len(app.core.bus) == 0


async def test_heartbeats_and_a_client_that_left_is_let_go(app: FleetcmdApp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_events, "HEARTBEAT_SECONDS", 0.05)
    async with stream(app) as sse:
        await wait_watchers(app, 1)
        async with asyncio.timeout(5):
            while sse.comments.count("keepalive") < 2:
                with contextlib.suppress(TimeoutError):
                    await sse.next(timeout=0.2)
        assert sse.comments[0] == "connected"
    # The client closed its connection: the next heartbeat finds it gone and the subscription ends.
    await wait_watchers(app, 0)


async def test_stopping_the_service_ends_streams_with_unavailable(tmp_path: Path) -> None:
    app = FleetcmdApp(make_settings(tmp_path / "data"))
    await app.__aenter__()
    stopping: asyncio.Task[None] | None = None
    try:
        async with stream(app) as sse:
            await wait_watchers(app, 1)
            stopping = asyncio.ensure_future(app.__aexit__(None, None, None))
            body = await sse.ended_with("UNAVAILABLE")
            assert "Last-Event-ID" in body["message"]
    finally:
        if stopping is None:
            await app.__aexit__(None, None, None)
        else:
            await stopping
