"""The execution state machine: pure functions, no I/O.

Every component that changes an execution's status asks :func:`decide` what
the change means; nothing else encodes transition rules.

Statuses advance along a rank (QUEUED < SENT < DELIVERED < IN_PROGRESS <
final). A trigger that would move an execution backwards is ignored (a PUBACK
processed after the device already answered, say). Once final, the first
final status wins: an identical device report is a duplicate (dropped), any
other device report is recorded as *late* without changing the status.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from server.core.records import fast_init


class Status(enum.IntEnum):
    """Execution status; values equal the ``fleetcmd.v1.ExecutionStatus`` numbers."""

    QUEUED = 1
    SENT = 2
    DELIVERED = 3
    IN_PROGRESS = 4
    SUCCEEDED = 5
    FAILED = 6
    REJECTED = 7
    TIMED_OUT = 8
    CANCELED = 9

    @property
    def final(self) -> bool:
        """Whether no further status change can happen."""
        return self >= Status.SUCCEEDED


FINAL_STATUSES = frozenset(s for s in Status if s.final)
ACTIVE_STATUSES = frozenset(s for s in Status if not s.final)

# Statuses a device may report in an EMQX/AWS-style response.
DEVICE_REPORTABLE = frozenset({Status.IN_PROGRESS, Status.SUCCEEDED, Status.FAILED, Status.REJECTED})


class Trigger(enum.Enum):
    """What happened to an execution."""

    PUBLISHED = "published"  # the request went out to a connected device
    ACKED = "acked"  # the device PUBACKed the request
    DEVICE_REPORT = "device_report"  # the device sent a status
    EXPIRED = "expired"  # the TTL ran out
    CANCEL = "cancel"  # an operator canceled


class Outcome(enum.Enum):
    """What :func:`decide` concluded."""

    CHANGE = "change"  # record the new status
    LATE = "late"  # record the report in the history, keep the status
    DUPLICATE = "duplicate"  # an identical repeat: record nothing
    IGNORE = "ignore"  # stale or no-op trigger: record nothing
    REFUSE = "refuse"  # the trigger is not allowed (e.g. cancel of a final execution)


@fast_init
@dataclass(frozen=True)
class Decision:
    """The result of applying a trigger to the current status."""

    outcome: Outcome
    status: Status  # the status after the decision
    note: str


_TRIGGER_TARGET = {
    Trigger.PUBLISHED: Status.SENT,
    Trigger.ACKED: Status.DELIVERED,
    Trigger.EXPIRED: Status.TIMED_OUT,
    Trigger.CANCEL: Status.CANCELED,
}

_NOTES = {
    Trigger.PUBLISHED: "published to device",
    Trigger.ACKED: "device acknowledged delivery",
    Trigger.DEVICE_REPORT: "device response",
    Trigger.EXPIRED: "ttl expired",
    Trigger.CANCEL: "canceled",
}


def initial_status(device_ready: bool) -> Status:
    """Status of a new execution: SENT when it can be published at once, else QUEUED."""
    return Status.SENT if device_ready else Status.QUEUED


def decide(
    current: Status,
    trigger: Trigger,
    reported: Status | None = None,
    *,
    same_report: bool = False,
) -> Decision:
    """Apply ``trigger`` to an execution in status ``current``.

    Args:
        current: The execution's status now.
        trigger: What happened.
        reported: For ``DEVICE_REPORT``, the status the device sent (must be in
            :data:`DEVICE_REPORTABLE`).
        same_report: For ``DEVICE_REPORT`` on a final execution, whether the
            report repeats the one that made it final (same status and result).

    Returns:
        The decision; for ``CHANGE`` its ``status`` is the new status.

    Raises:
        ValueError: ``reported`` is missing or not reportable for a device report.
    """
    note = _NOTES[trigger]
    if trigger is Trigger.DEVICE_REPORT:
        if reported is None or reported not in DEVICE_REPORTABLE:
            raise ValueError(f"a device cannot report {reported!r}")
        if current.final:
            if same_report and reported == current:
                return Decision(Outcome.DUPLICATE, current, "duplicate response")
            return Decision(Outcome.LATE, current, f"late response after {current.name}")
        if reported == current:  # IN_PROGRESS repeated: a heartbeat, not a change
            return Decision(Outcome.DUPLICATE, current, "duplicate response")
        if reported < current:
            return Decision(Outcome.IGNORE, current, "stale response")
        return Decision(Outcome.CHANGE, reported, note)

    target = _TRIGGER_TARGET[trigger]
    if current.final:
        if trigger is Trigger.CANCEL:
            return Decision(Outcome.REFUSE, current, f"execution is already {current.name}")
        return Decision(Outcome.IGNORE, current, f"execution is already {current.name}")
    if target.final or target > current:
        return Decision(Outcome.CHANGE, target, note)
    return Decision(Outcome.IGNORE, current, f"already {current.name}")
