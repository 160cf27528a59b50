"""The console's HTTP side (issue 15 §2): its files, their security headers, no inline script, ``whoami``.

The browser tests (tests/test_console_browser.py) show what the console does; these check what
the server promises about it without a browser: the Content-Security-Policy forbids inline
scripts, and no shipped page needs one.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import aiohttp
import pytest

from server.api import http_console
from server.app import FleetcmdApp
from server.core.apikeys import Role

STATIC = resources.files("server.console") / "static"


@pytest.fixture
async def session(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None and app.ports.http
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}") as s:
        yield s


class Scripts(HTMLParser):
    """Every <script> of a page (its attributes and text) and every inline handler or style attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.inline: list[str] = []
        self._in_script: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, _ in attrs:
            if name.startswith("on") or name == "style":
                self.inline.append(f"<{tag} {name}>")
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_data(self, data: str) -> None:
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = None


def test_the_policy_allows_no_inline_script_and_only_this_origin() -> None:
    directives = dict(d.split(" ", 1) for d in http_console.CSP.split("; "))
    assert directives["script-src"] == "'self'"
    assert directives["default-src"] == "'none'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in http_console.CSP and "unsafe-eval" not in http_console.CSP


def test_the_page_has_no_inline_script_handler_or_style() -> None:
    parser = Scripts()
    parser.feed((STATIC / "index.html").read_text())
    assert parser.scripts, "the page loads its script"
    for attrs, text in parser.scripts:
        assert attrs.get("src", "").startswith("/console/"), attrs  # type: ignore[union-attr]
        assert text.strip() == ""
    assert parser.inline == []


def test_the_parser_finds_an_inline_script() -> None:
    # The check above can fail: it sees each kind of inline code.
    for page in ("<script>alert(1)</script>", '<button onclick="x()">', '<p style="color:red">'):
        parser = Scripts()
        parser.feed(page)
        assert parser.inline or any(text for _, text in parser.scripts), page


def test_every_shipped_file_is_listed_and_no_script_builds_markup_or_code_from_strings() -> None:
    shipped = {entry.name for entry in STATIC.iterdir() if entry.is_file()}
    assert shipped == set(http_console.FILES)
    imports = 0
    for name in shipped:
        if name.endswith(".js"):
            source = (STATIC / name).read_text()
            # Text goes in with textContent only: markup parsing and eval stay out (CSP forbids eval anyway).
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
                assert sink not in source, (name, sink)
            # Relative imports of shipped files only (served from /console/, nothing from another origin).
            for imported in re.findall(r'^import .* from "([^"]+)";$', source, re.M):
                assert imported.startswith("./") and imported[2:] in shipped, (name, imported)
                imports += 1
    assert imports >= 5  # app.js alone imports six modules: the pattern does find them


async def test_the_console_is_served_at_the_root_with_its_security_headers(session: aiohttp.ClientSession) -> None:
    async with session.get("/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        page = await resp.text()
        headers = resp.headers
    assert headers["Content-Security-Policy"] == http_console.CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert page == (STATIC / "index.html").read_text()
    for name, content_type in http_console.FILES.items():
        async with session.get(f"/console/{name}") as resp:
            assert resp.status == 200, name
            assert resp.headers["Content-Type"] == content_type
            assert resp.headers["Content-Security-Policy"] == http_console.CSP
            assert await resp.read() == (STATIC / name).read_bytes()
            etag = resp.headers["ETag"]
        async with session.get(f"/console/{name}", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
            assert await resp.read() == b""


@pytest.mark.parametrize("path", ["/console/nope.js", "/console/..%2Fapp.py", "/console/", "/console/static"])
async def test_only_listed_files_are_served(session: aiohttp.ClientSession, path: str) -> None:
    async with session.get(path) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["code"] == "NOT_FOUND"


async def test_whoami_names_the_key_and_its_role(app: FleetcmdApp, session: aiohttp.ClientSession) -> None:
    assert app.keys is not None
    for role in Role:
        record, token = await app.keys.create(f"{role.name.lower()}-key", role)
        async with session.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"keyId": record.key_id, "name": f"{role.name.lower()}-key", "role": role.name.lower()}
    for headers in ({}, {"Authorization": "Bearer fck_nope_nope"}):
        async with session.get("/api/v1/whoami", headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["code"] == "UNAUTHENTICATED"


def test_the_console_package_is_files_read_by_http_console_alone() -> None:
    # docs/architecture.md: server/console holds no Python but its package marker; only http_console reads it.
    server = Path(__file__).resolve().parent.parent / "server"
    assert sorted(p.name for p in (server / "console").rglob("*.py")) == ["__init__.py"]
    readers = sorted(str(p.relative_to(server)) for p in server.rglob("*.py") if '"server.console"' in p.read_text())
    assert readers == ["api/http_console.py"]


PAGE_SIZE = int(re.search(r"export const PAGE_SIZE = (\d+);", (STATIC / "commands.js").read_text()).group(1))  # type: ignore[union-attr]
