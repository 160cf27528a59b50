"""``fleetcmd broker-config --mosquitto DIR``: fleetcmd's device rules as mosquitto's password and ACL files.

EMQX asks fleetcmd's HTTP endpoints (``server/api/http_broker_auth.py``) at every CONNECT, publish and
subscribe. Debian's mosquitto 2.0 has no HTTP authentication plugin: it reads a ``password_file`` and an
``acl_file``. This command writes both from the things table, with the rules the embedded broker enforces:

* ``passwd``: one line per thing, ``<thing id>:<hash>`` in mosquitto's own format (``$7$``, PBKDF2-SHA512,
  salted). mosquitto hashes the password a device presents itself, so fleetcmd's ``token_hash`` (unsalted
  SHA-256) cannot be exported: the registry also keeps each password in mosquitto's format from schema 5
  on (``ThingRecord.broker_password_hash``). A thing whose password was issued earlier has none: it is
  left out and named, and ``fleetcmd things rotate`` gives it one. The service's own account (the
  username and password ``fleetcmd serve`` connects with) is added.
* ``acl``: the service's account may use every topic; every thing (username = its id, ``%u``) may
  subscribe with its own request filters and publish its own responses, as each dialect declares them
  (``device_subscribe``/``device_publish``; other placeholders become ``+``). Nothing else is allowed.
* ``mosquitto.conf``: the lines that use them (``include_dir`` the directory, or copy them), and with
  ``--device-listener [HOST:]PORT`` the listener devices connect to, where mosquitto replaces each
  client's id with its username (``use_username_as_clientid``): a thing cannot connect under another
  thing's client id and take its session. The option is per listener, so the replicas keep their own
  client ids on the listener they connect to (keep that one on a private address).

Limits (mosquitto's, not fleetcmd's): the files are a snapshot, so re-export after things are created,
deleted or rotated and send mosquitto ``SIGHUP`` (it re-reads both; live connections stay until they
reconnect); Kaa endpoints cannot be admitted (their credential is the endpoint token in the topic,
stored only as a hash).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_hooks.rules import THING, Dialect, TopicPattern
from server.cli import client
from server.config import ENV_PREFIX, default_database_url
from server.core.errors import FleetcmdError
from server.core.models import ThingRecord
from server.core.registry import broker_password_hash
from server.dialects import DIALECTS
from server.external_broker import events
from server.external_broker.url import BrokerUrlError, parse_broker_url
from server.store import store_from_url

PASSWD = "passwd"
ACL = "acl"
CONF = "mosquitto.conf"
HEADER = (
    "# Written by `fleetcmd broker-config --mosquitto` from the things table: re-export after things are\n"
    "# created, deleted or rotated, then send mosquitto SIGHUP. Do not edit: the next export replaces it.\n"
)


@dataclass
class MosquittoExport:
    """What an export wrote, and what it could not."""

    things: list[str] = field(default_factory=list)  # in the password file
    without_password: list[str] = field(default_factory=list)  # issued before schema 5: rotate them
    unusable_ids: list[str] = field(default_factory=list)  # ids mosquitto's files cannot hold
    kaa_endpoints: list[str] = field(default_factory=list)  # their token-scoped topics cannot be expressed


def _acl_topic(pattern: TopicPattern) -> str:
    return "/".join(
        "%u" if level == "{" + THING + "}" else "+" if level.startswith("{") else level for level in pattern.template.split("/")
    )


def acl_text(dialects: Sequence[Dialect], service_username: str) -> str:
    """Mosquitto's acl_file: the service's account everywhere, each thing its own topics."""
    lines = [HEADER]
    if service_username:
        # '#' does not match topics starting with '$' (MQTT 4.7.2): those are listed by first level.
        dollar = sorted(
            {
                t.split("/", 1)[0]
                for t in [*(p.template for d in dialects for p in (*d.device_publish, *d.device_subscribe)), *events.TOPICS]
                if t.startswith("$")
            }
        )
        lines += [f"user {service_username}", "topic readwrite #", *(f"topic readwrite {first}/#" for first in dollar), ""]
    lines.append("# Every thing: client id = username = its thing id (%u); its own requests in, its own answers out.")
    for dialect in dialects:
        lines += [f"pattern read {_acl_topic(p)}" for p in dialect.device_subscribe if THING in p.names]
        lines += [f"pattern write {_acl_topic(p)}" for p in dialect.device_publish if THING in p.names]
    return "\n".join(lines) + "\n"


def _usable(thing_id: str) -> bool:
    # A password_file line is `username:hash`; an ACL line ends at the line's end.
    return thing_id.isprintable() and ":" not in thing_id and not any(c.isspace() for c in thing_id)


def passwd_text(things: Iterable[ThingRecord], service: tuple[str, str] | None) -> tuple[str, MosquittoExport]:
    """Mosquitto's password_file, and what went into it."""
    export = MosquittoExport()
    lines = []
    if service is not None:
        lines.append(f"{service[0]}:{broker_password_hash(service[1])}")
    for thing in sorted(things, key=lambda t: t.thing_id):
        if thing.kaa_app_version:
            export.kaa_endpoints.append(thing.thing_id)
        if not _usable(thing.thing_id) or (service is not None and thing.thing_id == service[0]):
            export.unusable_ids.append(thing.thing_id)
        elif not thing.broker_password_hash:
            export.without_password.append(thing.thing_id)
        else:
            lines.append(f"{thing.thing_id}:{thing.broker_password_hash}")
            export.things.append(thing.thing_id)
    return "".join(line + "\n" for line in lines), export


def _replace(path: Path, text: str) -> None:
    # Written aside and renamed: mosquitto (re)reading it never sees half a file.
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def parse_listener(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` of ``--device-listener``: the address to bind ('' = every interface) and a port 1-65535."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"not [HOST:]PORT with a port from 1 to 65535: {text!r}")
    if any(c.isspace() for c in host) or not host.isprintable():
        raise argparse.ArgumentTypeError(f"not a host mosquitto can bind: {host!r}")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address as URLs write it
        host = host[1:-1]
    return host, int(port)


def conf_text(directory: Path, device_listener: tuple[str, int] | None = None) -> str:
    """Mosquitto's configuration lines for the exported files, and the devices' listener if one is given."""
    lines = [HEADER.rstrip("\n"), f"password_file {directory / PASSWD}", f"acl_file {directory / ACL}", "allow_anonymous false"]
    if device_listener is not None:
        host, port = device_listener
        lines += [
            "",
            "# Devices connect here. mosquitto replaces each client's id with its username, so a thing cannot",
            "# connect under another thing's client id and take its session. Listener options apply to the",
            "# listener above them: keep this file last in mosquitto's configuration, and the replicas on a",
            "# listener of their own (their client ids stay theirs), on a private address.",
            f"listener {port} {host}".rstrip(),
            "use_username_as_clientid true",
        ]
    return "\n".join(lines) + "\n"


def write_mosquitto(
    directory: Path,
    things: Iterable[ThingRecord],
    service: tuple[str, str] | None,
    dialects: Sequence[Dialect] = (),
    device_listener: tuple[str, int] | None = None,
) -> MosquittoExport:
    """Write ``passwd``, ``acl`` and ``mosquitto.conf`` into ``directory`` (files readable by their owner only).

    ``dialects``: whose device topics the ACL allows (default: every dialect fleetcmd speaks).
    ``device_listener``: (host, port) of a listener for devices that ties each client id to its username.
    """
    dialects = dialects or [bundle.wire for bundle in DIALECTS]
    directory.mkdir(parents=True, exist_ok=True)
    passwd, export = passwd_text(things, service)
    _replace(directory / PASSWD, passwd)
    _replace(directory / ACL, acl_text(dialects, service[0] if service else ""))
    _replace(directory / CONF, conf_text(directory.resolve(), device_listener))
    return export


def service_account() -> tuple[str, str] | None:
    """The account ``fleetcmd serve`` connects with: the one in FLEETCMD_BROKER_URL, else FLEETCMD_BROKER_USERNAME/PASSWORD."""
    url = os.environ.get(f"{ENV_PREFIX}BROKER_URL", "")
    target = parse_broker_url(url) if url else None
    username = (target.username if target else "") or os.environ.get(f"{ENV_PREFIX}BROKER_USERNAME", "")
    password = (target.password if target else "") or os.environ.get(f"{ENV_PREFIX}BROKER_PASSWORD", "")
    return (username, password) if username else None


async def _export(args: argparse.Namespace, service: tuple[str, str] | None) -> MosquittoExport:
    store = store_from_url(os.environ.get(f"{ENV_PREFIX}DATABASE_URL") or default_database_url(client.data_dir(args)))
    async with store:
        things = await store.load_things()
    return await asyncio.to_thread(write_mosquitto, args.mosquitto, things, service, (), args.device_listener)


def cmd_broker_config(args: argparse.Namespace) -> int:
    """``fleetcmd broker-config --mosquitto DIR``."""
    try:
        service = service_account()
        export = asyncio.run(_export(args, service))
    except (FleetcmdError, BrokerUrlError, OSError) as exc:
        print(f"fleetcmd: {exc}", file=sys.stderr)
        return 1
    listener = f" (devices' listener on port {args.device_listener[1]})" if args.device_listener else ""
    print(f"wrote {args.mosquitto}/{PASSWD} ({len(export.things)} things), {ACL} and {CONF}{listener}")
    if service is None:
        print("fleetcmd: warning: no service account (FLEETCMD_BROKER_URL's user or FLEETCMD_BROKER_USERNAME)", file=sys.stderr)
    for names, note in (
        (export.without_password, "password issued before schema 5, left out (give it one: fleetcmd things rotate)"),
        (export.unusable_ids, "an id mosquitto's files cannot hold (or the service's username), left out"),
        (export.kaa_endpoints, "a Kaa endpoint: its token-scoped topics cannot be expressed for mosquitto"),
    ):
        if names:
            print(f"fleetcmd: warning: {note}: {', '.join(names)}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add ``broker-config`` to the ``fleetcmd`` parser."""
    p = sub.add_parser(
        "broker-config",
        help="write an external broker's device rules from the things table (works on the store, as apikey)",
    )
    p.add_argument(
        "--mosquitto", type=Path, required=True, metavar="DIR", help="write mosquitto's passwd, acl and mosquitto.conf here"
    )
    p.add_argument(
        "--device-listener",
        type=parse_listener,
        metavar="[HOST:]PORT",
        help="also write a listener for devices on which mosquitto ties each client id to its username",
    )
    p.add_argument("--data-dir", type=Path, help="the service's data directory (default: $FLEETCMD_DATA_DIR, else ./data)")
    p.set_defaults(func=cmd_broker_config)
