"""Operability: /healthz and /readyz, histograms and process metrics, JSON logs, retention."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from server.app import FleetcmdApp
from server.config import Settings, SettingsError
from server.core.lifecycle import Status
from server.core.metrics import MAX_ACTION_LABELS, OTHER_ACTION, ServiceMetrics
from server.core.models import EventFilter
from server.core.validation import SendCommand
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import admin_key, app_channel
from tests.conftest import make_settings
from tests.devices import EmqxDevice, wait_for
from tests.proc import Service, parse_ready

TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture
async def session(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None and app.ports.http
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as s:
        yield s


async def get_json(session: aiohttp.ClientSession, path: str) -> tuple[int, dict[str, object]]:
    async with session.get(path) as resp:
        return resp.status, await resp.json()


def answer(device: EmqxDevice, execution_id: str, request: dict[str, object]) -> None:
    device.respond(execution_id, "SUCCEEDED", {"ok": True})


# ---- /healthz and /readyz ----------------------------------------------------------------------


async def test_healthz_and_readyz_answer_without_a_key(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    assert await get_json(session, "/healthz") == (200, {"status": "ok"})
    assert app.store is not None
    commits = app.store.commits
    assert await get_json(session, "/readyz") == (200, {"status": "ok"})
    assert app.store.commits == commits + 1  # "writable" was proven by a commit


async def test_concurrent_readiness_probes_share_one_store_write(app: FleetcmdApp) -> None:
    assert app.store is not None
    commits = app.store.commits
    assert await asyncio.gather(*(app.readiness() for _ in range(5))) == [{}] * 5
    assert app.store.commits == commits + 1
    assert await app.readiness() == {}  # a later probe writes again
    assert app.store.commits == commits + 2


async def test_readyz_names_a_store_that_cannot_commit(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    assert app.store is not None
    app.store.stop_writer()
    status, body = await get_json(session, "/readyz")
    assert status == 503 and body["status"] == "unavailable"
    assert isinstance(body["failing"], dict) and set(body["failing"]) == {"store"}
    assert "not writable" in body["failing"]["store"]
    assert await get_json(session, "/healthz") == (200, {"status": "ok"})  # alive all the same


async def test_readyz_names_a_stopped_broker(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    assert app.broker is not None
    for server in app.broker._servers.values():
        server.instance.close()
    status, body = await get_json(session, "/readyz")
    assert status == 503 and body["failing"] == {"broker": "a listener stopped serving"}


async def test_readyz_names_grpc_when_it_stops_serving(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    assert app.grpc is not None
    await app.grpc.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    status, body = await get_json(session, "/readyz")
    assert status == 503 and body["failing"] == {"grpc": "health status NOT_SERVING"}


# ---- metrics -------------------------------------------------------------------------------------


async def until_status(app: FleetcmdApp, execution_id: str, status: Status) -> None:
    """Return once ``execution_id`` has reached ``status`` (replayed from the log, then live)."""
    assert app.core is not None
    async for batch in app.core.stream(EventFilter(execution_id=execution_id), 0):
        if any(e.status is status for e in batch.events):
            return


def families(text: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """Family name -> (sample name, sorted labels) -> value, parsed by prometheus_client."""
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def histogram(fams: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]], name: str, **labels: str) -> list[float]:
    """The cumulative bucket counts of one series (ascending ``le``), checked against its ``_count``."""
    series = fams[name]
    want = set(labels.items())
    buckets = sorted(
        ((float(dict(lbl)["le"]), v) for (n, lbl), v in series.items() if n == name + "_bucket" and want <= set(lbl)),
    )
    assert buckets and buckets[-1][0] == math.inf, f"{name}{labels} has no buckets"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    count = [v for (n, lbl), v in series.items() if n == name + "_count" and want <= set(lbl)]
    assert count == [counts[-1]]
    return counts


async def test_histograms_and_process_metrics_after_real_traffic(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    assert app.ports is not None and app.ports.mqtt and app.core is not None
    key = admin_key(app.settings.data_dir)
    auth = {"Authorization": f"Bearer {key}"}
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "t-hist", on_request=answer):
        async with app_channel(app) as channel:
            stub = pb_grpc.CommandServiceStub(channel)
            for _ in range(3):
                reply = await stub.Send(pb.SendRequest(thing_id="t-hist", action="reboot", wait_seconds=10))
                assert reply.status == pb.SUCCEEDED
            async with EmqxDevice("127.0.0.1", app.ports.mqtt, "t-silent"):  # PUBACKs, never answers
                silent = await stub.Send(pb.SendRequest(thing_id="t-silent", action="reboot", wait_seconds=0))
                await asyncio.wait_for(until_status(app, silent.execution_id, Status.DELIVERED), 10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Get(pb.GetRequest(execution_id="0" * 32))
            assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        async with session.get("/api/v1/commands", headers=auth) as resp:
            assert resp.status == 200
        async with session.get("/api/v1/commands/" + "0" * 32, headers=auth) as resp:
            assert resp.status == 404
        async with session.get("/metrics", headers=auth) as resp:
            assert resp.status == 200
            fams = families(await resp.text())
    final = histogram(fams, "fleetcmd_execution_latency_seconds", action="reboot", status="SUCCEEDED")
    assert final[-1] == 3
    assert histogram(fams, "fleetcmd_execution_delivery_seconds", stage="sent")[-1] == 4
    # t-silent's was DELIVERED; an answered one usually goes SENT -> SUCCEEDED (its answer beats its PUBACK).
    assert 1 <= histogram(fams, "fleetcmd_execution_delivery_seconds", stage="delivered")[-1] <= 4
    commits = histogram(fams, "fleetcmd_store_commit_seconds")[-1]
    assert commits >= 3 and histogram(fams, "fleetcmd_store_commit_batch_size")[-1] == commits
    assert histogram(fams, "fleetcmd_grpc_request_seconds", method="/fleetcmd.v1.CommandService/Send", code="OK")[-1] == 4
    assert histogram(fams, "fleetcmd_grpc_request_seconds", method="/fleetcmd.v1.CommandService/Get", code="NOT_FOUND")[-1] == 1
    assert histogram(fams, "fleetcmd_http_request_seconds", method="GET", route="/api/v1/commands", code="200")[-1] == 1
    # The route pattern, not the path: ids never become label values.
    routes = {dict(lbl)["route"] for (_, lbl) in fams["fleetcmd_http_request_seconds"]}
    assert not any("0" * 32 in r for r in routes)
    assert any(dict(lbl)["code"] == "404" for (_, lbl) in fams["fleetcmd_http_request_seconds"])
    # Today's counters and gauges keep their names; process metrics are there.
    assert fams["fleetcmd_core_sent"][("fleetcmd_core_sent_total", ())] == 4
    assert fams["fleetcmd_mqtt_clients_connected"][("fleetcmd_mqtt_clients_connected", ())] == 1
    assert fams["process_resident_memory_bytes"][("process_resident_memory_bytes", ())] > 0
    assert fams["process_open_fds"][("process_open_fds", ())] > 0
    assert ("process_cpu_seconds_total", ()) in fams["process_cpu_seconds"]


def test_the_action_label_is_bounded() -> None:
    m = ServiceMetrics()
    names = [f"a{i}" for i in range(MAX_ACTION_LABELS + 1)]
    for name in names:
        m.observe_final(name, "SUCCEEDED", 0.01)
    labels = {
        s.labels["action"] for f in m.registry.collect() if f.name == "fleetcmd_execution_latency_seconds" for s in f.samples
    }
    # The bound-th distinct action still has its own series; the one after it is "other".
    assert names[MAX_ACTION_LABELS - 1] in labels and names[MAX_ACTION_LABELS] not in labels
    assert labels == {*names[:MAX_ACTION_LABELS], OTHER_ACTION}
    assert m.action_label(names[0]) == names[0]  # seen ones keep theirs
    for i in range(1000):  # a flood of new actions: the cache of histogram children stays bounded too
        m.observe_final(f"flood{i}", "SUCCEEDED", 0.01)
    assert len(m._final) == MAX_ACTION_LABELS + 1


# ---- JSON logs ---------------------------------------------------------------------------------


class JsonService(Service):
    """The real service with FLEETCMD_LOG_FORMAT=json: the ready line is the ``message`` of a JSON line."""

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.ready is None:
                try:
                    message = json.loads(line).get("message", "")
                except ValueError:
                    continue  # not JSON: the test fails on it below
                ready = parse_ready(message)
                if ready is not None:
                    self.ready = ready
                    self._ready_event.set()
        self._ready_event.set()


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt

    service = JsonService(tmp_path / "data", env={"FLEETCMD_LOG_FORMAT": "json"})
    with service:
        ready = service.ready
        assert ready is not None
        unknown = "f" * 32
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-json")
        client.connect("127.0.0.1", ready.mqtt_port)
        client.loop_start()
        try:
            info = client.publish(
                f"$emqx/commands/things/t-json/executions/{unknown}/response", json.dumps({"status": "SUCCEEDED"}), qos=1
            )
            info.wait_for_publish(10)
        finally:
            client.loop_stop()
            client.disconnect()
        service.stop()
    lines = [json.loads(line) for line in service.lines if line.strip()]  # every line parses
    assert lines and all({"timestamp", "level", "logger", "message"} <= set(entry) for entry in lines)
    assert any(entry["message"].startswith("fleetcmd ready ") for entry in lines)
    dropped = [entry for entry in lines if "unknown execution" in entry["message"]]
    assert dropped and dropped[0]["execution_id"] == unknown and dropped[0]["thing"] == "t-json"
    assert dropped[0]["level"] == "WARNING" and dropped[0]["logger"] == "server.core.commands"


def test_log_format_and_retention_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="log_format"):
        make_settings(tmp_path, log_format="xml")
    assert make_settings(tmp_path, retention_days=36500).retention_days == 36500
    with pytest.raises(SettingsError, match="retention_days"):
        make_settings(tmp_path, retention_days=36500.001)
    with pytest.raises(SettingsError, match="retention_days"):
        make_settings(tmp_path, retention_days=-0.001)
    assert Settings.from_env({"FLEETCMD_RETENTION_DAYS": "0.5"}).retention_days == 0.5


# ---- retention ---------------------------------------------------------------------------------


async def test_retention_deletes_finished_executions_and_a_resume_below_it_is_refused(tmp_path: Path) -> None:
    # 0.2 s of retention: finished executions go at the next sweep (every 50 ms).
    settings = make_settings(tmp_path / "data", retention_days=0.2 / 86400)
    async with FleetcmdApp(settings) as app:
        assert app.ports is not None and app.ports.mqtt and app.core is not None and app.store is not None
        core, store = app.core, app.store
        async with EmqxDevice("127.0.0.1", app.ports.mqtt, "t-ret", on_request=answer):
            done = await core.send(SendCommand("t-ret", "reboot", None, 30, ""))
            final = await core.wait(done, 10)
            assert final.status is Status.SUCCEEDED
        pending = await core.send(SendCommand("t-offline", "reboot", None, 30, ""))  # nobody answers: stays QUEUED
        await wait_for(lambda: store.purged_through() > 0, what="retention sweep")
        assert await store.get(done.execution_id) is None
        kept = await store.get(pending.execution_id, with_history=True)
        assert kept is not None and kept.status is Status.QUEUED
        purged = store.purged_through()
        async with app_channel(app) as channel:
            stub = pb_grpc.CommandServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                async for _ in stub.Stream(pb.StreamRequest(after_sequence=purged - 1), timeout=5):
                    pass
            assert gone.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert f"after_sequence >= {purged}" in (gone.value.details() or "")
            # At the watermark the replay has no gap: it gets the pending execution's events.
            stream = stub.Stream(pb.StreamRequest(after_sequence=purged), timeout=5)
            first = await asyncio.wait_for(stream.read(), 5)
            stream.cancel()
            assert first.execution_id == pending.execution_id


async def test_readyz_reaches_grpc_where_it_is_bound(tmp_path: Path) -> None:
    # Bound to another address than 127.0.0.1 (here another loopback one), the gRPC probe must dial that address.
    settings = dataclasses.replace(make_settings(tmp_path / "data"), bind="127.0.0.2")
    async with (
        FleetcmdApp(settings) as running,
        aiohttp.ClientSession(f"http://127.0.0.2:{running.ports.http}") as http,
        http.get("/readyz") as response,
    ):
        assert (response.status, await response.json()) == (200, {"status": "ok"})
