"""The jobs service: :class:`JobsCore` (the operator API) and the one background loop that rolls jobs out.

A job's targets are resolved into the store page by page (``job_targets``), never held in memory;
the loop starts executions in batches through the normal command path (the registry checks each
target's params against its thing type exactly as a Send does; the executions are delivered, timed
out and retried by the device rules of single commands) with :meth:`server.store.JobStore.dispatch`,
which creates the executions and marks their targets in one transaction.

The loop never polls: it sleeps until the earliest timer (a paced job's next slot, a schedule's start
or end, a retry's backoff) or until something wakes it: an execution of a job became final (the
store's commit listener calls :meth:`JobsCore.on_commit`; for an execution of no job that is one
dictionary lookup), an operator acted, a thing started to match a CONTINUOUS job. Everything it
keeps in memory (counts, the in-flight executions of jobs, the last dispatch time for pacing, the
things busy with a sequential job) is rebuilt from the store by :meth:`JobsCore.restore`. On a store
several replicas share, it also wakes every ``adopt_seconds`` to take over the jobs whose replica stopped
(:meth:`JobsCore.adopt_orphans`).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from server.core import jobs as jb
from server.core.clock import now_ms
from server.core.commands import CommandCore
from server.core.errors import FailedPrecondition, FleetcmdError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from server.core.ids import time_ordered_id
from server.core.jobs import DryRun, Job, JobEvent, JobPage, JobSpec, JobState, TargetMode
from server.core.lifecycle import Status
from server.core.models import Execution, StateChange, ThingRecord
from server.core.registry import Registry
from server.core.validation import validate_send
from server.store import JobDispatch, JobLockLost, JobLocks, JobRecord, JobStore, TargetRow, TargetSettle, TargetState

log = logging.getLogger(__name__)

# Targets resolved (read and written) per store round trip.
RESOLVE_PAGE = 1_000
# Executions one dispatch transaction creates at most; the loop dispatches again at once if more may start.
DISPATCH_BATCH = 500
# Dispatch writes of a paced job that may wait for their commit at once (the job does not wait for each).
PIPELINE = 8
# Pages of pending targets one pass reads to find some whose thing is not busy (sequential_per_thing).
SEQUENTIAL_SCAN_PAGES = 8
# Executions canceled per round when a job is canceled or aborted.
CANCEL_BATCH = 500
# When the service holds max_active_executions, look again after this long (no job event frees room).
FULL_RETRY_SECONDS = 1.0
# A watcher gets at most one snapshot per this many seconds (changes in between are coalesced).
WATCH_INTERVAL = 0.25
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
# Jobs not final at once; creating one more is refused (each holds a little state in memory).
MAX_ACTIVE_JOBS = 1_000
# Shared stores: jobs one adoption pass takes over at most (a replica finding many orphaned jobs takes them a pass apart,
# leaving some to the other replicas).
ADOPT_PER_PASS = 16


@dataclass(slots=True)
class _Tracked:
    """A job's execution that is not final yet (or not settled yet)."""

    job_id: str
    thing_id: str
    attempt: int
    seq: int
    status: Status


@dataclass(eq=False)
class _Run:
    """The in-memory state of a job that is not final, or final with executions still in flight."""

    rec: JobRecord
    spec: JobSpec
    counts: jb.Counts
    pacer: jb.Pacer
    canary: jb.Counts = field(default_factory=jb.Counts)
    canary_passed: bool = False
    ended: bool = False  # the schedule's end came: nothing new starts
    # Restored final but not settled: skip its unstarted targets and cancel its executions again (the first stop may not
    # have been committed whole).
    recancel: bool = False
    next_due_ms: int | None = None  # the first retry's due time
    resolve_cursor: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    version: int = 0
    published: int = 0  # the version the last job event of the event log shows
    last_event: Job | None = None  # what it shows (a change that changed nothing writes no event)
    dropped: bool = False  # this replica lost the job's lock: it writes none of its events any more
    lock_lost: bool = False  # the store refused a dispatch: another replica took the job's lock (dropped at the next step)
    # Paced jobs: pending targets read ahead (by seq, after ``buffer_after``), and the dispatch writes not
    # committed yet (a paced job does not wait for one commit before its next slot).
    buffer: collections.deque[TargetRow] = field(default_factory=collections.deque)
    buffer_after: int = -1
    dispatching: set[asyncio.Future[None]] = field(default_factory=set)
    starting: set[str] = field(default_factory=set)  # things of those writes
    outstanding: int = 0

    def __post_init__(self) -> None:
        self.matcher = jb.Matcher.of(self.spec.targets)

    @property
    def job_id(self) -> str:
        return self.rec.job_id

    @property
    def state(self) -> JobState:
        return self.rec.state

    def to_job(self) -> Job:
        r = self.rec
        return Job(
            job_id=r.job_id,
            spec=self.spec,
            state=r.state,
            counts=dict(self.counts.by_name),
            targets_total=r.targets_total,
            created_at_ms=r.created_at_ms,
            started_at_ms=r.started_at_ms,
            ended_at_ms=r.ended_at_ms,
            abort_reason=r.abort_reason,
            created_by=r.created_by,
            resolved=r.resolved,
        )


def _job_from_record(rec: JobRecord, counts: dict[str, int]) -> Job:
    return Job(
        job_id=rec.job_id,
        spec=jb.spec_from_json(rec.spec_json),
        state=rec.state,
        counts=counts,
        targets_total=rec.targets_total,
        created_at_ms=rec.created_at_ms,
        started_at_ms=rec.started_at_ms,
        ended_at_ms=rec.ended_at_ms,
        abort_reason=rec.abort_reason,
        created_by=rec.created_by,
        resolved=rec.resolved,
    )


class JobsCore:
    """Jobs: the operator API and the rollout loop (run :meth:`run` in the app's TaskGroup)."""

    def __init__(self, core: CommandCore, store: JobStore, registry: Registry, *, adopt_seconds: float = 2.0) -> None:
        self.core = core
        self.store = store
        self.registry = registry
        # A store several replicas share locks each job to the one replica that runs its rollout.
        self._locks: JobLocks | None = store if isinstance(store, JobLocks) else None
        self._runs: dict[str, _Run] = {}
        # Executions of jobs that are not final yet: the commit hook's one lookup per event.
        self._inflight: dict[str, _Tracked] = {}
        self._finals: builtins.list[tuple[_Tracked, str, Status, int]] = []
        # Things with a not-final execution of a sequential_per_thing job -> that execution.
        self._busy: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._closed = False
        # Things that started to match a CONTINUOUS job, by job, for the loop to add.
        self._pending_adds: dict[str, set[str]] = {}
        self._retries_settled = False  # the last settle round made a target RETRY
        # Jobs changed since their last job event: one write of their events once the current commit is handled.
        self._unpublished: dict[str, _Run] = {}
        self._publishing: set[asyncio.Future[None]] = set()
        # Held while a job event is being written (a state change's or coalesced counts'): each snapshot is taken
        # under it, so the log never shows a job's older snapshot after a newer one (a count write queued after a
        # state write it raced with would show the state before it).
        self._event_order = asyncio.Lock()
        self.stats = {"dispatched": 0, "rejected": 0, "retried": 0, "adopted": 0}
        # Shared stores: every adopt_seconds the loop takes over the jobs whose lock nobody holds (their replica stopped).
        self._adopt_every_ms = adopt_seconds * 1000
        self._next_adopt_ms = now_ms() + self._adopt_every_ms
        self._adopt_guard = asyncio.Lock()  # one adoption (or create) at a time: a job is rebuilt once
        self._adopting = 0
        # While a job is being rebuilt: final events of executions not tracked yet (the rebuild may have read them
        # before they became final); replayed when it is done.
        self._held: builtins.list[StateChange] | None = None

    # ---- the commit hook and the registry hook ----------------------------------------------

    def on_commit(self, events: Sequence[StateChange]) -> None:
        """Store commit hook (through :attr:`CommandCore.job_hook`): follow the executions of jobs.

        One dictionary lookup per event; nothing at all while no job has an execution in flight.
        """
        inflight = self._inflight
        held = self._held
        if not inflight and held is None:
            return
        for event in events:
            tracked = inflight.get(event.execution_id)
            if tracked is None:
                if held is not None and event.status.final:
                    held.append(event)
                continue
            if event.late or event.status is tracked.status:
                continue
            run = self._runs.get(tracked.job_id)
            if run is not None:
                run.counts.move(tracked.status.name, event.status.name)
                if tracked.seq < self._canary_size(run):
                    run.canary.move(tracked.status.name, event.status.name)
                self._changed(run)
            tracked.status = event.status
            if event.status.final:
                del inflight[event.execution_id]
                self._finals.append((tracked, event.execution_id, event.status, event.at_ms))
                self._wake.set()

    def thing_changed(self, thing: ThingRecord, came_online: bool = False) -> None:
        """Registry hook: a thing was created or changed, or came online; CONTINUOUS jobs it now matches get it (in the loop).

        Coming online only matters to ``online_only`` jobs (to the others the thing already was a target).
        """
        if not self._runs:
            return
        online = came_online or self.registry.presence(thing.thing_id).online
        for run in self._runs.values():
            t = run.spec.targets
            if came_online and not t.online_only:
                continue
            continuous = t.mode is TargetMode.CONTINUOUS and not run.state.final and not run.ended and not t.from_job
            if continuous and run.matcher(thing.thing_id, thing.thing_type, thing.attributes, online):
                self._pending_adds.setdefault(run.job_id, set()).add(thing.thing_id)
                self._wake.set()

    # ---- operator API ---------------------------------------------------------------------

    async def create(self, spec: JobSpec, *, created_by: str = "") -> Job:
        """Create a job (it starts at once unless scheduled later).

        Raises:
            InvalidArgument: a bad field, or with ``strict`` a target whose thing type refuses the action or params.
            AlreadyExists: the idempotency key was used for a different spec.
            ResourceExhausted: too many jobs are not final.
        """
        now = now_ms()
        self._validate(spec, now)
        if spec.strict:
            await self._check_strict(spec)
        active = sum(1 for r in self._runs.values() if not r.state.final)
        if active >= MAX_ACTIVE_JOBS:
            raise ResourceExhausted(f"{active} jobs are not final (limit {MAX_ACTIVE_JOBS})")
        start = spec.schedule.start_at_ms
        state = JobState.SCHEDULED if start > now else JobState.IN_PROGRESS
        rec = JobRecord(
            job_id=time_ordered_id(now, os.urandom(10)),
            spec_json=jb.spec_to_json(spec),
            state=state,
            created_at_ms=now,
            started_at_ms=now if state is JobState.IN_PROGRESS else None,
            created_by=created_by,
            idempotency_key=spec.idempotency_key,
            sequential=spec.rollout.sequential_per_thing,
        )
        # The job's first event, written with its row (its snapshot as created: no counts yet).
        event = _Run(rec, spec, jb.Counts(), jb.Pacer()).to_job()
        stored, created = await self.store.insert_job(rec, jb.spec_fingerprint(spec), event=event)
        if not created:
            return await self.get(stored.job_id)
        async with self._adopt_guard:
            if not await self._owns(stored.job_id):
                # Another replica's adoption pass saw the new job before its lock was taken here: it runs it.
                return await self.get(stored.job_id)
            run = self._runs.get(stored.job_id)
            if run is None:
                run = _Run(stored, spec, jb.Counts(), jb.Pacer())
                run.last_event = event
            self._runs[run.job_id] = run
        if state is JobState.IN_PROGRESS and not run.rec.resolved:
            async with run.lock:
                await self._resolve(run)
        self._wake.set()
        return run.to_job()

    async def dry_run(self, spec: JobSpec) -> DryRun:
        """How many things the job would target now, and the first few; creates nothing.

        Raises:
            InvalidArgument: a bad field (with ``strict``, also a refusing thing type).
        """
        self._validate(spec, now_ms())
        if spec.strict:
            await self._check_strict(spec)
        total = 0
        sample: builtins.list[str] = []
        async for page, _cursor in self._candidates(spec.targets, ""):
            total += len(page)
            sample += page[: jb.MAX_SAMPLE - len(sample)]
        return DryRun(total, tuple(sample))

    async def get(self, job_id: str) -> Job:
        """One job with its counts.

        Raises:
            NotFound: no such job.
        """
        run = self._runs.get(job_id)
        if run is not None:
            return run.to_job()
        rec = await self.store.get_job(job_id)
        if rec is None:
            raise NotFound(f"job {job_id!r} not found")
        counts = json.loads(rec.counts_json) if rec.counts_json else await self.store.job_counts(job_id)
        return _job_from_record(rec, counts)

    async def list(self, *, states: tuple[JobState, ...] = (), page_size: int = 0, page_token: str = "") -> JobPage:
        """Jobs newest first.

        Raises:
            InvalidArgument: a bad page size or token.
        """
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument.single("page_size", f"must be 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        before: int | None = None
        if page_token:
            if not page_token.isdigit() or len(page_token) > 18:
                raise InvalidArgument.single("page_token", "not a token this service gave")
            before = int(page_token)
        rows = await self.store.list_jobs(states, size + 1, before)
        more = len(rows) > size
        rows = rows[:size]
        jobs: builtins.list[Job] = []
        for _idx, rec in rows:
            run = self._runs.get(rec.job_id)
            if run is not None:
                jobs.append(run.to_job())
            else:
                counts = json.loads(rec.counts_json) if rec.counts_json else await self.store.job_counts(rec.job_id)
                jobs.append(_job_from_record(rec, counts))
        return JobPage(tuple(jobs), str(rows[-1][0]) if more and rows else "")

    async def pause(self, job_id: str) -> Job:
        """Start nothing new until :meth:`resume` (executions in flight go on).

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job is not SCHEDULED or IN_PROGRESS.
        """
        run = await self._run_for(job_id)
        async with run.lock:
            await self._move(run, JobEvent.PAUSE)
        return run.to_job()

    async def resume(self, job_id: str) -> Job:
        """Go on with a paused job.

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job is not PAUSED.
        """
        run = await self._run_for(job_id)
        async with run.lock:
            await self._move(run, JobEvent.RESUME, started=run.rec.started_at_ms is not None)
        self._wake.set()
        return run.to_job()

    async def cancel(self, job_id: str, *, only_undelivered: bool = False) -> Job:
        """Cancel a job: nothing new starts, and its executions not final are CANCELED.

        Args:
            job_id: The job.
            only_undelivered: Cancel only the executions not delivered to their device yet
                (QUEUED, SENT); those a device holds run to their end.

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job is already final.
        """
        run = await self._run_for(job_id)
        async with run.lock:
            await self._move(run, JobEvent.CANCEL, only_undelivered=only_undelivered)
            await self._stop(run, "job canceled", only_undelivered=only_undelivered)
        self._wake.set()
        return run.to_job()

    async def rerun_failed(self, job_id: str, statuses: tuple[str, ...]) -> Job:
        """A new job (same action, params, rollout) over the targets of ``job_id`` whose latest execution ended in ``statuses``.

        Raises:
            NotFound: no such job.
            InvalidArgument: no statuses, or a name that is not a final execution status.
        """
        original = await self.get(job_id)
        assert original.spec is not None  # (only a job event leaves it out)
        if not statuses:
            raise InvalidArgument.single("statuses", "name at least one final execution status")
        for name in statuses:
            if name not in Status.__members__ or not Status[name].final:
                raise InvalidArgument.single("statuses", f"{name!r} is not a final execution status")
        spec = dataclasses.replace(
            original.spec,
            targets=jb.Targets(from_job=job_id, from_statuses=tuple(statuses)),
            schedule=jb.Schedule(),
            idempotency_key="",
        )
        return await self.create(spec, created_by=original.created_by)

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then again whenever its state or counts change (at most every ``WATCH_INTERVAL`` s).

        Ends after the snapshot in which the job is final and settled.

        Raises:
            NotFound: no such job.
            Unavailable: the service is shutting down.
        """
        wakeup = asyncio.Event()
        watchers = self._watchers.setdefault(job_id, set())
        watchers.add(wakeup)
        try:
            while True:
                wakeup.clear()
                job = await self.get(job_id)
                yield job
                if job.state.final and job_id not in self._runs:
                    return
                await wakeup.wait()
                if self._closed:
                    raise Unavailable("service is shutting down")
                await asyncio.sleep(WATCH_INTERVAL)
        finally:
            watchers.discard(wakeup)
            if not watchers:
                self._watchers.pop(job_id, None)

    def close(self) -> None:
        """End every watcher (shutdown)."""
        self._closed = True
        for watchers in self._watchers.values():
            for wakeup in watchers:
                wakeup.set()

    def metrics(self) -> dict[str, int]:
        """Counters for logs and tests."""
        return {"jobs_running": len(self._runs), "job_executions_in_flight": len(self._inflight), **self.stats}

    # ---- restore ----------------------------------------------------------------------------

    async def restore(self) -> int:
        """Rebuild the runner's memory from the store after a (re)start; returns how many jobs go on.

        Counts come from the targets and their executions; executions that became final while nobody
        settled them are settled now (retries then wait their backoff from the execution's end); a paced
        job's next slot follows its last durable dispatch.
        """
        for rec in await self.store.unfinished_jobs():
            await self._take(rec.job_id)
        await self._mark_busy()
        self._wake.set()
        return len(self._runs)

    async def _owns(self, job_id: str) -> bool:
        """Whether this replica runs ``job_id``'s rollout (always, unless the store is shared)."""
        return self._locks is None or await self._locks.lock_job(job_id)

    async def adopt_orphans(self) -> int:
        """One adoption pass on a shared store (the loop runs one every ``adopt_seconds``); returns the jobs taken over.

        First the jobs whose lock this replica lost (its lock connection failed) stop running here; then up to
        ``ADOPT_PER_PASS`` unfinished jobs whose lock nobody holds (their replica stopped or died) are locked, one
        replica winning each, and rebuilt from the store: they go on from their durable state (targets started stay
        started, a PAUSED job stays paused, a SCHEDULED one starts when due).
        """
        locks = self._locks
        if locks is None:
            return 0
        held = await locks.check_job_locks()
        for run in [r for r in self._runs.values() if r.job_id not in held]:
            async with run.lock:
                await self._drop(run)
        adopted = 0
        for rec in await locks.unlocked_jobs(ADOPT_PER_PASS):
            if rec.job_id not in self._runs and await self._take(rec.job_id) is not None:
                adopted += 1
                log.info("job %s: taken over (no replica held its lock)", rec.job_id)
        if adopted:
            self.stats["adopted"] += adopted
            await self._mark_busy()
            self._wake.set()
        return adopted

    async def _take(self, job_id: str) -> _Run | None:
        """Lock ``job_id`` for this replica and rebuild it from the store; None if another replica holds it or it is settled."""
        async with self._adopt_guard:
            run = self._runs.get(job_id)
            if run is not None:
                return run
            if not await self._owns(job_id):
                return None
            try:
                # Read after the lock: the state its last replica left, which nobody changes now.
                rec = await self.store.get_job(job_id)
                if rec is not None and not (rec.state.final and rec.counts_json):
                    return await self._adopt(rec)
            except FleetcmdError:
                # Half rebuilt: give it up whole (lock included) so that a later pass, here or elsewhere, takes it again.
                self._forget(job_id)
                if self._locks is not None:
                    await self._locks.unlock_job(job_id)
                raise
            if self._locks is not None:
                await self._locks.unlock_job(job_id)
            return None

    async def _drop(self, run: _Run) -> None:
        """This replica lost the job's lock: forget the job here (the replica that takes the lock rebuilds it)."""
        if run.dispatching:
            await asyncio.gather(*run.dispatching, return_exceptions=True)
        self._forget(run.job_id)
        log.warning("job %s: this replica lost the job's lock; it stops running it here", run.job_id)
        # No job event from here: the replica that takes the lock writes the job's events (they would interleave).
        self._unpublished.pop(run.job_id, None)
        run.dropped = True
        self._changed(run, published=True)

    def _forget(self, job_id: str) -> None:
        """Drop everything this replica keeps of a job."""
        self._runs.pop(job_id, None)
        for execution_id in [e for e, t in self._inflight.items() if t.job_id == job_id]:
            tracked = self._inflight.pop(execution_id)
            if self._busy.get(tracked.thing_id) == execution_id:
                del self._busy[tracked.thing_id]
        self._finals = [f for f in self._finals if f[0].job_id != job_id]
        self._pending_adds.pop(job_id, None)

    async def _mark_busy(self) -> None:
        for thing_id, execution_id in await self.store.sequential_busy():
            if execution_id in self._inflight:
                self._busy[thing_id] = execution_id

    async def _adopt(self, rec: JobRecord) -> _Run:
        """Rebuild one unfinished job's run from the store (at start, or taken over from a replica that stopped)."""
        self._adopting += 1
        if self._held is None:
            self._held = []
        try:
            return await self._rebuild(rec)
        finally:
            self._adopting -= 1
            if not self._adopting:
                held, self._held = self._held, None
                if held:
                    self.on_commit(held)

    async def _rebuild(self, rec: JobRecord) -> _Run:
        spec = jb.spec_from_json(rec.spec_json)
        run = _Run(
            rec,
            spec,
            jb.Counts(await self.store.job_counts(rec.job_id)),
            jb.Pacer(await self.store.last_dispatch_ms(rec.job_id)),
        )
        run.resolve_cursor = rec.resolve_cursor
        if self._locks is not None:
            # Taken over (or restarted) on a shared store: the job's next event follows the last one its previous
            # replica wrote, and a change that leaves the job as that event shows it writes none (no repeat).
            run.last_event = await self._locks.last_job_event(rec)
        if spec.canary is not None:
            run.canary = jb.Counts(await self.store.job_counts(rec.job_id, below_seq=spec.canary.count))
            run.canary_passed = jb.canary_verdict(spec.canary, run.canary.by_name, self._canary_total(run)) is True
        run.next_due_ms = await self.store.next_due_ms(rec.job_id)
        self._runs[rec.job_id] = run
        # Ended (canceled, aborted) but not settled: its stop may not have been committed whole.
        run.recancel = rec.state.final
        after = -1
        while True:
            rows = await self.store.targets(rec.job_id, (TargetState.DISPATCHED,), RESOLVE_PAGE, after_seq=after)
            for row in rows:
                status = row.status or Status.QUEUED
                tracked = _Tracked(rec.job_id, row.thing_id, row.attempt, row.seq, status)
                if status.final:
                    ended_at = row.completed_at_ms or row.dispatched_at_ms or now_ms()
                    self._finals.append((tracked, row.execution_id, status, ended_at))
                else:
                    self._inflight[row.execution_id] = tracked
            if len(rows) < RESOLVE_PAGE:
                break
            after = rows[-1].seq
        return run

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Background loop: settle finished executions, start what may start, sleep until the next timer."""
        while True:
            if self._locks is not None and now_ms() >= self._next_adopt_ms:
                self._next_adopt_ms = now_ms() + self._adopt_every_ms
                try:
                    await self.adopt_orphans()
                except FleetcmdError:
                    log.exception("jobs: an adoption pass failed; trying again at the next")
            wake_at = await self._step()
            if self._locks is not None:
                wake_at = self._next_adopt_ms if wake_at is None else min(wake_at, self._next_adopt_ms)
            timeout = None if wake_at is None else max(0.0, wake_at / 1000 - now_ms() / 1000)
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _step(self) -> float | None:
        """One round over every job; returns when (ms) the loop must look again without being woken."""
        # The settle write is not awaited before the dispatches: submitted in the same loop turn, they
        # share the store's commit (the writer keeps their order).
        settling = self._settle_finals()
        if settling is not None and self._retries_settled:
            # A retry is read back from the store when due: its RETRY mark must be committed first.
            await settling
            settling = None
        try:
            await self._continuous_adds()
            wake = await self._advance_all()
        finally:
            if settling is not None:
                await settling
        return wake

    async def _advance_all(self) -> float | None:
        wake: float = math.inf
        # Shared stores: a job whose lock this replica no longer holds (its lock connection went) must not go on here.
        held = self._locks.jobs_locked() if self._locks is not None else None
        for run in list(self._runs.values()):
            if run.lock_lost or (held is not None and run.job_id not in held):
                async with run.lock:
                    await self._drop(run)
                continue
            try:
                async with run.lock:
                    at = await self._advance(run)
            except JobLockLost:
                async with run.lock:
                    await self._drop(run)
                continue
            except FleetcmdError:
                log.exception("job %s: a step failed; trying again shortly", run.job_id)
                at = now_ms() + FULL_RETRY_SECONDS * 1000
            wake = min(wake, at)
        return None if wake == math.inf else wake

    def _settle_finals(self) -> asyncio.Future[builtins.list[None]] | None:
        """Decide (in memory, at once) what becomes of the targets whose execution is final; returns the store writes."""
        if not self._finals:
            return None
        finals, self._finals = self._finals, []
        self._retries_settled = False
        by_job: dict[str, list[TargetSettle]] = {}
        for tracked, execution_id, status, at_ms in finals:
            if self._busy.get(tracked.thing_id) == execution_id:
                del self._busy[tracked.thing_id]
            run = self._runs.get(tracked.job_id)
            if run is None:
                continue
            policy = jb.retry_policy(run.spec.retries, status)
            retry = policy is not None and tracked.attempt <= policy.max_attempts and not run.state.final and not run.ended
            if retry and policy is not None:
                delay = jb.retry_delay(policy, tracked.attempt, f"{run.job_id}/{tracked.thing_id}/{tracked.attempt}")
                due = at_ms + int(delay * 1000)
                by_job.setdefault(run.job_id, []).append(
                    TargetSettle(tracked.thing_id, tracked.attempt, TargetState.RETRY, status, due)
                )
                run.counts.move(status.name, "RETRYING")
                if tracked.seq < self._canary_size(run):
                    run.canary.move(status.name, "RETRYING")
                run.next_due_ms = due if run.next_due_ms is None else min(run.next_due_ms, due)
                self._retries_settled = True
            else:
                by_job.setdefault(run.job_id, []).append(
                    TargetSettle(tracked.thing_id, tracked.attempt, TargetState.DONE, status)
                )
            self._changed(run)
        if not by_job:
            return None
        return asyncio.gather(*(self.store.settle(job_id, settles) for job_id, settles in by_job.items()))

    async def _continuous_adds(self) -> None:
        adds, self._pending_adds = self._pending_adds, {}
        for job_id, thing_ids in adds.items():
            run = self._runs.get(job_id)
            if run is None or run.state.final or run.ended:
                continue
            ids = sorted(thing_ids)
            for start in range(0, len(ids), RESOLVE_PAGE):
                added = await self.store.add_targets(
                    job_id, ids[start : start + RESOLVE_PAGE], cursor=run.resolve_cursor, resolved=run.rec.resolved
                )
                self._added(run, added)

    async def _advance(self, run: _Run) -> float:
        """Move one job on; returns when (ms) it wants to be looked at again (inf: only when woken)."""
        now = now_ms()
        spec = run.spec
        if run.state.final:
            if run.recancel:
                run.recancel = False
                # As the cancel did: only the undelivered ones when it spared delivered executions.
                only_undelivered = run.state is JobState.CANCELED and run.rec.only_undelivered
                await self._stop(run, run.rec.abort_reason or "job canceled", only_undelivered=only_undelivered)
            if self._idle(run):
                await self._finish(run)
            return math.inf
        end_at = spec.schedule.end_at_ms
        if end_at and now >= end_at and not run.ended:
            run.ended = True
            await self.store.skip_unstarted(run.job_id, "schedule ended")
            self._skip_counts(run)
            if spec.schedule.end_behavior is jb.EndBehavior.CANCEL_NOT_FINAL:
                await self._stop(run, "schedule ended", only_undelivered=False)
        if run.state is JobState.SCHEDULED:
            if now < spec.schedule.start_at_ms:
                return spec.schedule.start_at_ms
            await self._move(run, JobEvent.START)
        if run.ended:  # (paused or not) it completes once nothing of it is in flight
            if self._idle(run):
                await self._move(run, JobEvent.COMPLETE)
                await self._finish(run)
            return math.inf
        if run.state is JobState.PAUSED:
            return end_at or math.inf
        if not run.rec.resolved:
            await self._resolve(run)
        reason = jb.abort_reason(spec.abort, run.counts.by_name)
        if not reason and spec.canary is not None and not run.canary_passed:
            verdict = jb.canary_verdict(spec.canary, run.canary.by_name, self._canary_total(run))
            if verdict is False:
                succeeded = run.canary.get(Status.SUCCEEDED.name)
                reason = (
                    f"canary failed: {succeeded} of {self._canary_total(run)} succeeded (needed {spec.canary.success_pct:g}%)"
                )
            run.canary_passed = verdict is True
        if reason:
            await self._move(run, JobEvent.ABORT, reason=reason)
            await self._stop(run, reason, only_undelivered=False)
            return math.inf
        wake = await self._dispatch(run, now)
        pending = run.counts.get("PENDING") + run.counts.get("RETRYING")
        if spec.targets.mode is TargetMode.SNAPSHOT and not pending and self._idle(run):
            await self._move(run, JobEvent.COMPLETE)
            await self._finish(run)
            return math.inf
        if end_at:
            wake = min(wake, end_at)
        return wake

    async def _dispatch(self, run: _Run, now: int) -> float:
        """Start what may start now; returns when to look again."""
        spec = run.spec
        counts = run.counts
        rate = jb.rate_per_minute(spec.rollout, notified=self._notified(run), succeeded=counts.get(Status.SUCCEEDED.name))
        want = DISPATCH_BATCH
        paced = run.pacer.allowed(now, rate)
        if paced == 0:
            return run.pacer.next_at(rate)
        if paced > 0:
            want = min(want, paced)
        room = jb.room(spec.rollout, counts.in_flight() + run.outstanding)
        if room >= 0:
            want = min(want, room)
        core_room = self.core.room()
        if want <= 0:
            return math.inf  # woken when one of its executions is final
        if core_room <= 0:
            return now + FULL_RETRY_SECONDS * 1000
        want = min(want, core_room)
        canary_only = spec.canary is not None and not run.canary_passed
        if paced > 0 and not spec.rollout.sequential_per_thing:
            return await self._dispatch_paced(run, now, rate, canary_only)
        rows: builtins.list[TargetRow] = []
        if counts.get("RETRYING") and run.next_due_ms is not None and run.next_due_ms <= now:
            rows = await self.store.targets(run.job_id, (), want, due_by_ms=now)
        if len(rows) < want and counts.get("PENDING"):
            rows += await self._pending(run, want - len(rows), canary_only)
        if canary_only:
            rows = [r for r in rows if r.seq < self._canary_size(run)]
        if spec.rollout.sequential_per_thing:
            rows = [r for r in rows if r.thing_id not in self._busy]
        wake = math.inf
        if rows:
            # Paced from the executions' own creation times: what a reader of the store sees is spaced too.
            run.pacer.took(await self._start(run, rows))
            self._wake.set()  # maybe more may start: look again right after the finals are settled
        if counts.get("RETRYING"):
            run.next_due_ms = await self.store.next_due_ms(run.job_id)
            if run.next_due_ms is not None:
                wake = min(wake, run.next_due_ms)
        if paced > 0 and (counts.get("PENDING") or counts.get("RETRYING")):
            wake = min(wake, run.pacer.next_at(rate))
        return wake

    async def _dispatch_paced(self, run: _Run, now: int, rate: float, canary_only: bool) -> float:
        """One slot of a paced job: start one target, not waiting for the commit (at most ``PIPELINE`` outstanding)."""
        if run.outstanding >= PIPELINE:
            return math.inf  # woken when one commits
        counts = run.counts
        row: TargetRow | None = None
        if counts.get("RETRYING") and run.next_due_ms is not None and run.next_due_ms <= now:
            due = await self.store.targets(run.job_id, (), PIPELINE + 1, due_by_ms=now)
            row = next((r for r in due if r.thing_id not in run.starting), None)
        if row is None and counts.get("PENDING"):
            row = await self._buffered(run, canary_only)
        wake = math.inf
        if row is not None:
            run.pacer.took(self._start_pipelined(run, row))
        if counts.get("RETRYING"):
            run.next_due_ms = await self.store.next_due_ms(run.job_id)
            if run.next_due_ms is not None:
                wake = min(wake, run.next_due_ms)
        if counts.get("PENDING") or counts.get("RETRYING"):
            wake = min(wake, run.pacer.next_at(rate))
        return wake

    async def _pending(self, run: _Run, want: int, canary_only: bool) -> builtins.list[TargetRow]:
        if not run.spec.rollout.sequential_per_thing:
            return await self.store.targets(run.job_id, (TargetState.PENDING,), want)
        out: builtins.list[TargetRow] = []
        after = -1
        for _ in range(SEQUENTIAL_SCAN_PAGES):
            page = await self.store.targets(run.job_id, (TargetState.PENDING,), DISPATCH_BATCH, after_seq=after)
            out += [r for r in page if r.thing_id not in self._busy]
            if len(out) >= want or len(page) < DISPATCH_BATCH or (canary_only and page[-1].seq >= self._canary_size(run)):
                break
            after = page[-1].seq
        return out[:want]

    async def _start(self, run: _Run, rows: builtins.list[TargetRow]) -> int:
        """Create the executions of ``rows`` (one store transaction) and hand them to delivery; returns the time of the last."""
        dispatches, rejections, last = self._prepare(run, rows)
        results = await self.store.dispatch(run.job_id, dispatches, rejections, last)
        self._started(run, rows, rejections, results)
        return last

    def _prepare(
        self, run: _Run, rows: builtins.list[TargetRow]
    ) -> tuple[builtins.list[JobDispatch], builtins.list[tuple[str, int, str]], int]:
        """Check each target like a Send and build its execution; returns them, the refusals and the last creation time."""
        spec = run.spec
        dispatches: builtins.list[JobDispatch] = []
        rejections: builtins.list[tuple[str, int, str]] = []
        for row in rows:
            attempt = row.attempt + 1
            try:
                prepared = self.core.registry.prepare_send(row.thing_id, spec.action, spec.params, spec.ttl_seconds)
            except (InvalidArgument, NotFound) as exc:
                rejections.append((row.thing_id, attempt, str(exc)))
                continue
            new = self.core.new_execution(row.thing_id, spec.action, prepared)
            new = dataclasses.replace(
                new, job_id=run.job_id, job_attempt=attempt, retry_of=row.execution_id if row.attempt else ""
            )
            dispatches.append(JobDispatch(new))
        return dispatches, rejections, max((d.new.created_at_ms for d in dispatches), default=now_ms())

    def _started(
        self,
        run: _Run,
        rows: builtins.list[TargetRow],
        rejections: builtins.list[tuple[str, int, str]],
        results: builtins.list[Execution | None],
    ) -> None:
        """Count and track what a committed dispatch created, and hand the executions to delivery."""
        spec = run.spec
        by_thing = {r.thing_id: r for r in rows}
        canary_size = self._canary_size(run)
        for thing_id, _attempt, _reason in rejections:
            row = by_thing[thing_id]
            source = "RETRYING" if row.state is TargetState.RETRY else "PENDING"
            run.counts.move(source, Status.REJECTED.name)
            if row.seq < canary_size:
                run.canary.move(source, Status.REJECTED.name)
            self.stats["rejected"] += 1
        for execution in results:
            if execution is None:
                continue
            row = by_thing[execution.thing_id]
            source = "RETRYING" if row.state is TargetState.RETRY else "PENDING"
            if row.state is TargetState.RETRY:
                self.stats["retried"] += 1
            self._inflight[execution.execution_id] = _Tracked(
                run.job_id, execution.thing_id, execution.job_attempt, row.seq, execution.status
            )
            run.counts.move(source, execution.status.name)
            if row.seq < canary_size:
                run.canary.move(source, execution.status.name)
            if spec.rollout.sequential_per_thing:
                self._busy[execution.thing_id] = execution.execution_id
            self.stats["dispatched"] += 1
            self.core.track(execution)
        self._changed(run)

    def _start_pipelined(self, run: _Run, row: TargetRow) -> int:
        """Start one target of a paced job without waiting for the commit; returns its creation time."""
        dispatches, rejections, last = self._prepare(run, [row])

        async def commit() -> None:
            try:
                results = await self.store.dispatch(run.job_id, dispatches, rejections, last)
            except Unavailable:  # the store is closing: the target is still pending in the store
                return
            except JobLockLost:  # another replica runs the job now: it starts the target
                run.lock_lost = True
                return
            except FleetcmdError:
                log.exception("job %s: a dispatch failed; its target is read again", run.job_id)
                run.buffer.clear()
                run.buffer_after = -1
                return
            self._started(run, [row], rejections, results)

        task = asyncio.ensure_future(commit())
        run.dispatching.add(task)
        run.starting.add(row.thing_id)
        run.outstanding += 1

        def done(_task: asyncio.Future[None]) -> None:
            run.dispatching.discard(task)
            run.starting.discard(row.thing_id)
            run.outstanding -= 1
            self._wake.set()

        task.add_done_callback(done)
        return last

    async def _buffered(self, run: _Run, canary_only: bool) -> TargetRow | None:
        """The next pending target of a paced job, read a page ahead."""
        if not run.buffer:
            page = await self.store.targets(run.job_id, (TargetState.PENDING,), DISPATCH_BATCH, after_seq=run.buffer_after)
            if not page:
                return None
            run.buffer.extend(page)
            run.buffer_after = page[-1].seq
        if canary_only and run.buffer[0].seq >= self._canary_size(run):
            return None
        return run.buffer.popleft()

    # ---- helpers ----------------------------------------------------------------------------

    def _validate(self, spec: JobSpec, now: int) -> None:
        jb.validate_spec(spec, now_ms=now)
        validate_send(
            self.core.settings,
            thing_id="job",
            action=spec.action,
            params=spec.params,
            ttl_seconds=spec.ttl_seconds,
            idempotency_key="",
        )
        if spec.targets.from_job and spec.targets.mode is TargetMode.CONTINUOUS:
            raise InvalidArgument.single("targets.mode", "a job over another job's targets is a SNAPSHOT")

    async def _check_strict(self, spec: JobSpec) -> None:
        """Refuse the job if any target's thing type refuses the action or params (each (type, Kaa) checked once)."""
        checked: set[tuple[str, bool]] = set()
        async for page, _cursor in self._candidates(spec.targets, ""):
            for thing_id in page:
                thing = self._thing(thing_id)
                key = (thing.thing_type, bool(thing.kaa_app_version)) if thing is not None else ("", False)
                if key in checked and thing is not None:
                    continue
                try:
                    self.core.registry.prepare_send(thing_id, spec.action, spec.params, spec.ttl_seconds)
                except (InvalidArgument, NotFound) as exc:
                    raise InvalidArgument.single("targets", f"strict: thing {thing_id!r} refuses the job: {exc}") from None
                checked.add(key)

    def _thing(self, thing_id: str) -> ThingRecord | None:
        try:
            return self.registry.get_thing(thing_id)
        except NotFound:
            return None

    async def _candidates(self, targets: jb.Targets, cursor: str) -> AsyncIterator[tuple[builtins.list[str], str]]:
        """Pages of matching thing ids after ``cursor`` (by id), with the cursor after each page; never all at once."""
        presence = self.registry.presence
        match = jb.Matcher.of(targets)
        if targets.from_job:
            statuses = [Status[name] for name in targets.from_statuses]
            while True:
                ids = await self.store.target_ids(targets.from_job, statuses, cursor, RESOLVE_PAGE)
                if not ids:
                    return
                cursor = ids[-1]
                yield [i for i in ids if self._matches_known(match, i)], cursor
                if len(ids) < RESOLVE_PAGE:
                    return
        elif targets.thing_ids:
            ids = sorted(i for i in set(targets.thing_ids) if i > cursor)
            for start in range(0, len(ids), RESOLVE_PAGE):
                chunk = ids[start : start + RESOLVE_PAGE]
                yield [i for i in chunk if self._matches_known(match, i)], chunk[-1]
        else:
            while True:
                rows = await self.store.thing_page(cursor, RESOLVE_PAGE, targets.thing_type)
                if not rows:
                    return
                cursor = rows[-1][0]
                yield (
                    [
                        thing_id
                        for thing_id, thing_type, attributes in rows
                        if match(thing_id, thing_type, attributes, presence(thing_id).online)
                    ],
                    cursor,
                )
                if len(rows) < RESOLVE_PAGE:
                    return

    def _matches_known(self, match: jb.Matcher, thing_id: str) -> bool:
        # A listed thing nobody registered stays a target unless a type or attributes are asked for
        # (its dispatch records why it is refused).
        thing = self._thing(thing_id)
        online = self.registry.presence(thing_id).online
        if thing is None:
            return not (match.thing_type or match.attributes) and match(thing_id, "", {}, online)
        return match(thing_id, thing.thing_type, thing.attributes, online)

    async def _resolve(self, run: _Run) -> None:
        """Resolve the job's targets into the store, a page per transaction, resuming at the stored cursor."""
        cursor = run.resolve_cursor
        added_any = False
        async for page, page_end in self._candidates(run.spec.targets, run.resolve_cursor):
            added = await self.store.add_targets(run.job_id, page, cursor=page_end, resolved=False)
            run.resolve_cursor = cursor = page_end
            self._added(run, added)
            added_any = True
        await self.store.add_targets(run.job_id, [], cursor=cursor, resolved=True)
        run.rec = dataclasses.replace(run.rec, resolved=True, resolve_cursor=cursor)
        if not added_any:
            self._changed(run)

    def _added(self, run: _Run, added: int) -> None:
        if not added:
            return
        before = run.rec.targets_total
        run.rec = dataclasses.replace(run.rec, targets_total=before + added)
        run.counts.move(None, "PENDING", added)
        size = self._canary_size(run)
        if before < size:
            run.canary.move(None, "PENDING", min(added, size - before))
        self._changed(run)
        self._wake.set()

    def _canary_size(self, run: _Run) -> int:
        return run.spec.canary.count if run.spec.canary is not None else 0

    def _canary_total(self, run: _Run) -> int:
        return min(self._canary_size(run), run.rec.targets_total) if run.rec.resolved else self._canary_size(run)

    def _notified(self, run: _Run) -> int:
        # Targets started at least once (their latest execution exists or they were refused by their type).
        c = run.counts.by_name
        return sum(n for name, n in c.items() if name not in ("PENDING", "RETRYING", "SKIPPED"))

    def _idle(self, run: _Run) -> bool:
        """Nothing of the job is in flight: no execution, no final one to settle, no dispatch to commit."""
        return not run.counts.in_flight() and not run.dispatching and not self._has_finals(run)

    def _has_finals(self, run: _Run) -> bool:
        return any(t.job_id == run.job_id for t, *_ in self._finals)

    def _skip_counts(self, run: _Run) -> None:
        for name in ("PENDING", "RETRYING"):
            n = run.counts.get(name)
            if n:
                run.counts.move(name, "SKIPPED", n)
            n = run.canary.get(name)
            if n:
                run.canary.move(name, "SKIPPED", n)
        self._changed(run)

    async def _run_for(self, job_id: str) -> _Run:
        run = self._runs.get(job_id)
        if run is not None:
            return run
        rec = await self.store.get_job(job_id)
        if rec is None:
            raise NotFound(f"job {job_id!r} not found")
        if rec.state.final or self._locks is None:
            raise FailedPrecondition(f"job {job_id!r} is already final")
        # A shared store: another replica runs it, or ran it and stopped (its lock went with it).
        taken = await self._take(job_id)
        if taken is None:
            raise FailedPrecondition(f"job {job_id!r} runs on another replica (it holds the job's lock): ask again there")
        run = taken
        await self._mark_busy()
        self._wake.set()
        return run

    async def _move(
        self, run: _Run, event: JobEvent, *, started: bool = True, reason: str = "", only_undelivered: bool = False
    ) -> None:
        """Apply ``event`` to the job durably, with its job event in the same transaction, then in memory.

        Raises:
            FailedPrecondition: the event is not allowed in the job's state.
        """
        target = jb.next_state(run.state, event, started=started)
        if target is None:
            raise FailedPrecondition(f"job {run.job_id} is {run.state.name}: cannot {event.value}")
        now = now_ms()
        started_at = run.rec.started_at_ms
        if target is JobState.IN_PROGRESS and started_at is None:
            started_at = now
        ended_at = now if target.final else None
        rec = dataclasses.replace(
            run.rec,
            state=target,
            started_at_ms=started_at,
            ended_at_ms=ended_at,
            abort_reason=reason or run.rec.abort_reason,
            only_undelivered=only_undelivered or run.rec.only_undelivered,
        )
        async with self._event_order:
            version = run.version
            snapshot = dataclasses.replace(
                run.to_job(), state=target, started_at_ms=started_at, ended_at_ms=ended_at, abort_reason=rec.abort_reason
            )
            await self.store.update_job(
                run.job_id,
                state=target,
                started_at_ms=started_at,
                ended_at_ms=ended_at,
                abort_reason=rec.abort_reason,
                only_undelivered=rec.only_undelivered,
                event=snapshot,
                at_ms=now,
            )
            run.rec = rec
            run.last_event = snapshot
        log.info("job %s: %s -> %s%s", run.job_id, event.value, target.name, f" ({reason})" if reason else "")
        # The event written with the state shows it: only counts changed meanwhile need another.
        self._changed(run, published=run.version == version)
        if target.final:
            self._wake.set()  # the loop settles it (stores its counts) once nothing of it is in flight

    async def _stop(self, run: _Run, reason: str, *, only_undelivered: bool) -> None:
        """Nothing new starts; the job's executions not final are canceled (or only those not delivered)."""
        if run.dispatching:  # executions being created are canceled too
            await asyncio.gather(*run.dispatching, return_exceptions=True)
        await self.store.skip_unstarted(run.job_id, reason)
        self._skip_counts(run)
        ids = [
            eid
            for eid, t in self._inflight.items()
            if t.job_id == run.job_id and (not only_undelivered or t.status <= Status.SENT)
        ]
        for start in range(0, len(ids), CANCEL_BATCH):
            await self._cancel_executions(ids[start : start + CANCEL_BATCH])

    async def _cancel_executions(self, ids: Sequence[str]) -> None:
        async def one(execution_id: str) -> None:
            with contextlib.suppress(FailedPrecondition, NotFound):  # final meanwhile: its own status stands
                await self.core.cancel(execution_id)

        await asyncio.gather(*(one(i) for i in ids))

    async def _finish(self, run: _Run) -> None:
        """The job is final and nothing of it is in flight: store its counts and forget it."""
        await self.store.update_job(
            run.job_id,
            state=run.state,
            started_at_ms=run.rec.started_at_ms,
            ended_at_ms=run.rec.ended_at_ms,
            abort_reason=run.rec.abort_reason,
            counts_json=json.dumps(run.counts.by_name, sort_keys=True),
            only_undelivered=run.rec.only_undelivered,
        )
        self._runs.pop(run.job_id, None)
        if self._locks is not None:
            await self._locks.unlock_job(run.job_id)  # settled: nobody runs it any more
        # Settling shows nothing new on the event stream (its last job event has these counts, or one follows).
        self._changed(run, published=run.published == run.version)

    def _changed(self, run: _Run, *, published: bool = False) -> None:
        """The job's state or counts changed: wake its watchers and, unless ``published``, have a job event written.

        Changes are coalesced: one job event per job carries all those of one commit (or of one loop turn).
        """
        run.version += 1
        if published:
            run.published = run.version
        elif not self._unpublished:
            asyncio.get_running_loop().call_soon(self._publish)
            self._unpublished[run.job_id] = run
        else:
            self._unpublished[run.job_id] = run
        for wakeup in self._watchers.get(run.job_id, ()):
            wakeup.set()

    def _publish(self) -> None:
        """Have a job event written for every job changed since its last one (one store write for all)."""
        runs, self._unpublished = self._unpublished, {}
        task = asyncio.ensure_future(self._write_job_events(builtins.list(runs.values())))
        self._publishing.add(task)
        task.add_done_callback(self._published)

    async def _write_job_events(self, runs: builtins.list[_Run]) -> None:
        async with self._event_order:
            # Snapshots taken now, after any state write queued before: they show that state.
            jobs: builtins.list[Job] = []
            for run in runs:
                if run.published != run.version and not run.dropped:
                    run.published = run.version
                    job = run.to_job()
                    if job != run.last_event:
                        run.last_event = job
                        jobs.append(job)
            if jobs:
                await self.store.job_events(jobs, now_ms())

    def _published(self, task: asyncio.Future[None]) -> None:
        self._publishing.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, Unavailable):  # the store is closing: the job's state is in the store anyway
            log.debug("job events not written: %s", exc)
        elif exc is not None:
            log.error("job events not written", exc_info=exc)
