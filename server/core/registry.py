"""The fleet registry: things, thing types, device credentials and presence.

Things and types are few and read on every Send and every device CONNECT, so
the registry keeps them in memory, loaded once at start; every change is
written to the store first and applied to memory after the commit. Schemas
are checked and compiled once per type version (on ``PutThingType`` and at
load), never per call.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from broker_hooks.topics import level_problem
from server.core.clock import now_ms
from server.core.errors import (
    FailedPrecondition,
    FieldViolation,
    FleetcmdError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from server.core.models import CommandDef, DeviceReport, Execution, LastConnection, ThingRecord, ThingTypeRecord
from server.core.records import fast_init
from server.core.schemas import CompiledSchema, fill, schema_problem
from server.store import RegistryStore

log = logging.getLogger(__name__)

TYPE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY = 128
MAX_ATTRIBUTE_VALUE = 1024
MAX_DESCRIPTION = 4096
TOKEN_BYTES = 24  # 192 bits


def hash_secret(secret: str) -> str:
    """SHA-256 of a random secret: fast, and enough for 192-bit random tokens (no dictionary to attack)."""
    return hashlib.sha256(secret.encode()).hexdigest()


# mosquitto's password_file format ``$7$<iterations>$<salt>$<hash>`` (PBKDF2-HMAC-SHA512, base64; what
# mosquitto_passwd 2.0 writes, with its salt length and iteration count). Kept next to token_hash because
# mosquitto must hash the password itself and token_hash (unsalted SHA-256) cannot be turned into it.
MOSQUITTO_ITERATIONS = 101
MOSQUITTO_SALT_BYTES = 12


def broker_password_hash(password: str, *, salt: bytes | None = None, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """``password`` as a line of mosquitto's password_file holds it (after ``username:``)."""
    salt = secrets.token_bytes(MOSQUITTO_SALT_BYTES) if salt is None else salt
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(derived).decode()}"


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented secret with a stored hash."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def new_token() -> str:
    """A fresh random device password."""
    return secrets.token_urlsafe(TOKEN_BYTES)


@dataclass
class Presence:
    """A thing's connection state (in memory; the last connection is also persisted)."""

    online: bool = False
    client_id: str = ""
    remote_address: str = ""
    connected_at_ms: int | None = None
    last_seen_ms: int | None = None


@dataclass(frozen=True)
class PresenceChange:
    """A connect or disconnect, as WatchPresence shows it."""

    thing_id: str
    presence: Presence


@dataclass(frozen=True)
class CompiledType:
    """A thing type with its validators built once."""

    record: ThingTypeRecord
    params: dict[str, CompiledSchema | None]
    results: dict[str, CompiledSchema | None]


@fast_init
@dataclass(frozen=True)
class PreparedSend:
    """What the registry decided for a Send: the final params and TTL."""

    params_json: str | None
    ttl_seconds: int
    thing_type: str
    kaa: bool = False  # the thing is a Kaa endpoint: allocate an integer command id


@dataclass(eq=False)  # kept in a set: identity, not value, equality
class _Watcher:
    thing_id: str
    queue: asyncio.Queue[PresenceChange | None] = field(default_factory=lambda: asyncio.Queue(1000))
    overflowed: bool = False


def _compile(record: ThingTypeRecord) -> CompiledType:
    def build(schema: Any) -> CompiledSchema | None:
        return CompiledSchema.compile(schema) if schema is not None else None

    params = {a: build(c.params_schema) for a, c in record.commands.items()}
    results = {a: build(c.result_schema) for a, c in record.commands.items()}
    return CompiledType(record, params, results)


def check_attributes(attributes: Mapping[str, str], field_name: str = "attributes") -> None:
    """Bound the number and size of a thing's attributes.

    Raises:
        InvalidArgument: too many, or a key or value too long or empty key.
    """
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument.single(field_name, f"at most {MAX_ATTRIBUTES} attributes")
    for key, value in attributes.items():
        if not key or len(key) > MAX_ATTRIBUTE_KEY:
            raise InvalidArgument.single(f"{field_name}[{key!r}]", f"keys must be 1-{MAX_ATTRIBUTE_KEY} characters")
        if len(value) > MAX_ATTRIBUTE_VALUE:
            raise InvalidArgument.single(f"{field_name}[{key!r}]", f"values must be at most {MAX_ATTRIBUTE_VALUE} characters")


class ThingIndex:
    """Registered thing ids in order, and by type, attribute and presence: what a list page reads.

    A page starts with a binary search in the sorted ids (never a sort of the whole registry);
    a filter that few things match reads its own index instead of scanning the list, so a page
    for a rare type, attribute or the online things costs what it returns, not the fleet's size.
    """

    # An index is read instead of the sorted ids when it holds less than 1/SPARSE of the things:
    # sorting its m ids (m log m) is then cheaper than scanning n ids for its matches.
    SPARSE = 8

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._by_type: dict[str, set[str]] = {}
        # attribute key -> value -> ids: no tuple per entry, the strings are the records' own.
        self._by_attribute: dict[str, dict[str, set[str]]] = {}
        self.online: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def count_of_type(self, thing_type: str) -> int:
        """How many things are of ``thing_type``."""
        return len(self._by_type.get(thing_type, ()))

    def add(self, thing: ThingRecord) -> None:
        """Index a new thing."""
        bisect.insort(self._ids, thing.thing_id)
        self._index(thing)

    def replace(self, old: ThingRecord, new: ThingRecord) -> None:
        """Re-index a thing whose type or attributes changed."""
        if old.thing_type != new.thing_type or old.attributes != new.attributes:
            self._unindex(old)
            self._index(new)

    def remove(self, thing: ThingRecord) -> None:
        """Forget a deleted thing."""
        at = bisect.bisect_left(self._ids, thing.thing_id)
        if at < len(self._ids) and self._ids[at] == thing.thing_id:
            del self._ids[at]
        self._unindex(thing)
        self.online.discard(thing.thing_id)

    def _index(self, thing: ThingRecord) -> None:
        thing_id = thing.thing_id
        if thing.thing_type:
            self._by_type.setdefault(thing.thing_type, set()).add(thing_id)
        for key, value in thing.attributes.items():
            self._by_attribute.setdefault(key, {}).setdefault(value, set()).add(thing_id)

    def _unindex(self, thing: ThingRecord) -> None:
        thing_id = thing.thing_id
        ids = self._by_type.get(thing.thing_type)
        if ids is not None:
            ids.discard(thing_id)
            if not ids:
                del self._by_type[thing.thing_type]
        for key, value in thing.attributes.items():
            values = self._by_attribute.get(key)
            ids = values.get(value) if values is not None else None
            if values is None or ids is None:
                continue
            ids.discard(thing_id)
            if not ids:
                del values[value]
                if not values:
                    del self._by_attribute[key]

    def candidates(
        self, *, thing_type: str, attributes: Mapping[str, str], online: bool | None, prefix: str, after: str
    ) -> Iterator[str]:
        """Ids above ``after`` that start with ``prefix``, in order: every match of the filters, and maybe more."""
        narrowest: set[str] | None = None
        sets: list[set[str]] = []
        if thing_type:
            sets.append(self._by_type.get(thing_type, set()))
        for key, value in attributes.items():
            sets.append(self._by_attribute.get(key, {}).get(value, set()))
        if online:
            sets.append(self.online)
        if sets:
            narrowest = min(sets, key=len)
        if narrowest is not None and len(narrowest) * self.SPARSE < len(self._ids):
            yield from sorted(i for i in narrowest if i > after and i.startswith(prefix))
            return
        ids = self._ids
        # Ids with the prefix are contiguous in order: start at the later of the two bounds, stop at the first without it.
        at = max(bisect.bisect_right(ids, after), bisect.bisect_left(ids, prefix))
        for position in range(at, len(ids)):
            thing_id = ids[position]
            if not thing_id.startswith(prefix):
                return
            yield thing_id


class Registry:
    """Things, types and presence, in memory and durable in the store."""

    def __init__(self, store: RegistryStore, *, allow_unregistered: bool = False) -> None:
        self._store = store
        # Development mode (anonymous devices): Send may target things nobody registered.
        self.allow_unregistered = allow_unregistered
        self._things: dict[str, ThingRecord] = {}
        self._index = ThingIndex()
        self._kaa_tokens: dict[str, str] = {}  # endpoint token hash -> thing id
        self._types: dict[str, CompiledType] = {}
        self._presence: dict[str, Presence] = {}
        # Presence changes not written yet, the latest per thing; one writer takes them all at a time.
        self._unwritten: dict[str, Presence] = {}
        self._writing_presence = False
        self._watchers: set[_Watcher] = set()
        # Called with a thing id whose connection must end (deleted thing, rotated credentials).
        self.disconnect: Callable[[str], None] = lambda _thing_id: None
        # Called with a thing just created or changed (type, attributes), or (True) that came online:
        # CONTINUOUS jobs match it.
        self.thing_changed: Callable[[ThingRecord, bool], None] = lambda _thing, _online: None

    async def load(self) -> None:
        """Read every thing and type from the store and compile the types."""
        for record in await self._store.load_thing_types():
            self._types[record.name] = _compile(record)
        for thing in await self._store.load_things():
            self._things[thing.thing_id] = thing
            self._index.add(thing)
            if thing.kaa_token_hash:
                self._kaa_tokens[thing.kaa_token_hash] = thing.thing_id
            self._presence[thing.thing_id] = Presence(
                online=False,
                client_id=thing.last_client_id,
                remote_address=thing.last_remote_address,
                connected_at_ms=thing.last_connected_at_ms,
                last_seen_ms=thing.last_seen_ms,
            )

    async def reload(self) -> None:
        """Read things and types back from the store: what another replica changed becomes known here.

        A thing deleted, or whose credentials changed, elsewhere is disconnected. An entry this
        replica changed while the store was read is left as it is (the local change is newer).
        Presence stays this replica's.
        """
        things_before, types_before = dict(self._things), dict(self._types)
        type_records = {r.name: r for r in await self._store.load_thing_types()}
        thing_records = {t.thing_id: t for t in await self._store.load_things()}
        for name in types_before.keys() | type_records.keys():
            current, stored = types_before.get(name), type_records.get(name)
            if self._types.get(name) is not current:
                continue  # changed here meanwhile
            if stored is None:
                self._types.pop(name, None)
            elif current is None or current.record.version != stored.version:
                self._types[name] = _compile(stored)
        for thing_id in things_before.keys() | thing_records.keys():
            old, new = things_before.get(thing_id), thing_records.get(thing_id)
            if self._things.get(thing_id) is not old:
                continue
            if new is None:
                assert old is not None
                del self._things[thing_id]
                self._kaa_tokens.pop(old.kaa_token_hash, None)
                self._presence.pop(thing_id, None)
                self.disconnect(thing_id)
                continue
            if old is not None and (old.updated_at_ms, old.token_hash, old.kaa_token_hash) == (
                new.updated_at_ms,
                new.token_hash,
                new.kaa_token_hash,
            ):
                continue
            self._things[thing_id] = new
            if old is not None and old.kaa_token_hash != new.kaa_token_hash:
                self._kaa_tokens.pop(old.kaa_token_hash, None)
            if new.kaa_token_hash:
                self._kaa_tokens[new.kaa_token_hash] = thing_id
            self._presence.setdefault(thing_id, Presence())
            if old is not None and (old.token_hash, old.kaa_token_hash) != (new.token_hash, new.kaa_token_hash):
                self.disconnect(thing_id)  # credentials rotated on another replica

    # ---- things ---------------------------------------------------------------------------

    def get_thing(self, thing_id: str) -> ThingRecord:
        """One thing.

        Raises:
            NotFound: no such thing.
        """
        thing = self._things.get(thing_id)
        if thing is None:
            raise NotFound(f"thing {thing_id!r} not found")
        return thing

    def presence(self, thing_id: str) -> Presence:
        """A thing's presence (offline with no history when never seen)."""
        return self._presence.get(thing_id) or Presence()

    def _check_type_name(self, thing_type: str, field_name: str) -> None:
        if thing_type and thing_type not in self._types:
            raise InvalidArgument.single(field_name, f"thing type {thing_type!r} does not exist")

    async def create_thing(
        self, thing_id: str, thing_type: str, attributes: dict[str, str], *, kaa_app_version: str = ""
    ) -> tuple[ThingRecord, str, str]:
        """Register a thing, optionally as a Kaa endpoint of an application version.

        Returns:
            The thing, its password and its Kaa endpoint token ("" unless Kaa); both secrets are
            shown once and stored only as hashes.

        Raises:
            InvalidArgument: unknown type, bad attributes or application version name.
            AlreadyExists: the id is taken.
        """
        self._check_type_name(thing_type, "thing_type")
        check_attributes(attributes)
        if kaa_app_version:
            problem = level_problem(kaa_app_version)
            if problem:
                raise InvalidArgument.single("kaa_app_version", f"kaa_app_version {problem}")
        token = new_token()
        kaa_token = new_token() if kaa_app_version else ""
        at = now_ms()
        record = ThingRecord(
            thing_id,
            thing_type,
            dict(attributes),
            hash_secret(token),
            at,
            at,
            at,
            kaa_app_version=kaa_app_version,
            kaa_token_hash=hash_secret(kaa_token) if kaa_token else "",
            broker_password_hash=broker_password_hash(token),
        )
        await self._store.insert_thing(record)
        self._things[thing_id] = record
        self._index.add(record)
        if record.kaa_token_hash:
            self._kaa_tokens[record.kaa_token_hash] = thing_id
        self._presence.setdefault(thing_id, Presence())
        self.thing_changed(record, False)
        return record, token, kaa_token

    def kaa_endpoint(self, app_version: str, endpoint_token: str) -> ThingRecord | None:
        """The Kaa endpoint a (application version, endpoint token) pair names, if any."""
        thing_id = self._kaa_tokens.get(hash_secret(endpoint_token))
        thing = self._things.get(thing_id) if thing_id else None
        if thing is None or thing.kaa_app_version != app_version:
            return None
        return thing

    def is_kaa_endpoint(self, thing_id: str) -> bool:
        """Whether ``thing_id`` is a registered Kaa endpoint."""
        thing = self._things.get(thing_id)
        return thing is not None and bool(thing.kaa_app_version)

    def has_kaa_endpoints(self) -> bool:
        """Whether any Kaa endpoint is registered (they may connect without MQTT credentials)."""
        return bool(self._kaa_tokens)

    async def update_thing(self, thing_id: str, *, thing_type: str | None, attributes: dict[str, str] | None) -> ThingRecord:
        """Change a thing's type and/or attributes (None keeps the current value).

        Raises:
            NotFound: no such thing.
            InvalidArgument: unknown type or bad attributes.
        """
        current = self.get_thing(thing_id)
        new_type = current.thing_type if thing_type is None else thing_type
        new_attributes = current.attributes if attributes is None else dict(attributes)
        self._check_type_name(new_type, "thing.thing_type")
        check_attributes(new_attributes, "thing.attributes")
        at = now_ms()
        await self._store.update_thing(thing_id, thing_type=new_type, attributes=new_attributes, at_ms=at)
        updated = replace(current, thing_type=new_type, attributes=new_attributes, updated_at_ms=at)
        self._things[thing_id] = updated
        self._index.replace(current, updated)
        self.thing_changed(updated, False)
        return updated

    async def delete_thing(self, thing_id: str) -> None:
        """Unregister a thing and end its connection.

        Raises:
            NotFound: no such thing.
        """
        self.get_thing(thing_id)
        await self._store.delete_thing(thing_id)
        gone = self._things.pop(thing_id, None)
        if gone is not None:
            self._index.remove(gone)
        if gone is not None and gone.kaa_token_hash:
            self._kaa_tokens.pop(gone.kaa_token_hash, None)
        self._presence.pop(thing_id, None)
        self.disconnect(thing_id)

    async def rotate_credentials(self, thing_id: str) -> tuple[str, str]:
        """Issue a new password (and Kaa endpoint token); the old ones stop working and the connection ends.

        Returns:
            The new password and the new Kaa endpoint token ("" unless Kaa).

        Raises:
            NotFound: no such thing.
        """
        current = self.get_thing(thing_id)
        token = new_token()
        kaa_token = new_token() if current.kaa_app_version else ""
        kaa_hash = hash_secret(kaa_token) if kaa_token else ""
        at = now_ms()
        for_broker = broker_password_hash(token)
        await self._store.set_thing_token(thing_id, hash_secret(token), at, kaa_hash, for_broker)
        if kaa_hash:
            self._kaa_tokens.pop(current.kaa_token_hash, None)
            self._kaa_tokens[kaa_hash] = thing_id
        self._things[thing_id] = replace(
            current,
            token_hash=hash_secret(token),
            kaa_token_hash=kaa_hash or current.kaa_token_hash,
            broker_password_hash=for_broker,
            credentials_rotated_at_ms=at,
            updated_at_ms=at,
        )
        self.disconnect(thing_id)
        return token, kaa_token

    def list_things(
        self,
        *,
        thing_type: str = "",
        attributes: Mapping[str, str] | None = None,
        online: bool | None = None,
        prefix: str = "",
        after: str = "",
        limit: int = 50,
    ) -> tuple[list[ThingRecord], str | None]:
        """Things sorted by id after ``after``, filtered; returns the page and the last id when more follow.

        Args:
            thing_type: Only things of this type ("" = any).
            attributes: Only things with every one of these attribute values (AND).
            online: Only things online (True) or offline (False); None = both.
            prefix: Only things whose id starts with this.
            after: The last id of the previous page ("" = from the start).
            limit: The page size (the caller bounds it).
        """
        out: list[ThingRecord] = []
        attributes = attributes or {}
        for thing_id in self._index.candidates(
            thing_type=thing_type, attributes=attributes, online=online, prefix=prefix, after=after
        ):
            thing = self._things[thing_id]
            if thing_type and thing.thing_type != thing_type:
                continue
            if attributes and any(thing.attributes.get(k) != v for k, v in attributes.items()):
                continue
            if online is not None and (thing_id in self._index.online) != online:
                continue
            if len(out) == limit:
                return out, out[-1].thing_id
            out.append(thing)
        return out, None

    # ---- thing types ----------------------------------------------------------------------

    async def put_type(
        self, name: str, *, description: str, commands: dict[str, CommandDef], allow_undefined_actions: bool, max_ttl: int
    ) -> ThingTypeRecord:
        """Create or replace a type after checking every schema.

        Raises:
            InvalidArgument: bad name, bad action name, invalid schema or TTL, each with its field.
        """
        violations: list[FieldViolation] = []
        if not TYPE_NAME.match(name):
            violations.append(FieldViolation("thing_type.name", "name must be 1-128 characters of A-Z a-z 0-9 _ . -"))
        if len(description) > MAX_DESCRIPTION:
            violations.append(FieldViolation("thing_type.description", f"at most {MAX_DESCRIPTION} characters"))
        for action, command in commands.items():
            where = f"thing_type.commands[{action!r}]"
            if not action or len(action) > 128:
                violations.append(FieldViolation(where, "action names must be 1-128 characters"))
            for label, schema in (("params_schema", command.params_schema), ("result_schema", command.result_schema)):
                if schema is not None:
                    problem = schema_problem(schema)
                    if problem:
                        violations.append(FieldViolation(f"{where}.{label}", f"not a valid JSON Schema: {problem}"))
            if not 0 <= command.default_ttl_seconds <= max_ttl:
                violations.append(FieldViolation(f"{where}.default_ttl_seconds", f"must be 0 to {max_ttl}"))
        if violations:
            raise InvalidArgument(violations)
        at = now_ms()
        stored = await self._store.put_thing_type(
            ThingTypeRecord(name, description, dict(commands), allow_undefined_actions, 0, at, at)
        )
        self._types[name] = _compile(stored)
        return stored

    def get_type(self, name: str) -> ThingTypeRecord:
        """One type.

        Raises:
            NotFound: no such type.
        """
        compiled = self._types.get(name)
        if compiled is None:
            raise NotFound(f"thing type {name!r} not found")
        return compiled.record

    def list_types(self, *, after: str = "", limit: int = 50) -> tuple[list[ThingTypeRecord], str | None]:
        """Types sorted by name after ``after``; the last name when more follow."""
        names = sorted(n for n in self._types if n > after)
        page = [self._types[n].record for n in names[:limit]]
        return page, (page[-1].name if len(names) > limit else None)

    async def delete_type(self, name: str) -> None:
        """Delete a type nobody uses.

        Raises:
            NotFound: no such type.
            FailedPrecondition: things use it.
        """
        self.get_type(name)
        users = self._index.count_of_type(name)
        if users:
            raise FailedPrecondition(f"thing type {name!r} is used by {users} thing(s)")
        await self._store.delete_thing_type(name)
        self._types.pop(name, None)

    # ---- commands -------------------------------------------------------------------------

    def prepare_send(self, thing_id: str, action: str, params: dict[str, Any] | None, ttl_seconds: int) -> PreparedSend:
        """Check a Send against the thing's type: fill const/default values, validate params, pick the TTL.

        Args:
            thing_id: Target.
            action: The action name.
            params: The operator's params (None when not given).
            ttl_seconds: The requested TTL (0 = the command's default TTL, else 0).

        Raises:
            NotFound: the thing is not registered.
            InvalidArgument: undefined action, or params that violate the schema (each violation by its path).
        """
        thing = self._things.get(thing_id)
        if thing is None:
            if self.allow_unregistered:
                return PreparedSend(_dump(params), ttl_seconds, "")
            raise NotFound(f"thing {thing_id!r} is not registered")
        kaa = bool(thing.kaa_app_version)
        if kaa and not action.isalnum():
            raise InvalidArgument.single("action", "a Kaa command type is a non-empty alphanumeric string")
        compiled = self._types.get(thing.thing_type) if thing.thing_type else None
        if compiled is None or not compiled.record.commands:
            return PreparedSend(_dump(params), ttl_seconds, thing.thing_type, kaa)
        command = compiled.record.commands.get(action)
        if command is None:
            if compiled.record.allow_undefined_actions:
                return PreparedSend(_dump(params), ttl_seconds, thing.thing_type, kaa)
            defined = ", ".join(sorted(compiled.record.commands))
            raise InvalidArgument.single(
                "action", f"thing type {thing.thing_type!r} does not define action {action!r} (defined: {defined})"
            )
        validator = compiled.params[action]
        final = params
        if validator is not None:
            final = fill(command.params_schema, params if params is not None else {})
            violations = validator.violations(final, "params")
            if violations:
                raise InvalidArgument(violations)
        return PreparedSend(_dump(final), ttl_seconds or command.default_ttl_seconds, thing.thing_type, kaa)

    def result_check(self, execution: Execution, report: DeviceReport) -> list[str]:
        """Violations of the action's result schema by a device result (empty when valid or unchecked).

        Runs on the store's writer thread; it only reads compiled, immutable validators.
        """
        compiled = self._types.get(execution.thing_type) if execution.thing_type else None
        validator = compiled.results.get(execution.action) if compiled is not None else None
        if validator is None or report.result_json is None:
            return []
        return [f"{v.field}: {v.description}" for v in validator.violations(json.loads(report.result_json), "result")]

    # ---- devices --------------------------------------------------------------------------

    def authenticate_device(self, client_id: str, username: str | None, password: str | None) -> bool:
        """Whether a CONNECT is from a registered thing with its current password.

        The client id, the username and the thing id must all be the same.
        """
        thing = self._things.get(client_id)
        if thing is None or username != client_id or password is None:
            return False
        return secret_matches(password, thing.token_hash)

    def is_registered(self, thing_id: str) -> bool:
        """Whether ``thing_id`` is a registered thing."""
        return thing_id in self._things

    def device_connected(self, thing_id: str, remote_address: str) -> PresenceChange | None:
        """Record a connect; returns the change to persist and announce (None for unknown things)."""
        if thing_id not in self._things:
            return None
        at = now_ms()
        presence = Presence(True, thing_id, remote_address, at, at)
        self._presence[thing_id] = presence
        self._index.online.add(thing_id)
        self.thing_changed(self._things[thing_id], True)
        return self._announce(thing_id, presence)

    def device_disconnected(self, thing_id: str) -> PresenceChange | None:
        """Record a disconnect; returns the change to persist and announce (None for unknown things)."""
        current = self._presence.get(thing_id)
        if current is None or thing_id not in self._things:
            return None
        presence = replace(current, online=False, last_seen_ms=now_ms())
        self._presence[thing_id] = presence
        self._index.online.discard(thing_id)
        return self._announce(thing_id, presence)

    def device_seen(self, thing_id: str) -> None:
        """The device sent something: refresh its last-seen time (memory only)."""
        current = self._presence.get(thing_id)
        if current is not None:
            current.last_seen_ms = now_ms()

    def persist_later(self, change: PresenceChange) -> bool:
        """Queue ``change`` for the store, replacing what its thing had queued.

        Returns:
            True when no writer runs: the caller starts :meth:`write_presence` (in a task).
        """
        self._unwritten[change.thing_id] = change.presence
        if self._writing_presence:
            return False
        self._writing_presence = True
        return True

    async def write_presence(self) -> None:
        """Write the queued presence changes, all of them in one store write per round, until none is left.

        One writer and one entry per thing, however many devices connect at once: a task and a
        write per connect had cost ~1 KB of memory per device while a whole fleet connected.
        """
        try:
            while self._unwritten:
                batch, self._unwritten = self._unwritten, {}
                now = now_ms()
                connections = [
                    LastConnection(thing_id, p.last_seen_ms or now, p.client_id, p.remote_address, p.connected_at_ms)
                    for thing_id, p in batch.items()
                ]
                try:
                    await self._store.record_presence(connections)
                except FleetcmdError:
                    # The last connection is information, not state anything depends on: log, go on.
                    log.warning("could not record the last connection of %d things", len(connections), exc_info=True)
        finally:
            self._writing_presence = False

    def _announce(self, thing_id: str, presence: Presence) -> PresenceChange:
        change = PresenceChange(thing_id, replace(presence))
        for watcher in tuple(self._watchers):
            if watcher.thing_id and watcher.thing_id != thing_id:
                continue
            try:
                watcher.queue.put_nowait(change)
            except asyncio.QueueFull:
                watcher.overflowed = True
                self._watchers.discard(watcher)
        return change

    async def watch(self, thing_id: str = "") -> AsyncIterator[PresenceChange]:
        """Live presence changes (of one thing, or all).

        Raises:
            ResourceExhausted: the watcher fell behind.
            Unavailable: shutting down.
        """
        watcher = _Watcher(thing_id)
        self._watchers.add(watcher)
        try:
            while True:
                if watcher.overflowed and watcher.queue.empty():
                    raise ResourceExhausted("presence watcher fell behind")
                item = await watcher.queue.get()
                if item is None:
                    raise Unavailable("service is shutting down")
                yield item
        finally:
            self._watchers.discard(watcher)

    def close(self) -> None:
        """End every presence watcher."""
        for watcher in tuple(self._watchers):
            try:
                watcher.queue.put_nowait(None)
            except asyncio.QueueFull:
                watcher.overflowed = True
        self._watchers.clear()


def _dump(params: dict[str, Any] | None) -> str | None:
    if params is None:
        return None
    return json.dumps(params, separators=(",", ":"), ensure_ascii=False)
