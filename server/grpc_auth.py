"""Bearer API keys on every gRPC method except health checking and reflection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.apikeys import ApiKeys, Role

PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# The least role each method needs; a method missing here needs ADMIN.
REQUIRED_ROLE: dict[str, Role] = {
    "/fleetcmd.v1.CommandService/Send": Role.OPERATOR,
    "/fleetcmd.v1.CommandService/SendStream": Role.OPERATOR,
    "/fleetcmd.v1.CommandService/Cancel": Role.OPERATOR,
    "/fleetcmd.v1.CommandService/Rerun": Role.OPERATOR,
    "/fleetcmd.v1.CommandService/Get": Role.VIEWER,
    "/fleetcmd.v1.CommandService/List": Role.VIEWER,
    "/fleetcmd.v1.CommandService/Stream": Role.VIEWER,
    "/fleetcmd.v1.CommandService/StreamBatches": Role.VIEWER,
    "/fleetcmd.v1.ThingService/GetThing": Role.VIEWER,
    "/fleetcmd.v1.ThingService/ListThings": Role.VIEWER,
    "/fleetcmd.v1.ThingService/WatchPresence": Role.VIEWER,
    "/fleetcmd.v1.ThingTypeService/GetThingType": Role.VIEWER,
    "/fleetcmd.v1.ThingTypeService/ListThingTypes": Role.VIEWER,
}


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
        needed = REQUIRED_ROLE.get(method, Role.ADMIN)
        if principal.role < needed:
            return _deny(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs the {needed.name.lower()} role; key {principal.key_id} is {principal.role.name.lower()}",
            )
        return handler
