"""The console's Jobs pages in a real headless Chromium against the real ``fleetcmd serve`` (issue 16, §4).

The same approach as :mod:`tests.test_console_browser`, through :mod:`tests.browser`: Debian's
``chromium`` through Playwright (no browser download), the real service process, real paho devices
that answer each request (one of them always fails), the README's dimmer type. Each test saves a
screenshot into ``$FLEETCMD_SCREENSHOTS`` when set (``scripts/screenshots.py``), else into a
temporary directory.

The pages are live with or without ``event: job`` on the event stream (they re-read visible jobs
that are not final every 2 s until a job event arrives), so these tests hold either way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser import ConsoleService, chromium, console_service, needs_chromium, page_opener, shot, switch_params_editor
from tests.devices import EmqxDevice

pytestmark = needs_chromium
GOOD = ("pump-1", "pump-2", "pump-3", "pump-4")
BAD = "pump-9"  # its device answers FAILED to everything
IDLE = "pump-0"  # registered, no device: its executions stay QUEUED
LIVE_TIMEOUT_MS = 15_000


class Fleet(ConsoleService):
    """The service, its keys and the devices, shared by this module's tests."""


def _answer(status: str) -> Callable[[EmqxDevice, str, dict[str, Any]], None]:
    def on_request(device: EmqxDevice, execution_id: str, body: dict[str, Any]) -> None:
        device.respond(execution_id, status, {"ok": status == "SUCCEEDED"})

    return on_request


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with console_service(tmp_path_factory.mktemp("jobs-console"), "bo", Fleet) as f:
        for thing in (*GOOD, IDLE):
            f.cli("things", "create", thing, "--type", "dimmer", "--attr", "site=north")
        f.cli("things", "create", BAD, "--type", "dimmer", "--attr", "site=south")
        for thing in GOOD:
            f.start_device(thing, on_request=_answer("SUCCEEDED"))
        f.start_device(BAD, on_request=_answer("FAILED"))
        yield f


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def open_page(browser: Browser, fleet: Fleet) -> Iterator[Callable[[str, str], Page]]:
    """Open a page (its own context) signed in as a role, that fails the test on any script or CSP error."""
    with page_opener(browser, fleet.url, height=900, timeout_ms=LIVE_TIMEOUT_MS) as opener:
        yield lambda route, role: opener(route, fleet.keys[role])


def count(page: Page, key: str) -> Any:
    return page.locator(f'table.count-bars tr[data-count="{key}"] td.num')


def test_create_over_a_type_with_the_dry_run_count_and_watch_it_complete_live(
    open_page: Callable[..., Page], fleet: Fleet
) -> None:
    # A second tab follows the list without reloading.
    watcher = open_page("#/jobs", "viewer")
    expect(watcher.locator("table.jobs")).to_have_attribute("aria-busy", "false")
    watcher.evaluate("window.__notReloaded = true")

    page = open_page("#/jobs/new", "operator")
    page.get_by_label("Thing type").select_option("dimmer")
    # The type's one action is chosen and its params schema gives the Send page's form.
    expect(page.get_by_label("Action")).to_have_value("dimming")
    expect(page.locator('[data-path="params.f_port"]')).to_have_attribute("readonly", "")
    page.locator('select[data-path="params.output_mode"]').select_option(label="on")
    page.locator('input[data-path="params.dimming"]').fill("40")
    page.get_by_label("Exclude").fill(IDLE)
    page.get_by_role("button", name="Add an abort criterion").click()
    page.get_by_label("Threshold (%)").fill("90")
    page.get_by_label("Minimum finished").fill("5")
    create = page.get_by_role("button", name=re.compile("^Create the job"))
    expect(create).to_be_disabled()  # not before the dry run
    page.get_by_role("button", name="Count the targets (dry run)").click()
    # Four good pumps and the bad one: five targets (pump-0 excluded); nothing created yet.
    expect(page.locator(".dry-count")).to_have_attribute("data-targets", "5")
    expect(create).to_have_text("Create the job for 5 things")
    assert fleet.rest("GET", "/jobs", key="viewer")["jobs"] == []
    shot(fleet, page, "job-create", full_page=True)
    # A change after the count needs a new count.
    page.get_by_label("Exclude").fill("")
    expect(create).to_be_disabled()
    page.get_by_role("button", name="Count the targets (dry run)").click()
    expect(page.locator(".dry-count")).to_have_attribute("data-targets", "6")
    page.get_by_label("Exclude").fill(IDLE)
    page.get_by_role("button", name="Count the targets (dry run)").click()
    expect(create).to_have_text("Create the job for 5 things")
    create.click()

    expect(page).to_have_url(re.compile(r"#/jobs/(?!new$)[^/]+$"))  # the create page itself is #/jobs/new
    job_id = page.url.rsplit("/", 1)[1]
    page.evaluate("window.__notReloaded = true")
    # Live: the devices answer, the page follows to the end without a reload.
    expect(page.locator("dl.fields[data-job]")).to_have_attribute("data-state", "COMPLETED", timeout=LIVE_TIMEOUT_MS)
    expect(count(page, "SUCCEEDED")).to_have_text("4")
    expect(count(page, "FAILED")).to_have_text("1")
    expect(count(page, "PENDING")).to_have_text("0")
    expect(page.locator("dl.fields .progress-text")).to_have_text("5/5")
    assert page.locator('table.count-bars tr[data-count="SUCCEEDED"] progress').get_attribute("value") == "4"
    # Its executions, from GET /api/v1/commands?jobId=...
    rows = page.locator("table.executions tbody tr")
    expect(rows).to_have_count(5)
    assert set(rows.evaluate_all("rs => rs.map(r => r.cells[1].textContent)")) == {*GOOD, BAD}
    expect(page.locator("table.executions tbody tr[data-status=FAILED]")).to_have_count(1)
    expect(page.locator('[data-json="params"]')).to_contain_text('"dimming": 40')
    expect(page.locator("#spec-title + dl")).to_contain_text(f"except {IDLE}")
    assert page.evaluate("window.__notReloaded") is True
    shot(fleet, page, "job", full_page=True)

    # The list tab saw it appear and finish, live.
    watcher.bring_to_front()  # the tab the operator looks at (a hidden one may have its timers slowed)
    listed = watcher.locator(f'table.jobs tr[data-job="{job_id}"]')
    expect(listed).to_have_attribute("data-state", "COMPLETED", timeout=LIVE_TIMEOUT_MS)
    expect(listed.locator(".progress-text")).to_have_text("5/5")
    expect(listed.locator('[data-count="FAILED"]')).to_have_text("failed 1")
    # Its action and targets stay: they come from the spec, which only a job's first event has.
    expect(listed.locator("td").nth(1)).to_have_text("dimming")
    expect(listed.locator("td.targets")).to_contain_text(f"except {IDLE}")
    assert watcher.evaluate("window.__notReloaded") is True
    shot(fleet, watcher, "jobs")

    # Rerun failed: a new job over the failed target only.
    page.get_by_role("button", name="Rerun failed (1)").click()
    expect(page).not_to_have_url(re.compile(re.escape(job_id) + "$"))
    expect(page.locator("dl.fields[data-job]")).to_have_attribute("data-state", re.compile("IN_PROGRESS|COMPLETED"))
    expect(page.locator("dl.fields[data-job]")).to_have_attribute("data-state", "COMPLETED", timeout=LIVE_TIMEOUT_MS)
    expect(count(page, "FAILED")).to_have_text("1")
    expect(page.locator("table.executions tbody tr")).to_have_count(1)
    expect(page.locator("table.executions tbody tr td").nth(1)).to_have_text(BAD)


def test_pause_resume_and_cancel_only_undelivered(open_page: Callable[..., Page], fleet: Fleet) -> None:
    # Paced at two a minute over six things: the first starts at once, the rest wait their turn.
    job = fleet.rest(
        "POST",
        "/jobs",
        {
            "action": "dimming",
            "params": {"output_mode": "off", "dimming": 0},
            "targets": {"thingType": "dimmer"},
            "rollout": {"maxPerMinute": 2},
        },
    )
    page = open_page(f"#/jobs/{job['jobId']}", "operator")
    head = page.locator("dl.fields[data-job]")
    expect(head).to_have_attribute("data-state", "IN_PROGRESS")
    page.get_by_role("button", name="Pause").click()
    expect(head).to_have_attribute("data-state", "PAUSED")
    expect(page.get_by_role("button", name="Pause")).to_have_count(0)
    assert fleet.rest("GET", f"/jobs/{job['jobId']}", key="viewer")["state"] == "PAUSED"
    page.get_by_role("button", name="Resume").click()
    expect(head).to_have_attribute("data-state", "IN_PROGRESS")
    page.get_by_label("only undelivered").check()
    page.get_by_role("button", name="Cancel job").click()
    expect(head).to_have_attribute("data-state", "CANCELED")
    # The targets that never started are skipped; no control is left on a final job with no failure.
    # The skips follow the CANCELED state in a count event of their own: wait for it (of six, one or two started).
    expect(count(page, "SKIPPED")).to_have_text(re.compile(r"^[45]$"))
    expect(page.locator(".job-controls button")).to_have_count(0)
    expect(head).to_contain_text("Ended at")


def test_the_abort_reason_is_shown(open_page: Callable[..., Page], fleet: Fleet) -> None:
    job = fleet.rest(
        "POST",
        "/jobs",
        {
            "action": "dimming",
            "params": {"output_mode": "on", "dimming": 1},
            "targets": {"attributes": {"site": "south"}},
            "abort": [{"failure": "FAILED", "thresholdPct": 50, "minFinished": 1}],
        },
    )
    page = open_page(f"#/jobs/{job['jobId']}", "viewer")
    expect(page.locator("dl.fields[data-job]")).to_have_attribute("data-state", "ABORTED", timeout=LIVE_TIMEOUT_MS)
    reason = fleet.rest("GET", f"/jobs/{job['jobId']}", key="viewer")["abortReason"]
    assert reason
    expect(page.locator(".abort-reason")).to_have_text(reason)
    expect(page.get_by_text("FAILED ≥ 50 % of at least 1 final")).to_be_visible()


def test_a_viewer_sees_no_job_controls(open_page: Callable[..., Page], fleet: Fleet) -> None:
    job = fleet.rest(
        "POST",
        "/jobs",
        {"action": "dimming", "params": {"output_mode": "on", "dimming": 2}, "targets": {"thingIds": [IDLE]}},
    )
    page = open_page("#/jobs", "viewer")
    expect(page.locator(f'table.jobs tr[data-job="{job["jobId"]}"]')).to_be_visible()
    expect(page.get_by_role("link", name="Create a job")).to_have_count(0)
    page.locator(f'table.jobs tr[data-job="{job["jobId"]}"]').get_by_role("link", name=job["jobId"]).click()
    expect(page.locator("dl.fields[data-job]")).to_have_attribute("data-state", "IN_PROGRESS")
    expect(page.locator("table.executions tbody tr")).to_have_count(1)
    for name in ("Pause", "Resume", "Cancel job", re.compile("Rerun failed")):
        expect(page.get_by_role("button", name=name)).to_have_count(0)
    page.goto(fleet.url + "#/jobs/new")
    expect(page.get_by_text("This page needs the operator role; this key is viewer.")).to_be_visible()
    # The operator does see them on the same job.
    operator = open_page(f"#/jobs/{job['jobId']}", "operator")
    expect(operator.get_by_role("button", name="Pause")).to_be_visible()
    expect(operator.get_by_role("button", name="Cancel job")).to_be_visible()
    operator.get_by_role("button", name="Cancel job").click()
    expect(operator.locator("dl.fields[data-job]")).to_have_attribute("data-state", "CANCELED")


def test_the_list_keeps_a_jobs_action_and_targets_through_its_later_events(open_page: Callable[..., Page], fleet: Fleet) -> None:
    # Scheduled in an hour: its first event (with the spec) is written before the list opens; its pause and
    # cancel come live as events without the spec.
    start = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    job = fleet.rest(
        "POST",
        "/jobs",
        {
            "action": "dimming",
            "params": {"output_mode": "on", "dimming": 3},
            "targets": {"thingIds": [IDLE]},
            "schedule": {"startAt": start},
        },
    )
    page = open_page("#/", "viewer")
    with page.expect_response(lambda r: "/api/v1/events" in r.url):  # the list's event stream is open
        page.goto(fleet.url + "#/jobs")
    row = page.locator(f'table.jobs tr[data-job="{job["jobId"]}"]')
    expect(row).to_have_attribute("data-state", "SCHEDULED")
    page.evaluate("window.__notReloaded = true")
    for action, state in (("pause", "PAUSED"), ("cancel", "CANCELED")):
        fleet.rest("POST", f"/jobs/{job['jobId']}/{action}", {})
        expect(row.locator(".badge")).to_have_text(state)
        expect(row.locator("td").nth(1)).to_have_text("dimming")
        expect(row.locator("td.targets")).to_contain_text(f"things {IDLE}")
    assert page.evaluate("window.__notReloaded") is True


def test_a_refused_spec_is_shown_on_the_field_the_server_names(open_page: Callable[..., Page], fleet: Fleet) -> None:
    page = open_page("#/jobs/new", "operator")
    page.get_by_label("Thing ids").fill(f"{GOOD[0]} {GOOD[1]}")
    page.get_by_label("Action").fill("dimming")
    page.get_by_label("Max per minute").fill("6000001")  # the bound is 6,000,000
    page.get_by_role("button", name="Count the targets (dry run)").click()
    error = page.locator('[data-field="rollout.maxPerMinute"] .field-error')
    expect(error).to_contain_text("to 6000000")
    expect(page.get_by_label("Max per minute")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("button", name=re.compile("^Create the job"))).to_be_disabled()
    # At the bound it is accepted: the two listed things are counted.
    page.get_by_label("Max per minute").fill("6000000")
    page.get_by_role("button", name="Count the targets (dry run)").click()
    expect(page.locator(".dry-count")).to_have_attribute("data-targets", "2")
    expect(error).to_be_hidden()


def test_the_params_switch_to_raw_json_and_back_decides_what_is_sent(open_page: Callable[..., Page], fleet: Fleet) -> None:
    page = open_page("#/jobs/new", "operator")
    page.get_by_label("Thing ids").fill(IDLE)
    page.get_by_label("Thing type").select_option("dimmer")
    page.locator('select[data-path="params.output_mode"]').select_option(label="on")
    dimming = page.locator('input[data-path="params.dimming"]')
    dimming.fill("40")
    form_params = {
        "f_port": 60,
        "priority": "LOW",
        "confirmed": "false",
        "command": "dimming",
        "output_mode": "on",
        "dimming": 40,
    }
    # The raw JSON starts as what the form holds; edited, it is what the dry run sends.
    raw = switch_params_editor(page, "Enter")
    assert json.loads(raw.input_value()) == form_params
    raw.fill(json.dumps({**form_params, "dimming": 7}))
    with page.expect_request(lambda r: r.url.endswith("/api/v1/jobs") and r.method == "POST") as counted:
        page.get_by_role("button", name="Count the targets (dry run)").click()
    assert counted.value.post_data_json["params"] == {**form_params, "dimming": 7}
    # Back on the form: it kept its own values (the raw text is not read back) and is what is sent.
    switch_params_editor(page, " ")
    expect(dimming).to_have_value("40")
    with page.expect_request(lambda r: r.url.endswith("/api/v1/jobs") and r.method == "POST") as counted:
        page.get_by_role("button", name="Count the targets (dry run)").click()
    assert counted.value.post_data_json["params"] == form_params
    expect(page.locator(".dry-count")).to_have_attribute("data-targets", "1")


def test_the_worst_specs_the_bounds_admit_are_shown(open_page: Callable[..., Page], fleet: Fleet, tmp_path: Path) -> None:
    """The widest values (REST) and the largest spec (10,000 ids and exclusions, through the CLI) render whole."""
    from google.protobuf import json_format

    from broker_hooks.jsonvalue import MAX_SAFE_INTEGER
    from tests.test_jobs_worst_values import WIDE, _rest_body, worst_scheduled_spec, worst_spec

    run_id = os.urandom(4).hex()
    widest = fleet.rest("POST", "/jobs", _rest_body(worst_scheduled_spec(run_id), f"r{run_id}"))
    largest = worst_spec(IDLE, run_id)
    largest.schedule.start_at.FromMilliseconds(253_402_300_799_998)  # waits: none of its targets starts
    spec_file = tmp_path / "largest.json"
    spec_file.write_text(json.dumps(json_format.MessageToDict(largest), ensure_ascii=False), encoding="utf-8")
    fleet.cli("jobs", "create", "--spec", str(spec_file))
    largest_id = next(
        j["jobId"]
        for j in fleet.rest("GET", "/jobs?pageSize=100")["jobs"]
        if j["spec"]["idempotencyKey"] == largest.idempotency_key
    )

    page = open_page(f"#/jobs/{widest['jobId']}", "viewer")
    expect(page.locator("dl.fields[data-job]")).to_have_attribute("data-state", "SCHEDULED")
    expect(page.locator("#spec-title + dl")).to_contain_text(WIDE.replace("\x00", "")[:3])
    expect(page.locator('[data-json="params"]')).to_contain_text(f'"max": {MAX_SAFE_INTEGER}')
    page = open_page(f"#/jobs/{largest_id}", "viewer")
    expect(page.locator("dl.fields[data-job]")).to_have_attribute("data-state", "SCHEDULED")
    expect(page.locator("#spec-title + dl")).to_contain_text("10000 listed things")
    expect(page.locator("#spec-title + dl")).to_contain_text("except 10000 listed things")
    shot(fleet, page, "job-largest-spec")
