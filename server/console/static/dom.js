// Small DOM helpers: elements are built with createElement and textContent only (never parsed as HTML),
// so no value from the server or the URL is ever parsed as markup.

/**
 * Create an element.
 * @param {string} tag
 * @param {Object<string, any>} [attrs] attributes; "class", "text", "on<event>" and boolean values handled
 * @param {...(Node|string|null|undefined|false|Array)} children
 * @returns {HTMLElement}
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") el.textContent = String(value);
    else if (name === "class") el.className = value;
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace every child of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** A link inside the console (hash route). */
export function link(route, text, attrs = {}) {
  return h("a", { href: "#" + route, ...attrs }, text);
}

/** An RFC 3339 time as the operator's local time, with the exact UTC value as a tooltip. */
export function time(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  const d = new Date(iso);
  return h("time", { datetime: iso, title: iso }, formatTime(d));
}

/** YYYY-MM-DD HH:MM:SS.mmm in local time. */
export function formatTime(d) {
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

/** A status badge (the class gives it its colour; the word is always there, colour is never the only cue). */
export function statusBadge(status) {
  return h("span", { class: `badge status-${String(status).toLowerCase()}`, "data-status": status }, status);
}

/** Online/offline badge. */
export function presenceBadge(online) {
  return h("span", { class: `badge ${online ? "online" : "offline"}` }, online ? "online" : "offline");
}

/** Pretty JSON in a <pre>. */
export function jsonBlock(value, attrs = {}) {
  return h("pre", { class: "json", ...attrs }, value === undefined ? "" : JSON.stringify(value, null, 2));
}

/** A caption-less definition list from [term, value] pairs (value: node or text). */
export function dl(pairs, attrs = {}) {
  return h("dl", { class: "fields", ...attrs }, pairs.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

/** Announce a message to screen readers and show it in the status bar. */
export function announce(message, kind = "info") {
  const bar = document.getElementById("status");
  if (!bar) return;
  bar.className = `statusbar ${kind}`;
  bar.textContent = message;
}

/** The terminal statuses (an execution in one of them changes no more). */
export const FINAL = new Set(["SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED"]);
export const STATUSES = ["QUEUED", "SENT", "DELIVERED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED"];
