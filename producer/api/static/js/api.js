// The API as the page uses it: the key (session storage), JSON calls that turn a
// refusal into an ApiError naming its fields, and a job's events streamed with fetch
// (EventSource cannot send the Authorization header), resumed with Last-Event-ID.

const KEY = "atelier.key";

export const TERMINAL = new Set(["job.succeeded", "job.failed", "job.cancelled", "job.expired"]);

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

/** A refusal: the HTTP status, the API's error code and message, the fields it names. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.fields = error.fields || [];
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${getKey()}`, ...extra };
}

async function refusal(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  return new ApiError(response.status, body.error || { message: response.statusText });
}

/** GET (or POST with ``body``) ``path``; the JSON answer, or throws ApiError. */
export async function call(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await refusal(response);
  return response.json();
}

/** The frames of one SSE chunk stream: {id, event, data, retry}, comments skipped. */
function parseFrame(text) {
  const frame = { id: null, event: "message", data: [], retry: null };
  for (const line of text.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") frame.data.push(value);
    else if (field === "id") frame.id = value;
    else if (field === "event") frame.event = value;
    else if (field === "retry" && /^\d+$/.test(value)) frame.retry = Number(value);
  }
  return frame;
}

/**
 * Follow ``jobId``'s events until its terminal one: ``onEvent(event)`` for each (the
 * event as JSON: id, type, job_id, ts, data). A stream cut short is resumed after the
 * last event seen, with Last-Event-ID, after the server's retry delay. ``signal``
 * (an AbortSignal) stops it. Resolves with the terminal event, or null when aborted.
 */
export async function followEvents(jobId, onEvent, { signal, onReconnect } = {}) {
  let lastId = "";
  let retryMs = 2000;
  const decoder = new TextDecoder();
  while (!signal?.aborted) {
    try {
      const extra = lastId ? { "Last-Event-ID": lastId } : {};
      const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`,
        { headers: headers(extra), signal });
      if (!response.ok) {
        const error = await refusal(response);
        if (response.status < 500 && response.status !== 429) throw error;
      } else {
        const reader = response.body.getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
            const frame = parseFrame(buffer.slice(0, cut));
            buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
            if (frame.retry !== null) retryMs = frame.retry;
            if (!frame.data.length) continue;
            const event = JSON.parse(frame.data.join("\n"));
            if (frame.id) lastId = frame.id;
            onEvent(event);
            if (TERMINAL.has(event.type)) return event;
          }
        }
      }
    } catch (error) {
      if (signal?.aborted) return null;
      if (error instanceof ApiError) throw error;
      // a network error: resume below
    }
    onReconnect?.(lastId);
    await new Promise((resolve) => setTimeout(resolve, retryMs));
  }
  return null;
}
