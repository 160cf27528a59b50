"""Load generator agents, each run in its own process and driven over a ``multiprocessing`` pipe.

An agent is an object whose ``cmd_<name>`` coroutines the orchestrator calls
one at a time (``Agent.call``); while a command runs, the agent's connections
keep being served by the same event loop. Agents:

* :class:`DeviceAgent` - many MQTT devices in one process (``mqttlite``). In
  ``emqx`` mode each subscribes to its fleetcmd request topic and answers every
  request with ``SUCCEEDED``; in ``raw`` mode each echoes ``bench/{id}/req`` to
  ``bench/{id}/resp``.
* :class:`RequesterAgent` - the other side of the raw round trip.
* :class:`CallerAgent` - gRPC callers (``grpc.aio``), each command a unary ``Send``
  or an item of one ``SendStream`` call, plus one ``StreamBatches`` watcher that
  sees each command's final status.
* :class:`WatcherAgent` - many ``StreamBatches`` watchers counting every event.
* :class:`AttackerAgent` - hostile TCP clients of the MQTT port (``bench/attack.py``): half-open
  connections held open, and a connect-and-close storm.

Every loop here is bounded by a deadline or a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from bench.mqttlite import MqttConn, connect_packet, open_conn

FINAL = frozenset({5, 6, 7, 8, 9})  # SUCCEEDED, FAILED, REJECTED, TIMED_OUT, CANCELED
SUCCEEDED = 5
RESPONSE = json.dumps({"status": "SUCCEEDED", "result": {"ok": True}}, separators=(",", ":")).encode()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def agent_main(conn: Connection, factory: Callable[..., Any], kwargs: dict[str, Any], fast_loop: bool = False) -> None:
    """Process entry point: build the agent and serve the orchestrator's commands until ``exit``.

    With ``fast_loop`` the agent runs on uvloop when it is installed (the MQTT agents: plain asyncio protocols).
    """
    runner: Callable[[Any], Any] = asyncio.run
    if fast_loop:
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_serve(conn, factory, kwargs))


async def _serve(conn: Connection, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    agent = factory(**kwargs)  # inside the loop: grpc.aio channels bind to it
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    def reader() -> None:
        # A blocking reader thread, not loop.add_reader: uvloop makes a watched fd non-blocking, and a
        # large command (thousands of passwords) then arrives in pieces that recv() cannot handle.
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = (0, "exit", {})
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg[1] == "exit":
                return

    threading.Thread(target=reader, name="agent-commands", daemon=True).start()
    while True:
        seq, name, kwargs = await inbox.get()
        if name == "exit":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(agent.cmd_close(), 10)
            with contextlib.suppress(Exception):
                conn.send((seq, "ok", None))
            return
        try:
            result = await getattr(agent, f"cmd_{name}")(**kwargs)
            reply: tuple[int, str, Any] = (seq, "ok", result)
        except Exception:  # noqa: BLE001 - reported to the orchestrator, which raises it
            reply = (seq, "error", traceback.format_exc())
        conn.send(reply)


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


# ---- MQTT devices ---------------------------------------------------------------------------


class DeviceAgent:
    """Many devices on one event loop."""

    def __init__(self, ids: list[str], mode: str = "emqx", parallel: int = 128) -> None:
        self.host, self.port, self.ids, self.mode = "127.0.0.1", 0, ids, mode
        self.passwords: dict[str, str] = {}
        self.parallel = parallel
        self.conns: dict[str, MqttConn] = {}
        self.requests = 0
        self.lost = 0

    def _on_publish(self, conn: MqttConn, topic: str, payload: bytes) -> None:
        self.requests += 1
        if self.mode == "emqx":
            # .../executions/{id}/request -> .../executions/{id}/response
            conn.publish(topic[:-7].encode() + b"response", RESPONSE, 1)
        else:
            conn.publish(conn.user, payload, 1)  # type: ignore[arg-type]

    def _filter(self, thing: str) -> str:
        if self.mode == "emqx":
            return f"$emqx/commands/things/{thing}/executions/+/request"
        return f"bench/{thing}/req"

    async def _one(self, thing: str, deadline: float) -> tuple[str, float, str]:
        pw = self.passwords.get(thing)
        try:
            timeout = max(0.5, deadline - time.monotonic())
            conn = await open_conn(
                self.host, self.port, thing, self._on_publish, username=thing if pw else None, password=pw, timeout=timeout
            )
            conn.user = f"bench/{thing}/resp".encode()
            rc = await asyncio.wait_for(conn.subscribe(self._filter(thing), 1), max(0.5, deadline - time.monotonic()))
            self.conns[thing] = conn
            conn.closed.add_done_callback(lambda _f: self._lost(thing, conn))
            if rc == 0x80:
                return thing, time.monotonic(), "suback 0x80"
            return thing, time.monotonic(), ""
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return thing, time.monotonic(), f"{type(exc).__name__}: {exc}"

    def _lost(self, thing: str, conn: MqttConn) -> None:
        if self.conns.get(thing) is conn:
            self.lost += 1

    async def cmd_connect(
        self, port: int, start_at: float, deadline_s: float, passwords: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Connect and subscribe every device (``parallel`` handshakes at once), starting at ``start_at``.

        With ``passwords``, each device authenticates as a registered thing (username = client id).
        """
        self.port = port
        self.passwords = passwords or {}
        self.lost = 0
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()
        cpu0 = _cpu_self()
        deadline = t0 + deadline_s
        sem = asyncio.Semaphore(self.parallel)
        results: list[tuple[str, float, str]] = []

        async def guarded(thing: str) -> None:
            async with sem:
                if time.monotonic() > deadline:
                    results.append((thing, time.monotonic(), "deadline"))
                    return
                results.append(await self._one(thing, deadline))

        tasks = [asyncio.ensure_future(guarded(t)) for t in self.ids]
        _done, late = await asyncio.wait(tasks, timeout=deadline_s + 2)
        for task in late:  # handshakes still running past the deadline: given up
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=5)
        finished = {r[0] for r in results}
        results += [(t, time.monotonic(), "deadline") for t in self.ids if t not in finished]
        ok = [r for r in results if not r[2]]
        errors: dict[str, int] = {}
        for _, _, err in results:
            if err:
                key = err.split(":")[0]
                errors[key] = errors.get(key, 0) + 1
        return {
            "connected": len(ok),
            "failed": len(results) - len(ok),
            "failed_ids": [r[0] for r in results if r[2]],
            "errors": errors,
            "t_start": t0,
            "t_done": max((r[1] for r in ok), default=t0),
            "cpu_s": _cpu_self() - cpu0,
        }

    async def cmd_stats(self) -> dict[str, Any]:
        """Counters."""
        return {"requests": self.requests, "lost": self.lost, "open": sum(c.transport is not None for c in self.conns.values())}

    async def cmd_close(self) -> None:
        """Disconnect every device."""
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        await asyncio.sleep(0.2)


# ---- raw request/response -------------------------------------------------------------------


class RequesterAgent:
    """Requesters for the raw broker round trip: publish to a device, wait for its echo, repeat."""

    def __init__(self, ids: list[str]) -> None:
        self.host, self.port, self.ids = "127.0.0.1", 0, ids
        self.conns: list[MqttConn] = []
        self._waiting: dict[str, asyncio.Future[float]] = {}

    def _on_publish(self, conn: MqttConn, topic: str, payload: bytes) -> None:
        fut = self._waiting.pop(conn.client_id, None)
        if fut is not None and not fut.done():
            fut.set_result(time.monotonic())

    async def cmd_connect(self, port: int) -> dict[str, Any]:
        """Connect every requester and subscribe it to its device's response topic."""
        self.port = port
        for thing in self.ids:
            conn = await open_conn(self.host, self.port, f"req-{thing}", self._on_publish)
            conn.user = thing
            rc = await conn.subscribe(f"bench/{thing}/resp", 1)
            if rc == 0x80:
                raise RuntimeError(f"requester for {thing}: subscription refused")
            self.conns.append(conn)
        return {"connected": len(self.conns)}

    async def cmd_probe(self, timeout: float = 5.0) -> bool:
        """One round trip on the first pair; False when nothing comes back in time."""
        conn = self.conns[0]
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[conn.client_id] = fut
        conn.publish(f"bench/{conn.user}/req".encode(), b"probe", 1)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            self._waiting.pop(conn.client_id, None)
            return False

    async def cmd_run(
        self, start_at: float, warmup: float, duration: float, pairs: int = 0, payload_bytes: int = 64
    ) -> dict[str, Any]:
        """Closed loop, one request in flight per pair (the first ``pairs``, 0 = all), for ``warmup + duration`` s."""
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        loop = asyncio.get_running_loop()
        t_begin = time.monotonic()
        ws, we = t_begin + warmup, t_begin + warmup + duration
        payload = b"x" * payload_bytes
        lat: list[float] = []
        count = 0
        timeouts = 0
        cpu = [0.0, 0.0]

        async def pair(conn: MqttConn) -> None:
            nonlocal count, timeouts
            topic = f"bench/{conn.user}/req".encode()
            while True:
                t0 = time.monotonic()
                if t0 >= we:
                    return
                fut: asyncio.Future[float] = loop.create_future()
                self._waiting[conn.client_id] = fut
                conn.publish(topic, payload, 1)
                try:
                    t1 = await asyncio.wait_for(fut, 10)
                except TimeoutError:
                    timeouts += 1
                    self._waiting.pop(conn.client_id, None)
                    continue
                if t0 >= ws and t1 <= we:
                    count += 1
                    lat.append(t1 - t0)

        async def mark() -> None:
            await asyncio.sleep(max(0.0, ws - time.monotonic()))
            cpu[0] = _cpu_self()
            await asyncio.sleep(max(0.0, we - time.monotonic()))
            cpu[1] = _cpu_self()

        active = self.conns[:pairs] if pairs else self.conns
        await asyncio.gather(mark(), *(pair(c) for c in active))
        return {
            "pairs": len(active),
            "round_trips": count,
            "rate": count / duration,
            "duration": duration,
            "window": [ws, we],
            "timeouts": timeouts,
            "lat_p50_ms": (percentile(lat, 50) or 0) * 1000,
            "lat_p99_ms": (percentile(lat, 99) or 0) * 1000,
            "cpu_s": cpu[1] - cpu[0],
        }

    async def cmd_close(self) -> None:
        """Disconnect."""
        for conn in self.conns:
            conn.close()
        self.conns.clear()
        await asyncio.sleep(0.1)


# ---- gRPC -----------------------------------------------------------------------------------


def _channel(target: str) -> Any:
    import grpc

    return grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20)])


class ItemError(Exception):
    """A SendStream item answered with an error (counted by its code name, as a unary call's error is)."""

    def __init__(self, code: int, message: str) -> None:
        import grpc

        super().__init__(message)
        self._code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)

    def code(self) -> Any:
        """The item's status code."""
        return self._code


class SendStreamClient:
    """One ``SendStream`` call shared by many coroutines: :meth:`send` writes an item and awaits its answer."""

    def __init__(self, stub: Any, pb: Any, md: Any) -> None:
        self.pb = pb
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._next = 0
        self.error = ""
        self.call = stub.SendStream(self._requests(), metadata=md)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self) -> Any:
        while (req := await self._queue.get()) is not None:
            yield req

    async def _read(self) -> None:
        failure: Exception = RuntimeError("SendStream ended")
        try:
            async for resp in self.call:
                fut = self._pending.pop(resp.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiting sender
            failure = exc
            self.error = f"{type(exc).__name__}: {exc}"[:300]
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(failure)
        self._pending.clear()

    async def send(self, thing: str, action: str, timeout: float) -> Any:
        """Write one item; its Execution once the server answers (committed), or raise its error."""
        self._next += 1
        rid = str(self._next)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._queue.put_nowait(
            self.pb.SendStreamRequest(request_id=rid, send={"thing_id": thing, "action": action, "ttl_seconds": 60})
        )
        try:
            resp = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)
        if resp.WhichOneof("outcome") == "error":
            raise ItemError(resp.error.code, resp.error.message)
        return resp.execution

    async def close(self) -> None:
        """Half-close, let the answers still due arrive (bounded), then end the call."""
        self._queue.put_nowait(None)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self._reader, 10)
        self.call.cancel()


class CallerAgent:
    """Callers (unary ``Send``, or items of one ``SendStream``) plus one ``StreamBatches`` watcher.

    The watcher resolves each command when its final event arrives.
    """

    def __init__(self, target: str, api_key: str, action: str = "bench") -> None:
        from server.pb import commands_pb2, commands_pb2_grpc

        self.pb = commands_pb2
        self.channel = _channel(target)
        self.stub = commands_pb2_grpc.CommandServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {api_key}"),)
        self.action = action
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._early: dict[str, float] = {}
        self._stream_task: asyncio.Task[None] | None = None
        self.events = 0
        self.gaps = 0
        self.last_seq = 0
        self.stream_error = ""

    async def _watch(self) -> None:
        # StreamBatches: the events committed together arrive in one message (the watcher's own cost per
        # event is what limited it on Stream); each final status is still seen, timed at its batch's arrival.
        call = self.stub.StreamBatches(self.pb.StreamRequest(action=self.action), metadata=self.md)
        try:
            async for batch in call:
                now = time.monotonic()
                for ev in batch.events:
                    self.events += 1
                    if self.last_seq and ev.sequence != self.last_seq + 1:
                        self.gaps += 1
                    self.last_seq = ev.sequence
                    if ev.status in FINAL:
                        fut = self._waiters.pop(ev.execution_id, None)
                        if fut is None:
                            self._early[ev.execution_id] = now
                        elif not fut.done():
                            fut.set_result(now)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the results
            self.stream_error = f"{type(exc).__name__}: {exc}"[:300]

    async def _one(self, thing: str, timeout: float = 30.0, stream: SendStreamClient | None = None) -> tuple[float, float]:
        """Send one command (unary, or as an item of ``stream``); returns (send_started, final_seen) monotonic times."""
        t0 = time.monotonic()
        if stream is None:
            ex = await self.stub.Send(
                self.pb.SendRequest(thing_id=thing, action=self.action, ttl_seconds=60), metadata=self.md, timeout=timeout
            )
        else:
            ex = await stream.send(thing, self.action, timeout)
        eid = ex.execution_id
        t = self._early.pop(eid, None)
        if t is None:
            if ex.status in FINAL:
                return t0, time.monotonic()
            fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self._waiters[eid] = fut
            try:
                t = await asyncio.wait_for(fut, timeout)
            finally:
                self._waiters.pop(eid, None)
        return t0, t

    async def cmd_start(self, probe_thing: str, timeout: float = 20.0) -> dict[str, Any]:
        """Open the Stream and prove it live with one command to ``probe_thing``."""
        self._stream_task = asyncio.get_running_loop().create_task(self._watch())
        await asyncio.sleep(0.2)  # the Stream call is on its way before the probe's events exist
        deadline = time.monotonic() + timeout
        while True:
            try:
                t0, t1 = await self._one(probe_thing, timeout=max(1.0, deadline - time.monotonic()))
                return {"probe_ms": (t1 - t0) * 1000}
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                # The stream may have subscribed after the probe's final event: try again.

    async def cmd_run(
        self,
        things: list[str],
        concurrency: int,
        warmup: float,
        duration: float,
        max_commands: int = 1_000_000,
        start_at: float = 0.0,
        drain_s: float = 20.0,
        mode: str = "unary",
    ) -> dict[str, Any]:
        """Closed loop: ``concurrency`` callers each Send, wait for the final event, repeat.

        ``mode`` ``unary``: each command is a ``Send`` call; ``stream``: an item of one ``SendStream``
        call that all callers share (so ``concurrency`` items are in flight on it). Commands started
        after the warm-up whose final event arrives inside the window are counted.
        """
        stream = SendStreamClient(self.stub, self.pb, self.md) if mode == "stream" else None
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        t_begin = time.monotonic()
        ws, we = t_begin + warmup, t_begin + warmup + duration
        lat: list[float] = []
        completed_in_window = 0
        issued = 0
        errors: dict[str, int] = {}
        rng = random.Random(1)
        cpu = [0.0, 0.0]
        events0 = [0]

        async def worker(k: int) -> None:
            nonlocal completed_in_window, issued
            i = k
            while issued < max_commands and time.monotonic() < we:
                issued += 1
                thing = things[(i + rng.randrange(len(things))) % len(things)]
                i += concurrency
                try:
                    t0, t1 = await self._one(thing, stream=stream)
                except Exception as exc:  # noqa: BLE001 - counted
                    code = getattr(exc, "code", None)
                    key = str(code()) if callable(code) else type(exc).__name__
                    errors[key] = errors.get(key, 0) + 1
                    await asyncio.sleep(0.01)
                    continue
                if ws <= t1 <= we:
                    completed_in_window += 1
                    if t0 >= ws:
                        lat.append(t1 - t0)

        async def mark() -> None:
            await asyncio.sleep(max(0.0, ws - time.monotonic()))
            cpu[0] = _cpu_self()
            events0[0] = self.events
            await asyncio.sleep(max(0.0, we - time.monotonic()))
            cpu[1] = _cpu_self()

        marker = asyncio.get_running_loop().create_task(mark())
        workers = [asyncio.get_running_loop().create_task(worker(k)) for k in range(concurrency)]
        _done, pending = await asyncio.wait(workers, timeout=warmup + duration + drain_s)
        for task in pending:
            task.cancel()
        await marker
        stream_call_error = ""
        if stream is not None:
            await stream.close()
            stream_call_error = stream.error
        return {
            "mode": mode,
            "send_stream_error": stream_call_error,
            "commands": completed_in_window,
            "duration": duration,
            "window": [ws, we],
            "rate": completed_in_window / duration,
            "issued": issued,
            "unfinished": len(pending),
            "errors": errors,
            "lat_p50_ms": (percentile(lat, 50) or 0) * 1000,
            "lat_p99_ms": (percentile(lat, 99) or 0) * 1000,
            "lat_max_ms": (max(lat) if lat else 0) * 1000,
            "samples": len(lat),
            "cpu_s": cpu[1] - cpu[0],
            "stream_events": self.events - events0[0],
            "stream_gaps": self.gaps,
            "stream_error": self.stream_error,
            "last_seq": self.last_seq,
        }

    async def cmd_sequential(self, thing: str, count: int, max_s: float, mode: str = "unary") -> dict[str, Any]:
        """One caller, one command at a time: the low-load latency.

        ``mode`` ``unary``: each command is a ``Send`` call; ``stream``: an item of one ``SendStream`` call.
        """
        stream = SendStreamClient(self.stub, self.pb, self.md) if mode == "stream" else None
        lat: list[float] = []
        deadline = time.monotonic() + max_s
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            t0, t1 = await self._one(thing, stream=stream)
            lat.append(t1 - t0)
        if stream is not None:
            await stream.close()
        return {
            "samples": len(lat),
            "lat_p50_ms": (percentile(lat, 50) or 0) * 1000,
            "lat_p99_ms": (percentile(lat, 99) or 0) * 1000,
            "lat_min_ms": (min(lat) if lat else 0) * 1000,
            "lat_max_ms": (max(lat) if lat else 0) * 1000,
        }

    async def cmd_create_things(self, ids: list[str], concurrency: int = 32) -> dict[str, str]:
        """Register things (``ThingService.CreateThing``); returns their passwords."""
        from server.pb import registry_pb2, registry_pb2_grpc

        stub = registry_pb2_grpc.ThingServiceStub(self.channel)
        out: dict[str, str] = {}
        queue = list(reversed(ids))

        async def worker() -> None:
            while queue:
                thing = queue.pop()
                resp = await stub.CreateThing(registry_pb2.CreateThingRequest(thing_id=thing), metadata=self.md, timeout=30)
                out[thing] = resp.credentials.password

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    async def cmd_last_seq(self) -> int:
        """The last sequence the watcher saw."""
        return self.last_seq

    async def cmd_close(self) -> None:
        """Stop the watcher and close the channel."""
        if self._stream_task is not None:
            self._stream_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stream_task
        await self.channel.close()


class WatcherAgent:
    """``n`` ``StreamBatches`` watchers; each counts its events and checks that sequences have no gap."""

    def __init__(self, target: str, api_key: str, n: int, action: str = "bench") -> None:
        from server.pb import commands_pb2, commands_pb2_grpc

        self.pb = commands_pb2
        self.channel = _channel(target)
        self.stub = commands_pb2_grpc.CommandServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {api_key}"),)
        self.n = n
        self.action = action
        self.tasks: list[asyncio.Task[None]] = []
        self.count = [0] * n
        self.first = [0] * n
        self.last = [0] * n
        self.gaps = [0] * n
        self.errors: list[str] = [""] * n
        self.ages: list[list[float]] = [[] for _ in range(n)]
        self.recording = False

    async def _watch(self, k: int) -> None:
        # StreamBatches: the same events as Stream, those available together in one message.
        call = self.stub.StreamBatches(self.pb.StreamRequest(action=self.action), metadata=self.md)
        try:
            async for batch in call:
                now = time.time()
                for ev in batch.events:
                    seq = ev.sequence
                    if self.last[k] and seq != self.last[k] + 1:
                        self.gaps[k] += 1
                    if not self.first[k]:
                        self.first[k] = seq
                    self.last[k] = seq
                    self.count[k] += 1
                    if self.recording and (seq & 7) == 0:  # one event in 8: age = arrival - commit time
                        self.ages[k].append(now - (ev.at.seconds + ev.at.nanos / 1e9))
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - reported
            self.errors[k] = f"{type(exc).__name__}: {exc}"[:300]

    async def cmd_start(self) -> None:
        """Open every Stream."""
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._watch(k)) for k in range(self.n)]
        await asyncio.sleep(0.3)

    async def cmd_wait_ready(self, timeout: float) -> int:
        """Wait until every stream has seen an event; returns how many have."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(self.count):  # noqa: ASYNC110 - bounded poll of counters
            await asyncio.sleep(0.05)
        return sum(1 for c in self.count if c)

    async def cmd_reset(self) -> None:
        """Start a new measurement: counters from zero, ages recorded."""
        self.count = [0] * self.n
        self.first = [0] * self.n
        self.gaps = [0] * self.n
        self.ages = [[] for _ in range(self.n)]
        self.recording = True

    async def cmd_settle(self, last_seq: int, timeout: float) -> dict[str, Any]:
        """Wait (bounded) until every stream reached ``last_seq``; then report."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and min(self.last) < last_seq and not any(self.errors):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self.recording = False
        ages = [a for per in self.ages for a in per]
        return {
            "count": list(self.count),
            "first": list(self.first),
            "last": list(self.last),
            "gaps": list(self.gaps),
            "errors": [e for e in self.errors if e],
            "age_p50_ms": (percentile(ages, 50) or 0) * 1000,
            "age_p99_ms": (percentile(ages, 99) or 0) * 1000,
        }

    async def cmd_close(self) -> None:
        """Cancel every Stream."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.channel.close()


# ---- hostile TCP clients --------------------------------------------------------------------

# The first bytes of a CONNECT: fixed header, remaining length, part of the protocol name. A server
# that waits for the rest of the packet holds the connection until its CONNECT deadline.
PARTIAL_CONNECT = connect_packet("attacker", None, None, 60, True)[:6]
REFUSED_S = 0.5


class _Raw(asyncio.Protocol):
    """A TCP connection that sends what it is told and ignores what it receives."""

    def __init__(self, on_lost: Callable[[_Raw], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_lost = on_lost
        self.lost = False
        self.t_open = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no asyncio.Transport subclass)

    def data_received(self, data: bytes) -> None:
        pass  # whatever the server answers (a refusing CONNACK) changes nothing for the attacker

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost(self)


class AttackerAgent:
    """Hostile clients of one MQTT port: a pool of half-open connections and a connect-and-close storm.

    Half-open: a TCP connection that sends nothing (even index) or the first bytes of a CONNECT
    (odd index) and then waits. Storm: connect, send the first bytes of a CONNECT (``partial``),
    close (FIN), what a load balancer's TCP health check does. Connections come from ``source``
    (another loopback address than the devices', so a per-address cap applies to the attacker only).
    """

    def __init__(self, source: str = "127.0.0.1", refused_s: float = REFUSED_S) -> None:
        self.source = source
        self.refused_s = refused_s
        self.pool: set[_Raw] = set()
        self.closed_by_server = 0
        # Closed by the server within refused_s of opening: refused (e.g. a connection cap), not
        # timed out; never re-opened, so a cap does not turn the pool into a reconnect storm.
        self.refused = 0
        self.opened = 0
        self.port = 0
        self.keep = 0  # while a storm runs: re-open pool connections the server closes, up to this many
        self.errors: dict[str, int] = {}

    def _lost(self, conn: _Raw) -> None:
        if conn in self.pool:
            self.pool.discard(conn)
            self.closed_by_server += 1
            if time.monotonic() - conn.t_open < self.refused_s:
                self.refused += 1

    async def _connect(self, on_lost: Callable[[_Raw], None] | None) -> _Raw | None:
        loop = asyncio.get_running_loop()
        try:
            _t, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Raw(on_lost), "127.0.0.1", self.port, local_addr=(self.source, 0)), 5.0
            )
        except (OSError, TimeoutError) as exc:
            key = type(exc).__name__ + (f"[{exc.errno}]" if isinstance(exc, OSError) and exc.errno else "")
            self.errors[key] = self.errors.get(key, 0) + 1
            return None
        return proto

    async def _open_one(self, index: int) -> bool:
        conn = await self._connect(self._lost)
        if conn is None or conn.transport is None:
            return False
        self.opened += 1
        if conn.lost:  # refused at once (e.g. a connection cap)
            self.closed_by_server += 1
            self.refused += 1
            return False
        self.pool.add(conn)
        if index % 2 == 1:
            conn.transport.write(PARTIAL_CONNECT)
        return True

    async def cmd_hold(self, port: int, n: int, parallel: int = 64) -> dict[str, Any]:
        """Open ``n`` half-open connections (``parallel`` handshakes at a time) and keep them."""
        self.port = port
        t0 = time.monotonic()
        sem = asyncio.Semaphore(parallel)
        base = self.opened

        async def one(i: int) -> bool:
            async with sem:
                return await self._open_one(base + i)

        ok = await asyncio.gather(*(one(i) for i in range(n)))
        return {
            "held": len(self.pool),
            "opened": sum(ok),
            "refused": self.refused,
            "elapsed_s": time.monotonic() - t0,
            "errors": dict(self.errors),
        }

    async def cmd_held(self) -> dict[str, Any]:
        """How many pool connections are still open, and how many the server has closed so far."""
        return {"held": len(self.pool), "closed_by_server": self.closed_by_server, "refused": self.refused}

    async def cmd_storm(
        self,
        port: int,
        duration: float,
        rate: float = 0.0,
        concurrency: int = 8,
        partial: bool = True,
        max_cycles: int = 0,
        keep: int = 0,
    ) -> dict[str, Any]:
        """Connect-and-close cycles for ``duration`` s (or ``max_cycles``), ``rate`` per second (0: as fast as it can).

        Meanwhile pool connections the server closes are re-opened, up to ``keep``, so a CONNECT
        deadline faces a constant ``keep`` half-open connections.
        """
        self.port = port
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        end = t0 + duration
        cycles = failed = started = reopened = 0
        held_min = len(self.pool)
        refused0 = self.refused
        errors0 = dict(self.errors)
        cpu0 = _cpu_self()

        async def worker() -> None:
            nonlocal cycles, failed, started
            while time.monotonic() < end and (not max_cycles or started < max_cycles):
                started += 1
                if rate:
                    await asyncio.sleep(max(0.0, t0 + started / rate - time.monotonic()))
                    if time.monotonic() >= end:  # its slot fell after the end: rate x duration at most
                        break
                conn = await self._connect(None)
                if conn is None or conn.transport is None:
                    failed += 1
                    continue
                if partial:
                    conn.transport.write(PARTIAL_CONNECT)
                conn.transport.close()
                cycles += 1

        async def keeper() -> None:
            # Every 50 ms at most keep/20 re-opened (keep per second): enough for a CONNECT deadline of a
            # second or more, and no unbounded reconnect loop against a service that refuses at once.
            nonlocal reopened, held_min
            batch = max(1, keep // 20)
            while time.monotonic() < end:
                held_min = min(held_min, len(self.pool))
                missing = keep - len(self.pool) - self.refused
                if missing > 0:
                    done = await asyncio.gather(*(self._open_one(self.opened + i) for i in range(min(missing, batch))))
                    reopened += sum(done)
                await asyncio.sleep(0.05)

        tasks = [loop.create_task(worker()) for _ in range(concurrency)]
        keep_task = loop.create_task(keeper()) if keep else None
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        if keep_task is not None:
            keep_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_task
        errors = {k: v - errors0.get(k, 0) for k, v in self.errors.items() if v != errors0.get(k, 0)}
        return {
            "cycles": cycles,
            "failed": failed,
            "elapsed_s": elapsed,
            "cycles_per_s": cycles / elapsed if elapsed > 0 else 0.0,
            "reopened": reopened,
            "held_min": held_min,
            "refused": self.refused - refused0,
            "held": len(self.pool),
            "errors": errors,
            "cpu_s": _cpu_self() - cpu0,
        }

    async def cmd_release(self) -> int:
        """Close every pool connection (FIN); returns how many were still open."""
        n = len(self.pool)
        for conn in list(self.pool):
            if conn.transport is not None:
                conn.transport.close()
        self.pool.clear()
        await asyncio.sleep(0)
        return n

    async def cmd_close(self) -> None:
        """Release the pool."""
        await self.cmd_release()


AGENTS: dict[str, Callable[..., Any]] = {
    "device": DeviceAgent,
    "requester": RequesterAgent,
    "caller": CallerAgent,
    "watcher": WatcherAgent,
    "attacker": AttackerAgent,
}


def run_agent(conn: Connection, kind: str, kwargs: dict[str, Any]) -> None:
    """Multiprocessing target (importable by name in a spawned child)."""
    agent_main(conn, AGENTS[kind], kwargs, fast_loop=kind in ("device", "requester", "attacker"))
