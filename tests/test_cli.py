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
    sent = ok_json(cli(svc, "send", thing, "setTemperature", "--params", '{"value": 24}', "--ttl", "60", "--json"))
    eid = sent["execution_id"]
    assert sent["status"] == "QUEUED"
    assert (sent["thing_id"], sent["action"], sent["ttl_seconds"]) == (thing, "setTemperature", 60)
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


def test_json_keeps_integers_and_sequences_as_numbers(svc: Service) -> None:
    thing = unique("cli-json")
    sent = ok_json(cli(svc, "send", thing, "setTemperature", "--params", '{"value": 24, "f": 1.5}', "--ttl", "5", "--json"))
    assert type(sent["params"]["value"]) is int and sent["params"]["f"] == 1.5
    got = ok_json(cli(svc, "get", sent["execution_id"], "--json"))
    assert all(type(h["sequence"]) is int for h in got["history"]), got["history"]
    assert type(got["params"]["value"]) is int


def test_params_default_to_an_empty_object(svc: Service) -> None:
    """The device receives {} when no params were given: the operator sees {} too, not null/absent."""
    sent = ok_json(cli(svc, "send", unique("cli-noparams"), "reboot", "--ttl", "5", "--json"))
    assert sent["params"] == {}
    assert "params     {}" in cli(svc, "get", sent["execution_id"]).stdout


@pytest.mark.parametrize(
    ("status", "code"), [("SUCCEEDED", 0), ("FAILED", 3), ("REJECTED", 4)], ids=["succeeded", "failed", "rejected"]
)
def test_send_wait_exit_code_per_outcome(svc: Service, status: str, code: int) -> None:
    assert svc.ready is not None
    thing = unique("cli-exit")

    def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        dev.respond(execution_id, status)

    dev = EmqxDevice("127.0.0.1", svc.ready.mqtt_port, thing, on_request=answer).start()
    try:
        proc = cli(svc, "send", thing, "act", "--ttl", "5", "--wait")
        assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
        assert status in proc.stdout
    finally:
        dev.stop()


def test_send_wait_exit_code_when_timed_out(svc: Service) -> None:
    proc = cli(svc, "send", unique("cli-timeout"), "act", "--ttl", "1", "--wait")
    assert proc.returncode == 5, (proc.returncode, proc.stdout, proc.stderr)
    assert "TIMED_OUT" in proc.stdout
    helptext = run_cli("send", "--help", target="127.0.0.1:1", api_key="x").stdout
    assert "5 TIMED_OUT" in helptext and "the thing id" in helptext


def test_tables_have_headers_and_say_when_empty(svc: Service, tmp_path: Path) -> None:
    empty = cli(svc, "things", "list", "--type", unique("no-such-type"))
    assert empty.returncode == 0 and empty.stdout.strip() == "(no things)", empty
    thing = unique("cli-thing")
    ok_json(cli(svc, "things", "create", thing, "--json"))
    listed = cli(svc, "things", "list").stdout.splitlines()
    assert listed[0].split()[:3] == ["THING", "TYPE", "PRESENCE"]
    assert any(line.startswith(thing) for line in listed[1:])
    got = cli(svc, "things", "get", thing).stdout.splitlines()
    assert got[0].startswith("THING") and got[1].startswith(thing)
    # The header's columns start where the rows' do.
    assert got[0].index("TYPE") == got[1].index("-", len(thing))

    type_file = tmp_path / "t.json"
    name = unique("cli-type")
    schema = {"type": "object", "properties": {"value": {"type": "integer"}}}
    type_file.write_text(json.dumps({"name": name, "commands": {"set": {"params_schema": schema}}}))
    assert cli(svc, "types", "put", str(type_file)).returncode == 0
    shown = ok_json(cli(svc, "types", "get", name))
    assert shown["commands"]["set"]["params_schema"] == schema  # an object, not a JSON string
    types = cli(svc, "types", "list").stdout.splitlines()
    assert types[0].split() == ["NAME", "VERSION", "COMMANDS"]
    for sub in ("put", "get", "list", "delete"):
        assert f"    {sub}" in run_cli("types", "--help", target="127.0.0.1:1", api_key="x").stdout


def test_apikey_list_columns_line_up(tmp_path: Path) -> None:
    def apikey(*args: str) -> str:
        argv = [console_script(), "apikey", *args, "--data-dir", str(tmp_path / "data")]
        proc = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert apikey("list").strip() == "(no API keys)"
    apikey("create", "--name", "a", "--role", "viewer")
    apikey("create", "--name", "a-much-longer-name", "--role", "admin")
    apikey("revoke", apikey("list").splitlines()[1].split()[0])
    lines = apikey("list").splitlines()
    assert lines[0].split()[:2] == ["KEY", "ID"] and len(lines) == 3
    for column in ("ROLE", "STATE", "CREATED", "NAME"):
        at = lines[0].index(column)
        for row in lines[1:]:
            assert row[at - 1] == " " and row[at] != " ", (column, lines)


@pytest.mark.parametrize(
    ("flag", "setting"),
    [
        ("--mqtt-port", "FLEETCMD_MQTT_PORT"),
        ("--ws-port", "FLEETCMD_WS_PORT"),
        ("--grpc-port", "FLEETCMD_GRPC_PORT"),
        ("--http-port", "FLEETCMD_HTTP_PORT"),
    ],
    ids=["mqtt", "ws", "grpc", "http"],
)
def test_busy_port_is_one_line_naming_its_setting(tmp_path: Path, flag: str, setting: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        argv = [*PYTHON_M, "serve", "--data-dir", str(tmp_path / "data"), "--mqtt-port", "0", "--grpc-port", "0"]
        argv += ["--http-port", "0", flag, str(port)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert f"fleetcmd: cannot listen on 127.0.0.1:{port} ({setting}): address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_watch_prints_new_and_resumes_across_a_server_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Service(data) as first:
        assert first.ready is not None
        ready = first.ready
        api_key = first.api_key
        flags = ["--mqtt-port", str(ready.mqtt_port), "--grpc-port", str(ready.grpc_port)]
        before = run_cli("send", "t-watch", "a1", "--ttl", "60", "--json", target=ready.grpc_target, api_key=api_key)
        assert before.returncode == 0, before.stderr
        argv = [console_script(), "watch", "--server", ready.grpc_target]
        env = clean_env({"FLEETCMD_API_KEY": api_key})
        json_w = subprocess.Popen(
            [*argv, "--after", "0", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        text_w = subprocess.Popen([*argv, "--after", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        watchers = [json_w, text_w]
        try:
            jl, tl = _lines(json_w), _lines(text_w)
            assert json.loads(jl.get(timeout=10))["sequence"] == 1
            assert "new -> QUEUED" in tl.get(timeout=10)
            first.stop()
            with Service(data, flags=flags) as second:
                assert second.ready is not None
                for action in ("a2", "a3"):
                    proc = run_cli("send", "t-watch", action, "--ttl", "60", target=second.ready.grpc_target, api_key=api_key)
                    assert proc.returncode == 0, proc.stderr
                events = [json.loads(jl.get(timeout=20)) for _ in range(2)]
                assert [(e["sequence"], e["action"]) for e in events] == [(2, "a2"), (3, "a3")]
                assert "a2 new -> QUEUED" in tl.get(timeout=20)
        finally:
            for w in watchers:
                w.terminate()
                w.wait(10)
                for f in (w.stdout, w.stderr):
                    if f is not None:
                        f.close()
