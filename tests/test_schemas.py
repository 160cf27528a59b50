"""Command schemas: the Kaa seed's LoRaWAN dimming example, paths of violations, bad schemas."""

import json

from server.schemas import CompiledSchema, fill, schema_problem

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
