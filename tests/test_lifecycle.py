"""The pure state machine: every trigger from every status."""

import pytest

from server.core.lifecycle import DEVICE_REPORTABLE, Outcome, Status, Trigger, decide, initial_status

ACTIVE = [s for s in Status if not s.final]
FINAL = [s for s in Status if s.final]


def test_initial_status() -> None:
    assert initial_status(True) is Status.SENT
    assert initial_status(False) is Status.QUEUED


@pytest.mark.parametrize("current", ACTIVE)
def test_expiry_and_cancel_end_any_active_execution(current: Status) -> None:
    assert decide(current, Trigger.EXPIRED).status is Status.TIMED_OUT
    assert decide(current, Trigger.EXPIRED).outcome is Outcome.CHANGE
    assert decide(current, Trigger.CANCEL).status is Status.CANCELED


@pytest.mark.parametrize("current", FINAL)
def test_final_is_final(current: Status) -> None:
    assert decide(current, Trigger.CANCEL).outcome is Outcome.REFUSE
    for trigger in (Trigger.EXPIRED, Trigger.PUBLISHED, Trigger.ACKED):
        d = decide(current, trigger)
        assert d.outcome is Outcome.IGNORE and d.status is current


def test_publish_and_ack_only_move_forward() -> None:
    assert decide(Status.QUEUED, Trigger.PUBLISHED).status is Status.SENT
    assert decide(Status.SENT, Trigger.PUBLISHED).outcome is Outcome.IGNORE
    assert decide(Status.SENT, Trigger.ACKED).status is Status.DELIVERED
    assert decide(Status.QUEUED, Trigger.ACKED).status is Status.DELIVERED
    # A PUBACK processed after the device already said IN_PROGRESS must not move it back.
    assert decide(Status.IN_PROGRESS, Trigger.ACKED).outcome is Outcome.IGNORE


@pytest.mark.parametrize("current", ACTIVE)
@pytest.mark.parametrize("reported", sorted(DEVICE_REPORTABLE))
def test_device_report_on_active(current: Status, reported: Status) -> None:
    d = decide(current, Trigger.DEVICE_REPORT, reported)
    if reported == current:
        assert d.outcome is Outcome.DUPLICATE
    elif reported < current:
        assert d.outcome is Outcome.IGNORE
    else:
        assert d.outcome is Outcome.CHANGE and d.status is reported


@pytest.mark.parametrize("current", FINAL)
@pytest.mark.parametrize("reported", sorted(DEVICE_REPORTABLE))
def test_first_final_status_wins(current: Status, reported: Status) -> None:
    same = decide(current, Trigger.DEVICE_REPORT, reported, same_report=True)
    other = decide(current, Trigger.DEVICE_REPORT, reported, same_report=False)
    assert same.status is current and other.status is current
    assert other.outcome is Outcome.LATE
    assert same.outcome is (Outcome.DUPLICATE if reported == current else Outcome.LATE)


@pytest.mark.parametrize("bad", [None, Status.QUEUED, Status.SENT, Status.DELIVERED, Status.TIMED_OUT, Status.CANCELED])
def test_device_cannot_report_service_statuses(bad: Status | None) -> None:
    with pytest.raises(ValueError):
        decide(Status.SENT, Trigger.DEVICE_REPORT, bad)


def test_status_numbers_match_proto() -> None:
    from server.pb import commands_pb2 as pb

    for status in Status:
        assert pb.ExecutionStatus.Value(status.name) == int(status)
    assert len(pb.ExecutionStatus.keys()) == len(Status) + 1  # + UNSPECIFIED
