"""Jobs through the Python API (JobsCore) with real MQTT devices on loopback (issue 16)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from server.app import FleetcmdApp
from server.core import jobs as jb
from server.core.clock import now_ms
from server.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from server.core.job_runner import JobsCore
from server.core.lifecycle import Status
from server.core.models import CommandDef, Execution, ListQuery
from tests.devices import EmqxDevice, wait_for

# thing id, execution id -> status to answer ("" = do not answer)
Answer = Callable[[str, str], str]


def succeed(_thing: str, _execution: str) -> str:
    return "SUCCEEDED"


@contextlib.asynccontextmanager
async def fleet(app: FleetcmdApp, ids: list[str], answer: Answer = succeed) -> AsyncIterator[dict[str, EmqxDevice]]:
    assert app.ports is not None and app.ports.mqtt is not None

    def on_request(dev: EmqxDevice, execution_id: str, _body: dict[str, Any]) -> None:
        status = answer(dev.thing_id, execution_id)
        if status:
            dev.respond(execution_id, status)

    devices = {i: EmqxDevice("127.0.0.1", app.ports.mqtt, i, on_request=on_request) for i in ids}
    await asyncio.gather(*(asyncio.to_thread(d.start) for d in devices.values()))
    try:
        yield devices
    finally:
        await asyncio.gather(*(asyncio.to_thread(d.stop) for d in devices.values()))


def jobs_of(app: FleetcmdApp) -> JobsCore:
    assert app.jobs is not None
    return app.jobs


def spec(ids: tuple[str, ...] = (), **kw: Any) -> jb.JobSpec:
    base = jb.JobSpec(action="reboot", params={"delay": 1}, ttl_seconds=30, targets=jb.Targets(thing_ids=ids))
    return dataclasses.replace(base, **kw)


async def until(app: FleetcmdApp, job_id: str, pred: Callable[[jb.Job], bool], timeout: float = 20) -> jb.Job:
    async with asyncio.timeout(timeout):
        async for job in jobs_of(app).watch(job_id):
            if pred(job):
                return job
    raise AssertionError("watch ended before the condition")


async def final(app: FleetcmdApp, job_id: str, timeout: float = 20) -> jb.Job:
    return await until(app, job_id, lambda j: j.state.final and j.job_id not in jobs_of(app)._runs, timeout)


async def executions(app: FleetcmdApp, job_id: str) -> list[Execution]:
    assert app.core is not None
    page = await app.core.list_executions(ListQuery(job_id=job_id, page_size=1000))
    return page.executions


async def test_a_job_over_a_list_sends_one_execution_per_target(app: FleetcmdApp) -> None:
    ids = [f"list-{i}" for i in range(5)]
    async with fleet(app, ids) as devices:
        job = await jobs_of(app).create(spec(tuple(ids)), created_by="alice")
        assert job.targets_total == 5 and job.state is jb.JobState.IN_PROGRESS and job.created_by == "alice"
        done = await final(app, job.job_id)
    assert done.state is jb.JobState.COMPLETED
    assert done.counts == {"SUCCEEDED": 5}
    assert done.ended_at_ms is not None and done.started_at_ms is not None
    execs = await executions(app, job.job_id)
    assert sorted(e.thing_id for e in execs) == ids
    assert all(e.job_id == job.job_id and e.job_attempt == 1 and e.status is Status.SUCCEEDED for e in execs)
    assert all(d.requests.qsize() == 1 for d in devices.values())
    # Stored, then read back once the runner forgot it.
    again = await jobs_of(app).get(job.job_id)
    assert again.counts == {"SUCCEEDED": 5} and again.state is jb.JobState.COMPLETED


async def test_type_and_attribute_selectors_and_a_refusing_type(app: FleetcmdApp) -> None:
    assert app.registry is not None
    reg = app.registry
    await reg.put_type(
        "lamp",
        description="",
        commands={"reboot": CommandDef(params_schema={"type": "object", "properties": {"delay": {"type": "integer"}}})},
        allow_undefined_actions=False,
        max_ttl=86400,
    )
    await reg.put_type("meter", description="", commands={"read": CommandDef()}, allow_undefined_actions=False, max_ttl=86400)
    for i in range(4):
        await reg.create_thing(f"lamp-{i}", "lamp", {"site": "north" if i < 3 else "south", "floor": str(i % 2)})
    await reg.create_thing("meter-0", "meter", {"site": "north"})
    jobs = jobs_of(app)
    dry = await jobs.dry_run(spec(targets=jb.Targets(attributes=(("site", "north"),))))
    assert dry.targets_total == 4 and set(dry.sample) == {"lamp-0", "lamp-1", "lamp-2", "meter-0"}
    dry = await jobs.dry_run(spec(targets=jb.Targets(thing_type="lamp", attributes=(("site", "north"), ("floor", "0")))))
    assert dry.targets_total == 2 and set(dry.sample) == {"lamp-0", "lamp-2"}
    # strict: the meter's type has no "reboot": the whole job is refused.
    with pytest.raises(InvalidArgument, match="meter-0"):
        await jobs.create(spec(targets=jb.Targets(attributes=(("site", "north"),)), strict=True))
    async with fleet(app, ["lamp-0", "lamp-1", "lamp-2", "meter-0"]) as devices:
        job = await jobs.create(spec(targets=jb.Targets(attributes=(("site", "north"),), exclude=("lamp-1",))))
        done = await final(app, job.job_id)
    assert done.targets_total == 3
    assert done.counts == {"SUCCEEDED": 2, "REJECTED": 1}
    assert devices["meter-0"].requests.qsize() == 0 and devices["lamp-1"].requests.qsize() == 0
    assert {e.thing_id for e in await executions(app, job.job_id)} == {"lamp-0", "lamp-2"}
    # Params the type refuses: every target REJECTED, never sent.
    bad = await jobs.create(spec(targets=jb.Targets(thing_type="lamp"), params={"delay": "soon"}))
    done = await final(app, bad.job_id)
    assert done.counts == {"REJECTED": 4}


async def test_max_in_flight_holds_the_rest_until_executions_are_final(app: FleetcmdApp) -> None:
    ids = [f"mif-{i}" for i in range(6)]
    async with fleet(app, ids, answer=lambda _t, _e: "") as devices:
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_in_flight=2)))
        outstanding: list[tuple[EmqxDevice, str]] = []
        answered = 0

        def collect() -> int:
            for d in devices.values():
                while not d.requests.empty():
                    outstanding.append((d, d.requests.get_nowait()[0]))
            return len(outstanding)

        while answered < 6:
            # Wait for what the job starts, check the bound still holds a moment later, answer one.
            expected = min(2, 6 - answered)
            await wait_for(lambda n=expected: collect() >= n, 10, f"{expected} requests")
            await asyncio.sleep(0.2)
            assert collect() == expected
            current = await jobs_of(app).get(job.job_id)
            assert current.counts.get("PENDING", 0) + len(outstanding) + answered == 6
            dev, eid = outstanding.pop(0)
            await dev.arespond(eid, "SUCCEEDED")
            answered += 1
        done = await final(app, job.job_id)
    assert done.counts == {"SUCCEEDED": 6}


async def test_max_per_minute_spaces_the_dispatches(app: FleetcmdApp) -> None:
    ids = [f"pace-{i}" for i in range(6)]
    async with fleet(app, ids):
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_per_minute=300)))  # one per 200 ms
        done = await final(app, job.job_id)
    assert done.counts == {"SUCCEEDED": 6}
    created = sorted(e.created_at_ms for e in await executions(app, job.job_id))
    gaps = [b - a for a, b in itertools.pairwise(created)]
    assert min(gaps) >= 199, gaps
    assert created[-1] - created[0] < 5 * 200 + 2000  # and not much slower than the rate


async def test_ramp_speeds_up_after_each_step(app: FleetcmdApp) -> None:
    ids = [f"ramp-{i}" for i in range(6)]
    async with fleet(app, ids):
        ramp = jb.Ramp(base_per_minute=60, factor=4.0, every_notified=2)  # 1 s, then 250 ms, then 62.5 ms
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(ramp=ramp)))
        await final(app, job.job_id)
    created = sorted(e.created_at_ms for e in await executions(app, job.job_id))
    gaps = [b - a for a, b in itertools.pairwise(created)]
    assert gaps[0] >= 999  # 2 notified: still the base rate between the first two
    # Faster after each step (a job without the ramp keeps 1 s), never faster than the step's rate.
    assert 249 <= gaps[2] < 999 and 62 <= gaps[4] < 999, gaps


async def test_abort_after_failures_cancels_what_is_not_final(app: FleetcmdApp) -> None:
    ids = [f"abort-{i}" for i in range(10)]
    # The first three fail, the rest never answer: with 2 in flight, failures trip the criterion first.
    fails = set(ids[:3])
    async with fleet(app, ids, answer=lambda t, _e: "FAILED" if t in fails else ""):
        criterion = jb.AbortCriterion(jb.FailureType.FAILED, 50.0, 2)
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_in_flight=2), abort=(criterion,)))
        done = await final(app, job.job_id)
    assert done.state is jb.JobState.ABORTED
    assert "FAILED" in done.abort_reason
    # The third failing target may start after the first failure (1 finished: below the minimum).
    assert done.counts["FAILED"] in (2, 3)
    started = 10 - done.counts["SKIPPED"]
    assert started <= 4 and done.counts["FAILED"] + done.counts.get("CANCELED", 0) == started
    assert sum(done.counts.values()) == 10


async def test_retries_with_backoff_link_the_new_execution(app: FleetcmdApp) -> None:
    attempts: dict[str, int] = {}

    def flaky(thing: str, _e: str) -> str:
        attempts[thing] = attempts.get(thing, 0) + 1
        return "FAILED" if attempts[thing] < 3 else "SUCCEEDED"

    async with fleet(app, ["retry-0"], answer=flaky):
        policy = jb.RetryPolicy(jb.FailureType.FAILED, 2, "exponential", base_seconds=0.3, max_seconds=10)
        job = await jobs_of(app).create(spec(("retry-0",), retries=(policy,)))
        done = await final(app, job.job_id)
    assert done.counts == {"SUCCEEDED": 1}  # counted once
    execs = sorted(await executions(app, job.job_id), key=lambda e: e.job_attempt)
    assert [e.job_attempt for e in execs] == [1, 2, 3]
    assert [e.status for e in execs] == [Status.FAILED, Status.FAILED, Status.SUCCEEDED]
    assert execs[1].retry_of == execs[0].execution_id and execs[2].retry_of == execs[1].execution_id
    # Backoff: 0.3 s then 0.6 s after the failure.
    assert execs[1].created_at_ms - (execs[0].completed_at_ms or 0) >= 299
    assert execs[2].created_at_ms - (execs[1].completed_at_ms or 0) >= 599


async def test_retries_stop_at_max_attempts(app: FleetcmdApp) -> None:
    async with fleet(app, ["retry-max"], answer=lambda _t, _e: "FAILED"):
        policy = jb.RetryPolicy(jb.FailureType.FAILED, 1, "fixed", base_seconds=0.05)
        job = await jobs_of(app).create(spec(("retry-max",), retries=(policy,)))
        done = await final(app, job.job_id)
    assert done.counts == {"FAILED": 1}
    assert len(await executions(app, job.job_id)) == 2  # the execution and one retry


async def test_sequential_per_thing_waits_for_the_previous_job(app: FleetcmdApp) -> None:
    async with fleet(app, ["seq-0"], answer=lambda _t, _e: "") as devices:
        dev = devices["seq-0"]
        rollout = jb.Rollout(sequential_per_thing=True)
        first = await jobs_of(app).create(spec(("seq-0",), rollout=rollout))
        second = await jobs_of(app).create(spec(("seq-0",), rollout=rollout, action="update"))
        eid, _body = await dev.wait_request()
        await asyncio.sleep(0.5)
        assert dev.requests.empty()  # the second job's execution waits
        assert (await jobs_of(app).get(second.job_id)).counts == {"PENDING": 1}
        await dev.arespond(eid, "SUCCEEDED")
        eid2, _ = await dev.wait_request()
        await dev.arespond(eid2, "SUCCEEDED")
        await final(app, first.job_id)
        await final(app, second.job_id)
    first_ex = (await executions(app, first.job_id))[0]
    second_ex = (await executions(app, second.job_id))[0]
    assert second_ex.created_at_ms >= (first_ex.completed_at_ms or 0)


async def test_pause_resume_and_cancel_mid_rollout(app: FleetcmdApp) -> None:
    ids = [f"pr-{i}" for i in range(8)]
    async with fleet(app, ids, answer=lambda _t, _e: ""):
        jobs = jobs_of(app)
        job = await jobs.create(spec(tuple(ids), rollout=jb.Rollout(max_per_minute=600)))  # one per 100 ms
        await until(app, job.job_id, lambda j: j.counts.get("PENDING", 0) <= 6)
        paused = await jobs.pause(job.job_id)
        assert paused.state is jb.JobState.PAUSED
        with pytest.raises(FailedPrecondition):
            await jobs.pause(job.job_id)
        started = 8 - (await jobs.get(job.job_id)).counts.get("PENDING", 0)
        await asyncio.sleep(0.5)
        assert 8 - (await jobs.get(job.job_id)).counts.get("PENDING", 0) == started  # nothing new while paused
        resumed = await jobs.resume(job.job_id)
        assert resumed.state is jb.JobState.IN_PROGRESS
        await until(app, job.job_id, lambda j: j.counts.get("PENDING", 0) <= 8 - started - 2)
        canceled = await jobs.cancel(job.job_id)
        assert canceled.state is jb.JobState.CANCELED
        done = await final(app, job.job_id)
        with pytest.raises(FailedPrecondition):
            await jobs.resume(job.job_id)
    dispatched = 8 - done.counts.get("SKIPPED", 0)
    assert done.counts.get("CANCELED", 0) == dispatched >= started + 2
    assert all(e.status is Status.CANCELED for e in await executions(app, job.job_id))


async def test_cancel_only_undelivered_spares_delivered_executions(app: FleetcmdApp) -> None:
    async with fleet(app, ["und-on"], answer=lambda _t, _e: ""):
        # "und-off" is not connected: its execution stays QUEUED.
        job = await jobs_of(app).create(spec(("und-on", "und-off")))
        await until(app, job.job_id, lambda j: j.counts.get("DELIVERED", 0) == 1 and j.counts.get("QUEUED", 0) == 1)
        await jobs_of(app).cancel(job.job_id, only_undelivered=True)
        job_now = await until(app, job.job_id, lambda j: j.counts.get("CANCELED", 0) == 1)
        assert job_now.counts.get("DELIVERED", 0) == 1


async def test_continuous_job_reaches_a_thing_created_later(app: FleetcmdApp) -> None:
    assert app.registry is not None
    await app.registry.create_thing("cont-0", "", {"ring": "beta"})
    targets = jb.Targets(attributes=(("ring", "beta"),), mode=jb.TargetMode.CONTINUOUS)
    async with fleet(app, ["cont-0", "cont-1", "cont-2"]) as devices:
        job = await jobs_of(app).create(spec(targets=targets))
        await until(app, job.job_id, lambda j: j.counts.get("SUCCEEDED", 0) == 1)
        await app.registry.create_thing("cont-1", "", {"ring": "beta"})
        await app.registry.create_thing("cont-2", "", {"ring": "alpha"})
        await until(app, job.job_id, lambda j: j.counts.get("SUCCEEDED", 0) == 2)
        # Changed to match: it gets the job too.
        await app.registry.update_thing("cont-2", thing_type=None, attributes={"ring": "beta"})
        running = await until(app, job.job_id, lambda j: j.counts.get("SUCCEEDED", 0) == 3)
        assert running.state is jb.JobState.IN_PROGRESS  # a continuous job does not complete on its own
        assert all(d.requests.qsize() == 1 for d in devices.values())
        await jobs_of(app).cancel(job.job_id)


async def test_schedule_start_and_end(app: FleetcmdApp) -> None:
    ids = [f"sch-{i}" for i in range(20)]
    async with fleet(app, ids):
        start = now_ms() + 600
        sched = jb.Schedule(start_at_ms=start, end_at_ms=start + 700)
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_per_minute=600), schedule=sched))
        assert job.state is jb.JobState.SCHEDULED and job.targets_total == 0
        done = await final(app, job.job_id)
    assert done.state is jb.JobState.COMPLETED
    execs = await executions(app, job.job_id)
    assert execs and min(e.created_at_ms for e in execs) >= start
    assert max(e.created_at_ms for e in execs) < start + 700
    # At most one per 100 ms within the 700 ms window.
    assert 1 <= done.counts["SUCCEEDED"] <= 8 and done.counts["SKIPPED"] == 20 - done.counts["SUCCEEDED"]


async def test_canary_gate(app: FleetcmdApp) -> None:
    ids = [f"can-{i}" for i in range(6)]
    async with fleet(app, ids, answer=lambda t, _e: "FAILED" if t == "can-0" else "SUCCEEDED"):
        # 1 of 2 canaries fails: 50% < 100% needed -> aborted, the other 4 never start.
        job = await jobs_of(app).create(spec(tuple(ids), canary=jb.Canary(2, 100.0)))
        done = await final(app, job.job_id)
        assert done.state is jb.JobState.ABORTED and "canary" in done.abort_reason
        assert done.counts == {"FAILED": 1, "SUCCEEDED": 1, "SKIPPED": 4}
        ok = await jobs_of(app).create(spec(tuple(ids), canary=jb.Canary(2, 50.0)))
        done = await final(app, ok.job_id)
        assert done.state is jb.JobState.COMPLETED and done.counts == {"FAILED": 1, "SUCCEEDED": 5}


async def test_rerun_failed_targets_only_those(app: FleetcmdApp) -> None:
    ids = [f"rr-{i}" for i in range(4)]
    seen: dict[str, int] = {}

    def once_fail(thing: str, _e: str) -> str:
        seen[thing] = seen.get(thing, 0) + 1
        return "FAILED" if thing in ("rr-1", "rr-3") and seen[thing] == 1 else "SUCCEEDED"

    async with fleet(app, ids, answer=once_fail):
        job = await jobs_of(app).create(spec(tuple(ids)))
        await final(app, job.job_id)
        rerun = await jobs_of(app).rerun_failed(job.job_id, ("FAILED",))
        done = await final(app, rerun.job_id)
    assert done.targets_total == 2 and done.counts == {"SUCCEEDED": 2}
    assert {e.thing_id for e in await executions(app, rerun.job_id)} == {"rr-1", "rr-3"}
    with pytest.raises(InvalidArgument):
        await jobs_of(app).rerun_failed(job.job_id, ("QUEUED",))


async def test_idempotency_key_and_list(app: FleetcmdApp) -> None:
    jobs = jobs_of(app)
    s = spec(("idem-0",), idempotency_key="k1", ttl_seconds=1)
    first = await jobs.create(s)
    again = await jobs.create(s)
    assert again.job_id == first.job_id
    with pytest.raises(AlreadyExists):
        await jobs.create(dataclasses.replace(s, action="other"))
    others = [await jobs.create(spec((f"l-{i}",), ttl_seconds=1)) for i in range(3)]
    page = await jobs.list(page_size=2)
    assert [j.job_id for j in page.jobs] == [others[2].job_id, others[1].job_id] and page.next_page_token
    rest = await jobs.list(page_size=2, page_token=page.next_page_token)
    assert [j.job_id for j in rest.jobs] == [others[0].job_id, first.job_id] and not rest.next_page_token
    with pytest.raises(InvalidArgument):
        await jobs.list(page_size=501)
    await jobs.list(page_size=500)
    with pytest.raises(InvalidArgument):
        await jobs.list(page_token="x")


async def test_watch_sees_state_and_counts_live(app: FleetcmdApp) -> None:
    ids = [f"w-{i}" for i in range(3)]
    async with fleet(app, ids):
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_per_minute=300)))
        snapshots: list[jb.Job] = []
        async with asyncio.timeout(20):
            async for snap in jobs_of(app).watch(job.job_id):
                snapshots.append(snap)
    assert snapshots[-1].state is jb.JobState.COMPLETED and snapshots[-1].counts == {"SUCCEEDED": 3}
    assert len({tuple(sorted(s.counts.items())) for s in snapshots}) >= 3  # progress seen on the way


async def test_jobs_not_final_are_bounded(app: FleetcmdApp, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.core import job_runner
    from server.core.errors import ResourceExhausted

    monkeypatch.setattr(job_runner, "MAX_ACTIVE_JOBS", 2)
    jobs = jobs_of(app)
    # Scheduled far ahead: they stay not final.
    later = jb.Schedule(start_at_ms=now_ms() + 3_600_000)
    first = await jobs.create(spec(("b-0",), schedule=later))
    await jobs.create(spec(("b-1",), schedule=later))
    with pytest.raises(ResourceExhausted):
        await jobs.create(spec(("b-2",), schedule=later))
    await jobs.cancel(first.job_id)
    await final(app, first.job_id)
    await jobs.create(spec(("b-3",), schedule=later))


async def test_a_paused_job_completes_at_its_end_time(app: FleetcmdApp) -> None:
    ids = [f"pe-{i}" for i in range(5)]
    async with fleet(app, ids):
        sched = jb.Schedule(end_at_ms=now_ms() + 1_000)
        job = await jobs_of(app).create(spec(tuple(ids), rollout=jb.Rollout(max_per_minute=120), schedule=sched))
        await until(app, job.job_id, lambda j: j.counts.get("SUCCEEDED", 0) >= 1)
        await jobs_of(app).pause(job.job_id)
        done = await final(app, job.job_id)
    assert done.state is jb.JobState.COMPLETED
    assert done.counts.get("SKIPPED", 0) >= 3 and sum(done.counts.values()) == 5


@pytest.mark.parametrize("n", [999, 1000, 1001, 2001])
async def test_resolution_pages_through_the_targets_and_the_sample_is_bounded(app: FleetcmdApp, n: int) -> None:
    from server.core import job_runner

    assert job_runner.RESOLVE_PAGE == 1000
    assert app.registry is not None
    for i in range(n):
        await app.registry.create_thing(f"page-{i:05d}", "", {"ring": "p"})
    jobs = jobs_of(app)
    by_attr = spec(targets=jb.Targets(attributes=(("ring", "p"),)))
    dry = await jobs.dry_run(by_attr)
    assert dry.targets_total == n and len(dry.sample) == jb.MAX_SAMPLE
    later = jb.Schedule(start_at_ms=now_ms() + 600)
    job = await jobs.create(dataclasses.replace(by_attr, schedule=later, ttl_seconds=1))
    started = await until(app, job.job_id, lambda j: j.resolved and j.state is jb.JobState.IN_PROGRESS)
    assert started.targets_total == n
    listed = await jobs.dry_run(spec(tuple(f"page-{i:05d}" for i in range(n))))
    assert listed.targets_total == n
    await jobs.cancel(job.job_id)


async def test_continuous_online_only_reaches_a_thing_when_it_connects(app: FleetcmdApp) -> None:
    assert app.registry is not None
    await app.registry.create_thing("on-0", "", {"ring": "gamma"})
    await app.registry.create_thing("on-1", "", {"ring": "gamma"})
    targets = jb.Targets(attributes=(("ring", "gamma"),), online_only=True, mode=jb.TargetMode.CONTINUOUS)
    async with fleet(app, ["on-0"]):
        job = await jobs_of(app).create(spec(targets=targets))
        await until(app, job.job_id, lambda j: j.counts.get("SUCCEEDED", 0) == 1)
        assert (await jobs_of(app).get(job.job_id)).targets_total == 1  # on-1 is offline: not a target
        async with fleet(app, ["on-1"]) as late:
            await until(app, job.job_id, lambda j: j.counts.get("SUCCEEDED", 0) == 2)
            assert late["on-1"].requests.qsize() == 1
        await jobs_of(app).cancel(job.job_id)
