"""Command schemas (JSON Schema Draft 2020-12): checking, const/default filling, validation.

Kaa's command forms and EMQX thing types describe a command's ``params`` with a
JSON Schema. Before a command leaves, ``const`` values are set and missing
``default`` values are filled in (recursively, in the schema's property order,
so the payload reads like the schema), then the result is validated and every
violation is reported with its JSON path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from server.errors import FieldViolation


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a valid Draft 2020-12 JSON Schema, or None."""
    if not isinstance(schema, (dict, bool)):
        return "a JSON Schema must be an object or a boolean"
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"{exc.message}" + (f" (at {where})" if where else "")
    return None


def fill(schema: Any, value: Any) -> Any:
    """Apply ``const`` and ``default`` of an object schema to ``value``.

    ``const`` always wins; ``default`` fills only what is missing. Nested
    object properties are filled the same way. Keys follow the schema's
    property order, then the caller's extra keys.
    """
    if not isinstance(schema, Mapping):
        return value
    if "const" in schema:
        return schema["const"]
    props = schema.get("properties")
    if not isinstance(value, dict) or not isinstance(props, Mapping):
        return value
    out: dict[str, Any] = {}
    for name, sub in props.items():
        if not isinstance(sub, Mapping):
            if name in value:
                out[name] = value[name]
            continue
        if "const" in sub:
            out[name] = sub["const"]
        elif name in value:
            out[name] = fill(sub, value[name])
        elif "default" in sub:
            out[name] = fill(sub, sub["default"])
    for name, item in value.items():
        if name not in out:
            out[name] = item
    return out


def _path(base: str, error: ValidationError) -> str:
    parts = [base]
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else f".{p}")
    if error.validator == "required" and isinstance(error.instance, dict):
        # Point at the missing property itself, not at its parent.
        # jsonschema raises one error per missing property, all with the same ``required`` list;
        # only the message tells which one this is.
        required = error.validator_value if isinstance(error.validator_value, list) else []
        absent = [n for n in required if n not in error.instance]
        missing = next((n for n in absent if error.message == f"{n!r} is a required property"), absent[0] if absent else None)
        if missing is not None:
            parts.append(f".{missing}")
    return "".join(parts)


@dataclass(frozen=True)
class CompiledSchema:
    """A validator built once and reused for every command of a type version."""

    schema: Any
    validator: Draft202012Validator

    @classmethod
    def compile(cls, schema: Any) -> CompiledSchema:
        """Build the validator (the schema must already have passed :func:`schema_problem`)."""
        return cls(schema, Draft202012Validator(schema))

    def violations(self, instance: Any, field: str) -> list[FieldViolation]:
        """Every violation of ``instance``, each named by its JSON path under ``field``."""
        errors = sorted(self.validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message))
        return [FieldViolation(_path(field, e), e.message) for e in errors]
