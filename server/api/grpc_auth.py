"""Bearer API keys on every gRPC method except health checking and reflection.

Each method is an operation of :mod:`server.core.authz`, which says the role it needs (the same
table the REST routes use).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.core.apikeys import ApiKeys, Role
from server.core.authz import Operation, required_role

PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_COMMANDS = "/fleetcmd.v1.CommandService/"
_THINGS = "/fleetcmd.v1.ThingService/"
_TYPES = "/fleetcmd.v1.ThingTypeService/"
_JOBS = "/fleetcmd.v1.JobService/"

# The operation each method is; the role it needs is the operation's (server.core.authz). Every
# method of the fleetcmd services is listed (tests/test_surfaces.py checks it against the protos).
METHOD_OPERATION: dict[str, Operation] = {
    _COMMANDS + "Send": Operation.SEND,
    _COMMANDS + "SendStream": Operation.SEND,
    _COMMANDS + "Get": Operation.GET,
    _COMMANDS + "List": Operation.LIST,
    _COMMANDS + "Stream": Operation.STREAM,
    _COMMANDS + "StreamBatches": Operation.STREAM,
    _COMMANDS + "Cancel": Operation.CANCEL,
    _COMMANDS + "Rerun": Operation.RERUN,
    _THINGS + "CreateThing": Operation.MANAGE_THINGS,
    _THINGS + "GetThing": Operation.READ_THINGS,
    _THINGS + "ListThings": Operation.READ_THINGS,
    _THINGS + "UpdateThing": Operation.MANAGE_THINGS,
    _THINGS + "DeleteThing": Operation.MANAGE_THINGS,
    _THINGS + "RotateCredentials": Operation.MANAGE_THINGS,
    _THINGS + "WatchPresence": Operation.WATCH_PRESENCE,
    _TYPES + "PutThingType": Operation.MANAGE_THING_TYPES,
    _TYPES + "GetThingType": Operation.READ_THING_TYPES,
    _TYPES + "ListThingTypes": Operation.READ_THING_TYPES,
    _TYPES + "DeleteThingType": Operation.MANAGE_THING_TYPES,
    _JOBS + "CreateJob": Operation.MANAGE_JOBS,
    _JOBS + "GetJob": Operation.READ_JOBS,
    _JOBS + "ListJobs": Operation.READ_JOBS,
    _JOBS + "PauseJob": Operation.MANAGE_JOBS,
    _JOBS + "ResumeJob": Operation.MANAGE_JOBS,
    _JOBS + "CancelJob": Operation.MANAGE_JOBS,
    _JOBS + "RerunFailed": Operation.MANAGE_JOBS,
    _JOBS + "WatchJob": Operation.READ_JOBS,
}
# Resolved once: the interceptor runs on every call.
_METHOD_ROLE: dict[str, Role] = {method: required_role(operation) for method, operation in METHOD_OPERATION.items()}
_UNNAMED_ROLE = required_role(None)


def bearer(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer ...`` header, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def _deny(handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    # The refusal must have the method's own shape: grpc calls a handler by the kind it is registered as.
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """UNAUTHENTICATED without a valid key, PERMISSION_DENIED when its role is too weak."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Check the caller's key before the method runs."""
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        principal = await self._keys.authenticate(token) if token else None
        if principal is None:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required (authorization: Bearer ...)")
        needed = _METHOD_ROLE.get(method, _UNNAMED_ROLE)
        if principal.role < needed:
            return _deny(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs the {needed.name.lower()} role; key {principal.key_id} is {principal.role.name.lower()}",
            )
        return handler
