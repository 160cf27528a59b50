// The commands page: the executions table (EMQX's columns plus the reason code and reason),
// newest first, paginated by the server, filtered by thing, action, status (several) and
// creation time, all in the URL. It stays live through GET /api/v1/events: events are
// coalesced per execution and applied once per animation frame, and the table never holds
// more than one page of rows, so a thousand status changes a second cost one small DOM
// update per frame whatever the size of the store.

import { followEvents, get, query } from "./api.js";
import { STATUSES, announce, h, link, replace, statusBadge, time } from "./dom.js";

export const PAGE_SIZE = 50;
// Updates waiting for the next frame are bounded too (a hidden tab gets no frames).
const MAX_PENDING = 2000;

/** The filters of a commands URL (#/commands?thing=&action=&status=&after=&before=&page=). */
export function filtersFrom(params) {
  return {
    thingId: params.get("thing") || "",
    jobId: params.get("job") || "",
    action: params.get("action") || "",
    statuses: params.getAll("status").filter((s) => STATUSES.includes(s)),
    after: params.get("after") || "",
    before: params.get("before") || "",
    pageToken: params.get("page") || "",
  };
}

function routeOf(f) {
  return "/commands" + query({ thing: f.thingId, job: f.jobId, action: f.action, status: f.statuses, after: f.after, before: f.before, page: f.pageToken });
}

// Page tokens of the pages before this one (for "Newer"), by filter set; a shared link starts without them.
const trails = new Map();

/** ISO UTC -> the value of a datetime-local input (local time), and back. */
function toLocalInput(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}
function fromLocalInput(value) {
  if (!value) return "";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? "" : d.toISOString();
}

/**
 * A live executions table.
 * @param {{thingId?: string, jobId?: string, action?: string, statuses?: string[], after?: string, before?: string, pageToken?: string}} filters
 * @param {{pageSize?: number, caption: string, onPage?: (nextToken: string) => void}} opts
 * @returns {{element: HTMLElement, stop: () => void}}
 */
export function executionsTable(filters, opts) {
  const pageSize = opts.pageSize || PAGE_SIZE;
  const rows = new Map(); // executionId -> {tr, exec, cells}
  const tbody = h("tbody");
  const liveState = h("span", { class: "live-state", "data-live": "connecting" }, "connecting…");
  const counter = h("span", { class: "muted", "data-updates": "0" }, "");
  const table = h("table", { class: "executions", "aria-busy": "true" },
    h("caption", {}, opts.caption, " ", liveState, " ", counter),
    h("thead", {}, h("tr", {}, ["Execution ID", "Thing", "Action", "Status", "Reason code", "Reason", "Created at", "Updated at"].map((c) => h("th", { scope: "col" }, c)))),
    tbody);
  const empty = h("p", { class: "empty muted", hidden: true }, "No executions match.");
  const element = h("div", { class: "table-wrap" }, table, empty);
  const abort = new AbortController();
  const firstPage = !filters.pageToken;
  const statusSet = new Set(filters.statuses || []);
  const afterMs = filters.after ? Date.parse(filters.after) : null;
  const beforeMs = filters.before ? Date.parse(filters.before) : null;
  let pending = new Map();
  let frame = 0;
  let applied = 0;
  let loaded = false;

  function cellsOf(exec) {
    const reason = exec.statusReason || {};
    return [
      h("td", { class: "id" }, link(`/executions/${encodeURIComponent(exec.executionId)}`, exec.executionId)),
      h("td", {}, link(`/things/${encodeURIComponent(exec.thingId)}`, exec.thingId)),
      h("td", {}, exec.action),
      h("td", { "data-col": "status" }, statusBadge(exec.status)),
      h("td", { "data-col": "reasonCode" }, reason.reasonCode || ""),
      h("td", { "data-col": "reason" }, reason.reasonDescription || ""),
      h("td", {}, time(exec.createdAt)),
      h("td", { "data-col": "updatedAt" }, time(exec.updatedAt)),
    ];
  }

  function makeRow(exec) {
    const cells = cellsOf(exec);
    const tr = h("tr", { "data-execution": exec.executionId, "data-status": exec.status }, cells);
    return { tr, exec, cells };
  }

  function update(row, exec) {
    // An event's execution is as it was when the event was sent: never older than what is shown.
    if (exec.updatedAt < row.exec.updatedAt || (row.exec.updatedAt === exec.updatedAt && row.exec.status === exec.status)) return;
    const fresh = cellsOf(exec);
    for (const i of [3, 4, 5, 7]) row.cells[i].replaceWith(fresh[i]);
    row.cells = row.cells.map((c, i) => ([3, 4, 5, 7].includes(i) ? fresh[i] : c));
    row.tr.dataset.status = exec.status;
    row.exec = exec;
  }

  function matches(exec) {
    if (filters.thingId && exec.thingId !== filters.thingId) return false;
    if (filters.action && exec.action !== filters.action) return false;
    if (filters.jobId && exec.jobId !== filters.jobId) return false;
    if (statusSet.size && !statusSet.has(exec.status)) return false;
    const created = Date.parse(exec.createdAt);
    if (afterMs !== null && created < afterMs) return false;
    if (beforeMs !== null && created >= beforeMs) return false;
    return true;
  }

  function flush() {
    frame = 0;
    const batch = pending;
    pending = new Map();
    const fresh = [];
    for (const exec of batch.values()) {
      const row = rows.get(exec.executionId);
      if (row) update(row, exec);
      else if (firstPage && matches(exec)) fresh.push(exec);
      applied += 1;
    }
    if (fresh.length) {
      // Newest first: each new row goes above the first row created before it.
      fresh.sort((a, b) => (a.createdAt < b.createdAt ? 1 : a.createdAt > b.createdAt ? -1 : 0));
      let cursor = tbody.firstElementChild;
      for (const exec of fresh) {
        while (cursor && rows.get(cursor.dataset.execution).exec.createdAt > exec.createdAt) cursor = cursor.nextElementSibling;
        if (!cursor && rows.size >= pageSize) continue; // older than the whole page: it belongs to a later page
        const row = makeRow(exec);
        rows.set(exec.executionId, row);
        tbody.insertBefore(row.tr, cursor);
      }
      // Keep one page in the DOM: the oldest rows leave at the bottom.
      while (rows.size > pageSize) {
        const last = tbody.lastElementChild;
        rows.delete(last.dataset.execution);
        last.remove();
      }
    }
    empty.hidden = rows.size > 0;
    counter.dataset.updates = String(applied);
    counter.textContent = applied ? `· ${applied} live update${applied === 1 ? "" : "s"}` : "";
  }

  function onEvents(events) {
    for (const ev of events) {
      if (ev.execution) pending.set(ev.execution.executionId, ev.execution);
    }
    if (pending.size > MAX_PENDING) {
      // No frame for a while (hidden tab): keep the rows shown and the newest others.
      const kept = [...pending.values()].filter((e) => rows.has(e.executionId));
      const others = [...pending.values()].filter((e) => !rows.has(e.executionId))
        .sort((a, b) => (a.createdAt < b.createdAt ? 1 : -1)).slice(0, pageSize);
      pending = new Map([...kept, ...others].map((e) => [e.executionId, e]));
    }
    if (loaded && !frame) frame = requestAnimationFrame(flush);
  }

  async function load() {
    try {
      const q = query({ thingId: filters.thingId, jobId: filters.jobId, action: filters.action, status: filters.statuses, createdAfter: filters.after,
        createdBefore: filters.before, pageSize, pageToken: filters.pageToken });
      const { body } = await get(`/commands${q}`, { signal: abort.signal });
      for (const exec of body.executions) {
        const row = makeRow(exec);
        rows.set(exec.executionId, row);
        tbody.append(row.tr);
      }
      loaded = true;
      if (pending.size && !frame) frame = requestAnimationFrame(flush);
      empty.hidden = rows.size > 0;
      table.setAttribute("aria-busy", "false");
      if (opts.onPage) opts.onPage(body.nextPageToken || "");
    } catch (err) {
      if (abort.signal.aborted) return;
      table.setAttribute("aria-busy", "false");
      announce(`Cannot list executions: ${err.message}`, "error");
      const first = (err.details || [])[0];
      replace(empty, `Cannot list executions: ${err.message}`);
      empty.hidden = false;
      if (first) empty.dataset.field = first.field;
    }
  }

  // Subscribe first, then load the page: an execution created in between arrives as an event
  // (held until the page is in; the newer of the two states wins).
  // jobId: a service with job events filters by it; one without ignores it (matches() filters here).
  const stream = { thingId: filters.thingId, action: filters.action, jobId: filters.jobId };
  let started = false;
  const start = () => { if (!started) { started = true; load(); } };
  followEvents(stream, onEvents, (state) => {
    liveState.dataset.live = state === "live" ? "live" : "reconnecting";
    liveState.textContent = state === "live" ? "● live" : state;
    start();
  }, abort.signal);
  return {
    element,
    stop() {
      abort.abort();
      if (frame) cancelAnimationFrame(frame);
    },
  };
}

/** The view of #/commands. */
export function commandsView(main, params, ctx) {
  const f = filtersFrom(params);
  const key = JSON.stringify({ ...f, pageToken: "" });
  const trail = trails.get(key) || [];
  trails.clear();
  trails.set(key, trail);

  const thing = h("input", { id: "f-thing", name: "thing", value: f.thingId, autocomplete: "off" });
  const action = h("input", { id: "f-action", name: "action", value: f.action, autocomplete: "off" });
  const after = h("input", { id: "f-after", type: "datetime-local", step: "1", value: toLocalInput(f.after) });
  const before = h("input", { id: "f-before", type: "datetime-local", step: "1", value: toLocalInput(f.before) });
  const boxes = STATUSES.map((s) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "status", value: s, checked: f.statuses.includes(s) }), " ", s));
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter executions" },
    h("div", { class: "field" }, h("label", { for: "f-thing" }, "Thing"), thing),
    h("div", { class: "field" }, h("label", { for: "f-action" }, "Action"), action),
    h("fieldset", { class: "statuses" }, h("legend", {}, "Status"), boxes),
    h("div", { class: "field" }, h("label", { for: "f-after" }, "Created from"), after),
    h("div", { class: "field" }, h("label", { for: "f-before" }, "Created before"), before),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Apply filters"),
      h("button", { type: "button", class: "secondary", onclick: () => ctx.navigate("/commands") }, "Clear")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    trails.clear();
    ctx.navigate(routeOf({
      thingId: thing.value.trim(), jobId: f.jobId, action: action.value.trim(),
      statuses: boxes.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value),
      after: fromLocalInput(after.value), before: fromLocalInput(before.value), pageToken: "",
    }));
  });

  const newer = h("button", { type: "button", class: "secondary", disabled: !f.pageToken }, "← Newer");
  const older = h("button", { type: "button", class: "secondary", disabled: true }, "Older →");
  const pager = h("nav", { class: "pager", "aria-label": "Pages" }, newer, older);
  const table = executionsTable(f, {
    caption: f.pageToken ? "Executions (an older page)" : "Executions, newest first",
    onPage(next) {
      older.disabled = !next;
      older.onclick = () => { trail.push(f.pageToken); ctx.navigate(routeOf({ ...f, pageToken: next })); };
    },
  });
  newer.onclick = () => ctx.navigate(routeOf({ ...f, pageToken: trail.length ? trail.pop() : "" }));

  replace(main, h("h1", {}, "Commands"),
    f.jobId ? h("p", { class: "job-filter" }, "Executions of job ", link(`/jobs/${encodeURIComponent(f.jobId)}`, f.jobId), " ",
      link(routeOf({ ...f, jobId: "", pageToken: "" }), "(all jobs)")) : null,
    form, table.element, pager);
  return () => table.stop();
}
