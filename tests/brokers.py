"""A bare ``FleetBroker`` on loopback for broker-level tests: EMQX rules, no ACL, a sink of the test's choosing."""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator
from typing import Any

from broker_hooks.broker import DeviceSink, FleetBroker
from broker_hooks.config import broker_config
from broker_hooks.rules import RuleSet
from server.dialects import emqx
from tests.devices import EmqxDevice, Received


@contextlib.asynccontextmanager
async def running_broker(sink: DeviceSink, *, ws_port: int = -1, max_payload_bytes: int) -> AsyncIterator[FleetBroker]:
    """Started on 127.0.0.1 (MQTT on port 0, WebSocket on ``ws_port``: 0 = any free port, -1 = off); stopped after."""
    dialects = (emqx.DIALECT,)
    broker = FleetBroker(
        broker_config(bind="127.0.0.1", mqtt_port=0, ws_port=ws_port, sys_interval=0, allow_anonymous=True, acl=None),
        rules=RuleSet.of(dialects),
        sink=sink,
        dollar_prefixes=[p for d in dialects for p in d.dollar_prefixes],
        max_payload_bytes=max_payload_bytes,
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop(5)


def broker_client(broker: FleetBroker, client_id: str, transport: str = "tcp", **kw: Any) -> EmqxDevice:
    """A paho client of ``broker`` on TCP (fleetcmd's reader) or WebSocket (amqtt's reader), subscribed to nothing yet."""
    port = broker.listener_ports()["mqtt" if transport == "tcp" else "ws"]
    return EmqxDevice("127.0.0.1", port, client_id, subscribe=False, transport=transport, **kw)


async def drain(dev: EmqxDevice, quiet: float) -> list[Received]:
    """Everything the client received until nothing arrived for ``quiet`` seconds."""
    got: list[Received] = []
    while True:
        try:
            got.append(await asyncio.to_thread(dev.received.get, True, quiet))
        except queue.Empty:
            return got
