"""Three real ``fleetcmd serve`` replicas sharing one PostgreSQL and one mosquitto, real paho devices.

The cluster (tests/pgserver.py's throwaway PostgreSQL, tests/mosquitto.py, three processes of
tests/proc.py) is started once for the module; the SIGKILL test runs last. Every replica runs with
``FLEETCMD_OUTBOX_LEASE_SECONDS=2`` so that a killed replica's requests are taken over within the
test's time. Devices answer on ``$emqx/...`` topics, which Debian's mosquitto does not share: every
replica receives every report, and the store keeps the first final status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from server.app import FleetcmdApp
from server.config import MAX_OUTBOX_LEASE, MIN_BROKER_AUTH_SECRET, Settings, SettingsError
from server.core import replica
from server.core.lifecycle import Status
from server.core.validation import SendCommand
from server.external_broker import events
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc
from tests import clients, pgserver
from tests.conftest import make_settings
from tests.devices import wait_for
from tests.mosquitto import Mosquitto, free_port, mosquitto
from tests.proc import Service
from tests.test_external_broker import EmqxFirmware

pytestmark = pytest.mark.timeout(90)

REPLICAS = 3
LEASE_SECONDS = 2
WAIT = 15.0
FINAL = {pb.SUCCEEDED, pb.FAILED, pb.TIMED_OUT, pb.CANCELED, pb.REJECTED}


@dataclass
class Cluster:
    """The module's replicas, their broker and the admin key they share (one database)."""

    services: list[Service]
    broker: Mosquitto
    key: str

    def channel(self, i: int) -> grpc.aio.Channel:
        ready = self.services[i].ready
        assert ready is not None
        return clients.channel(ready.grpc_target, self.key)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    url = pgserver.fresh_database_url()
    root = tmp_path_factory.mktemp("replicas")
    with mosquitto(root / "mosquitto") as broker:
        services = [
            Service(
                root / f"replica{i}",
                flags=("--grpc-port", "0"),
                env={
                    "FLEETCMD_DATABASE_URL": url,
                    "FLEETCMD_BROKER_URL": broker.url,
                    "FLEETCMD_BROKER_CLIENT_ID": f"fleetcmd-replica{i}",
                    "FLEETCMD_OUTBOX_LEASE_SECONDS": str(LEASE_SECONDS),
                },
                anonymous=False,  # Sends need registered things: the registry must be shared
            )
            for i in range(REPLICAS)
        ]
        try:
            services[0].start()  # the first one creates the admin key the others find in the database
            with ThreadPoolExecutor(REPLICAS) as pool:
                list(pool.map(lambda s: s.start(), services[1:]))
            yield Cluster(services, broker, services[0].api_key)
        finally:
            for i, service in enumerate(services):
                service.close()
                (root / f"replica{i}.log").write_text(service.stderr)


async def create_thing(cluster: Cluster, i: int, thing_id: str, thing_type: str = "") -> None:
    async with cluster.channel(i) as channel:
        await rpb_grpc.ThingServiceStub(channel).CreateThing(rpb.CreateThingRequest(thing_id=thing_id, thing_type=thing_type))


async def send(cluster: Cluster, i: int, thing_id: str, action: str = "reboot", ttl: int = 30, wait: int = 0) -> pb.Execution:
    async with cluster.channel(i) as channel:
        request = pb.SendRequest(thing_id=thing_id, action=action, ttl_seconds=ttl, wait_seconds=wait)
        reply: pb.Execution = await pb_grpc.CommandServiceStub(channel).Send(request, timeout=wait + 10)
        return reply


async def get(cluster: Cluster, i: int, execution_id: str) -> pb.Execution:
    async with cluster.channel(i) as channel:
        reply: pb.Execution = await pb_grpc.CommandServiceStub(channel).Get(pb.GetRequest(execution_id=execution_id))
        return reply


def finals(execution: pb.Execution) -> list[int]:
    return [h.status for h in execution.history if h.status in FINAL and not h.late]


async def metric(cluster: Cluster, i: int, name: str) -> float:
    ready = cluster.services[i].ready
    assert ready is not None and ready.http_port > 0
    url = f"http://127.0.0.1:{ready.http_port}/metrics"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {cluster.key}"})
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).read().decode())
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"fleetcmd_{name} ")]
    assert values, f"no metric {name}"
    return values[0]


# ---- the registry -------------------------------------------------------------------------------


async def test_a_thing_created_on_one_replica_is_usable_through_another_and_its_deletion_reaches_it(cluster: Cluster) -> None:
    async with cluster.channel(0) as channel:
        valve = rpb.ThingType(name="valve", commands={"open": rpb.CommandDefinition()}, allow_undefined_actions=False)
        await rpb_grpc.ThingTypeServiceStub(channel).PutThingType(rpb.PutThingTypeRequest(thing_type=valve))
    await create_thing(cluster, 0, "valve-1", "valve")
    device = await asyncio.to_thread(EmqxFirmware(cluster.broker.port, "valve-1").begin)
    try:
        # At once on replica 1: a Send naming a thing it does not know reads the registry back.
        done = await send(cluster, 1, "valve-1", "open", wait=int(WAIT))
        assert done.status == pb.SUCCEEDED, done
        # Replica 2 knows its type too: an action the type does not define is refused there.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(cluster, 2, "valve-1", "close")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await asyncio.to_thread(device.stop)
    async with cluster.channel(0) as channel:
        await rpb_grpc.ThingServiceStub(channel).DeleteThing(rpb.DeleteThingRequest(thing_id="valve-1"))
    # Deleted on replica 0: refused on replica 2 once its registry refresh ran (told by the NOTIFY of the delete).
    deadline = time.monotonic() + 6
    while True:
        try:
            await send(cluster, 2, "valve-1", "open", ttl=1)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() < deadline, "replica 2 still sends to a thing deleted on replica 0"
        await asyncio.sleep(0.2)


# ---- commands -----------------------------------------------------------------------------------


async def test_commands_sent_through_any_replica_reach_their_devices_and_end_right(cluster: Cluster) -> None:
    things = [f"pump-{i}" for i in range(3)]
    for i, thing in enumerate(things):
        await create_thing(cluster, i, thing)
    devices = [await asyncio.to_thread(EmqxFirmware(cluster.broker.port, t).begin) for t in things]
    devices[2].status = "FAILED"
    try:
        replies = await asyncio.gather(
            *(send(cluster, r, thing, wait=int(WAIT)) for r in range(REPLICAS) for thing in things for _ in range(3))
        )
        assert len(replies) == 27
        for reply in replies:
            expected = pb.FAILED if reply.thing_id == "pump-2" else pb.SUCCEEDED
            assert reply.status == expected, reply
            # Every replica received and committed the device's report: one final status all the same.
            history = (await get(cluster, 0, reply.execution_id)).history
            assert [h.status for h in history if not h.late] == [pb.SENT, expected]
    finally:
        for device in devices:
            await asyncio.to_thread(device.stop)


async def test_a_ttl_expires_exactly_once_also_when_its_replica_is_paused(cluster: Cluster) -> None:
    await create_thing(cluster, 0, "offline-1")
    executions = [await send(cluster, r, "offline-1", ttl=1) for r in range(REPLICAS) for _ in range(4)]
    # Replica 0 stops (SIGSTOP) before its executions are due: the others' sweeps time them out.
    cluster.services[0].send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 8
        for execution in executions:
            while True:
                current = await get(cluster, 1 + executions.index(execution) % 2, execution.execution_id)
                if current.status == pb.TIMED_OUT:
                    break
                assert time.monotonic() < deadline, f"{execution.execution_id} not timed out: {current.status}"
                await asyncio.sleep(0.1)
    finally:
        cluster.services[0].send_signal(signal.SIGCONT)
    # Replica 0 wakes up with its own timers due: they find the executions final and record nothing.
    await asyncio.sleep(0.5)  # nothing to await: this gives those timers their time to (not) record
    for execution in executions:
        current = await get(cluster, 0, execution.execution_id)
        assert finals(current) == [pb.TIMED_OUT], current.history
    swept = [await metric(cluster, i, "replica_timed_out_total") for i in range(REPLICAS)]
    assert sum(swept[1:]) >= 4  # replica 0's four at least were swept by the others


async def test_a_crashed_replicas_unpublished_request_is_taken_over_after_its_lease(cluster: Cluster, tmp_path: Path) -> None:
    # A fourth replica whose broker is unreachable accepts a Send it cannot publish (QUEUED, leased
    # to it), and dies: once its lease ends another replica claims the request and publishes it.
    stray = Service(
        tmp_path / "stray",
        flags=("--grpc-port", "0"),
        env={
            **cluster.services[0].env,
            "FLEETCMD_BROKER_URL": f"mqtt://127.0.0.1:{free_port()}",
            "FLEETCMD_BROKER_CLIENT_ID": "fleetcmd-stray",
            "FLEETCMD_MQTT_CONNECT_TIMEOUT": "0.5",
        },
        anonymous=False,
    )
    await create_thing(cluster, 0, "heater-1")
    device = await asyncio.to_thread(EmqxFirmware(cluster.broker.port, "heater-1").begin)
    try:
        with stray:
            ready = stray.ready
            assert ready is not None
            async with clients.channel(ready.grpc_target, cluster.key) as channel:
                request = pb.SendRequest(thing_id="heater-1", action="reboot", ttl_seconds=30)
                queued = await pb_grpc.CommandServiceStub(channel).Send(request, timeout=10)
            assert queued.status == pb.QUEUED
            stray.kill()
        killed = time.monotonic()
        while (current := await get(cluster, 0, queued.execution_id)).status not in FINAL:
            assert time.monotonic() - killed < LEASE_SECONDS + 8, f"not taken over: {current.status}"
            await asyncio.sleep(0.1)
        assert [h.status for h in current.history if not h.late] == [pb.QUEUED, pb.SENT, pb.SUCCEEDED]
        assert sum([await metric(cluster, i, "replica_claimed_total") for i in range(REPLICAS)]) >= 1
    finally:
        await asyncio.to_thread(device.stop)


def test_the_outbox_lease_is_1_to_a_day(tmp_path: Path) -> None:
    assert make_settings(tmp_path, outbox_lease_seconds=1).outbox_lease_seconds == 1
    assert make_settings(tmp_path, outbox_lease_seconds=MAX_OUTBOX_LEASE).outbox_lease_seconds == MAX_OUTBOX_LEASE
    for bad in (0, MAX_OUTBOX_LEASE + 1):
        with pytest.raises(SettingsError, match="outbox_lease_seconds"):
            make_settings(tmp_path, outbox_lease_seconds=bad)


# ---- a replica dies under load --------------------------------------------------------------------


async def read_stream(cluster: Cluster, i: int, after: int, into: list[pb.ExecutionEvent], quiet: float | None = None) -> None:
    """Append replica ``i``'s Stream events after ``after`` to ``into`` until it ends (or ``quiet`` s pass silently)."""
    async with cluster.channel(i) as channel:
        call = pb_grpc.CommandServiceStub(channel).Stream(pb.StreamRequest(after_sequence=after))
        iterator = call.__aiter__()
        try:
            while True:
                if quiet is None:
                    event = await iterator.__anext__()
                else:
                    try:
                        event = await asyncio.wait_for(iterator.__anext__(), quiet)
                    except TimeoutError:
                        return
                into.append(event)
        except (grpc.aio.AioRpcError, StopAsyncIteration):
            return
        finally:
            call.cancel()


async def test_sigkill_of_a_replica_under_load_loses_nothing_and_its_stream_resumes_on_another(cluster: Cluster) -> None:
    things = [f"meter-{i}" for i in range(4)]
    for thing in things:
        await create_thing(cluster, 0, thing)
    devices = [await asyncio.to_thread(EmqxFirmware(cluster.broker.port, t).begin) for t in things]
    start = 0
    # The watcher on replica 2 starts from everything committed so far (replayed, then live).
    seen: list[pb.ExecutionEvent] = []
    watcher = asyncio.create_task(read_stream(cluster, 2, start, seen))
    accepted: list[str] = []
    stop = asyncio.Event()

    async def load(replica: int) -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            try:
                reply = await send(cluster, replica, things[n % len(things)], ttl=10)
            except grpc.aio.AioRpcError:
                if replica == 2:
                    return  # killed: what it did not answer was not accepted
                raise
            accepted.append(reply.execution_id)

    try:
        loaders = [asyncio.create_task(load(r)) for r in range(REPLICAS) for _ in range(3)]
        await wait_for(lambda: len(accepted) >= 60, 20, "load")
        cluster.services[2].kill()  # SIGKILL under load
        await asyncio.wait_for(watcher, 10)  # its Stream ends with the process
        killed_at = len(accepted)
        await wait_for(lambda: len(accepted) >= killed_at + 30, 20, "load after the kill")
        stop.set()
        await asyncio.gather(*loaders)
        # Every accepted execution ends, each with one final status: SUCCEEDED (what replica 2 had not
        # published yet was taken over by lease after LEASE_SECONDS and published by another replica).
        deadline = time.monotonic() + 15
        for execution_id in accepted:
            while True:
                current = await get(cluster, 0, execution_id)
                if current.status in FINAL:
                    break
                assert time.monotonic() < deadline, f"{execution_id} still {current.status}"
                await asyncio.sleep(0.1)
            assert finals(current) == [pb.SUCCEEDED], current.history
        # The watcher resumes on replica 1 after the last sequence it saw: no gap, no duplicate.
        assert seen, "the watcher saw nothing before the kill"
        resumed = list(seen)
        await read_stream(cluster, 1, resumed[-1].sequence, resumed, quiet=1.5)
        reference: list[pb.ExecutionEvent] = []
        await read_stream(cluster, 0, start, reference, quiet=1.5)
        sequences = [e.sequence for e in resumed]
        assert sequences == list(range(1, len(sequences) + 1))  # the log from its start: no gap, no duplicate
        assert [e.sequence for e in reference][: len(sequences)] == sequences
        assert [(e.execution_id, e.status) for e in reference][: len(resumed)] == [(e.execution_id, e.status) for e in resumed]
    finally:
        stop.set()
        for device in devices:
            await asyncio.to_thread(device.stop)


# ---- docs/compose.yaml --------------------------------------------------------------------------


def test_the_compose_file_runs_three_replicas_on_postgresql_and_emqx_with_what_each_needs() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs"
    compose = yaml.safe_load((docs / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "emqx", "fleetcmd-1", "fleetcmd-2", "fleetcmd-3"} == set(services)
    replicas = [services[f"fleetcmd-{i}"] for i in (1, 2, 3)]
    envs = [r["environment"] for r in replicas]
    # One database and one broker for all, a client id each, every name a real setting.
    assert len({e["FLEETCMD_DATABASE_URL"] for e in envs}) == 1
    assert envs[0]["FLEETCMD_DATABASE_URL"].startswith("postgresql://")
    assert len({e["FLEETCMD_BROKER_URL"] for e in envs}) == 1
    assert len({e["FLEETCMD_BROKER_CLIENT_ID"] for e in envs}) == 3
    settings = {f"FLEETCMD_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for env in envs:
        assert set(env) <= settings, set(env) - settings
        assert env["FLEETCMD_BROKER_SHARED"] == "on"  # EMQX shares $ topics
        assert len(env["FLEETCMD_BROKER_AUTH_SECRET"]) >= MIN_BROKER_AUTH_SECRET
    # The database user, password and name the URL names are the ones PostgreSQL is created with.
    pg = services["postgres"]["environment"]
    assert envs[0]["FLEETCMD_DATABASE_URL"] == (
        f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    # The second and third start once the first (which writes the admin key) is healthy; published ports differ.
    assert replicas[1]["depends_on"] == replicas[2]["depends_on"] == {"fleetcmd-1": {"condition": "service_healthy"}}
    assert replicas[0]["depends_on"] == {"postgres": {"condition": "service_healthy"}, "emqx": {"condition": "service_healthy"}}
    published = [p for service in services.values() for p in service.get("ports", [])]
    assert len({p.split(":")[0] for p in published}) == len(published)
    # EMQX gets the configuration docs/deploy.md describes, and it names fleetcmd's endpoints and topics.
    mount = next(v for v in services["emqx"]["volumes"] if v.startswith("./"))
    conf = (docs / mount.split(":")[0]).read_text()
    for needed in ("shared_subscription_strategy", "/api/v1/broker/authn", "/api/v1/broker/authz", *events.TOPICS):
        assert needed in conf, needed


# ---- in process: two services on one database ----------------------------------------------------


@pytest.fixture
async def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[FleetcmdApp, FleetcmdApp]]:
    """Two services (embedded brokers) on one PostgreSQL database, registered things only.

    Their background sweeps and registry refreshes wait an hour: the tests call them.
    """
    monkeypatch.setattr(replica, "SWEEP_SECONDS", 3600)

    async def no_refresh(_self: replica.ReplicaLoops) -> None:
        await asyncio.Event().wait()  # nor on a notification: the tests read back when they mean to

    monkeypatch.setattr(replica.ReplicaLoops, "run_registry", no_refresh)
    url = pgserver.fresh_database_url()
    async with (
        FleetcmdApp(make_settings(tmp_path / "a", allow_anonymous=False, database_url=url)) as a,
        FleetcmdApp(make_settings(tmp_path / "b", allow_anonymous=False, database_url=url)) as b,
    ):
        yield a, b


async def test_a_rotation_or_deletion_on_one_replica_disconnects_the_thing_on_the_other(
    pair: tuple[FleetcmdApp, FleetcmdApp],
) -> None:
    a, b = pair
    assert a.registry is not None and b.registry is not None and b.replica is not None
    ended: list[str] = []
    b.registry.disconnect = ended.append
    _thing, password, _ = await a.registry.create_thing("lamp-1", "", {})
    await b.replica.reload_registry()
    assert b.registry.authenticate_device("lamp-1", "lamp-1", password)
    new_password, _ = await a.registry.rotate_credentials("lamp-1")
    await b.replica.reload_registry()
    assert ended == ["lamp-1"]
    assert not b.registry.authenticate_device("lamp-1", "lamp-1", password)
    assert b.registry.authenticate_device("lamp-1", "lamp-1", new_password)
    await a.registry.delete_thing("lamp-1")
    await b.replica.reload_registry()
    assert ended == ["lamp-1", "lamp-1"] and not b.registry.is_registered("lamp-1")


async def test_a_thing_deleted_here_while_the_registry_is_read_back_stays_deleted(pair: tuple[FleetcmdApp, FleetcmdApp]) -> None:
    a, b = pair
    assert a.registry is not None and b.registry is not None
    await a.registry.create_thing("gone-1", "", {})
    # Changed on b (so what a reads back differs from what a holds), then deleted on a during a's read.
    await b.registry.reload()
    await b.registry.update_thing("gone-1", thing_type=None, attributes={"room": "2"})
    store = a.registry._store
    real = store.load_things
    deleted = asyncio.Event()

    async def racing_load() -> list[Any]:
        rows = await real()  # read while the thing exists ...
        await a.registry.delete_thing("gone-1")  # ... which is deleted here meanwhile
        deleted.set()
        return rows

    store.load_things = racing_load  # type: ignore[method-assign]
    try:
        await a.registry.reload()
    finally:
        store.load_things = real  # type: ignore[method-assign]
    assert deleted.is_set() and not a.registry.is_registered("gone-1")


async def test_a_sweep_times_out_every_due_execution_page_by_page(
    pair: tuple[FleetcmdApp, FleetcmdApp], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    assert a.core is not None and a.registry is not None and b.replica is not None and b.core is not None
    await a.registry.create_thing("mute-1", "", {})
    monkeypatch.setattr(replica, "SWEEP_PAGE", 2)
    # Created on a, whose own timers are stopped: only b's sweep can time them out.
    monkeypatch.setattr(a.core.scheduler, "schedule", lambda *_args: None)
    executions = [await a.core.send(SendCommand("mute-1", "reboot", None, 1, "")) for _ in range(5)]
    await wait_for(lambda: replica.now_ms() > max(e.expires_at_ms for e in executions), 3, "the deadlines")
    assert await b.replica.sweep_once() == 5  # three pages of at most two
    for execution in executions:
        assert (await b.core.get(execution.execution_id)).status is Status.TIMED_OUT


async def test_a_registry_change_is_read_back_by_the_other_replica_on_its_notify_and_an_idle_one_is_not_read(
    tmp_path: Path,
) -> None:
    url = pgserver.fresh_database_url()
    async with (
        FleetcmdApp(make_settings(tmp_path / "a", allow_anonymous=False, database_url=url)) as a,
        FleetcmdApp(make_settings(tmp_path / "b", allow_anonymous=False, database_url=url)) as b,
    ):
        assert a.registry is not None and b.registry is not None and a.replica is not None and b.replica is not None
        assert replica.REGISTRY_SECONDS >= 30  # the timer alone would not do what follows in time
        idle = a.replica.reloads, b.replica.reloads
        _thing, password, _ = await a.registry.create_thing("told-1", "", {})
        await wait_for(lambda: b.registry is not None and b.registry.is_registered("told-1"), 5, "b knows told-1")
        assert b.registry.authenticate_device("told-1", "told-1", password)
        await b.registry.update_thing("told-1", thing_type=None, attributes={"room": "7"})
        await wait_for(
            lambda: a.registry is not None and a.registry.get_thing("told-1").attributes == {"room": "7"}, 5, "a sees the room"
        )
        await a.registry.delete_thing("told-1")
        await wait_for(lambda: b.registry is not None and not b.registry.is_registered("told-1"), 5, "b forgets told-1")
        # Each replica read back only for the other's changes, never for its own.
        assert (a.replica.reloads - idle[0], b.replica.reloads - idle[1]) == (1, 2)
        # Idle: no read-back at all.
        before = a.replica.reloads, b.replica.reloads
        await asyncio.sleep(1.5)
        assert (a.replica.reloads, b.replica.reloads) == before


async def test_registry_reads_for_unknown_things_start_at_most_every_min_interval(pair: tuple[FleetcmdApp, FleetcmdApp]) -> None:
    _a, b = pair
    assert b.replica is not None
    before = b.replica.reloads
    t0 = time.monotonic()
    await asyncio.gather(*(b.replica.reload_registry() for _ in range(20)))
    await b.replica.reload_registry()
    # Twenty callers at once share two reads (the one under way may have started before some asked);
    # the next read starts RELOAD_MIN_INTERVAL after the last one.
    assert b.replica.reloads - before <= 3
    assert time.monotonic() - t0 >= replica.RELOAD_MIN_INTERVAL
