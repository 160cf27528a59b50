"""The process lifecycle: one async context manager that starts and stops everything.

Start order: store -> control plane (restored from the store) -> broker -> gRPC.
Stop order is the reverse, through one ``AsyncExitStack``: gRPC stops taking
calls, the broker disconnects devices (bounded, whatever amqtt does), the
control plane applies the reports already queued, the store commits what is
queued and closes. Background loops run in one ``TaskGroup`` with named tasks;
if one of them dies, :meth:`FleetcmdApp.wait_failed` returns so the CLI can
shut the process down instead of running half-broken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from broker_hooks import emqx
from broker_hooks.broker import FleetBroker
from broker_hooks.config import broker_config
from broker_hooks.rules import RuleSet
from server.commands import CommandCore
from server.config import Settings
from server.grpc_api import GrpcServer
from server.registry import Registry
from server.sqlite_store import SqliteStore

log = logging.getLogger("fleetcmd")


@dataclass(frozen=True)
class Ports:
    """Where the service listens (actual ports, also when 0 was asked for)."""

    mqtt: int
    ws: int | None
    grpc: int


class FleetcmdApp:
    """The whole service. ``async with FleetcmdApp(settings) as app:`` runs it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._failed = asyncio.Event()
        # Tasks that are cancelled at shutdown; the store writer and the ingest loop instead drain and end.
        self._cancellable: set[asyncio.Task[None]] = set()
        self.store: SqliteStore | None = None
        self.core: CommandCore | None = None
        self.registry: Registry | None = None
        self.broker: FleetBroker | None = None
        self.grpc: GrpcServer | None = None
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

        store = SqliteStore(s.db_path)
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

        broker = FleetBroker(
            broker_config(bind=s.bind, mqtt_port=s.mqtt_port, ws_port=s.ws_port, sys_interval=s.sys_interval),
            rules=RuleSet(emqx.RULES),
            sink=core,
            dollar_prefixes=(emqx.DOLLAR_PREFIX,),
            max_payload_bytes=s.max_response_bytes,
        )
        core.outbox.attach(broker)
        await broker.start()
        stack.push_async_callback(broker.stop, s.shutdown_timeout / 2)
        self.broker = broker

        grpc_server = GrpcServer(core)
        grpc_port = await grpc_server.start(s.bind, s.grpc_port)
        stack.push_async_callback(grpc_server.stop, min(2.0, s.shutdown_timeout / 4))
        self.grpc = grpc_server

        self.ports = Ports(
            mqtt=broker.listener_port("default"),
            ws=broker.listener_port("ws") if s.ws_port >= 0 else None,
            grpc=grpc_port,
        )
        ws = f"{s.bind}:{self.ports.ws}" if self.ports.ws is not None else "off"
        log.info(
            "fleetcmd ready mqtt=%s:%d ws=%s grpc=%s:%d data=%s restored=%d",
            s.bind,
            self.ports.mqtt,
            ws,
            s.bind,
            self.ports.grpc,
            s.data_dir,
            restored,
        )

    async def _stop_core(self, core: CommandCore) -> None:
        core.close()
        await core.stop_ingest()
        for task in list(self._cancellable):
            task.cancel()
