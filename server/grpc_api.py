"""The gRPC surface: ``fleetcmd.v1.CommandService`` plus health checking and reflection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import convert
from server.apikeys import ApiKeys
from server.commands import CommandCore
from server.errors import InvalidArgument
from server.grpc_auth import AuthInterceptor
from server.grpc_errors import maps_errors
from server.models import EventFilter
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc
from server.registry import Registry
from server.registry_api import ThingServicer, ThingTypeServicer
from server.validation import check_wait, validate_send

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CommandService"].full_name
SERVICE_NAMES = (
    SERVICE_NAME,
    rpb.DESCRIPTOR.services_by_name["ThingService"].full_name,
    rpb.DESCRIPTOR.services_by_name["ThingTypeService"].full_name,
)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_SEQUENCE = 2**63 - 1  # the event log's sequence is a SQLite INTEGER


class CommandServicer(pb_grpc.CommandServiceServicer):
    """Implements ``CommandService`` on top of :class:`~server.commands.CommandCore`."""

    def __init__(self, core: CommandCore) -> None:
        self._core = core

    @maps_errors
    async def Send(self, request: pb.SendRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Execution:  # noqa: N802
        """See the proto."""
        wait = check_wait(request.wait_seconds)
        cmd = validate_send(
            self._core.settings,
            thing_id=request.thing_id,
            action=request.action,
            params=convert.struct_to_dict(request.params) if request.HasField("params") else None,
            ttl_seconds=request.ttl_seconds,
            idempotency_key=request.idempotency_key,
        )
        execution = await self._core.send(cmd)
        return convert.execution(await self._core.wait(execution, wait))

    @maps_errors
    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Execution:  # noqa: N802
        """See the proto."""
        return convert.execution(await self._core.get(request.execution_id))

    @maps_errors
    async def List(self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListResponse:  # noqa: N802
        """See the proto."""
        page = await self._core.list_executions(convert.list_query(request))
        return pb.ListResponse(
            executions=[convert.execution(e) for e in page.executions],
            next_page_token=convert.page_token(request, page.next_before_index),
        )

    @maps_errors
    async def Stream(  # noqa: N802
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ExecutionEvent]:
        """See the proto."""
        flt = EventFilter(thing_id=request.thing_id, execution_id=request.execution_id, action=request.action)
        after = request.after_sequence if request.HasField("after_sequence") else None
        if after is not None and after > MAX_SEQUENCE:
            raise InvalidArgument.single("after_sequence", f"after_sequence must be at most {MAX_SEQUENCE}")
        async for change in self._core.stream(flt, after):
            yield convert.event(change)

    @maps_errors
    async def Rerun(self, request: pb.RerunRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Execution:  # noqa: N802
        """See the proto."""
        wait = check_wait(request.wait_seconds)
        execution = await self._core.rerun(request.execution_id)
        return convert.execution(await self._core.wait(execution, wait))

    @maps_errors
    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Execution:  # noqa: N802
        """See the proto."""
        return convert.execution(await self._core.cancel(request.execution_id))


class GrpcServer:
    """The grpc.aio server with every fleetcmd service, health and reflection."""

    def __init__(self, core: CommandCore, registry: Registry, keys: ApiKeys) -> None:
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(keys)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_CommandServiceServicer_to_server(CommandServicer(core), self.server)
        rpb_grpc.add_ThingServiceServicer_to_server(ThingServicer(registry), self.server)
        rpb_grpc.add_ThingTypeServiceServicer_to_server(ThingTypeServicer(registry, core.settings), self.server)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )

    async def start(self, bind: str, port: int, *, tls: tuple[bytes, bytes] | None = None) -> int:
        """Listen and start serving; returns the bound port.

        Args:
            bind: Address to listen on.
            port: Port (0 = any free port).
            tls: PEM (private key, certificate chain) to serve with TLS instead of plaintext.
        """
        address = f"{bind}:{port}"
        if tls is not None:
            bound = self.server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        else:
            bound = self.server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot bind gRPC to {bind}:{port}")
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for up to ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
