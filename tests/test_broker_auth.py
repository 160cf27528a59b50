"""A CONNECT is authenticated once: the auth plugins run once per CONNECT, admitted or refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from amqtt.session import Session

from broker_hooks.auth import DeviceAuthPlugin
from server.app import FleetcmdApp
from tests.conftest import make_settings
from tests.devices import EmqxDevice
from tests.test_device_security import HOST, NOT_AUTHORIZED, refused, register


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FleetcmdApp]:
    async with FleetcmdApp(make_settings(tmp_path / "data", allow_anonymous=False)) as svc:
        yield svc


@pytest.fixture
def auth_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The client id of every call of the device auth plugin, in order."""
    calls: list[str] = []
    real = DeviceAuthPlugin.authenticate

    async def counted(self: DeviceAuthPlugin, *, session: Session) -> bool:
        calls.append(session.client_id or "")
        return await real(self, session=session)

    monkeypatch.setattr(DeviceAuthPlugin, "authenticate", counted)
    return calls


async def test_an_admitted_connect_is_authenticated_once(app: FleetcmdApp, auth_calls: list[str]) -> None:
    assert app.ports is not None and app.broker is not None
    password = await register(app, "once-1")
    async with EmqxDevice(HOST, app.ports.mqtt, "once-1", username="once-1", password=password) as dev:
        assert str(dev.connect_rc) == "Success"
        assert app.broker.is_connected("once-1")
    assert auth_calls == ["once-1"]
    assert app.broker.stats["auth_failures"] == 0


async def test_a_refused_connect_is_authenticated_once(app: FleetcmdApp, auth_calls: list[str]) -> None:
    assert app.ports is not None and app.broker is not None
    await register(app, "once-2")
    dev = EmqxDevice(HOST, app.ports.mqtt, "once-2", username="once-2", password="wrong", subscribe=False)
    assert str(await refused(dev)) == NOT_AUTHORIZED
    assert auth_calls == ["once-2"]
    assert app.broker.stats["auth_failures"] == 1
