"""The one place where fleetcmd errors become gRPC statuses.

Every status is bounded: an error message echoes what the caller sent (an action name,
an id, a schema problem), and gRPC carries the message and the details in response
metadata, which a client refuses past its limit (8 KiB by default: the caller would see
RESOURCE_EXHAUSTED instead of the error). So the message, each field violation and all
of them together are clipped (:func:`clip`) to sizes that stay under 4 KiB of metadata
even with every character percent-encoded.

A request that protobuf cannot decode (invalid UTF-8 in a string, a corrupt wire format,
messages nested deeper than protobuf's recursion limit) is INVALID_ARGUMENT, not the
UNKNOWN grpc gives when a deserializer raises: :func:`guard_handler` gives every method a
deserializer that returns an :class:`Undecodable` marker instead, which the method's
wrapper turns into the status.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FleetcmdError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ThingMismatch,
    Unavailable,
)
from server.pb import commands_pb2 as pb

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

MAX_MESSAGE_BYTES = 512  # the status message (sent twice: grpc-message and inside the details)
MAX_FIELD_BYTES = 128  # one violation's field
MAX_DESCRIPTION_BYTES = 256  # one violation's description
MAX_VIOLATIONS_BYTES = 1536  # every violation's field and description together

_CODES: list[tuple[type[FleetcmdError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ThingMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def grpc_code(exc: FleetcmdError) -> grpc.StatusCode:
    """The status code for a domain error."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (ending in "..." when cut)."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw.decode()
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def _violations(exc: FleetcmdError) -> list[tuple[str, str]]:
    """The field violations of ``exc``, clipped one by one, as many as fit together."""
    if not isinstance(exc, InvalidArgument):
        return []
    out: list[tuple[str, str]] = []
    total = 0
    for v in exc.violations:
        field, description = clip(v.field, MAX_FIELD_BYTES), clip(v.description, MAX_DESCRIPTION_BYTES)
        total += len(field.encode()) + len(description.encode())
        if total > MAX_VIOLATIONS_BYTES:
            break
        out.append((field, description))
    return out


def to_status(exc: FleetcmdError) -> grpc.Status:
    """A rich, bounded status; INVALID_ARGUMENT carries ``google.rpc.BadRequest`` field violations."""
    code = grpc_code(exc)
    details = []
    if isinstance(exc, InvalidArgument):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in _violations(exc)
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=clip(str(exc), MAX_MESSAGE_BYTES), details=details)
    return rpc_status.to_status(status)


def to_error(exc: FleetcmdError) -> pb.Error:
    """The status :func:`to_status` gives, as a ``fleetcmd.v1.Error`` (one failed item of a SendStream).

    The code is the number of the one :func:`grpc_code` gives, so an item fails
    exactly as the unary call would have (and is bounded the same way).
    """
    code: int = grpc_code(exc).value[0]
    error = pb.Error(code=code, message=clip(str(exc), MAX_MESSAGE_BYTES))
    error.violations.extend(pb.FieldViolation(field=field, description=description) for field, description in _violations(exc))
    return error


def internal_error() -> pb.Error:
    """An item that failed with an unexpected exception: INTERNAL, with no detail (the log has it)."""
    return pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")


class Undecodable:
    """What a guarded deserializer returns for bytes that are not a valid request."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> InvalidArgument:
        """The error the call fails with."""
        return InvalidArgument.single("request", f"cannot decode the request: {self.reason}")


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def guarded(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except (message.DecodeError, RecursionError) as exc:
            return Undecodable(str(exc))

    return guarded


# Set on a method that checks for Undecodable itself (maps_errors, SendStream): no extra wrapper.
CHECKS_UNDECODABLE = "_fleetcmd_checks_undecodable"


def checks_undecodable(method: F) -> F:
    """Mark ``method`` as turning an :class:`Undecodable` request into its status itself."""
    setattr(method, CHECKS_UNDECODABLE, True)
    return method


async def _abort_undecodable(request: Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort_with_status(to_status(request.error()))  # type: ignore[attr-defined]


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is Undecodable:
            await _abort_undecodable(request, context)
        yield request


def _guard_behavior(behavior: Callable[..., Any], streaming_requests: bool) -> Callable[..., Any]:
    """``behavior`` aborting with INVALID_ARGUMENT on an undecodable request (or request item)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if streaming_requests:
                request = _checked(request, context)
            elif type(request) is Undecodable:
                await _abort_undecodable(request, context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if streaming_requests:
            request = _checked(request, context)
        elif type(request) is Undecodable:
            await _abort_undecodable(request, context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


def guard_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with undecodable requests answered INVALID_ARGUMENT (see the module)."""
    if handler.request_deserializer is None:
        return handler  # the method takes raw bytes: nothing to decode
    kw = {
        "request_deserializer": _safe_deserializer(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    for kind, factory in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behavior = getattr(handler, kind)
        if behavior is not None:
            if not getattr(behavior, CHECKS_UNDECODABLE, False):
                behavior = _guard_behavior(behavior, handler.request_streaming)
            return factory(behavior, **kw)
    return handler


def maps_errors(method: F) -> F:
    """Decorate a servicer method (unary or server-streaming) so domain errors abort with their status.

    An :class:`Undecodable` request aborts the same way, with INVALID_ARGUMENT. The call's duration
    is observed in the servicer's ``call_timer`` (a :class:`server.api.grpc_metrics.CallTimer`, or None).
    """
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started, code = time.perf_counter(), "OK"
            try:
                if type(request) is Undecodable:
                    raise request.error()
                async for item in method(self, request, context):
                    yield item
            except FleetcmdError as exc:
                code = grpc_code(exc).name
                await context.abort_with_status(to_status(exc))  # type: ignore[attr-defined]
            except BaseException as exc:
                code = ended_code(context, exc)
                raise
            finally:
                timer = self.call_timer
                if timer is not None:
                    timer.observe(name, code, started)

        return checks_undecodable(cast(F, stream_wrapper))

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started, code = time.perf_counter(), "OK"
        try:
            if type(request) is Undecodable:
                raise request.error()
            return await method(self, request, context)
        except FleetcmdError as exc:
            code = grpc_code(exc).name
            await context.abort_with_status(to_status(exc))  # type: ignore[attr-defined]
        except BaseException as exc:
            code = ended_code(context, exc)
            raise
        finally:
            timer = self.call_timer
            if timer is not None:
                timer.observe(name, code, started)

    return checks_undecodable(cast(F, unary_wrapper))


def ended_code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> str:
    """The status name of a call that ended with ``exc`` (not a domain error): what the method aborted with, else why."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    for known in grpc.StatusCode:  # grpc.aio may keep the numeric code
        if known.value[0] == code:
            return str(known.name)
    return "UNKNOWN"
