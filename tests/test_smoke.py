import asyncio
import json
import logging

import pytest
from google.protobuf import json_format, struct_pb2

from server.app import FleetcmdApp
from server.cli.main import configure_logging
from server.pb import commands_pb2 as pb
from tests.devices import EmqxDevice


async def test_send_to_connected_device_succeeds(app: FleetcmdApp, stub) -> None:
    def answer(dev: EmqxDevice, execution_id: str, body: dict) -> None:
        dev.respond(execution_id, "SUCCEEDED", {"currentTemperature": body["params"]["value"]})

    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "thermostat-001", on_request=answer):
        params = json_format.ParseDict({"value": 24}, struct_pb2.Struct())
        ex = await stub.Send(pb.SendRequest(thing_id="thermostat-001", action="setTemperature", params=params))
        assert ex.status == pb.SENT
        for _ in range(100):
            got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
            if got.status == pb.SUCCEEDED:
                break
            await asyncio.sleep(0.02)
        assert got.status == pb.SUCCEEDED
        assert json_format.MessageToDict(got.result) == {"currentTemperature": 24}
        assert [pb.ExecutionStatus.Name(c.status) for c in got.history] == ["SENT", "DELIVERED", "SUCCEEDED"] or [
            pb.ExecutionStatus.Name(c.status) for c in got.history
        ] == ["SENT", "SUCCEEDED"]
        print(json.dumps(json_format.MessageToDict(got), indent=1))


async def test_logs_are_quiet_by_default(app: FleetcmdApp, caplog: pytest.LogCaptureFixture) -> None:
    """INFO on the service's own loggers; amqtt and transitions stay at WARNING; no $SYS plugin."""
    assert app.ports is not None and app.broker is not None
    configure_logging("INFO")
    caplog.set_level(logging.INFO)
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "quiet-1"):
        pass
    noisy = [r for r in caplog.records if r.name.startswith(("amqtt", "transitions")) and r.levelno < logging.WARNING]
    assert noisy == []
    assert not any(type(p).__name__ == "BrokerSysPlugin" for p in app.broker.plugins_manager.plugins)
