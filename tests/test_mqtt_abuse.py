"""Issue 13: the MQTT listener survives the internet. Raw sockets against the real service on loopback.

A connection must send a CONNECT first and in time; a packet above the size limit ends its
connection from the fixed header, before the body is read; malformed packets end the connection;
connections are capped; and whatever ends a connection releases its descriptor at once, so
that connect-and-close storms and half-open connections leave the process as they found it
while an innocent device keeps working. Every bound is tested at the bound and one past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from amqtt.adapters import BufferReader

from broker_hooks import mqtt_codec as codec
from broker_hooks.amqtt_fork.limits import FirstPacketError, read_connect
from broker_hooks.broker import FleetBroker
from server.app import FleetcmdApp
from server.config import MQTT_MAX_PACKET, Settings, SettingsError
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import app_channel
from tests.conftest import make_settings
from tests.devices import EmqxDevice, wait_for

HOST = "127.0.0.1"
CONNECT_TIMEOUT = 1.5
# Remaining length (bytes after the fixed header) of the largest packet admitted.
MAX_PACKET = 4096
# Time within which "at once" has to happen: well below CONNECT_TIMEOUT.
AT_ONCE = 0.75


# ---- raw MQTT -----------------------------------------------------------------------------------


# Well-formed packets come from the shared codec; the malformed ones below are built from its pieces.
remaining_length = codec.encode_remaining_length
string = codec.encode_string


def packet(first: int, body: bytes) -> bytes:
    """Any type byte (reserved, wrong flags...) in front of any body."""
    return bytes((first,)) + remaining_length(len(body)) + body


def connect_body(client_id: str) -> bytes:
    # MQTT 3.1.1, clean session, keep-alive 60 s: the CONNECT past its fixed header.
    raw = codec.encode_connect(client_id, keep_alive=60)
    header = codec.parse_fixed_header(raw)
    assert header is not None
    return raw[header.size :]


def connect(client_id: str) -> bytes:
    return codec.encode_connect(client_id, keep_alive=60)


def publish(topic: bytes, payload: bytes, *, flags: int = 0) -> bytes:
    """A PUBLISH with any flags (QoS 3...) and any topic bytes (not UTF-8, wildcards...)."""
    return packet(0x30 | flags, string(topic) + payload)


def publish_of_length(length: int) -> bytes:
    """A QoS 0 PUBLISH to ``t`` whose remaining length is exactly ``length``."""
    return publish(b"t", b"x" * (length - 3))


async def open_raw(port: int, local: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, local_addr=(local, 0) if local else None)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server ends the connection within ``timeout`` (what it sends first is skipped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def connected(port: int, client_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client past its CONNACK (accepted)."""
    reader, writer = await open_raw(port)
    writer.write(connect(client_id))
    connack = await asyncio.wait_for(reader.readexactly(4), 2)
    assert connack == b"\x20\x02\x00\x00", connack
    return reader, writer


async def still_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A PINGREQ gets its PINGRESP (what comes before it, e.g. a PUBLISH, is skipped)."""
    writer.write(b"\xc0\x00")
    try:
        async with asyncio.timeout(2):
            data = b""
            while not data.endswith(b"\xd0\x00"):
                chunk = await reader.read(65536)
                if not chunk:
                    return False
                data += chunk
    except (TimeoutError, ConnectionError):
        return False
    return True


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- fixtures -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def service(tmp_path: Path, **overrides: Any) -> AsyncIterator[FleetcmdApp]:
    values: dict[str, Any] = {
        "mqtt_connect_timeout": CONNECT_TIMEOUT,
        "max_response_bytes": 1024,
        "mqtt_max_packet_bytes": MAX_PACKET,
        **overrides,
    }
    async with FleetcmdApp(make_settings(tmp_path / "data", **values)) as app:
        yield app


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[FleetcmdApp]:
    async with service(tmp_path) as app:
        yield app


def port_of(app: FleetcmdApp) -> int:
    assert app.ports is not None and app.ports.mqtt is not None
    return app.ports.mqtt


def broker_of(app: FleetcmdApp) -> FleetBroker:
    assert app.broker is not None
    return app.broker


# ---- CONNECT first and in time ------------------------------------------------------------------


async def test_a_silent_connection_is_closed_at_the_connect_deadline(svc: FleetcmdApp) -> None:
    reader, writer = await open_raw(port_of(svc))
    started = time.monotonic()
    try:
        assert not await closed_by_server(reader, CONNECT_TIMEOUT * 0.6), "closed before the CONNECT deadline"
        assert await closed_by_server(reader, CONNECT_TIMEOUT + 2), "still open after the CONNECT deadline"
    finally:
        close(writer)
    assert CONNECT_TIMEOUT - 0.1 <= time.monotonic() - started <= CONNECT_TIMEOUT + 2
    assert broker_of(svc).stats["closed.connect_timeout"] == 1


async def test_a_connect_just_before_the_deadline_is_accepted(svc: FleetcmdApp) -> None:
    reader, writer = await open_raw(port_of(svc))
    try:
        await asyncio.sleep(CONNECT_TIMEOUT * 0.7)
        writer.write(connect("late-but-in-time"))
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"\x20\x02\x00\x00"
        await asyncio.sleep(CONNECT_TIMEOUT * 0.6)  # past the deadline: the deadline covered the CONNECT only
        assert await still_open(reader, writer)
    finally:
        close(writer)
    assert broker_of(svc).stats["closed.connect_timeout"] == 0


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (publish(b"a/b", b"hi"), "not_connect"),
        (packet(0x82, b"\x00\x01" + string("a/#") + b"\x01"), "not_connect"),  # SUBSCRIBE
        (b"\xc0\x00", "not_connect"),  # PINGREQ
        (b"\xe0\x00", "not_connect"),  # DISCONNECT
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_connect"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not_connect"),  # a TLS ClientHello on the plain port
        (packet(0x11, connect_body("flags")), "not_connect"),  # [MQTT-2.2.2-2] CONNECT flags must be 0
        (b"\x10\xff\xff\xff\xff\x01", "malformed"),  # remaining length of five bytes
        (packet(0x10, b"\x00\x04MQTT\x04"), "malformed"),  # truncated CONNECT
        (packet(0x10, connect_body("padded") + b"\x00\x00"), "malformed"),  # bytes after the payload
        (packet(0x10, b"\xff" * 40), "malformed"),
    ],
    ids=[
        "publish",
        "subscribe",
        "pingreq",
        "disconnect",
        "http",
        "tls",
        "connect-flags",
        "remaining-length",
        "truncated-connect",
        "padded-connect",
        "garbage-connect",
    ],
)
async def test_anything_but_a_connect_first_is_closed_at_once(svc: FleetcmdApp, first: bytes, reason: str) -> None:
    reader, writer = await open_raw(port_of(svc))
    try:
        writer.write(first)
        started = time.monotonic()
        assert await closed_by_server(reader, AT_ONCE), "left open"
        assert time.monotonic() - started < AT_ONCE
    finally:
        close(writer)
    stats = broker_of(svc).stats
    assert stats[f"closed.{reason}"] == 1, dict(stats)


async def test_a_connect_at_the_size_limit_is_read_and_one_byte_more_is_not(svc: FleetcmdApp) -> None:
    port = port_of(svc)
    fixed = len(connect_body(""))
    reader, writer = await open_raw(port)
    try:
        writer.write(packet(0x10, connect_body("c" * (MAX_PACKET - fixed))))
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"\x20\x02\x00\x00"
    finally:
        close(writer)
    reader, writer = await open_raw(port)
    try:
        # Only the fixed header is sent: the refusal cannot wait for the body.
        writer.write(b"\x10" + remaining_length(MAX_PACKET + 1))
        assert await closed_by_server(reader, AT_ONCE)
    finally:
        close(writer)
    assert broker_of(svc).stats["closed.oversized"] == 1


# ---- packet size: from the fixed header, before the body ----------------------------------------


async def test_a_publish_at_the_size_limit_is_accepted_and_one_byte_more_closes(svc: FleetcmdApp) -> None:
    port = port_of(svc)
    reader, writer = await connected(port, "at-limit")
    try:
        writer.write(publish_of_length(MAX_PACKET))
        assert await still_open(reader, writer)
    finally:
        close(writer)
    reader, writer = await connected(port, "over-limit")
    try:
        writer.write(publish_of_length(MAX_PACKET + 1)[:-1])  # all but the last byte: the header alone decides
        assert await closed_by_server(reader, AT_ONCE)
    finally:
        close(writer)
    assert broker_of(svc).stats["closed.oversized_packet"] == 1


async def test_a_publish_declaring_200_mb_is_closed_without_its_body_being_read(tmp_path: Path) -> None:
    # The default limit (max_response_bytes + 64 KiB), a client without credentials.
    async with service(tmp_path, mqtt_max_packet_bytes=0, max_response_bytes=256 * 1024) as app:
        reader, writer = await connected(port_of(app), "big")
        rss = rss_bytes()
        sent = 0
        try:
            writer.write(b"\x30" + remaining_length(200 * 1024 * 1024) + string("a/b"))
            chunk = b"x" * 65536
            closed = False
            for _ in range(512):  # up to 32 MiB: what a server that reads the body would have to hold
                try:
                    writer.write(chunk)
                    await writer.drain()
                except ConnectionError:
                    closed = True
                    break
                sent += len(chunk)
                if reader.at_eof() or writer.transport.is_closing():
                    closed = True
                    break
                with contextlib.suppress(TimeoutError):
                    if not await asyncio.wait_for(reader.read(1), 0.02):
                        closed = True
                        break
            assert closed or await closed_by_server(reader, AT_ONCE), "the server is reading the body"
        finally:
            close(writer)
        assert sent <= 256 * 1024, f"the server took {sent} bytes of the body before closing"
        assert rss_bytes() - rss < 8 * 1024 * 1024
        assert broker_of(app).stats["closed.oversized_packet"] == 1


# ---- malformed packets close the connection [MQTT-4.8.0-1] --------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (publish(b"a/b", b"\x00\x01payload", flags=0x06), "malformed"),  # QoS 3 [MQTT-3.3.1-4]
        (publish(b"a/#", b"x"), "malformed"),  # wildcard topic name [MQTT-3.3.2-2]
        (publish(b"a/+/c", b"x", flags=0x02), "malformed"),
        (packet(0x30, b"\x00\x64abc"), "malformed"),  # topic length 100, 3 bytes
        (packet(0x30, b"\x00"), "malformed"),  # not even a topic length
        (packet(0x32, string("a/b")), "malformed"),  # QoS 1 without a packet id
        (publish(b"a/\xff", b"x"), "malformed"),  # not UTF-8 [MQTT-1.5.3-1]
        (publish(b"a/\x00", b"x"), "malformed"),  # U+0000 [MQTT-1.5.3-2]
        (b"\x00\x00", "malformed"),  # reserved type 0
        (b"\xf0\x00", "malformed"),  # reserved type 15
        (packet(0x80, b"\x00\x01" + string("a/b") + b"\x01"), "malformed"),  # SUBSCRIBE flags 0 [MQTT-3.8.1-1]
        (b"\xc1\x00", "malformed"),  # PINGREQ with a flag
        (packet(0x82, b"\x00\x01\x00\x05ab"), "malformed"),  # SUBSCRIBE: topic filter length past the end
        (packet(0xA2, b"\x00\x01\x00\x09a"), "malformed"),  # UNSUBSCRIBE: the same
        (b"\x40\x01\x00", "malformed"),  # PUBACK without a whole packet id
        (b"\x82\x02\x00\x01", "malformed"),  # SUBSCRIBE without a filter [MQTT-3.8.3-3]
        (b"\xe0\x01\x00", "malformed"),  # DISCONNECT with a body
        (b"\x62\x01\x00", "malformed"),  # PUBREL without a whole packet id (amqtt's decoder raises NoDataError)
        (b"\x30\xff\xff\xff\xff\x01", "malformed"),  # remaining length of five bytes
    ],
    ids=[
        "qos3",
        "wildcard-hash",
        "wildcard-plus",
        "truncated-topic",
        "no-topic-length",
        "no-packet-id",
        "topic-not-utf8",
        "topic-nul",
        "reserved-0",
        "reserved-15",
        "subscribe-flags",
        "pingreq-flags",
        "subscribe-truncated",
        "unsubscribe-truncated",
        "puback-truncated",
        "subscribe-empty",
        "disconnect-body",
        "pubrel-truncated",
        "remaining-length",
    ],
)
async def test_a_malformed_packet_closes_the_connection(svc: FleetcmdApp, bad: bytes, reason: str) -> None:
    reader, writer = await connected(port_of(svc), "rogue")
    try:
        assert await still_open(reader, writer)
        writer.write(bad)
        assert await closed_by_server(reader, AT_ONCE), "left open"
    finally:
        close(writer)
    assert broker_of(svc).stats[f"closed.{reason}"] == 1


# ---- connection caps ----------------------------------------------------------------------------


async def test_the_overall_connection_cap_refuses_with_a_log_line_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with service(tmp_path, mqtt_max_connections=3) as app:
        port, broker = port_of(app), broker_of(app)
        held = [await connected(port, f"held-{i}") for i in range(3)]
        try:
            with caplog.at_level(logging.WARNING, logger="broker_hooks.amqtt_fork.limits"):
                reader, writer = await open_raw(port)
                assert await closed_by_server(reader, AT_ONCE), "a 4th connection was admitted"
                close(writer)
                # A second refusal within the interval is counted but not logged again.
                reader, writer = await open_raw(port)
                assert await closed_by_server(reader, AT_ONCE)
                close(writer)
            lines = [r.getMessage() for r in caplog.records if "max_connections reached" in r.getMessage()]
            assert len(lines) == 1, lines
            assert broker.stats["refused.max_connections"] == 2
            for r, _ in held:
                assert not r.at_eof()
            # One leaves: a new one is admitted.
            close(held.pop()[1])
            await wait_for(lambda: broker.open_connections == 2, what="the closed connection released")
            held.append(await connected(port, "held-again"))
        finally:
            for _, w in held:
                close(w)


async def test_the_per_address_cap_refuses_only_that_address(tmp_path: Path) -> None:
    async with service(tmp_path, mqtt_max_connections_per_address=2) as app:
        port, broker = port_of(app), broker_of(app)
        held = [await open_raw(port) for _ in range(2)]  # half-open ones count too
        try:
            reader, writer = await open_raw(port)
            assert await closed_by_server(reader, AT_ONCE), "a 3rd connection from 127.0.0.1 was admitted"
            close(writer)
            assert broker.stats["refused.max_connections_per_address"] == 1
            other_reader, other = await open_raw(port, local="127.0.0.2")
            try:
                other.write(connect("other-address"))
                assert await asyncio.wait_for(other_reader.readexactly(4), 2) == b"\x20\x02\x00\x00"
            finally:
                close(other)
        finally:
            for _, w in held:
                close(w)
        await wait_for(lambda: broker.open_connections == 0, what="every connection released")
        reader, writer = await connected(port, "after")
        close(writer)


# ---- storms leave the process as they found it ---------------------------------------------------


async def round_trip(stub: pb_grpc.CommandServiceStub, thing: str) -> None:
    ex = await stub.Send(pb.SendRequest(thing_id=thing, action="ping", ttl_seconds=30))
    deadline = time.monotonic() + 5
    while True:
        got = await stub.Get(pb.GetRequest(execution_id=ex.execution_id))
        if got.status == pb.SUCCEEDED:
            return
        assert time.monotonic() < deadline, f"no round trip: {pb.ExecutionStatus.Name(got.status)}"
        await asyncio.sleep(0.02)


async def settled(baseline: int, broker: FleetBroker, timeout: float = 5) -> None:
    await wait_for(lambda: broker.open_connections == 1, timeout=timeout, what="only the innocent device left")
    await wait_for(lambda: open_fds() <= baseline, timeout=timeout, what=f"descriptors back to {baseline}")


async def test_connect_close_storms_and_half_open_connections_leave_descriptors_and_rss_as_they_were(
    tmp_path: Path,
) -> None:
    async with service(tmp_path, mqtt_connect_timeout=0.5) as app:
        port, broker = port_of(app), broker_of(app)

        def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
            dev.respond(execution_id, "SUCCEEDED", {"ok": True})

        async with app_channel(app) as channel, EmqxDevice(HOST, port, "innocent", on_request=answer):
            stub = pb_grpc.CommandServiceStub(channel)
            await round_trip(stub, "innocent")
            baseline, rss = open_fds(), rss_bytes()

            # 1,000 connect-and-close cycles (a load balancer's health check), 100 at a time.
            for batch in range(10):

                async def cycle() -> None:
                    _, writer = await open_raw(port)
                    writer.close()

                await asyncio.gather(*(cycle() for _ in range(100)))
                if batch == 4:
                    await round_trip(stub, "innocent")
            await settled(baseline, broker)
            await round_trip(stub, "innocent")

            # 1,000 half-open connections (connect, then say nothing), 250 at a time, closed by the deadline.
            for _ in range(4):
                held = [await open_raw(port) for _ in range(250)]
                try:
                    await round_trip(stub, "innocent")
                    closed = await asyncio.gather(*(closed_by_server(r, 3) for r, _ in held))
                    assert all(closed), f"{closed.count(False)} half-open connections outlived the deadline"
                finally:
                    for _, w in held:
                        close(w)
            await settled(baseline, broker)
            await round_trip(stub, "innocent")
            assert rss_bytes() - rss < 16 * 1024 * 1024
            assert broker.stats["closed.connect_timeout"] == 1000
            assert broker.stats["closed.no_connect"] >= 900  # a few may reach the broker only after the close


# ---- WebSocket: the same deadline, first packet and sizes ----------------------------------------


async def ws_closed_by_server(ws: Any, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except TimeoutError:
        return False
    except websockets.ConnectionClosed:
        return True


@contextlib.asynccontextmanager
async def ws_client(app: FleetcmdApp) -> AsyncIterator[Any]:
    assert app.ports is not None
    async with websockets.connect(f"ws://{HOST}:{app.ports.ws}/", subprotocols=[websockets.Subprotocol("mqtt")]) as ws:
        yield ws


async def test_websocket_connections_get_the_deadline_first_packet_and_size_rules(tmp_path: Path) -> None:
    async with service(tmp_path, ws_port=0) as app:
        stats = broker_of(app).stats
        async with ws_client(app) as ws:
            assert not await ws_closed_by_server(ws, CONNECT_TIMEOUT * 0.6)
            assert await ws_closed_by_server(ws, CONNECT_TIMEOUT + 2), "silent WebSocket left open"
        assert stats["closed.connect_timeout"] == 1
        async with ws_client(app) as ws:
            await ws.send(b"\xc0\x00")  # PINGREQ first
            assert await ws_closed_by_server(ws, AT_ONCE)
        assert stats["closed.not_connect"] == 1
        async with ws_client(app) as ws:
            await ws.send(b"\x10" + remaining_length(MAX_PACKET + 1))
            assert await ws_closed_by_server(ws, AT_ONCE)
        assert stats["closed.oversized"] == 1
        # After the CONNECT (amqtt's reader serves WebSocket): a PUBLISH at the limit passes, one byte more ends it.
        for length, survives in ((MAX_PACKET, True), (MAX_PACKET + 1, False)):
            async with ws_client(app) as ws:
                await ws.send(connect(f"ws-{length}"))
                assert await asyncio.wait_for(ws.recv(), 2) == b"\x20\x02\x00\x00"
                data = publish_of_length(length)
                for at in range(0, len(data), 1000):  # in several messages: the packet limit, not the message size
                    await ws.send(data[at : at + 1000])
                await ws.send(b"\xc0\x00")
                if survives:
                    assert await asyncio.wait_for(ws.recv(), 2) == b"\xd0\x00"
                else:
                    assert await ws_closed_by_server(ws, AT_ONCE)
        assert stats["closed.oversized_packet"] == 1
        # One WebSocket message above the packet limit and its fixed header is refused by websockets
        # before amqtt sees it, even when the packets in it are each small enough.
        for size, survives in ((MAX_PACKET + 5, True), (MAX_PACKET + 6, False)):
            async with ws_client(app) as ws:
                await ws.send(connect(f"ws-message-{size}"))
                assert await asyncio.wait_for(ws.recv(), 2) == b"\x20\x02\x00\x00"
                first = publish_of_length(1000)
                await ws.send(first + publish_of_length(size - len(first) - 3))
                if survives:
                    await ws.send(b"\xc0\x00")
                    assert await asyncio.wait_for(ws.recv(), 2) == b"\xd0\x00"
                else:
                    assert await ws_closed_by_server(ws, AT_ONCE)


# ---- settings -----------------------------------------------------------------------------------


def test_the_listener_settings_and_their_bounds(tmp_path: Path) -> None:
    base = make_settings(tmp_path / "data", max_response_bytes=1024)
    assert base.mqtt_connect_timeout == 10
    assert base.mqtt_max_connections == 100_000
    assert base.mqtt_max_connections_per_address == 0
    assert base.mqtt_packet_limit == 1024 + 64 * 1024  # auto: a largest response, its topic and headers
    assert base.replace(max_response_bytes=MQTT_MAX_PACKET).mqtt_packet_limit == MQTT_MAX_PACKET
    # Never below the response limit, never above what a fixed header can declare.
    assert base.replace(mqtt_max_packet_bytes=1024).mqtt_packet_limit == 1024
    with pytest.raises(SettingsError, match="mqtt_max_packet_bytes"):
        base.replace(mqtt_max_packet_bytes=1023)
    assert base.replace(mqtt_max_packet_bytes=MQTT_MAX_PACKET).mqtt_packet_limit == MQTT_MAX_PACKET
    with pytest.raises(SettingsError, match="mqtt_max_packet_bytes"):
        base.replace(mqtt_max_packet_bytes=MQTT_MAX_PACKET + 1)
    for name, bad in (("mqtt_connect_timeout", 0), ("mqtt_max_connections", 0), ("mqtt_max_connections_per_address", -1)):
        with pytest.raises(SettingsError, match=name):
            base.replace(**{name: bad})
    env = {
        "FLEETCMD_MQTT_CONNECT_TIMEOUT": "2.5",
        "FLEETCMD_MQTT_MAX_PACKET_BYTES": "300000",
        "FLEETCMD_MQTT_MAX_CONNECTIONS": "7",
        "FLEETCMD_MQTT_MAX_CONNECTIONS_PER_ADDRESS": "3",
    }
    s = Settings.from_env(env)
    assert (s.mqtt_connect_timeout, s.mqtt_packet_limit, s.mqtt_max_connections, s.mqtt_max_connections_per_address) == (
        2.5,
        300000,
        7,
        3,
    )


# ---- the first-packet decoder against garbage (seeded, so a failure replays) ---------------------


async def test_read_connect_returns_a_connect_or_refuses_with_a_named_reason_whatever_the_bytes() -> None:
    rng = random.Random(13)
    valid = connect("fuzz-client")
    inputs: list[bytes] = [b"", valid, valid + b"\xc0\x00"]
    for _ in range(1500):
        inputs.append(rng.randbytes(rng.randrange(0, 64)))
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        inputs.append(bytes(mutated[: rng.randrange(len(mutated) + 1)]))
    reasons: set[str] = set()
    accepted = 0
    for data in inputs:
        try:
            packet_ = await read_connect(BufferReader(data), 64)
        except FirstPacketError as exc:
            assert exc.reason in {"not_connect", "malformed", "oversized", "no_connect"}, (data, exc)
            reasons.add(exc.reason)
        else:
            accepted += 1
            assert packet_.fixed_header is not None and packet_.fixed_header.packet_type == 1
    assert reasons == {"not_connect", "malformed", "oversized", "no_connect"}
    assert accepted >= 2


async def test_garbage_after_the_connect_never_reaches_an_unhandled_path(
    svc: FleetcmdApp, caplog: pytest.LogCaptureFixture
) -> None:
    # Seeded garbage and mutated valid packets after an accepted CONNECT: the connection may stay or
    # close, but nothing may end in a traceback or amqtt's "unhandled exception" path.
    rng = random.Random(9)
    valid = [publish(b"a/b", b"x"), publish(b"a/b", b"\x00\x05x", flags=0x02), b"\xc0\x00", b"\xe0\x00"]
    valid.append(packet(0x82, b"\x00\x07" + string("f/#") + b"\x01"))
    blobs = []
    for _ in range(150):
        if rng.random() < 0.5:
            blobs.append(rng.randbytes(rng.randrange(1, 48)))
        else:
            mutated = bytearray(rng.choice(valid))
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            blobs.append(bytes(mutated))
    port = port_of(svc)

    async def one(i: int, blob: bytes) -> None:
        reader, writer = await connected(port, f"garbage-{i}")
        try:
            writer.write(blob)
            await closed_by_server(reader, 0.3)
        finally:
            close(writer)

    with caplog.at_level(logging.WARNING):
        for start in range(0, len(blobs), 50):
            await asyncio.gather(*(one(start + i, b) for i, b in enumerate(blobs[start : start + 50])))
    bad = [r for r in caplog.records if r.exc_info or "unhandled exception" in r.getMessage().lower()]
    assert not bad, [r.getMessage() for r in bad]
    reader, writer = await connected(port, "after-garbage")
    try:
        assert await still_open(reader, writer)
    finally:
        close(writer)


# ---- on every event loop the service runs on ---------------------------------------------------


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_the_real_service_closes_silent_and_partial_connections_on_either_loop(tmp_path: Path, event_loop: str) -> None:
    # The default loop of `fleetcmd serve` is uvloop, whose transports are no asyncio.BaseTransport:
    # closing by class once left every refused socket open there (the in-process tests run on asyncio).
    from tests.proc import Service

    env = {"FLEETCMD_EVENT_LOOP": event_loop, "FLEETCMD_MQTT_CONNECT_TIMEOUT": "0.5"}
    svc = Service(tmp_path / "data", env=env)
    ready = await asyncio.to_thread(svc.start)
    with svc:
        for first_bytes in (b"", b"\x10\x20\x00\x04MQ", b"\x30"):  # silent, a partial CONNECT, a PUBLISH first
            reader, writer = await asyncio.open_connection(ready.mqtt_host, ready.mqtt_port)
            writer.write(first_bytes)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(16), 5) == b"", first_bytes
            assert time.monotonic() - started < 3, first_bytes
            writer.close()
