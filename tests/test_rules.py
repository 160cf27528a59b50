"""Topic patterns, filter matching and the EMQX decoder (pure functions)."""

import json

import pytest

from broker_hooks.rules import DecodeError, RuleSet, TopicPattern
from broker_hooks.topics import filter_matches, level_problem
from server.core.lifecycle import Status
from server.dialects import emqx


def test_pattern_match_and_filter() -> None:
    p = TopicPattern("$emqx/commands/things/{thing}/executions/{execution}/response")
    assert p.match("$emqx/commands/things/t1/executions/e1/response") == {"thing": "t1", "execution": "e1"}
    assert p.match("$emqx/commands/things/t1/executions/e1/request") is None
    assert p.match("$emqx/commands/things/t1/executions//response") is None
    assert p.match("$emqx/commands/things/t1/executions/e1/response/x") is None
    assert p.as_filter(thing="t1") == "$emqx/commands/things/t1/executions/+/response"


@pytest.mark.parametrize(
    ("flt", "topic", "ok"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("a/+", "a/b/c", False),
        ("#", "$emqx/x", False),
        ("+/x", "$emqx/x", False),
        ("$emqx/+", "$emqx/x", True),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
    ],
)
def test_filter_matches(flt: str, topic: str, ok: bool) -> None:
    assert filter_matches(flt, topic) is ok


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "a#", "a\x00", "$x", "x" * 129])
def test_level_problem(bad: str) -> None:
    assert level_problem(bad)


def test_level_ok() -> None:
    assert level_problem("thermostat-001") is None


def test_request_payload_is_the_seed_shape() -> None:
    body = json.loads(
        emqx.encode_request(command_id="c1", action="setTemperature", params_json='{"value":24}', timestamp_s=17, ttl_seconds=30)
    )
    assert body == {"commandId": "c1", "action": "setTemperature", "params": {"value": 24}, "timestamp": 17, "ttl": 30}
    empty = emqx.encode_request(command_id="c", action="a", params_json=None, timestamp_s=1, ttl_seconds=1)
    assert json.loads(empty)["params"] == {}


def _decode(payload: bytes) -> emqx.ReportMessage:
    return emqx.decode_response({"thing": "t1", "execution": "e1"}, payload)


def test_decode_full_response() -> None:
    msg = _decode(b'{"status":"REJECTED","result":{"x":[1,2]},"statusReason":{"reasonCode":"BUSY","reasonDescription":"later"}}')
    assert msg.report.status is Status.REJECTED
    assert json.loads(msg.report.result_json or "") == {"x": [1, 2]}
    assert msg.report.reason is not None and msg.report.reason.code == "BUSY"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "invalid_json"),
        (b"\xff\xfe", "invalid_unicode"),  # not UTF-8
        (b"[1]", "not_an_object"),
        (b'{"status":"DONE"}', "unknown_status"),
        (b'{"status":"TIMED_OUT"}', "unknown_status"),
        (b"{}", "unknown_status"),
        (b'{"status":"SUCCEEDED","statusReason":"x"}', "invalid_status_reason"),
        (b'{"status":"SUCCEEDED","statusReason":{"reasonCode":5}}', "invalid_status_reason"),
    ],
)
def test_decode_rejects_garbage(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        _decode(payload)
    assert err.value.reason == reason


def test_ruleset_routes_only_claimed_topics() -> None:
    rules = RuleSet(emqx.RULES)
    inbound = rules.route("t1", "$emqx/commands/things/t1/executions/e9/response", b'{"status":"IN_PROGRESS"}')
    assert inbound is not None and inbound.message.execution_id == "e9"
    assert rules.route("t1", "devices/t1/telemetry", b"{}") is None
    assert not rules.claims("$emqx/commands/things/t1/executions/e9/request")
