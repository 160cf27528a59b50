"""``FleetBroker``: amqtt 0.12.1's ``Broker`` with the defects that matter to fleetcmd fixed.

What it changes (see ``shared/notes/amqtt-0.12.1.md`` for the defects):

* ``$`` topics: device publishes to the command-response topics are accepted;
  any other ``$`` publish is dropped and counted, and the connection stays
  healthy (stock amqtt leaves a zombie connection behind).
* Empty or wildcard topic names in a PUBLISH really close the connection.
* Publishes whose topic a rule claims are decoded by that rule and handed to
  the control plane (``DeviceSink``) in order, from the connection's reader
  while the control plane's queue has room, else in the client's own message
  loop, so a slow control plane slows only that client. Such a QoS 1 publish
  is PUBACKed once what it changes is stored, not before.
  Garbage is logged, counted and dropped; the device stays connected.
* Keep-alive is enforced: a client silent for 1.5 x its keep-alive is disconnected.
* A CONNECT is authenticated before amqtt looks up its client id, so a refused
  client can neither take over nor end a connected device's connection, and
  leaves no session behind; refusals are counted (``auth_failures``).
* The topic ACL (``acl.DeviceAclPlugin``) is checked for every device publish,
  before the ``$``-topic routing, and denials are counted (``dropped.acl``,
  ``denied.subscribe``). ``disconnect_client`` ends one client's connection.
* Subscriptions are indexed per client (``indexed.IndexedBroker``) so "may
  this device receive this request?" costs one dictionary lookup and connects,
  disconnects and ACL checks do not walk the whole fleet; the sink hears of
  connects, subscriptions and disconnects in order.
* ``deliver`` publishes straight to one client's protocol handler and reports
  whether it PUBACKed, which the broadcast path cannot.
* Connections get a ``handler.FastProtocolHandler``, whose reader hands a
  PUBLISH to the broker directly (``publish_inline``); publishes that may end
  the connection still take the message loop.
* The listener survives the internet (``limits``): a connection has ``connect_timeout``
  seconds to send its CONNECT, which must be its first packet; a packet declaring more than
  ``max_packet_bytes`` ends its connection before its body is read; connections are capped
  overall and per source address; whatever ends a connection, refused or abandoned, its socket
  is released at once. Each refusal is counted (``closed.<reason>``, ``refused.<cap>``) and
  logged at most once per 10 s per kind.
* ``stop`` is bounded: on Python 3.11 ``shutdown()`` can hang when an ack
  races the reader cancellation, so client writers are closed first and the
  whole shutdown has a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import ssl
import weakref
from collections.abc import Sequence
from typing import Any

import websockets
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, Session
from amqtt.utils import gen_client_id

from broker_hooks.amqtt_fork.handler import FastProtocolHandler, in_background
from broker_hooks.amqtt_fork.indexed import SUBACK_FAILURE, IndexedBroker
from broker_hooks.amqtt_fork.limits import MQTT_MAX_PACKET, FirstPacketError, RefusalLog, bounded, close_now
from broker_hooks.mqtt_codec import MAX_FIXED_HEADER
from broker_hooks.rules import DecodeError, RuleSet
from broker_hooks.sink import Delivery, DeviceSink

log = logging.getLogger(__name__)

KEEPALIVE_FACTOR = 1.5
# asyncio's default listen backlog is 100: a fleet reconnecting at once (a broker restart) overflows
# it, and the kernel drops SYNs that clients retry only after a second. Linux caps it at somaxconn.
DEFAULT_BACKLOG = 4096
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 100_000
# Room in a packet for the topic, packet id and headers around a largest device response.
PACKET_OVERHEAD = 64 * 1024


class FleetBroker(IndexedBroker):
    """The embedded broker. Build it inside the running event loop."""

    def __init__(
        self,
        config: BrokerConfig | dict[str, Any],
        *,
        rules: RuleSet,
        sink: DeviceSink,
        dollar_prefixes: Sequence[str],
        max_payload_bytes: int,
        listen_backlog: int = DEFAULT_BACKLOG,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_packet_bytes: int | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_address: int = 0,
    ) -> None:
        super().__init__(config)
        self._backlog = listen_backlog
        self.connect_timeout = connect_timeout
        # Bytes after a packet's fixed header; never below a largest device response.
        self.max_packet_bytes = (
            min(max_payload_bytes + PACKET_OVERHEAD, MQTT_MAX_PACKET) if max_packet_bytes is None else max_packet_bytes
        )
        self._max_connections = max_connections
        self._max_per_address = max_connections_per_address  # 0: no cap
        self.open_connections = 0
        self._per_address: dict[str, int] = {}
        self._refusal_log = RefusalLog()
        self._rules = rules
        self._sink = sink
        self._dollar_prefixes = tuple(dollar_prefixes)
        self._max_payload = max_payload_bytes
        self.stats: collections.Counter[str] = collections.Counter()
        # Handlers of connections that a new CONNECT with the same persistent session is taking over.
        self._replaced: weakref.WeakSet[BrokerProtocolHandler] = weakref.WeakSet()
        # Handlers of CONNECTs refused before amqtt touched any session.
        self._refused: weakref.WeakSet[BrokerProtocolHandler] = weakref.WeakSet()

    # ---- addresses ------------------------------------------------------------------------

    def listener_port(self, name: str) -> int:
        """The port a started listener (by amqtt name) is bound to (useful with port 0)."""
        server = self._servers[name].instance
        sockets = list(server.sockets)
        return int(sockets[0].getsockname()[1])

    def listener_ports(self) -> dict[str, int]:
        """Bound port of every started listener by kind: ``mqtt``, ``ws``, ``mqtts``, ``wss``."""
        ports: dict[str, int] = {}
        listener: ListenerConfig
        for name, listener in self.listeners_config.items():
            if name in self._servers:
                kind = "ws" if listener.type == ListenerType.WS else "mqtt"
                ports[kind + ("s" if listener.ssl else "")] = self.listener_port(name)
        return ports

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        """Amqtt's listeners (0.12.1): TCP with a listen backlog sized for a fleet, WebSocket with a message size limit.

        A WebSocket message holds one MQTT packet (or a few small ones): bounding it by the packet
        limit keeps websockets from buffering a large message before amqtt sees any of it
        (websockets' own default is 1 MiB).
        """
        if listener_type == ListenerType.WS:
            return await websockets.serve(
                functools.partial(self.ws_connected, listener_name=listener_name),
                address,
                port,
                ssl=ssl_context,
                subprotocols=[websockets.Subprotocol("mqtt")],
                max_size=self.max_packet_bytes + MAX_FIXED_HEADER,
            )
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        return await asyncio.start_server(
            functools.partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            backlog=self._backlog,
        )

    # ---- connections ----------------------------------------------------------------------

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """Amqtt's ``_client_connected`` (0.12.1) within the connection caps, releasing the socket whatever ends it.

        amqtt leaves the socket of a connection it gave up on (no CONNECT, a refused one, an
        error) open until the garbage collector finds it, so a health check that connects and
        closes used up the process's descriptors; and it logs every connection (INFO) and every
        failed CONNECT (WARNING), a line per packet of a storm. Here a connection that ends
        before its session is counted and logged at most once per 10 s per reason
        (:meth:`_session_from_connect`). Reads above the packet limit are refused where amqtt's
        own reader loop reads (:func:`broker_hooks.amqtt_fork.limits.bounded`).

        Raises:
            BrokerError: ``listener_name`` is not a started listener.
        """
        server = self._servers.get(listener_name)
        if not server:
            msg = f"Invalid listener name '{listener_name}'"
            raise BrokerError(msg)
        peer = writer.get_peer_info()
        if peer is None:
            log.warning("remote address of a new connection could not be retrieved: closing it")
            close_now(writer)
            return
        address, port = peer
        refusal = self._over_cap(address)
        if refusal is not None:
            self.stats[f"refused.{refusal}"] += 1
            self._refusal_log.warning(
                refusal,
                "MQTT connection from %s refused: %s reached (%d open; mqtt_max_connections=%d, "
                "mqtt_max_connections_per_address=%d)",
                address,
                refusal,
                self.open_connections,
                self._max_connections,
                self._max_per_address,
            )
            close_now(writer)
            return
        self.open_connections += 1
        if self._max_per_address:
            self._per_address[address] = self._per_address.get(address, 0) + 1
        acquired = False
        try:
            await server.acquire_connection()  # amqtt's per-listener max_connections: 0 (off) in fleetcmd
            acquired = True
            log.debug("connection from %s:%s on listener %r", address, port, listener_name)
            reader = bounded(reader, self.max_packet_bytes, self)
            try:
                handler, client_session = await self._initialize_client_session(reader, writer, address, port)
            except (AMQTTError, MQTTError, NoDataError):
                return  # counted and logged in _session_from_connect
            try:
                await self._handle_client_session(reader, writer, client_session, handler, server, listener_name)
            except (AMQTTError, MQTTError, NoDataError, ConnectionError) as exc:
                # A peer gone while its CONNACK is written, too: expected, no traceback.
                log.warning("error while handling the session of %s: %r", client_session.client_id, exc)
        finally:
            if acquired:
                server.release_connection()
            self.open_connections -= 1
            if self._max_per_address:
                left = self._per_address.pop(address, 1) - 1
                if left > 0:
                    self._per_address[address] = left
            close_now(writer)

    def _over_cap(self, address: str) -> str | None:
        """The cap a new connection from ``address`` would exceed, if any."""
        if self.open_connections >= self._max_connections:
            return "max_connections"
        if self._max_per_address and self._per_address.get(address, 0) >= self._max_per_address:
            return "max_connections_per_address"
        return None

    def protocol_violation(self, client_id: str | None, reason: str, detail: str) -> None:
        """A connection is being closed for a malformed or oversized packet: count and log it (rate-limited)."""
        self.stats[f"closed.{reason}"] += 1
        self._refusal_log.warning(reason, "client %s: %s: closing the connection [MQTT-4.8.0-1]", client_id, detail)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await self._session_from_connect(reader, writer, remote_address, remote_port)
        if handler in self._refused:
            return handler, session
        current = self._sessions.get(session.client_id or "")
        if current is not None and current[0] is session and session.transitions.is_connected():
            # Persistent session of a connected client: amqtt will take it over and stop the old
            # handler, whose disconnect must then leave the (shared) session alone, see _handle_disconnect.
            self._replaced.add(current[1])
        if session.keep_alive > 0:
            # The reader times out after session.keep_alive seconds of silence; MQTT allows 1.5x.
            # A float is fine: amqtt only hands it to asyncio.wait_for as the read timeout.
            session.keep_alive = session.keep_alive * KEEPALIVE_FACTOR
        if isinstance(handler, FastProtocolHandler):
            # The reader hands each PUBLISH to the broker itself (no hop through the message loop), and
            # reports keep-alive timeouts here (amqtt's handler only logs them).
            handler.broker = self
        return handler, session

    async def _session_from_connect(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """The ``_initialize_client_session`` of amqtt 0.12.1, with authentication moved first.

        amqtt authenticates only after it has looked up the client id: a clean-session CONNECT
        deletes the existing session (fleetcmd then closes its connection), and a persistent one
        takes over the connected client and leaves the session marked connected under a closed
        socket. Any CONNECT with a known client id, whatever its password, would knock that device
        off. Here a refused CONNECT gets its CONNACK (rc 5) before anything else is touched, and
        :meth:`_connect_verdict` then stops ``_handle_client_session`` from doing anything more for it, and
        tells it an admitted CONNECT is authenticated already (amqtt would run the auth plugins again).
        """
        try:
            # A FleetSession (no transitions.Machine, light queues) and its handler (session.FleetProtocolHandler
            # with handler.FastProtocolHandler's packet path), from a CONNECT that has to come first and in time.
            async with asyncio.timeout(self.connect_timeout):
                handler, incoming = await FastProtocolHandler.init_from_connect(
                    reader, writer, self.plugins_manager, max_packet_bytes=self.max_packet_bytes
                )
        except FirstPacketError as exc:
            self._connect_refused(exc.reason, remote_address, remote_port, str(exc))
            raise AMQTTError(exc) from None
        except TimeoutError:
            detail = f"no CONNECT within {self.connect_timeout}s"
            self._connect_refused("connect_timeout", remote_address, remote_port, detail)
            raise AMQTTError(detail) from None
        except MQTTError as exc:
            # Refused by amqtt's checks (CONNACK sent) or malformed.
            self._connect_refused("invalid_connect", remote_address, remote_port, str(exc))
            raise MQTTError(exc) from exc
        except (AMQTTError, NoDataError, ConnectionError) as exc:
            self._connect_refused("no_connect", remote_address, remote_port, repr(exc))
            raise AMQTTError(exc) from exc

        if not await self._authenticate(incoming, ListenerConfig()):
            self._refused.add(handler)
            with contextlib.suppress(Exception):  # the client may already be gone
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)  # [MQTT-3.2.2-4] no session present
            with contextlib.suppress(Exception):
                await writer.close()
            return handler, incoming

        client_session: Session = incoming
        if client_session.clean_session:
            if client_session.client_id:
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            # The existing session, with the new connection's configuration and credentials.
            existing, _ = self._sessions[client_session.client_id]
            existing.will_flag = client_session.will_flag
            existing.will_message = client_session.will_message
            existing.will_topic = client_session.will_topic
            existing.will_qos = client_session.will_qos
            existing.keep_alive = client_session.keep_alive
            existing.username = client_session.username
            existing.password = client_session.password
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(delay, int):
            client_session.keep_alive += delay
        return handler, client_session

    def _connect_refused(self, reason: str, address: str, port: int, detail: str) -> None:
        """A connection ends without a session: counted and logged (rate-limited); ``_client_connected`` releases its socket."""
        self.stats[f"closed.{reason}"] += 1
        self._refusal_log.warning(reason, "MQTT connection from %s:%s closed before CONNECT: %s", address, port, detail)

    def _connect_verdict(self, handler: BrokerProtocolHandler) -> bool:
        # Every CONNECT was authenticated in _session_from_connect, once: refused ones are in _refused
        # (CONNACK sent, socket closed), every other one passed.
        if handler in self._refused:
            self._refused.discard(handler)
            return False
        return True

    def keepalive_expired(self, session: Session, handler: BrokerProtocolHandler) -> None:
        """Disconnect a client silent for 1.5 x its keep-alive (see :class:`~broker_hooks.amqtt_fork.handler.BrokerHooks`)."""
        self.stats["keepalive_timeouts"] += 1
        log.info("client %s silent for %ss (1.5 x keep-alive): disconnecting", session.client_id, session.keep_alive)
        if handler.writer is not None:
            # Closing the transport makes the reader see EOF, which runs the normal
            # abnormal-disconnect path (will message, disconnected event).
            in_background(handler.writer.close())

    def _session_connected(self, client_session: Session) -> None:
        remote = f"{client_session.remote_address}:{client_session.remote_port}"
        self._notify(self._sink.device_connected, client_session.client_id, remote)

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        if handler in self._replaced:
            # Taken over: the Session object now belongs to the new connection. amqtt would mark it
            # disconnected under the live client (so it would be treated as offline); only end this one.
            self._replaced.discard(handler)
            self.stats["takeovers"] += 1
            log.info("client %s connected again: its previous connection ended", client_session.client_id)
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        self._notify(self._sink.device_disconnected, client_session.client_id)

    async def _force_disconnect(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        await self._handle_disconnect(client_session, handler, done)

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        authenticated: bool = await super()._authenticate(session, listener)
        if not authenticated:
            self.stats["auth_failures"] += 1
        return authenticated

    def disconnect_client(self, client_id: str) -> None:
        """End a client's live connection, if any (its thing was deleted or its credentials rotated).

        The socket is closed, which runs the normal disconnect path; a reconnect has to
        authenticate again.
        """
        entry = self._sessions.get(client_id)
        if entry is None or entry[0].transitions.state != "connected":
            return
        writer = entry[1].writer
        if writer is None:
            return
        self.stats["forced_disconnects"] += 1
        log.info("closing the connection of client %s", client_id)
        in_background(writer.close())

    # ---- subscriptions --------------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Subscribe as amqtt does (indexed), and count denials."""
        granted: int = await super().add_subscription(subscription, session)
        if granted == SUBACK_FAILURE:
            self.stats["denied.subscribe"] += 1
            log.info("client %s may not subscribe to %r: SUBACK 0x80", session.client_id, subscription[0])
        return granted

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        await super()._handle_subscription(client_session, handler, subscribe_waiter)
        filters = self.client_filters(client_session.client_id or "")
        granted = [(f, filters[f]) for f, _ in subscribe_waiter.result().topics if f in filters]
        if granted:
            self._notify(self._sink.device_subscribed, client_session.client_id, granted)

    async def _delete_session(self, client_id: str) -> None:
        entry = self._sessions.get(client_id)
        if entry is not None and entry[0].transitions.state == "connected":
            # [MQTT-3.1.4-2] a clean-session CONNECT reusing a connected client id must end the old
            # connection. amqtt only forgets it: the old socket stays open and its in-flight
            # publishes wait 5 s for a PUBACK. Closing the transport runs the normal disconnect path.
            self.stats["takeovers"] += 1
            log.info("client %s connected again: closing its previous connection", client_id)
            writer = entry[1].writer
            if writer is not None:
                with contextlib.suppress(Exception):  # already closed or broken: fine either way
                    await asyncio.wait_for(writer.close(), 1)
        await super()._delete_session(client_id)

    # ---- device -> service ----------------------------------------------------------------

    async def _process_message(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        app_message: ApplicationMessage | None,
        *,
        inline: bool = False,
    ) -> bool | None:
        """A device's PUBLISH: checked, then routed to subscribers or, when a rule claims it, to the sink.

        With ``inline`` (from the connection's reader) a message that would end the connection,
        or that the control plane has no room for, is left to the client's message loop (None):
        the reader must not wait, it has to go on reading the device's PUBACKs meanwhile.
        """
        if app_message is None:
            return True
        topic: str = app_message.topic or ""
        client_id = client_session.client_id or ""
        if not topic or "#" in topic or "+" in topic:
            if inline:
                return None
            # [MQTT-4.7.3-1] / [MQTT-3.3.2-2]: a protocol violation; really close (stock code leaves a zombie).
            self.stats["invalid_topic_disconnects"] += 1
            log.warning("client %s published to invalid topic %r: disconnecting", client_id, topic)
            await self._force_disconnect(client_session, handler)
            return False
        is_dollar = topic.startswith("$")
        if is_dollar and not topic.startswith(self._dollar_prefixes):
            self.stats["dropped.dollar_topic"] += 1
            log.warning("client %s published to reserved topic %r: dropped", client_id, topic)
            return True
        # The ACL comes before "no rule claims it", so a device publishing to a request topic counts as an ACL drop.
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            self.stats["dropped.acl"] += 1
            log.info("client %s may not publish to %r: dropped", client_id, topic)
            return True
        if not self._rules.claims(topic):
            if is_dollar:
                self.stats["dropped.unrouted"] += 1
                log.warning("client %s published to %r, which no rule handles: dropped", client_id, topic)
                return True
            return await super()._process_message(client_session, handler, app_message, inline=inline)
        data = bytes(app_message.data or b"")
        if len(data) > self._max_payload:
            self.stats["dropped.oversized"] += 1
            log.warning("client %s sent %d bytes to %r (limit %d): dropped", client_id, len(data), topic, self._max_payload)
            return True
        try:
            inbound = self._rules.route(client_id, topic, data, int(app_message.qos or 0))
        except DecodeError as exc:
            self.stats[f"dropped.{exc.reason}"] += 1
            log.warning("client %s sent an unusable message to %r: %s", client_id, topic, exc)
            return True
        if inbound is None:  # pragma: no cover - claims() said a rule matches
            return True
        try:
            if inline:
                # From the reader, which must never wait here (it also reads the PUBACKs the
                # control plane may be waiting for): a full queue sends it to the message loop.
                written = self._sink.device_message_nowait(inbound)
                if written is None:
                    self.stats["ingest_full"] += 1
                    return None
            else:
                written = await self._sink.device_message(inbound)
        except Exception:
            self.stats["sink_errors"] += 1
            log.exception("control plane failed on a message from %s on %r", client_id, topic)
            return True
        self.stats["routed"] += 1
        if isinstance(handler, FastProtocolHandler):
            # Its PUBACK waits until it is stored: a crash before that leaves the device to send it again.
            handler.hold_ack(app_message, written)
        return True

    def _notify(self, callback: Any, *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            self.stats["sink_errors"] += 1
            log.exception("control plane callback %s failed", getattr(callback, "__name__", callback))

    # ---- service -> device ----------------------------------------------------------------

    def _target(self, client_id: str, topic: str, max_qos: int, qos: int | None) -> tuple[BrokerProtocolHandler, int] | Delivery:
        """The connection and QoS a publish to ``client_id`` goes out with, or why there is none."""
        entry = self._sessions.get(client_id)
        if entry is None or entry[0].transitions.state != "connected":
            return Delivery.NOT_CONNECTED
        if qos is None:
            subscribed = self.subscription_qos(client_id, topic)
            if subscribed is None:
                return Delivery.NOT_SUBSCRIBED
            qos = min(subscribed, max_qos)
        return entry[1], qos

    def deliver_nowait(
        self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None
    ) -> Delivery | asyncio.Future[None] | None:
        """:meth:`deliver` without waiting, when the connection can take the publish at once.

        Returns:
            The outcome when it is known now (not connected, not subscribed, SENT at QoS 0); a
            future done on the PUBACK (failing without one: :meth:`deliver`'s FAILED); None when
            the publish was not written (use :meth:`deliver`).
        """
        target = self._target(client_id, topic, max_qos, qos)
        if isinstance(target, Delivery):
            return target
        handler, qos = target
        if not isinstance(handler, FastProtocolHandler):
            return None
        outcome = handler.publish_tracked(topic, payload, qos)
        if outcome is None or qos > 0:
            return outcome
        return Delivery.SENT

    async def deliver(self, client_id: str, topic: str, payload: bytes, *, max_qos: int = 1, qos: int | None = None) -> Delivery:
        """Publish to one client, at the QoS of its subscription (at most ``max_qos``).

        With ``qos`` given the client gets the message at that QoS whether it subscribed or not
        (a protocol reply, or a Kaa push that firmware handles by topic without subscribing).

        Returns:
            ACKED when the client PUBACKed, SENT for QoS 0, otherwise why it was not delivered.
        """
        target = self._target(client_id, topic, max_qos, qos)
        if isinstance(target, Delivery):
            return target
        handler, qos = target
        task = asyncio.current_task()
        try:
            # Written at once and its PUBACK awaited on a future when the connection allows it.
            outcome = handler.publish_tracked(topic, payload, qos) if isinstance(handler, FastProtocolHandler) else None
            if outcome is not None:
                await outcome
            else:
                # publish_owned: the outbox redelivers its own requests, the session must not keep them too.
                await (
                    handler.publish_owned(topic, payload, qos)
                    if isinstance(handler, FastProtocolHandler)
                    else handler.mqtt_publish(topic, payload, qos, False)
                )
        except asyncio.CancelledError:
            # The handler cancels its PUBACK waiters when the connection drops; only
            # re-raise when it is this task that is being cancelled.
            if task is not None and task.cancelling():
                raise
            return Delivery.FAILED
        except Exception as exc:  # noqa: BLE001 - TimeoutError (no PUBACK in 5 s), connection errors
            log.info("delivery to %s on %r failed: %r", client_id, topic, exc)
            return Delivery.FAILED
        return Delivery.ACKED if qos > 0 else Delivery.SENT

    # ---- lifecycle ------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Shut down within ``timeout`` seconds, whatever amqtt does."""
        for _session, handler in list(self._sessions.values()):
            writer = handler.writer
            if writer is not None:
                # Already closed or broken is fine either way.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.close(), 1)
        try:
            await asyncio.wait_for(self.shutdown(), timeout)
        except Exception:
            log.warning("broker shutdown did not finish cleanly within %ss; closing listeners", timeout, exc_info=True)
            for server in self._servers.values():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.close_instance(), 1)
