"""SQLite implementation of :class:`server.store.Store` (WAL, group commit).

One writer thread owns the write connection. Callers queue operations; what is
queued during one event-loop iteration is handed to the writer together, and
the writer takes everything handed over, runs it as one transaction, commits
once and hands the results back to the event loop. One fsync serves the whole
batch, which is what makes durable writes cheap under load.

Creates and transitions are *planned*: they only read (the execution as this
transaction sees it: its own earlier writes, then a cache of committed
non-final executions, then SQLite), decide, and return the row and event to
write; the batch writes all of them at the end with one ``executemany`` per
statement. An operation that raises has therefore changed nothing and needs no
savepoint. Should the bulk write itself fail (a constraint only SQLite can
check), the transaction is rolled back and the batch runs again with every
operation in its own SAVEPOINT and written at once, so one failing operation
never undoes the others. Other writes (registry, API keys) always run in their
own savepoint.

Reads use a second connection on its own thread; WAL lets them run beside the
writer and they only ever see committed data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    "seq, execution_id, thing_id, action, status, previous_status, at, late, result, reason_code, reason_description, note"
)


_STATUS: dict[int, Status] = {int(s): s for s in Status}

# Hot statements, built once (sqlite3 caches the prepared statement by its text).
_SELECT_EXECUTION = f"SELECT {_EXEC_COLUMNS} FROM executions WHERE execution_id = ?"
_SELECT_BY_KEY = f"SELECT {_EXEC_COLUMNS}, fingerprint FROM executions WHERE idempotency_key = ?"
_SELECT_MAX_KAA = "SELECT COALESCE(MAX(kaa_id), 0) FROM executions WHERE thing_id = ? AND action = ? AND kaa_id IS NOT NULL"
# Every column: an execution created and changed within one batch is written once, as it ends up.
_INSERT_EXECUTION = (
    "INSERT INTO executions (execution_id, command_id, thing_id, action, params, ttl_seconds, status, result,"
    " reason_code, reason_description, created_at, updated_at, completed_at, expires_at, idempotency_key,"
    " fingerprint, thing_type, result_violations, kaa_id, rerun_of) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_UPDATE_EXECUTION = (
    "UPDATE executions SET status = ?, updated_at = ?, completed_at = ?, result = ?,"
    " reason_code = ?, reason_description = ?, result_violations = ? WHERE execution_id = ?"
)
_INSERT_EVENT = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"

# How long the writer holds a batch of deferrable writes only (DELIVERED on a PUBACK) for the
# next ones: the device's answer usually follows its PUBACK within a fraction of a millisecond,
# and sharing their commit spares the answer, which someone waits for, a whole fsync.
DEFER_LINGER = 0.001

# Executions the writer keeps in memory (committed state), so a transition needs no SELECT.
# Bounded in count and by payload size: a miss only costs one indexed read.
CACHE_SIZE = 10_000
CACHE_MAX_PAYLOAD = 4_096


def _reason(code: str | None, description: str | None) -> Reason | None:
    if code is None and description is None:
        return None
    return Reason(code or "", description or "")


def _execution(row: Sequence[Any], history: tuple[StateChange, ...] = (), reruns: tuple[str, ...] = ()) -> Execution:
    # By position (the order of _EXEC_COLUMNS): cheaper than by name, and works for plain tuples too.
    violations = row[17]
    return Execution(
        execution_id=row[1],
        command_id=row[2],
        thing_id=row[3],
        action=row[4],
        params_json=row[5],
        ttl_seconds=row[6],
        status=_STATUS[row[7]],
        created_at_ms=row[11],
        updated_at_ms=row[12],
        expires_at_ms=row[14],
        completed_at_ms=row[13],
        result_json=row[8],
        reason=_reason(row[9], row[10]),
        idempotency_key=row[15] or "",
        thing_type=row[16] or "",
        result_violations=tuple(json.loads(violations)) if violations else (),
        kaa_id=row[18],
        rerun_of=row[19] or "",
        reruns=reruns,
        history=history,
    )


def _event(row: Sequence[Any]) -> StateChange:
    # By position: the order of _EVENT_COLUMNS.
    prev = row[5]
    return StateChange(
        sequence=row[0],
        execution_id=row[1],
        thing_id=row[2],
        action=row[3],
        status=_STATUS[row[4]],
        previous_status=_STATUS[prev] if prev is not None else None,
        at_ms=row[6],
        late=bool(row[7]),
        result_json=row[8],
        reason=_reason(row[9], row[10]),
        note=row[11],
    )


def _event_row(e: StateChange) -> tuple[Any, ...]:
    reason = e.reason
    return (
        e.sequence,
        e.execution_id,
        e.thing_id,
        e.action,
        int(e.status),
        int(e.previous_status) if e.previous_status is not None else None,
        e.at_ms,
        int(e.late),
        e.result_json,
        reason.code if reason else None,
        reason.description if reason else None,
        e.note,
    )


def _evolve(current: Execution, **changes: Any) -> Execution:
    # A copy with some fields changed, without running __init__ over twenty fields again.
    updated: Execution = object.__new__(Execution)
    updated.__dict__.update(current.__dict__)
    updated.__dict__.update(changes)
    return updated


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


@dataclass(slots=True)
class _Change:
    """What one lifecycle operation writes: at most one execution row and one event."""

    execution: Execution | None  # the row's new state; None when only the event is recorded
    event: StateChange | None
    created: bool = False
    fingerprint: str = ""


@dataclass(slots=True)
class _Op:
    """One queued write.

    A *planned* operation (create, transition) only reads: it returns ``(result,
    change)`` and the batch writes the change, so an operation that raises has
    changed nothing and needs no savepoint of its own. Any other operation runs
    its own SQL inside a savepoint.
    """

    fn: Callable[[_Tx], Any]
    future: asyncio.Future[Any]
    planned: bool
    deferrable: bool = False  # may wait DEFER_LINGER for company
    result: Any = None
    error: BaseException | None = None


_Undo = tuple[str | None, Execution | None, tuple[str, str] | None, int | None, int, int]


class _Tx:
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
        row = self.conn.execute(_SELECT_EXECUTION, (execution_id,)).fetchone()
        return _execution(row) if row is not None else None

    def by_idempotency_key(self, key: str) -> tuple[Execution, str] | None:
        """The execution created with ``key`` and its request fingerprint, if any."""
        execution_id = self._keys.get(key)
        if execution_id is not None:
            return self.rows[execution_id], self._fingerprints[execution_id]
        row = self.conn.execute(_SELECT_BY_KEY, (key,)).fetchone()
        if row is None:
            return None
        return self.rows.get(row[1]) or _execution(row), row[20] or ""

    def next_kaa_id(self, thing_id: str, action: str) -> int:
        """The Kaa command id a new execution of ``thing_id``/``action`` gets."""
        stored: int = self.conn.execute(_SELECT_MAX_KAA, (thing_id, action)).fetchone()[0]
        return max(stored, self._kaa.get((thing_id, action), 0)) + 1

    # ---- writes ----

    def apply(self, change: _Change) -> _Undo:
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

    def undo(self, undo: _Undo) -> None:
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
            conn.executemany(_INSERT_EXECUTION, [self._insert_row(eid) for eid in self._insert])
            self._insert.clear()
        if self._update:
            conn.executemany(_UPDATE_EXECUTION, [self._update_row(eid) for eid in self._update])
            self._update.clear()
        if self._flushed_events < len(self.events):
            conn.executemany(_INSERT_EVENT, [_event_row(e) for e in self.events[self._flushed_events :]])
            self._flushed_events = len(self.events)

    def _insert_row(self, execution_id: str) -> tuple[Any, ...]:
        ex = self.rows[execution_id]
        reason = ex.reason
        return (
            ex.execution_id,
            ex.command_id,
            ex.thing_id,
            ex.action,
            ex.params_json,
            ex.ttl_seconds,
            int(ex.status),
            ex.result_json,
            reason.code if reason else None,
            reason.description if reason else None,
            ex.created_at_ms,
            ex.updated_at_ms,
            ex.completed_at_ms,
            ex.expires_at_ms,
            ex.idempotency_key or None,
            self._fingerprints[execution_id] or None,
            ex.thing_type or None,
            json.dumps(list(ex.result_violations)) if ex.result_violations else None,
            ex.kaa_id,
            ex.rerun_of or None,
        )

    def _update_row(self, execution_id: str) -> tuple[Any, ...]:
        ex = self.rows[execution_id]
        reason = ex.reason
        return (
            int(ex.status),
            ex.updated_at_ms,
            ex.completed_at_ms,
            ex.result_json,
            reason.code if reason else None,
            reason.description if reason else None,
            json.dumps(list(ex.result_violations)) if ex.result_violations else None,
            execution_id,
        )


class SqliteStore:
    """Executions and their event log in one SQLite file.

    Use as an async context manager, and run :meth:`run_writer` as a background
    task for as long as the store is open.
    """

    def __init__(self, path: Path, on_commit: CommitListener | None = None) -> None:
        self.path = path
        self._on_commit = on_commit
        # Writes submitted during this loop iteration; handed to the writer thread together
        # on the next one, so operations started together share a commit.
        self._submitted: list[_Op] = []
        self._handover_scheduled = False
        self._inbox: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self._writer_running = False
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="fleetcmd-db-writer")
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="fleetcmd-db-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._next_seq = 1
        self._cache: dict[str, Execution] = {}  # writer thread only
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
            self._hand_over()
            self._inbox.put(None)

    async def close(self) -> None:
        """Commit anything still queued (when no writer loop ran) and close the file."""
        self.stop_writer()  # a running writer commits what is queued, then ends before the close below
        loop = asyncio.get_running_loop()
        if not self._writer_running:
            while True:
                try:
                    ops = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if ops:
                    await self._run_batch(ops)
        if self._wconn is not None:
            conn, self._wconn = self._wconn, None
            await loop.run_in_executor(self._writer_pool, conn.close)
        if self._rconn is not None:
            rconn, self._rconn = self._rconn, None
            await loop.run_in_executor(self._reader_pool, rconn.close)
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)

    async def run_writer(self) -> None:
        """Group-commit loop: run every queued write of a batch in one transaction.

        The loop itself runs on the writer thread: it takes whatever is queued,
        commits it and hands the results back to the event loop, then takes the
        next batch at once, without waiting for the event loop to schedule it.
        """
        loop = asyncio.get_running_loop()
        self._writer_running = True
        try:
            await loop.run_in_executor(self._writer_pool, self._writer_main, loop)
        except asyncio.CancelledError:
            self._inbox.put(None)  # the thread ends after what is queued
            raise
        finally:
            self._writer_running = False

    def _writer_main(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            first = self._inbox.get()
            stop = first is None
            batch = first or []
            if batch and all(op.deferrable for op in batch):
                try:
                    more = self._inbox.get(timeout=DEFER_LINGER)
                except queue.Empty:
                    more = []
                if more is None:
                    stop = True
                else:
                    batch += more
            while not stop and len(batch) < MAX_BATCH:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    batch += more
            if batch:
                try:
                    events = self._execute_batch(batch)
                except Exception as exc:  # the commit itself failed: nothing of the batch is durable
                    log.exception("store batch of %d writes failed", len(batch))
                    loop.call_soon_threadsafe(self._fail, batch, exc)
                else:
                    loop.call_soon_threadsafe(self._complete, batch, events)
            if stop:
                return

    async def _run_batch(self, batch: list[_Op]) -> None:
        """Commit ``batch`` from the event loop (only when no writer loop runs)."""
        loop = asyncio.get_running_loop()
        try:
            events = await loop.run_in_executor(self._writer_pool, self._execute_batch, batch)
        except Exception as exc:
            log.exception("store batch of %d writes failed", len(batch))
            self._fail(batch, exc)
        else:
            self._complete(batch, events)

    def _fail(self, batch: list[_Op], exc: Exception) -> None:
        for op in batch:
            if not op.future.done():
                op.future.set_exception(Unavailable(f"store write failed: {exc}"))

    def _complete(self, batch: list[_Op], events: list[StateChange]) -> None:
        # On the event loop, after the commit. Resolving a future only schedules its waiters,
        # so the listener still sees the events before any caller resumes; resolving first
        # puts the callers (a Send about to publish its request) ahead of the watchers the
        # listener wakes.
        self.batches += 1
        self.ops += len(batch)
        for op in batch:
            future = op.future
            if future.done():  # the caller went away (cancelled); the write still happened
                continue
            if op.error is not None:
                future.set_exception(op.error)
            else:
                future.set_result(op.result)
        if events and self._on_commit is not None:
            try:
                self._on_commit(events)
            except Exception:  # a listener bug must not lose the callers' results
                log.exception("commit listener failed")

    def _execute_batch(self, batch: list[_Op]) -> list[StateChange]:
        """Run and commit ``batch``; returns the committed events in sequence order."""
        conn = self._wconn
        assert conn is not None
        try:
            tx = self._run_ops(conn, batch, isolate=False)
        except Exception:
            log.warning("batch of %d writes failed as a whole; retrying each on its own", len(batch), exc_info=True)
            tx = self._run_ops(conn, batch, isolate=True)
        try:
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._next_seq = tx.next_seq
        self._remember(tx.rows)
        return tx.events

    def _run_ops(self, conn: sqlite3.Connection, batch: list[_Op], *, isolate: bool) -> _Tx:
        """Run ``batch`` in a new transaction, left open for the caller to commit.

        Planned operations change nothing when they raise, so without ``isolate``
        they share the transaction and their writes go out together at the end; if
        that bulk write fails the caller rolls back and runs the batch again with
        ``isolate``: every operation in its own savepoint, written at once, so the
        one that fails is rolled back alone. Other operations always get a savepoint.
        """
        tx = _Tx(conn, self._next_seq, self._cache)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                op.result = op.error = None
                if op.planned and not isolate:
                    try:
                        op.result, change = op.fn(tx)
                    except Exception as exc:  # noqa: BLE001 - every failure belongs to its caller
                        op.error = exc
                        continue
                    if change is not None:
                        tx.apply(change)
                    continue
                conn.execute("SAVEPOINT op")
                undo: _Undo | None = None
                try:
                    if op.planned:
                        result, change = op.fn(tx)
                        if change is not None:
                            undo = tx.apply(change)
                            tx.flush()
                        op.result = result
                    else:
                        op.result = op.fn(tx)
                except Exception as exc:  # noqa: BLE001 - every failure belongs to its caller
                    conn.execute("ROLLBACK TO op")
                    if undo is not None:
                        tx.undo(undo)
                    op.result, op.error = None, exc
                conn.execute("RELEASE op")
            tx.flush()
        except BaseException:
            _rollback(conn)
            raise
        return tx

    def _remember(self, rows: dict[str, Execution]) -> None:
        # Committed: what the cache holds is now what SQLite holds.
        cache = self._cache
        for execution_id, ex in rows.items():
            cache.pop(execution_id, None)
            if not ex.status.final and len(ex.params_json or "") + len(ex.result_json or "") <= CACHE_MAX_PAYLOAD:
                cache[execution_id] = ex  # (re)inserted last: the oldest go first
        while len(cache) > CACHE_SIZE:
            del cache[next(iter(cache))]

    def _submit(self, fn: Callable[[_Tx], Any], *, planned: bool, deferrable: bool = False) -> asyncio.Future[Any]:
        if self._closing:
            raise Unavailable("store is closing")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._submitted.append(_Op(fn, future, planned, deferrable))
        if not self._handover_scheduled:
            self._handover_scheduled = True
            loop.call_soon(self._hand_over)
        return future

    def _hand_over(self) -> None:
        self._handover_scheduled = False
        if self._submitted:
            ops, self._submitted = self._submitted, []
            self._inbox.put(ops)

    async def _write(self, fn: Callable[[_Tx], T]) -> T:
        # A caller that gives up (gRPC deadline) cancels only its wait: the write stays
        # queued, and is committed, whatever happens to the future.
        result: T = await self._submit(fn, planned=False)
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._rconn
        if conn is None:
            raise Unavailable("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, fn, conn)

    # ---- writes -------------------------------------------------------------------------

    async def create(self, new: NewExecution) -> CreateResult:
        """See :meth:`server.store.Store.create`."""
        result: CreateResult = await self._submit(lambda tx: _create(tx, new), planned=True)
        return result

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
        return await self.transition_nowait(
            execution_id, trigger, at_ms=at_ms, report=report, expect_thing=expect_thing, result_check=result_check
        )

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
        """See :meth:`server.store.Store.transition_nowait`."""
        return self._submit(
            lambda tx: _transition(tx, execution_id, trigger, at_ms, report, expect_thing, result_check),
            planned=True,
            deferrable=deferrable,
        )

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
                out += conn.execute(f"SELECT {_EXEC_COLUMNS} FROM executions WHERE execution_id IN ({marks})", chunk).fetchall()
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
        sql = f"SELECT execution_id, thing_id, status, expires_at FROM executions WHERE status NOT IN ({finals}) ORDER BY idx"

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
            cur = tx.conn.execute("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?", (at_ms, key_id))
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


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _create(tx: _Tx, new: NewExecution) -> tuple[CreateResult, _Change | None]:
    # Planned: reads only; what it returns is written by the batch.
    if new.idempotency_key:
        existing = tx.by_idempotency_key(new.idempotency_key)
        if existing is not None:
            execution, fingerprint = existing
            if fingerprint != new.fingerprint:
                raise AlreadyExists(
                    f"idempotency_key {new.idempotency_key!r} was used for a different request "
                    f"(execution {execution.execution_id})"
                )
            return CreateResult(execution, created=False, event=None), None
    kaa_id = tx.next_kaa_id(new.thing_id, new.action) if new.kaa else None
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
    event = StateChange(
        sequence=tx.next_seq,
        execution_id=new.execution_id,
        thing_id=new.thing_id,
        action=new.action,
        status=new.status,
        previous_status=None,
        at_ms=new.created_at_ms,
        note="created",
    )
    change = _Change(execution, event, created=True, fingerprint=new.fingerprint)
    return CreateResult(execution, created=True, event=event), change


def _transition(
    tx: _Tx,
    execution_id: str,
    trigger: Trigger,
    at_ms: int,
    report: DeviceReport | None,
    expect_thing: str | None,
    result_check: ResultCheck | None,
) -> tuple[TransitionResult, _Change | None]:
    # Planned: reads only (everything that can raise happens here); the batch writes the change.
    current = tx.lookup(execution_id)
    if current is None:
        raise NotFound(f"execution {execution_id!r} not found")
    if expect_thing is not None and expect_thing != current.thing_id:
        raise ThingMismatch(
            f"report for execution {execution_id} names thing {expect_thing!r}, the execution's is {current.thing_id!r}"
        )
    same = report is not None and (
        report.status == current.status and report.result_json == current.result_json and report.reason == current.reason
    )
    decision: Decision = decide(current.status, trigger, report.status if report else None, same_report=same)
    outcome = decision.outcome
    if outcome is not Outcome.CHANGE and outcome is not Outcome.LATE:
        return TransitionResult(current, decision, None), None
    late = outcome is Outcome.LATE
    result_json = report.result_json if report else None
    reason = report.reason if report else None
    event = StateChange(
        sequence=tx.next_seq,
        execution_id=current.execution_id,
        thing_id=current.thing_id,
        action=current.action,
        status=report.status if (report and late) else decision.status,
        previous_status=current.status,
        at_ms=at_ms,
        late=late,
        result_json=result_json,
        reason=reason,
        note=decision.note,
    )
    if late:
        return TransitionResult(current, decision, event), _Change(None, event)
    new_status = decision.status
    # A device report carries the result; other triggers keep what the device sent last.
    if report is not None:
        violations = tuple(result_check(current, report)) if result_check is not None else ()
        updated = _evolve(
            current,
            status=new_status,
            updated_at_ms=at_ms,
            completed_at_ms=at_ms if new_status.final else None,
            result_json=result_json,
            reason=reason,
            result_violations=violations,
        )
    else:
        updated = _evolve(current, status=new_status, updated_at_ms=at_ms, completed_at_ms=at_ms if new_status.final else None)
    return TransitionResult(updated, decision, event), _Change(updated, event)


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
