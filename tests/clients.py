"""gRPC clients for tests: channels that present an API key."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from server.app import FleetcmdApp
from server.core.apikeys import ADMIN_KEY_FILE
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc


def admin_key(data_dir: Path) -> str:
    """The admin key the service wrote on first start."""
    return (data_dir / ADMIN_KEY_FILE).read_text().strip()


class _Bearer:
    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


# grpc.aio files an interceptor under the first kind it is an instance of, so one class per kind.
class BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <key>`` to unary calls."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <key>`` to server-streaming calls."""

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class BearerBidi(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <key>`` to bidirectional-streaming calls (SendStream)."""

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def channel(target: str, key: str | None, options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """An insecure channel to ``target`` that presents ``key`` (None: no key)."""
    interceptors = [BearerUnary(key), BearerStream(key), BearerBidi(key)] if key else None
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def app_channel(app: FleetcmdApp, options: Sequence[tuple[str, Any]] | None = None, key: str | None = None) -> grpc.aio.Channel:
    """A channel to an in-process service with its admin key (or ``key``)."""
    assert app.ports is not None
    return channel(f"127.0.0.1:{app.ports.grpc}", key or admin_key(app.settings.data_dir), options)


async def list_all(stub: pb_grpc.CommandServiceStub, timeout: float = 30) -> list[pb.Execution]:
    """Every execution, page by page (newest first)."""
    out: list[pb.Execution] = []
    token = ""
    while True:
        resp = await stub.List(pb.ListRequest(page_size=1000, page_token=token), timeout=timeout)
        out.extend(resp.executions)
        token = resp.next_page_token
        if not token:
            return out


async def get_all(stub: pb_grpc.CommandServiceStub, ids: Iterable[str], timeout: float = 30) -> dict[str, pb.Execution]:
    """Each execution with its history, by id (200 Gets in flight at most)."""
    ids = list(ids)
    got: dict[str, pb.Execution] = {}
    for start in range(0, len(ids), 200):
        chunk = ids[start : start + 200]
        answers = await asyncio.gather(*(stub.Get(pb.GetRequest(execution_id=i), timeout=timeout) for i in chunk))
        got.update(zip(chunk, answers, strict=True))
    return got
