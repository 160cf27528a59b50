"""The gRPC surface: ``fleetcmd.v1.CommandService`` plus health checking and reflection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from server.api import convert, grpc_jobs, pagination
from server.api.grpc_auth import AuthInterceptor
from server.api.grpc_errors import (
    Undecodable,
    checks_undecodable,
    ended_code,
    grpc_code,
    guard_handler,
    internal_error,
    maps_errors,
    to_error,
    to_status,
)
from server.api.grpc_metrics import CallTimer
from server.api.registry_api import ThingServicer, ThingTypeServicer
from server.core.apikeys import ApiKeys
from server.core.commands import CommandCore
from server.core.errors import FleetcmdError, InvalidArgument
from server.core.job_runner import JobsCore
from server.core.metrics import PlainHistogram
from server.core.models import EventFilter, Execution
from server.core.registry import Registry
from server.core.validation import SendCommand, check_execution_id, check_wait, validate_send
from server.pb import commands_pb2 as pb
from server.pb import jobs_pb2_grpc as jpb_grpc
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CommandService"].full_name
SERVICE_NAMES = (
    SERVICE_NAME,
    rpb.DESCRIPTOR.services_by_name["ThingService"].full_name,
    rpb.DESCRIPTOR.services_by_name["ThingTypeService"].full_name,
)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_SEQUENCE = 2**63 - 1  # the event log's sequence is a SQLite INTEGER
# StreamBatches: after a live message of at least `min events` events (the watcher is busy), how long
# it lets further commits gather for the next one; a quiet stream never pauses, so a lone command's
# events are not held back. Each message costs the event loop tens of microseconds per watcher: with
# many watchers fewer, larger messages matter more than a few milliseconds of event age, with few the
# age matters more. Measured alternately: one SendStream caller did ~8 % more commands/s with 5 ms / 16
# than with 20 ms / 8 (bench/steady.py --mode stream); 50 watchers, ~17 % more with 20 ms / 8
# (bench/run.py --only fanout).
LINGER = (0.005, 16)  # (seconds, min events) while fewer than MANY_WATCHERS streams are open
LINGER_MANY = (0.02, 8)
MANY_WATCHERS = 8
# SendStream: items read and not answered yet, per call. At the bound the server stops reading the
# call, so HTTP/2 flow control holds the client back instead of the server buffering its requests.
SEND_STREAM_WINDOW = 256


class CommandServicer:
    """Implements ``CommandService`` on top of :class:`~server.core.commands.CommandCore`.

    Registered by :func:`command_service_handlers`, not by the generated
    ``add_CommandServiceServicer_to_server``: the streaming methods return bytes
    serialized once per event for every watcher (see :class:`~server.api.convert.EventWire`).
    """

    # Methods whose implementation yields serialized messages: registered without a serializer.
    PRESERIALIZED = frozenset({"Stream", "StreamBatches", "SendStream"})

    def __init__(self, core: CommandCore, call_timer: CallTimer | None = None) -> None:
        self._core = core
        # Observes each call's duration (maps_errors and SendStream), None: not observed.
        self.call_timer = call_timer
        # A watcher further behind than its buffer is cut off, so twice that many recent events cover every one still served.
        self._wire = convert.EventWire(max(8192, 2 * core.settings.stream_buffer))

    def _send_command(self, request: pb.SendRequest) -> tuple[SendCommand, int]:
        """The validated command and wait of a SendRequest (the same checks for Send and SendStream).

        Raises:
            InvalidArgument: a bad field.
        """
        wait = check_wait(request.wait_seconds)
        cmd = validate_send(
            self._core.settings,
            thing_id=request.thing_id,
            action=request.action,
            params=convert.struct_to_dict(request.params) if request.HasField("params") else None,
            ttl_seconds=request.ttl_seconds,
            idempotency_key=request.idempotency_key,
        )
        return cmd, wait

    async def _send(self, cmd: SendCommand, wait: int) -> Execution:
        execution = await self._core.send(cmd)
        return await self._core.wait(execution, wait) if wait else execution

    @maps_errors
    async def Send(self, request: pb.SendRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Execution:  # noqa: N802
        """See the proto."""
        cmd, wait = self._send_command(request)
        return convert.execution(await self._send(cmd, wait))

    async def _send_item(self, request_id: str, cmd: SendCommand, wait: int, answers: asyncio.Queue[bytes | None]) -> None:
        """One valid SendStream item: send (and wait), then queue its answer, whatever happens."""
        try:
            answer = convert.send_stream_execution(request_id, await self._send(cmd, wait))
        except FleetcmdError as exc:
            answer = convert.send_stream_error(request_id, to_error(exc))
        except Exception:
            # A bug, not the caller's error: this item fails as INTERNAL and the stream goes on.
            log.exception("SendStream item %r failed", request_id)
            answer = convert.send_stream_error(request_id, internal_error())
        answers.put_nowait(answer)

    # Not @maps_errors: every domain error is one item's answer, none ends the call, and each
    # answer would pass through one more generator. An undecodable item has no request_id to
    # answer: it ends the call with INVALID_ARGUMENT.
    @checks_undecodable
    async def SendStream(  # noqa: N802
        self, requests: AsyncIterator[pb.SendStreamRequest | Undecodable], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """See the proto; yields serialized ``SendStreamResponse`` messages (registered without a serializer).

        A reader task takes items while fewer than :data:`SEND_STREAM_WINDOW` are unanswered.
        An invalid item is answered at once; a valid one runs in a task of its own, because
        the commits of many items must overlap to share one group commit. This generator
        writes the answers in the order they are ready, and ends the call once the client
        has half-closed and every item it sent is answered.
        """
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the reader is done
        window = asyncio.Semaphore(SEND_STREAM_WINDOW)
        running: set[asyncio.Task[None]] = set()
        total: int | None = None  # items read, once the reader is done
        failure: BaseException | None = None

        async def read() -> None:
            nonlocal total, failure
            loop = asyncio.get_running_loop()
            items = aiter(requests)
            count = 0
            try:
                while True:
                    await window.acquire()  # before reading: a full window leaves the next item unread
                    try:
                        item = await anext(items)
                    except StopAsyncIteration:
                        break
                    count += 1
                    if isinstance(item, Undecodable):
                        raise item.error()
                    try:
                        cmd, wait = self._send_command(item.send)
                    except FleetcmdError as exc:
                        answers.put_nowait(convert.send_stream_error(item.request_id, to_error(exc)))
                        continue
                    task = loop.create_task(self._send_item(item.request_id, cmd, wait, answers))
                    running.add(task)
                    task.add_done_callback(running.discard)
                total = count
            except Exception as exc:  # noqa: BLE001 - re-raised by the writer, which owns the call
                failure = exc
            finally:
                answers.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        started, code = time.perf_counter(), "OK"
        try:
            written = 0
            while total is None or written < total:
                answer = await answers.get()
                if answer is None:
                    if isinstance(failure, FleetcmdError):
                        await context.abort_with_status(to_status(failure))  # type: ignore[attr-defined]
                    if failure is not None:
                        raise failure
                    continue
                yield answer
                written += 1
                window.release()
        except FleetcmdError as exc:
            code = grpc_code(exc).name
            raise
        except BaseException as exc:
            code = ended_code(context, exc)
            raise
        finally:
            if self.call_timer is not None:
                self.call_timer.observe("SendStream", code, started)
            # Ended early (the client canceled, the server is stopping): the unanswered items are canceled, as a unary Send is.
            reader.cancel()
            for task in list(running):
                task.cancel()

    @maps_errors
    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Execution:  # noqa: N802
        """See the proto."""
        return convert.execution(await self._core.get(request.execution_id))

    @maps_errors
    async def List(self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListResponse:  # noqa: N802
        """See the proto."""
        filters = convert.list_filters(request)
        page = await self._core.list_executions(pagination.list_query(filters))
        return pb.ListResponse(
            executions=[convert.execution(e) for e in page.executions],
            next_page_token=pagination.page_token(filters, page.next_before_index),
        )

    def _stream_args(self, request: pb.StreamRequest) -> tuple[EventFilter, int | None]:
        if request.job_id:
            check_execution_id(request.job_id, "job_id")
        flt = EventFilter(
            thing_id=request.thing_id, execution_id=request.execution_id, action=request.action, job_id=request.job_id
        )
        after = request.after_sequence if request.HasField("after_sequence") else None
        if after is not None and after > MAX_SEQUENCE:
            raise InvalidArgument.single("after_sequence", f"after_sequence must be at most {MAX_SEQUENCE}")
        return flt, after

    @maps_errors
    async def Stream(  # noqa: N802
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """See the proto; yields serialized ``ExecutionEvent`` messages (registered without a serializer)."""
        flt, after = self._stream_args(request)
        wire = self._wire
        async for batch in self._core.stream(flt, after):
            for change in batch.events:
                yield wire.message(change, batch.live)

    @maps_errors
    async def StreamBatches(  # noqa: N802
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """See the proto; yields serialized ``EventBatch`` messages (registered without a serializer)."""
        flt, after = self._stream_args(request)
        wire = self._wire
        async for batch in self._core.stream(flt, after):
            for message in wire.batches(batch.events, batch.live):
                yield message
            if batch.live:
                # Writes, not bytes, are what a watcher costs (tens of microseconds of CPU each in grpc.aio):
                # once events come faster than one write each, pausing lets the commits of the next moment
                # share one message. The batch grows with the load, so the pause only happens under load.
                linger, min_events = LINGER_MANY if len(self._core.bus) >= MANY_WATCHERS else LINGER
                if len(batch.events) >= min_events:
                    await asyncio.sleep(linger)

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


# (client streaming, server streaming) -> how grpc wants such a method registered.
_HANDLER_FACTORIES: dict[tuple[bool, bool], Any] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def command_service_handlers(servicer: CommandServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """A method handler for every RPC the proto declares for ``CommandService``.

    Built from the service descriptor, so an RPC added to the proto without an
    implementation fails here, at start, rather than answering UNIMPLEMENTED.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in pb.DESCRIPTOR.services_by_name["CommandService"].methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        # None: grpc sends the bytes the method yields as they are.
        serializer = None if method.name in servicer.PRESERIALIZED else response_type.SerializeToString
        factory = _HANDLER_FACTORIES[method.client_streaming, method.server_streaming]
        handlers[method.name] = guard_handler(
            factory(getattr(servicer, method.name), request_deserializer=request_type.FromString, response_serializer=serializer)
        )
    return handlers


class _GenericHandlersOnly:
    """The server as a generated ``add_*_to_server`` function sees it: generic handlers only.

    None of the methods it adds becomes a registered method. grpc.aio's server waits for the
    next call of every registered method at once: each call it takes costs an ``asyncio.wait``
    over one future per registered method, on the event loop. With every method of every
    service registered (23), that cost 12-19 us of CPU per unary ``Send`` (1-2 %, measured
    with ``bench/ab.py``); a method found through its generic handler costs a dict lookup.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Left out: the generated function passes the same methods to :meth:`add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        """Serve these methods through a generic handler, each guarded against undecodable requests.

        Not as registered methods (see the class); the generated function's own generic handler
        is left out because its methods answer UNKNOWN to a request that cannot be decoded.
        """
        guarded = {name: guard_handler(handler) for name, handler in method_handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, guarded),))


# The methods registered with gRPC's core (see _GenericHandlersOnly): the one called once per command.
REGISTERED_METHODS = ("Send",)


class GrpcServer:
    """The grpc.aio server with every fleetcmd service, health and reflection."""

    def __init__(
        self,
        core: CommandCore,
        registry: Registry,
        keys: ApiKeys,
        call_duration: PlainHistogram | None = None,
        jobs: JobsCore | None = None,
    ) -> None:
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(keys)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )

        def timer(service: str) -> CallTimer | None:
            return CallTimer(call_duration, service) if call_duration is not None else None

        handlers = command_service_handlers(CommandServicer(core, timer(SERVICE_NAME)))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        registered = {name: handlers[name] for name in REGISTERED_METHODS}
        self.server.add_registered_method_handlers(SERVICE_NAME, registered)  # type: ignore[attr-defined]
        # Typed as the server for the generated functions: they only call the two methods it has.
        generic_only = cast(grpc.aio.Server, _GenericHandlersOnly(self.server))
        things = ThingServicer(registry)
        things.call_timer = timer("fleetcmd.v1.ThingService")
        types = ThingTypeServicer(registry, core.settings)
        types.call_timer = timer("fleetcmd.v1.ThingTypeService")
        rpb_grpc.add_ThingServiceServicer_to_server(things, generic_only)
        rpb_grpc.add_ThingTypeServiceServicer_to_server(types, generic_only)
        self.service_names: tuple[str, ...] = SERVICE_NAMES
        if jobs is not None:
            job_servicer = grpc_jobs.JobServicer(jobs)
            job_servicer.call_timer = timer(grpc_jobs.SERVICE_NAME)
            jpb_grpc.add_JobServiceServicer_to_server(job_servicer, generic_only)
            self.service_names += (grpc_jobs.SERVICE_NAME,)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic_only)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
                (*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
            ),
            generic_only,
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
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for up to ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
