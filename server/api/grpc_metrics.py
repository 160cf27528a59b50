"""gRPC call duration by method and status code (``fleetcmd_grpc_request_seconds``).

A server interceptor wraps each known method's behaviour in a timer: one
``perf_counter`` pair and one histogram observation per call, no extra task.
Unknown methods are not wrapped (gRPC answers UNIMPLEMENTED), so the ``method``
label only takes the names of registered methods.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.core.metrics import ServiceMetrics


def _code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    code: Any = context.code()
    if code is None:
        return "OK" if exc is None or isinstance(exc, StopAsyncIteration) else "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    # grpc.aio may keep the numeric code.
    for known in grpc.StatusCode:
        if known.value[0] == code:
            return str(known.name)
    return str(code)


class TimingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Observe every call's duration in ``metrics.grpc_duration`` (outermost: denied calls count too)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._histogram = metrics.grpc_duration

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The method's handler with its behaviour timed."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))  # type: ignore[attr-defined,no-any-return]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method))  # type: ignore[attr-defined,no-any-return]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream, method))  # type: ignore[attr-defined,no-any-return]
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._streaming(handler.stream_stream, method))  # type: ignore[attr-defined,no-any-return]
        return handler

    def _observe(self, method: str, code: str, started: float) -> None:
        self._histogram.labels(method, code).observe(time.perf_counter() - started)

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Awaitable[Any]]:
        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                self._observe(method, _code(context, exc), started)
                raise
            self._observe(method, _code(context, None), started)
            return response

        return timed

    def _streaming(self, behavior: Callable[..., Any], method: str) -> Callable[..., AsyncIterator[Any]]:
        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):  # a behaviour that writes through context.write
                    await result
                else:
                    async for item in result:
                        yield item
            except BaseException as exc:
                self._observe(method, _code(context, exc), started)
                raise
            self._observe(method, _code(context, None), started)

        return timed
