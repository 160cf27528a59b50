"""The MQTT 3.1.1 wire format, sans-IO: bytes in, values out, and back; no sockets, no asyncio.

One codec for the packets fleetcmd's fast path handles (CONNECT, CONNACK, PUBLISH at QoS 0/1/2 with DUP
and retain, PUBACK, SUBSCRIBE, SUBACK, UNSUBSCRIBE, PINGREQ/PINGRESP, DISCONNECT), shared by the broker's
fast reader (``amqtt_fork.handler``), the benchmark's client (``bench/mqttlite.py``) and the tests that
speak raw MQTT. Decoding checks what the broker refuses from a device: reserved packet types, fixed-header
flags other than the ones the spec requires [MQTT-2.2.2-2], QoS 3 [MQTT-3.3.1-4], wildcards or U+0000 in
a topic name [MQTT-3.3.2-2] [MQTT-1.5.3-2], topics that are not UTF-8 [MQTT-1.5.3-1], a remaining length of
more than four bytes, and a body that does not decode to exactly its length. Each refusal raises
:class:`CodecError` with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
RESERVED_0, RESERVED_15 = 0, 15
# The flags the spec fixes for every type but PUBLISH [MQTT-2.2.2-1]; a different value is malformed [MQTT-2.2.2-2].
REQUIRED_FLAGS = {PUBREL: 0x02, SUBSCRIBE: 0x02, UNSUBSCRIBE: 0x02}
# The largest remaining length a fixed header can encode (four length bytes).
MAX_REMAINING_LENGTH = 268_435_455
# A fixed header is one type byte and one to four length bytes.
MAX_FIXED_HEADER = 5

PINGREQ_PACKET = b"\xc0\x00"
PINGRESP_PACKET = b"\xd0\x00"
DISCONNECT_PACKET = b"\xe0\x00"


class CodecError(ValueError):
    """Bytes that are not a well-formed MQTT 3.1.1 packet.

    Attributes:
        reason: ``malformed`` or ``oversized_packet`` (the names the broker counts refusals under).
        detail: what was wrong, for a log line.
    """

    def __init__(self, detail: str, reason: str = "malformed") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class FixedHeader:
    """A parsed fixed header: packet type, its four flag bits, the remaining length and the header's own size."""

    packet_type: int
    flags: int
    length: int
    size: int


@dataclass(frozen=True, slots=True)
class Connect:
    """A CONNECT (protocol level 4; no will message: fleetcmd's clients send none)."""

    client_id: str
    username: str | None = None
    password: str | None = None
    keep_alive: int = 0
    clean_session: bool = True


@dataclass(frozen=True, slots=True)
class Publish:
    """A PUBLISH: ``packet_id`` is None at QoS 0."""

    topic: str
    payload: bytes
    qos: int = 0
    packet_id: int | None = None
    retain: bool = False
    dup: bool = False


# ---- fixed header ---------------------------------------------------------------------------------


def encode_remaining_length(length: int) -> bytes:
    """The variable-length encoding of a remaining length (1 to 4 bytes).

    Raises:
        CodecError: ``length`` is negative or above :data:`MAX_REMAINING_LENGTH`.
    """
    if length < 0x80:
        if length < 0:
            raise CodecError(f"negative remaining length {length}")
        return bytes((length,))
    if length > MAX_REMAINING_LENGTH:
        raise CodecError(f"remaining length {length} above {MAX_REMAINING_LENGTH}", "oversized_packet")
    out = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_remaining_length(data: bytes | bytearray, offset: int = 1) -> tuple[int, int] | None:
    """The remaining length starting at ``data[offset]`` and the offset just after it; None when incomplete.

    Raises:
        CodecError: more than four length bytes.
    """
    value = 0
    multiplier = 1
    for i in range(offset, min(len(data), offset + 4)):
        byte = data[i]
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return value, i + 1
        multiplier <<= 7
    if len(data) >= offset + 4:
        raise CodecError("remaining length longer than four bytes")
    return None


def check_fixed_header(packet_type: int, flags: int) -> None:
    """Refuse reserved packet types and flags the spec does not allow for the type (PUBLISH: QoS 3).

    Raises:
        CodecError: the type byte is malformed.
    """
    if packet_type in (RESERVED_0, RESERVED_15):
        raise CodecError(f"reserved packet type {packet_type}")
    if packet_type == PUBLISH:
        if (flags >> 1) & 0x03 == 3:
            raise CodecError("[MQTT-3.3.1-4] PUBLISH with QoS 3")
    elif flags != REQUIRED_FLAGS.get(packet_type, 0):
        raise CodecError(f"packet of type {packet_type} with flags {flags:#x}")


def parse_fixed_header(data: bytes | bytearray, max_packet: int = MAX_REMAINING_LENGTH) -> FixedHeader | None:
    """The fixed header at the start of ``data``, checked; None when more bytes are needed to read it.

    Raises:
        CodecError: reserved type, wrong flags, a malformed length or one above ``max_packet``
            (reason ``oversized_packet``).
    """
    if not data:
        return None
    packet_type, flags = data[0] >> 4, data[0] & 0x0F
    check_fixed_header(packet_type, flags)
    parsed = decode_remaining_length(data, 1)
    if parsed is None:
        return None
    length, size = parsed
    if length > max_packet:
        raise CodecError(f"packet of type {packet_type} declares {length} bytes (limit {max_packet})", "oversized_packet")
    return FixedHeader(packet_type, flags, length, size)


def split_packet(data: bytes | bytearray, max_packet: int = MAX_REMAINING_LENGTH) -> tuple[FixedHeader, bytes] | None:
    """The first whole packet in a stream buffer: its header and body; None until all its bytes are there.

    The caller drops ``header.size + header.length`` bytes from its buffer.

    Raises:
        CodecError: as :func:`parse_fixed_header`.
    """
    header = parse_fixed_header(data, max_packet)
    if header is None or len(data) < header.size + header.length:
        return None
    return header, bytes(data[header.size : header.size + header.length])


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_remaining_length(len(body)) + body


# ---- strings --------------------------------------------------------------------------------------


def encode_string(value: str | bytes) -> bytes:
    """A length-prefixed UTF-8 string.

    Raises:
        CodecError: longer than 65,535 bytes.
    """
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise CodecError(f"string of {len(raw)} bytes (limit 65535)")
    return len(raw).to_bytes(2, "big") + raw


def _string(body: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + 2 > len(body):
        raise CodecError(f"{what}: no string length")
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    if end > len(body):
        raise CodecError(f"{what}: string runs past the end of the packet")
    try:
        text = body[pos + 2 : end].decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"[MQTT-1.5.3-1] {what} is not UTF-8") from None
    if "\x00" in text:
        raise CodecError(f"[MQTT-1.5.3-2] {what} holds U+0000")
    return text, end


def _packet_id(body: bytes, pos: int, what: str) -> int:
    if pos + 2 > len(body):
        raise CodecError(f"{what} without a whole packet id")
    return int.from_bytes(body[pos : pos + 2], "big")


# ---- CONNECT / CONNACK ----------------------------------------------------------------------------


def encode_connect(
    client_id: str, username: str | None = None, password: str | None = None, keep_alive: int = 0, clean_session: bool = True
) -> bytes:
    """A CONNECT packet (protocol name ``MQTT``, level 4, no will)."""
    flags = 0x02 if clean_session else 0
    payload = encode_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += encode_string(username)
    if password is not None:
        flags |= 0x40
        payload += encode_string(password)
    return _packet(CONNECT << 4, encode_string("MQTT") + bytes((4, flags)) + keep_alive.to_bytes(2, "big") + payload)


def decode_connect(body: bytes) -> Connect:
    """A CONNECT body (protocol level 4, no will message), which must decode to exactly its length.

    Raises:
        CodecError: another protocol, reserved flag set, a will, a password without a user name, or bytes left over.
    """
    name, pos = _string(body, 0, "protocol name")
    if name != "MQTT" or pos + 4 > len(body) or body[pos] != 4:
        raise CodecError("not an MQTT 3.1.1 CONNECT")
    flags = body[pos + 1]
    if flags & 0x01:
        raise CodecError("[MQTT-3.1.2-3] CONNECT reserved flag set")
    if flags & 0x04:
        raise CodecError("CONNECT with a will message (not supported by this codec)")
    if flags & 0x40 and not flags & 0x80:
        raise CodecError("[MQTT-3.1.2-22] password without a user name")
    keep_alive = int.from_bytes(body[pos + 2 : pos + 4], "big")
    client_id, pos = _string(body, pos + 4, "client id")
    username = password = None
    if flags & 0x80:
        username, pos = _string(body, pos, "user name")
    if flags & 0x40:
        password, pos = _string(body, pos, "password")
    if pos != len(body):
        raise CodecError("CONNECT does not decode to its length")
    return Connect(client_id, username, password, keep_alive, bool(flags & 0x02))


def encode_connack(return_code: int, session_present: bool = False) -> bytes:
    """A CONNACK packet."""
    return bytes((CONNACK << 4, 2, 1 if session_present else 0, return_code))


def decode_connack(body: bytes) -> tuple[bool, int]:
    """(session present, return code) of a CONNACK body.

    Raises:
        CodecError: not two bytes.
    """
    if len(body) != 2:
        raise CodecError("CONNACK is not two bytes")
    return bool(body[0] & 0x01), body[1]


# ---- PUBLISH / PUBACK -----------------------------------------------------------------------------


def encode_publish(
    topic: str, data: bytes | bytearray, qos: int, packet_id: int | None, *, retain: bool = False, dup: bool = False
) -> bytes:
    """The bytes of a PUBLISH packet (DUP set with ``dup``: a redelivery); ``packet_id`` None at QoS 0."""
    name = topic.encode()
    head = len(name).to_bytes(2, "big") + name
    if packet_id is not None:
        head += packet_id.to_bytes(2, "big")
    flags = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    return b"".join((bytes((flags,)), encode_remaining_length(len(head) + len(data)), head, data))


def decode_publish(flags: int, body: bytes) -> Publish:
    """A PUBLISH from its fixed-header flags and body.

    Raises:
        CodecError: QoS 3, a truncated body, a topic that is not UTF-8 or holds U+0000 or a wildcard.
    """
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise CodecError("[MQTT-3.3.1-4] PUBLISH with QoS 3")
    if len(body) < 2:
        raise CodecError("truncated PUBLISH")
    end = 2 + int.from_bytes(body[:2], "big")
    if len(body) < end + (2 if qos else 0):
        raise CodecError("truncated PUBLISH")
    try:
        topic = body[2:end].decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("[MQTT-1.5.3-1] PUBLISH topic is not UTF-8") from None
    if "\x00" in topic:
        raise CodecError("[MQTT-1.5.3-2] PUBLISH topic holds U+0000")
    if "#" in topic or "+" in topic:
        raise CodecError("[MQTT-3.3.2-2] PUBLISH topic holds a wildcard")
    packet_id = None
    if qos:
        packet_id = int.from_bytes(body[end : end + 2], "big")
        end += 2
    return Publish(topic, bytes(body[end:]), qos, packet_id, bool(flags & 0x01), bool(flags & 0x08))


def encode_puback(packet_id: int) -> bytes:
    """A PUBACK packet."""
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def decode_puback(body: bytes) -> int:
    """The packet id of a PUBACK body.

    Raises:
        CodecError: not exactly a packet id.
    """
    if len(body) != 2:
        raise CodecError("PUBACK without a whole packet id" if len(body) < 2 else "PUBACK longer than a packet id")
    return int.from_bytes(body, "big")


# ---- SUBSCRIBE / SUBACK / UNSUBSCRIBE -------------------------------------------------------------


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """A SUBSCRIBE packet for ``(filter, requested qos)`` pairs."""
    body = packet_id.to_bytes(2, "big") + b"".join(encode_string(f) + bytes((qos,)) for f, qos in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def decode_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """(packet id, [(filter, qos)]) of a SUBSCRIBE body.

    Raises:
        CodecError: no filter [MQTT-3.8.3-3], a filter running past the end, a requested QoS above 2.
    """
    packet_id = _packet_id(body, 0, "SUBSCRIBE")
    filters: list[tuple[str, int]] = []
    pos = 2
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "SUBSCRIBE topic filter")
        if pos >= len(body):
            raise CodecError("SUBSCRIBE topic filter without a QoS")
        if body[pos] > 2:
            raise CodecError(f"[MQTT-3.8.3-4] SUBSCRIBE requested QoS byte {body[pos]:#x}")
        filters.append((topic_filter, body[pos]))
        pos += 1
    if not filters:
        raise CodecError("[MQTT-3.8.3-3] SUBSCRIBE with no topic filter")
    return packet_id, filters


def encode_suback(packet_id: int, return_codes: list[int]) -> bytes:
    """A SUBACK packet (a granted QoS or 0x80 per filter)."""
    return _packet(SUBACK << 4, packet_id.to_bytes(2, "big") + bytes(return_codes))


def decode_suback(body: bytes) -> tuple[int, list[int]]:
    """(packet id, return codes) of a SUBACK body.

    Raises:
        CodecError: no packet id or no return code.
    """
    packet_id = _packet_id(body, 0, "SUBACK")
    if len(body) < 3:
        raise CodecError("SUBACK without a return code")
    return packet_id, list(body[2:])


def encode_unsubscribe(packet_id: int, filters: list[str]) -> bytes:
    """An UNSUBSCRIBE packet."""
    return _packet((UNSUBSCRIBE << 4) | 0x02, packet_id.to_bytes(2, "big") + b"".join(encode_string(f) for f in filters))


def decode_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    """(packet id, filters) of an UNSUBSCRIBE body.

    Raises:
        CodecError: no filter [MQTT-3.10.3-2] or a filter running past the end.
    """
    packet_id = _packet_id(body, 0, "UNSUBSCRIBE")
    filters: list[str] = []
    pos = 2
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "UNSUBSCRIBE topic filter")
        filters.append(topic_filter)
    if not filters:
        raise CodecError("[MQTT-3.10.3-2] UNSUBSCRIBE with no topic filter")
    return packet_id, filters


# ---- whole packets --------------------------------------------------------------------------------


def decode_packet(data: bytes, max_packet: int = MAX_REMAINING_LENGTH) -> tuple[FixedHeader, object]:
    """Decode one whole packet that must fill ``data`` exactly.

    Returns:
        The fixed header and the decoded value: :class:`Connect`, :class:`Publish`, a packet id (PUBACK),
        ``(session present, rc)`` (CONNACK), ``(packet id, filters)`` (SUBSCRIBE, UNSUBSCRIBE),
        ``(packet id, codes)`` (SUBACK), or None (PINGREQ, PINGRESP, DISCONNECT).

    Raises:
        CodecError: malformed, truncated, longer than its header says, or a type this codec does not decode.
    """
    header = parse_fixed_header(data, max_packet)
    if header is None:
        raise CodecError("truncated fixed header")
    body = bytes(data[header.size :])
    if len(body) != header.length:
        raise CodecError(f"packet of type {header.packet_type} declares {header.length} bytes, has {len(body)}")
    kind = header.packet_type
    value: object
    if kind == PUBLISH:
        value = decode_publish(header.flags, body)
    elif kind == PUBACK:
        value = decode_puback(body)
    elif kind == CONNECT:
        value = decode_connect(body)
    elif kind == CONNACK:
        value = decode_connack(body)
    elif kind == SUBSCRIBE:
        value = decode_subscribe(body)
    elif kind == SUBACK:
        value = decode_suback(body)
    elif kind == UNSUBSCRIBE:
        value = decode_unsubscribe(body)
    elif kind in (PINGREQ, PINGRESP, DISCONNECT):
        if body:
            raise CodecError(f"packet of type {kind} with a body")
        value = None
    else:
        raise CodecError(f"packet of type {kind} is not decoded by this codec")
    return header, value
