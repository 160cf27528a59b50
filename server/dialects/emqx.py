"""The EMQX Fleets command dialect (also AWS IoT's command shape): topics, decoder, route and bundle.

Service -> device: ``$emqx/commands/things/{thing}/executions/{execution}/request``
with ``{"commandId", "action", "params", "timestamp", "ttl"}``.
Device -> service: ``.../executions/{execution}/response`` with
``{"status", "result", "statusReason": {"reasonCode", "reasonDescription"}}``, decoded into the
core's neutral :class:`~server.core.models.ExecutionReport` (applied by the core's report fast path).
A device is its own thing (client id = thing id): its topics are granted by the wire ACL, and its
route is the default one (every thing no other dialect claims).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from broker_hooks import jsonvalue
from broker_hooks.rules import DecodeError, Dialect, LifecycleAction, Rule, TopicPattern
from server.core.delivery import DeviceLink, Message
from server.core.lifecycle import DEVICE_REPORTABLE, Status
from server.core.models import DeviceReport, Execution, ExecutionReport, Reason
from server.dialects.bundle import DialectBundle, DialectContext, DialectRuntime

DOLLAR_PREFIX = "$emqx/commands/"
REQUEST = TopicPattern("$emqx/commands/things/{thing}/executions/{execution}/request")
RESPONSE = TopicPattern("$emqx/commands/things/{thing}/executions/{execution}/response")

_REPORTABLE = {s.name: s for s in DEVICE_REPORTABLE}
MAX_REASON_LENGTH = 1024


# What the decoder produces: the core's neutral report (kept under its old name for callers).
ReportMessage = ExecutionReport


def request_topic(thing_id: str, execution_id: str) -> str:
    """Topic the request for ``execution_id`` is published on."""
    return f"$emqx/commands/things/{thing_id}/executions/{execution_id}/request"


def request_filter(thing_id: str) -> str:
    """The subscription a device makes to receive its requests."""
    return REQUEST.as_filter(thing=thing_id)


def encode_request(*, command_id: str, action: str, params_json: str | None, timestamp_s: int, ttl_seconds: int) -> bytes:
    """Build the request payload; ``params_json`` is inserted as it is (already canonical JSON)."""
    return (
        f'{{"commandId":{json.dumps(command_id)},"action":{json.dumps(action)},'
        f'"params":{params_json or "{}"},"timestamp":{timestamp_s},"ttl":{ttl_seconds}}}'
    ).encode()


def _text(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_REASON_LENGTH:
        raise DecodeError("invalid_status_reason", f"statusReason.{key} must be a string of at most {MAX_REASON_LENGTH}")
    return value


def decode_response(captured: Mapping[str, str], payload: bytes) -> ExecutionReport:
    """Decode a device response.

    Raises:
        DecodeError: not strict, bounded JSON (the codec's reason: ``too_deep``, ``number_out_of_range``,
            ``not_finite``, ``invalid_unicode``, ``invalid_json``), not an object, unknown status or bad statusReason.
    """
    try:
        # One strict parse checks the whole body, statusReason strings included; "result" is one level down.
        body = jsonvalue.loads(payload, jsonvalue.MAX_DEPTH + 1)
    except jsonvalue.JsonProblem as exc:
        raise DecodeError(exc.reason, str(exc)) from None
    if not isinstance(body, dict):
        raise DecodeError("not_an_object", f"payload is a JSON {type(body).__name__}")
    raw_status = body.get("status")
    status = _REPORTABLE.get(raw_status.upper()) if isinstance(raw_status, str) else None
    if status is None:
        raise DecodeError("unknown_status", f"status {raw_status!r} is not one of {sorted(_REPORTABLE)}")
    reason = None
    raw_reason = body.get("statusReason")
    if raw_reason is not None:
        if not isinstance(raw_reason, dict):
            raise DecodeError("invalid_status_reason", "statusReason must be an object")
        reason = Reason(_text(raw_reason, "reasonCode"), _text(raw_reason, "reasonDescription"))
    result_json = None
    if "result" in body:
        result_json = jsonvalue.dumps(body["result"])
    return ExecutionReport(
        thing_id=captured["thing"],
        execution_id=captured["execution"],
        report=DeviceReport(Status(status), result_json, reason),
    )


RULES = (Rule("emqx.response", RESPONSE, decode_response, LifecycleAction.DEVICE_REPORT),)

# A device subscribes to its own requests (one execution or ``+``) and publishes only its own responses.
DIALECT = Dialect(
    name="emqx",
    rules=RULES,
    device_publish=(RESPONSE,),
    device_subscribe=(REQUEST,),
    dollar_prefixes=(DOLLAR_PREFIX,),
)


class EmqxRoute:
    """EMQX Fleets: the thing's own client, on its request topic, if it subscribed to it."""

    def __init__(self, link: DeviceLink) -> None:
        self._link = link

    def ready(self, thing_id: str) -> bool:
        """See :class:`server.core.delivery.Route`."""
        return self._link.subscription_qos(thing_id, request_topic(thing_id, "probe")) is not None

    def messages(self, execution: Execution) -> list[Message]:
        """See :class:`server.core.delivery.Route`."""
        payload = encode_request(
            command_id=execution.command_id,
            action=execution.action,
            params_json=execution.params_json,
            timestamp_s=execution.created_at_ms // 1000,
            ttl_seconds=execution.ttl_seconds,
        )
        return [Message(execution.thing_id, request_topic(execution.thing_id, execution.execution_id), payload)]


def attach(ctx: DialectContext) -> DialectRuntime:
    """The default route; reports need no handler (the core applies ExecutionReport itself)."""
    return DialectRuntime(route=EmqxRoute(ctx.link))


BUNDLE = DialectBundle(name="emqx", wire=DIALECT, attach=attach)
