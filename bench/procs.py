"""Processes the bench starts: the fleetcmd service, mosquitto, the broker harness, load agents.

Everything binds 127.0.0.1, every wait is bounded, and :class:`Procs` stops
whatever is still running (SIGTERM, then SIGKILL) on exit, exception or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"\bfleetcmd ready (?P<fields>.*)$")
FIELD = re.compile(r"(\w+)=(\S+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """Utime + stime of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def written_bytes(pid: int) -> int:
    """Bytes a process caused to be written to storage (``write_bytes`` of /proc/<pid>/io)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound, read and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections.

    Raises:
        TimeoutError: it did not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port} did not open within {timeout}s") from None
            time.sleep(0.05)


class Managed:
    """A subprocess with a log file, stopped by SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None, log_path: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        """The last lines of its log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class Service(Managed):
    """``python -m server serve`` on port 0 in a data directory; ``ports`` from its ready line."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        anonymous: bool = True,
        extra_env: dict[str, str] | None = None,
        timeout: float = 60.0,
        root: Path = ROOT,
    ) -> None:
        """Start it; ``root`` is the checkout it runs from (``python -m server`` imports from there)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCMD_")}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "FLEETCMD_BIND": "127.0.0.1",
                "FLEETCMD_MQTT_PORT": "0",
                "FLEETCMD_GRPC_PORT": "0",
                "FLEETCMD_HTTP_PORT": "0",
                "FLEETCMD_DATA_DIR": str(data_dir),
                "FLEETCMD_ALLOW_ANONYMOUS": "true" if anonymous else "false",
            }
        )
        env.update(extra_env or {})
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__("fleetcmd", [sys.executable, "-m", "server", "serve"], env, log_path, cwd=root)
        self.data_dir = data_dir
        self.ready = self._wait_ready(timeout)
        self.mqtt_port = int(self.ready["mqtt"].rpartition(":")[2])
        self.grpc_target = "127.0.0.1:" + self.ready["grpc"].rpartition(":")[2]
        self.api_key = (data_dir / "admin.key").read_text().strip()

    def _wait_ready(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for line in self.log_path.read_text(errors="replace").splitlines():
                    m = READY.search(line)
                    if m:
                        return dict(FIELD.findall(m.group("fields")))
            if not self.alive():
                raise RuntimeError(f"fleetcmd exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"fleetcmd not ready within {timeout}s:\n{self.log_tail()}")


class Mosquitto(Managed):
    """mosquitto on a free port, anonymous, no persistence."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\nmax_queued_messages 100000\nmax_inflight_messages 0\nlog_type error\nlog_type warning\n"
        )
        super().__init__("mosquitto", [binary, "-c", str(conf)], None, workdir / "mosquitto.log")
        wait_port(self.port, 15)


class HarnessBroker(Managed):
    """fleetcmd's ``FleetBroker`` alone, without the topic ACL (``bench/harness_broker.py``)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        super().__init__(
            "fleetbroker-harness",
            [sys.executable, str(ROOT / "bench" / "harness_broker.py"), str(self.port)],
            None,
            workdir / "harness.log",
        )
        wait_port(self.port, 30)


def find_mosquitto() -> str | None:
    """The mosquitto binary, if installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def install_mosquitto() -> tuple[str | None, str]:
    """Find mosquitto, installing it with apt when we are root; returns (binary, what happened)."""
    found = find_mosquitto()
    if found:
        return found, "found"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "not installed, and apt-get as root is not available here"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], env=env, capture_output=True, timeout=300)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
            r = subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], env=env, capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"apt-get install mosquitto failed: {exc}"
    found = find_mosquitto()
    if found:
        return found, "installed with apt-get"
    return None, "apt-get install mosquitto failed: " + r.stderr.decode(errors="replace")[-300:]


class Agent:
    """A load-generator process (``bench.loadgen``) and its command pipe."""

    def __init__(self, ctx: Any, kind: str, **kwargs: Any) -> None:
        from bench.loadgen import run_agent

        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run_agent, args=(child, kind, kwargs), daemon=True, name=f"bench-{kind}")
        self.proc.start()
        child.close()
        self.pid: int = self.proc.pid
        self._pending = False
        self._seq = 0

    def send(self, name: str, **kwargs: Any) -> None:
        """Start a command; collect its result with :meth:`result`.

        A command whose result was given up on (timeout) may still answer later: its reply is skipped.
        """
        self._seq += 1
        try:
            self.conn.send((self._seq, name, kwargs))
        except OSError as exc:
            raise RuntimeError(f"{self.kind} agent (pid {self.pid}) is gone: exit code {self.proc.exitcode}") from exc
        self._pending = True

    def result(self, wait: float) -> Any:
        """The result of the command started with :meth:`send`.

        Raises:
            TimeoutError: no answer within ``wait`` seconds.
            RuntimeError: the command raised in the agent.
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{self.kind} agent: no answer within {wait}s")
                seq, status, value = self.conn.recv()
            except (OSError, EOFError) as exc:
                self.proc.join(1)
                raise RuntimeError(f"{self.kind} agent (pid {self.pid}) is gone: exit code {self.proc.exitcode}") from exc
            if seq == self._seq:
                break
        self._pending = False
        if status == "error":
            raise RuntimeError(f"{self.kind} agent failed:\n{value}")
        return value

    def call(self, name: str, wait: float, **kwargs: Any) -> Any:
        """Run one command (waiting at most ``wait`` seconds) and return its result."""
        self.send(name, **kwargs)
        return self.result(wait)

    def stop(self) -> None:
        """Ask it to close its connections and exit; terminate it if it does not."""
        if self.proc.is_alive() and not self._pending:  # busy (or interrupted): no graceful exit, terminate
            with contextlib.suppress(Exception):
                self.conn.send((0, "exit", {}))
                self.conn.poll(10)
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()


class Procs:
    """Owns every process a scenario starts; ``with Procs() as p`` stops them all at the end."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fleetcmd-bench-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.managed: list[Managed] = []
        self.agents: list[Agent] = []
        self._n = 0

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subdir(self, name: str) -> Path:
        """A fresh directory under the work dir."""
        self._n += 1
        path = self.workdir / f"{self._n:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def service(self, **kwargs: Any) -> Service:
        """Start fleetcmd (fresh data dir unless ``data_dir`` is given)."""
        d = kwargs.pop("data_dir", None) or self.subdir("fleetcmd") / "data"
        svc = Service(d, d.parent / f"service-{self._n}.log", **kwargs)
        self.managed.append(svc)
        return svc

    def mosquitto(self, binary: str) -> Mosquitto:
        """Start mosquitto."""
        m = Mosquitto(binary, self.subdir("mosquitto"))
        self.managed.append(m)
        return m

    def harness(self) -> HarnessBroker:
        """Start the FleetBroker harness."""
        h = HarnessBroker(self.subdir("harness"))
        self.managed.append(h)
        return h

    def agent(self, kind: str, **kwargs: Any) -> Agent:
        """Start a load agent."""
        a = Agent(self.ctx, kind, **kwargs)
        self.agents.append(a)
        return a

    def stop(self, thing: Managed | Agent) -> None:
        """Stop one process now."""
        if isinstance(thing, Agent):
            thing.stop()
            self.agents.remove(thing)
        else:
            thing.stop()
            self.managed.remove(thing)

    def stop_agents(self) -> None:
        """Stop every agent."""
        for a in list(self.agents):
            self.stop(a)

    def close(self) -> None:
        """Stop everything, agents first."""
        for a in list(self.agents):
            with contextlib.suppress(Exception):
                a.stop()
        self.agents.clear()
        for m in list(self.managed):
            with contextlib.suppress(Exception):
                m.stop()
        self.managed.clear()
        if self._tmp is not None:
            with contextlib.suppress(Exception):
                self._tmp.cleanup()
