"""Row mapping both stores share: the registry's rows and an execution's reason columns.

SQLite's ``sqlite3.Row`` and asyncpg's ``Record`` both read a column by name; the tables have the
same columns in both stores (the schema versions are shared), so one mapping serves both.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from server.core.models import ApiKeyRecord, CommandDef, Execution, Reason, ThingRecord, ThingTypeRecord


class Row(Protocol):
    """A database row read by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


def reason_from_columns(code: str | None, description: str | None) -> Reason | None:
    """The status reason the ``(reason_code, reason_description)`` columns hold (None when both are empty)."""
    if code is None and description is None:
        return None
    return Reason(code or "", description or "")


def reason_columns(reason: Reason | None) -> tuple[str | None, str | None]:
    """The ``(reason_code, reason_description)`` columns of a status reason (the inverse of reading them)."""
    return (reason.code, reason.description) if reason else (None, None)


def violations_column(ex: Execution) -> str | None:
    """The ``result_violations`` column: a JSON array, NULL when there are none."""
    return json.dumps(list(ex.result_violations)) if ex.result_violations else None


def thing_from_row(row: Row) -> ThingRecord:
    """A :class:`ThingRecord` from a ``things`` row."""
    return ThingRecord(
        thing_id=row["thing_id"],
        thing_type=row["thing_type"],
        attributes=json.loads(row["attributes"]),
        token_hash=row["token_hash"],
        created_at_ms=row["created_at"],
        updated_at_ms=row["updated_at"],
        credentials_rotated_at_ms=row["credentials_rotated_at"],
        last_seen_ms=row["last_seen"],
        last_client_id=row["last_client_id"],
        last_remote_address=row["last_remote_address"],
        last_connected_at_ms=row["last_connected_at"],
        kaa_app_version=row["kaa_app_version"],
        kaa_token_hash=row["kaa_token_hash"] or "",
        broker_password_hash=row["broker_password_hash"],
    )


def type_definition(rec: ThingTypeRecord) -> str:
    """The JSON stored in ``thing_types.definition`` for a thing type."""
    return json.dumps(
        {
            "description": rec.description,
            "allow_undefined_actions": rec.allow_undefined_actions,
            "commands": {
                action: {
                    "description": c.description,
                    "params_schema": c.params_schema,
                    "result_schema": c.result_schema,
                    "default_ttl_seconds": c.default_ttl_seconds,
                }
                for action, c in rec.commands.items()
            },
        }
    )


def thing_type_from_row(row: Row) -> ThingTypeRecord:
    """A :class:`ThingTypeRecord` from a ``thing_types`` row."""
    definition = json.loads(row["definition"])
    return ThingTypeRecord(
        name=row["name"],
        description=definition["description"],
        commands={action: CommandDef(**c) for action, c in definition["commands"].items()},
        allow_undefined_actions=definition["allow_undefined_actions"],
        version=row["version"],
        created_at_ms=row["created_at"],
        updated_at_ms=row["updated_at"],
    )


def api_key_from_row(row: Row) -> ApiKeyRecord:
    """An :class:`ApiKeyRecord` from an ``api_keys`` row."""
    return ApiKeyRecord(
        key_id=row["key_id"],
        name=row["name"],
        role=row["role"],
        secret_hash=row["secret_hash"],
        created_at_ms=row["created_at"],
        revoked_at_ms=row["revoked_at"],
    )
