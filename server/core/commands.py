"""The command control plane: Send, Get, List, Stream and Cancel, and what devices report.

:class:`CommandCore` ties the store, the outbox, the TTL scheduler and the
event bus together. It is also the broker's :class:`~broker_hooks.broker.DeviceSink`:
device reports go through a bounded ingest queue to a worker that applies them
in arrival order, many per store commit.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from broker_hooks.rules import Inbound, LifecycleAction
from server.config import Settings
from server.core.clock import now_ms
from server.core.delivery import Outbox, Route, Spawn
from server.core.errors import (
    FailedPrecondition,
    FleetcmdError,
    NotFound,
    ResourceExhausted,
    ThingMismatch,
    Unavailable,
)
from server.core.events import EventBus, StreamBatch, check_resume
from server.core.ids import new_execution_ids
from server.core.lifecycle import Outcome, Status, Trigger, initial_status
from server.core.metrics import ServiceMetrics
from server.core.models import (
    DeviceReport,
    EventFilter,
    Execution,
    ExecutionReport,
    ListQuery,
    NewExecution,
    StateChange,
)
from server.core.registry import PreparedSend, PresenceChange, Registry
from server.core.scheduler import TtlScheduler
from server.core.validation import SendCommand, check_execution_id, fingerprint
from server.logformat import log_fields
from server.store import ListPage, Store, TransitionResult

log = logging.getLogger(__name__)

INGEST_BATCH = 256
REPLAY_PAGE = 500
# Device reports handed to the store and not yet committed, at most: beyond that the ingest
# loop waits, and the bounded ingest queue pushes back on the broker.
REPORTS_IN_FLIGHT = 2 * INGEST_BATCH


InboundHandler = Callable[[Inbound], Awaitable[None]]


class DeviceListener(Protocol):
    """A dialect that follows clients (e.g. which live client uses which endpoint). Must not raise."""

    def client_connected(self, client_id: str) -> None:
        """A client's connection started (a new connection: it may take over an older one)."""

    def client_subscribed(self, client_id: str, filters: Sequence[tuple[str, int]]) -> None:
        """A client was granted these subscriptions."""

    def client_disconnected(self, client_id: str) -> None:
        """A client's connection ended."""


_REPORT_STATS = {outcome: f"reports.{outcome.value}" for outcome in Outcome}


class CommandCore:
    """Lifecycle orchestration; the only caller of ``Store.create`` and ``Store.transition``.

    Delivery (the outbox, the dialects) records what it did through :meth:`mark_published`,
    :meth:`mark_delivered` and :meth:`mark_delivered_nowait`, never through the store.

    It names no dialect: the dialects (``server.dialects``) add their routes (:meth:`add_route`),
    their handlers of lifecycle actions (:attr:`handlers`) and their client listeners. A
    :class:`~server.core.models.ExecutionReport` under ``LifecycleAction.DEVICE_REPORT``, from any
    dialect, is applied by the built-in report path.
    """

    def __init__(self, settings: Settings, store: Store, registry: Registry, spawn: Spawn) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self._spawn = spawn
        self.bus = EventBus()
        self.scheduler = TtlScheduler()
        self.outbox = Outbox(store, self, spawn)
        # The dialects' routes: those that claim their things, in registration order, then the default one.
        self._claimed_routes: list[tuple[Callable[[str], bool], Route]] = []
        self._default_route: Route | None = None
        self._compile_routes()
        # Handlers of the dialects' lifecycle actions (the neutral report is built in), and their client listeners.
        self.handlers: dict[enum.Enum, InboundHandler] = {LifecycleAction.DEVICE_REPORT: self._on_report}
        self.device_listeners: list[DeviceListener] = []
        # Device messages with the future that tells the broker they are applied (their PUBACK waits for it).
        self._ingest: asyncio.Queue[tuple[Inbound, asyncio.Future[None]] | None] = asyncio.Queue(settings.ingest_queue)
        self.stats: collections.Counter[str] = collections.Counter()
        # Histograms the commit listener observes (set by the app; None in bare tests).
        self.histograms: ServiceMetrics | None = None
        # The jobs runner's commit hook (server.core.job_runner.JobsCore.on_commit), when jobs run.
        self.job_hook: Callable[[Sequence[StateChange]], None] | None = None
        self._stopping = False
        self._ingest_done = asyncio.Event()
        self._reports_in_flight = 0
        self._reports_drained = asyncio.Event()
        # Replica mode (server/core/replica.py) sets these: requests are taken over through store
        # leases rather than held from the start, and a Send naming an unknown thing reads the
        # registry back first (another replica may have just created it).
        self.leased_outbox = False
        self.reload_registry: Callable[[], Awaitable[bool]] | None = None

    # ---- start and stop -------------------------------------------------------------------

    def on_commit(self, events: Sequence[StateChange]) -> None:
        """Store commit listener: retire finished executions, then announce the events."""
        observe = self.histograms
        for event in events:
            if event.late:
                continue
            status = event.status
            if status.final:
                self.scheduler.cancel(event.execution_id)
                self.outbox.discard(event.thing_id, event.execution_id)
            if observe is not None:
                # The execution id's first 48 bits are its creation time in ms (server.core.ids).
                if status.final:
                    observe.observe_final(event.action, status.name, (event.at_ms - int(event.execution_id[:12], 16)) / 1000)
                elif status is Status.SENT or status is Status.DELIVERED:
                    observe.observe_delivery(status is Status.DELIVERED, (event.at_ms - int(event.execution_id[:12], 16)) / 1000)
        if self.job_hook is not None:
            self.job_hook(events)
        # The store calls this after resolving the Sends it committed, so they still resume
        # (and publish their requests) ahead of the watchers woken here; every watcher gets
        # every event, in commit order.
        self.bus.publish(events)

    async def restore(self) -> int:
        """Reschedule every non-final execution after a (re)start; overdue ones expire at once.

        Returns:
            How many active executions were restored.
        """
        active = await self.store.active()
        if self.leased_outbox:
            # Other replicas' executions too: their TTLs are swept, their requests claimed by lease.
            return len(active)
        for item in active:
            self.scheduler.schedule(item.execution_id, item.expires_at_ms)
            if item.status <= Status.SENT and not item.handed:
                # Not acknowledged by the device (nor taken by an external broker): goes out again when it connects.
                self.outbox.hold(item.thing_id, item.execution_id)
        return len(active)

    async def run_expiry(self) -> None:
        """Background loop: time out executions whose TTL ran out."""
        while True:
            first = await self.scheduler.due.get()
            batch = [first]
            while len(batch) < INGEST_BATCH and not self.scheduler.due.empty():
                batch.append(self.scheduler.due.get_nowait())
            await asyncio.gather(*(self._expire(i) for i in batch))

    async def _expire(self, execution_id: str) -> None:
        try:
            await self.store.transition(execution_id, Trigger.EXPIRED, at_ms=now_ms())
            self.stats["timed_out"] += 1
        except FleetcmdError:
            log.exception("could not time out %s", execution_id, extra=log_fields(execution_id))

    async def run_ingest(self) -> None:
        """Background loop: apply device reports in arrival order, a batch per store commit."""
        try:
            await self._ingest_loop()
            await self._reports_below(1)  # stopping: every report taken is committed
        finally:
            self._ingest_done.set()

    async def _ingest_loop(self) -> None:
        while True:
            first = await self._ingest.get()
            if first is None:
                return
            batch: list[tuple[Inbound, asyncio.Future[None]]] = [first]
            stop = False
            while len(batch) < INGEST_BATCH and not self._ingest.empty():
                item = self._ingest.get_nowait()
                if item is None:
                    stop = True
                    break
                batch.append(item)
            # Submitted in order: the store runs them in this order within one transaction.
            # Device reports go to the store at once, without a task each; the dialects'
            # handlers run as tasks (they may read before they write).
            handlers = []
            for inbound, applied in batch:
                if inbound.action is LifecycleAction.DEVICE_REPORT and self._builtin_report:
                    self._submit_report(inbound, applied)
                else:
                    handlers.append(self._apply(inbound, applied))
            if handlers:
                await asyncio.gather(*handlers)
            await self._reports_below(REPORTS_IN_FLIGHT)
            if stop:
                return

    async def _reports_below(self, limit: int) -> None:
        """Wait until fewer than ``limit`` device reports are waiting for their commit."""
        while self._reports_in_flight >= limit:
            self._reports_drained.clear()
            await self._reports_drained.wait()

    @property
    def _builtin_report(self) -> bool:
        # Whether device reports still go to the built-in handler (nobody replaced it).
        return self.handlers.get(LifecycleAction.DEVICE_REPORT) == self._on_report

    def _submit_report(self, inbound: Inbound, applied: asyncio.Future[None]) -> None:
        msg: ExecutionReport = inbound.message
        try:
            future = self.store.transition_nowait(
                msg.execution_id,
                Trigger.DEVICE_REPORT,
                at_ms=now_ms(),
                report=msg.report,
                expect_thing=msg.thing_id,
                result_check=self.registry.result_check,
            )
        except FleetcmdError as exc:  # the store is closing
            self._report_failed(inbound, exc)
            _settle(applied, exc)
            return
        self._reports_in_flight += 1
        future.add_done_callback(functools.partial(self._report_done, inbound, applied))

    def _report_done(self, inbound: Inbound, applied: asyncio.Future[None], future: asyncio.Future[TransitionResult]) -> None:
        self._reports_in_flight -= 1
        if self._reports_in_flight < REPORTS_IN_FLIGHT:
            self._reports_drained.set()
        msg: ExecutionReport = inbound.message
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - counted and logged like the handler's failures
            self._report_failed(inbound, exc)
            _settle(applied, exc)
            return
        self._count_report(result, msg.execution_id, msg.report)
        _settle(applied, None)

    async def stop_ingest(self, timeout: float) -> None:
        """Refuse new reports and wait (at most ``timeout`` s) until those already queued are applied.

        The store must still be writing meanwhile: the reports taken are committed (their PUBACKs wait for that).
        """
        if not self._stopping:
            self._stopping = True
            await self._ingest.put(None)
        try:
            await asyncio.wait_for(self._ingest_done.wait(), timeout)
        except TimeoutError:
            log.warning("%d device reports were not applied before the shutdown deadline", self._ingest.qsize())

    def close(self) -> None:
        """End live streams and timers (shutdown)."""
        self.bus.close()
        self.scheduler.close()

    def add_route(self, route: Route, claims: Callable[[str], bool] | None = None) -> None:
        """Add a dialect's route: for the things ``claims`` accepts, or (None) the default route.

        Raises:
            ValueError: a second default route.
        """
        if claims is not None:
            self._claimed_routes.append((claims, route))
        elif self._default_route is not None:
            raise ValueError("two dialects claim to be the default route")
        else:
            self._default_route = route
        self._compile_routes()

    def _compile_routes(self) -> None:
        # The outbox asks for a thing's route on every Send and publish: one closure over the routes,
        # without a loop for the usual single claiming dialect.
        claimed, default = tuple(self._claimed_routes), self._default_route
        route_for: Callable[[str], Route | None]
        if not claimed:

            def route_for(thing_id: str) -> Route | None:
                return default

        elif len(claimed) == 1:
            ((claims, route),) = claimed

            def route_for(thing_id: str) -> Route | None:
                return route if claims(thing_id) else default

        else:

            def route_for(thing_id: str) -> Route | None:
                for claims, route in claimed:
                    if claims(thing_id):
                        return route
                return default

        self.outbox.route_for = route_for

    def route_for(self, thing_id: str) -> Route | None:
        """The delivery route of a thing: the first dialect that claims it, else the default one."""
        return self.outbox.route_for(thing_id)

    # ---- delivery (called by the outbox and the dialects' routes) -------------------------

    def mark_published(self, execution_id: str, at_ms: int | None = None) -> Awaitable[TransitionResult]:
        """Record that a request went out to its device (QUEUED -> SENT); await the result.

        Returns the store's awaitable as is (no coroutine of its own on the publish path);
        writes submitted in one loop turn share one commit.
        """
        return self.store.transition(execution_id, Trigger.PUBLISHED, at_ms=now_ms() if at_ms is None else at_ms)

    def mark_delivered(self, execution_id: str) -> Awaitable[TransitionResult]:
        """Record that the device acknowledged its request (DELIVERED, unless it is already further); await it."""
        return self.store.transition(execution_id, Trigger.ACKED, at_ms=now_ms())

    def mark_delivered_nowait(self, execution_id: str) -> asyncio.Future[TransitionResult]:
        """:meth:`mark_delivered` on a PUBACK: queued at once, deferrable so the device's answer can share its commit."""
        return self.store.transition_nowait(execution_id, Trigger.ACKED, at_ms=now_ms(), deferrable=True)

    # ---- operator API ---------------------------------------------------------------------

    async def send(self, cmd: SendCommand, *, rerun_of: str = "") -> Execution:
        """Accept a command: durable first, then scheduled and published.

        Raises:
            NotFound: the thing is not registered.
            InvalidArgument: the thing's type refuses the action or its params.
            AlreadyExists: the idempotency key belongs to a different request.
            ResourceExhausted: too many executions are active.
        """
        if len(self.scheduler) >= self.settings.max_active_executions:
            raise ResourceExhausted(f"{len(self.scheduler)} executions are active (limit {self.settings.max_active_executions})")
        try:
            prepared = self.registry.prepare_send(cmd.thing_id, cmd.action, cmd.params, cmd.ttl_seconds)
        except NotFound:
            if self.reload_registry is None or not await self.reload_registry():
                raise
            prepared = self.registry.prepare_send(cmd.thing_id, cmd.action, cmd.params, cmd.ttl_seconds)
        new = self.new_execution(cmd.thing_id, cmd.action, prepared, cmd.idempotency_key, rerun_of)
        result = await self.store.create(new)
        if result.created and self.track(result.execution):
            # Let the publish task write the request to the device before this caller
            # goes on to build its answer: the device's round trip is the longer path.
            await asyncio.sleep(0)
        return result.execution

    def new_execution(
        self, thing_id: str, action: str, prepared: PreparedSend, idempotency_key: str = "", rerun_of: str = ""
    ) -> NewExecution:
        """The execution a Send (or a job's dispatch) of ``action`` to ``thing_id`` creates, not stored yet.

        ``prepared``: what :meth:`Registry.prepare_send` made of the request for the thing's type.
        """
        ttl = prepared.ttl_seconds or self.settings.default_ttl
        created = now_ms()
        execution_id, command_id = new_execution_ids(created)
        return NewExecution(
            execution_id=execution_id,
            command_id=command_id,
            thing_id=thing_id,
            action=action,
            params_json=prepared.params_json,
            ttl_seconds=ttl,
            status=initial_status(self.outbox.ready(thing_id)),
            created_at_ms=created,
            expires_at_ms=created + ttl * 1000,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint(thing_id, action, prepared.params_json, ttl) if idempotency_key else "",
            thing_type=prepared.thing_type,
            kaa=prepared.kaa,
            rerun_of=rerun_of,
        )

    def track(self, execution: Execution) -> bool:
        """Start the TTL and the delivery of a newly stored execution; True when its request is being published now."""
        self.stats["sent"] += 1
        self.scheduler.schedule(execution.execution_id, execution.expires_at_ms)
        return self.outbox.add(execution)

    def room(self) -> int:
        """How many more executions may be active (``max_active_executions``)."""
        return max(0, self.settings.max_active_executions - len(self.scheduler))

    async def wait(self, execution: Execution, seconds: float) -> Execution:
        """Wait until ``execution`` is final or ``seconds`` pass; return it as it stands then."""
        if execution.status.final or seconds <= 0:
            return execution
        sub = self.bus.subscribe(EventFilter(execution_id=execution.execution_id), self.settings.stream_buffer)
        try:
            # Subscribed first, then read: a change committed in between is not missed.
            current = await self.store.get(execution.execution_id)
            if current is None or current.status.final:
                return current or execution
            async with asyncio.timeout(seconds):
                while True:
                    batch = await sub.next_batch()
                    if any(e.status.final and not e.late for e in batch):
                        break
        except (TimeoutError, FleetcmdError):
            pass  # the wait ended (or the service is stopping): answer with what there is
        finally:
            sub.close()
        return await self.store.get(execution.execution_id) or execution

    async def rerun(self, execution_id: str) -> Execution:
        """Send the same command again (same thing, action, params and TTL), linked to the original.

        Raises:
            NotFound: no such execution (or its thing is gone).
        """
        original = await self.get(execution_id)
        params = json.loads(original.params_json) if original.params_json else None
        cmd = SendCommand(original.thing_id, original.action, params, original.ttl_seconds, "")
        return await self.send(cmd, rerun_of=original.execution_id)

    async def get(self, execution_id: str) -> Execution:
        """One execution with its history.

        Raises:
            NotFound: no such execution.
        """
        check_execution_id(execution_id)
        execution = await self.store.get(execution_id, with_history=True)
        if execution is None:
            raise NotFound(f"execution {execution_id!r} not found")
        return execution

    async def list_executions(self, query: ListQuery) -> ListPage:
        """A page of executions, newest first."""
        return await self.store.list_executions(query)

    async def cancel(self, execution_id: str) -> Execution:
        """Cancel a non-final execution.

        Raises:
            NotFound: no such execution.
            FailedPrecondition: the execution is already final.
        """
        check_execution_id(execution_id)
        result = await self.store.transition(execution_id, Trigger.CANCEL, at_ms=now_ms())
        if result.decision.outcome is Outcome.REFUSE:
            raise FailedPrecondition(f"execution {execution_id} is already {result.execution.status.name}")
        self.stats["canceled"] += 1
        return result.execution

    async def stream(self, flt: EventFilter, after_sequence: int | None) -> AsyncIterator[StreamBatch]:
        """Committed events matching ``flt``: replayed after ``after_sequence`` if given, then live.

        Events come in batches, in sequence order: one replay page, or everything
        the bus delivered since the caller last asked (one commit, or several when
        it was behind), so a surface can send them in one message.

        Subscribing live before reading the log closes the race between the two:
        an event is either in the replay, in the live buffer, or both (and then
        skipped by its sequence).

        Raises:
            ResourceExhausted: the subscriber fell behind; resume from the last sequence.
            FailedPrecondition: retention deleted events after ``after_sequence``: a replay would have a gap.
        """
        check_resume(after_sequence, self.store.purged_through())
        sub = self.bus.subscribe(flt, self.settings.stream_buffer)
        try:
            last = 0
            if after_sequence is not None:
                last = after_sequence
                while True:
                    page = await self.store.events_after(last, flt, REPLAY_PAGE)
                    if page:
                        last = page[-1].sequence
                        yield StreamBatch(page, live=False)
                    if len(page) < REPLAY_PAGE:
                        break
            while True:
                batch = await sub.next_batch()
                if batch[0].sequence <= last:  # already replayed (only right after the replay)
                    batch = [e for e in batch if e.sequence > last]
                    if not batch:
                        continue
                last = batch[-1].sequence
                yield StreamBatch(batch, live=True)
        finally:
            sub.close()

    # ---- DeviceSink (called by the broker) ------------------------------------------------

    def device_connected(self, client_id: str, remote_address: str) -> None:
        """See :class:`broker_hooks.broker.DeviceSink`."""
        for listener in self.device_listeners:
            listener.client_connected(client_id)
        change = self.registry.device_connected(client_id, remote_address)
        if change is not None:
            self._persist_presence(change)
        self.outbox.device_available(client_id)

    def device_subscribed(self, client_id: str, filters: Sequence[tuple[str, int]]) -> None:
        """See :class:`broker_hooks.broker.DeviceSink`."""
        for listener in self.device_listeners:
            listener.client_subscribed(client_id, filters)
        self.outbox.device_available(client_id)

    def device_disconnected(self, client_id: str) -> None:
        """See :class:`broker_hooks.broker.DeviceSink`; unacknowledged requests stay in the outbox."""
        for listener in self.device_listeners:
            listener.client_disconnected(client_id)
        change = self.registry.device_disconnected(client_id)
        if change is not None:
            self._persist_presence(change)

    def _persist_presence(self, change: PresenceChange) -> None:
        if self.registry.persist_later(change):
            self._spawn(self.registry.write_presence(), "presence-writer")

    def device_message_nowait(self, inbound: Inbound) -> asyncio.Future[None] | None:
        """See :class:`broker_hooks.broker.DeviceSink`; None when the ingest queue is full."""
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._stopping:
            return self._refuse_stopping(applied)
        try:
            self._ingest.put_nowait((inbound, applied))
        except asyncio.QueueFull:
            return None
        self.registry.device_seen(inbound.client_id)
        return applied

    async def device_message(self, inbound: Inbound) -> asyncio.Future[None]:
        """See :class:`broker_hooks.broker.DeviceSink`; waits only while the ingest queue is full."""
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._stopping:
            return self._refuse_stopping(applied)
        self.registry.device_seen(inbound.client_id)
        await self._ingest.put((inbound, applied))
        return applied

    def _refuse_stopping(self, applied: asyncio.Future[None]) -> asyncio.Future[None]:
        # Not taken: the device gets no PUBACK and sends it again to the next run of the service.
        self.stats["refused.shutting_down"] += 1
        applied.set_exception(Unavailable("the service is stopping"))
        return applied

    async def _apply(self, inbound: Inbound, applied: asyncio.Future[None]) -> None:
        handler = self.handlers.get(inbound.action)
        if handler is None:
            self.stats["dropped.no_handler"] += 1
            log.warning("no handler for %s", inbound.action)
            _settle(applied, None)
            return
        try:
            await handler(inbound)
        except Exception as exc:
            self.stats["dropped.handler_error"] += 1
            log.exception("%s from %s on %r failed", inbound.action.value, inbound.client_id, inbound.topic)
            _settle(applied, exc)
        else:
            _settle(applied, None)

    async def report(self, execution_id: str, report: DeviceReport, *, thing_id: str) -> TransitionResult:
        """Apply a device's status report, whatever its dialect, and count what it did.

        Raises:
            NotFound: no such execution.
            ThingMismatch: the execution belongs to another thing.
        """
        result = await self.store.transition(
            execution_id,
            Trigger.DEVICE_REPORT,
            at_ms=now_ms(),
            report=report,
            expect_thing=thing_id,
            result_check=self.registry.result_check,
        )
        self._count_report(result, execution_id, report)
        return result

    def _count_report(self, result: TransitionResult, execution_id: str, report: DeviceReport) -> None:
        self.stats[_REPORT_STATS[result.decision.outcome]] += 1
        if result.decision.outcome is Outcome.LATE:
            ex = result.execution
            log.info(
                "late %s for %s kept in history",
                report.status.name,
                execution_id,
                extra=log_fields(execution_id, ex.thing_id, ex.action),
            )

    async def _on_report(self, inbound: Inbound) -> None:
        msg: ExecutionReport = inbound.message
        try:
            await self.report(msg.execution_id, msg.report, thing_id=msg.thing_id)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and logged there
            self._report_failed(inbound, exc)

    def _report_failed(self, inbound: Inbound, exc: BaseException) -> None:
        msg: ExecutionReport = inbound.message
        if isinstance(exc, NotFound):
            self.stats["dropped.unknown_execution"] += 1
            log.warning(
                "%s reported on unknown execution %r: dropped",
                inbound.client_id,
                msg.execution_id,
                extra=log_fields(msg.execution_id, msg.thing_id),
            )
        elif isinstance(exc, ThingMismatch):
            self.stats["dropped.thing_mismatch"] += 1
            log.warning("%s: %s: dropped", inbound.client_id, exc, extra=log_fields(msg.execution_id, msg.thing_id))
        elif isinstance(exc, FleetcmdError):
            self.stats["dropped.store_error"] += 1
            log.error(
                "could not record a report from %s",
                inbound.client_id,
                exc_info=exc,
                extra=log_fields(msg.execution_id, msg.thing_id),
            )
        else:
            self.stats["dropped.handler_error"] += 1
            log.error("%s from %s on %r failed", inbound.action.value, inbound.client_id, inbound.topic, exc_info=exc)

    def metrics(self) -> dict[str, Any]:
        """Counters for logs and tests."""
        return {
            "active": len(self.scheduler),
            "outbox": len(self.outbox),
            "watchers": len(self.bus),
            **self.stats,
        }


def _settle(applied: asyncio.Future[None], exc: BaseException | None) -> None:
    """Tell the broker a device message is applied, or that it was not stored (then it is not PUBACKed).

    Only a store that could not write fails it: the device sends the message again. Any other
    failure (an unknown execution, a handler's bug) would fail again the same way, so it counts
    as handled, and the message is acknowledged and dropped.
    """
    if applied.done():
        return
    if isinstance(exc, Unavailable):
        applied.set_exception(exc)
    else:
        applied.set_result(None)
