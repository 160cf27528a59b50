"""The process lifecycle: one async context manager that starts and stops everything.

Start order: store -> control plane (restored from the store) -> broker (or, with
``broker_url``, the client of an external broker: ``server.external_broker``) -> gRPC -> HTTP.
Stop order is the reverse, through one ``AsyncExitStack``: HTTP, then gRPC stop taking
calls, the broker disconnects devices (bounded, whatever amqtt does), the
control plane applies the reports already queued, the store commits what is
queued and closes. Background loops run in one ``TaskGroup`` with named tasks;
if one of them dies, :meth:`FleetcmdApp.wait_failed` returns so the CLI can
shut the process down instead of running half-broken.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker_hooks.acl import TopicAcl
from broker_hooks.broker import FleetBroker
from broker_hooks.config import broker_config
from broker_hooks.rules import Dialect, RuleSet
from server.api import http_rest
from server.api.grpc_api import GrpcServer
from server.api.http_app import DeviceHttp, HttpServer, server_ssl_context
from server.api.http_broker_auth import PREFIX as AUTH_PREFIX
from server.api.http_broker_auth import BrokerAuth
from server.config import ENV_PREFIX, Settings
from server.core.apikeys import ApiKeys
from server.core.clock import now_ms
from server.core.commands import CommandCore
from server.core.errors import ListenError
from server.core.handover import Handover, HandoverStore
from server.core.job_runner import JobsCore
from server.core.lifecycle import Status
from server.core.metrics import Kind, Sample, ServiceMetrics, counters
from server.core.registry import Registry
from server.core.replica import ReplicaLoops, shared_store
from server.dialects import DIALECTS
from server.dialects.bundle import DialectBundle, DialectContext, DialectRuntime, install
from server.external_broker.link import ExternalBroker
from server.external_broker.url import parse_broker_url
from server.store import ServiceStore, job_store, store_from_url

log = logging.getLogger("fleetcmd")

# Retention deletes this many executions (and their events) per write transaction, then yields,
# so a sweep never holds the writer longer than one short transaction.
RETENTION_BATCH = 500
# Pause between two retention sweeps once nothing old is left (a sweep is one indexed query).
RETENTION_PAUSE = 60.0
RETENTION_MIN_PAUSE = 0.05
# A readiness probe's store write may take this long before the store counts as not writable.
READY_TIMEOUT = 2.0


@dataclass(frozen=True)
class Ports:
    """Where the service listens (actual ports, also when 0 was asked for)."""

    mqtt: int | None
    ws: int | None
    grpc: int
    mqtts: int | None = None
    wss: int | None = None
    http: int | None = None


def _dialable(bind: str) -> str:
    """The address a local client reaches a listener bound to ``bind`` at (a wildcard bind: loopback)."""
    if bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind == "::":
        return "[::1]"
    return f"[{bind}]" if ":" in bind else bind


async def _grpc_health(host: str, port: int, timeout: float) -> str:
    """Empty when the gRPC server at ``host``:``port`` answers a health Check with SERVING, else why not."""
    try:
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as exc:
        return f"health check failed: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return ""


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


class FleetcmdApp:
    """The whole service. ``async with FleetcmdApp(settings) as app:`` runs it.

    ``dialects``: the device dialects it speaks (``server.dialects.DIALECTS`` unless told otherwise).
    """

    def __init__(self, settings: Settings, dialects: Sequence[DialectBundle] = DIALECTS) -> None:
        self.settings = settings
        self.dialects = tuple(dialects)
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._failed = asyncio.Event()
        # Tasks that are cancelled at shutdown; the store writer and the ingest loop instead drain and end.
        self._cancellable: set[asyncio.Task[None]] = set()
        self.store: ServiceStore | None = None
        self.core: CommandCore | None = None
        self.jobs: JobsCore | None = None
        self.registry: Registry | None = None
        self.keys: ApiKeys | None = None
        self.broker: FleetBroker | None = None
        # External broker mode (FLEETCMD_BROKER_URL): the MQTT client in the embedded broker's place.
        self.external: ExternalBroker | None = None
        # Replica mode (a store several replicas share: PostgreSQL): TTL sweeps, outbox takeover, registry refresh.
        self.replica: ReplicaLoops | None = None
        self.handover: Handover | None = None
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        # Each dialect's runtime, by name, once attached.
        self.runtimes: dict[str, DialectRuntime] = {}
        self.ports: Ports | None = None
        self._grpc_serving = False
        self._ping: asyncio.Future[None] | None = None
        self.service_metrics = ServiceMetrics()
        self.service_metrics.add_samples(self.metrics)

    async def __aenter__(self) -> FleetcmdApp:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str, *, drains: bool = False) -> None:
        assert self._tasks is not None
        task = self._tasks.create_task(self._guard(coro, name), name=name)
        if not drains:
            self._cancellable.add(task)
            task.add_done_callback(self._cancellable.discard)

    async def _guard(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        # A TaskGroup cancels every task when one fails; log it and let the CLI stop cleanly instead.
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed", name)
            self._failed.set()

    async def wait_failed(self) -> None:
        """Return when a background loop has died."""
        await self._failed.wait()

    async def _start(self) -> None:
        s = self.settings
        stack = self._stack

        # The data directory holds admin.key whichever store database_url names.
        await asyncio.to_thread(s.data_dir.mkdir, parents=True, exist_ok=True)
        store = store_from_url(s.store_url)
        shared = shared_store(store)
        if shared is not None:
            # How long a replica's claim on an unacknowledged request lasts before another may publish it.
            shared.lease_ms = s.outbox_lease_seconds * 1000
        for bundle in self.dialects:
            bundle.check_store(store)
        await stack.enter_async_context(store)
        self.store = store
        self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
        self._spawn(store.run_writer(), "store-writer", drains=True)
        stack.callback(store.stop_writer)

        registry = Registry(store, allow_unregistered=s.allow_anonymous)
        await registry.load()
        self.registry = registry
        core = CommandCore(s, store, registry, self._spawn)
        store.set_commit_listener(core.on_commit)
        store.set_commit_observer(self.service_metrics.observe_commit)
        core.histograms = self.service_metrics
        self.core = core
        if shared is not None:
            # Every replica reaches every device only through an external broker: only then does one
            # replica publish another's requests (with the embedded broker, a device is connected here).
            replica = ReplicaLoops(shared, registry, core.outbox, takeover=bool(s.broker_url))
            core.leased_outbox = replica.takeover
            core.reload_registry = replica.reload_registry
            self.replica = replica
            self._spawn(replica.run_sweeps(), "ttl-sweeps")
            self._spawn(replica.run_registry(), "registry-refresh")
            if replica.takeover:
                self._spawn(replica.run_takeover(), "outbox-takeover")
        if s.broker_url and isinstance(store, HandoverStore):
            # The external broker's PUBACKs are recorded: nothing publishes those requests again.
            self.handover = Handover(store)
            core.outbox.handed = self.handover.add
            self._spawn(self.handover.run(), "outbox-handover")
        restored = await core.restore()
        # Jobs follow their executions from the commit hook on; restored before anything can change them.
        jobs_store = job_store(store)
        if jobs_store is not None:
            jobs = JobsCore(core, jobs_store, registry, adopt_seconds=s.job_adopt_seconds)
            core.job_hook = jobs.on_commit
            registry.thing_changed = jobs.thing_changed
            await jobs.restore()
            self.jobs = jobs
            stack.callback(jobs.close)
            self._spawn(jobs.run(), "jobs")
        else:
            log.warning("the %s store keeps no jobs: the jobs API answers UNIMPLEMENTED", type(store).__name__)
        self._spawn(core.run_ingest(), "device-ingest", drains=True)
        self._spawn(core.run_expiry(), "ttl-expiry")
        stack.push_async_callback(self._stop_core, core)
        if s.retention_days > 0:
            keep_ms = s.retention_days * 86_400_000
            # Sweep ten times per retention period, at most once a minute (short ones: tests, the bench).
            pause = min(RETENTION_PAUSE, max(RETENTION_MIN_PAUSE, keep_ms / 10_000))
            self._spawn(self.run_retention(keep_ms, pause), "retention")

        if s.allow_anonymous:
            log.warning(
                "DEVELOPMENT MODE (allow_anonymous): ANY MQTT client is admitted without credentials and "
                "Sends may target unregistered things; never run this way in production"
            )
        wires = [bundle.wire for bundle in self.dialects]
        scoped = [acl for bundle in self.dialects for acl in bundle.scoped_acls(registry)]
        acl = TopicAcl.of(wires, scoped, open_mode=s.allow_anonymous)
        if s.broker_url:
            await self._start_external(core, registry, RuleSet.of(wires))
        else:
            await self._start_embedded(core, registry, wires, acl)

        keys = ApiKeys(store)
        self.keys = keys
        admin_key_file = await keys.ensure_admin_key(s.data_dir)
        if admin_key_file is not None:
            log.warning("no API key existed: created an admin key in %s (readable only by this user)", admin_key_file)
        grpc_server = GrpcServer(core, registry, keys, call_duration=self.service_metrics.grpc_duration, jobs=self.jobs)
        grpc_tls = None
        if s.grpc_tls:
            grpc_tls = (await asyncio.to_thread(_read, s.tls_key_file), await asyncio.to_thread(_read, s.tls_cert_file))
        try:
            grpc_port = await grpc_server.start(s.bind, s.grpc_port, tls=grpc_tls)
        except RuntimeError as exc:  # grpcio says only "Failed to bind to address"
            raise _listen_error(s, ("grpc_port",), exc) from exc
        stack.push_async_callback(grpc_server.stop, min(2.0, s.shutdown_timeout / 4))
        self._grpc_serving = True
        stack.callback(setattr, self, "_grpc_serving", False)
        self.grpc = grpc_server

        http_port = None
        if s.http_port != -1:
            devices: list[DeviceHttp] = [r.http for r in self.runtimes.values() if r.http is not None]
            if s.broker_auth_secret:
                devices.append(self._broker_auth(registry, acl))
            http_server = HttpServer(
                core,
                keys,
                devices,
                metrics=self.service_metrics,
                ready=self.readiness,
                shutdown_timeout=min(2.0, s.shutdown_timeout / 4),
                jobs=self.jobs,
            )
            http_ssl = None
            if s.http_tls:
                http_ssl = await asyncio.to_thread(server_ssl_context, s.tls_cert_file, s.tls_key_file)
            try:
                http_port = await http_server.start(s.bind, s.http_port, ssl_context=http_ssl)
            except OSError as exc:
                raise _listen_error(s, ("http_port",), exc) from exc
            stack.push_async_callback(http_server.stop)
            self.http = http_server

        bound = self.broker.listener_ports() if self.broker is not None else {}
        self.ports = Ports(
            mqtt=bound.get("mqtt"),
            ws=bound.get("ws"),
            grpc=grpc_port,
            mqtts=bound.get("mqtts"),
            wss=bound.get("wss"),
            http=http_port,
        )

        def where(port: int | None) -> str:
            return f"{s.bind}:{port}" if port is not None else "off"

        # Scripts and tests wait for this line: it is printed whatever the log level.
        log.log(
            max(logging.INFO, log.getEffectiveLevel()),
            "fleetcmd ready mqtt=%s ws=%s mqtts=%s wss=%s grpc=%s:%d grpc_tls=%s http=%s http_tls=%s data=%s restored=%d%s",
            where(self.ports.mqtt),
            where(self.ports.ws),
            where(self.ports.mqtts),
            where(self.ports.wss),
            s.bind,
            self.ports.grpc,
            "on" if s.grpc_tls else "off",
            where(self.ports.http),
            "on" if s.http_tls and http_port is not None else "off",
            s.data_dir,
            restored,
            f" broker={self.external.target}" if self.external is not None else "",
        )

    def _broker_auth(self, registry: Registry, acl: TopicAcl) -> DeviceHttp:
        """The EMQX HTTP authn/authz endpoints (``broker_auth_secret``), as routes of the HTTP server."""
        s = self.settings
        target = parse_broker_url(s.broker_url) if s.broker_url else None
        username = (target.username if target else "") or s.broker_username
        password = (target.password if target else "") or s.broker_password
        auth = BrokerAuth(
            registry,
            acl,
            s.broker_auth_secret,
            service_account=(username, password) if username else None,
            allow_anonymous=s.allow_anonymous,
        )
        return DeviceHttp(AUTH_PREFIX, auth.routes(), http_rest.error_response)

    async def _start_embedded(self, core: CommandCore, registry: Registry, wires: list[Dialect], acl: TopicAcl) -> None:
        """The embedded amqtt broker, the dialects attached to it."""
        s, stack = self.settings, self._stack
        broker = FleetBroker(
            broker_config(
                bind=s.bind,
                mqtt_port=s.mqtt_port,
                ws_port=s.ws_port,
                mqtts_port=s.mqtts_port,
                wss_port=s.wss_port,
                tls_cert_file=s.tls_cert_file,
                tls_key_file=s.tls_key_file,
                sys_interval=s.sys_interval,
                authenticator=registry,
                allow_anonymous=s.allow_anonymous,
                acl=acl,
            ),
            rules=RuleSet.of(wires),
            sink=core,
            dollar_prefixes=[p for d in wires for p in d.dollar_prefixes],
            max_payload_bytes=s.max_response_bytes,
            listen_backlog=s.mqtt_backlog,
            connect_timeout=s.mqtt_connect_timeout,
            max_packet_bytes=s.mqtt_packet_limit,
            max_connections=s.mqtt_max_connections,
            max_connections_per_address=s.mqtt_max_connections_per_address,
        )
        core.outbox.attach(broker)
        context = DialectContext(core, broker, self._spawn)
        for bundle in self.dialects:
            runtime = bundle.attach(context)
            install(core, runtime)
            self.runtimes[bundle.name] = runtime
        runtimes = list(self.runtimes.values())
        # A deleted thing or rotated credentials end the device's connection.
        registry.disconnect = lambda thing_id: self._disconnect_thing(broker, runtimes, thing_id)
        # amqtt logs a start failure with its traceback; the error raised below says it in one line.
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_level = amqtt_log.level
        amqtt_log.setLevel(logging.CRITICAL)
        try:
            await broker.start()
        except Exception as exc:
            raise _listen_error(s, ("mqtt_port", "ws_port", "mqtts_port", "wss_port"), exc) from exc
        finally:
            amqtt_log.setLevel(amqtt_level)
        stack.push_async_callback(broker.stop, s.shutdown_timeout / 2)
        self.broker = broker

    async def _start_external(self, core: CommandCore, registry: Registry, rules: RuleSet) -> None:
        """The MQTT 5 client of an external broker in the embedded broker's place (docs/external-broker.md)."""
        s, stack = self.settings, self._stack
        target = parse_broker_url(s.broker_url)
        link = ExternalBroker(
            target,
            client_id=s.broker_client_id or f"fleetcmd-{socket.gethostname()}",
            username=target.username or s.broker_username,
            password=target.password or s.broker_password,
            ca_file=s.broker_ca_file,
            rules=rules,
            sink=core,
            delivered=core.mark_delivered_nowait,
            spawn=self._spawn,
            shared=s.broker_shared,
            group=s.broker_share_group,
            session_expiry=s.broker_session_expiry,
            # Unacknowledged reports wait in the ingest queue for their commit: never more than it holds.
            receive_maximum=s.ingest_queue,
            max_packet_bytes=s.mqtt_packet_limit,
            max_payload_bytes=s.max_response_bytes,
            max_deadlines=s.max_active_executions,
        )
        core.outbox.attach(link)
        context = DialectContext(core, link, self._spawn)
        for bundle in self.dialects:
            runtime = bundle.attach(context)
            install(core, runtime)
            self.runtimes[bundle.name] = runtime
        # Each request's publish carries its deadline (Message Expiry) and execution (the PUBACK event).
        core.outbox.route_for = link.wrap_routes(core.outbox.route_for)
        # The broker owns the connections: a deleted thing or rotated credentials are refused at its
        # next authentication (the authn endpoint), its live connection is not cut from here.
        registry.disconnect = lambda thing_id: log.info("thing %s changed: the broker re-checks it at its next connect", thing_id)
        link.on_connected = lambda: self._spawn(self._republish(core), "outbox-republish")
        self.external = link
        stack.push_async_callback(link.stop)
        await link.start(s.mqtt_connect_timeout)

    async def _republish(self, core: CommandCore) -> None:
        """After a (re)connect to the external broker: publish every request the broker has not taken."""
        assert self.store is not None
        if core.leased_outbox:
            # Replicas: this one's own requests; the others' come by lease (server/core/replica.py).
            things = set(core.outbox.pending_things())
        else:
            things = {item.thing_id for item in await self.store.active() if item.status <= Status.SENT}
        for thing_id in things:
            core.outbox.device_available(thing_id)

    def metrics(self) -> list[Sample]:
        """Every counter and gauge of the running service (``GET /metrics``)."""
        samples: list[Sample] = []
        core, broker, store = self.core, self.broker, self.store
        if core is not None:
            samples += [
                Sample("executions_active", len(core.scheduler), Kind.GAUGE, "Executions not final yet."),
                Sample("outbox_pending", len(core.outbox), Kind.GAUGE, "Requests not acknowledged by their device."),
                Sample("stream_watchers", len(core.bus), Kind.GAUGE, "Live Stream and wait subscribers."),
                Sample("outbox_published", core.outbox.published, Kind.COUNTER, "Requests written to a device."),
                Sample("outbox_acked", core.outbox.acked, Kind.COUNTER, "Requests a device PUBACKed."),
                Sample(
                    "outbox_handed",
                    self.handover.recorded if self.handover else 0,
                    Kind.COUNTER,
                    "Requests the external broker took, recorded so that none is published again.",
                ),
            ]
            samples += counters("core", core.stats, "Control-plane events by kind.")
        if self.replica is not None:
            samples += [
                Sample("replica_timed_out", self.replica.timed_out, Kind.COUNTER, "Executions this replica's sweeps timed out."),
                Sample("replica_claimed", self.replica.claimed, Kind.COUNTER, "Requests this replica took over by lease."),
                Sample("replica_registry_reloads", self.replica.reloads, Kind.COUNTER, "Registry reads from the shared store."),
            ]
        if broker is not None:
            connected = sum(1 for client_id in broker.sessions if broker.is_connected(client_id))
            samples.append(Sample("mqtt_clients_connected", connected, Kind.GAUGE, "Live MQTT clients."))
            samples += counters("broker", broker.stats, "Broker events by kind (drops, refusals, takeovers).")
        if self.external is not None:
            up = int(self.external.connected)
            samples.append(Sample("broker_link_connected", up, Kind.GAUGE, "Connected to the external broker."))
            samples += counters("broker", self.external.stats, "External broker link events by kind (drops, acks, reconnects).")
        if store is not None:
            samples.append(Sample("store_commits", store.commits, Kind.COUNTER, "Store transactions committed."))
        return samples

    async def readiness(self) -> dict[str, str]:
        """What is not ready, by part (``store``, ``broker``, ``grpc``): empty when all serve."""
        failing: dict[str, str] = {}
        store, broker, grpc_server = self.store, self.broker, self.grpc
        if store is None:
            failing["store"] = "not open"
        else:
            # Probes arriving together share one write: an unauthenticated endpoint must not multiply commits.
            if self._ping is None or self._ping.done():
                self._ping = asyncio.ensure_future(store.ping())
                # Retrieved here too: a probe that timed out no longer waits for the outcome.
                self._ping.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                await asyncio.wait_for(asyncio.shield(self._ping), READY_TIMEOUT)
            except TimeoutError:
                failing["store"] = f"a write did not commit within {READY_TIMEOUT:g} s"
            except Exception as exc:  # noqa: BLE001 - any failure to commit means "not writable", reported as such
                failing["store"] = f"not writable: {exc}"
        # amqtt keeps one asyncio (or websockets) server per started listener; each must still accept.
        listeners = list(broker._servers.values()) if broker is not None else []
        if self.external is not None:
            if not self.external.connected:
                failing["broker"] = f"not connected to {self.external.target}"
        elif not listeners:
            failing["broker"] = "not listening"
        elif not all(server.instance.is_serving() for server in listeners):
            failing["broker"] = "a listener stopped serving"
        if grpc_server is None or self.ports is None or not self._grpc_serving:
            failing["grpc"] = "not serving"
        elif not self.settings.grpc_tls:
            # A real health Check over the network: the listener accepts and the server answers.
            # (With TLS the probe would need the client's trust settings; the serving flag stands.)
            problem = await _grpc_health(_dialable(self.settings.bind), self.ports.grpc, READY_TIMEOUT)
            if problem:
                failing["grpc"] = problem
        return failing

    async def run_retention(self, keep_ms: float, pause: float) -> None:
        """Background loop: delete finished executions older than ``keep_ms`` and their events, in small batches."""
        store = self.store
        assert store is not None
        while True:
            cutoff = now_ms() - int(keep_ms)
            deleted = await store.delete_finished(cutoff, RETENTION_BATCH)
            if deleted:
                log.debug("retention deleted %d executions completed before %d", deleted, cutoff)
            # A full batch: more may be waiting, go on after letting other work run; else rest.
            await asyncio.sleep(0 if deleted == RETENTION_BATCH else pause)

    @staticmethod
    def _disconnect_thing(broker: FleetBroker, runtimes: Sequence[DialectRuntime], thing_id: str) -> None:
        # The thing's own connection, and every client that acted for it in a dialect (a Kaa endpoint token).
        broker.disconnect_client(thing_id)
        for runtime in runtimes:
            for client_id in runtime.clients(thing_id):
                broker.disconnect_client(client_id)

    async def _stop_core(self, core: CommandCore) -> None:
        core.close()
        if self.registry is not None:
            self.registry.close()
        await core.stop_ingest(self.settings.shutdown_timeout / 4)
        for task in list(self._cancellable):
            task.cancel()


def _listen_error(s: Settings, settings: tuple[str, ...], exc: Exception) -> Exception:
    """The bind failure as one line naming the port's setting; any other start error unchanged."""
    text = str(exc)
    for name in settings:
        port = getattr(s, name)
        # amqtt and asyncio name the address as ('host', port), grpcio as host:port.
        if port > 0 and (f", {port})" in text or f":{port};" in text or f":{port} " in text or text.endswith(f":{port}")):
            reason = "address already in use" if "in use" in text or "Failed to bind" in text else text
            return ListenError(f"{s.bind}:{port}", f"{ENV_PREFIX}{name.upper()}", reason)
    return exc
