"""The app factory: one typed :class:`~producer.api.state.ApiState`, the routers, the
error handlers, the request metrics; and ``atelier api``'s :func:`main`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api import errors, files, openapi
from producer.api.keys import KeyRing
from producer.api.openai import errors as openai_errors
from producer.api.routes import files as file_routes
from producer.api.routes import health, images, jobs, models, queues, studio, trainings, workers
from producer.api.state import ApiState, attach
from producer.core.logs import configure as configure_logging
from producer.core.registry import Registry
from producer.core.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    registry = Registry.load(settings.models_file)
    check_aliases(settings, registry)
    state = ApiState(
        settings=settings,
        registry=registry,
        keyring=KeyRing(settings.api_keys, settings.admin_api_keys),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.open()
        try:
            yield
        finally:
            await state.aclose()

    app = FastAPI(
        title="atelier",
        version="1",
        lifespan=lifespan,
        description="A job queue for text-to-image generation.",
    )
    attach(app, state)
    errors.install(app, shapes={openai_errors.PREFIX: openai_errors.render})
    app.add_exception_handler(openai_errors.OpenAIError, _openai_error)

    app.add_middleware(_Measure, state=state)
    for module in (jobs, trainings, images, models, queues, workers, file_routes, health, studio):
        app.include_router(module.router)
    app.mount("/static", studio.static_files(), name="static")
    openapi.install(app, settings, registry)
    return app


def check_aliases(settings: Settings, registry: Registry) -> None:
    """Each alias of ``ATELIER_OPENAI_MODEL_ALIASES`` names a registry model and is not
    one itself: refused at start, naming the setting."""
    for alias, target in settings.model_aliases.items():
        if registry.get(target) is None:
            raise ValueError(
                f"ATELIER_OPENAI_MODEL_ALIASES: {alias}={target}: no model "
                f"{target!r}; known: {', '.join(registry.names())}"
            )
        if registry.get(alias) is not None:
            raise ValueError(
                f"ATELIER_OPENAI_MODEL_ALIASES: {alias!r} is a model's own name already"
            )


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, openai_errors.OpenAIError)
    return exc.response()


class _Measure:
    """Request counts and latency (to the response's headers), as a plain ASGI
    middleware: unlike ``@app.middleware("http")`` it does not relay a streamed body
    through a second task, which every event of every stream would pay for."""

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        files.bind_base(str(Request(scope).base_url))  # the links this request's answers give
        seen = False

        async def measured(message: Message) -> None:
            nonlocal seen
            if message["type"] == "http.response.start" and not seen:
                seen = True
                self.observe(scope, message["status"], t0)
            await send(message)

        try:
            await self.app(scope, receive, measured)
        except Exception:
            if not seen:
                self.observe(scope, 500, t0)
            raise

    def observe(self, scope: Scope, status: int, t0: float) -> None:
        route = scope.get("route")
        self.state.metrics.observe(scope["method"], getattr(route, "path", "unmatched"), status, t0)


def _tune_gc() -> None:
    """Thousands of open streams are ~1M long-lived objects (~200 each), and CPython's
    default thresholds made full collections of them stop the loop for 0.2-2 s while
    streams opened (measured: bench/sse_fanout.py). Collections are made rarer (young
    generation 50,000 objects, a full one after 5,000 young ones) and what the app
    holds from start-up is frozen out of them."""
    import gc

    gc.set_threshold(50_000, 50, 100)
    gc.freeze()


def main(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    if not settings.api_keys.strip():
        raise SystemExit(
            "atelier api: set ATELIER_API_KEYS (comma-separated keys or "
            "sha256:<hex> digests); the API does not run without keys"
        )
    configure_logging(settings.log_format)
    app = create_app(settings)
    _tune_gc()
    # JSON: uvicorn's own loggers (uvicorn.error, uvicorn.access) propagate to the root
    # handler configured above; text keeps uvicorn's usual lines.
    extra: dict[str, Any] = {"log_config": None} if settings.log_format == "json" else {}
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=5,
        proxy_headers=False,
        **extra,
    )
    return 0
