"""How the gRPC server is put together: only ``Send`` is a registered method, every service has a generic handler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from server.api import grpc_api
from server.config import Settings
from server.core.apikeys import ApiKeys
from server.core.commands import CommandCore
from server.core.registry import Registry
from server.store.sqlite import SqliteStore


class Recording:
    """The real grpc.aio server, recording what is registered on it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.registered: list[str] = []
        self.generic_services: list[str] = []

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered += [f"/{service}/{method}" for method in handlers]
        self.real.add_registered_method_handlers(service, handlers)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic_services += [h.service_name() for h in handlers]
        self.real.add_generic_rpc_handlers(handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_only_send_is_registered_and_every_service_is_served_generically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # grpc.aio's server waits on one future per registered method for every call it takes.
    made: list[Recording] = []
    real_server = grpc.aio.server

    def recording_server(*args: Any, **kwargs: Any) -> Recording:
        made.append(Recording(real_server(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(grpc_api.grpc.aio, "server", recording_server)
    settings = Settings(bind="127.0.0.1", mqtt_port=0, grpc_port=0, data_dir=tmp_path, allow_anonymous=True)
    async with SqliteStore(tmp_path / "f.db") as store:
        registry = Registry(store, allow_unregistered=True)
        core = CommandCore(settings, store, registry, lambda coro, name: coro.close())
        grpc_api.GrpcServer(core, registry, ApiKeys(store))
    (server,) = made
    assert server.registered == ["/fleetcmd.v1.CommandService/Send"]
    assert sorted(server.generic_services) == sorted(
        [*grpc_api.SERVICE_NAMES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    )
