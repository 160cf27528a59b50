"""Replica mode: what several fleetcmd processes sharing one store (PostgreSQL) do beyond one process.

It is on only when the store says so (:func:`shared_store`: the store implements TTL sweeps and
outbox leases); the embedded SQLite mode never builds it, so its hot path is unchanged. Three
background loops, each a few indexed queries per period whatever the load:

* **TTL sweeps** (:meth:`ReplicaLoops.run_sweeps`): every replica times out what is due through
  the store's ``expire_due`` (``FOR UPDATE SKIP LOCKED``): a row is timed out by one replica once,
  also when the replica that created it is gone. Each replica still keeps a timer for its own
  executions (precise to the millisecond); the sweep bounds the lateness of everything else by
  :data:`SWEEP_SECONDS`.
* **Outbox takeover** (:meth:`ReplicaLoops.run_takeover`): requests no device (or broker) took,
  whose lease ended (their replica crashed, or it could not publish), are claimed with a new lease
  and published by this replica's outbox (at most once per lease).
* **Handed-over requests**: what the external broker acknowledged is recorded as handed over
  (``server/core/handover.py``) and never claimed again; its row's ``lease_until`` is past any lease.
* **Registry refresh** (:meth:`ReplicaLoops.run_registry`): things, thing types and credentials
  changed on another replica are read back when the store tells of such a change (PostgreSQL:
  a NOTIFY in the writing transaction), and at the latest every :data:`REGISTRY_SECONDS`; an idle
  registry is not scanned. A Send naming a thing this replica does not know reads the registry at
  once (:meth:`ReplicaLoops.reload_registry`).
  API keys need nothing: their lookups are cached for one second only (``server/core/apikeys.py``).

The event bus needs nothing here either: the store hands the commit listener every replica's
commits, once each, in sequence order (it follows the log on NOTIFY, with a polling fallback).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from server.core.clock import now_ms
from server.core.delivery import Outbox
from server.core.errors import FleetcmdError
from server.core.models import Execution
from server.core.registry import Registry
from server.store import TransitionResult

log = logging.getLogger(__name__)

# How often each replica sweeps for due executions (the most a TTL can be late when the replica
# that created the execution is gone; its own executions expire on their own timers).
SWEEP_SECONDS = 1.0
# Executions timed out per sweep transaction; a full page is followed by another at once.
SWEEP_PAGE = 500
# How often a replica looks for requests whose lease ended.
TAKEOVER_SECONDS = 1.0
TAKEOVER_PAGE = 500
# A replica reads the registry back when the store says another replica changed it; at the
# latest after this long without such news (a safety net: the read is a full scan).
REGISTRY_SECONDS = 30.0
# A Send naming an unknown thing reads the registry at once, but not more often than this
# (a client naming unknown things must not turn every Send into a registry read).
RELOAD_MIN_INTERVAL = 0.25


class LeaseLike(Protocol):
    """A claimed outbox request (``server.store.postgres.Lease``)."""

    @property
    def execution(self) -> Execution:
        """The request."""

    @property
    def epoch(self) -> int:
        """The how-manieth claim."""


@runtime_checkable
class SharedStore(Protocol):
    """A store several replicas share (``server.store.postgres.ReplicaStore``, named here without importing it)."""

    lease_ms: int  # how long a claim on an unacknowledged request lasts

    async def expire_due(self, now_ms: int, limit: int) -> list[TransitionResult]:
        """Time out up to ``limit`` due executions no other replica is sweeping."""

    async def claim_unacked(self, now_ms: int, limit: int, thing_ids: Sequence[str] = ()) -> Sequence[LeaseLike]:
        """Lease up to ``limit`` unacknowledged requests whose lease ended."""

    async def release(self, execution_id: str, epoch: int) -> bool:
        """End a lease early."""

    async def wait_registry_change(self, timeout: float) -> bool:
        """Wait until another replica changed the registry (True) or ``timeout`` seconds pass (False)."""


def shared_store(store: object) -> SharedStore | None:
    """``store`` when several replicas can share it (replica mode), else None (one process: SQLite)."""
    return store if isinstance(store, SharedStore) else None


class ReplicaLoops:
    """The background loops of replica mode (see the module docstring).

    Args:
        store: the shared store.
        registry: this replica's registry (refreshed from the store).
        outbox: this replica's outbox (it publishes the requests this replica claims).
        takeover: whether to claim other replicas' requests (only when every replica reaches every
            device: an external broker; with the embedded broker a device is connected to one replica).
    """

    def __init__(self, store: SharedStore, registry: Registry, outbox: Outbox, *, takeover: bool) -> None:
        self._store = store
        self._registry = registry
        self._outbox = outbox
        self.takeover = takeover
        self.timed_out = 0  # executions this replica's sweeps timed out
        self.claimed = 0  # requests this replica took over
        self.reloads = 0
        self._reload_lock = asyncio.Lock()
        self._read_started = 0.0  # time.monotonic() when the last registry read began

    async def sweep_once(self) -> int:
        """Time out every due execution no other replica is sweeping now; returns how many this one did."""
        done = 0
        while True:
            expired = await self._store.expire_due(now_ms(), SWEEP_PAGE)
            done += len(expired)
            if len(expired) < SWEEP_PAGE:
                self.timed_out += done
                return done

    async def run_sweeps(self) -> None:
        """Background loop: :meth:`sweep_once` every :data:`SWEEP_SECONDS`."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self.sweep_once()
            except FleetcmdError as exc:  # the store is unavailable for now: the next sweep tries again
                log.warning("TTL sweep failed: %s", exc)

    async def take_over_once(self) -> int:
        """Claim requests whose lease ended and hand them to the outbox; returns how many were claimed."""
        claimed = 0
        while True:
            leases = await self._store.claim_unacked(now_ms(), TAKEOVER_PAGE)
            things: dict[str, None] = {}
            for lease in leases:
                execution = lease.execution
                self._outbox.hold(execution.thing_id, execution.execution_id)
                things[execution.thing_id] = None
            # The outbox's flush reads each request back, marks a QUEUED one SENT and publishes it.
            for thing_id in things:
                self._outbox.device_available(thing_id)
            claimed += len(leases)
            if len(leases) < TAKEOVER_PAGE:
                self.claimed += claimed
                return claimed

    async def run_takeover(self) -> None:
        """Background loop: :meth:`take_over_once` every :data:`TAKEOVER_SECONDS`."""
        while True:
            await asyncio.sleep(TAKEOVER_SECONDS)
            try:
                await self.take_over_once()
            except FleetcmdError as exc:
                log.warning("outbox takeover failed: %s", exc)

    async def run_registry(self) -> None:
        """Background loop: read the registry back when another replica changed it, at least every :data:`REGISTRY_SECONDS`."""
        while True:
            await self._store.wait_registry_change(REGISTRY_SECONDS)
            try:
                await self.reload_registry()
            except FleetcmdError as exc:
                log.warning("registry refresh failed: %s", exc)

    async def reload_registry(self) -> bool:
        """Read the registry back, in a read that starts after this call (callers waiting meanwhile share it).

        Reads start at most every :data:`RELOAD_MIN_INTERVAL`: a burst of Sends naming unknown
        things reads the store a few times per second, not once per Send.

        Returns:
            True (then look again).
        """
        asked = time.monotonic()
        async with self._reload_lock:
            if self._read_started > asked:
                return True  # a read that began after this call has completed
            pause = self._read_started + RELOAD_MIN_INTERVAL - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            self._read_started = time.monotonic()
            await self._registry.reload()
            self.reloads += 1
        return True
