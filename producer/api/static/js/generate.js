// The "Generate" form: POST /v1/jobs with the fields of GET /v1/models. A form of
// another kind (a training) is another module of this shape: {id, title, fields,
// mount(form, state), fit(form, models), submit(values)}; main.js lists them.
//
// A LoRA and a ControlNet come from the lists GET /v1/models gives for the chosen model
// (those its requests may name); their fields show only for a model that has any. The
// form's flat values become the request's ``loras`` and ``control`` entries in submit.

import { call } from "./api.js";

export const generate = {
  id: "generate",
  title: "Generate",
  submitLabel: "Generate",

  fields(models) {
    return [
      { name: "prompt", label: "Prompt", type: "textarea", required: true, wide: true, rows: 3,
        placeholder: "a lighthouse at dusk" },
      { name: "negative_prompt", label: "Negative prompt", type: "textarea", wide: true, rows: 2,
        hint: "Only for models with classifier-free guidance." },
      { name: "model", label: "Model", type: "select", wide: true,
        options: models.map((m) => ({ value: m.name, label: `${m.name} (${m.pipeline})` })) },
      { name: "width", label: "Width", type: "number", min: 64 },
      { name: "height", label: "Height", type: "number", min: 64 },
      { name: "steps", label: "Steps", type: "number", min: 1 },
      { name: "guidance_scale", label: "Guidance", type: "number", min: 0, max: 30, step: 0.5 },
      { name: "scheduler", label: "Scheduler", type: "select", options: [] },
      { name: "seed", label: "Seed", type: "number", min: 0, placeholder: "random" },
      { name: "num_images", label: "Count", type: "number", min: 1, max: 8, placeholder: "1" },
      { name: "loras", label: "LoRA", type: "select", options: [] },
      { name: "lora_scale", label: "LoRA weight", type: "number", min: -4, max: 4, step: 0.05,
        placeholder: "1", errorsOf: ["loras.0.scale"] },
      { name: "control", label: "ControlNet", type: "select", options: [] },
      { name: "control_preprocess", label: "Preprocess", type: "select", options: [],
        errorsOf: ["control.0.preprocess"] },
      { name: "control_image", label: "Control image", type: "file", accept: "image/*", wide: true,
        hint: "What the ControlNet follows (edges, depth, a pose); sent inline.",
        errorsOf: ["control.0.image"] },
      { name: "preview", label: "Live preview", type: "checkbox", checked: true },
    ];
  },

  /** The API's default model first chosen. */
  mount(form, { defaultModel }) {
    if (defaultModel) form.update("model", { value: defaultModel });
  },

  /** Fit the fields to the chosen model: its defaults, its limits, and the fields it
   * does not take disabled (a guidance-distilled model takes no negative prompt). */
  fit(form, models, { keepValues = false } = {}) {
    const model = models.find((m) => m.name === form.input("model").value) || models[0];
    if (!model) return;
    const d = model.defaults;
    const size = { min: 64, max: model.limits.max_side, step: model.size_multiple };
    form.update("width", { ...size, placeholder: d.width });
    form.update("height", { ...size, placeholder: d.height });
    form.update("steps", { placeholder: d.steps, max: model.limits.max_steps });
    form.update("guidance_scale", { placeholder: d.guidance_scale, disabled: !model.cfg });
    form.update("negative_prompt", { disabled: !model.cfg });
    const scheduler = form.input("scheduler").value;
    form.update("scheduler", { options: model.schedulers.map((s) => ({ value: s })) });
    form.update("scheduler", { value: keepValues && model.schedulers.includes(scheduler) ? scheduler : d.scheduler });
    if (!keepValues) form.setValues({ width: d.width, height: d.height, steps: d.steps, guidance_scale: d.guidance_scale });
    fitChoices(form, model);
  },

  /** A job's request back in the form, its seed kept ("again with this seed"). */
  refill(form, models, request) {
    form.setValues({ model: request.model });
    this.fit(form, models);
    form.setValues({ ...request, num_images: request.num_images ?? 1, ...choices(request) });
    this.fit(form, models, { keepValues: true });
    if (request.scheduler) form.update("scheduler", { value: request.scheduler });
  },

  async submit(values) {
    return call("/v1/jobs", { method: "POST", body: await request(values) });
  },
};

/** Offer the model's LoRAs and ControlNets (a choice it still lists is kept); their
 * fields hidden, and so left out of the request, when it has none. */
function fitChoices(form, model) {
  const none = { value: "", label: "none" };
  const loras = model.loras || [];
  const controlnets = model.controlnets || [];
  const keep = (name, values) => {
    const value = form.input(name).value;
    return values.includes(value) ? value : "";
  };
  const lora = keep("loras", loras.map((l) => l.name));
  form.update("loras", { options: [none, ...loras.map((l) => ({ value: l.name }))], value: lora });
  const control = keep("control", controlnets.map((c) => c.name));
  const options = controlnets.map((c) => ({ value: c.name, label: `${c.name} (${c.kind})` }));
  form.update("control", { options: [none, ...options], value: control });
  const preprocess = form.input("control_preprocess").value || "none";
  const steps = controlnets[0]?.preprocess || ["none"];
  form.update("control_preprocess", { options: steps.map((s) => ({ value: s })) });
  form.update("control_preprocess", { value: steps.includes(preprocess) ? preprocess : "none" });
  for (const name of ["loras", "lora_scale"]) form.update(name, { hidden: !loras.length, disabled: !loras.length });
  for (const name of ["control", "control_preprocess", "control_image"]) {
    form.update(name, { hidden: !controlnets.length, disabled: !controlnets.length });
  }
}

/** A job's first LoRA and ControlNet as the form's fields (its control image is not
 * refilled: a page cannot choose a file). */
function choices(request) {
  const lora = request.loras?.[0];
  const control = request.control?.[0];
  return {
    loras: lora?.name ?? "",
    lora_scale: lora?.scale ?? "",
    control: control?.name ?? "",
    control_preprocess: control?.preprocess ?? "none",
  };
}

/** The request of the form's values: the LoRA and ControlNet fields as ``loras`` and
 * ``control`` entries, the control image a data: URI. */
async function request(values) {
  const { loras, lora_scale: scale, control, control_preprocess: preprocess, control_image: image, ...body } = values;
  if (loras) body.loras = [{ name: loras, ...(scale === undefined ? {} : { scale }) }];
  if (control) {
    const entry = { name: control, preprocess: preprocess || "none" };
    if (image) entry.image = await dataUri(image);
    body.control = [entry]; // no image: the API names control.0.image
  }
  return body;
}

function dataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
