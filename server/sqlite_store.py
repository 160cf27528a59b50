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
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from server.errors import AlreadyExists, FailedPrecondition, FleetcmdError, NotFound, ThingMismatch, Unavailable
from server.lifecycle import Decision, Outcome, Status, Trigger, decide
from server.models import (
    ActiveExecution,
    ApiKeyRecord,
    CommandDef,
    DeviceReport,
    EventFilter,
    Execution,
    ListQuery,
    NewExecution,
    Reason,
    StateChange,
    ThingRecord,
    ThingTypeRecord,
)
from server.store import CommitListener, CreateResult, ListPage, ResultCheck, TransitionResult

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 3
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
    fingerprint        TEXT,
    thing_type         TEXT,
    result_violations  TEXT,
    kaa_id             INTEGER,
    rerun_of           TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS executions_idempotency
    ON executions(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS executions_thing ON executions(thing_id, idx);
CREATE INDEX IF NOT EXISTS executions_action ON executions(action, idx);
CREATE INDEX IF NOT EXISTS executions_status ON executions(status, idx);
CREATE INDEX IF NOT EXISTS executions_kaa ON executions(thing_id, action, kaa_id) WHERE kaa_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS executions_rerun ON executions(rerun_of) WHERE rerun_of IS NOT NULL;
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
CREATE TABLE IF NOT EXISTS things (
    thing_id               TEXT PRIMARY KEY,
    thing_type             TEXT NOT NULL DEFAULT '',
    attributes             TEXT NOT NULL DEFAULT '{}',
    token_hash             TEXT NOT NULL,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    credentials_rotated_at INTEGER NOT NULL,
    last_seen              INTEGER,
    last_client_id         TEXT NOT NULL DEFAULT '',
    last_remote_address    TEXT NOT NULL DEFAULT '',
    last_connected_at      INTEGER,
    kaa_app_version        TEXT NOT NULL DEFAULT '',
    kaa_token_hash         TEXT
);
CREATE INDEX IF NOT EXISTS things_type ON things(thing_type);
CREATE UNIQUE INDEX IF NOT EXISTS things_kaa_token ON things(kaa_token_hash) WHERE kaa_token_hash IS NOT NULL;
CREATE TABLE IF NOT EXISTS thing_types (
    name        TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
"""

# Columns added to tables of older schema versions: (version added, table, column definition).
_MIGRATIONS = (
    (2, "executions", "thing_type TEXT"),
    (2, "executions", "result_violations TEXT"),
    (3, "executions", "kaa_id INTEGER"),
    (3, "executions", "rerun_of TEXT"),
    (3, "things", "kaa_app_version TEXT NOT NULL DEFAULT ''"),
    (3, "things", "kaa_token_hash TEXT"),
)

_EXEC_COLUMNS = (
    "idx, execution_id, command_id, thing_id, action, params, ttl_seconds, status, result, "
    "reason_code, reason_description, created_at, updated_at, completed_at, expires_at, idempotency_key, "
    "thing_type, result_violations, kaa_id, rerun_of"
)
_EVENT_COLUMNS = (
    "seq, execution_id, thing_id, action, status, previous_status, at, late, result, "
    "reason_code, reason_description, note"
)


def _reason(code: str | None, description: str | None) -> Reason | None:
    if code is None and description is None:
        return None
    return Reason(code or "", description or "")


def _execution(row: sqlite3.Row, history: tuple[StateChange, ...] = (), reruns: tuple[str, ...] = ()) -> Execution:
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
        thing_type=row["thing_type"] or "",
        result_violations=tuple(json.loads(row["result_violations"])) if row["result_violations"] else (),
        kaa_id=row["kaa_id"],
        rerun_of=row["rerun_of"] or "",
        reruns=reruns,
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
        if version:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for added_in, table, column in _MIGRATIONS:
                if version < added_in and table in tables:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
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
        kaa_id = None
        if new.kaa:
            kaa_id = tx.conn.execute(
                "SELECT COALESCE(MAX(kaa_id), 0) + 1 FROM executions WHERE thing_id = ? AND action = ? AND kaa_id IS NOT NULL",
                (new.thing_id, new.action),
            ).fetchone()[0]
        tx.conn.execute(
            "INSERT INTO executions (execution_id, command_id, thing_id, action, params, ttl_seconds, status,"
            " created_at, updated_at, expires_at, idempotency_key, fingerprint, thing_type, kaa_id, rerun_of)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                new.thing_type or None,
                kaa_id,
                new.rerun_of or None,
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
            thing_type=new.thing_type,
            kaa_id=kaa_id,
            rerun_of=new.rerun_of,
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
        result_check: ResultCheck | None = None,
    ) -> TransitionResult:
        """See :meth:`server.store.Store.transition`."""
        return await self._write(
            lambda tx: self._transition(tx, execution_id, trigger, at_ms, report, expect_thing, result_check)
        )

    @staticmethod
    def _transition(
        tx: _Tx,
        execution_id: str,
        trigger: Trigger,
        at_ms: int,
        report: DeviceReport | None,
        expect_thing: str | None,
        result_check: ResultCheck | None,
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
            violations = tuple(result_check(current, report)) if result_check is not None else ()
        else:
            new_result, new_reason = current.result_json, current.reason
            violations = current.result_violations
        tx.conn.execute(
            "UPDATE executions SET status = ?, updated_at = ?, completed_at = ?, result = ?,"
            " reason_code = ?, reason_description = ?, result_violations = ? WHERE execution_id = ?",
            (
                int(new_status),
                at_ms,
                completed,
                new_result,
                new_reason.code if new_reason else None,
                new_reason.description if new_reason else None,
                json.dumps(list(violations)) if violations else None,
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
                "result_violations": violations,
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
            reruns: tuple[str, ...] = ()
            if with_history:
                rows = conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE execution_id = ? ORDER BY seq", (execution_id,)
                ).fetchall()
                history = tuple(_event(r) for r in rows)
                rerun_sql = "SELECT execution_id FROM executions WHERE rerun_of = ? ORDER BY idx"
                reruns = tuple(r[0] for r in conn.execute(rerun_sql, (execution_id,)))
            return _execution(row, history, reruns)

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

    # ---- Kaa command ids ------------------------------------------------------------------

    async def outstanding(self, thing_id: str, action: str, now_ms: int) -> list[Execution]:
        """Non-final, unexpired executions of one Kaa endpoint and command type, by Kaa id."""
        finals = ",".join(str(int(s)) for s in Status if s.final)
        sql = (
            f"SELECT {_EXEC_COLUMNS} FROM executions WHERE thing_id = ? AND action = ? AND kaa_id IS NOT NULL"
            f" AND status NOT IN ({finals}) AND expires_at > ? ORDER BY kaa_id"
        )
        return await self._read(lambda conn: [_execution(r) for r in conn.execute(sql, (thing_id, action, now_ms))])

    async def execution_id_for_kaa(self, thing_id: str, action: str, kaa_id: int) -> str | None:
        """The execution behind a Kaa command id."""
        sql = "SELECT execution_id FROM executions WHERE thing_id = ? AND action = ? AND kaa_id = ?"

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(sql, (thing_id, action, kaa_id)).fetchone()
            return str(row[0]) if row else None

        return await self._read(read)

    # ---- registry: things, thing types, API keys -----------------------------------------

    async def load_things(self) -> list[ThingRecord]:
        """Every registered thing."""
        return await self._read(lambda conn: [_thing(r) for r in conn.execute("SELECT * FROM things ORDER BY thing_id")])

    async def load_thing_types(self) -> list[ThingTypeRecord]:
        """Every thing type."""
        return await self._read(lambda conn: [_thing_type(r) for r in conn.execute("SELECT * FROM thing_types ORDER BY name")])

    async def insert_thing(self, rec: ThingRecord) -> None:
        """Register a thing.

        Raises:
            AlreadyExists: a thing with that id exists.
        """

        def write(tx: _Tx) -> None:
            try:
                tx.conn.execute(
                    "INSERT INTO things (thing_id, thing_type, attributes, token_hash, created_at, updated_at,"
                    " credentials_rotated_at, kaa_app_version, kaa_token_hash) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        rec.thing_id,
                        rec.thing_type,
                        json.dumps(rec.attributes, sort_keys=True),
                        rec.token_hash,
                        rec.created_at_ms,
                        rec.updated_at_ms,
                        rec.credentials_rotated_at_ms,
                        rec.kaa_app_version,
                        rec.kaa_token_hash or None,
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"thing {rec.thing_id!r} already exists") from None

        await self._write(write)

    async def update_thing(self, thing_id: str, *, thing_type: str, attributes: dict[str, str], at_ms: int) -> None:
        """Replace a thing's type and attributes.

        Raises:
            NotFound: no such thing.
        """

        def write(tx: _Tx) -> None:
            cur = tx.conn.execute(
                "UPDATE things SET thing_type = ?, attributes = ?, updated_at = ? WHERE thing_id = ?",
                (thing_type, json.dumps(attributes, sort_keys=True), at_ms, thing_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"thing {thing_id!r} not found")

        await self._write(write)

    async def set_thing_token(self, thing_id: str, token_hash: str, at_ms: int, kaa_token_hash: str = "") -> None:
        """Store new credentials for a thing (and a new Kaa endpoint token hash, when given).

        Raises:
            NotFound: no such thing.
        """

        def write(tx: _Tx) -> None:
            cur = tx.conn.execute(
                "UPDATE things SET token_hash = ?, credentials_rotated_at = ?, updated_at = ?,"
                " kaa_token_hash = COALESCE(?, kaa_token_hash) WHERE thing_id = ?",
                (token_hash, at_ms, at_ms, kaa_token_hash or None, thing_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"thing {thing_id!r} not found")

        await self._write(write)

    async def delete_thing(self, thing_id: str) -> None:
        """Unregister a thing (its executions stay).

        Raises:
            NotFound: no such thing.
        """

        def write(tx: _Tx) -> None:
            if tx.conn.execute("DELETE FROM things WHERE thing_id = ?", (thing_id,)).rowcount == 0:
                raise NotFound(f"thing {thing_id!r} not found")

        await self._write(write)

    async def record_presence(
        self, thing_id: str, *, last_seen_ms: int, client_id: str, remote_address: str, connected_at_ms: int | None
    ) -> None:
        """Remember when and from where a thing was last connected (a missing thing is ignored)."""

        def write(tx: _Tx) -> None:
            tx.conn.execute(
                "UPDATE things SET last_seen = ?, last_client_id = ?, last_remote_address = ?,"
                " last_connected_at = COALESCE(?, last_connected_at) WHERE thing_id = ?",
                (last_seen_ms, client_id, remote_address, connected_at_ms, thing_id),
            )

        await self._write(write)

    async def put_thing_type(self, rec: ThingTypeRecord) -> ThingTypeRecord:
        """Create or replace a thing type; the stored version is one more than the previous one."""

        def write(tx: _Tx) -> ThingTypeRecord:
            row = tx.conn.execute("SELECT version, created_at FROM thing_types WHERE name = ?", (rec.name,)).fetchone()
            version = (row["version"] + 1) if row else 1
            created = row["created_at"] if row else rec.created_at_ms
            stored = ThingTypeRecord(
                rec.name, rec.description, rec.commands, rec.allow_undefined_actions, version, created, rec.updated_at_ms
            )
            tx.conn.execute(
                "INSERT OR REPLACE INTO thing_types (name, definition, version, created_at, updated_at) VALUES (?,?,?,?,?)",
                (rec.name, _type_definition(stored), version, created, rec.updated_at_ms),
            )
            return stored

        return await self._write(write)

    async def delete_thing_type(self, name: str) -> None:
        """Delete a thing type.

        Raises:
            NotFound: no such type.
            FailedPrecondition: things still use it.
        """

        def write(tx: _Tx) -> None:
            used = tx.conn.execute("SELECT COUNT(*) FROM things WHERE thing_type = ?", (name,)).fetchone()[0]
            if used:
                raise FailedPrecondition(f"thing type {name!r} is used by {used} thing(s)")
            if tx.conn.execute("DELETE FROM thing_types WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"thing type {name!r} not found")

        await self._write(write)

    async def insert_api_key(self, rec: ApiKeyRecord) -> None:
        """Store a new API key."""

        def write(tx: _Tx) -> None:
            tx.conn.execute(
                "INSERT INTO api_keys (key_id, name, role, secret_hash, created_at) VALUES (?,?,?,?,?)",
                (rec.key_id, rec.name, rec.role, rec.secret_hash, rec.created_at_ms),
            )

        await self._write(write)

    async def revoke_api_key(self, key_id: str, at_ms: int) -> None:
        """Revoke a key (idempotent for a revoked one).

        Raises:
            NotFound: no such key.
        """

        def write(tx: _Tx) -> None:
            cur = tx.conn.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?", (at_ms, key_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"API key {key_id!r} not found")

        await self._write(write)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """One API key by id."""

        def read(conn: sqlite3.Connection) -> ApiKeyRecord | None:
            row = conn.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            return _api_key(row) if row else None

        return await self._read(read)

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every API key, revoked ones included, oldest first."""
        return await self._read(lambda conn: [_api_key(r) for r in conn.execute("SELECT * FROM api_keys ORDER BY created_at")])


def _thing(row: sqlite3.Row) -> ThingRecord:
    return ThingRecord(
        thing_id=row["thing_id"],
        thing_type=row["thing_type"],
        attributes=json.loads(row["attributes"]),
        token_hash=row["token_hash"],
        created_at_ms=row["created_at"],
        updated_at_ms=row["updated_at"],
        credentials_rotated_at_ms=row["credentials_rotated_at"],
        last_seen_ms=row["last_seen"],
        last_client_id=row["last_client_id"],
        last_remote_address=row["last_remote_address"],
        last_connected_at_ms=row["last_connected_at"],
        kaa_app_version=row["kaa_app_version"],
        kaa_token_hash=row["kaa_token_hash"] or "",
    )


def _type_definition(rec: ThingTypeRecord) -> str:
    return json.dumps(
        {
            "description": rec.description,
            "allow_undefined_actions": rec.allow_undefined_actions,
            "commands": {
                action: {
                    "description": c.description,
                    "params_schema": c.params_schema,
                    "result_schema": c.result_schema,
                    "default_ttl_seconds": c.default_ttl_seconds,
                }
                for action, c in rec.commands.items()
            },
        }
    )


def _thing_type(row: sqlite3.Row) -> ThingTypeRecord:
    definition = json.loads(row["definition"])
    return ThingTypeRecord(
        name=row["name"],
        description=definition["description"],
        commands={action: CommandDef(**c) for action, c in definition["commands"].items()},
        allow_undefined_actions=definition["allow_undefined_actions"],
        version=row["version"],
        created_at_ms=row["created_at"],
        updated_at_ms=row["updated_at"],
    )


def _api_key(row: sqlite3.Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row["key_id"],
        name=row["name"],
        role=row["role"],
        secret_hash=row["secret_hash"],
        created_at_ms=row["created_at"],
        revoked_at_ms=row["revoked_at"],
    )
