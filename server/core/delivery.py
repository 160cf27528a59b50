"""The outbox: getting each request to its device at least once.

amqtt keeps nothing across a broker restart, drops a QoS 1 message that was
not PUBACKed and never retries it. So fleetcmd keeps its own outbox: every
active execution that the device has not acknowledged yet (QUEUED or SENT) is
held here by id (its payload stays in SQLite, so memory does not grow with
params), and is published whenever its device is connected and subscribed:
at once on Send, and again on every (re)connect or subscribe until the device
PUBACKs it or the execution ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from broker_hooks.broker import Delivery
from server.core.errors import FleetcmdError
from server.core.lifecycle import Outcome, Status
from server.core.models import Execution
from server.core.records import fast_init
from server.store import Store, TransitionResult

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class DeviceLink(Protocol):
    """The part of the broker the outbox uses."""

    def subscription_qos(self, client_id: str, topic: str) -> int | None:
        """QoS of the client's matching subscription, None when it would not receive ``topic``."""

    def is_connected(self, client_id: str) -> bool:
        """Whether the client has a live connection."""

    async def deliver(self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None) -> Delivery:
        """Publish to one client and report the outcome."""

    def deliver_nowait(
        self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None
    ) -> Delivery | asyncio.Future[None] | None:
        """Publish without waiting: the outcome, a future done on the PUBACK, or None (use ``deliver``)."""


@fast_init
@dataclass(frozen=True)
class Message:
    """One publish of a request to one client; ``qos`` None means "at the client's subscription QoS"."""

    client_id: str
    topic: str
    payload: bytes
    qos: int | None = None


class Route(Protocol):
    """How a dialect reaches a thing: when it can, and with which publishes."""

    def ready(self, thing_id: str) -> bool:
        """Whether a request for ``thing_id`` would reach a connected device now."""

    def messages(self, execution: Execution) -> list[Message]:
        """The publishes that deliver ``execution`` now (empty: not reachable)."""


_RANK = {Delivery.ACKED: 0, Delivery.SENT: 1, Delivery.FAILED: 2, Delivery.NOT_SUBSCRIBED: 3, Delivery.NOT_CONNECTED: 4}


class DeliveryMarks(Protocol):
    """Where the outbox records what it delivered (the control plane, which owns every state change)."""

    def mark_published(self, execution_id: str, at_ms: int | None = None) -> Awaitable[TransitionResult]:
        """Record QUEUED -> SENT."""

    def mark_delivered_nowait(self, execution_id: str) -> asyncio.Future[TransitionResult]:
        """Queue DELIVERED (the PUBACK), deferrable."""


class Outbox:
    """Pending requests per thing, and the publishing of them."""

    def __init__(self, store: Store, marks: DeliveryMarks, spawn: Spawn) -> None:
        self._store = store  # reads only
        self._marks = marks
        self._spawn = spawn
        self._link: DeviceLink | None = None
        # Which route reaches a thing (the core asks the attached dialects).
        self.route_for: Callable[[str], Route | None] = lambda _thing_id: None
        # Told each request a publish handed over for good (SENT: an external broker's PUBACK), so that
        # replicas record it and do not publish it again after its lease (server/core/replica.py).
        self.handed: Callable[[str], None] | None = None
        self._pending: dict[str, dict[str, None]] = {}  # thing -> ordered execution ids
        self._inflight: set[str] = set()
        # In flight while its device (re)connected: if that attempt fails, flush again.
        self._retry: set[str] = set()
        self._flushing: set[str] = set()
        self._dirty: set[str] = set()
        self.published = 0
        self.acked = 0

    def attach(self, link: DeviceLink) -> None:
        """Connect the outbox to the broker once it exists."""
        self._link = link

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._pending.values())

    def ready(self, thing_id: str) -> bool:
        """Whether a request for ``thing_id`` would reach a connected device now."""
        route = self.route_for(thing_id)
        return route is not None and route.ready(thing_id)

    def hold(self, thing_id: str, execution_id: str) -> None:
        """Keep an execution until its device acknowledges it (restored after a restart)."""
        self._pending.setdefault(thing_id, {})[execution_id] = None

    def add(self, execution: Execution) -> bool:
        """Hold a new execution; publish it at once when it was created SENT (device ready).

        Returns:
            Whether a publish task was started, which has not written the request yet
            (usually the request is written at once, without a task).
        """
        self.hold(execution.thing_id, execution.execution_id)
        if execution.status is Status.SENT:
            return self._start_publish(execution)
        return False

    def discard(self, thing_id: str, execution_id: str) -> None:
        """Forget an execution that was acknowledged or ended."""
        ids = self._pending.get(thing_id)
        if ids is not None:
            ids.pop(execution_id, None)
            if not ids:
                del self._pending[thing_id]

    def pending_things(self) -> list[str]:
        """The things this outbox holds requests for."""
        return list(self._pending)

    def device_available(self, thing_id: str) -> None:
        """The device connected or subscribed: publish what waits for it."""
        if thing_id not in self._pending:
            return
        if thing_id in self._flushing:
            self._dirty.add(thing_id)
            return
        self._flushing.add(thing_id)
        self._spawn(self._flush(thing_id), f"outbox-flush-{thing_id}")

    async def _flush(self, thing_id: str) -> None:
        try:
            while True:
                self._dirty.discard(thing_id)
                if self.ready(thing_id):
                    await self._flush_once(thing_id)
                if thing_id not in self._dirty:
                    return
        except Exception:
            log.exception("outbox flush for %s failed", thing_id)
        finally:
            self._flushing.discard(thing_id)

    async def _flush_once(self, thing_id: str) -> None:
        pending = self._pending.get(thing_id, {})
        self._retry.update(i for i in pending if i in self._inflight)
        ids = [i for i in pending if i not in self._inflight]
        for execution in await self._store.get_many(ids):
            if execution.status is Status.QUEUED:
                try:
                    result = await self._marks.mark_published(execution.execution_id)
                except FleetcmdError:
                    log.exception("could not mark %s as sent", execution.execution_id)
                    continue
                if result.decision.outcome is Outcome.CHANGE:
                    self._start_publish(result.execution)
            elif execution.status is Status.SENT:
                self._start_publish(execution)  # sent before but never acknowledged: again
            else:
                self.discard(thing_id, execution.execution_id)

    def _acked(self, execution: Execution, future: asyncio.Future[TransitionResult]) -> None:
        # The DELIVERED transition is committed (or failed): only now is the publish over.
        try:
            if not future.cancelled():
                exc = future.exception()
                if exc is None:
                    self.discard(execution.thing_id, execution.execution_id)
                else:
                    log.error("could not record the PUBACK of %s", execution.execution_id, exc_info=exc)
        finally:
            self._published(execution)

    def _start_publish(self, execution: Execution) -> bool:
        """Publish ``execution`` unless a publish of it is under way.

        The common case needs no task: one publish, which the connection takes at once; the
        outcome, or the PUBACK's callback, finishes it. Anything else goes through ``deliver``
        in a task.

        Returns:
            Whether a publish task was started (a caller may yield so that it writes first);
            False also when the request was written at once, without a task.
        """
        if execution.execution_id in self._inflight:
            return False
        self._inflight.add(execution.execution_id)
        link, route = self._link, self.route_for(execution.thing_id)
        if link is None or route is None:
            self._published(execution)  # stays pending for the next connect
            return False
        try:
            messages = route.messages(execution)
            outcome = None
            if len(messages) == 1:
                m = messages[0]
                outcome = link.deliver_nowait(m.client_id, m.topic, m.payload, qos=m.qos)
        except Exception:
            log.exception("publishing %s failed", execution.execution_id)
            self._published(execution)
            return False
        if isinstance(outcome, Delivery):
            self._delivered(execution, outcome)
        elif outcome is not None:
            outcome.add_done_callback(functools.partial(self._puback, execution))
        elif not messages:
            self._published(execution)  # no publish reaches it now: pending for the next connect
        else:
            self._spawn(self._publish(execution, link, messages), f"deliver-{execution.execution_id}")
            return True
        return False

    def _puback(self, execution: Execution, waiter: asyncio.Future[None]) -> None:
        # No PUBACK in time, or the connection ended: what deliver() reports as FAILED.
        failed = waiter.cancelled() or waiter.exception() is not None
        self._delivered(execution, Delivery.FAILED if failed else Delivery.ACKED)

    async def _publish(self, execution: Execution, link: DeviceLink, messages: list[Message]) -> None:
        try:
            outcomes = [await link.deliver(m.client_id, m.topic, m.payload, qos=m.qos) for m in messages]
        except asyncio.CancelledError:
            self._published(execution)
            raise
        except Exception:
            log.exception("publishing %s failed", execution.execution_id)
            self._published(execution)
            return
        # Acknowledged by any connection of the device is delivered.
        self._delivered(execution, min(outcomes, key=_RANK.__getitem__))

    def _delivered(self, execution: Execution, outcome: Delivery) -> None:
        """Record a publish's outcome; the publish is over here, or once DELIVERED is committed."""
        acked: asyncio.Future[TransitionResult] | None = None
        try:
            if outcome in (Delivery.ACKED, Delivery.SENT):
                self.published += 1
            if outcome is Delivery.ACKED:
                self.acked += 1
                # Queued at once, so it reaches the store ahead of the device's answer that
                # followed the PUBACK; deferrable, so that answer can share its commit.
                # _acked finishes the publish once DELIVERED is committed.
                acked = self._marks.mark_delivered_nowait(execution.execution_id)
                acked.add_done_callback(functools.partial(self._acked, execution))
            elif outcome is Delivery.SENT:
                # A QoS 0 subscription cannot acknowledge: sent once is all MQTT offers. An external
                # broker's PUBACK: the device's session there holds it.
                self.discard(execution.thing_id, execution.execution_id)
                if self.handed is not None:
                    self.handed(execution.execution_id)
            # Otherwise it stays pending and goes out again on the next connect or subscribe.
        except Exception:
            log.exception("recording the publish of %s failed", execution.execution_id)
        finally:
            if acked is None:
                self._published(execution)

    def _published(self, execution: Execution) -> None:
        self._inflight.discard(execution.execution_id)
        if execution.execution_id in self._retry:
            self._retry.discard(execution.execution_id)
            # Still not acknowledged (e.g. it went to a connection that was being replaced).
            if execution.execution_id in self._pending.get(execution.thing_id, ()):
                self.device_available(execution.thing_id)
