"""The Kaa CEX dialect (KP1 protocol over MQTT): topics, decoding and the endpoint-token ACL.

Device -> service (``{rid}``, the request id, is an optional positive integer level):

* ``kp1/{av}/cex/{token}/command/{type}[/{rid}]`` with ``{"observe": true|false}`` or ``{}``:
  the outstanding commands of that type, answered on ``{request topic}/status``;
* ``kp1/{av}/cex/{token}/result/{type}[/{rid}]`` with an array (or a single object) of
  ``{"id", "statusCode", "reasonPhrase", "payload"}``, acknowledged on ``{request topic}/status``.

Errors go to ``{request topic}/error`` as ``{"statusCode", "reasonPhrase"}``; without a request id
nothing is answered. Service -> device pushes of new commands use
``kp1/{av}/cex/{token}/command/{type}/status`` with ``[{"id", "payload"}]``.

The endpoint token in the topic is the device's credential (as in Kaa): :class:`KaaAcl` lets a
client use the ``cex`` and ``dcx`` topics of registered endpoints only. Decoding here only parses;
whether the token, the command type and the items are acceptable is decided by the control plane
(:mod:`server.dialects.kaa.cex`), which answers the errors.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from broker_hooks import jsonvalue
from broker_hooks.rules import DecodeError, Dialect, Rule, TopicPattern

COMMAND = TopicPattern("kp1/{av}/cex/{token}/command/{type}")
COMMAND_RID = TopicPattern("kp1/{av}/cex/{token}/command/{type}/{rid}")
RESULT = TopicPattern("kp1/{av}/cex/{token}/result/{type}")
RESULT_RID = TopicPattern("kp1/{av}/cex/{token}/result/{type}/{rid}")


class KaaAction(enum.Enum):
    """The Kaa dialect's lifecycle actions (its handlers are registered by the Kaa bundle)."""

    COMMAND = "kaa_command"  # a Kaa endpoint asks for its outstanding commands (and sets observe)
    RESULT = "kaa_result"  # a Kaa endpoint reports command results


STATUS, ERROR = "status", "error"
COMMAND_KIND, RESULT_KIND = "command", "result"
CEX, DCX = "cex", "dcx"


@dataclass(frozen=True)
class KaaRequest:
    """A decoded KP1 CEX publish.

    ``problem`` is set (and ``body`` is None) when the payload is unusable; the control plane answers
    it with a 400 error when there is a request id, and counts it as ``dropped.{reason}`` when the
    strict JSON codec refused it (``reason`` is one of :mod:`broker_hooks.jsonvalue`'s).
    """

    kind: str  # "command" or "result"
    app_version: str
    token: str
    command_type: str
    request_id: int | None
    body: Any
    problem: str | None = None
    reason: str | None = None

    @property
    def observe(self) -> bool | None:
        """A command request's ``observe`` flag (None when absent)."""
        if isinstance(self.body, dict):
            value = self.body.get("observe")
            if isinstance(value, bool):
                return value
        return None


def request_id(level: str) -> int | None:
    """The request id a topic level stands for: a positive decimal integer, else None."""
    if not level.isascii() or not level.isdigit():
        return None
    value = int(level)
    return value if value > 0 else None


def reply_topic(request_topic: str, ok: bool) -> str:
    """Where the answer to a request with a request id goes."""
    return f"{request_topic}/{STATUS if ok else ERROR}"


def push_topic(app_version: str, token: str, command_type: str) -> str:
    """Where new commands of a type are pushed to an endpoint's clients."""
    return f"kp1/{app_version}/cex/{token}/command/{command_type}/{STATUS}"


def encode_commands(commands: list[tuple[int, str | None]]) -> bytes:
    """``[{"id", "payload"}]`` from (Kaa id, params JSON); params are inserted as they are (canonical JSON)."""
    return ("[" + ",".join(f'{{"id":{kaa_id},"payload":{params or "{}"}}}' for kaa_id, params in commands) + "]").encode()


def encode_error(status_code: int, reason_phrase: str) -> bytes:
    """The KP1 error body."""
    return json.dumps({"statusCode": status_code, "reasonPhrase": reason_phrase}, ensure_ascii=False).encode()


def _decoder(kind: str) -> Any:
    def decode(captured: Mapping[str, str], payload: bytes) -> KaaRequest:
        rid: int | None = None
        if "rid" in captured:
            rid = request_id(captured["rid"])
            if rid is None:
                # ".../command/reboot/status" and the like are answers, not requests: never answered.
                raise DecodeError("kaa_not_a_request", f"{captured['rid']!r} is not a request id")
        body: Any = None
        problem: str | None = None
        reason: str | None = None
        if kind == COMMAND_KIND and not payload.strip():
            body = {}  # "the object may be empty": an empty payload is read as {}
        else:
            try:
                # A result array holds objects whose "payload" is two levels down (checked again per item).
                body = jsonvalue.loads(payload, jsonvalue.MAX_DEPTH + 2)
            except jsonvalue.JsonProblem as exc:
                problem, reason = f"{exc.reason}: {exc}", exc.reason
        if problem is None and kind == COMMAND_KIND:
            if not isinstance(body, dict):
                problem = "a command request is a JSON object"
            elif "observe" in body and not isinstance(body["observe"], bool):
                problem = "observe must be true or false"
        if problem is not None:
            body = None
        return KaaRequest(kind, captured["av"], captured["token"], captured["type"], rid, body, problem, reason)

    return decode


decode_command = _decoder(COMMAND_KIND)
decode_result = _decoder(RESULT_KIND)

RULES = (
    Rule("kaa.command", COMMAND, decode_command, KaaAction.COMMAND),
    Rule("kaa.command", COMMAND_RID, decode_command, KaaAction.COMMAND),
    Rule("kaa.result", RESULT, decode_result, KaaAction.RESULT),
    Rule("kaa.result", RESULT_RID, decode_result, KaaAction.RESULT),
)

# The device topics are scoped by the endpoint token, not by the client id: see KaaAcl.
DIALECT = Dialect(name="kaa", rules=RULES, device_publish=(), device_subscribe=())


# ---- ACL --------------------------------------------------------------------------------------


class Endpoint(Protocol):
    """What the ACL needs of a registered endpoint."""

    @property
    def thing_id(self) -> str:
        """The endpoint's thing."""


class EndpointLookup(Protocol):
    """The registry, as far as the ACL is concerned."""

    def kaa_endpoint(self, app_version: str, endpoint_token: str) -> Endpoint | None:
        """The endpoint an (application version, token) pair names, None when unknown."""


def _plain(level: str) -> bool:
    return bool(level) and "+" not in level and "#" not in level and "\x00" not in level


class KaaAcl:
    """Kaa topics a client may use: the ``cex`` and ``dcx`` topics of registered endpoints.

    ``owner`` None means "any registered endpoint" (a client that connected without MQTT
    credentials, its credential being the token in the topic); otherwise only the endpoint
    that is the thing ``owner`` (a client that authenticated as that thing).

    Publish: ``kp1/{av}/cex/{token}/command|result/{type}[/{rid}]`` (``rid`` a positive integer, so
    a device can never publish on a ``/status`` or ``/error`` answer topic), and any
    ``kp1/{av}/dcx/{token}/...`` data topic. Subscribe: any filter below ``kp1/{av}/cex/{token}/``
    or ``kp1/{av}/dcx/{token}/``; ``+`` (whole levels) and a final ``#`` are allowed there, never
    in the application version or token levels.

    An unknown token, or the token of another application version, is denied here: the publish is
    dropped (counted as ``dropped.acl``) and not answered, the subscription gets 0x80. The control
    plane's 401 on ``/error`` is only reached when a token is revoked between this check and the
    processing of the request.
    """

    def __init__(self, endpoints: EndpointLookup) -> None:
        self._endpoints = endpoints

    def _endpoint_ok(self, app_version: str, token: str, owner: str | None) -> bool:
        if not (_plain(app_version) and _plain(token)):
            return False
        endpoint = self._endpoints.kaa_endpoint(app_version, token)
        return endpoint is not None and (owner is None or endpoint.thing_id == owner)

    def may_publish(self, topic: str, owner: str | None) -> bool:
        """Whether a client may publish to ``topic`` (a topic name)."""
        levels = topic.split("/")
        if len(levels) < 5 or levels[0] != "kp1" or levels[2] not in (CEX, DCX):
            return False
        rest = levels[4:]
        if levels[2] == CEX:
            if rest[0] not in (COMMAND_KIND, RESULT_KIND) or len(rest) not in (2, 3) or not rest[1]:
                return False
            if len(rest) == 3 and request_id(rest[2]) is None:
                return False
        elif not all(rest):
            return False
        return self._endpoint_ok(levels[1], levels[3], owner)

    def may_subscribe(self, topic_filter: str, owner: str | None) -> bool:
        """Whether a client may subscribe with ``topic_filter``."""
        levels = topic_filter.split("/")
        if len(levels) < 5 or levels[0] != "kp1" or levels[2] not in (CEX, DCX):
            return False
        for i, level in enumerate(levels[4:], start=4):
            if level in ("+", "#"):
                if level == "#" and i != len(levels) - 1:
                    return False
            elif not _plain(level):
                return False
        return self._endpoint_ok(levels[1], levels[3], owner)

    @staticmethod
    def endpoint_of(topic_or_filter: str) -> tuple[str, str] | None:
        """(application version, token) of a ``cex`` topic or filter, None for anything else."""
        levels = topic_or_filter.split("/")
        if len(levels) < 5 or levels[0] != "kp1" or levels[2] != CEX:
            return None
        if not (_plain(levels[1]) and _plain(levels[3])):
            return None
        return levels[1], levels[3]
