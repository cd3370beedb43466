"""The HTTP API: ``atelier api`` (FastAPI on uvicorn).

Routes (docs/api.md): ``POST /v1/jobs``, ``GET /v1/jobs`` (the caller's jobs, a page at
a time), ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (server-sent events),
``POST /v1/jobs/{id}/cancel``, ``GET /v1/models``, ``GET /v1/queues``,
``GET /v1/workers``, ``GET /v1/files/{key}`` (``file://`` outputs at signed URLs),
``POST /v1/trainings``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``GET /``
(the studio page), and OpenAI's ``POST /v1/images/generations`` and
``/v1/images/edits``. Every refusal has one shape,
``{"error": {"code", "message", "fields"?}}``, but on the OpenAI routes OpenAI's.
Auth and rate limit: :mod:`producer.api.auth`; idempotency and admission:
:mod:`producer.api.submit`.

The package::

    app.py          create_app (the factory) and main (``atelier api``)
    state.py        ApiState: settings, registry, key ring, metrics, and the backends
                    (store, broker, asyncio Redis, Celery) its lifespan opens; the
                    StateDep dependency every route reaches it through
    errors.py       ApiError and the handlers that give every refusal the one shape
    keys.py         API keys as digests, compared in constant time
    auth.py         the caller (a bearer key), its rate limit, admin-only routes
    schemas.py      the response schemas (ErrorBody, ...; the record is the contract's)
    openapi.py      what FastAPI cannot see: hand-read request bodies, links
    records.py      a job as its owner sees it (anyone else: 404), with output URLs
                    a browser can load
    files.py        signed, expiring URLs of file:// outputs (``GET /v1/files/{key}``)
    submit.py       taking a job in: body limit, validation, Idempotency-Key, admission
    hub.py          every event stream of the process: one Redis reader fanned out to
                    capped per-stream queues, one heartbeat/check timer
    sse.py          a job's events as server-sent events (over the hub)
    openai/         the OpenAI-compatible routes' parts: request (OpenAI's fields as a
                    job request), form (the edit's multipart), results (the wait, the
                    answers, the image events), errors (OpenAI's error shape)
    routes/         one router per resource (each included in ``app.py``): jobs,
                    trainings, images (OpenAI), models, queues, workers, files, health,
                    studio (``GET /`` and ``/static/``, the files in ``static/``)

This package is the top of ``producer`` but for ``cli``: nothing below it imports it.
"""

from producer.api.app import create_app, main
from producer.api.errors import ApiError
from producer.api.keys import key_id
from producer.core.errors import AtelierError

__all__ = ["ApiError", "AtelierError", "create_app", "key_id", "main"]
