"""MQTT 3.1.1 interoperability: the behaviours of Eclipse Paho's interoperability suite, on fleetcmd and mosquitto.

Eclipse Paho's ``interoperability/client_test.py`` checks a broker with its own client; its
code is not copied here. These tests check the same behaviours (basic QoS 0/1/2 round trip,
retained messages, zero-length client id, offline queueing, overlapping subscriptions,
keep-alive, redelivery on reconnect, subscribe failure, ``$`` topics, unsubscribe, will
message), each on its own, with paho-mqtt as the client, against two brokers started here:

* ``fleetcmd``: ``FleetBroker`` configured as the benchmark's harness broker
  (``bench/harness_broker.py``: the service's ``broker_config``, anonymous admitted, no topic ACL),
  on its own event loop in a thread; for the subscribe-failure test, with the service's
  topic ACL on (a client may subscribe only to its own request topics);
* ``mosquitto``: Debian's ``/usr/sbin/mosquitto`` on a free loopback port, anonymous, no
  persistence (and an ACL file refusing ``test/nosubscribe`` for the subscribe-failure test).
  Skipped, saying so, only when the binary is not installed (``.ci/run`` installs it).

The rule: fleetcmd passes every test mosquitto passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from bench.harness_broker import NullSink
from broker_hooks.acl import TopicAcl
from broker_hooks.broker import FleetBroker
from broker_hooks.config import broker_config
from broker_hooks.rules import RuleSet
from server.dialects import emqx

HOST = "127.0.0.1"
WAIT = 5.0  # bound of every wait for something that must happen
QUIET = 1.0  # how long "nothing more arrives" is watched for
REFUSED_FILTER = "test/nosubscribe"  # what each broker is configured to refuse in the subscribe-failure test

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)


# ---- the brokers ------------------------------------------------------------------------


@dataclass
class Broker:
    """A running broker: where to connect."""

    name: str
    port: int


@contextlib.contextmanager
def fleetcmd_broker(*, acl: bool = False) -> Iterator[Broker]:
    """``FleetBroker`` as the harness broker runs it (ACL off), or with the service's topic ACL, on a thread's own loop."""
    loop = asyncio.new_event_loop()
    ready: list[FleetBroker] = []
    started = threading.Event()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def run() -> None:
        dialects = (emqx.DIALECT,)
        broker = FleetBroker(
            broker_config(
                bind=HOST,
                mqtt_port=0,
                ws_port=-1,
                sys_interval=0,
                allow_anonymous=True,
                acl=TopicAcl.of(dialects, open_mode=True) if acl else None,
            ),
            rules=RuleSet.of(dialects),
            sink=NullSink(),
            dollar_prefixes=[p for d in dialects for p in d.dollar_prefixes],
            max_payload_bytes=256 * 1024,
        )
        await broker.start()
        ready.append(broker)
        started.set()
        await stop.wait()
        await broker.stop(4)

    def main() -> None:
        try:
            loop.run_until_complete(run())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="fleetcmd-broker", daemon=True)
    thread.start()
    assert started.wait(WAIT * 2), "fleetcmd's broker did not start"
    if failure:
        raise failure[0]
    try:
        yield Broker("fleetcmd", ready[0].listener_ports()["mqtt"])
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def mosquitto_broker(workdir: Path, *, acl: bool = False) -> Iterator[Broker]:
    """mosquitto on a free loopback port, anonymous, no persistence (as ``bench/procs.py`` starts it)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does): nothing to compare with")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} {HOST}", "allow_anonymous true", "persistence false", "log_type error", "log_type warning"]
    if acl:
        acl_file = workdir / "mosquitto.acl"
        acl_file.write_text(f"topic readwrite #\ntopic deny {REFUSED_FILTER}\n")
        # As root, mosquitto drops to its own user before it reads the ACL file, which then cannot read
        # the test's private directory; "user root" keeps it as it is (and does nothing for a non-root run).
        lines += [f"acl_file {acl_file}", "user root"]
    conf.write_text("\n".join(lines) + "\n")
    log = (workdir / "mosquitto.log").open("wb")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT * 2
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                break
            assert proc.poll() is None, f"mosquitto exited: {(workdir / 'mosquitto.log').read_text()}"
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.05)
        yield Broker("mosquitto", port)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


BROKERS = ["fleetcmd", "mosquitto"]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """Each test runs once per broker, on a broker of its own (nothing retained or queued from another test)."""
    starter = fleetcmd_broker() if request.param == "fleetcmd" else mosquitto_broker(tmp_path)
    with starter as running:
        yield running


@pytest.fixture(params=BROKERS)
def refusing_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A broker configured to refuse subscriptions to :data:`REFUSED_FILTER` (fleetcmd: its topic ACL)."""
    starter = fleetcmd_broker(acl=True) if request.param == "fleetcmd" else mosquitto_broker(tmp_path, acl=True)
    with starter as running:
        yield running


# ---- the client -------------------------------------------------------------------------


@dataclass
class Message:
    """A message as the client received it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


@dataclass
class Client:
    """A paho client that records what it receives; every wait is bounded."""

    broker: Broker
    client_id: str
    clean_session: bool = True
    keepalive: int = 60
    will: tuple[str, bytes, int] | None = None
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cv = threading.Condition()
        self.connack: mqtt.ReasonCode | None = None
        self.session_present = False
        self.granted: dict[int, list[int]] = {}
        self.unsubacked: set[int] = set()
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=self.clean_session)
        if self.will is not None:
            self.paho.will_set(self.will[0], self.will[1], self.will[2])
        self.paho.on_connect = self._on_connect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_unsubscribe = self._on_unsubscribe

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: mqtt.ReasonCode, props: Any) -> None:
        with self._cv:
            self.connack = rc
            self.session_present = bool(flags.session_present)
            self._cv.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cv:
            self.messages.append(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup)))
            self._cv.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[mqtt.ReasonCode], props: Any) -> None:
        with self._cv:
            self.granted[mid] = [rc.value for rc in rcs]
            self._cv.notify_all()

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cv:
            self.unsubacked.add(mid)
            self._cv.notify_all()

    def _wait(self, check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self._cv:
            assert self._cv.wait_for(check, timeout), f"{self.client_id} on {self.broker.name}: timed out waiting for {what}"

    def connect(self) -> Client:
        """Connect and wait for the CONNACK (its reason code in ``connack``), without asserting success."""
        self.connack = None
        self.paho.connect(HOST, self.broker.port, keepalive=self.keepalive)
        self.paho.loop_start()
        self._wait(lambda: self.connack is not None, "CONNACK")
        return self

    def start(self) -> Client:
        """Connect; the broker must accept."""
        self.connect()
        assert self.connack is not None and not self.connack.is_failure, f"{self.broker.name} refused: {self.connack}"
        return self

    def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        """Subscribe and wait for the SUBACK: the granted QoS (0x80 for a failure) of each filter."""
        rc, mid = self.paho.subscribe(list(filters))
        assert rc == mqtt.MQTT_ERR_SUCCESS
        self._wait(lambda: mid in self.granted, "SUBACK")
        return self.granted[mid]

    def unsubscribe(self, *filters: str) -> None:
        """Unsubscribe and wait for the UNSUBACK."""
        rc, mid = self.paho.unsubscribe(list(filters))
        assert rc == mqtt.MQTT_ERR_SUCCESS
        self._wait(lambda: mid in self.unsubacked, "UNSUBACK")

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        """Publish and wait until the flow is complete (written for QoS 0)."""
        info = self.paho.publish(topic, payload, qos, retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"{self.broker.name}: publish to {topic!r} not completed"

    def wait_messages(self, count: int, timeout: float = WAIT) -> list[Message]:
        """Wait for ``count`` messages in all, then watch :data:`QUIET` seconds that no more come."""
        self._wait(lambda: len(self.messages) >= count, f"{count} messages (got {len(self.messages)})", timeout)
        time.sleep(QUIET)  # the absence of further messages has nothing to wait on
        with self._cv:
            return list(self.messages)

    def disconnect(self) -> None:
        """A clean DISCONNECT."""
        self.paho.disconnect()
        self.paho.loop_stop()

    def stall(self) -> None:
        """Stop reading and writing: no PUBACK, PUBREC or PINGREQ goes out any more."""
        self.paho.loop_stop()

    def abort(self) -> None:
        """Close the socket without a DISCONNECT (a crash)."""
        self.paho.loop_stop()
        sock = self.paho.socket()
        if isinstance(sock, socket.socket):
            sock.close()


@pytest.fixture
def clients(broker: Broker) -> Iterator[Callable[..., Client]]:
    """Make clients on ``broker`` (unique ids per test); all are stopped after the test."""
    made: list[Client] = []
    tag = uuid.uuid4().hex[:6]

    def make(name: str, **kw: Any) -> Client:
        # The same name in one test is the same client id (a reconnect).
        client = Client(broker, f"{name}-{tag}", **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            client.paho.disconnect()
        client.paho.loop_stop()


# The topics of Paho's suite.
TOPICS = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
WILDTOPICS = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")


# ---- the behaviours ---------------------------------------------------------------------


def test_basic(clients: Callable[..., Client]) -> None:
    """Connect and disconnect twice, then a QoS 0, 1 and 2 publish round trip on one client."""
    a = clients("basic")
    a.start().disconnect()
    a.start().disconnect()
    a.start()
    assert a.subscribe((TOPICS[0], 2)) == [2]
    for qos in (0, 1, 2):
        a.publish(TOPICS[0], f"qos {qos}".encode(), qos)
    got = a.wait_messages(3)
    # As Paho's suite: what arrives, not at which QoS (amqtt delivers at the subscription's QoS, see the report of issue 13).
    assert sorted(m.payload for m in got) == [b"qos 0", b"qos 1", b"qos 2"]


def test_retained_messages(clients: Callable[..., Client]) -> None:
    """Retained messages reach a later subscriber (retain flag set); empty retained messages clear them."""
    a = clients("retained").start()
    for qos, topic in enumerate(TOPICS[1:4]):
        a.publish(topic, f"qos {qos}".encode(), qos, retain=True)
    b = clients("retained-sub").start()
    assert b.subscribe((WILDTOPICS[5], 2)) == [2]
    got = b.wait_messages(3)
    assert sorted((m.topic, m.payload) for m in got) == sorted(
        [(TOPICS[1], b"qos 0"), (TOPICS[2], b"qos 1"), (TOPICS[3], b"qos 2")]
    )
    assert all(m.retain for m in got)
    for topic in TOPICS[1:4]:
        a.publish(topic, b"", 1, retain=True)  # clears the retained message (QoS 1: done once PUBACKed)
    c = clients("retained-after").start()
    assert c.subscribe((WILDTOPICS[5], 2)) == [2]
    assert c.wait_messages(0) == []


def _connack_for_empty_client_id(broker: Broker, clean_session: bool) -> bytes:
    # Written by hand: paho refuses to send an empty client id with clean_session=false.
    flags = 0x02 if clean_session else 0x00
    connect = b"\x10\x0c\x00\x04MQTT\x04" + bytes((flags,)) + b"\x00\x3c\x00\x00"
    with socket.create_connection((HOST, broker.port), WAIT) as sock:
        sock.sendall(connect)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                break
            connack += chunk
        return connack


def test_zero_length_clientid(broker: Broker) -> None:
    """A zero-length client id is refused with clean_session=false (rc 2) and accepted with clean_session=true [MQTT-3.1.3-8]."""
    assert _connack_for_empty_client_id(broker, clean_session=False) == b"\x20\x02\x00\x02"  # identifier rejected
    assert _connack_for_empty_client_id(broker, clean_session=True) == b"\x20\x02\x00\x00"


def test_offline_message_queueing(clients: Callable[..., Client]) -> None:
    """A persistent session gets the QoS 1 and 2 messages published while it was offline (QoS 0 may be dropped)."""
    b = clients("offline", clean_session=False).start()
    assert b.subscribe((WILDTOPICS[5], 2)) == [2]
    b.disconnect()
    a = clients("offline-pub").start()
    for qos, topic in enumerate(TOPICS[1:4]):
        a.publish(topic, f"qos {qos}".encode(), qos)
    a.disconnect()
    b.start()
    assert b.session_present
    got = {m.payload for m in b.wait_messages(2)}
    assert got in ({b"qos 1", b"qos 2"}, {b"qos 0", b"qos 1", b"qos 2"})


@pytest.mark.parametrize(
    "broker",
    [
        "fleetcmd",
        pytest.param(
            "mosquitto",
            marks=pytest.mark.xfail(
                strict=True,
                reason="mosquitto 2.0 sends one copy at the QoS of one of the matching subscriptions, not the highest"
                " [MQTT-3.3.5-1]",
            ),
        ),
    ],
    indirect=True,
)
def test_overlapping_subscriptions(clients: Callable[..., Client]) -> None:
    """A message matching two of a client's filters comes once at the highest QoS, or once per filter [MQTT-3.3.5-1]."""
    a = clients("overlap").start()
    assert a.subscribe((WILDTOPICS[6], 2), (WILDTOPICS[0], 1)) == [2, 1]
    a.publish(TOPICS[3], b"overlapping topic filters", 2)
    got = a.wait_messages(1)
    assert sorted(m.qos for m in got) in ([2], [1, 2])
    assert {m.payload for m in got} == {b"overlapping topic filters"}


def test_keepalive(clients: Callable[..., Client]) -> None:
    """A client silent past 1.5 x its keep-alive is disconnected, and its will is published."""
    b = clients("keepalive-watch").start()
    assert b.subscribe((TOPICS[4], 2)) == [2]
    a = clients("keepalive", keepalive=2, will=(TOPICS[4], b"keepalive expiry", 1)).start()
    a.stall()  # no PINGREQ from now on
    got = b.wait_messages(1, timeout=2 * 1.5 + WAIT)
    assert [m.payload for m in got] == [b"keepalive expiry"]


def test_redelivery_on_reconnect(clients: Callable[..., Client]) -> None:
    """QoS 1 and 2 messages a client never acknowledged come again, DUP set, when its session resumes [MQTT-4.4.0-1]."""
    b = clients("redelivery", clean_session=False).start()
    assert b.subscribe((WILDTOPICS[6], 2)) == [2]
    b.stall()  # the broker's PUBLISHes stay unread: no PUBACK, no PUBREC
    a = clients("redelivery-pub").start()
    a.publish(TOPICS[1], b"", 1)
    a.publish(TOPICS[3], b"", 2)
    time.sleep(QUIET)  # the broker writes both to the stalled socket; nothing observable to wait on
    sock = b.paho.socket()
    assert isinstance(sock, socket.socket)
    sock.sendall(b"\xe0\x00")  # DISCONNECT, written by hand: paho's loop is stopped
    sock.close()
    assert b.messages == []
    again = clients("redelivery", clean_session=False).start()  # the same client id
    got = again.wait_messages(2)
    assert sorted((m.topic, m.dup) for m in got) == [(TOPICS[1], True), (TOPICS[3], True)]


@pytest.mark.parametrize(
    "refusing_broker",
    [
        "fleetcmd",
        pytest.param(
            "mosquitto",
            marks=pytest.mark.xfail(
                strict=True,
                reason="mosquitto 2.0 grants an MQTT 3.1.1 subscription its ACL denies (and then delivers nothing)",
            ),
        ),
    ],
    indirect=True,
)
def test_subscribe_failure(refusing_broker: Broker) -> None:
    """A subscription the broker refuses gets SUBACK 0x80, and the connection goes on."""
    a = Client(refusing_broker, f"nosub-{uuid.uuid4().hex[:6]}")
    try:
        a.start()
        assert a.subscribe((REFUSED_FILTER, 2)) == [0x80]
        a.publish(TOPICS[0], b"still connected", 1)
        assert a.paho.is_connected()
    finally:
        a.disconnect()


def test_dollar_topics(clients: Callable[..., Client]) -> None:
    """Filters starting with a wildcard do not match topics starting with $ [MQTT-4.7.2-1]."""
    b = clients("dollar").start()
    assert b.subscribe((WILDTOPICS[5], 2), (WILDTOPICS[2], 2)) == [2, 2]
    a = clients("dollar-pub").start()
    a.publish("$" + TOPICS[1], b"", 1)
    marker = clients("dollar-marker").start()
    marker.publish(TOPICS[1], b"marker", 1)
    got = b.wait_messages(1)  # the marker (once, or once per matching filter), and then nothing else
    assert {m.topic for m in got} == {TOPICS[1]}


def test_unsubscribe(clients: Callable[..., Client]) -> None:
    """After UNSUBSCRIBE, messages to the removed filters no longer arrive; the others still do."""
    b = clients("unsub").start()
    assert b.subscribe((TOPICS[1], 2), (TOPICS[2], 2), (TOPICS[3], 2)) == [2, 2, 2]
    b.unsubscribe(TOPICS[1])
    b.unsubscribe(TOPICS[2])
    a = clients("unsub-pub").start()
    for topic in TOPICS[1:4]:
        a.publish(topic, b"", 1)
    got = b.wait_messages(1)
    assert [m.topic for m in got] == [TOPICS[3]]


def test_will_message(clients: Callable[..., Client]) -> None:
    """A client that goes away without DISCONNECT gets its will published."""
    b = clients("will-watch").start()
    assert b.subscribe((TOPICS[2], 2)) == [2]
    a = clients("will", will=(TOPICS[2], b"client not disconnected", 0)).start()
    a.abort()
    got = b.wait_messages(1)
    assert [(m.topic, m.payload) for m in got] == [(TOPICS[2], b"client not disconnected")]
