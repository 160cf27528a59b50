"""Schemathesis against the served OpenAPI document: every REST operation, positive and negative data.

Checks (schemathesis' own, plus two here): no 5xx; the status code, content type, headers and body
conform to the document; a body that violates the schema is refused and a valid one is not; every
response body is strict JSON (no NaN/Infinity, valid UTF-8); every REST error has the documented shape
``{"code", "message", "details": [{"field", "description"}]}``. Bounded: ``max_examples`` per operation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from server.api.http_app import MAX_REQUEST_LINE
from server.api.http_broker_auth import SECRET_HEADER
from server.api.openapi import document
from server.config import Settings
from server.core.validation import MAX_WAIT_SECONDS
from tests.test_fuzz_decoders import Service

schema = schemathesis.openapi.from_dict(document("test"))
MAX_TTL = Settings.__dataclass_fields__["max_ttl"].default


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@schemathesis.check
def strict_json_body(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every JSON body parses as strict JSON (NaN, Infinity and invalid UTF-8 refused)."""
    if "json" not in response.headers.get("content-type", [""])[0]:
        return None
    json.loads(response.content.decode("utf-8"), parse_constant=_refuse_constant)
    return True


@schemathesis.check
def documented_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """A REST error (not KP1's) is ``{"code", "message", "details": [{"field", "description"}]}``."""
    if response.status_code < 400 or (not case.path.startswith("/api/") and case.path != "/metrics"):
        return None
    if len(response.request.path_url) + 16 > MAX_REQUEST_LINE:
        # Refused by aiohttp's parser before any handler (plain text): only the status is ours to check.
        assert response.status_code == 400, response.status_code
        return True
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"code", "message", "details"}, body
    assert isinstance(body["code"], str) and isinstance(body["message"], str), body
    assert isinstance(body["details"], list), body
    for violation in body["details"]:
        assert isinstance(violation, dict) and set(violation) == {"field", "description"}, body
        assert isinstance(violation["field"], str) and isinstance(violation["description"], str), body
    return True


def breaks_a_job_rule_openapi_cannot_state(case: Any) -> bool:
    """A ``POST /api/v1/jobs`` body that breaks a rule the document can only describe, so a 400 is right.

    The TTL's limit is a setting (``max_ttl``); the end time must be after the start and in the future;
    retry policies take one failure type each (``ANY`` alone); ``strict`` refuses a job when a target's type
    refuses the action or params (the registry decides).
    """
    body = case.body
    if case.operation.label != "POST /api/v1/jobs" or not isinstance(body, dict):
        return False
    ttl, schedule, retries = body.get("ttl"), body.get("schedule"), body.get("retries")
    if type(ttl) in (int, float) and ttl > MAX_TTL:
        return True
    if isinstance(schedule, dict) and schedule.get("endAt"):
        return True
    failures = [r.get("failure") for r in retries if isinstance(r, dict)] if isinstance(retries, list) else []
    if len({json.dumps(f) for f in failures}) < len(failures) or ("ANY" in failures and len(failures) > 1):
        return True
    return body.get("strict") is True


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("rest-fuzz") / "data")
    try:
        yield svc
    finally:
        svc.close()


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("FLEETCMD_FUZZ_EXAMPLES", "25")),
    # Deterministic in CI (a red build is reproducible); FLEETCMD_FUZZ_RANDOM=1 explores at random.
    derandomize=not os.environ.get("FLEETCMD_FUZZ_RANDOM"),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,  # nothing written into the work tree
)
def test_every_operation_conforms(case: Any, service: Service) -> None:
    # A page token is opaque: only the ones the server issued are valid, so a made-up one is rightly refused.
    made_up_token = "pageToken" in (case.query or {})
    # The whole body obeys the JSON rules (no integer beyond 2**53, depth, ...), undeclared properties too,
    # which OpenAPI cannot say: a body with undeclared properties is only held to the other checks.
    declared = set(case.operation.body[0].definition.get("schema", {}).get("properties", {})) if case.operation.body else set()
    extra_properties = isinstance(case.body, dict) and bool(set(case.body) - declared)
    # Schemathesis generates the bearer header (or leaves it out, to test the refusal): a real key replaces its value.
    if case.headers and "Authorization" in case.headers:
        case.headers["Authorization"] = f"Bearer {service.key}"
    # The same for the external broker's shared secret (the authn/authz endpoints).
    if case.headers and SECRET_HEADER in case.headers:
        case.headers[SECRET_HEADER] = service.BROKER_SECRET
    # A valid wait of up to 60 s on a thing that never answers would only measure the clock: 1 s at most.
    for holder in (case.body, case.query):
        wait = holder.get("waitSeconds") if isinstance(holder, dict) else None
        if type(wait) in (int, float) and 1 < wait <= MAX_WAIT_SECONDS:  # 52.0 is an integer to JSON
            holder["waitSeconds"] = 1
    unknowable = (
        made_up_token or extra_properties or _service_judges(case, service) or breaks_a_job_rule_openapi_cannot_state(case)
    )
    case.call_and_validate(
        base_url=service.http,
        excluded_checks=[positive_data_acceptance] if unknowable else None,
        additional_checks=[strict_json_body, documented_error_shape],
        # An event stream never ends: its first events (none, on this quiet service) within the timeout are what is checked.
        timeout=0.5 if case.operation.label == "GET /api/v1/events" else 30,
    )


def _service_judges(case: Any, service: Service) -> bool:
    """Whether the body holds what only the service can judge, not the document.

    An existing thing type, a JSON Schema the registry can use (resolvable $refs, valid
    patterns), a TTL within the service's max_ttl (a setting).
    """
    body = case.body if isinstance(case.body, dict) else {}
    max_ttl = service.app.settings.max_ttl
    if case.operation.label == "POST /api/v1/commands":
        ttl = body.get("ttl")
        return type(ttl) in (int, float) and ttl > max_ttl
    if case.operation.label == "POST /api/v1/things":
        return bool(body.get("thingType"))
    if case.operation.label == "PUT /api/v1/thing-types/{name}":
        commands = body.get("commands") if isinstance(body.get("commands"), dict) else {}
        for command in commands.values():
            if not isinstance(command, dict):
                continue
            ttl = command.get("defaultTtlSeconds")
            if command.get("paramsSchema") not in (None, True) or command.get("resultSchema") not in (None, True):
                return True
            if type(ttl) in (int, float) and ttl > max_ttl:
                return True
    return False
