"""``GET /metrics``: the service's counters in the Prometheus text format, behind an API key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from server.app import FleetcmdApp
from server.core.metrics import Kind, Sample, counters, metric_name, render
from server.core.validation import SendCommand
from tests.clients import admin_key
from tests.devices import EmqxDevice, wait_for

TIMEOUT = aiohttp.ClientTimeout(total=30)


def parse(text: str) -> dict[str, float]:
    """Series -> value of a Prometheus text exposition; fails on a line that is neither comment nor sample."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.split(" ")
        assert name not in values, f"series {name} repeated"
        values[name] = float(value)
    return values


@pytest.fixture
async def session(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None and app.ports.http
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as s:
        yield s


async def scrape(session: aiohttp.ClientSession, key: str | None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get("/metrics", headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def test_render_names_types_and_merges() -> None:
    text = render(
        [
            Sample("mqtt_clients_connected", 3, Kind.GAUGE, "Live MQTT clients."),
            *counters("broker", {"dropped.acl": 2, "dropped-acl": 1, "takeovers": 0}, "Broker events."),
        ]
    )
    assert parse(text) == {
        "fleetcmd_broker_dropped_acl_total": 3,  # two spellings of one name are one series
        "fleetcmd_broker_takeovers_total": 0,
        "fleetcmd_mqtt_clients_connected": 3,
    }
    assert "# TYPE fleetcmd_broker_takeovers_total counter" in text
    assert "# TYPE fleetcmd_mqtt_clients_connected gauge" in text
    assert "# HELP fleetcmd_mqtt_clients_connected Live MQTT clients." in text
    assert metric_name("kaa", "errors.400") == "kaa_errors_400"


async def test_metrics_need_an_api_key(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    status, _, _ = await scrape(session, None)
    assert status == 401
    status, _, _ = await scrape(session, "fck_nope_nope")
    assert status == 401


async def test_metrics_follow_devices_and_commands(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    assert app.ports is not None and app.ports.mqtt and app.core is not None
    key = admin_key(app.settings.data_dir)
    status, content_type, text = await scrape(session, key)
    assert status == 200 and content_type.startswith("text/plain")
    before = parse(text)
    assert before["fleetcmd_mqtt_clients_connected"] == 0
    assert before["fleetcmd_executions_active"] == 0

    def answer(device: EmqxDevice, execution_id: str, request: dict[str, object]) -> None:
        device.respond(execution_id, "SUCCEEDED", {"ok": True})

    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "t-metrics", on_request=answer):
        status, _, text = await scrape(session, key)
        assert parse(text)["fleetcmd_mqtt_clients_connected"] == 1
        execution = await app.core.send(SendCommand("t-metrics", "reboot", None, 30, ""))
        final = await app.core.wait(execution, 10)
        assert final.status.name == "SUCCEEDED"
        await wait_for(lambda: app.core is not None and app.core.outbox.acked >= 1, what="PUBACK seen")
        after = parse((await scrape(session, key))[2])
    assert after["fleetcmd_core_sent_total"] == before.get("fleetcmd_core_sent_total", 0) + 1
    assert after["fleetcmd_core_reports_change_total"] >= 1
    assert after["fleetcmd_outbox_published_total"] >= 1
    assert after["fleetcmd_store_commits_total"] > before["fleetcmd_store_commits_total"]
    assert after["fleetcmd_broker_routed_total"] >= 1
