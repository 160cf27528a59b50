"""Kaa command execution (CEX, KP1 protocol) on top of the command lifecycle.

Shared by the MQTT dialect (:mod:`server.dialects.kaa.topics`) and the HTTP polling
endpoints: a command sent to a Kaa endpoint is an execution with an integer
Kaa id (unique per endpoint and command type); it stays outstanding (QUEUED,
SENT, DELIVERED, IN_PROGRESS) until a result arrives or its TTL ("maximum
command retention for delivery") ends. A result's ``statusCode`` decides the
final status: 2xx SUCCEEDED, 4xx REJECTED, anything else FAILED; ``statusCode``
and ``reasonPhrase`` are kept as the execution's status reason and
``payload`` as its result.

Over MQTT (:class:`KaaMqtt`, attached to the core by the Kaa bundle) requests are
answered on ``{request topic}/status`` or ``/error`` when they carry a request
id, and new commands are pushed through :class:`KaaRoute` to every live client
bound to the endpoint. A command handed to a device in an answer counts as
sent (and as delivered once the answer is PUBACKed).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker_hooks import jsonvalue
from broker_hooks.broker import Delivery
from broker_hooks.jsonvalue import stored as stored_json
from broker_hooks.rules import Inbound
from server.core.clock import now_ms
from server.core.commands import CommandCore, InboundHandler
from server.core.delivery import DeviceLink, Message, Spawn
from server.core.errors import FleetcmdError, NotFound, ThingMismatch
from server.core.lifecycle import Status
from server.core.models import DeviceReport, Execution, Reason, ThingRecord
from server.core.registry import Registry
from server.dialects.kaa import topics as kaa_topics
from server.store import kaa_store

log = logging.getLogger(__name__)

MAX_REASON_PHRASE = 1024
# Kaa ids are issued per endpoint and command type from 1 upward; the store keeps them as SQLite
# integers and devices echo them as JSON numbers: beyond 2**53 no device can name one exactly.
MAX_KAA_ID = jsonvalue.MAX_SAFE_INTEGER
# HTTP-like status codes: 100-599 is what the dialect means (2xx succeeded, 4xx rejected, else failed).
MIN_STATUS_CODE, MAX_STATUS_CODE = 100, 599


class KaaError(FleetcmdError):
    """A Kaa request the server answers with an error; ``status_code`` is HTTP-like."""

    def __init__(self, status_code: int, reason_phrase: str) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        super().__init__(f"{status_code} {reason_phrase}")

    def payload(self) -> dict[str, Any]:
        """The KP1 error body."""
        return {"statusCode": self.status_code, "reasonPhrase": self.reason_phrase}


def status_for(status_code: int) -> Status:
    """The final status a Kaa ``statusCode`` stands for."""
    if 200 <= status_code < 300:
        return Status.SUCCEEDED
    if 400 <= status_code < 500:
        return Status.REJECTED
    return Status.FAILED


def check_command_type(command_type: str) -> None:
    """A command type is a non-empty alphanumeric string.

    Raises:
        KaaError: 400 otherwise.
    """
    if not command_type or not command_type.isalnum():
        raise KaaError(400, f"command type {command_type!r} must be a non-empty alphanumeric string")


@dataclass(frozen=True)
class ItemOutcome:
    """What happened to one item of a result array."""

    id: Any
    error: str | None  # None when it was applied
    status_code: int = 400  # of the error: 404 for an unknown id, 400 for a malformed item


class KaaCex:
    """Outstanding commands and results of Kaa endpoints."""

    def __init__(self, core: CommandCore) -> None:
        self._core = core

    def endpoint(self, app_version: str, endpoint_token: str) -> ThingRecord:
        """The endpoint named by an application version and endpoint token.

        Raises:
            KaaError: 401 for an unknown token (or one of another application version).
        """
        thing = self._core.registry.kaa_endpoint(app_version, endpoint_token)
        if thing is None:
            raise KaaError(401, "unknown endpoint token for this application version")
        return thing

    def refused(self, reason: str) -> None:
        """Count a request body the strict JSON codec refused (``dropped.{reason}``, as over MQTT)."""
        self._core.stats[f"dropped.{reason}"] += 1

    async def outstanding(self, thing: ThingRecord, command_type: str) -> list[dict[str, Any]]:
        """Every outstanding command of this type, ``[{"id", "payload"}]``, oldest first.

        Handing a command to the device (in this answer) makes a QUEUED one SENT.
        """
        return [
            {"id": e.kaa_id, "payload": stored_json(e.params_json) if e.params_json else {}}
            for e in await self.outstanding_executions(thing, command_type)
        ]

    async def outstanding_executions(self, thing: ThingRecord, command_type: str) -> list[Execution]:
        """:meth:`outstanding` as executions (as read, before QUEUED ones were marked SENT)."""
        check_command_type(command_type)
        self._core.registry.device_seen(thing.thing_id)
        executions = await kaa_store(self._core.store).outstanding(thing.thing_id, command_type, now_ms())
        at = now_ms()
        # Submitted together: one store commit for all of them.
        await asyncio.gather(*(self._core.mark_published(e.execution_id, at) for e in executions if e.status is Status.QUEUED))
        return executions

    async def report(self, thing: ThingRecord, command_type: str, body: Any) -> list[ItemOutcome]:
        """Apply a result array (or a single result object); valid items count even when others are bad.

        An empty array is a valid no-op: Kaa's own sample client answers an empty command list with ``[]``.

        Raises:
            KaaError: 400 when the body is neither an object nor an array.
        """
        check_command_type(command_type)
        self._core.registry.device_seen(thing.thing_id)
        items = [body] if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise KaaError(400, "a result is an object or an array of objects")
        return [await self._apply(thing, command_type, item) for item in items]

    async def _apply(self, thing: ThingRecord, command_type: str, item: Any) -> ItemOutcome:
        if not isinstance(item, dict):
            return ItemOutcome(None, "item is not an object")
        kaa_id, code = item.get("id"), item.get("statusCode")
        if type(kaa_id) is not int or not 1 <= kaa_id <= MAX_KAA_ID:
            return ItemOutcome(kaa_id, f"id must be an integer from 1 to {MAX_KAA_ID}")
        if type(code) is not int or not MIN_STATUS_CODE <= code <= MAX_STATUS_CODE:
            return ItemOutcome(kaa_id, f"statusCode must be an integer from {MIN_STATUS_CODE} to {MAX_STATUS_CODE}")
        phrase = item.get("reasonPhrase", "")
        if not isinstance(phrase, str) or len(phrase) > MAX_REASON_PHRASE:
            return ItemOutcome(kaa_id, f"reasonPhrase must be a string of at most {MAX_REASON_PHRASE} characters")
        execution_id = await kaa_store(self._core.store).execution_id_for_kaa(thing.thing_id, command_type, kaa_id)
        if execution_id is None:
            self._core.stats["dropped.unknown_execution"] += 1
            return ItemOutcome(kaa_id, f"no command {kaa_id} of type {command_type!r} for this endpoint", 404)
        payload = None
        if "payload" in item:
            try:
                # The edges' codec already refused what is not strict JSON, with room for the envelope:
                # the payload itself is bounded here (depth), and a caller that parsed the body some
                # other way (NaN, out-of-range numbers) is refused here, not by the serializer.
                jsonvalue.check(item["payload"])
            except jsonvalue.JsonProblem as exc:
                self.refused(exc.reason)
                return ItemOutcome(kaa_id, f"{exc.reason}: {exc.field('payload')}: {exc.detail}")
            payload = jsonvalue.dumps(item["payload"])
        report = DeviceReport(status_for(code), payload, Reason(str(code), phrase))
        try:
            await self._core.report(execution_id, report, thing_id=thing.thing_id)
        except (NotFound, ThingMismatch) as exc:  # pragma: no cover - the id was just looked up for this thing
            return ItemOutcome(kaa_id, str(exc))
        return ItemOutcome(kaa_id, None)


# ---- MQTT: bindings, pushes and replies -----------------------------------------------------------

# What a Kaa endpoint request is handled by, once its endpoint is resolved and bound.
_Handler = Callable[[Inbound, kaa_topics.KaaRequest, ThingRecord], Awaitable[None]]

MAX_OBSERVED_TYPES = 256  # per client and endpoint; flags beyond are not remembered (pushes stay on)
MAX_ERROR_PHRASE = 1024


@dataclass
class _Binding:
    """One live client using one endpoint: the topic levels it used, and its observe flags."""

    app_version: str
    token: str
    observe: dict[str, bool] = field(default_factory=dict)
    flushed: bool = False  # what waited in the outbox for the endpoint was pushed since it bound


class KaaRoute:
    """How a Kaa endpoint is reached over MQTT: every live client bound to it.

    A client is bound to an endpoint when it publishes to one of the endpoint's ``cex`` topics or
    subscribes below them (the ACL checked the token), and unbound when its connection ends (or a
    new connection with the same client id starts: that one has to name the token again). A new
    command is pushed to every bound client that has not said ``observe: false`` for its type, on
    ``kp1/{av}/cex/{token}/command/{type}/status`` at QoS 1, whether or not the client subscribed
    (Kaa firmware, like the seed's client, handles that topic by callback without subscribing).
    """

    def __init__(self, link: DeviceLink, registry: Registry) -> None:
        self._link = link
        self._registry = registry
        self._by_thing: dict[str, dict[str, _Binding]] = {}  # thing -> client -> binding
        self._by_client: dict[str, set[str]] = {}  # client -> things

    def bind(self, client_id: str, thing_id: str, app_version: str, token: str) -> None:
        """Remember that ``client_id`` uses the endpoint ``thing_id``."""
        clients = self._by_thing.setdefault(thing_id, {})
        binding = clients.get(client_id)
        if binding is None:
            clients[client_id] = _Binding(app_version, token)
            self._by_client.setdefault(client_id, set()).add(thing_id)
        else:
            binding.app_version, binding.token = app_version, token  # e.g. the token was rotated

    def first_flush(self, client_id: str, thing_id: str) -> bool:
        """True once per binding: the first time what waits for the endpoint should be pushed to it."""
        binding = self._by_thing.get(thing_id, {}).get(client_id)
        if binding is None or binding.flushed:
            return False
        binding.flushed = True
        return True

    def set_observe(self, client_id: str, thing_id: str, command_type: str, observe: bool) -> None:
        """Record a client's ``observe`` flag for one command type (it must be bound)."""
        binding = self._by_thing.get(thing_id, {}).get(client_id)
        if binding is not None and (command_type in binding.observe or len(binding.observe) < MAX_OBSERVED_TYPES):
            binding.observe[command_type] = observe

    def forget(self, client_id: str) -> None:
        """Unbind a client from every endpoint."""
        for thing_id in self._by_client.pop(client_id, set()):
            clients = self._by_thing.get(thing_id)
            if clients is not None:
                clients.pop(client_id, None)
                if not clients:
                    del self._by_thing[thing_id]

    def clients(self, thing_id: str) -> list[str]:
        """Client ids bound to an endpoint."""
        return list(self._by_thing.get(thing_id, ()))

    def _live(self, thing_id: str) -> list[tuple[str, _Binding]]:
        live = []
        for client_id, binding in self._by_thing.get(thing_id, {}).items():
            if not self._link.is_connected(client_id):
                continue
            # A rotated token or a deleted endpoint: the client no longer holds a valid credential.
            endpoint = self._registry.kaa_endpoint(binding.app_version, binding.token)
            if endpoint is not None and endpoint.thing_id == thing_id:
                live.append((client_id, binding))
        return live

    def ready(self, thing_id: str) -> bool:
        """See :class:`server.core.delivery.Route`."""
        return bool(self._live(thing_id))

    def messages(self, execution: Execution) -> list[Message]:
        """See :class:`server.core.delivery.Route`."""
        if execution.kaa_id is None:
            return []
        payload = kaa_topics.encode_commands([(execution.kaa_id, execution.params_json)])
        return [
            Message(client_id, kaa_topics.push_topic(b.app_version, b.token, execution.action), payload, 1)
            for client_id, b in self._live(execution.thing_id)
            if b.observe.get(execution.action, True)
        ]


class KaaMqtt:
    """The control-plane side of the Kaa MQTT dialect: requests, results, replies and pushes.

    Requests are applied in arrival order by the ingest loop; replies are published from their own
    tasks (a QoS 1 reply waits for its PUBACK, which must not hold up other devices' reports).
    """

    def __init__(self, core: CommandCore, link: DeviceLink, spawn: Spawn) -> None:
        self._core = core
        self._link = link
        self._spawn = spawn
        self.cex = KaaCex(core)
        self.route = KaaRoute(link, core.registry)

    def handlers(self) -> dict[enum.Enum, InboundHandler]:
        """The handlers of the Kaa lifecycle actions."""
        return {kaa_topics.KaaAction.COMMAND: self.on_command, kaa_topics.KaaAction.RESULT: self.on_result}

    # ---- client listener ----

    def client_connected(self, client_id: str) -> None:
        """A new connection proves its endpoint again (a take-over inherits nothing)."""
        self.route.forget(client_id)

    def client_subscribed(self, client_id: str, filters: Sequence[tuple[str, int]]) -> None:
        """A subscription below an endpoint's ``cex`` topics binds the client to it."""
        for topic_filter, _qos in filters:
            named = kaa_topics.KaaAcl.endpoint_of(topic_filter)
            if named is None:
                continue
            thing = self._core.registry.kaa_endpoint(*named)
            if thing is None:
                continue
            self.route.bind(client_id, thing.thing_id, *named)
            levels = topic_filter.split("/")
            if len(levels) > 6 and kaa_topics.request_id(levels[6]) is not None:
                # The answer topic of a request it is about to make (the seed's client subscribes to
                # ".../command/zero/1/status"): the answer brings the commands of that type, and the
                # others are pushed after it, not before (that would hand the same commands over twice).
                continue
            self._flush(client_id, thing.thing_id)

    def client_disconnected(self, client_id: str) -> None:
        """Unbind, unless a newer connection with the same client id is already live."""
        if not self._link.is_connected(client_id):
            self.route.forget(client_id)

    def _flush(self, client_id: str, thing_id: str) -> None:
        if self.route.first_flush(client_id, thing_id):
            # Commands queued (or sent and not acknowledged) while no client was bound go out now.
            self._core.outbox.device_available(thing_id)

    # ---- requests ----

    def _endpoint(self, inbound: Inbound, request: kaa_topics.KaaRequest) -> ThingRecord | None:
        try:
            return self.cex.endpoint(request.app_version, request.token)
        except KaaError as exc:
            self._error(inbound, request, exc)
            return None

    async def _bound(self, inbound: Inbound, handle: _Handler) -> None:
        # The frame of every endpoint request: resolve the endpoint, bind the client to it, handle
        # the request, then flush. The flush comes after the handler: the commands an answer took out
        # of the outbox, and the executions a result finished, are not pushed again.
        request: kaa_topics.KaaRequest = inbound.message
        thing = self._endpoint(inbound, request)
        if thing is None:
            return
        self.route.bind(inbound.client_id, thing.thing_id, request.app_version, request.token)
        try:
            await handle(inbound, request, thing)
        finally:
            self._flush(inbound.client_id, thing.thing_id)

    async def on_command(self, inbound: Inbound) -> None:
        """``kp1/{av}/cex/{token}/command/{type}[/{rid}]``: answer the outstanding commands, set observe."""
        await self._bound(inbound, self._command)

    async def _command(self, inbound: Inbound, request: kaa_topics.KaaRequest, thing: ThingRecord) -> None:
        if request.problem is not None:
            if request.reason is not None:
                self.cex.refused(request.reason)
            self._error(inbound, request, KaaError(400, request.problem[:MAX_ERROR_PHRASE]))
            return
        try:
            check_command_type(request.command_type)
        except KaaError as exc:
            self._error(inbound, request, exc)
            return
        if request.observe is not None:
            self.route.set_observe(inbound.client_id, thing.thing_id, request.command_type, request.observe)
        if request.request_id is None and request.observe is False:
            return  # nothing asked for and no reply without a request id
        executions = await self.cex.outstanding_executions(thing, request.command_type)
        if request.request_id is not None:
            topic = kaa_topics.reply_topic(inbound.topic, ok=True)
        elif executions:
            # No request id, no reply: the outstanding commands go out as a push instead.
            topic = kaa_topics.push_topic(request.app_version, request.token, request.command_type)
        else:
            return
        ids = [e.execution_id for e in executions]
        for execution_id in ids:
            # Delivered by this answer; back into the outbox if the answer does not arrive.
            self._core.outbox.discard(thing.thing_id, execution_id)
        payload = kaa_topics.encode_commands([(e.kaa_id or 0, e.params_json) for e in executions])
        self._core.stats["kaa.command_requests"] += 1
        self._reply(inbound.client_id, topic, payload, inbound.qos, thing.thing_id, ids)

    async def on_result(self, inbound: Inbound) -> None:
        """``kp1/{av}/cex/{token}/result/{type}[/{rid}]``: apply every valid item, acknowledge."""
        await self._bound(inbound, self._result)

    async def _result(self, inbound: Inbound, request: kaa_topics.KaaRequest, thing: ThingRecord) -> None:
        if request.problem is not None:
            if request.reason is not None:
                self.cex.refused(request.reason)
            self._error(inbound, request, KaaError(400, request.problem[:MAX_ERROR_PHRASE]))
            return
        try:
            outcomes = await self.cex.report(thing, request.command_type, request.body)
        except KaaError as exc:
            self._error(inbound, request, exc)
            return
        self._core.stats["kaa.results"] += len(outcomes)
        bad = [(i, o) for i, o in enumerate(outcomes) if o.error is not None]
        if bad:
            self._core.stats["kaa.bad_items"] += len(bad)
            phrase = "; ".join(f"item {i} (id {o.id!r}): {o.error}" for i, o in bad)
            log.info("%s: %d bad result item(s) on %r: %s", inbound.client_id, len(bad), inbound.topic, phrase)
            code = 404 if all(o.status_code == 404 for _i, o in bad) else 400
            self._error(inbound, request, KaaError(code, phrase[:MAX_ERROR_PHRASE]))
        elif request.request_id is not None:
            self._reply(inbound.client_id, kaa_topics.reply_topic(inbound.topic, ok=True), b"{}", inbound.qos)

    def _error(self, inbound: Inbound, request: kaa_topics.KaaRequest, error: KaaError) -> None:
        self._core.stats[f"kaa.errors.{error.status_code}"] += 1
        if request.request_id is None:
            log.info("%s on %r: %s (no request id: not answered)", inbound.client_id, inbound.topic, error)
            return
        topic = kaa_topics.reply_topic(inbound.topic, ok=False)
        payload = kaa_topics.encode_error(error.status_code, error.reason_phrase)
        self._reply(inbound.client_id, topic, payload, inbound.qos)

    def _reply(
        self, client_id: str, topic: str, payload: bytes, qos: int, thing_id: str = "", execution_ids: Sequence[str] = ()
    ) -> None:
        self._spawn(self._deliver(client_id, topic, payload, qos, thing_id, list(execution_ids)), f"kaa-reply-{client_id}")

    async def _deliver(
        self, client_id: str, topic: str, payload: bytes, qos: int, thing_id: str, execution_ids: list[str]
    ) -> None:
        outcome = await self._link.deliver(client_id, topic, payload, qos=qos)
        self._core.stats[f"kaa.replies.{outcome.value}"] += 1
        for execution_id in execution_ids:
            if outcome is Delivery.ACKED:
                try:
                    await self._core.mark_delivered(execution_id)
                except FleetcmdError:
                    log.exception("could not mark %s as delivered", execution_id)
            elif outcome is not Delivery.SENT:
                # Lost with the connection: pushed again when a client of the endpoint is bound.
                self._core.outbox.hold(thing_id, execution_id)
