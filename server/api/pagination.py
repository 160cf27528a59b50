"""Page tokens and list validation shared by every surface (gRPC and REST).

A page token is opaque to clients: URL-safe base64 of ``{"b": position, "f": digest}``
where the digest binds it to the filters it was issued for. Both surfaces compute the
digest from the same :class:`ListFilters`, so a token one of them issued is accepted by
the other for the same filters. Nothing here knows about protobuf or HTTP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from server.core.errors import InvalidArgument
from server.core.lifecycle import Status
from server.core.models import ListQuery

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_MAX_INDEX = 2**63  # SQLite INTEGER


@dataclass(frozen=True)
class ListFilters:
    """The List request as a caller sent it, before validation.

    ``statuses`` are status numbers in the caller's order, repeats kept: the token's
    digest is computed from them exactly as sent (tokens that clients hold stay valid).
    Times are milliseconds since the epoch, None when unset.
    """

    thing_id: str = ""
    action: str = ""
    statuses: tuple[int, ...] = ()
    created_after_ms: int | None = None
    created_before_ms: int | None = None
    page_size: int = 0
    page_token: str = ""
    job_id: str = ""


def _filter_digest(filters: ListFilters) -> str:
    # An unset time counts as 0, as an unset protobuf Timestamp always did.
    bound: list[Any] = [
        filters.thing_id,
        filters.action,
        sorted(filters.statuses),
        filters.created_after_ms or 0,
        filters.created_before_ms or 0,
    ]
    if filters.job_id:  # only when set: the tokens issued before the filter existed stay good
        bound.append(filters.job_id)
    key = json.dumps(bound)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def page_token(filters: ListFilters, before_index: int | None) -> str:
    """Opaque token for the next page; bound to the request's filters ("" on the last page)."""
    if before_index is None:
        return ""
    raw = json.dumps({"b": before_index, "f": _filter_digest(filters)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def statuses(values: Iterable[int]) -> frozenset[Status]:
    """Status numbers as statuses.

    Raises:
        InvalidArgument: a number that is not a status.
    """
    out = set()
    for value in values:
        try:
            out.add(Status(value))
        except ValueError:
            raise InvalidArgument.single("status", f"{value} is not a valid ExecutionStatus") from None
    return frozenset(out)


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """Validate a page size (0 = default).

    Raises:
        InvalidArgument: above ``maximum``.
    """
    if requested > maximum:
        raise InvalidArgument.single("page_size", f"page_size must be at most {maximum}")
    return requested or default


def _before_index(filters: ListFilters) -> int | None:
    token = filters.page_token
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        before = data["b"]
        digest = data["f"]
        # Only positions this server can issue: a forged 1e400 or 10**30 must not reach SQLite.
        if type(before) is not int or not 0 < before < _MAX_INDEX:
            raise ValueError("position out of range")
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument.single("page_token", "page_token is not a token this server issued") from None
    if digest != _filter_digest(filters):
        raise InvalidArgument.single("page_token", "page_token belongs to a request with other filters")
    return before


def list_query(filters: ListFilters, default_page_size: int = DEFAULT_PAGE_SIZE, max_page_size: int = MAX_PAGE_SIZE) -> ListQuery:
    """Validate the filters of a List request (statuses, then page size, then page token).

    Raises:
        InvalidArgument: bad status value, page size or page token (field names as in the domain:
            ``status``, ``page_size``, ``page_token``).
    """
    wanted = statuses(filters.statuses)
    size = page_size(filters.page_size, default_page_size, max_page_size)
    return ListQuery(
        thing_id=filters.thing_id,
        action=filters.action,
        statuses=wanted,
        created_after_ms=filters.created_after_ms,
        created_before_ms=filters.created_before_ms,
        page_size=size,
        before_index=_before_index(filters),
        job_id=filters.job_id,
    )


# ---- string-keyed pagination (things, thing types) ----------------------------------------


def _digest(filters: Any) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True).encode()).hexdigest()[:16]


def encode_cursor(position: str | None, filters: Any) -> str:
    """Opaque page token for a page that ended at ``position``, bound to the request's filters."""
    if position is None:
        return ""
    raw = json.dumps({"p": position, "f": _digest(filters)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, filters: Any) -> str:
    """The position a page token stands for ("" for no token).

    Raises:
        InvalidArgument: not a token of this server, or one issued for other filters.
    """
    if not token:
        return ""
    try:
        data = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
        position, digest = data["p"], data["f"]
        if not isinstance(position, str):
            raise TypeError("position")
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument.single("page_token", "page_token is not a token this server issued") from None
    if digest != _digest(filters):
        raise InvalidArgument.single("page_token", "page_token belongs to a request with other filters")
    return position
