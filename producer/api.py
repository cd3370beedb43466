"""The HTTP API: ``atelier api`` (FastAPI on uvicorn).

Routes (DESIGN.md): ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events``
(server-sent events), ``POST /v1/jobs/{id}/cancel``, ``GET /v1/models``,
``GET /v1/queues``, ``GET /v1/workers``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics``.

Every refusal has one shape: ``{"error": {"code", "message", "fields"?}}``.

- Auth: ``Authorization: Bearer <key>``. Keys are kept only as sha256 digests and a
  presented key is compared with every one in constant time. 401 without a valid key;
  403 for ``/v1/workers`` without an admin key. A job belongs to the key that created
  it: for any other key it does not exist (404).
- Per-key rate limit (GCRA in Redis, so every replica shares it): 429, ``Retry-After``.
- Admission: a model whose queue holds ``max_queue_depth`` messages refuses new jobs
  with 503 and ``Retry-After``; nothing is enqueued.
- ``Idempotency-Key``: the same key and body give the same job for
  ``idempotency_ttl_s``; the same key with another body is a 409.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import redis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer import constants as K
from producer.broker import queue_depth
from producer.client import Client, new_job_id
from producer.contract import TERMINAL_EVENTS, EventType, JobRequest, Status
from producer.errors import AtelierError, InvalidRequest, JobNotFound, KeyClaimed, Unavailable
from producer.fleet import live_workers, queue_report
from producer.logs import configure as configure_logging
from producer.metrics import RedisGauges, queue_gauges
from producer.redis_url import async_redis_client, redis_client
from producer.registry import Registry
from producer.settings import Settings, get_settings
from producer.store import Claim, decode_event
from producer.validation import validate_request

log = logging.getLogger("atelier.api")

# -- errors -------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields, self.headers = fields, headers


def _error_response(exc: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.fields is not None:
        body["fields"] = exc.fields
    return JSONResponse({"error": body}, status_code=exc.status, headers=exc.headers)


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: list[dict[str, str]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Output(BaseModel):
    """A stored image. ``key``, ``url`` and ``sha256`` are null for a withheld one."""

    index: int
    key: str | None
    url: str | None
    seed: int | None = Field(description="null for a sweep's contact sheet")
    width: int
    height: int
    content_type: str
    bytes: int
    sha256: str | None
    nsfw: bool | None = Field(None, description="set when a safety checker ran")
    blurred: bool | None = None
    withheld: bool | None = None
    sweep: dict[str, Any] | None = Field(None, description="a sweep cell's parameters")
    contact_sheet: bool | None = None


class JobRecord(BaseModel):
    """A job as the API shows it (see DESIGN.md "Job record and states")."""

    id: str
    status: Status
    request: dict[str, Any]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: str | None = None
    attempts: int
    worker: str | None = None
    progress: dict[str, int]
    outputs: list[Output]
    error: dict[str, str] | None = None
    timings: dict[str, int]
    metadata: dict[str, Any]
    position: int | None = Field(
        None, description="While queued: how many jobs of the same model run before it.")
    webhook_deliveries: list[dict[str, Any]] = Field(
        default_factory=list, description="Webhook delivery attempts, oldest first.")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}

# -- keys ---------------------------------------------------------------------------


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(digest: str) -> str:
    """The public name of a key (stored as a job's ``owner``): never the key itself."""
    return "key_" + digest[:16]


def _digests(value: str) -> list[str]:
    out = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        if item.startswith("sha256:"):
            hexd = item.removeprefix("sha256:").lower()
            if not re.fullmatch(r"[0-9a-f]{64}", hexd):
                raise ValueError("an API key given as sha256:<hex> needs 64 hex digits")
            out.append(hexd)
        else:
            out.append(key_digest(item))
    return out


class KeyRing:
    def __init__(self, api_keys: str, admin_keys: str) -> None:
        self.digests = _digests(api_keys)
        self.admin = _digests(admin_keys)

    @staticmethod
    def _match(digest: str, known: list[str]) -> bool:
        found = False
        for d in known:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(d, digest)
        return found

    def authenticate(self, key: str) -> str | None:
        digest = key_digest(key)
        return digest if self._match(digest, self.digests) else None

    def is_admin(self, digest: str) -> bool:
        return self._match(digest, self.admin)


# Generic cell rate algorithm: one timestamp per key, on Redis's clock so replicas agree.
_RATE_LIMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - now - burst * interval
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return 0
"""

# Delete an idempotency key only if it still holds what the caller read.
_RELEASE_KEY = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: How long an event stream waits for Redis to come back before it ends.
SSE_DOWN_S = 30.0

_LAST_EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")


class Caller:
    def __init__(self, digest: str, admin: bool) -> None:
        self.digest = digest
        self.owner = key_id(digest)
        self.admin = admin


_bearer = HTTPBearer(auto_error=False, description="An API key from ATELIER_API_KEYS")


def _caller(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """Authenticate the bearer key and charge it one request against its rate limit."""
    keys: KeyRing = request.app.state.keys
    settings: Settings = request.app.state.settings
    challenge = {"WWW-Authenticate": "Bearer"}
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise ApiError(401, "unauthorized", "missing bearer API key", headers=challenge)
    digest = keys.authenticate(creds.credentials)
    if digest is None:
        raise ApiError(401, "unauthorized", "unknown API key", headers=challenge)
    if settings.rate_limit_per_s > 0:
        interval = 1000.0 / settings.rate_limit_per_s
        wait_ms = request.app.state.state["rate"](
            keys=[K.RATE_LIMIT + key_id(digest)], args=[interval, settings.rate_limit_burst])
        if int(wait_ms) > 0:
            retry = max(1, -(-int(wait_ms) // 1000))
            raise ApiError(429, "rate_limited",
                           f"rate limit of {settings.rate_limit_per_s:g}/s exceeded",
                           headers={"Retry-After": str(retry)})
    return Caller(digest, keys.is_admin(digest))


Auth = Annotated[Caller, Depends(_caller)]


# -- the app ------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    keys = KeyRing(settings.api_keys, settings.admin_api_keys)
    registry = Registry.load(settings.models_file)
    metrics = CollectorRegistry()
    requests_total = Counter("atelier_api_requests_total", "API requests by route and status",
                             ["method", "route", "status"], registry=metrics)
    latency = Histogram("atelier_api_request_duration_seconds", "API request latency",
                        ["method", "route"], registry=metrics)
    state: dict[str, Any] = {}

    def _queues() -> list[dict[str, Any]]:
        if "store" not in state:  # scraped before the lifespan started: nothing to say
            return []
        return queue_report(state["store"], state["broker"], registry)

    metrics.register(RedisGauges(queue_gauges(_queues)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = Client(settings, registry=registry)
        state["client"] = client
        state["store"] = client.store
        state["broker"] = redis_client(settings.effective_broker_url, "ATELIER_BROKER_URL",
                                       health_check_interval=30)
        state["aredis"] = async_redis_client(settings.redis_url, health_check_interval=30)
        state["rate"] = client.store.redis.register_script(_RATE_LIMIT)
        try:
            yield
        finally:
            await state["aredis"].aclose()
            state["broker"].close()
            client.close()

    app = FastAPI(
        title="atelier", version="1", lifespan=lifespan,
        description="A job queue for text-to-image generation.",
    )

    # -- error handlers -----------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail),
                                        headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                  for e in exc.errors()]
        return _error_response(ApiError(422, "invalid_request", "invalid request", fields))

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return _error_response(ApiError(503, "unavailable", str(exc),
                                        headers={"Retry-After": "1"}))

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return _error_response(ApiError(503, "unavailable", f"job store unavailable: {exc}",
                                        headers={"Retry-After": "1"}))

    @app.middleware("http")
    async def _measure(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        requests_total.labels(request.method, path, str(response.status_code)).inc()
        latency.labels(request.method, path).observe(time.perf_counter() - t0)
        return response

    # -- auth and rate limit ----------------------------------------------------------

    app.state.keys = keys
    app.state.settings = settings
    app.state.state = state

    def own_job(job_id: str, who: Caller) -> dict[str, Any]:
        try:
            doc = state["store"].get(job_id)
        except JobNotFound:
            doc = None
        if doc is None or doc.get("owner") != who.owner:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return doc

    def view(doc: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in doc.items() if k != "owner"}
        if doc["status"] == Status.QUEUED:
            out["position"] = state["store"].queue_position(doc)
        out["webhook_deliveries"] = state["store"].deliveries(doc["id"])
        return out

    # -- jobs -----------------------------------------------------------------------

    request_schema = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request_schema.pop("$defs", None)

    @app.post(
        "/v1/jobs", status_code=202, response_model=JobRecord, responses=ERRORS,
        summary="Submit a job",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": request_schema}}}},
    )
    async def submit(request: Request, who: Auth) -> JSONResponse:
        body = await _read_body(request, settings.max_body_bytes)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None
        idem = request.headers.get("idempotency-key")
        if idem is not None and not 1 <= len(idem) <= 255:
            raise ApiError(400, "invalid_request", "Idempotency-Key must be 1-255 characters",
                           [{"field": "Idempotency-Key", "message": "1-255 characters"}])
        return await anyio.to_thread.run_sync(_submit, data, idem, who)

    def _submit(data: Any, idem: str | None, who: Caller) -> JSONResponse:
        try:
            normalized = validate_request(data, registry, settings)
        except InvalidRequest as exc:
            raise ApiError(422, exc.code, str(exc), exc.fields) from None
        r = state["store"].redis
        idem_key = fingerprint = None
        if idem is not None:
            idem_key = (f"{K.IDEMPOTENCY}{who.owner}:"
                        f"{hashlib.sha256(idem.encode()).hexdigest()}")
            fingerprint = hashlib.sha256(
                json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            replay = _replay(r, idem_key, fingerprint, who)
            if replay is not None:
                return replay
        _admit(normalized["model"])
        job_id = new_job_id()
        claim = None
        if idem_key is not None:
            # Written with the record, in one step: a replica that dies before that
            # leaves the key free, so the client's retry creates the job.
            claim = Claim(idem_key, json.dumps({"fingerprint": fingerprint, "job_id": job_id}),
                          settings.idempotency_ttl_s)
        try:
            state["client"].enqueue(normalized, job_id=job_id, owner=who.owner, claim=claim)
        except KeyClaimed:
            # A concurrent request with this key won the race: answer with its job.
            replay = _replay(r, idem_key, fingerprint, who) if idem_key else None
            if replay is not None:
                return replay
            raise ApiError(409, "idempotency_in_progress",
                           "a request with this Idempotency-Key is in progress") from None
        log.info("job %s queued for %s by %s", job_id, normalized["model"], who.owner,
                 extra={"job_id": job_id})
        doc = state["store"].get(job_id)
        return JSONResponse(view(doc), status_code=202,
                            headers={"Location": f"/v1/jobs/{job_id}"})

    def _replay(r: redis.Redis, idem_key: str, fingerprint: str | None,
                who: Caller) -> JSONResponse | None:
        raw: Any = r.get(idem_key)
        if raw is None:
            return None
        claim = json.loads(raw)
        if claim["fingerprint"] != fingerprint:
            raise ApiError(409, "idempotency_conflict",
                           "this Idempotency-Key was used with a different request body")
        try:
            doc = own_job(claim["job_id"], who)
        except ApiError:
            # The key is written with its record, so only an expired record gets here
            # (RESULT_TTL_S shorter than IDEMPOTENCY_TTL_S): the key is free again.
            r.eval(_RELEASE_KEY, 1, idem_key, raw)
            return None
        return JSONResponse(view(doc), status_code=202, headers={
            "Location": f"/v1/jobs/{doc['id']}", "Idempotent-Replayed": "true"})

    def _admit(model: str) -> None:
        if not settings.max_queue_depth:
            return
        depth = queue_depth(state["broker"], model)
        if depth >= settings.max_queue_depth:
            raise ApiError(
                503, "queue_full",
                f"the queue of {model} holds {depth} jobs (limit {settings.max_queue_depth})",
                headers={"Retry-After": str(settings.admission_retry_after_s)})

    @app.get("/v1/jobs/{job_id}", response_model=JobRecord, responses=ERRORS,
             summary="Get a job")
    def get_job(job_id: str, who: Auth) -> JSONResponse:
        return JSONResponse(view(own_job(job_id, who)))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobRecord, responses=ERRORS,
              summary="Cancel a job")
    def cancel_job(job_id: str, who: Auth) -> JSONResponse:
        """A queued job is cancelled at once, a running one at its next step (follow
        its events or poll). A job that already ended otherwise is a 409."""
        own_job(job_id, who)
        doc = state["store"].request_cancel(job_id).doc
        if Status(doc["status"]).is_terminal() and doc["status"] != Status.CANCELLED:
            raise ApiError(409, "job_finished", f"job {job_id} already {doc['status']}")
        return JSONResponse(view(doc))

    @app.get(
        "/v1/jobs/{job_id}/events", responses={
            **ERRORS, 200: {"content": {"text/event-stream": {}},
                            "description": "The job's events as server-sent events."}},
        summary="Stream a job's events",
    )
    async def job_events(request: Request, job_id: str,
                         who: Auth) -> StreamingResponse:
        """Events from the start, or after ``Last-Event-ID`` (header, or the ``after``
        query parameter); comments as heartbeats; the stream ends after the terminal
        event."""
        after = request.headers.get("last-event-id") or request.query_params.get("after")
        if after and not _LAST_EVENT_ID.fullmatch(after):
            raise ApiError(400, "invalid_request", "Last-Event-ID is not an event id",
                           [{"field": "Last-Event-ID", "message": "expected <ms>-<seq>"}])
        await anyio.to_thread.run_sync(own_job, job_id, who)
        return StreamingResponse(
            _sse(job_id, after), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(job_id: str, after: str | None) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        last = after or "0-0"
        block = int(settings.sse_heartbeat_s * 1000)
        down_since: float | None = None
        while True:
            try:
                res: Any = await state["aredis"].xread({K.events_key(job_id): last},
                                                       count=100, block=block)
            except (redis.ConnectionError, redis.TimeoutError):
                # Redis restarting (or a pooled connection it closed): the pool
                # reconnects on the next call, so the stream goes on where it was. After
                # SSE_DOWN_S of outage it ends; the client resumes with Last-Event-ID.
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > SSE_DOWN_S:
                    return
                yield b": reconnecting\n\n"
                await anyio.sleep(0.5)
                continue
            down_since = None
            if not res:
                # Quiet: a queued job may have expired meanwhile (reading expires it).
                try:
                    doc = await anyio.to_thread.run_sync(state["store"].get, job_id)
                except JobNotFound:
                    return
                if Status(doc["status"]).is_terminal():
                    more: Any = await state["aredis"].xread({K.events_key(job_id): last},
                                                            count=1)
                    if not more:
                        return
                    continue
                yield b": keep-alive\n\n"
                continue
            for eid, fields in res[0][1]:
                ev = decode_event(eid, fields)
                last = ev["id"]
                data = json.dumps(ev, separators=(",", ":"), ensure_ascii=False)
                yield f"id: {ev['id']}\nevent: {ev['type']}\ndata: {data}\n\n".encode()
                if EventType(ev["type"]) in TERMINAL_EVENTS:
                    return

    # -- fleet ----------------------------------------------------------------------

    @app.get("/v1/models", summary="The model registry")
    def models(who: Auth) -> dict[str, Any]:
        return {"models": [spec.public() for spec in registry]}

    @app.get("/v1/queues", responses=ERRORS, summary="Queue depth per model")
    def queues(who: Auth) -> dict[str, Any]:
        return {"queues": queue_report(state["store"], state["broker"], registry)}

    @app.get("/v1/workers", responses=ERRORS, summary="Live workers (admin keys only)")
    def workers(who: Auth) -> dict[str, Any]:
        if not who.admin:
            raise ApiError(403, "forbidden", "listing workers needs an admin API key "
                           "(ATELIER_ADMIN_API_KEYS)")
        return {"workers": live_workers(state["store"].redis)}

    # -- operations -------------------------------------------------------------------

    @app.get("/healthz", summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody}}, summary="Redis reachable")
    def readyz() -> dict[str, str]:
        try:
            state["store"].redis.ping()
            state["broker"].ping()
        except redis.RedisError as exc:
            raise ApiError(503, "unavailable", f"Redis unreachable: {exc}") from None
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics_route() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def main(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    if not settings.api_keys.strip():
        raise SystemExit("atelier api: set ATELIER_API_KEYS (comma-separated keys or "
                         "sha256:<hex> digests); the API does not run without keys")
    configure_logging(settings.log_format, settings.log_level)
    # JSON: uvicorn's own loggers (uvicorn.error, uvicorn.access) propagate to the root
    # handler configured above; text keeps uvicorn's usual lines.
    extra: dict[str, Any] = {"log_config": None} if settings.log_format == "json" else {}
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=5, proxy_headers=False, **extra)
    return 0


__all__ = ["ApiError", "AtelierError", "create_app", "key_id", "main"]
