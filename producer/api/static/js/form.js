// A form built from a list of field descriptors, so each kind of job (generate today,
// train later) is a list of fields and a submit function:
//
//   { name, label, type: "text" | "textarea" | "number" | "select" | "checkbox" | "file",
//     required, min, max, step, placeholder, hint, options: [{value, label}], accept, wide,
//     errorsOf: ["control.0.image"] }
//
// A file field's value is its File (the kind's submit turns it into a data: URI).
//
// ``name`` is the request's field name: a refusal's ``fields[].field`` ("width",
// "loras.0.name") is shown under the field that names it in ``errorsOf``, else under the
// field of its first part, and the field is marked aria-invalid and described by the
// message.

let uid = 0;

function element(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children);
  return node;
}

export { element };

export class SchemaForm {
  /**
   * @param {HTMLFormElement} form  an empty <form>; the fields and a submit button go in
   * @param {object[]} fields       the descriptors
   * @param {{submitLabel: string, onSubmit: (values) => Promise<void>}} options
   */
  constructor(form, fields, { submitLabel, onSubmit, onChange }) {
    this.form = form;
    this.fields = new Map();
    this.errorsOf = new Map(); // a refusal's field path -> the form field showing it
    this.onChange = onChange;
    form.noValidate = true; // the API is the judge: its refusals name the field
    const grid = element("div", { class: "fields" });
    for (const spec of fields) grid.append(this.#build(spec));
    this.formError = element("p", { class: "form-error", role: "alert", tabindex: "-1", hidden: true });
    this.button = element("button", { type: "submit", class: "primary", text: submitLabel });
    form.append(grid, this.formError, element("div", { class: "actions" }, this.button));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      this.clearErrors();
      this.button.disabled = true;
      try {
        await onSubmit(this.values());
      } finally {
        this.button.disabled = false;
      }
    });
  }

  #build(spec) {
    const id = `f${++uid}-${spec.name}`;
    const input = this.#input(spec, id);
    const error = element("p", { class: "field-error", id: `${id}-error`, hidden: true });
    const hint = spec.hint ? element("p", { class: "hint", id: `${id}-hint`, text: spec.hint }) : "";
    if (spec.hint) input.setAttribute("aria-describedby", `${id}-hint`);
    const label = element("label", { for: id, text: spec.label });
    const wrap = element("div", { class: `field field-${spec.type}${spec.wide ? " wide" : ""}` });
    if (spec.type === "checkbox") wrap.append(input, label, hint, error);
    else wrap.append(label, input, hint, error);
    wrap.dataset.field = spec.name;
    input.addEventListener("change", () => this.onChange?.(spec.name, this));
    this.fields.set(spec.name, { spec, input, error, wrap, hintId: spec.hint ? `${id}-hint` : "" });
    for (const path of spec.errorsOf || []) this.errorsOf.set(path, spec.name);
    return wrap;
  }

  #input(spec, id) {
    const common = { id, name: spec.name, required: spec.required };
    if (spec.type === "textarea") {
      return element("textarea", { ...common, rows: spec.rows || 3, placeholder: spec.placeholder });
    }
    if (spec.type === "select") {
      const select = element("select", common);
      this.#setOptions(select, spec.options || []);
      return select;
    }
    if (spec.type === "checkbox") {
      return element("input", { ...common, type: "checkbox", checked: spec.checked });
    }
    return element("input", {
      ...common, type: spec.type, min: spec.min, max: spec.max, step: spec.step, accept: spec.accept,
      placeholder: spec.placeholder, inputmode: spec.type === "number" ? "numeric" : undefined,
    });
  }

  #setOptions(select, options) {
    select.replaceChildren(...options.map((o) => element("option", { value: o.value, text: o.label ?? o.value })));
  }

  /** The request: numbers as numbers, files as Files; empty, unchecked and disabled
   * fields left out. */
  values() {
    const out = {};
    for (const [name, { spec, input }] of this.fields) {
      if (input.disabled) continue;
      if (spec.type === "file") {
        if (input.files?.length) out[name] = input.files[0];
        continue;
      }
      if (spec.type === "checkbox") {
        if (input.checked) out[name] = true; // unchecked: left out, as a browser does
        continue;
      }
      const raw = input.value.trim();
      if (raw === "") continue;
      out[name] = spec.type === "number" && raw !== "" && !Number.isNaN(Number(raw)) ? Number(raw) : raw;
    }
    return out;
  }

  /** Fill the fields named in ``values`` (the others keep theirs; a file field keeps its
   * file: a page cannot choose one). */
  setValues(values) {
    for (const [name, value] of Object.entries(values)) {
      const field = this.fields.get(name);
      if (!field || value === undefined || value === null || field.spec.type === "file") continue;
      if (field.spec.type === "checkbox") field.input.checked = Boolean(value);
      else field.input.value = String(value);
    }
  }

  /** Change a field: {disabled, hidden, min, max, step, placeholder, options, value}. */
  update(name, changes) {
    const field = this.fields.get(name);
    if (!field) return;
    const { input, wrap } = field;
    if ("options" in changes) this.#setOptions(input, changes.options);
    for (const attr of ["min", "max", "step", "placeholder"]) {
      if (attr in changes) input.setAttribute(attr, changes[attr]);
    }
    if ("disabled" in changes) {
      input.disabled = changes.disabled;
      wrap.classList.toggle("is-disabled", changes.disabled);
    }
    if ("hidden" in changes) wrap.hidden = changes.hidden;
    if ("value" in changes) input.value = changes.value;
  }

  input(name) {
    return this.fields.get(name)?.input;
  }

  clearErrors() {
    this.formError.hidden = true;
    for (const { input, error, hintId } of this.fields.values()) {
      error.hidden = true;
      error.textContent = "";
      input.removeAttribute("aria-invalid");
      if (hintId) input.setAttribute("aria-describedby", hintId);
      else input.removeAttribute("aria-describedby");
    }
  }

  /** Show an ApiError: each named field's message under it, the rest above the button;
   * focus moves to the first field refused. */
  showError(error) {
    const loose = [];
    let first = null;
    for (const { field, message } of error.fields || []) {
      const target = this.fields.get(this.errorsOf.get(field) ?? String(field).split(".")[0]);
      if (!target || target.wrap.hidden) {
        loose.push(`${field}: ${message}`);
        continue;
      }
      target.error.hidden = false;
      target.error.textContent = target.error.textContent ? `${target.error.textContent}; ${message}` : message;
      target.input.setAttribute("aria-invalid", "true");
      target.input.setAttribute("aria-describedby", [target.error.id, target.hintId].filter(Boolean).join(" "));
      first ??= target.input;
    }
    if (loose.length || !first) {
      this.formError.textContent = [error.message, ...loose].join(" — ");
      this.formError.hidden = false;
    }
    (first || this.formError).focus?.();
  }
}
