"""The REST API of the fleet registry: ``/api/v1/things`` and ``/api/v1/thing-types``.

The same operations, roles and errors as gRPC ``ThingService`` and ``ThingTypeService``
(:mod:`server.api.registry_api`), on the same :class:`~server.core.registry.Registry`;
page tokens are the same codec with the same filters, so a token one surface issued
is good on the other (a REST list filtered by id prefix ``q`` has tokens of its own).
JSON is camelCase, times RFC 3339 UTC with milliseconds; a thing type's schemas are
JSON values here (gRPC carries them as JSON text).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from aiohttp import web

from broker_hooks.topics import MAX_LEVEL_LENGTH, level_problem
from server.api import pagination
from server.api.http_rest import API_PREFIX, Body, RestRoute, guarded_routes, read_json, rfc3339
from server.config import Settings
from server.core.apikeys import ApiKeys
from server.core.authz import Operation
from server.core.errors import FieldViolation, InvalidArgument
from server.core.models import CommandDef, ThingRecord, ThingTypeRecord
from server.core.registry import MAX_ATTRIBUTE_KEY, MAX_ATTRIBUTE_VALUE, MAX_ATTRIBUTES, Presence, Registry
from server.core.schemas import MAX_SCHEMA_TEXT

THINGS = f"{API_PREFIX}/things"
THING_TYPES = f"{API_PREFIX}/thing-types"

# The presence filter as gRPC's PresenceFilter numbers it: page tokens carry it, so both surfaces digest the same value.
PRESENCE_FILTER = {"": 0, "online": 1, "offline": 2}

ROUTES: tuple[RestRoute, ...] = (
    RestRoute("GET", THINGS, "list_things", Operation.READ_THINGS),
    RestRoute("POST", THINGS, "create_thing", Operation.MANAGE_THINGS),
    RestRoute("GET", THINGS + "/{thingId}", "get_thing", Operation.READ_THINGS),
    RestRoute("DELETE", THINGS + "/{thingId}", "delete_thing", Operation.MANAGE_THINGS),
    RestRoute("POST", THINGS + "/{thingId}/credentials", "rotate_credentials", Operation.MANAGE_THINGS),
    RestRoute("GET", THING_TYPES, "list_types", Operation.READ_THING_TYPES),
    RestRoute("GET", THING_TYPES + "/{name}", "get_type", Operation.READ_THING_TYPES),
    RestRoute("PUT", THING_TYPES + "/{name}", "put_type", Operation.MANAGE_THING_TYPES),
    RestRoute("DELETE", THING_TYPES + "/{name}", "delete_type", Operation.MANAGE_THING_TYPES),
)

# Field names of PutThingType's violations (``thing_type.commands['x'].params_schema``) as this surface spells them.
_TYPE_FIELDS = (
    ("params_schema", "paramsSchema"),
    ("result_schema", "resultSchema"),
    ("default_ttl_seconds", "defaultTtlSeconds"),
)


# ---- JSON representation ------------------------------------------------------------------


def thing_json(thing: ThingRecord, presence: Presence) -> dict[str, Any]:
    """A thing as the REST API shows it (never its credentials), with its presence flattened in."""
    return {
        "thingId": thing.thing_id,
        "thingType": thing.thing_type,
        "attributes": dict(thing.attributes),
        "online": presence.online,
        "lastSeen": rfc3339(presence.last_seen_ms),
        "connectedAt": rfc3339(presence.connected_at_ms),
        "clientId": presence.client_id,
        "remoteAddress": presence.remote_address,
        "createdAt": rfc3339(thing.created_at_ms),
        "updatedAt": rfc3339(thing.updated_at_ms),
        "credentialsRotatedAt": rfc3339(thing.credentials_rotated_at_ms),
        "kaaAppVersion": thing.kaa_app_version,
    }


def credentials_json(thing_id: str, password: str, kaa_token: str) -> dict[str, str]:
    """A thing's MQTT credentials (and Kaa endpoint token): shown once, stored only as hashes."""
    return {"clientId": thing_id, "username": thing_id, "password": password, "kaaEndpointToken": kaa_token}


def thing_type_json(t: ThingTypeRecord) -> dict[str, Any]:
    """A thing type as the REST API shows it: schemas as JSON values (null when none)."""
    return {
        "name": t.name,
        "description": t.description,
        "commands": {
            action: {
                "description": c.description,
                "paramsSchema": c.params_schema,
                "resultSchema": c.result_schema,
                "defaultTtlSeconds": c.default_ttl_seconds,
            }
            for action, c in t.commands.items()
        },
        "allowUndefinedActions": t.allow_undefined_actions,
        "version": t.version,
        "createdAt": rfc3339(t.created_at_ms),
        "updatedAt": rfc3339(t.updated_at_ms),
    }


# ---- request parsing ----------------------------------------------------------------------


def _thing_id(request: web.Request) -> str:
    thing_id = request.match_info["thingId"]
    problem = level_problem(thing_id)
    if problem:
        raise InvalidArgument.single("thingId", f"thingId {problem}")
    return thing_id


def _page_size(request: web.Request, violations: list[FieldViolation]) -> int:
    raw = request.query.get("pageSize", "")
    if not raw:
        return 0
    try:
        size = int(raw)
    except ValueError:
        violations.append(FieldViolation("pageSize", "pageSize must be an integer"))
        return 0
    if size < 0:
        violations.append(FieldViolation("pageSize", "pageSize must not be negative"))
        return 0
    if size > pagination.MAX_PAGE_SIZE:
        violations.append(FieldViolation("pageSize", f"pageSize must be at most {pagination.MAX_PAGE_SIZE}"))
        return 0
    return size


def attribute_filter(values: list[str], violations: list[FieldViolation]) -> tuple[dict[str, str], bool]:
    """Repeated ``attribute=key=value`` query values as one AND filter, bounded as attributes are.

    Returns:
        The filter, and whether it asks one key for two values (AND: no thing matches).
    """
    if len(values) > MAX_ATTRIBUTES:
        violations.append(FieldViolation("attribute", f"at most {MAX_ATTRIBUTES} attribute filters"))
        return {}, False
    out: dict[str, str] = {}
    impossible = False
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            violations.append(FieldViolation("attribute", f"{raw[:64]!r} is not key=value"))
        elif len(key) > MAX_ATTRIBUTE_KEY or len(value) > MAX_ATTRIBUTE_VALUE:
            violations.append(
                FieldViolation("attribute", f"keys are 1-{MAX_ATTRIBUTE_KEY} characters, values at most {MAX_ATTRIBUTE_VALUE}")
            )
        elif out.get(key, value) != value:
            impossible = True  # both must hold (AND), which no thing can
        else:
            out[key] = value
    return out, impossible


def _schema(command: Body, name: str, where: str) -> Any:
    """A command's schema (a JSON object or boolean; null or absent: none), bounded as gRPC bounds its text."""
    value = command.data.get(name)
    if value is None:
        return None
    if not isinstance(value, dict | bool):
        command.violations.append(FieldViolation(f"{where}.{name}", "a JSON Schema is a JSON object or a boolean"))
        return None
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    if size > MAX_SCHEMA_TEXT:
        command.violations.append(FieldViolation(f"{where}.{name}", f"{size} characters; the limit is {MAX_SCHEMA_TEXT}"))
        return None
    return value


def _commands(body: Body) -> dict[str, CommandDef]:
    raw = body.object("commands") or {}
    out: dict[str, CommandDef] = {}
    for action, spec in raw.items():
        where = f"commands[{action!r}]"
        if not isinstance(spec, dict):
            body.violations.append(FieldViolation(where, "a command is a JSON object"))
            continue
        command = Body(spec)
        description = command.string("description")
        params = _schema(command, "paramsSchema", where)
        result = _schema(command, "resultSchema", where)
        ttl = command.integer("defaultTtlSeconds")
        body.violations.extend(
            FieldViolation(v.field if v.field.startswith(where) else f"{where}.{v.field}", v.description)
            for v in command.violations
        )
        out[action] = CommandDef(description, params, result, ttl or 0)
    return out


def _rest_type_violation(v: FieldViolation) -> FieldViolation:
    """A PutThingType violation (``thing_type.commands['x'].params_schema``) as this surface names the field."""
    field = v.field.removeprefix("thing_type.")
    for domain, rest in _TYPE_FIELDS:
        field = field.replace(domain, rest)
    return FieldViolation(field, v.description)


class RegistryRest:
    """Handlers of ``/api/v1/things`` and ``/api/v1/thing-types`` on top of :class:`~server.core.registry.Registry`."""

    def __init__(self, registry: Registry, settings: Settings, keys: ApiKeys) -> None:
        self._registry = registry
        self._settings = settings
        self._keys = keys

    def routes(self) -> list[web.RouteDef]:
        """The routes of :data:`ROUTES`, each behind its operation's role check."""
        return guarded_routes(self, ROUTES, self._keys)

    def _thing(self, thing: ThingRecord) -> dict[str, Any]:
        return thing_json(thing, self._registry.presence(thing.thing_id))

    # ---- things ---------------------------------------------------------------------------

    async def list_things(self, request: web.Request) -> web.Response:
        """``GET /api/v1/things``: sorted by id; filters ANDed; ``nextPageToken`` "" on the last page."""
        q = request.query
        violations: list[FieldViolation] = []
        thing_type = q.get("thingType", "")
        attributes, impossible = attribute_filter(q.getall("attribute", []), violations)
        presence = q.get("presence", "").lower()
        if presence not in PRESENCE_FILTER:
            violations.append(FieldViolation("presence", "presence must be online or offline"))
        prefix = q.get("q", "")
        if len(prefix) > MAX_LEVEL_LENGTH:
            violations.append(FieldViolation("q", f"q must be at most {MAX_LEVEL_LENGTH} characters"))
        size = _page_size(request, violations)
        if violations:
            raise InvalidArgument(violations)
        # gRPC's ListThings digests [type, attributes, presence]; the prefix is appended only when given.
        filters: list[Any] = [thing_type, attributes, PRESENCE_FILTER[presence]]
        if prefix:
            filters.append(prefix)
        after = pagination.decode_cursor(q.get("pageToken", ""), filters)
        if impossible:
            return web.json_response({"things": [], "nextPageToken": ""})
        things, last = self._registry.list_things(
            thing_type=thing_type,
            attributes=attributes,
            online={"online": True, "offline": False}.get(presence),
            prefix=prefix,
            after=after,
            limit=pagination.page_size(size),
        )
        return web.json_response(
            {"things": [self._thing(t) for t in things], "nextPageToken": pagination.encode_cursor(last, filters)}
        )

    async def get_thing(self, request: web.Request) -> web.Response:
        """``GET /api/v1/things/{thingId}``."""
        return web.json_response(self._thing(self._registry.get_thing(_thing_id(request))))

    async def create_thing(self, request: web.Request) -> web.Response:
        """``POST /api/v1/things``: 201 with the thing and its credentials (shown once)."""
        body = Body(await read_json(request))
        thing_id = body.string("thingId", required=True)
        thing_type = body.string("thingType")
        kaa_app_version = body.string("kaaAppVersion")
        raw_attributes = body.object("attributes") or {}
        attributes: dict[str, str] = {}
        for key, value in raw_attributes.items():
            if isinstance(value, str):
                attributes[key] = value
            else:
                body.violations.append(FieldViolation(f"attributes[{key!r}]", "attribute values are strings"))
        problem = level_problem(thing_id) if "thingId" not in {v.field for v in body.violations} else ""
        if problem:
            body.violations.append(FieldViolation("thingId", f"thingId {problem}"))
        if body.violations:
            raise InvalidArgument(body.violations)
        thing, password, kaa_token = await self._registry.create_thing(
            thing_id, thing_type, attributes, kaa_app_version=kaa_app_version
        )
        return web.json_response(
            {"thing": self._thing(thing), "credentials": credentials_json(thing_id, password, kaa_token)},
            status=201,
            # A thing id may hold any character but a topic separator or wildcard (a newline too): quoted, as a URL path.
            headers={"Location": f"{THINGS}/{quote(thing_id, safe='')}"},
        )

    async def delete_thing(self, request: web.Request) -> web.Response:
        """``DELETE /api/v1/things/{thingId}``: 204; its connection ends, its executions stay."""
        await self._registry.delete_thing(_thing_id(request))
        return web.Response(status=204)

    async def rotate_credentials(self, request: web.Request) -> web.Response:
        """``POST /api/v1/things/{thingId}/credentials``: new credentials; the old ones stop working at once."""
        thing_id = _thing_id(request)
        password, kaa_token = await self._registry.rotate_credentials(thing_id)
        return web.json_response(credentials_json(thing_id, password, kaa_token))

    # ---- thing types ----------------------------------------------------------------------

    async def list_types(self, request: web.Request) -> web.Response:
        """``GET /api/v1/thing-types``: sorted by name."""
        violations: list[FieldViolation] = []
        size = _page_size(request, violations)
        if violations:
            raise InvalidArgument(violations)
        after = pagination.decode_cursor(request.query.get("pageToken", ""), [])
        types, last = self._registry.list_types(after=after, limit=pagination.page_size(size))
        return web.json_response(
            {"thingTypes": [thing_type_json(t) for t in types], "nextPageToken": pagination.encode_cursor(last, [])}
        )

    async def get_type(self, request: web.Request) -> web.Response:
        """``GET /api/v1/thing-types/{name}``."""
        return web.json_response(thing_type_json(self._registry.get_type(request.match_info["name"])))

    async def put_type(self, request: web.Request) -> web.Response:
        """``PUT /api/v1/thing-types/{name}``: create or replace (the version goes up by one); no body: an empty type."""
        parsed = await read_json(request)
        if parsed is None and (await request.read()).strip():
            raise InvalidArgument.single("body", "the body must be a JSON object")  # a JSON null, not an empty body
        body = Body(parsed)
        description = body.string("description")
        commands = _commands(body)
        allow = body.data.get("allowUndefinedActions")
        if allow is not None and not isinstance(allow, bool):
            body.violations.append(FieldViolation("allowUndefinedActions", "allowUndefinedActions must be a boolean"))
        if body.violations:
            raise InvalidArgument(body.violations)
        try:
            stored = await self._registry.put_type(
                request.match_info["name"],
                description=description,
                commands=commands,
                allow_undefined_actions=bool(allow),
                max_ttl=self._settings.max_ttl,
            )
        except InvalidArgument as exc:
            raise InvalidArgument([_rest_type_violation(v) for v in exc.violations]) from None
        return web.json_response(thing_type_json(stored))

    async def delete_type(self, request: web.Request) -> web.Response:
        """``DELETE /api/v1/thing-types/{name}``: 204; 409 while things use it."""
        await self._registry.delete_type(request.match_info["name"])
        return web.Response(status=204)
