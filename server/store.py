"""The store interface: the only way the rest of fleetcmd reads or writes durable state.

Nothing outside a store implementation writes SQL. A store applies the
lifecycle (``server.lifecycle.decide``) inside its write transaction, so a
device report racing a timeout or a cancel is decided against the committed
status, and every change is recorded in the append-only event log in the same
transaction as the execution row. Committed events are handed to the
``on_commit`` callback in sequence order, after the commit and before the
writer resolves the callers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.lifecycle import Decision, Trigger
from server.models import (
    ActiveExecution,
    DeviceReport,
    EventFilter,
    Execution,
    ListQuery,
    NewExecution,
    StateChange,
)

CommitListener = Callable[[Sequence[StateChange]], None]


@dataclass(frozen=True)
class CreateResult:
    """Outcome of :meth:`Store.create`."""

    execution: Execution
    created: bool  # False when an idempotent retry returned the existing execution
    event: StateChange | None


@dataclass(frozen=True)
class TransitionResult:
    """Outcome of :meth:`Store.transition`."""

    execution: Execution
    decision: Decision
    event: StateChange | None  # the recorded change or late report, if any


@dataclass(frozen=True)
class ListPage:
    """One page of executions, newest first."""

    executions: list[Execution]
    # Keyset position for the next page, None when this is the last page.
    next_before_index: int | None


class Store(Protocol):
    """Durable executions and their event log."""

    async def create(self, new: NewExecution) -> CreateResult:
        """Insert an execution and its first event.

        Raises:
            AlreadyExists: the idempotency key is taken by a different request.
        """

    async def transition(
        self,
        execution_id: str,
        trigger: Trigger,
        *,
        at_ms: int,
        report: DeviceReport | None = None,
        expect_thing: str | None = None,
    ) -> TransitionResult:
        """Apply a lifecycle trigger and record what it changed.

        Raises:
            NotFound: no such execution.
            ThingMismatch: ``expect_thing`` is given and is not the execution's thing.
        """

    async def get(self, execution_id: str, *, with_history: bool = False) -> Execution | None:
        """Read one execution."""

    async def get_many(self, execution_ids: Sequence[str]) -> list[Execution]:
        """Read several executions (missing ids are skipped), in creation order."""

    async def list_executions(self, query: ListQuery) -> ListPage:
        """Page through executions newest first."""

    async def events_after(self, after_sequence: int, flt: EventFilter, limit: int) -> list[StateChange]:
        """Events with a sequence above ``after_sequence`` that match ``flt``, oldest first."""

    async def last_sequence(self) -> int:
        """The highest committed sequence (0 when the log is empty)."""

    async def active(self) -> list[ActiveExecution]:
        """Every non-final execution, oldest first."""
