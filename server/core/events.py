"""Fan-out of committed events to live ``Stream`` subscribers.

Publishing never blocks: each subscriber has a bounded buffer, and a
subscriber that falls behind is cut off (it resumes from its last sequence),
so a slow watcher never slows the store, the broker or other watchers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from server.core.errors import FailedPrecondition, ResourceExhausted, Unavailable
from server.core.models import EventFilter, StateChange


def check_resume(after_sequence: int | None, purged_through: int) -> None:
    """Refuse to resume a stream from a sequence whose successors retention deleted (the replay would have a gap).

    Every stream surface calls it before subscribing (``CommandCore.stream``), and the
    HTTP one also before its answer starts, so the refusal can be an HTTP error.

    Args:
        after_sequence: The last sequence the caller received (None: start live, always allowed).
        purged_through: The highest sequence retention deleted (``Store.purged_through``).

    Raises:
        FailedPrecondition: events after ``after_sequence`` were deleted.
    """
    if after_sequence is not None and after_sequence < purged_through:
        raise FailedPrecondition(
            f"events up to sequence {purged_through} were deleted by retention (retention_days); "
            f"resume with after_sequence >= {purged_through} (the oldest sequence available is {purged_through + 1})"
        )


class StreamBatch(NamedTuple):
    """Events a Stream hands on together, in sequence order."""

    events: list[StateChange]
    # True: published by the bus, so every live subscriber holds these very objects (what
    # lets a surface encode an event once for all of them); False: read from the log for one caller.
    live: bool


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

    def offer(self, matching: Sequence[StateChange]) -> None:
        """Buffer the events of one commit that match; mark the subscription overflowed when it is behind.

        A commit is taken whole by a subscriber that has drained its buffer, however
        many events it holds (a group commit may hold more than ``capacity``): only
        one still holding earlier events past ``capacity`` is slow.

        Args:
            matching: The commit's events that pass this subscription's filter, in order
                (the bus filters once per distinct filter, not once per subscriber).
        """
        if self.overflowed or self.closed or not matching:
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
                raise ResourceExhausted(f"stream buffer of {self.capacity} events overflowed; resume with after_sequence")
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
        # Subscriptions for one execution (``CommandCore.wait`` makes one per waiting Send) are
        # found by the event's execution id: a commit costs the same with 0 or 10,000 of them.
        self._by_execution: dict[str, set[Subscription]] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._subscriptions) + sum(len(subs) for subs in self._by_execution.values())

    def subscribe(self, flt: EventFilter, capacity: int) -> Subscription:
        """Start buffering events that match ``flt``."""
        if self._closed:
            raise Unavailable("service is shutting down")
        sub = Subscription(self, flt, capacity)
        if flt.execution_id:
            self._by_execution.setdefault(flt.execution_id, set()).add(sub)
        else:
            self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove ``sub`` (idempotent)."""
        key = sub.filter.execution_id
        if not key:
            self._subscriptions.discard(sub)
            return
        subs = self._by_execution.get(key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_execution[key]

    def publish(self, events: Sequence[StateChange]) -> None:
        """Offer committed events to every subscription."""
        # Watchers usually share a few filters (often none at all): filter once per distinct filter.
        matched: dict[EventFilter, Sequence[StateChange]] = {}
        for sub in tuple(self._subscriptions):
            flt = sub.filter
            matching = matched.get(flt)
            if matching is None:
                matching = events if flt == _EVERYTHING else [e for e in events if flt.matches(e)]
                matched[flt] = matching
            sub.offer(matching)
        if self._by_execution:
            per_sub: dict[Subscription, list[StateChange]] = {}
            for event in events:
                for sub in self._by_execution.get(event.execution_id, ()):
                    if sub.filter.matches(event):
                        per_sub.setdefault(sub, []).append(event)
            for sub, matching in per_sub.items():
                sub.offer(matching)

    def close(self) -> None:
        """End every subscription (shutdown)."""
        self._closed = True
        every = [*self._subscriptions, *(sub for subs in self._by_execution.values() for sub in subs)]
        for sub in every:
            sub.closed = True
            sub._wakeup.set()
        self._subscriptions.clear()
        self._by_execution.clear()


_EVERYTHING = EventFilter()
