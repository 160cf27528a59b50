// The REST API client. The API key lives in this tab's sessionStorage only: never in a cookie,
// never in a URL (the event stream is read with fetch() so the key goes in a header, which
// EventSource cannot do).

const KEY = "fleetcmd.apiKey";
const ROLE = "fleetcmd.role";
const NAME = "fleetcmd.keyName";
const ROLES = { viewer: 1, operator: 2, admin: 3 };

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get role() { return sessionStorage.getItem(ROLE) || ""; },
  get name() { return sessionStorage.getItem(NAME) || ""; },
  /** Whether the signed-in key has at least `role`. */
  can(role) { return (ROLES[this.role] || 0) >= ROLES[role]; },
  store(key, role, name) { sessionStorage.setItem(KEY, key); sessionStorage.setItem(ROLE, role); sessionStorage.setItem(NAME, name); },
  clear() { for (const item of [KEY, ROLE, NAME]) sessionStorage.removeItem(item); },
};

/** A refused request: the REST error body ({code, message, details: [{field, description}]}). */
export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code ? body.code : "";
    this.details = body && Array.isArray(body.details) ? body.details : [];
  }
}

/** Called when the key is refused (401): the app signs out. */
let onUnauthenticated = () => {};
export function setUnauthenticatedHandler(fn) { onUnauthenticated = fn; }

function headers(extra = {}, key = session.key) {
  const out = { Accept: "application/json", ...extra };
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

/**
 * Call the REST API.
 * @param {string} method
 * @param {string} path under /api/v1 (with its query string)
 * @param {any} [body] sent as JSON
 * @param {{key?: string, signal?: AbortSignal}} [opts]
 * @returns {Promise<{status: number, body: any, headers: Headers}>}
 */
export async function call(method, path, body, opts = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }, opts.key ?? session.key),
    signal: opts.signal, cache: "no-store", credentials: "omit" };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(`/api/v1${path}`, init);
  const text = await resp.text();
  let parsed = null;
  if (text) {
    try { parsed = JSON.parse(text); } catch { parsed = { message: text }; }
  }
  if (!resp.ok) {
    if (resp.status === 401 && opts.key === undefined) onUnauthenticated();
    throw new ApiError(resp.status, parsed);
  }
  return { status: resp.status, body: parsed, headers: resp.headers };
}

export const get = (path, opts) => call("GET", path, undefined, opts);
export const post = (path, body, opts) => call("POST", path, body, opts);

/** A query string from an object (empty values left out; arrays repeated). */
export function query(params) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (Array.isArray(value)) value.forEach((v) => q.append(name, v));
    else if (value !== undefined && value !== null && value !== "") q.set(name, value);
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

/**
 * Follow GET /api/v1/events (Server-Sent Events) until `signal` aborts: `onEvents` gets each chunk's
 * parsed events at once (the caller batches its rendering). On a dropped connection it reconnects
 * with Last-Event-ID = the last sequence seen, so it misses nothing and sees nothing twice.
 * @param {Object<string,string>} filters thingId, action, executionId
 * @param {(events: Array<{seq: number, execution: any, change: any}>) => void} onEvents
 * @param {(state: string) => void} onState "live", "reconnecting", "error: ..."
 * @param {AbortSignal} signal
 * @param {(jobs: Array<any>) => void} [onJobs] gets the job snapshots of `event: job` (the jobs pages)
 */
export async function followEvents(filters, onEvents, onState, signal, onJobs) {
  let last = null;
  let delay = 500;
  while (!signal.aborted) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (last !== null) extra["Last-Event-ID"] = String(last);
      const resp = await fetch(`/api/v1/events${query(filters)}`, { headers: headers(extra), signal, cache: "no-store", credentials: "omit" });
      if (resp.status === 401) { onUnauthenticated(); return; }
      if (!resp.ok) {
        const body = await resp.json().catch(() => null);
        throw new ApiError(resp.status, body);
      }
      onState("live");
      delay = 500;
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const blocks = buffer.split("\n\n");
        buffer = blocks.pop();
        const events = [];
        const jobs = [];
        for (const block of blocks) {
          const parsed = parseBlock(block);
          if (parsed === null) continue;
          if (parsed.event === "error") throw new ApiError(0, JSON.parse(parsed.data));
          if (parsed.id !== null) last = parsed.id;
          if (parsed.event === "execution" && parsed.data) events.push(JSON.parse(parsed.data));
          else if (parsed.event === "job" && parsed.data && onJobs) jobs.push(JSON.parse(parsed.data).job);
        }
        if (events.length) onEvents(events);
        if (jobs.length) onJobs(jobs);
      }
    } catch (err) {
      if (signal.aborted) return;
      onState(`reconnecting (${err.message || err})`);
      // A resume point that retention deleted cannot be resumed: start live again.
      if (err instanceof ApiError && err.code === "FAILED_PRECONDITION") last = null;
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

function parseBlock(block) {
  let id = null, event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (id === null && data.length === 0) return null;
  return { id, event, data: data.join("\n") };
}
