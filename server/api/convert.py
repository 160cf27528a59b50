"""Conversions between fleetcmd's records and ``fleetcmd.v1`` protobuf messages."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from broker_hooks import jsonvalue
from server.api import pagination
from server.core.errors import InvalidArgument
from server.core.lifecycle import Status
from server.core.models import Execution, Reason, StateChange
from server.pb import commands_pb2 as pb

log = logging.getLogger(__name__)


def timestamp(ms: int | None) -> timestamp_pb2.Timestamp | None:
    """Milliseconds since the epoch as a protobuf Timestamp (None stays unset)."""
    if ms is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def _fill_value(value: struct_pb2.Value, data: Any) -> struct_pb2.Value:
    # json.loads + the C-implemented Struct/ListValue updates: about twice as fast as json_format.Parse.
    # SetInParent first: an empty object or list must still set the Value's kind (else it reads as null).
    if isinstance(data, dict):
        value.struct_value.SetInParent()
        value.struct_value.update(data)
    elif isinstance(data, list):
        value.list_value.SetInParent()
        value.list_value.extend(data)
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, (int, float)):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    else:
        value.null_value = struct_pb2.NULL_VALUE
    return value


# The key of the one field of a Struct standing for stored params the rules now refuse.
UNREADABLE_KEY = "$unrepresentable_json"


def _value(json_text: str | None) -> struct_pb2.Value | None:
    """Stored JSON text (any JSON value) as a protobuf Value (None stays unset)."""
    if json_text is None:
        return None
    return _fill_value(struct_pb2.Value(), jsonvalue.stored(json_text))


def _struct(json_text: str | None) -> struct_pb2.Struct | None:
    """Stored JSON object text as a protobuf Struct (None stays unset); see :func:`broker_hooks.jsonvalue.stored`.

    Stored params the rules refuse come as ``{"$unrepresentable_json": text}``: a Struct holds no bare string.
    """
    if json_text is None:
        return None
    if json_text == "{}":  # no params (the usual case): nothing to parse
        return struct_pb2.Struct()
    data = jsonvalue.stored(json_text)
    st = struct_pb2.Struct()
    st.update(data if isinstance(data, dict) else {UNREADABLE_KEY: json_text})
    return st


def _reason(reason: Reason | None) -> pb.StatusReason | None:
    if reason is None:
        return None
    return pb.StatusReason(reason_code=reason.code, reason_description=reason.description)


def integral(value: Any) -> Any:
    """JSON data with integral doubles (how Struct stores every number) as ints again."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= jsonvalue.MAX_SAFE_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def _plain_value(value: struct_pb2.Value, budget: int, path: tuple[str | int, ...]) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _plain_struct(value.struct_value, budget, path)
    if kind == "list_value":
        if budget <= 0:
            raise jsonvalue.JsonProblem(jsonvalue.TOO_DEEP, f"nested deeper than {jsonvalue.MAX_DEPTH} levels", path)
        return [_plain_value(v, budget - 1, (*path, i)) for i, v in enumerate(value.list_value.values)]
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise jsonvalue.JsonProblem(jsonvalue.NOT_FINITE, f"{number} is not a finite number", path)
        # Struct stores every number as a double; integral values become ints again.
        return int(number) if number.is_integer() and abs(number) <= jsonvalue.MAX_SAFE_INTEGER else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "null_value":
        return None
    raise jsonvalue.JsonProblem(jsonvalue.NOT_JSON, "a Value with no kind set is not a JSON value", path)


def _plain_struct(st: struct_pb2.Struct, budget: int, path: tuple[str | int, ...]) -> dict[str, Any]:
    if budget <= 0:
        raise jsonvalue.JsonProblem(jsonvalue.TOO_DEEP, f"nested deeper than {jsonvalue.MAX_DEPTH} levels", path)
    return {k: _plain_value(v, budget - 1, (*path, k)) for k, v in st.fields.items()}


def struct_to_dict(st: struct_pb2.Struct, field: str = "params") -> dict[str, Any]:
    """A protobuf Struct as a plain dict, by the rules of :mod:`broker_hooks.jsonvalue`.

    Struct stores every number as a double; integral values become ints again so
    a device sees ``{"value": 24}``, as the operator wrote it, not ``24.0``.

    Raises:
        InvalidArgument: naming ``field`` (the path in the description): the Struct holds something JSON cannot
            (NaN, Infinity, a Value with no kind set) or is nested deeper than ``MAX_DEPTH``.
    """
    try:
        return _plain_struct(st, jsonvalue.MAX_DEPTH, ())
    except jsonvalue.JsonProblem as exc:
        raise InvalidArgument.single(field, f"{exc.field(field)} is refused ({exc.reason}): {exc.detail}") from None


def _status(status: Status | None) -> int:
    return int(status) if status is not None else 0


def state_change(change: StateChange) -> pb.StateChange:
    """A history entry for ``Execution.history``."""
    return pb.StateChange(
        sequence=change.sequence,
        status=_status(change.status),  # type: ignore[arg-type]
        previous_status=_status(change.previous_status),  # type: ignore[arg-type]
        at=timestamp(change.at_ms),
        late=change.late,
        result=_value(change.result_json),
        status_reason=_reason(change.reason),
        note=change.note,
    )


def execution(e: Execution) -> pb.Execution:
    """An execution as the API shows it."""
    return pb.Execution(
        execution_id=e.execution_id,
        command_id=e.command_id,
        thing_id=e.thing_id,
        action=e.action,
        # No params were given: the device received {}, so the operator sees {} too.
        params=_struct(e.params_json or "{}"),
        ttl_seconds=e.ttl_seconds,
        status=int(e.status),  # type: ignore[arg-type]
        result=_value(e.result_json),
        status_reason=_reason(e.reason),
        created_at=timestamp(e.created_at_ms),
        updated_at=timestamp(e.updated_at_ms),
        completed_at=timestamp(e.completed_at_ms),
        expires_at=timestamp(e.expires_at_ms),
        idempotency_key=e.idempotency_key,
        history=[state_change(c) for c in e.history],
        thing_type=e.thing_type,
        result_violations=list(e.result_violations),
        rerun_of=e.rerun_of,
        reruns=list(e.reruns),
        kaa_command_id=e.kaa_id or 0,
        job_id=e.job_id,
        retry_of=e.retry_of,
    )


def event(change: StateChange) -> pb.ExecutionEvent:
    """A Stream event: an execution's state change, or a job event (``job`` set, execution fields empty)."""
    if change.job is not None:
        # Here, not at the top: convert_jobs imports this module (and job events are few).
        from server.api import convert_jobs

        return pb.ExecutionEvent(
            sequence=change.sequence, at=timestamp(change.at_ms), job_id=change.job_id, job=convert_jobs.job(change.job)
        )
    return pb.ExecutionEvent(
        sequence=change.sequence,
        execution_id=change.execution_id,
        thing_id=change.thing_id,
        action=change.action,
        status=_status(change.status),  # type: ignore[arg-type]
        previous_status=_status(change.previous_status),  # type: ignore[arg-type]
        at=timestamp(change.at_ms),
        late=change.late,
        result=_value(change.result_json),
        status_reason=_reason(change.reason),
        note=change.note,
        job_id=change.job_id,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The key of one ``EventBatch.events`` entry (field number, wire type 2 = length-delimited).
_EVENTS_KEY = _varint(pb.EventBatch.DESCRIPTOR.fields_by_name["events"].number << 3 | 2)


class EventWire:
    """Stream events serialized once, whoever sends them.

    A live event reaches every watcher as the same :class:`StateChange` object
    (the bus hands each subscriber the commit's own events), so its bytes are
    kept by that object's identity: 50 watchers cost one conversion and one
    serialization, not 50. An entry holds the object itself, so its ``id`` cannot
    be reused while the entry exists; the oldest entries go first.

    ``EventBatch`` has one field, ``repeated ExecutionEvent events = 1``, whose
    encoding is the concatenation of its entries (key, length, message): a batch
    is joined from the entries' bytes, exactly what ``SerializeToString`` gives.
    """

    def __init__(self, size: int = 8192) -> None:
        """Keep the bytes of up to ``size`` live events."""
        self._size = size
        self._entries: dict[int, tuple[StateChange, bytes, bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _encode(self, change: StateChange) -> tuple[StateChange, bytes, bytes]:
        message = event(change).SerializeToString()
        return change, message, _EVENTS_KEY + _varint(len(message)) + message

    def _entry(self, change: StateChange, shared: bool) -> tuple[StateChange, bytes, bytes]:
        if not shared:  # replayed for one caller: nobody else will ask, do not evict live entries for it
            return self._encode(change)
        entries = self._entries
        entry = entries.get(id(change))
        if entry is None or entry[0] is not change:
            entry = self._encode(change)
            entries[id(change)] = entry
            if len(entries) > self._size:
                del entries[next(iter(entries))]
        return entry

    def message(self, change: StateChange, shared: bool = True) -> bytes:
        """The serialized ``ExecutionEvent``.

        Args:
            change: The event.
            shared: Whether other watchers get this very object (a live event): keep its bytes.
        """
        return self._entry(change, shared)[1]

    def batches(self, changes: Sequence[StateChange], shared: bool = True, max_bytes: int = 1 << 20) -> list[bytes]:
        """The serialized ``EventBatch`` messages that carry ``changes``, in order.

        Args:
            changes: The events, in sequence order.
            shared: As for :meth:`message`.
            max_bytes: A new message starts before one would exceed this (an event larger
                than it travels alone): a burst of large device results stays far below
                the 4 MiB a gRPC client accepts by default.
        """
        out: list[bytes] = []
        parts: list[bytes] = []
        size = 0
        for change in changes:
            framed = self._entry(change, shared)[2]
            if parts and size + len(framed) > max_bytes:
                out.append(b"".join(parts))
                parts, size = [], 0
            parts.append(framed)
            size += len(framed)
        if parts:
            out.append(b"".join(parts))
        return out


# The keys of ``SendStreamResponse.request_id`` and ``SendStreamResponse.execution`` (wire type 2).
_RESPONSE_FIELDS = pb.SendStreamResponse.DESCRIPTOR.fields_by_name
_REQUEST_ID_KEY = _varint(_RESPONSE_FIELDS["request_id"].number << 3 | 2)
_EXECUTION_KEY = _varint(_RESPONSE_FIELDS["execution"].number << 3 | 2)


def _length_delimited(key: bytes, payload: bytes) -> bytes:
    return key + _varint(len(payload)) + payload


def send_stream_execution(request_id: str, e: Execution) -> bytes:
    """A serialized ``SendStreamResponse`` carrying an execution.

    Framed from the Execution's own bytes, as ``SerializeToString`` would write it:
    building the wrapper message would copy the whole Execution into it first.
    """
    body = _length_delimited(_EXECUTION_KEY, execution(e).SerializeToString())
    if not request_id:
        return body  # proto3 leaves an empty string out
    return _length_delimited(_REQUEST_ID_KEY, request_id.encode()) + body


def send_stream_error(request_id: str, error: pb.Error) -> bytes:
    """A serialized ``SendStreamResponse`` carrying an error."""
    return pb.SendStreamResponse(request_id=request_id, error=error).SerializeToString()


# ---- List pagination (the codec is server.api.pagination; these adapt a ListRequest to it) ----


def _millis(req: pb.ListRequest, field: Literal["created_after", "created_before"]) -> int | None:
    """A set created-at bound in milliseconds; out-of-range timestamps are the caller's error."""
    if not req.HasField(field):
        return None
    try:
        value: int = getattr(req, field).ToMilliseconds()
    except ValueError as exc:  # outside 0001-01-01..9999-12-31 or bad nanos
        raise InvalidArgument.single(field, f"{field} is not a valid timestamp: {exc}") from None
    return value


def list_filters(req: pb.ListRequest) -> pagination.ListFilters:
    """The filters of a ListRequest (the gRPC adapter of List).

    What :func:`server.api.pagination.list_query` validates and :func:`server.api.pagination.page_token`
    binds a token to.

    Raises:
        InvalidArgument: a created-at bound outside the Timestamp range (or, first, a bad
            status or page size, the faults a request with several of them always named).
    """
    try:
        after = _millis(req, "created_after")
        before = _millis(req, "created_before")
    except InvalidArgument:
        # Statuses and page size were always checked before the times: a request with several
        # faults keeps naming the same one (checked here only on this failing path).
        pagination.statuses(req.status)
        pagination.page_size(req.page_size)
        raise
    return pagination.ListFilters(
        thing_id=req.thing_id,
        action=req.action,
        statuses=tuple(req.status),
        created_after_ms=after,
        created_before_ms=before,
        page_size=req.page_size,
        page_token=req.page_token,
        job_id=req.job_id,
    )


def to_python(value: struct_pb2.Value | struct_pb2.Struct) -> Any:
    """A protobuf Value or Struct as plain JSON data (integral numbers as ints)."""
    return integral(json_format.MessageToDict(value))
