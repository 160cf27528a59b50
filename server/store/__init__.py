"""The store interface: the only way the rest of fleetcmd reads or writes durable state.

One contract, :class:`Store`, for every implementation, chosen by one setting,
``database_url`` (:func:`store_from_url`; today ``sqlite:///<path>``): the
application names no implementation. The contract covers the whole lifecycle
(open and close as an async context manager, :meth:`Store.run_writer` as a
background task and :meth:`Store.stop_writer` to end it, the commit listener,
the commit count for metrics), the writes and the reads.

Nothing outside a store implementation writes SQL, and a store decides nothing:
the rules of a state change (late and duplicate reports, idempotency keys, Kaa
ids, first final status wins) are the pure functions of :mod:`server.core.decisions`,
which a store calls inside its write transaction with what it read there, so a
device report racing a timeout or a cancel is decided against the committed
status; the store persists the decision (the execution row and its event in
the append-only log) atomically. Committed events are handed to the commit
listener in sequence order, after the commit, in the same event-loop callback
that resolves the callers: no caller resumes before the listener has seen the
events of its commit (callers marked ahead, a Send, are resolved first).

Queries only one device dialect needs are separate, smaller protocols
(:class:`KaaStore`) that an implementation adds, so the generic contract carries
none of them. ``tests/test_store_contract.py`` is the contract suite every
implementation must pass.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

from server.core.errors import FailedPrecondition, FleetcmdError
from server.core.jobs import Job, JobState
from server.core.lifecycle import Decision, Status, Trigger
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
from server.core.records import fast_init

CommitListener = Callable[[Sequence[StateChange]], None]
# Told, on the event loop after each commit, how long the transaction took (seconds) and how many writes it held.
CommitObserver = Callable[[float, int], None]
# Checks a device's result against the action's result schema; returns the violations.
ResultCheck = Callable[[Execution, DeviceReport], list[str]]


@fast_init
@dataclass(frozen=True)
class CreateResult:
    """Outcome of :meth:`Store.create`."""

    execution: Execution
    created: bool  # False when an idempotent retry returned the existing execution
    event: StateChange | None


@fast_init
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
    """Durable executions and their event log, and the lifecycle of the store itself.

    ``async with store:`` opens it (creating what is missing) and closes it;
    :meth:`run_writer` runs for as long as writes are taken, and ends after
    :meth:`stop_writer` once what was queued is committed.
    """

    async def __aenter__(self) -> Store:
        """Open the store; see :meth:`open`."""

    async def __aexit__(self, *exc: object) -> None:
        """Close the store; see :meth:`close`."""

    async def open(self) -> None:
        """Open the store (create it, or bring an older one up to date), ready to read and queue writes."""

    async def close(self) -> None:
        """Stop taking writes, commit what is still queued, and release everything."""

    async def run_writer(self) -> None:
        """Commit queued writes until :meth:`stop_writer`; run it as a background task while open."""

    def stop_writer(self) -> None:
        """Refuse new writes; :meth:`run_writer` ends once what is queued is committed."""

    def set_commit_listener(self, listener: CommitListener) -> None:
        """Set the callback that receives the committed events of each commit, in sequence order."""

    @property
    def commits(self) -> int:
        """Transactions committed since the store was opened (a metric)."""

    def set_commit_observer(self, observer: CommitObserver) -> None:
        """Call ``observer(seconds, writes)`` after every commit (metrics; must be cheap)."""
        ...

    async def ping(self) -> None:
        """Commit one tiny write through the writer, as every other write goes (readiness check).

        Raises:
            Unavailable: the store cannot commit (closed, writer stopped, disk refuses).
        """
        ...

    async def delete_finished(self, completed_before_ms: int, limit: int) -> int:
        """Delete up to ``limit`` final executions completed before ``completed_before_ms``, and their events.

        One short write transaction; non-final executions are never deleted. Returns how many
        executions were deleted (less than ``limit`` when none older are left).
        """
        ...

    def purged_through(self) -> int:
        """Highest event sequence retention deleted (0: none); events at or below it may be missing."""
        ...

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


@runtime_checkable
class KaaStore(Protocol):
    """What the Kaa CEX dialect needs beyond :class:`Store`: its executions by Kaa command id."""

    async def outstanding(self, thing_id: str, action: str, now_ms: int) -> list[Execution]:
        """Non-final, unexpired executions of one Kaa endpoint and command type, by Kaa id."""

    async def execution_id_for_kaa(self, thing_id: str, action: str, kaa_id: int) -> str | None:
        """The execution behind a Kaa command id."""


class RegistryStore(Protocol):
    """Durable things, thing types and API keys (in the same store, through the same writer, as the executions)."""

    async def load_things(self) -> list[ThingRecord]:
        """Every registered thing."""

    async def load_thing_types(self) -> list[ThingTypeRecord]:
        """Every thing type."""

    async def insert_thing(self, rec: ThingRecord) -> None:
        """Register a thing (AlreadyExists if taken)."""

    async def update_thing(self, thing_id: str, *, thing_type: str, attributes: dict[str, str], at_ms: int) -> None:
        """Replace a thing's type and attributes (NotFound)."""

    async def set_thing_token(
        self, thing_id: str, token_hash: str, at_ms: int, kaa_token_hash: str = "", broker_password_hash: str = ""
    ) -> None:
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


# ---- jobs ---------------------------------------------------------------------------------


class TargetState(enum.IntEnum):
    """What became of one target of a job (``job_targets.state``)."""

    PENDING = 0  # not started yet
    DISPATCHED = 1  # its latest execution exists (final or not: the runner settles it)
    DONE = 2  # its latest execution is final and nothing follows
    RETRY = 3  # waiting for its backoff to start the next attempt
    REJECTED = 4  # the thing's type refused the action or params (no execution)
    SKIPPED = 5  # never started: the job ended first


@dataclass(frozen=True)
class JobRecord:
    """A job as stored; ``spec_json`` is :func:`server.core.jobs.spec_to_json`, ``counts_json`` its final counts."""

    job_id: str
    spec_json: str
    state: JobState
    created_at_ms: int
    started_at_ms: int | None = None
    ended_at_ms: int | None = None
    abort_reason: str = ""
    created_by: str = ""
    targets_total: int = 0
    resolved: bool = False
    resolve_cursor: str = ""
    counts_json: str = ""
    idempotency_key: str = ""
    sequential: bool = False
    # A CANCELED job whose cancel spared the executions already delivered (a restart cancels again alike).
    only_undelivered: bool = False


@dataclass(frozen=True)
class TargetRow:
    """One target of a job as stored."""

    thing_id: str
    seq: int
    state: TargetState
    attempt: int
    execution_id: str
    status: Status | None  # the latest execution's status (DISPATCHED: as the store holds it now)
    due_at_ms: int | None
    dispatched_at_ms: int | None
    reason: str = ""
    completed_at_ms: int | None = None  # when the latest execution became final


@dataclass(frozen=True)
class JobDispatch:
    """Start one target: its execution (``new.job_id``, ``new.job_attempt`` set) and the attempt it is."""

    new: NewExecution


@dataclass(frozen=True)
class TargetSettle:
    """What the runner decided for a target whose execution became final: DONE, or RETRY at ``due_at_ms``."""

    thing_id: str
    attempt: int
    state: TargetState
    status: Status
    due_at_ms: int | None = None


@runtime_checkable
class JobStore(Protocol):
    """Durable jobs and their targets (in the same store and transaction log as the executions).

    The one write that matters for durability is :meth:`dispatch`: a target's execution and its mark
    "dispatched" are one transaction, and the store refuses a second execution for the same
    (job, thing, attempt), so a crash at any point neither duplicates nor skips a target.
    """

    async def insert_job(self, rec: JobRecord, fingerprint: str, event: Job | None = None) -> tuple[JobRecord, bool]:
        """Store a new job; with an idempotency key already used by the same spec, that job and False.

        ``event``: the job as created, written as a job event (at ``rec.created_at_ms``) in the same
        transaction when the job is inserted (not for an idempotent repeat): the job's first event, the
        only one that shows its spec.

        Raises:
            AlreadyExists: the idempotency key was used for a different spec.
        """

    async def get_job(self, job_id: str) -> JobRecord | None:
        """One job."""

    async def list_jobs(self, states: Sequence[JobState], limit: int, before_idx: int | None) -> list[tuple[int, JobRecord]]:
        """Jobs newest first (with their keyset position), optionally only in ``states``."""

    async def unfinished_jobs(self) -> list[JobRecord]:
        """Every job not in a final state, or final but not settled (no final counts yet), oldest first."""

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
        """Record a job's new state (and, when it ended, its final counts).

        ``only_undelivered``: a CANCELED job's cancel spared delivered executions (kept in ``JobRecord``).
        ``event``: the job after the change, written as a job event (at ``at_ms``) in the same transaction,
        without its spec (:func:`~server.core.models.later_job_event`).
        """

    async def job_events(self, jobs: Sequence[Job], at_ms: int) -> None:
        """Write one job event per job (the runner's coalesced count changes), numbered like execution events.

        The events show the jobs without their specs (:func:`~server.core.models.later_job_event`).
        """

    async def add_targets(self, job_id: str, thing_ids: Sequence[str], *, cursor: str, resolved: bool) -> int:
        """Add targets after the existing ones (a thing already a target is ignored) and move the resolution cursor.

        Returns how many were added; the job's ``targets_total`` grows by as many, in the same transaction.
        """

    async def thing_page(self, after: str, limit: int, thing_type: str) -> list[tuple[str, str, dict[str, str]]]:
        """Registered things after ``after`` by id, of ``thing_type`` if given: ``(thing_id, thing_type, attributes)``."""

    async def target_ids(self, job_id: str, statuses: Sequence[Status], after: str, limit: int) -> list[str]:
        """Thing ids of a job's settled targets whose latest status is in ``statuses``, after ``after`` by id."""

    async def targets(
        self, job_id: str, states: Sequence[TargetState], limit: int, *, after_seq: int = -1, due_by_ms: int | None = None
    ) -> list[TargetRow]:
        """A job's targets in ``states`` by their order (RETRY ones by due time when ``due_by_ms`` is given)."""

    async def next_due_ms(self, job_id: str) -> int | None:
        """When the first RETRY target of a job is due."""

    async def dispatch(
        self, job_id: str, dispatches: Sequence[JobDispatch], rejections: Sequence[tuple[str, int, str]], at_ms: int
    ) -> list[Execution | None]:
        """Create the executions of ``dispatches`` and mark their targets DISPATCHED, in one transaction.

        ``rejections``: ``(thing_id, attempt, reason)`` of targets whose thing type refused the job (REJECTED).
        A target that is not PENDING/RETRY at ``new.job_attempt - 1`` any more is left alone (None in the result).
        """

    async def settle(self, job_id: str, settles: Sequence[TargetSettle]) -> None:
        """Record the runner's decision for targets whose execution became final."""

    async def skip_unstarted(self, job_id: str, reason: str) -> int:
        """Mark every PENDING and RETRY target of a job SKIPPED; returns how many."""

    async def job_counts(self, job_id: str, *, below_seq: int | None = None) -> dict[str, int]:
        """Per-target counts of a job as stored (see :class:`server.core.jobs.Job`); of the first ``below_seq`` only if given."""

    async def last_dispatch_ms(self, job_id: str) -> int | None:
        """When the job last started an execution (pacing after a restart)."""

    async def sequential_busy(self) -> list[tuple[str, str]]:
        """``(thing_id, execution_id)`` of every DISPATCHED target of an unfinished sequential job."""


class JobLockLost(FailedPrecondition):
    """A shared store refused a job's dispatch: another replica took the job's lock since this one took it."""


@runtime_checkable
class JobLocks(Protocol):
    """Which replica runs a job's rollout: a lock per job, held by one replica at a time, released if it dies.

    A store with these locks fences the dispatch (:meth:`JobStore.dispatch` raises :class:`JobLockLost`): once another
    replica has taken a job's lock, a dispatch of the replica that held it before commits nothing, and the lock is
    taken only after the dispatches the previous holder has under way are committed or refused.
    """

    async def lock_job(self, job_id: str) -> bool:
        """Take the job's lock for this replica (True also when it holds it already); False while another holds it."""

    async def unlock_job(self, job_id: str) -> None:
        """Give a job's lock up (the job ended here, or this replica stops)."""

    def jobs_locked(self) -> frozenset[str]:
        """The jobs whose lock this replica holds now (empty once the connection holding them was lost)."""

    async def check_job_locks(self) -> frozenset[str]:
        """As :meth:`jobs_locked`, after asking the database that the connection holding the locks still answers."""

    async def unlocked_jobs(self, limit: int) -> list[JobRecord]:
        """Up to ``limit`` jobs :meth:`JobStore.unfinished_jobs` would return whose lock no replica holds now, oldest first."""

    async def last_job_event(self, job: JobRecord) -> Job | None:
        """The job as its last job event in the log shows it (None: no job event); read by a replica taking the job over."""


class ServiceStore(Store, RegistryStore, Protocol):
    """What the service opens: the executions and the registry in one store (one transaction log, one writer).

    Jobs need :class:`JobStore` too (see :func:`job_store`); a store without it serves no jobs.
    """


# Store classes already checked: a protocol isinstance() costs microseconds, and the Kaa
# dialect asks once per request item.
_KAA_STORES: set[type] = set()


def kaa_store(store: object) -> KaaStore:
    """``store`` as a :class:`KaaStore`.

    Raises:
        FleetcmdError: the store does not implement the Kaa queries.
    """
    if type(store) not in _KAA_STORES:
        if not isinstance(store, KaaStore):
            raise FleetcmdError(f"{type(store).__name__} does not implement the Kaa queries (KaaStore)")
        _KAA_STORES.add(type(store))
    return cast(KaaStore, store)


def job_store(store: object) -> JobStore | None:
    """``store`` as a :class:`JobStore`, or None when it keeps no jobs."""
    return store if isinstance(store, JobStore) else None


class StoreClass(Protocol):
    """A store implementation as :func:`store_from_url` builds it."""

    @classmethod
    def from_url(cls, url: str) -> ServiceStore:
        """The store ``url`` names, not opened yet."""


# URL scheme -> "module:class" of its implementation, imported only when used (as uvicorn's
# LOOP_SETUPS): a second store is one more line here and one more URL in the contract suite.
STORES: dict[str, str] = {
    "sqlite": "server.store.sqlite:SqliteStore",
    "postgresql": "server.store.postgres:PostgresStore",
}


def url_scheme(url: str) -> str:
    """The scheme of a store URL (``sqlite`` for ``sqlite:///data/fleetcmd.db``; empty when none)."""
    scheme, sep, _rest = url.partition("://")
    return scheme if sep else ""


def store_from_url(url: str) -> ServiceStore:
    """The store ``url`` names (``sqlite:///relative/path``, ``sqlite:////absolute/path``), not opened yet.

    Raises:
        FleetcmdError: the URL's scheme names no known store.
    """
    target = STORES.get(url_scheme(url))
    if target is None:
        raise FleetcmdError(f"database_url {url!r}: unknown store scheme (known: {', '.join(sorted(STORES))})")
    module, _, name = target.partition(":")
    cls: StoreClass = getattr(importlib.import_module(module), name)
    return cls.from_url(url)
