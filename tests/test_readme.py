"""The README's walkthrough, run as a reader would: its own blocks, in order, against its own device.

The blocks are found by their headings ("Five-minute walkthrough", the Kaa polling paragraph, "The
REST API"), not by line numbers. A reader's copy differs only in what the service printed for them:
ports (the test service listens on free ones), the device password, the Kaa token and execution
ids. ``.venv/bin/fleetcmd`` is a wrapper in the temp directory that adds ``--server`` with the test's
gRPC port; ``.venv/bin/python`` is this venv's. ``curl`` is Debian's curl.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.proc import Service, clean_env, console_script

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"^#{2,3} ", text[start + len(heading) :], flags=re.M)
    return text[start : start + len(heading) + nxt.start()] if nxt else text[start:]


def _blocks(section: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def _sh(script: str, cwd: Path, env: dict[str, str], timeout: float = 30) -> str:
    proc = subprocess.run(["bash", "-c", "set -e\n" + script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (script, proc.stdout, proc.stderr)
    return proc.stdout


def test_readme_walkthrough_runs_in_order(tmp_path: Path) -> None:
    text = README.read_text()
    walk = _blocks(_section(text, "## Five-minute walkthrough"))
    start, create, device, watch_send, grpc_python, _grpcurl = walk
    assert "make run" in start and "thermostat-001" in create and "paho" in device and "reboot" in grpc_python
    kaa = _section(text, "## Kaa")
    kaa_create = next(b for b in _blocks(kaa) if "--kaa-app-version" in b)
    kaa_poll = next(b for b in _blocks(kaa) if "/command/reboot" in b)
    rest = _blocks(_section(text, "## The REST API"))[0]

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # Wrappers, not symlinks: a symlinked venv python looks for pyvenv.cfg next to the link.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    with Service(tmp_path / "data", anonymous=False) as svc:
        ready = svc.ready
        assert ready is not None
        fleetcmd = bin_dir / "fleetcmd"
        fleetcmd.write_text(f'#!/bin/sh\nexec {console_script()} "$@" --server {ready.grpc_target}\n')
        fleetcmd.chmod(0o755)

        def local(block: str) -> str:  # what the reader's service printed instead of the defaults
            return (
                block.replace("127.0.0.1:50051", ready.grpc_target)
                .replace("127.0.0.1:8080", f"127.0.0.1:{ready.http_port}")
                .replace('"127.0.0.1", 1883', f'"127.0.0.1", {ready.mqtt_port}')
            )

        env = clean_env()
        out = _sh(local(create), tmp_path, env)
        password = re.search(r"^password\s+(\S+)", out, flags=re.M)
        assert password, out
        device_script = local(device).replace("PASSWORD=Qm9...", f"PASSWORD={password.group(1)}")
        dev = subprocess.Popen(
            ["bash", "-c", device_script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            lines = [ln for ln in local(watch_send).splitlines() if ln.strip() and "fleetcmd watch" not in ln]
            send, list_, get = lines
            sent = _sh(send, tmp_path, env)
            assert re.search(r"^status\s+SUCCEEDED", sent, flags=re.M), sent
            assert '"currentTemperature":24' in sent
            eid = re.search(r"^execution\s+(\S+)", sent, flags=re.M)
            assert eid
            assert eid.group(1) in _sh(list_, tmp_path, env)
            history = _sh(get.replace("<execution-id>", eid.group(1)), tmp_path, env)
            assert "SENT" in history and "SUCCEEDED" in history

            rebooted = _sh(local(grpc_python), tmp_path, env)
            assert "SUCCEEDED" in rebooted and "reboot" in rebooted, rebooted
            assert dev.poll() is None, dev.stderr.read() if dev.stderr else ""  # the device keeps running
            again = _sh(send, tmp_path, env)
            assert re.search(r"^status\s+SUCCEEDED", again, flags=re.M), again

            created = json.loads(_sh(local(kaa_create), tmp_path, env))
            token = created["credentials"]["kaa_endpoint_token"]
            polled = _sh(local(kaa_poll).replace("TOKEN=Zt3...", f"TOKEN={token}"), tmp_path, env)
            shown_answers = [ln[2:] for ln in kaa_poll.splitlines() if ln.startswith("# ")]
            assert polled.endswith("".join(shown_answers)), (shown_answers, polled)  # the command, then {} for the result

            first, *rest_lines = [ln for ln in local(rest).split("\n") if not ln.startswith("#")]
            joined = "\n".join([first, *rest_lines])
            created_cmd = re.search(r"(curl .*?)\ncurl", joined, flags=re.S)
            assert created_cmd
            answer = json.loads(_sh(first + "\n" + created_cmd.group(1), tmp_path, env))
            assert answer["status"] == "SUCCEEDED" and answer["result"] == {"currentTemperature": 24}
            rest_env = {**env, "ID": answer["executionId"]}
            shown = json.loads(
                _sh(
                    first + "\n" + next(ln for ln in rest_lines if "/commands/$ID" in ln and ln.endswith("$ID")),
                    tmp_path,
                    rest_env,
                )
            )
            assert shown["executionId"] == answer["executionId"] and shown["params"] == {"value": 24}
        finally:
            dev.terminate()
            dev.wait(10)
            for f in (dev.stdout, dev.stderr):
                if f is not None:
                    f.close()
    assert os.path.exists(tmp_path / "data" / "admin.key")
