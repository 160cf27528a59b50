"""A bare ``FleetBroker`` on loopback for broker-level tests: EMQX rules, no ACL, a sink of the test's choosing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from broker_hooks.broker import DeviceSink, FleetBroker
from broker_hooks.config import broker_config
from broker_hooks.rules import RuleSet
from server.dialects import emqx


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
