"""Shared fixtures: a real fleetcmd service on loopback (port 0) and a gRPC client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.app import FleetcmdApp
from server.cli import configure_logging
from server.config import Settings
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import app_channel

configure_logging("INFO")


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Loopback, port 0. Device-contract tests run in development mode (anonymous devices,
    unregistered things); registry and security tests pass ``allow_anonymous=False``."""
    values: dict[str, Any] = {"allow_anonymous": True, "http_port": 0, **overrides}
    return Settings(
        bind="127.0.0.1",
        mqtt_port=0,
        grpc_port=0,
        data_dir=data_dir,
        shutdown_timeout=5,
        **values,
    )


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    # Modules marked ``secure`` run with device authentication on (no development mode).
    return make_settings(tmp_path / "data", allow_anonymous=request.node.get_closest_marker("secure") is None)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FleetcmdApp]:
    async with FleetcmdApp(settings) as running:
        yield running


@pytest.fixture
async def stub(app: FleetcmdApp) -> AsyncIterator[pb_grpc.CommandServiceStub]:
    assert app.ports is not None
    async with app_channel(app) as channel:
        yield pb_grpc.CommandServiceStub(channel)
