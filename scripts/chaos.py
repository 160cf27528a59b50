"""SIGKILL loop under mixed load: no accepted execution lost, none stuck, every event seen once.

Each cycle starts the real ``fleetcmd serve`` (free ports, one data directory kept across cycles), runs
mixed load against it and SIGKILLs it at a random moment:

* unary ``Send`` callers and ``SendStream`` callers, to things whose devices answer fast, slowly, never,
  IN_PROGRESS first (then SUCCEEDED), or drop their connection (and come back) when a request arrives;
* two resuming watchers (``Stream`` and ``StreamBatches``) that reconnect to each new service with
  ``after_sequence`` = the last sequence they saw.

After the last cycle the service is started once more, the TTLs are waited out, and the script checks:

* lost: an execution id a caller got back that the store does not have;
* stuck: an execution still non-final after its TTL (plus slack);
* gaps / duplicates: what each watcher saw against a full read of the event log from sequence 0.

Usage: ``python scripts/chaos.py --cycles 100`` (exit status 1 when any check fails).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.pb import commands_pb2 as pb  # noqa: E402
from server.pb import commands_pb2_grpc as pb_grpc  # noqa: E402
from tests.clients import get_all, list_all  # noqa: E402
from tests.devices import EmqxDevice  # noqa: E402
from tests.proc import Service  # noqa: E402

FINAL = {pb.SUCCEEDED, pb.FAILED, pb.REJECTED, pb.TIMED_OUT, pb.CANCELED}
KINDS = ("fast", "slow", "never", "progress", "drop")
TTLS = (2, 3, 4)  # seconds: short, so the final wait stays short
SLACK_S = 3.0  # how long past its expiry an execution may still be non-final before it counts as stuck
# What a call cut by the SIGKILL may fail with; anything else is a defect.
KILL_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
# gRPC's C core reports a stream whose connection was cut mid-frame as INTERNAL with this text: the client's
# own verdict on a broken connection, not an answer of the server (which sends no INTERNAL).
CORE_CUT = (grpc.StatusCode.INTERNAL, "Internal error from Core")


@dataclass
class Figures:
    """What a run did and found."""

    cycles: int = 0
    accepted: int = 0
    events: int = 0
    lost: int = 0
    stuck: int = 0
    gaps: int = 0
    duplicates: int = 0
    mismatched: int = 0  # a watcher's event names another execution than the log's at that sequence
    out_of_order: int = 0  # a watcher's event with a sequence lower than the one before it
    failed_calls: Counter[str] = field(default_factory=Counter)
    unexpected_errors: list[str] = field(default_factory=list)
    tracebacks: int = 0
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Every check held."""
        problems = (self.lost, self.stuck, self.gaps, self.duplicates, self.mismatched, self.out_of_order, self.unexpected_errors)
        return not any(problems)

    def line(self) -> str:
        """The figures on one line."""
        return (
            f"chaos: cycles={self.cycles} accepted={self.accepted} events={self.events} lost={self.lost} "
            f"stuck={self.stuck} gaps={self.gaps} duplicates={self.duplicates} mismatched={self.mismatched} "
            f"out_of_order={self.out_of_order} "
            f"unexpected_errors={len(self.unexpected_errors)} killed_calls={sum(self.failed_calls.values())} "
            f"tracebacks={self.tracebacks} duration={self.duration_s:.1f}s"
        )


class Fleet:
    """Paho devices of every kind, answered from one worker thread (paho's callbacks only enqueue).

    Requests carry the thing id, whose prefix is the device's kind. The devices of one cycle connect to
    that cycle's service; :meth:`detach` drops them all before the next one starts.
    """

    def __init__(self, rng: random.Random, per_kind: int) -> None:
        self.rng = rng
        self.things = [f"chaos-{kind}-{i}" for kind in KINDS for i in range(per_kind)]
        self.port = -1
        self.devices: dict[str, EmqxDevice] = {}
        self._heap: list[tuple[float, int, str, str, str]] = []  # (due, n, action, thing, "execution status")
        self._reconnects: list[tuple[float, str, int]] = []  # (due, thing, port) of dropped devices
        self._n = 0
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="chaos-fleet", daemon=True)
        self._thread.start()

    def _push(self, delay: float, action: str, thing: str, arg: str = "") -> None:
        self._n += 1
        heapq.heappush(self._heap, (time.monotonic() + delay, self._n, action, thing, arg))
        self._cv.notify()

    def on_request(self, dev: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        """Plan the device's answer (paho's thread: never blocks)."""
        kind = dev.thing_id.split("-")[1]
        with self._cv:
            r = self.rng
            if kind == "fast":
                self._push(r.uniform(0.005, 0.05), "respond", dev.thing_id, f"{execution_id} SUCCEEDED")
            elif kind == "slow":
                self._push(r.uniform(0.5, 2.5), "respond", dev.thing_id, f"{execution_id} SUCCEEDED")
            elif kind == "progress":
                first = r.uniform(0.01, 0.3)
                self._push(first, "respond", dev.thing_id, f"{execution_id} IN_PROGRESS")
                self._push(first + r.uniform(0.05, 1.0), "respond", dev.thing_id, f"{execution_id} SUCCEEDED")
            elif kind == "drop":
                if r.random() < 0.5:
                    self._push(0.0, "drop", dev.thing_id)
                else:
                    self._push(r.uniform(0.01, 0.2), "respond", dev.thing_id, f"{execution_id} FAILED")
            # "never": no answer, the execution times out

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stopped:
                    return
                _, _, action, thing, arg = heapq.heappop(self._heap)
                dev = self.devices.get(thing)
                port = self.port
            if dev is None:
                continue
            if action == "respond":
                execution_id, status = arg.split()
                extra: dict[str, Any] = {}
                if status == "FAILED":
                    extra["statusReason"] = {"reasonCode": "E1", "reasonDescription": "planned failure"}
                if dev.connected.is_set():
                    dev.respond(execution_id, status, {"kind": thing.split("-")[1]}, **extra)
            elif action == "drop":
                dev.abort()  # vanish without a DISCONNECT, then come back as a new connection
                with self._cv:
                    if self.devices.get(thing) is dev:
                        del self.devices[thing]
                        self._reconnects.append((time.monotonic() + self.rng.uniform(0.1, 0.5), thing, port))

    def reconnect_due(self) -> list[str]:
        """Things whose device dropped and is due to come back (taken off the queue)."""
        now = time.monotonic()
        with self._cv:
            due = [thing for at, thing, port in self._reconnects if at <= now and port == self.port]
            self._reconnects = [r for r in self._reconnects if r[0] > now]
        return due

    def start_device(self, thing: str) -> None:
        """Connect one device to the current service (blocking: call in a thread)."""
        dev = EmqxDevice("127.0.0.1", self.port, thing, on_request=self.on_request)
        try:
            dev.start(timeout=5)
        except (TimeoutError, ConnectionRefusedError, OSError):
            dev.client.loop_stop()
            return  # the service was killed meanwhile: the next cycle connects it again
        with self._cv:
            if self.port == dev.port:
                self.devices[thing] = dev
                return
        dev.abort()

    def attach(self, port: int) -> None:
        """The devices of a new cycle go to ``port``."""
        with self._cv:
            self.port = port

    def detach(self) -> None:
        """Drop every device (the service is gone) and forget what was planned for them."""
        with self._cv:
            devices, self.devices = list(self.devices.values()), {}
            self.port = -1
            self._heap.clear()
            self._reconnects.clear()
        for dev in devices:
            dev.abort()

    def close(self) -> None:
        """Stop the worker and every device."""
        self.detach()
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(5)


class Watcher:
    """A resuming watcher: each connection asks for the events after the last sequence it saw."""

    def __init__(self, batches: bool) -> None:
        self.batches = batches
        self.seen: list[tuple[int, str]] = []  # (sequence, execution id) in arrival order
        self.last = 0

    def _take(self, ev: pb.ExecutionEvent) -> None:
        self.seen.append((ev.sequence, ev.execution_id))
        self.last = max(self.last, ev.sequence)

    async def follow(self, stub: pb_grpc.CommandServiceStub, until: int | None = None) -> None:
        """Follow until the call fails (the service was killed) or sequence ``until`` was seen."""
        request = pb.StreamRequest(after_sequence=self.last)
        call = stub.StreamBatches(request) if self.batches else stub.Stream(request)
        try:
            async for item in call:
                for ev in item.events if self.batches else [item]:
                    self._take(ev)
                if until is not None and self.last >= until:
                    return
        except grpc.aio.AioRpcError:
            return
        finally:
            call.cancel()


def _record_error(fig: Figures, where: str, exc: grpc.aio.AioRpcError, killed: asyncio.Event) -> None:
    code = exc.code()
    fig.failed_calls[code.name] += 1
    cut = code in KILL_CODES or (code, exc.details()) == CORE_CUT
    if not cut or not killed.is_set():
        fig.unexpected_errors.append(f"{where}: {code.name} {exc.details()}")


async def _unary_caller(
    stub: pb_grpc.CommandServiceStub, fleet: Fleet, rng: random.Random, accepted: set[str], fig: Figures, killed: asyncio.Event
) -> None:
    while not killed.is_set():
        req = pb.SendRequest(thing_id=rng.choice(fleet.things), action="chaos", ttl_seconds=rng.choice(TTLS))
        try:
            ex = await stub.Send(req, timeout=10)
        except grpc.aio.AioRpcError as exc:
            _record_error(fig, "Send", exc, killed)
            return
        accepted.add(ex.execution_id)
        await asyncio.sleep(rng.uniform(0.0, 0.05))  # pacing: a caller, not a benchmark


async def _stream_caller(
    stub: pb_grpc.CommandServiceStub, fleet: Fleet, rng: random.Random, accepted: set[str], fig: Figures, killed: asyncio.Event
) -> None:
    async def requests() -> AsyncIterator[pb.SendStreamRequest]:
        i = 0
        while not killed.is_set():
            for _ in range(rng.randint(1, 8)):
                i += 1
                send = pb.SendRequest(thing_id=rng.choice(fleet.things), action="chaos-stream", ttl_seconds=rng.choice(TTLS))
                yield pb.SendStreamRequest(request_id=str(i), send=send)
            await asyncio.sleep(rng.uniform(0.01, 0.1))

    call = stub.SendStream(requests())
    try:
        async for resp in call:
            if resp.HasField("execution"):
                accepted.add(resp.execution.execution_id)
            else:
                fig.unexpected_errors.append(f"SendStream item {resp.request_id}: {resp.error}")
    except grpc.aio.AioRpcError as exc:
        _record_error(fig, "SendStream", exc, killed)
    finally:
        call.cancel()


async def _reconnector(fleet: Fleet, killed: asyncio.Event) -> None:
    while not killed.is_set():
        due = fleet.reconnect_due()
        if due:
            await asyncio.gather(*(asyncio.to_thread(fleet.start_device, t) for t in due))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(killed.wait(), 0.05)


async def _cycle(
    data: Path, fleet: Fleet, watchers: list[Watcher], rng: random.Random, accepted: set[str], fig: Figures, callers: int
) -> str:
    svc = Service(data)
    try:
        ready = await asyncio.to_thread(svc.start, 60)
        fleet.attach(ready.mqtt_port)
        await asyncio.gather(*(asyncio.to_thread(fleet.start_device, t) for t in fleet.things))
        killed = asyncio.Event()
        async with svc.channel() as ch:
            stub = pb_grpc.CommandServiceStub(ch)

            async def killer() -> None:
                await asyncio.sleep(rng.uniform(1.0, 3.0))  # the random moment is the point here
                os.kill(svc.pid, signal.SIGKILL)
                killed.set()

            tasks = [killer(), _reconnector(fleet, killed), *(w.follow(stub) for w in watchers)]
            tasks += [_unary_caller(stub, fleet, rng, accepted, fig, killed) for _ in range(callers)]
            tasks += [_stream_caller(stub, fleet, rng, accepted, fig, killed) for _ in range(max(1, callers // 2))]
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        await asyncio.to_thread(svc.wait, 10)
    finally:
        fleet.detach()
        svc.close()
    return svc.stderr


def _compare(fig: Figures, log: list[tuple[int, str]], watcher: Watcher) -> None:
    by_seq = dict(log)
    counts = Counter(seq for seq, _ in watcher.seen)
    fig.duplicates += sum(n - 1 for n in counts.values() if n > 1)
    fig.gaps += sum(1 for seq in by_seq if seq not in counts)
    fig.mismatched += sum(1 for seq, eid in watcher.seen if by_seq.get(seq) != eid)
    fig.out_of_order += sum(1 for (a, _), (b, _) in itertools.pairwise(watcher.seen) if b < a)


async def _verify(data: Path, watchers: list[Watcher], accepted: set[str], fig: Figures) -> str:
    svc = Service(data)
    try:
        await asyncio.to_thread(svc.start, 60)
        assert svc.ready_at is not None
        async with svc.channel() as ch:
            stub = pb_grpc.CommandServiceStub(ch)
            listed = await list_all(stub)
            known = {e.execution_id for e in listed}
            fig.lost = len(accepted - known)
            # Wait out the TTLs: no device is connected now, so everything must end (TIMED_OUT at the latest).
            # What expired while the service was down is due at its ready line (TIMED_OUT at once, docs/reliability.md says).
            horizon = max([svc.ready_at, *(e.expires_at.ToMilliseconds() / 1000 for e in listed)]) + SLACK_S
            while True:
                active = [e for e in listed if e.status not in FINAL]
                if not active or time.time() > horizon:
                    break
                await asyncio.sleep(0.2)  # polling the store: there is nothing to await for "all final"
                listed = await list_all(stub)
            fig.stuck = len(active)
            every = await get_all(stub, sorted(known))
            by_seq: dict[int, str] = {}
            for eid, ex in every.items():
                for change in ex.history:
                    if change.sequence in by_seq:
                        fig.unexpected_errors.append(f"sequence {change.sequence} in two histories")
                    by_seq[change.sequence] = eid
            n = max(by_seq, default=0)
            fig.events = n
            # The full read of the event log from sequence 0: itself gap-free, and the reference for the watchers.
            reference = Watcher(batches=False)
            if n:
                await asyncio.wait_for(reference.follow(stub, until=n), 60)
            log = reference.seen
            if [seq for seq, _ in log] != list(range(1, n + 1)):
                fig.unexpected_errors.append("the event log read from 0 is not 1..N")
            if any(by_seq.get(seq) != eid for seq, eid in log):
                fig.unexpected_errors.append("the event log and the histories disagree")
            for w in watchers:
                if w.last < n:
                    await asyncio.wait_for(w.follow(stub, until=n), 60)
                _compare(fig, log, w)
        code, _ = await asyncio.to_thread(svc.stop, signal.SIGTERM, 15)
        if code != 0:
            fig.unexpected_errors.append(f"the last service exited with {code}")
    finally:
        svc.close()
    return svc.stderr


async def run(
    cycles: int, *, data: Path, seed: int, per_kind: int = 2, callers: int = 4, progress: Callable[[str], None] | None = None
) -> Figures:
    """Run ``cycles`` kill cycles and the final check; the figures say what was found (``progress`` hears each cycle)."""
    rng = random.Random(seed)
    fig = Figures()
    fleet = Fleet(random.Random(rng.randrange(1 << 30)), per_kind)
    watchers = [Watcher(batches=False), Watcher(batches=True)]
    accepted: set[str] = set()
    t0 = time.monotonic()
    stderr: list[str] = []
    try:
        for _ in range(cycles):
            stderr.append(await _cycle(data, fleet, watchers, rng, accepted, fig, callers))
            fig.cycles += 1
            if progress is not None:
                progress(f"cycle {fig.cycles}/{cycles}: accepted={len(accepted)} watcher_events={watchers[0].last}")
        stderr.append(await _verify(data, watchers, accepted, fig))
    finally:
        fleet.close()
    fig.accepted = len(accepted)
    fig.tracebacks = sum(text.count("Traceback") for text in stderr)
    fig.duration_s = time.monotonic() - t0
    return fig


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cycles", type=int, default=10, help="SIGKILL cycles (default 10)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random seed (default: the time)")
    parser.add_argument("--per-kind", type=int, default=4, help="devices of each kind (fast, slow, never, progress, drop)")
    parser.add_argument("--callers", type=int, default=6, help="unary Send callers (half as many SendStream callers)")
    parser.add_argument("--data-dir", type=Path, default=None, help="kept across cycles (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetcmd-chaos-") as tmp:
        data = args.data_dir or Path(tmp) / "data"
        print(f"chaos: seed={args.seed} cycles={args.cycles} data={data}", flush=True)
        fig = asyncio.run(
            run(
                args.cycles,
                data=data,
                seed=args.seed,
                per_kind=args.per_kind,
                callers=args.callers,
                progress=lambda line: print(f"chaos: {line}", flush=True),
            )
        )
    print(fig.line())
    for problem in fig.unexpected_errors[:20]:
        print(f"  {problem}")
    if args.json:
        print(json.dumps({**fig.__dict__, "failed_calls": dict(fig.failed_calls)}))
    return 0 if fig.ok else 1


if __name__ == "__main__":
    sys.exit(main())
