"""A throwaway PostgreSQL server for the tests: initdb into a temporary directory, loopback port chosen at run time.

One server per test process, started on first use (:func:`server`) and stopped when the process
exits (or by the session fixture :func:`postgres_server`, whichever comes first); every test gets
its own empty database (:func:`fresh_database_url`), so tests never see each other's rows.

The binaries are Debian's (``/usr/lib/postgresql/<version>/bin``, newest first) or whatever
``postgres`` is on PATH. PostgreSQL refuses to run as root: as root the server runs as the
``postgres`` user (created when missing). Without the binaries the tests that need the server are
skipped with the reason, unless ``FLEETCMD_REQUIRE_POSTGRES=1`` (``.ci/run`` sets it): then they fail.

The server trades durability for speed (``fsync=off``): it lives for one test run.
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

REQUIRE_ENV = "FLEETCMD_REQUIRE_POSTGRES"
START_TIMEOUT = 30.0
USER = "postgres"


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: Debian's newest version, else PATH's, else None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for directory in candidates:
        if (Path(directory) / "postgres").is_file() and (Path(directory) / "initdb").is_file():
            return Path(directory)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run_as() -> str | None:
    """The user the server runs as: ``postgres`` when we are root (created if missing), else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/false", USER], check=True)
    return USER


@dataclass
class PgServer:
    """A running throwaway server."""

    root: Path
    port: int
    process: subprocess.Popen[bytes]
    user: str | None
    bindir: Path
    _names: Iterator[int]

    @property
    def admin_url(self) -> str:
        """The URL of the ``postgres`` database as the superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        """The URL of one database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        _run_sync(_execute(self.admin_url, f'CREATE DATABASE "{name}" TEMPLATE template0'))
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory."""
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: fast shutdown (roll back sessions, checkpoint, exit)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _run_sync(coro: object) -> None:
    """Run ``coro`` to completion on its own loop in its own thread (callers may be inside a running loop)."""
    error: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]


def start(bindir: Path) -> PgServer:
    """initdb a temporary directory and start ``postgres`` on a free loopback port; returns once it accepts connections."""
    user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="fleetcmd-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if user is not None:
        pw = pwd.getpwnam(user)
        for path in (root, sockets):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": str(root)}
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ],
        check=True,
        user=user,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=root,
    )
    last_error = ""
    for _attempt in range(5):  # the port is free when chosen; another process may take it before postgres binds
        port = _free_port()
        log = (root / "server.log").open("ab")
        process = subprocess.Popen(
            [
                str(bindir / "postgres"),
                *("-D", str(data), "-p", str(port), "-k", str(sockets)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"),
                *("-c", "max_connections=300", "-c", "shared_buffers=32MB"),
            ],
            user=user,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
        log.close()
        pg = PgServer(root, port, process, user, bindir, itertools.count(1))
        if _wait_ready(pg):
            return pg
        if process.poll() is None:
            process.kill()
        process.wait()
        last_error = (root / "server.log").read_text(errors="replace")[-2000:]
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"postgres did not start: {last_error}")


def _wait_ready(pg: PgServer) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if pg.process.poll() is not None:
            return False
        try:
            _run_sync(_execute(pg.admin_url, "SELECT 1"))
            return True
        except (OSError, asyncpg.PostgresError):
            time.sleep(0.05)  # polling a server coming up: nothing to await
    return False


_server: PgServer | None = None
_lock = threading.Lock()


def server() -> PgServer:
    """The test process's server, started on first use (see :func:`require_binaries` without them)."""
    global _server
    with _lock:
        if _server is None:
            _server = start(require_binaries())
            atexit.register(stop)
        return _server


def require_binaries() -> Path:
    """The binaries' directory; without them the test is skipped, or failed when ``FLEETCMD_REQUIRE_POSTGRES=1`` (CI)."""
    bindir = find_bindir()
    if bindir is None:
        reason = "PostgreSQL binaries not found (/usr/lib/postgresql/*/bin, postgres on PATH): apt-get install postgresql"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 and {reason}")
        pytest.skip(reason)
    return bindir


def stop() -> None:
    """Stop the test process's server, if it was started."""
    global _server
    with _lock:
        if _server is not None:
            _server.stop()
            _server = None


def fresh_database_url() -> str:
    """The URL of a new, empty database on the test process's server."""
    return server().create_database()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """The throwaway server, stopped at the end of the session."""
    yield server()
    stop()
