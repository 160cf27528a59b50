"""gRPC ``ThingService`` and ``ThingTypeService`` on top of :class:`~server.core.registry.Registry`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from broker_hooks.topics import level_problem
from server.api import convert, pagination
from server.api.grpc_errors import maps_errors
from server.api.grpc_metrics import CallTimer
from server.config import Settings
from server.core.errors import InvalidArgument
from server.core.models import CommandDef, ThingRecord, ThingTypeRecord
from server.core.registry import Presence, Registry
from server.core.schemas import MAX_SCHEMA_DEPTH, MAX_SCHEMA_TEXT
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def presence_pb(p: Presence) -> rpb.Presence:
    """Presence as the API shows it."""
    return rpb.Presence(
        online=p.online,
        client_id=p.client_id,
        remote_address=p.remote_address,
        connected_at=convert.timestamp(p.connected_at_ms),
        last_seen=convert.timestamp(p.last_seen_ms),
    )


def thing_pb(thing: ThingRecord, presence: Presence) -> rpb.Thing:
    """A thing as the API shows it (never its credentials)."""
    return rpb.Thing(
        thing_id=thing.thing_id,
        thing_type=thing.thing_type,
        attributes=thing.attributes,
        presence=presence_pb(presence),
        created_at=convert.timestamp(thing.created_at_ms),
        updated_at=convert.timestamp(thing.updated_at_ms),
        credentials_rotated_at=convert.timestamp(thing.credentials_rotated_at_ms),
        kaa_app_version=thing.kaa_app_version,
    )


def thing_type_pb(t: ThingTypeRecord) -> rpb.ThingType:
    """A thing type as the API shows it."""
    return rpb.ThingType(
        name=t.name,
        description=t.description,
        commands={
            action: rpb.CommandDefinition(
                description=c.description,
                params_schema=json.dumps(c.params_schema) if c.params_schema is not None else "",
                result_schema=json.dumps(c.result_schema) if c.result_schema is not None else "",
                default_ttl_seconds=c.default_ttl_seconds,
            )
            for action, c in t.commands.items()
        },
        allow_undefined_actions=t.allow_undefined_actions,
        version=t.version,
        created_at=convert.timestamp(t.created_at_ms),
        updated_at=convert.timestamp(t.updated_at_ms),
    )


def _schema(text: str, field: str) -> Any:
    """A schema field's JSON text as data (None when empty), in its written key order."""
    if not text.strip():
        return None
    if len(text) > MAX_SCHEMA_TEXT:
        raise InvalidArgument.single(field, f"{len(text)} characters; the limit is {MAX_SCHEMA_TEXT}")
    try:
        return json.loads(text)
    except RecursionError:
        # Deeper than the parser goes: far past MAX_SCHEMA_DEPTH, which the registry checks after this.
        raise InvalidArgument.single(field, f"nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidArgument.single(field, f"not JSON: {exc}") from None


def _check_thing_id(thing_id: str, field: str = "thing_id") -> None:
    problem = level_problem(thing_id)
    if problem:
        raise InvalidArgument.single(field, f"{field} {problem}")


class ThingServicer(rpb_grpc.ThingServiceServicer):
    """Implements ``fleetcmd.v1.ThingService``."""

    # Observes each call's duration (set by the server; None: not observed).
    call_timer: CallTimer | None = None

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def _pb(self, thing: ThingRecord) -> rpb.Thing:
        return thing_pb(thing, self._registry.presence(thing.thing_id))

    @maps_errors
    async def CreateThing(self, request: rpb.CreateThingRequest, context: Context) -> rpb.CreateThingResponse:  # noqa: N802
        """See the proto."""
        _check_thing_id(request.thing_id)
        thing, password, kaa_token = await self._registry.create_thing(
            request.thing_id, request.thing_type, dict(request.attributes), kaa_app_version=request.kaa_app_version
        )
        credentials = rpb.Credentials(
            client_id=thing.thing_id, username=thing.thing_id, password=password, kaa_endpoint_token=kaa_token
        )
        return rpb.CreateThingResponse(thing=self._pb(thing), credentials=credentials)

    @maps_errors
    async def GetThing(self, request: rpb.GetThingRequest, context: Context) -> rpb.Thing:  # noqa: N802
        """See the proto."""
        _check_thing_id(request.thing_id)
        return self._pb(self._registry.get_thing(request.thing_id))

    @maps_errors
    async def ListThings(self, request: rpb.ListThingsRequest, context: Context) -> rpb.ListThingsResponse:  # noqa: N802
        """See the proto."""
        filters = [request.thing_type, dict(request.attributes), int(request.presence)]
        after = pagination.decode_cursor(request.page_token, filters)
        online = {rpb.ONLINE: True, rpb.OFFLINE: False}.get(request.presence)
        things, last = self._registry.list_things(
            thing_type=request.thing_type,
            attributes=dict(request.attributes),
            online=online,
            after=after,
            limit=pagination.page_size(request.page_size),
        )
        return rpb.ListThingsResponse(
            things=[self._pb(t) for t in things], next_page_token=pagination.encode_cursor(last, filters)
        )

    @maps_errors
    async def UpdateThing(self, request: rpb.UpdateThingRequest, context: Context) -> rpb.Thing:  # noqa: N802
        """See the proto."""
        _check_thing_id(request.thing.thing_id, "thing.thing_id")
        paths = set(request.update_mask.paths) or {"thing_type", "attributes"}
        unknown = paths - {"thing_type", "attributes"}
        if unknown:
            raise InvalidArgument.single("update_mask", f"cannot update {', '.join(sorted(unknown))}")
        thing = await self._registry.update_thing(
            request.thing.thing_id,
            thing_type=request.thing.thing_type if "thing_type" in paths else None,
            attributes=dict(request.thing.attributes) if "attributes" in paths else None,
        )
        return self._pb(thing)

    @maps_errors
    async def DeleteThing(self, request: rpb.DeleteThingRequest, context: Context) -> rpb.DeleteThingResponse:  # noqa: N802
        """See the proto."""
        _check_thing_id(request.thing_id)
        await self._registry.delete_thing(request.thing_id)
        return rpb.DeleteThingResponse()

    @maps_errors
    async def RotateCredentials(self, request: rpb.RotateCredentialsRequest, context: Context) -> rpb.Credentials:  # noqa: N802
        """See the proto."""
        _check_thing_id(request.thing_id)
        password, kaa_token = await self._registry.rotate_credentials(request.thing_id)
        return rpb.Credentials(
            client_id=request.thing_id, username=request.thing_id, password=password, kaa_endpoint_token=kaa_token
        )

    @maps_errors
    async def WatchPresence(  # noqa: N802
        self, request: rpb.WatchPresenceRequest, context: Context
    ) -> AsyncIterator[rpb.PresenceEvent]:
        """See the proto."""
        if request.thing_id:
            _check_thing_id(request.thing_id)
        async for change in self._registry.watch(request.thing_id):
            yield rpb.PresenceEvent(thing_id=change.thing_id, presence=presence_pb(change.presence))


class ThingTypeServicer(rpb_grpc.ThingTypeServiceServicer):
    """Implements ``fleetcmd.v1.ThingTypeService``."""

    # Observes each call's duration (set by the server; None: not observed).
    call_timer: CallTimer | None = None

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self._registry = registry
        self._settings = settings

    @maps_errors
    async def PutThingType(self, request: rpb.PutThingTypeRequest, context: Context) -> rpb.ThingType:  # noqa: N802
        """See the proto."""
        t = request.thing_type
        commands = {
            action: CommandDef(
                description=c.description,
                params_schema=_schema(c.params_schema, f"thing_type.commands[{action!r}].params_schema"),
                result_schema=_schema(c.result_schema, f"thing_type.commands[{action!r}].result_schema"),
                default_ttl_seconds=c.default_ttl_seconds,
            )
            for action, c in t.commands.items()
        }
        stored = await self._registry.put_type(
            t.name,
            description=t.description,
            commands=commands,
            allow_undefined_actions=t.allow_undefined_actions,
            max_ttl=self._settings.max_ttl,
        )
        return thing_type_pb(stored)

    @maps_errors
    async def GetThingType(self, request: rpb.GetThingTypeRequest, context: Context) -> rpb.ThingType:  # noqa: N802
        """See the proto."""
        return thing_type_pb(self._registry.get_type(request.name))

    @maps_errors
    async def ListThingTypes(self, request: rpb.ListThingTypesRequest, context: Context) -> rpb.ListThingTypesResponse:  # noqa: N802
        """See the proto."""
        after = pagination.decode_cursor(request.page_token, [])
        types, last = self._registry.list_types(after=after, limit=pagination.page_size(request.page_size))
        return rpb.ListThingTypesResponse(
            thing_types=[thing_type_pb(t) for t in types], next_page_token=pagination.encode_cursor(last, [])
        )

    @maps_errors
    async def DeleteThingType(self, request: rpb.DeleteThingTypeRequest, context: Context) -> rpb.DeleteThingTypeResponse:  # noqa: N802
        """See the proto."""
        await self._registry.delete_type(request.name)
        return rpb.DeleteThingTypeResponse()
