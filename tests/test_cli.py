"""The ``fleetcmd`` client commands against a real ``fleetcmd serve`` subprocess."""

from __future__ import annotations

import gc
import json
import queue
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.cli.main import GC_THRESHOLD, tune_gc
from tests.devices import EmqxDevice
from tests.proc import PYTHON_M, Service, clean_env, console_script, run_cli


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with Service(tmp_path_factory.mktemp("cli") / "data") as service:
        yield service


def cli(svc: Service, *args: str) -> subprocess.CompletedProcess[str]:
    assert svc.ready is not None
    return run_cli(*args, target=svc.ready.grpc_target, api_key=svc.api_key)


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_send_get_list_cancel_offline_thing(svc: Service) -> None:
    thing = unique("cli-offline")
    sent = ok_json(cli(svc, "send", thing, "setTemperature", "--params", '{"value": 24}', "--ttl", "5", "--json"))
    eid = sent["execution_id"]
    assert sent["status"] == "QUEUED"
    assert (sent["thing_id"], sent["action"], sent["ttl_seconds"]) == (thing, "setTemperature", 5)
    assert sent["params"] == {"value": 24}

    got = ok_json(cli(svc, "get", eid, "--json"))
    assert got["execution_id"] == eid and got["status"] == "QUEUED"
    assert [h["status"] for h in got["history"]] == ["QUEUED"]

    listed = ok_json(cli(svc, "list", "--thing", thing, "--json"))
    assert [e["execution_id"] for e in listed["executions"]] == [eid]

    text = cli(svc, "get", eid)
    assert text.returncode == 0, text.stderr
    assert eid in text.stdout and "QUEUED" in text.stdout and "setTemperature" in text.stdout
    table = cli(svc, "list", "--thing", thing)
    assert table.returncode == 0, table.stderr
    assert eid in table.stdout and "QUEUED" in table.stdout

    canceled = cli(svc, "cancel", eid)
    assert canceled.returncode == 0, canceled.stderr
    assert "CANCELED" in canceled.stdout
    assert ok_json(cli(svc, "get", eid, "--json"))["status"] == "CANCELED"
    assert ok_json(cli(svc, "list", "--thing", thing, "--status", "CANCELED", "--json"))["executions"]
    assert ok_json(cli(svc, "list", "--thing", thing, "--status", "QUEUED", "--json")).get("executions", []) == []

    again = cli(svc, "cancel", eid)
    assert again.returncode == 1
    assert "FAILED_PRECONDITION" in again.stderr


def test_send_wait_until_the_device_answers(svc: Service) -> None:
    assert svc.ready is not None
    thing = unique("cli-dev")

    def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        dev.respond(execution_id, "IN_PROGRESS")
        dev.respond(execution_id, "SUCCEEDED", {"currentTemperature": body["params"]["value"]})

    dev = EmqxDevice("127.0.0.1", svc.ready.mqtt_port, thing, on_request=answer).start()
    try:
        done = ok_json(cli(svc, "send", thing, "setTemperature", "--params", '{"value": 24}', "--ttl", "5", "--wait", "--json"))
        assert done["status"] == "SUCCEEDED"
        assert done["result"] == {"currentTemperature": 24}
        assert [h["status"] for h in done["history"]][-1] == "SUCCEEDED"

        text = cli(svc, "send", thing, "setTemperature", "--params", '{"value": 21}', "--ttl", "5", "--wait")
        assert text.returncode == 0, text.stderr
        assert "SUCCEEDED" in text.stdout and "currentTemperature" in text.stdout
    finally:
        dev.stop()


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_watch_replays_then_follows_live(svc: Service) -> None:
    assert svc.ready is not None
    thing = unique("cli-watch")
    first = ok_json(cli(svc, "send", thing, "reboot", "--ttl", "30", "--json"))
    ok_json(cli(svc, "cancel", first["execution_id"], "--json"))

    argv = [console_script(), "watch", "--after", "0", "--server", svc.ready.grpc_target]
    env = clean_env({"FLEETCMD_API_KEY": svc.api_key})
    watchers = [
        subprocess.Popen([*argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
        subprocess.Popen([*argv, "--thing", thing], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
    ]
    try:
        json_lines, text_lines = (_lines(w) for w in watchers)
        events = [json.loads(json_lines.get(timeout=10)) for _ in range(2)]
        assert [int(e["sequence"]) for e in events] == [1, 2], events
        # Replay up to the cancel of our execution, with no gap.
        seen = events
        while not (seen[-1]["execution_id"] == first["execution_id"] and seen[-1]["status"] == "CANCELED"):
            seen.append(json.loads(json_lines.get(timeout=10)))
        seqs = [int(e["sequence"]) for e in seen]
        assert seqs == list(range(1, len(seqs) + 1))

        # Then live: a new execution shows up on both watchers.
        live = ok_json(cli(svc, "send", thing, "ping", "--ttl", "30", "--json"))
        while seen[-1]["execution_id"] != live["execution_id"]:
            seen.append(json.loads(json_lines.get(timeout=10)))
        assert seen[-1]["status"] == "QUEUED"
        seqs = [int(e["sequence"]) for e in seen]
        assert seqs == list(range(1, len(seqs) + 1))

        text = [text_lines.get(timeout=10) for _ in range(3)]  # QUEUED, CANCELED of the first; QUEUED of the live
        assert first["execution_id"] in text[0] and "QUEUED" in text[0]
        assert "CANCELED" in text[1]
        assert live["execution_id"] in text[2]
    finally:
        for w in watchers:
            w.terminate()
        for w in watchers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(5)
            for f in (w.stdout, w.stderr):
                if f is not None:
                    f.close()


@pytest.mark.parametrize(
    ("args", "code", "stderr_has"),
    [
        (("get", "no-such-execution"), 1, "NOT_FOUND"),
        (("cancel", "no-such-execution"), 1, "NOT_FOUND"),
        (("send", "bad/thing", "act"), 1, "INVALID_ARGUMENT"),
        (("send", "t1", "act", "--ttl", "999999"), 1, "INVALID_ARGUMENT"),
        (("send", "t1", "act", "--params", "{not json"), 2, "--params"),
        (("send", "t1", "act", "--params", "[1, 2]"), 2, "--params"),
        (("list", "--status", "BOGUS"), 2, "BOGUS"),
        (("send", "t1", "act", "--ttl", "soon"), 2, "--ttl"),
    ],
    ids=[
        "get-unknown",
        "cancel-unknown",
        "bad-thing",
        "ttl-too-big",
        "params-not-json",
        "params-not-object",
        "bad-status",
        "ttl-not-int",
    ],
)
def test_errors(svc: Service, args: tuple[str, ...], code: int, stderr_has: str) -> None:
    proc = cli(svc, *args)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert stderr_has in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = run_cli("get", "x", "--timeout", "2", target=f"127.0.0.1:{port}", api_key="any-key")
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stderr or "DEADLINE_EXCEEDED" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 10


def test_python_m_client_works_too(svc: Service) -> None:
    assert svc.ready is not None
    proc = run_cli("list", "--json", "--limit", "1", target=svc.ready.grpc_target, api_key=svc.api_key, command=PYTHON_M)
    assert proc.returncode == 0, proc.stderr
    assert "executions" in json.loads(proc.stdout) or json.loads(proc.stdout) == {}


def test_tune_gc_freezes_the_started_service_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLD
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
