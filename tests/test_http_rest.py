"""The EMQX-style REST API (issue 4, sections 2 and 3) with a real aiohttp client on loopback, port 0."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi

from server.api.http_broker_auth import AUTHN_PATH, AUTHZ_PATH
from server.api.openapi import document
from server.app import FleetcmdApp
from server.core.apikeys import Role
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.certs import self_signed
from tests.clients import admin_key, app_channel
from tests.conftest import make_settings
from tests.devices import EmqxDevice
from tests.proc import parse_ready, run_cli

COMMANDS = "/api/v1/commands"
TIMEOUT = aiohttp.ClientTimeout(total=30)


# ---- helpers ------------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: Any, body: Any) -> None:
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body!r})"


class Http:
    """A session bound to the service's HTTP port, presenting ``key`` unless told otherwise."""

    def __init__(self, session: aiohttp.ClientSession, key: str | None) -> None:
        self.session, self.key = session, key

    async def call(self, method: str, path: str, *, key: str | None = "default", **kw: Any) -> Reply:
        token = self.key if key == "default" else key
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, path, headers=headers, **kw) as resp:
            raw = await resp.read()
            body = json.loads(raw) if raw else None
            return Reply(resp.status, resp.headers, body)

    async def send(self, thing: str = "thing-1", action: str = "act", **fields: Any) -> Reply:
        return await self.call("POST", COMMANDS, json={"thingId": thing, "action": action, **fields})


@pytest.fixture
async def http(app: FleetcmdApp) -> AsyncIterator[Http]:
    assert app.ports is not None and app.ports.http
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as session:
        yield Http(session, admin_key(app.settings.data_dir))


@pytest.fixture
async def grpc_stub(app: FleetcmdApp) -> AsyncIterator[pb_grpc.CommandServiceStub]:
    async with app_channel(app) as channel:
        yield pb_grpc.CommandServiceStub(channel)


SPEC = document("test")


def conforms(schema_name: str, body: Any) -> None:
    """``body`` is valid against a schema of the OpenAPI document (JSON Schema 2020-12, formats checked)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(body)


def error(reply: Reply, status: int, code: str) -> dict[str, str]:
    """Expect a JSON error; return its field violations by field."""
    assert reply.status == status, reply
    conforms("Error", reply.body)
    assert reply.body["code"] == code, reply
    assert reply.body["message"]
    return {d["field"]: d["description"] for d in reply.body["details"]}


def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
    dev.respond(execution_id, "SUCCEEDED", {"echo": body.get("params")})


# ---- OpenAPI ------------------------------------------------------------------------------


def served_routes(app: FleetcmdApp) -> set[tuple[str, str]]:
    """Every (method, path) the HTTP server routes, HEAD aside."""
    assert app.http is not None
    served = set()
    for route in app.http.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            served.add((route.method.lower(), path))
    return served


async def test_openapi_document_is_valid_public_and_complete(tmp_path: Path) -> None:
    # With the broker's shared secret set every route is served, the external broker's authn/authz too.
    settings = make_settings(tmp_path / "data", broker_auth_secret="s3cret-s3cret-s3cret")
    async with (
        FleetcmdApp(settings) as app,
        aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http if app.ports else 0}", timeout=TIMEOUT) as session,
    ):
        reply = await Http(session, None).call("GET", "/api/v1/openapi.json")
        assert reply.status == 200
        spec = reply.body
        validate_openapi(spec)
        assert spec["openapi"].startswith("3.1")
        documented = {(m, p) for p, item in spec["paths"].items() for m in item}
        assert served_routes(app) == documented
    for path, item in spec["paths"].items():
        for op in item.values():
            if path.startswith("/api/v1/commands"):
                assert {"400", "401", "403"} <= set(op["responses"]), (path, op["operationId"])
            if path.startswith("/api/v1/broker/"):
                assert op["security"] == [{"brokerSecret": []}], path
                assert {"200", "400", "401"} <= set(op["responses"]), path


async def test_the_broker_endpoints_are_documented_but_not_served_without_the_secret(app: FleetcmdApp) -> None:
    broker = {("post", AUTHN_PATH), ("post", AUTHZ_PATH)}
    documented = {(m, p) for p, item in SPEC["paths"].items() for m in item}
    assert broker <= documented
    assert served_routes(app) & broker == set()


# ---- keys and roles -----------------------------------------------------------------------


async def test_rest_needs_a_valid_key(http: Http) -> None:
    for key in (None, "fck_nope_nope", "not-a-key"):
        reply = await http.call("GET", COMMANDS, key=key)
        error(reply, 401, "UNAUTHENTICATED")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        error(await http.call("POST", COMMANDS, key=key, json={"thingId": "t", "action": "a"}), 401, "UNAUTHENTICATED")
    # Basic auth is not a bearer key.
    reply = await http.call("GET", COMMANDS, key=None, headers={"Authorization": "Basic Zm9vOmJhcg=="})
    error(reply, 401, "UNAUTHENTICATED")


async def test_roles_viewer_reads_operator_writes(app: FleetcmdApp, http: Http) -> None:
    assert app.keys is not None
    _, viewer = await app.keys.create("viewer", Role.VIEWER)
    _, operator = await app.keys.create("operator", Role.OPERATOR)
    denied = await http.call("POST", COMMANDS, key=viewer, json={"thingId": "t-role", "action": "a"})
    assert "operator" in error(denied, 403, "PERMISSION_DENIED") or "operator" in denied.body["message"]
    sent = await http.call("POST", COMMANDS, key=operator, json={"thingId": "t-role", "action": "a"})
    assert sent.status == 202
    eid = sent.body["executionId"]
    assert (await http.call("GET", COMMANDS, key=viewer)).status == 200
    assert (await http.call("GET", f"{COMMANDS}/{eid}", key=viewer)).status == 200
    error(await http.call("POST", f"{COMMANDS}/{eid}/rerun", key=viewer), 403, "PERMISSION_DENIED")
    error(await http.call("POST", f"{COMMANDS}/{eid}/cancel", key=viewer), 403, "PERMISSION_DENIED")
    assert (await http.call("POST", f"{COMMANDS}/{eid}/cancel", key=operator)).status == 200
    # A revoked key stops working (the lookup cache lasts a second).
    record, revoked = await app.keys.create("gone", Role.ADMIN)
    await app.keys.revoke(record.key_id)
    error(await http.call("GET", COMMANDS, key=revoked), 401, "UNAUTHENTICATED")


# ---- Send ---------------------------------------------------------------------------------


async def test_send_to_offline_thing_is_202_with_location(http: Http) -> None:
    reply = await http.send("thermostat-001", "setTemperature", params={"value": 24}, ttl=30)
    assert reply.status == 202, reply
    body = reply.body
    conforms("Execution", body)
    assert reply.headers["Location"] == f"{COMMANDS}/{body['executionId']}"
    fields = (body["thingId"], body["action"], body["params"], body["ttl"])
    assert fields == ("thermostat-001", "setTemperature", {"value": 24}, 30)
    assert body["status"] == "QUEUED" and body["result"] is None and body["completedAt"] is None
    assert body["createdAt"].endswith("Z") and body["rerunOf"] is None
    assert "history" not in body
    got = await http.call("GET", reply.headers["Location"])
    assert got.status == 200
    conforms("Execution", got.body)
    assert got.body["executionId"] == body["executionId"]
    assert [h["status"] for h in got.body["history"]] == ["QUEUED"]
    assert got.body["history"][0]["previousStatus"] is None
    assert got.body["reruns"] == []


async def test_send_defaults(http: Http) -> None:
    reply = await http.send("t-default", "reboot")
    assert reply.status == 202
    assert reply.body["ttl"] == 30 and reply.body["params"] == {} and reply.body["idempotencyKey"] is None


async def test_send_reports_every_bad_field(http: Http) -> None:
    reply = await http.call(
        "POST",
        COMMANDS,
        json={"thingId": "a/b", "action": "", "params": [1], "ttl": -1, "idempotencyKey": 5, "waitSeconds": 61},
    )
    violations = error(reply, 400, "INVALID_ARGUMENT")
    assert set(violations) == {"thingId", "action", "params", "ttl", "idempotencyKey", "waitSeconds"}
    assert "ttl_seconds" not in violations["ttl"] and "ttl" in violations["ttl"]
    missing = error(await http.call("POST", COMMANDS, json={}), 400, "INVALID_ARGUMENT")
    assert set(missing) == {"thingId", "action"} and "required" in missing["thingId"]
    typed = error(await http.call("POST", COMMANDS, json={"thingId": 1, "action": "a", "ttl": True}), 400, "INVALID_ARGUMENT")
    assert set(typed) == {"thingId", "ttl"}
    big = error(await http.send("t-big", "a", params={"blob": "x" * 70_000}), 400, "INVALID_ARGUMENT")
    assert set(big) == {"params"}
    long_ttl = error(await http.send("t-ttl", "a", ttl=86401), 400, "INVALID_ARGUMENT")
    assert set(long_ttl) == {"ttl"}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{", id="truncated"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(b"[" * 100_000, id="too-deep"),
    ],
)
async def test_send_body_that_is_not_a_json_object_is_400(http: Http, raw: bytes) -> None:
    reply = await http.call("POST", COMMANDS, data=raw, headers={"Content-Type": "application/json"})
    assert set(error(reply, 400, "INVALID_ARGUMENT")) == {"body"}


async def test_send_body_with_nan_in_params_names_params(http: Http) -> None:
    raw = b'{"thingId": "t", "action": "a", "params": {"x": NaN}}'
    reply = await http.call("POST", COMMANDS, data=raw, headers={"Content-Type": "application/json"})
    assert set(error(reply, 400, "INVALID_ARGUMENT")) == {"params"}


async def test_oversized_body_is_413(http: Http) -> None:
    reply = await http.call("POST", COMMANDS, data=b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    error(reply, 413, "PAYLOAD_TOO_LARGE")
    # The server is fine afterwards.
    assert (await http.send("t-after-413", "a")).status == 202


async def test_unknown_route_and_method_are_json(http: Http) -> None:
    error(await http.call("GET", "/api/v1/nothing"), 404, "NOT_FOUND")
    reply = await http.call("PUT", COMMANDS, json={})
    error(reply, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in reply.headers["Allow"]


async def test_idempotency_retry_and_conflict(http: Http) -> None:
    first = await http.send("t-idem", "open", params={"v": 1}, idempotencyKey="k-1")
    again = await http.send("t-idem", "open", params={"v": 1}, idempotencyKey="k-1")
    assert first.status == again.status == 202
    assert again.body["executionId"] == first.body["executionId"]
    assert again.body["idempotencyKey"] == "k-1"
    error(await http.send("t-idem", "open", params={"v": 2}, idempotencyKey="k-1"), 409, "ALREADY_EXISTS")


async def test_too_many_active_executions_is_429(tmp_path: Path) -> None:
    async with FleetcmdApp(make_settings(tmp_path / "data", http_port=0, max_active_executions=2)) as app:
        assert app.ports is not None
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as session:
            http = Http(session, admin_key(app.settings.data_dir))
            assert (await http.send("t-429", "a")).status == 202
            assert (await http.send("t-429", "b")).status == 202
            reply = await http.send("t-429", "c")
            error(reply, 429, "RESOURCE_EXHAUSTED")
            assert reply.headers["Retry-After"] == "1"


# ---- Get, Cancel --------------------------------------------------------------------------


async def test_get_and_cancel_unknown_or_bad_ids(http: Http) -> None:
    for method, suffix in (("GET", ""), ("POST", "/cancel"), ("POST", "/rerun")):
        error(await http.call(method, f"{COMMANDS}/{'0' * 32}{suffix}"), 404, "NOT_FOUND")
        bad = error(await http.call(method, f"{COMMANDS}/%24dollar{suffix}"), 400, "INVALID_ARGUMENT")
        assert set(bad) == {"executionId"}


async def test_cancel_then_cancel_again_is_409(http: Http) -> None:
    sent = await http.send("t-cancel", "act")
    eid = sent.body["executionId"]
    canceled = await http.call("POST", f"{COMMANDS}/{eid}/cancel")
    assert canceled.status == 200 and canceled.body["status"] == "CANCELED"
    assert canceled.body["completedAt"] is not None
    error(await http.call("POST", f"{COMMANDS}/{eid}/cancel"), 409, "FAILED_PRECONDITION")
    got = await http.call("GET", f"{COMMANDS}/{eid}")
    assert [h["status"] for h in got.body["history"]] == ["QUEUED", "CANCELED"]


# ---- waiting for the result ---------------------------------------------------------------


async def test_wait_returns_200_when_the_device_answers(app: FleetcmdApp, http: Http) -> None:
    assert app.ports is not None
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "t-wait", on_request=answer):
        t0 = time.monotonic()
        reply = await http.send("t-wait", "setTemperature", params={"value": 21}, ttl=20, waitSeconds=15)
        assert time.monotonic() - t0 < 10
        assert reply.status == 200, reply
        assert "Location" not in reply.headers
        assert reply.body["status"] == "SUCCEEDED"
        assert reply.body["result"] == {"echo": {"value": 21}}
        conforms("Execution", reply.body)
        # waitSeconds in the query works as well.
        path = f"{COMMANDS}?waitSeconds=15"
        by_query = await http.call("POST", path, json={"thingId": "t-wait", "action": "again"})
        assert by_query.status == 200 and by_query.body["status"] == "SUCCEEDED"


async def test_wait_ends_with_202_when_not_final(http: Http) -> None:
    t0 = time.monotonic()
    reply = await http.send("t-nobody", "act", waitSeconds=1)
    elapsed = time.monotonic() - t0
    assert reply.status == 202 and reply.body["status"] == "QUEUED"
    assert reply.headers["Location"].endswith(reply.body["executionId"])
    assert 0.9 <= elapsed < 5


async def test_wait_returns_when_the_ttl_ends(http: Http) -> None:
    reply = await http.send("t-expire", "act", ttl=1, waitSeconds=30)
    assert reply.status == 200 and reply.body["status"] == "TIMED_OUT"


# ---- rerun --------------------------------------------------------------------------------


async def test_rerun_links_both_ways(app: FleetcmdApp, http: Http, grpc_stub: pb_grpc.CommandServiceStub) -> None:
    original = (await http.send("t-rerun", "setTemperature", params={"value": 3}, ttl=45)).body
    rerun = await http.call("POST", f"{COMMANDS}/{original['executionId']}/rerun")
    assert rerun.status == 202, rerun
    new = rerun.body
    assert rerun.headers["Location"] == f"{COMMANDS}/{new['executionId']}"
    assert new["executionId"] != original["executionId"]
    assert (new["thingId"], new["action"], new["params"], new["ttl"]) == ("t-rerun", "setTemperature", {"value": 3}, 45)
    assert new["rerunOf"] == original["executionId"]
    got = (await http.call("GET", f"{COMMANDS}/{original['executionId']}")).body
    assert got["reruns"] == [new["executionId"]] and got["rerunOf"] is None
    assert (await http.call("GET", f"{COMMANDS}/{new['executionId']}")).body["rerunOf"] == original["executionId"]
    via_grpc = await grpc_stub.Get(pb.GetRequest(execution_id=original["executionId"]))
    assert list(via_grpc.reruns) == [new["executionId"]]
    assert (await grpc_stub.Get(pb.GetRequest(execution_id=new["executionId"]))).rerun_of == original["executionId"]
    # A final execution can be re-run too; with a wait and a device the answer is 200.
    await http.call("POST", f"{COMMANDS}/{original['executionId']}/cancel")
    assert app.ports is not None
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "t-rerun", on_request=answer):
        again = await http.call("POST", f"{COMMANDS}/{original['executionId']}/rerun", json={"waitSeconds": 15})
        assert again.status == 200 and again.body["status"] == "SUCCEEDED", again
    got = (await http.call("GET", f"{COMMANDS}/{original['executionId']}")).body
    assert got["reruns"] == [new["executionId"], again.body["executionId"]]
    bad = error(await http.call("POST", f"{COMMANDS}/{original['executionId']}/rerun?waitSeconds=x"), 400, "INVALID_ARGUMENT")
    assert set(bad) == {"waitSeconds"}


async def test_cli_rerun(app: FleetcmdApp, http: Http) -> None:
    assert app.ports is not None
    original = (await http.send("t-cli-rerun", "setTemperature", params={"value": 7}, ttl=20)).body
    target = f"127.0.0.1:{app.ports.grpc}"
    key = admin_key(app.settings.data_dir)
    proc = await asyncio.to_thread(run_cli, "rerun", original["executionId"], "--json", target=target, api_key=key)
    assert proc.returncode == 0, proc.stderr
    rerun = json.loads(proc.stdout)
    assert rerun["rerun_of"] == original["executionId"] and rerun["status"] == "QUEUED"
    assert rerun["params"] == {"value": 7} and rerun["ttl_seconds"] == 20
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "t-cli-rerun", on_request=answer):
        proc = await asyncio.to_thread(run_cli, "rerun", original["executionId"], "--wait", target=target, api_key=key)
    assert proc.returncode == 0, proc.stderr
    assert "SUCCEEDED" in proc.stdout and f"rerun of   {original['executionId']}" in proc.stdout
    text = await asyncio.to_thread(run_cli, "get", original["executionId"], target=target, api_key=key)
    assert text.stdout.count("rerun      ") == 2
    missing = await asyncio.to_thread(run_cli, "rerun", "0" * 32, target=target, api_key=key)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


# ---- List ---------------------------------------------------------------------------------


async def list_all(http: Http, query: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = ""
    for _ in range(100):
        reply = await http.call("GET", f"{COMMANDS}?{query}&pageToken={token}")
        assert reply.status == 200, reply
        conforms("ListResponse", reply.body)
        out.extend(reply.body["executions"])
        token = reply.body["nextPageToken"]
        if not token:
            return out
    raise AssertionError("pagination does not end")


async def test_list_filters_and_pagination(http: Http) -> None:
    made = []
    for i in range(7):
        reply = await http.send("t-list-a" if i % 2 else "t-list-b", "open" if i < 4 else "close")
        made.append(reply.body["executionId"])
    canceled = made[1]
    await http.call("POST", f"{COMMANDS}/{canceled}/cancel")
    everything = await list_all(http, "pageSize=3")
    assert [e["executionId"] for e in everything] == made[::-1]
    first = await http.call("GET", f"{COMMANDS}?pageSize=3")
    assert len(first.body["executions"]) == 3 and first.body["nextPageToken"]
    only_a = await list_all(http, "thingId=t-list-a&pageSize=2")
    assert [e["executionId"] for e in only_a] == [made[5], made[3], made[1]]
    a_open = await list_all(http, "thingId=t-list-a&action=open")
    assert [e["executionId"] for e in a_open] == [made[3], made[1]]
    assert [e["executionId"] for e in await list_all(http, "status=CANCELED")] == [canceled]
    both = await list_all(http, "status=canceled,QUEUED&thingId=t-list-a")
    repeated = await list_all(http, "status=CANCELED&status=queued&thingId=t-list-a")
    assert [e["executionId"] for e in both] == [e["executionId"] for e in repeated] == [made[5], made[3], made[1]]
    created = everything[3]["createdAt"]
    window = await list_all(http, f"createdAfter={created}")
    assert made[3] in [e["executionId"] for e in window]
    assert (await http.call("GET", f"{COMMANDS}?pageSize=0")).status == 200


async def test_list_bad_queries_are_400_with_details(http: Http) -> None:
    for query, field in (
        ("status=DONE", "status"),
        ("pageSize=abc", "pageSize"),
        ("pageSize=1001", "pageSize"),
        ("pageSize=-1", "pageSize"),
        ("pageToken=garbage", "pageToken"),
        ("createdAfter=yesterday", "createdAfter"),
        ("createdBefore=2026-01-01T00:00:00", "createdBefore"),
    ):
        reply = await http.call("GET", f"{COMMANDS}?{query}")
        assert field in error(reply, 400, "INVALID_ARGUMENT"), (query, reply)
    for _ in range(3):
        await http.send("t-token", "a")
    token = (await http.call("GET", f"{COMMANDS}?pageSize=1")).body["nextPageToken"]
    reply = await http.call("GET", f"{COMMANDS}?pageSize=1&thingId=other&pageToken={token}")
    assert set(error(reply, 400, "INVALID_ARGUMENT")) == {"pageToken"}


# ---- the listener -------------------------------------------------------------------------


async def test_http_off_and_ready_line(tmp_path: Path) -> None:
    async with FleetcmdApp(make_settings(tmp_path / "data", http_port=-1)) as app:
        assert app.ports is not None and app.ports.http is None and app.http is None
    ready = parse_ready("x fleetcmd ready mqtt=127.0.0.1:1 ws=off grpc=127.0.0.1:2 http=127.0.0.1:3 data=d restored=0")
    assert ready is not None and ready.http_port == 3
    off = parse_ready("fleetcmd ready mqtt=127.0.0.1:1 ws=off grpc=127.0.0.1:2 http=off data=d restored=0")
    assert off is not None and off.http_port == -1


async def test_https_with_the_tls_files(tmp_path: Path) -> None:
    tls = self_signed(tmp_path / "tls")
    settings = make_settings(
        tmp_path / "data", http_port=0, http_tls=True, tls_cert_file=str(tls.cert), tls_key_file=str(tls.key)
    )
    async with FleetcmdApp(settings) as app:
        assert app.ports is not None
        context = ssl.create_default_context(cafile=str(tls.ca))
        url = f"https://127.0.0.1:{app.ports.http}/api/v1/openapi.json"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(url, ssl=context) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url.replace("https", "http")) as resp:
                    await resp.read()


async def test_shutdown_answers_a_waiting_request_at_once(tmp_path: Path) -> None:
    async with FleetcmdApp(make_settings(tmp_path / "data")) as app:
        assert app.ports is not None
        session = aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT)
        http = Http(session, admin_key(app.settings.data_dir))
        waiting = asyncio.create_task(http.send("t-shutdown", "act", waitSeconds=60))
        for _ in range(250):
            if app.core is not None and app.core.metrics()["watchers"]:
                break
            await asyncio.sleep(0.02)
        assert app.core is not None and app.core.metrics()["watchers"] == 1
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.5
    try:
        reply = await asyncio.wait_for(waiting, 5)
    finally:
        await session.close()
    # Answered, not cut off: the execution as it stood, with where to look later.
    assert reply.status == 202 and reply.body["status"] == "QUEUED"
    assert reply.headers["Location"].endswith(reply.body["executionId"])
