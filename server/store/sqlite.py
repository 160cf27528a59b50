"""SQLite implementation of :class:`server.store.Store` (WAL, group commit), ``sqlite:///path``.

It also implements :class:`server.store.RegistryStore` and :class:`server.store.KaaStore`.

One writer thread owns the write connection. Callers queue operations; what is
queued during one event-loop iteration is handed to the writer together, and
the writer takes everything handed over, runs it as one transaction, commits
once and hands the results back to the event loop. One fsync serves the whole
batch, which is what makes durable writes cheap under load.

Creates and transitions are *planned*: they only read (the execution as this
transaction sees it: its own earlier writes, then a cache of committed
non-final executions, then SQLite), let the pure rules of :mod:`server.core.decisions`
decide, and return the row and event to write; the batch writes all of them at the end with one ``executemany`` per
statement. An operation that raises has therefore changed nothing and needs no
savepoint. Should the bulk write itself fail (a constraint only SQLite can
check), the transaction is rolled back and the batch runs again with every
operation in its own SAVEPOINT and written at once, so one failing operation
never undoes the others. Other writes (registry, API keys) always run in their
own savepoint.

Reads use a second connection on its own thread; WAL lets them run beside the
writer and they only ever see committed data.

The schema and the row conversions are in :mod:`server.store.sqlite_schema`, the batch
transaction (queued operations, planning, bulk writes) in :mod:`server.store.sqlite_batch`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from server.core.errors import AlreadyExists, FailedPrecondition, FleetcmdError, NotFound, Unavailable
from server.core.lifecycle import Status, Trigger
from server.core.models import (
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
from server.store import (
    CommitListener,
    CommitObserver,
    CreateResult,
    KaaStore,
    ListPage,
    ResultCheck,
    ServiceStore,
    TransitionResult,
)
from server.store.rows import api_key_from_row, thing_from_row, thing_type_from_row, type_definition
from server.store.sqlite_batch import Op, Tx, Undo, plan_create, plan_transition, rollback
from server.store.sqlite_jobs import SqliteJobs
from server.store.sqlite_schema import (
    EVENT_COLUMNS,
    EXEC_COLUMNS,
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    connect,
    event_from_row,
    events_from_rows,
    execution_from_row,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 512

# How long the writer holds a batch of deferrable writes only (DELIVERED on a PUBACK) for the
# next ones: the device's answer usually follows its PUBACK within a fraction of a millisecond,
# and sharing their commit spares the answer, which someone waits for, a whole fsync.
DEFER_LINGER = 0.001

# Executions the writer keeps in memory (committed state), so a transition needs no SELECT.
# Bounded in count and by payload size: a miss only costs one indexed read.
CACHE_SIZE = 10_000
CACHE_MAX_PAYLOAD = 4_096


def _resolve(op: Op) -> None:
    future = op.future
    if future.done():  # the caller went away (cancelled); the write still happened
        return
    if op.error is not None:
        future.set_exception(op.error)
    else:
        future.set_result(op.result)


class SqliteStore(SqliteJobs):
    """Executions and their event log in one SQLite file (and the jobs: :class:`server.store.sqlite_jobs.SqliteJobs`).

    Use as an async context manager, and run :meth:`run_writer` as a background
    task for as long as the store is open.
    """

    def __init__(self, path: Path, on_commit: CommitListener | None = None) -> None:
        self.path = path
        self._on_commit = on_commit
        # Writes submitted during this loop iteration; handed to the writer thread together
        # on the next one, so operations started together share a commit.
        self._submitted: list[Op] = []
        self._handover_scheduled = False
        self._inbox: queue.SimpleQueue[list[Op] | None] = queue.SimpleQueue()
        self._writer_running = False
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="fleetcmd-db-writer")
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="fleetcmd-db-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._next_seq = 1
        self._cache: dict[str, Execution] = {}  # writer thread only
        self._closing = False
        self.batches = 0  # commits so far, for metrics and benchmarks
        self._on_commit_done: CommitObserver | None = None
        self._purged_through = 0  # written by the writer thread, read on the loop (an int: atomic)
        self.ops = 0

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """The store of ``sqlite:///relative/path`` or ``sqlite:////absolute/path``, not opened yet.

        Raises:
            FleetcmdError: the URL is not an ``sqlite://`` URL with a path.
        """
        scheme, _, rest = url.partition("://")
        path = rest[1:] if rest.startswith("/") else ""
        if scheme != "sqlite" or not path or "?" in path:
            raise FleetcmdError(f"database_url {url!r}: expected sqlite:///relative/path or sqlite:////absolute/path")
        return cls(Path(path))

    @property
    def commits(self) -> int:
        """See :attr:`server.store.Store.commits`."""
        return self.batches

    def set_commit_listener(self, listener: CommitListener) -> None:
        """See :meth:`server.store.Store.set_commit_listener`."""
        self._on_commit = listener

    def set_commit_observer(self, observer: CommitObserver) -> None:
        """See :meth:`server.store.Store.set_commit_observer`."""
        self._on_commit_done = observer

    def purged_through(self) -> int:
        """See :meth:`server.store.Store.purged_through`."""
        return self._purged_through

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
        self._rconn = await loop.run_in_executor(self._reader_pool, lambda: connect(self.path, readonly=True))

    def _open_writer(self) -> sqlite3.Connection:
        conn = connect(self.path, readonly=False)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FleetcmdError(f"{self.path} has schema {version}, newer than this fleetcmd ({SCHEMA_VERSION})")
        if version:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for added_in, table, column in MIGRATIONS:
                if version < added_in and table in tables:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._next_seq = (conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]) + 1
        purged = conn.execute("SELECT value FROM meta WHERE key = 'purged_through_seq'").fetchone()
        self._purged_through = purged[0] if purged else 0
        # Sequences are never reused after retention empties the log's tail.
        self._next_seq = max(self._next_seq, self._purged_through + 1)
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
                started = time.perf_counter()
                try:
                    events = self._execute_batch(batch)
                except Exception as exc:  # the commit itself failed: nothing of the batch is durable
                    log.exception("store batch of %d writes failed", len(batch))
                    loop.call_soon_threadsafe(self._fail, batch, exc)
                else:
                    loop.call_soon_threadsafe(self._complete, batch, events, time.perf_counter() - started)
            if stop:
                return

    async def _run_batch(self, batch: list[Op]) -> None:
        """Commit ``batch`` from the event loop (only when no writer loop runs)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            events = await loop.run_in_executor(self._writer_pool, self._execute_batch, batch)
        except Exception as exc:
            log.exception("store batch of %d writes failed", len(batch))
            self._fail(batch, exc)
        else:
            self._complete(batch, events, time.perf_counter() - started)

    def _fail(self, batch: list[Op], exc: Exception) -> None:
        for op in batch:
            if not op.future.done():
                op.future.set_exception(Unavailable(f"store write failed: {exc}"))

    def _complete(self, batch: list[Op], events: list[StateChange], seconds: float) -> None:
        # On the event loop, after the commit. Resolving a future only schedules its waiters,
        # so the listener still sees the events before any caller resumes. The order in which
        # they are scheduled is the order they run in: the callers marked ``ahead`` (a Send
        # about to publish its request: the device's round trip is the longer path), then the
        # watchers the listener wakes (a final status someone waits to see), then the rest
        # (bookkeeping such as a PUBACK to write to the device that reported).
        self.batches += 1
        self.ops += len(batch)
        if self._on_commit_done is not None:
            self._on_commit_done(seconds, len(batch))
        for op in batch:
            if op.ahead:
                _resolve(op)
        if events and self._on_commit is not None:
            try:
                self._on_commit(events)
            except Exception:  # a listener bug must not lose the callers' results
                log.exception("commit listener failed")
        for op in batch:
            if not op.ahead:
                _resolve(op)

    def _execute_batch(self, batch: list[Op]) -> list[StateChange]:
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
            rollback(conn)
            raise
        self._next_seq = tx.next_seq
        self._remember(tx.rows)
        return tx.events

    def _run_ops(self, conn: sqlite3.Connection, batch: list[Op], *, isolate: bool) -> Tx:
        """Run ``batch`` in a new transaction, left open for the caller to commit.

        Planned operations change nothing when they raise, so without ``isolate``
        they share the transaction and their writes go out together at the end; if
        that bulk write fails the caller rolls back and runs the batch again with
        ``isolate``: every operation in its own savepoint, written at once, so the
        one that fails is rolled back alone. Other operations always get a savepoint.
        """
        tx = Tx(conn, self._next_seq, self._cache)
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
                undo: Undo | None = None
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
            rollback(conn)
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

    def _submit(
        self, fn: Callable[[Tx], Any], *, planned: bool, deferrable: bool = False, ahead: bool = False
    ) -> asyncio.Future[Any]:
        if self._closing:
            raise Unavailable("store is closing")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._submitted.append(Op(fn, future, planned, deferrable, ahead))
        if not self._handover_scheduled:
            self._handover_scheduled = True
            loop.call_soon(self._hand_over)
        return future

    def _hand_over(self) -> None:
        self._handover_scheduled = False
        if self._submitted:
            ops, self._submitted = self._submitted, []
            self._inbox.put(ops)

    async def _write(self, fn: Callable[[Tx], T]) -> T:
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
        result: CreateResult = await self._submit(lambda tx: plan_create(tx, new), planned=True, ahead=True)
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
            lambda tx: plan_transition(tx, execution_id, trigger, at_ms, report, expect_thing, result_check),
            planned=True,
            deferrable=deferrable,
        )

    # ---- reads --------------------------------------------------------------------------

    async def get(self, execution_id: str, *, with_history: bool = False) -> Execution | None:
        """See :meth:`server.store.Store.get`."""

        def read(conn: sqlite3.Connection) -> Execution | None:
            row = conn.execute(f"SELECT {EXEC_COLUMNS} FROM executions WHERE execution_id = ?", (execution_id,)).fetchone()
            if row is None:
                return None
            history: tuple[StateChange, ...] = ()
            reruns: tuple[str, ...] = ()
            if with_history:
                rows = conn.execute(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE execution_id = ? ORDER BY seq", (execution_id,)
                ).fetchall()
                history = tuple(event_from_row(r) for r in rows)
                rerun_sql = "SELECT execution_id FROM executions WHERE rerun_of = ? ORDER BY idx"
                reruns = tuple(r[0] for r in conn.execute(rerun_sql, (execution_id,)))
            return execution_from_row(row, history, reruns)

        return await self._read(read)

    async def get_many(self, execution_ids: Sequence[str]) -> list[Execution]:
        """See :meth:`server.store.Store.get_many`."""
        ids = list(execution_ids)

        def read(conn: sqlite3.Connection) -> list[Execution]:
            out: list[sqlite3.Row] = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                out += conn.execute(f"SELECT {EXEC_COLUMNS} FROM executions WHERE execution_id IN ({marks})", chunk).fetchall()
            out.sort(key=lambda r: r["idx"])
            return [execution_from_row(r) for r in out]

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
        if query.job_id:
            where.append("job_id = ?")
            args.append(query.job_id)
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
        sql = f"SELECT {EXEC_COLUMNS} FROM executions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY idx DESC LIMIT ?"
        args.append(query.page_size + 1)

        def read(conn: sqlite3.Connection) -> ListPage:
            rows = conn.execute(sql, args).fetchall()
            more = len(rows) > query.page_size
            rows = rows[: query.page_size]
            return ListPage([execution_from_row(r) for r in rows], rows[-1]["idx"] if more and rows else None)

        return await self._read(read)

    async def events_after(self, after_sequence: int, flt: EventFilter, limit: int) -> list[StateChange]:
        """See :meth:`server.store.Store.events_after`."""
        where: list[str] = ["seq > ?"]
        args: list[object] = [after_sequence]
        columns = (("thing_id", flt.thing_id), ("execution_id", flt.execution_id), ("action", flt.action), ("job_id", flt.job_id))
        for column, value in columns:
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        args.append(limit)
        return await self._read(lambda conn: events_from_rows(conn, conn.execute(sql, args).fetchall()))

    async def last_sequence(self) -> int:
        """See :meth:`server.store.Store.last_sequence`."""
        sql = "SELECT COALESCE(MAX(seq), 0) FROM events"
        # Retention may have deleted the newest events: the sequence never goes back.
        return max(self._purged_through, await self._read(lambda conn: int(conn.execute(sql).fetchone()[0])))

    async def active(self) -> list[ActiveExecution]:
        """See :meth:`server.store.Store.active`."""
        finals = ",".join(str(int(s)) for s in Status if s.final)
        sql = (
            "SELECT execution_id, thing_id, status, expires_at, handed FROM executions"
            f" WHERE status NOT IN ({finals}) ORDER BY idx"
        )

        def read(conn: sqlite3.Connection) -> list[ActiveExecution]:
            return [
                ActiveExecution(r["execution_id"], r["thing_id"], Status(r["status"]), r["expires_at"], bool(r["handed"]))
                for r in conn.execute(sql).fetchall()
            ]

        return await self._read(read)

    async def mark_handed(self, execution_ids: Sequence[str]) -> int:
        """See :meth:`server.core.handover.HandoverStore.mark_handed` (one write, in the next group commit)."""
        unacked = ",".join(str(int(s)) for s in Status if s <= Status.SENT)
        sql = f"UPDATE executions SET handed = 1 WHERE execution_id = ? AND status IN ({unacked}) AND handed = 0"

        def write(tx: Tx) -> int:
            return sum(tx.conn.execute(sql, (execution_id,)).rowcount for execution_id in execution_ids)

        return await self._write(write)

    # ---- Kaa command ids ------------------------------------------------------------------

    async def outstanding(self, thing_id: str, action: str, now_ms: int) -> list[Execution]:
        """Non-final, unexpired executions of one Kaa endpoint and command type, by Kaa id."""
        finals = ",".join(str(int(s)) for s in Status if s.final)
        sql = (
            f"SELECT {EXEC_COLUMNS} FROM executions WHERE thing_id = ? AND action = ? AND kaa_id IS NOT NULL"
            f" AND status NOT IN ({finals}) AND expires_at > ? ORDER BY kaa_id"
        )
        return await self._read(lambda conn: [execution_from_row(r) for r in conn.execute(sql, (thing_id, action, now_ms))])

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
        return await self._read(lambda conn: [thing_from_row(r) for r in conn.execute("SELECT * FROM things ORDER BY thing_id")])

    async def load_thing_types(self) -> list[ThingTypeRecord]:
        """Every thing type."""
        return await self._read(
            lambda conn: [thing_type_from_row(r) for r in conn.execute("SELECT * FROM thing_types ORDER BY name")]
        )

    async def insert_thing(self, rec: ThingRecord) -> None:
        """Register a thing.

        Raises:
            AlreadyExists: a thing with that id exists.
        """

        def write(tx: Tx) -> None:
            try:
                tx.conn.execute(
                    "INSERT INTO things (thing_id, thing_type, attributes, token_hash, created_at, updated_at,"
                    " credentials_rotated_at, kaa_app_version, kaa_token_hash, broker_password_hash)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
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
                        rec.broker_password_hash,
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

        def write(tx: Tx) -> None:
            cur = tx.conn.execute(
                "UPDATE things SET thing_type = ?, attributes = ?, updated_at = ? WHERE thing_id = ?",
                (thing_type, json.dumps(attributes, sort_keys=True), at_ms, thing_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"thing {thing_id!r} not found")

        await self._write(write)

    async def set_thing_token(
        self, thing_id: str, token_hash: str, at_ms: int, kaa_token_hash: str = "", broker_password_hash: str = ""
    ) -> None:
        """Store new credentials for a thing (and a new Kaa endpoint token hash, when given).

        Raises:
            NotFound: no such thing.
        """

        def write(tx: Tx) -> None:
            cur = tx.conn.execute(
                "UPDATE things SET token_hash = ?, credentials_rotated_at = ?, updated_at = ?,"
                " kaa_token_hash = COALESCE(?, kaa_token_hash), broker_password_hash = ? WHERE thing_id = ?",
                (token_hash, at_ms, at_ms, kaa_token_hash or None, broker_password_hash, thing_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"thing {thing_id!r} not found")

        await self._write(write)

    async def ping(self) -> None:
        """See :meth:`server.store.Store.ping` (an UPSERT of one row of ``meta``, through the writer)."""

        def write(tx: Tx) -> None:
            tx.conn.execute(
                "INSERT INTO meta(key, value) VALUES ('ping', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (time.time_ns() // 1_000_000,),
            )

        await self._write(write)

    async def delete_finished(self, completed_before_ms: int, limit: int) -> int:
        """See :meth:`server.store.Store.delete_finished`."""

        def write(tx: Tx) -> int:
            conn = tx.conn
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT execution_id FROM executions WHERE completed_at IS NOT NULL AND completed_at < ? "
                    "AND status >= ? ORDER BY completed_at LIMIT ?",
                    (completed_before_ms, int(Status.SUCCEEDED), limit),
                )
            ]
            if not ids:
                return 0
            marks = ",".join("?" * len(ids))
            top = conn.execute(f"SELECT MAX(seq) FROM events WHERE execution_id IN ({marks})", ids).fetchone()[0]
            conn.execute(f"DELETE FROM events WHERE execution_id IN ({marks})", ids)
            conn.execute(f"DELETE FROM executions WHERE execution_id IN ({marks})", ids)
            if top is not None and top > self._purged_through:
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('purged_through_seq', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (top,),
                )
                self._purged_through = top
            return len(ids)

        return await self._write(write)

    async def delete_thing(self, thing_id: str) -> None:
        """Unregister a thing (its executions stay).

        Raises:
            NotFound: no such thing.
        """

        def write(tx: Tx) -> None:
            if tx.conn.execute("DELETE FROM things WHERE thing_id = ?", (thing_id,)).rowcount == 0:
                raise NotFound(f"thing {thing_id!r} not found")

        await self._write(write)

    async def record_presence(self, connections: Sequence[LastConnection]) -> None:
        """Remember when and from where each thing was last connected (a missing thing is ignored)."""
        rows = [(c.last_seen_ms, c.client_id, c.remote_address, c.connected_at_ms, c.thing_id) for c in connections]

        def write(tx: Tx) -> None:
            tx.conn.executemany(
                "UPDATE things SET last_seen = ?, last_client_id = ?, last_remote_address = ?,"
                " last_connected_at = COALESCE(?, last_connected_at) WHERE thing_id = ?",
                rows,
            )

        await self._write(write)

    async def put_thing_type(self, rec: ThingTypeRecord) -> ThingTypeRecord:
        """Create or replace a thing type; the stored version is one more than the previous one."""

        def write(tx: Tx) -> ThingTypeRecord:
            row = tx.conn.execute("SELECT version, created_at FROM thing_types WHERE name = ?", (rec.name,)).fetchone()
            version = (row["version"] + 1) if row else 1
            created = row["created_at"] if row else rec.created_at_ms
            stored = ThingTypeRecord(
                rec.name, rec.description, rec.commands, rec.allow_undefined_actions, version, created, rec.updated_at_ms
            )
            tx.conn.execute(
                "INSERT OR REPLACE INTO thing_types (name, definition, version, created_at, updated_at) VALUES (?,?,?,?,?)",
                (rec.name, type_definition(stored), version, created, rec.updated_at_ms),
            )
            return stored

        return await self._write(write)

    async def delete_thing_type(self, name: str) -> None:
        """Delete a thing type.

        Raises:
            NotFound: no such type.
            FailedPrecondition: things still use it.
        """

        def write(tx: Tx) -> None:
            used = tx.conn.execute("SELECT COUNT(*) FROM things WHERE thing_type = ?", (name,)).fetchone()[0]
            if used:
                raise FailedPrecondition(f"thing type {name!r} is used by {used} thing(s)")
            if tx.conn.execute("DELETE FROM thing_types WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"thing type {name!r} not found")

        await self._write(write)

    async def insert_api_key(self, rec: ApiKeyRecord) -> None:
        """Store a new API key."""

        def write(tx: Tx) -> None:
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

        def write(tx: Tx) -> None:
            cur = tx.conn.execute("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?", (at_ms, key_id))
            if cur.rowcount == 0:
                raise NotFound(f"API key {key_id!r} not found")

        await self._write(write)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """One API key by id."""

        def read(conn: sqlite3.Connection) -> ApiKeyRecord | None:
            row = conn.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            return api_key_from_row(row) if row else None

        return await self._read(read)

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every API key, revoked ones included, oldest first."""
        return await self._read(
            lambda conn: [api_key_from_row(r) for r in conn.execute("SELECT * FROM api_keys ORDER BY created_at")]
        )


if TYPE_CHECKING:
    # mypy proves here that this class fulfils the contracts store_from_url promises.
    _CONTRACTS: tuple[type[ServiceStore], type[KaaStore]] = (SqliteStore, SqliteStore)
