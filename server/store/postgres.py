"""PostgreSQL implementation of :class:`server.store.Store` (asyncpg, group commit), ``postgresql://...``.

It also implements :class:`server.store.RegistryStore`, :class:`server.store.KaaStore` and
:class:`server.store.JobStore` (:mod:`server.store.postgres_jobs`), and what several replicas sharing
one database need (:class:`ReplicaStore`): TTL sweeps any replica may run, outbox leases, and a lock
per job (:class:`server.store.JobLocks`).

Several stores (replicas) may write to one database at once. What keeps that correct:

- **One writer per store, group commit.** Writes queued while a transaction runs go together into
  the next one (at most :data:`MAX_BATCH`), as in SQLite: one commit, one event-counter update and
  one NOTIFY serve the whole batch.
- **Exactly one final status.** A batch first locks every execution its transitions touch
  (``SELECT ... FOR UPDATE``, in id order so two batches never wait on each other in a cycle),
  decides each trigger with :mod:`server.core.decisions` against what it read under that lock, and
  writes with an update guarded by the status it decided against. A report racing another replica's
  final status waits for that commit, reads the final status, and is recorded as ``late``. A trigger
  in the schema refuses any backwards change whoever writes it.
- **A gap-free event log in commit order.** Events get their numbers at the end of the batch from
  the one-row ``event_counter`` (``UPDATE ... RETURNING``): its row lock is held until the commit,
  so batches number their events in the order they commit, and a reader that sees sequence ``n``
  sees every lower one. Each batch sends one ``NOTIFY``; every store follows the log
  (:meth:`PostgresStore.run_writer` listens, and polls every :data:`POLL_SECONDS` should a
  notification be lost) and hands the commit listener every event of the database, its own and
  the other replicas', once each, in sequence order.
- **Retries.** A deadlock, a serialization failure or a unique key another replica took first
  (idempotency key, Kaa id) rolls the batch back and runs it again (it then sees the other commit);
  a failure that persists runs the batch again with each write in its own savepoint, so one bad
  write never undoes the others.

The schema, its migrations and the row conversions are in :mod:`server.store.postgres_schema`, the
batch transaction in :mod:`server.store.postgres_batch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import asyncpg

from server.core.errors import AlreadyExists, FailedPrecondition, FleetcmdError, NotFound, Unavailable
from server.core.jobs import Job
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
    JobLocks,
    JobStore,
    KaaStore,
    ListPage,
    ResultCheck,
    ServiceStore,
    TransitionResult,
)
from server.store.postgres_batch import CHANNEL, LOST, Batch, Op, Retry
from server.store.postgres_jobs import PostgresJobs
from server.store.postgres_schema import (
    EVENT_COLUMNS,
    EXEC_COLUMNS,
    FIRST_FINAL,
    JOB_OF_EVENTS,
    LAST_UNACKED,
    event_from_row,
    event_job_ids,
    events_from_rows,
    execution_from_row,
    job_event_parts_of,
    migrate,
)
from server.store.rows import api_key_from_row, thing_from_row, thing_type_from_row, type_definition

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 512
# As SQLite's: a batch of deferrable writes only (DELIVERED on a PUBACK) waits this long for company.
DEFER_LINGER = 0.001
# How often a store looks for other replicas' commits when no notification came (a lost NOTIFY,
# a dropped listening connection).
POLL_SECONDS = 1.0
# Registry writes (things, types, credentials) notify here in their transaction, named by the
# writing replica, so the others read the registry back when it changed instead of on a timer.
REGISTRY_CHANNEL = "fleetcmd_registry"
# A batch that keeps conflicting with other replicas is run this many times before each of its
# writes is isolated in its own savepoint.
RETRIES = 8
# Events read per query when following the other replicas' commits.
FOLLOW_PAGE = 1_000
# How long a replica holds a request it claimed (and one it created) before another may publish it.
DEFAULT_LEASE_MS = 30_000
# The lease_until of a request the broker acknowledged (its QoS 1 PUBACK): a lease no claim outlasts,
# so no replica publishes it again (the broker's session for the device holds it; its message expiry
# and the TTL sweep end it). No column of its own: the claim's range scan over the partial index
# executions_unacked(lease_until, idx) never reaches it.
HANDED_UNTIL = 2**63 - 1
READ_POOL_SIZE = 4
_E_EXEC_COLUMNS = ", ".join("e." + c for c in EXEC_COLUMNS.split(", "))


@dataclass(frozen=True)
class Lease:
    """An outbox request claimed by one replica: it publishes ``execution`` once, under this lease."""

    execution: Execution
    epoch: int  # the how-manieth claim of this request: one lease, one publish
    until_ms: int


class ReplicaStore(Protocol):
    """What replicas sharing one store need beyond :class:`server.store.Store`."""

    async def expire_due(self, now_ms: int, limit: int) -> list[TransitionResult]:
        """Time out up to ``limit`` non-final executions whose deadline passed; rows another replica is sweeping are skipped."""

    async def claim_unacked(self, now_ms: int, limit: int, thing_ids: Sequence[str] = ()) -> list[Lease]:
        """Lease up to ``limit`` requests no device acknowledged whose lease ended (or never began), oldest first."""

    async def release(self, execution_id: str, epoch: int) -> bool:
        """End this replica's lease ``epoch`` of a request early (its device went away); False if it was not held."""


class PostgresStore(PostgresJobs):
    """Executions, their event log, the registry and the jobs in one PostgreSQL database, shared by any number of replicas.

    Use as an async context manager, and run :meth:`run_writer` as a background task for as
    long as the store is open.
    """

    def __init__(self, url: str, *, replica: str = "", lease_ms: int = DEFAULT_LEASE_MS) -> None:
        self.url = url
        # Names this store's outbox leases; unique per process and start.
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_ms = lease_ms
        self._on_commit: CommitListener | None = None
        self._on_commit_done: CommitObserver | None = None
        self._submitted: list[Op] = []
        self._work = asyncio.Event()
        self._closing = False
        self._writer_running = False
        self._wconn: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._follow = asyncio.Event()
        # Set when another replica's registry write committed (or the listening connection was
        # re-established, when one may have been missed).
        self._registry_changed = asyncio.Event()
        self._listened = False  # a listening connection was up before (the registry was loaded at start)
        # The highest sequence handed to the commit listener: every event at or below it was (or was purged).
        self._delivered = 0
        self._purged_through = 0
        self.batches = 0
        self.ops = 0
        self.retries = 0  # batches run again after a conflict with another replica (a metric)

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """The store of ``postgresql://user:password@host:port/database`` (or ``postgres://``), not opened yet.

        Raises:
            FleetcmdError: the URL names no database.
        """
        scheme, _, rest = url.partition("://")
        if scheme not in ("postgresql", "postgres") or not rest or "/" not in rest or not rest.split("/", 1)[1].split("?")[0]:
            raise FleetcmdError(f"database_url {url!r}: expected postgresql://user:password@host:port/database")
        return cls(url)

    # ---- lifecycle -----------------------------------------------------------------------

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

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, create or migrate the schema, and start following the log from its end."""
        try:
            self._wconn = await asyncpg.connect(self.url)
            await migrate(self._wconn)
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=READ_POOL_SIZE)
            # Listening before reading where the log ends: no commit falls between the two.
            await self._listen()
        except (OSError, asyncpg.PostgresError) as exc:
            await self._disconnect()
            raise Unavailable(f"cannot open {self._safe_url()}: {exc}") from exc
        # What was committed before this store opened is history (Stream reads it), not news.
        self._delivered = await self.last_sequence()
        await self._refresh_purged()

    async def _refresh_purged(self) -> None:
        # Any replica's retention moves the watermark: read it back (at open, and while following the log).
        purged = await self._fetchval("SELECT value FROM meta WHERE key = 'purged_through_seq'")
        self._purged_through = max(self._purged_through, purged or 0)

    def _safe_url(self) -> str:
        # The URL without its password, for messages.
        scheme, _, rest = self.url.partition("://")
        creds, at, host = rest.rpartition("@")
        return f"{scheme}://{creds.split(':')[0]}@{host}" if at else self.url

    def stop_writer(self) -> None:
        """Refuse new writes and let :meth:`run_writer` end once it has committed what is queued."""
        self._closing = True
        self._work.set()

    async def close(self) -> None:
        """Commit anything still queued (when no writer loop ran) and disconnect."""
        self.stop_writer()
        if not self._writer_running:
            while self._submitted:
                await self._run_batch(self._take())
        await self._disconnect()

    async def _disconnect(self) -> None:
        await self._close_job_locks()
        for conn in (self._listen_conn, self._wconn):
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await conn.close()
        self._listen_conn = self._wconn = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def run_writer(self) -> None:
        """Group-commit loop, and the follower of other replicas' commits, until :meth:`stop_writer`."""
        self._writer_running = True
        follower = asyncio.create_task(self._follow_log(), name="fleetcmd-pg-follow")
        try:
            while True:
                if not self._submitted:
                    if self._closing:
                        return
                    self._work.clear()
                    await self._work.wait()
                    continue
                if all(op.deferrable for op in self._submitted) and not self._closing:
                    await asyncio.sleep(DEFER_LINGER)
                await self._run_batch(self._take())
        finally:
            self._writer_running = False
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    def _take(self) -> list[Op]:
        batch, self._submitted = self._submitted[:MAX_BATCH], self._submitted[MAX_BATCH:]
        return batch

    # ---- the batch transaction ------------------------------------------------------------

    async def _writer_conn(self) -> asyncpg.Connection:
        if self._wconn is None or self._wconn.is_closed():
            self._wconn = await asyncpg.connect(self.url)
        return self._wconn

    async def _run_batch(self, ops: list[Op]) -> None:
        started = time.perf_counter()
        try:
            batch = await self._commit(ops)
        except Exception as exc:  # the commit itself failed: nothing of the batch is durable
            log.exception("store batch of %d writes failed", len(ops))
            for op in ops:
                if not op.future.done():
                    op.future.set_exception(Unavailable(f"store write failed: {exc}"))
            return
        # Other replicas' events numbered below this batch's are announced first.
        if batch.first_seq and batch.first_seq - 1 > self._delivered:
            try:
                await self._catch_up(batch.first_seq - 1)
            except (*LOST, asyncpg.PostgresError, Unavailable) as exc:
                # Committed all the same: the callers get their results; this store's watchers miss
                # the other replicas' events below this batch (a Stream that resumes reads them).
                log.error("could not read other replicas' events below sequence %d: %s", batch.first_seq, exc)
        self._complete(ops, batch.events, time.perf_counter() - started)

    async def _commit(self, ops: list[Op]) -> Batch:
        conn = await self._writer_conn()
        isolate = False
        for attempt in range(RETRIES + 1):
            isolate = isolate or attempt == RETRIES
            batch = Batch(conn, self.replica, self.lease_ms, isolate=isolate)
            try:
                async with conn.transaction():
                    await batch.run(ops)
                return batch
            except Retry as conflict:
                self.retries += 1
                log.debug("batch conflicted with another writer (%s); running it again", conflict)
                # Replicas that collided should not collide again in lock step.
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
            except asyncpg.PostgresError as exc:
                if isolate or isinstance(exc, LOST):
                    raise
                # A write only the database could refuse (a value it cannot store): find it, alone.
                log.warning("batch of %d writes failed as a whole (%s); running each in its own savepoint", len(ops), exc)
                isolate = True
        raise Unavailable(f"a batch of {len(ops)} writes kept conflicting with other replicas")

    def _complete(self, ops: list[Op], events: list[StateChange], seconds: float) -> None:
        # As SqliteStore._complete: the callers marked ``ahead`` resume first, then the listener
        # sees the commit, then the other callers resume.
        self.batches += 1
        self.ops += len(ops)
        if self._on_commit_done is not None:
            self._on_commit_done(seconds, len(ops))
        for op in ops:
            if op.ahead:
                op.resolve()
        self._announce(events)
        for op in ops:
            if not op.ahead:
                op.resolve()

    def _announce(self, events: Sequence[StateChange]) -> None:
        """Hand the listener the events above what it has seen (each event once, in sequence order)."""
        fresh = [e for e in events if e.sequence > self._delivered]
        if not fresh:
            return
        self._delivered = fresh[-1].sequence
        if self._on_commit is not None:
            try:
                self._on_commit(fresh)
            except Exception:  # a listener bug must not lose the callers' results
                log.exception("commit listener failed")

    # ---- following the other replicas' commits --------------------------------------------

    async def _catch_up(self, upto: int | None = None) -> None:
        """Announce every committed event above what was announced (up to ``upto``), page by page."""
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3"
        while True:
            after = self._delivered
            limit = upto if upto is not None else await self.last_sequence()
            if after >= limit:
                return
            rows = await self._fetch(sql, after, limit, FOLLOW_PAGE)
            if not rows:
                # Only purged events were left below ``limit``: nothing to announce up to it.
                self._delivered = max(self._delivered, limit)
                return
            # Other replicas' job events too: their snapshots are rebuilt from the stored job (its spec).
            self._announce(await self._events(rows))

    async def _follow_log(self) -> None:
        """Announce what other replicas commit: woken by NOTIFY, or every :data:`POLL_SECONDS` without one."""
        while True:
            if self._listen_conn is None or self._listen_conn.is_closed():
                await self._listen()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the cancel that ends this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._follow.wait()
            self._follow.clear()
            try:
                await self._catch_up()
                await self._refresh_purged()
            except (*LOST, asyncpg.PostgresError, Unavailable) as exc:
                log.warning("following the event log failed (%s); polling again", exc)

    async def _listen(self) -> None:
        try:
            conn = await asyncpg.connect(self.url)
            await conn.add_listener(CHANNEL, self._notified)
            await conn.add_listener(REGISTRY_CHANNEL, self._registry_notified)
            if self._listened:
                self._registry_changed.set()  # what changed while nobody listened is read back once
            self._listen_conn, self._listened = conn, True
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("cannot LISTEN for other replicas' commits (%s); polling every %.1f s", exc, POLL_SECONDS)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if int(str(payload)) > self._delivered:
            self._follow.set()

    def _registry_notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload != self.replica:  # this replica's registry holds its own changes already
            self._registry_changed.set()

    async def wait_registry_change(self, timeout: float) -> bool:
        """Wait until another replica changed the registry (True), or ``timeout`` seconds pass (False).

        Without a listening connection every wait reports a change: the caller reads back as often as it waits.
        """
        if self._listen_conn is None or self._listen_conn.is_closed():
            await asyncio.sleep(min(timeout, POLL_SECONDS))
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._registry_changed.wait()
        changed = self._registry_changed.is_set()
        self._registry_changed.clear()
        return changed

    async def _registry_write(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """:meth:`_write` of a registry change that tells the other replicas on commit (not if it fails)."""

        async def write(conn: asyncpg.Connection) -> T:
            result = await fn(conn)
            await conn.execute("SELECT pg_notify($1, $2)", REGISTRY_CHANNEL, self.replica)
            return result

        return await self._write(write)

    # ---- queueing writes -----------------------------------------------------------------

    def _submit(self, op: Op) -> asyncio.Future[Any]:
        if self._closing:
            raise Unavailable("store is closing")
        self._submitted.append(op)
        self._work.set()
        return op.future

    def _op(self, kind: str, *args: Any, deferrable: bool = False, ahead: bool = False) -> Op:
        return Op(kind, args, asyncio.get_running_loop().create_future(), deferrable=deferrable, ahead=ahead)

    async def _write(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        # Run in its own savepoint of the next batch; the write stays queued (and is committed)
        # whatever becomes of the caller's wait.
        result: T = await self._submit(self._op("call", fn))
        return result

    async def _write_job_events(self, fn: Callable[[asyncpg.Connection, list[tuple[Job, int]]], Awaitable[T]]) -> T:
        # As _write; the (job, at_ms) ``fn`` appends to its list become job events of the same transaction,
        # numbered from the event counter with the batch's other events (gap-free, in commit order).
        result: T = await self._submit(self._op("job_call", fn))
        return result

    # ---- reads ---------------------------------------------------------------------------

    def _readers(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Unavailable("store is closed")
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            rows: list[asyncpg.Record] = await self._readers().fetch(sql, *args)
        except LOST as exc:
            raise Unavailable(f"store read failed: {exc}") from exc
        return rows

    async def _events(self, rows: Sequence[asyncpg.Record]) -> list[StateChange]:
        """The events of rows of ``EVENT_COLUMNS``: job events rebuilt (one read of the jobs of first job events, if any)."""
        parts = job_event_parts_of(rows)
        job_ids = event_job_ids(rows, parts)
        jobs = {r[0]: r for r in await self._fetch(JOB_OF_EVENTS, job_ids)} if job_ids else {}
        return events_from_rows(rows, parts, jobs)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self._readers().fetchval(sql, *args)
        except LOST as exc:
            raise Unavailable(f"store read failed: {exc}") from exc

    # ---- writes --------------------------------------------------------------------------

    async def create(self, new: NewExecution) -> CreateResult:
        """See :meth:`server.store.Store.create`."""
        result: CreateResult = await self._submit(self._op("create", new, ahead=True))
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
        op = self._op("transition", execution_id, trigger, at_ms, report, expect_thing, result_check, deferrable=deferrable)
        return self._submit(op)

    async def expire_due(self, now_ms: int, limit: int) -> list[TransitionResult]:
        """See :meth:`ReplicaStore.expire_due` (``FOR UPDATE SKIP LOCKED`` over the partial deadline index)."""
        results: list[TransitionResult] = await self._submit(self._op("expire_due", now_ms, limit))
        return results

    async def claim_unacked(self, now_ms: int, limit: int, thing_ids: Sequence[str] = ()) -> list[Lease]:
        """See :meth:`ReplicaStore.claim_unacked`: each claim is a new lease epoch, held for ``lease_ms``."""
        only = "AND thing_id = ANY($5::text[])" if thing_ids else ""
        sql = (
            f"UPDATE executions AS e SET lease_owner = $1, lease_until = $2::bigint + $3::bigint, lease_epoch = e.lease_epoch + 1"
            f" FROM (SELECT idx FROM executions WHERE status <= {LAST_UNACKED} AND (lease_until IS NULL OR lease_until <= $2)"
            f" {only} ORDER BY idx LIMIT $4 FOR UPDATE SKIP LOCKED) AS c"
            f" WHERE e.idx = c.idx RETURNING {_E_EXEC_COLUMNS}, e.lease_epoch, e.lease_until"
        )
        args: list[Any] = [self.replica, now_ms, self.lease_ms, limit]
        if thing_ids:
            args.append(list(thing_ids))
        rows = await self._fetch(sql, *args)
        leases = [Lease(execution_from_row(r), r["lease_epoch"], r["lease_until"]) for r in rows]
        leases.sort(key=lambda lease: lease.execution.created_at_ms)
        return leases

    async def release(self, execution_id: str, epoch: int) -> bool:
        """See :meth:`ReplicaStore.release`."""
        sql = (
            "UPDATE executions SET lease_until = NULL, lease_owner = NULL"
            " WHERE execution_id = $1 AND lease_owner = $2 AND lease_epoch = $3 RETURNING 1"
        )
        return bool(await self._fetchval(sql, execution_id, self.replica, epoch))

    async def mark_handed(self, execution_ids: Sequence[str]) -> int:
        """See :meth:`server.core.handover.HandoverStore.mark_handed` (whoever holds the lease: any PUBACK hands it over)."""
        if not execution_ids:
            return 0
        sql = (
            "UPDATE executions SET lease_until = $2, lease_owner = NULL, handed = TRUE"
            f" WHERE execution_id = ANY($1::text[]) AND status <= {LAST_UNACKED} AND NOT handed"
        )
        try:
            done: str = await self._readers().execute(sql, list(execution_ids), HANDED_UNTIL)
        except LOST as exc:
            raise Unavailable(f"store write failed: {exc}") from exc
        return int(done.rsplit(" ", 1)[-1])

    # ---- reads ---------------------------------------------------------------------------

    async def get(self, execution_id: str, *, with_history: bool = False) -> Execution | None:
        """See :meth:`server.store.Store.get`."""
        try:
            async with self._readers().acquire() as conn:
                row = await conn.fetchrow(f"SELECT {EXEC_COLUMNS} FROM executions WHERE execution_id = $1", execution_id)
                if row is None:
                    return None
                if not with_history:
                    return execution_from_row(row)
                sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE execution_id = $1 ORDER BY seq"
                events = await conn.fetch(sql, execution_id)
                reruns = await conn.fetch("SELECT execution_id FROM executions WHERE rerun_of = $1 ORDER BY idx", execution_id)
        except LOST as exc:
            raise Unavailable(f"store read failed: {exc}") from exc
        return execution_from_row(row, tuple(event_from_row(e) for e in events), tuple(r[0] for r in reruns))

    async def get_many(self, execution_ids: Sequence[str]) -> list[Execution]:
        """See :meth:`server.store.Store.get_many`."""
        if not execution_ids:
            return []
        sql = f"SELECT {EXEC_COLUMNS} FROM executions WHERE execution_id = ANY($1::text[]) ORDER BY idx"
        return [execution_from_row(r) for r in await self._fetch(sql, list(execution_ids))]

    async def list_executions(self, query: ListQuery) -> ListPage:
        """See :meth:`server.store.Store.list_executions`."""
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.thing_id:
            where.append(f"thing_id = {arg(query.thing_id)}")
        if query.action:
            where.append(f"action = {arg(query.action)}")
        if query.job_id:
            where.append(f"job_id = {arg(query.job_id)}")
        if query.statuses:
            where.append(f"status = ANY({arg(sorted(int(s) for s in query.statuses))}::smallint[])")
        if query.created_after_ms is not None:
            where.append(f"created_at >= {arg(query.created_after_ms)}")
        if query.created_before_ms is not None:
            where.append(f"created_at < {arg(query.created_before_ms)}")
        if query.before_index is not None:
            where.append(f"idx < {arg(query.before_index)}")
        sql = f"SELECT {EXEC_COLUMNS} FROM executions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY idx DESC LIMIT {arg(query.page_size + 1)}"
        rows = await self._fetch(sql, *args)
        more = len(rows) > query.page_size
        rows = rows[: query.page_size]
        return ListPage([execution_from_row(r) for r in rows], rows[-1]["idx"] if more and rows else None)

    async def events_after(self, after_sequence: int, flt: EventFilter, limit: int) -> list[StateChange]:
        """See :meth:`server.store.Store.events_after`."""
        where = ["seq > $1"]
        args: list[Any] = [after_sequence]
        columns = (("thing_id", flt.thing_id), ("execution_id", flt.execution_id), ("action", flt.action), ("job_id", flt.job_id))
        for column, value in columns:
            if value:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        args.append(limit)
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ${len(args)}"
        return await self._events(await self._fetch(sql, *args))

    async def last_sequence(self) -> int:
        """See :meth:`server.store.Store.last_sequence` (the counter: it never goes back, whatever retention deleted)."""
        return int(await self._fetchval("SELECT last_seq FROM event_counter"))

    async def active(self) -> list[ActiveExecution]:
        """See :meth:`server.store.Store.active`."""
        sql = f"SELECT execution_id, thing_id, status, expires_at FROM executions WHERE status < {FIRST_FINAL} ORDER BY idx"
        return [ActiveExecution(r[0], r[1], Status(r[2]), r[3]) for r in await self._fetch(sql)]

    # ---- Kaa command ids ------------------------------------------------------------------

    async def outstanding(self, thing_id: str, action: str, now_ms: int) -> list[Execution]:
        """Non-final, unexpired executions of one Kaa endpoint and command type, by Kaa id."""
        sql = (
            f"SELECT {EXEC_COLUMNS} FROM executions WHERE thing_id = $1 AND action = $2 AND kaa_id IS NOT NULL"
            f" AND status < {FIRST_FINAL} AND expires_at > $3 ORDER BY kaa_id"
        )
        return [execution_from_row(r) for r in await self._fetch(sql, thing_id, action, now_ms)]

    async def execution_id_for_kaa(self, thing_id: str, action: str, kaa_id: int) -> str | None:
        """The execution behind a Kaa command id."""
        sql = "SELECT execution_id FROM executions WHERE thing_id = $1 AND action = $2 AND kaa_id = $3"
        found = await self._fetchval(sql, thing_id, action, kaa_id)
        return str(found) if found is not None else None

    # ---- registry: things, thing types, API keys -----------------------------------------

    async def load_things(self) -> list[ThingRecord]:
        """Every registered thing."""
        return [thing_from_row(r) for r in await self._fetch("SELECT * FROM things ORDER BY thing_id")]

    async def load_thing_types(self) -> list[ThingTypeRecord]:
        """Every thing type."""
        return [thing_type_from_row(r) for r in await self._fetch("SELECT * FROM thing_types ORDER BY name")]

    async def insert_thing(self, rec: ThingRecord) -> None:
        """Register a thing.

        Raises:
            AlreadyExists: a thing with that id (or Kaa token) exists.
        """

        async def write(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(
                    "INSERT INTO things (thing_id, thing_type, attributes, token_hash, created_at, updated_at,"
                    " credentials_rotated_at, kaa_app_version, kaa_token_hash, broker_password_hash)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
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
                )
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"thing {rec.thing_id!r} already exists") from None

        await self._registry_write(write)

    async def update_thing(self, thing_id: str, *, thing_type: str, attributes: dict[str, str], at_ms: int) -> None:
        """Replace a thing's type and attributes.

        Raises:
            NotFound: no such thing.
        """

        async def write(conn: asyncpg.Connection) -> None:
            done = await conn.fetchval(
                "UPDATE things SET thing_type = $1, attributes = $2, updated_at = $3 WHERE thing_id = $4 RETURNING 1",
                thing_type,
                json.dumps(attributes, sort_keys=True),
                at_ms,
                thing_id,
            )
            if not done:
                raise NotFound(f"thing {thing_id!r} not found")

        await self._registry_write(write)

    async def set_thing_token(
        self, thing_id: str, token_hash: str, at_ms: int, kaa_token_hash: str = "", broker_password_hash: str = ""
    ) -> None:
        """Store new credentials for a thing (and a new Kaa endpoint token hash, when given).

        Raises:
            NotFound: no such thing.
        """

        async def write(conn: asyncpg.Connection) -> None:
            done = await conn.fetchval(
                "UPDATE things SET token_hash = $1, credentials_rotated_at = $2, updated_at = $2,"
                " kaa_token_hash = COALESCE($3, kaa_token_hash), broker_password_hash = $5 WHERE thing_id = $4 RETURNING 1",
                token_hash,
                at_ms,
                kaa_token_hash or None,
                thing_id,
                broker_password_hash,
            )
            if not done:
                raise NotFound(f"thing {thing_id!r} not found")

        await self._registry_write(write)

    async def delete_thing(self, thing_id: str) -> None:
        """Unregister a thing (its executions stay).

        Raises:
            NotFound: no such thing.
        """

        async def write(conn: asyncpg.Connection) -> None:
            if not await conn.fetchval("DELETE FROM things WHERE thing_id = $1 RETURNING 1", thing_id):
                raise NotFound(f"thing {thing_id!r} not found")

        await self._registry_write(write)

    async def record_presence(self, connections: Sequence[LastConnection]) -> None:
        """Remember when and from where each thing was last connected (a missing thing is ignored)."""
        # In thing order: two replicas recording the same things lock their rows in the same order.
        ordered = sorted(connections, key=lambda c: c.thing_id)
        rows = [(c.last_seen_ms, c.client_id, c.remote_address, c.connected_at_ms, c.thing_id) for c in ordered]

        async def write(conn: asyncpg.Connection) -> None:
            await conn.executemany(
                "UPDATE things SET last_seen = $1, last_client_id = $2, last_remote_address = $3,"
                " last_connected_at = COALESCE($4, last_connected_at) WHERE thing_id = $5",
                rows,
            )

        await self._write(write)

    async def put_thing_type(self, rec: ThingTypeRecord) -> ThingTypeRecord:
        """Create or replace a thing type; the stored version is one more than the previous one."""

        async def write(conn: asyncpg.Connection) -> ThingTypeRecord:
            row = await conn.fetchrow("SELECT version, created_at FROM thing_types WHERE name = $1 FOR UPDATE", rec.name)
            version = (row["version"] + 1) if row else 1
            created = row["created_at"] if row else rec.created_at_ms
            stored = ThingTypeRecord(
                rec.name, rec.description, rec.commands, rec.allow_undefined_actions, version, created, rec.updated_at_ms
            )
            await conn.execute(
                "INSERT INTO thing_types (name, definition, version, created_at, updated_at) VALUES ($1,$2,$3,$4,$5)"
                " ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, version = excluded.version,"
                " created_at = excluded.created_at, updated_at = excluded.updated_at",
                rec.name,
                type_definition(stored),
                version,
                created,
                rec.updated_at_ms,
            )
            return stored

        return await self._registry_write(write)

    async def delete_thing_type(self, name: str) -> None:
        """Delete a thing type.

        Raises:
            NotFound: no such type.
            FailedPrecondition: things still use it.
        """

        async def write(conn: asyncpg.Connection) -> None:
            used = await conn.fetchval("SELECT COUNT(*) FROM things WHERE thing_type = $1", name)
            if used:
                raise FailedPrecondition(f"thing type {name!r} is used by {used} thing(s)")
            if not await conn.fetchval("DELETE FROM thing_types WHERE name = $1 RETURNING 1", name):
                raise NotFound(f"thing type {name!r} not found")

        await self._registry_write(write)

    async def insert_api_key(self, rec: ApiKeyRecord) -> None:
        """Store a new API key."""

        async def write(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO api_keys (key_id, name, role, secret_hash, created_at) VALUES ($1,$2,$3,$4,$5)",
                rec.key_id,
                rec.name,
                rec.role,
                rec.secret_hash,
                rec.created_at_ms,
            )

        await self._write(write)

    async def revoke_api_key(self, key_id: str, at_ms: int) -> None:
        """Revoke a key (idempotent for a revoked one).

        Raises:
            NotFound: no such key.
        """

        async def write(conn: asyncpg.Connection) -> None:
            sql = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE key_id = $2 RETURNING 1"
            if not await conn.fetchval(sql, at_ms, key_id):
                raise NotFound(f"API key {key_id!r} not found")

        await self._write(write)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """One API key by id."""
        rows = await self._fetch("SELECT * FROM api_keys WHERE key_id = $1", key_id)
        return api_key_from_row(rows[0]) if rows else None

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every API key, revoked ones included, oldest first."""
        return [api_key_from_row(r) for r in await self._fetch("SELECT * FROM api_keys ORDER BY created_at, key_id")]

    # ---- service state -------------------------------------------------------------------

    async def ping(self) -> None:
        """See :meth:`server.store.Store.ping` (an UPSERT of one row of ``meta``, through the writer)."""

        async def write(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('ping', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                time.time_ns() // 1_000_000,
            )

        await self._write(write)

    async def delete_finished(self, completed_before_ms: int, limit: int) -> int:
        """See :meth:`server.store.Store.delete_finished` (rows another replica is deleting are skipped)."""

        async def write(conn: asyncpg.Connection) -> int:
            ids = [
                r[0]
                for r in await conn.fetch(
                    "SELECT execution_id FROM executions WHERE completed_at IS NOT NULL AND completed_at < $1"
                    f" AND status >= {FIRST_FINAL} ORDER BY completed_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                    completed_before_ms,
                    limit,
                )
            ]
            if not ids:
                return 0
            top = await conn.fetchval("SELECT MAX(seq) FROM events WHERE execution_id = ANY($1::text[])", ids)
            await conn.execute("DELETE FROM events WHERE execution_id = ANY($1::text[])", ids)
            await conn.execute("DELETE FROM executions WHERE execution_id = ANY($1::text[])", ids)
            if top is not None:
                watermark = await conn.fetchval(
                    "INSERT INTO meta (key, value) VALUES ('purged_through_seq', $1) ON CONFLICT (key)"
                    " DO UPDATE SET value = GREATEST(meta.value, excluded.value) RETURNING value",
                    top,
                )
                self._purged_through = max(self._purged_through, watermark)
            return len(ids)

        return await self._write(write)


if TYPE_CHECKING:
    # mypy proves here that this class fulfils the contracts store_from_url promises.
    _CONTRACTS: tuple[type[ServiceStore], type[KaaStore], type[JobStore], type[ReplicaStore], type[JobLocks]] = (
        PostgresStore,
        PostgresStore,
        PostgresStore,
        PostgresStore,
        PostgresStore,
    )
