// The key's jobs, newest first (GET /v1/jobs), a page more each time the end of the
// list scrolls into view; a job opens in a dialog with its images, parameters,
// timings and status, "again with this seed" and "download".

import { call } from "./api.js";
import { element } from "./form.js";

const PAGE = 24;

/** One output as a figure: the image at its natural size (scaled up, pixels kept), and
 * a download link. */
export function outputFigure(record, output) {
  const name = `${record.id}-${output.index}.${(output.content_type || "image/png").split("/")[1]}`;
  const img = element("img", {
    src: output.url, alt: `image ${output.index + 1} of job ${record.id}`,
    width: output.width, height: output.height, class: "output", "data-index": output.index,
  });
  const link = element("a", { href: output.url, download: name, class: "button", text: "Download" });
  link.setAttribute("aria-label", `Download image ${output.index + 1}`);
  return element("figure", { class: "result" }, img,
    element("figcaption", {}, `seed ${output.seed} · ${output.width}×${output.height} `, link));
}

function table(rows) {
  const body = rows.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => element("tr", {}, element("th", { scope: "row", text: k }),
      element("td", { text: typeof v === "object" ? JSON.stringify(v) : String(v) })));
  return element("table", {}, element("tbody", {}, ...body));
}

export class Gallery {
  /** @param {HTMLElement} root  the gallery section
   *  @param {HTMLDialogElement} dialog  the job's detail dialog
   *  @param {{again: (request) => void}} hooks  "again with this seed" */
  constructor(root, dialog, { again }) {
    this.list = root.querySelector("[data-gallery=list]");
    this.sentinel = root.querySelector("[data-gallery=more]");
    this.empty = root.querySelector("[data-gallery=empty]");
    this.dialog = dialog;
    this.again = again;
    this.cursor = undefined; // undefined: not loaded yet; null: no more pages
    this.loading = false;
    this.observer = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) this.more();
    }, { rootMargin: "200px" });
    dialog.querySelector("[data-detail=close]").addEventListener("click", () => dialog.close());
  }

  /** Start over (a new key): the first page, then more on scroll. */
  async reset() {
    this.list.replaceChildren();
    this.cursor = undefined;
    this.observer.observe(this.sentinel);
    await this.more();
  }

  async more() {
    if (this.loading || this.cursor === null) return;
    this.loading = true;
    this.sentinel.textContent = "Loading…";
    try {
      const query = new URLSearchParams({ limit: String(PAGE) });
      if (this.cursor) query.set("cursor", this.cursor);
      const page = await call(`/v1/jobs?${query}`);
      for (const record of page.data) this.list.append(this.#item(record));
      this.cursor = page.next_cursor ?? null;
    } catch (error) {
      this.sentinel.textContent = `Could not load the gallery: ${error.message}`;
      this.loading = false;
      return;
    }
    this.loading = false;
    this.empty.hidden = this.list.children.length > 0;
    this.sentinel.textContent = this.cursor === null ? "" : "More below";
    if (this.cursor === null) this.observer.unobserve(this.sentinel);
    // A page that does not fill the screen leaves the sentinel in view: no new
    // intersection comes, so ask for the next one now.
    else if (this.sentinel.getBoundingClientRect().top < innerHeight) this.more();
  }

  /** A job that has just ended goes first (or replaces its older tile). */
  add(record) {
    this.list.querySelector(`[data-job-id="${CSS.escape(record.id)}"]`)?.remove();
    this.list.prepend(this.#item(record));
    this.empty.hidden = true;
  }

  /** A watched job's new status on its tile. */
  setStatus(jobId, status) {
    const tile = this.list.querySelector(`[data-job-id="${CSS.escape(jobId)}"] .tile`);
    if (!tile) return;
    tile.dataset.status = status;
    const badge = tile.querySelector(".badge");
    badge.className = `badge badge-${status}`;
    badge.textContent = status;
    const placeholder = tile.querySelector(".placeholder");
    if (placeholder) placeholder.textContent = status;
  }

  #item(record) {
    const first = record.outputs?.[0];
    const thumb = first
      ? element("img", { src: first.url, alt: "", width: first.width, height: first.height, loading: "lazy" })
      : element("span", { class: "placeholder", text: record.status });
    const prompt = record.request?.prompt || record.kind || record.id;
    const button = element("button", { type: "button", class: "tile", "data-status": record.status },
      thumb, element("span", { class: "tile-caption" },
        element("span", { class: "tile-prompt", text: prompt }),
        element("span", { class: `badge badge-${record.status}`, text: record.status })));
    button.setAttribute("aria-label", `${prompt} (${record.status}), job ${record.id}`);
    button.addEventListener("click", () => this.open(record.id));
    return element("li", { "data-job-id": record.id }, button);
  }

  /** The job's detail dialog, from a fresh record (its URLs signed anew). */
  async open(jobId) {
    const record = await call(`/v1/jobs/${encodeURIComponent(jobId)}`);
    const request = record.request || {};
    const body = this.dialog.querySelector("[data-detail=body]");
    this.dialog.querySelector("[data-detail=title]").textContent = request.prompt || record.id;
    const again = element("button", { type: "button", class: "primary", text: "Again with this seed" });
    again.addEventListener("click", () => {
      this.dialog.close();
      this.again(request);
    });
    const t = record.timings || {};
    body.replaceChildren(
      element("div", { class: "results" }, ...(record.outputs || []).map((o) => outputFigure(record, o))),
      element("div", { class: "actions" }, again),
      element("h3", { text: "Status" }),
      table([["status", record.status], ["job", record.id], ["error", record.error && `${record.error.code}: ${record.error.message}`],
        ["created", record.created_at], ["started", record.started_at], ["finished", record.finished_at],
        ["attempts", record.attempts], ["worker", record.worker]]),
      element("h3", { text: "Parameters" }),
      table(Object.entries(request)),
      element("h3", { text: "Timings (ms)" }),
      table(Object.entries(t)),
    );
    this.dialog.showModal();
    again.focus();
  }
}
