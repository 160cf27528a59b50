"""Import rules between the parts of the service (issue 14, items 2 and 3).

``broker_hooks`` is generic broker machinery: it imports nothing from ``server`` (the dialects'
topics and decoders live in ``server/dialects/``). The core (``server/core/``) names no dialect:
it imports nothing from ``server.dialects``, and neither do the surfaces (``server/api/``) and the store.

The HTTP surface (every ``server/api/http_*.py``, ``server/api/openapi.py`` and the Kaa HTTP routes) stands on the
application layer, not on the gRPC surface: it imports neither ``grpc`` (nor any
``grpc_*`` package), nor protobuf, nor the generated ``server.pb`` code, nor the
gRPC surface's own modules. Imports are read with :mod:`ast`, so a comment or a
string that names them does not count and ``from server import pb`` does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server"
BROKER_HOOKS = sorted((ROOT / "broker_hooks").rglob("*.py"))
CORE = sorted((SERVER / "core").glob("*.py"))
EXTERNAL_BROKER = sorted((SERVER / "external_broker").glob("*.py"))
# Neither the core nor the operator surfaces nor the store nor the external broker's client name a
# dialect (the app wires the bundles in).
DIALECT_FREE = sorted([*CORE, *(SERVER / "api").glob("*.py"), *(SERVER / "store").glob("*.py"), *EXTERNAL_BROKER])
HTTP_SURFACE = sorted(
    [*(SERVER / "api").glob("http_*.py"), SERVER / "api" / "openapi.py", SERVER / "dialects" / "kaa" / "http.py"]
)

# Modules the HTTP surface must not import (a name matches itself and everything under it).
FORBIDDEN = ("grpc", "google.protobuf", "google.rpc", "server.pb", "server.api.convert", "server.api.registry_api")
FORBIDDEN_PREFIXES = ("grpc_", "server.api.grpc_")  # grpc_status, grpc_health, ...; server.api.grpc_api, grpc_errors, grpc_auth


def imported_modules(source: str) -> list[tuple[int, str]]:
    """Every module an import statement in ``source`` names, with its line (``from a import b``: ``a`` and ``a.b``)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"line {node.lineno}: relative import"
            out.append((node.lineno, node.module))
            # `from server import pb` imports the module server.pb; `from x import name` is harmless either way.
            out.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return out


def forbidden(module: str) -> bool:
    """Whether the HTTP surface may not import ``module``."""
    if any(module == name or module.startswith(name + ".") for name in FORBIDDEN):
        return True
    return module.startswith(FORBIDDEN_PREFIXES)


def violations(source: str) -> list[str]:
    """The forbidden imports of one module's source, as ``line: module``."""
    return [f"{line}: {module}" for line, module in imported_modules(source) if forbidden(module)]


def test_the_http_surface_is_every_http_module_and_openapi() -> None:
    names = {path.relative_to(SERVER).as_posix() for path in HTTP_SURFACE}
    assert {"api/http_app.py", "api/http_rest.py", "dialects/kaa/http.py", "api/openapi.py"} <= names


@pytest.mark.parametrize("path", HTTP_SURFACE, ids=lambda p: p.relative_to(SERVER).as_posix())
def test_the_http_surface_imports_no_grpc_and_no_protobuf(path: Path) -> None:
    assert violations(path.read_text()) == [], f"{path.name} leans on the gRPC surface"


@pytest.mark.parametrize(
    "source",
    [
        "import grpc",
        "import grpc.aio",
        "from grpc import StatusCode",
        "import grpc_status.rpc_status",
        "from google.protobuf import timestamp_pb2",
        "import google.protobuf.json_format",
        "from google.rpc import code_pb2",
        "from server.pb import commands_pb2 as pb",
        "from server import pb",
        "from server.api import convert",
        "from server.api.grpc_errors import grpc_code",
        "from server.api import grpc_auth",
        "def f():\n    import grpc\n",
    ],
)
def test_the_rule_catches_each_form_of_a_forbidden_import(source: str) -> None:
    assert violations(source)


@pytest.mark.parametrize(
    "source",
    [
        "from server import pagination\nfrom server.core.authz import Operation",
        "import aiohttp\nfrom aiohttp import web",
        "text = 'import grpc'  # import grpc",
        "from server.core.errors import FleetcmdError",
        "import json",
    ],
)
def test_the_rule_allows_the_application_layer(source: str) -> None:
    assert violations(source) == []


def imports_of(source: str, package: str) -> list[str]:
    """The imports in ``source`` of ``package`` or anything under it, as ``line: module``."""
    return [
        f"{line}: {module}" for line, module in imported_modules(source) if module == package or module.startswith(package + ".")
    ]


def test_broker_hooks_and_the_core_are_every_module_there() -> None:
    assert {"broker.py", "rules.py", "acl.py", "handler.py", "session.py"} <= {path.name for path in BROKER_HOOKS}
    assert {"commands.py", "delivery.py", "models.py"} <= {path.name for path in CORE}
    # The dialect modules left broker_hooks for server/dialects.
    assert not {"emqx.py", "kaa.py"} & {path.name for path in BROKER_HOOKS}


@pytest.mark.parametrize("path", BROKER_HOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_broker_hooks_imports_nothing_from_server(path: Path) -> None:
    assert imports_of(path.read_text(), "server") == [], f"{path.relative_to(ROOT)} leans on the control plane"


@pytest.mark.parametrize("path", DIALECT_FREE, ids=lambda p: p.relative_to(SERVER).as_posix())
def test_the_core_the_surfaces_and_the_store_import_no_dialect(path: Path) -> None:
    assert imports_of(path.read_text(), "server.dialects") == [], f"{path.relative_to(SERVER)} names a dialect"


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from server.core.models import DeviceReport", True),
        ("import server.core.lifecycle", True),
        ("from server import config", True),
        ("def f():\n    from server.core import models\n", True),
        ("from broker_hooks import jsonvalue", False),
        ("import serverless", False),
        ("text = 'from server import x'", False),
    ],
)
def test_the_server_rule_catches_each_form_and_only_those(source: str, found: bool) -> None:
    assert bool(imports_of(source, "server")) is found


# ---- the rest of docs/architecture.md's rules ------------------------------------------------------

STORE = sorted((SERVER / "store").glob("*.py"))
DIALECTS = sorted((SERVER / "dialects").rglob("*.py"))
EVERY_MODULE = sorted(p for p in [*SERVER.rglob("*.py"), *BROKER_HOOKS] if "pb" not in p.relative_to(ROOT).parts)


def _outside(imports: list[str], allowed: tuple[str, ...]) -> list[str]:
    return [i for i in imports if not any(i.split(": ", 1)[1] == a or i.split(": ", 1)[1].startswith(a + ".") for a in allowed)]


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.relative_to(SERVER).as_posix())
def test_the_core_stands_on_nothing_above_it(path: Path) -> None:
    source = path.read_text()
    above = [i for package in ("server.api", "server.dialects", "server.cli", "server.app") for i in imports_of(source, package)]
    assert above == [], f"{path.relative_to(SERVER)} leans on a layer above the core"
    # The store's contract (the server.store package), never an implementation.
    implementations = [f"server.store.{p.stem}" for p in STORE if p.stem != "__init__"]
    assert [i for impl in implementations for i in imports_of(source, impl)] == []


@pytest.mark.parametrize("path", STORE, ids=lambda p: p.relative_to(SERVER).as_posix())
def test_the_store_stands_on_the_core_only(path: Path) -> None:
    imports = imports_of(path.read_text(), "server")
    assert _outside(imports, ("server.core", "server.store")) == [], f"{path.relative_to(SERVER)} leans on more than the core"


@pytest.mark.parametrize("path", EVERY_MODULE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_only_the_store_speaks_sqlite(path: Path) -> None:
    if path in STORE:
        return
    assert imports_of(path.read_text(), "sqlite3") == [], f"{path.relative_to(ROOT)} opens SQLite itself"


@pytest.mark.parametrize("path", EXTERNAL_BROKER, ids=lambda p: p.relative_to(SERVER).as_posix())
def test_the_external_broker_client_stands_on_the_core_and_broker_hooks_only(path: Path) -> None:
    # Like the embedded broker it meets the core at DeviceSink and DeviceLink: no surface, no CLI, no store.
    imports = imports_of(path.read_text(), "server")
    allowed = ("server.core", "server.external_broker")
    assert _outside(imports, allowed) == [], f"{path.relative_to(SERVER)} leans on more than the core"
    # server.config reads the broker URL through url.py: that module needs no MQTT library.
    if path.name == "url.py" or path.name == "__init__.py":
        assert imports_of(path.read_text(), "paho") == []


def test_the_external_broker_client_is_every_module_there() -> None:
    assert {"__init__.py", "url.py", "link.py", "events.py"} <= {p.name for p in EXTERNAL_BROKER}


@pytest.mark.parametrize("path", DIALECTS, ids=lambda p: p.relative_to(SERVER).as_posix())
def test_a_dialect_knows_no_grpc(path: Path) -> None:
    # A dialect may bring HTTP routes (server.api.http_app's building blocks), never the gRPC surface.
    assert violations(path.read_text()) == [], f"{path.relative_to(SERVER)} leans on the gRPC surface"


@pytest.mark.parametrize("path", EVERY_MODULE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_only_the_cli_starts_the_app(path: Path) -> None:
    if path.relative_to(SERVER).parts[0:1] == ("cli",) if path.is_relative_to(SERVER) else False:
        return
    assert imports_of(path.read_text(), "server.app") == [], f"{path.relative_to(ROOT)} composes the service"


def test_the_rules_are_written_down() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    for rule in (
        "imports nothing from `server`",
        "only `server/store` imports `sqlite3`",
        "never the gRPC surface",
        "`server/external_broker` imports only `server/core`",
    ):
        assert rule in text, rule
