"""``bench/attack.py``: the "under attack" scenario and the descriptor check produce their figures (tiny smoke runs).

What the service does under attack is tested elsewhere (the raw-socket MQTT abuse tests); here
the measurement itself: real service, real attacker process, every figure present and plausible.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from bench import attack, report, run
from bench.loadgen import PARTIAL_CONNECT, AttackerAgent

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quiet and one attack round through the suite driver: 50 devices, 100 half-open connections."""
    out = tmp_path_factory.mktemp("attack") / "attack.json"
    argv = ["--quick", "--only", "attack", "--reps", "1", "--attack-devices", "50", "--attack-half-open", "100"]
    assert run.main([*argv, "--no-write", "--json-out", str(out)]) == 0
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


@pytest.mark.timeout(90)
def test_the_suite_measures_quiet_and_attack_rounds_side_by_side(attack_run: dict[str, Any]) -> None:
    res = attack_run["results"]["attack"]
    assert res["service_env"] == {"FLEETCMD_MQTT_CONNECT_TIMEOUT": "2"}
    assert [r["kind"] for r in res["rounds"]] == ["quiet", "attack"]
    quiet, under = res["rounds"]
    assert quiet["rate"] > 0 and under["rate"] > 0
    assert 0 < under["half_open_opened"] <= 100  # a connection cap may refuse some; the figure says how many
    assert under["storm_cycles"] > 0 and 0 < under["storm_cycles_per_s"] <= 200 * 1.1  # the asked rate, not more
    for when in ("during", "after_deadline", "after_release"):
        assert under[when]["fds"] > 0 and under[when]["rss_mb"] > 0, when
    assert res["before"]["fds"] > 0
    assert "during" in quiet and "after_deadline" not in quiet


@pytest.mark.timeout(90)
def test_the_report_renders_the_attack_rows_with_their_targets(attack_run: dict[str, Any], tmp_path: Path) -> None:
    rows = {r["key"]: r for r in report.rows(attack_run)}
    res = attack_run["results"]["attack"]
    quiet, under = res["rounds"]
    assert rows["attack.quiet.rate"]["values"] == [quiet["rate"]]
    assert rows["attack.rate"]["target"] == ">= 0.90x quiet"
    assert rows["attack.ratio"]["values"] == [pytest.approx(under["rate"] / quiet["rate"])]
    assert rows["attack.ratio"]["target"] == ">= 0.90"
    assert rows["attack.cycles"]["values"] == [under["storm_cycles_per_s"]]
    assert rows["attack.fds.before"]["values"] == [res["before"]["fds"]]
    assert rows["attack.fds.after"]["values"] == [under["after_release"]["fds"]]
    assert {"attack.fds.during", "attack.fds.deadline", "attack.rss.before", "attack.rss.after"} <= set(rows)
    # BENCHMARKS.md: the attack block is rewritten and everything outside it kept.
    md = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", md)
    before = md.read_text()
    report.write_attack_block(md, attack_run)
    after = md.read_text()
    begin, end = report.BEGIN.format(name="attack"), report.END.format(name="attack")
    assert after.count(begin) == 1 and after.count(end) == 1
    if begin in before:
        assert after.split(begin)[0] == before.split(begin)[0] and after.split(end)[1] == before.split(end)[1]
    else:
        assert after.startswith(before.rstrip())
    block = after.split(begin)[1].split(end)[0]
    assert f"git `{attack_run['meta']['git']}`" in block and "`FLEETCMD_MQTT_CONNECT_TIMEOUT=2`" in block
    assert "| &nbsp;&nbsp;under attack / quiet (each pair of rounds) | " in block


@pytest.mark.timeout(90)
def test_the_descriptor_check_prints_fds_rss_and_the_innocent_device_before_during_and_after(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert attack.main(["--fd-check", "--half-open", "100", "--cycles", "100", "--settle", "0.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0].split(" (")[0] for line in lines] == [
        "before",
        "with 100 half-open",
        "100 connect-close cycles",
        "after the CONNECT deadline",
        "after the attacker closed them",
        "service environment",
    ]
    for line in (lines[0], lines[2], lines[4]):
        found = re.search(r"innocent device (\d+)/(\d+) round trips, p50 [\d.]+ ms", line)
        assert found and found[1] == found[2] and int(found[1]) >= 5, line  # every command answered
    assert "new device connected" in lines[2] and "new device connected" in lines[4]
    fds = [int(m) for m in re.findall(r"fds (\d+)", "\n".join(lines))]
    assert len(fds) == 5 and all(f > 0 for f in fds)
    assert re.search(r"after the attacker closed them: fds \d+ \([+-]\d+\), RSS [\d.]+ MB \([+-][\d.]+\)", lines[4])


async def _closing_server(hold_s: float, peers: list[str], first_bytes: list[bytes]) -> asyncio.Server:
    """A TCP server that closes every connection ``hold_s`` after it opened (what a CONNECT deadline does)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = time.monotonic()
        peers.append(writer.get_extra_info("peername")[0])
        if hold_s:
            try:
                first_bytes.append(await asyncio.wait_for(reader.read(100), hold_s))
            except TimeoutError:
                first_bytes.append(b"(nothing)")
            await asyncio.sleep(max(0.0, t0 + hold_s - time.monotonic()))
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_the_attacker_keeps_its_half_open_pool_full_against_a_server_that_closes_them() -> None:
    """What a CONNECT deadline looks like to the attacker: each closed connection is counted and re-opened."""
    peers: list[str] = []
    first_bytes: list[bytes] = []
    server = await _closing_server(0.2, peers, first_bytes)
    port = server.sockets[0].getsockname()[1]
    agent = AttackerAgent(source="127.0.0.2", refused_s=0.1)
    try:
        held = await agent.cmd_hold(port, 20)
        assert held["held"] == 20 and held["opened"] == 20
        storm = await agent.cmd_storm(port, duration=1.0, rate=40, concurrency=4, keep=20)
        # 40 cycles/s for 1 s: the asked rate, not more (one cycle per slot, the first at t0 + 1/rate).
        assert 30 <= storm["cycles"] <= 40 and storm["failed"] == 0
        # Closed connections are opened again, at most the pool's size per second (no reconnect loop).
        assert 5 <= storm["reopened"] <= 20
        assert agent.closed_by_server >= 20
        assert storm["held_min"] < 20
        assert storm["refused"] == 0  # each lived its 0.2 s: timed out, not refused
    finally:
        await agent.cmd_release()
        server.close()
        await server.wait_closed()
    assert set(peers) == {"127.0.0.2"}  # the attacker's own source address
    # Half-open with the first bytes of a CONNECT, and silent ones.
    assert PARTIAL_CONNECT in first_bytes and b"(nothing)" in first_bytes


async def test_the_attacker_does_not_reopen_connections_refused_at_once() -> None:
    """A connection cap that closes at once is not turned into a reconnect storm by the pool keeper."""
    server = await _closing_server(0.0, [], [])
    port = server.sockets[0].getsockname()[1]
    agent = AttackerAgent(source="127.0.0.2", refused_s=0.1)
    try:
        await agent.cmd_hold(port, 20)
        await asyncio.sleep(0.1)  # the server's closes arrive
        assert (await agent.cmd_held())["refused"] == 20
        storm = await agent.cmd_storm(port, duration=0.5, rate=10, keep=20)
        assert storm["reopened"] == 0 and storm["held"] == 0
    finally:
        await agent.cmd_release()
        server.close()
        await server.wait_closed()
