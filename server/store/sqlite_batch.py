"""The batch transaction of :class:`server.store.sqlite.SqliteStore`: queued writes and how they are planned and written.

An :class:`Op` is one queued write; a :class:`Tx` is the transaction one batch of them runs
in. Creates and transitions are *planned* (:func:`plan_create`, :func:`plan_transition`):
they only read through the :class:`Tx` (the execution as this transaction sees it, the
execution an idempotency key made, the highest Kaa id) and hand that to the pure rules of
:mod:`server.core.decisions`, which return what to write; the batch writes it at the end. Nothing
here decides what a trigger does to an execution.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.core import decisions
from server.core.decisions import Change
from server.core.lifecycle import Trigger
from server.core.models import DeviceReport, Execution, NewExecution, StateChange
from server.store import CreateResult, ResultCheck, TransitionResult
from server.store.rows import reason_columns, violations_column
from server.store.sqlite_schema import (
    INSERT_EVENT,
    INSERT_EXECUTION,
    SELECT_BY_KEY,
    SELECT_EXECUTION,
    SELECT_MAX_KAA,
    UPDATE_EXECUTION,
    event_row,
    execution_from_row,
)


@dataclass(slots=True)
class Op:
    """One queued write.

    A *planned* operation (create, transition) only reads: it returns ``(result,
    change)`` and the batch writes the change, so an operation that raises has
    changed nothing and needs no savepoint of its own. Any other operation runs
    its own SQL inside a savepoint.
    """

    fn: Callable[[Tx], Any]
    future: asyncio.Future[Any]
    planned: bool
    deferrable: bool = False  # may wait DEFER_LINGER for company
    # Its caller resumes before the commit is announced: a Send about to publish its request,
    # which is the longer path. Others' callbacks (a PUBACK to write) run after the announcement.
    ahead: bool = False
    result: Any = None
    error: BaseException | None = None


Undo = tuple[str | None, Execution | None, tuple[str, str] | None, int | None, int, int]


class Tx:
    """One batch transaction: the connection, the event numbering and the executions written so far.

    ``rows`` holds the state of every execution this transaction wrote, so later
    operations of the same batch see it before it reaches SQLite; ``flush``
    writes what is pending with one ``executemany`` per statement.
    """

    def __init__(self, conn: sqlite3.Connection, next_seq: int, cache: dict[str, Execution]) -> None:
        self.conn = conn
        self.next_seq = next_seq
        self._cache = cache
        self.rows: dict[str, Execution] = {}
        self.events: list[StateChange] = []
        self._fingerprints: dict[str, str] = {}  # executions created in this transaction
        self._keys: dict[str, str] = {}  # idempotency key -> execution created in this transaction
        self._kaa: dict[tuple[str, str], int] = {}  # highest Kaa id given out in this transaction
        self._insert: dict[str, None] = {}  # pending, in creation order
        self._update: set[str] = set()
        self._flushed_events = 0

    # ---- reads (planned operations) ----

    def lookup(self, execution_id: str) -> Execution | None:
        """The execution as this transaction sees it (its own writes included)."""
        found = self.rows.get(execution_id) or self._cache.get(execution_id)
        if found is not None:
            return found
        row = self.conn.execute(SELECT_EXECUTION, (execution_id,)).fetchone()
        return execution_from_row(row) if row is not None else None

    def by_idempotency_key(self, key: str) -> tuple[Execution, str] | None:
        """The execution created with ``key`` and its request fingerprint, if any."""
        execution_id = self._keys.get(key)
        if execution_id is not None:
            return self.rows[execution_id], self._fingerprints[execution_id]
        row = self.conn.execute(SELECT_BY_KEY, (key,)).fetchone()
        if row is None:
            return None
        return self.rows.get(row[1]) or execution_from_row(row), row[-1] or ""

    def highest_kaa_id(self, thing_id: str, action: str) -> int:
        """The highest Kaa command id of ``thing_id``/``action`` so far (this transaction's included), 0 for none."""
        stored: int = self.conn.execute(SELECT_MAX_KAA, (thing_id, action)).fetchone()[0]
        return max(stored, self._kaa.get((thing_id, action), 0))

    # ---- writes ----

    def apply(self, change: Change) -> Undo:
        """Take a planned operation's change; returns what :meth:`undo` needs to forget it."""
        eid: str | None = None
        previous: Execution | None = None
        kaa_key: tuple[str, str] | None = None
        previous_kaa: int | None = None
        undo_point = (len(self.events), self.next_seq)
        ex = change.execution
        if ex is not None:
            eid = ex.execution_id
            previous = self.rows.get(eid)
            self.rows[eid] = ex
            if change.created:
                self._insert[eid] = None
                self._fingerprints[eid] = change.fingerprint
                if ex.idempotency_key:
                    self._keys[ex.idempotency_key] = eid
                if ex.kaa_id is not None:
                    kaa_key = (ex.thing_id, ex.action)
                    previous_kaa = self._kaa.get(kaa_key)
                    self._kaa[kaa_key] = ex.kaa_id
            elif eid not in self._insert:  # a pending insert already writes the latest state
                self._update.add(eid)
        if change.event is not None:
            # Numbered when planned: nothing runs between planning and applying.
            assert change.event.sequence == self.next_seq
            self.events.append(change.event)
            self.next_seq += 1
        return (eid, previous, kaa_key, previous_kaa, *undo_point)

    def undo(self, undo: Undo) -> None:
        """Forget the last applied change (its flush failed and was rolled back)."""
        eid, previous, kaa_key, previous_kaa, n_events, seq = undo
        if eid is not None:
            if previous is None:
                self.rows.pop(eid, None)
            else:
                self.rows[eid] = previous
            if eid in self._insert:  # created by the operation being undone
                del self._fingerprints[eid]
                self._keys = {k: v for k, v in self._keys.items() if v != eid}
        if kaa_key is not None:
            if previous_kaa is None:
                self._kaa.pop(kaa_key, None)
            else:
                self._kaa[kaa_key] = previous_kaa
        del self.events[n_events:]
        self.next_seq = seq
        self._flushed_events = min(self._flushed_events, n_events)
        self._insert.clear()
        self._update.clear()

    def flush(self) -> None:
        """Write the pending execution rows and events."""
        conn = self.conn
        if self._insert:
            conn.executemany(INSERT_EXECUTION, [self._insert_row(eid) for eid in self._insert])
            self._insert.clear()
        if self._update:
            conn.executemany(UPDATE_EXECUTION, [self._update_row(eid) for eid in self._update])
            self._update.clear()
        if self._flushed_events < len(self.events):
            conn.executemany(INSERT_EVENT, [event_row(e) for e in self.events[self._flushed_events :]])
            self._flushed_events = len(self.events)

    def _insert_row(self, execution_id: str) -> tuple[Any, ...]:
        ex = self.rows[execution_id]
        return (
            ex.execution_id,
            ex.command_id,
            ex.thing_id,
            ex.action,
            ex.params_json,
            ex.ttl_seconds,
            int(ex.status),
            ex.result_json,
            *reason_columns(ex.reason),
            ex.created_at_ms,
            ex.updated_at_ms,
            ex.completed_at_ms,
            ex.expires_at_ms,
            ex.idempotency_key or None,
            self._fingerprints[execution_id] or None,
            ex.thing_type or None,
            violations_column(ex),
            ex.kaa_id,
            ex.rerun_of or None,
            ex.job_id or None,
            ex.retry_of or None,
            ex.job_attempt or None,
        )

    def _update_row(self, execution_id: str) -> tuple[Any, ...]:
        ex = self.rows[execution_id]
        return (
            int(ex.status),
            ex.updated_at_ms,
            ex.completed_at_ms,
            ex.result_json,
            *reason_columns(ex.reason),
            violations_column(ex),
            execution_id,
        )


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def plan_create(tx: Tx, new: NewExecution) -> tuple[CreateResult, Change | None]:
    """Plan the creation of ``new``: read what :mod:`server.core.decisions` needs, and let it decide."""
    # Planned: reads only; what it returns is written by the batch.
    if new.idempotency_key:
        existing = tx.by_idempotency_key(new.idempotency_key)
        if existing is not None:
            return decisions.idempotent_retry(new, *existing), None
    kaa_id = decisions.next_kaa_id(tx.highest_kaa_id(new.thing_id, new.action)) if new.kaa else None
    return decisions.create(new, kaa_id, tx.next_seq)


def plan_transition(
    tx: Tx,
    execution_id: str,
    trigger: Trigger,
    at_ms: int,
    report: DeviceReport | None,
    expect_thing: str | None,
    result_check: ResultCheck | None,
) -> tuple[TransitionResult, Change | None]:
    """Plan one lifecycle trigger on an execution: its current state as this transaction sees it, decided."""
    # Planned: reads only (everything that can raise happens here); the batch writes the change.
    return decisions.transition(
        tx.lookup(execution_id), execution_id, trigger, at_ms, report, expect_thing, result_check, tx.next_seq
    )
