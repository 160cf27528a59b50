"""API security (issue 3, section 4): bearer API keys, roles, the first admin key, ``fleetcmd apikey``.

Real gRPC calls on 127.0.0.1 (port 0) against an in-process service in secure mode; ``fleetcmd``
CLI commands run as subprocesses on the same data directory while the service runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.app import FleetcmdApp
from server.core.apikeys import ADMIN_KEY_FILE, Role
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc
from tests.clients import admin_key, channel
from tests.conftest import make_settings
from tests.proc import run_cli

pytestmark = pytest.mark.secure

DEADLINE = 10.0
STREAM_PROBE = 1.0  # seconds a permitted stream is given before the probe gives up (DEADLINE_EXCEEDED)
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def _methods() -> dict[str, descriptor.MethodDescriptor]:
    out = {}
    for file in (pb.DESCRIPTOR, rpb.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                out[f"/{service.full_name}/{method.name}"] = method
    return out


METHODS = _methods()

# What each role may call, written out here rather than read from the server's table.
VIEWER_METHODS = {
    "/fleetcmd.v1.CommandService/Get",
    "/fleetcmd.v1.CommandService/List",
    "/fleetcmd.v1.CommandService/Stream",
    "/fleetcmd.v1.CommandService/StreamBatches",
    "/fleetcmd.v1.ThingService/GetThing",
    "/fleetcmd.v1.ThingService/ListThings",
    "/fleetcmd.v1.ThingService/WatchPresence",
    "/fleetcmd.v1.ThingTypeService/GetThingType",
    "/fleetcmd.v1.ThingTypeService/ListThingTypes",
}
OPERATOR_METHODS = VIEWER_METHODS | {
    "/fleetcmd.v1.CommandService/Send",
    "/fleetcmd.v1.CommandService/SendStream",
    "/fleetcmd.v1.CommandService/Cancel",
    "/fleetcmd.v1.CommandService/Rerun",  # a Send of an earlier execution's request (when the proto has it)
}
ALLOWED = {Role.VIEWER: VIEWER_METHODS, Role.OPERATOR: OPERATOR_METHODS, Role.ADMIN: set(METHODS)}


# ---- helpers ----------------------------------------------------------------------------------


def target(app: FleetcmdApp) -> str:
    assert app.ports is not None
    return f"127.0.0.1:{app.ports.grpc}"


def empty_request(path: str) -> message.Message:
    return message_factory.GetMessageClass(METHODS[path].input_type)()


async def status_of(ch: grpc.aio.Channel, path: str, request: message.Message | None = None, **kw: Any) -> grpc.StatusCode:
    """Call any fleetcmd method by its path; OK, or the code it failed with.

    A stream counts as OK once it yields a message; one that stays silent ends with
    DEADLINE_EXCEEDED after STREAM_PROBE seconds (it was let in).
    """
    method = METHODS[path]
    request = request if request is not None else empty_request(path)
    response = message_factory.GetMessageClass(method.output_type)
    serialize, deserialize = type(request).SerializeToString, response.FromString
    try:
        if method.client_streaming:
            # One request, then half-close; permitted, the method answers it.
            bidi = ch.stream_stream(path, request_serializer=serialize, response_deserializer=deserialize)(
                iter([request]), timeout=STREAM_PROBE, **kw
            )
            try:
                async for _ in bidi:
                    break
            finally:
                bidi.cancel()
        elif method.server_streaming:
            call = ch.unary_stream(path, request_serializer=serialize, response_deserializer=deserialize)(
                request, timeout=STREAM_PROBE, **kw
            )
            try:
                async for _ in call:
                    break
            finally:
                call.cancel()
        else:
            await ch.unary_unary(path, request_serializer=serialize, response_deserializer=deserialize)(
                request, timeout=DEADLINE, **kw
            )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def rpc_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call, DEADLINE)
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


async def cli(*args: str, api_key: str | None = None, app: FleetcmdApp | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``fleetcmd ...`` in a thread (the service runs on this loop); ``app`` adds ``--server``."""
    return await asyncio.to_thread(run_cli, *args, target=target(app) if app else None, api_key=api_key)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


class Client:
    """Stubs on a channel presenting one key."""

    def __init__(self, ch: grpc.aio.Channel) -> None:
        self.ch = ch
        self.commands = pb_grpc.CommandServiceStub(ch)
        self.things = rpb_grpc.ThingServiceStub(ch)
        self.types = rpb_grpc.ThingTypeServiceStub(ch)


@pytest.fixture
async def admin(app: FleetcmdApp) -> AsyncIterator[Client]:
    async with channel(target(app), admin_key(app.settings.data_dir)) as ch:
        yield Client(ch)


async def key_for(app: FleetcmdApp, role: Role) -> str:
    assert app.keys is not None
    _record, token = await app.keys.create(f"test {role.name.lower()}", role)
    return token


# ---- no key, bad keys -------------------------------------------------------------------------


async def test_every_fleetcmd_method_needs_a_key(app: FleetcmdApp, admin: Client) -> None:
    core = {
        f"/fleetcmd.v1.{service}/{name}"
        for service, names in (
            ("CommandService", "Send SendStream Get List Stream Cancel"),
            ("ThingService", "CreateThing GetThing ListThings UpdateThing DeleteThing RotateCredentials WatchPresence"),
            ("ThingTypeService", "PutThingType GetThingType ListThingTypes DeleteThingType"),
        )
        for name in names.split()
    }
    assert core <= set(METHODS), sorted(core - set(METHODS))  # and any method added later is checked too
    await admin.things.CreateThing(rpb.CreateThingRequest(thing_id="victim"), timeout=DEADLINE)
    queued = await admin.commands.Send(pb.SendRequest(thing_id="victim", action="x", ttl_seconds=60), timeout=DEADLINE)
    # Requests that would change something if they got through.
    harmful: dict[str, message.Message] = {
        "/fleetcmd.v1.CommandService/Send": pb.SendRequest(thing_id="victim", action="x"),
        "/fleetcmd.v1.CommandService/SendStream": pb.SendStreamRequest(send=pb.SendRequest(thing_id="victim", action="x")),
        "/fleetcmd.v1.CommandService/Cancel": pb.CancelRequest(execution_id=queued.execution_id),
        "/fleetcmd.v1.CommandService/Stream": pb.StreamRequest(after_sequence=0),
        "/fleetcmd.v1.CommandService/StreamBatches": pb.StreamRequest(after_sequence=0),
        "/fleetcmd.v1.CommandService/Get": pb.GetRequest(execution_id=queued.execution_id),
        "/fleetcmd.v1.ThingService/CreateThing": rpb.CreateThingRequest(thing_id="intruder"),
        "/fleetcmd.v1.ThingService/DeleteThing": rpb.DeleteThingRequest(thing_id="victim"),
        "/fleetcmd.v1.ThingService/RotateCredentials": rpb.RotateCredentialsRequest(thing_id="victim"),
        "/fleetcmd.v1.ThingService/GetThing": rpb.GetThingRequest(thing_id="victim"),
        "/fleetcmd.v1.ThingTypeService/PutThingType": rpb.PutThingTypeRequest(thing_type=rpb.ThingType(name="intruder")),
    }
    async with channel(target(app), None) as anonymous:
        for path in METHODS:
            code = await status_of(anonymous, path, harmful.get(path))
            assert code == grpc.StatusCode.UNAUTHENTICATED, f"{path}: {code.name}"

    victim = await admin.things.GetThing(rpb.GetThingRequest(thing_id="victim"), timeout=DEADLINE)
    assert victim.credentials_rotated_at == victim.created_at  # not rotated
    listed = await admin.things.ListThings(rpb.ListThingsRequest(), timeout=DEADLINE)
    assert [t.thing_id for t in listed.things] == ["victim"]
    executions = await admin.commands.List(pb.ListRequest(), timeout=DEADLINE)
    assert [(e.execution_id, e.status) for e in executions.executions] == [(queued.execution_id, pb.QUEUED)]
    types = await admin.types.ListThingTypes(rpb.ListThingTypesRequest(), timeout=DEADLINE)
    assert list(types.thing_types) == []


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Bearer garbage", id="garbage"),
        pytest.param("Bearer ", id="empty-bearer"),
        pytest.param("Bearer fck_", id="prefix-only"),
        pytest.param("Bearer fck_0123456789ab_nosuchkey", id="unknown-key-id"),
        pytest.param("WRONG-SECRET", id="wrong-secret"),
        pytest.param("TRUNCATED", id="truncated-secret"),
        pytest.param("BASIC", id="basic-scheme"),
        pytest.param("BARE", id="no-scheme"),
    ],
)
async def test_wrong_keys_are_unauthenticated(app: FleetcmdApp, header: str) -> None:
    key = admin_key(app.settings.data_dir)
    prefix, key_id, secret = key.split("_", 2)
    header = {
        "WRONG-SECRET": f"Bearer {prefix}_{key_id}_{'A' * len(secret)}",
        "TRUNCATED": f"Bearer {key[:-1]}",
        "BASIC": f"Basic {key}",
        "BARE": key,
    }.get(header, header)
    async with channel(target(app), None) as ch:
        for path in ("/fleetcmd.v1.ThingService/ListThings", "/fleetcmd.v1.CommandService/Stream"):
            code = await status_of(ch, path, metadata=(("authorization", header),))
            assert code == grpc.StatusCode.UNAUTHENTICATED, f"{path}: {code.name}"
        # The same channel with the right key is let in.
        code = await status_of(ch, "/fleetcmd.v1.ThingService/ListThings", metadata=(("authorization", f"Bearer {key}"),))
        assert code == grpc.StatusCode.OK


async def test_health_and_reflection_need_no_key(app: FleetcmdApp) -> None:
    async with channel(target(app), None) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        resp = await health.Check(health_pb2.HealthCheckRequest(service="fleetcmd.v1.ThingService"), timeout=DEADLINE)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=DEADLINE)
        names: set[str] = set()
        async for resp in call:
            names = {s.name for s in resp.list_services_response.service}
            break
        call.cancel()
        assert {"fleetcmd.v1.CommandService", "fleetcmd.v1.ThingService", "fleetcmd.v1.ThingTypeService"} <= names


# ---- roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.VIEWER, Role.OPERATOR, Role.ADMIN], ids=lambda r: r.name.lower())
async def test_role_matrix(app: FleetcmdApp, role: Role) -> None:
    # Empty requests: each method is either let in (and then fails validation, finds nothing or
    # streams nothing) or refused by the role check.
    async with channel(target(app), await key_for(app, role)) as ch:
        for path in sorted(METHODS):
            code = await status_of(ch, path)
            if path in ALLOWED[role]:
                assert code not in DENIED, f"{role.name} {path}: {code.name}"
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, f"{role.name} {path}: {code.name}"


async def test_viewer_reads_and_streams_only(app: FleetcmdApp, admin: Client) -> None:
    await admin.types.PutThingType(rpb.PutThingTypeRequest(thing_type=rpb.ThingType(name="lamp")), timeout=DEADLINE)
    await admin.things.CreateThing(rpb.CreateThingRequest(thing_id="t1", thing_type="lamp"), timeout=DEADLINE)
    queued = await admin.commands.Send(pb.SendRequest(thing_id="t1", action="on", ttl_seconds=60), timeout=DEADLINE)

    async with channel(target(app), await key_for(app, Role.VIEWER)) as ch:
        viewer = Client(ch)
        got = await viewer.commands.Get(pb.GetRequest(execution_id=queued.execution_id), timeout=DEADLINE)
        assert got.status == pb.QUEUED
        listed = await viewer.commands.List(pb.ListRequest(), timeout=DEADLINE)
        assert [e.execution_id for e in listed.executions] == [queued.execution_id]
        stream = viewer.commands.Stream(pb.StreamRequest(after_sequence=0), timeout=DEADLINE)
        first = await asyncio.wait_for(stream.read(), DEADLINE)
        stream.cancel()
        assert first.execution_id == queued.execution_id and first.status == pb.QUEUED
        assert (await viewer.things.GetThing(rpb.GetThingRequest(thing_id="t1"), timeout=DEADLINE)).thing_type == "lamp"
        things = await viewer.things.ListThings(rpb.ListThingsRequest(), timeout=DEADLINE)
        assert [t.thing_id for t in things.things] == ["t1"]
        assert (await viewer.types.GetThingType(rpb.GetThingTypeRequest(name="lamp"), timeout=DEADLINE)).version == 1
        types = await viewer.types.ListThingTypes(rpb.ListThingTypesRequest(), timeout=DEADLINE)
        assert [t.name for t in types.thing_types] == ["lamp"]

        err = await rpc_error(
            viewer.commands.Send(pb.SendRequest(thing_id="t1", action="on"), timeout=DEADLINE), grpc.StatusCode.PERMISSION_DENIED
        )
        assert "operator" in err.details()
        await rpc_error(
            viewer.commands.Cancel(pb.CancelRequest(execution_id=queued.execution_id), timeout=DEADLINE),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        err = await rpc_error(
            viewer.things.CreateThing(rpb.CreateThingRequest(thing_id="t2"), timeout=DEADLINE), grpc.StatusCode.PERMISSION_DENIED
        )
        assert "admin" in err.details()

    # Nothing the viewer was refused happened.
    listed = await admin.commands.List(pb.ListRequest(), timeout=DEADLINE)
    assert [(e.execution_id, e.status) for e in listed.executions] == [(queued.execution_id, pb.QUEUED)]
    await rpc_error(admin.things.GetThing(rpb.GetThingRequest(thing_id="t2"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)


async def test_operator_sends_and_cancels_but_does_not_change_the_registry(app: FleetcmdApp, admin: Client) -> None:
    await admin.things.CreateThing(rpb.CreateThingRequest(thing_id="t1"), timeout=DEADLINE)
    async with channel(target(app), await key_for(app, Role.OPERATOR)) as ch:
        operator = Client(ch)
        sent = await operator.commands.Send(pb.SendRequest(thing_id="t1", action="on", ttl_seconds=60), timeout=DEADLINE)
        assert sent.status == pb.QUEUED
        canceled = await operator.commands.Cancel(pb.CancelRequest(execution_id=sent.execution_id), timeout=DEADLINE)
        assert canceled.status == pb.CANCELED
        assert (await operator.things.GetThing(rpb.GetThingRequest(thing_id="t1"), timeout=DEADLINE)).thing_id == "t1"

        denied = grpc.StatusCode.PERMISSION_DENIED
        await rpc_error(operator.things.CreateThing(rpb.CreateThingRequest(thing_id="t2"), timeout=DEADLINE), denied)
        await rpc_error(
            operator.types.PutThingType(rpb.PutThingTypeRequest(thing_type=rpb.ThingType(name="lamp")), timeout=DEADLINE), denied
        )
        await rpc_error(operator.things.DeleteThing(rpb.DeleteThingRequest(thing_id="t1"), timeout=DEADLINE), denied)
        update = rpb.UpdateThingRequest(thing=rpb.Thing(thing_id="t1", attributes={"a": "b"}))
        await rpc_error(operator.things.UpdateThing(update, timeout=DEADLINE), denied)
        await rpc_error(operator.things.RotateCredentials(rpb.RotateCredentialsRequest(thing_id="t1"), timeout=DEADLINE), denied)

    t1 = await admin.things.GetThing(rpb.GetThingRequest(thing_id="t1"), timeout=DEADLINE)
    assert dict(t1.attributes) == {} and t1.credentials_rotated_at == t1.created_at
    await rpc_error(admin.things.GetThing(rpb.GetThingRequest(thing_id="t2"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)
    await rpc_error(admin.types.GetThingType(rpb.GetThingTypeRequest(name="lamp"), timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)


async def test_any_admin_key_can_do_everything(app: FleetcmdApp) -> None:
    async with channel(target(app), await key_for(app, Role.ADMIN)) as ch:
        a = Client(ch)
        t = DEADLINE
        await a.types.PutThingType(rpb.PutThingTypeRequest(thing_type=rpb.ThingType(name="lamp")), timeout=t)
        await a.things.CreateThing(rpb.CreateThingRequest(thing_id="t1", thing_type="lamp"), timeout=t)
        await a.things.UpdateThing(rpb.UpdateThingRequest(thing=rpb.Thing(thing_id="t1", attributes={"a": "b"})), timeout=t)
        await a.things.RotateCredentials(rpb.RotateCredentialsRequest(thing_id="t1"), timeout=t)
        sent = await a.commands.Send(pb.SendRequest(thing_id="t1", action="on", ttl_seconds=60), timeout=t)
        assert (await a.commands.Cancel(pb.CancelRequest(execution_id=sent.execution_id), timeout=t)).status == pb.CANCELED
        assert (await a.commands.Get(pb.GetRequest(execution_id=sent.execution_id), timeout=t)).status == pb.CANCELED
        await a.things.DeleteThing(rpb.DeleteThingRequest(thing_id="t1"), timeout=t)
        await a.types.DeleteThingType(rpb.DeleteThingTypeRequest(name="lamp"), timeout=t)
        assert list((await a.things.ListThings(rpb.ListThingsRequest(), timeout=t)).things) == []
        assert list((await a.types.ListThingTypes(rpb.ListThingTypesRequest(), timeout=t)).thing_types) == []


# ---- revocation -------------------------------------------------------------------------------


async def test_key_revoked_with_the_cli_stops_working(app: FleetcmdApp) -> None:
    data = str(app.settings.data_dir)
    created = json.loads(ok(await cli("apikey", "create", "--name", "ops", "--role", "operator", "--json", "--data-dir", data)))
    assert created["role"] == "operator" and created["key"].startswith(f"fck_{created['key_id']}_")
    key = created["key"]

    async with channel(target(app), key) as ch:
        # Warm the server's lookup cache first: revocation must get through it.
        for path in ("/fleetcmd.v1.ThingService/ListThings", "/fleetcmd.v1.CommandService/List"):
            assert await status_of(ch, path) == grpc.StatusCode.OK

        assert ok(await cli("apikey", "revoke", created["key_id"], "--data-dir", data)).strip() == f"revoked {created['key_id']}"
        revoked_at = time.monotonic()
        while (code := await status_of(ch, "/fleetcmd.v1.ThingService/ListThings")) != grpc.StatusCode.UNAUTHENTICATED:
            assert code == grpc.StatusCode.OK, code.name
            assert time.monotonic() - revoked_at < 2.5, "the revoked key still works after 2.5 s"
            await asyncio.sleep(0.05)
        for path in METHODS:
            assert await status_of(ch, path) == grpc.StatusCode.UNAUTHENTICATED, path

    listing = ok(await cli("apikey", "list", "--data-dir", data))
    line = next(line for line in listing.splitlines() if line.startswith(created["key_id"]))
    assert "revoked" in line and "ops" in line
    # Revoking an unknown key is an error; revoking twice is not.
    unknown = await cli("apikey", "revoke", "0123456789ab", "--data-dir", data)
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    ok(await cli("apikey", "revoke", created["key_id"], "--data-dir", data))
    # The admin key was not touched.
    async with channel(target(app), admin_key(app.settings.data_dir)) as ch:
        assert await status_of(ch, "/fleetcmd.v1.ThingService/ListThings") == grpc.StatusCode.OK


# ---- the first admin key ----------------------------------------------------------------------


async def test_first_start_writes_an_admin_key_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path / "data", allow_anonymous=False)
    path = settings.data_dir / ADMIN_KEY_FILE
    with caplog.at_level(logging.INFO):
        async with FleetcmdApp(settings) as app:
            assert path.exists()
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            logged = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
            assert logged, "the admin key file's path was not logged"
            assert all(admin_key(settings.data_dir) not in m for m in caplog.messages), "the key itself was logged"
            key = admin_key(settings.data_dir)
            assert key.startswith("fck_")
            assert app.keys is not None
            keys = await app.keys.list()
            assert [(k.role, k.revoked_at_ms) for k in keys] == [("admin", None)]
            async with channel(target(app), key) as ch:
                req = rpb.PutThingTypeRequest(thing_type=rpb.ThingType(name="lamp"))
                await rpb_grpc.ThingTypeServiceStub(ch).PutThingType(req, timeout=DEADLINE)
    first = path.stat()
    assert not list(settings.data_dir.glob("*.tmp"))

    caplog.clear()
    with caplog.at_level(logging.INFO):
        async with FleetcmdApp(settings) as app:
            assert not [m for m in caplog.messages if ADMIN_KEY_FILE in m], caplog.messages
            assert app.keys is not None
            assert len(await app.keys.list()) == 1
            async with channel(target(app), key) as ch:
                assert await status_of(ch, "/fleetcmd.v1.ThingTypeService/GetThingType") == grpc.StatusCode.NOT_FOUND
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns, again.st_size) == (first.st_ino, first.st_mtime_ns, first.st_size)
    assert admin_key(settings.data_dir) == key


# ---- ``fleetcmd apikey`` and how the CLI finds its key -----------------------------------------


async def test_cli_apikey_create_and_list(app: FleetcmdApp) -> None:
    data = str(app.settings.data_dir)
    out = ok(await cli("apikey", "create", "--name", "dashboard", "--role", "viewer", "--data-dir", data))
    key = out.strip()
    assert key.startswith("fck_") and len(out.splitlines()) == 1
    key_id = key.split("_")[1]

    async with channel(target(app), key) as ch:
        assert await status_of(ch, "/fleetcmd.v1.ThingService/ListThings") == grpc.StatusCode.OK
        assert await status_of(ch, "/fleetcmd.v1.CommandService/List") == grpc.StatusCode.OK
        req = rpb.CreateThingRequest(thing_id="t1")
        assert await status_of(ch, "/fleetcmd.v1.ThingService/CreateThing", req) == grpc.StatusCode.PERMISSION_DENIED

    listing = ok(await cli("apikey", "list", "--data-dir", data))
    rows = listing.splitlines()[1:]  # after the header row
    assert len(rows) == 2, listing  # the first admin key and this one
    row = next(r for r in rows if r.startswith(key_id))
    assert "viewer" in row and "active" in row and "dashboard" in row
    assert key.split("_", 2)[2] not in listing  # secrets are never shown again
    assert any("admin" in r for r in rows if not r.startswith(key_id))

    bad = await cli("apikey", "create", "--name", "x", "--role", "superuser", "--data-dir", data)
    assert bad.returncode == 2 and "superuser" in bad.stderr
    assert (await cli("apikey", "create", "--role", "viewer", "--data-dir", data)).returncode == 2  # --name is required
    assert len(ok(await cli("apikey", "list", "--data-dir", data)).splitlines()) == 3  # header + 2: nothing was created


async def test_cli_finds_its_key(app: FleetcmdApp, tmp_path: Path) -> None:
    data = str(app.settings.data_dir)
    viewer = await key_for(app, Role.VIEWER)
    nowhere = tmp_path / "empty"
    nowhere.mkdir()

    # The admin key file in --data-dir.
    created = json.loads(ok(await cli("things", "create", "t1", "--json", "--data-dir", data, app=app)))
    assert created["thing"]["thing_id"] == "t1"
    # $FLEETCMD_API_KEY wins over the file.
    listed = json.loads(ok(await cli("things", "list", "--json", "--data-dir", data, api_key=viewer, app=app)))
    assert [t["thing_id"] for t in listed["things"]] == ["t1"]
    denied = await cli("things", "create", "t2", "--data-dir", data, api_key=viewer, app=app)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    # --api-key wins over both.
    flag = await cli("things", "create", "t3", "--api-key", viewer, "--data-dir", data, app=app)
    assert flag.returncode == 1 and "PERMISSION_DENIED" in flag.stderr

    wrong = await cli("things", "list", "--api-key", "fck_0123456789ab_wrong", app=app)
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    missing = await cli("things", "list", "--data-dir", str(nowhere), app=app)
    assert missing.returncode == 2 and "API key" in missing.stderr


async def test_keys_are_stored_hashed(app: FleetcmdApp) -> None:
    assert app.store is not None and app.keys is not None
    key = admin_key(app.settings.data_dir)
    secret = key.split("_", 2)[2]
    db = app.settings.data_dir / "fleetcmd.db"
    for file in [db, *db.parent.glob("fleetcmd.db-*")]:
        assert secret.encode() not in file.read_bytes(), file
    [record] = await app.keys.list()
    assert secret not in record.secret_hash
