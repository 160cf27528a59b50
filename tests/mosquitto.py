"""Debian's mosquitto for tests: a generated configuration, a free loopback port, stopped on exit.

Tests that need it call :func:`require_mosquitto` first: without the binary they are skipped with
the reason, except in CI (``CI`` set, as ``.ci/run`` installs mosquitto), where its absence fails.
Nothing here sleeps to wait for something that can be awaited: the port is polled until it
accepts (bounded), and the process is watched while polling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)


def require_mosquitto() -> str:
    """The mosquitto binary; skips the test when it is absent (fails instead under CI)."""
    if MOSQUITTO is None:
        reason = "mosquitto is not installed (apt-get install mosquitto; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason + " and CI is set: the external broker tests must run")
        pytest.skip(reason)
    return MOSQUITTO


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Mosquitto:
    """A running mosquitto: where to connect, and its log."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>``."""
        return f"mqtt://{HOST}:{self.port}"

    def log(self) -> str:
        """What mosquitto logged so far."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def mosquitto(workdir: Path, extra: Sequence[str] = (), *, port: int = 0, anonymous: bool = True) -> Iterator[Mosquitto]:
    """mosquitto (MQTT 3.1.1 and 5, shared subscriptions built in) on a free loopback port.

    Anonymous clients are allowed unless ``anonymous`` is False (Debian's mosquitto has no HTTP
    authentication plugin, so the EMQX-format authn/authz endpoints cannot be wired to it; with
    ``extra`` naming the files of ``fleetcmd broker-config --mosquitto`` it enforces fleetcmd's rules);
    sessions are kept in memory for as long as it runs (``persistence false``). ``extra`` lines are
    appended to the configuration; ``port`` 0 picks a free one (another value: a restart on the port
    of an earlier run).
    """
    binary = require_mosquitto()
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    lines = [
        f"listener {port} {HOST}",
        f"allow_anonymous {'true' if anonymous else 'false'}",
        "persistence false",
        # Every client's queue of QoS 1 messages while it is away (the service's unacknowledged reports).
        "max_queued_messages 10000",
        "log_type error",
        "log_type warning",
        "log_type notice",
        # As root, mosquitto drops to its own user, which cannot read a test's private directory.
        "user root",
        *extra,
    ]
    conf.write_text("\n".join(lines) + "\n")
    log_path = workdir / "mosquitto.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                break
            assert proc.poll() is None, f"mosquitto exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.02)  # polling a port that is not open yet: nothing to await
        yield Mosquitto(port, log_path, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
