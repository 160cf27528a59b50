"""Command schemas (JSON Schema Draft 2020-12): checking, const/default filling, validation.

Kaa's command forms and EMQX thing types describe a command's ``params`` with a
JSON Schema. Before a command leaves, ``const`` values are set and missing
``default`` values are filled in (recursively, in the schema's property order,
so the payload reads like the schema), then the result is validated and every
violation is reported with its JSON path.

A schema is written by an operator but runs on the event loop for every Send, so
it is bounded where it is put (:func:`schema_problem`) and where it runs
(:class:`CompiledSchema`):

- it never reaches the network: every ``$ref``/``$dynamicRef`` is a fragment of the
  same document (``#...``) that resolves to a subschema, ``$id`` only at the root,
  ``$schema`` only Draft 2020-12, and validators are built with a registry that
  cannot retrieve anything (a legacy stored schema with a remote ``$ref`` fails to
  resolve instead of fetching);
- it is at most :data:`MAX_SCHEMA_BYTES` as JSON and :data:`MAX_SCHEMA_DEPTH` levels deep;
- no chain of ``$ref`` and in-place keywords (``allOf``, ``not``, ...) loops back
  without descending into the value, nor expands to more than
  :data:`MAX_IN_PLACE_SCHEMAS` subschemas applied to one value;
- ``pattern`` and ``patternProperties`` (also where ``additionalProperties`` looks at
  them) run on RE2 (linear time, no backtracking): a pattern RE2 cannot compile
  (lookaround, backreferences) is refused, and so is ``unevaluatedProperties`` in a
  schema with ``patternProperties`` (jsonschema would match them with Python's ``re``);
- ``format`` is an annotation, as Draft 2020-12 defaults to: never asserted;
- ``enum`` and ``uniqueItems`` run in linear time (hashed canonical values) instead of
  jsonschema's comparisons of every pair;
- one validation evaluates at most :data:`MAX_VALIDATION_STEPS` keywords; beyond
  that the value is refused (a violation of the field), not validated for ever.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import re2  # type: ignore[import-untyped]
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT202012

from server.core.errors import FieldViolation

MAX_SCHEMA_BYTES = 64 * 1024  # as compact JSON (UTF-8)
MAX_SCHEMA_TEXT = 4 * MAX_SCHEMA_BYTES  # characters of a schema as written (whitespace included), before parsing
MAX_SCHEMA_DEPTH = 32  # nested JSON objects and arrays, the root counting as 1
MAX_PATTERN_LENGTH = 1000  # characters of one pattern
MAX_IN_PLACE_SCHEMAS = 1000  # subschemas one value meets through $ref and in-place keywords
MAX_VALIDATION_STEPS = 50_000  # keyword evaluations per validated value (well under a second)
MAX_VIOLATIONS = 100  # reported per validated value
DIALECTS = frozenset({"https://json-schema.org/draft/2020-12/schema", "https://json-schema.org/draft/2020-12/schema#"})

# Keywords whose value is a subschema, a list of subschemas or a map of them. "In place" ones apply
# to the same value (a loop through them never ends); the others apply to a part of it, or nowhere
# ($defs, definitions: only through $ref).
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LIST = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas",)
_CHILD_ONE = (
    "additionalProperties",
    "propertyNames",
    "items",
    "contains",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
)
_CHILD_LIST = ("prefixItems",)
_CHILD_MAP = ("properties", "patternProperties", "$defs", "definitions")
_REFS = ("$ref", "$dynamicRef")


def _never_retrieve(uri: str) -> Resource[Any]:
    """The registry's retrieve function: nothing outside the document is ever fetched."""
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the operator's error, answered, not logged


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> Any:
    """A compiled RE2 pattern (raises ``re2.error`` for what RE2 cannot run in linear time)."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _json_problem(schema: Any) -> str | None:
    """Depth and reference problems found by one iterative walk of the whole document."""
    stack: list[tuple[Any, int, str]] = [(schema, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            return f"nested deeper than {MAX_SCHEMA_DEPTH} levels (at {_clip(where)})"
        if isinstance(node, dict):
            for key, value in node.items():
                at = f"{where}/{key}"
                if isinstance(value, str):
                    if key in _REFS and not value.startswith("#"):
                        return f"{key} {_clip(value)!r} is not within this schema: only '#...' references are allowed (at {at})"
                    if key == "$id" and where:
                        return f"$id is only allowed at the root (at {at})"
                    if key == "$schema" and value not in DIALECTS:
                        return f"$schema must be Draft 2020-12 ({min(DIALECTS)}) (at {at})"
                if isinstance(value, (dict, list)):
                    stack.append((value, depth + 1, at))
        elif isinstance(node, list):
            stack.extend((item, depth + 1, f"{where}/{i}") for i, item in enumerate(node))
    return None


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _subschemas(node: dict[str, Any], where: str) -> Iterator[tuple[Any, str, bool]]:
    """Each subschema of ``node`` with its path and whether it applies to the same value."""
    for in_place, ones, lists, maps in (
        (True, _IN_PLACE_ONE, _IN_PLACE_LIST, _IN_PLACE_MAP),
        (False, _CHILD_ONE, _CHILD_LIST, _CHILD_MAP),
    ):
        for key in ones:
            if key in node:
                yield node[key], f"{where}/{key}", in_place
        for key in lists:
            for i, sub in enumerate(node.get(key) or ()):
                yield sub, f"{where}/{key}/{i}", in_place
        for key in maps:
            for name, sub in (node.get(key) or {}).items():
                yield sub, f"{where}/{key}/{name}", in_place


def _graph_problem(schema: dict[str, Any]) -> str | None:
    """Reference, pattern and loop problems of a schema that passed the meta-schema."""
    nodes: dict[int, tuple[dict[str, Any], str]] = {}  # every subschema object, by identity
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict) or id(node) in nodes:
            continue
        nodes[id(node)] = (node, where)
        stack.extend((sub, at) for sub, at, _ in _subschemas(node, where))
    resolver = Registry(retrieve=_never_retrieve).resolver_with_root(DRAFT202012.create_resource(schema))  # type: ignore[call-arg]
    dynamic_anchors: dict[str, list[dict[str, Any]]] = {}
    for node, _ in nodes.values():
        if isinstance(node.get("$dynamicAnchor"), str):
            dynamic_anchors.setdefault(node["$dynamicAnchor"], []).append(node)
    in_place: dict[int, list[dict[str, Any]]] = {}
    for node, where in nodes.values():
        targets = [sub for sub, _, same in _subschemas(node, where) if same and isinstance(sub, dict)]
        for key in _REFS:
            ref = node.get(key)
            if not isinstance(ref, str):
                continue
            try:
                target = resolver.lookup(ref).contents
            except Unresolvable:
                return f"{key} {_clip(ref)!r} does not resolve within this schema (at {where}/{key})"
            if isinstance(target, bool):
                continue
            if id(target) not in nodes:
                return f"{key} {_clip(ref)!r} does not point at a subschema (at {where}/{key})"
            targets.append(target)
            if key == "$dynamicRef":
                # Resolved at run time to any same-named dynamic anchor in scope: assume each one.
                targets.extend(dynamic_anchors.get(ref[1:], ()))
        in_place[id(node)] = targets
        patterns = [(p, f"{where}/pattern") for p in [node.get("pattern")] if isinstance(p, str)]
        patterns += [(p, f"{where}/patternProperties") for p in node.get("patternProperties") or {}]
        for pattern, at in patterns:
            if len(pattern) > MAX_PATTERN_LENGTH:
                return f"pattern longer than {MAX_PATTERN_LENGTH} characters (at {at})"
            try:
                _regex(pattern)
            except re2.error as exc:
                reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
                return f"pattern {_clip(pattern)!r} is not RE2 syntax (no lookaround, no backreferences): {reason} (at {at})"
    keywords = {key for node, _ in nodes.values() for key in node}
    if "unevaluatedProperties" in keywords and "patternProperties" in keywords:
        # jsonschema matches patternProperties with Python's backtracking re when it works out
        # which properties are unevaluated: a pattern there could run for ever on a crafted key.
        return "unevaluatedProperties cannot be combined with patternProperties in one schema"
    return _loop_problem(nodes, in_place)


def _loop_problem(nodes: dict[int, tuple[dict[str, Any], str]], in_place: dict[int, list[dict[str, Any]]]) -> str | None:
    """A loop of in-place applications, or a subschema that expands to too many on one value."""
    size: dict[int, int] = {}  # in-place subschemas met from a node, itself included (with repeats)
    active: set[int] = set()
    for start in nodes:
        if start in size:
            continue
        stack: list[tuple[int, bool]] = [(start, False)]
        while stack:
            key, done = stack.pop()
            if done:
                active.discard(key)
                size[key] = 1 + sum(size[id(t)] for t in in_place[key])
                if size[key] > MAX_IN_PLACE_SCHEMAS:
                    where = nodes[key][1] or "/"
                    return (
                        f"applies more than {MAX_IN_PLACE_SCHEMAS} subschemas to one value"
                        f" through $ref and in-place keywords (at {where})"
                    )
                continue
            if key in size:
                continue
            active.add(key)
            stack.append((key, True))
            for target in in_place[key]:
                if id(target) in active:
                    where = nodes[key][1] or "/"
                    return f"$ref loops back to itself without descending into the value (at {where})"
                if id(target) not in size:
                    stack.append((id(target), False))
    return None


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a Draft 2020-12 JSON Schema fleetcmd runs, or None (see the module)."""
    if not isinstance(schema, (dict, bool)):
        return "a JSON Schema must be an object or a boolean"
    problem = _json_problem(schema)
    if problem:
        return problem
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_SCHEMA_BYTES:
        return f"{size} bytes as JSON; the limit is {MAX_SCHEMA_BYTES}"
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"{exc.message}" + (f" (at {where})" if where else "")
    return _graph_problem(schema) if isinstance(schema, dict) else None


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


class _TooCostly(Exception):
    """A validation used up its :data:`MAX_VALIDATION_STEPS`."""


# Steps left to the validation running on this thread (the event loop's, or the store writer's
# for result schemas).
_budget = threading.local()


def _counted(keyword: Callable[..., Any]) -> Callable[..., Any]:
    """``keyword`` charged one step of the running validation's budget."""

    def counted(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        _budget.left -= 1
        if _budget.left < 0:
            raise _TooCostly
        return keyword(validator, value, instance, schema)

    return counted


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``pattern`` on RE2 (jsonschema's own runs Python's backtracking ``re``)."""
    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield ValidationError(f"{_clip(instance)!r} does not match {_clip(pattern)!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``patternProperties`` on RE2."""
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        regex = _regex(pattern)
        for key, value in instance.items():
            if regex.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _canonical(value: Any) -> Any:
    """A hashable key equal for exactly the JSON values JSON Schema calls equal.

    1 and 1.0 are equal (as in Python), true and 1 are not (tagged), objects compare
    regardless of key order.
    """
    if value is True or value is False:
        return ("\0bool", value)
    if isinstance(value, dict):
        return ("\0object", frozenset((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("\0array", tuple(_canonical(v) for v in value))
    return value


# Each enum's canonical keys, by the identity of its list (kept, so the identity stays its own).
_ENUM_KEYS: dict[int, tuple[list[Any], frozenset[Any]]] = {}
_ENUM_KEYS_LOCK = threading.Lock()


def _enum(validator: Any, enums: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``enum`` as one set lookup.

    jsonschema's compares the value with every member: a long enum applied to every item
    of a long array was quadratic.
    """
    cached = _ENUM_KEYS.get(id(enums))
    if cached is None or cached[0] is not enums:
        cached = (enums, frozenset(_canonical(e) for e in enums))
        with _ENUM_KEYS_LOCK:
            if len(_ENUM_KEYS) > 4096:
                _ENUM_KEYS.clear()
            _ENUM_KEYS[id(enums)] = cached
    if _canonical(instance) not in cached[1]:
        yield ValidationError(f"{_clip(repr(instance))} is not one of {_clip(repr(enums), 200)}")


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``uniqueItems`` in linear time (jsonschema's compares every pair of unsortable items)."""
    if unique and validator.is_type(instance, "array"):
        keys = [_canonical(item) for item in instance]
        if len(set(keys)) != len(keys):
            yield ValidationError(f"{_clip(repr(instance))} has non-unique elements")


_ADDITIONAL_PROPERTIES = Draft202012Validator.VALIDATORS["additionalProperties"]


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``additionalProperties`` beside ``patternProperties`` on RE2 (jsonschema's own matches them with ``re``)."""
    patterns = schema.get("patternProperties")
    if not patterns:
        yield from _ADDITIONAL_PROPERTIES(validator, additional, instance, schema) or ()
        return
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    regexes = [_regex(p) for p in patterns]
    extras = [k for k in instance if k not in properties and not any(r.search(k) for r in regexes)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        joined = ", ".join(repr(_clip(each)) for each in sorted(extras)[:10])
        yield ValidationError(f"{joined} {'does' if len(extras) == 1 else 'do'} not match any of the regexes")


_Validator: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    {
        name: _counted(keyword)
        for name, keyword in {
            **Draft202012Validator.VALIDATORS,
            "pattern": _pattern,
            "patternProperties": _pattern_properties,
            "additionalProperties": _additional_properties,
            "enum": _enum,
            "uniqueItems": _unique_items,
        }.items()
    },
)
_REGISTRY: Registry[Any] = Registry(retrieve=_never_retrieve)  # type: ignore[call-arg]


@dataclass(frozen=True)
class CompiledSchema:
    """A validator built once and reused for every command of a type version."""

    schema: Any
    validator: Validator

    @classmethod
    def compile(cls, schema: Any) -> CompiledSchema:
        """Build the validator (the schema must already have passed :func:`schema_problem`).

        A schema stored before those checks existed still never fetches: its remote
        ``$ref`` fails to resolve, a violation of every value it checks.
        """
        return cls(schema, _Validator(schema, registry=_REGISTRY))

    def violations(self, instance: Any, field: str) -> list[FieldViolation]:
        """Every violation of ``instance`` (at most :data:`MAX_VIOLATIONS`), each named by its JSON path under ``field``."""
        _budget.left = MAX_VALIDATION_STEPS
        try:
            errors = sorted(self.validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message))
        except _TooCostly:
            return [FieldViolation(field, f"checking it against the schema takes more than {MAX_VALIDATION_STEPS} steps")]
        except RecursionError:
            return [FieldViolation(field, "nested too deeply to check against the schema")]
        except Unresolvable as exc:
            return [FieldViolation(field, f"the schema cannot be used (put the thing type again): {_clip(str(exc))}")]
        # A message quotes the value, which may be as large as the params: clipped.
        return [FieldViolation(_path(field, e), _clip(e.message, 500)) for e in errors[:MAX_VIOLATIONS]]
