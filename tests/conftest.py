"""Shared fixtures: a real fleetcmd service on loopback (port 0) and a gRPC client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from server.app import FleetcmdApp
from server.cli.main import configure_logging
from server.config import Settings
from server.pb import commands_pb2_grpc as pb_grpc
from tests import proc
from tests.clients import app_channel

configure_logging("INFO")

# Opt-in event loop for the tests: FLEETCMD_TEST_LOOP=uvloop runs the in-process tests
# (pytest-asyncio) on uvloop and the ``fleetcmd serve`` subprocesses of tests/proc.py with
# FLEETCMD_EVENT_LOOP=uvloop. Default "asyncio": nothing below is installed.
TEST_LOOP = os.environ.get("FLEETCMD_TEST_LOOP", "asyncio")
if TEST_LOOP not in ("asyncio", "uvloop"):
    raise pytest.UsageError(f"FLEETCMD_TEST_LOOP must be asyncio or uvloop, not {TEST_LOOP!r}")

if TEST_LOOP == "uvloop":
    import uvloop

    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
        """pytest-asyncio >= 1.x hook (replaces overriding ``event_loop_policy``)."""
        return {"uvloop": uvloop.new_event_loop}

    _clean_env = proc.clean_env

    def _clean_env_uvloop(extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = _clean_env(extra)
        env.setdefault("FLEETCMD_EVENT_LOOP", "uvloop")  # a test's own setting wins
        return env

    # Before the test modules run ``from tests.proc import clean_env``.
    proc.clean_env = _clean_env_uvloop


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
