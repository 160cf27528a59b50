"""What the broker tells the control plane (:class:`DeviceSink`) and what a delivery came to (:class:`Delivery`).

Not amqtt-derived: the interface between the broker (``broker_hooks.amqtt_fork``) and fleetcmd's core.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from typing import Protocol

from broker_hooks.rules import Inbound


class DeviceSink(Protocol):
    """What the broker tells the control plane. Callbacks must not raise."""

    def device_connected(self, client_id: str, remote_address: str) -> None:
        """A client finished CONNECT (its persistent subscriptions, if any, are active again)."""

    def device_subscribed(self, client_id: str, filters: Sequence[tuple[str, int]]) -> None:
        """A client was granted these (filter, qos) subscriptions (after the SUBACK went out)."""

    def device_disconnected(self, client_id: str) -> None:
        """A client's connection ended."""

    def device_message_nowait(self, inbound: Inbound) -> asyncio.Future[None] | None:
        """A device publish decoded by a rule, queued without waiting.

        Returns:
            A future that is done once the message is applied (what it changes is
            durable), or failed when it could not be stored; None when the queue is
            full (then :meth:`device_message` waits for room).
        """

    async def device_message(self, inbound: Inbound) -> asyncio.Future[None]:
        """As :meth:`device_message_nowait`, waiting while the queue is full (back-pressure on that client)."""


class Delivery(enum.Enum):
    """Outcome of :meth:`FleetBroker.deliver`."""

    ACKED = "acked"  # QoS 1 publish PUBACKed
    SENT = "sent"  # QoS 0 publish written (the subscription asked for QoS 0)
    NOT_CONNECTED = "not_connected"
    NOT_SUBSCRIBED = "not_subscribed"
    FAILED = "failed"  # connection lost or no PUBACK in time
