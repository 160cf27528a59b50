// A form generated from a command's params JSON Schema (the Kaa "Command Form"):
// `const` shown fixed and read-only, `default` pre-filled, `enum` as a select, number and
// string inputs with their limits, `required` marked, `description` as help text. What the form
// cannot express (arrays, unions, $ref) is a JSON text field of its own; rawJsonToggle() switches
// between the form and the caller's raw-JSON editor for the whole value. The server validates; its violations are shown
// on the field their JSON path (`params.a.b[2]`) names.

import { h } from "./dom.js";

let serial = 0;

/** The first non-null type a schema names ("" when it names none). */
function typeOf(schema) {
  const t = schema.type;
  if (Array.isArray(t)) return t.find((x) => x !== "null") || "";
  return typeof t === "string" ? t : "";
}

function pathString(path) {
  return path.reduce((out, part) => out + (typeof part === "number" ? `[${part}]` : `.${part}`), "params");
}

function display(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** Whether a params schema can be rendered as a form (an object with properties). */
export function formable(schema) {
  return !!schema && typeof schema === "object" && (typeOf(schema) === "object" || schema.properties) &&
    !!schema.properties && typeof schema.properties === "object";
}

/**
 * Build the form of an object schema.
 * @param {object} schema the params schema (see formable())
 * @returns {{element: HTMLElement, collect: () => {value: object, errors: number}, showErrors: (details: Array) => Array, clearErrors: () => void}}
 */
export function schemaForm(schema) {
  const fields = []; // every leaf: {path, pathText, read(), error element, input}
  const element = objectFields(schema, [], fields);
  const clearErrors = () => {
    for (const f of fields) setError(f, "");
  };
  return {
    element,
    collect() {
      clearErrors();
      let errors = 0;
      const value = {};
      for (const f of fields) {
        const result = f.read();
        if (result.error) {
          setError(f, result.error);
          errors += 1;
        } else if (result.present) {
          put(value, f.path, result.value);
        }
      }
      return { value, errors };
    },
    showErrors(details) {
      const unmatched = [];
      const byPath = new Map(fields.map((f) => [f.pathText, f]));
      for (const d of details) {
        let target = null;
        // The field itself, else the nearest enclosing field the form has (a[2] inside a JSON field a).
        for (let p = d.field; p && !target; p = parent(p)) target = byPath.get(p) || null;
        if (target) setError(target, appendText(target.error.textContent, d.description));
        else unmatched.push(d);
      }
      const first = fields.find((f) => f.error.textContent);
      if (first) first.input.focus();
      return unmatched;
    },
    clearErrors,
  };
}

/**
 * The "Edit as raw JSON" switch between a schema form and a raw JSON field for the same params
 * (the Send page and the job create form). Switching to raw JSON fills the text with what the
 * form holds; switching back shows the form as it was (the text is not read back into it).
 * Without a form the raw field is the only editor and there is no switch.
 * @param {{element: HTMLElement, collect: () => {value: object}}|null} form the schema form, if any
 * @param {HTMLTextAreaElement} raw the raw JSON text
 * @param {HTMLElement} rawField what holds it, hidden while the form is in use
 * @returns {{element: HTMLButtonElement|null, isRaw: () => boolean}} the switch (null without a form) and which editor is in use
 */
export function rawJsonToggle(form, raw, rawField) {
  let useRaw = !form;
  rawField.hidden = !useRaw;
  if (!form) return { element: null, isRaw: () => true };
  // aria-pressed also tells the job form's click listener that this button does not change the spec.
  const element = h("button", { type: "button", class: "secondary", "aria-pressed": "false" }, "Edit as raw JSON");
  element.addEventListener("click", () => {
    if (!useRaw) raw.value = JSON.stringify(form.collect().value, null, 2);
    useRaw = !useRaw;
    element.setAttribute("aria-pressed", String(useRaw));
    element.textContent = useRaw ? "Use the form" : "Edit as raw JSON";
    form.element.hidden = useRaw;
    rawField.hidden = !useRaw;
  });
  return { element, isRaw: () => useRaw };
}

function parent(path) {
  const cut = Math.max(path.lastIndexOf("."), path.lastIndexOf("["));
  return cut > 0 ? path.slice(0, cut) : "";
}

function appendText(existing, more) {
  return existing ? `${existing}; ${more}` : more;
}

function put(target, path, value) {
  let node = target;
  for (let i = 0; i < path.length - 1; i++) {
    if (typeof node[path[i]] !== "object" || node[path[i]] === null) node[path[i]] = {};
    node = node[path[i]];
  }
  node[path[path.length - 1]] = value;
}

function setError(field, message) {
  field.error.textContent = message;
  field.error.hidden = !message;
  if (message) field.input.setAttribute("aria-invalid", "true");
  else field.input.removeAttribute("aria-invalid");
}

function objectFields(schema, path, fields) {
  const required = new Set(Array.isArray(schema.required) ? schema.required : []);
  const rows = [];
  for (const [name, sub] of Object.entries(schema.properties || {})) {
    const child = sub && typeof sub === "object" ? sub : {};
    const childPath = [...path, name];
    if (formable(child) && child.const === undefined && child.enum === undefined) {
      rows.push(h("fieldset", { class: "nested", "data-path": pathString(childPath) },
        h("legend", {}, name, required.has(name) ? requiredMark() : null),
        child.description ? h("p", { class: "help" }, child.description) : null,
        objectFields(child, childPath, fields)));
    } else {
      rows.push(leaf(name, child, childPath, required.has(name), fields));
    }
  }
  return h("div", { class: "schema-fields" }, rows);
}

function requiredMark() {
  return h("span", { class: "required" }, h("span", { "aria-hidden": "true" }, " *"), h("span", { class: "visually-hidden" }, " (required)"));
}

function leaf(name, schema, path, required, fields) {
  const id = `sf-${++serial}`;
  const helpId = `${id}-help`;
  const errorId = `${id}-error`;
  const type = typeOf(schema);
  const hasDefault = schema.default !== undefined;
  const describedBy = [schema.description ? helpId : null, errorId].filter(Boolean).join(" ");
  const common = { id, name: pathString(path), "data-path": pathString(path), "aria-describedby": describedBy, "aria-required": required ? "true" : null };
  let input;
  let read;
  const hint = [];

  if (schema.const !== undefined) {
    input = h("input", { ...common, type: "text", readonly: true, value: display(schema.const), class: "const" });
    hint.push("fixed by the type");
    read = () => ({ present: true, value: schema.const });
  } else if (Array.isArray(schema.enum)) {
    const options = [];
    if (!hasDefault) options.push(h("option", { value: "" }, required ? "— choose —" : "(not set)"));
    else if (!required) options.push(h("option", { value: "" }, "(not set)"));
    schema.enum.forEach((v, i) => options.push(h("option", { value: String(i), selected: hasDefault && JSON.stringify(v) === JSON.stringify(schema.default) }, display(v))));
    input = h("select", common, options);
    read = () => (input.value === "" ? { present: false } : { present: true, value: schema.enum[Number(input.value)] });
  } else if (type === "number" || type === "integer") {
    const attrs = { ...common, type: "number", step: type === "integer" ? "1" : "any", inputmode: type === "integer" ? "numeric" : "decimal" };
    if (typeof schema.minimum === "number") attrs.min = schema.minimum;
    if (typeof schema.maximum === "number") attrs.max = schema.maximum;
    if (hasDefault) attrs.value = String(schema.default);
    input = h("input", attrs);
    const limits = [];
    if (typeof schema.minimum === "number") limits.push(`≥ ${schema.minimum}`);
    if (typeof schema.exclusiveMinimum === "number") limits.push(`> ${schema.exclusiveMinimum}`);
    if (typeof schema.maximum === "number") limits.push(`≤ ${schema.maximum}`);
    if (typeof schema.exclusiveMaximum === "number") limits.push(`< ${schema.exclusiveMaximum}`);
    if (typeof schema.multipleOf === "number") limits.push(`multiple of ${schema.multipleOf}`);
    hint.push(type, ...limits);
    read = () => {
      const raw = input.value.trim();
      if (raw === "") return input.validity.badInput ? { error: "not a number" } : { present: false };
      const n = Number(raw);
      if (!Number.isFinite(n)) return { error: "not a number" };
      return { present: true, value: n };
    };
  } else if (type === "string") {
    const attrs = { ...common, type: "text" };
    if (Number.isInteger(schema.minLength)) attrs.minlength = schema.minLength;
    if (Number.isInteger(schema.maxLength)) attrs.maxlength = schema.maxLength;
    if (hasDefault) attrs.value = String(schema.default);
    input = h("input", attrs);
    const limits = [];
    if (Number.isInteger(schema.minLength)) limits.push(`at least ${schema.minLength} characters`);
    if (Number.isInteger(schema.maxLength)) limits.push(`at most ${schema.maxLength} characters`);
    if (typeof schema.pattern === "string") limits.push(`matches ${schema.pattern}`);
    hint.push("text", ...limits);
    // An empty optional string is left out; a required one is sent empty (the operator may mean "").
    read = () => (input.value === "" && !required ? { present: false } : { present: true, value: input.value });
  } else if (type === "boolean") {
    const options = [h("option", { value: "" }, required ? "— choose —" : "(not set)"),
      h("option", { value: "true", selected: schema.default === true }, "true"),
      h("option", { value: "false", selected: schema.default === false }, "false")];
    input = h("select", common, options);
    read = () => (input.value === "" ? { present: false } : { present: true, value: input.value === "true" });
  } else {
    input = h("textarea", { ...common, rows: "3", class: "json-input", spellcheck: "false" }, hasDefault ? JSON.stringify(schema.default) : "");
    hint.push(type ? `${type} as JSON` : "any JSON value");
    read = () => {
      const raw = input.value.trim();
      if (raw === "") return { present: false };
      try {
        return { present: true, value: JSON.parse(raw) };
      } catch (err) {
        return { error: `not valid JSON: ${err.message}` };
      }
    };
  }
  const error = h("p", { id: errorId, class: "field-error", role: "alert", hidden: true });
  fields.push({ path, pathText: pathString(path), read, error, input });
  return h("div", { class: "field", "data-field": pathString(path) },
    h("label", { for: id }, h("span", { class: "name" }, name), required ? requiredMark() : null,
      hint.length ? h("span", { class: "hint" }, ` (${hint.join(", ")})`) : null),
    input,
    schema.description ? h("p", { id: helpId, class: "help" }, schema.description) : null,
    error);
}
