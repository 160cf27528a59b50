"""Command schemas: the Kaa seed's LoRaWAN dimming example, paths of violations, bad schemas."""

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from server.core.errors import FieldViolation
from server.core.schemas import CompiledSchema, fill, schema_problem

DIMMING = {
    "type": "object",
    "properties": {
        "f_port": {"type": "number", "title": "f_port", "description": "LoRa f_port", "const": 60},
        "priority": {
            "enum": ["LOWEST", "LOW", "NORMAL", "HIGH", "HIGHEST"],
            "title": "priority",
            "description": "LoRa message priority",
            "default": "LOW",
        },
        "confirmed": {"type": "string", "title": "confirmed", "description": "LoRa message needs confirmation", "const": "false"},
        "command": {"type": "string", "title": "command", "description": "Command type", "const": "dimming"},
        "output_mode": {"enum": ["off", "on", "blinking"], "title": "output_mode", "description": "Output mode"},
        "dimming": {"type": "number", "title": "dimming", "description": "Dimming value in percents (0..100)"},
        "period_s": {"type": "number", "title": "period_s", "description": "Blinking period in seconds (1..255)"},
    },
    "required": ["f_port", "priority", "confirmed", "command", "output_mode", "dimming"],
}

SEED_PAYLOAD = """{
"f_port": 60,
"priority": "NORMAL",
"confirmed": "false",
"command": "dimming",
"output_mode": "blinking",
"dimming": 50,
"period_s": 5
}"""


def test_seed_dimming_example_becomes_the_seed_payload_exactly() -> None:
    operator = {"priority": "NORMAL", "output_mode": "blinking", "dimming": 50, "period_s": 5}
    filled = fill(DIMMING, operator)
    assert json.dumps(filled) == json.dumps(json.loads(SEED_PAYLOAD))  # same keys, values and order
    assert CompiledSchema.compile(DIMMING).violations(filled, "params") == []


def test_defaults_fill_and_const_overrides() -> None:
    filled = fill(DIMMING, {"output_mode": "on", "dimming": 10, "f_port": 1})
    assert filled["priority"] == "LOW" and filled["f_port"] == 60


def test_violations_have_json_paths() -> None:
    schema = CompiledSchema.compile(
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "string"}}},
            "required": ["a", "c"],
        }
    )
    found = {(v.field, v.description.split(" ")[0]) for v in schema.violations({"a": "x", "b": ["ok", 3]}, "params")}
    assert ("params.a", "'x'") in found
    assert ("params.b[1]", "3") in found
    assert ("params.c", "'c'") in found


def test_bad_schemas_are_refused_with_a_reason() -> None:
    assert schema_problem({"type": "nonsense"})
    assert schema_problem([1, 2])
    assert schema_problem({"properties": {"a": {"minimum": "x"}}})
    assert schema_problem(DIMMING) is None
    assert schema_problem(True) is None


# ---- fill: the corners --------------------------------------------------------------------------


def test_fill_const_on_the_root_replaces_the_whole_value() -> None:
    assert fill({"const": {"mode": "safe"}}, {"mode": "unsafe", "extra": 1}) == {"mode": "safe"}
    assert fill({"const": 3, "properties": {"a": {"default": 1}}}, {}) == 3


def test_fill_boolean_property_subschemas_keep_the_value_and_fill_nothing() -> None:
    schema = {"properties": {"a": True, "b": False, "c": {"default": 1}, "d": {"const": "x"}}}
    assert list(fill(schema, {"extra": 0, "b": 6, "a": 5}).items()) == [("a", 5), ("b", 6), ("c", 1), ("d", "x"), ("extra", 0)]
    assert fill(schema, {}) == {"c": 1, "d": "x"}  # nothing invented for a boolean subschema


# ---- what a schema may not do -------------------------------------------------------------------


def nested(levels: int) -> dict[str, Any]:
    """A schema ``levels`` JSON objects deep."""
    schema: dict[str, Any] = {}
    for _ in range(levels - 1):
        schema = {"not": schema}
    return schema


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        pytest.param({"$ref": "http://127.0.0.1:1/x"}, "not within this schema", id="remote-ref"),
        pytest.param({"$ref": "other.json#/a"}, "not within this schema", id="relative-ref"),
        pytest.param(
            {"properties": {"a": {"$dynamicRef": "https://x/y#meta"}}}, "not within this schema", id="remote-dynamic-ref"
        ),
        pytest.param({"$ref": "#/$defs/nope"}, "does not resolve", id="dangling-ref"),
        pytest.param({"$ref": "#/const", "const": {"type": "string"}}, "does not point at a subschema", id="ref-into-data"),
        pytest.param({"properties": {"a": {"$id": "https://x/a"}}}, "$id is only allowed at the root", id="nested-id"),
        pytest.param({"$schema": "http://json-schema.org/draft-04/schema#"}, "$schema must be Draft 2020-12", id="other-dialect"),
        pytest.param({"$ref": "#"}, "loops back", id="ref-to-itself"),
        pytest.param(
            {"$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"not": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"},
            "loops back",
            id="in-place-loop",
        ),
        pytest.param(
            {
                "$defs": {
                    **{f"a{i}": {"anyOf": [{"$ref": f"#/$defs/a{i + 1}"}, {"$ref": f"#/$defs/a{i + 1}"}]} for i in range(30)},
                    "a30": {"type": "string"},
                },
                "$ref": "#/$defs/a0",
            },
            "more than 1000 subschemas",
            id="exponential-refs",
        ),
        pytest.param({"pattern": "(?=a)b"}, "not RE2 syntax", id="lookahead"),
        pytest.param({"patternProperties": {"(a)\\1": {}}}, "not RE2 syntax", id="backreference"),
        pytest.param(nested(5000), "nested deeper than 32", id="5000-levels"),
    ],
)
def test_schemas_that_could_fetch_loop_or_block_are_refused(schema: Any, reason: str) -> None:
    problem = schema_problem(schema)
    assert problem is not None and reason in problem, problem


@pytest.mark.parametrize(
    "schema",
    [
        pytest.param({"type": "object", "properties": {"child": {"$ref": "#"}}}, id="recursive-tree"),
        pytest.param({"$defs": {"n": {"type": "integer"}}, "items": {"$ref": "#/$defs/n"}}, id="defs"),
        pytest.param({"definitions": {"n": {"type": "integer"}}, "$ref": "#/definitions/n"}, id="legacy-definitions"),
        pytest.param({"$id": "https://example.com/t", "$defs": {"n": {"$anchor": "num"}}, "$ref": "#num"}, id="root-id-anchor"),
        pytest.param({"$dynamicAnchor": "node", "properties": {"kids": {"items": {"$dynamicRef": "#node"}}}}, id="dynamic"),
        pytest.param(
            {"$schema": "https://json-schema.org/draft/2020-12/schema", "properties": {"a": True, "b": False}}, id="booleans"
        ),
        pytest.param({"pattern": "^(a+)+$"}, id="pattern-re2-runs-in-linear-time"),
        pytest.param({"const": {"$ref": "#"}}, id="ref-shaped-data"),
    ],
)
def test_schemas_that_stay_in_the_document_are_accepted(schema: Any) -> None:
    assert schema_problem(schema) is None
    CompiledSchema.compile(schema).violations({"child": {}}, "params")


def test_schema_depth_bound() -> None:
    assert schema_problem(nested(32)) is None
    assert "nested deeper than 32 levels" in (schema_problem(nested(33)) or "")


def test_schema_size_bound() -> None:
    overhead = len('{"description":""}')
    assert schema_problem({"description": "x" * (64 * 1024 - overhead)}) is None
    assert "65537 bytes as JSON; the limit is 65536" in (schema_problem({"description": "x" * (64 * 1024 - overhead + 1)}) or "")


def test_pattern_length_bound() -> None:
    assert schema_problem({"pattern": "a" * 1000}) is None
    assert "pattern longer than 1000" in (schema_problem({"pattern": "a" * 1001}) or "")
    assert "pattern longer than 1000" in (schema_problem({"patternProperties": {"a" * 1001: {}}}) or "")


def test_in_place_expansion_bound() -> None:
    assert schema_problem({"allOf": [{"minimum": i} for i in range(999)]}) is None  # the root and 999
    assert "more than 1000 subschemas" in (schema_problem({"allOf": [{"minimum": i} for i in range(1000)]}) or "")


def test_validation_step_budget() -> None:
    schema = CompiledSchema.compile({"items": {"type": "integer"}})  # one step for items, one per item
    assert schema.violations(list(range(49_999)), "params") == []
    assert schema.violations(list(range(50_000)), "params") == [
        FieldViolation("params", "checking it against the schema takes more than 50000 steps")
    ]


@pytest.mark.parametrize("additional", [False, {"type": "integer"}], ids=["false", "schema"])
def test_a_pathological_pattern_does_not_backtrack(additional: Any) -> None:
    # Python's re would take 2**5000 steps on these; RE2 answers at once (a test timeout otherwise),
    # also where additionalProperties looks at patternProperties.
    raw = {
        "properties": {"a": {"pattern": "^(a+)+$"}},
        "patternProperties": {"^(b+)+$": {"type": "string"}},
        "additionalProperties": additional,
    }
    assert schema_problem(raw) is None
    found = CompiledSchema.compile(raw).violations({"a": "a" * 5000 + "!", "b" * 5000 + "!": 1, "bb": 2}, "params")
    # The long key matches no pattern: an additional property, refused by False, an integer as the schema wants.
    assert [v.field for v in found] == (["params", "params.a", "params.bb"] if additional is False else ["params.a", "params.bb"])
    assert all(len(v.description) < 600 for v in found)  # the values are quoted clipped
    assert "cannot be combined" in (schema_problem({**raw, "unevaluatedProperties": False}) or "")


@contextlib.contextmanager
def listener() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP listener on 127.0.0.1 that records every connection made to it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    accepted: list[socket.socket] = []

    def poll() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except BlockingIOError:
                return

    try:
        yield server.getsockname()[1], accepted
        poll()
    finally:
        for conn in accepted:
            conn.close()
        server.close()


def test_a_stored_remote_ref_never_fetches() -> None:
    """A schema stored before the checks existed: compiled as it is loaded, it fails to resolve instead of fetching."""
    with listener() as (port, accepted):
        url = f"http://127.0.0.1:{port}/schema.json"
        assert schema_problem({"$ref": url}) is not None
        found = CompiledSchema.compile({"properties": {"a": {"$ref": url}}}).violations({"a": 1}, "params")
        assert [v.field for v in found] == ["params"] and "cannot be used" in found[0].description
    assert accepted == []


def test_enum_and_unique_items_keep_json_equality() -> None:
    enum = CompiledSchema.compile({"enum": [1, "x", {"a": [True]}, None]})
    assert [v for v in (1, 1.0, "x", {"a": [True]}, None) if enum.violations(v, "p")] == []
    assert [v for v in (True, 0, False, {"a": [1]}, "y") if not enum.violations(v, "p")] == []
    unique = CompiledSchema.compile({"uniqueItems": True})
    assert unique.violations([1, True, {"a": 1, "b": 2}, [0], [False]], "p") == []
    for same in ([1, 1.0], [{"a": 1, "b": 2}, {"b": 2, "a": 1}], [[1, {"c": None}], [1.0, {"c": None}]]):
        assert [v.description.split(" has ")[1] for v in unique.violations(same, "p")] == ["non-unique elements"]


def test_long_enum_and_unique_items_are_linear() -> None:
    # Within the step budget, but quadratic with jsonschema's comparisons (minutes): a test timeout.
    enum = CompiledSchema.compile({"items": {"enum": list(range(20_000))}})
    assert enum.violations(list(range(20_000)), "params") == []
    unique = CompiledSchema.compile({"uniqueItems": True})
    assert unique.violations([{"a": i} for i in range(40_000)], "params") == []
