"""SQLite implementation of :class:`server.store.Store` (WAL, group commit).

One writer thread owns the write connection. Callers enqueue operations; the
writer loop takes everything queued, runs the batch in one transaction (each
operation inside its own SAVEPOINT, so one failing operation does not undo the
others), commits once and then resolves the callers. One fsync serves the
whole batch, which is what makes durable writes cheap under load. Reads use a
second connection on its own thread; WAL lets them run beside the writer and
they only ever see committed data.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from server.errors import AlreadyExists, FleetcmdError, NotFound, ThingMismatch, Unavailable
from server.lifecycle import Decision, Outcome, Status, Trigger, decide
from server.models import (
    ActiveExecution,
    DeviceReport,
    EventFilter,
    Execution,
    ListQuery,
    NewExecution,
    Reason,
    StateChange,
)
from server.store import CommitListener, CreateResult, ListPage, TransitionResult

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
MAX_BATCH = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    idx                INTEGER PRIMARY KEY,
    execution_id       TEXT NOT NULL UNIQUE,
    command_id         TEXT NOT NULL,
    thing_id           TEXT NOT NULL,
    action             TEXT NOT NULL,
    params             TEXT,
    ttl_seconds        INTEGER NOT NULL,
    status             INTEGER NOT NULL,
    result             TEXT,
    reason_code        TEXT,
    reason_description TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    completed_at       INTEGER,
    expires_at         INTEGER NOT NULL,
    idempotency_key    TEXT,
    fingerprint        TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS executions_idempotency
    ON executions(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS executions_thing ON executions(thing_id, idx);
CREATE INDEX IF NOT EXISTS executions_action ON executions(action, idx);
CREATE INDEX IF NOT EXISTS executions_status ON executions(status, idx);
CREATE TABLE IF NOT EXISTS events (
    seq                INTEGER PRIMARY KEY,
    execution_id       TEXT NOT NULL,
    thing_id           TEXT NOT NULL,
    action             TEXT NOT NULL,
    status             INTEGER NOT NULL,
    previous_status    INTEGER,
    at                 INTEGER NOT NULL,
    late               INTEGER NOT NULL DEFAULT 0,
    result             TEXT,
    reason_code        TEXT,
    reason_description TEXT,
    note               TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_execution ON events(execution_id, seq);
"""

_EXEC_COLUMNS = (
    "idx, execution_id, command_id, thing_id, action, params, ttl_seconds, status, result, "
    "reason_code, reason_description, created_at, updated_at, completed_at, expires_at, idempotency_key"
)
_EVENT_COLUMNS = (
    "seq, execution_id, thing_id, action, status, previous_status, at, late, result, "
    "reason_code, reason_description, note"
)


def _reason(code: str | None, description: str | None) -> Reason | None:
    if code is None and description is None:
        return None
    return Reason(code or "", description or "")


def _execution(row: sqlite3.Row, history: tuple[StateChange, ...] = ()) -> Execution:
    return Execution(
        execution_id=row["execution_id"],
        command_id=row["command_id"],
        thing_id=row["thing_id"],
        action=row["action"],
        params_json=row["params"],
        ttl_seconds=row["ttl_seconds"],
        status=Status(row["status"]),
        created_at_ms=row["created_at"],
        updated_at_ms=row["updated_at"],
        expires_at_ms=row["expires_at"],
        completed_at_ms=row["completed_at"],
        result_json=row["result"],
        reason=_reason(row["reason_code"], row["reason_description"]),
        idempotency_key=row["idempotency_key"] or "",
        history=history,
    )


def _event(row: sqlite3.Row) -> StateChange:
    prev = row["previous_status"]
    return StateChange(
        sequence=row["seq"],
        execution_id=row["execution_id"],
        thing_id=row["thing_id"],
        action=row["action"],
        status=Status(row["status"]),
        previous_status=Status(prev) if prev is not None else None,
        at_ms=row["at"],
        late=bool(row["late"]),
        result_json=row["result"],
        reason=_reason(row["reason_code"], row["reason_description"]),
        note=row["note"],
    )


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed batch survives power loss too, not only a killed process.
        conn.execute("PRAGMA synchronous = FULL")
    return conn


@dataclass
class _Op:
    """One queued write: ``fn`` runs on the writer thread inside a savepoint."""

    fn: Callable[[_Tx], Any]
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None
    events: list[StateChange] = field(default_factory=list)


class _Tx:
    """What a write operation sees: the connection and the event-log appender."""

    def __init__(self, conn: sqlite3.Connection, next_seq: int) -> None:
        self.conn = conn
        self.next_seq = next_seq
        self.events: list[StateChange] = []

    def append_event(self, event: StateChange) -> StateChange:
        """Insert ``event`` with the next sequence number and return it numbered."""
        numbered = StateChange(**{**event.__dict__, "sequence": self.next_seq})
        reason = numbered.reason
        self.conn.execute(
            f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                numbered.sequence,
                numbered.execution_id,
                numbered.thing_id,
                numbered.action,
                int(numbered.status),
                int(numbered.previous_status) if numbered.previous_status is not None else None,
                numbered.at_ms,
                int(numbered.late),
                numbered.result_json,
                reason.code if reason else None,
                reason.description if reason else None,
                numbered.note,
            ),
        )
        self.next_seq += 1
        self.events.append(numbered)
        return numbered


class SqliteStore:
    """Executions and their event log in one SQLite file.

    Use as an async context manager, and run :meth:`run_writer` as a background
    task for as long as the store is open.
    """

    def __init__(self, path: Path, on_commit: CommitListener | None = None) -> None:
        self.path = path
        self._on_commit = on_commit
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="fleetcmd-db-writer")
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="fleetcmd-db-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._next_seq = 1
        self._closing = False
        self.batches = 0  # commits so far, for metrics and benchmarks
        self.ops = 0

    def set_commit_listener(self, listener: CommitListener) -> None:
        """Set the callback that receives committed events in sequence order."""
        self._on_commit = listener

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the file and schema if needed and open both connections."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._wconn = await loop.run_in_executor(self._writer_pool, self._open_writer)
        self._rconn = await loop.run_in_executor(self._reader_pool, lambda: _connect(self.path, readonly=True))

    def _open_writer(self) -> sqlite3.Connection:
        conn = _connect(self.path, readonly=False)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FleetcmdError(f"{self.path} has schema {version}, newer than this fleetcmd ({SCHEMA_VERSION})")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._next_seq = (conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]) + 1
        return conn

    def stop_writer(self) -> None:
        """Refuse new writes and let :meth:`run_writer` end once it has committed what is queued."""
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(None)

    async def close(self) -> None:
        """Commit anything still queued (when no writer loop ran) and close the file."""
        self._closing = True
        while not self._queue.empty():
            op = self._queue.get_nowait()
            if op is not None:
                await self._run_batch([op])
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            conn, self._wconn = self._wconn, None
            await loop.run_in_executor(self._writer_pool, conn.close)
        if self._rconn is not None:
            rconn, self._rconn = self._rconn, None
            await loop.run_in_executor(self._reader_pool, rconn.close)
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)

    async def run_writer(self) -> None:
        """Group-commit loop: run every queued write of a batch in one transaction."""
        while True:
            op = await self._queue.get()
            if op is None:
                return
            batch = [op]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    await self._run_batch(batch)
                    return
                batch.append(nxt)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Op]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer_pool, self._execute_batch, batch)
        except Exception as exc:  # the commit itself failed: nothing of the batch is durable
            log.exception("store batch of %d writes failed", len(batch))
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(Unavailable(f"store write failed: {exc}"))
            return
        self.batches += 1
        self.ops += len(batch)
        events = [e for op in batch if op.error is None for e in op.events]
        if events and self._on_commit is not None:
            try:
                self._on_commit(events)
            except Exception:  # a listener bug must not lose the callers' results
                log.exception("commit listener failed")
        for op in batch:
            if op.future.done():  # the caller went away (cancelled); the write still happened
                continue
            if op.error is not None:
                op.future.set_exception(op.error)
            else:
                op.future.set_result(op.result)

    def _execute_batch(self, batch: list[_Op]) -> None:
        conn = self._wconn
        assert conn is not None
        start_seq = self._next_seq
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                tx = _Tx(conn, self._next_seq)
                conn.execute("SAVEPOINT op")
                try:
                    op.result = op.fn(tx)
                except Exception as exc:  # noqa: BLE001 - every failure belongs to its caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    op.error = exc
                    continue
                conn.execute("RELEASE op")
                op.events = tx.events
                self._next_seq = tx.next_seq
            conn.execute("COMMIT")
        except BaseException:
            self._next_seq = start_seq
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _write(self, fn: Callable[[_Tx], T]) -> T:
        if self._closing:
            raise Unavailable("store is closing")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(fn, future))
        # shield: a caller that gives up (gRPC deadline) must not un-queue a write the
        # writer may already have committed; it simply stops waiting for the answer.
        return await asyncio.shield(future)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._rconn
        if conn is None:
            raise Unavailable("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, fn, conn)

    # ---- writes -------------------------------------------------------------------------

    async def create(self, new: NewExecution) -> CreateResult:
        """See :meth:`server.store.Store.create`."""
        return await self._write(lambda tx: self._create(tx, new))

    @staticmethod
    def _create(tx: _Tx, new: NewExecution) -> CreateResult:
        if new.idempotency_key:
            row = tx.conn.execute(
                f"SELECT {_EXEC_COLUMNS}, fingerprint FROM executions WHERE idempotency_key = ?",
                (new.idempotency_key,),
            ).fetchone()
            if row is not None:
                if row["fingerprint"] != new.fingerprint:
                    raise AlreadyExists(
                        f"idempotency_key {new.idempotency_key!r} was used for a different request "
                        f"(execution {row['execution_id']})"
                    )
                return CreateResult(_execution(row), created=False, event=None)
        tx.conn.execute(
            "INSERT INTO executions (execution_id, command_id, thing_id, action, params, ttl_seconds, status,"
            " created_at, updated_at, expires_at, idempotency_key, fingerprint)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                new.execution_id,
                new.command_id,
                new.thing_id,
                new.action,
                new.params_json,
                new.ttl_seconds,
                int(new.status),
                new.created_at_ms,
                new.created_at_ms,
                new.expires_at_ms,
                new.idempotency_key or None,
                new.fingerprint or None,
            ),
        )
        event = tx.append_event(
            StateChange(
                sequence=0,
                execution_id=new.execution_id,
                thing_id=new.thing_id,
                action=new.action,
                status=new.status,
                previous_status=None,
                at_ms=new.created_at_ms,
                note="created",
            )
        )
        execution = Execution(
            execution_id=new.execution_id,
            command_id=new.command_id,
            thing_id=new.thing_id,
            action=new.action,
            params_json=new.params_json,
            ttl_seconds=new.ttl_seconds,
            status=new.status,
            created_at_ms=new.created_at_ms,
            updated_at_ms=new.created_at_ms,
            expires_at_ms=new.expires_at_ms,
            idempotency_key=new.idempotency_key,
        )
        return CreateResult(execution, created=True, event=event)

    async def transition(
        self,
        execution_id: str,
        trigger: Trigger,
        *,
        at_ms: int,
        report: DeviceReport | None = None,
        expect_thing: str | None = None,
    ) -> TransitionResult:
        """See :meth:`server.store.Store.transition`."""
        return await self._write(lambda tx: self._transition(tx, execution_id, trigger, at_ms, report, expect_thing))

    @staticmethod
    def _transition(
        tx: _Tx,
        execution_id: str,
        trigger: Trigger,
        at_ms: int,
        report: DeviceReport | None,
        expect_thing: str | None,
    ) -> TransitionResult:
        row = tx.conn.execute(f"SELECT {_EXEC_COLUMNS} FROM executions WHERE execution_id = ?", (execution_id,)).fetchone()
        if row is None:
            raise NotFound(f"execution {execution_id!r} not found")
        current = _execution(row)
        if expect_thing is not None and expect_thing != current.thing_id:
            raise ThingMismatch(
                f"report for execution {execution_id} names thing {expect_thing!r}, the execution's is {current.thing_id!r}"
            )
        same = report is not None and (
            report.status == current.status
            and report.result_json == current.result_json
            and report.reason == current.reason
        )
        decision: Decision = decide(current.status, trigger, report.status if report else None, same_report=same)
        if decision.outcome not in (Outcome.CHANGE, Outcome.LATE):
            return TransitionResult(current, decision, None)
        result_json = report.result_json if report else None
        reason = report.reason if report else None
        event = tx.append_event(
            StateChange(
                sequence=0,
                execution_id=current.execution_id,
                thing_id=current.thing_id,
                action=current.action,
                status=report.status if (report and decision.outcome is Outcome.LATE) else decision.status,
                previous_status=current.status,
                at_ms=at_ms,
                late=decision.outcome is Outcome.LATE,
                result_json=result_json,
                reason=reason,
                note=decision.note,
            )
        )
        if decision.outcome is Outcome.LATE:
            return TransitionResult(current, decision, event)
        new_status = decision.status
        completed = at_ms if new_status.final else None
        # A device report carries the result; other triggers keep what the device sent last.
        if report is not None:
            new_result, new_reason = result_json, reason
        else:
            new_result, new_reason = current.result_json, current.reason
        tx.conn.execute(
            "UPDATE executions SET status = ?, updated_at = ?, completed_at = ?, result = ?,"
            " reason_code = ?, reason_description = ? WHERE execution_id = ?",
            (
                int(new_status),
                at_ms,
                completed,
                new_result,
                new_reason.code if new_reason else None,
                new_reason.description if new_reason else None,
                execution_id,
            ),
        )
        updated = Execution(
            **{
                **current.__dict__,
                "status": new_status,
                "updated_at_ms": at_ms,
                "completed_at_ms": completed,
                "result_json": new_result,
                "reason": new_reason,
            }
        )
        return TransitionResult(updated, decision, event)

    # ---- reads --------------------------------------------------------------------------

    async def get(self, execution_id: str, *, with_history: bool = False) -> Execution | None:
        """See :meth:`server.store.Store.get`."""

        def read(conn: sqlite3.Connection) -> Execution | None:
            row = conn.execute(f"SELECT {_EXEC_COLUMNS} FROM executions WHERE execution_id = ?", (execution_id,)).fetchone()
            if row is None:
                return None
            history: tuple[StateChange, ...] = ()
            if with_history:
                rows = conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE execution_id = ? ORDER BY seq", (execution_id,)
                ).fetchall()
                history = tuple(_event(r) for r in rows)
            return _execution(row, history)

        return await self._read(read)

    async def get_many(self, execution_ids: Sequence[str]) -> list[Execution]:
        """See :meth:`server.store.Store.get_many`."""
        ids = list(execution_ids)

        def read(conn: sqlite3.Connection) -> list[Execution]:
            out: list[sqlite3.Row] = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                out += conn.execute(
                    f"SELECT {_EXEC_COLUMNS} FROM executions WHERE execution_id IN ({marks})", chunk
                ).fetchall()
            out.sort(key=lambda r: r["idx"])
            return [_execution(r) for r in out]

        return await self._read(read) if ids else []

    async def list_executions(self, query: ListQuery) -> ListPage:
        """See :meth:`server.store.Store.list_executions`."""
        where: list[str] = []
        args: list[object] = []
        if query.thing_id:
            where.append("thing_id = ?")
            args.append(query.thing_id)
        if query.action:
            where.append("action = ?")
            args.append(query.action)
        if query.statuses:
            where.append(f"status IN ({','.join('?' * len(query.statuses))})")
            args += sorted(int(s) for s in query.statuses)
        if query.created_after_ms is not None:
            where.append("created_at >= ?")
            args.append(query.created_after_ms)
        if query.created_before_ms is not None:
            where.append("created_at < ?")
            args.append(query.created_before_ms)
        if query.before_index is not None:
            where.append("idx < ?")
            args.append(query.before_index)
        sql = f"SELECT {_EXEC_COLUMNS} FROM executions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY idx DESC LIMIT ?"
        args.append(query.page_size + 1)

        def read(conn: sqlite3.Connection) -> ListPage:
            rows = conn.execute(sql, args).fetchall()
            more = len(rows) > query.page_size
            rows = rows[: query.page_size]
            return ListPage([_execution(r) for r in rows], rows[-1]["idx"] if more and rows else None)

        return await self._read(read)

    async def events_after(self, after_sequence: int, flt: EventFilter, limit: int) -> list[StateChange]:
        """See :meth:`server.store.Store.events_after`."""
        where: list[str] = ["seq > ?"]
        args: list[object] = [after_sequence]
        for column, value in (("thing_id", flt.thing_id), ("execution_id", flt.execution_id), ("action", flt.action)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        args.append(limit)
        return await self._read(lambda conn: [_event(r) for r in conn.execute(sql, args).fetchall()])

    async def last_sequence(self) -> int:
        """See :meth:`server.store.Store.last_sequence`."""
        sql = "SELECT COALESCE(MAX(seq), 0) FROM events"
        return await self._read(lambda conn: int(conn.execute(sql).fetchone()[0]))

    async def active(self) -> list[ActiveExecution]:
        """See :meth:`server.store.Store.active`."""
        finals = ",".join(str(int(s)) for s in Status if s.final)
        sql = (
            "SELECT execution_id, thing_id, status, expires_at FROM executions"
            f" WHERE status NOT IN ({finals}) ORDER BY idx"
        )

        def read(conn: sqlite3.Connection) -> list[ActiveExecution]:
            return [
                ActiveExecution(r["execution_id"], r["thing_id"], Status(r["status"]), r["expires_at"])
                for r in conn.execute(sql).fetchall()
            ]

        return await self._read(read)
