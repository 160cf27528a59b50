"""SQLite implementation of :class:`server.store.JobStore`, mixed into :class:`server.store.sqlite.SqliteStore`.

Jobs and their targets live in the same file and go through the same writer as the executions. The
durable step of a rollout is :meth:`SqliteJobs.dispatch`: one write operation that, for each target,
checks the target still waits for that attempt, plans its execution with the same pure rules as a
Send (:func:`server.core.decisions.create`) and marks the target DISPATCHED; the executions and their
first events are written by the batch like any other create, in the same transaction. The unique index
``executions_job_attempt`` refuses a second execution of one (job, thing, attempt) should anything
ever try.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from server.core import decisions
from server.core.decisions import Change
from server.core.errors import AlreadyExists, NotFound
from server.core.jobs import Job, JobState
from server.core.lifecycle import Status
from server.core.models import Execution, job_event, later_job_event
from server.store import JobDispatch, JobRecord, TargetRow, TargetSettle, TargetState
from server.store.sqlite_batch import Tx

T = TypeVar("T")

_STATUS: dict[int, Status] = {int(s): s for s in Status}
_UNFINISHED = ",".join(str(s.value) for s in JobState if not s.final)
_STARTABLE = (int(TargetState.PENDING), int(TargetState.RETRY))
# The count name of a target that has no execution status of its own.
_STATE_NAMES = {
    TargetState.PENDING: "PENDING",
    TargetState.RETRY: "RETRYING",
    TargetState.SKIPPED: "SKIPPED",
    TargetState.REJECTED: "REJECTED",
}

JOB_COLUMNS = (
    "idx, job_id, spec, state, created_at, started_at, ended_at, abort_reason, created_by, targets_total,"
    " resolved, resolve_cursor, counts, idempotency_key, sequential, only_undelivered"
)
TARGET_COLUMNS = (
    "t.thing_id, t.seq, t.state, t.attempt, t.execution_id, COALESCE(e.status, t.status), t.due_at, t.dispatched_at, t.reason,"
    " e.completed_at"
)
TARGET_FROM = "job_targets t LEFT JOIN executions e ON t.state = 1 AND e.execution_id = t.execution_id"


def _job(row: Sequence[Any]) -> JobRecord:
    return JobRecord(
        job_id=row[1],
        spec_json=row[2],
        state=JobState(row[3]),
        created_at_ms=row[4],
        started_at_ms=row[5],
        ended_at_ms=row[6],
        abort_reason=row[7],
        created_by=row[8],
        targets_total=row[9],
        resolved=bool(row[10]),
        resolve_cursor=row[11],
        counts_json=row[12] or "",
        idempotency_key=row[13] or "",
        sequential=bool(row[14]),
        only_undelivered=bool(row[15]),
    )


def _target(row: Sequence[Any]) -> TargetRow:
    return TargetRow(
        thing_id=row[0],
        seq=row[1],
        state=TargetState(row[2]),
        attempt=row[3],
        execution_id=row[4] or "",
        status=_STATUS.get(row[5]) if row[5] is not None else None,
        due_at_ms=row[6],
        dispatched_at_ms=row[7],
        reason=row[8] or "",
        completed_at_ms=row[9],
    )


def _add_job_event(tx: Tx, job: Job, at_ms: int) -> None:
    """Number a job event in the transaction; the batch writes it with the others (call it last: nothing may raise after).

    ``job``: the job with its spec for its first event (written with its creation), else :func:`later_job_event`'s.
    """
    tx.events.append(job_event(tx.next_seq, job, at_ms))
    tx.next_seq += 1


class SqliteJobs:
    """The job queries and writes; the host class supplies ``_write`` and ``_read``."""

    _write: Callable[..., Any]
    _read: Callable[..., Any]

    async def insert_job(self, rec: JobRecord, fingerprint: str, event: Job | None = None) -> tuple[JobRecord, bool]:
        """See :meth:`server.store.JobStore.insert_job`."""

        def write(tx: Tx) -> tuple[JobRecord, bool]:
            conn = tx.conn
            if rec.idempotency_key:
                row = conn.execute(
                    f"SELECT {JOB_COLUMNS}, fingerprint FROM jobs WHERE idempotency_key = ?", (rec.idempotency_key,)
                ).fetchone()
                if row is not None:
                    if row[-1] != fingerprint:
                        raise AlreadyExists(f"idempotency_key {rec.idempotency_key!r} was used for a different job ({row[1]})")
                    return _job(row), False
            conn.execute(
                "INSERT INTO jobs (job_id, spec, state, created_at, started_at, ended_at, abort_reason, created_by,"
                " targets_total, resolved, resolve_cursor, idempotency_key, fingerprint, sequential)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.job_id,
                    rec.spec_json,
                    rec.state.value,
                    rec.created_at_ms,
                    rec.started_at_ms,
                    rec.ended_at_ms,
                    rec.abort_reason,
                    rec.created_by,
                    rec.targets_total,
                    int(rec.resolved),
                    rec.resolve_cursor,
                    rec.idempotency_key or None,
                    fingerprint,
                    int(rec.sequential),
                ),
            )
            if event is not None:
                _add_job_event(tx, event, rec.created_at_ms)
            return rec, True

        result: tuple[JobRecord, bool] = await self._write(write)
        return result

    async def get_job(self, job_id: str) -> JobRecord | None:
        """See :meth:`server.store.JobStore.get_job`."""

        def read(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return _job(row) if row else None

        found: JobRecord | None = await self._read(read)
        return found

    async def list_jobs(self, states: Sequence[JobState], limit: int, before_idx: int | None) -> list[tuple[int, JobRecord]]:
        """See :meth:`server.store.JobStore.list_jobs`."""
        where: list[str] = []
        args: list[object] = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += [s.value for s in states]
        if before_idx is not None:
            where.append("idx < ?")
            args.append(before_idx)
        sql = f"SELECT {JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY idx DESC LIMIT ?"
        args.append(limit)
        rows: list[tuple[int, JobRecord]] = await self._read(
            lambda conn: [(r[0], _job(r)) for r in conn.execute(sql, args).fetchall()]
        )
        return rows

    async def unfinished_jobs(self) -> list[JobRecord]:
        """See :meth:`server.store.JobStore.unfinished_jobs`."""
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({_UNFINISHED}) OR counts IS NULL ORDER BY idx"
        rows: list[JobRecord] = await self._read(lambda conn: [_job(r) for r in conn.execute(sql).fetchall()])
        return rows

    async def update_job(
        self,
        job_id: str,
        *,
        state: JobState,
        started_at_ms: int | None,
        ended_at_ms: int | None,
        abort_reason: str,
        counts_json: str = "",
        only_undelivered: bool = False,
        event: Job | None = None,
        at_ms: int = 0,
    ) -> None:
        """See :meth:`server.store.JobStore.update_job`."""

        def write(tx: Tx) -> None:
            cur = tx.conn.execute(
                "UPDATE jobs SET state = ?, started_at = ?, ended_at = ?, abort_reason = ?, counts = ?, only_undelivered = ?"
                " WHERE job_id = ?",
                (state.value, started_at_ms, ended_at_ms, abort_reason, counts_json or None, int(only_undelivered), job_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"job {job_id!r} not found")
            if event is not None:
                _add_job_event(tx, later_job_event(event), at_ms)

        await self._write(write)

    async def job_events(self, jobs: Sequence[Job], at_ms: int) -> None:
        """See :meth:`server.store.JobStore.job_events`."""

        def write(tx: Tx) -> None:
            for job in jobs:
                _add_job_event(tx, later_job_event(job), at_ms)

        await self._write(write)

    async def add_targets(self, job_id: str, thing_ids: Sequence[str], *, cursor: str, resolved: bool) -> int:
        """See :meth:`server.store.JobStore.add_targets`."""
        ids = list(thing_ids)

        def write(tx: Tx) -> int:
            conn = tx.conn
            total = conn.execute("SELECT targets_total FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if total is None:
                raise NotFound(f"job {job_id!r} not found")
            # seq numbers the targets without gaps (targets_total counts every row ever added): the
            # canary is the targets below its count.
            added = 0
            insert = "INSERT OR IGNORE INTO job_targets (job_id, thing_id, seq, state) VALUES (?, ?, ?, 0)"
            for thing_id in ids:
                added += conn.execute(insert, (job_id, thing_id, total[0] + added)).rowcount
            conn.execute(
                "UPDATE jobs SET targets_total = targets_total + ?, resolve_cursor = ?, resolved = ? WHERE job_id = ?",
                (added, cursor, int(resolved), job_id),
            )
            return added

        added: int = await self._write(write)
        return added

    async def thing_page(self, after: str, limit: int, thing_type: str) -> list[tuple[str, str, dict[str, str]]]:
        """See :meth:`server.store.JobStore.thing_page`."""
        sql = "SELECT thing_id, thing_type, attributes FROM things WHERE thing_id > ?"
        args: list[object] = [after]
        if thing_type:
            sql += " AND thing_type = ?"
            args.append(thing_type)
        sql += " ORDER BY thing_id LIMIT ?"
        args.append(limit)
        rows: list[tuple[str, str, dict[str, str]]] = await self._read(
            lambda conn: [(r[0], r[1], json.loads(r[2])) for r in conn.execute(sql, args).fetchall()]
        )
        return rows

    async def target_ids(self, job_id: str, statuses: Sequence[Status], after: str, limit: int) -> list[str]:
        """See :meth:`server.store.JobStore.target_ids`."""
        marks = ",".join("?" * len(statuses))
        sql = (
            f"SELECT t.thing_id FROM {TARGET_FROM} WHERE t.job_id = ? AND t.thing_id > ?"
            f" AND COALESCE(e.status, t.status) IN ({marks}) ORDER BY t.thing_id LIMIT ?"
        )
        args = [job_id, after, *(int(s) for s in statuses), limit]
        ids: list[str] = await self._read(lambda conn: [r[0] for r in conn.execute(sql, args).fetchall()])
        return ids

    async def targets(
        self, job_id: str, states: Sequence[TargetState], limit: int, *, after_seq: int = -1, due_by_ms: int | None = None
    ) -> list[TargetRow]:
        """See :meth:`server.store.JobStore.targets`."""
        marks = ",".join("?" * len(states))
        if due_by_ms is not None:
            sql = (
                f"SELECT {TARGET_COLUMNS} FROM {TARGET_FROM} WHERE t.job_id = ? AND t.state = 3 AND t.due_at <= ?"
                " ORDER BY t.due_at LIMIT ?"
            )
            args: list[object] = [job_id, due_by_ms, limit]
        else:
            sql = (
                f"SELECT {TARGET_COLUMNS} FROM {TARGET_FROM} WHERE t.job_id = ? AND t.state IN ({marks}) AND t.seq > ?"
                " ORDER BY t.seq LIMIT ?"
            )
            args = [job_id, *(int(s) for s in states), after_seq, limit]
        rows: list[TargetRow] = await self._read(lambda conn: [_target(r) for r in conn.execute(sql, args).fetchall()])
        return rows

    async def next_due_ms(self, job_id: str) -> int | None:
        """See :meth:`server.store.JobStore.next_due_ms`."""
        sql = "SELECT MIN(due_at) FROM job_targets WHERE job_id = ? AND state = 3"
        due: int | None = await self._read(lambda conn: conn.execute(sql, (job_id,)).fetchone()[0])
        return due

    async def dispatch(
        self, job_id: str, dispatches: Sequence[JobDispatch], rejections: Sequence[tuple[str, int, str]], at_ms: int
    ) -> list[Execution | None]:
        """See :meth:`server.store.JobStore.dispatch`."""

        def write(tx: Tx) -> list[Execution | None]:
            conn = tx.conn
            out: list[Execution | None] = []
            changes: list[Change] = []
            updates: list[tuple[Any, ...]] = []
            kaa: dict[tuple[str, str], int] = {}
            seq = tx.next_seq
            check = "SELECT state, attempt FROM job_targets WHERE job_id = ? AND thing_id = ?"
            for d in dispatches:
                new = d.new
                row = conn.execute(check, (job_id, new.thing_id)).fetchone()
                if row is None or row[0] not in _STARTABLE or row[1] != new.job_attempt - 1:
                    out.append(None)  # started already (or skipped): never a second execution
                    continue
                kaa_id = None
                if new.kaa:
                    key = (new.thing_id, new.action)
                    kaa_id = decisions.next_kaa_id(kaa[key] if key in kaa else tx.highest_kaa_id(*key))
                    kaa[key] = kaa_id
                _, change = decisions.create(new, kaa_id, seq)
                seq += 1
                assert change.execution is not None
                change.execution = dataclasses.replace(
                    change.execution, job_id=job_id, retry_of=new.retry_of, job_attempt=new.job_attempt
                )
                changes.append(change)
                out.append(change.execution)
                updates.append((new.job_attempt, new.execution_id, at_ms, job_id, new.thing_id))
            conn.executemany(
                "UPDATE job_targets SET state = 1, attempt = ?, execution_id = ?, dispatched_at = ?, status = NULL,"
                " due_at = NULL WHERE job_id = ? AND thing_id = ?",
                updates,
            )
            conn.executemany(
                "UPDATE job_targets SET state = 4, attempt = ?, status = ?, reason = ?, due_at = NULL"
                " WHERE job_id = ? AND thing_id = ? AND state IN (0, 3)",
                [(attempt, int(Status.REJECTED), reason, job_id, thing_id) for thing_id, attempt, reason in rejections],
            )
            # Last, and nothing here can raise: the batch writes these rows and events with the
            # transaction's other creates (a failure above leaves the transaction as it was).
            for change in changes:
                tx.apply(change)
            return out

        result: list[Execution | None] = await self._write(write)
        return result

    async def settle(self, job_id: str, settles: Sequence[TargetSettle]) -> None:
        """See :meth:`server.store.JobStore.settle`."""
        rows = [(int(s.state), int(s.status), s.due_at_ms, job_id, s.thing_id, s.attempt) for s in settles]

        def write(tx: Tx) -> None:
            tx.conn.executemany(
                "UPDATE job_targets SET state = ?, status = ?, due_at = ?"
                " WHERE job_id = ? AND thing_id = ? AND attempt = ? AND state = 1",
                rows,
            )

        await self._write(write)

    async def skip_unstarted(self, job_id: str, reason: str) -> int:
        """See :meth:`server.store.JobStore.skip_unstarted`."""

        def write(tx: Tx) -> int:
            cur = tx.conn.execute(
                "UPDATE job_targets SET state = 5, reason = ? WHERE job_id = ? AND state IN (0, 3)", (reason, job_id)
            )
            return cur.rowcount

        skipped: int = await self._write(write)
        return skipped

    async def job_counts(self, job_id: str, *, below_seq: int | None = None) -> dict[str, int]:
        """See :meth:`server.store.JobStore.job_counts`."""
        sql = (
            f"SELECT t.state, COALESCE(e.status, t.status) AS st, COUNT(*) FROM {TARGET_FROM}"
            " WHERE t.job_id = ? AND t.seq < ? GROUP BY t.state, st"
        )
        limit = below_seq if below_seq is not None else 2**62

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            counts: dict[str, int] = {}
            for state, status, n in conn.execute(sql, (job_id, limit)).fetchall():
                ts = TargetState(state)
                name = _STATE_NAMES.get(ts) or (_STATUS[status].name if status is not None else "PENDING")
                counts[name] = counts.get(name, 0) + n
            return counts

        counts: dict[str, int] = await self._read(read)
        return counts

    async def last_dispatch_ms(self, job_id: str) -> int | None:
        """See :meth:`server.store.JobStore.last_dispatch_ms`."""
        sql = "SELECT MAX(dispatched_at) FROM job_targets WHERE job_id = ?"
        last: int | None = await self._read(lambda conn: conn.execute(sql, (job_id,)).fetchone()[0])
        return last

    async def sequential_busy(self) -> list[tuple[str, str]]:
        """See :meth:`server.store.JobStore.sequential_busy`."""
        sql = (
            "SELECT t.thing_id, t.execution_id FROM job_targets t JOIN jobs j ON j.job_id = t.job_id"
            f" WHERE t.state = 1 AND j.sequential = 1 AND j.state IN ({_UNFINISHED})"
        )
        rows: list[tuple[str, str]] = await self._read(lambda conn: [(r[0], r[1]) for r in conn.execute(sql).fetchall()])
        return rows
