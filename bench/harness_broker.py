"""fleetcmd's embedded broker (``FleetBroker``) alone, without the topic ACL: ``harness_broker.py PORT``.

The raw request/response scenario needs devices that exchange plain topics,
which the service's ACL forbids (a device may publish only to its own
``$emqx/.../response`` topic, which fleetcmd consumes, and subscribe only to its
request topics). Until the service has a switch for that, the bench runs the
same ``FleetBroker`` class with the same configuration builder
(``broker_config``: explicit listener, minimal plugin set, anonymous admitted
by ``DeviceAuthPlugin``) and the same rules, only with ``acl=None``, and a sink
that does nothing (no rule claims a plain topic, so it is never called).
It runs on the event loop the service would choose (``FLEETCMD_EVENT_LOOP``, default
``auto``: uvloop when installed) and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_hooks.broker import FleetBroker
from broker_hooks.config import broker_config
from broker_hooks.rules import Inbound, RuleSet
from server.cli.main import run_loop
from server.dialects import emqx


class NullSink:
    """A DeviceSink that ignores everything."""

    def device_connected(self, client_id: str, remote_address: str) -> None:
        """Ignored."""

    def device_subscribed(self, client_id: str, filters: Sequence[tuple[str, int]]) -> None:
        """Ignored."""

    def device_disconnected(self, client_id: str) -> None:
        """Ignored."""

    async def device_message(self, inbound: Inbound) -> None:
        """Ignored."""


async def main(port: int) -> int:
    """Run the broker until a signal."""
    dialects = (emqx.DIALECT,)
    broker = FleetBroker(
        broker_config(bind="127.0.0.1", mqtt_port=port, ws_port=-1, sys_interval=0, allow_anonymous=True, acl=None),
        rules=RuleSet.of(dialects),
        sink=NullSink(),
        dollar_prefixes=[p for d in dialects for p in d.dollar_prefixes],
        max_payload_bytes=256 * 1024,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    print(f"harness ready mqtt=127.0.0.1:{broker.listener_ports().get('mqtt')}", flush=True)
    await stop.wait()
    await broker.stop(4)
    return 0


if __name__ == "__main__":
    sys.exit(run_loop(main(int(sys.argv[1])), os.environ.get("FLEETCMD_EVENT_LOOP", "auto")))
