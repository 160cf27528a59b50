"""A real mosquitto enforcing fleetcmd's device rules, from the files of ``fleetcmd broker-config --mosquitto``.

Debian's mosquitto 2.0 cannot ask fleetcmd's HTTP authn/authz endpoints; it reads a password file and
an ACL file. Here they are exported from the things table by the real command (a subprocess, on the
running service's store), mosquitto re-reads them on SIGHUP, and real paho clients (MQTT 5) find the
embedded broker's rules: a thing gets in with its password only, uses its own topics only, and a
command sent through fleetcmd reaches it and its report ends the execution.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from server.app import FleetcmdApp
from server.cli.broker_config import ACL, CONF, PASSWD, acl_text, parse_listener, write_mosquitto
from server.core.lifecycle import Status
from server.core.models import ThingRecord
from server.core.registry import broker_password_hash
from server.dialects import DIALECTS
from tests.mosquitto import HOST, Mosquitto, free_port, mosquitto
from tests.proc import clean_env, console_script
from tests.test_external_broker import QUIET, WAIT, EmqxFirmware, external_settings, final, send

SERVICE = ("fleetcmd-svc", "svc-password-0123")
REQUEST = "$emqx/commands/things/{thing}/executions/+/request"
RESPONSE = "$emqx/commands/things/{thing}/executions/{execution}/response"


@dataclass
class Attempt:
    """A paho MQTT 5 client's CONNECT, and what the broker answered to it and to its later packets."""

    client: mqtt.Client
    answered: threading.Event
    received: queue.Queue[str]
    connack: Any = None

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(port: int, client_id: str, username: str, password: str) -> Attempt:
    """CONNECT and wait for the CONNACK (the attempt's ``connack`` reason code)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    attempt = Attempt(client, threading.Event(), queue.Queue())
    client.on_message = lambda _c, _u, message: attempt.received.put(message.topic)

    def on_connect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        attempt.connack = reason
        attempt.answered.set()

    client.on_connect = on_connect
    client.connect(HOST, port, keepalive=30)
    client.loop_start()
    assert attempt.answered.wait(WAIT), "no CONNACK"
    if attempt.connack.is_failure:
        client.loop_stop()
    return attempt


def subscribe(attempt: Attempt, topic_filter: str) -> Any:
    """The SUBACK's reason code for one filter."""
    codes: list[Any] = []
    done = threading.Event()
    attempt.client.on_subscribe = lambda _c, _u, _mid, reasons, _p: (codes.extend(reasons), done.set())
    attempt.client.subscribe(topic_filter, qos=1)
    assert done.wait(WAIT), "no SUBACK"
    return codes[0]


def publish(attempt: Attempt, topic: str, payload: str) -> Any:
    """The PUBACK's reason code of a QoS 1 publish."""
    codes: list[Any] = []
    done = threading.Event()
    attempt.client.on_publish = lambda _c, _u, _mid, reason, _p: (codes.append(reason), done.set())
    attempt.client.publish(topic, payload, qos=1)
    assert done.wait(WAIT), "no PUBACK"
    return codes[0]


def export(data_dir: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    """``fleetcmd broker-config --mosquitto DIR`` on the service's store, with the service's broker account."""
    env = clean_env({"FLEETCMD_BROKER_USERNAME": SERVICE[0], "FLEETCMD_BROKER_PASSWORD": SERVICE[1]})
    argv = [console_script(), "broker-config", "--mosquitto", str(directory), "--data-dir", str(data_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """The service's account only, as before any thing exists."""
    directory = tmp_path / "broker-files"
    write_mosquitto(directory, [], SERVICE)
    return directory


@pytest.fixture
def broker(tmp_path: Path, files: Path) -> Iterator[Mosquitto]:
    # The generated mosquitto.conf is what an operator includes: password_file, acl_file, no anonymous.
    with mosquitto(tmp_path / "mosquitto", [f"include_dir {files}"], anonymous=False) as running:
        yield running


@pytest.fixture
async def app(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[FleetcmdApp]:
    settings = external_settings(tmp_path, broker, broker_username=SERVICE[0], broker_password=SERVICE[1], allow_anonymous=False)
    async with FleetcmdApp(settings) as running:
        assert running.external is not None and running.external.connected  # the service's account got in
        yield running


async def reload(broker: Mosquitto, port: int, client_id: str, password: str, *, admitted: bool) -> None:
    """SIGHUP: mosquitto re-reads both files; wait until ``client_id`` is (or is no longer) admitted."""
    broker.process.send_signal(signal.SIGHUP)
    state: dict[str, bool] = {}

    async def attempt() -> None:
        tried = await asyncio.to_thread(connect, port, client_id, client_id, password)
        state["in"] = not tried.connack.is_failure
        if state["in"]:
            await asyncio.to_thread(tried.stop)

    for _ in range(int(WAIT / 0.1)):
        await attempt()
        if state["in"] is admitted:
            return
        await asyncio.sleep(0.1)  # mosquitto re-reads on its own schedule: nothing to await
    pytest.fail(f"mosquitto did not {'admit' if admitted else 'refuse'} {client_id} after SIGHUP")


async def test_mosquitto_enforces_the_exported_rules_with_real_clients(
    tmp_path: Path, app: FleetcmdApp, broker: Mosquitto, files: Path
) -> None:
    assert app.registry is not None and app.store is not None
    _t, password1, _ = await app.registry.create_thing("dev-1", "", {})
    _t, password2, _ = await app.registry.create_thing("dev-2", "", {})
    # A thing whose password predates schema 5 (no mosquitto hash): left out and named.
    await app.store.insert_thing(ThingRecord("old-1", "", {}, "h", 0, 0, 0))
    done = export(app.settings.data_dir, files)
    assert "(2 things)" in done.stdout and "old-1" in done.stderr
    await reload(broker, broker.port, "dev-1", password1, admitted=True)

    wrong = await asyncio.to_thread(connect, broker.port, "dev-1", "dev-1", password1 + "x")
    assert wrong.connack.is_failure
    unknown = await asyncio.to_thread(connect, broker.port, "old-1", "old-1", "h")
    assert unknown.connack.is_failure

    dev1 = await asyncio.to_thread(connect, broker.port, "dev-1", "dev-1", password1)
    dev2 = EmqxFirmware(broker.port, "dev-2")
    dev2.client.username_pw_set("dev-2", password2)
    dev2.answer = False
    await asyncio.to_thread(dev2.begin)
    try:
        assert not dev1.connack.is_failure
        # mosquitto's acl_file grants any SUBSCRIBE and applies the read rules to every message it
        # would deliver: dev-1's filters on dev-2's requests (and on everything) receive nothing.
        for topic_filter in (REQUEST.format(thing="dev-2"), "$emqx/#", "#", REQUEST.format(thing="dev-1")):
            assert not (await asyncio.to_thread(subscribe, dev1, topic_filter)).is_failure

        # A command through fleetcmd reaches dev-2, not dev-1; dev-1 cannot answer it in dev-2's place.
        execution = await send(app, "dev-2", params={"n": 1})
        got = await dev2.next()
        assert json.loads(got.payload)["params"] == {"n": 1}
        own = await send(app, "dev-1")
        mine = f"$emqx/commands/things/dev-1/executions/{own.execution_id}/request"
        topics = [await asyncio.to_thread(dev1.received.get, True, WAIT)]
        # Overlapping filters may each bring a copy; anything of dev-2's had come before dev-1's own.
        with contextlib.suppress(queue.Empty):
            while True:
                topics.append(await asyncio.to_thread(dev1.received.get, True, QUIET))
        assert set(topics) == {mine}, topics
        forged = json.dumps({"status": "FAILED", "result": {}})
        topic = RESPONSE.format(thing="dev-2", execution=execution.execution_id)
        assert (await asyncio.to_thread(publish, dev1, topic, forged)).is_failure
        await asyncio.to_thread(dev2.publish, topic, json.dumps({"status": "SUCCEEDED", "result": {"ok": True}}))
        ended = await final(app, execution)
        assert ended.status is Status.SUCCEEDED and json.loads(ended.result_json or "null") == {"ok": True}
        assert Status.FAILED not in [e.status for e in ended.history]
    finally:
        await asyncio.to_thread(dev1.stop)
        await asyncio.to_thread(dev2.stop)

    # Deleted: refused once the files are exported again and re-read.
    await app.registry.delete_thing("dev-1")
    assert "(1 things)" in export(app.settings.data_dir, files).stdout
    await reload(broker, broker.port, "dev-1", password1, admitted=False)


async def test_a_rotated_password_replaces_the_old_one_after_the_next_export(
    app: FleetcmdApp, broker: Mosquitto, files: Path
) -> None:
    assert app.registry is not None
    _t, old, _ = await app.registry.create_thing("dev-3", "", {})
    export(app.settings.data_dir, files)
    await reload(broker, broker.port, "dev-3", old, admitted=True)
    new, _ = await app.registry.rotate_credentials("dev-3")
    export(app.settings.data_dir, files)
    await reload(broker, broker.port, "dev-3", new, admitted=True)
    refused = await asyncio.to_thread(connect, broker.port, "dev-3", "dev-3", old)
    assert refused.connack.is_failure


def test_the_files_hold_the_embedded_brokers_rules(tmp_path: Path) -> None:
    things = [
        ThingRecord("a-1", "", {}, "h", 0, 0, 0, broker_password_hash=broker_password_hash("pw")),
        ThingRecord("kaa-1", "", {}, "h", 0, 0, 0, kaa_app_version="av1", broker_password_hash=broker_password_hash("k")),
        ThingRecord("co:lon", "", {}, "h", 0, 0, 0, broker_password_hash=broker_password_hash("c")),
        ThingRecord(SERVICE[0], "", {}, "h", 0, 0, 0, broker_password_hash=broker_password_hash("s")),
    ]
    written = write_mosquitto(tmp_path / "out", things, SERVICE)
    assert written.things == ["a-1", "kaa-1"]
    assert written.kaa_endpoints == ["kaa-1"] and written.unusable_ids == ["co:lon", SERVICE[0]]
    users = [line.split(":", 1)[0] for line in (tmp_path / "out" / PASSWD).read_text().splitlines()]
    assert users == [SERVICE[0], "a-1", "kaa-1"]
    for name in (PASSWD, ACL, CONF):
        assert (tmp_path / "out" / name).stat().st_mode & 0o077 == 0, name
    acl = acl_text([b.wire for b in DIALECTS], SERVICE[0]).splitlines()
    assert "pattern read $emqx/commands/things/%u/executions/+/request" in acl
    assert "pattern write $emqx/commands/things/%u/executions/+/response" in acl
    assert [line for line in acl if line.startswith("pattern")] == [
        "pattern read $emqx/commands/things/%u/executions/+/request",
        "pattern write $emqx/commands/things/%u/executions/+/response",
    ]
    assert acl[acl.index(f"user {SERVICE[0]}") + 1 :][:3] == [
        "topic readwrite #",
        "topic readwrite $emqx/#",
        "topic readwrite $events/#",
    ]


def test_the_password_hash_is_mosquitto_passwds_format() -> None:
    # What `mosquitto_passwd -b FILE dev-1 secret` (2.0.11) wrote, salt and all: $7$, 101 rounds of PBKDF2-SHA512.
    written = "$7$101$mwUbfvSl9QyMxEQV$mXkHImkrkdIaS97FVvkOhrt+az7NYYNd8bxt5pPwtYPnYgmTRVg1aDUqXTpq7N+TaG6QoLtSKi4N8rghU8+97Q=="
    assert broker_password_hash("secret", salt=base64.b64decode("mwUbfvSl9QyMxEQV")) == written
    assert broker_password_hash("secret") != broker_password_hash("secret")  # a fresh salt each time


# ---- the devices' listener: a client id is its username -------------------------------------------


def test_the_device_listener_is_host_and_port_within_range() -> None:
    assert parse_listener("1") == ("", 1) and parse_listener("65535") == ("", 65535)
    assert parse_listener("10.0.0.5:8883") == ("10.0.0.5", 8883) and parse_listener("[::1]:1883") == ("::1", 1883)
    for bad in ("0", "65536", "", "x", "host:", "a b:1883", "-1", "1883x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_listener(bad)


def test_the_command_writes_the_device_listener_and_refuses_a_bad_one(tmp_path: Path) -> None:
    env = clean_env({"FLEETCMD_BROKER_USERNAME": SERVICE[0], "FLEETCMD_BROKER_PASSWORD": SERVICE[1]})
    base = [console_script(), "broker-config", "--mosquitto", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    done = subprocess.run([*base, "--device-listener", "127.0.0.1:65535"], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    assert "(devices' listener on port 65535)" in done.stdout
    assert "listener 65535 127.0.0.1\nuse_username_as_clientid true\n" in (tmp_path / "out" / CONF).read_text()
    refused = subprocess.run([*base, "--device-listener", "65536"], capture_output=True, text=True, timeout=30, env=env)
    assert refused.returncode == 2 and "--device-listener" in refused.stderr and "65536" in refused.stderr


def _watch_disconnect(attempt: Attempt) -> threading.Event:
    gone = threading.Event()
    attempt.client.on_disconnect = lambda *_: gone.set()
    return gone


async def test_on_the_device_listener_a_thing_cannot_take_another_things_client_id(tmp_path: Path) -> None:
    things = [
        ThingRecord(t, "", {}, "h", 0, 0, 0, broker_password_hash=broker_password_hash(f"pw-{t}")) for t in ("dev-a", "dev-b")
    ]
    device_port = free_port()
    files = tmp_path / "files"
    write_mosquitto(files, things, SERVICE, device_listener=(HOST, device_port))
    assert f"listener {device_port} {HOST}\nuse_username_as_clientid true" in (files / CONF).read_text()
    with mosquitto(tmp_path / "mosquitto", [f"include_dir {files}"], anonymous=False) as broker:
        deadline = time.monotonic() + WAIT
        while True:  # mosquitto opens its listeners one after the other
            try:
                socket.create_connection((HOST, device_port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the device listener is not open"
                await asyncio.sleep(0.02)  # a port that is not open yet: nothing to await
        # The service (on the other listener) keeps its own client id.
        service = await asyncio.to_thread(connect, broker.port, "fleetcmd-replica0", *SERVICE)
        assert not service.connack.is_failure
        for port, tied in ((device_port, True), (broker.port, False)):
            victim = await asyncio.to_thread(connect, port, "dev-b", "dev-b", "pw-dev-b")
            gone = _watch_disconnect(victim)
            # dev-a, with its own valid password, presents dev-b's client id.
            rogue = await asyncio.to_thread(connect, port, "dev-b", "dev-a", "pw-dev-a")
            try:
                assert not victim.connack.is_failure and not rogue.connack.is_failure
                if tied:
                    # dev-b's connection survived a round trip after the rogue's CONNACK; dev-a got its own id.
                    topic = RESPONSE.format(thing="dev-b", execution="e1")
                    assert not (await asyncio.to_thread(publish, victim, topic, "{}")).is_failure
                    assert not gone.is_set()
                else:
                    # Without the tie (the replicas' listener) the same CONNECT takes dev-b's session.
                    assert await asyncio.to_thread(gone.wait, WAIT)
            finally:
                await asyncio.to_thread(rogue.stop)
                victim.client.on_disconnect = None
                await asyncio.to_thread(victim.stop)
        await asyncio.to_thread(service.stop)
