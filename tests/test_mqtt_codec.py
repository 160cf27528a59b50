"""The sans-IO MQTT 3.1.1 codec: round trips, the bounds of its lengths, and malformed input refused with a reason."""

from __future__ import annotations

import asyncio

import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.subscribe import SubscribePacket
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_hooks import mqtt_codec as codec
from broker_hooks.mqtt_codec import CodecError, Connect, Publish

# ---- remaining length ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),  # the spec's examples (2.2.3), the last one the largest length
    ],
)
def test_remaining_length_round_trips_at_each_byte_boundary(length: int, encoded: bytes) -> None:
    assert codec.encode_remaining_length(length) == encoded
    assert codec.decode_remaining_length(b"\x30" + encoded) == (length, 1 + len(encoded))


def test_remaining_length_past_the_bound_is_refused() -> None:
    with pytest.raises(CodecError) as err:
        codec.encode_remaining_length(codec.MAX_REMAINING_LENGTH + 1)
    assert err.value.reason == "oversized_packet"
    with pytest.raises(CodecError, match="negative"):
        codec.encode_remaining_length(-1)
    with pytest.raises(CodecError, match="longer than four bytes") as err:
        codec.decode_remaining_length(b"\x30\xff\xff\xff\xff\x01")
    assert err.value.reason == "malformed"


def test_remaining_length_incomplete_asks_for_more() -> None:
    assert codec.decode_remaining_length(b"\x30") is None
    assert codec.decode_remaining_length(b"\x30\xff\xff\xff") is None
    assert codec.parse_fixed_header(b"") is None
    assert codec.split_packet(b"\x30\x05\x00\x01a") is None  # 3 of 5 body bytes


def test_packet_size_limit_at_and_past_the_bound() -> None:
    at = b"\x30" + codec.encode_remaining_length(100)
    assert codec.parse_fixed_header(at, max_packet=100) == codec.FixedHeader(3, 0, 100, 2)
    with pytest.raises(CodecError) as err:
        codec.parse_fixed_header(at, max_packet=99)
    assert err.value.reason == "oversized_packet"


def test_split_packet_takes_one_whole_packet_from_a_stream() -> None:
    stream = codec.encode_puback(7) + codec.PINGRESP_PACKET + b"\x40"
    header, body = codec.split_packet(stream) or pytest.fail("a whole PUBACK is there")
    assert (header.packet_type, header.length, body) == (codec.PUBACK, 2, b"\x00\x07")
    rest = stream[header.size + header.length :]
    header, body = codec.split_packet(rest) or pytest.fail("a whole PINGRESP is there")
    assert (header.packet_type, body) == (codec.PINGRESP, b"")
    assert codec.split_packet(rest[header.size :]) is None


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "connect",
    [
        Connect("dev-1"),
        Connect("dev-1", "dev-1", "s3cret", 60, False),
        Connect("", None, None, 65_535, True),
        Connect("ü-ñ", "user", None, 30),
    ],
)
def test_connect_round_trips_and_amqtt_reads_it(connect: Connect) -> None:
    raw = codec.encode_connect(connect.client_id, connect.username, connect.password, connect.keep_alive, connect.clean_session)
    header, value = codec.decode_packet(raw)
    assert header.packet_type == codec.CONNECT and value == connect
    # amqtt's own decoder (the broker's CONNECT reader) reads the same fields.
    fixed = MQTTFixedHeader(codec.CONNECT, 0, header.length)
    packet = _amqtt_decode(ConnectPacket, raw, fixed)
    # amqtt makes up a client id for an empty one.
    assert (packet.client_id if connect.client_id else "", packet.username, packet.password, packet.keep_alive) == (
        connect.client_id,
        connect.username,
        connect.password,
        connect.keep_alive,
    )
    assert packet.clean_session_flag == connect.clean_session


@pytest.mark.parametrize(
    "publish",
    [
        Publish("a/b", b"", 0),
        Publish("a/b", b"x" * 200, 1, 1),
        Publish("$emqx/commands/things/t/executions/e/response", b"{}", 2, 65_535, retain=True, dup=True),
        Publish("t", b"\x00\xff", 1, 42, dup=True),
        Publish("t", b"r", 0, None, retain=True),
    ],
)
def test_publish_round_trips_with_qos_dup_and_retain_and_amqtt_reads_it(publish: Publish) -> None:
    raw = codec.encode_publish(
        publish.topic, publish.payload, publish.qos, publish.packet_id, retain=publish.retain, dup=publish.dup
    )
    header, value = codec.decode_packet(raw)
    assert header.packet_type == codec.PUBLISH and value == publish
    packet = _amqtt_decode(PublishPacket, raw, MQTTFixedHeader(codec.PUBLISH, header.flags, header.length))
    assert (packet.topic_name, packet.data, packet.qos or 0, packet.retain_flag, packet.dup_flag) == (
        publish.topic,
        publish.payload,
        publish.qos,
        publish.retain,
        publish.dup,
    )


def test_small_packets_round_trip() -> None:
    assert codec.decode_packet(codec.encode_connack(0)) == (codec.FixedHeader(codec.CONNACK, 0, 2, 2), (False, 0))
    assert codec.decode_packet(codec.encode_connack(5, session_present=True))[1] == (True, 5)
    assert codec.decode_packet(codec.encode_puback(65_535))[1] == 65_535
    assert codec.decode_packet(codec.encode_subscribe(3, [("a/+", 1), ("b/#", 0)]))[1] == (3, [("a/+", 1), ("b/#", 0)])
    assert codec.decode_packet(codec.encode_suback(3, [1, 0x80]))[1] == (3, [1, 0x80])
    assert codec.decode_packet(codec.encode_unsubscribe(4, ["a/+", "c"]))[1] == (4, ["a/+", "c"])
    for raw, kind in (
        (codec.PINGREQ_PACKET, codec.PINGREQ),
        (codec.PINGRESP_PACKET, codec.PINGRESP),
        (codec.DISCONNECT_PACKET, codec.DISCONNECT),
    ):
        header, value = codec.decode_packet(raw)
        assert (header.packet_type, value) == (kind, None)


def test_subscribe_is_what_amqtt_decodes() -> None:
    raw = codec.encode_subscribe(9, [("$emqx/commands/things/t/executions/+/request", 1)])
    header, _ = codec.decode_packet(raw)
    packet = _amqtt_decode(SubscribePacket, raw, MQTTFixedHeader(codec.SUBSCRIBE, header.flags, header.length))
    assert packet.variable_header.packet_id == 9 and packet.payload.topics == [
        ("$emqx/commands/things/t/executions/+/request", 1)
    ]


def test_a_string_at_and_past_its_bound() -> None:
    assert len(codec.encode_string("x" * 65_535)) == 65_537
    with pytest.raises(CodecError, match="65535"):
        codec.encode_string("x" * 65_536)


# ---- malformed ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\x00", "reserved packet type 0"),
        (b"\xf0\x00", "reserved packet type 15"),
        (b"\xc1\x00", "flags 0x1"),  # PINGREQ with a flag [MQTT-2.2.2-2]
        (b"\x80\x06\x00\x01\x00\x01a\x01", "flags 0x0"),  # SUBSCRIBE without its 0x2 [MQTT-3.8.1-1]
        (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),  # [MQTT-3.3.1-4]
        (b"\x30\x05\x00\x64abc", "truncated PUBLISH"),  # topic length 100, 3 bytes
        (b"\x30\x01\x00", "truncated PUBLISH"),
        (b"\x32\x03\x00\x01a", "truncated PUBLISH"),  # QoS 1 without a packet id
        (b"\x30\x04\x00\x02a\xff", "not UTF-8"),  # [MQTT-1.5.3-1]
        (b"\x30\x04\x00\x02a\x00", "U+0000"),  # [MQTT-1.5.3-2]
        (b"\x30\x05\x00\x03a/#", "wildcard"),  # [MQTT-3.3.2-2]
        (b"\x30\x05\x00\x03a/+", "wildcard"),
        (b"\x40\x01\x00", "without a whole packet id"),
        (b"\x40\x03\x00\x01\x00", "longer than a packet id"),
        (b"\x82\x02\x00\x01", "no topic filter"),  # [MQTT-3.8.3-3]
        (b"\x82\x06\x00\x01\x00\x05ab", "past the end"),
        (b"\x82\x06\x00\x01\x00\x01a\x03", "QoS byte"),  # [MQTT-3.8.3-4]
        (b"\xa2\x02\x00\x01", "no topic filter"),  # [MQTT-3.10.3-2]
        (b"\xa2\x05\x00\x01\x00\x09a", "past the end"),
        (b"\xe0\x01\x00", "with a body"),
        (b"\x20\x01\x00", "not two bytes"),
        (b"\x10\x07\x00\x04MQTT\x04", "not an MQTT 3.1.1 CONNECT"),  # truncated CONNECT
        (codec.encode_connect("c")[:-1] + b"c\x00\x00", "declares"),  # bytes past the declared length
        (b"\x30\x05\x00\x01a", "declares 5 bytes, has 3"),  # fewer bytes than declared
        (b"\x30\xff\xff\xff\xff\x01", "longer than four bytes"),
        (b"\x30\xff", "truncated fixed header"),
        (b"\x50\x02\x00\x01", "not decoded by this codec"),  # PUBREC
    ],
)
def test_malformed_packets_raise_a_codec_error_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as err:
        codec.decode_packet(raw)
    assert reason in err.value.detail and err.value.reason == "malformed"


def test_a_connect_that_does_not_decode_to_its_length_is_refused() -> None:
    body = codec.encode_connect("pad")[2:] + b"\x00\x00"
    with pytest.raises(CodecError, match="does not decode to its length"):
        codec.decode_connect(body)
    with pytest.raises(CodecError, match="reserved flag"):
        codec.decode_connect(b"\x00\x04MQTT\x04\x03\x00\x00\x00\x00")
    with pytest.raises(CodecError, match="password without a user name"):
        codec.decode_connect(b"\x00\x04MQTT\x04\x42\x00\x00\x00\x00\x00\x00")


# ---- property: whatever the bytes, the decoder answers a value or a CodecError -----------------


@settings(max_examples=300, derandomize=True)
@given(
    raw=st.one_of(
        st.binary(max_size=80),
        st.builds(
            lambda first, body: bytes([first]) + codec.encode_remaining_length(len(body)) + body,
            st.integers(0, 255),
            st.binary(max_size=60),
        ),
        st.builds(
            lambda flags, topic, rest: (
                bytes([0x30 | flags])
                + codec.encode_remaining_length(2 + len(topic) + len(rest))
                + len(topic).to_bytes(2, "big")
                + topic
                + rest
            ),
            st.integers(0, 15),
            st.binary(max_size=20) | st.sampled_from([b"a/#", b"+", b"\x00", b"\xff\xfe"]),
            st.binary(max_size=20),
        ),
    )
)
def test_the_decoder_never_raises_anything_but_a_codec_error(raw: bytes) -> None:
    try:
        header, value = codec.decode_packet(raw)
    except CodecError as exc:
        assert exc.reason in ("malformed", "oversized_packet") and exc.detail
        return
    # What decodes was well-formed: it is exactly its declared length and encodes back to itself.
    assert header.size + header.length == len(raw)
    if isinstance(value, Publish):
        again = codec.encode_publish(value.topic, value.payload, value.qos, value.packet_id, retain=value.retain, dup=value.dup)
        assert again == raw


def _amqtt_decode(cls: type, raw: bytes, fixed: MQTTFixedHeader) -> object:
    header = codec.parse_fixed_header(raw)
    assert header is not None
    return asyncio.run(cls.from_stream(BufferReader(raw[header.size :]), fixed_header=fixed))
