"""The README and docs/, checked as a reader would use them.

The examples are run in the order written against the README's own device: the walkthrough, the
thing type, the Kaa polling session and the REST calls of README.md, then the examples docs/ holds
(API keys in docs/security.md, metrics in docs/operations.md). Blocks are found by their file and
heading, not by line numbers. A reader's copy differs only in what the service printed for them:
ports (the test service listens on free ones), the device password, the Kaa token, key and
execution ids. ``.venv/bin/fleetcmd`` is a wrapper in the temp directory that adds ``--server`` with
the test's gRPC port to the client commands; ``.venv/bin/python`` is this venv's. ``curl`` is
Debian's curl.

Every shell block in README.md and docs/*.md is either run here, checked here without running it
(the benchmark suite, the long chaos loop, Docker: their options must exist), or marked in the
document with ``<!-- example not run: REASON -->`` on the line before it. Besides, every relative
link resolves, the Configuration table names every setting with its default, and the sample ready
line names the fields the real one has.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from server.config import ENV_PREFIX, Settings
from tests.proc import READY, Service, clean_env, console_script

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SHELL_LANGS = ("sh", "bash", "shell", "console")
NOT_RUN = re.compile(r"<!-- example not run: (?P<reason>\S.*?) -->\s*$")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```", flags=re.S | re.M)


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole line) up to the next heading of level 2 or 3."""
    found = re.search(rf"^{re.escape(heading)}$", text, flags=re.M)
    assert found, f"no heading {heading!r}"
    start = found.start()
    nxt = re.search(r"^#{2,3} ", text[found.end() :], flags=re.M)
    return text[start : found.end() + nxt.start()] if nxt else text[start:]


def _fenced(text: str) -> list[tuple[str, str, int]]:
    """Every fenced block as (language, body with its indent removed, offset of the fence)."""
    out = []
    for m in FENCE.finditer(text):
        indent = len(m["indent"])
        body = "".join(line[indent:] for line in m["body"].splitlines(keepends=True))
        out.append((m["lang"], body, m.start()))
    return out


def _blocks(section: str, lang: str = "sh") -> list[str]:
    return [body for block_lang, body, _ in _fenced(section) if block_lang == lang]


def _doc(name: str) -> str:
    return (DOCS / name).read_text()


def _examples() -> dict[str, str]:
    """Every shell block the tests run or check, by name."""
    readme = README.read_text()
    walk = _blocks(_section(readme, "## Five-minute walkthrough"))
    start, create, device, watch_send, grpc_python, grpcurl = walk
    assert "make run" in start and "thermostat-001" in create and "paho" in device and "reboot" in grpc_python
    assert "grpcurl" in grpcurl  # not run: marked in README (grpcurl is not installed here)
    kaa = _section(readme, "### Kaa devices (KP1 command execution)")
    return {
        "setup": _blocks(readme[: readme.index("\n## ")])[0],
        "start": start,
        "create": create,
        "device": device,
        "watch_send": watch_send,
        "grpc_python": grpc_python,
        "dimmer": _blocks(_section(readme, "### Thing types: commands with schemas"))[0],
        "kaa_create": next(b for b in _blocks(kaa) if "--kaa-app-version" in b),
        "kaa_poll": next(b for b in _blocks(kaa) if "/command/reboot" in b),
        "rest": _blocks(_section(readme, "## The REST API (EMQX style)"))[0],
        "apikey": _blocks(_section(_doc("security.md"), "## API keys"))[0],
        "metrics": _blocks(_section(_doc("operations.md"), "## Metrics"))[0],
        "docker": _blocks(_section(_doc("operations.md"), "## Docker"))[0],
        "chaos": _blocks(_section(_doc("reliability.md"), "## Fuzz and chaos suites"))[0],
        "bench": _blocks(_section(_doc("performance.md"), "## Running the benchmarks"))[0],
    }


def _ready_fields(line: str) -> list[str]:
    """The field names of a ``fleetcmd ready k=v ...`` line, in order."""
    m = READY.search(line)
    assert m, line
    return re.findall(r"(\w+)=", m["fields"])


def _sh(script: str, cwd: Path, env: dict[str, str], timeout: float = 30) -> str:
    proc = subprocess.run(["bash", "-c", "set -e\n" + script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (script, proc.stdout, proc.stderr)
    return proc.stdout


def _commands(block: str) -> list[str]:
    """A block's command lines (comments and blank lines left out)."""
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def _shown(block: str) -> list[str]:
    """What a block shows as output: its ``# ...`` lines, without the ``# ``."""
    return [ln[2:] for ln in block.splitlines() if ln.startswith("# ")]


def test_examples_run_in_order(tmp_path: Path) -> None:
    ex = _examples()
    readme = README.read_text()
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # Wrappers, not symlinks: a symlinked venv python looks for pyvenv.cfg next to the link.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    with Service(tmp_path / "data", anonymous=False) as svc:
        ready = svc.ready
        assert ready is not None
        # The sample ready line names the fields the real one has, in the same order.
        real_line = next(ln for ln in svc.stderr.splitlines() if READY.search(ln))
        sample_line = next(ln for ln in ex["start"].splitlines() if READY.search(ln))
        assert _ready_fields(sample_line) == _ready_fields(real_line), (sample_line, real_line)

        fleetcmd = bin_dir / "fleetcmd"
        # apikey works on the store, not through gRPC: it takes no --server.
        fleetcmd.write_text(
            f'#!/bin/sh\ncase "$1" in apikey) exec {console_script()} "$@";; esac\n'
            f'exec {console_script()} "$@" --server {ready.grpc_target}\n'
        )
        fleetcmd.chmod(0o755)

        def local(block: str) -> str:  # what the reader's service printed instead of the defaults
            return (
                block.replace("127.0.0.1:50051", ready.grpc_target)
                .replace("127.0.0.1:8080", f"127.0.0.1:{ready.http_port}")
                .replace('"127.0.0.1", 1883', f'"127.0.0.1", {ready.mqtt_port}')
            )

        env = clean_env()
        out = _sh(local(ex["create"]), tmp_path, env)
        password = re.search(r"^password\s+(\S+)", out, flags=re.M)
        assert password, out
        device_script = local(ex["device"]).replace("PASSWORD=Qm9...", f"PASSWORD={password.group(1)}")
        dev = subprocess.Popen(
            ["bash", "-c", device_script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            lines = [ln for ln in _commands(local(ex["watch_send"])) if "fleetcmd watch" not in ln]
            send, list_, get = lines
            sent = _sh(send, tmp_path, env)
            assert re.search(r"^status\s+SUCCEEDED", sent, flags=re.M), sent
            assert '"currentTemperature":24' in sent
            eid = re.search(r"^execution\s+(\S+)", sent, flags=re.M)
            assert eid
            assert eid.group(1) in _sh(list_, tmp_path, env)
            history = _sh(get.replace("<execution-id>", eid.group(1)), tmp_path, env)
            assert "SENT" in history and "SUCCEEDED" in history

            rebooted = _sh(local(ex["grpc_python"]), tmp_path, env)
            assert "SUCCEEDED" in rebooted and "reboot" in rebooted, rebooted
            assert dev.poll() is None, dev.stderr.read() if dev.stderr else ""  # the device keeps running
            again = _sh(send, tmp_path, env)
            assert re.search(r"^status\s+SUCCEEDED", again, flags=re.M), again

            _run_dimmer(readme, ex["dimmer"], tmp_path, env)

            created = json.loads(_sh(local(ex["kaa_create"]), tmp_path, env))
            token = created["credentials"]["kaa_endpoint_token"]
            polled = _sh(local(ex["kaa_poll"]).replace("TOKEN=Zt3...", f"TOKEN={token}"), tmp_path, env)
            shown_answers = _shown(ex["kaa_poll"])
            assert polled.endswith("".join(shown_answers)), (shown_answers, polled)  # the command, then {} for the result

            first, *rest_lines = _commands(local(ex["rest"]))
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

            _run_apikey(ex["apikey"], tmp_path, env)

            metrics = _sh(local(ex["metrics"]), tmp_path, env)
            names = [ln.split()[0] for ln in _shown(ex["metrics"]) if ln != "..."]
            assert names
            for name in names:  # the values shown are a big fleet's; the names are the service's
                assert re.search(rf"^{re.escape(name)} ", metrics, flags=re.M), (name, metrics[:2000])
        finally:
            dev.terminate()
            dev.wait(10)
            for f in (dev.stdout, dev.stderr):
                if f is not None:
                    f.close()
    assert os.path.exists(tmp_path / "data" / "admin.key")


def _run_dimmer(readme: str, block: str, cwd: Path, env: dict[str, str]) -> None:
    """README's thing type: the params the device receives, and the refusal, as shown."""
    section = _section(readme, "### Thing types: commands with schemas")
    (cwd / "dimmer.json").write_text(_blocks(section, "json")[0])
    put, create, send_ok, send_bad = _commands(block)
    _sh(put, cwd, env)
    _sh(create, cwd, env)
    shown = _shown(block)
    receives = next(i for i, ln in enumerate(shown) if ln.startswith("the device receives "))
    payload = json.loads(
        shown[receives].removeprefix("the device receives ")
        + "".join(ln.strip() for ln in shown[receives + 1 :] if ln.startswith(" "))
    )
    sent = _sh(send_ok, cwd, env)
    eid = re.search(r"^execution\s+(\S+)", sent, flags=re.M)
    assert eid, sent
    got = json.loads(_sh(f".venv/bin/fleetcmd get {eid.group(1)} --json", cwd, env))
    assert got["params"] == payload, (got, payload)
    refused = subprocess.run(["bash", "-c", send_bad], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0, refused.stdout
    expected = next(ln for ln in shown if ln.startswith("fleetcmd: INVALID_ARGUMENT"))
    head, _, tail = expected.partition("[...]")  # the README elides the enum's values
    assert refused.stderr.strip().startswith(head) and refused.stderr.strip().endswith(tail), (expected, refused.stderr)


def _run_apikey(block: str, cwd: Path, env: dict[str, str]) -> None:
    """docs/security.md's key management, on the running service's data directory."""
    create, list_, revoke = _commands(block)
    key = _sh(create, cwd, env).strip()
    m = re.fullmatch(r"fck_(?P<id>[0-9a-f]+)_\S+", key)
    assert m, key
    listed = _sh(list_, cwd, env)
    row = next(ln for ln in listed.splitlines() if ln.startswith(m["id"]))
    assert "operator" in row and "active" in row and row.split()[-1] == "ci", listed
    _sh(revoke.replace("<id>", m["id"]), cwd, env)
    row = next(ln for ln in _sh(list_, cwd, env).splitlines() if ln.startswith(m["id"]))
    assert "active" not in row, row


def test_setup_commands_are_the_makefile_targets() -> None:
    """README's first block: each ``make X`` is a Makefile target doing what its comment says."""
    setup = _examples()["setup"]
    targets = {"run": "fleetcmd serve", "test": "pytest"}
    for line in _commands(setup):
        target = line.split("#")[0].split()
        assert target[0] == "make" and len(target) == 2 and target[1] in targets, line
        dry = subprocess.run(["make", "-n", "-C", str(ROOT), target[1]], capture_output=True, text=True, timeout=30)
        assert dry.returncode == 0, dry.stderr
        assert targets[target[1]] in dry.stdout, dry.stdout


def test_examples_not_run_use_real_options() -> None:
    """The benchmark suite, the long chaos loop and Docker are too long to run here: their options must exist."""
    ex = _examples()
    for name, script in (("chaos", "scripts/chaos.py"), ("bench", "bench/run.py")):
        used = {opt for ln in _commands(ex[name]) if script in ln for opt in re.findall(r"(--[\w-]+)", ln.split("#")[0])}
        used |= set(re.findall(r"(--[\w-]+)", " ".join(ln.split("#", 1)[1] for ln in _commands(ex[name]) if "#" in ln)))
        helped = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert helped.returncode == 0, helped.stderr
        missing = {opt for opt in used if opt not in helped.stdout}
        assert not missing, (script, missing)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.findall(r"pip install -e '\.\[(\w+)\]'", ex["bench"]):
        assert extra in extras, extra
    dockerfile = (ROOT / "Dockerfile").read_text()
    expose = re.search(r"^EXPOSE (.*)$", dockerfile, flags=re.M)
    assert expose, "the Dockerfile exposes no port"
    exposed = set(expose[1].split())
    published = set(re.findall(r"-p \d+:(\d+)", ex["docker"]))
    assert published and published <= exposed, (published, exposed)
    volume = re.search(r"-v [\w-]+:(/\S+)", ex["docker"])
    assert volume and f'VOLUME ["{volume[1]}"]' in dockerfile


def test_every_shell_example_is_checked() -> None:
    """A shell block is run or checked above, or its document says why not, on the line before it."""
    checked = set(_examples().values())
    unchecked = []
    for path in _documents():
        text = path.read_text()
        for lang, body, at in _fenced(text):
            if lang not in SHELL_LANGS or body in checked:
                continue
            before = text[:at].rstrip("\n").rsplit("\n", 1)[-1]
            if not NOT_RUN.search(before):
                unchecked.append(f"{path.relative_to(ROOT)}: {body.splitlines()[0]}")
    assert not unchecked, "run these in tests/test_readme.py or mark them <!-- example not run: REASON -->:\n" + "\n".join(
        unchecked
    )


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation gone, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    without_code = FENCE.sub("", text)
    found: set[str] = set()
    for m in re.finditer(r"^#{1,6} (.+?)\s*#*$", without_code, flags=re.M):
        slug = _slug(m[1])
        n = 0
        while (slug if n == 0 else f"{slug}-{n}") in found:  # GitHub numbers repeated headings
            n += 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    found.update(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", without_code))
    return found


def _links(text: str) -> list[str]:
    without_code = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code)


def test_relative_links_resolve() -> None:
    """Every relative link of README.md and docs/*.md names an existing file, and an existing heading in it."""
    broken = []
    for path in _documents():
        for link in _links(path.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...
                continue
            target, _, anchor = link.partition("#")
            dest = (path.parent / target).resolve() if target else path
            if not dest.exists() or ROOT not in dest.parents:
                broken.append(f"{path.relative_to(ROOT)}: {link} (no such file in the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{path.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_doc_is_in_the_readme_index() -> None:
    """README's Documentation section links every file of docs/."""
    index = set(_links(_section(README.read_text(), "## Documentation")))
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"docs/{p.name}" not in index]
    assert not missing, missing


def test_link_check_finds_broken_links() -> None:
    """The link check itself: a missing file, a missing heading and a good link, told apart."""
    text = "# Title\n\n## A `code` heading: with, punctuation\n\n[x](#a-code-heading-with-punctuation) [y](#nope)\n"
    assert "a-code-heading-with-punctuation" in _anchors(text) and "nope" not in _anchors(text)
    assert _links(text + "```sh\n[z](in-code.md)\n```\n`[w](inline.md)`") == ["#a-code-heading-with-punctuation", "#nope"]


def _default_shown(cell: str) -> str:
    m = re.match(r"`([^`]*)`", cell.strip())
    assert m, cell
    return m[1]


def test_configuration_table_matches_settings() -> None:
    """One row per setting (``FLEETCMD_<NAME>``), none for a setting that does not exist, defaults as in Settings."""
    table = _section(README.read_text(), "## Configuration")
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`FLEETCMD_"):
            continue
        for var in re.findall(r"`(FLEETCMD_\w+)`", cells[0]):
            rows[var] = cells[1]
    settings = {ENV_PREFIX + f.name.upper(): f for f in dataclasses.fields(Settings)}
    assert sorted(set(settings) - set(rows)) == [], "settings without a row"
    assert sorted(set(rows) - set(settings)) == [], "rows without a setting"
    for var, cell in rows.items():
        default = settings[var].default
        if isinstance(default, str) and not default:
            continue  # empty, or computed from another setting: the row says how
        shown = _default_shown(cell)
        if isinstance(default, bool):
            assert shown == str(default).lower(), (var, shown, default)
        elif isinstance(default, (int, float)):
            assert float(shown) == default, (var, shown, default)
        elif isinstance(default, Path):
            assert Path(shown) == default, (var, shown, default)
        else:
            assert shown == default, (var, shown, default)
