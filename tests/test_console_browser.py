"""The operator console in a real headless Chromium against the real ``fleetcmd serve`` (issue 15, §2 and §5).

Debian's ``chromium`` (``.ci/run`` installs it) driven by Playwright for Python with the system
browser as its executable: Playwright never downloads a browser. The service is the real
process (:mod:`tests.proc`), the device a real paho client (:mod:`tests.devices`); the thing
type and things are made with the README's own CLI commands. What the browser tests share (the
service, Chromium, the signed-in page opener) is in :mod:`tests.browser`.

Each test saves a screenshot: into ``$FLEETCMD_SCREENSHOTS`` when set (``scripts/screenshots.py``
sets it to ``docs/screenshots``), else into the test's temporary directory.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser import (
    ConsoleService,
    chromium,
    console_service,
    dimmer_example,
    needs_chromium,
    page_opener,
    shot,
    sign_in,
    switch_params_editor,
)
from tests.devices import EmqxDevice
from tests.proc import run_cli

EXPECT_TIMEOUT_MS = 10_000

pytestmark = needs_chromium


# ---- fixtures -----------------------------------------------------------------------------


class Console(ConsoleService):
    """The service, its keys and lamp-7's device, shared by the tests of this module."""

    @property
    def device(self) -> EmqxDevice:
        """lamp-7's device (lamp-8 has none)."""
        return self.devices[0]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    with console_service(tmp_path_factory.mktemp("console"), "alice", Console) as c:
        # The README's commands, in its order (lamp-8 has no device: its commands stay QUEUED).
        c.cli("things", "create", "lamp-7", "--type", "dimmer", "--attr", "site=north")
        c.cli("things", "create", "lamp-8", "--type", "dimmer", "--attr", "site=south")
        c.start_device("lamp-7")
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def open_page(browser: Browser, console: Console) -> Iterator[Callable[..., Page]]:
    """Open a page (its own context: its own sessionStorage) that fails the test on any script or CSP error."""
    with page_opener(browser, console.url, height=860, timeout_ms=EXPECT_TIMEOUT_MS) as opener:
        yield opener


def row(page: Page, execution_id: str) -> Any:
    return page.locator(f'table.executions tr[data-execution="{execution_id}"]')


def dim(console: Console, thing: str, output_mode: str, dimming: int) -> Any:
    """Send the dimmer command over REST (as the operator): the execution as the answer shows it."""
    return console.rest(
        "POST",
        "/commands",
        {"thingId": thing, "action": "dimming", "params": {"output_mode": output_mode, "dimming": dimming}},
    )


def whoami_status(console: Console, key: str) -> int:
    request = urllib.request.Request(console.url + "api/v1/whoami", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def drain(device: EmqxDevice) -> None:
    while not device.requests.empty():
        device.requests.get_nowait()


# ---- tests --------------------------------------------------------------------------------


def test_sign_in_keeps_the_key_in_session_storage_only(open_page: Callable[..., Page], console: Console) -> None:
    page = open_page()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(console, page, "sign-in")
    page.get_by_label("API key").fill("fck_not_a_key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("This key is not valid.")
    sign_in(page, console.keys["operator"])
    expect(page.locator("#who")).to_contain_text("operator-alice · operator")
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Send")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('fleetcmd.apiKey')") == console.keys["operator"]
    assert page.context.cookies() == []
    assert console.keys["operator"] not in page.url
    # Sign out forgets the key.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('fleetcmd.apiKey')") is None


def test_the_dimmer_form_sends_the_readme_payload_and_the_table_follows_it_live(
    open_page: Callable[..., Page], console: Console
) -> None:
    _, params, payload = dimmer_example()
    drain(console.device)
    # One tab watches the commands table; another sends through the generated form.
    watcher = open_page("#/commands", console.keys["viewer"])
    expect(watcher.locator(".live-state")).to_have_text("● live")
    watcher.evaluate("window.__notReloaded = true")

    page = open_page("#/send", console.keys["operator"])
    page.get_by_role("searchbox", name="Thing (required)").fill("lamp")
    page.locator('button.suggestion[data-thing="lamp-7"]').click()
    expect(page.locator(".thing-info")).to_contain_text("online")
    page.get_by_label("Action").select_option("dimming")
    # The form follows the schema: const fixed and read-only, default pre-filled, enum a select, required marked.
    f_port = page.locator('[data-path="params.f_port"]')
    expect(f_port).to_have_value("60")
    expect(f_port).to_have_attribute("readonly", "")
    expect(page.locator('[data-path="params.command"]')).to_have_value("dimming")
    priority = page.locator('select[data-path="params.priority"]')
    expect(priority.locator("option:checked")).to_have_text("LOW")
    expect(page.locator('[data-field="params.dimming"] .required')).to_have_count(1)
    expect(page.locator('[data-field="params.period_s"] .required')).to_have_count(0)
    expect(page.locator('input[data-path="params.dimming"]')).to_have_attribute("type", "number")
    expect(page.get_by_label("Params (JSON object)")).to_be_hidden()  # the raw editor is the fallback, not shown too
    # Fill in what the README's `send` gives.
    priority.select_option(label=params["priority"])
    page.locator('select[data-path="params.output_mode"]').select_option(label=params["output_mode"])
    page.locator('input[data-path="params.dimming"]').fill(str(params["dimming"]))
    page.locator('input[data-path="params.period_s"]').fill(str(params["period_s"]))
    shot(console, page, "send-form", full_page=True)
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator(".outcome")).to_contain_text("Sent")

    execution_id, request = console.device.next_request(10)
    # Exactly the payload the README shows, key for key and in its order.
    assert json.dumps(request["params"], separators=(",", ":")) == payload
    # The watching tab got the row and its delivery without a reload...
    new_row = row(watcher, execution_id)
    expect(new_row).to_have_attribute("data-status", re.compile("SENT|DELIVERED"))
    expect(new_row.locator("td").nth(2)).to_have_text("dimming")
    reason = {"reasonCode": "OK", "reasonDescription": "dimmed"}
    console.device.respond(execution_id, "SUCCEEDED", {"dimming": 50}, statusReason=reason)
    # ...and sees it succeed, reason code and reason included.
    expect(new_row).to_have_attribute("data-status", "SUCCEEDED")
    expect(new_row.locator('[data-col="reasonCode"]')).to_have_text("OK")
    expect(new_row.locator('[data-col="reason"]')).to_have_text("dimmed")
    assert watcher.evaluate("window.__notReloaded") is True
    expect(watcher.locator("table.executions tbody tr").first).to_have_attribute("data-execution", execution_id)
    shot(console, watcher, "commands")


def test_server_violations_are_shown_on_the_fields_their_paths_name(open_page: Callable[..., Page], console: Console) -> None:
    page = open_page("#/send?thing=lamp-8", console.keys["operator"])
    expect(page.locator(".thing-info")).to_contain_text("offline")
    page.get_by_label("Action").select_option("dimming")
    page.get_by_role("button", name="Send", exact=True).click()
    # Nothing chosen for output_mode, no dimming: the server names params.output_mode and params.dimming.
    dimming_error = page.locator('[data-field="params.dimming"] .field-error')
    expect(dimming_error).to_contain_text("'dimming' is a required property")
    expect(page.locator('[data-field="params.output_mode"] .field-error')).to_contain_text("required")
    expect(page.locator('input[data-path="params.dimming"]')).to_have_attribute("aria-invalid", "true")
    expect(page.locator('[data-field="params.priority"] .field-error')).to_be_hidden()
    shot(console, page, "send-violations", full_page=True)
    # The raw-JSON editor gets the server's violation of a value the form does not offer.
    page.get_by_role("button", name="Edit as raw JSON").click()
    expect(page.locator('input[data-path="params.dimming"]')).to_be_hidden()
    raw = page.get_by_label("Params (JSON object)")
    raw.fill(json.dumps({"output_mode": "strobe", "dimming": 1}))
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator("#send-params-raw-error")).to_contain_text("params.output_mode: 'strobe' is not one of")


def test_the_params_switch_to_raw_json_and_back_keeps_each_editors_text(open_page: Callable[..., Page], console: Console) -> None:
    page = open_page("#/send?thing=lamp-8", console.keys["operator"])
    expect(page.locator(".thing-info")).to_contain_text("offline")  # its type's actions are in
    page.get_by_label("Action").select_option("dimming")
    page.locator('select[data-path="params.output_mode"]').select_option(label="blinking")
    dimming = page.locator('input[data-path="params.dimming"]')
    dimming.fill("50")
    # The raw JSON starts as what the form holds.
    raw = switch_params_editor(page, " ")
    expect(page.locator("#send-params-raw-help")).to_have_text(
        "The whole params object; the server validates it against the schema."
    )
    assert json.loads(raw.input_value()) == {
        "f_port": 60,
        "priority": "LOW",
        "confirmed": "false",
        "command": "dimming",
        "output_mode": "blinking",
        "dimming": 50,
    }
    raw.fill("{}")
    # Back on the form: it kept its own values (the raw text is not read back).
    switch_params_editor(page, "Enter")
    expect(dimming).to_have_value("50")
    expect(page.locator('select[data-path="params.output_mode"] option:checked')).to_have_text("blinking")


def test_filters_are_in_the_url_and_the_server_applies_them(open_page: Callable[..., Page], console: Console) -> None:
    pending = dim(console, "lamp-8", "on", 3)
    page = open_page("#/commands", console.keys["viewer"])
    expect(row(page, pending["executionId"])).to_be_visible()
    page.get_by_label("Thing").fill("lamp-8")
    page.get_by_role("checkbox", name="QUEUED").check()
    page.get_by_role("button", name="Apply filters").click()
    expect(page).to_have_url(re.compile(r"#/commands\?thing=lamp-8&status=QUEUED$"))
    rows = page.locator("table.executions tbody tr")
    expect(row(page, pending["executionId"])).to_be_visible()
    for status in rows.evaluate_all("rs => rs.map(r => r.dataset.status)"):
        assert status == "QUEUED"
    assert set(rows.evaluate_all("rs => rs.map(r => r.cells[1].textContent)")) == {"lamp-8"}
    shot(console, page, "commands-filtered")
    # The URL is the view: opened afresh (another tab), it shows the same filters and rows.
    other = open_page(page.url.removeprefix(console.url), console.keys["viewer"])
    expect(other.get_by_role("checkbox", name="QUEUED")).to_be_checked()
    expect(other.get_by_label("Thing")).to_have_value("lamp-8")
    expect(row(other, pending["executionId"])).to_be_visible()
    # A status nothing has: an empty table, said so.
    other.get_by_role("checkbox", name="QUEUED").uncheck()
    other.get_by_role("checkbox", name="REJECTED").check()
    other.get_by_role("button", name="Apply filters").click()
    expect(other.get_by_text("No executions match.")).to_be_visible()


def test_detail_cancel_and_rerun(open_page: Callable[..., Page], console: Console) -> None:
    pending = dim(console, "lamp-8", "off", 0)
    page = open_page("#/commands?thing=lamp-8", console.keys["operator"])
    row(page, pending["executionId"]).get_by_role("link", name=pending["executionId"]).click()
    expect(page.get_by_role("heading", name=f"Execution {pending['executionId']}")).to_be_visible()
    details = page.locator("dl.fields")
    expect(details).to_have_attribute("data-status", "QUEUED")
    # Params as sent: the type's const and default filled in.
    sent = json.loads(page.locator('[data-json="params"]').inner_text())
    filled = {"f_port": 60, "priority": "LOW", "confirmed": "false", "command": "dimming"}
    assert sent == {**filled, "output_mode": "off", "dimming": 0}
    expect(details.get_by_role("link", name="lamp-8")).to_have_attribute("href", "#/things/lamp-8")
    page.get_by_role("button", name="Cancel").click()
    expect(details).to_have_attribute("data-status", "CANCELED")
    expect(page.locator("table.history tbody tr").last).to_have_attribute("data-status", "CANCELED")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    assert console.rest("GET", f"/commands/{pending['executionId']}")["status"] == "CANCELED"
    shot(console, page, "execution-canceled", full_page=True)
    page.get_by_role("button", name="Re-run").click()
    expect(page.get_by_role("heading", name=re.compile("^Execution ")).locator("code")).not_to_have_text(pending["executionId"])
    expect(page.locator("dl.fields").get_by_role("link", name=pending["executionId"])).to_be_visible()
    rerun_id = page.locator("dl.fields").get_attribute("data-execution")
    assert rerun_id and rerun_id != pending["executionId"]
    assert console.rest("GET", f"/commands/{rerun_id}")["rerunOf"] == pending["executionId"]


def test_a_succeeded_execution_shows_its_result_and_full_history(open_page: Callable[..., Page], console: Console) -> None:
    drain(console.device)
    sent = dim(console, "lamp-7", "on", 7)
    page = open_page(f"#/executions/{sent['executionId']}", console.keys["operator"])
    execution_id, _ = console.device.next_request(10)
    assert execution_id == sent["executionId"]
    console.device.respond(execution_id, "IN_PROGRESS")
    expect(page.locator("dl.fields")).to_have_attribute("data-status", "IN_PROGRESS")
    console.device.respond(execution_id, "SUCCEEDED", {"level": 7})
    expect(page.locator("dl.fields")).to_have_attribute("data-status", "SUCCEEDED")
    expect(page.locator('[data-json="result"]')).to_have_text(json.dumps({"level": 7}, indent=2))
    statuses = page.locator("table.history tbody tr").evaluate_all("rs => rs.map(r => r.dataset.status)")
    assert statuses == ["QUEUED", "SENT", "DELIVERED", "IN_PROGRESS", "SUCCEEDED"]
    # A late report is kept in the history, marked, and changes nothing.
    console.device.respond(execution_id, "FAILED")
    expect(page.locator("table.history tbody tr.late")).to_have_count(1)
    expect(page.locator("dl.fields")).to_have_attribute("data-status", "SUCCEEDED")
    shot(console, page, "execution", full_page=True)


def test_things_and_types_pages(open_page: Callable[..., Page], console: Console) -> None:
    page = open_page("#/things", console.keys["viewer"])
    lamp7 = page.locator('tr[data-thing="lamp-7"]')
    expect(lamp7).to_contain_text("online")
    expect(lamp7).to_contain_text("site=north")
    expect(page.locator('tr[data-thing="lamp-8"]')).to_contain_text("offline")
    page.get_by_label("Presence").select_option("offline")
    page.get_by_role("button", name="Apply filters").click()
    expect(page.locator('tr[data-thing="lamp-7"]')).to_have_count(0)
    expect(page.locator('tr[data-thing="lamp-8"]')).to_be_visible()
    shot(console, page, "things")
    page.get_by_role("link", name="lamp-8").click()
    expect(page.get_by_role("heading", name="Thing lamp-8")).to_be_visible()
    expect(page.locator("table.executions tbody tr").first).to_be_visible()
    page.get_by_role("link", name="dimmer").first.click()
    section = page.locator('section[data-type="dimmer"]')
    expect(section).to_contain_text("LoRaWAN light controller")
    schema_row = section.locator("table.schema tr", has=page.locator("code", has_text="output_mode"))
    expect(schema_row).to_contain_text('one of "off", "on", "blinking"')
    shot(console, page, "thing-types")


def test_a_viewer_sees_no_send_cancel_or_rerun(open_page: Callable[..., Page], console: Console) -> None:
    pending = dim(console, "lamp-8", "on", 1)
    page = open_page("#/commands", console.keys["viewer"])
    expect(page.locator("#who")).to_contain_text("viewer")
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Commands")).to_be_visible()
    expect(nav.get_by_role("link", name="Send")).to_have_count(0)
    page.goto(console.url + f"#/executions/{pending['executionId']}")
    expect(page.locator("dl.fields")).to_have_attribute("data-status", "QUEUED")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.get_by_role("button", name="Re-run")).to_have_count(0)
    page.goto(console.url + "#/things/lamp-8")
    expect(page.get_by_role("heading", name="Thing lamp-8")).to_be_visible()
    expect(page.get_by_role("link", name="Send a command")).to_have_count(0)
    page.goto(console.url + "#/send")
    expect(page.get_by_text("This page needs the operator role; this key is viewer.")).to_be_visible()
    shot(console, page, "viewer")


# A stand-in for GET /api/v1/events that streams FEED_RATE synthetic events a second (the rest of the
# API is the real service): the SSE text goes through the console's real reader, batching and rendering.
FEED_SCRIPT = """
(() => {
  const realFetch = window.fetch.bind(window);
  window.__feed = { sent: 0, running: false, frames: [], longTasks: 0 };
  try {
    new PerformanceObserver((list) => { for (const e of list.getEntries()) window.__feed.longTasks += e.duration; })
      .observe({ type: "longtask", buffered: false });
  } catch (e) {}
  window.fetch = (url, init) => {
    if (!String(url).startsWith("/api/v1/events")) return realFetch(url, init);
    const enc = new TextEncoder();
    let seq = 1e9, n = 0;
    const body = new ReadableStream({
      start(controller) {
        window.__feed.push = (events) => {
          const text = events.map((e) => `id: ${++seq}\\nevent: execution\\ndata: ${JSON.stringify(e)}\\n\\n`);
          controller.enqueue(enc.encode(text.join("")));
          window.__feed.sent += events.length;
        };
      },
    });
    return Promise.resolve(new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } }));
  };
})();
"""

# Every tickMs: perTick events: newPerTick new executions with four changes each, then changes of the rows shown.
RUN_JS = """
async ([seconds, perTick, tickMs, newPerTick]) => {
  const feed = window.__feed;
  const statuses = ["SENT", "DELIVERED", "IN_PROGRESS"];
  const at = (t) => new Date(t).toISOString();
  let tick = 0, made = 0, last = performance.now();
  feed.running = true;
  const frame = (now) => { feed.frames.push(now - last); last = now; if (feed.running) requestAnimationFrame(frame); };
  requestAnimationFrame(frame);
  const exec = (id, status, created, updated) => ({ executionId: id, commandId: id, thingId: "lamp-9", action: "dimming",
    params: {}, ttl: 60, status, result: null, statusReason: null, createdAt: at(created), updatedAt: at(updated) });
  const ticks = Math.round(seconds * 1000 / tickMs);
  while (tick < ticks) {
    const now = Date.now();
    const shown = [...document.querySelectorAll("table.executions tbody tr")].map((r) => r.dataset.execution);
    const events = [];
    // Each new execution goes QUEUED -> SENT -> DELIVERED -> IN_PROGRESS within the tick, as a fast device makes it.
    for (let i = 0; i < newPerTick; i++) {
      const id = `feed${String(made++).padStart(6, "0")}`;
      ["QUEUED", "SENT", "DELIVERED", "IN_PROGRESS"].forEach((status, k) =>
        events.push({ seq: 0, execution: exec(id, status, now + i, now + i * 4 + k), change: { status } }));
    }
    for (let i = events.length; i < perTick; i++) {
      const id = shown.length ? shown[i % shown.length] : `feed${String(made - 1).padStart(6, "0")}`;
      events.push({ seq: 0, execution: exec(id, statuses[(tick + i) % 3], now - 1000, now + i), change: { status: "SENT" } });
    }
    feed.push(events);
    tick++;
    await new Promise((r) => setTimeout(r, tickMs));
  }
  // The last word for every row shown: SUCCEEDED.
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const shown = [...document.querySelectorAll("table.executions tbody tr")].map((r) => r.dataset.execution);
  const end = Date.now() + 60000;
  feed.push(shown.map((id) => ({ seq: 0, execution: exec(id, "SUCCEEDED", 0, end), change: { status: "SUCCEEDED" } })));
  await new Promise((r) => setTimeout(r, 300));
  feed.running = false;
  return { made, shown: shown.length };
}
"""


def test_the_table_keeps_up_with_a_thousand_changes_a_second(open_page: Callable[..., Page], console: Console) -> None:
    from tests.test_console import PAGE_SIZE

    page = open_page()
    page.add_init_script(FEED_SCRIPT)
    page.goto(console.url + "#/commands")
    page.reload()  # a hash change alone loads nothing: the init script runs on a load
    # However large the store, the table asks the server for one page.
    with page.expect_request(re.compile(r"/api/v1/commands\?")) as listed:
        sign_in(page, console.keys["viewer"])
    assert f"pageSize={PAGE_SIZE}" in listed.value.url
    expect(page.locator(".live-state")).to_have_text("● live")
    expect(page.locator("table.executions")).to_have_attribute("aria-busy", "false")
    # 3 s at 1,000 events a second: 50 events every 50 ms, 40 of them about 10 new executions.
    outcome = page.evaluate(RUN_JS, [3, 50, 50, 10])
    stats = page.evaluate("({sent: window.__feed.sent, frames: window.__feed.frames, longTasks: window.__feed.longTasks})")
    assert stats["sent"] >= 3000
    rows = page.locator("table.executions tbody tr")
    # One page of rows in the DOM, whatever arrived: the newest first.
    assert rows.count() == PAGE_SIZE == outcome["shown"]
    newest = f"feed{outcome['made'] - 1:06d}"
    assert rows.first.get_attribute("data-execution") == newest
    # Every row shows its last status (coalescing keeps the newest state, never an older one).
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.status)")) == {"SUCCEEDED"}
    # Events are coalesced per execution and frame: far fewer row updates than events.
    applied = int(page.locator("[data-updates]").get_attribute("data-updates") or "0")
    assert 0 < applied < stats["sent"] / 2, (applied, stats["sent"])
    # The page stayed responsive: frames kept coming (no gap of a quarter second) with little long-task time.
    frames = stats["frames"][1:]
    assert len(frames) > 60 and max(frames) < 250, max(frames)
    assert stats["longTasks"] < 1000, stats["longTasks"]
    shot(console, page, "commands-under-load")


def test_send_with_a_ttl_and_wait_for_the_result(open_page: Callable[..., Page], console: Console) -> None:
    drain(console.device)
    page = open_page("#/send?thing=lamp-7", console.keys["operator"])
    expect(page.locator(".thing-info")).to_contain_text("online")
    page.get_by_label("Action").select_option("dimming")
    page.locator('select[data-path="params.output_mode"]').select_option(label="on")
    page.locator('input[data-path="params.dimming"]').fill("12.5")
    expect(page.get_by_label("TTL (seconds)")).to_have_attribute("placeholder", "3600")  # the type's default
    page.get_by_label("TTL (seconds)").fill("120")
    page.get_by_label("Wait for the result").check()
    page.get_by_role("button", name="Send", exact=True).click()
    execution_id, request = console.device.next_request(10)
    assert request["ttl"] == 120
    assert request["params"]["dimming"] == 12.5
    # The page waits for the answer: nothing is shown as sent before the device answers.
    expect(page.locator(".outcome")).to_be_empty()
    console.device.respond(execution_id, "SUCCEEDED", {"level": 12.5})
    outcome = page.locator(".outcome")
    expect(outcome.locator(f'[data-execution="{execution_id}"] [data-status]')).to_have_text("SUCCEEDED")
    expect(outcome.locator("pre")).to_have_text(json.dumps({"level": 12.5}, indent=2))


def test_every_control_is_labelled_and_tables_have_headers(open_page: Callable[..., Page], console: Console) -> None:
    page = open_page()
    # Keyboard only: the key field has focus, Enter signs in.
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(console.keys["operator"])
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Commands")).to_be_focused()
    unlabelled = """() => [...document.querySelectorAll("main input, main select, main textarea, main button")]
        .filter((el) => !el.hidden && el.offsetParent !== null)
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !el.textContent.trim())
        .map((el) => el.outerHTML)"""
    headless = """() => [...document.querySelectorAll("main table")]
        .filter((t) => !t.querySelector("caption") && !t.closest("section[aria-label], article, section.type")
                    || !t.querySelector("thead th[scope=col]"))
        .map((t) => t.className)"""
    for route, ready in [
        ("#/commands", "table.executions[aria-busy=false]"),
        ("#/send?thing=lamp-7", "select#send-action"),
        ("#/things", "table.things[aria-busy=false]"),
        ("#/things/lamp-7", "table.executions[aria-busy=false]"),
        ("#/types", "section.type"),
    ]:
        page.goto(console.url + route)
        page.locator(ready).first.wait_for()
        assert page.evaluate(unlabelled) == [], route
        assert page.evaluate(headless) == [], route
    # From the navigation to a page by keyboard: Tab to the link, Enter.
    page.goto(console.url + "#/commands")
    page.get_by_role("link", name="Things").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Things")).to_be_focused()


def test_a_revoked_key_signs_the_console_out(open_page: Callable[..., Page], console: Console) -> None:
    assert console.service.ready is not None
    data_dir = console.service.ready.data_dir
    made = run_cli("apikey", "create", "--name", "temp", "--role", "operator", "--json", "--data-dir", data_dir)
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    page = open_page("#/things", created["key"])
    expect(page.locator('tr[data-thing="lamp-7"]')).to_be_visible()
    revoked = run_cli("apikey", "revoke", created["key_id"], "--data-dir", data_dir)
    assert revoked.returncode == 0, revoked.stderr
    # The service caches a key's lookup for a second (server/core/apikeys.py): wait until it refuses the key.
    deadline = time.monotonic() + 5
    while whoami_status(console, created["key"]) != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.05)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Thing types").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.locator("#status")).to_have_text("The API key was refused: sign in again.")
    assert page.evaluate("sessionStorage.length") == 0


# GET /api/v1/events answered by a stand-in that ends each stream after one event: the console must
# reconnect and resume after the last sequence it saw (Last-Event-ID), with the key in the header only.
RESUME_SCRIPT = """
(() => {
  const realFetch = window.fetch.bind(window);
  window.__streams = [];
  window.fetch = (url, init) => {
    if (!String(url).startsWith("/api/v1/events")) return realFetch(url, init);
    const headers = new Headers(init.headers);
    window.__streams.push({ url: String(url), lastEventId: headers.get("Last-Event-ID"), auth: headers.get("Authorization") });
    const seq = 41 + window.__streams.length;
    const now = new Date().toISOString();
    const execution = { executionId: `resume${seq}`, commandId: "c", thingId: "lamp-9", action: "ping", params: {}, ttl: 60,
      status: "QUEUED", result: null, statusReason: null, createdAt: now, updatedAt: now };
    const text = `: keepalive\\n\\nid: ${seq}\\nevent: execution\\ndata: ${JSON.stringify({ seq, execution, change: {} })}\\n\\n`;
    return Promise.resolve(new Response(text, { status: 200, headers: { "Content-Type": "text/event-stream" } }));
  };
})();
"""


def test_the_event_stream_resumes_after_the_last_event_seen(open_page: Callable[..., Page], console: Console) -> None:
    page = open_page()
    page.add_init_script(RESUME_SCRIPT)
    page.reload()
    sign_in(page, console.keys["viewer"])
    # Each stream delivered one event and ended; the console came back for the next one, and showed them.
    expect(row(page, "resume44")).to_be_visible()
    streams = page.evaluate("window.__streams")
    assert [s["lastEventId"] for s in streams[:3]] == [None, "42", "43"]
    assert {s["auth"] for s in streams} == {f"Bearer {console.keys['viewer']}"}
    assert all(console.keys["viewer"] not in s["url"] for s in streams)
    expect(row(page, "resume42")).to_be_visible()
