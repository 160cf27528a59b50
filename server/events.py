"""Fan-out of committed events to live ``Stream`` subscribers.

Publishing never blocks: each subscriber has a bounded buffer, and a
subscriber that falls behind is cut off (it resumes from its last sequence),
so a slow watcher never slows the store, the broker or other watchers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from server.errors import ResourceExhausted, Unavailable
from server.models import EventFilter, StateChange


class Subscription:
    """One live subscriber's bounded buffer."""

    def __init__(self, bus: EventBus, flt: EventFilter, capacity: int) -> None:
        self._bus = bus
        self.filter = flt
        self.capacity = capacity
        self._buffer: deque[StateChange] = deque()
        self._wakeup = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, events: Sequence[StateChange]) -> None:
        """Buffer the events of one commit that match; mark the subscription overflowed when it is behind.

        A commit is taken whole by a subscriber that has drained its buffer, however
        many events it holds (a group commit may hold more than ``capacity``): only
        one still holding earlier events past ``capacity`` is slow.
        """
        if self.overflowed or self.closed:
            return
        matching = [e for e in events if self.filter.matches(e)]
        if not matching:
            return
        if self._buffer and len(self._buffer) + len(matching) > self.capacity:
            self.overflowed = True
            self._buffer.clear()
        else:
            self._buffer.extend(matching)
        self._wakeup.set()

    async def next_batch(self) -> list[StateChange]:
        """Wait for buffered events and take them all.

        Raises:
            ResourceExhausted: the buffer overflowed; resume from the last sequence received.
            Unavailable: the service is shutting down.
        """
        while not self._buffer:
            if self.overflowed:
                raise ResourceExhausted(
                    f"stream buffer of {self.capacity} events overflowed; resume with after_sequence"
                )
            if self.closed:
                raise Unavailable("service is shutting down; resume with after_sequence")
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = list(self._buffer)
        self._buffer.clear()
        return batch

    def close(self) -> None:
        """Stop receiving events (idempotent)."""
        self._bus.unsubscribe(self)


class EventBus:
    """Delivers committed events, in sequence order, to every live subscription."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, flt: EventFilter, capacity: int) -> Subscription:
        """Start buffering events that match ``flt``."""
        if self._closed:
            raise Unavailable("service is shutting down")
        sub = Subscription(self, flt, capacity)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove ``sub`` (idempotent)."""
        self._subscriptions.discard(sub)

    def publish(self, events: Sequence[StateChange]) -> None:
        """Offer committed events to every subscription."""
        for sub in tuple(self._subscriptions):
            sub.offer(events)

    def close(self) -> None:
        """End every subscription (shutdown)."""
        self._closed = True
        for sub in tuple(self._subscriptions):
            sub.closed = True
            sub._wakeup.set()
        self._subscriptions.clear()
