"""Conversions between the jobs engine's records (:mod:`server.core.jobs`) and ``fleetcmd.v1`` jobs messages.

A request becomes a :class:`~server.core.jobs.JobSpec` here, with only the checks a protobuf message
needs to become one (an enum number the proto does not name, a Timestamp out of range, params that are
not JSON); the spec's bounds (NaN and infinities too) are checked once, by the engine's validation, for both surfaces.
Field names in errors are the request's (``spec.targets.thing_ids``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2

from server.api import convert
from server.core import jobs
from server.core.errors import FieldViolation, InvalidArgument
from server.core.lifecycle import Status
from server.pb import commands_pb2 as pb
from server.pb import jobs_pb2 as jpb

E = TypeVar("E", bound=enum.Enum)

# The statuses a rerun selects when the request names none: the failures.
DEFAULT_RERUN_STATUSES = tuple(s.name for s in sorted(jobs.FAILURE_STATUSES))
# The engine's spec fields (milliseconds) as the proto names them (Timestamps).
_GRPC_RENAMED = {"start_at_ms": "start_at", "end_at_ms": "end_at"}


def _domain_enum(kind: type[E], proto_enum: Any, prefix: str, number: int, field: str, default: E | None) -> E:
    """The domain member named like proto enum ``number`` without ``prefix``; UNSPECIFIED is ``default``.

    Raises:
        InvalidArgument: a number the proto does not name, or UNSPECIFIED without a default.
    """
    if number == 0:
        if default is None:
            raise InvalidArgument.single(field, f"{field} is required")
        return default
    try:
        name = proto_enum.Name(number).removeprefix(prefix)
        return kind[name]
    except (ValueError, KeyError):
        raise InvalidArgument.single(field, f"{number} is not a valid {proto_enum.DESCRIPTOR.name}") from None


def _proto_enum(proto_enum: Any, prefix: str, member: enum.Enum) -> Any:
    return proto_enum.Value(prefix + member.name)


def _millis(holder: Any, name: str, field: str) -> int:
    """A set Timestamp field in milliseconds (0 when unset)."""
    if not holder.HasField(name):
        return 0
    try:
        value: int = getattr(holder, name).ToMilliseconds()
    except ValueError as exc:
        raise InvalidArgument.single(field, f"{field} is not a valid timestamp: {exc}") from None
    return value


def _failure(number: int, field: str) -> jobs.FailureType:
    return _domain_enum(jobs.FailureType, jpb.FailureType, "FAILURE_TYPE_", number, field, None)


def _targets(t: jpb.JobTargets, field: str) -> jobs.Targets:
    if t.from_job or t.from_statuses:
        name = "from_job" if t.from_job else "from_statuses"
        raise InvalidArgument.single(f"{field}.{name}", "output only: RerunFailed sets it")
    return jobs.Targets(
        thing_ids=tuple(t.thing_ids),
        thing_type=t.thing_type,
        attributes=tuple(sorted(t.attributes.items())),
        online_only=t.online_only,
        exclude=tuple(t.exclude),
        mode=_domain_enum(jobs.TargetMode, jpb.TargetMode, "TARGET_MODE_", t.mode, f"{field}.mode", jobs.TargetMode.SNAPSHOT),
    )


def _rollout(r: jpb.JobRollout) -> jobs.Rollout:
    ramp = None
    if r.HasField("ramp"):
        ramp = jobs.Ramp(
            base_per_minute=r.ramp.base_per_minute,
            factor=r.ramp.factor,
            every_notified=r.ramp.every_notified,
            every_succeeded=r.ramp.every_succeeded,
        )
    return jobs.Rollout(
        max_per_minute=r.max_per_minute,
        ramp=ramp,
        max_in_flight=r.max_in_flight,
        sequential_per_thing=r.sequential_per_thing,
    )


# RetryPolicy.backoff keeps the lower-case name; UNSPECIFIED is fixed.
_BACKOFFS = {jpb.BACKOFF_UNSPECIFIED: "fixed", jpb.BACKOFF_FIXED: "fixed", jpb.BACKOFF_EXPONENTIAL: "exponential"}


def _retry(p: jpb.RetryPolicy, field: str) -> jobs.RetryPolicy:
    backoff = _BACKOFFS.get(p.backoff)
    if backoff is None:
        raise InvalidArgument.single(f"{field}.backoff", f"{p.backoff} is not a valid Backoff")
    return jobs.RetryPolicy(
        failure=_failure(p.failure, f"{field}.failure"),
        max_attempts=p.max_attempts,
        backoff=backoff,
        base_seconds=p.base_seconds,
        max_seconds=p.max_seconds,
        jitter=p.jitter,
    )


def job_spec(spec: jpb.JobSpec, field: str = "spec") -> jobs.JobSpec:
    """A JobSpec message as the engine's :class:`~server.core.jobs.JobSpec` (not validated yet).

    Raises:
        InvalidArgument: every field the message cannot be converted for (an enum number the proto does
            not name, a required enum left UNSPECIFIED, a bad Timestamp, params JSON refuses), named as in
            the request.
    """
    violations: list[FieldViolation] = []

    def attempt(convert_one: Any, *args: Any) -> Any:
        try:
            return convert_one(*args)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            return None

    params = attempt(convert.struct_to_dict, spec.params, f"{field}.params") if spec.HasField("params") else None
    targets = attempt(_targets, spec.targets, f"{field}.targets")
    rollout = _rollout(spec.rollout)
    abort = [
        attempt(
            lambda c, f: jobs.AbortCriterion(
                failure=_failure(c.failure, f"{f}.failure"),
                threshold_pct=c.threshold_pct,
                min_finished=c.min_finished,
            ),
            c,
            f"{field}.abort[{i}]",
        )
        for i, c in enumerate(spec.abort)
    ]
    canary = jobs.Canary(count=spec.canary.count, success_pct=spec.canary.success_pct) if spec.HasField("canary") else None
    retries = [attempt(_retry, p, f"{field}.retries[{i}]") for i, p in enumerate(spec.retries)]
    s = spec.schedule
    start = attempt(_millis, s, "start_at", f"{field}.schedule.start_at")
    end = attempt(_millis, s, "end_at", f"{field}.schedule.end_at")
    end_behavior = attempt(
        _domain_enum,
        jobs.EndBehavior,
        jpb.EndBehavior,
        "END_BEHAVIOR_",
        s.end_behavior,
        f"{field}.schedule.end_behavior",
        jobs.EndBehavior.STOP_NEW,
    )
    if violations:
        raise InvalidArgument(violations)
    return jobs.JobSpec(
        action=spec.action,
        params=params,
        ttl_seconds=spec.ttl_seconds,
        targets=targets,
        rollout=rollout,
        abort=tuple(abort),
        canary=canary,
        retries=tuple(retries),
        schedule=jobs.Schedule(start_at_ms=start, end_at_ms=end, end_behavior=end_behavior),
        strict=spec.strict,
        description=spec.description,
        idempotency_key=spec.idempotency_key,
    )


def _timestamp(ms: int | None) -> timestamp_pb2.Timestamp | None:
    return convert.timestamp(ms) if ms else None


def job_spec_pb(spec: jobs.JobSpec) -> jpb.JobSpec:
    """A spec as the API shows it."""
    t, r, s = spec.targets, spec.rollout, spec.schedule
    out = jpb.JobSpec(
        action=spec.action,
        ttl_seconds=spec.ttl_seconds,
        targets=jpb.JobTargets(
            thing_ids=list(t.thing_ids),
            thing_type=t.thing_type,
            attributes=dict(t.attributes),
            online_only=t.online_only,
            exclude=list(t.exclude),
            mode=_proto_enum(jpb.TargetMode, "TARGET_MODE_", t.mode),
            from_job=t.from_job,
            from_statuses=[pb.ExecutionStatus.Value(name) for name in t.from_statuses],
        ),
        rollout=jpb.JobRollout(
            max_per_minute=r.max_per_minute, max_in_flight=r.max_in_flight, sequential_per_thing=r.sequential_per_thing
        ),
        abort=[
            jpb.AbortCriterion(
                failure=_proto_enum(jpb.FailureType, "FAILURE_TYPE_", c.failure),
                threshold_pct=c.threshold_pct,
                min_finished=c.min_finished,
            )
            for c in spec.abort
        ],
        retries=[
            jpb.RetryPolicy(
                failure=_proto_enum(jpb.FailureType, "FAILURE_TYPE_", p.failure),
                max_attempts=p.max_attempts,
                backoff=jpb.Backoff.Value("BACKOFF_" + p.backoff.upper()),
                base_seconds=p.base_seconds,
                max_seconds=p.max_seconds,
                jitter=p.jitter,
            )
            for p in spec.retries
        ],
        schedule=jpb.JobSchedule(
            start_at=_timestamp(s.start_at_ms),
            end_at=_timestamp(s.end_at_ms),
            end_behavior=_proto_enum(jpb.EndBehavior, "END_BEHAVIOR_", s.end_behavior),
        ),
        strict=spec.strict,
        description=spec.description,
        idempotency_key=spec.idempotency_key,
    )
    if spec.params is not None:
        out.params.update(spec.params)
    if r.ramp is not None:
        out.rollout.ramp.CopyFrom(
            jpb.JobRamp(
                base_per_minute=r.ramp.base_per_minute,
                factor=r.ramp.factor,
                every_notified=r.ramp.every_notified,
                every_succeeded=r.ramp.every_succeeded,
            )
        )
    if spec.canary is not None:
        out.canary.CopyFrom(jpb.Canary(count=spec.canary.count, success_pct=spec.canary.success_pct))
    return out


# JobCounts fields by the engine's count key (an execution status name, or PENDING).
COUNT_FIELDS = {name.upper(): name for name in jpb.JobCounts.DESCRIPTOR.fields_by_name}


def job(j: jobs.Job) -> jpb.Job:
    """A job as the API shows it (a job event after the job's first: no ``spec``)."""
    counts = jpb.JobCounts(**{COUNT_FIELDS[k]: v for k, v in j.counts.items() if k in COUNT_FIELDS})
    return jpb.Job(
        job_id=j.job_id,
        spec=job_spec_pb(j.spec) if j.spec is not None else None,
        state=_proto_enum(jpb.JobState, "JOB_STATE_", j.state),
        counts=counts,
        targets_total=j.targets_total,
        created_at=convert.timestamp(j.created_at_ms),
        started_at=convert.timestamp(j.started_at_ms),
        ended_at=convert.timestamp(j.ended_at_ms),
        abort_reason=j.abort_reason,
        created_by=j.created_by,
    )


def dry_run(d: jobs.DryRun) -> jpb.DryRunResult:
    """A dry run's answer."""
    return jpb.DryRunResult(targets_total=d.targets_total, sample=list(d.sample))


def job_states(numbers: Iterable[int], field: str = "states") -> tuple[jobs.JobState, ...]:
    """ListJobsRequest.states as job states (repeats dropped, order kept).

    Raises:
        InvalidArgument: UNSPECIFIED or a number the proto does not name.
    """
    out: dict[jobs.JobState, None] = {}
    for number in numbers:
        out[_domain_enum(jobs.JobState, jpb.JobState, "JOB_STATE_", number, field, None)] = None
    return tuple(out)


def rerun_statuses(numbers: Iterable[int], field: str = "statuses") -> tuple[str, ...]:
    """RerunFailedRequest.statuses as status names (none: the failures, FAILED, REJECTED and TIMED_OUT).

    Which statuses a rerun may select is the engine's rule (:meth:`~server.core.job_runner.JobsCore.rerun_failed`).

    Raises:
        InvalidArgument: a number that is no ExecutionStatus.
    """
    names: dict[str, None] = {}
    for number in numbers:
        try:
            names[Status(number).name] = None
        except ValueError:
            raise InvalidArgument.single(field, f"{number} is not a valid ExecutionStatus") from None
    return tuple(names) or DEFAULT_RERUN_STATUSES


def grpc_field(field: str) -> str:
    """A spec field as the engine names it (``schedule.end_at_ms``) as CreateJobRequest does (``spec.schedule.end_at``)."""
    return "spec." + ".".join(_GRPC_RENAMED.get(part, part) for part in field.split("."))


def spec_error(exc: InvalidArgument) -> InvalidArgument:
    """The engine's refusal of a spec with its fields named as in CreateJobRequest."""
    return InvalidArgument([FieldViolation(grpc_field(v.field), v.description) for v in exc.violations])
