"""The real ``fleetcmd serve`` process: signals, configuration, entry points, and a SIGKILL crash test."""

from __future__ import annotations

import asyncio
import heapq
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from tests.clients import get_all, list_all
from tests.devices import EmqxDevice
from tests.proc import PYTHON_M, Service, clean_env, console_script

FINAL = {pb.SUCCEEDED, pb.FAILED, pb.REJECTED, pb.TIMED_OUT, pb.CANCELED}


def ms(ts: Any) -> int:
    return int(ts.ToMilliseconds())


def name(status: int) -> str:
    return pb.ExecutionStatus.Name(status)  # type: ignore[arg-type]


class Responder:
    """Answers requests after small random delays, from one worker thread, through the current device.

    Each execution gets one plan (kept across re-deliveries): ``SUCCEEDED``, ``PROGRESS`` (IN_PROGRESS
    then SUCCEEDED), ``FAILED``, ``REJECTED`` or ``NONE`` (never answers).
    """

    PLAN_FINAL = {"SUCCEEDED": pb.SUCCEEDED, "PROGRESS": pb.SUCCEEDED, "FAILED": pb.FAILED, "REJECTED": pb.REJECTED}

    def __init__(self, seed: int, weights: dict[str, int] | None = None) -> None:
        self.rng = random.Random(seed)
        self.weights = weights or {"SUCCEEDED": 50, "PROGRESS": 25, "FAILED": 10, "REJECTED": 5, "NONE": 10}
        self.device: EmqxDevice | None = None
        self.plans: dict[str, str] = {}
        self.requests: list[str] = []
        self.held: list[tuple[str, str]] = []
        self._heap: list[tuple[float, int, str, str]] = []
        self._n = 0
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="responder", daemon=True)
        self._thread.start()

    def on_request(self, dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        with self._cv:
            self.requests.append(execution_id)
            plan = self.plans.get(execution_id)
            if plan is None:
                plan = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
                self.plans[execution_id] = plan
            now = time.monotonic()
            d1 = self.rng.uniform(0.01, 0.4)
            steps: list[tuple[float, str]] = []
            if plan == "PROGRESS":
                steps = [(now + d1, "IN_PROGRESS"), (now + d1 + self.rng.uniform(0.05, 0.6), "SUCCEEDED")]
            elif plan != "NONE":
                steps = [(now + d1, plan)]
            for due, status in steps:
                self._n += 1
                heapq.heappush(self._heap, (due, self._n, execution_id, status))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stopped:
                    return
                _, _, execution_id, status = heapq.heappop(self._heap)
                dev = self.device
            extra: dict[str, Any] = {}
            if status in ("FAILED", "REJECTED"):
                extra["statusReason"] = {"reasonCode": "E42", "reasonDescription": "planned"}
            if dev is not None and dev.connected.is_set():
                info = dev.respond(execution_id, status, {"plan": self.plans[execution_id]}, **extra)
                if info.rc == 0:
                    continue
            with self._cv:  # offline: like a real device, answer once connected again
                self.held.append((execution_id, status))

    def set_device(self, dev: EmqxDevice | None) -> None:
        with self._cv:
            self.device = dev
            if dev is not None:
                for execution_id, status in self.held:
                    self._n += 1
                    heapq.heappush(self._heap, (time.monotonic(), self._n, execution_id, status))
                self.held.clear()
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(5)


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(d, struct_pb2.Struct())


async def _start(svc: Service) -> None:
    await asyncio.to_thread(svc.start)


def check_history(e: pb.Execution) -> None:
    """The history of one execution is a consistent chain that ends in its current status."""
    h = list(e.history)
    assert h, f"{e.execution_id}: empty history"
    seqs = [c.sequence for c in h]
    assert seqs == sorted(set(seqs)), f"{e.execution_id}: history sequences not increasing: {seqs}"
    assert h[0].previous_status == pb.EXECUTION_STATUS_UNSPECIFIED and not h[0].late
    assert h[0].status in (pb.QUEUED, pb.SENT), f"{e.execution_id}: first status {name(h[0].status)}"
    current = 0
    final_seen = False
    for c in h:
        if c.late:
            assert final_seen, f"{e.execution_id}: late entry #{c.sequence} before a final status"
            assert c.previous_status == current
            continue
        assert not final_seen, f"{e.execution_id}: status change #{c.sequence} after the final status"
        assert c.previous_status == current, f"{e.execution_id}: #{c.sequence} previous {name(c.previous_status)}"
        current = c.status
        final_seen = c.status in FINAL
    assert current == e.status, f"{e.execution_id}: history ends in {name(current)}, Get says {name(e.status)}"
    if e.status in FINAL:
        last_change = [c for c in h if not c.late][-1]
        assert ms(e.completed_at) == ms(last_change.at)


# ---- signals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "entry"),
    [(signal.SIGTERM, "console-script"), (signal.SIGINT, "python-m")],
    ids=["SIGTERM-fleetcmd", "SIGINT-python-m"],
)
async def test_signal_stops_cleanly_under_load(tmp_path: Path, sig: int, entry: str) -> None:
    """SIGTERM/SIGINT while a device is connected and Sends are in flight: exit 0 within 10 s, nothing lost."""
    command = (console_script(),) if entry == "console-script" else PYTHON_M
    data = tmp_path / "data"
    svc = Service(data, command=command)
    svc2 = Service(data)
    dev: EmqxDevice | None = None
    try:
        await _start(svc)
        assert svc.ready is not None
        assert svc.ready.mqtt_port > 0 and svc.ready.grpc_port > 0

        def busy(d: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
            d.respond(execution_id, "IN_PROGRESS", {"step": 1})  # keeps every execution in flight

        dev = EmqxDevice("127.0.0.1", svc.ready.mqtt_port, "sig-dev", on_request=busy)
        await asyncio.to_thread(dev.start)

        accepted: dict[str, pb.Execution] = {}
        enough = asyncio.Event()
        async with svc.channel() as ch:
            stub = pb_grpc.CommandServiceStub(ch)

            async def one(i: int) -> None:
                await asyncio.sleep(i * 0.004)
                thing = "sig-dev" if i % 3 else "sig-offline"
                try:
                    ex = await stub.Send(pb.SendRequest(thing_id=thing, action="a", ttl_seconds=60), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                    return
                accepted[ex.execution_id] = ex
                if len(accepted) >= 40:
                    enough.set()

            chatter_stop = threading.Event()

            def chatter(d: EmqxDevice) -> None:
                # Device reports keep arriving while the service shuts down: each one the broker takes in
                # must be recorded or refused cleanly, never fail against a store that is already closing.
                while not chatter_stop.is_set() and d.connected.is_set():
                    for eid, ex in list(accepted.items()):
                        if ex.thing_id == "sig-dev":
                            d.respond(eid, "IN_PROGRESS", {"step": 1})
                    chatter_stop.wait(0.002)

            async def stopper() -> tuple[int, float]:
                await enough.wait()
                assert dev is not None
                threading.Thread(target=chatter, args=(dev,), daemon=True).start()
                await asyncio.sleep(0.05)  # let the reports flow before the signal
                try:
                    return await asyncio.to_thread(svc.stop, sig, 10)
                finally:
                    chatter_stop.set()

            results = await asyncio.wait_for(asyncio.gather(stopper(), *(one(i) for i in range(150))), 30)
        code, took = results[0]
        assert code == 0, f"exit code {code}\n{svc.stderr}"
        assert took < 10
        assert "Traceback" not in svc.stderr and " ERROR " not in svc.stderr, svc.stderr
        assert 40 <= len(accepted) < 150, "the signal did not arrive while Sends were in flight"
        # Every accepted execution survived the graceful stop.
        await asyncio.to_thread(dev.stop)
        dev = None
        await _start(svc2)
        assert svc2.ready is not None
        async with svc2.channel() as ch:
            stub = pb_grpc.CommandServiceStub(ch)
            got = await get_all(stub, timeout=10, ids=accepted)
        for eid, ex in got.items():
            assert ex.thing_id == accepted[eid].thing_id
            assert ex.status not in FINAL, f"{eid} is {name(ex.status)}"
            check_history(ex)
        assert svc2.ready.restored >= len(accepted)
        code, _ = await asyncio.to_thread(svc2.stop, signal.SIGTERM, 10)
        assert code == 0, svc2.stderr
    finally:
        if dev is not None:
            await asyncio.to_thread(dev.stop)
        svc.close()
        svc2.close()


# ---- configuration -------------------------------------------------------------------------


def test_environment_configures_the_service(tmp_path: Path) -> None:
    """FLEETCMD_* variables alone configure it; a flag beats its variable."""
    data = tmp_path / "env-data"
    env = {
        "FLEETCMD_BIND": "127.0.0.1",
        "FLEETCMD_MQTT_PORT": "0",
        "FLEETCMD_GRPC_PORT": "1",  # would fail (privileged / in use): the --grpc-port flag must win
        "FLEETCMD_DATA_DIR": str(data),
        "FLEETCMD_LOG_LEVEL": "INFO",
    }
    with Service(None, flags=("--grpc-port", "0"), env=env, cwd=tmp_path) as svc:
        assert svc.ready is not None
        assert svc.ready.mqtt_host == "127.0.0.1"
        assert svc.ready.mqtt_port > 0
        assert svc.ready.grpc_port > 1
        assert Path(svc.ready.data_dir) == data
        assert (data / "fleetcmd.db").exists()
        assert not (tmp_path / "data").exists()
        code, _ = svc.stop(signal.SIGTERM, 10)
        assert code == 0, svc.stderr


@pytest.mark.parametrize(
    ("env", "flags", "mentions"),
    [
        ({"FLEETCMD_MQTT_PORT": "abc"}, (), "MQTT_PORT"),
        ({"FLEETCMD_MQTT_PORT": "70000"}, (), "MQTT_PORT"),
        ({"FLEETCMD_GRPC_PORT": "-1"}, (), "GRPC_PORT"),
        ({"FLEETCMD_LOG_LEVEL": "LOUD"}, (), "LOG_LEVEL"),
        ({}, ("--mqtt-port", "abc"), "mqtt-port"),
    ],
    ids=["mqtt-abc", "mqtt-70000", "grpc-negative", "log-level", "flag-abc"],
)
def test_bad_setting_exits_2_with_a_clear_error(
    tmp_path: Path, env: dict[str, str], flags: tuple[str, ...], mentions: str
) -> None:
    env = {"FLEETCMD_DATA_DIR": str(tmp_path / "data"), **env}
    proc = subprocess.run(
        [*PYTHON_M, "serve", *flags],
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_env(env),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert mentions.lower() in proc.stderr.lower(), proc.stderr
    assert "fleetcmd ready" not in proc.stderr
    assert not (tmp_path / "data").exists(), "the service started doing work with a bad setting"


# ---- crash test -----------------------------------------------------------------------------

TRAFFIC = 200
KILL_AFTER = 100  # accepted Sends before the SIGKILL
SLACK_MS = 1500  # how late past expires_at (or the restart, if later) a final state may come


async def test_sigkill_mid_traffic_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = random.Random(int(os.environ.get("FLEETCMD_TEST_SEED", "20261122")))
    responder = Responder(seed=rng.randrange(1 << 30))
    svc1 = Service(data)
    svc2 = Service(data)
    dev1: EmqxDevice | None = None
    dev2: EmqxDevice | None = None
    try:
        # ---- 1. traffic, then SIGKILL ------------------------------------------------------
        await _start(svc1)
        assert svc1.ready is not None
        dev1 = EmqxDevice("127.0.0.1", svc1.ready.mqtt_port, "crash-dev", on_request=responder.on_request)
        await asyncio.to_thread(dev1.start)
        responder.set_device(dev1)

        accepted: dict[str, pb.Execution] = {}
        failed: list[grpc.StatusCode] = []
        enough = asyncio.Event()
        kill_ms: list[int] = []
        async with svc1.channel() as ch:
            stub = pb_grpc.CommandServiceStub(ch)

            async def send(thing: str, ttl: int, delay: float, i: int) -> None:
                await asyncio.sleep(delay)
                req = pb.SendRequest(thing_id=thing, action="crash", ttl_seconds=ttl, params=struct({"i": i}))
                try:
                    ex = await stub.Send(req, timeout=5)
                except grpc.aio.AioRpcError as exc:
                    failed.append(exc.code())
                    return
                accepted[ex.execution_id] = ex
                if len(accepted) >= KILL_AFTER:
                    enough.set()

            def killer_now() -> None:
                kill_ms.append(int(time.time() * 1000))
                os.kill(svc1.pid, signal.SIGKILL)

            async def killer() -> None:
                await enough.wait()
                killer_now()

            # Fixed ones first: offline executions that are overdue at the restart (ttl 3) and ones that are not
            # (ttl 5), so both paths of the restore are exercised whatever the random mix.
            jobs = [send("crash-offline", 3, 0, -1 - k) for k in range(3)]
            jobs += [send("crash-offline", 5, 0, -10 - k) for k in range(3)]
            for i in range(TRAFFIC):
                thing = "crash-offline" if rng.random() < 0.2 else "crash-dev"
                jobs.append(send(thing, rng.choice((3, 4, 5)), rng.uniform(0.02, 1.5), i))
            await asyncio.wait_for(asyncio.gather(killer(), *jobs), 30)
        assert svc1.wait(10) == -signal.SIGKILL
        kill_at = kill_ms[0]
        assert len(accepted) >= KILL_AFTER
        assert failed, "every Send succeeded: the kill did not happen mid-traffic"
        assert set(failed) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, failed
        await asyncio.to_thread(dev1.stop)  # it would reconnect to a reused port otherwise
        dev1 = None
        responder.set_device(None)

        offline = {i: e for i, e in accepted.items() if e.thing_id == "crash-offline"}
        assert all(e.status == pb.QUEUED for e in offline.values())
        # Let the first offline TTLs run out while the service is down (real time has to pass here).
        first_due = min(ms(e.expires_at) for e in offline.values())
        await asyncio.sleep(max(0.0, (first_due + 300) / 1000 - time.time()))

        # ---- 2. restart on the same data dir --------------------------------------------------
        restart_ms = int(time.time() * 1000)
        await _start(svc2)
        assert svc2.ready is not None and svc2.ready_at is not None
        ready_ms = int(svc2.ready_at * 1000)
        assert svc2.ready.restored >= len(offline), svc2.ready
        dev2 = EmqxDevice("127.0.0.1", svc2.ready.mqtt_port, "crash-dev", on_request=responder.on_request)
        held = len(responder.held)
        await asyncio.to_thread(dev2.start)
        responder.set_device(dev2)

        async with svc2.channel() as ch:
            stub = pb_grpc.CommandServiceStub(ch)

            # Every accepted execution exists, with what Send returned.
            got = await get_all(stub, timeout=10, ids=accepted)
            for eid, ex in got.items():
                sent = accepted[eid]
                assert (ex.thing_id, ex.action, ex.ttl_seconds) == (sent.thing_id, sent.action, sent.ttl_seconds)
                assert ms(ex.created_at) == ms(sent.created_at)
                assert ex.history[0].status == sent.status

            # Overdue at the restart -> TIMED_OUT at once (within a second of the ready line).
            overdue = [i for i, e in accepted.items() if ms(e.expires_at) < restart_ms]
            assert any(i in offline for i in overdue), "no offline execution was overdue at the restart"
            deadline = time.monotonic() + 1.0
            while True:
                got = await get_all(stub, timeout=10, ids=overdue)
                pending = [i for i, e in got.items() if e.status not in FINAL]
                if not pending or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert not pending, f"overdue executions not final 1 s after the restart: {pending}"
            for i in overdue:
                if i in offline:
                    e = got[i]
                    assert e.status == pb.TIMED_OUT, (i, name(e.status))
                    assert kill_at <= ms(e.completed_at) <= ready_ms + 1000, (kill_at, ms(e.completed_at), ready_ms)

            # ---- 3. everything (also executions whose Send did not answer) becomes final on time ----
            listed = await list_all(stub, timeout=10)
            assert set(accepted) <= {e.execution_id for e in listed}
            horizon = max(ms(e.expires_at) for e in listed) + SLACK_MS + 500
            while True:
                listed = await list_all(stub, timeout=10)
                active = [e.execution_id for e in listed if e.status not in FINAL]
                if not active or time.time() * 1000 > horizon:
                    break
                await asyncio.sleep(0.1)
            assert not active, f"still not final after their TTL: {active}"

            await asyncio.to_thread(dev2.stop)  # no more device traffic from here on
            dev2 = None
            responder.set_device(None)
            every = await get_all(stub, timeout=10, ids=[e.execution_id for e in listed])

            for eid, e in every.items():
                check_history(e)
                # Nothing can end while the service is down: one that expired then is due at the restart.
                late_by = ms(e.completed_at) - max(ms(e.expires_at), ready_ms)
                assert late_by <= SLACK_MS, f"{eid} became final {late_by} ms after its TTL (or the restart)"
                if e.status == pb.TIMED_OUT:
                    assert ms(e.completed_at) >= ms(e.expires_at) - 5, f"{eid} timed out before its TTL"
                if e.thing_id == "crash-offline":
                    assert e.status == pb.TIMED_OUT, (eid, name(e.status))
                    continue
                plan = responder.plans.get(eid)
                if plan is None or plan == "NONE":
                    assert e.status == pb.TIMED_OUT, (eid, plan, name(e.status))
                else:
                    # A response lost in the crash may leave it to time out; nothing else is allowed.
                    assert e.status in (Responder.PLAN_FINAL[plan], pb.TIMED_OUT), (eid, plan, name(e.status))
            statuses = {name(e.status) for i, e in every.items() if i in accepted}
            assert {"SUCCEEDED", "TIMED_OUT"} <= statuses, statuses

            # ---- 4. the event log: 1..N with no gap, and the same story as Get ------------------
            by_seq: dict[int, tuple[str, pb.StateChange]] = {}
            for eid, e in every.items():
                for c in e.history:
                    assert c.sequence not in by_seq, f"sequence {c.sequence} in two histories"
                    by_seq[c.sequence] = (eid, c)
            n = max(by_seq)
            assert sorted(by_seq) == list(range(1, n + 1)), "histories do not cover 1..N"

            events: list[pb.ExecutionEvent] = []
            call = stub.Stream(pb.StreamRequest(after_sequence=0))
            try:
                async with asyncio.timeout(15):
                    async for ev in call:
                        events.append(ev)
                        if ev.sequence >= n:
                            break
            finally:
                call.cancel()
            assert [ev.sequence for ev in events] == list(range(1, n + 1))
            for ev in events:
                eid, c = by_seq[ev.sequence]
                assert ev.execution_id == eid
                assert (ev.status, ev.previous_status, ev.late) == (c.status, c.previous_status, c.late), ev
                assert ms(ev.at) == ms(c.at)
                assert ev.thing_id == every[eid].thing_id

        code, _ = await asyncio.to_thread(svc2.stop, signal.SIGTERM, 10)
        assert code == 0, svc2.stderr
        assert "Traceback" not in svc2.stderr, svc2.stderr
        if os.environ.get("FLEETCMD_TEST_DEBUG"):
            for i, e in every.items():
                if i in accepted and e.thing_id == "crash-dev":
                    print(
                        i[:8],
                        responder.plans.get(i),
                        e.ttl_seconds,
                        name(e.status),
                        i in overdue,
                        [name(c.status) + ("*" if c.late else "") for c in e.history],
                        responder.requests.count(i),
                    )
        counts = {s: sum(1 for i, e in every.items() if i in accepted and name(e.status) == s) for s in statuses}
        print(
            f"crash test: accepted={len(accepted)} failed={len(failed)} overdue={len(overdue)} "
            f"restored={svc2.ready.restored} events={n} held={held} redelivered={len(responder.requests) - len(responder.plans)} "
            f"final={counts}"
        )
    finally:
        responder.close()
        for dev in (dev1, dev2):
            if dev is not None:
                await asyncio.to_thread(dev.stop)
        svc1.close()
        svc2.close()
