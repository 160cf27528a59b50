"""The process lifecycle: one async context manager that starts and stops everything.

Start order: store -> control plane (restored from the store) -> broker -> gRPC -> HTTP.
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
from collections.abc import Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker_hooks.acl import TopicAcl
from broker_hooks.broker import FleetBroker
from broker_hooks.config import broker_config
from broker_hooks.rules import RuleSet
from server.api.grpc_api import GrpcServer
from server.api.http_app import DeviceHttp, HttpServer, server_ssl_context
from server.api.metrics import Kind, Sample, counters
from server.config import Settings
from server.core.apikeys import ApiKeys
from server.core.commands import CommandCore
from server.core.registry import Registry
from server.dialects import DIALECTS
from server.dialects.bundle import DialectBundle, DialectContext, DialectRuntime, install
from server.store import ServiceStore, store_from_url

log = logging.getLogger("fleetcmd")


@dataclass(frozen=True)
class Ports:
    """Where the service listens (actual ports, also when 0 was asked for)."""

    mqtt: int | None
    ws: int | None
    grpc: int
    mqtts: int | None = None
    wss: int | None = None
    http: int | None = None


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
        self.registry: Registry | None = None
        self.keys: ApiKeys | None = None
        self.broker: FleetBroker | None = None
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        # Each dialect's runtime, by name, once attached.
        self.runtimes: dict[str, DialectRuntime] = {}
        self.ports: Ports | None = None

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
        self.core = core
        restored = await core.restore()
        self._spawn(core.run_ingest(), "device-ingest", drains=True)
        self._spawn(core.run_expiry(), "ttl-expiry")
        stack.push_async_callback(self._stop_core, core)

        if s.allow_anonymous:
            log.warning(
                "DEVELOPMENT MODE (allow_anonymous): ANY MQTT client is admitted without credentials and "
                "Sends may target unregistered things; never run this way in production"
            )
        wires = [bundle.wire for bundle in self.dialects]
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
                acl=TopicAcl.of(
                    wires, [acl for bundle in self.dialects for acl in bundle.scoped_acls(registry)], open_mode=s.allow_anonymous
                ),
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
        await broker.start()
        stack.push_async_callback(broker.stop, s.shutdown_timeout / 2)
        self.broker = broker

        keys = ApiKeys(store)
        self.keys = keys
        admin_key_file = await keys.ensure_admin_key(s.data_dir)
        if admin_key_file is not None:
            log.warning("no API key existed: created an admin key in %s (readable only by this user)", admin_key_file)
        grpc_server = GrpcServer(core, registry, keys)
        grpc_tls = None
        if s.grpc_tls:
            grpc_tls = (await asyncio.to_thread(_read, s.tls_key_file), await asyncio.to_thread(_read, s.tls_cert_file))
        grpc_port = await grpc_server.start(s.bind, s.grpc_port, tls=grpc_tls)
        stack.push_async_callback(grpc_server.stop, min(2.0, s.shutdown_timeout / 4))
        self.grpc = grpc_server

        http_port = None
        if s.http_port != -1:
            devices: list[DeviceHttp] = [r.http for r in self.runtimes.values() if r.http is not None]
            http_server = HttpServer(core, keys, devices, metrics=self.metrics, shutdown_timeout=min(2.0, s.shutdown_timeout / 4))
            http_ssl = None
            if s.http_tls:
                http_ssl = await asyncio.to_thread(server_ssl_context, s.tls_cert_file, s.tls_key_file)
            http_port = await http_server.start(s.bind, s.http_port, ssl_context=http_ssl)
            stack.push_async_callback(http_server.stop)
            self.http = http_server

        bound = broker.listener_ports()
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
            "fleetcmd ready mqtt=%s ws=%s mqtts=%s wss=%s grpc=%s:%d grpc_tls=%s http=%s http_tls=%s data=%s restored=%d",
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
        )

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
            ]
            samples += counters("core", core.stats, "Control-plane events by kind.")
        if broker is not None:
            connected = sum(1 for client_id in broker.sessions if broker.is_connected(client_id))
            samples.append(Sample("mqtt_clients_connected", connected, Kind.GAUGE, "Live MQTT clients."))
            samples += counters("broker", broker.stats, "Broker events by kind (drops, refusals, takeovers).")
        if store is not None:
            samples.append(Sample("store_commits", store.commits, Kind.COUNTER, "Store transactions committed."))
        return samples

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
