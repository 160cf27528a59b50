"""EMQX's event messages: presence (connect, disconnect) and a device's PUBACK, decoded strictly.

EMQX publishes them when a rule republishes its events (docs/external-broker.md shows the rule):

* ``$events/client_connected``: ``{"clientid", "peername": "ip:port", ...}``;
* ``$events/client_disconnected``: ``{"clientid", "reason", ...}``;
* ``$events/message_acked``: ``{"clientid" (the receiver), "topic", "pub_props": {"User-Property": {...}}, ...}``:
  the request's ``fleetcmd-execution`` user property names the execution the device acknowledged.

A broker without them (mosquitto) never publishes these topics: presence stays unknown and
executions go SENT -> final. Everything here is input from the network: bounded (the payload size
was checked before), strict JSON, a client id that is one topic level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker_hooks import jsonvalue
from broker_hooks.rules import DecodeError
from broker_hooks.topics import level_problem

PREFIX = "$events/"
CONNECTED = "$events/client_connected"
DISCONNECTED = "$events/client_disconnected"
ACKED = "$events/message_acked"
TOPICS = (CONNECTED, DISCONNECTED, ACKED)
# The user property every request carries: the execution it delivers (read back from message_acked).
EXECUTION_PROPERTY = "fleetcmd-execution"
# An event is a flat object with one nested level (pub_props, then User-Property).
MAX_EVENT_DEPTH = 4
MAX_PEER_LENGTH = 256
MAX_EXECUTION_ID_LENGTH = 64


@dataclass(frozen=True)
class Presence:
    """A client connected (``online``) or disconnected."""

    client_id: str
    online: bool
    remote_address: str = ""


@dataclass(frozen=True)
class Acked:
    """A device PUBACKed the request of ``execution_id``."""

    client_id: str
    execution_id: str


def _object(payload: bytes) -> dict[str, Any]:
    try:
        body = jsonvalue.loads(payload, MAX_EVENT_DEPTH)
    except jsonvalue.JsonProblem as exc:
        raise DecodeError(exc.reason, str(exc)) from None
    if not isinstance(body, dict):
        raise DecodeError("not_an_object", f"event payload is a JSON {type(body).__name__}")
    return body


def _client_id(body: Mapping[str, Any]) -> str:
    client_id = body.get("clientid")
    if not isinstance(client_id, str) or level_problem(client_id) is not None:
        raise DecodeError("invalid_event", "clientid must be a client id (one topic level)")
    return client_id


def _execution_id(pub_props: Any) -> str | None:
    # EMQX renders User-Property as an object; a list of [key, value] pairs is read too.
    if not isinstance(pub_props, dict):
        return None
    props = pub_props.get("User-Property")
    pairs = props.items() if isinstance(props, dict) else props if isinstance(props, list) else ()
    for pair in pairs:
        if isinstance(pair, (tuple, list)) and len(pair) == 2 and pair[0] == EXECUTION_PROPERTY:
            value = pair[1]
            if isinstance(value, str) and 0 < len(value) <= MAX_EXECUTION_ID_LENGTH:
                return value
    return None


def decode(topic: str, payload: bytes) -> Presence | Acked | None:
    """Decode one event message; None for an acknowledgement of something that is not a request of ours.

    Raises:
        DecodeError: not strict bounded JSON, not an object, or no usable ``clientid``.
    """
    body = _object(payload)
    client_id = _client_id(body)
    if topic == ACKED:
        execution_id = _execution_id(body.get("pub_props"))
        return None if execution_id is None else Acked(client_id, execution_id)
    if topic == CONNECTED:
        peer = body.get("peername", "")
        return Presence(client_id, True, peer if isinstance(peer, str) and len(peer) <= MAX_PEER_LENGTH else "")
    return Presence(client_id, False)
