"""Checks of operator requests, reporting every bad field at once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from broker_hooks import jsonvalue
from broker_hooks.topics import level_problem
from server.config import Settings
from server.core.errors import FieldViolation, InvalidArgument
from server.core.jobs import Targets
from server.core.records import fast_init
from server.core.registry import MAX_ATTRIBUTE_KEY, MAX_ATTRIBUTE_VALUE, TYPE_NAME

MAX_ACTION_LENGTH = 128
MAX_IDEMPOTENCY_KEY_LENGTH = 256


@fast_init
@dataclass(frozen=True)
class SendCommand:
    """A validated Send request (before the thing's type is applied)."""

    thing_id: str
    action: str
    params: dict[str, Any] | None
    ttl_seconds: int  # 0 = the command's or the server's default
    idempotency_key: str


def fingerprint(thing_id: str, action: str, params_json: str | None, ttl_seconds: int) -> str:
    """Digest of the effective request, to tell an idempotent retry from a reuse of its key."""
    canonical = json.dumps(
        {"thing_id": thing_id, "action": action, "params": json.loads(params_json) if params_json else None, "ttl": ttl_seconds},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


MAX_WAIT_SECONDS = 60


def check_wait(wait_seconds: int, field: str = "wait_seconds") -> int:
    """Bound how long a Send may wait for the final status.

    Raises:
        InvalidArgument: above :data:`MAX_WAIT_SECONDS` or negative.
    """
    if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
        raise InvalidArgument.single(field, f"{field} must be 0 to {MAX_WAIT_SECONDS}")
    return wait_seconds


def check_execution_id(execution_id: str, field: str = "execution_id") -> None:
    """Reject an empty or impossible execution id before touching the store."""
    problem = level_problem(execution_id)
    if problem:
        raise InvalidArgument.single(field, problem)


def validate_send(
    settings: Settings,
    *,
    thing_id: str,
    action: str,
    params: dict[str, Any] | None,
    ttl_seconds: int,
    idempotency_key: str,
) -> SendCommand:
    """Validate and normalise a Send.

    Raises:
        InvalidArgument: with one violation per bad field.
    """
    violations: list[FieldViolation] = []
    problem = level_problem(thing_id)
    if problem:
        violations.append(FieldViolation("thing_id", f"thing_id {problem}"))
    if not action:
        violations.append(FieldViolation("action", "action must not be empty"))
    elif len(action) > MAX_ACTION_LENGTH:
        violations.append(FieldViolation("action", f"action must be at most {MAX_ACTION_LENGTH} characters"))
    elif "\x00" in action:
        violations.append(FieldViolation("action", "action must not contain NUL"))
    if params is not None:
        try:
            # Each surface parsed params by the JSON rules once (REST: jsonvalue.loads of the body;
            # gRPC: convert.struct_to_dict), so no second walk here; the canonical text still
            # refuses NaN and Infinity (allow_nan=False) should a caller skip that.
            size = len(jsonvalue.dumps(params).encode())
        except ValueError as exc:
            violations.append(FieldViolation("params", f"params is refused ({jsonvalue.NOT_FINITE}): {exc}"))
            size = 0
        if size > settings.max_params_bytes:
            violations.append(
                FieldViolation("params", f"params is {size} bytes as JSON; the limit is {settings.max_params_bytes}")
            )
    if ttl_seconds < 0 or ttl_seconds > settings.max_ttl:
        violations.append(FieldViolation("ttl_seconds", f"ttl_seconds must be 0 (default) to {settings.max_ttl}"))
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        violations.append(
            FieldViolation("idempotency_key", f"idempotency_key must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
        )
    if violations:
        raise InvalidArgument(violations)
    return SendCommand(thing_id, action, params, ttl_seconds, idempotency_key)


def check_job_targets(targets: Targets) -> None:
    """Check the names a job's target selectors hold (:func:`server.core.jobs.validate_spec` bounds how many).

    Each thing id (and excluded id) must be one MQTT topic level, as a Send's; the type a valid type
    name; each attribute as a thing's may be. The first bad id of each list is named (``targets.thing_ids[3]``).

    Raises:
        InvalidArgument: one violation per bad selector.
    """
    violations: list[FieldViolation] = []
    for name, ids in (("thing_ids", targets.thing_ids), ("exclude", targets.exclude)):
        for i, thing_id in enumerate(ids):
            problem = level_problem(thing_id)
            if problem:
                violations.append(FieldViolation(f"targets.{name}[{i}]", f"thing id {problem}"))
                break
    if targets.thing_type and not TYPE_NAME.match(targets.thing_type):
        violations.append(FieldViolation("targets.thing_type", "a type name is 1-128 characters of [A-Za-z0-9_.-]"))
    for key, value in targets.attributes:
        if not key or len(key) > MAX_ATTRIBUTE_KEY or len(value) > MAX_ATTRIBUTE_VALUE:
            violations.append(
                FieldViolation(
                    "targets.attributes",
                    f"attribute {key[:MAX_ATTRIBUTE_KEY]!r}: names are 1-{MAX_ATTRIBUTE_KEY} characters, "
                    f"values at most {MAX_ATTRIBUTE_VALUE}",
                )
            )
            break
    if violations:
        raise InvalidArgument(violations)
