"""The batch transaction of :class:`server.store.postgres.PostgresStore`: queued writes, how they are planned and written.

An :class:`Op` is one queued write; a :class:`Batch` runs a list of them in one transaction:

1. it locks every execution the batch's transitions name (one ``SELECT ... FOR UPDATE`` in id
   order) and reads the executions the batch's idempotency keys made (one query);
2. each write is *planned* against that (plus what the batch itself wrote before it) by the pure
   rules of :mod:`server.core.decisions`, its events numbered locally (1, 2, ...); registry writes
   run their own SQL in a savepoint;
3. the rows go out together: one ``executemany`` of new executions, one guarded ``UPDATE`` of the
   changed ones (each only from the status its decision saw; a row that moved anyway means the
   batch runs again), then the batch takes its numbers from the event counter (its row lock held
   until the commit orders the batches of every replica), writes its events and sends one NOTIFY.

A job's dispatch (:func:`plan_dispatch`) is planned the same way: it checks that the dispatching replica's lock
connection is still the job's lock owner (under the job's row lock), locks the targets it starts, marks
them, and applies their executions' creation, so they commit with their events and marks or not at all.

Nothing here decides what a trigger does to an execution.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from server.core import decisions
from server.core.decisions import Change
from server.core.errors import Unavailable
from server.core.jobs import Job
from server.core.lifecycle import Outcome, Status, Trigger
from server.core.models import DeviceReport, Execution, NewExecution, StateChange, job_event
from server.store import CreateResult, JobDispatch, JobLockLost, ResultCheck, TargetState, TransitionResult
from server.store.postgres_schema import (
    EXEC_COLUMNS,
    FIRST_FINAL,
    INSERT_EVENTS,
    INSERT_EXECUTION,
    SELECT_BY_KEYS,
    SELECT_LOCKED,
    SELECT_MAX_KAA,
    TAKE_SEQUENCES,
    UPDATE_GUARDED,
    event_arrays,
    execution_from_row,
    execution_row,
    update_arrays,
)

CHANNEL = "fleetcmd_events"

# SQLSTATEs that mean "another writer got there first": run the batch again, it will see that commit.
CONFLICTS = frozenset({"40001", "40P01", "23505"})  # serialization failure, deadlock, unique violation
# For registry writes a unique violation is the caller's answer (a taken id), not a conflict.
CALL_CONFLICTS = frozenset({"40001", "40P01"})

SELECT_DUE = (
    f"SELECT {EXEC_COLUMNS} FROM executions WHERE status < {FIRST_FINAL} AND expires_at <= $1"
    " ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED"
)


# What a lost or refused connection raises (the database restarted, a network cut): the store is
# unavailable; it ends a whole batch (nothing of it is durable), never one write.
LOST = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError)


class Retry(Exception):
    """The batch conflicted with another writer: roll it back and run it again."""


@dataclass(slots=True)
class Op:
    """One queued write: a planned one (``create``, ``transition``, ``expire_due``, ``job_dispatch``) or a ``call`` (own SQL).

    A ``job_call`` is a call that also writes job events: its function gets the connection and a list
    it appends ``(job, at_ms)`` to; they are numbered with the batch's other events if it succeeds.
    """

    kind: str
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    deferrable: bool = False  # may wait DEFER_LINGER for company
    ahead: bool = False  # its caller resumes before the commit is announced (see SqliteStore._complete)
    result: Any = None
    error: BaseException | None = None

    def resolve(self) -> None:
        """Hand the caller its result or error (unless it went away; the write happened anyway)."""
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.result)


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


class Batch:
    """One batch transaction: what it read under lock, what it wrote so far, its locally numbered events."""

    def __init__(self, conn: asyncpg.Connection, replica: str, lease_ms: int, *, isolate: bool = False) -> None:
        self.conn = conn
        # Every write in its own savepoint, written at once: the last resort when the batch as a whole failed.
        self.isolate = isolate
        self.replica = replica
        self.lease_ms = lease_ms
        self.rows: dict[str, Execution] = {}  # every execution as this transaction sees it
        self.expected: dict[str, int] = {}  # committed status read under lock: the guard of the update
        self.keys: dict[str, tuple[Execution, str]] = {}  # idempotency key -> execution and its fingerprint
        self.kaa: dict[tuple[str, str], int] = {}  # highest Kaa id per thing and action, this batch's included
        self.inserts: dict[str, str] = {}  # new executions (creation order) -> fingerprint
        self.updates: dict[str, None] = {}  # changed existing executions
        self.events: list[StateChange] = []  # numbered 1, 2, ... until the counter gives their sequences
        self.first_seq = 0  # the first sequence of this batch's events once numbered (0: none)

    # ---- reads (planning) ----

    def local_sequence(self) -> int:
        """The local number of the next event (its sequence is given at the end)."""
        return len(self.events) + 1

    async def highest_kaa_id(self, thing_id: str, action: str) -> int:
        """The highest Kaa command id of ``thing_id``/``action`` so far (this batch's included), 0 for none."""
        key = (thing_id, action)
        if key not in self.kaa:
            self.kaa[key] = int(await self.conn.fetchval(SELECT_MAX_KAA, thing_id, action))
        return self.kaa[key]

    def lock_read(self, rows: list[asyncpg.Record]) -> None:
        """Take executions read under lock (those this batch already holds keep their state)."""
        for row in rows:
            execution_id = row[1]
            if execution_id not in self.rows:
                self.rows[execution_id] = execution_from_row(row)
                self.expected[execution_id] = row[7]

    # ---- writes ----

    def apply(self, change: Change) -> None:
        """Take one planned change."""
        ex = change.execution
        if ex is not None:
            eid = ex.execution_id
            self.rows[eid] = ex
            if change.created:
                self.inserts[eid] = change.fingerprint
                if ex.idempotency_key:
                    self.keys[ex.idempotency_key] = (ex, change.fingerprint)
                if ex.kaa_id is not None:
                    self.kaa[(ex.thing_id, ex.action)] = ex.kaa_id
            elif eid not in self.inserts:  # a pending insert already writes the latest state
                self.updates[eid] = None
        if change.event is not None:
            assert change.event.sequence == self.local_sequence()
            self.events.append(change.event)

    def _snapshot(self) -> tuple[Any, ...]:
        return (dict(self.rows), dict(self.keys), dict(self.kaa), dict(self.inserts), dict(self.updates), len(self.events))

    def _restore(self, snap: tuple[Any, ...]) -> None:
        self.rows, self.keys, self.kaa, self.inserts, self.updates, n_events = snap
        del self.events[n_events:]

    async def run(self, ops: list[Op]) -> None:
        """Plan and write ``ops`` in the open transaction (each in its own savepoint when isolated).

        Raises:
            Retry: another writer got there first (roll back and run the batch again).
        """
        conn = self.conn
        ids = sorted({op.args[0] for op in ops if op.kind == "transition"})
        if ids:
            self.lock_read(await conn.fetch(SELECT_LOCKED, ids))
        keys = [op.args[0].idempotency_key for op in ops if op.kind == "create" and op.args[0].idempotency_key]
        if keys:
            for row in await conn.fetch(SELECT_BY_KEYS, keys):
                self.keys[row[15]] = (execution_from_row(row), row[23] or "")
        for op in ops:
            op.result = op.error = None
            if op.kind in ("call", "job_call"):
                await self._call(op)
            elif self.isolate:
                await self._isolated(op)
            else:
                try:
                    op.result = await PLANS[op.kind](self, *op.args)
                except asyncpg.PostgresError as exc:
                    # The transaction is aborted: nothing more of this batch can run in it.
                    if _sqlstate(exc) in CONFLICTS:
                        raise Retry(str(exc)) from exc
                    raise
                except Exception as exc:  # noqa: BLE001 - a planning failure belongs to its caller and changed nothing
                    op.error = exc
        if not self.isolate:
            await self._write_rows()
        await self._write_events(ops)

    async def _call(self, op: Op) -> None:
        jobs: list[tuple[Job, int]] = []
        try:
            async with self.conn.transaction():  # a savepoint: a failing write undoes only itself
                if op.kind == "job_call":
                    op.result = await op.args[0](self.conn, jobs)
                else:
                    op.result = await op.args[0](self.conn)
            # Its job events only once its savepoint stands (numbered by the counter with the others at the end).
            for job, at_ms in jobs:
                self.events.append(job_event(self.local_sequence(), job, at_ms))
        except LOST:
            raise
        except asyncpg.PostgresError as exc:
            if _sqlstate(exc) not in CALL_CONFLICTS:
                op.error = exc
            elif self.isolate:
                op.error = Unavailable(f"write conflicted with another replica: {exc}")
            else:
                raise Retry(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - every failure belongs to its caller
            op.error = exc

    async def _isolated(self, op: Op) -> None:
        snap = self._snapshot()
        try:
            async with self.conn.transaction():
                op.result = await PLANS[op.kind](self, *op.args)
                await self._write_rows()
        except LOST:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure belongs to its caller
            self._restore(snap)
            op.result = None
            conflict = isinstance(exc, Retry) or _sqlstate(exc) in CONFLICTS
            op.error = Unavailable(f"write conflicted with another replica: {exc}") if conflict else exc

    async def _write_rows(self) -> None:
        conn = self.conn
        try:
            if self.inserts:
                await conn.executemany(
                    INSERT_EXECUTION,
                    [execution_row(self.rows[eid], fp, self.replica, self.lease_ms) for eid, fp in self.inserts.items()],
                )
                self.inserts.clear()
            if self.updates:
                updates = [(self.rows[eid], self.expected[eid]) for eid in self.updates]
                changed = await conn.fetch(UPDATE_GUARDED, *update_arrays(updates))
                if len(changed) != len(updates):
                    raise Retry(f"{len(updates) - len(changed)} execution(s) changed under the batch")
                for eid in self.updates:  # the next write of this batch guards against what it wrote
                    self.expected[eid] = int(self.rows[eid].status)
                self.updates.clear()
        except asyncpg.PostgresError as exc:
            if _sqlstate(exc) in CONFLICTS:
                raise Retry(str(exc)) from exc
            raise

    async def _write_events(self, ops: list[Op]) -> None:
        """Number the batch's events from the counter, write them, NOTIFY, and give the callers their numbered events."""
        if not self.events:
            return
        conn = self.conn
        n = len(self.events)
        last = int(await conn.fetchval(TAKE_SEQUENCES, n))
        base = last - n
        numbered = [dataclasses.replace(e, sequence=base + e.sequence) for e in self.events]
        await conn.execute(INSERT_EVENTS, *event_arrays(numbered))
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(last))
        self.first_seq = base + 1
        self.events = numbered
        for op in ops:
            if op.error is None and op.result is not None:
                op.result = self._renumbered(op.result, base)

    def _renumbered(self, result: Any, base: int) -> Any:
        if isinstance(result, list):
            return [self._renumbered(r, base) for r in result]
        event = getattr(result, "event", None)
        if event is None:
            return result
        return dataclasses.replace(result, event=self.events[event.sequence - 1])


async def plan_create(b: Batch, new: NewExecution) -> CreateResult:
    """Plan the creation of ``new``: what the decisions need, read in this transaction, decided and applied."""
    if new.idempotency_key:
        existing = b.keys.get(new.idempotency_key)
        if existing is not None:
            return decisions.idempotent_retry(new, *existing)
    kaa_id = decisions.next_kaa_id(await b.highest_kaa_id(new.thing_id, new.action)) if new.kaa else None
    result, change = decisions.create(new, kaa_id, b.local_sequence())
    b.apply(change)
    return result


async def plan_transition(
    b: Batch,
    execution_id: str,
    trigger: Trigger,
    at_ms: int,
    report: DeviceReport | None,
    expect_thing: str | None,
    result_check: ResultCheck | None,
) -> TransitionResult:
    """Plan one trigger against the execution as this transaction holds it (locked at the batch's start)."""
    result, change = decisions.transition(
        b.rows.get(execution_id), execution_id, trigger, at_ms, report, expect_thing, result_check, b.local_sequence()
    )
    if change is not None:
        b.apply(change)
    return result


async def plan_expire_due(b: Batch, now_ms: int, limit: int) -> list[TransitionResult]:
    """Time out the due executions no other transaction holds (``SKIP LOCKED``: another replica's sweep takes those)."""
    rows = await b.conn.fetch(SELECT_DUE, now_ms, limit)
    b.lock_read(rows)
    expired: list[TransitionResult] = []
    for row in rows:
        execution_id = row[1]
        result, change = decisions.transition(
            b.rows[execution_id], execution_id, Trigger.EXPIRED, now_ms, None, None, None, b.local_sequence()
        )
        if change is not None:
            b.apply(change)
        if result.decision.outcome is Outcome.CHANGE:
            expired.append(result)
    return expired


# Dispatch: the job's targets it starts, locked in thing order (two dispatchers of one job never
# cross), then marked by the same transaction that inserts their executions.
_LOCK_TARGETS = (
    "SELECT thing_id, state, attempt FROM job_targets WHERE job_id = $1 AND thing_id = ANY($2::text[])"
    " ORDER BY thing_id FOR UPDATE"
)
_MARK_DISPATCHED = (
    "UPDATE job_targets AS t SET state = 1, attempt = u.attempt, execution_id = u.execution_id, dispatched_at = $2,"
    " status = NULL, due_at = NULL FROM unnest($3::text[], $4::integer[], $5::text[]) AS u(thing_id, attempt, execution_id)"
    " WHERE t.job_id = $1 AND t.thing_id = u.thing_id"
)
_MARK_REJECTED = (
    "UPDATE job_targets AS t SET state = 4, attempt = u.attempt, status = $2, reason = u.reason, due_at = NULL"
    " FROM unnest($3::text[], $4::integer[], $5::text[]) AS u(thing_id, attempt, reason)"
    " WHERE t.job_id = $1 AND t.thing_id = u.thing_id AND t.state IN (0, 3)"
)
# The targets a dispatch may start.
_STARTABLE = (int(TargetState.PENDING), int(TargetState.RETRY))
# The fence: the job's row, share-locked until the batch commits (a replica taking the job's lock updates the row,
# so it waits for this dispatch), names the lock connection of the replica that took the lock last.
_LOCK_OWNER = "SELECT lock_owner FROM jobs WHERE job_id = $1 FOR SHARE"


async def plan_dispatch(
    b: Batch,
    job_id: str,
    dispatches: Sequence[JobDispatch],
    rejections: Sequence[tuple[str, int, str]],
    at_ms: int,
    lock_token: str | None = None,
) -> list[Execution | None]:
    """Start a job's targets: each one still waiting for that attempt gets its execution, and is marked, in this transaction.

    The executions and their events are written by the batch with its other creates (the events numbered
    by the counter at the batch's end, like any create's); a target another dispatch started first
    (this replica's or another's: its row lock is waited for, then read as committed) gets None.

    Raises:
        JobLockLost: ``lock_token`` (the dispatching replica's lock connection) is not the one that took the job's
            lock last (another replica took it over since): nothing is written.
    """
    conn = b.conn
    if lock_token is not None:
        owner = await conn.fetchval(_LOCK_OWNER, job_id)
        if owner is not None and owner != lock_token:
            raise JobLockLost(f"job {job_id!r}: another replica took its lock over; this dispatch is not committed")
    names = sorted({d.new.thing_id for d in dispatches})
    held = {r[0]: (r[1], r[2]) for r in await conn.fetch(_LOCK_TARGETS, job_id, names)} if names else {}
    out: list[Execution | None] = []
    changes: list[Change] = []
    kaa: dict[tuple[str, str], int] = {}
    marks: list[tuple[str, int, str]] = []
    seq = b.local_sequence()
    for d in dispatches:
        new = d.new
        row = held.pop(new.thing_id, None)  # popped: the same target twice in one call starts once
        if row is None or row[0] not in _STARTABLE or row[1] != new.job_attempt - 1:
            out.append(None)  # started already (or skipped): never a second execution
            continue
        kaa_id = None
        if new.kaa:
            key = (new.thing_id, new.action)
            kaa_id = decisions.next_kaa_id(kaa[key] if key in kaa else await b.highest_kaa_id(*key))
            kaa[key] = kaa_id
        _, change = decisions.create(new, kaa_id, seq)
        seq += 1
        assert change.execution is not None
        change.execution = dataclasses.replace(
            change.execution, job_id=job_id, retry_of=new.retry_of, job_attempt=new.job_attempt
        )
        changes.append(change)
        out.append(change.execution)
        marks.append((new.thing_id, new.job_attempt, new.execution_id))
    if marks:
        await conn.execute(_MARK_DISPATCHED, job_id, at_ms, *(list(col) for col in zip(*marks, strict=True)))
    if rejections:
        refused = [list(col) for col in zip(*rejections, strict=True)]
        await conn.execute(_MARK_REJECTED, job_id, int(Status.REJECTED), *refused)
    # Last, and nothing here can fail: the batch writes these rows and events with its other creates.
    for change in changes:
        b.apply(change)
    return out


PLANS: dict[str, Callable[..., Awaitable[Any]]] = {
    "create": plan_create,
    "transition": plan_transition,
    "expire_due": plan_expire_due,
    "job_dispatch": plan_dispatch,
}
