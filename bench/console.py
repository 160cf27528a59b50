"""The console under a large store and a busy event stream (issue 15 §2): ``.venv/bin/python bench/console.py``.

1. Puts ``--executions`` (default 100,000) real execution rows in the store (each with its QUEUED event
   and, for a final one, its final event: the rows and history a service that ran them would hold),
   with a direct SQLite bulk insert into a service's database between two starts (the store has no
   batch create API; this takes seconds instead of the minutes ``Send`` would).
2. Starts the real ``fleetcmd serve`` on it and opens the console's Commands page in Debian's
   chromium (Playwright, the system browser): time from navigation to the first page of rows
   rendered, then to each filter change (thing, status, both) and page change (Older, Newer),
   ``--repeat`` times each, as the operator's browser sees it (click to the table filled).
3. Starts ``--devices`` real MQTT devices (``bench.loadgen.DeviceAgent``: the load generator's devices,
   answering SUCCEEDED at once) and sends ``--rate`` commands a second to them over REST for
   ``--seconds`` while the Commands page is open and live: every status change is a real store commit
   reaching the page through the real ``GET /api/v1/events``. An independent SSE reader counts the
   status changes a second the stream carries; the page records every animation frame's interval and
   the long tasks, and the table must still hold one page of rows, each at its latest status.

Prints one JSON document; figures go to BENCHMARKS.md ("Console") and docs/console.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from playwright.async_api import Page, async_playwright

from bench.loadgen import DeviceAgent
from bench.procs import Service
from server.core.ids import time_ordered_id
from server.core.lifecycle import Status

FINALS = (Status.SUCCEEDED, Status.SUCCEEDED, Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELED)
THINGS = 1000  # distinct things the stored executions belong to
ACTIONS = ("reboot", "setTemperature", "dimming", "ping")


def bulk_insert(db: Path, n: int) -> dict[str, Any]:
    """Insert ``n`` executions, oldest first, spread over the last ``n`` seconds, with their events."""
    t0 = time.monotonic()
    now_ms = int(time.time() * 1000)
    rng = random.Random(7)
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        executions: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        for i in range(n):
            created = now_ms - (n - i) * 1000
            eid = time_ordered_id(created, rng.randbytes(10))
            thing = f"dev-{i % THINGS:05d}"
            action = ACTIONS[i % len(ACTIONS)]
            final = FINALS[i % len(FINALS)] if i < n - 50 else Status.QUEUED  # the newest 50 still pending
            done = created + 800 if final != Status.QUEUED else None
            updated = done or created
            result = '{"ok":true}' if final == Status.SUCCEEDED else None
            reason = ("ERR", "the device said no") if final == Status.FAILED else (None, None)
            expires = created + 3_600_000 if final == Status.QUEUED else created + 60_000
            executions.append(
                (
                    eid,
                    rng.randbytes(16).hex(),
                    thing,
                    action,
                    "{}",
                    60,
                    int(final),
                    result,
                    *reason,
                    created,
                    updated,
                    done,
                    expires,
                )
            )
            events.append((eid, thing, action, int(Status.QUEUED), None, created, None, None, None))
            if done is not None:
                events.append((eid, thing, action, int(final), int(Status.QUEUED), done, result, *reason))
        con.executemany(
            "INSERT INTO executions (execution_id, command_id, thing_id, action, params, ttl_seconds, status, result,"
            " reason_code, reason_description, created_at, updated_at, completed_at, expires_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            executions,
        )
        con.executemany(
            "INSERT INTO events (execution_id, thing_id, action, status, previous_status, at, result, reason_code,"
            " reason_description) VALUES (?,?,?,?,?,?,?,?,?)",
            events,
        )
        con.commit()
        total = con.execute("SELECT count(*) FROM executions").fetchone()[0]
    finally:
        con.close()
    return {"executions": total, "events": len(events), "insert_s": round(time.monotonic() - t0, 2)}


READY_TABLE = (
    "document.querySelector('table.executions[aria-busy=false]') && document.querySelectorAll('table.executions tbody tr').length"
)


async def until(page: Page, condition: str, timeout_s: float = 30) -> float:
    """Wait until the JS ``condition`` holds, checked every frame in the page; returns performance.now() then.

    (Page.wait_for_function evaluates its predicate with eval, which the console's CSP forbids.)
    """
    js = (
        f"new Promise((resolve, reject) => {{ const end = performance.now() + {int(timeout_s * 1000)};"
        f" const f = () => {{ if ({condition}) resolve(performance.now());"
        " else if (performance.now() > end) reject(new Error('timeout'));"
        " else requestAnimationFrame(f); }; f(); })"
    )
    return float(await page.evaluate(js))


async def timed(page: Page, action: Any, expect_rows: int | None = None) -> float:
    """Milliseconds from ``action()`` to a new table of rows rendered (the old one replaced)."""
    t0 = float(await page.evaluate("window.__old = document.querySelector('table.executions'); performance.now()"))
    await action()
    rows = f"({READY_TABLE})"
    # A filter may match few rows or none: then the new table done loading is the render.
    want = f"{rows} === {expect_rows}" if expect_rows else "document.querySelector('table.executions[aria-busy=false]')"
    t1 = await until(page, f"document.querySelector('table.executions') !== window.__old && {want}")
    return t1 - t0


async def navigation_figures(page: Page, url: str, key: str, repeat: int) -> dict[str, Any]:
    """First render, filter changes and page changes on the Commands page."""
    out: dict[str, list[float]] = {
        "first_render": [],
        "filter_thing": [],
        "filter_status": [],
        "filter_both": [],
        "older": [],
        "newer": [],
    }
    for _ in range(repeat):
        await page.goto(url + "#/commands")
        await page.get_by_label("API key").fill(key)
        out["first_render"].append(await timed(page, lambda: page.get_by_role("button", name="Sign in").click(), 50))
        await page.get_by_role("button", name="Sign out").click()
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await until(page, READY_TABLE)
    for _ in range(repeat):
        thing = f"dev-{random.randrange(THINGS):05d}"
        await page.goto(url + "#/commands")
        await until(page, READY_TABLE)

        async def by_thing(t: str = thing) -> None:
            await page.get_by_label("Thing").fill(t)
            await page.get_by_role("button", name="Apply filters").click()

        out["filter_thing"].append(await timed(page, by_thing))
        await page.goto(url + "#/commands")
        await until(page, READY_TABLE)

        async def by_status() -> None:
            await page.get_by_role("checkbox", name="FAILED").check()
            await page.get_by_role("button", name="Apply filters").click()

        out["filter_status"].append(await timed(page, by_status, 50))

        async def both(t: str = thing) -> None:
            await page.get_by_label("Thing").fill(t)
            await page.get_by_role("button", name="Apply filters").click()

        out["filter_both"].append(await timed(page, both))
        await page.goto(url + "#/commands")
        await until(page, READY_TABLE)
        for _ in range(3):
            out["older"].append(await timed(page, lambda: page.get_by_role("button", name="Older →").click(), 50))
        for _ in range(3):
            out["newer"].append(await timed(page, lambda: page.get_by_role("button", name="← Newer").click(), 50))
    return {k: summary(v) for k, v in out.items()}


def summary(values: list[float]) -> dict[str, float]:
    """Median, max and count of milliseconds."""
    return {"median_ms": round(statistics.median(values), 1), "max_ms": round(max(values), 1), "n": len(values)}


FRAMES_JS = """
() => {
  window.__frames = [];
  window.__long = [];
  let last = performance.now();
  window.__running = true;
  const frame = (now) => { window.__frames.push(now - last); last = now; if (window.__running) requestAnimationFrame(frame); };
  requestAnimationFrame(frame);
  new PerformanceObserver((list) => { for (const e of list.getEntries()) window.__long.push(e.duration); })
    .observe({ type: "longtask", buffered: false });
}
"""


async def count_events(http: str, key: str, stop: asyncio.Event, per_second: list[int]) -> None:
    """Read GET /api/v1/events like any client and count the status changes of each second."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    async with aiohttp.ClientSession() as session, session.get(f"{http}/api/v1/events", headers=headers) as resp:
        second = int(time.monotonic())
        n = 0
        async for line in resp.content:
            if line.startswith(b"event: execution"):
                n += 1
            now = int(time.monotonic())
            if now != second:
                per_second.append(n)
                n, second = 0, now
            if stop.is_set():
                return


async def send_load(http: str, key: str, things: list[str], rate: int, seconds: float) -> dict[str, int]:
    """POST /api/v1/commands at ``rate`` a second (a tick every 20 ms), round-robin over ``things``."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    sent = errors = 0
    tick = 0.02
    per_tick = max(1, round(rate * tick))
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[Any]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def one(thing: str) -> None:
            nonlocal errors
            async with session.post(
                f"{http}/api/v1/commands", json={"thingId": thing, "action": "ping", "ttl": 60}, headers=headers
            ) as r:
                if r.status >= 300:
                    errors += 1
                await r.read()

        start = loop.time()
        i = 0
        while loop.time() - start < seconds:
            for _ in range(per_tick):
                task = asyncio.ensure_future(one(things[i % len(things)]))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
                sent += 1
            tick_n = i // per_tick
            await asyncio.sleep(max(0.0, start + tick_n * tick - loop.time()))
        if pending:
            await asyncio.wait(pending, timeout=30)
    return {"sent": sent, "errors": errors}


async def load_figures(page: Page, svc: Service, url: str, http: str, args: argparse.Namespace) -> dict[str, Any]:
    """Frame budget on the live Commands page while ``args.rate`` commands a second run through real devices."""
    things = [f"live-{i:04d}" for i in range(args.devices)]
    agent = DeviceAgent(things)
    connected = await agent.cmd_connect(svc.mqtt_port, time.monotonic(), 30)
    assert connected["connected"] == len(things), connected
    await page.goto(url + "#/commands")
    await until(page, READY_TABLE)
    await until(page, "document.querySelector('.live-state').dataset.live === 'live'")
    await page.evaluate(FRAMES_JS)
    stop = asyncio.Event()
    per_second: list[int] = []
    counter = asyncio.ensure_future(count_events(http, svc.api_key, stop, per_second))
    await asyncio.sleep(0.5)
    sent = await send_load(http, svc.api_key, things, args.rate, args.seconds)
    await asyncio.sleep(2)  # the last answers and their events
    stop.set()
    counter.cancel()
    await page.evaluate("window.__running = false")
    frames = (await page.evaluate("window.__frames"))[1:]
    long_tasks = await page.evaluate("window.__long")
    rows = await page.evaluate("[...document.querySelectorAll('table.executions tbody tr')].map(r => r.dataset.status)")
    stats = await agent.cmd_stats()
    await agent.cmd_close()
    busy = [n for n in per_second if n > 0]
    frames_sorted = sorted(frames)
    return {
        "commands_sent": sent,
        "device_requests": stats["requests"],
        "status_changes_per_s_on_the_stream": {
            "median": statistics.median(busy) if busy else 0,
            "max": max(busy, default=0),
            "seconds": len(busy),
        },
        "frames": len(frames),
        "frame_interval_ms": {
            "median": round(statistics.median(frames), 1),
            "p99": round(frames_sorted[int(len(frames_sorted) * 0.99) - 1], 1),
            "max": round(max(frames), 1),
        },
        "frames_over_50ms": sum(f > 50 for f in frames),
        "long_tasks": {
            "count": len(long_tasks),
            "total_ms": round(sum(long_tasks), 1),
            "max_ms": round(max(long_tasks, default=0), 1),
        },
        "updates_applied": int(await page.locator("[data-updates]").get_attribute("data-updates") or 0),
        "rows_in_dom": len(rows),
        "rows_not_final": sum(s not in ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED") for s in rows),
    }


async def scenario(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The whole run in ``workdir``: the store filled, the service started, the figures measured."""
    data = workdir / "data"
    first = Service(data, workdir / "first.log")  # creates the schema and the admin key
    first.stop()
    store = bulk_insert(data / "fleetcmd.db", args.executions)
    svc = Service(data, workdir / "fleetcmd.log")
    try:
        http = "http://127.0.0.1:" + svc.ready["http"].rpartition(":")[2]
        url = http + "/"
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            ctx = await browser.new_context(viewport={"width": 1360, "height": 860})
            page = await ctx.new_page()
            nav = await navigation_figures(page, url, svc.api_key, args.repeat)
            load = await load_figures(page, svc, url, http, args)
            await browser.close()
    finally:
        svc.stop()
    return {"store": store, "navigation": nav, "live": load, "rate": args.rate, "devices": args.devices, "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    """Run the scenario and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rate", type=int, default=300, help="commands a second (each makes 3-4 status changes)")
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetcmd-console-bench-") as tmp:
        result = asyncio.run(scenario(args, Path(tmp)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
