// The studio page: the key, the forms (one tab each), the job being watched, the gallery.

import { ApiError, call, forgetKey, getKey, setKey } from "./api.js";
import { element, SchemaForm } from "./form.js";
import { Gallery } from "./gallery.js";
import { generate } from "./generate.js";
import { JobWatch } from "./watch.js";

/** Every form of the page; a new kind of job adds its module here. */
const FORMS = [generate];

const $ = (selector) => document.querySelector(selector);

const state = { models: [], defaultModel: "", forms: new Map() };

const watch = new JobWatch($("#watch"), {
  onEnd: (record) => gallery.add(record),
  onStatus: (jobId, status) => gallery.setStatus(jobId, status),
});
const gallery = new Gallery($("#gallery"), $("#detail"), {
  again(request) {
    const { kind, form } = state.forms.get("generate");
    kind.refill(form, state.models, request);
    showForm("generate");
    form.input("prompt").focus();
  },
});

// -- the key --------------------------------------------------------------------------

function keyFromAddress() {
  // `make studio` prints the address with #key=...: the fragment never reaches a
  // server; it goes to session storage and leaves the address bar (and the history).
  const match = location.hash.match(/^#key=(.+)$/);
  if (!match) return;
  setKey(decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search);
}

function askKey(message = "") {
  $("#app").hidden = true;
  $("#key-panel").hidden = false;
  $("#key-status").hidden = true;
  const error = $("#key-error");
  error.textContent = message;
  error.hidden = !message;
  $("#key-input").toggleAttribute("aria-invalid", Boolean(message));
  $("#key-input").focus();
}

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return askKey("Enter an API key.");
  setKey(key);
  await start();
});

$("#key-change").addEventListener("click", () => {
  forgetKey();
  sessionStorage.removeItem(WATCHING);
  $("#key-input").value = "";
  askKey();
});

// -- the forms ------------------------------------------------------------------------

function showForm(id) {
  for (const [formId, { tab, panel }] of state.forms) {
    panel.hidden = formId !== id;
    tab?.setAttribute("aria-selected", String(formId === id));
  }
}

function buildForms() {
  const tabs = $("#form-tabs");
  const panels = $("#form-panels");
  tabs.replaceChildren();
  panels.replaceChildren();
  state.forms.clear();
  for (const kind of FORMS) {
    const form = element("form", { id: `form-${kind.id}`, "aria-label": kind.title });
    const panel = element("div", { role: "tabpanel", id: `panel-${kind.id}` }, form);
    const tab = FORMS.length > 1
      ? element("button", { type: "button", role: "tab", "aria-controls": panel.id, text: kind.title })
      : null;
    tab?.addEventListener("click", () => showForm(kind.id));
    if (tab) tabs.append(tab);
    tabs.hidden = !tab;
    panels.append(panel);
    const schemaForm = new SchemaForm(form, kind.fields(state.models), {
      submitLabel: kind.submitLabel,
      onChange: (name, f) => name === "model" && kind.fit(f, state.models),
      onSubmit: async (values) => {
        try {
          const record = await kind.submit(values);
          gallery.add(record);
          follow(record);
        } catch (error) {
          if (error instanceof ApiError && error.status === 401) return askKey(error.message);
          schemaForm.showError(error instanceof ApiError ? error : { message: String(error) });
        }
      },
    });
    kind.mount?.(schemaForm, state);
    kind.fit(schemaForm, state.models);
    state.forms.set(kind.id, { kind, form: schemaForm, tab, panel });
  }
  showForm(FORMS[0].id);
}

// -- the job being watched: followed again after a reload ---------------------------

const WATCHING = "atelier.watching";

function follow(record) {
  sessionStorage.setItem(WATCHING, record.id);
  watch.watch(record);
}

async function resumeWatch() {
  const id = sessionStorage.getItem(WATCHING);
  if (!id) return;
  try {
    follow(await call(`/v1/jobs/${encodeURIComponent(id)}`));
  } catch {
    sessionStorage.removeItem(WATCHING); // gone (expired, another key)
  }
}

// -- start ----------------------------------------------------------------------------

async function start() {
  if (!getKey()) return askKey();
  try {
    const answer = await call("/v1/models");
    state.models = answer.models;
    state.defaultModel = answer.default_model;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) forgetKey();
    return askKey(error.message);
  }
  $("#key-panel").hidden = true;
  $("#key-status").hidden = false;
  $("#app").hidden = false;
  buildForms();
  state.forms.get(FORMS[0].id).form.input("prompt").focus();
  resumeWatch();
  await gallery.reset();
}

// An address with #key=... opened in a tab already on the page changes only the hash.
addEventListener("hashchange", () => {
  if (!location.hash.startsWith("#key=")) return;
  keyFromAddress();
  start();
});

keyFromAddress();
start();
