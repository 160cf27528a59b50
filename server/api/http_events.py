"""Server-Sent Events: ``GET /api/v1/events``, the HTTP face of gRPC ``Stream``.

The same filters (``thingId``, ``executionId``, ``action``, ``jobId``), the same resume rule and the
same bound per client, because it is the same code: :meth:`CommandCore.stream
<server.core.commands.CommandCore.stream>` subscribes to the event bus, replays the log
after the resume point and goes on live with no gap and no duplicate; a client further
behind than ``stream_buffer`` events is cut off (``event: error`` RESOURCE_EXHAUSTED),
as Stream ends with RESOURCE_EXHAUSTED. Resume: the ``Last-Event-ID`` header (what an
EventSource sends when it reconnects) or the ``after`` query value, the sequence of the
last event received; without either the stream starts live. A resume point below what
retention kept is refused with 409 FAILED_PRECONDITION before the stream starts.

Each event is ``id: <sequence>``, ``event: execution`` (or ``event: job``: a job's state or counts
changed, with the job as ``GET /api/v1/jobs/{jobId}`` shows it) and one line of JSON; idle streams
get a ``: keepalive`` comment every :data:`HEARTBEAT_SECONDS`, which also finds clients
that went away. An error after the stream started is one ``event: error`` (the REST error
body) and the end of the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from server.api.http_jobs import job_json
from server.api.http_rest import (
    API_PREFIX,
    RestRoute,
    error_body,
    execution_json,
    guarded_routes,
    http_status,
    state_change_json,
)
from server.core.apikeys import ApiKeys
from server.core.authz import Operation
from server.core.commands import CommandCore
from server.core.errors import FailedPrecondition, FieldViolation, FleetcmdError, InvalidArgument, Unavailable
from server.core.events import StreamBatch, check_resume
from server.core.models import EventFilter, Execution, StateChange
from server.core.validation import check_execution_id

log = logging.getLogger(__name__)

EVENTS = f"{API_PREFIX}/events"
# Idle streams get a comment this often: proxies keep the connection, and a client gone is noticed.
HEARTBEAT_SECONDS = 15.0
# How often an idle stream looks whether its client closed the connection (aiohttp tells a
# handler nothing when that happens, and only a write would fail): a client gone is let go
# within this, not at the next heartbeat.
LEFT_CHECK_SECONDS = 1.0
MAX_SEQUENCE = 2**63 - 1  # the event log's sequence is a SQLite INTEGER
CONTENT_TYPE = "text/event-stream"

ROUTES: tuple[RestRoute, ...] = (RestRoute("GET", EVENTS, "events", Operation.STREAM),)


def resume_point(request: web.Request) -> int | None:
    """The sequence to resume after; None (start live) when none is given.

    ``Last-Event-ID`` if sent (it wins: an EventSource repeats the URL's ``after`` on every
    reconnect), else the ``after`` query value; both are checked whenever given (a bad
    value is never ignored).

    Raises:
        InvalidArgument: not a decimal integer from 0 to :data:`MAX_SEQUENCE`, naming each bad one.
    """
    violations: list[FieldViolation] = []
    header = _sequence("Last-Event-ID", request.headers.get("Last-Event-ID"), violations)
    query = _sequence("after", request.query.get("after"), violations)
    if violations:
        raise InvalidArgument(violations)
    return header if header is not None else query


def _sequence(name: str, raw: str | None, violations: list[FieldViolation]) -> int | None:
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_SEQUENCE:
        violations.append(FieldViolation(name, f"{name} must be an event sequence, 0 to {MAX_SEQUENCE}"))
        return None
    return int(raw)


def _resume_words(message: str) -> str:
    # The core speaks gRPC's field; an SSE client resumes with the header (or the query value).
    return message.replace("after_sequence", "Last-Event-ID (or after)")


def change_json(change: StateChange) -> dict[str, Any]:
    """One event's change: the history entry of ``GET /commands/{id}`` plus whose it is."""
    out = state_change_json(change)
    out["executionId"] = change.execution_id
    out["thingId"] = change.thing_id
    out["action"] = change.action
    if change.job_id:
        out["jobId"] = change.job_id
    return out


def encode(events: list[StateChange], executions: dict[str, Execution]) -> bytes:
    """The SSE text of a batch: each event with the execution as it is now (None: retention deleted it)."""
    shown: dict[str, Any] = {}
    parts = []
    for change in events:
        if change.job is not None:
            data = json.dumps({"seq": change.sequence, "job": job_json(change.job)}, separators=(",", ":"))
            parts.append(f"id: {change.sequence}\nevent: job\ndata: {data}\n\n")
            continue
        execution = shown.get(change.execution_id)
        if execution is None and change.execution_id not in shown:
            found = executions.get(change.execution_id)
            execution = shown[change.execution_id] = execution_json(found) if found is not None else None
        data = json.dumps({"seq": change.sequence, "execution": execution, "change": change_json(change)}, separators=(",", ":"))
        parts.append(f"id: {change.sequence}\nevent: execution\ndata: {data}\n\n")
    return "".join(parts).encode()


def error_event(exc: BaseException) -> bytes:
    """The SSE text of the error that ends a stream (the body a REST error would have)."""
    if isinstance(exc, FleetcmdError):
        code = http_status(exc)[1]
        body = error_body(code, _resume_words(str(exc)))
    else:
        body = error_body("INTERNAL", "internal error")
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


async def _next(batches: AsyncIterator[StreamBatch]) -> StreamBatch | None:
    # StopAsyncIteration cannot end a task: None says the stream ended.
    try:
        return await anext(batches)
    except StopAsyncIteration:
        return None


class EventsRest:
    """Handler of ``GET /api/v1/events`` on top of :meth:`CommandCore.stream`."""

    def __init__(self, core: CommandCore, keys: ApiKeys) -> None:
        self._core = core
        self._keys = keys
        self._stopping = asyncio.Event()

    def routes(self) -> list[web.RouteDef]:
        """The route of :data:`ROUTES`, behind its operation's role check."""
        return guarded_routes(self, ROUTES, self._keys)

    async def on_shutdown(self, app: web.Application) -> None:
        """The server is stopping: every stream ends with ``event: error`` UNAVAILABLE (clients resume elsewhere or later)."""
        self._stopping.set()

    async def _encode(self, batch: StreamBatch) -> bytes:
        ids = list(dict.fromkeys(change.execution_id for change in batch.events if change.job is None))
        executions = {e.execution_id: e for e in await self._core.store.get_many(ids)}
        return encode(batch.events, executions)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/events``: ``text/event-stream`` until the client leaves, falls behind or the service stops."""
        q = request.query
        job_id = q.get("jobId", "")
        if job_id:
            check_execution_id(job_id, "jobId")
        flt = EventFilter(
            thing_id=q.get("thingId", ""), execution_id=q.get("executionId", ""), action=q.get("action", ""), job_id=job_id
        )
        after = resume_point(request)
        try:
            # Checked here too (CommandCore.stream checks it again) so that the refusal is an HTTP answer.
            check_resume(after, self._core.store.purged_through())
        except FailedPrecondition as exc:
            raise FailedPrecondition(_resume_words(str(exc))) from None
        headers = {"Content-Type": CONTENT_TYPE, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":
            # aiohttp answers HEAD on every GET route: the stream's headers, and no stream to hold open.
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        batches = aiter(self._core.stream(flt, after))
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        pending: asyncio.Future[Any] | None = None
        loop = asyncio.get_running_loop()
        try:
            await response.write(b": connected\n\n")
            written = loop.time()
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(_next(batches))
                timeout = min(LEFT_CHECK_SECONDS, max(0.0, written + HEARTBEAT_SECONDS - loop.time()))
                done, _ = await asyncio.wait({pending, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if pending in done:
                    batch, pending = pending.result(), None
                    if batch is None:
                        break
                    await response.write(await self._encode(batch))
                    written = loop.time()
                elif stopping in done:
                    raise Unavailable("the service is stopping; resume with after_sequence")
                elif request.transport is None or request.transport.is_closing():
                    log.debug("event stream client %s left", request.remote)
                    break
                elif loop.time() >= written + HEARTBEAT_SECONDS:
                    await response.write(b": keepalive\n\n")
                    written = loop.time()
        except ConnectionError as exc:
            # The client went away, even mid-event: no error of the service. A write finds it as a reset or a
            # broken pipe, or (waiting for the client to read a large event) aiohttp's ConnectionError
            # "Connection lost". (A client leaving never cancels this handler: aiohttp's handler_cancellation
            # is off; a CancelledError is the service stopping, and passes.)
            log.debug("event stream client %s left: %s", request.remote, exc)
        except FleetcmdError as exc:
            log.debug("event stream ended: %s", exc)
            await self._last_words(response, exc)
        except Exception as exc:
            log.exception("event stream failed")
            await self._last_words(response, exc)
        finally:
            stopping.cancel()
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending})
            await batches.aclose()  # type: ignore[attr-defined]
        return response

    @staticmethod
    async def _last_words(response: web.StreamResponse, exc: BaseException) -> None:
        with contextlib.suppress(ConnectionError):  # (the client may be gone too)
            await response.write(error_event(exc))
