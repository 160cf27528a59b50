"""The EMQX-style REST API for operators: ``/api/v1/commands``.

Same API keys and roles as gRPC (``Authorization: Bearer ...``): each route names
its operation (:data:`ROUTES`), whose role is in :data:`server.core.authz.REQUIRED_ROLE`.
JSON field names are camelCase as in the EMQX Fleets documentation; times are
RFC 3339 strings in UTC with milliseconds (``2026-01-02T03:04:05.678Z``).

Send and Rerun answer 200 when the execution is final, otherwise 202 with a
``Location`` header. Errors are ``{"code", "message", "details"}`` with the
HTTP status chosen by :func:`http_status`, the one mapping from domain errors.
This surface stands on the application layer alone: it imports neither gRPC nor
the generated protobuf code (tests/test_layering.py checks it).
"""

from __future__ import annotations

import asyncio
import calendar
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from broker_hooks import jsonvalue
from server.api import pagination
from server.core.apikeys import ApiKeys, Principal
from server.core.authz import Operation, required_role
from server.core.commands import CommandCore
from server.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    FleetcmdError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ThingMismatch,
    Unavailable,
)
from server.core.lifecycle import Status
from server.core.models import Execution, Reason, StateChange
from server.core.validation import check_wait, validate_send

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
COMMANDS = f"{API_PREFIX}/commands"

# Domain error -> (HTTP status, error code). A subclass takes its nearest listed ancestor's row;
# an error listed nowhere is a bug: 500 INTERNAL. Both kinds of conflict are 409, told apart by
# the code (the names are the canonical codes, which gRPC clients see too).
HTTP_STATUS: dict[type[FleetcmdError], tuple[int, str]] = {
    InvalidArgument: (400, "INVALID_ARGUMENT"),
    NotFound: (404, "NOT_FOUND"),
    AlreadyExists: (409, "ALREADY_EXISTS"),
    FailedPrecondition: (409, "FAILED_PRECONDITION"),
    ThingMismatch: (409, "FAILED_PRECONDITION"),
    ResourceExhausted: (429, "RESOURCE_EXHAUSTED"),
    Unavailable: (503, "UNAVAILABLE"),
}
_INTERNAL = (500, "INTERNAL")

# Error codes an HTTP status has when it does not come from a domain error.
HTTP_CODE: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "FAILED_PRECONDITION",
    413: "PAYLOAD_TOO_LARGE",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}

# Domain field names (shared with gRPC) as the REST API spells them.
REST_FIELDS = {
    "thing_id": "thingId",
    "ttl_seconds": "ttl",
    "idempotency_key": "idempotencyKey",
    "wait_seconds": "waitSeconds",
    "execution_id": "executionId",
    "page_size": "pageSize",
    "page_token": "pageToken",
    "created_after": "createdAfter",
    "created_before": "createdBefore",
    "thing_type": "thingType",
    "kaa_app_version": "kaaAppVersion",
}


class HttpError(Exception):
    """An HTTP-level refusal that is not a domain error (authentication, authorization)."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def http_status(exc: FleetcmdError) -> tuple[int, str]:
    """The one mapping of a domain error to (HTTP status, error code), from :data:`HTTP_STATUS`."""
    for kind in type(exc).__mro__:
        row = HTTP_STATUS.get(kind)
        if row is not None:
            return row
    return _INTERNAL


def rest_field(name: str) -> str:
    """A domain field path (``ttl_seconds``, ``params.value``) with its first segment as REST names it."""
    head, sep, rest = name.partition(".")
    return REST_FIELDS.get(head, head) + sep + rest


def _rest_violation(v: FieldViolation) -> FieldViolation:
    field = rest_field(v.field)
    description = v.description
    if field != v.field:
        head = v.field.partition(".")[0]
        description = description.replace(head, REST_FIELDS[head])
    return FieldViolation(field, description)


def error_body(code: str, message: str, violations: Iterable[FieldViolation] = ()) -> dict[str, Any]:
    """The JSON of an error response."""
    return {"code": code, "message": message, "details": [{"field": v.field, "description": v.description} for v in violations]}


def error_response(exc: BaseException) -> web.Response:
    """Render any failure of a REST request as ``{"code", "message", "details"}`` with its status."""
    headers: dict[str, str] = {}
    violations: list[FieldViolation] = []
    if isinstance(exc, HttpError):
        status, code, message = exc.status, exc.code, exc.message
        headers.update(exc.headers)
    elif isinstance(exc, FleetcmdError):
        status, code = http_status(exc)
        message = str(exc)
        if isinstance(exc, InvalidArgument):
            violations = [_rest_violation(v) for v in exc.violations]
            message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        if isinstance(exc, ResourceExhausted):
            headers["Retry-After"] = "1"
    elif isinstance(exc, web.HTTPException):
        status = exc.status
        code = HTTP_CODE.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
        message = exc.text if exc.text and not exc.text.startswith(f"{status}:") else exc.reason
        if status == 405 and "Allow" in exc.headers:
            headers["Allow"] = exc.headers["Allow"]
    else:
        status, code, message = 500, "INTERNAL", "internal error"
    return web.json_response(error_body(code, message, violations), status=status, headers=headers)


# ---- JSON representation ------------------------------------------------------------------


def rfc3339(ms: int | None) -> str | None:
    """Milliseconds since the epoch as an RFC 3339 UTC string with milliseconds (None stays None)."""
    if ms is None:
        return None
    at = datetime.fromtimestamp(ms // 1000, UTC) + timedelta(milliseconds=ms % 1000)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(text: str | None) -> Any:
    """Stored JSON text as a value; what a rule refuses (a row of an older version) as its text."""
    if text is None:
        return None
    return jsonvalue.stored(text)


def _reason(reason: Reason | None) -> dict[str, str] | None:
    if reason is None:
        return None
    return {"reasonCode": reason.code, "reasonDescription": reason.description}


def state_change_json(change: StateChange) -> dict[str, Any]:
    """One history entry."""
    return {
        "sequence": change.sequence,
        "status": change.status.name,
        "previousStatus": change.previous_status.name if change.previous_status is not None else None,
        "at": rfc3339(change.at_ms),
        "late": change.late,
        "result": _json(change.result_json),
        "statusReason": _reason(change.reason),
        "note": change.note,
    }


def execution_json(e: Execution, *, detail: bool = False) -> dict[str, Any]:
    """An execution as the REST API shows it; ``detail`` adds ``history`` and ``reruns`` (GET one)."""
    out: dict[str, Any] = {
        "executionId": e.execution_id,
        "commandId": e.command_id,
        "thingId": e.thing_id,
        "action": e.action,
        "params": _json(e.params_json or "{}"),  # the device received {} when no params were given
        "ttl": e.ttl_seconds,
        "status": e.status.name,
        "result": _json(e.result_json),
        "statusReason": _reason(e.reason),
        "createdAt": rfc3339(e.created_at_ms),
        "updatedAt": rfc3339(e.updated_at_ms),
        "completedAt": rfc3339(e.completed_at_ms),
        "expiresAt": rfc3339(e.expires_at_ms),
        "idempotencyKey": e.idempotency_key or None,
        "thingType": e.thing_type or None,
        "resultViolations": list(e.result_violations),
        "rerunOf": e.rerun_of or None,
        "kaaCommandId": e.kaa_id,
        "jobId": e.job_id or None,
        "retryOf": e.retry_of or None,
    }
    if detail:
        out["reruns"] = list(e.reruns)
        out["history"] = [state_change_json(c) for c in e.history]
    return out


# ---- request parsing ----------------------------------------------------------------------


def parse_json(raw: bytes, max_depth: int = jsonvalue.MAX_DEPTH + 1) -> Any:
    """Strict, bounded JSON (see :mod:`broker_hooks.jsonvalue`).

    Args:
        raw: The body.
        max_depth: Levels allowed: by default a :data:`~broker_hooks.jsonvalue.MAX_DEPTH` value inside the body object.

    Raises:
        jsonvalue.JsonProblem: (a ValueError) not strict JSON, too deep, a number out of range, invalid Unicode.
    """
    return jsonvalue.loads(raw, max_depth)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; an empty body is None.

    Raises:
        InvalidArgument: the body is not strict, bounded JSON; the field named is the body's member
            holding the problem (``params``, its path ``params.a[2]`` in the description) when known, else ``body``.
        web.HTTPRequestEntityTooLarge: above the application's ``client_max_size``.
    """
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return parse_json(raw)
    except jsonvalue.JsonProblem as exc:
        if exc.path:
            where = jsonvalue.where(exc.path[1:], str(exc.path[0]))
            raise InvalidArgument.single(str(exc.path[0]), f"{where} is refused ({exc.reason}): {exc.detail}") from None
        raise InvalidArgument.single("body", f"the body is not valid JSON ({exc.reason}): {exc.detail}") from None


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _query_int(request: web.Request, name: str, violations: list[FieldViolation]) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        violations.append(FieldViolation(name, f"{name} must be an integer"))
        return None


class Body:
    """Typed access to a JSON object body, collecting every violation."""

    def __init__(self, body: Any) -> None:
        """Wrap a parsed body (None: empty).

        Raises:
            InvalidArgument: the body is not a JSON object.
        """
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidArgument.single("body", "the body must be a JSON object")
        self.violations: list[FieldViolation] = []
        self.data: dict[str, Any] = body

    def string(self, name: str, *, required: bool = False) -> str:
        """Member ``name`` as a string ("" when absent or wrong, which is recorded)."""
        value = self.data.get(name)
        if value is None:
            if required:
                self.violations.append(FieldViolation(name, f"{name} is required"))
            return ""
        if not isinstance(value, str):
            self.violations.append(FieldViolation(name, f"{name} must be a string"))
            return ""
        return value

    def integer(self, name: str) -> int | None:
        """Member ``name`` as an integer (None when absent or wrong, which is recorded)."""
        value = self.data.get(name)
        if value is None:
            return None
        number = _integer(value)
        if number is None:
            self.violations.append(FieldViolation(name, f"{name} must be an integer"))
        return number

    def object(self, name: str) -> dict[str, Any] | None:
        """Member ``name`` as a JSON object (None when absent or wrong, which is recorded)."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.violations.append(FieldViolation(name, f"{name} must be a JSON object"))
            return None
        return value


def _wait(body: Body, request: web.Request) -> int:
    # The body's value wins, but a query value is checked whenever it is given: a bad one is never ignored.
    queried = _query_int(request, "waitSeconds", body.violations) if "waitSeconds" in request.query else None
    wait = body.integer("waitSeconds")
    if wait is None and "waitSeconds" not in body.data:
        wait, queried = queried, None
    for value in (queried, wait):
        if value is None:
            continue
        try:
            check_wait(value, "waitSeconds")
        except InvalidArgument as exc:
            body.violations.extend(exc.violations)
            return 0
    return wait or 0


def _parse_time(name: str, raw: str, violations: list[FieldViolation]) -> int | None:
    """An RFC 3339 date-time with an offset as milliseconds since the epoch (microseconds floored)."""
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        violations.append(FieldViolation(name, f"{name} must be an RFC 3339 date-time"))
        return None
    if at.tzinfo is None:
        violations.append(FieldViolation(name, f"{name} must have a time zone offset (e.g. Z)"))
        return None
    try:
        # In UTC, years 1..9999 only: an offset that leaves them is out of range ("date value out of range").
        seconds = calendar.timegm(at.utctimetuple())
    except (ValueError, OverflowError) as exc:
        violations.append(FieldViolation(name, f"{name} is out of range: {exc}"))
        return None
    return seconds * 1000 + at.microsecond // 1000


def _statuses(values: Iterable[str], violations: list[FieldViolation]) -> list[int]:
    out = []
    for value in values:
        for name in value.split(","):
            name = name.strip().upper()
            if not name:
                continue
            try:
                out.append(int(Status[name]))
            except KeyError:
                allowed = ", ".join(s.name for s in Status)
                violations.append(FieldViolation("status", f"{name!r} is not a status ({allowed})"))
    return out


def list_filters(request: web.Request) -> pagination.ListFilters:
    """The query string of ``GET /api/v1/commands`` as List filters.

    The same filters and page tokens as gRPC's ListRequest: a token one surface issued
    is good on the other.

    Raises:
        InvalidArgument: bad status, page size or time.
    """
    violations: list[FieldViolation] = []
    q = request.query
    statuses = _statuses(q.getall("status", []), violations)
    size = _query_int(request, "pageSize", violations)
    page_size = 0
    if size is not None:
        if size < 0:
            violations.append(FieldViolation("pageSize", "pageSize must not be negative"))
        else:
            page_size = min(size, 2**32 - 1)  # the range of ListRequest.page_size (uint32)
    times: dict[str, int | None] = {"createdAfter": None, "createdBefore": None}
    for name in times:
        raw = q.get(name)
        if raw:
            times[name] = _parse_time(name, raw, violations)
    if violations:
        raise InvalidArgument(violations)
    return pagination.ListFilters(
        thing_id=q.get("thingId", ""),
        action=q.get("action", ""),
        statuses=tuple(statuses),
        created_after_ms=times["createdAfter"],
        created_before_ms=times["createdBefore"],
        page_size=page_size,
        page_token=q.get("pageToken", ""),
        job_id=q.get("jobId", ""),
    )


# ---- handlers -----------------------------------------------------------------------------


def bearer_token(request: web.Request) -> str:
    """The token of an ``Authorization: Bearer ...`` header ("" when there is none)."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


@dataclass(frozen=True)
class RestRoute:
    """One route of the REST API and the operation a caller must be allowed."""

    method: str  # GET (HEAD answered too, as aiohttp does for every GET route), POST, PUT or DELETE
    path: str
    handler: str  # the name of the RestApi method that serves it
    operation: Operation


# Every route of the REST API; RestApi.routes() authorizes each one's operation before its handler runs.
ROUTES: tuple[RestRoute, ...] = (
    RestRoute("POST", COMMANDS, "send", Operation.SEND),
    RestRoute("GET", COMMANDS, "list", Operation.LIST),
    RestRoute("GET", COMMANDS + "/{executionId}", "get", Operation.GET),
    RestRoute("POST", COMMANDS + "/{executionId}/cancel", "cancel", Operation.CANCEL),
    RestRoute("POST", COMMANDS + "/{executionId}/rerun", "rerun", Operation.RERUN),
)
_ROUTE_DEF = {"GET": web.get, "POST": web.post, "PUT": web.put, "DELETE": web.delete}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def authorize(keys: ApiKeys, request: web.Request, operation: Operation) -> Principal:
    """The caller's key, if it may perform ``operation``.

    Raises:
        HttpError: 401 without a valid key, 403 when the key's role is too weak.
    """
    token = bearer_token(request)
    principal = await keys.authenticate(token) if token else None
    if principal is None:
        raise HttpError(
            401,
            "UNAUTHENTICATED",
            "a valid API key is required (Authorization: Bearer ...)",
            {"WWW-Authenticate": 'Bearer realm="fleetcmd"'},
        )
    needed = required_role(operation)
    if principal.role < needed:
        raise HttpError(
            403,
            "PERMISSION_DENIED",
            f"{request.method} {request.path} needs the {needed.name.lower()} role; "
            f"key {principal.key_id} is {principal.role.name.lower()}",
        )
    return principal


# The caller a guarded route authorized (e.g. who created a job).
CALLER = web.RequestKey("caller", Principal)


def guarded_routes(api: object, routes: Iterable[RestRoute], keys: ApiKeys) -> list[web.RouteDef]:
    """The aiohttp routes of ``routes``, each served by ``api``'s method of its name once its operation is authorized."""

    def guard(route: RestRoute) -> Handler:
        handler: Handler = getattr(api, route.handler)
        operation = route.operation

        async def guarded(request: web.Request) -> web.StreamResponse:
            request[CALLER] = await authorize(keys, request, operation)
            return await handler(request)

        return guarded

    return [_ROUTE_DEF[route.method](route.path, guard(route)) for route in routes]


class RestApi:
    """Handlers of ``/api/v1/commands`` on top of :class:`~server.core.commands.CommandCore`."""

    def __init__(self, core: CommandCore, keys: ApiKeys) -> None:
        self._core = core
        self._keys = keys
        self._stopping = asyncio.Event()

    async def on_shutdown(self, app: web.Application) -> None:
        """The server is stopping: waiting Sends answer at once (202 with the execution as it is)."""
        self._stopping.set()

    async def _wait(self, execution: Execution, seconds: int) -> Execution:
        if seconds <= 0 or execution.status.final:
            return execution
        waiter = asyncio.ensure_future(self._core.wait(execution, seconds))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not waiter.done():
                waiter.cancel()
                await asyncio.wait({waiter})
        if not waiter.cancelled():
            return waiter.result()
        try:
            return await self._core.get(execution.execution_id)
        except FleetcmdError:
            return execution

    def routes(self) -> list[web.RouteDef]:
        """The routes of the REST API (:data:`ROUTES`), each behind its operation's role check."""
        return guarded_routes(self, ROUTES, self._keys)

    @staticmethod
    def _answer(execution: Execution) -> web.Response:
        """200 with a final execution, else 202 with its ``Location``."""
        if execution.status.final:
            return web.json_response(execution_json(execution))
        location = f"{COMMANDS}/{execution.execution_id}"
        return web.json_response(execution_json(execution), status=202, headers={"Location": location})

    async def send(self, request: web.Request) -> web.Response:
        """``POST /api/v1/commands``."""
        body = Body(await read_json(request))
        thing_id = body.string("thingId", required=True)
        action = body.string("action", required=True)
        params = body.object("params")
        ttl = body.integer("ttl")
        key = body.string("idempotencyKey")
        wait = _wait(body, request)
        violations = body.violations
        try:
            cmd = validate_send(
                self._core.settings,
                thing_id=thing_id,
                action=action,
                params=params,
                ttl_seconds=ttl or 0,
                idempotency_key=key,
            )
        except InvalidArgument as exc:
            flagged = {v.field for v in violations}
            violations = violations + [v for v in exc.violations if rest_field(v.field) not in flagged]
            raise InvalidArgument(violations) from None
        if violations:
            raise InvalidArgument(violations)
        execution = await self._core.send(cmd)
        return self._answer(await self._wait(execution, wait))

    async def get(self, request: web.Request) -> web.Response:
        """``GET /api/v1/commands/{executionId}``."""
        execution = await self._core.get(request.match_info["executionId"])
        return web.json_response(execution_json(execution, detail=True))

    async def list(self, request: web.Request) -> web.Response:
        """``GET /api/v1/commands``: newest first, ``nextPageToken`` "" on the last page."""
        filters = list_filters(request)
        page = await self._core.list_executions(pagination.list_query(filters))
        return web.json_response(
            {
                "executions": [execution_json(e) for e in page.executions],
                "nextPageToken": pagination.page_token(filters, page.next_before_index),
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        """``POST /api/v1/commands/{executionId}/cancel``."""
        execution = await self._core.cancel(request.match_info["executionId"])
        return web.json_response(execution_json(execution))

    async def rerun(self, request: web.Request) -> web.Response:
        """``POST /api/v1/commands/{executionId}/rerun`` (optional ``waitSeconds`` in the body or query)."""
        body = Body(await read_json(request))
        wait = _wait(body, request)
        if body.violations:
            raise InvalidArgument(body.violations)
        execution = await self._core.rerun(request.match_info["executionId"])
        return self._answer(await self._wait(execution, wait))
