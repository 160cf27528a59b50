"""Job events on the PostgreSQL store: the event-stream tests run again on PostgreSQL, and across replicas.

``test_job_events.py`` runs the store's job events on both stores; its service-level tests (Stream,
StreamBatches and SSE live, filtered and resumed; one event per change) are imported unchanged and
run here on a new PostgreSQL database each. What only several replicas need: a job event one replica
commits reaches a watcher of another replica (its store follows the shared log and rebuilds the job's
snapshot from the stored job), in the log's order with no gap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.api import convert_jobs
from server.app import FleetcmdApp
from server.config import Settings
from server.core import jobs as jb
from server.pb import commands_pb2 as pb
from server.pb import commands_pb2_grpc as pb_grpc
from server.pb import jobs_pb2 as jpb
from tests import pgserver
from tests.clients import admin_key, app_channel
from tests.conftest import make_settings
from tests.test_job_events import (  # noqa: F401 - collected and run here on PostgreSQL
    TIMEOUT,
    http,
    job_final,
    read_until,
    sequences,
    store_of,
    test_cancel_stores_only_undelivered,
    test_each_change_is_one_event_and_no_change_none,
    test_grpc_filters_job_events_by_job_and_keeps_them_from_thing_and_action_watchers,
    test_grpc_resume_mid_job_has_no_gap_and_no_duplicate,
    test_grpc_stream_shows_a_jobs_state_and_count_changes_live,
    test_sse_job_events_live_filtered_and_resumed,
    test_stream_batches_carries_job_events_like_stream,
)
from tests.test_jobs_engine import jobs_of, spec, until


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """As conftest's ``settings``, on a new PostgreSQL database (the imported tests use it)."""
    secure = request.node.get_closest_marker("secure") is not None
    return make_settings(tmp_path / "data", allow_anonymous=not secure, database_url=pgserver.fresh_database_url())


async def test_a_job_event_one_replica_commits_reaches_a_watcher_of_another_with_no_gap(tmp_path: Path) -> None:
    url = pgserver.fresh_database_url()
    async with (
        FleetcmdApp(make_settings(tmp_path / "a", allow_anonymous=True, database_url=url)) as first,
        FleetcmdApp(make_settings(tmp_path / "b", allow_anonymous=True, database_url=url)) as second,
        app_channel(first) as first_channel,
        # (One admin key for the database: the first replica created it.)
        app_channel(second, key=admin_key(first.settings.data_dir)) as second_channel,
    ):
        start = await store_of(first).last_sequence()
        # Watching the other replica from before the job exists: everything reaches it live, by its store's follower.
        watch = pb_grpc.CommandServiceStub(second_channel).Stream(pb.StreamRequest(after_sequence=start), timeout=TIMEOUT)
        # No device connected: both executions stay QUEUED while the first replica pauses, then cancels the job.
        job = await jobs_of(first).create(spec(("rp-1", "rp-2")))
        await until(first, job.job_id, lambda j: j.counts.get("QUEUED", 0) == 2)
        await jobs_of(first).pause(job.job_id)
        await jobs_of(first).cancel(job.job_id)
        done = await until(first, job.job_id, lambda j: j.job_id not in jobs_of(first)._runs)
        end = await store_of(first).last_sequence()
        seen = await read_until(watch, lambda e: e.sequence == end)
        watch.cancel()
        # The other replica's watcher got the whole log, each event once, in order.
        assert sequences(seen) == list(range(start + 1, end + 1))
        of_job = [e for e in seen if e.job_id == job.job_id]
        assert of_job == seen  # (nothing else happened)
        states = [e.job.state for e in seen if e.HasField("job")]
        assert states[0] == jpb.JOB_STATE_IN_PROGRESS and jpb.JOB_STATE_PAUSED in states
        assert states[-1] == jpb.JOB_STATE_CANCELED
        # Its snapshots are those the committing replica streams (built from memory there, from the stored job here).
        own = pb_grpc.CommandServiceStub(first_channel).Stream(
            pb.StreamRequest(after_sequence=start, job_id=job.job_id), timeout=TIMEOUT
        )
        assert await read_until(own, lambda e: e.sequence == end) == of_job
        own.cancel()
        # The first shows the spec (the follower read it from the stored job); no later one does.
        first_job, *later = [e.job for e in seen if e.HasField("job")]
        assert first_job.spec.action == "reboot" and later and not any(j.HasField("spec") for j in later)
        assert later[-1] == convert_jobs.job(dataclasses.replace(done, spec=None)) and done.state is jb.JobState.CANCELED
