"""``fleetcmd things ...``, ``fleetcmd types ...`` (over gRPC) and ``fleetcmd apikey ...`` (on the data directory)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from server.cli import client
from server.config import ENV_PREFIX, default_database_url
from server.core.apikeys import ApiKeys, Role
from server.core.errors import FleetcmdError
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc
from server.store import store_from_url

EXIT_USAGE = 2


def _json(message: Any) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)


def _ms(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else "-"


def _attributes(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"fleetcmd: --attr takes KEY=VALUE, not {item!r}")
        out[key] = value
    return out


_THING_ROW = "{:<32} {:<20} {:<8} {:<22} {}"


def _print_things(things: Any) -> None:
    """A header and one row per thing, or a line saying there is none."""
    if not things:
        print("(no things)")
        return
    print(_THING_ROW.format("THING", "TYPE", "PRESENCE", "REMOTE ADDRESS", "ATTRIBUTES"))
    for t in things:
        p = t.presence
        state = "online" if p.online else "offline"
        attrs = " ".join(f"{k}={v}" for k, v in sorted(t.attributes.items()))
        print(_THING_ROW.format(t.thing_id, t.thing_type or "-", state, p.remote_address or "-", attrs))


def _type_json(thing_type: rpb.ThingType) -> str:
    """A thing type as JSON with its schemas as objects (they travel as JSON text), as ``types put`` reads it."""
    data = json_format.MessageToDict(thing_type, preserving_proto_field_name=True)
    for command in (data.get("commands") or {}).values():
        for key in ("params_schema", "result_schema"):
            if isinstance(command.get(key), str):
                command[key] = json.loads(command[key])
    return json.dumps(data)


# ---- things ------------------------------------------------------------------------------


def cmd_things(args: argparse.Namespace) -> int:
    """``fleetcmd things create|get|list|delete|rotate``."""
    with client.channel(args) as ch:
        stub = rpb_grpc.ThingServiceStub(ch)
        t = args.timeout
        if args.things_command == "create":
            req = rpb.CreateThingRequest(
                thing_id=args.thing,
                thing_type=args.type or "",
                attributes=_attributes(args.attr),
                kaa_app_version=args.kaa_app_version or "",
            )
            created = stub.CreateThing(req, timeout=t)
            if args.json:
                print(_json(created))
            else:
                c = created.credentials
                print(f"thing      {created.thing.thing_id}")
                print(f"client id  {c.client_id}")
                print(f"username   {c.username}")
                print(f"password   {c.password}   (shown once; store it on the device)")
                if c.kaa_endpoint_token:
                    print(f"kaa token  {c.kaa_endpoint_token}   (application version {created.thing.kaa_app_version})")
        elif args.things_command == "get":
            thing = stub.GetThing(rpb.GetThingRequest(thing_id=args.thing), timeout=t)
            print(_json(thing)) if args.json else _print_things([thing])
        elif args.things_command == "list":
            presence = {"online": rpb.ONLINE, "offline": rpb.OFFLINE}.get(args.presence or "", rpb.PRESENCE_FILTER_UNSPECIFIED)
            list_req = rpb.ListThingsRequest(
                thing_type=args.type or "", attributes=_attributes(args.attr), presence=presence, page_size=args.limit
            )
            resp = stub.ListThings(list_req, timeout=t)
            if args.json:
                print(_json(resp))
            else:
                _print_things(resp.things)
        elif args.things_command == "delete":
            stub.DeleteThing(rpb.DeleteThingRequest(thing_id=args.thing), timeout=t)
            print(f"deleted {args.thing}")
        else:  # rotate
            creds = stub.RotateCredentials(rpb.RotateCredentialsRequest(thing_id=args.thing), timeout=t)
            print(_json(creds)) if args.json else print(f"password   {creds.password}   (shown once)")
    return 0


# ---- thing types -------------------------------------------------------------------------


def cmd_types(args: argparse.Namespace) -> int:
    """``fleetcmd types put FILE|get|list|delete``."""
    with client.channel(args) as ch:
        stub = rpb_grpc.ThingTypeServiceStub(ch)
        t = args.timeout
        if args.types_command == "put":
            try:
                data = json.loads(Path(args.file).read_text())
                # Schemas travel as JSON text, in the file's key order (it orders the filled payload).
                for command in (data.get("commands") or {}).values():
                    for key in ("params_schema", "paramsSchema", "result_schema", "resultSchema"):
                        if isinstance(command, dict) and key in command and not isinstance(command[key], str):
                            command[key] = json.dumps(command[key])
                thing_type = json_format.ParseDict(data, rpb.ThingType())
            except (OSError, ValueError, json_format.ParseError) as exc:
                print(f"fleetcmd: {args.file}: {exc}", file=sys.stderr)
                return EXIT_USAGE
            stored = stub.PutThingType(rpb.PutThingTypeRequest(thing_type=thing_type), timeout=t)
            print(_json(stored)) if args.json else print(f"{stored.name} version {stored.version}")
        elif args.types_command == "get":
            print(_type_json(stub.GetThingType(rpb.GetThingTypeRequest(name=args.name), timeout=t)))
        elif args.types_command == "list":
            resp = stub.ListThingTypes(rpb.ListThingTypesRequest(page_size=args.limit), timeout=t)
            if args.json:
                print(_json(resp))
            elif not resp.thing_types:
                print("(no thing types)")
            else:
                print(f"{'NAME':<32} {'VERSION':<7} COMMANDS")
                for tt in resp.thing_types:
                    print(f"{tt.name:<32} {'v' + str(tt.version):<7} {', '.join(sorted(tt.commands)) or '(any action)'}")
        else:  # delete
            stub.DeleteThingType(rpb.DeleteThingTypeRequest(name=args.name), timeout=t)
            print(f"deleted {args.name}")
    return 0


# ---- API keys (local: they guard the API, so they are managed next to the data) ----------


def _print_keys(records: Any) -> None:
    """The keys as a table whose columns line up whatever the key ids' lengths."""
    rows = [
        (
            rec.key_id,
            rec.role,
            f"revoked {_ms(rec.revoked_at_ms)}" if rec.revoked_at_ms else "active",
            _ms(rec.created_at_ms),
            rec.name,
        )
        for rec in records
    ]
    if not rows:
        print("(no API keys)")
        return
    header = ("KEY ID", "ROLE", "STATE", "CREATED", "NAME")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(f"{v!s:<{w}}" for v, w in zip(row, widths, strict=False)) + "  " + str(row[-1]))


async def _apikey(args: argparse.Namespace) -> int:
    # The service's store: the same setting (FLEETCMD_DATABASE_URL), else the file in the data directory.
    store = store_from_url(os.environ.get(f"{ENV_PREFIX}DATABASE_URL") or default_database_url(client.data_dir(args)))
    async with store:
        writer = asyncio.create_task(store.run_writer(), name="store-writer")
        try:
            keys = ApiKeys(store)
            if args.apikey_command == "create":
                record, token = await keys.create(args.name, Role.parse(args.role))
                print(json.dumps({"key_id": record.key_id, "role": record.role, "key": token}) if args.json else token)
            elif args.apikey_command == "list":
                _print_keys(await keys.list())
            else:
                await keys.revoke(args.key_id)
                print(f"revoked {args.key_id}")
        finally:
            store.stop_writer()
            await writer
    return 0


def cmd_apikey(args: argparse.Namespace) -> int:
    """``fleetcmd apikey create|list|revoke``."""
    try:
        return asyncio.run(_apikey(args))
    except FleetcmdError as exc:
        print(f"fleetcmd: {exc}", file=sys.stderr)
        return 1


def register(sub: Any, client_flags: argparse.ArgumentParser) -> None:
    """Add the admin subcommands to the ``fleetcmd`` parser."""
    things = sub.add_parser("things", help="register and manage things").add_subparsers(dest="things_command", required=True)
    p = things.add_parser("create", parents=[client_flags], help="register a thing; prints its credentials once")
    p.add_argument("thing", help="the thing id (also its MQTT client id and username)")
    p.add_argument("--type")
    p.add_argument("--attr", action="append", default=[], help="KEY=VALUE, repeatable")
    p.add_argument("--kaa-app-version", help="register a Kaa endpoint of this application version (prints its token)")
    for name, help_text in (("get", "show a thing"), ("delete", "unregister a thing"), ("rotate", "issue a new password")):
        p = things.add_parser(name, parents=[client_flags], help=help_text)
        p.add_argument("thing", help="the thing id")
    p = things.add_parser("list", parents=[client_flags], help="list things")
    p.add_argument("--type")
    p.add_argument("--attr", action="append", default=[], help="KEY=VALUE, repeatable")
    p.add_argument("--presence", choices=["online", "offline"])
    p.add_argument("--limit", type=int, default=100)
    for parser in things.choices.values():
        parser.set_defaults(func=cmd_things)

    types = sub.add_parser("types", help="define thing types and their commands").add_subparsers(
        dest="types_command", required=True
    )
    p = types.add_parser("put", parents=[client_flags], help="create or replace a type from a JSON file")
    p.add_argument("file", help="a JSON file: {name, commands: {action: {params_schema, result_schema, ...}}}")
    for name, help_text in (("get", "show a type with its command schemas"), ("delete", "delete a type")):
        p = types.add_parser(name, parents=[client_flags], help=help_text)
        p.add_argument("name", help="the type's name")
    p = types.add_parser("list", parents=[client_flags], help="list types with their commands")
    p.add_argument("--limit", type=int, default=100)
    for parser in types.choices.values():
        parser.set_defaults(func=cmd_types)

    local = argparse.ArgumentParser(add_help=False)
    local.add_argument("--data-dir", type=Path, help="the service's data directory (default: $FLEETCMD_DATA_DIR, else ./data)")
    local.add_argument("--json", action="store_true")
    keys = sub.add_parser(
        "apikey", help="manage API keys (works on the store: $FLEETCMD_DATABASE_URL, else the data directory)"
    ).add_subparsers(dest="apikey_command", required=True)
    p = keys.add_parser("create", parents=[local], help="create a key; prints it once")
    p.add_argument("--name", required=True)
    p.add_argument("--role", default="operator", choices=[r.name.lower() for r in Role])
    keys.add_parser("list", parents=[local], help="list keys")
    p = keys.add_parser("revoke", parents=[local], help="revoke a key (effective within a second)")
    p.add_argument("key_id")
    for parser in keys.choices.values():
        parser.set_defaults(func=cmd_apikey)
