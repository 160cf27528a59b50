"""The pure rules of a state change (server.core.decisions), without any store."""

from __future__ import annotations

import dataclasses

import pytest

from server.core import decisions
from server.core.errors import AlreadyExists, NotFound, ThingMismatch
from server.core.lifecycle import Outcome, Status, Trigger
from server.core.models import DeviceReport, Execution, NewExecution, Reason


def new(*, key: str = "", fp: str = "", status: Status = Status.QUEUED) -> NewExecution:
    return NewExecution(
        execution_id="e1",
        command_id="c1",
        thing_id="t1",
        action="reboot",
        params_json='{"n":1}',
        ttl_seconds=30,
        status=status,
        created_at_ms=1_000,
        expires_at_ms=31_000,
        idempotency_key=key,
        fingerprint=fp,
        thing_type="dimmer",
        rerun_of="e0",
    )


def execution(status: Status = Status.SENT, result_json: str | None = None, reason: Reason | None = None) -> Execution:
    result, _ = decisions.create(new(status=status), None, 1)
    ex = result.execution
    return dataclasses.replace(ex, result_json=result_json, reason=reason)


def test_a_create_makes_the_row_and_its_first_event() -> None:
    result, change = decisions.create(new(key="k", fp="F"), 7, 42)
    ex = result.execution
    assert result.created and change.created and change.fingerprint == "F"
    assert (ex.execution_id, ex.status, ex.kaa_id, ex.updated_at_ms, ex.thing_type, ex.rerun_of) == (
        "e1",
        Status.QUEUED,
        7,
        1_000,
        "dimmer",
        "e0",
    )
    assert change.execution is ex and change.event is result.event
    assert result.event is not None
    assert (result.event.sequence, result.event.previous_status, result.event.note) == (42, None, "created")


def test_an_idempotent_retry_returns_the_existing_execution_or_refuses_the_key() -> None:
    existing = execution()
    again = decisions.idempotent_retry(new(key="k", fp="F"), existing, "F")
    assert again.execution is existing and not again.created and again.event is None
    with pytest.raises(AlreadyExists, match=r"idempotency_key .k. was used for a different request \(execution e1\)"):
        decisions.idempotent_retry(new(key="k", fp="G"), existing, "F")


def test_the_next_kaa_id_follows_the_highest() -> None:
    assert decisions.next_kaa_id(0) == 1
    assert decisions.next_kaa_id(41) == 42


def test_a_trigger_on_a_missing_execution_or_for_another_thing_is_refused() -> None:
    with pytest.raises(NotFound, match="execution 'e9' not found"):
        decisions.transition(None, "e9", Trigger.CANCEL, 5, None, None, None, 1)
    with pytest.raises(ThingMismatch, match="names thing 't2'"):
        decisions.transition(execution(), "e1", Trigger.DEVICE_REPORT, 5, DeviceReport(Status.FAILED), "t2", None, 1)


def test_a_report_changes_the_execution_and_carries_its_result() -> None:
    report = DeviceReport(Status.SUCCEEDED, '{"t":1}', Reason("200", "ok"))
    result, change = decisions.transition(
        execution(), "e1", Trigger.DEVICE_REPORT, 9, report, "t1", lambda ex, rep: ["$.t: too low"], 5
    )
    assert result.decision.outcome is Outcome.CHANGE and change is not None
    ex = result.execution
    assert (ex.status, ex.updated_at_ms, ex.completed_at_ms, ex.result_json, ex.reason) == (
        Status.SUCCEEDED,
        9,
        9,
        '{"t":1}',
        Reason("200", "ok"),
    )
    assert ex.result_violations == ("$.t: too low",)
    assert change.execution is ex and change.event is result.event and not change.created
    assert result.event is not None
    assert (result.event.sequence, result.event.status, result.event.previous_status, result.event.late) == (
        5,
        Status.SUCCEEDED,
        Status.SENT,
        False,
    )


def test_a_trigger_without_a_report_keeps_the_last_result() -> None:
    current = execution(Status.IN_PROGRESS, '{"p":50}', Reason("102", "half"))
    result, change = decisions.transition(current, "e1", Trigger.EXPIRED, 9, None, None, None, 3)
    assert change is not None and result.execution.status is Status.TIMED_OUT
    assert (result.execution.result_json, result.execution.reason) == ('{"p":50}', Reason("102", "half"))
    assert result.execution.completed_at_ms == 9
    assert result.event is not None and result.event.result_json is None
    assert current.status is Status.IN_PROGRESS  # the input is never changed


def test_a_late_report_is_logged_and_leaves_the_execution_alone() -> None:
    current = execution(Status.SUCCEEDED, '{"t":1}')
    result, change = decisions.transition(current, "e1", Trigger.DEVICE_REPORT, 9, DeviceReport(Status.FAILED), None, None, 8)
    assert result.decision.outcome is Outcome.LATE and result.execution is current
    assert change is not None and change.execution is None and change.event is result.event
    assert result.event is not None and result.event.late and result.event.status is Status.FAILED
    assert result.event.previous_status is Status.SUCCEEDED


def test_the_same_report_again_is_a_duplicate_and_writes_nothing() -> None:
    current = execution(Status.SUCCEEDED, '{"t":1}')
    result, change = decisions.transition(
        current, "e1", Trigger.DEVICE_REPORT, 9, DeviceReport(Status.SUCCEEDED, '{"t":1}'), None, None, 8
    )
    assert result.decision.outcome is Outcome.DUPLICATE and change is None and result.event is None
    # The same status with another result is not the same report: late.
    other, _ = decisions.transition(
        current, "e1", Trigger.DEVICE_REPORT, 9, DeviceReport(Status.SUCCEEDED, '{"t":2}'), None, None, 8
    )
    assert other.decision.outcome is Outcome.LATE


@pytest.mark.parametrize(("trigger", "outcome"), [(Trigger.EXPIRED, Outcome.IGNORE), (Trigger.CANCEL, Outcome.REFUSE)])
def test_a_final_execution_keeps_its_first_final_status(trigger: Trigger, outcome: Outcome) -> None:
    current = execution(Status.SUCCEEDED)
    result, change = decisions.transition(current, "e1", trigger, 9, None, None, None, 8)
    assert result.decision.outcome is outcome and change is None and result.execution is current
