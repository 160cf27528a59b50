// The console's entry point: sign-in, the navigation bar, and the hash router
// (#/commands?thing=...: every view's state is in the URL, so a view can be shared).

import { ApiError, get, session, setUnauthenticatedHandler } from "./api.js";
import { announce, h, replace } from "./dom.js";
import { commandsView } from "./commands.js";
import { detailView } from "./detail.js";
import { sendView } from "./send.js";
import { thingView, thingsView, typesView } from "./registry.js";
import { createJobView, jobView, jobsView } from "./jobs.js";

const ROUTES = [
  { pattern: /^\/commands$/, view: commandsView, title: "Commands" },
  { pattern: /^\/executions\/([^/]+)$/, view: detailView, title: "Execution" },
  { pattern: /^\/send$/, view: sendView, title: "Send a command", role: "operator" },
  { pattern: /^\/jobs$/, view: jobsView, title: "Jobs" },
  { pattern: /^\/jobs\/new$/, view: createJobView, title: "Create a job", role: "operator" },
  { pattern: /^\/jobs\/([^/]+)$/, view: jobView, title: "Job" },
  { pattern: /^\/things$/, view: thingsView, title: "Things" },
  { pattern: /^\/things\/([^/]+)$/, view: thingView, title: "Thing" },
  { pattern: /^\/types$/, view: typesView, title: "Thing types" },
];

const NAV = [
  { route: "/commands", text: "Commands" },
  { route: "/send", text: "Send", role: "operator" },
  { route: "/jobs", text: "Jobs" },
  { route: "/things", text: "Things" },
  { route: "/types", text: "Thing types" },
];

let cleanup = null;
let shownPath = null;

/** The current route: path and query of the hash (#/path?query). */
function current() {
  const hash = location.hash.startsWith("#/") ? location.hash.slice(1) : "/commands";
  const [path, search = ""] = hash.split("?", 2);
  return { path: path === "/" ? "/commands" : path, params: new URLSearchParams(search) };
}

/** Go to a route (a path with its query), adding a history entry. */
export function navigate(route) {
  location.hash = "#" + route;
}

function renderNav(path) {
  const nav = document.getElementById("nav");
  const items = NAV.filter((n) => !n.role || session.can(n.role)).map((n) =>
    h("a", { href: "#" + n.route, "aria-current": path.startsWith(n.route) || (n.route === "/commands" && path.startsWith("/executions")) ? "page" : null }, n.text));
  replace(nav, session.key ? items : []);
  const who = document.getElementById("who");
  if (session.key) {
    replace(who, h("span", { "data-role": session.role }, `${session.name || "key"} · ${session.role}`),
      h("button", { type: "button", class: "secondary", onclick: signOut }, "Sign out"));
  } else {
    replace(who);
  }
  document.body.dataset.role = session.role || "none";
}

function signOut() {
  session.clear();
  route();
  announce("Signed out.");
}

function signInView(main) {
  const input = h("input", { id: "apikey", type: "password", autocomplete: "off", spellcheck: "false", required: true, "aria-describedby": "apikey-help" });
  const error = h("p", { class: "field-error", role: "alert", hidden: true });
  const form = h("form", { class: "signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title", tabindex: "-1" }, "Sign in"),
    h("div", { class: "field" },
      h("label", { for: "apikey" }, "API key"),
      input,
      h("p", { id: "apikey-help", class: "help" }, "A key from ", h("code", {}, "fleetcmd apikey create"),
        ". It is kept in this browser tab only (session storage) and sent to this server only.")),
    error,
    h("button", { type: "submit" }, "Sign in"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.hidden = true;
    const key = input.value.trim();
    try {
      const who = await get("/whoami", { key });
      session.store(key, who.body.role, who.body.name || who.body.keyId);
      announce(`Signed in as ${who.body.name || who.body.keyId} (${who.body.role}).`);
      shownPath = null;
      route();
    } catch (err) {
      error.textContent = err instanceof ApiError && err.status === 401 ? "This key is not valid." : `Sign-in failed: ${err.message}`;
      error.hidden = false;
      input.focus();
    }
  });
  replace(main, form);
  input.focus();
}

function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const main = document.getElementById("main");
  const { path, params } = current();
  renderNav(path);
  if (!session.key) {
    shownPath = null;
    document.title = "Sign in · fleetcmd";
    signInView(main);
    return;
  }
  const found = ROUTES.map((r) => ({ r, m: path.match(r.pattern) })).find((x) => x.m);
  if (!found) {
    replace(main, h("h1", { tabindex: "-1" }, "Not found"), h("p", {}, "No such page. ", h("a", { href: "#/commands" }, "Go to the commands.")));
    return;
  }
  const { r, m } = found;
  document.title = `${r.title} · fleetcmd`;
  if (r.role && !session.can(r.role)) {
    replace(main, h("h1", { tabindex: "-1" }, r.title), h("p", {}, `This page needs the ${r.role} role; this key is ${session.role}.`));
    return;
  }
  const args = m.slice(1).map(decodeURIComponent);
  replace(main);
  cleanup = r.view(main, params, { navigate, args, path }) || null;
  if (shownPath !== path) {
    // A new page: move focus to its heading, so keyboard and screen-reader users start there.
    shownPath = path;
    const heading = main.querySelector("h1");
    if (heading) { heading.setAttribute("tabindex", "-1"); heading.focus({ preventScroll: true }); }
  }
}

setUnauthenticatedHandler(() => {
  session.clear();
  announce("The API key was refused: sign in again.", "error");
  route();
});

window.addEventListener("hashchange", () => {
  if (location.hash && !location.hash.startsWith("#/")) return; // an in-page anchor (the skip link)
  route();
});
route();
