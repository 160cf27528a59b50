// An execution: params as sent, result, reason code and reason, result-schema violations, the
// full history with timestamps (late reports marked), links to the thing and to re-runs;
// Cancel and Re-run for operators. It follows the execution's events and shows each change.

import { ApiError, followEvents, get, post, session } from "./api.js";
import { FINAL, announce, dl, h, jsonBlock, link, replace, statusBadge, time } from "./dom.js";

/** The history with its start: the creation (QUEUED at createdAt) when the stored history begins after it. */
function historyOf(e) {
  const history = e.history || [];
  if (history.some((c) => c.status === "QUEUED" && !c.previousStatus)) return history;
  return [{ sequence: "—", at: e.createdAt, status: "QUEUED", previousStatus: null, late: false, result: null, statusReason: null, note: "created" }, ...history];
}

export function detailView(main, params, ctx) {
  const id = ctx.args[0];
  const abort = new AbortController();
  const body = h("div", { class: "detail" }, h("p", { class: "muted" }, "Loading…"));
  replace(main, h("h1", {}, "Execution ", h("code", {}, id)), body);
  let frame = 0;
  let loading = false;
  let again = false;

  async function load() {
    if (loading) { again = true; return; }
    loading = true;
    try {
      const { body: exec } = await get(`/commands/${encodeURIComponent(id)}`, { signal: abort.signal });
      render(exec);
    } catch (err) {
      if (abort.signal.aborted) return;
      replace(body, h("p", { class: "field-error" }, err instanceof ApiError && err.status === 404 ? "No such execution." : `Cannot load it: ${err.message}`));
    } finally {
      loading = false;
      if (again && !abort.signal.aborted) { again = false; load(); }
    }
  }

  function render(e) {
    const reason = e.statusReason || {};
    const actions = [];
    if (session.can("operator")) {
      if (!FINAL.has(e.status)) actions.push(h("button", { type: "button", class: "danger", onclick: () => act("cancel") }, "Cancel"));
      actions.push(h("button", { type: "button", onclick: () => act("rerun") }, "Re-run"));
    }
    const history = h("table", { class: "history" },
      h("caption", {}, "History"),
      h("thead", {}, h("tr", {}, ["#", "At", "Status", "From", "Reason code", "Reason", "Result", "Note"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, historyOf(e).map((c) => h("tr", { "data-status": c.status, class: c.late ? "late" : null },
        h("td", {}, String(c.sequence)),
        h("td", {}, time(c.at)),
        h("td", {}, statusBadge(c.status), c.late ? h("span", { class: "badge late" }, "late") : null),
        h("td", {}, c.previousStatus || ""),
        h("td", {}, c.statusReason ? c.statusReason.reasonCode : ""),
        h("td", {}, c.statusReason ? c.statusReason.reasonDescription : ""),
        h("td", {}, c.result === null || c.result === undefined ? "" : h("code", {}, JSON.stringify(c.result))),
        h("td", {}, c.note || "")))));
    const violations = e.resultViolations && e.resultViolations.length
      ? h("section", { "aria-labelledby": "violations-title" }, h("h2", { id: "violations-title" }, "Result schema violations"),
        h("ul", { class: "violations" }, e.resultViolations.map((v) => h("li", {}, typeof v === "string" ? v : JSON.stringify(v)))))
      : null;
    replace(body,
      actions.length ? h("div", { class: "actions" }, actions) : null,
      dl([
        ["Status", statusBadge(e.status)],
        ["Thing", link(`/things/${encodeURIComponent(e.thingId)}`, e.thingId)],
        ["Thing type", e.thingType ? link(`/types?name=${encodeURIComponent(e.thingType)}`, e.thingType) : "—"],
        ["Action", e.action],
        ["Reason code", reason.reasonCode || "—"],
        ["Reason", reason.reasonDescription || "—"],
        ["Created at", time(e.createdAt)],
        ["Updated at", time(e.updatedAt)],
        ["Completed at", time(e.completedAt)],
        ["Expires at", time(e.expiresAt)],
        ["TTL", `${e.ttl} s`],
        ["Command ID", h("code", {}, e.commandId)],
        ["Idempotency key", e.idempotencyKey || "—"],
        ["Re-run of", e.rerunOf ? link(`/executions/${encodeURIComponent(e.rerunOf)}`, e.rerunOf) : "—"],
        ["Re-runs", e.reruns && e.reruns.length ? h("ul", { class: "plain" }, e.reruns.map((r) => h("li", {}, link(`/executions/${encodeURIComponent(r)}`, r)))) : "—"],
      ], { "data-execution": e.executionId, "data-status": e.status }),
      h("section", { "aria-labelledby": "params-title" }, h("h2", { id: "params-title" }, "Params (as sent)"), jsonBlock(e.params, { "data-json": "params" })),
      h("section", { "aria-labelledby": "result-title" }, h("h2", { id: "result-title" }, "Result"),
        e.result === null || e.result === undefined ? h("p", { class: "muted" }, "No result yet.") : jsonBlock(e.result, { "data-json": "result" })),
      violations,
      history);
  }

  async function act(what) {
    try {
      const { body: exec } = await post(`/commands/${encodeURIComponent(id)}/${what}`, {});
      if (what === "rerun") {
        announce(`Re-run sent: execution ${exec.executionId} (${exec.status}).`);
        ctx.navigate(`/executions/${encodeURIComponent(exec.executionId)}`);
      } else {
        announce(`Execution ${id} canceled.`);
        render((await get(`/commands/${encodeURIComponent(id)}`)).body);
      }
    } catch (err) {
      announce(`${what === "rerun" ? "Re-run" : "Cancel"} refused: ${err.message}`, "error");
    }
  }

  // Follow this execution's events; each batch of them reloads it once (its history has them all).
  followEvents({ executionId: id }, () => {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; load(); });
  }, () => load(), abort.signal);
  return () => {
    abort.abort();
    if (frame) cancelAnimationFrame(frame);
  };
}
