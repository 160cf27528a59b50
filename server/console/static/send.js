// Send a command: pick a thing (search by id prefix, online/offline shown), then an action
// from its type; a params schema gives a generated form (raw JSON as a fallback, and the only
// editor when there is no schema); TTL; optional wait for the result. The server's violations
// are shown on the field their path names (params.x on the form's field x).

import { ApiError, get, post, query } from "./api.js";
import { announce, h, jsonBlock, link, presenceBadge, replace, statusBadge } from "./dom.js";
import { formable, rawJsonToggle, schemaForm } from "./schemaform.js";

const MAX_SUGGESTIONS = 20;

export function sendView(main, params, ctx) {
  const abort = new AbortController();
  const fieldError = (id) => h("p", { id, class: "field-error", role: "alert", hidden: true });

  // ---- thing ----
  const thingInput = h("input", { id: "send-thing", type: "search", autocomplete: "off", value: params.get("thing") || "",
    "aria-describedby": "send-thing-help send-thing-error", "aria-controls": "send-thing-list", "aria-required": "true" });
  const thingList = h("ul", { id: "send-thing-list", class: "suggestions", "aria-label": "Matching things" });
  const thingInfo = h("p", { class: "thing-info", "aria-live": "polite" });
  const thingErr = fieldError("send-thing-error");

  // ---- action, params, ttl, wait ----
  const actionSlot = h("div", { class: "field" });
  const actionErr = fieldError("send-action-error");
  const actionHelp = h("p", { id: "send-action-help", class: "help" });
  const paramsSlot = h("div", { class: "params" });
  const ttl = h("input", { id: "send-ttl", type: "number", min: "1", step: "1", inputmode: "numeric", "aria-describedby": "send-ttl-help send-ttl-error" });
  const ttlHelp = h("p", { id: "send-ttl-help", class: "help" }, "Seconds the command may wait for the device; empty: the type's default, else the server's.");
  const ttlErr = fieldError("send-ttl-error");
  const wait = h("input", { id: "send-wait", type: "checkbox" });
  const waitSeconds = h("input", { id: "send-wait-seconds", type: "number", min: "1", max: "60", step: "1", value: "10" });
  const formErr = h("div", { class: "form-error", role: "alert", hidden: true });
  const outcome = h("section", { class: "outcome", "aria-live": "polite" });

  let thing = null; // the chosen thing
  let commands = {}; // its type's commands
  let actionControl = null;
  let form = null; // the schema form of the chosen action, if any
  let raw = null; // the raw JSON textarea
  let editor = null; // which of the two is in use (rawJsonToggle)

  function setErr(el, message, input) {
    el.textContent = message || "";
    el.hidden = !message;
    if (input) {
      if (message) input.setAttribute("aria-invalid", "true");
      else input.removeAttribute("aria-invalid");
    }
  }

  let searchSeq = 0;
  async function search() {
    const seq = ++searchSeq;
    const prefix = thingInput.value.trim();
    try {
      const { body } = await get(`/things${query({ q: prefix, pageSize: MAX_SUGGESTIONS })}`, { signal: abort.signal });
      if (seq !== searchSeq) return;
      replace(thingList, body.things.map((t) => h("li", {},
        h("button", { type: "button", class: "suggestion", "data-thing": t.thingId, onclick: () => choose(t) },
          h("span", { class: "name" }, t.thingId), " ", presenceBadge(t.online), t.thingType ? h("span", { class: "muted" }, ` ${t.thingType}`) : null))));
      if (!body.things.length) replace(thingList, h("li", { class: "muted" }, "No registered thing has this prefix (you can still send to it)."));
    } catch (err) {
      if (!abort.signal.aborted) replace(thingList, h("li", { class: "field-error" }, `Cannot search: ${err.message}`));
    }
  }

  async function choose(t) {
    // A search still under way would list suggestions again under the chosen thing.
    clearTimeout(timer);
    searchSeq += 1;
    thing = t;
    thingInput.value = t.thingId;
    replace(thingList);
    commands = {};
    let allowUndefined = true;
    if (t.thingType) {
      try {
        const { body } = await get(`/thing-types/${encodeURIComponent(t.thingType)}`, { signal: abort.signal });
        commands = body.commands || {};
        allowUndefined = !!body.allowUndefinedActions || Object.keys(commands).length === 0;
      } catch (err) {
        announce(`Cannot read the type ${t.thingType}: ${err.message}`, "error");
      }
    }
    // Said once the type is in: the action field below is the type's from here on.
    replace(thingInfo, link(`/things/${encodeURIComponent(t.thingId)}`, t.thingId), " ", presenceBadge(t.online),
      t.thingType ? [" · type ", link(`/types?name=${encodeURIComponent(t.thingType)}`, t.thingType)] : " · no type: any action");
    renderAction(allowUndefined);
  }

  async function chooseById(id) {
    try {
      const { body } = await get(`/things/${encodeURIComponent(id)}`, { signal: abort.signal });
      await choose(body);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        // Not registered (development mode admits it): any action, no schema.
        thing = { thingId: id, thingType: "", online: false };
        replace(thingInfo, `${id} is not registered: any action, no schema.`);
        commands = {};
        renderAction(true);
      }
    }
  }

  function renderAction(free) {
    const names = Object.keys(commands);
    if (names.length && !free) {
      actionControl = h("select", { id: "send-action", "aria-describedby": "send-action-help send-action-error", "aria-required": "true" },
        h("option", { value: "" }, "— choose —"), names.map((n) => h("option", { value: n }, n)));
      actionHelp.textContent = "The actions of the thing's type.";
    } else {
      actionControl = h("input", { id: "send-action", list: "send-action-names", autocomplete: "off", "aria-describedby": "send-action-help send-action-error", "aria-required": "true" });
      actionHelp.textContent = names.length ? "The type's actions are suggested; it allows others too." : "Any action (the thing's type defines none).";
    }
    actionControl.addEventListener("change", renderParams);
    replace(actionSlot, h("label", { for: "send-action" }, "Action", h("span", { class: "required" }, h("span", { "aria-hidden": "true" }, " *"), h("span", { class: "visually-hidden" }, " (required)"))),
      actionControl, h("datalist", { id: "send-action-names" }, names.map((n) => h("option", { value: n }))), actionHelp, actionErr);
    renderParams();
  }

  function renderParams() {
    const action = actionControl ? actionControl.value : "";
    const def = commands[action];
    const schema = def ? def.paramsSchema : null;
    ttl.placeholder = def && def.defaultTtlSeconds ? String(def.defaultTtlSeconds) : "";
    form = formable(schema) ? schemaForm(schema) : null;
    raw = h("textarea", { id: "send-params-raw", rows: "6", class: "json-input", spellcheck: "false", "aria-describedby": "send-params-raw-help send-params-raw-error" }, "{}");
    const rawErr = fieldError("send-params-raw-error");
    const rawField = h("div", { class: "field" },
      h("label", { for: "send-params-raw" }, "Params (JSON object)"), raw,
      h("p", { id: "send-params-raw-help", class: "help" }, schema ? "The whole params object; the server validates it against the schema." : "No params schema: any JSON object."),
      rawErr);
    raw.errorEl = rawErr;
    editor = rawJsonToggle(form, raw, rawField);
    const parts = [h("h2", {}, "Params")];
    if (def && def.description) parts.push(h("p", { class: "help" }, def.description));
    if (form) parts.push(editor.element, form.element);
    parts.push(rawField);
    replace(paramsSlot, parts);
  }

  function clearErrors() {
    setErr(thingErr, "", thingInput);
    setErr(actionErr, "", actionControl);
    setErr(ttlErr, "", ttl);
    if (raw) setErr(raw.errorEl, "", raw);
    if (form) form.clearErrors();
    formErr.hidden = true;
    replace(formErr);
  }

  function showErrors(details, message) {
    const rest = [];
    for (const d of details) {
      const f = d.field || "";
      if (f === "thingId") setErr(thingErr, d.description, thingInput);
      else if (f === "action") setErr(actionErr, d.description, actionControl);
      else if (f === "ttl") setErr(ttlErr, d.description, ttl);
      else if (f === "params" || f.startsWith("params.") || f.startsWith("params[")) {
        if (form && !editor.isRaw()) {
          const unmatched = form.showErrors([d]);
          if (unmatched.length) rest.push(d);
        } else if (raw) setErr(raw.errorEl, [raw.errorEl.textContent, `${f}: ${d.description}`].filter(Boolean).join("; "), raw);
      } else rest.push(d);
    }
    if (rest.length || !details.length) {
      replace(formErr, h("p", {}, message), rest.length ? h("ul", {}, rest.map((d) => h("li", {}, `${d.field}: ${d.description}`))) : null);
      formErr.hidden = false;
    }
  }

  async function submit(ev) {
    ev.preventDefault();
    clearErrors();
    const body = { thingId: thingInput.value.trim(), action: actionControl ? actionControl.value.trim() : "" };
    if (form && !editor.isRaw()) {
      const { value, errors } = form.collect();
      if (errors) { announce("Some params are not valid: see the marked fields.", "error"); return; }
      body.params = value;
    } else if (raw) {
      try {
        body.params = JSON.parse(raw.value.trim() || "{}");
      } catch (err) {
        setErr(raw.errorEl, `not valid JSON: ${err.message}`, raw);
        raw.focus();
        return;
      }
    }
    if (ttl.value.trim()) body.ttl = Number(ttl.value);
    if (wait.checked) body.waitSeconds = Number(waitSeconds.value);
    submitButton.disabled = true;
    replace(outcome);
    try {
      const { status, body: exec } = await post("/commands", body);
      const id = exec.executionId;
      announce(`Sent: execution ${id} is ${exec.status}.`);
      replace(outcome, h("h2", {}, "Sent"),
        h("p", { "data-execution": id }, "Execution ", link(`/executions/${encodeURIComponent(id)}`, id), " is ", statusBadge(exec.status),
          status === 202 && wait.checked ? " (not final within the wait)" : ""),
        exec.result !== null && exec.result !== undefined ? [h("h3", {}, "Result"), jsonBlock(exec.result)] : null);
    } catch (err) {
      if (err instanceof ApiError) {
        showErrors(err.details, `Refused (${err.code || err.status}): ${err.message}`);
        announce("The server refused the command: see the marked fields.", "error");
        const invalid = main.querySelector("[aria-invalid=true]");
        if (invalid) invalid.focus();
      } else {
        showErrors([], `Cannot send: ${err.message}`);
      }
    } finally {
      submitButton.disabled = false;
    }
  }

  const submitButton = h("button", { type: "submit" }, "Send");
  const root = h("form", { class: "send", novalidate: true, "aria-labelledby": "send-title" },
    h("div", { class: "field" },
      h("label", { for: "send-thing" }, "Thing", h("span", { class: "required" }, h("span", { "aria-hidden": "true" }, " *"), h("span", { class: "visually-hidden" }, " (required)"))),
      thingInput,
      h("p", { id: "send-thing-help", class: "help" }, "Type the start of a thing id, then pick it."),
      thingErr, thingList, thingInfo),
    actionSlot,
    paramsSlot,
    h("div", { class: "field" }, h("label", { for: "send-ttl" }, "TTL (seconds)"), ttl, ttlHelp, ttlErr),
    h("div", { class: "field inline" }, wait, h("label", { for: "send-wait" }, " Wait for the result, up to "), waitSeconds,
      h("label", { for: "send-wait-seconds", class: "visually-hidden" }, "seconds to wait"), " s"),
    formErr,
    h("div", { class: "actions" }, submitButton));
  root.addEventListener("submit", submit);
  let timer = 0;
  thingInput.addEventListener("input", () => {
    if (thing && thingInput.value.trim() !== thing.thingId) {
      // Another thing: its type (and so its actions and form) is not known until it is picked.
      thing = null;
      commands = {};
      replace(thingInfo);
      renderAction(true);
    }
    clearTimeout(timer);
    timer = setTimeout(search, 150);
  });
  thingInput.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") {
      ev.preventDefault();
      const id = thingInput.value.trim();
      if (id) chooseById(id);
    } else if (ev.key === "ArrowDown") {
      const first = thingList.querySelector("button");
      if (first) { ev.preventDefault(); first.focus(); }
    }
  });
  replace(main, h("h1", { id: "send-title" }, "Send a command"), root, outcome);
  renderAction(true);
  if (params.get("thing")) chooseById(params.get("thing"));
  else search();
  return () => { abort.abort(); clearTimeout(timer); };
}
