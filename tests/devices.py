"""A real MQTT device for tests: paho-mqtt speaking the EMQX Fleets command contract."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest

RequestHandler = Callable[["EmqxDevice", str, dict[str, Any]], None]


@dataclass(frozen=True)
class Received:
    """A message exactly as paho delivered it (for checks on topic, QoS, flags and raw payload)."""

    topic: str
    qos: int
    retain: bool
    dup: bool
    mid: int
    payload: bytes


class EmqxDevice:
    """A paho client that subscribes to its request topic and records every request.

    ``on_request`` (optional) is called in paho's thread for each request and may
    call :meth:`respond`. Use as a context manager; it disconnects on exit.
    """

    def __init__(
        self,
        host: str,
        port: int,
        thing_id: str,
        *,
        on_request: RequestHandler | None = None,
        clean_session: bool = True,
        keepalive: int = 60,
        subscribe: bool = True,
        sub_qos: int = 1,
        transport: str = "tcp",
        auto_ack: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        self.host, self.port, self.thing_id = host, port, thing_id
        self.on_request = on_request
        self.subscribe_on_connect = subscribe
        self.sub_qos = sub_qos
        self.requests: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.received: queue.Queue[Received] = queue.Queue()
        self._subacks: dict[int, list[int]] = {}
        self._suback_cv = threading.Condition()
        self.connected = threading.Event()
        # Set on every CONNACK; connect_rc is its reason code (paho ReasonCode; "Not authorized" when refused).
        self.connack = threading.Event()
        self.connect_rc: Any = None
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=thing_id,
            clean_session=clean_session,
            transport=transport,  # type: ignore[arg-type]
            manual_ack=not auto_ack,
        )
        self.keepalive = keepalive
        if username is not None or password is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=tls_ca)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    @property
    def request_filter(self) -> str:
        return f"$emqx/commands/things/{self.thing_id}/executions/+/request"

    def response_topic(self, execution_id: str, thing_id: str | None = None) -> str:
        return f"$emqx/commands/things/{thing_id or self.thing_id}/executions/{execution_id}/response"

    def start(self, timeout: float = 5) -> EmqxDevice:
        """Connect (and subscribe); raises ConnectionRefusedError when the broker refuses the CONNECT."""
        self.connack.clear()
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if self.connack.wait(timeout) and self.connect_rc is not None and self.connect_rc.is_failure:
            rc = self.connect_rc
            self.client.loop_stop()  # paho would otherwise retry the refused CONNECT forever
            raise ConnectionRefusedError(f"{self.thing_id}: CONNACK {rc} ({int(rc.value)})")
        if not self.connected.wait(timeout):
            raise TimeoutError(f"{self.thing_id} did not connect")
        if self.subscribe_on_connect and not self.subscribed.wait(timeout):
            raise TimeoutError(f"{self.thing_id} did not get a SUBACK")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # The broker runs on the test's event loop: never block it, wait in a thread.
    async def __aenter__(self) -> EmqxDevice:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    async def wait_request(self, timeout: float = 5) -> tuple[str, dict[str, Any]]:
        return await asyncio.to_thread(self.next_request, timeout)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connect_rc = rc
        self.connack.set()
        if rc.is_failure:
            return
        self.disconnected.clear()
        self.connected.set()
        if self.subscribe_on_connect:
            client.subscribe(self.request_filter, qos=self.sub_qos)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        with self._suback_cv:
            self._subacks[mid] = [int(rc.value) for rc in rcs]
            self._suback_cv.notify_all()
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received.put(Received(msg.topic, msg.qos, bool(msg.retain), bool(msg.dup), msg.mid, bytes(msg.payload)))
        execution_id = msg.topic.split("/")[-2]
        body = json.loads(msg.payload)
        self.requests.put((execution_id, body))
        if self.on_request is not None:
            self.on_request(self, execution_id, body)

    def next_request(self, timeout: float = 5) -> tuple[str, dict[str, Any]]:
        return self.requests.get(timeout=timeout)

    def respond(
        self, execution_id: str, status: str, result: Any = None, *, thing_id: str | None = None, **extra: Any
    ) -> mqtt.MQTTMessageInfo:
        body: dict[str, Any] = {"status": status, **extra}
        if result is not None:
            body["result"] = result
        return self.publish_raw(self.response_topic(execution_id, thing_id), json.dumps(body).encode())

    async def arespond(self, execution_id: str, status: str, result: Any = None, **kw: Any) -> None:
        info = self.respond(execution_id, status, result, **kw)
        await asyncio.to_thread(info.wait_for_publish, 5)

    def publish_raw(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        """Publish without waiting (safe inside paho callbacks); wait on the returned info if needed."""
        return self.client.publish(topic, payload, qos=qos)

    async def apublish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish and wait for the broker's PUBACK without blocking the loop."""
        info = self.publish_raw(topic, payload, qos)
        await asyncio.to_thread(info.wait_for_publish, 5)

    def subscribe_sync(self, topic_filter: str | list[str], qos: int = 1, timeout: float = 5) -> list[int]:
        """SUBSCRIBE (one filter, or several in one packet) and wait for its SUBACK.

        Returns the granted return codes in filter order (0x80 = failure).
        """
        if isinstance(topic_filter, list):
            result, mid = self.client.subscribe([(f, qos) for f in topic_filter])
        else:
            result, mid = self.client.subscribe(topic_filter, qos=qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"subscribe failed: {mqtt.error_string(result)}")
        with self._suback_cv:
            if not self._suback_cv.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"no SUBACK for {topic_filter!r} within {timeout}s")
            return self._subacks.pop(mid)

    async def asubscribe(self, topic_filter: str | list[str], qos: int = 1, timeout: float = 5) -> list[int]:
        """:meth:`subscribe_sync` without blocking the event loop."""
        return await asyncio.to_thread(self.subscribe_sync, topic_filter, qos, timeout)

    async def wait_message(self, timeout: float = 5) -> Received:
        """The next message received (any topic), as paho saw it."""
        return await asyncio.to_thread(self.received.get, True, timeout)

    def abort(self) -> None:
        """Vanish without a DISCONNECT: stop the network loop, then close the socket (a crashed device)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    async def aabort(self) -> None:
        """:meth:`abort` without blocking the event loop."""
        await asyncio.to_thread(self.abort)


def wait_until(predicate: Callable[[], bool], timeout: float = 5, interval: float = 0.02) -> bool:
    """Poll a condition (for state seen through another thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5, what: str = "condition") -> None:
    """Poll a condition from async code without blocking the loop; fail the test on time-out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
