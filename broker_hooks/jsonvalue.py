r"""The one strict, bounded JSON codec every edge uses (device reports, Kaa, REST, gRPC params, reads).

A value is accepted only when JSON, a protobuf ``Struct``/``Value`` and SQLite can all hold it
exactly, so nothing accepted can later make a read or a stream fail:

* strict JSON: no ``NaN``, ``Infinity`` or ``-Infinity``, no number that overflows to infinity (``1e400``);
* integers within ±2**53 (a ``Struct`` number is a double: beyond that it would be rounded silently);
* valid Unicode: UTF-8 without invalid bytes, no lone surrogate (``"\ud800"``) in a string or a key;
* at most :data:`MAX_DEPTH` nested arrays/objects.

The hot path parses once with the C decoder (numbers checked as they are parsed) and walks the
value only when the text could hold something else to refuse (more brackets than the depth
allowed, a backslash-u escape, ``NaN``): an ordinary report costs a few C-speed scans, no walk.

Problems are :class:`JsonProblem` with a short machine ``reason`` (a counter key) and, where known,
the ``path`` of the offending value.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

# Each JSON level costs protobuf two levels (Struct + Value, or ListValue + Value), and the messages
# carrying a value add a few more (EventBatch > ExecutionEvent > Value; Execution > StateChange >
# Value; a SendStream response around an Execution): protobuf refuses to decode a message nested
# deeper than 100 levels, which an Execution's history entry reaches at 40 JSON levels. 32 leaves
# room for one more envelope and is far beyond any real device result or command parameter.
MAX_DEPTH = 32
# The largest integer a double (protobuf Struct's only number type) represents exactly, and what
# JavaScript clients read safely: 2**53 is exact, 2**53 + 1 is not.
MAX_SAFE_INTEGER = 2**53

TOO_DEEP = "too_deep"
NUMBER_OUT_OF_RANGE = "number_out_of_range"
NOT_FINITE = "not_finite"
INVALID_UNICODE = "invalid_unicode"
INVALID_JSON = "invalid_json"
NOT_JSON = "not_json"  # a parsed value holding something JSON has no type for (an unset Value, bytes)

log = logging.getLogger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonProblem(ValueError):
    """A JSON value the edge refuses; ``reason`` is a short counter key, ``path`` where it is."""

    def __init__(self, reason: str, detail: str, path: tuple[str | int, ...] = ()) -> None:
        """Describe the problem (``path``: keys and indexes from the checked value's root)."""
        self.reason = reason
        self.detail = detail
        self.path = path
        super().__init__(f"{where(path)}: {detail}" if path else detail)

    def field(self, root: str) -> str:
        """The offending value's field path below ``root`` (``params.a[2]``)."""
        return where(self.path, root)


def where(path: tuple[str | int, ...], root: str = "") -> str:
    """A path as ``root.key[3].other`` (``$`` for the root of an unnamed value)."""
    out = root or "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _decode(data: bytes | bytearray | str) -> str:
    if isinstance(data, str):
        return data
    try:
        # Strict UTF-8 (json.loads(bytes) would let encoded surrogates through with "surrogatepass").
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonProblem(INVALID_UNICODE, f"not UTF-8: {exc.reason} at byte {exc.start}") from None


class _Refused(Exception):
    """Raised by the number hooks of the strict decoder: parse again to find the value's path."""


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: overflows to infinity
        raise _Refused
    return value


def _safe_int(text: str) -> int:
    # Fast path: fewer than 16 characters is below 10**15 (with a sign), far inside ±2**53.
    if len(text) < 16:
        return int(text)
    if len(text) > 17:  # 2**53 has 16 digits, so 17 characters with a minus sign
        raise _Refused
    value = int(text)
    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise _Refused
    return value


# Built once: json.loads with hooks would build a decoder per call. A number hook costs a Python
# call per number, cheaper on ordinary reports than any scan of the whole text for digit runs.
_STRICT = json.JSONDecoder(parse_float=_finite_float, parse_int=_safe_int)


def loads(data: bytes | bytearray | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text strictly and check the value (see the module docstring).

    Args:
        data: The text (bytes must be UTF-8).
        max_depth: Nested arrays/objects allowed; a value wrapped in an envelope gets the envelope's levels on top.

    Raises:
        JsonProblem: not strict JSON, or a value the rules refuse.
    """
    text = _decode(data)
    try:
        value = _STRICT.decode(text)
    except _Refused:
        # Garbage only: parse again as Python would, for the walk to name the offending value.
        value = _parse(text, max_depth)
        check(value, max_depth)
        raise JsonProblem(NUMBER_OUT_OF_RANGE, "a number is out of range") from None  # pragma: no cover - check raised
    except RecursionError:
        raise JsonProblem(TOO_DEEP, f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonProblem(INVALID_JSON, str(exc)) from None
    # A lone surrogate in strict UTF-8 text can only come from a backslash-u escape; NaN and Infinity
    # parse as floats: the full walk names where they are. Depth cannot exceed the number of
    # brackets, and past that a walk of the containers alone tells. Ordinary text costs these
    # C-speed scans and no walk.
    if "\\u" in text or "NaN" in text or "Infinity" in text:
        check(value, max_depth)
    elif text.count("[") + text.count("{") > max_depth and isinstance(value, (dict, list)) and _too_deep(value, max_depth):
        check(value, max_depth)  # for the path
    return value


def _too_deep(value: Any, budget: int) -> bool:
    if budget <= 0:
        return True
    for child in value.values() if isinstance(value, dict) else value:
        if isinstance(child, (dict, list)) and _too_deep(child, budget - 1):
            return True
    return False


def _parse(text: str, max_depth: int) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise JsonProblem(TOO_DEEP, f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise JsonProblem(NUMBER_OUT_OF_RANGE, str(exc)) from None


def check(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Check an already-parsed value (a REST body's field, a Struct's dict) by the same rules.

    Raises:
        JsonProblem: the first problem found, with its path.
    """
    _walk(value, max_depth, ())


def _walk(value: Any, budget: int, path: tuple[str | int, ...]) -> None:
    # Recursion is bounded by max_depth (the budget), so it can never hit Python's limit.
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise JsonProblem(INVALID_UNICODE, "a string holds a lone surrogate (not valid Unicode)", path)
    elif value is None or isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise JsonProblem(NUMBER_OUT_OF_RANGE, f"an integer of {value.bit_length()} bits is beyond ±2**53", path)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise JsonProblem(NOT_FINITE, f"{value} is not a finite number", path)
    elif isinstance(value, (dict, list)):
        if budget <= 0:
            raise JsonProblem(TOO_DEEP, "nested deeper than the limit", path)
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise JsonProblem(NOT_JSON, f"key {key!r} is not a string", path)
                if _SURROGATE.search(key):
                    raise JsonProblem(INVALID_UNICODE, "a key holds a lone surrogate (not valid Unicode)", path)
                _walk(item, budget - 1, (*path, key))
        else:
            for index, item in enumerate(value):
                _walk(item, budget - 1, (*path, index))
    else:
        raise JsonProblem(NOT_JSON, f"a {type(value).__name__} is not a JSON value", path)


def dumps(value: Any) -> str:
    """The canonical text of a checked value (compact, UTF-8 characters as they are)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# Reasons already logged by :func:`stored` (each kind of unreadable row is logged once).
_unreadable_logged: set[str] = set()


def stored(json_text: str) -> Any:
    """Stored JSON text as a value every reader can carry; what today's rules refuse, as its text.

    Everything accepted since the edge checks (this module) parses as it was
    stored. A row written by an older version may hold a 400-digit integer, a value nested 200
    levels or ``NaN``: it is served as a JSON string holding its text, so no read, page or stream
    ever fails on it (logged once per kind of problem).
    """
    try:
        return loads(json_text)
    except JsonProblem as exc:
        if exc.reason not in _unreadable_logged:
            _unreadable_logged.add(exc.reason)
            log.warning("a stored value is refused by the JSON rules (%s): served as its JSON text; not logged again", exc)
        return json_text
