"""Plain data records shared by the store, the lifecycle service and the API surfaces.

JSON payloads (params, results) are kept as JSON text: they are written to
SQLite and to protobuf ``Struct``/``Value`` as they are, so the hot path never
parses them twice.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.core.jobs import Job, JobSpec, JobState, spec_from_json
from server.core.lifecycle import Status
from server.core.records import fast_init


@fast_init
@dataclass(frozen=True)
class Reason:
    """A device's ``statusReason``."""

    code: str
    description: str


@fast_init
@dataclass(frozen=True)
class StateChange:
    """One entry of the durable event log: an execution's state change or late report, or a job event.

    A job event (``job`` set) has empty ``execution_id``, ``thing_id`` and ``action`` (so a filter on
    any of them never matches it) and a meaningless ``status`` (QUEUED); ``job_id`` is its job's. An
    execution's event carries its execution's ``job_id`` (empty for a single command).
    """

    sequence: int
    execution_id: str
    thing_id: str
    action: str
    status: Status
    previous_status: Status | None
    at_ms: int
    late: bool = False
    result_json: str | None = None
    reason: Reason | None = None
    note: str = ""
    job_id: str = ""
    # A job event: the job right after the change (state, counts), as the API shows it; its spec only in
    # the job's first event (later_job_event).
    job: Job | None = None


def job_event(sequence: int, job: Job, at_ms: int) -> StateChange:
    """The event log entry of a job's state or count change (after the first: ``job`` as :func:`later_job_event` leaves it)."""
    return StateChange(sequence, "", "", "", Status.QUEUED, None, at_ms, job_id=job.job_id, job=job)


def later_job_event(job: Job) -> Job:
    """What every job event after the first shows of its job: all but the spec.

    The spec never changes and can be megabytes (10,000 ids and as many exclusions): a watcher has it
    from the job's first event, or reads it once with GetJob when it first sees the job mid-way.
    """
    return dataclasses.replace(job, spec=None) if job.spec is not None else job


def job_event_json(job: Job) -> str:
    """What a job event stores of its job: the parts that change, its creation, and whether it is the first.

    The spec stays with the job (the jobs row): only the first event (``"first": true``, its Job has the
    spec) reads it back; a later event is rebuilt from this text alone.
    """
    parts: dict[str, Any] = {
        "state": job.state.name,
        "counts": dict(job.counts),
        "targets_total": job.targets_total,
        "started_at_ms": job.started_at_ms,
        "ended_at_ms": job.ended_at_ms,
        "abort_reason": job.abort_reason,
        "resolved": job.resolved,
        "created_at_ms": job.created_at_ms,
        "created_by": job.created_by,
    }
    if job.spec is not None:
        parts["first"] = True
    return json.dumps(parts, separators=(",", ":"))


def job_event_parts(event_json: str) -> dict[str, Any]:
    """The stored text of a job event (:func:`job_event_json`) as a dict."""
    parts: dict[str, Any] = json.loads(event_json)
    return parts


def job_event_reads_job(parts: Mapping[str, Any]) -> bool:
    """Whether a stored job event needs its job's row (:func:`job_from_event`'s ``stored``) to be rebuilt.

    The first event shows the spec. An event stored before events told which was first (no
    ``created_by``) is rebuilt as it was then: with the spec and creation of its job's row.
    """
    return bool(parts.get("first")) or "created_by" not in parts


def job_from_event(job_id: str, parts: Mapping[str, Any], stored: tuple[str, int, str] | None) -> Job:
    """The job of a stored job event (:func:`job_event_parts`).

    Args:
        job_id: the event's job.
        parts: the event's stored parts.
        stored: the job row's spec (JSON), creation time and creator, read when
            :func:`job_event_reads_job`; None: a later event (the job has no spec).
    """
    if stored is not None:
        spec: JobSpec | None = spec_from_json(stored[0])
        created_at_ms, created_by = stored[1], stored[2]
    else:
        spec, created_at_ms, created_by = None, parts["created_at_ms"], parts["created_by"]
    return Job(
        job_id=job_id,
        spec=spec,
        state=JobState[parts["state"]],
        counts=parts["counts"],
        targets_total=parts["targets_total"],
        created_at_ms=created_at_ms,
        started_at_ms=parts["started_at_ms"],
        ended_at_ms=parts["ended_at_ms"],
        abort_reason=parts["abort_reason"],
        created_by=created_by,
        resolved=parts["resolved"],
    )


@fast_init
@dataclass(frozen=True)
class Execution:
    """An execution as stored, optionally with its history."""

    execution_id: str
    command_id: str
    thing_id: str
    action: str
    params_json: str | None
    ttl_seconds: int
    status: Status
    created_at_ms: int
    updated_at_ms: int
    expires_at_ms: int
    completed_at_ms: int | None = None
    result_json: str | None = None
    reason: Reason | None = None
    idempotency_key: str = ""
    thing_type: str = ""
    # Violations of the action's result schema by the device's result (stored anyway).
    result_violations: tuple[str, ...] = ()
    # Kaa endpoints: the integer id the device sees (per thing and command type).
    kaa_id: int | None = None
    rerun_of: str = ""
    # Jobs: the job this execution belongs to, and the execution of the same target it retries.
    job_id: str = ""
    retry_of: str = ""
    job_attempt: int = 0  # 1 for a job's first execution of a target, 2 for its first retry, ...
    reruns: tuple[str, ...] = field(default=(), compare=False)
    history: tuple[StateChange, ...] = field(default=(), compare=False)


@fast_init
@dataclass(frozen=True)
class NewExecution:
    """What :meth:`server.store.Store.create` needs to insert an execution."""

    execution_id: str
    command_id: str
    thing_id: str
    action: str
    params_json: str | None
    ttl_seconds: int
    status: Status
    created_at_ms: int
    expires_at_ms: int
    idempotency_key: str = ""
    # Canonical digest of the request, to tell a retry from a conflicting reuse of a key.
    fingerprint: str = ""
    thing_type: str = ""
    # Allocate a Kaa integer command id (the thing is a Kaa endpoint).
    kaa: bool = False
    rerun_of: str = ""
    # Jobs: the job, the retried execution and the attempt number (written by the job dispatch only).
    job_id: str = ""
    retry_of: str = ""
    job_attempt: int = 0


@fast_init
@dataclass(frozen=True)
class DeviceReport:
    """A status a device sent for an execution."""

    status: Status
    result_json: str | None = None
    reason: Reason | None = None


@fast_init
@dataclass(frozen=True)
class ExecutionReport:
    """A device's status report for one execution, as a dialect's decoder hands it to the core.

    Any dialect whose rule produces this under ``LifecycleAction.DEVICE_REPORT`` gets the core's
    report fast path (applied from the ingest loop, no task per report).
    """

    thing_id: str
    execution_id: str
    report: DeviceReport


@dataclass(frozen=True)
class ListQuery:
    """Filters and page position for listing executions (newest first)."""

    thing_id: str = ""
    action: str = ""
    statuses: frozenset[Status] = frozenset()
    job_id: str = ""
    created_after_ms: int | None = None
    created_before_ms: int | None = None
    page_size: int = 50
    # Keyset position: only executions inserted before this one (exclusive).
    before_index: int | None = None


@dataclass(frozen=True)
class EventFilter:
    """Which events a Stream wants; empty fields match everything.

    A job event names no thing, execution or action, so only a filter without those gets it;
    ``job_id`` matches the job's events and its executions' events.
    """

    thing_id: str = ""
    execution_id: str = ""
    action: str = ""
    job_id: str = ""

    def matches(self, event: StateChange) -> bool:
        """Whether ``event`` passes the filter."""
        return (
            (not self.thing_id or event.thing_id == self.thing_id)
            and (not self.execution_id or event.execution_id == self.execution_id)
            and (not self.action or event.action == self.action)
            and (not self.job_id or event.job_id == self.job_id)
        )


@dataclass(frozen=True)
class ActiveExecution:
    """The part of a non-final execution the scheduler and outbox need after a restart."""

    execution_id: str
    thing_id: str
    status: Status
    expires_at_ms: int
    handed: bool = False  # the external broker acknowledged its publish (server/core/handover.py)


# ---- registry -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LastConnection:
    """A thing's last connection, as the store keeps it."""

    thing_id: str
    last_seen_ms: int
    client_id: str
    remote_address: str
    connected_at_ms: int | None  # None: keep the stored one (a disconnect)


@dataclass(frozen=True)
class ThingRecord:
    """A registered thing as stored (the token only as its hash)."""

    thing_id: str
    thing_type: str
    attributes: dict[str, str]
    token_hash: str
    created_at_ms: int
    updated_at_ms: int
    credentials_rotated_at_ms: int
    last_seen_ms: int | None = None
    last_client_id: str = ""
    last_remote_address: str = ""
    last_connected_at_ms: int | None = None
    # Kaa endpoints: application version name and the endpoint token's hash.
    kaa_app_version: str = ""
    kaa_token_hash: str = ""
    # The password in mosquitto's password_file format (empty: issued before schema 5), for
    # `fleetcmd broker-config --mosquitto` (server/cli/broker_config.py).
    broker_password_hash: str = ""


@dataclass(frozen=True)
class CommandDef:
    """One command of a thing type; schemas are JSON values (an object or a boolean) or None."""

    description: str = ""
    params_schema: Any = None
    result_schema: Any = None
    default_ttl_seconds: int = 0


@dataclass(frozen=True)
class ThingTypeRecord:
    """A thing type as stored."""

    name: str
    description: str
    commands: dict[str, CommandDef]
    allow_undefined_actions: bool
    version: int
    created_at_ms: int
    updated_at_ms: int


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored (the secret only as its hash)."""

    key_id: str
    name: str
    role: str
    secret_hash: str
    created_at_ms: int
    revoked_at_ms: int | None = None
