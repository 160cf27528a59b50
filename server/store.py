"""The store interface: the only way the rest of fleetcmd reads or writes durable state.

Nothing outside a store implementation writes SQL. A store applies the
lifecycle (``server.lifecycle.decide``) inside its write transaction, so a
device report racing a timeout or a cancel is decided against the committed
status, and every change is recorded in the append-only event log in the same
transaction as the execution row. Committed events are handed to the
``on_commit`` callback in sequence order, after the commit, in the same
event-loop callback that resolves the callers: no caller resumes before the
listener has seen the events of its commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.lifecycle import Decision, Trigger
from server.models import (
    ActiveExecution,
    ApiKeyRecord,
    DeviceReport,
    EventFilter,
    Execution,
    LastConnection,
    ListQuery,
    NewExecution,
    StateChange,
    ThingRecord,
    ThingTypeRecord,
)

CommitListener = Callable[[Sequence[StateChange]], None]
# Checks a device's result against the action's result schema; returns the violations.
ResultCheck = Callable[[Execution, DeviceReport], list[str]]


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
        result_check: ResultCheck | None = None,
    ) -> TransitionResult:
        """Apply a lifecycle trigger and record what it changed.

        Raises:
            NotFound: no such execution.
            ThingMismatch: ``expect_thing`` is given and is not the execution's thing.
        """

    def transition_nowait(
        self,
        execution_id: str,
        trigger: Trigger,
        *,
        at_ms: int,
        report: DeviceReport | None = None,
        expect_thing: str | None = None,
        result_check: ResultCheck | None = None,
        deferrable: bool = False,
    ) -> asyncio.Future[TransitionResult]:
        """Queue :meth:`transition` and return the future of its result, without a coroutine.

        For callers that apply many triggers and want no task per write: the write is
        queued in call order, and committed whatever becomes of the future. A
        ``deferrable`` write (nobody waits for it) may be held a moment (about a
        millisecond) so that the writes right behind it share its commit.
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

    async def outstanding(self, thing_id: str, action: str, now_ms: int) -> list[Execution]:
        """Non-final, unexpired executions of one Kaa endpoint and command type, by Kaa id."""

    async def execution_id_for_kaa(self, thing_id: str, action: str, kaa_id: int) -> str | None:
        """The execution behind a Kaa command id."""


class RegistryStore(Protocol):
    """Durable things, thing types and API keys (same file, same writer as the executions)."""

    async def load_things(self) -> list[ThingRecord]:
        """Every registered thing."""

    async def load_thing_types(self) -> list[ThingTypeRecord]:
        """Every thing type."""

    async def insert_thing(self, rec: ThingRecord) -> None:
        """Register a thing (AlreadyExists if taken)."""

    async def update_thing(self, thing_id: str, *, thing_type: str, attributes: dict[str, str], at_ms: int) -> None:
        """Replace a thing's type and attributes (NotFound)."""

    async def set_thing_token(self, thing_id: str, token_hash: str, at_ms: int, kaa_token_hash: str = "") -> None:
        """Store new credentials, and a new Kaa endpoint token hash when given (NotFound)."""

    async def delete_thing(self, thing_id: str) -> None:
        """Unregister a thing (NotFound)."""

    async def record_presence(self, connections: Sequence[LastConnection]) -> None:
        """Remember the last connection of each of these things (one write; missing things are ignored)."""

    async def put_thing_type(self, rec: ThingTypeRecord) -> ThingTypeRecord:
        """Create or replace a type; returns it with its new version."""

    async def delete_thing_type(self, name: str) -> None:
        """Delete a type (NotFound; FailedPrecondition while used)."""

    async def insert_api_key(self, rec: ApiKeyRecord) -> None:
        """Store a new API key."""

    async def revoke_api_key(self, key_id: str, at_ms: int) -> None:
        """Revoke a key (NotFound)."""

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """One key by id."""

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key."""
