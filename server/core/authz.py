"""Who may do what: the role each operation needs, whichever surface it comes through.

Neither API surface owns this table. ``server.api.grpc_auth`` maps each gRPC method
to an :class:`Operation`, ``server.api.http_rest`` names the operation of each route
(``server.api.http_app`` that of ``/metrics``); both then ask :func:`required_role`.
"""

from __future__ import annotations

import enum

from server.core.apikeys import Role


class Operation(enum.Enum):
    """Something an API caller asks for."""

    SEND = "send"  # one command, or a stream of them
    GET = "get"
    LIST = "list"
    STREAM = "stream"  # execution events
    CANCEL = "cancel"
    RERUN = "rerun"
    READ_THINGS = "read things"
    WATCH_PRESENCE = "watch presence"
    MANAGE_THINGS = "manage things"  # create, update, delete, rotate credentials
    READ_THING_TYPES = "read thing types"
    MANAGE_THING_TYPES = "manage thing types"  # put, delete
    READ_METRICS = "read metrics"
    READ_JOBS = "read jobs"  # get, list, watch
    MANAGE_JOBS = "manage jobs"  # create (and its dry run), pause, resume, cancel, rerun failed


# The least role each operation needs; every operation is listed (tests/test_surfaces.py checks it).
REQUIRED_ROLE: dict[Operation, Role] = {
    Operation.SEND: Role.OPERATOR,
    Operation.CANCEL: Role.OPERATOR,
    Operation.RERUN: Role.OPERATOR,
    Operation.MANAGE_JOBS: Role.OPERATOR,  # a job is many commands: the role that sends them
    Operation.GET: Role.VIEWER,
    Operation.LIST: Role.VIEWER,
    Operation.STREAM: Role.VIEWER,
    Operation.READ_THINGS: Role.VIEWER,
    Operation.WATCH_PRESENCE: Role.VIEWER,
    Operation.READ_THING_TYPES: Role.VIEWER,
    Operation.READ_JOBS: Role.VIEWER,
    Operation.READ_METRICS: Role.VIEWER,  # counters say how the fleet behaves: any key may read them
    Operation.MANAGE_THINGS: Role.ADMIN,
    Operation.MANAGE_THING_TYPES: Role.ADMIN,
}


def required_role(operation: Operation | None) -> Role:
    """The least role ``operation`` needs; an operation nobody named (None) needs ADMIN."""
    if operation is None:
        return Role.ADMIN
    return REQUIRED_ROLE.get(operation, Role.ADMIN)
