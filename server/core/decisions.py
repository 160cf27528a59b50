"""The rules of a state change, decided in one place: pure functions, no I/O.

A store implementation reads what a decision needs (the execution as its write
transaction sees it, the execution an idempotency key already made, the highest
Kaa command id given out) and persists, atomically, the row and the event the
decision returns; it decides nothing itself. So every store applies the same
rules, and a second store only has to supply the reads and the atomic write:

- a create either returns the execution its idempotency key already made (same
  request fingerprint), refuses the key (different request: ``AlreadyExists``),
  or makes a new execution and its first event;
- a Kaa execution gets the next command id of its thing and action (highest + 1);
- a trigger on an execution is decided by :func:`server.core.lifecycle.decide` against
  the status the store holds: a change, a late report (recorded in the log, the
  execution left alone), a duplicate or an ignored trigger (nothing written), a
  refusal (cancel of a final execution); the first final status wins because
  the decision is made against the committed status inside the write;
- a device report carries the result (checked against the action's result
  schema) and the reason; other triggers keep what the device sent last.

Events are numbered by the caller (``sequence``): the store hands out its next
sequence number, and writes the event only when the decision has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.core.errors import AlreadyExists, NotFound, ThingMismatch
from server.core.lifecycle import Decision, Outcome, Trigger, decide
from server.core.models import DeviceReport, Execution, NewExecution, StateChange
from server.store import CreateResult, ResultCheck, TransitionResult


@dataclass(slots=True)
class Change:
    """What one decision writes: at most one execution row and one event."""

    execution: Execution | None  # the row's new state; None when only the event is recorded
    event: StateChange | None
    created: bool = False
    fingerprint: str = ""  # of the request that created the row (idempotency), stored with it


def _evolve(current: Execution, **changes: Any) -> Execution:
    # A copy with some fields changed, without running __init__ over twenty fields again.
    updated: Execution = object.__new__(Execution)
    updated.__dict__.update(current.__dict__)
    updated.__dict__.update(changes)
    return updated


def idempotent_retry(new: NewExecution, existing: Execution, existing_fingerprint: str) -> CreateResult:
    """A create whose idempotency key already made ``existing``: that execution again, nothing written.

    Raises:
        AlreadyExists: the key was used for a different request.
    """
    if existing_fingerprint != new.fingerprint:
        raise AlreadyExists(
            f"idempotency_key {new.idempotency_key!r} was used for a different request (execution {existing.execution_id})"
        )
    return CreateResult(existing, created=False, event=None)


def next_kaa_id(highest: int) -> int:
    """The Kaa command id after ``highest`` (0 when the thing and action have none yet)."""
    return highest + 1


def create(new: NewExecution, kaa_id: int | None, sequence: int) -> tuple[CreateResult, Change]:
    """A new execution (with its Kaa command id, if any) and its first event, numbered ``sequence``."""
    execution = Execution(
        execution_id=new.execution_id,
        command_id=new.command_id,
        thing_id=new.thing_id,
        action=new.action,
        params_json=new.params_json,
        ttl_seconds=new.ttl_seconds,
        status=new.status,
        created_at_ms=new.created_at_ms,
        updated_at_ms=new.created_at_ms,
        expires_at_ms=new.expires_at_ms,
        idempotency_key=new.idempotency_key,
        thing_type=new.thing_type,
        kaa_id=kaa_id,
        rerun_of=new.rerun_of,
    )
    event = StateChange(
        sequence=sequence,
        execution_id=new.execution_id,
        thing_id=new.thing_id,
        action=new.action,
        status=new.status,
        previous_status=None,
        at_ms=new.created_at_ms,
        note="created",
        job_id=new.job_id,
    )
    return CreateResult(execution, created=True, event=event), Change(execution, event, created=True, fingerprint=new.fingerprint)


def transition(
    current: Execution | None,
    execution_id: str,
    trigger: Trigger,
    at_ms: int,
    report: DeviceReport | None,
    expect_thing: str | None,
    result_check: ResultCheck | None,
    sequence: int,
) -> tuple[TransitionResult, Change | None]:
    """Decide one lifecycle trigger on ``current`` (None: the store has no such execution).

    Returns:
        The outcome, and what to write (None: nothing); its event is numbered ``sequence``.

    Raises:
        NotFound: ``current`` is None.
        ThingMismatch: ``expect_thing`` is given and is not the execution's thing.
    """
    if current is None:
        raise NotFound(f"execution {execution_id!r} not found")
    if expect_thing is not None and expect_thing != current.thing_id:
        raise ThingMismatch(
            f"report for execution {execution_id} names thing {expect_thing!r}, the execution's is {current.thing_id!r}"
        )
    same = report is not None and (
        report.status == current.status and report.result_json == current.result_json and report.reason == current.reason
    )
    decision: Decision = decide(current.status, trigger, report.status if report else None, same_report=same)
    outcome = decision.outcome
    if outcome is not Outcome.CHANGE and outcome is not Outcome.LATE:
        return TransitionResult(current, decision, None), None
    late = outcome is Outcome.LATE
    result_json = report.result_json if report else None
    reason = report.reason if report else None
    event = StateChange(
        sequence=sequence,
        execution_id=current.execution_id,
        thing_id=current.thing_id,
        action=current.action,
        status=report.status if (report and late) else decision.status,
        previous_status=current.status,
        at_ms=at_ms,
        late=late,
        result_json=result_json,
        reason=reason,
        note=decision.note,
        job_id=current.job_id,
    )
    if late:
        return TransitionResult(current, decision, event), Change(None, event)
    new_status = decision.status
    # A device report carries the result; other triggers keep what the device sent last.
    if report is not None:
        violations = tuple(result_check(current, report)) if result_check is not None else ()
        updated = _evolve(
            current,
            status=new_status,
            updated_at_ms=at_ms,
            completed_at_ms=at_ms if new_status.final else None,
            result_json=result_json,
            reason=reason,
            result_violations=violations,
        )
    else:
        updated = _evolve(current, status=new_status, updated_at_ms=at_ms, completed_at_ms=at_ms if new_status.final else None)
    return TransitionResult(updated, decision, event), Change(updated, event)
