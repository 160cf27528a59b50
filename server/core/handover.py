"""Requests handed over to an external broker: recorded so that nothing publishes them again.

With an external broker the broker's QoS 1 PUBACK means the broker took the request: the device's
persistent session there holds it, its MQTT 5 message expiry (the TTL left) and the TTL end it. Brokers
without EMQX's ``message_acked`` event (mosquitto) never make it DELIVERED, so it stays SENT until its
device answers, and without a record of the PUBACK it would be published again: by another replica's
outbox claim after every lease (PostgreSQL, ``server/core/replica.py``), or by the outbox restored after
a restart (SQLite). A device with a persistent session would then find one copy per lease or restart.

:class:`Handover` records the PUBACKs in the store (``mark_handed``: one write per burst, the PUBACKs
that arrive while a write is under way share the next one). Only a publish the broker did not
acknowledge (link down, "no matching subscribers", a process gone before the PUBACK or before its
record) is published again. Embedded mode never builds it: its SENT means written to the device's
connection, and the device's own PUBACK makes it DELIVERED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from server.core.errors import FleetcmdError

log = logging.getLogger(__name__)


@runtime_checkable
class HandoverStore(Protocol):
    """The store's record of handed-over requests (both stores)."""

    async def mark_handed(self, execution_ids: Sequence[str]) -> int:
        """Record that the broker acknowledged these requests; returns how many non-final ones were marked."""


class Handover:
    """Batches the external broker's PUBACKs into the store (see the module docstring)."""

    def __init__(self, store: HandoverStore) -> None:
        self._store = store
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self.recorded = 0  # requests marked handed over

    def add(self, execution_id: str) -> None:
        """The broker acknowledged the publish of ``execution_id`` (the outbox's ``handed`` callback)."""
        self._pending.append(execution_id)
        self._wake.set()

    async def flush(self) -> int:
        """Record every request added since the last flush, in one write; returns how many were written."""
        pending, self._pending = self._pending, []
        self._wake.clear()
        if pending:
            self.recorded += await self._store.mark_handed(pending)
        return len(pending)

    async def run(self) -> None:
        """Background loop: :meth:`flush` whenever PUBACKs arrived."""
        while True:
            await self._wake.wait()
            try:
                await self.flush()
            except FleetcmdError as exc:
                # Not recorded: published once more after its lease or a restart (at least once holds).
                log.warning("recording requests handed to the broker failed: %s", exc)
