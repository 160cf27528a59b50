"""The jobs surfaces (issue 16, section 4): gRPC ``JobService`` and REST ``/api/v1/jobs`` on the real engine.

Real calls on 127.0.0.1 (port 0) to an in-process service: validation at the edge (every bad field
named, as each surface names it), roles, the dry run, create/get/list/pause/resume/cancel/rerun-failed,
WatchJob, and the executions List filter by job.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker_hooks.topics import MAX_LEVEL_LENGTH
from server.api import convert_jobs, http_jobs
from server.app import FleetcmdApp
from server.core import job_runner, jobs
from server.core.apikeys import Role
from server.core.registry import MAX_ATTRIBUTE_KEY, MAX_ATTRIBUTE_VALUE
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import jobs_pb2 as jpb
from server.pb import jobs_pb2_grpc as jpb_grpc
from tests.clients import admin_key, app_channel

JOBS = "/api/v1/jobs"
HOUR_MS = 3_600_000


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def things(app: FleetcmdApp, n: int, **attributes: str) -> list[str]:
    """Register ``n`` things (offline: their executions stay QUEUED)."""
    assert app.registry is not None
    ids = [unique("jt") for _ in range(n)]
    for thing_id in ids:
        await app.registry.create_thing(thing_id, "", dict(attributes))
    return ids


def violations(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


@pytest.fixture
async def job_stub(app: FleetcmdApp) -> AsyncIterator[jpb_grpc.JobServiceStub]:
    async with app_channel(app) as channel:
        yield jpb_grpc.JobServiceStub(channel)


@pytest.fixture
async def http(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None and app.ports.http
    headers = {"Authorization": f"Bearer {admin_key(app.settings.data_dir)}"}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", headers=headers) as s:
        yield s


def later_spec(thing_ids: list[str], **kw: Any) -> jpb.JobSpec:
    """A spec whose job waits an hour for its start: it stays SCHEDULED while a test controls it."""
    spec = jpb.JobSpec(action="reboot", targets=jpb.JobTargets(thing_ids=thing_ids), **kw)
    spec.schedule.start_at.FromMilliseconds(now_ms() + HOUR_MS)
    return spec


def now_ms() -> int:
    return int(time.time() * 1000)


async def started(job_stub: jpb_grpc.JobServiceStub, job_id: str, n: int) -> jpb.Job:
    """The job once WatchJob shows ``n`` of its targets with an execution (their devices are offline: QUEUED)."""
    async for job in job_stub.WatchJob(jpb.WatchJobRequest(job_id=job_id), timeout=20):
        if job.counts.queued >= n:
            return job
    raise AssertionError(f"job {job_id} ended before {n} executions started")


# ---- gRPC ---------------------------------------------------------------------------------------


async def test_grpc_dry_run_counts_and_creates_nothing(app: FleetcmdApp, job_stub: jpb_grpc.JobServiceStub) -> None:
    ids = await things(app, 3, site="north")
    spec = jpb.JobSpec(action="reboot", targets=jpb.JobTargets(thing_ids=ids, exclude=ids[:1]))
    answer = await job_stub.CreateJob(jpb.CreateJobRequest(spec=spec, dry_run=True))
    assert answer.WhichOneof("outcome") == "dry_run"
    assert answer.dry_run.targets_total == 2
    assert sorted(answer.dry_run.sample) == sorted(ids[1:])
    assert list((await job_stub.ListJobs(jpb.ListJobsRequest())).jobs) == []


async def test_grpc_create_get_list_pause_resume_cancel(app: FleetcmdApp, job_stub: jpb_grpc.JobServiceStub) -> None:
    ids = await things(app, 2)
    spec = later_spec(ids, description="night update", idempotency_key="k-1")
    created = (await job_stub.CreateJob(jpb.CreateJobRequest(spec=spec))).job
    assert created.job_id and created.state == jpb.JOB_STATE_SCHEDULED
    assert created.spec.targets.thing_ids == ids and created.spec.description == "night update"
    assert created.created_by == admin_key(app.settings.data_dir).split("_")[1]
    # The same key and spec: the same job.
    again = (await job_stub.CreateJob(jpb.CreateJobRequest(spec=spec))).job
    assert again.job_id == created.job_id

    got = await job_stub.GetJob(jpb.GetJobRequest(job_id=created.job_id))
    assert got.job_id == created.job_id and got.spec == created.spec

    paused = await job_stub.PauseJob(jpb.PauseJobRequest(job_id=created.job_id))
    assert paused.state == jpb.JOB_STATE_PAUSED
    listed = await job_stub.ListJobs(jpb.ListJobsRequest(states=[jpb.JOB_STATE_PAUSED]))
    assert [j.job_id for j in listed.jobs] == [created.job_id]
    assert list((await job_stub.ListJobs(jpb.ListJobsRequest(states=[jpb.JOB_STATE_COMPLETED]))).jobs) == []

    resumed = await job_stub.ResumeJob(jpb.ResumeJobRequest(job_id=created.job_id))
    assert resumed.state == jpb.JOB_STATE_SCHEDULED  # its start time has not come
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await job_stub.ResumeJob(jpb.ResumeJobRequest(job_id=created.job_id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    canceled = await job_stub.CancelJob(jpb.CancelJobRequest(job_id=created.job_id, only_undelivered=True))
    assert canceled.state == jpb.JOB_STATE_CANCELED and canceled.HasField("ended_at")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await job_stub.GetJob(jpb.GetJobRequest(job_id="0" * 32))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_grpc_a_started_job_has_executions_that_list_filters_by_job(
    app: FleetcmdApp, job_stub: jpb_grpc.JobServiceStub, stub: pb_grpc.CommandServiceStub
) -> None:
    ids = await things(app, 3)
    other = await things(app, 1)
    spec = jpb.JobSpec(action="reboot", ttl_seconds=600, targets=jpb.JobTargets(thing_ids=ids))
    job = (await job_stub.CreateJob(jpb.CreateJobRequest(spec=spec))).job
    await stub.Send(pb.SendRequest(thing_id=other[0], action="reboot"))  # not the job's

    async def executions() -> list[pb.Execution]:
        return list((await stub.List(pb.ListRequest(job_id=job.job_id))).executions)

    await started(job_stub, job.job_id, 3)
    listed = await executions()
    assert sorted(e.thing_id for e in listed) == sorted(ids)
    assert {e.job_id for e in listed} == {job.job_id} and {e.retry_of for e in listed} == {""}
    # A page token is bound to the job filter too.
    first = await stub.List(pb.ListRequest(job_id=job.job_id, page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as other_filter:
        await stub.List(pb.ListRequest(page_size=1, page_token=first.next_page_token))
    assert violations(other_filter.value) == {"page_token": "page_token belongs to a request with other filters"}
    got = await job_stub.GetJob(jpb.GetJobRequest(job_id=job.job_id))
    assert got.targets_total == 3 and got.counts.queued == 3 and got.state == jpb.JOB_STATE_IN_PROGRESS


async def test_grpc_watch_job_follows_it_until_final(app: FleetcmdApp, job_stub: jpb_grpc.JobServiceStub) -> None:
    ids = await things(app, 2)
    job = (await job_stub.CreateJob(jpb.CreateJobRequest(spec=later_spec(ids)))).job
    call = job_stub.WatchJob(jpb.WatchJobRequest(job_id=job.job_id), timeout=20)
    seen = [await call.read()]
    assert seen[0].job_id == job.job_id and seen[0].state == jpb.JOB_STATE_SCHEDULED
    await job_stub.CancelJob(jpb.CancelJobRequest(job_id=job.job_id))
    async for snapshot in call:
        seen.append(snapshot)
    assert seen[-1].state == jpb.JOB_STATE_CANCELED
    assert await call.code() == grpc.StatusCode.OK
    # The spec only in the first message (it never changes).
    assert seen[0].spec.action == "reboot" and not any(s.HasField("spec") for s in seen[1:])


async def test_grpc_rerun_failed_takes_final_statuses(app: FleetcmdApp, job_stub: jpb_grpc.JobServiceStub) -> None:
    ids = await things(app, 1)
    job = (await job_stub.CreateJob(jpb.CreateJobRequest(spec=later_spec(ids)))).job
    for statuses in ([pb.QUEUED], [42]):  # not final (the engine's rule), not a status (the edge's)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await job_stub.RerunFailed(jpb.RerunFailedRequest(job_id=job.job_id, statuses=statuses))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(violations(refused.value)) == ["statuses"]
    await job_stub.CancelJob(jpb.CancelJobRequest(job_id=job.job_id))
    rerun = await job_stub.RerunFailed(jpb.RerunFailedRequest(job_id=job.job_id, statuses=[pb.CANCELED, pb.TIMED_OUT]))
    assert rerun.job_id != job.job_id and rerun.spec.action == "reboot"
    assert rerun.spec.targets.from_job == job.job_id and list(rerun.spec.targets.from_statuses) == [pb.CANCELED, pb.TIMED_OUT]
    # Output only: a create that sets them is refused.
    with pytest.raises(grpc.aio.AioRpcError) as output_only:
        await job_stub.CreateJob(jpb.CreateJobRequest(spec=rerun.spec))
    assert list(violations(output_only.value)) == ["spec.targets.from_job"]


@pytest.mark.parametrize(
    ("mutate", "fields"),
    [
        (lambda s: setattr(s.targets, "mode", 7), {"spec.targets.mode"}),
        (
            lambda s: s.abort.add(failure=jpb.FAILURE_TYPE_FAILED, threshold_pct=math.nan, min_finished=1),
            {"spec.abort[0].threshold_pct"},
        ),
        (lambda s: s.retries.add(max_attempts=1), {"spec.retries[0].failure"}),
        (lambda s: s.retries.add(failure=jpb.FAILURE_TYPE_ANY, backoff=9), {"spec.retries[0].backoff"}),
        (lambda s: setattr(s.rollout, "max_per_minute", jobs.MAX_PER_MINUTE + 1), {"spec.rollout.max_per_minute"}),
        (lambda s: s.schedule.end_at.FromSeconds(1), {"spec.schedule.end_at"}),
        (lambda s: setattr(s.schedule.start_at, "seconds", -(10**12)), {"spec.schedule.start_at"}),
        (lambda s: s.params.update({"deep": math.inf}), {"spec.params"}),
        (lambda s: s.ClearField("targets"), {"spec.targets"}),
        (lambda s: setattr(s, "description", "d" * (jobs.MAX_DESCRIPTION + 1)), {"spec.description"}),
        (lambda s: s.targets.thing_ids.extend(["ok", "a/b"]), {"spec.targets.thing_ids[2]"}),
        (lambda s: s.targets.exclude.append("#"), {"spec.targets.exclude[0]"}),
        (lambda s: setattr(s.targets, "thing_type", "no spaces"), {"spec.targets.thing_type"}),
    ],
    ids=[
        "mode-number",
        "nan",
        "unspecified-failure",
        "backoff-number",
        "rate",
        "end-in-the-past",
        "bad-timestamp",
        "params",
        "no-targets",
        "description",
        "thing-id",
        "excluded-id",
        "type-name",
    ],
)
async def test_grpc_a_bad_spec_field_is_named(job_stub: jpb_grpc.JobServiceStub, mutate: Any, fields: set[str]) -> None:
    spec = jpb.JobSpec(action="reboot", targets=jpb.JobTargets(thing_ids=["t-1"]))
    mutate(spec)
    for dry_run in (True, False):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await job_stub.CreateJob(jpb.CreateJobRequest(spec=spec, dry_run=dry_run))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(violations(refused.value)) == fields


async def test_grpc_every_bad_field_at_once_and_ids_checked(job_stub: jpb_grpc.JobServiceStub) -> None:
    spec = jpb.JobSpec(action="a", targets=jpb.JobTargets(thing_ids=["t-1"], mode=9))
    spec.retries.add(max_attempts=1)
    spec.abort.add(failure=jpb.FAILURE_TYPE_ANY, threshold_pct=5, min_finished=1)
    spec.abort.add(failure=11, threshold_pct=5, min_finished=1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await job_stub.CreateJob(jpb.CreateJobRequest(spec=spec))
    assert set(violations(refused.value)) == {"spec.targets.mode", "spec.retries[0].failure", "spec.abort[1].failure"}
    engine = jpb.JobSpec(action="a", targets=jpb.JobTargets(thing_ids=["t-1"]))
    engine.retries.add(failure=jpb.FAILURE_TYPE_FAILED, base_seconds=math.inf, max_attempts=jobs.MAX_RETRY_ATTEMPTS + 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await job_stub.CreateJob(jpb.CreateJobRequest(spec=engine))
    assert set(violations(refused.value)) == {"spec.retries[0].base_seconds", "spec.retries[0].max_attempts"}
    for call, request in (
        (job_stub.GetJob, jpb.GetJobRequest(job_id="a/b")),
        (job_stub.PauseJob, jpb.PauseJobRequest(job_id="")),
        (job_stub.CancelJob, jpb.CancelJobRequest(job_id="#")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as bad_id:
            await call(request)  # type: ignore[operator]
        assert list(violations(bad_id.value)) == ["job_id"]


async def test_grpc_list_page_size_and_states_are_bounded(job_stub: jpb_grpc.JobServiceStub) -> None:
    await job_stub.ListJobs(jpb.ListJobsRequest(page_size=job_runner.MAX_PAGE_SIZE))
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await job_stub.ListJobs(jpb.ListJobsRequest(page_size=job_runner.MAX_PAGE_SIZE + 1))
    assert list(violations(too_big.value)) == ["page_size"]
    for state in (jpb.JOB_STATE_UNSPECIFIED, 42):
        with pytest.raises(grpc.aio.AioRpcError) as bad_state:
            await job_stub.ListJobs(jpb.ListJobsRequest(states=[state]))
        assert list(violations(bad_state.value)) == ["states"]


async def test_grpc_roles_viewer_reads_operator_controls(app: FleetcmdApp) -> None:
    assert app.keys is not None
    ids = await things(app, 1)
    keys = {role: (await app.keys.create(role.name, role))[1] for role in (Role.VIEWER, Role.OPERATOR)}
    async with app_channel(app, key=keys[Role.VIEWER]) as viewer_channel, app_channel(app, key=keys[Role.OPERATOR]) as op_channel:
        viewer, operator = jpb_grpc.JobServiceStub(viewer_channel), jpb_grpc.JobServiceStub(op_channel)
        job = (await operator.CreateJob(jpb.CreateJobRequest(spec=later_spec(ids)))).job
        assert job.created_by == keys[Role.OPERATOR].split("_")[1]
        assert (await viewer.GetJob(jpb.GetJobRequest(job_id=job.job_id))).job_id == job.job_id
        assert [j.job_id for j in (await viewer.ListJobs(jpb.ListJobsRequest())).jobs] == [job.job_id]
        for call in (
            viewer.CreateJob(jpb.CreateJobRequest(spec=later_spec(ids), dry_run=True)),
            viewer.PauseJob(jpb.PauseJobRequest(job_id=job.job_id)),
            viewer.ResumeJob(jpb.ResumeJobRequest(job_id=job.job_id)),
            viewer.CancelJob(jpb.CancelJobRequest(job_id=job.job_id)),
            viewer.RerunFailed(jpb.RerunFailedRequest(job_id=job.job_id)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (await operator.PauseJob(jpb.PauseJobRequest(job_id=job.job_id))).state == jpb.JOB_STATE_PAUSED


# ---- REST ---------------------------------------------------------------------------------------


def rest_spec(ids: list[str], **kw: Any) -> dict[str, Any]:
    start = http_jobs.rfc3339(now_ms() + HOUR_MS)
    return {"action": "reboot", "targets": {"thingIds": ids}, "schedule": {"startAt": start}, **kw}


async def test_rest_create_get_list_control(app: FleetcmdApp, http: aiohttp.ClientSession) -> None:
    ids = await things(app, 2)
    async with http.post(JOBS, json={**rest_spec(ids), "dryRun": True}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["targetsTotal"] == 2
    body = rest_spec(ids, params={"level": 3}, rollout={"maxPerMinute": 60, "ramp": None}, idempotencyKey="r-1")
    async with http.post(JOBS, json=body) as resp:
        assert resp.status == 201, await resp.text()
        job = await resp.json()
        assert resp.headers["Location"] == f"{JOBS}/{job['jobId']}"
    assert job["state"] == "SCHEDULED" and job["spec"]["params"] == {"level": 3}
    assert job["spec"]["rollout"]["maxPerMinute"] == 60 and job["spec"]["targets"]["mode"] == "SNAPSHOT"
    assert set(job["counts"]) == set(http_jobs.COUNT_KEYS) and all(type(v) is int for v in job["counts"].values())
    async with http.get(f"{JOBS}/{job['jobId']}") as resp:
        assert resp.status == 200 and (await resp.json())["jobId"] == job["jobId"]
    async with http.post(f"{JOBS}/{job['jobId']}/pause") as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "PAUSED"
    async with http.get(JOBS, params=[("state", "paused,scheduled"), ("pageSize", str(job_runner.MAX_PAGE_SIZE))]) as resp:
        assert resp.status == 200
        listed = await resp.json()
        assert [j["jobId"] for j in listed["jobs"]] == [job["jobId"]] and listed["nextPageToken"] == ""
    async with http.post(f"{JOBS}/{job['jobId']}/resume") as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "SCHEDULED"
    async with http.post(f"{JOBS}/{job['jobId']}/cancel", json={"onlyUndelivered": True}) as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "CANCELED"
    async with http.post(f"{JOBS}/{job['jobId']}/pause") as resp:
        assert resp.status == 409 and (await resp.json())["code"] == "FAILED_PRECONDITION"
    async with http.post(f"{JOBS}/{job['jobId']}/rerun-failed", json={"statuses": ["QUEUED"]}) as resp:
        assert resp.status == 400 and [d["field"] for d in (await resp.json())["details"]] == ["statuses"]
    async with http.post(f"{JOBS}/{job['jobId']}/rerun-failed", json={"statuses": ["CANCELED"]}) as resp:
        assert resp.status == 201, await resp.text()
        rerun = await resp.json()
    assert rerun["jobId"] != job["jobId"]
    assert (rerun["spec"]["targets"]["fromJob"], rerun["spec"]["targets"]["fromStatuses"]) == (job["jobId"], ["CANCELED"])
    assert set(await _refused(http, rerun["spec"])) == {"targets.fromJob", "targets.fromStatuses"}


async def test_rest_execution_json_names_its_job_and_list_filters_by_it(app: FleetcmdApp, http: aiohttp.ClientSession) -> None:
    ids = await things(app, 2)
    async with http.post("/api/v1/commands", json={"thingId": ids[0], "action": "reboot"}) as resp:
        assert resp.status == 202  # not the job's
    async with http.post(JOBS, json={"action": "reboot", "targets": {"thingIds": ids}}) as resp:
        assert resp.status == 201, await resp.text()
        job_id = (await resp.json())["jobId"]
    async with app_channel(app) as channel:
        await started(jpb_grpc.JobServiceStub(channel), job_id, 2)
    async with http.get("/api/v1/commands", params={"jobId": job_id}) as resp:
        executions = (await resp.json())["executions"]
    assert sorted(e["thingId"] for e in executions) == sorted(ids)
    assert {e["jobId"] for e in executions} == {job_id} and {e["retryOf"] for e in executions} == {None}


async def _refused(http: aiohttp.ClientSession, body: Any) -> dict[str, str]:
    async with http.post(JOBS, json=body) as resp:
        assert resp.status == 400, await resp.text()
        answer = await resp.json()
    assert answer["code"] == "INVALID_ARGUMENT"
    return {d["field"]: d["description"] for d in answer["details"]}


def one(**fields: Any) -> dict[str, Any]:
    """A body with one target thing and ``fields`` on top."""
    return {"action": "a", "targets": {"thingIds": ["t"]}, **fields}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ([], {"body"}),
        ({"targets": {"thingIds": ["t"]}}, {"action"}),
        (one(targets={"thingIds": "t"}), {"targets.thingIds"}),
        (one(targets={"thingIds": ["t"], "mode": "snapshot"}), {"targets.mode"}),
        (one(ttl=-1), {"ttl"}),
        (one(rollout={"maxPerMinute": jobs.MAX_PER_MINUTE + 1}), {"rollout.maxPerMinute"}),
        (one(abort=[{"failure": "ALL", "thresholdPct": 5, "minFinished": 1}]), {"abort[0].failure"}),
        (one(retries=[{"failure": "FAILED", "maxAttempts": jobs.MAX_RETRY_ATTEMPTS + 1}]), {"retries[0].maxAttempts"}),
        (one(retries=[{"failure": "FAILED", "maxAttempts": 1, "backoff": "linear"}]), {"retries[0].backoff"}),
        (one(schedule={"startAt": "yesterday"}), {"schedule.startAt"}),
        (one(schedule={"endAt": "2001-01-01T00:00:00Z"}), {"schedule.endAt"}),
        ({"action": "a", "targets": {}}, {"targets"}),
        (one(dryRun="yes"), {"dryRun"}),
        (one(canary={"count": 1.5, "successPct": 90}), {"canary.count"}),
    ],
    ids=[
        "not-an-object",
        "no-action",
        "ids-not-a-list",
        "mode-case",
        "negative-ttl",
        "rate",
        "failure-name",
        "attempts",
        "backoff-name",
        "bad-time",
        "end-in-the-past",
        "no-selector",
        "dry-run-type",
        "fractional-count",
    ],
)
async def test_rest_a_bad_field_is_named_as_rest_spells_it(http: aiohttp.ClientSession, body: Any, fields: set[str]) -> None:
    assert set(await _refused(http, body)) == fields


async def test_rest_counts_are_uint32_like_the_proto(http: aiohttp.ClientSession) -> None:
    ramp = {"basePerMinute": 1, "factor": 2, "everyNotified": 2**32 - 1}
    body = {"action": "a", "targets": {"thingIds": ["t"]}, "rollout": {"ramp": ramp}, "dryRun": True}
    async with http.post(JOBS, json=body) as resp:
        assert resp.status == 200, await resp.text()
    ramp["everyNotified"] = 2**32
    assert set(await _refused(http, body)) == {"rollout.ramp.everyNotified"}


def _target_bound(name: str, n: int) -> dict[str, Any]:
    return {
        "thing-id": {"thingIds": ["t" * n]},
        "type-name": {"thingType": "T" * n},
        "attribute-name": {"attributes": {"k" * n: "v"}},
        "attribute-value": {"attributes": {"k": "v" * n}},
    }[name]


@pytest.mark.parametrize(
    ("name", "bound", "field"),
    [
        ("thing-id", MAX_LEVEL_LENGTH, "targets.thingIds[0]"),
        ("type-name", 128, "targets.thingType"),
        ("attribute-name", MAX_ATTRIBUTE_KEY, "targets.attributes"),
        ("attribute-value", MAX_ATTRIBUTE_VALUE, "targets.attributes"),
    ],
)
async def test_rest_target_names_are_bounded(http: aiohttp.ClientSession, name: str, bound: int, field: str) -> None:
    async with http.post(JOBS, json={"action": "a", "targets": _target_bound(name, bound), "dryRun": True}) as resp:
        assert resp.status == 200, await resp.text()
    over = {"action": "a", "targets": _target_bound(name, bound + 1), "dryRun": True}
    assert set(await _refused(http, over)) == {field}


async def test_rest_list_and_ids_are_checked(http: aiohttp.ClientSession) -> None:
    async with http.get(JOBS, params={"pageSize": str(job_runner.MAX_PAGE_SIZE)}) as resp:
        assert resp.status == 200
    for query, field in (({"pageSize": str(job_runner.MAX_PAGE_SIZE + 1)}, "pageSize"), ({"state": "running"}, "state")):
        async with http.get(JOBS, params=query) as resp:
            assert resp.status == 400
            assert [d["field"] for d in (await resp.json())["details"]] == [field]
    async with http.get(f"{JOBS}/{'x' * 129}") as resp:
        assert resp.status == 400 and [d["field"] for d in (await resp.json())["details"]] == ["jobId"]
    async with http.get(f"{JOBS}/{'0' * 32}") as resp:
        assert resp.status == 404
    async with http.post(f"{JOBS}/{'0' * 32}/rerun-failed", json={"statuses": "FAILED"}) as resp:
        assert resp.status == 400 and [d["field"] for d in (await resp.json())["details"]] == ["statuses"]


async def test_rest_roles(app: FleetcmdApp, http: aiohttp.ClientSession) -> None:
    assert app.keys is not None and app.ports is not None
    ids = await things(app, 1)
    async with http.post(JOBS, json=rest_spec(ids)) as resp:
        job_id = (await resp.json())["jobId"]
    viewer = (await app.keys.create("v", Role.VIEWER))[1]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", headers={"Authorization": f"Bearer {viewer}"}) as s:
        async with s.get(f"{JOBS}/{job_id}") as resp:
            assert resp.status == 200
        async with s.post(JOBS, json=rest_spec(ids)) as resp:
            assert resp.status == 403 and (await resp.json())["code"] == "PERMISSION_DENIED"
        # The role is checked before the body: a viewer's bad body is still 403.
        async with s.post(JOBS, data=b"{") as resp:
            assert resp.status == 403


# ---- conversions (no service) ---------------------------------------------------------------------


def test_rest_paths_are_camel_case() -> None:
    assert http_jobs.rest_path("targets.thing_ids") == "targets.thingIds"
    assert http_jobs.rest_path("retries[1].max_attempts") == "retries[1].maxAttempts"
    assert http_jobs.rest_path("schedule.end_at_ms") == "schedule.endAt"
    assert http_jobs.rest_path("ttl_seconds") == "ttl"


def test_a_job_converts_to_proto_and_back() -> None:
    spec = jobs.JobSpec(
        action="a",
        params={"n": 1},
        ttl_seconds=30,
        targets=jobs.Targets(thing_type="t", attributes=(("site", "n"),), mode=jobs.TargetMode.CONTINUOUS),
        rollout=jobs.Rollout(max_per_minute=5, ramp=jobs.Ramp(1, 2.0, every_succeeded=3), max_in_flight=2),
        abort=(jobs.AbortCriterion(jobs.FailureType.ANY, 10.0, 5),),
        canary=jobs.Canary(2, 50.0),
        retries=(jobs.RetryPolicy(jobs.FailureType.TIMED_OUT, 3, "exponential", 1.0, 8.0, True),),
        schedule=jobs.Schedule(1_000, 2_000, jobs.EndBehavior.CANCEL_NOT_FINAL),
        strict=True,
        description="d",
        idempotency_key="k",
    )
    assert convert_jobs.job_spec(convert_jobs.job_spec_pb(spec)) == spec


async def test_rest_names_the_engines_fields_in_its_own_words(app: FleetcmdApp, http: aiohttp.ClientSession) -> None:
    refused = await _refused(http, one(ttl=app.settings.max_ttl + 1))
    assert refused == {"ttl": f"ttl must be 0 (default) to {app.settings.max_ttl}"}
