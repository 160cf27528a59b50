"""Client-side helpers of the CLI: finding the API key and opening an authenticated channel."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from server.api import convert
from server.config import ENV_PREFIX
from server.core.apikeys import ADMIN_KEY_FILE


class MissingApiKey(Exception):
    """No API key was given and no admin key file was found."""


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every client command shares."""
    parser.add_argument("--server", default="127.0.0.1:50051", help="gRPC address (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--timeout", type=float, default=10.0, help="RPC deadline in seconds")
    parser.add_argument(
        "--api-key",
        help=f"API key (default: ${ENV_PREFIX}API_KEY, else the admin key file in the data directory)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"data directory holding {ADMIN_KEY_FILE} (default: ${ENV_PREFIX}DATA_DIR, else ./data)",
    )


def data_dir(args: argparse.Namespace) -> Path:
    """The data directory a command refers to."""
    given: Path | None = getattr(args, "data_dir", None)
    return given or Path(os.environ.get(f"{ENV_PREFIX}DATA_DIR") or "data")


def api_key(args: argparse.Namespace) -> str:
    """The key to present: ``--api-key``, ``$FLEETCMD_API_KEY`` or the admin key file.

    Raises:
        MissingApiKey: none of them is there.
    """
    key: str | None = args.api_key or os.environ.get(f"{ENV_PREFIX}API_KEY")
    if key:
        return key
    path = data_dir(args) / ADMIN_KEY_FILE
    try:
        return path.read_text().strip()
    except OSError:
        raise MissingApiKey(
            f"no API key: pass --api-key, set {ENV_PREFIX}API_KEY, or point --data-dir at the service's data "
            f"directory ({path} is not readable)"
        ) from None


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Adds ``authorization: Bearer <key>`` to every call."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: Any) -> Any:
        return _Details(details.method, details.timeout, [*(details.metadata or ()), self._header], details.credentials)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = None
        self.compression = None


@contextlib.contextmanager
def channel(args: argparse.Namespace) -> Iterator[grpc.Channel]:
    """An authenticated channel to ``args.server``."""
    key = api_key(args)
    with grpc.insecure_channel(args.server) as raw:
        yield grpc.intercept_channel(raw, _Bearer(key))


_JSON_VALUES = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
_INT64 = {FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64}


def _plain(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Undo protobuf's JSON mapping where it misleads a script: int64 as strings, integers as doubles."""
    for f in descriptor.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        repeated = f.is_repeated
        if f.message_type is not None:
            if f.message_type.full_name in _JSON_VALUES:
                data[f.name] = convert.integral(value)
            elif not f.message_type.full_name.startswith("google.protobuf.") and not f.message_type.GetOptions().map_entry:
                for item in value if repeated else [value]:
                    _plain(f.message_type, item)
        elif f.cpp_type in _INT64:
            data[f.name] = [int(v) for v in value] if repeated else int(value)
    return data


def plain_json(message: Any) -> str:
    """A message as one line of JSON, field names as in the proto, integers as JSON integers (``--json`` output)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(_plain(message.DESCRIPTOR, data), separators=(",", ":"))
