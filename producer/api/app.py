"""The app factory: one typed :class:`~producer.api.state.ApiState`, the routers, the
error handlers, the request metrics; and ``atelier api``'s :func:`main`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from producer.api import errors, files, openai_errors, openapi
from producer.api.keys import KeyRing
from producer.api.routes import files as file_routes
from producer.api.routes import health, images, jobs, models, queues, studio, trainings, workers
from producer.api.state import ApiState, attach
from producer.logs import configure as configure_logging
from producer.registry import Registry
from producer.settings import Settings, get_settings


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
        state.open()
        try:
            yield
        finally:
            await state.aclose()

    app = FastAPI(
        title="atelier", version="1", lifespan=lifespan,
        description="A job queue for text-to-image generation.",
    )
    attach(app, state)
    errors.install(app, shapes={openai_errors.PREFIX: openai_errors.render})
    app.add_exception_handler(openai_errors.OpenAIError, _openai_error)

    @app.middleware("http")
    async def _measure(request: Request,
                       call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        files.bind_base(str(request.base_url))  # the links this request's answers give
        response = await call_next(request)
        route = request.scope.get("route")
        state.metrics.observe(request.method, getattr(route, "path", "unmatched"),
                              response.status_code, t0)
        return response

    for module in (jobs, trainings, images, models, queues, workers, file_routes, health,
                   studio):
        app.include_router(module.router)
    app.mount("/static", studio.static_files(), name="static")
    openapi.install(app)
    return app


def check_aliases(settings: Settings, registry: Registry) -> None:
    """Each alias of ``ATELIER_OPENAI_MODEL_ALIASES`` names a registry model and is not
    one itself: refused at start, naming the setting."""
    for alias, target in settings.model_aliases.items():
        if registry.get(target) is None:
            raise ValueError(f"ATELIER_OPENAI_MODEL_ALIASES: {alias}={target}: no model "
                             f"{target!r}; known: {', '.join(registry.names())}")
        if registry.get(alias) is not None:
            raise ValueError(f"ATELIER_OPENAI_MODEL_ALIASES: {alias!r} is a model's own "
                             "name already")


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, openai_errors.OpenAIError)
    return exc.response()


def main(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    if not settings.api_keys.strip():
        raise SystemExit("atelier api: set ATELIER_API_KEYS (comma-separated keys or "
                         "sha256:<hex> digests); the API does not run without keys")
    configure_logging(settings.log_format)
    # JSON: uvicorn's own loggers (uvicorn.error, uvicorn.access) propagate to the root
    # handler configured above; text keeps uvicorn's usual lines.
    extra: dict[str, Any] = {"log_config": None} if settings.log_format == "json" else {}
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=5, proxy_headers=False, **extra)
    return 0
