"""The two operator surfaces share one core (issue 14, item 3).

Roles are decided per operation in ``server.core.authz``, whichever surface a call comes
through; each surface maps every domain error in its own table; page tokens are one
codec (``server.api.pagination``), so a token one surface issued is good on the other.
Real gRPC and HTTP calls on 127.0.0.1 (port 0) where a surface is involved.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

import server
from server.api import grpc_errors, http_rest, pagination
from server.api.grpc_auth import METHOD_OPERATION
from server.api.http_app import HEALTHZ_PATH, METRICS_PATH, OPENAPI_PATH, READYZ_PATH, REST_ROUTES
from server.app import FleetcmdApp
from server.core.apikeys import Role
from server.core.authz import REQUIRED_ROLE, Operation, required_role
from server.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FleetcmdError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ThingMismatch,
    Unavailable,
)
from server.dialects.kaa.cex import KaaError
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import jobs_pb2 as jpb
from server.pb import registry_pb2 as rpb
from tests.clients import admin_key, app_channel

COMMANDS = "/api/v1/commands"
JOBS = "/api/v1/jobs"

# ---- authorization --------------------------------------------------------------------------


def test_every_operation_needs_a_role() -> None:
    assert set(REQUIRED_ROLE) == set(Operation)
    assert required_role(None) is Role.ADMIN  # a method or route nobody named


def test_every_grpc_method_is_an_operation() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for file in (pb.DESCRIPTOR, rpb.DESCRIPTOR, jpb.DESCRIPTOR)
        for service in file.services_by_name.values()
        for method in service.methods
    }
    assert set(METHOD_OPERATION) == methods


# The role each REST route needs, written out here rather than read from the server's tables.
REST_ROLES = {
    ("POST", COMMANDS): Role.OPERATOR,
    ("GET", COMMANDS): Role.VIEWER,
    ("GET", COMMANDS + "/{executionId}"): Role.VIEWER,
    ("POST", COMMANDS + "/{executionId}/cancel"): Role.OPERATOR,
    ("POST", COMMANDS + "/{executionId}/rerun"): Role.OPERATOR,
    ("GET", "/api/v1/things"): Role.VIEWER,
    ("POST", "/api/v1/things"): Role.ADMIN,
    ("GET", "/api/v1/things/{thingId}"): Role.VIEWER,
    ("DELETE", "/api/v1/things/{thingId}"): Role.ADMIN,
    ("POST", "/api/v1/things/{thingId}/credentials"): Role.ADMIN,
    ("GET", "/api/v1/thing-types"): Role.VIEWER,
    ("GET", "/api/v1/thing-types/{name}"): Role.VIEWER,
    ("PUT", "/api/v1/thing-types/{name}"): Role.ADMIN,
    ("DELETE", "/api/v1/thing-types/{name}"): Role.ADMIN,
    ("GET", "/api/v1/events"): Role.VIEWER,
    ("GET", "/api/v1/whoami"): Role.VIEWER,
    ("POST", JOBS): Role.OPERATOR,
    ("GET", JOBS): Role.VIEWER,
    ("GET", JOBS + "/{jobId}"): Role.VIEWER,
    ("POST", JOBS + "/{jobId}/pause"): Role.OPERATOR,
    ("POST", JOBS + "/{jobId}/resume"): Role.OPERATOR,
    ("POST", JOBS + "/{jobId}/cancel"): Role.OPERATOR,
    ("POST", JOBS + "/{jobId}/rerun-failed"): Role.OPERATOR,
}
# Routes without an API key: the OpenAPI document is public, KP1 devices present their endpoint token.
# The console's page and files are public too: they hold no data (it signs in with a key).
PUBLIC = {OPENAPI_PATH, HEALTHZ_PATH, READYZ_PATH, "/", "/console/{file}"}
DEVICE_PREFIX = "/kp1/"


def test_every_rest_route_names_the_role_of_today() -> None:
    assert {(r.method, r.path): required_role(r.operation) for r in REST_ROUTES} == REST_ROLES


async def test_every_http_route_resolves_to_an_operation_or_is_public(app: FleetcmdApp) -> None:
    assert app.http is not None
    declared = {(r.method, r.path) for r in REST_ROUTES}
    served = set()
    for route in app.http.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        method = "GET" if route.method == "HEAD" else route.method
        if path in PUBLIC or path == METRICS_PATH or path.startswith(DEVICE_PREFIX):
            continue
        assert (method, path) in declared, f"{route.method} {path} names no operation"
        served.add((method, path))
    assert served == declared


@pytest.fixture
async def session(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None and app.ports.http
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}") as s:
        yield s


async def _status(session: aiohttp.ClientSession, method: str, path: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    path = path.replace("{executionId}", "0" * 32).replace("{thingId}", "no-such-thing").replace("{name}", "no-such-type")
    path = path.replace("{jobId}", "0" * 32)
    async with session.request(method, path, headers=headers, json={}) as resp:
        if resp.content_type != "text/event-stream":  # an event stream never ends: its status is enough
            await resp.read()
        return resp.status


async def test_every_rest_route_checks_its_role_before_anything_else(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    assert app.keys is not None
    keys = {role: (await app.keys.create(role.name, role))[1] for role in Role}
    for (method, path), needed in REST_ROLES.items():
        assert await _status(session, method, path, None) == 401, (method, path)
        for role, key in keys.items():
            status = await _status(session, method, path, key)
            if role < needed:
                assert status == 403, (method, path, role)
            else:
                assert status not in (401, 403), (method, path, role)
    assert await _status(session, "GET", METRICS_PATH, None) == 401
    assert await _status(session, "GET", METRICS_PATH, keys[Role.VIEWER]) == 200


# ---- domain errors --------------------------------------------------------------------------

# Errors of the KP1 device protocol: they carry their own HTTP-like status, are answered to
# devices by server.dialects.kaa.http and the Kaa MQTT replies, and never reach an operator surface.
DEVICE_ERRORS: set[type[FleetcmdError]] = {KaaError}


def domain_errors() -> set[type[FleetcmdError]]:
    """Every subclass of FleetcmdError defined anywhere in the server package."""
    for info in pkgutil.walk_packages(server.__path__, "server."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found: set[type[FleetcmdError]] = set()
    todo = [FleetcmdError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("server.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def http_maps(kind: type[FleetcmdError]) -> bool:
    return any(issubclass(kind, listed) for listed in http_rest.HTTP_STATUS)


def grpc_maps(kind: type[FleetcmdError]) -> bool:
    return any(issubclass(kind, listed) for listed, _code in grpc_errors._CODES)


def test_both_surfaces_map_every_domain_error() -> None:
    errors = domain_errors()
    assert {InvalidArgument, NotFound, ThingMismatch, KaaError} <= errors
    unmapped = sorted(k.__qualname__ for k in errors - DEVICE_ERRORS if not (http_maps(k) and grpc_maps(k)))
    assert unmapped == [], "map these in server/api/http_rest.py HTTP_STATUS and server/api/grpc_errors.py"


def test_a_new_domain_error_is_unmapped_until_both_tables_list_it() -> None:
    class Novel(FleetcmdError):
        pass

    class NarrowerNotFound(NotFound):
        pass

    assert not http_maps(Novel) and not grpc_maps(Novel)
    assert http_rest.http_status(Novel()) == (500, "INTERNAL")
    assert http_maps(NarrowerNotFound) and http_rest.http_status(NarrowerNotFound()) == (404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidArgument.single("f", "bad"), 400, "INVALID_ARGUMENT"),
        (NotFound("x"), 404, "NOT_FOUND"),
        (AlreadyExists("x"), 409, "ALREADY_EXISTS"),
        (FailedPrecondition("x"), 409, "FAILED_PRECONDITION"),
        (ThingMismatch("x"), 409, "FAILED_PRECONDITION"),
        (ResourceExhausted("x"), 429, "RESOURCE_EXHAUSTED"),
        (Unavailable("x"), 503, "UNAVAILABLE"),
        (FleetcmdError("x"), 500, "INTERNAL"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_each_surface_names_a_domain_error_alike(error: FleetcmdError, status: int, code: str) -> None:
    assert http_rest.http_status(error) == (status, code)
    assert grpc_errors.grpc_code(error).name == code


# ---- page tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "token"),
    [
        # Issued by the code before server.api.pagination existed: tokens clients hold stay good.
        (pagination.ListFilters(), "eyJiIjogNDIsICJmIjogImE1NGI1MmQ1MDY1NGM0NjUifQ"),
        (pagination.ListFilters("t-1", "open", (9, 1, 9)), "eyJiIjogNDIsICJmIjogIjQ1YzVmYjAwNzA5ODBiODcifQ"),
        (pagination.ListFilters("t-2", "", (5,), 1767225600123, -1), "eyJiIjogNDIsICJmIjogIjdjZTE2YWNmYTBjZTQwNjcifQ"),
    ],
)
def test_page_tokens_are_those_issued_before(filters: pagination.ListFilters, token: str) -> None:
    assert pagination.page_token(filters, 42) == token
    query = pagination.list_query(pagination.ListFilters(**{**filters.__dict__, "page_token": token}))
    assert query.before_index == 42


async def test_a_page_token_is_good_on_either_surface_with_the_same_filters(
    app: FleetcmdApp, session: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {admin_key(app.settings.data_dir)}"}
    async with app_channel(app) as channel:
        stub = pb_grpc.CommandServiceStub(channel)
        made = [(await stub.Send(pb.SendRequest(thing_id="t-token", action="a"))).execution_id for _ in range(4)]
        newest_first = made[::-1]
        request = pb.ListRequest(thing_id="t-token", action="a", status=[pb.QUEUED, pb.QUEUED, pb.SENT], page_size=1)
        request.created_after.FromMilliseconds(1500)
        query = "thingId=t-token&action=a&status=QUEUED&status=queued,SENT&pageSize=1&createdAfter=1970-01-01T00:00:01.5Z"

        async def rest(token: str) -> dict[str, Any]:
            async with session.get(f"{COMMANDS}?{query}&pageToken={token}", headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                body: dict[str, Any] = await resp.json()
                return body

        first = await stub.List(request)
        assert [e.execution_id for e in first.executions] == newest_first[:1]
        second = await rest(first.next_page_token)  # issued by gRPC, taken by REST
        assert [e["executionId"] for e in second["executions"]] == newest_first[1:2]
        request.page_token = second["nextPageToken"]  # issued by REST, taken by gRPC
        third = await stub.List(request)
        assert [e.execution_id for e in third.executions] == newest_first[2:3]
        assert third.next_page_token == (await rest(second["nextPageToken"]))["nextPageToken"]
