// The "Generate" form: POST /v1/jobs with the fields of GET /v1/models. A form of
// another kind (a training) is another module of this shape: {id, title, fields,
// mount(form, state), fit(form, models), submit(values)}; main.js lists them.

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
      { name: "steps", label: "Steps", type: "number", min: 1, max: 150 },
      { name: "guidance_scale", label: "Guidance", type: "number", min: 0, max: 30, step: 0.5 },
      { name: "scheduler", label: "Scheduler", type: "select", options: [] },
      { name: "seed", label: "Seed", type: "number", min: 0, placeholder: "random" },
      { name: "num_images", label: "Count", type: "number", min: 1, max: 8, placeholder: "1" },
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
    form.update("steps", { placeholder: d.steps });
    form.update("guidance_scale", { placeholder: d.guidance_scale, disabled: !model.cfg });
    form.update("negative_prompt", { disabled: !model.cfg });
    const scheduler = form.input("scheduler").value;
    form.update("scheduler", { options: model.schedulers.map((s) => ({ value: s })) });
    form.update("scheduler", { value: keepValues && model.schedulers.includes(scheduler) ? scheduler : d.scheduler });
    if (!keepValues) form.setValues({ width: d.width, height: d.height, steps: d.steps, guidance_scale: d.guidance_scale });
  },

  /** A job's request back in the form, its seed kept ("again with this seed"). */
  refill(form, models, request) {
    form.setValues({ model: request.model });
    this.fit(form, models);
    form.setValues({ ...request, num_images: request.num_images ?? 1 });
    this.fit(form, models, { keepValues: true });
    if (request.scheduler) form.update("scheduler", { value: request.scheduler });
  },

  submit(values) {
    return call("/v1/jobs", { method: "POST", body: values });
  },
};
