"""``fleetcmd jobs ...`` against a real ``fleetcmd serve`` subprocess and real MQTT devices."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.devices import EmqxDevice
from tests.mosquitto import free_port
from tests.proc import Service, clean_env, console_script, run_cli


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with Service(tmp_path_factory.mktemp("cli-jobs") / "data") as service:
        yield service


def cli(svc: Service, *args: str) -> subprocess.CompletedProcess[str]:
    assert svc.ready is not None
    return run_cli(*args, target=svc.ready.grpc_target, api_key=svc.api_key)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc))


def things(svc: Service, n: int, *attrs: str) -> list[str]:
    ids = [f"cj-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    for thing in ids:
        ok(cli(svc, "things", "create", thing, *(a for attr in attrs for a in ("--attr", attr)), "--json"))
    return ids


def in_an_hour() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).isoformat()


def test_dry_run_create_get_list_control(svc: Service) -> None:
    site = f"s-{uuid.uuid4().hex[:6]}"
    ids = things(svc, 3, f"site={site}")
    dry = ok_json(cli(svc, "jobs", "create", "reboot", "--attr", f"site={site}", "--exclude", ids[0], "--dry-run", "--json"))
    assert dry["targets_total"] == 2 and sorted(dry["sample"]) == sorted(ids[1:])  # an integer, not "2"
    text = ok(cli(svc, "jobs", "create", "reboot", "--attr", f"site={site}", "--dry-run"))
    assert "targets    3" in text and all(thing in text for thing in ids)

    args = ["reboot", "--attr", f"site={site}", "--params", '{"level": 2}', "--max-per-minute", "60", "--max-in-flight", "5"]
    args += ["--abort", "FAILED:10:5", "--retry", "timed_out:2:exponential:1:8:jitter", "--canary", "1:100"]
    args += ["--start-at", in_an_hour(), "--description", "cli job", "--key", uuid.uuid4().hex]
    job = ok_json(cli(svc, "jobs", "create", *args, "--json"))
    spec = job["spec"]
    assert job["state"] == "JOB_STATE_SCHEDULED" and spec["params"] == {"level": 2}
    assert spec["rollout"] == {"max_per_minute": 60, "max_in_flight": 5}
    assert spec["abort"] == [{"failure": "FAILURE_TYPE_FAILED", "threshold_pct": 10, "min_finished": 5}]
    assert spec["retries"][0]["backoff"] == "BACKOFF_EXPONENTIAL" and spec["retries"][0]["jitter"] is True
    assert spec["canary"] == {"count": 1, "success_pct": 100}
    job_id = job["job_id"]

    shown = ok(cli(svc, "jobs", "get", job_id))
    assert job_id in shown and "SCHEDULED" in shown and "cli job" in shown and '{"level":2}' in shown
    assert ok_json(cli(svc, "jobs", "pause", job_id, "--json"))["state"] == "JOB_STATE_PAUSED"
    listed = ok_json(cli(svc, "jobs", "list", "--state", "paused", "--json"))
    assert job_id in [j["job_id"] for j in listed["jobs"]]
    table = ok(cli(svc, "jobs", "list", "--state", "PAUSED"))
    assert job_id in table and "PAUSED" in table
    assert "SCHEDULED" in ok(cli(svc, "jobs", "resume", job_id))
    assert ok_json(cli(svc, "jobs", "cancel", job_id, "--only-undelivered", "--json"))["state"] == "JOB_STATE_CANCELED"
    again = cli(svc, "jobs", "cancel", job_id)
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr
    rerun = ok_json(cli(svc, "jobs", "rerun-failed", job_id, "--status", "canceled", "--json"))
    assert rerun["job_id"] != job_id


def test_bad_flags_are_usage_errors(svc: Service) -> None:
    for args in (
        ["reboot", "--thing", "t", "--abort", "FAILED:ten:1"],
        ["reboot", "--thing", "t", "--retry", "SOMETIMES:1"],
        ["reboot", "--thing", "t", "--ramp", "1:2:often=3"],
        ["reboot", "--thing", "t", "--params", "[1]"],
        ["reboot", "--thing", "t", "--start-at", "tomorrow"],
        ["--thing", "t"],
    ):
        done = cli(svc, "jobs", "create", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("fleetcmd: ")
    refused = cli(svc, "jobs", "create", "reboot", "--thing", "a/b")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "spec.targets.thing_ids[0]" in refused.stderr


def _devices(svc: Service, ids: list[str]) -> list[EmqxDevice]:
    assert svc.ready is not None

    def answer(dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        dev.respond(execution_id, "SUCCEEDED", {"ok": True})

    return [EmqxDevice("127.0.0.1", svc.ready.mqtt_port, thing, on_request=answer).start() for thing in ids]


def test_watch_json_follows_a_job_to_its_end(svc: Service) -> None:
    ids = things(svc, 3)
    # Created while its devices are offline (its executions wait QUEUED): the watch sees it move once they connect.
    job = ok_json(cli(svc, "jobs", "create", "reboot", *(a for t in ids for a in ("--thing", t)), "--json"))
    assert svc.ready is not None
    watcher = subprocess.Popen(
        [console_script(), "jobs", "watch", job["job_id"], "--json", "--server", svc.ready.grpc_target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env({"FLEETCMD_API_KEY": svc.api_key}),
    )
    devices: list[EmqxDevice] = []
    try:
        assert watcher.stdout is not None
        lines = [watcher.stdout.readline()]
        devices = _devices(svc, ids)
        rest, errors = watcher.communicate(timeout=20)
    finally:
        watcher.kill()
        for dev in devices:
            dev.stop()
    assert watcher.returncode == 0, errors
    snapshots = [json.loads(line) for line in lines + rest.splitlines()]
    last = snapshots[-1]
    assert last["state"] == "JOB_STATE_COMPLETED" and last["counts"]["succeeded"] == 3 and last["targets_total"] == 3
    assert all(type(s["targets_total"]) is int for s in snapshots)
    # The spec in the first line only: it never changes (and can be megabytes).
    assert snapshots[0]["state"] == "JOB_STATE_IN_PROGRESS" and snapshots[0]["spec"]["action"] == "reboot"
    assert not any("spec" in s for s in snapshots[1:])


def test_watch_json_prints_the_spec_once_also_across_a_restart_of_the_service(tmp_path: Path) -> None:
    # The same gRPC port after the restart: the watcher reconnects to it, and WatchJob's first message
    # there has the spec again; the watcher prints it without.
    flags = ("--mqtt-port", "0", "--grpc-port", str(free_port()))
    watcher: subprocess.Popen[str] | None = None
    try:
        with Service(tmp_path / "data", flags=flags) as first:
            assert first.ready is not None
            target, key = first.ready.grpc_target, first.api_key
            ids = things(first, 1)
            job = ok_json(cli(first, "jobs", "create", "reboot", "--thing", ids[0], "--start-at", in_an_hour(), "--json"))
            watcher = subprocess.Popen(
                [console_script(), "jobs", "watch", job["job_id"], "--json", "--server", target],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=clean_env({"FLEETCMD_API_KEY": key}),
            )
            assert watcher.stdout is not None
            lines = [watcher.stdout.readline()]  # then the service stops under the watcher
        with Service(tmp_path / "data", flags=flags) as second:
            assert second.ready is not None and second.ready.grpc_target == target
            lines.append(watcher.stdout.readline())  # the job as the restarted service shows it first
            ok(cli(second, "jobs", "cancel", job["job_id"]))
            rest, errors = watcher.communicate(timeout=20)
    finally:
        if watcher is not None:
            watcher.kill()
    assert watcher.returncode == 6, errors  # CANCELED
    assert "reconnecting" in errors  # it did lose the server in between
    snapshots = [json.loads(line) for line in lines + rest.splitlines()]
    assert [s["state"] for s in snapshots[:2]] == ["JOB_STATE_SCHEDULED"] * 2 and snapshots[-1]["state"] == "JOB_STATE_CANCELED"
    assert snapshots[0]["spec"]["action"] == "reboot"
    assert not any("spec" in s for s in snapshots[1:])


def test_watch_without_a_terminal_prints_a_line_per_change_and_exits_by_state(svc: Service) -> None:
    ids = things(svc, 1)
    job = ok_json(cli(svc, "jobs", "create", "reboot", "--thing", ids[0], "--start-at", in_an_hour(), "--json"))
    assert svc.ready is not None
    watcher = subprocess.Popen(
        [console_script(), "jobs", "watch", job["job_id"], "--server", svc.ready.grpc_target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env({"FLEETCMD_API_KEY": svc.api_key}),
    )
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        assert first.split()[:3] == [job["job_id"], "SCHEDULED", "0/0"], first
        ok(cli(svc, "jobs", "cancel", job["job_id"]))
        rest, _ = watcher.communicate(timeout=20)
    finally:
        watcher.kill()
    assert rest.splitlines()[-1].split()[1] == "CANCELED"
    assert watcher.returncode == 6  # CANCELED


def test_watch_on_a_terminal_draws_a_progress_bar(svc: Service) -> None:
    ids = things(svc, 2)
    devices = _devices(svc, ids)
    assert svc.ready is not None
    controller, terminal = pty.openpty()
    try:
        job = ok_json(cli(svc, "jobs", "create", "reboot", *(a for t in ids for a in ("--thing", t)), "--json"))
        watcher = subprocess.Popen(
            [console_script(), "jobs", "watch", job["job_id"], "--server", svc.ready.grpc_target],
            stdout=terminal,
            stderr=subprocess.PIPE,
            env=clean_env({"FLEETCMD_API_KEY": svc.api_key, "COLUMNS": "120", "TERM": "xterm"}),
        )
        os.close(terminal)
        screen = b""
        deadline = time.monotonic() + 20
        while watcher.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    screen += os.read(controller, 65536)
                except OSError:  # the terminal closed with the watcher
                    break
        assert watcher.wait(timeout=10) == 0
    finally:
        for dev in devices:
            dev.stop()
        os.close(controller)
    text = screen.decode(errors="replace")
    assert "COMPLETED" in text and "2/2" in text and "succeeded=2" in text
    assert "━" in text  # rich's bar


def test_create_from_a_spec_file_with_flags_on_top(svc: Service, tmp_path: Any) -> None:
    ids = things(svc, 2)
    spec = {
        "action": "reboot",
        "targets": {"thingIds": ids},
        "rollout": {"maxPerMinute": 30},
        "retries": [{"failure": "FAILURE_TYPE_ANY"}],
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    dry = ok_json(cli(svc, "jobs", "create", "--spec", str(path), "--exclude", ids[0], "--dry-run", "--json"))
    assert dry == {"targets_total": 1, "sample": [ids[1]]}
    job = ok_json(
        cli(svc, "jobs", "create", "ping", "--spec", str(path), "--max-per-minute", "6", "--start-at", in_an_hour(), "--json")
    )
    assert job["spec"]["action"] == "ping" and job["spec"]["rollout"] == {"max_per_minute": 6}
    assert job["spec"]["retries"] == [{"failure": "FAILURE_TYPE_ANY", "backoff": "BACKOFF_FIXED"}]  # unspecified: fixed
    path.write_text("{not json")
    broken = cli(svc, "jobs", "create", "--spec", str(path))
    assert broken.returncode == 2 and "--spec" in broken.stderr
