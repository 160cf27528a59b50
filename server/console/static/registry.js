// The registry pages: things (type, attributes, online/offline, last seen; paginated by the
// server, filters in the URL), one thing (its details, its recent executions live, a send
// button) and the thing types (each command with its schemas, readable).

import { get, query, session } from "./api.js";
import { announce, dl, h, jsonBlock, link, presenceBadge, replace, time } from "./dom.js";
import { executionsTable } from "./commands.js";

const PAGE_SIZE = 50;

function attributes(attrs) {
  const entries = Object.entries(attrs || {});
  if (!entries.length) return h("span", { class: "muted" }, "—");
  return h("ul", { class: "attrs" }, entries.map(([k, v]) => h("li", {}, h("code", {}, `${k}=${v}`))));
}

/** #/things?type=&presence=&q=&attr=k=v&page= */
export function thingsView(main, params, ctx) {
  const f = { type: params.get("type") || "", presence: params.get("presence") || "", q: params.get("q") || "", attr: params.getAll("attr"), page: params.get("page") || "" };
  const abort = new AbortController();
  const q = h("input", { id: "t-q", type: "search", value: f.q, autocomplete: "off" });
  const type = h("input", { id: "t-type", value: f.type, autocomplete: "off" });
  const attr = h("input", { id: "t-attr", value: f.attr.join(" "), autocomplete: "off", "aria-describedby": "t-attr-help" });
  const presence = h("select", { id: "t-presence" }, [["", "any"], ["online", "online"], ["offline", "offline"]].map(([v, t]) =>
    h("option", { value: v, selected: v === f.presence }, t)));
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter things" },
    h("div", { class: "field" }, h("label", { for: "t-q" }, "Thing id starts with"), q),
    h("div", { class: "field" }, h("label", { for: "t-type" }, "Type"), type),
    h("div", { class: "field" }, h("label", { for: "t-attr" }, "Attributes"), attr, h("p", { id: "t-attr-help", class: "help" }, "key=value, separated by spaces")),
    h("div", { class: "field" }, h("label", { for: "t-presence" }, "Presence"), presence),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Apply filters")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    ctx.navigate("/things" + query({ q: q.value.trim(), type: type.value.trim(), presence: presence.value, attr: attr.value.split(/\s+/).filter(Boolean) }));
  });
  const tbody = h("tbody");
  const table = h("table", { class: "things", "aria-busy": "true" }, h("caption", {}, "Things"),
    h("thead", {}, h("tr", {}, ["Thing", "Type", "Attributes", "Presence", "Last seen", "Created at"].map((c) => h("th", { scope: "col" }, c)))), tbody);
  const empty = h("p", { class: "muted", hidden: true }, "No things match.");
  const older = h("button", { type: "button", class: "secondary", disabled: true }, "Next page →");
  const first = h("button", { type: "button", class: "secondary", disabled: !f.page, onclick: () => ctx.navigate("/things" + query({ ...f, page: "" })) }, "← First page");
  replace(main, h("h1", {}, "Things"), form, h("div", { class: "table-wrap" }, table, empty), h("nav", { class: "pager", "aria-label": "Pages" }, first, older));
  get(`/things${query({ q: f.q, thingType: f.type, presence: f.presence, attribute: f.attr, pageSize: PAGE_SIZE, pageToken: f.page })}`, { signal: abort.signal })
    .then(({ body }) => {
      replace(tbody, body.things.map((t) => h("tr", { "data-thing": t.thingId },
        h("td", {}, link(`/things/${encodeURIComponent(t.thingId)}`, t.thingId)),
        h("td", {}, t.thingType ? link(`/types?name=${encodeURIComponent(t.thingType)}`, t.thingType) : h("span", { class: "muted" }, "—")),
        h("td", {}, attributes(t.attributes)),
        h("td", {}, presenceBadge(t.online)),
        h("td", {}, time(t.lastSeen)),
        h("td", {}, time(t.createdAt)))));
      empty.hidden = body.things.length > 0;
      table.setAttribute("aria-busy", "false");
      if (body.nextPageToken) {
        older.disabled = false;
        older.onclick = () => ctx.navigate("/things" + query({ ...f, page: body.nextPageToken }));
      }
    })
    .catch((err) => {
      if (abort.signal.aborted) return;
      table.setAttribute("aria-busy", "false");
      announce(`Cannot list things: ${err.message}`, "error");
      empty.textContent = `Cannot list things: ${err.message}`;
      empty.hidden = false;
    });
  return () => abort.abort();
}

/** #/things/{id}: details, recent executions (live), a send button. */
export function thingView(main, params, ctx) {
  const id = ctx.args[0];
  const abort = new AbortController();
  const info = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const recent = executionsTable({ thingId: id }, { pageSize: 20, caption: "Recent executions" });
  replace(main, h("h1", {}, "Thing ", h("code", {}, id)),
    session.can("operator") ? h("p", {}, h("a", { class: "button", href: `#/send${query({ thing: id })}` }, "Send a command")) : null,
    info, h("section", { "aria-label": "Recent executions" }, recent.element,
      h("p", {}, link(`/commands${query({ thing: id })}`, "All executions of this thing"))));
  get(`/things/${encodeURIComponent(id)}`, { signal: abort.signal })
    .then(({ body: t }) => replace(info, dl([
      ["Presence", presenceBadge(t.online)],
      ["Type", t.thingType ? link(`/types?name=${encodeURIComponent(t.thingType)}`, t.thingType) : "—"],
      ["Attributes", attributes(t.attributes)],
      ["Last seen", time(t.lastSeen)],
      ["Connected at", time(t.connectedAt)],
      ["Remote address", t.remoteAddress || "—"],
      ["Created at", time(t.createdAt)],
      ["Credentials rotated at", time(t.credentialsRotatedAt)],
    ])))
    .catch((err) => {
      if (!abort.signal.aborted) replace(info, h("p", { class: "field-error" }, err.status === 404 ? "This thing is not registered." : `Cannot load it: ${err.message}`));
    });
  return () => { abort.abort(); recent.stop(); };
}

function schemaSummary(schema, anything) {
  if (!schema) return h("p", { class: "muted" }, `No schema: ${anything}.`);
  const props = schema.properties && typeof schema.properties === "object" ? Object.entries(schema.properties) : [];
  const required = new Set(Array.isArray(schema.required) ? schema.required : []);
  const constraint = (s) => {
    const out = [];
    if (s.const !== undefined) out.push(`fixed: ${JSON.stringify(s.const)}`);
    if (Array.isArray(s.enum)) out.push(`one of ${s.enum.map((v) => JSON.stringify(v)).join(", ")}`);
    for (const [k, w] of [["minimum", "≥"], ["exclusiveMinimum", ">"], ["maximum", "≤"], ["exclusiveMaximum", "<"]]) if (typeof s[k] === "number") out.push(`${w} ${s[k]}`);
    if (Number.isInteger(s.minLength)) out.push(`≥ ${s.minLength} chars`);
    if (Number.isInteger(s.maxLength)) out.push(`≤ ${s.maxLength} chars`);
    if (typeof s.pattern === "string") out.push(`pattern ${s.pattern}`);
    return out.join("; ");
  };
  return [
    props.length ? h("table", { class: "schema" },
      h("thead", {}, h("tr", {}, ["Field", "Type", "Required", "Default", "Constraints", "Description"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, props.map(([name, s]) => h("tr", {},
        h("th", { scope: "row" }, h("code", {}, name)),
        h("td", {}, Array.isArray(s.type) ? s.type.join(" | ") : s.type || (Array.isArray(s.enum) ? "enum" : "any")),
        h("td", {}, required.has(name) ? "yes" : "no"),
        h("td", {}, s.default !== undefined ? h("code", {}, JSON.stringify(s.default)) : ""),
        h("td", {}, constraint(s || {})),
        h("td", {}, s.description || ""))))) : null,
    h("details", {}, h("summary", {}, "JSON Schema"), jsonBlock(schema)),
  ];
}

/** #/types?name=: every type with its commands and schemas (the named one scrolled to). */
export function typesView(main, params) {
  const abort = new AbortController();
  const list = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  replace(main, h("h1", {}, "Thing types"), list);
  const wanted = params.get("name") || "";
  (async () => {
    const types = [];
    let token = "";
    do {
      const { body } = await get(`/thing-types${query({ pageSize: 100, pageToken: token })}`, { signal: abort.signal });
      types.push(...body.thingTypes);
      token = body.nextPageToken;
    } while (token && types.length < 1000);
    replace(list, types.length ? types.map((t) => h("section", { class: "type", id: `type-${t.name}`, "data-type": t.name, "aria-labelledby": `type-${t.name}-title` },
      h("h2", { id: `type-${t.name}-title` }, t.name),
      t.description ? h("p", {}, t.description) : null,
      h("p", { class: "muted" }, t.allowUndefinedActions ? "Allows actions it does not define." : "Only the actions below.",
        " ", link(`/things${query({ type: t.name })}`, "Things of this type")),
      Object.entries(t.commands || {}).map(([action, c]) => h("article", { class: "command", "data-action": action },
        h("h3", {}, h("code", {}, action)),
        c.description ? h("p", {}, c.description) : null,
        c.defaultTtlSeconds ? h("p", { class: "muted" }, `Default TTL ${c.defaultTtlSeconds} s`) : null,
        h("h4", {}, "Params"), schemaSummary(c.paramsSchema, "any JSON object"),
        h("h4", {}, "Result"), schemaSummary(c.resultSchema, "any JSON value"))))) : h("p", { class: "muted" }, "No thing types."));
    const target = wanted && document.getElementById(`type-${wanted}`);
    if (target) { target.classList.add("highlight"); target.scrollIntoView(); }
  })().catch((err) => {
    if (!abort.signal.aborted) replace(list, h("p", { class: "field-error" }, `Cannot list thing types: ${err.message}`));
  });
  return () => abort.abort();
}
