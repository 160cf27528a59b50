"""``fleetcmd``: run the service (``serve``) or talk to one (``send``, ``get``, ``list``, ``watch``, ``cancel``, ``rerun``).

Signals are handled here and nowhere else: SIGTERM/SIGINT stop the service
gracefully within ``shutdown_timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import logging.config
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from server.api import convert
from server.cli import admin, broker_config, client, jobs
from server.config import ENV_PREFIX, Settings, SettingsError
from server.core.errors import ListenError
from server.core.validation import MAX_WAIT_SECONDS
from server.logformat import logging_config
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc

log = logging.getLogger("fleetcmd")

EXIT_USAGE = 2

# ``send --wait`` / ``rerun --wait``: one exit code per final status, so a script can tell them apart
# (1 stays "the call failed", 2 "bad usage").
EXIT_BY_STATUS = {
    pb.SUCCEEDED: 0,
    pb.FAILED: 3,
    pb.REJECTED: 4,
    pb.TIMED_OUT: 5,
    pb.CANCELED: 6,
}
WAIT_EXIT_HELP = "with --wait, the exit code says how it ended: 0 SUCCEEDED, 3 FAILED, 4 REJECTED, 5 TIMED_OUT, 6 CANCELED"


def configure_logging(level: str, fmt: str = "text") -> None:
    """One line per event (text, or one JSON object with ``fmt="json"``); amqtt and transitions are quiet unless asked for."""
    logging.config.dictConfig(logging_config(level, fmt))


# ---- serve ---------------------------------------------------------------------------------


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind: Callable[[str], Any] = str
        if isinstance(f.default, bool):
            kind = lambda v: v.lower() in ("1", "true", "yes", "on")  # noqa: E731
        elif isinstance(f.default, int):
            kind = int
        elif isinstance(f.default, float):
            kind = float
        elif isinstance(f.default, Path):
            kind = Path
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=None,
            help=f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{f.name.upper()}, default {f.default})",
        )


# The youngest generation is collected every 10,000 container allocations instead of 700.
# Measured at 1,000 devices and ~800 commands/s (bench notes in BENCHMARKS.md): the collector
# took ~8 % of the main thread, with 70 ms full collections that showed up in p99; with the
# objects of the started service frozen and this threshold, ~2 % and no full collection.
GC_THRESHOLD = (10_000, 10, 10)


def tune_gc() -> None:
    """Freeze what the started service holds for good, and collect the young generation less often.

    Called once the service is up: the modules, the broker, gRPC and the store live as
    long as the process, so the collector need not walk them again and again. Cycles
    created later are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT or a fatal background error.

    Returns:
        The process exit code.
    """
    from server.app import FleetcmdApp  # the client commands do not need the broker stack

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    async with FleetcmdApp(settings) as app:
        tune_gc()
        stopped = asyncio.create_task(stop.wait(), name="signal-wait")
        failed = asyncio.create_task(app.wait_failed(), name="failure-wait")
        done, pending = await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if failed in done:
            log.error("a background task failed; shutting down")
            code = 1
        log.info("stopping")
    log.info("stopped")
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    """``fleetcmd serve``."""
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings)}
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"fleetcmd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    try:
        return run_loop(serve(settings), settings.event_loop)
    except ListenError as exc:
        print(f"fleetcmd: {exc}", file=sys.stderr)
        return EXIT_USAGE


def run_loop(main: Coroutine[Any, Any, int], event_loop: str) -> int:
    """Run ``main`` on uvloop when asked for or available ("auto"), else on asyncio's loop."""
    factory = None
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


# ---- client commands ---------------------------------------------------------------------


def _status_name(value: int) -> str:
    return pb.ExecutionStatus.Name(value)  # type: ignore[arg-type]


def _ts(ts: timestamp_pb2.Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.ToMilliseconds() / 1000, UTC).isoformat(timespec="milliseconds")


_to_json = client.plain_json


def _value_text(holder: Any, field: str) -> str:
    if not holder.HasField(field):
        return ""
    return json.dumps(convert.to_python(getattr(holder, field)), separators=(",", ":"))


def _print_execution(e: pb.Execution) -> None:
    print(f"execution  {e.execution_id}")
    print(f"thing      {e.thing_id}")
    print(f"action     {e.action}")
    print(f"status     {_status_name(e.status)}")
    if e.HasField("params"):
        print(f"params     {_value_text(e, 'params')}")
    if e.HasField("result"):
        print(f"result     {_value_text(e, 'result')}")
    if e.HasField("status_reason"):
        print(f"reason     {e.status_reason.reason_code}: {e.status_reason.reason_description}")
    print(f"ttl        {e.ttl_seconds}s")
    print(f"created    {_ts(e.created_at)}")
    print(f"expires    {_ts(e.expires_at)}")
    print(f"completed  {_ts(e.completed_at)}")
    if e.rerun_of:
        print(f"rerun of   {e.rerun_of}")
    for rerun in e.reruns:
        print(f"rerun      {rerun}")
    for change in e.history:
        late = " (late)" if change.late else ""
        print(f"  #{change.sequence:<6} {_ts(change.at)}  {_status_name(change.status)}{late}  {change.note}")


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[pb_grpc.CommandServiceStub]:
    with client.channel(args) as ch:
        yield pb_grpc.CommandServiceStub(ch)


def cmd_send(args: argparse.Namespace) -> int:
    """``fleetcmd send``."""
    req = pb.SendRequest(thing_id=args.thing, action=args.action, ttl_seconds=args.ttl, idempotency_key=args.key or "")
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as exc:
            print(f"fleetcmd: --params is not JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if not isinstance(params, dict):
            print("fleetcmd: --params must be a JSON object", file=sys.stderr)
            return EXIT_USAGE
        req.params.CopyFrom(json_format.ParseDict(params, struct_pb2.Struct()))
    if args.wait:
        req.wait_seconds = MAX_WAIT_SECONDS  # the server answers as soon as the execution is final
    with _client(args) as stub:
        execution = stub.Send(req, timeout=args.timeout + req.wait_seconds)
        if args.wait:
            execution = _wait_final(stub, execution, args.timeout + execution.ttl_seconds)
    _show(args, execution)
    return EXIT_BY_STATUS.get(execution.status, 0) if args.wait else 0


def _show(args: argparse.Namespace, execution: pb.Execution) -> None:
    if args.json:
        print(_to_json(execution))
    else:
        _print_execution(execution)


def cmd_rerun(args: argparse.Namespace) -> int:
    """``fleetcmd rerun``: a new execution with the same thing, action, params and TTL."""
    req = pb.RerunRequest(execution_id=args.execution_id, wait_seconds=MAX_WAIT_SECONDS if args.wait else 0)
    with _client(args) as stub:
        execution = stub.Rerun(req, timeout=args.timeout + req.wait_seconds)
        if args.wait:
            execution = _wait_final(stub, execution, args.timeout + execution.ttl_seconds)
    _show(args, execution)
    return EXIT_BY_STATUS.get(execution.status, 0) if args.wait else 0


def _wait_final(stub: pb_grpc.CommandServiceStub, execution: pb.Execution, timeout: float) -> pb.Execution:
    """Follow an execution the server-side wait left unfinished (TTL above that wait) until it is final.

    Returns:
        The execution read again, with its history.
    """
    final = {pb.SUCCEEDED, pb.FAILED, pb.REJECTED, pb.TIMED_OUT, pb.CANCELED}
    if execution.status in final:
        return stub.Get(pb.GetRequest(execution_id=execution.execution_id), timeout=timeout)
    events = stub.Stream(pb.StreamRequest(execution_id=execution.execution_id, after_sequence=0), timeout=timeout)
    try:
        for event in events:
            if event.status in final and not event.late:
                break
    finally:
        events.cancel()  # type: ignore[no-untyped-call]
    return stub.Get(pb.GetRequest(execution_id=execution.execution_id), timeout=timeout)


def cmd_get(args: argparse.Namespace) -> int:
    """``fleetcmd get``."""
    with _client(args) as stub:
        execution = stub.Get(pb.GetRequest(execution_id=args.execution_id), timeout=args.timeout)
    if args.json:
        print(_to_json(execution))
    else:
        _print_execution(execution)
    return 0


def _statuses(values: Sequence[str]) -> list[pb.ExecutionStatus.ValueType]:
    out = []
    for v in values:
        try:
            out.append(pb.ExecutionStatus.Value(v.upper()))
        except ValueError as exc:  # protobuf raises ValueError (not KeyError) for an unknown enum name
            raise KeyError(v) from exc
    return out


def cmd_list(args: argparse.Namespace) -> int:
    """``fleetcmd list``."""
    req = pb.ListRequest(thing_id=args.thing or "", action=args.action or "", status=_statuses(args.status), page_size=args.limit)
    with _client(args) as stub:
        resp = stub.List(req, timeout=args.timeout)
    if args.json:
        print(_to_json(resp))
        return 0
    print(f"{'EXECUTION ID':<32}  {'THING':<20} {'ACTION':<20} {'STATUS':<12} CREATED AT")
    for e in resp.executions:
        print(f"{e.execution_id:<32}  {e.thing_id:<20} {e.action:<20} {_status_name(e.status):<12} {_ts(e.created_at)}")
    if resp.next_page_token:
        print(f"(more: --page-token {resp.next_page_token})")
    return 0


# How long ``watch`` waits before it connects again after losing the server, doubling up to the cap.
WATCH_BACKOFF_FIRST = 0.2
WATCH_BACKOFF_CAP = 5.0


def _transition(event: pb.ExecutionEvent) -> str:
    # A new execution has no previous status: "new", not the enum's UNSPECIFIED.
    before = "new" if event.previous_status == pb.EXECUTION_STATUS_UNSPECIFIED else _status_name(event.previous_status)
    return f"{before} -> {_status_name(event.status)}"


def cmd_watch(args: argparse.Namespace) -> int:
    """``fleetcmd watch``: follow events until interrupted; reconnects and resumes after the last one seen."""
    req = pb.StreamRequest(thing_id=args.thing or "", execution_id=args.execution or "", action=args.action or "")
    if args.after is not None:
        req.after_sequence = args.after
    backoff = WATCH_BACKOFF_FIRST
    with _client(args) as stub:
        try:
            while True:
                try:
                    for event in stub.Stream(req):
                        backoff = WATCH_BACKOFF_FIRST
                        # Resume after this one on reconnect: the server replays from there, no gap, no duplicate.
                        req.after_sequence = event.sequence
                        if args.json:
                            print(_to_json(event), flush=True)
                            continue
                        late = " (late)" if event.late else ""
                        result = f" result={_value_text(event, 'result')}" if event.HasField("result") else ""
                        print(
                            f"#{event.sequence} {_ts(event.at)} {event.execution_id} {event.thing_id} {event.action} "
                            f"{_transition(event)}{late}{result}",
                            flush=True,
                        )
                    # The server ended the stream (it is stopping): connect again like after an error.
                    print(f"fleetcmd: stream ended, reconnecting in {backoff:.1f}s", file=sys.stderr, flush=True)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    print(f"fleetcmd: server unavailable, reconnecting in {backoff:.1f}s", file=sys.stderr, flush=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_CAP)
        except KeyboardInterrupt:
            return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """``fleetcmd cancel``."""
    with _client(args) as stub:
        execution = stub.Cancel(pb.CancelRequest(execution_id=args.execution_id), timeout=args.timeout)
    if args.json:
        print(_to_json(execution))
    else:
        _print_execution(execution)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fleetcmd", description="Command and control for IoT fleets.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="run the service (broker, gRPC, store)")
    _add_serve_flags(serve_p)
    serve_p.set_defaults(func=cmd_serve)

    client_flags = argparse.ArgumentParser(add_help=False)
    client.add_client_flags(client_flags)

    send_p = sub.add_parser("send", parents=[client_flags], help="send a command to a thing", epilog=WAIT_EXIT_HELP)
    send_p.add_argument("thing", help="the thing id")
    send_p.add_argument("action", help="the command name, e.g. setTemperature")
    send_p.add_argument("--params", help="JSON object")
    send_p.add_argument("--ttl", type=int, default=0, help="seconds (0 = server default)")
    send_p.add_argument("--key", help="idempotency key")
    send_p.add_argument("--wait", action="store_true", help="wait until the execution is final")
    send_p.set_defaults(func=cmd_send)

    get_p = sub.add_parser("get", parents=[client_flags], help="show one execution with its history")
    get_p.add_argument("execution_id")
    get_p.set_defaults(func=cmd_get)

    list_p = sub.add_parser("list", parents=[client_flags], help="list executions, newest first")
    list_p.add_argument("--thing")
    list_p.add_argument("--action")
    list_p.add_argument("--status", action="append", default=[], help="repeatable, e.g. --status SUCCEEDED")
    list_p.add_argument("--limit", type=int, default=50)
    list_p.set_defaults(func=cmd_list)

    watch_p = sub.add_parser("watch", parents=[client_flags], help="follow state changes live")
    watch_p.add_argument("--thing")
    watch_p.add_argument("--execution")
    watch_p.add_argument("--action")
    watch_p.add_argument("--after", type=int, help="replay events after this sequence first")
    watch_p.set_defaults(func=cmd_watch)

    cancel_p = sub.add_parser("cancel", parents=[client_flags], help="cancel a non-final execution")
    cancel_p.add_argument("execution_id")
    cancel_p.set_defaults(func=cmd_cancel)

    rerun_p = sub.add_parser(
        "rerun", parents=[client_flags], help="send an execution's command again, linked to it", epilog=WAIT_EXIT_HELP
    )
    rerun_p.add_argument("execution_id")
    rerun_p.add_argument("--wait", action="store_true", help="wait until the new execution is final")
    rerun_p.set_defaults(func=cmd_rerun)

    admin.register(sub, client_flags)
    broker_config.register(sub)
    jobs.register(sub, client_flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleetcmd`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except grpc.RpcError as exc:
        print(f"fleetcmd: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except client.MissingApiKey as exc:
        print(f"fleetcmd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyError as exc:  # an unknown --status name
        print(f"fleetcmd: unknown value {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code
