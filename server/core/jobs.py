"""Jobs: one action sent to many things, as pure data and pure rules (no I/O, no clock, no asyncio).

A job is a :class:`JobSpec` (the action, its params, the targets, how to roll it out, when to
abort, what to retry, when to run) and a :class:`JobState`. Everything the runner
(:mod:`server.core.job_runner`) decides is a function here, fed with what it read from durable data:

- the state machine (:func:`next_state`): which operator action or event moves a job where;
- the spec's bounds (:func:`validate_spec`), each violation named by its field;
- pacing: the dispatch slot of a paced job (:class:`Pacer`, a GCRA: dispatches at least
  ``60000 / rate`` ms apart, so no 1-second window holds more than ``rate / 60 + 1``), the rate
  of an exponential ramp (:func:`ramp_rate`), the room ``max_in_flight`` leaves (:func:`room`);
- abort criteria (:func:`abort_reason`), the canary gate (:func:`canary_verdict`);
- retries: which policy covers a failure and when the next attempt may start (:func:`retry_delay`,
  exponential backoff with jitter seeded by the target, so a restart computes the same time);
- target matching (:func:`matches`) for CONTINUOUS jobs and the snapshot resolution.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.core.errors import FieldViolation, InvalidArgument
from server.core.lifecycle import Status


class JobState(enum.Enum):
    """Where a job is in its life."""

    SCHEDULED = 1
    IN_PROGRESS = 2
    PAUSED = 3
    COMPLETED = 4
    CANCELED = 5
    ABORTED = 6

    @property
    def final(self) -> bool:
        """Whether the job can change no more."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({JobState.COMPLETED, JobState.CANCELED, JobState.ABORTED})


class TargetMode(enum.Enum):
    """SNAPSHOT: targets resolved once at start; CONTINUOUS: things that match later get the job too."""

    SNAPSHOT = 1
    CONTINUOUS = 2


class FailureType(enum.Enum):
    """Which final statuses a criterion or a retry policy covers."""

    FAILED = 1
    REJECTED = 2
    TIMED_OUT = 3
    ANY = 4

    def covers(self, status: Status) -> bool:
        """Whether ``status`` is a failure of this type."""
        if self is FailureType.ANY:
            return status in FAILURE_STATUSES
        return status.name == self.name


FAILURE_STATUSES = frozenset({Status.FAILED, Status.REJECTED, Status.TIMED_OUT})


class EndBehavior(enum.Enum):
    """What the end of a job's schedule does: start nothing new, or also cancel what is not final."""

    STOP_NEW = 1
    CANCEL_NOT_FINAL = 2


class JobEvent(enum.Enum):
    """What happens to a job (operator actions and the runner's findings)."""

    START = "start"  # the start time came (or there is none)
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    ABORT = "abort"  # an abort criterion or the canary gate tripped
    COMPLETE = "complete"  # every target is final (or the schedule ended and nothing is in flight)


# ---- bounds -----------------------------------------------------------------------------------

MAX_TARGET_IDS = 10_000  # explicit thing ids (and excludes) in one spec
MAX_SELECTOR_ATTRIBUTES = 16
MAX_PER_MINUTE = 6_000_000  # 100,000 a second: above what the service can do, so "unpaced" in effect
MAX_IN_FLIGHT = 1_000_000
MAX_ABORT_CRITERIA = 8
MAX_RETRY_POLICIES = 4
MAX_RETRY_ATTEMPTS = 10
MAX_BACKOFF_SECONDS = 86_400.0
MAX_RAMP_FACTOR = 100.0
MAX_DESCRIPTION = 4_096
MAX_IDEMPOTENCY_KEY = 256
MAX_SAMPLE = 20  # thing ids a dry run shows


# ---- the spec ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """Which things a job goes to: the AND of every non-empty selector, minus ``exclude``.

    ``from_job``/``from_statuses``: the targets of another job whose latest execution ended in one of
    these status names (rerun failed).
    """

    thing_ids: tuple[str, ...] = ()
    thing_type: str = ""
    attributes: tuple[tuple[str, str], ...] = ()
    online_only: bool = False
    exclude: tuple[str, ...] = ()
    mode: TargetMode = TargetMode.SNAPSHOT
    from_job: str = ""
    from_statuses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ramp:
    """An exponential ramp: ``base_per_minute * factor ** steps``, a step after every N notified or N succeeded."""

    base_per_minute: int
    factor: float
    every_notified: int = 0
    every_succeeded: int = 0


@dataclass(frozen=True)
class Rollout:
    """How fast a job starts executions; 0 = no limit."""

    max_per_minute: int = 0
    ramp: Ramp | None = None
    max_in_flight: int = 0
    sequential_per_thing: bool = False


@dataclass(frozen=True)
class AbortCriterion:
    """Abort when ``failure`` makes at least ``threshold_pct`` % of at least ``min_finished`` finished targets."""

    failure: FailureType
    threshold_pct: float
    min_finished: int


@dataclass(frozen=True)
class Canary:
    """The first ``count`` targets go first; the rest starts once they are final with ``success_pct`` % succeeded."""

    count: int
    success_pct: float


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a target whose execution ended in ``failure``, up to ``max_attempts`` more times."""

    failure: FailureType
    max_attempts: int
    backoff: str = "fixed"  # "fixed" | "exponential"
    base_seconds: float = 0.0
    max_seconds: float = 0.0  # cap of the exponential backoff (0 = no cap but MAX_BACKOFF_SECONDS)
    jitter: bool = False


@dataclass(frozen=True)
class Schedule:
    """When a job runs (Unix ms; 0 = now / no end) and what its end does."""

    start_at_ms: int = 0
    end_at_ms: int = 0
    end_behavior: EndBehavior = EndBehavior.STOP_NEW


@dataclass(frozen=True)
class JobSpec:
    """Everything an operator says about a job."""

    action: str
    params: dict[str, Any] | None
    ttl_seconds: int
    targets: Targets
    rollout: Rollout = Rollout()
    abort: tuple[AbortCriterion, ...] = ()
    canary: Canary | None = None
    retries: tuple[RetryPolicy, ...] = ()
    schedule: Schedule = Schedule()
    strict: bool = False
    description: str = ""
    idempotency_key: str = ""


@dataclass(frozen=True)
class Job:
    """A job as the API shows it.

    ``counts``: per execution status name, the targets whose latest execution is in it, plus
    ``PENDING`` (not started yet), ``RETRYING`` (waiting for the backoff of a retry), ``SKIPPED``
    (never started: the job ended first) and ``REJECTED`` also counts targets whose thing type refused
    the action or params (no execution).
    """

    job_id: str
    # None only in a job event after the job's first (models.later_job_event): the spec never changes.
    spec: JobSpec | None
    state: JobState
    counts: Mapping[str, int]
    targets_total: int
    created_at_ms: int
    started_at_ms: int | None
    ended_at_ms: int | None
    abort_reason: str
    created_by: str
    # Whether every SNAPSHOT target is resolved into the store (targets_total is then final).
    resolved: bool = True


@dataclass(frozen=True)
class DryRun:
    """What a job would target now: how many, and the first few."""

    targets_total: int
    sample: tuple[str, ...]


@dataclass(frozen=True)
class JobPage:
    """A page of jobs, newest first."""

    jobs: tuple[Job, ...]
    next_page_token: str


# ---- the state machine ------------------------------------------------------------------------

_TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (JobState.SCHEDULED, JobEvent.START): JobState.IN_PROGRESS,
    (JobState.SCHEDULED, JobEvent.PAUSE): JobState.PAUSED,
    (JobState.SCHEDULED, JobEvent.CANCEL): JobState.CANCELED,
    (JobState.IN_PROGRESS, JobEvent.PAUSE): JobState.PAUSED,
    (JobState.IN_PROGRESS, JobEvent.CANCEL): JobState.CANCELED,
    (JobState.IN_PROGRESS, JobEvent.ABORT): JobState.ABORTED,
    (JobState.IN_PROGRESS, JobEvent.COMPLETE): JobState.COMPLETED,
    # A paused job whose start time had not come goes back to SCHEDULED, else IN_PROGRESS (see next_state).
    (JobState.PAUSED, JobEvent.RESUME): JobState.IN_PROGRESS,
    (JobState.PAUSED, JobEvent.CANCEL): JobState.CANCELED,
    (JobState.PAUSED, JobEvent.ABORT): JobState.ABORTED,
    # The schedule may end while paused: nothing is started any more.
    (JobState.PAUSED, JobEvent.COMPLETE): JobState.COMPLETED,
}


def next_state(state: JobState, event: JobEvent, *, started: bool = True) -> JobState | None:
    """The state ``event`` moves a job in ``state`` to; None when it is not allowed.

    Args:
        state: The job's state now.
        event: What happened.
        started: For RESUME: whether the job had started (else it resumes to SCHEDULED).
    """
    target = _TRANSITIONS.get((state, event))
    if target is JobState.IN_PROGRESS and event is JobEvent.RESUME and not started:
        return JobState.SCHEDULED
    return target


# ---- validation -------------------------------------------------------------------------------


def _pct(value: float) -> bool:
    return math.isfinite(value) and 0 <= value <= 100


def validate_spec(spec: JobSpec, *, now_ms: int) -> None:
    """Check a job spec's own bounds (the action, params and TTL are checked like a Send's, elsewhere).

    Raises:
        InvalidArgument: one violation per bad field.
    """
    v: list[FieldViolation] = []
    t = spec.targets
    if len(t.thing_ids) > MAX_TARGET_IDS:
        v.append(FieldViolation("targets.thing_ids", f"at most {MAX_TARGET_IDS} thing ids"))
    if len(t.exclude) > MAX_TARGET_IDS:
        v.append(FieldViolation("targets.exclude", f"at most {MAX_TARGET_IDS} thing ids"))
    if len(t.attributes) > MAX_SELECTOR_ATTRIBUTES:
        v.append(FieldViolation("targets.attributes", f"at most {MAX_SELECTOR_ATTRIBUTES} attributes"))
    if len({k for k, _ in t.attributes}) != len(t.attributes):
        v.append(FieldViolation("targets.attributes", "an attribute may be named once"))
    if any(not k for k, _ in t.attributes):
        v.append(FieldViolation("targets.attributes", "attribute names must not be empty"))
    if not (t.thing_ids or t.thing_type or t.attributes or t.from_job):
        v.append(FieldViolation("targets", "name thing_ids, a thing_type or attributes (a job never targets everything)"))
    if t.from_statuses and not t.from_job:
        v.append(FieldViolation("targets.from_statuses", "only with from_job"))
    for name in t.from_statuses:
        if name not in Status.__members__:
            v.append(FieldViolation("targets.from_statuses", f"{name!r} is not an execution status"))
    r = spec.rollout
    if not 0 <= r.max_per_minute <= MAX_PER_MINUTE:
        v.append(FieldViolation("rollout.max_per_minute", f"must be 0 (unpaced) to {MAX_PER_MINUTE}"))
    if not 0 <= r.max_in_flight <= MAX_IN_FLIGHT:
        v.append(FieldViolation("rollout.max_in_flight", f"must be 0 (no limit) to {MAX_IN_FLIGHT}"))
    if r.ramp is not None:
        ramp = r.ramp
        if not 1 <= ramp.base_per_minute <= MAX_PER_MINUTE:
            v.append(FieldViolation("rollout.ramp.base_per_minute", f"must be 1 to {MAX_PER_MINUTE}"))
        if not (math.isfinite(ramp.factor) and 1 < ramp.factor <= MAX_RAMP_FACTOR):
            v.append(FieldViolation("rollout.ramp.factor", f"must be above 1 and at most {MAX_RAMP_FACTOR:g}"))
        if (ramp.every_notified > 0) == (ramp.every_succeeded > 0) or ramp.every_notified < 0 or ramp.every_succeeded < 0:
            v.append(FieldViolation("rollout.ramp", "set exactly one of every_notified and every_succeeded (positive)"))
    if len(spec.abort) > MAX_ABORT_CRITERIA:
        v.append(FieldViolation("abort", f"at most {MAX_ABORT_CRITERIA} criteria"))
    for i, c in enumerate(spec.abort):
        if not _pct(c.threshold_pct) or c.threshold_pct == 0:
            v.append(FieldViolation(f"abort[{i}].threshold_pct", "must be above 0 and at most 100"))
        if c.min_finished < 1:
            v.append(FieldViolation(f"abort[{i}].min_finished", "must be at least 1"))
    if spec.canary is not None:
        if spec.canary.count < 1:
            v.append(FieldViolation("canary.count", "must be at least 1"))
        if not _pct(spec.canary.success_pct):
            v.append(FieldViolation("canary.success_pct", "must be 0 to 100"))
    if len(spec.retries) > MAX_RETRY_POLICIES:
        v.append(FieldViolation("retries", f"at most {MAX_RETRY_POLICIES} policies"))
    covered: set[FailureType] = set()
    for i, p in enumerate(spec.retries):
        where = f"retries[{i}]"
        if p.failure in covered or (FailureType.ANY in covered) or (p.failure is FailureType.ANY and covered):
            v.append(FieldViolation(f"{where}.failure", "each failure type may have one policy (ANY alone)"))
        covered.add(p.failure)
        if not 0 <= p.max_attempts <= MAX_RETRY_ATTEMPTS:
            v.append(FieldViolation(f"{where}.max_attempts", f"must be 0 to {MAX_RETRY_ATTEMPTS}"))
        if p.backoff not in ("fixed", "exponential"):
            v.append(FieldViolation(f"{where}.backoff", "must be fixed or exponential"))
        for label, value in (("base_seconds", p.base_seconds), ("max_seconds", p.max_seconds)):
            if not (math.isfinite(value) and 0 <= value <= MAX_BACKOFF_SECONDS):
                v.append(FieldViolation(f"{where}.{label}", f"must be 0 to {MAX_BACKOFF_SECONDS:g}"))
    s = spec.schedule
    if s.start_at_ms < 0 or s.end_at_ms < 0:
        v.append(FieldViolation("schedule", "times must not be negative"))
    if s.end_at_ms and s.end_at_ms <= max(s.start_at_ms, now_ms):
        v.append(FieldViolation("schedule.end_at_ms", "must be after the start and in the future"))
    if len(spec.description) > MAX_DESCRIPTION:
        v.append(FieldViolation("description", f"at most {MAX_DESCRIPTION} characters"))
    if len(spec.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        v.append(FieldViolation("idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY} characters"))
    if v:
        raise InvalidArgument(v)


# ---- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matcher:
    """A job's selectors ready to test many things (id lists as sets: a test is O(1) in their length)."""

    thing_ids: frozenset[str] | None
    thing_type: str
    attributes: tuple[tuple[str, str], ...]
    online_only: bool
    exclude: frozenset[str]

    @classmethod
    def of(cls, targets: Targets) -> Matcher:
        """The matcher of ``targets`` (``from_job`` is resolved by the store, not here)."""
        ids = frozenset(targets.thing_ids) if targets.thing_ids else None
        return cls(ids, targets.thing_type, targets.attributes, targets.online_only, frozenset(targets.exclude))

    def __call__(self, thing_id: str, thing_type: str, attributes: Mapping[str, str], online: bool) -> bool:
        """Whether this thing is a target."""
        if thing_id in self.exclude:
            return False
        if self.thing_ids is not None and thing_id not in self.thing_ids:
            return False
        if self.thing_type and thing_type != self.thing_type:
            return False
        if any(attributes.get(k) != value for k, value in self.attributes):
            return False
        return not self.online_only or online


def matches(targets: Targets, thing_id: str, thing_type: str, attributes: Mapping[str, str], online: bool) -> bool:
    """Whether a thing is a target of a job with these selectors (one test; use :class:`Matcher` for many)."""
    return Matcher.of(targets)(thing_id, thing_type, attributes, online)


# ---- pacing -----------------------------------------------------------------------------------


def ramp_rate(ramp: Ramp, *, notified: int, succeeded: int, cap: int = 0) -> float:
    """The ramp's rate per minute after ``notified`` started and ``succeeded`` succeeded targets (capped by ``cap``)."""
    done, every = (notified, ramp.every_notified) if ramp.every_notified else (succeeded, ramp.every_succeeded)
    steps = done // every
    # Computed in logs: factor ** steps overflows a float long before any cap matters.
    if steps * math.log(ramp.factor) > math.log(MAX_PER_MINUTE):
        rate = float(MAX_PER_MINUTE)
    else:
        rate = min(float(MAX_PER_MINUTE), ramp.base_per_minute * ramp.factor**steps)
    return min(rate, cap) if cap else rate


def rate_per_minute(rollout: Rollout, *, notified: int, succeeded: int) -> float:
    """The job's rate now (0: unpaced)."""
    if rollout.ramp is not None:
        return ramp_rate(rollout.ramp, notified=notified, succeeded=succeeded, cap=rollout.max_per_minute)
    return float(rollout.max_per_minute)


class Pacer:
    """When the next execution of a paced job may start (GCRA without burst).

    Every dispatch takes one slot; slots are at least ``60000 / rate`` ms apart, and a slot is never
    earlier than the previous dispatch plus that interval. So any window of W ms holds at most
    ``1 + W * rate / 60000`` dispatches, whatever the loop's delays, and the state is one number
    that a restart derives from the last durable dispatch time.
    """

    def __init__(self, last_dispatch_ms: int | None = None) -> None:
        self.last_ms = last_dispatch_ms

    @staticmethod
    def interval_ms(rate_per_minute: float) -> float:
        """The spacing of dispatches at this rate (0 for unpaced)."""
        return 60_000.0 / rate_per_minute if rate_per_minute > 0 else 0.0

    def next_at(self, rate_per_minute: float) -> float:
        """The earliest time (ms) the next dispatch may happen."""
        if self.last_ms is None or rate_per_minute <= 0:
            return -math.inf
        return self.last_ms + self.interval_ms(rate_per_minute)

    def allowed(self, now_ms: int, rate_per_minute: float) -> int:
        """How many may start at ``now_ms``: unbounded (-1) when unpaced, else 1 or 0."""
        if rate_per_minute <= 0:
            return -1
        return 1 if now_ms >= self.next_at(rate_per_minute) else 0

    def took(self, at_ms: int) -> None:
        """A dispatch happened at ``at_ms``."""
        self.last_ms = at_ms if self.last_ms is None else max(self.last_ms, at_ms)


def room(rollout: Rollout, in_flight: int) -> int:
    """How many more may start under ``max_in_flight`` (-1: no limit)."""
    if rollout.max_in_flight <= 0:
        return -1
    return max(0, rollout.max_in_flight - in_flight)


# ---- abort, canary, retries ---------------------------------------------------------------------


def failures(counts: Mapping[str, int], failure: FailureType) -> int:
    """Targets whose final status is a failure of ``failure``'s type."""
    return sum(counts.get(s.name, 0) for s in FAILURE_STATUSES if failure.covers(s))


def finished(counts: Mapping[str, int]) -> int:
    """Targets that are final (their latest execution, or their refusal by the thing's type)."""
    return sum(counts.get(s.name, 0) for s in Status if s.final)


def abort_reason(criteria: tuple[AbortCriterion, ...], counts: Mapping[str, int]) -> str:
    """The first criterion ``counts`` meets, as the reason to give; empty when none is met.

    A criterion is met when at least ``min_finished`` targets are final and the failures of its type are
    at least ``threshold_pct`` % of them.
    """
    done = finished(counts)
    for c in criteria:
        failed = failures(counts, c.failure)
        if done >= c.min_finished and done and failed * 100 >= c.threshold_pct * done:
            return (
                f"abort criterion {c.failure.name} >= {c.threshold_pct:g}% after >= {c.min_finished} finished met: "
                f"{failed} of {done} finished ({failed * 100 / done:.1f}%)"
            )
    return ""


def canary_verdict(canary: Canary, canary_counts: Mapping[str, int], canary_total: int) -> bool | None:
    """Whether the canary stage passed (True), failed (False), or is not over yet (None).

    ``canary_counts``: the counts of the canary targets only; ``canary_total``: how many there are.
    """
    done = finished(canary_counts)
    if done < canary_total:
        return None
    if canary_total == 0:
        return True
    return canary_counts.get(Status.SUCCEEDED.name, 0) * 100 >= canary.success_pct * canary_total


def retry_policy(retries: tuple[RetryPolicy, ...], status: Status) -> RetryPolicy | None:
    """The policy covering a final ``status`` (a specific type before ANY)."""
    if status not in FAILURE_STATUSES:
        return None
    specific = [p for p in retries if p.failure is not FailureType.ANY and p.failure.covers(status)]
    if specific:
        return specific[0]
    return next((p for p in retries if p.failure is FailureType.ANY), None)


def _unit(seed: str) -> float:
    """A number in [0, 1) fixed by ``seed``."""
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2**64


def retry_delay(policy: RetryPolicy, retry_number: int, seed: str) -> float:
    """Seconds to wait before retry number ``retry_number`` (1 = the first retry).

    Fixed: ``base_seconds``. Exponential: ``base_seconds * 2 ** (retry_number - 1)`` capped by
    ``max_seconds``. Jitter ("full jitter") picks a point in [0, delay] fixed by ``seed`` (the job,
    thing and attempt), so a restart computes the same moment.
    """
    cap = policy.max_seconds or MAX_BACKOFF_SECONDS
    if policy.backoff == "exponential":
        exponent = min(retry_number - 1, 64)
        delay = min(cap, policy.base_seconds * 2.0**exponent)
    else:
        delay = min(cap, policy.base_seconds)
    if policy.jitter:
        delay *= _unit(seed)
    return delay


# ---- (de)serialisation of the spec (the store keeps it as JSON) ---------------------------------


def spec_to_json(spec: JobSpec, *, canonical: bool = False) -> str:
    """The spec as JSON, as the store keeps it: the params keep the order they were submitted in.

    With ``canonical`` the keys are sorted at every depth: the form an idempotency key is compared by
    (:func:`spec_fingerprint`), so a retry that lists the same params in another order is the same job.
    """
    t, r, s = spec.targets, spec.rollout, spec.schedule
    doc = {
        "action": spec.action,
        "params": spec.params,
        "ttl_seconds": spec.ttl_seconds,
        "targets": {
            "thing_ids": list(t.thing_ids),
            "thing_type": t.thing_type,
            "attributes": [list(a) for a in t.attributes],
            "online_only": t.online_only,
            "exclude": list(t.exclude),
            "mode": t.mode.name,
            "from_job": t.from_job,
            "from_statuses": list(t.from_statuses),
        },
        "rollout": {
            "max_per_minute": r.max_per_minute,
            "ramp": None if r.ramp is None else _fields(r.ramp),
            "max_in_flight": r.max_in_flight,
            "sequential_per_thing": r.sequential_per_thing,
        },
        "abort": [
            {"failure": c.failure.name, "threshold_pct": c.threshold_pct, "min_finished": c.min_finished} for c in spec.abort
        ],
        "canary": None if spec.canary is None else _fields(spec.canary),
        "retries": [{**_fields(p), "failure": p.failure.name} for p in spec.retries],
        "schedule": {"start_at_ms": s.start_at_ms, "end_at_ms": s.end_at_ms, "end_behavior": s.end_behavior.name},
        "strict": spec.strict,
        "description": spec.description,
        "idempotency_key": spec.idempotency_key,
    }
    return json.dumps(doc, sort_keys=canonical, separators=(",", ":"))


def _fields(obj: Any) -> dict[str, Any]:
    return dict(obj.__dict__)


def spec_from_json(text: str) -> JobSpec:
    """The inverse of :func:`spec_to_json`."""
    d = json.loads(text)
    t, r, s = d["targets"], d["rollout"], d["schedule"]
    return JobSpec(
        action=d["action"],
        params=d["params"],
        ttl_seconds=d["ttl_seconds"],
        targets=Targets(
            thing_ids=tuple(t["thing_ids"]),
            thing_type=t["thing_type"],
            attributes=tuple((k, v) for k, v in t["attributes"]),
            online_only=t["online_only"],
            exclude=tuple(t["exclude"]),
            mode=TargetMode[t["mode"]],
            from_job=t["from_job"],
            from_statuses=tuple(t["from_statuses"]),
        ),
        rollout=Rollout(
            max_per_minute=r["max_per_minute"],
            ramp=None if r["ramp"] is None else Ramp(**r["ramp"]),
            max_in_flight=r["max_in_flight"],
            sequential_per_thing=r["sequential_per_thing"],
        ),
        abort=tuple(AbortCriterion(FailureType[c["failure"]], c["threshold_pct"], c["min_finished"]) for c in d["abort"]),
        canary=None if d["canary"] is None else Canary(**d["canary"]),
        retries=tuple(RetryPolicy(**{**p, "failure": FailureType[p["failure"]]}) for p in d["retries"]),
        schedule=Schedule(s["start_at_ms"], s["end_at_ms"], EndBehavior[s["end_behavior"]]),
        strict=d["strict"],
        description=d["description"],
        idempotency_key=d["idempotency_key"],
    )


def spec_fingerprint(spec: JobSpec) -> str:
    """Digest of a spec, to tell a retried create from a reuse of its idempotency key."""
    return hashlib.sha256(spec_to_json(spec, canonical=True).encode()).hexdigest()


@dataclass
class Counts:
    """Per-target counts of a job (mutable; the runner keeps one per running job)."""

    by_name: dict[str, int] = field(default_factory=dict)

    def move(self, old: str | None, new: str | None, n: int = 1) -> None:
        """Move ``n`` targets from ``old`` to ``new`` (None: from/to nowhere)."""
        if old is not None:
            left = self.by_name.get(old, 0) - n
            if left:
                self.by_name[old] = left
            else:
                self.by_name.pop(old, None)
        if new is not None:
            self.by_name[new] = self.by_name.get(new, 0) + n

    def get(self, name: str) -> int:
        """The count of ``name`` (0 when none)."""
        return self.by_name.get(name, 0)

    def in_flight(self) -> int:
        """Targets whose execution is not final."""
        return sum(self.by_name.get(s.name, 0) for s in Status if not s.final)
