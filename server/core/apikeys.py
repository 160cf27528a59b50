"""API keys for the gRPC (and later HTTP) API: roles, hashing, lookup, the first admin key.

A key reads ``fck_<key id>_<secret>``. Only the secret's SHA-256 is stored; the
id finds the row, the hash is compared in constant time. Lookups are cached for
one second, so a key revoked with ``fleetcmd apikey revoke`` (another process
writing the same SQLite file) stops working within a second.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from server.core.clock import now_ms
from server.core.errors import InvalidArgument
from server.core.models import ApiKeyRecord
from server.core.registry import hash_secret, secret_matches
from server.store import RegistryStore

log = logging.getLogger(__name__)

KEY_PREFIX = "fck"
ADMIN_KEY_FILE = "admin.key"
CACHE_SECONDS = 1.0


class Role(enum.IntEnum):
    """What a key may do; a higher role includes the lower ones."""

    VIEWER = 1  # read and stream
    OPERATOR = 2  # + send, cancel
    ADMIN = 3  # + registry changes

    @classmethod
    def parse(cls, name: str) -> Role:
        """A role by (case-insensitive) name.

        Raises:
            InvalidArgument: unknown role.
        """
        try:
            return cls[name.upper()]
        except KeyError:
            roles = ", ".join(r.name.lower() for r in cls)
            raise InvalidArgument.single("role", f"role must be one of {roles}") from None


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    key_id: str
    name: str
    role: Role


def parse_key(token: str) -> tuple[str, str] | None:
    """Split a presented key into (key id, secret), None when it is not shaped like one."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class ApiKeys:
    """Create, revoke and check API keys."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        self._cache: dict[str, tuple[float, ApiKeyRecord | None]] = {}

    async def create(self, name: str, role: Role) -> tuple[ApiKeyRecord, str]:
        """A new key; returns it with its full token (shown once)."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = ApiKeyRecord(key_id, name, role.name.lower(), hash_secret(secret), now_ms())
        await self._store.insert_api_key(record)
        return record, f"{KEY_PREFIX}_{key_id}_{secret}"

    async def revoke(self, key_id: str) -> None:
        """Revoke a key (NotFound when unknown)."""
        await self._store.revoke_api_key(key_id, now_ms())
        self._cache.pop(key_id, None)

    async def list(self) -> list[ApiKeyRecord]:
        """Every key, revoked ones included."""
        return await self._store.list_api_keys()

    async def authenticate(self, token: str) -> Principal | None:
        """The principal of a presented key, None when it is unknown, revoked or wrong."""
        parsed = parse_key(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        cached = self._cache.get(key_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            record = cached[1]
        else:
            record = await self._store.get_api_key(key_id)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_id] = (now, record)
        if record is None or record.revoked_at_ms is not None or not secret_matches(secret, record.secret_hash):
            return None
        return Principal(record.key_id, record.name, Role.parse(record.role))

    async def ensure_admin_key(self, data_dir: Path) -> Path | None:
        """On first start (no key at all), create an admin key and write it to a 0600 file.

        Returns:
            The file's path when a key was created, else None.
        """
        if await self._store.list_api_keys():
            return None
        _record, token = await self.create("initial admin", Role.ADMIN)
        path = data_dir / ADMIN_KEY_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
        return path
