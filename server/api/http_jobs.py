"""The REST API of jobs: ``/api/v1/jobs`` on top of :class:`~server.core.job_runner.JobsCore`.

The same keys, roles, error body and conventions as :mod:`server.api.http_rest` (camelCase JSON,
RFC 3339 UTC times with milliseconds, enum values by name): viewer reads, operator creates and
controls. A body becomes a :class:`~server.core.jobs.JobSpec` here, with the checks JSON needs to
become one (types, enum names, times); the spec's bounds are checked once, by the engine's
validation, as for gRPC, and its field names are given back as this API spells them
(``targets.thingIds[2]``, ``ttl``). Like every HTTP module it imports no gRPC and no protobuf.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from server.api.http_rest import API_PREFIX, CALLER, RestRoute, guarded_routes, read_json, rfc3339
from server.api.http_rest import _parse_time as parse_time  # the one parser of REST times
from server.core import jobs
from server.core.apikeys import ApiKeys
from server.core.authz import Operation
from server.core.errors import FieldViolation, InvalidArgument
from server.core.job_runner import JobsCore
from server.core.lifecycle import Status
from server.core.validation import check_execution_id, check_job_targets

JOBS = f"{API_PREFIX}/jobs"
JOB = JOBS + "/{jobId}"

E = TypeVar("E", bound=enum.Enum)

UINT32_MAX = 2**32 - 1  # the range of the gRPC API's counts: both surfaces take the same numbers
# The statuses a rerun selects when the request names none: the failures.
DEFAULT_RERUN_STATUSES = tuple(s.name for s in sorted(jobs.FAILURE_STATUSES))
BACKOFFS = ("FIXED", "EXPONENTIAL")  # RetryPolicy.backoff, lower-cased there

# The domain's field names (as the engine's validation names them) where this API does not just camelCase them.
_RENAMED = {"ttl_seconds": "ttl", "start_at_ms": "startAt", "end_at_ms": "endAt"}
_SEGMENT = re.compile(r"^([A-Za-z0-9_]+)(.*)$")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def rest_path(field: str) -> str:
    """A domain field path (``targets.thing_ids[2]``, ``spec.ttl_seconds``) as this API names it."""
    out = []
    for segment in field.removeprefix("spec.").split("."):
        m = _SEGMENT.match(segment)
        if m is None:
            out.append(segment)
            continue
        name, tail = m.groups()
        out.append(_RENAMED.get(name, _camel(name)) + tail)
    return ".".join(out)


def _rest_error(exc: InvalidArgument) -> InvalidArgument:
    """``exc`` with its fields (and their mentions in the descriptions) as this API names them."""
    renamed = []
    for v in exc.violations:
        # A description names at most the field's own name ("ttl_seconds must be 0 (default) to 86400").
        name = v.field.rpartition(".")[2].partition("[")[0]
        description = v.description.replace(name, rest_path(name)) if name else v.description
        renamed.append(FieldViolation(rest_path(v.field), description))
    return InvalidArgument(renamed)


# ---- request parsing ----------------------------------------------------------------------


class _Object:
    """One JSON object of a request body, read member by member; each problem is collected, named by its path."""

    def __init__(self, value: Any, path: str, violations: list[FieldViolation]) -> None:
        self.path = path
        self.violations = violations
        if value is None:
            value = {}
        elif not isinstance(value, dict):
            self.refuse(path or "body", f"{path or 'the body'} must be a JSON object")
            value = {}
        self.data: dict[str, Any] = value

    def name(self, key: str) -> str:
        """The path of member ``key``."""
        return f"{self.path}.{key}" if self.path else key

    def refuse(self, field: str, description: str) -> None:
        """Record a violation."""
        self.violations.append(FieldViolation(field, description))

    def string(self, key: str, *, required: bool = False) -> str:
        """A string member ("" when absent or null)."""
        value = self.data.get(key)
        if value is None:
            if required:
                self.refuse(self.name(key), f"{self.name(key)} is required")
            return ""
        if not isinstance(value, str):
            self.refuse(self.name(key), f"{self.name(key)} must be a string")
            return ""
        return value

    def count(self, key: str) -> int:
        """A non-negative integer member, at most :data:`UINT32_MAX` (0 when absent or null)."""
        value = self.data.get(key)
        if value is None:
            return 0
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT32_MAX:
            self.refuse(self.name(key), f"{self.name(key)} must be an integer from 0 to {UINT32_MAX}")
            return 0
        return value

    def number(self, key: str) -> float:
        """A number member (0 when absent or null; its range is the engine's to check)."""
        value = self.data.get(key)
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.refuse(self.name(key), f"{self.name(key)} must be a number")
            return 0.0
        return float(value)

    def boolean(self, key: str) -> bool:
        """A boolean member (false when absent or null)."""
        value = self.data.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.refuse(self.name(key), f"{self.name(key)} must be true or false")
            return False
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        """An array of strings (empty when absent or null)."""
        value = self.data.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.refuse(self.name(key), f"{self.name(key)} must be an array of strings")
            return ()
        return tuple(value)

    def string_map(self, key: str) -> tuple[tuple[str, str], ...]:
        """An object of string values as sorted pairs (empty when absent or null)."""
        value = self.data.get(key)
        if value is None:
            return ()
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            self.refuse(self.name(key), f"{self.name(key)} must be an object of strings")
            return ()
        return tuple(sorted(value.items()))

    def params(self, key: str) -> dict[str, Any] | None:
        """A JSON object member (None when absent or null)."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.refuse(self.name(key), f"{self.name(key)} must be a JSON object")
            return None
        return value

    def child(self, key: str) -> _Object | None:
        """A nested object (None when absent or null)."""
        value = self.data.get(key)
        return None if value is None else _Object(value, self.name(key), self.violations)

    def children(self, key: str) -> list[_Object]:
        """An array of objects (empty when absent or null)."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.refuse(self.name(key), f"{self.name(key)} must be an array of objects")
            return []
        return [_Object(v, f"{self.name(key)}[{i}]", self.violations) for i, v in enumerate(value)]

    def choice(self, key: str, kind: type[E], names: tuple[str, ...], default: E | None) -> E:
        """An enum member by name, one of ``names`` (``default`` when absent or null; None: required)."""
        value = self.data.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, str) and value in names:
            return kind[value]
        allowed = ", ".join(names)
        self.refuse(self.name(key), f"{self.name(key)} must be one of {allowed}")
        return default if default is not None else next(iter(kind))

    def time(self, key: str) -> int:
        """An RFC 3339 date-time with an offset in milliseconds (0 when absent, null or empty)."""
        value = self.data.get(key)
        if value is None or value == "":
            return 0
        if not isinstance(value, str):
            self.refuse(self.name(key), f"{self.name(key)} must be an RFC 3339 date-time")
            return 0
        return parse_time(self.name(key), value, self.violations) or 0


def _names(kind: type[enum.Enum]) -> tuple[str, ...]:
    return tuple(m.name for m in kind)


def job_spec(body: _Object) -> jobs.JobSpec:
    """The JobSpec of a ``POST /api/v1/jobs`` body (not validated yet).

    Raises:
        InvalidArgument: every member of the wrong JSON type, an enum name that is not one, a bad time.
    """
    targets = body.child("targets") or _Object({}, "targets", body.violations)
    for output_only in ("fromJob", "fromStatuses"):
        if targets.data.get(output_only) not in (None, [], ""):
            targets.refuse(targets.name(output_only), "output only: rerun-failed sets it")
    rollout = body.child("rollout") or _Object({}, "rollout", body.violations)
    schedule = body.child("schedule") or _Object({}, "schedule", body.violations)
    ramp = rollout.child("ramp")
    canary = body.child("canary")
    failures = _names(jobs.FailureType)
    spec = jobs.JobSpec(
        action=body.string("action", required=True),
        params=body.params("params"),
        ttl_seconds=body.count("ttl"),
        targets=jobs.Targets(
            thing_ids=targets.strings("thingIds"),
            thing_type=targets.string("thingType"),
            attributes=targets.string_map("attributes"),
            online_only=targets.boolean("onlineOnly"),
            exclude=targets.strings("exclude"),
            mode=targets.choice("mode", jobs.TargetMode, _names(jobs.TargetMode), jobs.TargetMode.SNAPSHOT),
        ),
        rollout=jobs.Rollout(
            max_per_minute=rollout.count("maxPerMinute"),
            ramp=None
            if ramp is None
            else jobs.Ramp(
                base_per_minute=ramp.count("basePerMinute"),
                factor=ramp.number("factor"),
                every_notified=ramp.count("everyNotified"),
                every_succeeded=ramp.count("everySucceeded"),
            ),
            max_in_flight=rollout.count("maxInFlight"),
            sequential_per_thing=rollout.boolean("sequentialPerThing"),
        ),
        abort=tuple(
            jobs.AbortCriterion(
                failure=c.choice("failure", jobs.FailureType, failures, None),
                threshold_pct=c.number("thresholdPct"),
                min_finished=c.count("minFinished"),
            )
            for c in body.children("abort")
        ),
        canary=None if canary is None else jobs.Canary(count=canary.count("count"), success_pct=canary.number("successPct")),
        retries=tuple(
            jobs.RetryPolicy(
                failure=p.choice("failure", jobs.FailureType, failures, None),
                max_attempts=p.count("maxAttempts"),
                backoff=_backoff(p),
                base_seconds=p.number("baseSeconds"),
                max_seconds=p.number("maxSeconds"),
                jitter=p.boolean("jitter"),
            )
            for p in body.children("retries")
        ),
        schedule=jobs.Schedule(
            start_at_ms=schedule.time("startAt"),
            end_at_ms=schedule.time("endAt"),
            end_behavior=schedule.choice("endBehavior", jobs.EndBehavior, _names(jobs.EndBehavior), jobs.EndBehavior.STOP_NEW),
        ),
        strict=body.boolean("strict"),
        description=body.string("description"),
        idempotency_key=body.string("idempotencyKey"),
    )
    if body.violations:
        raise InvalidArgument(body.violations)
    return spec


def _backoff(p: _Object) -> str:
    """A retry policy's ``backoff`` as the spec keeps it (lower case; absent or null: fixed)."""
    value = p.data.get("backoff")
    if value is None:
        return "fixed"
    if value in BACKOFFS:
        return str(value).lower()
    p.refuse(p.name("backoff"), f"{p.name('backoff')} must be one of {', '.join(BACKOFFS)}")
    return "fixed"


def _query_states(request: web.Request) -> tuple[jobs.JobState, ...]:
    """``state`` query values: JobState names (repeatable or comma-separated, any case)."""
    out: dict[jobs.JobState, None] = {}
    for value in request.query.getall("state", []):
        for name in value.split(","):
            name = name.strip().upper()
            if not name:
                continue
            try:
                out[jobs.JobState[name]] = None
            except KeyError:
                allowed = ", ".join(_names(jobs.JobState))
                raise InvalidArgument.single("state", f"{name!r} is not a job state ({allowed})") from None
    return tuple(out)


def _page_size(request: web.Request) -> int:
    """``pageSize`` as an integer (its range is the engine's to check; absent or 0: the default)."""
    raw = request.query.get("pageSize")
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        raise InvalidArgument.single("pageSize", "pageSize must be an integer") from None


def rerun_statuses(body: _Object) -> tuple[str, ...]:
    """``statuses`` of a rerun-failed body (none: the failures, FAILED, REJECTED and TIMED_OUT).

    Which statuses a rerun may select is the engine's rule (:meth:`~server.core.job_runner.JobsCore.rerun_failed`).
    """
    names = body.strings("statuses")
    if body.violations:
        raise InvalidArgument(body.violations)
    return tuple(dict.fromkeys(names)) or DEFAULT_RERUN_STATUSES


# ---- JSON representation ------------------------------------------------------------------


def spec_json(spec: jobs.JobSpec) -> dict[str, Any]:
    """A spec as this API shows it (the shape a create body has)."""
    t, r, s = spec.targets, spec.rollout, spec.schedule
    ramp = r.ramp
    return {
        "action": spec.action,
        "params": spec.params,
        "ttl": spec.ttl_seconds,
        "targets": {
            "thingIds": list(t.thing_ids),
            "thingType": t.thing_type,
            "attributes": dict(t.attributes),
            "onlineOnly": t.online_only,
            "exclude": list(t.exclude),
            "mode": t.mode.name,
            "fromJob": t.from_job or None,
            "fromStatuses": list(t.from_statuses),
        },
        "rollout": {
            "maxPerMinute": r.max_per_minute,
            "ramp": None
            if ramp is None
            else {
                "basePerMinute": ramp.base_per_minute,
                "factor": ramp.factor,
                "everyNotified": ramp.every_notified,
                "everySucceeded": ramp.every_succeeded,
            },
            "maxInFlight": r.max_in_flight,
            "sequentialPerThing": r.sequential_per_thing,
        },
        "abort": [
            {"failure": c.failure.name, "thresholdPct": c.threshold_pct, "minFinished": c.min_finished} for c in spec.abort
        ],
        "canary": None if spec.canary is None else {"count": spec.canary.count, "successPct": spec.canary.success_pct},
        "retries": [
            {
                "failure": p.failure.name,
                "maxAttempts": p.max_attempts,
                "backoff": p.backoff.upper(),
                "baseSeconds": p.base_seconds,
                "maxSeconds": p.max_seconds,
                "jitter": p.jitter,
            }
            for p in spec.retries
        ],
        "schedule": {
            "startAt": rfc3339(s.start_at_ms or None),
            "endAt": rfc3339(s.end_at_ms or None),
            "endBehavior": s.end_behavior.name,
        },
        "strict": spec.strict,
        "description": spec.description,
        "idempotencyKey": spec.idempotency_key or None,
    }


# Every count a job shows, in this order: targets not started yet, waiting for a retry's backoff,
# never started (the job ended first), then by the status of their latest execution.
COUNT_KEYS = ("PENDING", "RETRYING", "SKIPPED", *(s.name for s in Status))


def job_json(j: jobs.Job) -> dict[str, Any]:
    """A job as this API shows it (a job event after the job's first: no ``spec`` key)."""
    out: dict[str, Any] = {"jobId": j.job_id, "state": j.state.name}
    if j.spec is not None:
        out["spec"] = spec_json(j.spec)
    out["counts"] = {key: int(j.counts.get(key, 0)) for key in COUNT_KEYS}
    out["targetsTotal"] = j.targets_total
    out["createdAt"] = rfc3339(j.created_at_ms)
    out["startedAt"] = rfc3339(j.started_at_ms)
    out["endedAt"] = rfc3339(j.ended_at_ms)
    out["abortReason"] = j.abort_reason or None
    out["createdBy"] = j.created_by or None
    return out


# ---- handlers -----------------------------------------------------------------------------

# Every route of the jobs API; JobsRestApi.routes() authorizes each one's operation before its handler runs.
ROUTES: tuple[RestRoute, ...] = (
    RestRoute("POST", JOBS, "create", Operation.MANAGE_JOBS),
    RestRoute("GET", JOBS, "list", Operation.READ_JOBS),
    RestRoute("GET", JOB, "get", Operation.READ_JOBS),
    RestRoute("POST", JOB + "/pause", "pause", Operation.MANAGE_JOBS),
    RestRoute("POST", JOB + "/resume", "resume", Operation.MANAGE_JOBS),
    RestRoute("POST", JOB + "/cancel", "cancel", Operation.MANAGE_JOBS),
    RestRoute("POST", JOB + "/rerun-failed", "rerun_failed", Operation.MANAGE_JOBS),
)
# The caller of a request (its API key id), set by the role check.

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["jobId"]
    check_execution_id(job_id, "jobId")
    return job_id


async def _body(request: web.Request) -> _Object:
    body = _Object(await read_json(request), "", [])
    if body.violations:  # not an object: nothing in it can be named
        raise InvalidArgument(body.violations)
    return body


def _created(j: jobs.Job) -> web.Response:
    return web.json_response(job_json(j), status=201, headers={"Location": f"{JOBS}/{j.job_id}"})


class JobsRestApi:
    """Handlers of ``/api/v1/jobs``."""

    def __init__(self, jobs_core: JobsCore, keys: ApiKeys) -> None:
        self._jobs = jobs_core
        self._keys = keys

    def routes(self) -> list[web.RouteDef]:
        """The routes of :data:`ROUTES`, each behind its operation's role check, engine errors named as REST names fields."""
        return guarded_routes(_FieldNamed(self), ROUTES, self._keys)

    async def create(self, request: web.Request) -> web.Response:
        """``POST /api/v1/jobs``: 201 with the job, or with ``dryRun`` 200 with the target count and a sample."""
        body = await _body(request)
        dry = body.boolean("dryRun")
        spec = job_spec(body)
        check_job_targets(spec.targets)
        if dry:
            result = await self._jobs.dry_run(spec)
            return web.json_response({"targetsTotal": result.targets_total, "sample": list(result.sample)})
        return _created(await self._jobs.create(spec, created_by=request[CALLER].key_id))

    async def list(self, request: web.Request) -> web.Response:
        """``GET /api/v1/jobs``: newest first, ``nextPageToken`` "" on the last page."""
        states = _query_states(request)
        page = await self._jobs.list(states=states, page_size=_page_size(request), page_token=request.query.get("pageToken", ""))
        return web.json_response({"jobs": [job_json(j) for j in page.jobs], "nextPageToken": page.next_page_token})

    async def get(self, request: web.Request) -> web.Response:
        """``GET /api/v1/jobs/{jobId}``."""
        return web.json_response(job_json(await self._jobs.get(_job_id(request))))

    async def pause(self, request: web.Request) -> web.Response:
        """``POST /api/v1/jobs/{jobId}/pause``."""
        return web.json_response(job_json(await self._jobs.pause(_job_id(request))))

    async def resume(self, request: web.Request) -> web.Response:
        """``POST /api/v1/jobs/{jobId}/resume``."""
        return web.json_response(job_json(await self._jobs.resume(_job_id(request))))

    async def cancel(self, request: web.Request) -> web.Response:
        """``POST /api/v1/jobs/{jobId}/cancel`` (optional body ``{"onlyUndelivered": true}``)."""
        job_id = _job_id(request)
        body = await _body(request)
        only_undelivered = body.boolean("onlyUndelivered")
        if body.violations:
            raise InvalidArgument(body.violations)
        return web.json_response(job_json(await self._jobs.cancel(job_id, only_undelivered=only_undelivered)))

    async def rerun_failed(self, request: web.Request) -> web.Response:
        """``POST /api/v1/jobs/{jobId}/rerun-failed`` (optional body ``{"statuses": [...]}``): 201 with the new job."""
        job_id = _job_id(request)
        statuses = rerun_statuses(await _body(request))
        return _created(await self._jobs.rerun_failed(job_id, statuses))


class _FieldNamed:
    """The API's handlers, with the engine's field violations renamed as REST spells the fields."""

    def __init__(self, api: JobsRestApi) -> None:
        self._api = api

    def __getattr__(self, name: str) -> Handler:
        handler: Handler = getattr(self._api, name)

        async def renamed(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except InvalidArgument as exc:
                raise _rest_error(exc) from None

        return renamed
