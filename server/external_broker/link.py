"""The service as an MQTT 5 client of an external broker (paho-mqtt).

One :class:`ExternalBroker` per process replaces the embedded broker at the same two seams:

* **Outbound** it is the outbox's :class:`~server.core.delivery.DeviceLink`. A request is published at
  QoS 1 with MQTT 5's Message Expiry Interval set to the execution's remaining TTL (so a broker holding
  it for an offline device's persistent session drops it when it no longer matters) and the user
  property ``fleetcmd-execution``. The broker's PUBACK means *the broker* took it, not the device:
  that is :attr:`Delivery.SENT` (the outbox forgets it; the device's session holds it). No connection,
  no PUBACK, or "no matching subscribers" leave it in the outbox, which publishes it again when the
  link reconnects (``on_connected``) or the device's connect event arrives.
* **Inbound** it subscribes to every dialect's report topics and hands each publish, decoded by the
  dialects' rules exactly as the embedded broker does, to the core's :class:`~broker_hooks.sink.DeviceSink`.
  Reports arrive at QoS 1 and are acknowledged (paho ``manual_ack``) only once the core says they are
  committed, so a crash before the commit makes the broker deliver them again (the session is kept
  with ``clean_start=False`` and a session expiry). A report applied twice (redelivered, or received by
  several replicas on plain subscriptions) is harmless: the store records the first final status and
  ignores the same report again.

Subscriptions are ``$share/<group>/<filter>`` where the broker shares them, plain otherwise
(``broker_shared``): ``auto`` shares only filters that do not start with ``$``, because Debian's
mosquitto 2.0.11 delivers nothing from ``$``-prefixed topics to a ``$share`` subscription
(tests/test_external_broker.py pins that); EMQX shares both.

Why paho's own network thread (``loop_start``) rather than driving its socket from the event loop:
paho's connect and reconnect resolve and connect synchronously (up to its connect timeout), which
must not block the service's event loop; its thread also keeps the keepalive and the reconnect
backoff. Every callback is handed to the event loop with ``call_soon_threadsafe``; the loop calls
only paho's thread-safe ``publish``/``ack``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import ssl
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker_hooks.rules import DecodeError, RuleSet
from broker_hooks.sink import Delivery, DeviceSink
from server.core.clock import now_ms
from server.core.delivery import Message, Route
from server.core.models import Execution
from server.external_broker import events
from server.external_broker.url import BrokerTarget

log = logging.getLogger(__name__)

# The client id of every inbound message: a broker does not say who published (the report's topic
# names its thing; the broker's ACL made sure the publisher may use it).
BROKER_CLIENT = "$broker"
KEEPALIVE = 30
RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY = 1, 30
# QoS 1 requests in flight at once. MQTT 5 lets a broker disconnect a client that exceeds its Receive
# Maximum, and paho neither reads that from the CONNACK nor lets it be changed on a live connection:
# so the smallest default of the brokers in view (mosquitto's 20; EMQX's is 32). More wait in paho's
# queue (mosquitto 2.0.11 does not enforce it: a burst of 60 went through; EMQX not tried here).
MAX_INFLIGHT = 20
# The largest Receive Maximum MQTT 5 can say (two bytes).
MAX_RECEIVE_MAXIMUM = 65535
# A PUBACK from the broker not in this many seconds: the request stays in the outbox.
PUBACK_TIMEOUT = 10.0
# "No matching subscribers": the broker took the request but no session will receive it.
NO_MATCHING_SUBSCRIBERS = 16

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


@dataclass(frozen=True)
class Subscription:
    """One subscription the link makes: the filter as sent (``$share/...`` or plain) and the dialect filter."""

    topic: str
    shared: bool


def subscriptions(filters: Iterable[str], mode: str, group: str) -> list[Subscription]:
    """The subscriptions for ``filters`` under ``broker_shared`` = ``mode`` (``auto``, ``on``, ``off``)."""
    out = []
    for topic_filter in dict.fromkeys(filters):
        shared = mode == "on" or (mode == "auto" and not topic_filter.startswith("$"))
        out.append(Subscription(f"$share/{group}/{topic_filter}" if shared else topic_filter, shared))
    return out


def remaining_seconds(expires_at_ms: int, now: int) -> int:
    """The Message Expiry Interval of a request: the TTL left, rounded up, at least 1 s (0 would mean "never")."""
    return max(1, math.ceil((expires_at_ms - now) / 1000))


class ExternalBroker:
    """The MQTT 5 client of the external broker (see the module docstring).

    Args:
        target: where the broker is.
        client_id: this replica's client id (stable: the broker keeps its session under it).
        rules: the dialects' rules (their patterns give the report filters, their decoders the reports).
        sink: the core (reports, presence).
        delivered: records DELIVERED for an execution (the core's ``mark_delivered_nowait``).
        spawn: runs a background coroutine under the app's task group.
        shared: ``broker_shared``; group: the ``$share`` group.
        session_expiry: seconds the broker keeps this session while it is away.
        receive_maximum: unacknowledged reports the broker may send at once (their acks wait for commits).
        max_packet_bytes: the largest packet the broker may send (MQTT 5 Maximum Packet Size).
        max_payload_bytes: the largest report payload accepted (larger ones are dropped and counted).
        max_deadlines: requests whose deadline is remembered between route and publish, at most.
    """

    def __init__(
        self,
        target: BrokerTarget,
        *,
        client_id: str,
        username: str = "",
        password: str = "",
        ca_file: str = "",
        rules: RuleSet,
        sink: DeviceSink,
        delivered: Callable[[str], asyncio.Future[Any]],
        spawn: Spawn,
        shared: str = "auto",
        group: str = "fleetcmd",
        session_expiry: int = 3600,
        receive_maximum: int = 1000,
        max_packet_bytes: int = 268_435_455,
        max_payload_bytes: int = 256 * 1024,
        max_deadlines: int = 100_000,
    ) -> None:
        self.target = target
        self.client_id = client_id
        self._rules = rules
        self._sink = sink
        self._delivered = delivered
        self._spawn = spawn
        self._max_payload = max_payload_bytes
        self._max_deadlines = max_deadlines
        filters = [rule.pattern.as_filter() for rule in rules.rules]
        self.subscriptions = subscriptions([*filters, *events.TOPICS], shared, group)
        self.stats: collections.Counter[str] = collections.Counter()
        self.connected = False
        # Called on the event loop after every (re)connect: publish what the outbox holds.
        self.on_connected: Callable[[], None] = lambda: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribed = asyncio.Event()
        # Bumped (in paho's thread) on every CONNACK: an ack for a message of an older connection is not sent.
        self._generation = 0
        self._publishes: dict[int, asyncio.Future[Delivery]] = {}
        # payload -> (deadline, execution id), from a route's messages() to the publish of that payload.
        self._deadlines: dict[bytes, tuple[int, str]] = {}
        self._routes: dict[int, _DeadlineRoute] = {}
        self._stopping = False
        # Drop reasons already logged (a fixed set of short codes: DecodeError and JSON reasons).
        self._logged: set[str] = set()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
            reconnect_on_failure=True,
        )
        if username or password:
            client.username_pw_set(username or None, password or None)
        if target.tls:
            client.tls_set_context(ssl.create_default_context(cafile=ca_file or None))
        client.reconnect_delay_set(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_subscribe = self._paho_subscribe
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        self._client = client
        self._connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        self._connect_properties.SessionExpiryInterval = session_expiry
        self._connect_properties.ReceiveMaximum = max(1, min(receive_maximum, MAX_RECEIVE_MAXIMUM))
        self._connect_properties.MaximumPacketSize = max_packet_bytes

    # ---- start and stop -----------------------------------------------------------------------

    async def start(self, timeout: float) -> bool:
        """Connect (paho's thread retries with backoff for ever); wait at most ``timeout`` s for the subscriptions.

        Returns:
            Whether the link is connected and subscribed (False: it goes on trying in the background).
        """
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(
            self.target.host, self.target.port, KEEPALIVE, clean_start=False, properties=self._connect_properties
        )
        self._client.loop_start()
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        except TimeoutError:
            log.warning("external broker %s: not connected after %g s; still trying", self.target, timeout)
            return False
        return True

    async def stop(self) -> None:
        """Disconnect and end paho's thread; requests waiting for a PUBACK stay in the outbox."""
        self._stopping = True
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._lost()

    # ---- DeviceLink (the outbox and the dialects' routes) -------------------------------------------

    def subscription_qos(self, client_id: str, topic: str) -> int | None:
        """QoS 1 while connected: the broker (and the device's persistent session) takes requests."""
        return 1 if self.connected else None

    def is_connected(self, client_id: str) -> bool:
        """Whether the link is up (a device's own presence is not known here: see the event topics)."""
        return self.connected

    def deliver_nowait(
        self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None
    ) -> Delivery | asyncio.Future[None] | None:
        """Always None: the outcome is the broker's PUBACK, awaited in :meth:`deliver`."""
        return None

    async def deliver(self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None) -> Delivery:
        """Publish to the broker (``client_id`` is not needed: the broker routes by topic).

        Returns:
            SENT once the broker acknowledged it (or wrote a QoS 0 one), NOT_CONNECTED without a
            connection, NOT_SUBSCRIBED when the broker says no session receives it, FAILED otherwise.
        """
        if not self.connected:
            return Delivery.NOT_CONNECTED
        qos = min(max_qos, 1 if qos is None else qos)
        properties = None
        noted = self._deadlines.pop(payload, None)
        if noted is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = remaining_seconds(noted[0], now_ms())
            properties.UserProperty = [(events.EXECUTION_PROPERTY, noted[1])]
        info = self._client.publish(topic, payload, qos=qos, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.stats["publish_failed"] += 1
            return Delivery.FAILED
        if qos == 0:
            return Delivery.SENT
        assert self._loop is not None
        # Registered before the PUBACK can be handled: paho's callback reaches this loop only later.
        waiter: asyncio.Future[Delivery] = self._loop.create_future()
        self._publishes[info.mid] = waiter
        try:
            return await asyncio.wait_for(waiter, PUBACK_TIMEOUT)
        except TimeoutError:
            self.stats["puback_timeouts"] += 1
            return Delivery.FAILED
        finally:
            self._publishes.pop(info.mid, None)

    def wrap_routes(self, route_for: Callable[[str], Route | None]) -> Callable[[str], Route | None]:
        """The outbox's route lookup, its routes' messages noting each request's deadline and id for :meth:`deliver`."""

        def wrapped(thing_id: str) -> Route | None:
            route = route_for(thing_id)
            if route is None:
                return None
            tagged = self._routes.get(id(route))
            if tagged is None:
                tagged = self._routes[id(route)] = _DeadlineRoute(route, self)
            return tagged

        return wrapped

    def note(self, payload: bytes, expires_at_ms: int, execution_id: str) -> None:
        """Remember the deadline and execution of a request about to be published (bounded: oldest first out)."""
        deadlines = self._deadlines
        deadlines[payload] = (expires_at_ms, execution_id)
        if len(deadlines) > self._max_deadlines:
            del deadlines[next(iter(deadlines))]

    # ---- paho's thread ---------------------------------------------------------------------------

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    def _paho_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            log.warning("external broker %s refused the connection: %s", self.target, reason)
            return
        receive_maximum = getattr(properties, "ReceiveMaximum", MAX_RECEIVE_MAXIMUM)
        if receive_maximum < MAX_INFLIGHT:
            log.warning("external broker %s: its Receive Maximum %d is below %d", self.target, receive_maximum, MAX_INFLIGHT)
        self._generation += 1
        # Subscribed on every connect: a new session (expired, or a broker that lost it) has none.
        options = [(s.topic, SubscribeOptions(qos=1, noLocal=not s.shared)) for s in self.subscriptions]
        client.subscribe(options)
        self._call(self._connected)

    def _paho_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any) -> None:
        refused = [s.topic for s, r in zip(self.subscriptions, reasons, strict=False) if r.is_failure]
        if refused:
            log.warning("external broker %s refused the subscriptions %s", self.target, refused)
        self._call(self._subscribed.set)

    def _paho_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if not self._stopping:
            log.warning("external broker %s: connection lost (%s); reconnecting", self.target, reason)
        self._call(self._lost)

    def _paho_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._call(self._message, message, self._generation)

    def _paho_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        self._call(self._puback, mid, reason.value)

    # ---- the event loop ---------------------------------------------------------------------------

    def _connected(self) -> None:
        self.connected = True
        self.stats["connects"] += 1
        log.info("external broker %s: connected as %s", self.target, self.client_id)
        self.on_connected()

    def _lost(self) -> None:
        self.connected = False
        self._subscribed.clear()
        for waiter in self._publishes.values():
            if not waiter.done():
                waiter.set_result(Delivery.FAILED)

    def _puback(self, mid: int, reason: int) -> None:
        waiter = self._publishes.get(mid)
        if waiter is None or waiter.done():
            return
        if reason == NO_MATCHING_SUBSCRIBERS:
            waiter.set_result(Delivery.NOT_SUBSCRIBED)
        elif reason >= 0x80:
            waiter.set_result(Delivery.FAILED)
        else:
            waiter.set_result(Delivery.SENT)

    def _drop(self, reason: str, topic: str, detail: object = "") -> None:
        self.stats[f"dropped.{reason}"] += 1
        # Logged once per reason, then only counted: on shared and plain subscriptions the service also
        # receives what it (or another replica) published to a subscribed filter, e.g. Kaa pushes.
        level = logging.DEBUG if reason in self._logged else logging.INFO
        self._logged.add(reason)
        log.log(level, "external broker: unusable message on %r (%s) dropped%s", topic, reason, f": {detail}" if detail else "")

    def _message(self, message: mqtt.MQTTMessage, generation: int) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._drop("invalid_topic", repr(message._topic))
            self._ack(message.mid, message.qos, generation)
            return
        payload = bytes(message.payload)
        if len(payload) > self._max_payload:
            self._drop("oversized", topic, f"{len(payload)} bytes, limit {self._max_payload}")
        elif topic.startswith(events.PREFIX):
            self._event(topic, payload)
        else:
            try:
                inbound = self._rules.route(BROKER_CLIENT, topic, payload, message.qos)
            except DecodeError as exc:
                self._drop(exc.reason, topic, exc)
            else:
                if inbound is None:
                    self._drop("unrouted", topic)
                else:
                    applied = self._sink.device_message_nowait(inbound)
                    if applied is None:
                        # The ingest queue is full (the Receive Maximum normally keeps it from that).
                        self.stats["ingest_full"] += 1
                        self._spawn(self._ingest_waiting(inbound, message, generation), "broker-ingest-wait")
                    else:
                        self.stats["routed"] += 1
                        applied.add_done_callback(functools.partial(self._applied, message.mid, message.qos, generation))
                    return
        self._ack(message.mid, message.qos, generation)

    async def _ingest_waiting(self, inbound: Any, message: mqtt.MQTTMessage, generation: int) -> None:
        applied = await self._sink.device_message(inbound)
        self.stats["routed"] += 1
        applied.add_done_callback(functools.partial(self._applied, message.mid, message.qos, generation))

    def _applied(self, mid: int, qos: int, generation: int, applied: asyncio.Future[None]) -> None:
        # Committed: acknowledge. Not stored (the store is closing or failing): no ack, the broker sends it again.
        if applied.cancelled() or applied.exception() is not None:
            self.stats["unacked.not_stored"] += 1
            return
        self._ack(mid, qos, generation)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        # A message of an older connection: its mid means nothing now; the broker sends it again.
        if qos > 0 and generation == self._generation and self.connected:
            self._client.ack(mid, qos)
            self.stats["acked"] += 1

    def _event(self, topic: str, payload: bytes) -> None:
        if topic not in events.TOPICS:
            self._drop("unrouted", topic)
            return
        try:
            event = events.decode(topic, payload)
        except DecodeError as exc:
            self._drop(exc.reason, topic, exc)
            return
        if isinstance(event, events.Presence):
            self.stats["events.presence"] += 1
            if event.online:
                self._sink.device_connected(event.client_id, event.remote_address)
            else:
                self._sink.device_disconnected(event.client_id)
        elif isinstance(event, events.Acked):
            self.stats["events.acked"] += 1
            self._delivered(event.execution_id).add_done_callback(self._delivered_done)

    def _delivered_done(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.stats["events.acked_unknown"] += 1
            log.info("external broker: PUBACK event for an execution that cannot be marked: %s", future.exception())


class _DeadlineRoute:
    """A dialect's route whose messages note their execution's deadline and id with the link."""

    def __init__(self, route: Route, link: ExternalBroker) -> None:
        self._route = route
        self._link = link

    def ready(self, thing_id: str) -> bool:
        """See :class:`server.core.delivery.Route`."""
        return self._route.ready(thing_id)

    def messages(self, execution: Execution) -> list[Message]:
        """See :class:`server.core.delivery.Route`."""
        out = self._route.messages(execution)
        for message in out:
            self._link.note(message.payload, execution.expires_at_ms, execution.execution_id)
        return out
