"""Run the real ``fleetcmd serve`` as a subprocess on free ports and wait for its ready line.

Nothing here sleeps to wait: a reader thread drains stderr and sets an event when
the ``fleetcmd ready ...`` line arrives (or the process dies first). Every wait is
bounded; :meth:`Service.close` (also on ``with`` exit) kills whatever is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests import clients

READY = re.compile(r"\bfleetcmd ready (?P<fields>.*)$")
FIELD = re.compile(r"(\w+)=(\S+)")

PYTHON_M = (sys.executable, "-m", "server")


def console_script() -> str:
    """The ``fleetcmd`` console script of the interpreter running the tests."""
    candidate = Path(sys.executable).parent / "fleetcmd"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("fleetcmd")
    if found is None:
        raise FileNotFoundError("the fleetcmd console script is not installed")
    return found


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ``FLEETCMD_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCMD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Ready:
    """What the ready line says."""

    mqtt_host: str
    mqtt_port: int
    ws: str
    grpc_host: str
    grpc_port: int
    data_dir: str
    http_port: int  # -1 when off
    restored: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def _host_port(value: str) -> tuple[str, int]:
    if value == "off":
        return "", -1
    host, _, port = value.rpartition(":")
    return host, int(port)


def parse_ready(line: str) -> Ready | None:
    """Parse ``fleetcmd ready mqtt=HOST:PORT ws=... grpc=HOST:PORT data=DIR restored=N``.

    Fields are read by name, so new ones (``mqtts=``, ``grpc_tls=``...) do not break it; ``off`` gives port -1.
    """
    m = READY.search(line)
    if m is None:
        return None
    f = dict(FIELD.findall(m["fields"]))
    mqtt_host, mqtt_port = _host_port(f["mqtt"])
    grpc_host, grpc_port = _host_port(f["grpc"])
    return Ready(
        mqtt_host=mqtt_host,
        mqtt_port=mqtt_port,
        ws=f.get("ws", "off"),
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        data_dir=f["data"],
        restored=int(f["restored"]),
        http_port=_host_port(f.get("http", "off"))[1],
    )


class ServiceDied(RuntimeError):
    """The process exited (or never got ready) while we waited for it."""


class Service:
    """One ``fleetcmd serve`` subprocess.

    Args:
        data_dir: passed as ``--data-dir`` (unless None: then only ``env`` configures it).
        command: how to start it (default ``python -m server``).
        flags: extra ``serve`` flags; by default ``--mqtt-port 0 --grpc-port 0`` (HTTP: any free port via the env).
        env: extra environment (``FLEETCMD_*`` of the test process are never inherited).
        cwd: working directory (default: ``data_dir``'s parent, so nothing lands in the repo).
        anonymous: development mode (``FLEETCMD_ALLOW_ANONYMOUS``): devices without credentials and
            Sends to unregistered things are admitted, like the in-process fixture of ``conftest.py``.
    """

    def __init__(
        self,
        data_dir: Path | None,
        *,
        command: Sequence[str] = PYTHON_M,
        flags: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        anonymous: bool = True,
    ) -> None:
        if flags is None:
            flags = ("--mqtt-port", "0", "--grpc-port", "0")
        argv = [*command, "serve", *flags]
        if data_dir is not None:
            argv += ["--data-dir", str(data_dir)]
        self.argv = argv
        self.env = clean_env({"FLEETCMD_ALLOW_ANONYMOUS": "true"} if anonymous else {})
        self.env["FLEETCMD_HTTP_PORT"] = "0"  # never the default 8080: tests run side by side
        self.env.update(env or {})
        self.cwd = cwd or (data_dir.parent if data_dir is not None else None)
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.ready: Ready | None = None
        self._ready_event = threading.Event()
        self._reader: threading.Thread | None = None
        self.ready_at: float | None = None  # time.time() when the ready line was read

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 20) -> Ready:
        """Start the process and return its ready line; raise :class:`ServiceDied` otherwise.

        Raises:
            RuntimeError: the process runs already (``with Service(...)`` starts it): a second one
                would replace it here and outlive the test.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the service runs already (with Service(...) started it)")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # a Ctrl-C of pytest must not reach it; we signal it ourselves
        )
        self._reader = threading.Thread(target=self._read, name="service-stderr", daemon=True)
        self._reader.start()
        if not self._ready_event.wait(timeout):
            self.close()
            raise ServiceDied(f"no ready line within {timeout}s:\n{self.stderr}")
        if self.ready is None:
            self.close()
            raise ServiceDied(f"exited with {self.proc.returncode} before it was ready:\n{self.stderr}")
        return self.ready

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.ready is None:
                ready = parse_ready(line)
                if ready is not None:
                    self.ready = ready
                    self.ready_at = time.time()
                    self._ready_event.set()
        self._ready_event.set()  # EOF: the process is gone

    @property
    def api_key(self) -> str:
        """The admin API key the service wrote into its data directory on first start."""
        assert self.ready is not None
        return (Path(self.ready.data_dir) / "admin.key").read_text().strip()

    def channel(self) -> grpc.aio.Channel:
        """A grpc.aio channel to the service that presents its admin key."""
        assert self.ready is not None
        return clients.channel(self.ready.grpc_target, self.api_key)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code (``subprocess.TimeoutExpired`` after ``timeout``)."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, float]:
        """Send ``sig`` and wait; returns (exit code, seconds it took)."""
        t0 = time.monotonic()
        self.send_signal(sig)
        code = self.wait(timeout)
        return code, time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
            if self._reader is not None:
                self._reader.join(5)

    def close(self) -> None:
        """Make sure the process is gone (kill it if it still runs)."""
        self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> Service:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_cli(
    *args: str,
    target: str | None = None,
    api_key: str | None = None,
    timeout: float = 30,
    command: Sequence[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one ``fleetcmd`` client command (``--server target`` appended, the key in ``FLEETCMD_API_KEY``)."""
    argv = [*(command or (console_script(),)), *args]
    if target is not None:
        argv += ["--server", target]
    env = clean_env({"FLEETCMD_API_KEY": api_key} if api_key else None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
