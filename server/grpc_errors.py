"""The one place where fleetcmd errors become gRPC statuses."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import (
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


def to_status(exc: FleetcmdError) -> grpc.Status:
    """A rich status; INVALID_ARGUMENT carries ``google.rpc.BadRequest`` field violations."""
    code = grpc_code(exc)
    details = []
    if isinstance(exc, InvalidArgument):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in exc.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(exc), details=details)
    return rpc_status.to_status(status)


def to_error(exc: FleetcmdError) -> pb.Error:
    """The status :func:`to_status` gives, as a ``fleetcmd.v1.Error`` (one failed item of a SendStream).

    The code is the number of the one :func:`grpc_code` gives, so an item fails
    exactly as the unary call would have.
    """
    code: int = grpc_code(exc).value[0]
    error = pb.Error(code=code, message=str(exc))
    if isinstance(exc, InvalidArgument):
        error.violations.extend(pb.FieldViolation(field=v.field, description=v.description) for v in exc.violations)
    return error


def internal_error() -> pb.Error:
    """An item that failed with an unexpected exception: INTERNAL, with no detail (the log has it)."""
    return pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")


F = TypeVar("F", bound=Callable[..., Any])


def maps_errors(method: F) -> F:
    """Decorate a servicer method (unary or server-streaming) so domain errors abort with their status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except FleetcmdError as exc:
                await context.abort_with_status(to_status(exc))  # type: ignore[attr-defined]

        return cast(F, stream_wrapper)

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except FleetcmdError as exc:
            await context.abort_with_status(to_status(exc))  # type: ignore[attr-defined]

    return cast(F, unary_wrapper)
