"""The operator console at ``/``: the static files of :mod:`server.console`, and ``GET /api/v1/whoami``.

The console is a page of plain ES modules that speaks only the REST API (with the API key the
operator signs in with, kept in the tab's ``sessionStorage``), so serving it takes no state and
no key: the files are read once, when the application is built, and answered from memory with
an ``ETag``. Only the files listed in :data:`FILES` exist; any other name is a 404.

Every console response carries a strict Content-Security-Policy (:data:`CSP`): scripts only from
this origin (no inline script, no ``eval``), no plugin, no framing, requests only to this origin.
``whoami`` tells the signed-in console which key and role it holds, so it shows only what the
role may do (the REST API enforces the roles either way).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from server.api.http_rest import API_PREFIX, RestRoute, authorize
from server.core.apikeys import ApiKeys
from server.core.authz import Operation

INDEX_PATH = "/"
STATIC_PREFIX = "/console/"
STATIC_PATH = STATIC_PREFIX + "{file}"
WHOAMI = f"{API_PREFIX}/whoami"

# The console's one API route: any valid key may ask who it is (LIST is the least role's operation).
ROUTES: tuple[RestRoute, ...] = (RestRoute("GET", WHOAMI, "whoami", Operation.LIST),)

# The shipped files and their media types; a file not listed here is not served (no directory walk).
FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "schemaform.js": "text/javascript; charset=utf-8",
    "commands.js": "text/javascript; charset=utf-8",
    "detail.js": "text/javascript; charset=utf-8",
    "send.js": "text/javascript; charset=utf-8",
    "registry.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# Scripts and styles from this origin only (no 'unsafe-inline', no 'unsafe-eval'); the page talks
# to this origin only (connect-src: REST and the event stream); it may not be framed.
CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True)
class StaticFile:
    """One console file, read into memory."""

    body: bytes
    content_type: str
    etag: str


def load_files() -> dict[str, StaticFile]:
    """Read every file of :data:`FILES` from the package (blocking; once, when the app is built).

    Raises:
        FileNotFoundError: a listed file is not in the installed package (a packaging bug).
    """
    root = resources.files("server.console") / "static"
    out = {}
    for name, content_type in FILES.items():
        body = (root / name).read_bytes()
        out[name] = StaticFile(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


class Console:
    """Handlers of the console's files and of ``whoami``."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys
        self._files = load_files()

    def routes(self) -> list[web.RouteDef]:
        """``GET /``, ``GET /console/{file}`` (public: they hold no data) and ``GET /api/v1/whoami`` (any key)."""
        return [web.get(INDEX_PATH, self.index), web.get(STATIC_PATH, self.static), web.get(WHOAMI, self.whoami)]

    def _serve(self, request: web.Request, name: str, cache: str) -> web.Response:
        found = self._files.get(name)
        if found is None:
            raise web.HTTPNotFound(text=f"no console file {name!r}")
        headers = {**SECURITY_HEADERS, "ETag": found.etag, "Cache-Control": cache}
        if request.headers.get("If-None-Match") == found.etag:
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = found.content_type
        return web.Response(body=found.body, headers=headers)

    async def index(self, request: web.Request) -> web.Response:
        """The console's page (revalidated on every load, so an upgrade is seen at once)."""
        return self._serve(request, "index.html", "no-cache")

    async def static(self, request: web.Request) -> web.Response:
        """A script, style or icon of the console (revalidated too: the names carry no version)."""
        return self._serve(request, request.match_info["file"], "no-cache")

    async def whoami(self, request: web.Request) -> web.Response:
        """``GET /api/v1/whoami``: the caller's key id, name and role (any valid key; 401 otherwise)."""
        # Authorized here rather than by guarded_routes: the answer is the principal the check finds.
        principal = await authorize(self._keys, request, ROUTES[0].operation)
        return web.json_response({"keyId": principal.key_id, "name": principal.name, "role": principal.role.name.lower()})


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI path items of the console's routes (merged into the document by :mod:`server.api.http_app`)."""
    html = {"description": "The console's page.", "content": {"text/html": {"schema": {"type": "string"}}}}
    return {
        INDEX_PATH: {
            "get": {
                "tags": ["console"],
                "operationId": "console",
                "summary": "The operator console (no key: it signs in with one)",
                "security": [],
                "responses": {"200": html},
            }
        },
        STATIC_PATH: {
            "get": {
                "tags": ["console"],
                "operationId": "consoleFile",
                "summary": "A script, style sheet or icon of the console",
                "security": [],
                "parameters": [{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The file."}, "404": {"$ref": "#/components/responses/NotFound"}},
            }
        },
        WHOAMI: {
            "get": {
                "tags": ["console"],
                "operationId": "whoami",
                "summary": "The calling key's id, name and role (any key)",
                "responses": {
                    "200": {
                        "description": "Who the key is.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["keyId", "name", "role"],
                                    "properties": {
                                        "keyId": {"type": "string"},
                                        "name": {"type": "string"},
                                        "role": {"type": "string", "enum": ["viewer", "operator", "admin"]},
                                    },
                                }
                            }
                        },
                    },
                    "401": {"$ref": "#/components/responses/Unauthorized"},
                },
            }
        },
    }
