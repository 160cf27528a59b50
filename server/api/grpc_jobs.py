"""gRPC ``fleetcmd.v1.JobService`` on top of :class:`~server.core.job_runner.JobsCore`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from server.api import convert_jobs
from server.api.grpc_auth import bearer
from server.api.grpc_errors import maps_errors
from server.api.grpc_metrics import CallTimer
from server.core.apikeys import parse_key
from server.core.errors import InvalidArgument
from server.core.job_runner import JobsCore
from server.core.models import later_job_event
from server.core.validation import check_execution_id, check_job_targets
from server.pb import jobs_pb2 as jpb
from server.pb import jobs_pb2_grpc as jpb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = jpb.DESCRIPTOR.services_by_name["JobService"].full_name


def caller(context: Context) -> str:
    """The key id of the caller (the interceptor has authenticated the key already)."""
    token = bearer(context.invocation_metadata())
    parsed = parse_key(token) if token else None
    return parsed[0] if parsed else ""


def _job_id(job_id: str) -> str:
    check_execution_id(job_id, "job_id")
    return job_id


class JobServicer(jpb_grpc.JobServiceServicer):
    """Implements ``fleetcmd.v1.JobService``."""

    # Observes each call's duration (set by the server; None: not observed).
    call_timer: CallTimer | None = None

    def __init__(self, jobs: JobsCore) -> None:
        self._jobs = jobs

    @maps_errors
    async def CreateJob(self, request: jpb.CreateJobRequest, context: Context) -> jpb.CreateJobResponse:  # noqa: N802
        """See the proto."""
        spec = convert_jobs.job_spec(request.spec)
        try:
            check_job_targets(spec.targets)
            if request.dry_run:
                return jpb.CreateJobResponse(dry_run=convert_jobs.dry_run(await self._jobs.dry_run(spec)))
            job = await self._jobs.create(spec, created_by=caller(context))
        except InvalidArgument as exc:
            raise convert_jobs.spec_error(exc) from None
        return jpb.CreateJobResponse(job=convert_jobs.job(job))

    @maps_errors
    async def GetJob(self, request: jpb.GetJobRequest, context: Context) -> jpb.Job:  # noqa: N802
        """See the proto."""
        return convert_jobs.job(await self._jobs.get(_job_id(request.job_id)))

    @maps_errors
    async def ListJobs(self, request: jpb.ListJobsRequest, context: Context) -> jpb.ListJobsResponse:  # noqa: N802
        """See the proto."""
        states = convert_jobs.job_states(request.states)
        page = await self._jobs.list(states=states, page_size=request.page_size, page_token=request.page_token)
        return jpb.ListJobsResponse(jobs=[convert_jobs.job(j) for j in page.jobs], next_page_token=page.next_page_token)

    @maps_errors
    async def PauseJob(self, request: jpb.PauseJobRequest, context: Context) -> jpb.Job:  # noqa: N802
        """See the proto."""
        return convert_jobs.job(await self._jobs.pause(_job_id(request.job_id)))

    @maps_errors
    async def ResumeJob(self, request: jpb.ResumeJobRequest, context: Context) -> jpb.Job:  # noqa: N802
        """See the proto."""
        return convert_jobs.job(await self._jobs.resume(_job_id(request.job_id)))

    @maps_errors
    async def CancelJob(self, request: jpb.CancelJobRequest, context: Context) -> jpb.Job:  # noqa: N802
        """See the proto."""
        job = await self._jobs.cancel(_job_id(request.job_id), only_undelivered=request.only_undelivered)
        return convert_jobs.job(job)

    @maps_errors
    async def RerunFailed(self, request: jpb.RerunFailedRequest, context: Context) -> jpb.Job:  # noqa: N802
        """See the proto."""
        job_id = _job_id(request.job_id)
        statuses = convert_jobs.rerun_statuses(request.statuses)
        return convert_jobs.job(await self._jobs.rerun_failed(job_id, statuses))

    @maps_errors
    async def WatchJob(self, request: jpb.WatchJobRequest, context: Context) -> AsyncIterator[jpb.Job]:  # noqa: N802
        """See the proto: the spec only in the first message (it never changes; it can be megabytes)."""
        shown = False
        async for job in self._jobs.watch(_job_id(request.job_id)):
            yield convert_jobs.job(later_job_event(job) if shown else job)
            shown = True
