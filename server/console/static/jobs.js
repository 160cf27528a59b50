// The jobs pages: the list (state, per-status progress, times), a job (its spec, progress bars,
// its executions, the abort reason; Pause, Resume, Cancel, Rerun failed for operators) and the
// create form (targets, params from the type's schema, rollout, abort criteria, retries,
// schedule) with the dry-run count shown before the job is created.
//
// Live: job snapshots arrive as `event: job` on GET /api/v1/events when the service sends them
// (they are applied once per animation frame); until one has been seen, the visible jobs that are
// not final are re-read every POLL_MS, so the pages are live with or without job events. Only a
// job's first event has its spec (it never changes): a later one is merged into the job shown.

import { ApiError, followEvents, get, post, query, session } from "./api.js";
import { announce, dl, h, jsonBlock, link, replace, time } from "./dom.js";
import { executionsTable } from "./commands.js";
import { formable, rawJsonToggle, schemaForm } from "./schemaform.js";

export const POLL_MS = 2000;
const LIST_PAGE = 50;
export const FINAL_STATES = new Set(["COMPLETED", "CANCELED", "ABORTED"]);
export const STATES = ["SCHEDULED", "IN_PROGRESS", "PAUSED", "COMPLETED", "CANCELED", "ABORTED"];
// Every count a job has, in the API's order, with the words shown for it.
const COUNTS = [
  ["PENDING", "pending"], ["RETRYING", "retrying"], ["SKIPPED", "skipped"], ["QUEUED", "queued"], ["SENT", "sent"],
  ["DELIVERED", "delivered"], ["IN_PROGRESS", "in progress"], ["SUCCEEDED", "succeeded"], ["FAILED", "failed"],
  ["REJECTED", "rejected"], ["TIMED_OUT", "timed out"], ["CANCELED", "canceled"],
];
const DONE = ["SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "SKIPPED"];
const FAILURES = ["FAILED", "REJECTED", "TIMED_OUT", "ANY"];

function stateBadge(state) {
  return h("span", { class: `badge job-${String(state).toLowerCase()}`, "data-state": state }, state);
}

function total(job) {
  return Math.max(job.targetsTotal || 0, COUNTS.reduce((n, [k]) => n + (job.counts[k] || 0), 0));
}

/** The job's overall progress: a <progress> of its final targets, and the counts that are not zero. */
function summaryBar(job) {
  const all = total(job);
  const done = DONE.reduce((n, k) => n + (job.counts[k] || 0), 0);
  const words = COUNTS.filter(([k]) => job.counts[k]).map(([k, w]) => h("span", { class: `count count-${k.toLowerCase()}`, "data-count": k }, `${w} ${job.counts[k]}`));
  return h("div", { class: "job-progress" },
    h("progress", { max: String(all || 1), value: String(done), "aria-label": `${done} of ${all} targets final` }),
    h("span", { class: "progress-text", "data-done": String(done), "data-total": String(all) }, `${done}/${all}`),
    h("span", { class: "counts" }, words));
}

/** One bar per count (every count: a zero is information too). */
function countBars(job) {
  const all = total(job) || 1;
  return h("table", { class: "count-bars" },
    h("caption", {}, "Targets by status"),
    h("thead", {}, h("tr", {}, ["Status", "Targets", "Share"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, COUNTS.map(([k, w]) => h("tr", { "data-count": k },
      h("th", { scope: "row" }, w),
      h("td", { class: "num" }, String(job.counts[k] || 0)),
      h("td", {}, h("progress", { class: `bar-${k.toLowerCase()}`, max: String(all), value: String(job.counts[k] || 0), "aria-label": `${w}: ${job.counts[k] || 0} of ${all}` }))))));
}

/** Targets in words: "type lamp · site=north · online only · except a, b". */
function targetsText(t) {
  const parts = [];
  if (t.fromJob) parts.push(`the ${(t.fromStatuses || []).join(", ")} targets of ${t.fromJob}`);
  if (t.thingIds && t.thingIds.length) parts.push(t.thingIds.length <= 5 ? `things ${t.thingIds.join(", ")}` : `${t.thingIds.length} listed things`);
  if (t.thingType) parts.push(`type ${t.thingType}`);
  for (const [k, v] of Object.entries(t.attributes || {})) parts.push(`${k}=${v}`);
  if (t.onlineOnly) parts.push("online only");
  if (t.exclude && t.exclude.length) parts.push(t.exclude.length <= 5 ? `except ${t.exclude.join(", ")}` : `except ${t.exclude.length} listed things`);
  parts.push(t.mode === "CONTINUOUS" ? "continuous" : "snapshot");
  return parts.join(" · ");
}

function rolloutText(r) {
  const parts = [];
  if (r.maxPerMinute) parts.push(`at most ${r.maxPerMinute}/min`);
  if (r.ramp) parts.push(`ramp from ${r.ramp.basePerMinute}/min ×${r.ramp.factor} every ${r.ramp.everyNotified ? `${r.ramp.everyNotified} notified` : `${r.ramp.everySucceeded} succeeded`}`);
  if (r.maxInFlight) parts.push(`at most ${r.maxInFlight} in flight`);
  if (r.sequentialPerThing) parts.push("sequential per thing");
  return parts.length ? parts.join(" · ") : "as fast as the service goes";
}

/**
 * Keep jobs live: `event: job` snapshots when the service sends them, else a re-read every POLL_MS
 * while `unfinished()` says a visible job is not final.
 * @param {Object<string,string>} filters of the event stream
 * @param {(jobs: Array<any>) => void} onJobs the snapshots of one frame (the newest per job; without
 *   `spec` unless this frame had the job's first event: `withSpec` merges one into the job known)
 * @param {() => boolean} unfinished
 * @param {() => Promise<void>} refresh
 * @returns {() => void} stop
 */
function keepLive(filters, onJobs, unfinished, refresh) {
  const abort = new AbortController();
  let pending = new Map();
  let frame = 0;
  let sawJobEvents = false;
  let busy = false;
  const flush = () => {
    frame = 0;
    const batch = [...pending.values()];
    pending = new Map();
    onJobs(batch);
  };
  followEvents(filters, () => {}, () => {}, abort.signal, (jobs) => {
    sawJobEvents = true;
    for (const job of jobs) pending.set(job.jobId, withSpec(job, pending.get(job.jobId)));
    if (!frame) frame = requestAnimationFrame(flush);
  });
  const timer = setInterval(async () => {
    if (sawJobEvents || busy || !unfinished()) return;
    busy = true;
    try { await refresh(); } finally { busy = false; }
  }, POLL_MS);
  return () => { abort.abort(); clearInterval(timer); if (frame) cancelAnimationFrame(frame); };
}

/** A job event's snapshot with the spec of `known` (the same job) when the event has none (every one but the first). */
function withSpec(job, known) {
  return job.spec || !known || !known.spec ? job : { ...job, spec: known.spec };
}

// ---- the list -------------------------------------------------------------------------------

/** #/jobs?state=&page= */
export function jobsView(main, params, ctx) {
  const states = params.getAll("state").filter((s) => STATES.includes(s));
  const page = params.get("page") || "";
  const abort = new AbortController();
  const rows = new Map(); // jobId -> {tr, job}
  const tbody = h("tbody");
  const table = h("table", { class: "jobs", "aria-busy": "true" },
    h("caption", {}, "Jobs, newest first"),
    h("thead", {}, h("tr", {}, ["Job", "Action", "State", "Progress", "Targets", "Created at", "Started at", "Ended at"].map((c) => h("th", { scope: "col" }, c)))),
    tbody);
  const empty = h("p", { class: "empty muted", hidden: true }, "No jobs.");
  const boxes = STATES.map((s) => h("label", { class: "check" }, h("input", { type: "checkbox", name: "state", value: s, checked: states.includes(s) }), " ", s));
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter jobs" },
    h("fieldset", { class: "statuses" }, h("legend", {}, "State"), boxes),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Apply filters")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    ctx.navigate("/jobs" + query({ state: boxes.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value) }));
  });
  const older = h("button", { type: "button", class: "secondary", disabled: true }, "Older →");
  const first = h("button", { type: "button", class: "secondary", disabled: !page, onclick: () => ctx.navigate("/jobs" + query({ state: states })) }, "← Newest");

  function cells(job) {
    return [
      h("td", { class: "id" }, link(`/jobs/${encodeURIComponent(job.jobId)}`, job.jobId)),
      h("td", {}, job.spec.action),
      h("td", {}, stateBadge(job.state)),
      h("td", {}, summaryBar(job)),
      h("td", { class: "targets" }, targetsText(job.spec.targets)),
      h("td", {}, time(job.createdAt)),
      h("td", {}, time(job.startedAt)),
      h("td", {}, time(job.endedAt)),
    ];
  }

  function show(job) {
    const known = rows.get(job.jobId);
    if (known) {
      known.job = withSpec(job, known.job);
      known.tr.dataset.state = job.state;
      known.tr.replaceChildren(...cells(known.job));
      return true;
    }
    return false;
  }

  async function load() {
    try {
      const { body } = await get(`/jobs${query({ state: states.join(","), pageSize: LIST_PAGE, pageToken: page })}`, { signal: abort.signal });
      rows.clear();
      replace(tbody, body.jobs.map((job) => {
        const tr = h("tr", { "data-job": job.jobId, "data-state": job.state }, cells(job));
        rows.set(job.jobId, { tr, job });
        return tr;
      }));
      empty.hidden = body.jobs.length > 0;
      table.setAttribute("aria-busy", "false");
      older.disabled = !body.nextPageToken;
      older.onclick = () => ctx.navigate("/jobs" + query({ state: states, page: body.nextPageToken }));
    } catch (err) {
      if (abort.signal.aborted) return;
      table.setAttribute("aria-busy", "false");
      announce(`Cannot list jobs: ${err.message}`, "error");
    }
  }

  let reload = 0;
  const stop = keepLive({}, (jobs) => {
    // A job not on this page (a new one) re-reads the page: the server orders and filters it.
    const unknown = jobs.filter((job) => !show(job));
    if (unknown.length && !page && !reload) reload = setTimeout(() => { reload = 0; load(); }, 250);
  }, () => [...rows.values()].some((r) => !FINAL_STATES.has(r.job.state)) || rows.size === 0, load);

  replace(main, h("h1", {}, "Jobs"),
    session.can("operator") ? h("p", {}, h("a", { class: "button", href: "#/jobs/new" }, "Create a job")) : null,
    form, h("div", { class: "table-wrap" }, table, empty), h("nav", { class: "pager", "aria-label": "Pages" }, first, older));
  load();
  return () => { abort.abort(); stop(); clearTimeout(reload); };
}

// ---- one job --------------------------------------------------------------------------------

/** #/jobs/{id} */
export function jobView(main, params, ctx) {
  const id = ctx.args[0];
  const abort = new AbortController();
  const head = h("div", { class: "job-head" }, h("p", { class: "muted" }, "Loading…"));
  const controls = h("div", { class: "actions job-controls" });
  const bars = h("section", { "aria-label": "Progress" });
  const spec = h("section", { "aria-labelledby": "spec-title" });
  const executions = executionsTable({ jobId: id }, { caption: "Executions of this job, newest first" });
  let job = null;

  function render(j) {
    // The spec once, from whichever has it first (GET, or the job's first event); later events have none.
    if (!spec.firstChild && j.spec) renderSpec(j.spec);
    j = withSpec(j, job);
    if (job && j.state === job.state && JSON.stringify(j.counts) === JSON.stringify(job.counts) && j.endedAt === job.endedAt && j.abortReason === job.abortReason) return;
    job = j;
    replace(head, dl([
      ["State", stateBadge(j.state)],
      ["Progress", summaryBar(j)],
      ["Abort reason", j.abortReason ? h("span", { class: "abort-reason" }, j.abortReason) : "—"],
      ["Created at", time(j.createdAt)],
      ["Started at", time(j.startedAt)],
      ["Ended at", time(j.endedAt)],
      ["Created by", j.createdBy || "—"],
    ], { "data-job": j.jobId, "data-state": j.state }));
    replace(bars, countBars(j));
    renderControls(j);
  }

  function renderSpec(s) {
    const criteria = (s.abort || []).map((c) => `${c.failure} ≥ ${c.thresholdPct} % of at least ${c.minFinished} final`);
    const retries = (s.retries || []).map((p) => `${p.failure}: up to ${p.maxAttempts} more, ${p.backoff.toLowerCase()} ${p.baseSeconds} s${p.maxSeconds ? ` (max ${p.maxSeconds} s)` : ""}${p.jitter ? ", jitter" : ""}`);
    replace(spec, h("h2", { id: "spec-title" }, "Spec"), dl([
      ["Action", h("code", {}, s.action)],
      ["Targets", targetsText(s.targets)],
      ["Rollout", rolloutText(s.rollout)],
      ["Canary", s.canary ? `first ${s.canary.count}, then on if ≥ ${s.canary.successPct} % succeeded` : "—"],
      ["Abort when", criteria.length ? h("ul", { class: "plain" }, criteria.map((c) => h("li", {}, c))) : "—"],
      ["Retries", retries.length ? h("ul", { class: "plain" }, retries.map((c) => h("li", {}, c))) : "—"],
      ["Schedule", [s.schedule.startAt ? ["start ", time(s.schedule.startAt), " "] : "start now ", s.schedule.endAt ? ["· end ", time(s.schedule.endAt), ` (${s.schedule.endBehavior})`] : ""]],
      ["TTL", s.ttl ? `${s.ttl} s` : "the type's default"],
      ["Description", s.description || "—"],
    ]), h("h3", {}, "Params"), jsonBlock(s.params || {}, { "data-json": "params" }),
    h("details", {}, h("summary", {}, "The whole spec (JSON)"), jsonBlock(s)));
  }

  function renderControls(j) {
    if (!session.can("operator")) { replace(controls); return; }
    const out = [];
    if (j.state === "SCHEDULED" || j.state === "IN_PROGRESS") out.push(h("button", { type: "button", class: "secondary", onclick: () => act("pause") }, "Pause"));
    if (j.state === "PAUSED") out.push(h("button", { type: "button", onclick: () => act("resume") }, "Resume"));
    if (!FINAL_STATES.has(j.state)) {
      const only = h("input", { type: "checkbox", id: "cancel-undelivered" });
      out.push(h("span", { class: "field inline" }, only, h("label", { for: "cancel-undelivered" }, "only undelivered")),
        h("button", { type: "button", class: "danger", onclick: () => act("cancel", { onlyUndelivered: only.checked }) }, "Cancel job"));
    }
    const failed = ["FAILED", "REJECTED", "TIMED_OUT"].reduce((n, k) => n + (j.counts[k] || 0), 0);
    if (FINAL_STATES.has(j.state) && failed) out.push(h("button", { type: "button", onclick: () => act("rerun-failed") }, `Rerun failed (${failed})`));
    replace(controls, out);
  }

  async function act(what, body = {}) {
    try {
      const { body: j } = await post(`/jobs/${encodeURIComponent(id)}/${what}`, body);
      if (what === "rerun-failed") {
        announce(`Rerun job ${j.jobId} created (${j.state}).`);
        ctx.navigate(`/jobs/${encodeURIComponent(j.jobId)}`);
        return;
      }
      announce(`Job ${id}: ${j.state}.`);
      job = null;
      render(j);
    } catch (err) {
      announce(`${what} refused: ${err.message}`, "error");
    }
  }

  async function load() {
    try {
      render((await get(`/jobs/${encodeURIComponent(id)}`, { signal: abort.signal })).body);
    } catch (err) {
      if (abort.signal.aborted) return;
      replace(head, h("p", { class: "field-error" }, err instanceof ApiError && err.status === 404 ? "No such job." : `Cannot load it: ${err.message}`));
    }
  }

  const stop = keepLive({ jobId: id }, (jobs) => {
    for (const j of jobs) if (j.jobId === id) render(j);
  }, () => !job || !FINAL_STATES.has(job.state), load);
  replace(main, h("h1", {}, "Job ", h("code", {}, id)), controls, head, bars, spec,
    h("section", { "aria-label": "Executions" }, h("h2", {}, "Executions"), executions.element,
      h("p", {}, link(`/commands${query({ job: id })}`, "All executions of this job on the Commands page"))));
  load();
  return () => { abort.abort(); stop(); executions.stop(); };
}

// ---- create -----------------------------------------------------------------------------------

function fieldOf(label, control, { help = "", field = "" } = {}) {
  const id = control.id;
  const error = h("p", { id: `${id}-error`, class: "field-error", role: "alert", hidden: true });
  const helpEl = help ? h("p", { id: `${id}-help`, class: "help" }, help) : null;
  control.setAttribute("aria-describedby", [help ? `${id}-help` : null, `${id}-error`].filter(Boolean).join(" "));
  const wrap = h("div", { class: control.type === "checkbox" ? "field inline" : "field", "data-field": field || null },
    control.type === "checkbox" ? [control, h("label", { for: id }, label)] : [h("label", { for: id }, label), control], helpEl, error);
  wrap.errorEl = error;
  wrap.control = control;
  return wrap;
}

const num = (id, attrs = {}) => h("input", { id, type: "number", min: "0", step: "1", inputmode: "numeric", ...attrs });
const ids = (text) => text.split(/[\s,]+/).filter(Boolean);

/** An ISO time from a datetime-local value ("" when empty). */
function isoOf(value) {
  if (!value) return "";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? "" : d.toISOString();
}

/** One row of a repeatable fieldset (abort criteria, retries), its inputs named for the server's field paths. */
function repeatable(legend, make, addText) {
  const list = h("div", { class: "rows" });
  const rows = [];
  const add = () => {
    const n = rows.length;
    const row = make(n);
    const remove = h("button", { type: "button", class: "secondary", "aria-label": `Remove ${legend.toLowerCase()} ${n + 1}` }, "Remove");
    const el = h("fieldset", { class: "row" }, h("legend", {}, `${legend} ${n + 1}`), row.fields, remove);
    remove.addEventListener("click", () => { rows.splice(rows.indexOf(row), 1); el.remove(); });
    row.el = el;
    rows.push(row);
    list.append(el);
  };
  const element = h("fieldset", {}, h("legend", {}, legend + "s"), list, h("button", { type: "button", class: "secondary", onclick: add }, addText));
  return { element, rows };
}

/** #/jobs/new (operators) */
export function createJobView(main, params, ctx) {
  const abort = new AbortController();
  let types = [];
  let form = null; // the schema form of the chosen type's action
  let editor = null; // which of the form and the raw JSON is in use (rawJsonToggle)
  let checked = null; // the spec (JSON text) the dry run counted

  // ---- targets ----
  const thingIds = h("textarea", { id: "job-thing-ids", rows: "2", spellcheck: "false" });
  const thingType = h("select", { id: "job-type" }, h("option", { value: "" }, "(any type)"));
  const attributes = h("input", { id: "job-attributes", autocomplete: "off" });
  const onlineOnly = h("input", { id: "job-online", type: "checkbox" });
  const exclude = h("input", { id: "job-exclude", autocomplete: "off" });
  const mode = h("select", { id: "job-mode" }, h("option", { value: "SNAPSHOT" }, "snapshot (resolved at the start)"), h("option", { value: "CONTINUOUS" }, "continuous (things that match later get it too)"));
  // ---- action, params, ttl ----
  const action = h("input", { id: "job-action", autocomplete: "off", list: "job-action-names", "aria-required": "true" });
  const actionNames = h("datalist", { id: "job-action-names" });
  const paramsSlot = h("div", { class: "params" });
  const raw = h("textarea", { id: "job-params-raw", rows: "4", class: "json-input", spellcheck: "false" }, "{}");
  const ttl = num("job-ttl", { min: "1" });
  // ---- rollout ----
  const maxPerMinute = num("job-max-per-minute");
  const maxInFlight = num("job-max-in-flight");
  const sequential = h("input", { id: "job-sequential", type: "checkbox" });
  const rampBase = num("job-ramp-base");
  const rampFactor = h("input", { id: "job-ramp-factor", type: "number", min: "1", step: "any" });
  const rampEvery = num("job-ramp-every");
  const rampOn = h("select", { id: "job-ramp-on" }, h("option", { value: "everyNotified" }, "notified"), h("option", { value: "everySucceeded" }, "succeeded"));
  const canaryCount = num("job-canary-count");
  const canaryPct = h("input", { id: "job-canary-pct", type: "number", min: "0", max: "100", step: "any" });
  // ---- abort, retries ----
  const failureSelect = (id) => h("select", { id }, FAILURES.map((f) => h("option", { value: f }, f)));
  const abortRows = repeatable("Abort criterion", (n) => {
    const failure = failureSelect(`job-abort-${n}-failure`);
    const pct = h("input", { id: `job-abort-${n}-pct`, type: "number", min: "0", max: "100", step: "any", value: "10" });
    const min = num(`job-abort-${n}-min`, { min: "1", value: "10" });
    return {
      fields: [fieldOf("Failure type", failure, { field: `abort[${n}].failure` }), fieldOf("Threshold (%)", pct, { field: `abort[${n}].thresholdPct` }),
        fieldOf("Minimum finished", min, { field: `abort[${n}].minFinished` })],
      value: () => ({ failure: failure.value, thresholdPct: Number(pct.value), minFinished: Number(min.value) }),
    };
  }, "Add an abort criterion");
  const retryRows = repeatable("Retry policy", (n) => {
    const failure = failureSelect(`job-retry-${n}-failure`);
    const attempts = num(`job-retry-${n}-attempts`, { max: "10", value: "3" });
    const backoff = h("select", { id: `job-retry-${n}-backoff` }, h("option", { value: "FIXED" }, "fixed"), h("option", { value: "EXPONENTIAL" }, "exponential"));
    const base = h("input", { id: `job-retry-${n}-base`, type: "number", min: "0", step: "any", value: "30" });
    const max = h("input", { id: `job-retry-${n}-max`, type: "number", min: "0", step: "any" });
    const jitter = h("input", { id: `job-retry-${n}-jitter`, type: "checkbox" });
    return {
      fields: [fieldOf("Failure type", failure, { field: `retries[${n}].failure` }), fieldOf("More attempts (0-10)", attempts, { field: `retries[${n}].maxAttempts` }),
        fieldOf("Backoff", backoff), fieldOf("Base (s)", base, { field: `retries[${n}].baseSeconds` }),
        fieldOf("Max (s)", max, { field: `retries[${n}].maxSeconds` }), fieldOf("Jitter", jitter)],
      value: () => ({ failure: failure.value, maxAttempts: Number(attempts.value), backoff: backoff.value, baseSeconds: Number(base.value),
        maxSeconds: max.value ? Number(max.value) : 0, jitter: jitter.checked }),
    };
  }, "Add a retry policy");
  // ---- schedule, misc ----
  const startAt = h("input", { id: "job-start", type: "datetime-local", step: "1" });
  const endAt = h("input", { id: "job-end", type: "datetime-local", step: "1" });
  const endBehavior = h("select", { id: "job-end-behavior" }, h("option", { value: "STOP_NEW" }, "stop starting new ones"), h("option", { value: "CANCEL_NOT_FINAL" }, "cancel those not final"));
  const description = h("input", { id: "job-description", autocomplete: "off" });
  const strict = h("input", { id: "job-strict", type: "checkbox" });

  const formErr = h("div", { class: "form-error", role: "alert", hidden: true });
  const dry = h("section", { class: "dry-run", "aria-live": "polite" });
  const checkButton = h("button", { type: "button", class: "secondary" }, "Count the targets (dry run)");
  const createButton = h("button", { type: "submit", disabled: true }, "Create the job");

  const fields = [
    fieldOf("Thing ids", thingIds, { help: "Separated by spaces, commas or lines.", field: "targets.thingIds" }),
    fieldOf("Thing type", thingType, { field: "targets.thingType" }),
    fieldOf("Attributes", attributes, { help: "key=value, separated by spaces; all must match.", field: "targets.attributes" }),
    fieldOf("Online only", onlineOnly, { field: "targets.onlineOnly" }),
    fieldOf("Exclude", exclude, { help: "Thing ids never to target.", field: "targets.exclude" }),
    fieldOf("Mode", mode, { field: "targets.mode" }),
    fieldOf("Action", action, { field: "action" }),
    fieldOf("TTL (seconds)", ttl, { help: "Empty: the type's default.", field: "ttl" }),
    fieldOf("Max per minute", maxPerMinute, { help: "0 or empty: no pacing.", field: "rollout.maxPerMinute" }),
    fieldOf("Max in flight", maxInFlight, { help: "Executions not final at once; 0 or empty: no bound.", field: "rollout.maxInFlight" }),
    fieldOf("Sequential per thing", sequential, { field: "rollout.sequentialPerThing" }),
    fieldOf("Ramp: base per minute", rampBase, { help: "Empty: no ramp.", field: "rollout.ramp.basePerMinute" }),
    fieldOf("Ramp: factor", rampFactor, { field: "rollout.ramp.factor" }),
    fieldOf("Ramp: one step every", rampEvery, { field: "rollout.ramp" }),
    fieldOf("Ramp: counted", rampOn),
    fieldOf("Canary: first targets", canaryCount, { help: "Empty: no canary.", field: "canary.count" }),
    fieldOf("Canary: success needed (%)", canaryPct, { field: "canary.successPct" }),
    fieldOf("Start at", startAt, { help: "Empty: now. Your local time.", field: "schedule.startAt" }),
    fieldOf("End at", endAt, { field: "schedule.endAt" }),
    fieldOf("At the end", endBehavior, { field: "schedule.endBehavior" }),
    fieldOf("Description", description, { field: "description" }),
    fieldOf("Strict (refuse the job if a target's type refuses it)", strict, { field: "strict" }),
  ];
  const byField = new Map(fields.map((f) => [f.dataset.field, f]));
  const [fIds, fType, fAttrs, fOnline, fExclude, fMode, fAction, fTtl, fMpm, fMif, fSeq, fRampBase, fRampFactor, fRampEvery, fRampOn, fCanary, fCanaryPct, fStart, fEnd, fEndB, fDesc, fStrict] = fields;
  fAction.append(actionNames);

  function commandsOf() {
    const t = types.find((x) => x.name === thingType.value);
    return t ? t.commands || {} : {};
  }

  function renderParams() {
    const def = commandsOf()[action.value.trim()];
    const schema = def ? def.paramsSchema : null;
    ttl.placeholder = def && def.defaultTtlSeconds ? String(def.defaultTtlSeconds) : "";
    form = formable(schema) ? schemaForm(schema) : null;
    const rawField = fieldOf("Params (JSON object)", raw, { help: schema ? "The whole params object; each target's type validates it." : "Any JSON object; each target's type validates it.", field: "params" });
    editor = rawJsonToggle(form, raw, rawField);
    const parts = [h("h3", {}, "Params")];
    if (def && def.description) parts.push(h("p", { class: "help" }, def.description));
    if (form) parts.push(editor.element, form.element);
    parts.push(rawField);
    replace(paramsSlot, parts);
    invalidate();
  }

  function renderActions() {
    replace(actionNames, Object.keys(commandsOf()).map((n) => h("option", { value: n })));
    const names = Object.keys(commandsOf());
    if (names.length && !names.includes(action.value.trim())) action.value = names[0];
    renderParams();
  }

  /** The create body from the form, or null when a field cannot be read (marked). */
  function spec() {
    const body = { action: action.value.trim(), targets: {}, rollout: {} };
    if (form && !editor.isRaw()) {
      const { value, errors } = form.collect();
      if (errors) return null;
      body.params = value;
    } else {
      try {
        body.params = JSON.parse(raw.value.trim() || "{}");
      } catch (err) {
        setError(byField.get("params"), `not valid JSON: ${err.message}`);
        return null;
      }
    }
    const t = body.targets;
    if (ids(thingIds.value).length) t.thingIds = ids(thingIds.value);
    if (thingType.value) t.thingType = thingType.value;
    const attrs = attributes.value.split(/\s+/).filter(Boolean);
    if (attrs.length) t.attributes = Object.fromEntries(attrs.map((a) => { const i = a.indexOf("="); return i < 0 ? [a, ""] : [a.slice(0, i), a.slice(i + 1)]; }));
    if (onlineOnly.checked) t.onlineOnly = true;
    if (ids(exclude.value).length) t.exclude = ids(exclude.value);
    t.mode = mode.value;
    if (ttl.value) body.ttl = Number(ttl.value);
    if (maxPerMinute.value) body.rollout.maxPerMinute = Number(maxPerMinute.value);
    if (maxInFlight.value) body.rollout.maxInFlight = Number(maxInFlight.value);
    if (sequential.checked) body.rollout.sequentialPerThing = true;
    if (rampBase.value) body.rollout.ramp = { basePerMinute: Number(rampBase.value), factor: Number(rampFactor.value || 2), [rampOn.value]: Number(rampEvery.value || 0) };
    if (canaryCount.value) body.canary = { count: Number(canaryCount.value), successPct: Number(canaryPct.value || 100) };
    if (abortRows.rows.length) body.abort = abortRows.rows.map((r) => r.value());
    if (retryRows.rows.length) body.retries = retryRows.rows.map((r) => r.value());
    if (startAt.value || endAt.value) body.schedule = { startAt: isoOf(startAt.value) || null, endAt: isoOf(endAt.value) || null, endBehavior: endBehavior.value };
    if (description.value.trim()) body.description = description.value.trim();
    if (strict.checked) body.strict = true;
    return body;
  }

  function setError(wrap, message) {
    if (!wrap) return false;
    const el = wrap.errorEl;
    el.textContent = message ? (el.textContent ? `${el.textContent}; ${message}` : message) : "";
    el.hidden = !message;
    if (message) wrap.control.setAttribute("aria-invalid", "true");
    else wrap.control.removeAttribute("aria-invalid");
    return true;
  }

  function clearErrors() {
    for (const f of [...fields, ...paramsSlot.querySelectorAll("[data-field]"), ...main.querySelectorAll("fieldset.row [data-field]")]) if (f.errorEl) setError(f, "");
    if (form) form.clearErrors();
    formErr.hidden = true;
    replace(formErr);
  }

  function showErrors(err) {
    const rest = [];
    const rowFields = new Map([...main.querySelectorAll("fieldset.row [data-field]")].map((f) => [f.dataset.field, f]));
    for (const d of err.details || []) {
      const f = d.field || "";
      if ((f === "params" || f.startsWith("params.") || f.startsWith("params[")) && form && !editor.isRaw()) {
        if (form.showErrors([d]).length) rest.push(d);
        continue;
      }
      // The field, else its nearest enclosing one the form has (targets.thingIds[2] on the thing ids).
      let target = null;
      for (let p = f; p && !target; p = p.replace(/(\[\d+\]|\.[^.[]*)$/, "")) target = byField.get(p) || rowFields.get(p) || (p === "params" ? paramsSlot.querySelector('[data-field="params"]') : null);
      if (!setError(target, d.description)) rest.push(d);
    }
    if (rest.length || !(err.details || []).length) {
      replace(formErr, h("p", {}, `Refused (${err.code || err.status}): ${err.message}`), rest.length ? h("ul", {}, rest.map((d) => h("li", {}, `${d.field}: ${d.description}`))) : null);
      formErr.hidden = false;
    }
    const invalid = main.querySelector("[aria-invalid=true]");
    if (invalid) invalid.focus();
  }

  function invalidate() {
    // The count was for another spec: count again before creating.
    if (checked !== null) {
      checked = null;
      createButton.disabled = true;
      replace(dry, h("p", { class: "muted" }, "The spec changed: count the targets again."));
    }
  }

  async function dryRun() {
    clearErrors();
    const body = spec();
    if (!body) return;
    checkButton.disabled = true;
    try {
      const { body: result } = await post("/jobs", { ...body, dryRun: true });
      checked = JSON.stringify(body);
      createButton.disabled = result.targetsTotal === 0;
      createButton.textContent = `Create the job for ${result.targetsTotal} thing${result.targetsTotal === 1 ? "" : "s"}`;
      replace(dry, h("p", { class: "dry-count", "data-targets": String(result.targetsTotal) }, h("strong", {}, String(result.targetsTotal)),
        ` target${result.targetsTotal === 1 ? "" : "s"} now`, result.targetsTotal === 0 ? ": nothing to create." : "."),
      result.sample.length ? h("p", { class: "muted" }, `First: ${result.sample.join(", ")}${result.targetsTotal > result.sample.length ? ", …" : ""}`) : null);
      announce(`Dry run: ${result.targetsTotal} targets.`);
    } catch (err) {
      if (err instanceof ApiError) showErrors(err);
      else announce(`Cannot count the targets: ${err.message}`, "error");
    } finally {
      checkButton.disabled = false;
    }
  }

  async function submit(ev) {
    ev.preventDefault();
    clearErrors();
    const body = spec();
    if (!body) return;
    if (JSON.stringify(body) !== checked) { invalidate(); return; }
    createButton.disabled = true;
    try {
      const { body: job } = await post("/jobs", body);
      announce(`Job ${job.jobId} created (${job.state}).`);
      ctx.navigate(`/jobs/${encodeURIComponent(job.jobId)}`);
    } catch (err) {
      createButton.disabled = false;
      if (err instanceof ApiError) showErrors(err);
      else announce(`Cannot create the job: ${err.message}`, "error");
    }
  }

  checkButton.addEventListener("click", dryRun);
  const root = h("form", { class: "job-create", novalidate: true, "aria-labelledby": "job-create-title" },
    h("fieldset", {}, h("legend", {}, "Targets (every one given must match)"), fIds, fType, fAttrs, fExclude, fOnline, fMode),
    h("fieldset", {}, h("legend", {}, "Command"), fAction, paramsSlot, fTtl),
    h("fieldset", {}, h("legend", {}, "Rollout"), fMpm, fMif, fSeq, h("div", { class: "inline-group" }, fRampBase, fRampFactor, fRampEvery, fRampOn),
      h("div", { class: "inline-group" }, fCanary, fCanaryPct)),
    abortRows.element,
    retryRows.element,
    h("fieldset", {}, h("legend", {}, "Schedule"), fStart, fEnd, fEndB),
    fDesc, fStrict,
    formErr,
    h("div", { class: "actions" }, checkButton, createButton),
    dry);
  root.addEventListener("submit", submit);
  root.addEventListener("input", (ev) => { if (ev.target !== thingType && ev.target !== action) invalidate(); });
  root.addEventListener("change", (ev) => { if (ev.target !== thingType && ev.target !== action) invalidate(); });
  // Buttons that add or remove rows change the spec too.
  root.addEventListener("click", (ev) => { if (ev.target instanceof HTMLButtonElement && ev.target.type === "button" && ev.target !== checkButton && !ev.target.getAttribute("aria-pressed")) invalidate(); });
  thingType.addEventListener("change", renderActions);
  action.addEventListener("change", renderParams);
  replace(main, h("h1", { id: "job-create-title" }, "Create a job"), root);
  renderParams();

  (async () => {
    let token = "";
    do {
      const { body } = await get(`/thing-types${query({ pageSize: 100, pageToken: token })}`, { signal: abort.signal });
      types.push(...body.thingTypes);
      token = body.nextPageToken;
    } while (token && types.length < 1000);
    for (const t of types) thingType.append(h("option", { value: t.name, selected: t.name === params.get("type") }, t.name));
    if (thingType.value) renderActions();
  })().catch((err) => {
    if (!abort.signal.aborted) announce(`Cannot list thing types: ${err.message}`, "error");
  });
  return () => abort.abort();
}
