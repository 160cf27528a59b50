"""The worst job spec every bound admits goes in through each surface and reads back unchanged everywhere.

The job spec is an operator's input like a Send's params, only larger: 10,000 thing ids and 10,000
exclusions of the longest thing id, the deepest and widest params, every list at its bound, the
longest description and idempotency key in the widest Unicode, times at the end of the Timestamp
range. Created through gRPC, REST and the ``fleetcmd jobs create --spec`` CLI, each one is read
back through gRPC (GetJob, ListJobs, WatchJob), REST (one job, the list) and the CLI, after a
restart too; the running one delivers its params to a real device unchanged. Nothing accepted may
later break a read, a stream or a commit.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from broker_hooks.topics import MAX_LEVEL_LENGTH
from server.api import convert
from server.app import FleetcmdApp
from server.core import jobs
from server.core.registry import MAX_ATTRIBUTE_KEY, MAX_ATTRIBUTE_VALUE
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import jobs_pb2 as jpb
from server.pb import jobs_pb2_grpc as jpb_grpc
from tests.clients import admin_key, app_channel
from tests.conftest import make_settings
from tests.devices import EmqxDevice
from tests.proc import run_cli
from tests.test_edge_bounds import WORST

JOBS = "/api/v1/jobs"
# The last millisecond a protobuf Timestamp (and RFC 3339) can carry: 9999-12-31T23:59:59.999Z.
LAST_MS = 253_402_300_799_999
WIDE = 'é€😀\x00"\\/\n\u2028'  # a non-BMP character, NUL, quotes, a backslash, line breaks


def wide(n: int) -> str:
    """``n`` characters (code points, as the bounds count) of the widest kinds."""
    return (WIDE * (n // len(WIDE) + 1))[:n]


def long_ids(prefix: str, n: int) -> list[str]:
    """``n`` distinct thing ids of the longest length a thing id may have."""
    return [f"{prefix}{i:06d}".ljust(MAX_LEVEL_LENGTH, "x") for i in range(n)]


def worst_spec(device: str, run_id: str) -> jpb.JobSpec:
    """A job that runs now: the device is one of 10,000 target ids (the rest are not registered)."""
    spec = jpb.JobSpec(
        action="a",
        ttl_seconds=60,
        targets=jpb.JobTargets(
            thing_ids=[device, *long_ids(f"t{run_id}", jobs.MAX_TARGET_IDS - 1)],
            exclude=long_ids(f"e{run_id}", jobs.MAX_TARGET_IDS),
        ),
        abort=[jpb.AbortCriterion(failure=jpb.FAILURE_TYPE_TIMED_OUT, threshold_pct=100.0, min_finished=2**32 - 1)]
        * jobs.MAX_ABORT_CRITERIA,
        description=wide(jobs.MAX_DESCRIPTION),
        idempotency_key=wide(jobs.MAX_IDEMPOTENCY_KEY - len(run_id)) + run_id,
    )
    spec.params.update(WORST)
    return spec


def worst_scheduled_spec(run_id: str) -> jpb.JobSpec:
    """A job that waits for the last representable millisecond, with every other list and number at its bound."""
    spec = jpb.JobSpec(
        action="a" * MAX_LEVEL_LENGTH,
        ttl_seconds=86_400,
        targets=jpb.JobTargets(
            thing_type="T" * 128,
            attributes={
                f"{i:02d}".ljust(MAX_ATTRIBUTE_KEY, "k"): wide(MAX_ATTRIBUTE_VALUE) for i in range(jobs.MAX_SELECTOR_ATTRIBUTES)
            },
            online_only=True,
            mode=jpb.TARGET_MODE_CONTINUOUS,
        ),
        rollout=jpb.JobRollout(
            max_per_minute=jobs.MAX_PER_MINUTE,
            max_in_flight=jobs.MAX_IN_FLIGHT,
            sequential_per_thing=True,
            ramp=jpb.JobRamp(base_per_minute=jobs.MAX_PER_MINUTE, factor=jobs.MAX_RAMP_FACTOR, every_succeeded=2**32 - 1),
        ),
        abort=[jpb.AbortCriterion(failure=jpb.FAILURE_TYPE_ANY, threshold_pct=5e-324, min_finished=1)] * jobs.MAX_ABORT_CRITERIA,
        canary=jpb.Canary(count=2**32 - 1, success_pct=100.0),
        retries=[
            jpb.RetryPolicy(
                failure=failure,
                max_attempts=jobs.MAX_RETRY_ATTEMPTS,
                backoff=jpb.BACKOFF_EXPONENTIAL,
                base_seconds=jobs.MAX_BACKOFF_SECONDS,
                max_seconds=jobs.MAX_BACKOFF_SECONDS,
                jitter=True,
            )
            for failure in (jpb.FAILURE_TYPE_FAILED, jpb.FAILURE_TYPE_REJECTED, jpb.FAILURE_TYPE_TIMED_OUT)
        ],
        strict=False,
        description=wide(jobs.MAX_DESCRIPTION),
        idempotency_key=run_id + wide(jobs.MAX_IDEMPOTENCY_KEY - len(run_id)),
    )
    spec.schedule.start_at.FromMilliseconds(LAST_MS - 1)
    spec.schedule.end_at.FromMilliseconds(LAST_MS)
    spec.schedule.end_behavior = jpb.END_BEHAVIOR_CANCEL_NOT_FINAL
    spec.params.update(WORST)
    return spec


@pytest.fixture
async def job_stub(app: FleetcmdApp) -> AsyncIterator[jpb_grpc.JobServiceStub]:
    async with app_channel(app) as channel:
        yield jpb_grpc.JobServiceStub(channel)


def http_session(app: FleetcmdApp) -> aiohttp.ClientSession:
    assert app.ports is not None and app.ports.http
    return aiohttp.ClientSession(
        f"http://127.0.0.1:{app.ports.http}",
        headers={"Authorization": f"Bearer {admin_key(app.settings.data_dir)}"},
        timeout=aiohttp.ClientTimeout(total=60),
    )


def cli(app: FleetcmdApp, *args: str) -> Any:
    assert app.ports is not None
    done = run_cli(*args, "--json", target=f"127.0.0.1:{app.ports.grpc}", api_key=admin_key(app.settings.data_dir), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


async def every_read(app: FleetcmdApp, job_id: str) -> dict[str, jpb.JobSpec]:
    """The job's spec as each reader shows it, parsed back into a JobSpec."""
    out: dict[str, jpb.JobSpec] = {}
    async with app_channel(app) as channel:
        stub = jpb_grpc.JobServiceStub(channel)
        out["grpc get"] = (await stub.GetJob(jpb.GetJobRequest(job_id=job_id))).spec
        listed = await stub.ListJobs(jpb.ListJobsRequest(page_size=100))
        out["grpc list"] = next(j for j in listed.jobs if j.job_id == job_id).spec
        watch = stub.WatchJob(jpb.WatchJobRequest(job_id=job_id))
        out["grpc watch"] = (await watch.read()).spec  # type: ignore[union-attr]
        watch.cancel()
        # The job's events on the event log: its first one (the creation) carries the spec too (only it).
        stream = pb_grpc.CommandServiceStub(channel).Stream(pb.StreamRequest(after_sequence=0, job_id=job_id), timeout=30)
        async for event in stream:
            if event.HasField("job"):
                out["grpc stream"] = event.job.spec
                break
        stream.cancel()
    async with http_session(app) as http:
        async with http.get("/api/v1/events", params={"jobId": job_id, "after": "0"}) as resp:
            assert resp.status == 200, await resp.text()
            # Read in chunks: a job event of the largest spec is one 2.6 MB data line (beyond aiohttp's line limit).
            text = ""
            async for chunk in resp.content.iter_chunked(1 << 16):
                text += chunk.decode()
                if "event: job" in text and "\n\n" in text[text.index("event: job") :]:
                    break
        block = text[text.index("event: job") :].split("\n\n", 1)[0]
        data = next(line[len("data: ") :] for line in block.splitlines() if line.startswith("data: "))
        out["rest events"] = rest_spec_to_proto(json.loads(data)["job"]["spec"])
        async with http.get(f"{JOBS}/{job_id}") as resp:
            assert resp.status == 200, await resp.text()
            one = await resp.json()
        async with http.get(JOBS, params={"pageSize": "100"}) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
    out["rest get"] = rest_spec_to_proto(one["spec"])
    out["rest list"] = rest_spec_to_proto(next(j for j in page["jobs"] if j["jobId"] == job_id)["spec"])
    got = await asyncio.to_thread(cli, app, "jobs", "get", job_id)
    out["cli get"] = json_format.ParseDict(got["spec"], jpb.JobSpec())
    return out


# A job event after the first shows no spec: it stays this small whatever the spec (the first is megabytes).
LATER_JOB_EVENT_MAX_BYTES = 4096


async def later_job_events(app: FleetcmdApp, job_id: str) -> None:
    """The job's events after its first, up to its device's success: small, no spec, on gRPC Stream and SSE.

    SSE is read line by line with aiohttp's default limits (only the first event's line is beyond them).
    """
    async with app_channel(app) as channel:
        stream = pb_grpc.CommandServiceStub(channel).Stream(pb.StreamRequest(after_sequence=0, job_id=job_id), timeout=30)
        grpc_events = [event async for event in _until_succeeded(stream)]
        stream.cancel()
    first, *later = grpc_events
    assert first.job.HasField("spec") and later
    for event in later:
        assert not event.job.HasField("spec") and event.ByteSize() < LATER_JOB_EVENT_MAX_BYTES, event.ByteSize()
    async with http_session(app) as http:
        headers = {"Last-Event-ID": str(first.sequence)}
        async with http.get("/api/v1/events", params={"jobId": job_id}, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            kind, sse_jobs = "", []
            async for raw in resp.content:  # (readline: ValueError on a line beyond the limit)
                line = raw.decode()
                if line.startswith("event: "):
                    kind = line[len("event: ") :].strip()
                elif line.startswith("data: ") and kind == "job":
                    assert len(raw) < LATER_JOB_EVENT_MAX_BYTES, len(raw)
                    sse_jobs.append(json.loads(line[len("data: ") :])["job"])
                    if sse_jobs[-1]["counts"]["SUCCEEDED"] == 1:
                        break
    assert len(sse_jobs) == len(later) and not any("spec" in j for j in sse_jobs)


async def _until_succeeded(stream: Any) -> AsyncIterator[pb.ExecutionEvent]:
    """A Stream's job events up to the first that counts the device's execution SUCCEEDED."""
    async for event in stream:
        if event.HasField("job"):
            yield event
            if event.job.counts.succeeded == 1:
                return
    raise AssertionError("the stream ended")


def rest_spec_to_proto(spec: dict[str, Any]) -> jpb.JobSpec:
    """The REST JSON of a spec, compared by the fields that carry the worst values."""
    out = jpb.JobSpec(
        action=spec["action"],
        description=spec["description"],
        idempotency_key=spec["idempotencyKey"],
        targets=jpb.JobTargets(
            thing_ids=spec["targets"]["thingIds"],
            exclude=spec["targets"]["exclude"],
            attributes=spec["targets"]["attributes"],
            thing_type=spec["targets"]["thingType"] or "",
        ),
    )
    if spec["params"] is not None:
        out.params.update(spec["params"])
    return out


def contained(expected: Message, got: Message, path: str = "spec") -> None:
    """Every field ``expected`` sets has the same value in ``got`` (which may add what the service filled in)."""
    for field, value in expected.ListFields():
        where = f"{path}.{field.name}"
        if isinstance(value, Message):
            contained(value, getattr(got, field.name), where)
        else:
            assert getattr(got, field.name) == value, where


def same(expected: jpb.JobSpec, got: jpb.JobSpec, *, rest: bool) -> None:
    if rest:  # REST's own JSON: the fields that hold the worst values
        assert got.action == expected.action and got.description == expected.description
        assert got.idempotency_key == expected.idempotency_key
        assert list(got.targets.thing_ids) == list(expected.targets.thing_ids)
        assert list(got.targets.exclude) == list(expected.targets.exclude)
        assert dict(got.targets.attributes) == dict(expected.targets.attributes)
    else:
        contained(expected, got)
    assert convert.to_python(got.params) == WORST


async def test_the_worst_specs_read_back_everywhere_and_after_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    run_id = uuid.uuid4().hex[:8]
    device_id = f"w{run_id}".ljust(MAX_LEVEL_LENGTH, "d")
    running, scheduled = worst_spec(device_id, run_id), worst_scheduled_spec(run_id)
    async with FleetcmdApp(settings) as app:
        assert app.registry is not None
        await app.registry.create_thing(device_id, "", {})
        async with app_channel(app) as channel:
            stub = jpb_grpc.JobServiceStub(channel)
            created = (await stub.CreateJob(jpb.CreateJobRequest(spec=scheduled))).job
            assert created.state == jpb.JOB_STATE_SCHEDULED
            same(scheduled, created.spec, rest=False)
            assert app.ports is not None and app.ports.mqtt is not None
            async with EmqxDevice("127.0.0.1", app.ports.mqtt, device_id) as dev:
                job = (await stub.CreateJob(jpb.CreateJobRequest(spec=running))).job
                execution_id, request = await dev.wait_request()
                assert request["params"] == WORST  # the device gets the same value
                await dev.arespond(execution_id, "SUCCEEDED", WORST)
                await _succeeded(app, job.job_id)
        # The same scheduled spec, as REST and the CLI take it (another idempotency key each).
        as_rest = json_format.MessageToDict(scheduled)
        async with http_session(app) as http:
            # The largest spec is larger than a REST body may be: refused whole, saying so.
            largest = json.dumps({"action": "a", "targets": {"thingIds": list(running.targets.thing_ids)}})
            assert len(largest) > 1024 * 1024
            async with http.post(JOBS, data=largest.encode(), headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 413, (await resp.text())[:2000]
                assert "1048576" in (await resp.text()) or "1 MiB" in (await resp.text())
            body = _rest_body(scheduled, f"r{run_id}")
            async with http.post(
                JOBS, data=json.dumps(body, ensure_ascii=False).encode(), headers={"Content-Type": "application/json"}
            ) as resp:
                assert resp.status == 201, (await resp.text())[:2000]
                via_rest = (await resp.json())["jobId"]
        spec_file = tmp_path / "spec.json"
        as_rest["idempotencyKey"] = f"c{run_id}" + scheduled.idempotency_key[len(run_id) + 1 :]
        spec_file.write_text(json.dumps(as_rest, ensure_ascii=False), encoding="utf-8")
        via_cli = (await asyncio.to_thread(cli, app, "jobs", "create", "--spec", str(spec_file)))["job_id"]
        ids = {job.job_id: running, created.job_id: scheduled}
        before = {job_id: await every_read(app, job_id) for job_id in (*ids, via_rest, via_cli)}
        await later_job_events(app, job.job_id)
    for job_id, reads in before.items():
        expected = ids.get(job_id, scheduled)
        for surface, spec in reads.items():
            if job_id in (via_rest, via_cli):
                spec.idempotency_key = expected.idempotency_key  # each was created with its own
            same(expected, spec, rest=surface.startswith("rest"))
    async with FleetcmdApp(settings) as app:  # a restart reads every row back
        for job_id, expected in ids.items():
            for surface, spec in (await every_read(app, job_id)).items():
                same(expected, spec, rest=surface.startswith("rest"))
        await later_job_events(app, job.job_id)


def _rest_body(spec: jpb.JobSpec, key_prefix: str) -> dict[str, Any]:
    """The spec as the REST API spells it."""
    t, r = spec.targets, spec.rollout
    return {
        "action": spec.action,
        "params": convert.to_python(spec.params),
        "ttl": spec.ttl_seconds,
        "targets": {
            "thingType": t.thing_type,
            "attributes": dict(t.attributes),
            "onlineOnly": t.online_only,
            "mode": "CONTINUOUS",
        },
        "rollout": {
            "maxPerMinute": r.max_per_minute,
            "maxInFlight": r.max_in_flight,
            "sequentialPerThing": r.sequential_per_thing,
            "ramp": {"basePerMinute": r.ramp.base_per_minute, "factor": r.ramp.factor, "everySucceeded": r.ramp.every_succeeded},
        },
        "abort": [{"failure": "ANY", "thresholdPct": c.threshold_pct, "minFinished": c.min_finished} for c in spec.abort],
        "canary": {"count": spec.canary.count, "successPct": spec.canary.success_pct},
        "retries": [
            {
                "failure": name,
                "maxAttempts": p.max_attempts,
                "backoff": "EXPONENTIAL",
                "baseSeconds": p.base_seconds,
                "maxSeconds": p.max_seconds,
                "jitter": p.jitter,
            }
            for name, p in zip(("FAILED", "REJECTED", "TIMED_OUT"), spec.retries, strict=True)
        ],
        "schedule": {
            "startAt": "9999-12-31T23:59:59.998Z",
            "endAt": "9999-12-31T23:59:59.999Z",
            "endBehavior": "CANCEL_NOT_FINAL",
        },
        "description": spec.description,
        "idempotencyKey": key_prefix + spec.idempotency_key[len(key_prefix) :],
    }


async def _succeeded(app: FleetcmdApp, job_id: str) -> None:
    """Wait until the device's execution of the job counts as SUCCEEDED (the other targets have no device)."""
    async with app_channel(app) as channel:
        async for job in jpb_grpc.JobServiceStub(channel).WatchJob(jpb.WatchJobRequest(job_id=job_id), timeout=60):
            if job.counts.succeeded == 1:
                return
    raise AssertionError(f"job {job_id} ended otherwise")
