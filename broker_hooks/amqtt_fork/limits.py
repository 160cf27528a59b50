"""What the MQTT listener refuses before a connection costs anything: the first packet, packet sizes, closing.

The internet sends a broker health checks that connect and close, scanners that connect and
say nothing, and garbage. amqtt 0.12.1 reads the first packet with no deadline, as a CONNECT
whatever its type (a PUBLISH first waits for bytes that never come), buffers a packet whole
whatever its declared length, and leaves the socket of a connection it gave up on to the
garbage collector. Here:

* :func:`read_connect` reads the first packet's fixed header itself: not a CONNECT with flags 0
  [MQTT-3.1.0-1] [MQTT-2.2.2-2], a malformed remaining length or one above the packet limit
  raises :class:`FirstPacketError` before the body is read; the body is then read whole and
  decoded from memory, so a truncated or padded CONNECT is refused too;
* :class:`BoundedStreamReader` / :class:`BoundedWebSocketsReader` follow the packet framing of
  what amqtt's own reader loop reads (WebSocket, or a plugin that listens to packet events) and
  refuse a packet from its fixed header, before its body is read;
* :func:`close_now` releases a connection's descriptor at once (no drain, no close handshake);
* :class:`RefusalLog` logs a kind of refusal at most once per interval, with the count since.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NoReturn, Protocol

from amqtt.adapters import (
    BufferReader,
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
    WriterAdapter,
)
from amqtt.errors import MQTTError
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader

from broker_hooks.mqtt_codec import MAX_FIXED_HEADER, MAX_REMAINING_LENGTH

log = logging.getLogger(__name__)

# The largest remaining length an MQTT fixed header can encode, and a fixed header's largest size.
MQTT_MAX_PACKET = MAX_REMAINING_LENGTH
# Seconds between two log lines about the same kind of refusal.
REFUSAL_LOG_INTERVAL = 10.0


class ViolationSink(Protocol):
    """Who counts the connections closed for a packet (the broker)."""

    def protocol_violation(self, client_id: str | None, reason: str, detail: str) -> None:
        """A connection is being closed for a malformed or oversized packet (``reason``)."""


class FirstPacketError(MQTTError):
    """The first packet of a connection is not a CONNECT the broker reads; it is closed without a CONNACK.

    Attributes:
        reason: Named reason, counted in the broker's stats as ``closed.<reason>``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class PacketTooLarge(ConnectionError):
    """A packet declared a length above the limit (or an invalid one): the connection cannot be resynchronised and ends.

    Attributes:
        reason: ``oversized``, or ``malformed`` for a remaining length of more than four bytes.
    """

    def __init__(self, detail: str, reason: str = "oversized") -> None:
        super().__init__(detail)
        self.reason = reason


async def _read(reader: ReaderAdapter, n: int) -> bytes:
    try:
        data: bytes = await reader.read(n)
    except PacketTooLarge as exc:  # a bounded reader saw the fixed header first
        raise FirstPacketError(exc.reason, f"CONNECT: {exc}") from None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise FirstPacketError("no_connect", f"connection ended before a complete CONNECT ({exc!r})") from None
    if len(data) < n:
        raise FirstPacketError("no_connect", "connection ended before a complete CONNECT")
    return data


async def read_connect(reader: ReaderAdapter, max_packet_bytes: int) -> ConnectPacket:
    """Read the first packet of a connection, which must be a CONNECT of at most ``max_packet_bytes`` after its fixed header.

    Raises:
        FirstPacketError: not a CONNECT (``not_connect``), a malformed one (``malformed``), one
            declaring more than ``max_packet_bytes`` (``oversized``, the body is not read), or the
            connection ended first (``no_connect``).
    """
    first = (await _read(reader, 1))[0]
    if first != CONNECT << 4:
        raise FirstPacketError(
            "not_connect", f"[MQTT-3.1.0-1] first packet is of type {first >> 4} (flags {first & 0x0F:#x}), not CONNECT"
        )
    length = 0
    for shift in (0, 7, 14, 21):
        byte = (await _read(reader, 1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise FirstPacketError("malformed", "CONNECT: remaining length longer than four bytes")
    if length > max_packet_bytes:
        raise FirstPacketError("oversized", f"CONNECT declares {length} bytes (limit {max_packet_bytes})")
    body = await _read(reader, length)
    buffer = BufferReader(body)
    try:
        connect = await ConnectPacket.from_stream(buffer, fixed_header=MQTTFixedHeader(CONNECT, 0, length))
    except Exception as exc:  # noqa: BLE001 - whatever amqtt's decoder makes of garbage, it is a malformed CONNECT
        raise FirstPacketError("malformed", f"malformed CONNECT: {exc!r}") from None
    if buffer._stream.tell() != length:
        raise FirstPacketError("malformed", f"CONNECT: {length - buffer._stream.tell()} bytes after its payload")
    return connect


class _Framing:
    """Follows the MQTT framing of the bytes a reader hands out, and refuses a packet whose fixed header declares too much.

    amqtt's reader loop decodes a packet field by field from the adapter, so the adapter sees
    every fixed header go by: once its remaining length is complete, and before any of the
    body is read, a length above the limit raises :class:`PacketTooLarge`, which ends amqtt's
    reader loop (and so the connection).
    """

    _TYPE, _LENGTH, _BODY = 0, 1, 2

    def __init__(self, max_packet_bytes: int, sink: ViolationSink | None) -> None:
        self.max_packet_bytes = max_packet_bytes
        # Told of a refusal after the CONNECT (the CONNECT's own is counted by read_connect's caller).
        self._sink = sink
        self._after_connect = False
        self._state = self._TYPE
        self._length = 0
        self._shift = 0
        self._left = 0

    def _track(self, data: bytes) -> None:
        at, end = 0, len(data)
        while at < end:
            if self._state == self._BODY:
                step = min(self._left, end - at)
                self._left -= step
                at += step
                if not self._left:
                    self._state = self._TYPE
                    self._after_connect = True
                continue
            byte = data[at]
            at += 1
            if self._state == self._TYPE:
                self._state, self._length, self._shift = self._LENGTH, 0, 0
                continue
            self._length |= (byte & 0x7F) << self._shift
            self._shift += 7
            if byte & 0x80:
                if self._shift > 21:
                    self._refuse(PacketTooLarge("remaining length longer than four bytes", "malformed"))
                continue
            if self._length > self.max_packet_bytes:
                self._refuse(PacketTooLarge(f"packet declares {self._length} bytes (limit {self.max_packet_bytes})"))
            self._left = self._length
            if self._left:
                self._state = self._BODY
            else:
                self._state = self._TYPE
                self._after_connect = True

    def _refuse(self, exc: PacketTooLarge) -> NoReturn:
        if self._after_connect and self._sink is not None:
            self._sink.protocol_violation(None, "oversized_packet" if exc.reason == "oversized" else exc.reason, str(exc))
        raise exc

    def _check(self, n: int) -> None:
        if n < 0 or n > self.max_packet_bytes + MAX_FIXED_HEADER:
            raise PacketTooLarge(f"read of {n} bytes refused (packet limit {self.max_packet_bytes})")


class BoundedStreamReader(StreamReaderAdapter, _Framing):
    """amqtt's TCP reader adapter, refusing a packet above the limit from its fixed header (see :class:`_Framing`)."""

    def __init__(self, reader: asyncio.StreamReader, max_packet_bytes: int, sink: ViolationSink | None = None) -> None:
        StreamReaderAdapter.__init__(self, reader)
        _Framing.__init__(self, max_packet_bytes, sink)

    async def read(self, n: int = -1) -> bytes:
        """Read as amqtt does.

        Raises:
            PacketTooLarge: the packet being read declares more than the limit, or ``n`` is unbounded.
        """
        self._check(n)
        data: bytes = await super().read(n)
        self._track(data)
        return data


class BoundedWebSocketsReader(WebSocketsReader, _Framing):
    """amqtt's WebSocket reader adapter, refusing a packet above the limit from its fixed header (see :class:`_Framing`)."""

    def __init__(self, reader: WebSocketsReader, max_packet_bytes: int, sink: ViolationSink | None = None) -> None:
        WebSocketsReader.__init__(self, reader._protocol)
        _Framing.__init__(self, max_packet_bytes, sink)
        self._stream = reader._stream

    async def read(self, n: int = -1) -> bytes:
        """Read as amqtt does.

        Raises:
            PacketTooLarge: the packet being read declares more than the limit, or ``n`` is unbounded.
        """
        self._check(n)
        data: bytes = await super().read(n)
        self._track(data)
        return data


def bounded(reader: ReaderAdapter, max_packet_bytes: int, sink: ViolationSink | None = None) -> ReaderAdapter:
    """``reader`` refusing packets above ``max_packet_bytes`` (the TCP and WebSocket adapters; others as they are).

    ``sink`` hears of the refusals after the CONNECT (amqtt's reader loop that meets them neither counts nor says why).
    """
    if type(reader) is StreamReaderAdapter:
        return BoundedStreamReader(reader._reader, max_packet_bytes, sink)
    if type(reader) is WebSocketsReader:
        return BoundedWebSocketsReader(reader, max_packet_bytes, sink)
    return reader


def close_now(writer: WriterAdapter) -> None:
    """Release the connection's socket at once: no drain (a peer that does not read would hold it), no handshake.

    Does nothing to a connection already closed.
    """
    transport: Any = None
    if isinstance(writer, WebSocketsWriter):
        transport = getattr(writer._protocol, "transport", None)
    elif isinstance(writer, StreamWriterAdapter):
        transport = writer._writer.transport
        writer.is_closed = True  # amqtt's later close() must not wait to drain into an aborted socket
    # By what it can do, not by class: uvloop's transports are not asyncio.BaseTransport subclasses.
    if transport is None or transport.is_closing():
        return
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    else:
        transport.close()


class RefusalLog:
    """Log a kind of refusal at most once per :data:`REFUSAL_LOG_INTERVAL`, with how many happened since the last line."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def warning(self, reason: str, message: str, *args: object) -> None:
        """Log ``message % args`` for ``reason`` if its last line is older than the interval, else count it."""
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._last[reason] = now
        skipped = self._unlogged.pop(reason, 0)
        if skipped:
            log.warning(message + " (%d more like it in the last %.0fs)", *args, skipped, now - (last or now))
        else:
            log.warning(message, *args)
