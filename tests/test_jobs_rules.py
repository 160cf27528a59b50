"""The pure job rules (server/core/jobs.py): state machine, bounds, pacing, abort, canary, retries, matching."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.core import jobs as jb
from server.core.errors import InvalidArgument
from server.core.lifecycle import Status

NOW = 1_700_000_000_000


def spec(**kw: object) -> jb.JobSpec:
    base = jb.JobSpec(action="reboot", params=None, ttl_seconds=30, targets=jb.Targets(thing_type="sensor"))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def fields_of(exc: InvalidArgument) -> set[str]:
    return {v.field for v in exc.violations}


# ---- state machine ----


def test_state_machine_allowed_and_refused() -> None:
    assert jb.next_state(jb.JobState.SCHEDULED, jb.JobEvent.START) is jb.JobState.IN_PROGRESS
    assert jb.next_state(jb.JobState.IN_PROGRESS, jb.JobEvent.PAUSE) is jb.JobState.PAUSED
    assert jb.next_state(jb.JobState.PAUSED, jb.JobEvent.RESUME) is jb.JobState.IN_PROGRESS
    assert jb.next_state(jb.JobState.PAUSED, jb.JobEvent.RESUME, started=False) is jb.JobState.SCHEDULED
    assert jb.next_state(jb.JobState.IN_PROGRESS, jb.JobEvent.ABORT) is jb.JobState.ABORTED
    assert jb.next_state(jb.JobState.IN_PROGRESS, jb.JobEvent.RESUME) is None
    assert jb.next_state(jb.JobState.SCHEDULED, jb.JobEvent.COMPLETE) is None


@given(st.sampled_from(list(jb.JobState)), st.sampled_from(list(jb.JobEvent)))
def test_final_states_never_move(state: jb.JobState, event: jb.JobEvent) -> None:
    target = jb.next_state(state, event)
    if state.final:
        assert target is None
    assert {s for s in jb.JobState if s.final} == {jb.JobState.COMPLETED, jb.JobState.CANCELED, jb.JobState.ABORTED}


# ---- bounds: the value at the bound passes, one beyond is refused ----


@pytest.mark.parametrize(
    ("change", "field", "ok"),
    [
        (lambda n: {"targets": jb.Targets(thing_ids=tuple(f"t{i}" for i in range(n)))}, "targets.thing_ids", jb.MAX_TARGET_IDS),
        (
            lambda n: {"targets": jb.Targets(thing_type="x", exclude=tuple(f"t{i}" for i in range(n)))},
            "targets.exclude",
            jb.MAX_TARGET_IDS,
        ),
        (
            lambda n: {"targets": jb.Targets(attributes=tuple((f"k{i}", "v") for i in range(n)))},
            "targets.attributes",
            jb.MAX_SELECTOR_ATTRIBUTES,
        ),
        (lambda n: {"rollout": jb.Rollout(max_per_minute=n)}, "rollout.max_per_minute", jb.MAX_PER_MINUTE),
        (lambda n: {"rollout": jb.Rollout(max_in_flight=n)}, "rollout.max_in_flight", jb.MAX_IN_FLIGHT),
        (lambda n: {"abort": (jb.AbortCriterion(jb.FailureType.ANY, 10, 1),) * n}, "abort", jb.MAX_ABORT_CRITERIA),
        (lambda n: {"retries": (jb.RetryPolicy(jb.FailureType.FAILED, n),)}, "retries[0].max_attempts", jb.MAX_RETRY_ATTEMPTS),
        (
            lambda n: {"retries": (jb.RetryPolicy(jb.FailureType.FAILED, 1, base_seconds=float(n)),)},
            "retries[0].base_seconds",
            int(jb.MAX_BACKOFF_SECONDS),
        ),
        (lambda n: {"description": "d" * n}, "description", jb.MAX_DESCRIPTION),
        (lambda n: {"idempotency_key": "k" * n}, "idempotency_key", jb.MAX_IDEMPOTENCY_KEY),
    ],
)
def test_every_bound_accepts_the_bound_and_refuses_one_more(change, field: str, ok: int) -> None:  # type: ignore[no-untyped-def]
    jb.validate_spec(spec(**change(ok)), now_ms=NOW)
    with pytest.raises(InvalidArgument) as err:
        jb.validate_spec(spec(**change(ok + 1)), now_ms=NOW)
    assert field in fields_of(err.value)


def test_spec_refusals_name_their_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        jb.validate_spec(
            spec(
                targets=jb.Targets(),
                rollout=jb.Rollout(max_per_minute=-1, ramp=jb.Ramp(0, 1.0)),
                abort=(jb.AbortCriterion(jb.FailureType.FAILED, 0, 0),),
                canary=jb.Canary(0, 101),
                retries=(jb.RetryPolicy(jb.FailureType.ANY, 1, backoff="linear"), jb.RetryPolicy(jb.FailureType.FAILED, 1)),
                schedule=jb.Schedule(start_at_ms=NOW + 10, end_at_ms=NOW + 5),
            ),
            now_ms=NOW,
        )
    assert fields_of(err.value) >= {
        "targets",
        "rollout.max_per_minute",
        "rollout.ramp.base_per_minute",
        "rollout.ramp.factor",
        "rollout.ramp",
        "abort[0].threshold_pct",
        "abort[0].min_finished",
        "canary.count",
        "canary.success_pct",
        "retries[0].backoff",
        "retries[1].failure",
        "schedule.end_at_ms",
    }


# ---- matching ----


def test_matching_is_the_and_of_selectors_minus_excludes() -> None:
    t = jb.Targets(thing_type="sensor", attributes=(("site", "north"), ("floor", "2")), exclude=("b",), online_only=True)
    attrs = {"site": "north", "floor": "2", "extra": "x"}
    assert jb.matches(t, "a", "sensor", attrs, True)
    assert not jb.matches(t, "b", "sensor", attrs, True)  # excluded
    assert not jb.matches(t, "a", "valve", attrs, True)
    assert not jb.matches(t, "a", "sensor", {"site": "north"}, True)
    assert not jb.matches(t, "a", "sensor", attrs, False)
    assert jb.matches(jb.Targets(thing_ids=("a", "c")), "c", "", {}, False)
    assert not jb.matches(jb.Targets(thing_ids=("a", "c")), "d", "", {}, False)


# ---- pacing ----


@settings(max_examples=200)
@given(
    rate=st.integers(min_value=1, max_value=600_000),
    wakes=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=400),
)
def test_pacer_never_puts_more_than_rate_over_60_plus_one_in_a_second(rate: int, wakes: list[int]) -> None:
    """Whatever the loop's wake-up times, no 1-second window holds more than rate/60 + 1 dispatches."""
    pacer = jb.Pacer()
    now = NOW
    times: list[int] = []
    for gap in wakes:
        now += gap
        if pacer.allowed(now, rate):
            pacer.took(now)
            times.append(now)
    limit = rate / 60 + 1
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - 1000:
            j += 1
        assert i - j + 1 <= limit


def test_pacer_restart_derives_the_next_slot_from_the_last_dispatch() -> None:
    pacer = jb.Pacer(last_dispatch_ms=NOW)
    assert pacer.next_at(60) == NOW + 1000
    assert pacer.allowed(NOW + 999, 60) == 0
    assert pacer.allowed(NOW + 1000, 60) == 1
    assert jb.Pacer().allowed(NOW, 60) == 1
    assert jb.Pacer(NOW).allowed(NOW, 0) == -1


def test_ramp_grows_by_factor_per_step_and_is_capped() -> None:
    ramp = jb.Ramp(base_per_minute=60, factor=2.0, every_notified=10)
    assert jb.ramp_rate(ramp, notified=9, succeeded=0) == 60
    assert jb.ramp_rate(ramp, notified=10, succeeded=0) == 120
    assert jb.ramp_rate(ramp, notified=35, succeeded=0) == 480
    assert jb.ramp_rate(ramp, notified=35, succeeded=0, cap=200) == 200
    assert jb.ramp_rate(ramp, notified=10**9, succeeded=0) == jb.MAX_PER_MINUTE
    by_success = jb.Ramp(base_per_minute=60, factor=3.0, every_succeeded=5)
    assert jb.ramp_rate(by_success, notified=100, succeeded=4) == 60
    assert jb.ramp_rate(by_success, notified=100, succeeded=5) == 180
    assert jb.rate_per_minute(jb.Rollout(max_per_minute=100, ramp=by_success), notified=0, succeeded=50) == 100


def test_room_under_max_in_flight() -> None:
    assert jb.room(jb.Rollout(max_in_flight=3), 2) == 1
    assert jb.room(jb.Rollout(max_in_flight=3), 3) == 0
    assert jb.room(jb.Rollout(max_in_flight=3), 5) == 0
    assert jb.room(jb.Rollout(), 10**6) == -1


# ---- abort, canary, retries ----


def test_abort_criterion_at_the_threshold_and_minimum() -> None:
    c = (jb.AbortCriterion(jb.FailureType.FAILED, 20.0, 10),)
    assert jb.abort_reason(c, {"FAILED": 2, "SUCCEEDED": 8}) != ""  # 20% of 10: met
    assert jb.abort_reason(c, {"FAILED": 2, "SUCCEEDED": 9}) == ""  # 18%
    assert jb.abort_reason(c, {"FAILED": 2, "SUCCEEDED": 7}) == ""  # only 9 finished
    assert jb.abort_reason(c, {"FAILED": 2, "SUCCEEDED": 7, "IN_PROGRESS": 5}) == ""  # in flight is not finished
    assert jb.abort_reason(c, {"TIMED_OUT": 5, "SUCCEEDED": 5}) == ""  # other failure type
    reason = jb.abort_reason((jb.AbortCriterion(jb.FailureType.ANY, 50, 4),), {"TIMED_OUT": 1, "REJECTED": 1, "SUCCEEDED": 2})
    assert "ANY" in reason and "2 of 4" in reason


def test_canary_verdict() -> None:
    canary = jb.Canary(count=4, success_pct=75)
    assert jb.canary_verdict(canary, {"SUCCEEDED": 3, "IN_PROGRESS": 1}, 4) is None
    assert jb.canary_verdict(canary, {"SUCCEEDED": 3, "FAILED": 1}, 4) is True
    assert jb.canary_verdict(canary, {"SUCCEEDED": 2, "FAILED": 2}, 4) is False


def test_retry_policy_choice_and_backoff() -> None:
    fixed = jb.RetryPolicy(jb.FailureType.TIMED_OUT, 3, "fixed", base_seconds=2)
    anyp = jb.RetryPolicy(jb.FailureType.ANY, 1, "exponential", base_seconds=1, max_seconds=5)
    assert jb.retry_policy((anyp, fixed), Status.TIMED_OUT) is fixed
    assert jb.retry_policy((anyp, fixed), Status.FAILED) is anyp
    assert jb.retry_policy((fixed,), Status.FAILED) is None
    assert jb.retry_policy((anyp,), Status.SUCCEEDED) is None
    assert jb.retry_delay(fixed, 3, "s") == 2
    assert [jb.retry_delay(anyp, n, "s") for n in (1, 2, 3, 4)] == [1, 2, 4, 5]


@given(st.integers(min_value=1, max_value=10), st.text(max_size=20))
def test_jitter_is_within_the_delay_and_fixed_by_its_seed(n: int, seed: str) -> None:
    p = jb.RetryPolicy(jb.FailureType.FAILED, 10, "exponential", base_seconds=1, max_seconds=60, jitter=True)
    plain = jb.retry_delay(dataclasses.replace(p, jitter=False), n, seed)
    d = jb.retry_delay(p, n, seed)
    assert 0 <= d <= plain
    assert d == jb.retry_delay(p, n, seed)


# ---- serialisation ----

_names = st.text(alphabet="abcxyz01", min_size=1, max_size=6)


@given(
    ids=st.lists(_names, max_size=5),
    attrs=st.dictionaries(_names, _names, max_size=3),
    rate=st.integers(0, 1000),
    mode=st.sampled_from(list(jb.TargetMode)),
    ramp=st.booleans(),
    params=st.none() | st.dictionaries(_names, st.integers() | st.text(max_size=5), max_size=3),
)
def test_spec_json_round_trip(
    ids: list[str], attrs: dict[str, str], rate: int, mode: jb.TargetMode, ramp: bool, params: dict[str, object] | None
) -> None:
    s = jb.JobSpec(
        action="a",
        params=params,
        ttl_seconds=5,
        targets=jb.Targets(thing_ids=tuple(ids), attributes=tuple(attrs.items()), mode=mode, exclude=("z",)),
        rollout=jb.Rollout(max_per_minute=rate, ramp=jb.Ramp(10, 1.5, every_succeeded=3) if ramp else None, max_in_flight=4),
        abort=(jb.AbortCriterion(jb.FailureType.REJECTED, 12.5, 3),),
        canary=jb.Canary(2, 50.0),
        retries=(jb.RetryPolicy(jb.FailureType.TIMED_OUT, 2, "exponential", 1.0, 8.0, True),),
        schedule=jb.Schedule(1, 2, jb.EndBehavior.CANCEL_NOT_FINAL),
        strict=True,
        description="d",
        idempotency_key="k",
    )
    assert jb.spec_from_json(jb.spec_to_json(s)) == s
    assert jb.spec_fingerprint(s) == jb.spec_fingerprint(jb.spec_from_json(jb.spec_to_json(s)))


def test_the_stored_spec_keeps_the_params_order_and_the_fingerprint_ignores_it() -> None:
    """A job read back from the store shows its params as submitted; a retry listing them in another order is the same job."""

    def spec(params: dict[str, object]) -> jb.JobSpec:
        return jb.JobSpec(action="a", params=params, ttl_seconds=5, targets=jb.Targets(thing_ids=("t",)))

    submitted = {"zeta": 1, "alpha": {"y": [{"k": 1, "b": 2}], "b": None}, "mid": "x"}
    reordered = {"mid": "x", "alpha": {"b": None, "y": [{"b": 2, "k": 1}]}, "zeta": 1}
    back = jb.spec_from_json(jb.spec_to_json(spec(submitted))).params
    assert back is not None
    assert list(back) == ["zeta", "alpha", "mid"]
    assert list(back["alpha"]) == ["y", "b"]  # type: ignore[call-overload]
    assert list(back["alpha"]["y"][0]) == ["k", "b"]  # type: ignore[index]
    assert jb.spec_fingerprint(spec(submitted)) == jb.spec_fingerprint(spec(reordered))
    assert jb.spec_fingerprint(spec(submitted)) != jb.spec_fingerprint(spec({**submitted, "zeta": 2}))


def test_counts_move() -> None:
    c = jb.Counts()
    c.move(None, "PENDING", 3)
    c.move("PENDING", "QUEUED")
    c.move("QUEUED", "SUCCEEDED")
    assert c.by_name == {"PENDING": 2, "SUCCEEDED": 1}
    c.move("PENDING", "SENT", 2)
    assert c.in_flight() == 2 and "PENDING" not in c.by_name
