// Watching one job: its status, a progress bar and the live preview fed by its events,
// a cancel button, and its images once it has ended. Any kind of job: the progress
// line shows a phase and a loss too when the events carry them (trainings).

import { call, followEvents } from "./api.js";
import { outputFigure } from "./gallery.js";

const TERMINAL_STATUSES = new Set(["succeeded", "failed", "cancelled", "expired"]);

const LABELS = {
  queued: "Queued", running: "Running", succeeded: "Done", failed: "Failed",
  cancelled: "Cancelled", expired: "Expired",
};

export class JobWatch {
  /** @param {HTMLElement} root the section it renders into
   *  @param {{onEnd: (record) => void, onStatus: (jobId, status) => void}} hooks */
  constructor(root, { onEnd, onStatus } = {}) {
    this.root = root;
    this.onEnd = onEnd;
    this.onStatus = onStatus;
    this.abort = null;
    this.status = root.querySelector("[data-watch=status]");
    this.bar = root.querySelector("[data-watch=bar]");
    this.stepText = root.querySelector("[data-watch=step]");
    this.preview = root.querySelector("[data-watch=preview]");
    this.results = root.querySelector("[data-watch=results]");
    this.cancelButton = root.querySelector("[data-watch=cancel]");
    this.cancelButton.addEventListener("click", () => this.cancel());
  }

  /** Follow ``record`` (as POST /v1/jobs answered) until it ends. */
  async watch(record) {
    this.abort?.abort();
    const abort = (this.abort = new AbortController());
    this.jobId = record.id;
    this.root.hidden = false;
    this.root.dataset.jobId = record.id;
    this.results.replaceChildren();
    this.preview.hidden = true;
    this.preview.removeAttribute("src");
    this.bar.removeAttribute("value");
    this.stepText.textContent = "";
    this.cancelButton.hidden = false;
    this.cancelButton.disabled = false;
    this.#status(record.status, record.position != null ? `position ${record.position + 1} in the queue` : "");
    if (TERMINAL_STATUSES.has(record.status)) return this.#ended(record); // nothing to follow
    try {
      const end = await followEvents(record.id, (event) => this.#event(event), {
        signal: abort.signal,
        onReconnect: () => this.#status(this.root.dataset.status, "reconnecting…"),
      });
      if (!end) return;
      const final = await call(`/v1/jobs/${encodeURIComponent(record.id)}`);
      this.#ended(final);
    } catch (error) {
      if (!abort.signal.aborted) this.#status("failed", error.message);
    }
  }

  #event(event) {
    const data = event.data || {};
    if (event.type === "job.started") this.#status("running", "");
    else if (event.type === "job.retrying") this.#status("queued", `retrying (attempt ${data.attempt}: ${data.reason})`);
    else if (event.type === "job.progress") {
      if (this.root.dataset.status !== "running") this.#status("running", "");
      this.#progress(data);
    }
  }

  #progress({ step, total, phase, loss, preview }) {
    if (total) {
      this.bar.max = total;
      this.bar.value = step;
    }
    const extra = [phase, loss != null ? `loss ${Number(loss).toFixed(4)}` : ""].filter(Boolean);
    this.stepText.textContent = `step ${step} of ${total}${extra.length ? ` · ${extra.join(" · ")}` : ""}`;
    if (preview) {
      this.preview.src = preview;
      this.preview.hidden = false;
    }
  }

  #ended(record) {
    this.cancelButton.hidden = true;
    const error = record.error ? `${record.error.code}: ${record.error.message}` : "";
    const took = record.timings?.total_ms != null ? `in ${(record.timings.total_ms / 1000).toFixed(1)} s` : "";
    this.#status(record.status, error || took);
    if (record.status === "succeeded") {
      const total = record.progress?.total;
      if (total) this.#progress({ step: total, total });
      this.preview.hidden = true;
      this.results.replaceChildren(...(record.outputs || []).map((o) => outputFigure(record, o)));
    }
    this.onEnd?.(record);
  }

  #status(status, detail) {
    if (status !== this.root.dataset.status) this.onStatus?.(this.jobId, status);
    this.root.dataset.status = status;
    this.status.textContent = LABELS[status] || status;
    this.root.querySelector("[data-watch=detail]").textContent = detail || "";
  }

  async cancel() {
    if (!this.jobId) return;
    this.cancelButton.disabled = true;
    try {
      await call(`/v1/jobs/${encodeURIComponent(this.jobId)}/cancel`, { method: "POST" });
      this.root.querySelector("[data-watch=detail]").textContent = "cancelling…";
    } catch (error) {
      this.root.querySelector("[data-watch=detail]").textContent = error.message;
      this.cancelButton.disabled = false;
    }
  }
}
