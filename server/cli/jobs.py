"""``fleetcmd jobs create|get|list|pause|resume|cancel|rerun-failed|watch`` over gRPC ``JobService``.

Human output by default, one line of JSON with ``--json`` (field names as in the proto, integers as
JSON integers). ``watch`` draws a live progress bar on a terminal (rich), and prints one line per
change otherwise (a log, a pipe); with ``--json``, one Job per line, the spec only in the first (as
WatchJob sends it; the spec never changes). It ends when the job is final.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from server.api import convert
from server.cli import client
from server.pb import commands_pb2 as pb
from server.pb import jobs_pb2 as jpb
from server.pb import jobs_pb2_grpc as jpb_grpc

EXIT_USAGE = 2
# ``watch``: one exit code per final state, so a script can tell them apart (1: the call failed, 2: bad usage).
EXIT_BY_STATE = {jpb.JOB_STATE_COMPLETED: 0, jpb.JOB_STATE_CANCELED: 6, jpb.JOB_STATE_ABORTED: 7}
FINAL_STATES = frozenset(EXIT_BY_STATE)
WATCH_EXIT_HELP = "the exit code says how the job ended: 0 COMPLETED, 6 CANCELED, 7 ABORTED"
# How long ``watch`` waits before it connects again after losing the server, doubling up to the cap.
WATCH_BACKOFF_FIRST = 0.2
WATCH_BACKOFF_CAP = 5.0

# JobCounts fields, in the order the bar and the tables show them: final outcomes first.
COUNT_FIELDS = ("succeeded", "failed", "rejected", "timed_out", "canceled", "skipped")
OPEN_FIELDS = ("pending", "retrying", "queued", "sent", "delivered", "in_progress")


class UsageError(Exception):
    """A flag or file the user gave cannot be used."""


def _state(value: int) -> str:
    return jpb.JobState.Name(value).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def _ts(ts: timestamp_pb2.Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.ToMilliseconds() / 1000, UTC).isoformat(timespec="milliseconds")


def _counts_text(counts: jpb.JobCounts) -> str:
    parts = [f"{name}={getattr(counts, name)}" for name in (*COUNT_FIELDS, *OPEN_FIELDS) if getattr(counts, name)]
    return " ".join(parts) or "-"


def finished(job: jpb.Job) -> int:
    """Targets whose outcome is known (final execution, or never started)."""
    return sum(getattr(job.counts, name) for name in COUNT_FIELDS)


def progress_line(job: jpb.Job) -> str:
    """One line of a job's progress (what ``watch`` prints when it draws no bar)."""
    return f"{job.job_id} {_state(job.state)} {finished(job)}/{job.targets_total} {_counts_text(job.counts)}"


def _print_job(job: jpb.Job) -> None:
    spec = job.spec
    print(f"job        {job.job_id}")
    print(f"state      {_state(job.state)}")
    print(f"action     {spec.action}")
    if spec.HasField("params"):
        print(f"params     {json.dumps(convert.to_python(spec.params), separators=(',', ':'))}")
    if spec.description:
        print(f"about      {spec.description}")
    print(f"targets    {job.targets_total} ({_targets_text(spec.targets)})")
    print(f"progress   {finished(job)}/{job.targets_total}  {_counts_text(job.counts)}")
    print(f"created    {_ts(job.created_at)}{'  by ' + job.created_by if job.created_by else ''}")
    print(f"started    {_ts(job.started_at)}")
    print(f"ended      {_ts(job.ended_at)}")
    if job.abort_reason:
        print(f"aborted    {job.abort_reason}")


def _targets_text(t: jpb.JobTargets) -> str:
    parts = []
    if t.thing_ids:
        parts.append(f"{len(t.thing_ids)} things")
    if t.thing_type:
        parts.append(f"type={t.thing_type}")
    parts += [f"{k}={v}" for k, v in sorted(t.attributes.items())]
    if t.online_only:
        parts.append("online only")
    if t.exclude:
        parts.append(f"{len(t.exclude)} excluded")
    if t.mode == jpb.TARGET_MODE_CONTINUOUS:
        parts.append("continuous")
    return ", ".join(parts)


def _show(args: argparse.Namespace, job: jpb.Job) -> None:
    if args.json:
        print(client.plain_json(job))
    else:
        _print_job(job)


# ---- create: flags into a JobSpec --------------------------------------------------------------


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, not {item!r}")
        out[key] = value
    return out


def _fields(value: str, flag: str, shape: str, count: tuple[int, int]) -> list[str]:
    parts = value.split(":")
    if not count[0] <= len(parts) <= count[1]:
        raise UsageError(f"{flag} takes {shape}, not {value!r}")
    return parts


def _enum(kind: Any, prefix: str, name: str, flag: str) -> Any:
    try:
        return kind.Value(prefix + name.upper().replace("-", "_"))
    except ValueError:
        names = ", ".join(v.name.removeprefix(prefix) for v in kind.DESCRIPTOR.values if not v.name.endswith("UNSPECIFIED"))
        raise UsageError(f"{flag}: {name!r} is not one of {names}") from None


def _number(text: str, flag: str, kind: Any = float) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a number") from None


def _time(text: str, flag: str) -> timestamp_pb2.Timestamp:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} takes an ISO 8601 time, not {text!r}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def job_spec(args: argparse.Namespace) -> jpb.JobSpec:
    """The JobSpec of ``jobs create``: ``--spec FILE`` (proto JSON) first, the flags on top of it.

    Raises:
        UsageError: a flag or the file cannot be read as a spec.
    """
    spec = jpb.JobSpec()
    if args.spec:
        try:
            json_format.Parse(Path(args.spec).read_text(), spec)
        except (OSError, json_format.ParseError) as exc:
            raise UsageError(f"--spec: {exc}") from None
    if args.action:
        spec.action = args.action
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--params is not JSON: {exc}") from None
        if not isinstance(params, dict):
            raise UsageError("--params must be a JSON object")
        spec.params.CopyFrom(json_format.ParseDict(params, struct_pb2.Struct()))
    if args.ttl is not None:
        spec.ttl_seconds = args.ttl
    t = spec.targets
    t.thing_ids.extend(args.thing)
    if args.type:
        t.thing_type = args.type
    t.attributes.update(_pairs(args.attr, "--attr"))
    t.exclude.extend(args.exclude)
    if args.online_only:
        t.online_only = True
    if args.continuous:
        t.mode = jpb.TARGET_MODE_CONTINUOUS
    r = spec.rollout
    if args.max_per_minute is not None:
        r.max_per_minute = args.max_per_minute
    if args.max_in_flight is not None:
        r.max_in_flight = args.max_in_flight
    if args.sequential:
        r.sequential_per_thing = True
    if args.ramp:
        base, factor, step = _fields(args.ramp, "--ramp", "BASE:FACTOR:notified=N or BASE:FACTOR:succeeded=N", (3, 3))
        kind, sep, every = step.partition("=")
        if not sep or kind not in ("notified", "succeeded"):
            raise UsageError(f"--ramp: the step is notified=N or succeeded=N, not {step!r}")
        r.ramp.base_per_minute = _number(base, "--ramp", int)
        r.ramp.factor = _number(factor, "--ramp")
        setattr(r.ramp, f"every_{kind}", _number(every, "--ramp", int))
    for value in args.abort:
        failure, pct, minimum = _fields(value, "--abort", "TYPE:PCT:MIN_FINISHED", (3, 3))
        spec.abort.add(
            failure=_enum(jpb.FailureType, "FAILURE_TYPE_", failure, "--abort"),
            threshold_pct=_number(pct, "--abort"),
            min_finished=_number(minimum, "--abort", int),
        )
    for value in args.retry:
        parts = _fields(value, "--retry", "TYPE:ATTEMPTS[:fixed|exponential[:BASE_S[:MAX_S[:jitter]]]]", (2, 6))
        policy = spec.retries.add(
            failure=_enum(jpb.FailureType, "FAILURE_TYPE_", parts[0], "--retry"),
            max_attempts=_number(parts[1], "--retry", int),
        )
        if len(parts) > 2:
            policy.backoff = _enum(jpb.Backoff, "BACKOFF_", parts[2], "--retry")
        if len(parts) > 3:
            policy.base_seconds = _number(parts[3], "--retry")
        if len(parts) > 4:
            policy.max_seconds = _number(parts[4], "--retry")
        if len(parts) > 5:
            if parts[5] != "jitter":
                raise UsageError(f"--retry: the last field is 'jitter', not {parts[5]!r}")
            policy.jitter = True
    if args.canary:
        count, pct = _fields(args.canary, "--canary", "COUNT:SUCCESS_PCT", (2, 2))
        spec.canary.count = _number(count, "--canary", int)
        spec.canary.success_pct = _number(pct, "--canary")
    if args.start_at:
        spec.schedule.start_at.CopyFrom(_time(args.start_at, "--start-at"))
    if args.end_at:
        spec.schedule.end_at.CopyFrom(_time(args.end_at, "--end-at"))
    if args.end_behavior:
        spec.schedule.end_behavior = _enum(jpb.EndBehavior, "END_BEHAVIOR_", args.end_behavior, "--end-behavior")
    if args.strict:
        spec.strict = True
    if args.description is not None:
        spec.description = args.description
    if args.key is not None:
        spec.idempotency_key = args.key
    if not spec.action:
        raise UsageError("give the action (or a --spec file with one)")
    return spec


# ---- the commands ----------------------------------------------------------------------------


@contextlib.contextmanager
def _stub(args: argparse.Namespace) -> Iterator[jpb_grpc.JobServiceStub]:
    with client.channel(args) as ch:
        yield jpb_grpc.JobServiceStub(ch)


def cmd_create(args: argparse.Namespace) -> int:
    """``fleetcmd jobs create``."""
    request = jpb.CreateJobRequest(spec=job_spec(args), dry_run=args.dry_run)
    with _stub(args) as stub:
        response = stub.CreateJob(request, timeout=args.timeout)
    if response.HasField("dry_run"):
        if args.json:
            print(client.plain_json(response.dry_run))
        else:
            print(f"targets    {response.dry_run.targets_total}")
            for thing in response.dry_run.sample:
                print(f"  {thing}")
        return 0
    _show(args, response.job)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    """``fleetcmd jobs get``."""
    with _stub(args) as stub:
        job = stub.GetJob(jpb.GetJobRequest(job_id=args.job_id), timeout=args.timeout)
    _show(args, job)
    return 0


_ROW = "{:<32}  {:<11} {:<20} {:>15}  {}"


def cmd_list(args: argparse.Namespace) -> int:
    """``fleetcmd jobs list``."""
    states = [_enum(jpb.JobState, "JOB_STATE_", s, "--state") for s in args.state]
    request = jpb.ListJobsRequest(states=states, page_size=args.limit, page_token=args.page_token or "")
    with _stub(args) as stub:
        response = stub.ListJobs(request, timeout=args.timeout)
    if args.json:
        print(client.plain_json(response))
        return 0
    if not response.jobs:
        print("(no jobs)")
    else:
        print(_ROW.format("JOB ID", "STATE", "ACTION", "DONE/TARGETS", "CREATED AT"))
        for job in response.jobs:
            done = f"{finished(job)}/{job.targets_total}"
            print(_ROW.format(job.job_id, _state(job.state), job.spec.action, done, _ts(job.created_at)))
    if response.next_page_token:
        print(f"(more: --page-token {response.next_page_token})")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    """``fleetcmd jobs pause|resume|cancel|rerun-failed``."""
    with _stub(args) as stub:
        if args.jobs_command == "pause":
            job = stub.PauseJob(jpb.PauseJobRequest(job_id=args.job_id), timeout=args.timeout)
        elif args.jobs_command == "resume":
            job = stub.ResumeJob(jpb.ResumeJobRequest(job_id=args.job_id), timeout=args.timeout)
        elif args.jobs_command == "cancel":
            request = jpb.CancelJobRequest(job_id=args.job_id, only_undelivered=args.only_undelivered)
            job = stub.CancelJob(request, timeout=args.timeout)
        else:
            statuses = [_enum(pb.ExecutionStatus, "", s, "--status") for s in args.status]
            job = stub.RerunFailed(jpb.RerunFailedRequest(job_id=args.job_id, statuses=statuses), timeout=args.timeout)
    _show(args, job)
    return 0


class _Bar:
    """The live progress bar of ``watch`` on a terminal: outcomes of the job's targets, and its state."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.fields[state]:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("job", total=None, state="", counts="")
        self._progress.start()

    def update(self, job: jpb.Job) -> None:
        self._progress.update(
            self._task,
            completed=finished(job),
            total=job.targets_total or None,
            state=_state(job.state),
            counts=_counts_text(job.counts),
        )

    def close(self) -> None:
        self._progress.stop()


def cmd_watch(args: argparse.Namespace) -> int:
    """``fleetcmd jobs watch``: follow a job until it is final; reconnects after losing the server."""
    bar = _Bar() if not args.json and sys.stdout.isatty() else None
    backoff = WATCH_BACKOFF_FIRST
    last: jpb.Job | None = None
    try:
        with _stub(args) as stub:
            while last is None or last.state not in FINAL_STATES:
                try:
                    for job in stub.WatchJob(jpb.WatchJobRequest(job_id=args.job_id)):
                        backoff = WATCH_BACKOFF_FIRST
                        if last is not None:  # (WatchJob's first message after a reconnect has the spec again)
                            job.ClearField("spec")
                        last = job
                        if bar is not None:
                            bar.update(job)
                        else:
                            print(client.plain_json(job) if args.json else progress_line(job), flush=True)
                    if last is not None and last.state in FINAL_STATES:
                        break
                    print(f"fleetcmd: stream ended, reconnecting in {backoff:.1f}s", file=sys.stderr, flush=True)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    print(f"fleetcmd: server unavailable, reconnecting in {backoff:.1f}s", file=sys.stderr, flush=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_CAP)
    except KeyboardInterrupt:
        return 0
    finally:
        if bar is not None:
            bar.close()
    assert last is not None
    if last.abort_reason and not args.json:
        print(f"aborted: {last.abort_reason}", file=sys.stderr)
    return EXIT_BY_STATE[last.state]


def run(args: argparse.Namespace) -> int:
    """Run a ``jobs`` subcommand; a flag that cannot be used is exit code 2."""
    try:
        code: int = args.jobs_func(args)
    except UsageError as exc:
        print(f"fleetcmd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


def register(sub: Any, client_flags: argparse.ArgumentParser) -> None:
    """Add ``fleetcmd jobs ...`` to the ``fleetcmd`` parser."""
    jobs = sub.add_parser("jobs", help="send one command to many things, paced and controllable").add_subparsers(
        dest="jobs_command", required=True
    )
    p = jobs.add_parser("create", parents=[client_flags], help="create a job (or count its targets with --dry-run)")
    p.add_argument("action", nargs="?", help="the command name (or the --spec file's)")
    p.add_argument("--spec", help="a JSON file with a JobSpec (proto JSON); the flags override it")
    p.add_argument("--params", help="JSON object")
    p.add_argument("--ttl", type=int, help="seconds per execution (0 = default)")
    p.add_argument("--thing", action="append", default=[], help="a target thing id, repeatable")
    p.add_argument("--type", help="targets of this thing type")
    p.add_argument("--attr", action="append", default=[], help="KEY=VALUE selector, repeatable (AND)")
    p.add_argument("--exclude", action="append", default=[], help="a thing id never targeted, repeatable")
    p.add_argument("--online-only", action="store_true", help="only things connected when their turn comes")
    p.add_argument("--continuous", action="store_true", help="things that match later get the job too")
    p.add_argument("--max-per-minute", type=int, help="executions started per minute (0 = unpaced)")
    p.add_argument("--max-in-flight", type=int, help="executions not final at once (0 = no limit)")
    p.add_argument("--sequential", action="store_true", help="one execution of such jobs in flight per thing")
    p.add_argument("--ramp", help="BASE:FACTOR:notified=N or BASE:FACTOR:succeeded=N")
    p.add_argument("--abort", action="append", default=[], help="TYPE:PCT:MIN_FINISHED, e.g. FAILED:10:20; repeatable")
    p.add_argument(
        "--retry", action="append", default=[], help="TYPE:ATTEMPTS[:fixed|exponential[:BASE_S[:MAX_S[:jitter]]]]; repeatable"
    )
    p.add_argument("--canary", help="COUNT:SUCCESS_PCT")
    p.add_argument("--start-at", help="ISO 8601 time (UTC unless an offset is given)")
    p.add_argument("--end-at", help="ISO 8601 time")
    p.add_argument("--end-behavior", choices=["stop-new", "cancel-not-final"])
    p.add_argument("--strict", action="store_true", help="refuse the job if a target's type refuses the action or params")
    p.add_argument("--description")
    p.add_argument("--key", help="idempotency key")
    p.add_argument("--dry-run", action="store_true", help="only count the targets and show a sample")
    p.set_defaults(jobs_func=cmd_create)
    p = jobs.add_parser("get", parents=[client_flags], help="show a job and its counts")
    p.add_argument("job_id")
    p.set_defaults(jobs_func=cmd_get)
    p = jobs.add_parser("list", parents=[client_flags], help="list jobs, newest first")
    p.add_argument("--state", action="append", default=[], help="repeatable, e.g. --state in_progress")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--page-token")
    p.set_defaults(jobs_func=cmd_list)
    for name, help_text in (("pause", "start nothing new until resumed"), ("resume", "continue a paused job")):
        p = jobs.add_parser(name, parents=[client_flags], help=help_text)
        p.add_argument("job_id")
        p.set_defaults(jobs_func=cmd_control)
    p = jobs.add_parser("cancel", parents=[client_flags], help="end a job; its not-final executions are canceled")
    p.add_argument("job_id")
    p.add_argument("--only-undelivered", action="store_true", help="cancel only executions not delivered yet")
    p.set_defaults(jobs_func=cmd_control)
    p = jobs.add_parser("rerun-failed", parents=[client_flags], help="a new job over the targets that failed")
    p.add_argument("job_id")
    p.add_argument(
        "--status", action="append", default=[], help="a final status, repeatable (default: FAILED, REJECTED, TIMED_OUT)"
    )
    p.set_defaults(jobs_func=cmd_control)
    p = jobs.add_parser("watch", parents=[client_flags], help="follow a job live until it ends", epilog=WATCH_EXIT_HELP)
    p.add_argument("job_id")
    p.set_defaults(jobs_func=cmd_watch)
    for parser in jobs.choices.values():
        parser.set_defaults(func=run)
