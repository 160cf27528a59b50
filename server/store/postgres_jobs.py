"""PostgreSQL implementation of :class:`server.store.JobStore`, mixed into :class:`server.store.postgres.PostgresStore`.

The same semantics as :mod:`server.store.sqlite_jobs`, on the same schema version. Every write goes
through the store's group-commit writer. A job's events (its state and count changes) are written in the
transaction of the write they come with (the job's row for a state change), numbered from the event
counter with the batch's other events, so the event log stays gap-free in commit order on every replica.
The durable step of a rollout, :meth:`PostgresJobs.dispatch`,
is a *planned* batch operation (:func:`server.store.postgres_batch.plan_dispatch`): in the batch's
transaction it locks the targets it starts (``SELECT ... FOR UPDATE`` in thing order), checks each still
waits for that attempt, plans its execution with the same pure rules as a Send and marks the target
DISPATCHED; the executions and their first events are written by the batch with its other creates, and
the events numbered from the event counter inside the committing transaction. The unique index
``executions_job_attempt`` refuses a second execution of one (job, thing, attempt) whichever replica
tries.

Several replicas may share the jobs: the row locks make a target start once however many dispatchers
race, a job's targets are added under its row lock (their order has no gaps), and an idempotency key
taken by another replica at the same moment returns that replica's job. Which replica runs a job's
rollout is :meth:`PostgresJobs.lock_job`'s advisory lock (see ``docs/postgres.md``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from server.core.errors import AlreadyExists, NotFound, Unavailable
from server.core.jobs import Job, JobState
from server.core.lifecycle import Status
from server.core.models import Execution, job_event_parts, job_from_event, later_job_event
from server.store import JobDispatch, JobRecord, TargetRow, TargetSettle, TargetState
from server.store.postgres_batch import LOST, Op

T = TypeVar("T")

_STATUS: dict[int, Status] = {int(s): s for s in Status}
_UNFINISHED = ",".join(str(s.value) for s in JobState if not s.final)
# The count name of a target that has no execution status of its own.
_STATE_NAMES = {
    TargetState.PENDING: "PENDING",
    TargetState.RETRY: "RETRYING",
    TargetState.SKIPPED: "SKIPPED",
    TargetState.REJECTED: "REJECTED",
}
# The seed of the 64-bit hash of a job id that keys its advisory lock (which replica runs the job): two
# jobs share a lock only if their ids collide in 64 bits.
JOB_LOCK_SEED = 0x6A6F6273  # "jobs"
# How long the lock connection may take to answer a liveness check before it is given up (and its jobs with it).
LOCK_CHECK_SECONDS = 5.0

JOB_COLUMNS = (
    "idx, job_id, spec, state, created_at, started_at, ended_at, abort_reason, created_by, targets_total,"
    " resolved, resolve_cursor, counts, idempotency_key, sequential, only_undelivered"
)
TARGET_COLUMNS = (
    "t.thing_id, t.seq, t.state, t.attempt, t.execution_id, COALESCE(e.status, t.status), t.due_at, t.dispatched_at, t.reason,"
    " e.completed_at"
)
TARGET_FROM = "job_targets t LEFT JOIN executions e ON t.state = 1 AND e.execution_id = t.execution_id"
_INSERT_JOB = (
    "INSERT INTO jobs (job_id, spec, state, created_at, started_at, ended_at, abort_reason, created_by,"
    " targets_total, resolved, resolve_cursor, idempotency_key, fingerprint, sequential)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) ON CONFLICT DO NOTHING RETURNING idx"
)

# The adoption query (JobLocks.unlocked_jobs): the oldest unfinished or unsettled jobs whose advisory lock no session
# holds. A bigint advisory key shows in pg_locks as classid (high half) and objid (low half), objsubid 1. Its first
# condition is the predicate of the partial index jobs_unsettled (schema 7), word for word: the planner reads the
# few unsettled jobs in age order from that index, not every job ever run.
UNLOCKED_JOBS = (
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE (state IN ({_UNFINISHED}) OR counts IS NULL) AND NOT EXISTS ("
    " SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(jobs.job_id, $2)"
    ") ORDER BY idx LIMIT $1"
)


def _job(row: asyncpg.Record) -> JobRecord:
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
        resolved=row[10],
        resolve_cursor=row[11],
        counts_json=row[12] or "",
        idempotency_key=row[13] or "",
        sequential=row[14],
        only_undelivered=row[15],
    )


def _target(row: asyncpg.Record) -> TargetRow:
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


def _affected(status: str) -> int:
    """The row count of a command tag (``UPDATE 3`` -> 3)."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresJobs:
    """The job queries and writes; the host class supplies the writer, the readers and the URL."""

    url: str
    _write: Callable[..., Awaitable[Any]]
    _write_job_events: Callable[..., Awaitable[Any]]
    _fetch: Callable[..., Awaitable[list[asyncpg.Record]]]
    _fetchval: Callable[..., Awaitable[Any]]
    _submit: Callable[[Op], asyncio.Future[Any]]
    _op: Callable[..., Op]
    replica: str
    _lock_conn: asyncpg.Connection | None = None
    _lock_token: str | None = None  # the lock connection's (see lock_job); None: this store never locked a job
    _locked: frozenset[str] = frozenset()
    _lock_guard: asyncio.Lock | None = None

    async def insert_job(self, rec: JobRecord, fingerprint: str, event: Job | None = None) -> tuple[JobRecord, bool]:
        """See :meth:`server.store.JobStore.insert_job`."""

        async def write(conn: asyncpg.Connection, events: list[tuple[Job, int]]) -> tuple[JobRecord, bool]:
            # ON CONFLICT: a key another replica is inserting at this moment is waited for, then read.
            inserted = await conn.fetchval(
                _INSERT_JOB,
                rec.job_id,
                rec.spec_json,
                rec.state.value,
                rec.created_at_ms,
                rec.started_at_ms,
                rec.ended_at_ms,
                rec.abort_reason,
                rec.created_by,
                rec.targets_total,
                rec.resolved,
                rec.resolve_cursor,
                rec.idempotency_key or None,
                fingerprint,
                rec.sequential,
            )
            if inserted is not None:
                if event is not None:
                    events.append((event, rec.created_at_ms))
                return rec, True
            if rec.idempotency_key:
                row = await conn.fetchrow(
                    f"SELECT {JOB_COLUMNS}, fingerprint FROM jobs WHERE idempotency_key = $1", rec.idempotency_key
                )
                if row is not None:
                    if row[-1] != fingerprint:
                        raise AlreadyExists(f"idempotency_key {rec.idempotency_key!r} was used for a different job ({row[1]})")
                    return _job(row), False
            raise AlreadyExists(f"job {rec.job_id!r} already exists")

        result: tuple[JobRecord, bool] = await self._write_job_events(write)
        return result

    async def get_job(self, job_id: str) -> JobRecord | None:
        """See :meth:`server.store.JobStore.get_job`."""
        rows = await self._fetch(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1", job_id)
        return _job(rows[0]) if rows else None

    async def list_jobs(self, states: Sequence[JobState], limit: int, before_idx: int | None) -> list[tuple[int, JobRecord]]:
        """See :meth:`server.store.JobStore.list_jobs`."""
        where: list[str] = []
        args: list[Any] = []
        if states:
            args.append([s.value for s in states])
            where.append(f"state = ANY(${len(args)}::smallint[])")
        if before_idx is not None:
            args.append(before_idx)
            where.append(f"idx < ${len(args)}")
        sql = f"SELECT {JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        args.append(limit)
        sql += f" ORDER BY idx DESC LIMIT ${len(args)}"
        return [(r[0], _job(r)) for r in await self._fetch(sql, *args)]

    async def unfinished_jobs(self) -> list[JobRecord]:
        """See :meth:`server.store.JobStore.unfinished_jobs`."""
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({_UNFINISHED}) OR counts IS NULL ORDER BY idx"
        return [_job(r) for r in await self._fetch(sql)]

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

        async def write(conn: asyncpg.Connection, events: list[tuple[Job, int]]) -> None:
            done = await conn.fetchval(
                "UPDATE jobs SET state = $1, started_at = $2, ended_at = $3, abort_reason = $4, counts = $5,"
                " only_undelivered = $6 WHERE job_id = $7 RETURNING 1",
                state.value,
                started_at_ms,
                ended_at_ms,
                abort_reason,
                counts_json or None,
                only_undelivered,
                job_id,
            )
            if not done:
                raise NotFound(f"job {job_id!r} not found")
            if event is not None:
                events.append((later_job_event(event), at_ms))

        await self._write_job_events(write)

    async def job_events(self, jobs: Sequence[Job], at_ms: int) -> None:
        """See :meth:`server.store.JobStore.job_events`."""

        async def write(_conn: asyncpg.Connection, events: list[tuple[Job, int]]) -> None:
            events.extend((later_job_event(job), at_ms) for job in jobs)

        await self._write_job_events(write)

    async def add_targets(self, job_id: str, thing_ids: Sequence[str], *, cursor: str, resolved: bool) -> int:
        """See :meth:`server.store.JobStore.add_targets`."""
        ids = list(thing_ids)

        async def write(conn: asyncpg.Connection) -> int:
            # The job's row lock orders every replica adding targets to it: seq numbers stay gapless.
            total = await conn.fetchval("SELECT targets_total FROM jobs WHERE job_id = $1 FOR UPDATE", job_id)
            if total is None:
                raise NotFound(f"job {job_id!r} not found")
            taken = {
                r[0]
                for r in await conn.fetch(
                    "SELECT thing_id FROM job_targets WHERE job_id = $1 AND thing_id = ANY($2::text[])", job_id, ids
                )
            }
            fresh = [t for t in dict.fromkeys(ids) if t not in taken]
            if fresh:
                await conn.execute(
                    "INSERT INTO job_targets (job_id, thing_id, seq, state)"
                    " SELECT $1, u.thing_id, $3::bigint + u.n - 1, 0 FROM unnest($2::text[]) WITH ORDINALITY AS u(thing_id, n)",
                    job_id,
                    fresh,
                    total,
                )
            await conn.execute(
                "UPDATE jobs SET targets_total = targets_total + $1, resolve_cursor = $2, resolved = $3 WHERE job_id = $4",
                len(fresh),
                cursor,
                resolved,
                job_id,
            )
            return len(fresh)

        added: int = await self._write(write)
        return added

    async def thing_page(self, after: str, limit: int, thing_type: str) -> list[tuple[str, str, dict[str, str]]]:
        """See :meth:`server.store.JobStore.thing_page`."""
        sql = "SELECT thing_id, thing_type, attributes FROM things WHERE thing_id > $1"
        args: list[Any] = [after]
        if thing_type:
            args.append(thing_type)
            sql += f" AND thing_type = ${len(args)}"
        args.append(limit)
        sql += f" ORDER BY thing_id LIMIT ${len(args)}"
        return [(r[0], r[1], json.loads(r[2])) for r in await self._fetch(sql, *args)]

    async def target_ids(self, job_id: str, statuses: Sequence[Status], after: str, limit: int) -> list[str]:
        """See :meth:`server.store.JobStore.target_ids`."""
        sql = (
            f"SELECT t.thing_id FROM {TARGET_FROM} WHERE t.job_id = $1 AND t.thing_id > $2"
            " AND COALESCE(e.status, t.status) = ANY($3::smallint[]) ORDER BY t.thing_id LIMIT $4"
        )
        return [r[0] for r in await self._fetch(sql, job_id, after, [int(s) for s in statuses], limit)]

    async def targets(
        self, job_id: str, states: Sequence[TargetState], limit: int, *, after_seq: int = -1, due_by_ms: int | None = None
    ) -> list[TargetRow]:
        """See :meth:`server.store.JobStore.targets`."""
        if due_by_ms is not None:
            sql = (
                f"SELECT {TARGET_COLUMNS} FROM {TARGET_FROM} WHERE t.job_id = $1 AND t.state = 3 AND t.due_at <= $2"
                " ORDER BY t.due_at LIMIT $3"
            )
            rows = await self._fetch(sql, job_id, due_by_ms, limit)
        else:
            sql = (
                f"SELECT {TARGET_COLUMNS} FROM {TARGET_FROM} WHERE t.job_id = $1 AND t.state = ANY($2::smallint[])"
                " AND t.seq > $3 ORDER BY t.seq LIMIT $4"
            )
            rows = await self._fetch(sql, job_id, [int(s) for s in states], after_seq, limit)
        return [_target(r) for r in rows]

    async def next_due_ms(self, job_id: str) -> int | None:
        """See :meth:`server.store.JobStore.next_due_ms`."""
        due: int | None = await self._fetchval("SELECT MIN(due_at) FROM job_targets WHERE job_id = $1 AND state = 3", job_id)
        return due

    async def dispatch(
        self, job_id: str, dispatches: Sequence[JobDispatch], rejections: Sequence[tuple[str, int, str]], at_ms: int
    ) -> list[Execution | None]:
        """See :meth:`server.store.JobStore.dispatch` (:func:`server.store.postgres_batch.plan_dispatch`)."""
        # The token of the lock connection now: the dispatch commits only if the job's row still names it (or none).
        result: list[Execution | None] = await self._submit(
            self._op("job_dispatch", job_id, list(dispatches), list(rejections), at_ms, self._lock_token)
        )
        return result

    async def settle(self, job_id: str, settles: Sequence[TargetSettle]) -> None:
        """See :meth:`server.store.JobStore.settle`."""
        # In thing order: two replicas settling the same targets lock their rows in the same order.
        ordered = sorted(settles, key=lambda s: s.thing_id)
        rows = [(int(s.state), int(s.status), s.due_at_ms, job_id, s.thing_id, s.attempt) for s in ordered]

        async def write(conn: asyncpg.Connection) -> None:
            await conn.executemany(
                "UPDATE job_targets SET state = $1, status = $2, due_at = $3"
                " WHERE job_id = $4 AND thing_id = $5 AND attempt = $6 AND state = 1",
                rows,
            )

        await self._write(write)

    async def skip_unstarted(self, job_id: str, reason: str) -> int:
        """See :meth:`server.store.JobStore.skip_unstarted`."""

        async def write(conn: asyncpg.Connection) -> int:
            tag = await conn.execute(
                "UPDATE job_targets SET state = 5, reason = $1 WHERE job_id = $2 AND state IN (0, 3)", reason, job_id
            )
            return _affected(tag)

        skipped: int = await self._write(write)
        return skipped

    async def job_counts(self, job_id: str, *, below_seq: int | None = None) -> dict[str, int]:
        """See :meth:`server.store.JobStore.job_counts`."""
        sql = (
            f"SELECT t.state, COALESCE(e.status, t.status) AS st, COUNT(*) FROM {TARGET_FROM}"
            " WHERE t.job_id = $1 AND t.seq < $2 GROUP BY t.state, st"
        )
        counts: dict[str, int] = {}
        for state, status, n in await self._fetch(sql, job_id, below_seq if below_seq is not None else 2**62):
            ts = TargetState(state)
            name = _STATE_NAMES.get(ts) or (_STATUS[status].name if status is not None else "PENDING")
            counts[name] = counts.get(name, 0) + n
        return counts

    async def last_dispatch_ms(self, job_id: str) -> int | None:
        """See :meth:`server.store.JobStore.last_dispatch_ms`."""
        last: int | None = await self._fetchval("SELECT MAX(dispatched_at) FROM job_targets WHERE job_id = $1", job_id)
        return last

    async def sequential_busy(self) -> list[tuple[str, str]]:
        """See :meth:`server.store.JobStore.sequential_busy`."""
        sql = (
            "SELECT t.thing_id, t.execution_id FROM job_targets t JOIN jobs j ON j.job_id = t.job_id"
            f" WHERE t.state = 1 AND j.sequential AND j.state IN ({_UNFINISHED})"
        )
        return [(r[0], r[1]) for r in await self._fetch(sql)]

    # ---- which replica runs a job (JobLocks) ------------------------------------------------

    async def lock_job(self, job_id: str) -> bool:
        """See :meth:`JobLocks.lock_job`: a session advisory lock on a connection of its own.

        The lock lives as long as that connection: a replica that dies (or loses the connection)
        gives its jobs up at once, and another replica's ``lock_job`` then succeeds.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._lock_guard_():
            if job_id in self.jobs_locked():
                return True
            for attempt in range(2):
                try:
                    if self._lock_conn is None or self._lock_conn.is_closed():
                        self._locked = frozenset()  # whatever the lost connection held is gone
                        self._lock_conn = await asyncpg.connect(self.url)
                        # A new token per connection: dispatches sent under an older one are refused once the job
                        # is locked again (by anyone); kept when the connection is lost, never reset to None.
                        self._lock_token = f"{self.replica}/{uuid.uuid4().hex}"
                    got = bool(
                        await self._lock_conn.fetchval(
                            "SELECT pg_try_advisory_lock(hashtextextended($1, $2))", job_id, JOB_LOCK_SEED
                        )
                    )
                    if got and not await self._own_row(self._lock_conn, job_id):
                        return False
                    break
                except (*LOST, asyncpg.PostgresError) as exc:
                    # A connection found dead only now: its locks are gone; one new connection is tried.
                    self._locked = frozenset()
                    if self._lock_conn is not None:
                        self._lock_conn.terminate()
                    self._lock_conn = None
                    if attempt:
                        raise Unavailable(f"cannot lock job {job_id!r}: {exc}") from exc
            if got:
                self._locked = self._locked | {job_id}
            return got

    async def _own_row(self, conn: asyncpg.Connection, job_id: str) -> bool:
        """Write this lock connection's token into the job's row, just locked (the fence of :func:`plan_dispatch`).

        The update waits for the row's share locks: a dispatch of the job's previous holder under way (it checked
        its token before the lock was lost) commits before the job is taken over, so its rebuild reads it. If that
        takes more than ``LOCK_CHECK_SECONDS`` the lock is given up again (False): a later pass tries again.
        """
        try:
            await conn.execute(
                "UPDATE jobs SET lock_owner = $1 WHERE job_id = $2", self._lock_token, job_id, timeout=LOCK_CHECK_SECONDS
            )
        except TimeoutError:
            await conn.fetchval("SELECT pg_advisory_unlock(hashtextextended($1, $2))", job_id, JOB_LOCK_SEED)
            return False
        return True

    async def unlock_job(self, job_id: str) -> None:
        """See :meth:`JobLocks.unlock_job`."""
        async with self._lock_guard_():
            if job_id not in self.jobs_locked():
                return
            self._locked = self._locked - {job_id}
            conn = self._lock_conn
            if conn is not None and not conn.is_closed():
                try:
                    await conn.fetchval("SELECT pg_advisory_unlock(hashtextextended($1, $2))", job_id, JOB_LOCK_SEED)
                except (*LOST, asyncpg.PostgresError):
                    pass  # the connection is going: the database releases its locks with it

    async def check_job_locks(self) -> frozenset[str]:
        """See :meth:`JobLocks.check_job_locks`: one round trip on the lock connection.

        A connection that fails or does not answer within ``LOCK_CHECK_SECONDS`` is dropped (a replica
        cut off from the database must stop running its jobs before another takes them over).
        """
        async with self._lock_guard_():
            conn = self._lock_conn
            if conn is None or conn.is_closed() or not self._locked:
                return self.jobs_locked()
            try:
                await conn.fetchval("SELECT 1", timeout=LOCK_CHECK_SECONDS)
            except (*LOST, asyncpg.PostgresError, TimeoutError):
                self._locked = frozenset()
                self._lock_conn = None
                conn.terminate()
            return self.jobs_locked()

    async def unlocked_jobs(self, limit: int) -> list[JobRecord]:
        """See :meth:`JobLocks.unlocked_jobs`: jobs whose advisory lock ``pg_locks`` shows no session holding."""
        return [_job(r) for r in await self._fetch(UNLOCKED_JOBS, limit, JOB_LOCK_SEED)]

    async def last_job_event(self, job: JobRecord) -> Job | None:
        """See :meth:`JobLocks.last_job_event`: the newest job event of the job (index ``events_job``, read backwards)."""
        event_json = await self._fetchval(
            "SELECT job FROM events WHERE job_id = $1 AND job IS NOT NULL ORDER BY seq DESC LIMIT 1", job.job_id
        )
        if event_json is None:
            return None
        # With the job's spec and creation from its row: the adopter compares state and counts only.
        return job_from_event(job.job_id, job_event_parts(event_json), (job.spec_json, job.created_at_ms, job.created_by))

    def jobs_locked(self) -> frozenset[str]:
        """See :meth:`JobLocks.jobs_locked`."""
        if self._lock_conn is None or self._lock_conn.is_closed():
            return frozenset()
        return self._locked

    def _lock_guard_(self) -> asyncio.Lock:
        # One asyncpg connection runs one query at a time.
        if self._lock_guard is None:
            self._lock_guard = asyncio.Lock()
        return self._lock_guard

    async def _close_job_locks(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        self._locked = frozenset()
        if conn is not None and not conn.is_closed():
            try:
                await conn.close()
            except (*LOST, asyncpg.PostgresError):
                conn.terminate()
