"""A minimal MQTT 3.1.1 client on ``asyncio.Protocol``: the load generator's device and requester.

Packets are encoded by the shared codec (:mod:`broker_hooks.mqtt_codec`); the framing loop
and the decoding of what a broker sends are inlined in ``data_received``, with no
per-message task, no queue and no logging, so one process can hold thousands
of connections and push tens of thousands of messages per second: the
simulator must be cheaper than the broker it measures. Only what the bench
needs is implemented; anything unexpected closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from broker_hooks import mqtt_codec as codec
from broker_hooks.mqtt_codec import CONNACK, PINGRESP, PUBACK, PUBLISH, SUBACK

OnPublish = Callable[["MqttConn", str, bytes], None]


# The CONNECT packet (protocol level 4), under the name the load generator imports.
connect_packet = codec.encode_connect


class MqttConn(asyncio.Protocol):
    """One MQTT connection. ``await conn.ready`` after CONNECT; ``await conn.subscribe(...)``."""

    def __init__(
        self,
        client_id: str,
        on_publish: OnPublish | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 0,
        clean: bool = True,
    ) -> None:
        self.client_id = client_id
        self.on_publish = on_publish
        self._connect = connect_packet(client_id, username, password, keepalive, clean)
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[int] = loop.create_future()  # CONNACK return code
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._next_id = 0
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self.puback_waiters: dict[int, asyncio.Future[None]] = {}
        self.received = 0
        self.pubacks = 0
        self.user: object = None  # free slot for the owner

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        transport.write(self._connect)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.client_id}: connection lost before CONNACK"))
        for fut in (*self._subacks.values(), *self.puback_waiters.values()):
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:  # noqa: D102
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            # Remaining length: up to 4 bytes.
            mult = 1
            length = 0
            i = pos + 1
            while True:
                if i >= end:
                    del buf[:pos]
                    return
                byte = buf[i]
                length += (byte & 0x7F) * mult
                i += 1
                if not byte & 0x80:
                    break
                mult *= 128
            if end - i < length:
                break
            self._packet(buf[pos], bytes(buf[i : i + length]))
            pos = i + length
        del buf[:pos]

    def _packet(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            tlen = (body[0] << 8) | body[1]
            topic = body[2 : 2 + tlen].decode()
            pos = 2 + tlen
            if qos:
                pid = body[pos : pos + 2]
                pos += 2
                if self.transport is not None:
                    self.transport.write(codec.encode_puback(int.from_bytes(pid, "big")))
            self.received += 1
            if self.on_publish is not None:
                self.on_publish(self, topic, body[pos:])
        elif kind == PUBACK:
            self.pubacks += 1
            pid = (body[0] << 8) | body[1]
            fut = self.puback_waiters.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == CONNACK:
            if not self.ready.done():
                self.ready.set_result(body[1])
        elif kind == SUBACK:
            pid = (body[0] << 8) | body[1]
            sfut = self._subacks.pop(pid, None)
            if sfut is not None and not sfut.done():
                sfut.set_result(body[2:])
        elif kind == PINGRESP:
            pass
        else:  # pragma: no cover - nothing else is expected from a broker
            self.close()

    # ---- operations ---------------------------------------------------------------------

    def packet_id(self) -> int:
        """The next packet id (1..65535)."""
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe to one filter; returns the SUBACK return code (0x80 = refused)."""
        pid = self.packet_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._subacks[pid] = fut
        if self.transport is None:
            raise ConnectionError("not connected")
        self.transport.write(codec.encode_subscribe(pid, [(topic_filter, qos)]))
        codes = await fut
        return codes[0]

    def publish(self, topic: bytes, payload: bytes, qos: int = 1) -> int:
        """Write a PUBLISH (``topic`` encoded); returns its packet id (0 for QoS 0). Does not wait."""
        pid = self.packet_id() if qos else 0
        if self.transport is not None:
            self.transport.write(codec.encode_publish(topic.decode(), payload, qos, pid or None))
        return pid

    def publish_wait(self, topic: bytes, payload: bytes) -> asyncio.Future[None]:
        """QoS 1 PUBLISH; the future resolves on its PUBACK."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pid = self.publish(topic, payload, 1)
        self.puback_waiters[pid] = fut
        return fut

    def close(self) -> None:
        """Send DISCONNECT and close the socket."""
        if self.transport is not None:
            self.transport.write(codec.DISCONNECT_PACKET)
            self.transport.close()


async def open_conn(
    host: str,
    port: int,
    client_id: str,
    on_publish: OnPublish | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 0,
    clean: bool = True,
    timeout: float = 30.0,
) -> MqttConn:
    """Connect and wait for a successful CONNACK.

    Raises:
        ConnectionError: refused (CONNACK return code != 0) or the socket failed.
        TimeoutError: no CONNACK within ``timeout``.
    """
    loop = asyncio.get_running_loop()
    conn = MqttConn(client_id, on_publish, username=username, password=password, keepalive=keepalive, clean=clean)
    await asyncio.wait_for(loop.create_connection(lambda: conn, host, port), timeout)
    rc = await asyncio.wait_for(conn.ready, timeout)
    if rc != 0:
        conn.close()
        raise ConnectionError(f"{client_id}: CONNACK return code {rc}")
    return conn
