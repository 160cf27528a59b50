"""What the console's browser tests share: the real service signed into, Chromium, a signed-in page opener.

Debian's ``chromium`` driven by Playwright for Python with the system browser as its executable:
Playwright never downloads a browser. The service is the real process (:mod:`tests.proc`) with an
admin, an operator and a viewer key and the README's dimmer type (put with the README's own CLI
command); its devices are real paho clients (:mod:`tests.devices`). Screenshots go into
``$FLEETCMD_SCREENSHOTS`` when set (``scripts/screenshots.py`` sets it to ``docs/screenshots``), else
into the test module's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, expect, sync_playwright

from tests.devices import EmqxDevice, RequestHandler
from tests.proc import Service, run_cli

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)
SECTION = "### Thing types: commands with schemas"
# The browser logs every 4xx answer; those the console expects (a bad key, a refused send) it shows itself.
EXPECTED_REFUSAL = "Failed to load resource: the server responded with a status of 4"

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)


def dimmer_example() -> tuple[dict[str, Any], dict[str, Any], str]:
    """The README's dimmer type, the params its `send` gives, and the payload it says the device receives (as written)."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        if SECTION in text:
            break
    else:
        raise AssertionError(f"no {SECTION!r} in README.md or docs/")
    section = text[text.index(SECTION) :]
    type_json = re.search(r"```json\n(.*?)```", section, re.S)
    send = re.search(r"send lamp-7 dimming --params '(\{.*?\})'", section)
    receives = re.search(r"# the device receives (\{.*?\})\n(?!#\s+[\"{,])", section, re.S)
    assert type_json and send and receives, "the README's dimmer example changed shape"
    payload = "".join(line.lstrip("#").strip() for line in receives.group(1).splitlines())
    return json.loads(type_json.group(1)), json.loads(send.group(1)), payload


class ConsoleService:
    """The service a browser test module signs into: its keys by role, its devices, where screenshots go."""

    def __init__(self, service: Service, keys: dict[str, str], shots: Path) -> None:
        assert service.ready is not None
        self.service = service
        self.keys = keys
        self.shots = shots
        self.url = f"http://127.0.0.1:{service.ready.http_port}/"
        self.grpc = service.ready.grpc_target
        self.devices: list[EmqxDevice] = []

    def cli(self, *args: str) -> str:
        """Run a ``fleetcmd`` CLI command as the admin; its output (the command must succeed)."""
        done = run_cli(*args, target=self.grpc, api_key=self.keys["admin"])
        assert done.returncode == 0, done.stderr
        return done.stdout

    def rest(self, method: str, path: str, body: Any = None, key: str = "operator") -> Any:
        """A REST call made by the test itself (to set up what the console then shows), as the role ``key``."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + "api/v1" + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.keys[key]}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def start_device(self, thing_id: str, on_request: RequestHandler | None = None) -> EmqxDevice:
        """Connect a real device for ``thing_id``; it is stopped when the service is."""
        assert self.service.ready is not None
        device = EmqxDevice("127.0.0.1", self.service.ready.mqtt_port, thing_id, on_request=on_request)
        self.devices.append(device)
        device.start()
        return device


S = TypeVar("S", bound=ConsoleService)


@contextmanager
def console_service(work: Path, owner: str, kind: type[S]) -> Iterator[S]:
    """Run the service in ``work`` with the README's dimmer type and an operator and a viewer key named after ``owner``.

    Args:
        work: a temporary directory of the test module (the data directory, screenshots by default).
        owner: the keys are named ``operator-<owner>`` and ``viewer-<owner>`` (the console shows the name).
        kind: the class to make of it (a test module's subclass of :class:`ConsoleService`).

    Yields:
        The running service; the devices it started are stopped before it is.
    """
    shots = Path(os.environ.get("FLEETCMD_SCREENSHOTS") or work / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    dimmer, _, _ = dimmer_example()
    (work / "dimmer.json").write_text(json.dumps(dimmer))
    with Service(work / "data") as service:
        assert service.ready is not None
        keys = {"admin": service.api_key}
        for role in ("operator", "viewer"):
            done = run_cli("apikey", "create", "--name", f"{role}-{owner}", "--role", role, "--data-dir", service.ready.data_dir)
            assert done.returncode == 0, done.stderr
            keys[role] = done.stdout.strip()
        served = kind(service, keys, shots)
        served.cli("types", "put", str(work / "dimmer.json"))
        try:
            yield served
        finally:
            for device in served.devices:
                device.stop()


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, through Playwright."""
    assert CHROMIUM is not None
    with sync_playwright() as p:
        # The system browser: Playwright downloads none. No sandbox: CI runs as root in a container.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def sign_in(page: Page, key: str) -> None:
    """Sign in on the page's sign-in form with ``key`` and wait until the console is signed in."""
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


@contextmanager
def page_opener(browser: Browser, url: str, *, height: int, timeout_ms: int) -> Iterator[Callable[..., Page]]:
    """Open pages, each in its own context (its own sessionStorage), failing the test on any script or CSP error.

    Args:
        browser: the browser (:func:`chromium`).
        url: the console's address; a page opens at ``url + route``.
        height: the viewport's height (its width is 1360).
        timeout_ms: the pages' default timeout.

    Yields:
        ``opener(route="", key=None)``: the page at ``route``, signed in with ``key`` unless it is None.
        On exit the contexts are closed and the errors any page logged fail the test.
    """
    contexts = []
    errors: list[str] = []

    def opener(route: str = "", key: str | None = None) -> Page:
        ctx = browser.new_context(viewport={"width": 1360, "height": height}, locale="en-GB", timezone_id="UTC")
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(timeout_ms)

        def on_console(msg: ConsoleMessage) -> None:
            if msg.type == "error" and not msg.text.startswith(EXPECTED_REFUSAL):
                errors.append(msg.text)

        page.on("console", on_console)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + route)
        if key is not None:
            sign_in(page, key)
        return page

    yield opener
    for ctx in contexts:
        ctx.close()
    assert errors == [], errors


def shot(served: ConsoleService, page: Page, name: str, *, full_page: bool = False) -> None:
    """Save a screenshot of the page as ``<name>.png`` where the service's screenshots go."""
    page.screenshot(path=str(served.shots / f"{name}.png"), full_page=full_page)


def switch_params_editor(page: Page, key: str) -> Locator:
    """Switch the params between the generated form and raw JSON with the keyboard, and check the switch.

    The switch is one button: "Edit as raw JSON" (``aria-pressed="false"``) while the form is shown,
    "Use the form" (``aria-pressed="true"``) while the raw JSON is; it keeps the focus, and only
    the editor in use is shown.

    Args:
        page: a Send page or a job create page showing a generated params form.
        key: the key that presses the focused button (``"Enter"`` or ``" "``).

    Returns:
        The raw JSON text area.
    """
    switch = page.locator("button[aria-pressed]", has_text=re.compile("^(Edit as raw JSON|Use the form)$"))
    to_raw = switch.get_attribute("aria-pressed") == "false"
    expect(switch).to_have_text("Edit as raw JSON" if to_raw else "Use the form")
    switch.focus()
    page.keyboard.press(key)
    expect(switch).to_have_attribute("aria-pressed", "true" if to_raw else "false")
    expect(page.get_by_role("button", name="Use the form" if to_raw else "Edit as raw JSON")).to_be_focused()
    raw = page.get_by_label("Params (JSON object)")
    form = page.locator(".params .schema-fields").first
    shown, hidden = (raw, form) if to_raw else (form, raw)
    expect(shown).to_be_visible()
    expect(hidden).to_be_hidden()
    return raw
