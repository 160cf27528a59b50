"""``FastProtocolHandler``: amqtt 0.12.1's broker protocol handler with a cheap per-packet path.

For every packet amqtt's ``ProtocolHandler._reader_loop`` reads the fixed header a
byte at a time under ``asyncio.wait_for`` (a task per packet on Python 3.11 plus a
timer), decodes the rest with one await per field, and starts one more task to handle
it. A QoS 1 PUBLISH is then queued for the client's message loop (another task hop)
and, per subscriber, forwarded by a task that holds the write lock, drains, re-arms a
write-timeout timer that does nothing in a broker, and waits up to 5 s for the PUBACK
under ``asyncio.wait_for``.

Here, on TCP and TLS connections (``asyncio`` streams) and while no plugin listens to
packet events:

* a packet is read with two ``readexactly`` calls (header, body) and decoded from
  bytes; the keep-alive read timeout is one timer per connection that checks the time
  of the last packet, and calls ``handle_read_timeout`` as amqtt's would (which tells
  the broker, :class:`BrokerHooks`);
* PUBLISH (QoS 0 and 1), PUBACK, PINGREQ and DISCONNECT are handled in the reader
  itself; the other packets go to amqtt's ``handle_*`` methods as upstream, in a task
  that the reader holds only while it runs;
* an incoming PUBLISH is handed to the broker (``BrokerHooks.publish_inline``) in the reader, in
  arrival order, and is PUBACKed after that; what the broker declines (handling that
  can end the connection or waits on the control plane) is queued for the client's
  message loop as amqtt does, and so is every later message until the loop caught up,
  which keeps the client's messages in order; its PUBACK waits until the loop has
  handled it;
* a message the control plane takes over is PUBACKed only once it is written
  (:meth:`hold_ack`): a crash before that leaves the device to send it again. PUBACKs
  still go out in the order the PUBLISHes came [MQTT-4.6.0-2];
* :meth:`publish_nowait` writes a PUBLISH at once; :meth:`publish_tracked` does the same
  for the control plane and tracks its PUBACK with one timer (amqtt's 5 s, after which the
  caller is told it failed);
* an outgoing QoS 1/2 message routed from a publisher (a :class:`KeptMessage`) stays in the
  session until its PUBACK, with no timeout; when a persistent session's connection ends
  they are kept, and the next connection (``clean_session=false``) gets them again, first,
  with the same packet id and the DUP flag [MQTT-4.4.0-1]. At most
  :data:`MAX_KEPT_INFLIGHT` per session: beyond, the oldest is dropped and counted. On
  amqtt's path (below) its flow still gives up on a PUBACK after 5 s.

Other connections (WebSocket), QoS 2 and plugins listening to packet events take
amqtt's own paths, with one change: an incoming QoS 1 PUBLISH is PUBACKed as above (once
the message loop handled it and the control plane wrote what it holds), not as soon as it
is queued. ``tests/test_broker_scaling.py`` pins the upstream methods this
re-implements.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from amqtt.adapters import BufferReader, ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.errors import AMQTTError, MQTTError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket, PublishPayload, PublishVariableHeader
from amqtt.session import ApplicationMessage, IncomingApplicationMessage, OutgoingApplicationMessage, Session

from broker_hooks.amqtt_fork.limits import MQTT_MAX_PACKET
from broker_hooks.amqtt_fork.session import FleetProtocolHandler, FleetSession
from broker_hooks.mqtt_codec import PINGRESP_PACKET, REQUIRED_FLAGS, encode_publish

log = logging.getLogger(__name__)

# Writes to and closes of connections started from callbacks, kept referenced until they end.
_BACKGROUND: set[asyncio.Future[Any]] = set()

# amqtt's hard-coded wait for a PUBACK (handler.py, _handle_qos1_message_flow).
PUBACK_TIMEOUT = 5.0
# Above this many unsent bytes a subscriber's publishes go through amqtt's path, which waits for the drain.
WRITE_HIGH_WATER = 256 * 1024


# Un-PUBACKed outgoing messages a session keeps for redelivery (in flight, or kept while a
# persistent session is offline). Well above what a client acking normally has in flight at once
# (every message is written at once, there is no in-flight window), and what bounds the memory a
# subscriber that never acks can pin: MAX_KEPT_INFLIGHT x the broker's payload limit. mosquitto's
# default queue bound (max_queued_messages) is the same figure.
MAX_KEPT_INFLIGHT = 1000

# True while the control plane publishes through amqtt's mqtt_publish (publish_owned): not a KeptMessage.
_CONTROL_PLANE: contextvars.ContextVar[bool] = contextvars.ContextVar("fleetcmd_control_plane_publish", default=False)


class KeptMessage(OutgoingApplicationMessage):
    """An outgoing QoS 1/2 message the session keeps until its PUBACK and redelivers on reconnect [MQTT-4.4.0-1].

    Every message the broker routes from a publisher to a subscriber (and the offline queue) is
    one. The control plane's own publishes to one client (:meth:`FastProtocolHandler.publish_tracked`,
    :meth:`FastProtocolHandler.publish_owned`, used by ``FleetBroker.deliver``) are not: their
    caller learns that the PUBACK did not come, and fleetcmd's outbox then publishes the request
    again as a new message when the device is back. Keeping them too would hand a reconnecting
    device every un-acked request twice (the DUP resend and the outbox's), so the one owner that
    already redelivers them keeps that job.
    """

    __slots__ = ()


def _track(running: list[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    # In the list while it runs, out of it (and so freed) as soon as it is done.
    running.append(task)
    task.add_done_callback(running.remove)


# amqtt's handle_<type> methods, run in a task per packet as upstream (the packets this handler does not handle itself).
_UPSTREAM = {
    CONNACK: "handle_connack",
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback",
    UNSUBACK: "handle_unsuback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGRESP: "handle_pingresp",
}


class BrokerHooks(Protocol):
    """What a connection's reader asks of the broker (the broker itself: one reference per connection, not a closure each)."""

    async def publish_inline(self, client_session: Session, handler: FastProtocolHandler, message: ApplicationMessage) -> bool:
        """Handle an incoming PUBLISH now; False when it has to go through the message loop."""
        ...

    def keepalive_expired(self, client_session: Session, handler: FastProtocolHandler) -> None:
        """The client was silent for longer than its keep-alive allows."""
        ...

    # Broker events by kind; the handler counts the kept messages it drops (dropped.inflight_overflow).
    stats: collections.Counter[str]

    @property
    def max_packet_bytes(self) -> int:
        """The largest remaining length a packet may declare; a larger one ends the connection unread."""
        ...

    def protocol_violation(self, client_id: str | None, reason: str, detail: str) -> None:
        """The connection is being closed for a malformed or oversized packet (``reason``)."""
        ...


class ProtocolViolation(Exception):
    """A packet breaks MQTT in a way that ends the connection [MQTT-4.8.0-1]; ``reason`` is counted."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# [MQTT-2.2.2-1] [MQTT-2.2.2-2]: the fixed-header flags every packet type but PUBLISH must carry.


# States of a QoS 1 PUBLISH waiting for its PUBACK (see _PendingAck).
_HANDLING, _WAITING, _READY = 0, 1, 2


class _PendingAck:
    """A received QoS 1 PUBLISH whose PUBACK has not been written yet."""

    __slots__ = ("message", "packet_id", "state")

    def __init__(self, packet_id: int, message: ApplicationMessage) -> None:
        self.packet_id = packet_id
        self.message = message
        self.state = _HANDLING  # -> _WAITING (its write is pending) -> _READY (may be PUBACKed)


def in_background(work: Awaitable[Any]) -> None:
    """Run ``work`` (a write to or a close of a connection) from a callback; a failure is logged."""
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_background_done)


def _background_done(task: asyncio.Future[Any]) -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("writing to or closing a connection failed: %r", task.exception())


class FastProtocolHandler(FleetProtocolHandler):
    """The broker's handler of one connection; see the module docstring for what differs from amqtt."""

    # Slots, not the instance dict: amqtt's own attributes fill a key-sharing dict of ~300 bytes,
    # and ten more keys would turn it into a plain dict of ~1.6 KB on every connection.
    __slots__ = (
        "_ack_waiters",
        "_acks",
        "_deferred",
        "_expiry_timer",
        "_fast",
        "_last_read",
        "_read_timer",
        "_slow_publishes",
        "_stopped",
        "_unacked",
        "broker",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set by the broker: incoming PUBLISHes are handed to it, and keep-alive timeouts reported.
        self.broker: BrokerHooks | None = None
        self._fast = False
        # Messages queued for the message loop and not handled yet; while any is, later ones queue too.
        # A list, not a deque: it is almost always empty, and an empty deque costs ~600 B per connection.
        self._deferred: list[ApplicationMessage] = []
        # QoS 1 publishes received and not PUBACKed yet, in arrival order; None until the first.
        self._acks: list[_PendingAck] | None = None
        # QoS 1 publishes written by publish_nowait: packet id -> when to give up on its PUBACK (loop time),
        # oldest first; one timer (not one per message) drops the expired ones.
        self._unacked: dict[int, float] = {}
        self._expiry_timer: asyncio.TimerHandle | None = None
        # Futures of publish_tracked callers waiting for a PUBACK, by packet id.
        self._ack_waiters: dict[int, asyncio.Future[None]] = {}
        # Publishes sent through amqtt's mqtt_publish task and not finished; publish_nowait waits for them (order).
        self._slow_publishes = 0
        # Set by the first stop: later stops (a taken-over connection is stopped more than once) leave
        # the session's kept messages alone, which may by then belong to the new connection.
        self._stopped = False
        self._last_read = 0.0
        self._read_timer: asyncio.TimerHandle | None = None

    # ---- set-up ---------------------------------------------------------------------------

    def attach(self, session: Session, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """Attach as amqtt does, and decide whether the fast paths apply to this connection."""
        super().attach(session, reader, writer)
        listened = self.plugins_manager._event_plugin_callbacks
        self._fast = (
            isinstance(reader, StreamReaderAdapter)
            and isinstance(writer, StreamWriterAdapter)
            and not listened.get(MQTTEvents.PACKET_RECEIVED)
            and not listened.get(MQTTEvents.PACKET_SENT)
        )
        kept = getattr(session, "kept_out", None)
        if kept:
            # Back in flight before anything else is published on this connection, so that no new
            # message takes their packet ids; written (DUP) once the CONNACK is out: _resend_kept.
            for message in kept:
                session.inflight_out[message.packet_id] = message

    async def start(self) -> None:
        """Start as amqtt does, without the write-timeout timer a broker handler ignores."""
        await super().start()
        if self._fast and "handle_write_timeout" not in vars(self) and self._keepalive_task is not None:
            # BrokerProtocolHandler.handle_write_timeout does nothing; amqtt re-arms its timer on every send.
            self._keepalive_task.cancel()
            self._keepalive_task = None

    def _stop_waiters(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._keep_unacked()
        super()._stop_waiters()
        # amqtt's waiters drop their message from inflight_out when cancelled; do the same for ours.
        unacked, self._unacked = self._unacked, {}
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self.session is not None:
            for packet_id in unacked:
                self.session.inflight_out.pop(packet_id, None)
        waiters, self._ack_waiters = self._ack_waiters, {}
        for waiter in waiters.values():
            waiter.cancel()

    # ---- incoming -------------------------------------------------------------------------

    async def _reader_loop(self) -> None:
        """Amqtt's ``ProtocolHandler._reader_loop`` (0.12.1) with the packet path described in the module docstring."""
        reader = self.reader
        if not self._fast or self.session is None or self._reader_ready is None or not isinstance(reader, StreamReaderAdapter):
            await super()._reader_loop()
            return
        readexactly = reader._reader.readexactly
        max_packet = self.broker.max_packet_bytes if self.broker is not None else MQTT_MAX_PACKET
        # Rarely non-empty (QoS 2, SUBSCRIBE...): a list is smaller than a set. A task leaves it when
        # done, not at the next packet: an idle device would keep its SUBSCRIBE's task (~550 B) forever.
        running_tasks: list[asyncio.Task[None]] = []
        keepalive = self.session.keep_alive
        self._reader_ready.set()
        if keepalive > 0:
            self._last_read = self._loop.time()
            self._read_timer = self._loop.call_later(keepalive, self._check_read_timeout, keepalive)
        while True:
            try:
                if self.reader is None:
                    log.warning("reader is not initialized")
                    break
                header = await readexactly(2)
                length = header[1]
                if length & 0x80:
                    length = await self._read_length(readexactly, length)
                packet_type = header[0] >> 4
                flags = header[0] & 0x0F
                # Checked from the fixed header, before a byte of the body is read or buffered.
                if length > max_packet:
                    raise ProtocolViolation(
                        "oversized_packet", f"packet of type {packet_type} declares {length} bytes (limit {max_packet})"
                    )
                if packet_type in (RESERVED_0, RESERVED_15):
                    raise ProtocolViolation("malformed", f"reserved packet type {packet_type}")
                if packet_type != PUBLISH and flags != REQUIRED_FLAGS.get(packet_type, 0):
                    raise ProtocolViolation("malformed", f"packet of type {packet_type} with flags {flags:#x}")
                body = await readexactly(length) if length else b""
                if keepalive > 0:
                    self._last_read = self._loop.time()
                if packet_type == PUBLISH:
                    pending = await self._handle_publish_bytes(flags, body)
                    if pending is not None:
                        _track(running_tasks, pending)
                        pending = None  # this frame would keep the task alive, done, while the device idles
                elif packet_type == PUBACK:
                    self._handle_puback_bytes(body)
                elif packet_type == PINGREQ:
                    self._write(PINGRESP_PACKET)
                else:
                    if packet_type in (SUBSCRIBE, UNSUBSCRIBE) and length <= 2:
                        raise ProtocolViolation("malformed", "[MQTT-3.8.3-3] [MQTT-3.10.3-2] no topic filter")
                    buffer = BufferReader(body)
                    try:
                        packet = await packet_class(MQTTFixedHeader(packet_type, flags, length)).from_stream(
                            buffer, fixed_header=MQTTFixedHeader(packet_type, flags, length)
                        )
                    except Exception as exc:  # noqa: BLE001 - amqtt's decoders raise NoDataError, struct.error... on a short body
                        raise ProtocolViolation("malformed", f"undecodable packet of type {packet_type}: {exc!r}") from None
                    if buffer._stream.tell() != length or (
                        # amqtt's SUBSCRIBE and UNSUBSCRIBE decoders stop quietly at a filter that runs past
                        # the end, keeping what they have: what they made of it must encode to the same bytes.
                        packet_type in (SUBSCRIBE, UNSUBSCRIBE) and packet.to_bytes()[-length:] != body
                    ):
                        raise ProtocolViolation("malformed", f"packet of type {packet_type} does not decode to its length")
                    if packet_type == DISCONNECT:
                        await self.handle_disconnect(packet)
                    elif packet_type == CONNECT:
                        await self.handle_connect(packet)
                    else:
                        _track(running_tasks, asyncio.create_task(getattr(self, _UPSTREAM[packet_type])(packet)))
            except (ProtocolViolation, MQTTError) as exc:
                # A malformed packet: the stream cannot be trusted further [MQTT-4.8.0-1].
                if self.broker is not None:
                    reason = exc.reason if isinstance(exc, ProtocolViolation) else "malformed"
                    self.broker.protocol_violation(self.session.client_id, reason, str(exc))
                break
            except asyncio.CancelledError:
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # EOF or reset: amqtt ends its reader on "no more data" too
            except Exception as exc:  # noqa: BLE001 - amqtt ends the reader on any other error too
                log.warning("%s unhandled exception in reader: %r", type(self).__name__, exc)
                break
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        for task in list(running_tasks):
            task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    @staticmethod
    async def _read_length(readexactly: Callable[[int], Awaitable[bytes]], first: int) -> int:
        value = first & 0x7F
        multiplier = 0x80
        while True:
            byte = (await readexactly(1))[0]
            value += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                return value
            multiplier *= 0x80
            if multiplier > 0x80**3:
                # Malformed: the stream cannot be resynchronised, so the connection ends.
                raise ProtocolViolation("malformed", "remaining length longer than four bytes")

    def handle_read_timeout(self) -> None:
        """The client was silent for longer than its keep-alive allows: the broker's call (amqtt's only logs it)."""
        if self.broker is not None and self.session is not None:
            self.broker.keepalive_expired(self.session, self)
        else:
            super().handle_read_timeout()

    def _check_read_timeout(self, keepalive: float) -> None:
        now = self._loop.time()
        idle = now - self._last_read
        if idle >= keepalive:
            # As amqtt's wait_for timing out: report, then wait a whole keep-alive again.
            self._last_read = now
            try:
                self.handle_read_timeout()
            except Exception:  # a timer callback must not raise into the loop
                log.exception("read timeout handler failed")
            idle = 0.0
        self._read_timer = self._loop.call_later(keepalive - idle, self._check_read_timeout, keepalive)

    async def _handle_publish_bytes(self, flags: int, body: bytes) -> asyncio.Task[None] | None:
        """Decode a PUBLISH; QoS 0/1 are handled here, QoS 2 by amqtt's flow in the returned task."""
        # The checks of mqtt_codec.decode_publish, inlined: a call and a value object per packet were
        # measurably slower on this path. Wildcards in the topic are refused later, by the broker,
        # which closes the connection through its disconnect path.
        qos = (flags >> 1) & 0x03
        if qos > QOS_2:
            raise ProtocolViolation("malformed", "[MQTT-3.3.1-4] PUBLISH with QoS 3")
        end = 2 + int.from_bytes(body[:2], "big")
        if len(body) < 2 or len(body) < end + (2 if qos else 0):
            raise ProtocolViolation("malformed", "truncated PUBLISH")
        raw_topic = body[2:end]
        try:
            topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("malformed", "[MQTT-1.5.3-1] PUBLISH topic is not UTF-8") from None
        if "\x00" in topic:
            raise ProtocolViolation("malformed", "[MQTT-1.5.3-2] PUBLISH topic holds U+0000")
        packet_id: int | None = None
        if qos:
            packet_id = int.from_bytes(body[end : end + 2], "big")
            end += 2
        data = body[end:]
        # amqtt's packet object (its variable header refuses wildcard topic names with MQTTError, which ends the connection).
        variable = PublishVariableHeader(topic, packet_id)
        packet = PublishPacket(MQTTFixedHeader(PUBLISH, flags, len(body)), variable, PublishPayload(data))
        if qos == QOS_0:
            if flags & PublishPacket.DUP_FLAG:
                log.warning("[MQTT-3.3.1-2] DUP flag must be 0 for a QoS 0 message; message ignored: %r", packet)
                return None
            await self._hand_over(self._incoming(packet_id, topic, qos, data, flags, packet))
            return None
        if qos == QOS_1 and packet_id is not None:
            message = self._incoming(packet_id, topic, qos, data, flags, packet)
            entry = _PendingAck(packet_id, message)
            if self._acks is None:
                self._acks = []
            self._acks.append(entry)
            deferred = await self._hand_over(message)
            # Handled here: PUBACKed now (in order), unless the broker held it (hold_ack) until
            # the control plane wrote it. Queued for the message loop: once the loop handled it.
            if not deferred and entry.state == _HANDLING:
                entry.state = _READY
            self._flush_acks()
            return None
        return asyncio.create_task(self.handle_publish(packet))

    @staticmethod
    def _incoming(
        packet_id: int | None, topic: str, qos: int, data: bytes, flags: int, packet: PublishPacket
    ) -> IncomingApplicationMessage:
        message = IncomingApplicationMessage(packet_id, topic, qos, data, bool(flags & PublishPacket.RETAIN_FLAG))
        message.publish_packet = packet
        return message

    async def _hand_over(self, message: ApplicationMessage) -> bool:
        """Hand ``message`` to the broker; True when it was queued for the message loop instead."""
        broker = self.broker
        if broker is not None and not self._deferred and self.session is not None:
            try:
                if await broker.publish_inline(self.session, self, message):
                    return False
            except asyncio.CancelledError:
                raise
            except Exception:
                # amqtt's message loop would die with the connection left open; drop the message instead.
                client_id = self.session.client_id if self.session else None
                log.exception("handling a message from %s on %r failed", client_id, message.topic)
                return False
        self._deferred.append(message)
        if self.session is not None:
            self.session.delivered_message_queue.put_nowait(message)
        return True

    async def _handle_qos1_message_flow(self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage) -> None:
        """Amqtt's QoS 1 flow, but an incoming message's PUBACK waits as on the fast path.

        Only amqtt's reader (WebSocket, or a plugin listening to packets) gets here with an
        incoming message. Upstream PUBACKs it once it is queued for the message loop, before
        anything handled it; here the entry waits in ``_acks`` for :meth:`deferred_done` and
        :meth:`hold_ack`, so a crash before the control plane wrote it leaves the device to send it again.
        """
        if isinstance(app_message, OutgoingApplicationMessage):
            # A routed message is kept for redelivery (_keepable); the control plane's is not.
            await super()._handle_qos1_message_flow(self._keepable(app_message))
            return
        if self.session is None or app_message.packet_id is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        if self._acks is None:
            self._acks = []
        self._acks.append(_PendingAck(app_message.packet_id, app_message))
        await self.session.delivered_message_queue.put(app_message)

    def deferred_done(self, message: ApplicationMessage | None) -> None:
        """The message loop finished a message it took from the queue (see :meth:`_hand_over`)."""
        if self._deferred and self._deferred[0] is message:
            del self._deferred[0]
        entry = self._pending_ack(message)
        if entry is not None and entry.state == _HANDLING:
            entry.state = _READY
            self._flush_acks()

    def hold_ack(self, message: ApplicationMessage, written: asyncio.Future[None]) -> None:
        """PUBACK ``message`` only once ``written`` is done; close the connection if it fails.

        Called by the broker while it handles the message (in the reader or the message loop).
        A failed ``written`` means the message is not stored: the connection is closed without
        the PUBACK, so that the device sends the message again (MQTT's redelivery).
        Does nothing for a message this handler does not PUBACK itself (amqtt's own paths).
        """
        entry = self._pending_ack(message)
        if entry is None or entry.state != _HANDLING:
            return
        entry.state = _WAITING
        written.add_done_callback(functools.partial(self._written, entry))

    def _pending_ack(self, message: ApplicationMessage | None) -> _PendingAck | None:
        # Newest first: the message being handled is almost always the last one received.
        for entry in reversed(self._acks or ()):
            if entry.message is message:
                return entry
        return None

    def _written(self, entry: _PendingAck, written: asyncio.Future[None]) -> None:
        if written.cancelled() or written.exception() is not None:
            client_id = self.session.client_id if self.session else None
            log.warning(
                "a message from %s on %r was not stored (%r): closing without its PUBACK, so that it comes again",
                client_id,
                entry.message.topic,
                None if written.cancelled() else written.exception(),
            )
            writer = self.writer
            if isinstance(writer, StreamWriterAdapter):
                writer._writer.transport.abort()
            elif writer is not None:
                in_background(writer.close())
            return
        entry.state = _READY
        self._flush_acks()

    def _flush_acks(self) -> None:
        """Write the PUBACKs that may go, oldest first, up to the first that has to wait."""
        acks = self._acks
        while acks and acks[0].state == _READY:
            if self._fast:
                self._write(b"\x40\x02" + acks[0].packet_id.to_bytes(2, "big"))
            else:
                # amqtt's writers are async; the tasks take its write lock (first come, first served) in order.
                in_background(self._send_packet(PubackPacket.build(acks[0].packet_id)))
            del acks[0]
        if acks is not None and not acks:
            self._acks = None  # an idle device keeps no list (memory per connection)

    def _handle_puback_bytes(self, body: bytes) -> None:
        if len(body) < 2:
            raise MQTTError("truncated PUBACK")
        packet_id = int.from_bytes(body[:2], "big")
        if self._unacked.pop(packet_id, None) is not None:
            if self.session is not None:
                self.session.inflight_out.pop(packet_id, None)
            waiter = self._ack_waiters.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        waiter = self._puback_waiters.get(packet_id)
        if waiter is None:
            session = self.session
            if session is not None and type(session.inflight_out.get(packet_id)) is KeptMessage:
                del session.inflight_out[packet_id]
                return
            log.warning("received PUBACK for unknown pending message id %d", packet_id)
        elif waiter.done():
            log.warning("PUBACK waiter with id %d already done", packet_id)
        else:
            waiter.set_result(PubackPacket.build(packet_id))

    # ---- outgoing -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        writer = self.writer
        if isinstance(writer, StreamWriterAdapter) and not writer.is_closed:
            writer._writer.transport.write(data)

    def publish_nowait(self, topic: str, data: bytes | bytearray, qos: int) -> bool:
        """Write a PUBLISH (QoS 0 or 1, not retained) routed from a publisher, at once.

        A QoS 1 message is a :class:`KeptMessage`: it stays in the session's ``inflight_out``
        until its PUBACK, with no timeout (MQTT resends only on reconnect [MQTT-4.4.0-1]), and
        a persistent session keeps it across a disconnect (see :meth:`_keep_unacked`).

        Returns:
            False when it was not written: the connection is not on the fast path, is
            closing or backed up, or an earlier publish is still on amqtt's path (order);
            the caller then uses ``mqtt_publish``.
        """
        return self._publish_now(topic, data, qos, kept=True) >= 0

    def publish_tracked(self, topic: str, data: bytes | bytearray, qos: int) -> asyncio.Future[None] | None:
        """:meth:`publish_nowait` for the control plane, and a future for the outcome, as awaiting amqtt's ``mqtt_publish`` gives.

        The message is not kept for redelivery (the caller owns it, see :class:`KeptMessage`):
        it leaves ``inflight_out`` at its PUBACK, at the connection's end or after
        :data:`PUBACK_TIMEOUT`.

        Returns:
            None when it was not written (use ``mqtt_publish``); else a future done once
            the message is written (QoS 0) or PUBACKed (QoS 1). It fails with TimeoutError
            after :data:`PUBACK_TIMEOUT` and is cancelled when the connection ends, as
            amqtt's PUBACK waiters are.
        """
        packet_id = self._publish_now(topic, data, qos, kept=False)
        if packet_id < 0:
            return None
        outcome: asyncio.Future[None] = self._loop.create_future()
        if packet_id == 0:
            outcome.set_result(None)
        else:
            self._ack_waiters[packet_id] = outcome
        return outcome

    async def publish_owned(self, topic: str, data: bytes | bytearray, qos: int) -> OutgoingApplicationMessage:
        """Amqtt's ``mqtt_publish`` (not retained) for the control plane: the message is not kept for redelivery.

        Returns:
            The message, PUBACKed (QoS 1) or written (QoS 0).
        """
        token = _CONTROL_PLANE.set(True)
        try:
            return await self.mqtt_publish(topic, data, qos, False)
        finally:
            _CONTROL_PLANE.reset(token)

    def _publish_now(self, topic: str, data: bytes | bytearray, qos: int, *, kept: bool) -> int:
        """Write the PUBLISH if the connection allows it: its packet id, 0 for QoS 0, -1 when not written."""
        writer = self.writer
        session = self.session
        if (
            not self._fast
            or self._slow_publishes
            or self._write_lock.locked()
            or session is None
            or qos not in (QOS_0, QOS_1)
            or not isinstance(writer, StreamWriterAdapter)
            or writer.is_closed
        ):
            return -1
        transport = writer._writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            return -1
        if getattr(session, "kept_out", None) is not None:
            self._resend_kept()  # the previous connection's un-acked messages go first [MQTT-4.4.0-1]
        packet_id: int | None = None
        if qos == QOS_1:
            packet_id = session.next_packet_id
            if kept:
                if len(session.inflight_out) >= MAX_KEPT_INFLIGHT:
                    self._drop_oldest_kept(session)
                session.inflight_out[packet_id] = KeptMessage(packet_id, topic, qos, data, False)
            else:
                session.inflight_out[packet_id] = OutgoingApplicationMessage(packet_id, topic, qos, data, False)
                self._unacked[packet_id] = self._loop.time() + PUBACK_TIMEOUT
                if self._expiry_timer is None:
                    self._expiry_timer = self._loop.call_later(PUBACK_TIMEOUT, self._expire_unacked)
        transport.write(encode_publish(topic, data, qos, packet_id))
        return packet_id or 0

    def _drop_oldest_kept(self, session: Session) -> None:
        """Make room for one more kept message: drop the oldest (counted), as the bound says."""
        for packet_id, message in session.inflight_out.items():
            if type(message) is KeptMessage:
                del session.inflight_out[packet_id]
                self._count_dropped(session, 1)
                return

    def _count_dropped(self, session: Session, count: int) -> None:
        if self.broker is not None:
            self.broker.stats["dropped.inflight_overflow"] += count
        log.warning(
            "%s has %d un-acknowledged messages: the oldest %d dropped (MAX_KEPT_INFLIGHT)",
            session.client_id,
            MAX_KEPT_INFLIGHT,
            count,
        )

    def _expire_unacked(self) -> None:
        """Give up on the control plane's QoS 1 messages not PUBACKed within :data:`PUBACK_TIMEOUT`, as amqtt's ``mqtt_publish``.

        Only :meth:`publish_tracked` messages have a deadline: their caller is told (TimeoutError)
        and its outbox publishes the request again on the device's next connection. Routed
        messages (:class:`KeptMessage`) wait for their PUBACK or the reconnect instead.
        """
        self._expiry_timer = None
        now = self._loop.time()
        unacked = self._unacked
        while unacked:
            packet_id, deadline = next(iter(unacked.items()))
            if deadline > now:
                self._expiry_timer = self._loop.call_at(deadline, self._expire_unacked)
                return
            del unacked[packet_id]
            if self.session is not None:
                self.session.inflight_out.pop(packet_id, None)
            log.warning("timeout waiting for PUBACK for packet id %d: message dropped", packet_id)
            waiter = self._ack_waiters.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(TimeoutError(f"Timeout waiting for PUBACK for packet ID {packet_id}"))

    # ---- redelivery [MQTT-4.4.0-1] --------------------------------------------------------

    def _keep_unacked(self) -> None:
        """At the connection's end: a persistent session keeps its un-acked :class:`KeptMessage`s for the next one.

        They leave ``inflight_out`` (no packet id is taken while the session is offline: amqtt
        queues for an offline session without one) and wait in ``FleetSession.kept_out``, at most
        :data:`MAX_KEPT_INFLIGHT` (the oldest beyond are dropped and counted). A clean session
        ends here, and so do they. QoS 2 messages past PUBREC are not in ``inflight_out`` any more
        (amqtt drops them there at PUBREC): their PUBREL is not resent.
        """
        session = self.session
        if session is None or not session.inflight_out:
            return
        kept = [m for m in session.inflight_out.values() if type(m) is KeptMessage]
        if not kept:
            return
        for message in kept:
            del session.inflight_out[message.packet_id]
        if session.clean_session or not isinstance(session, FleetSession):
            return
        overflow = len(kept) - MAX_KEPT_INFLIGHT
        if overflow > 0:
            self._count_dropped(session, overflow)
            kept = kept[overflow:]
        session.kept_out = kept

    def _resend_kept(self) -> None:
        """Write the previous connection's un-acked messages again: same packet id, DUP set [MQTT-4.4.0-1]."""
        session = self.session
        if not isinstance(session, FleetSession) or session.kept_out is None:
            return
        kept, session.kept_out = session.kept_out, None
        writer = self.writer
        for message in kept:
            if session.inflight_out.get(message.packet_id) is not message:
                continue  # dropped to make room meanwhile
            if self._fast and message.qos == QOS_1 and isinstance(writer, StreamWriterAdapter) and not writer.is_closed:
                writer._writer.transport.write(encode_publish(message.topic, message.data, QOS_1, message.packet_id, dup=True))
                continue
            # QoS 2, or a connection on amqtt's path: amqtt's flow, which sets DUP on a message it sent before.
            if message.publish_packet is None:
                message.publish_packet = message.build_publish_packet()
            task = asyncio.ensure_future(self._handle_message_flow(message))
            self.track_publish(task)
            _BACKGROUND.add(task)
            task.add_done_callback(_background_done)

    async def _retry_deliveries(self) -> None:
        """Amqtt's ``ProtocolHandler._retry_deliveries`` (0.12.1) [MQTT-4.4.0-1], without waiting for the acks.

        Amqtt resends what is in ``inflight_out``, which its flows have always emptied by the
        time the client is back, and awaits every PUBACK (up to 10 s) before the connection's
        message loop starts. Here the kept messages (:meth:`_keep_unacked`) are written at once,
        before the offline queue and anything new; their PUBACKs arrive through the reader. The
        incoming QoS 2 flows of ``inflight_in`` are retried as amqtt does.
        """
        session = self.session
        if session is None:
            msg = "Session is not initialized."
            raise AMQTTError(msg)
        self._resend_kept()
        if session.inflight_in:
            tasks = [
                asyncio.create_task(asyncio.wait_for(self._handle_message_flow(m), 10)) for m in session.inflight_in.values()
            ]
            await asyncio.wait(tasks)

    def _keepable(self, message: OutgoingApplicationMessage) -> OutgoingApplicationMessage:
        """On amqtt's path, a routed message (not the control plane's: :meth:`publish_owned`) becomes a :class:`KeptMessage`."""
        if type(message) is not OutgoingApplicationMessage or _CONTROL_PLANE.get() or message.packet_id is None:
            return message
        session = self.session
        if session is not None and len(session.inflight_out) >= MAX_KEPT_INFLIGHT:
            self._drop_oldest_kept(session)
        return KeptMessage(message.packet_id, message.topic, message.qos, message.data, message.retain)

    async def _handle_qos2_message_flow(self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage) -> None:
        """Amqtt's QoS 2 flow; a routed outgoing message is kept for redelivery (:meth:`_keepable`)."""
        if isinstance(app_message, OutgoingApplicationMessage):
            app_message = self._keepable(app_message)
        await super()._handle_qos2_message_flow(app_message)

    def track_publish(self, task: asyncio.Future[Any]) -> None:
        """A publish to this client runs through amqtt's ``mqtt_publish`` task; later ones wait for it."""
        self._slow_publishes += 1
        task.add_done_callback(self._slow_publish_done)

    def _slow_publish_done(self, _: asyncio.Future[Any]) -> None:
        self._slow_publishes -= 1
