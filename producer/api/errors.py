"""The one shape of every refusal, ``{"error": {"code", "message", "fields"?}}``, and
the handlers that give it to whatever goes wrong in a route (the OpenAI-compatible
routes answer in OpenAI's shape: :mod:`producer.api.openai.errors`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from producer.core.errors import Unavailable


class ApiError(Exception):
    """A refusal: its HTTP status, its error code, and the headers it carries."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields, self.headers = fields, headers


def error_response(exc: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.fields is not None:
        body["fields"] = exc.fields
    return JSONResponse({"error": body}, status_code=exc.status, headers=exc.headers)


#: Renders a refusal in another shape (the OpenAI-compatible routes' own).
Renderer = Callable[[ApiError], JSONResponse]


def _allowed(request: Request) -> str:
    """Every method the request's path answers: Starlette's 405 names only those of the
    first route with that path (``/v1/jobs`` has a POST route and a GET route)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _translate(request: Request, exc: Exception) -> ApiError:
    """Whatever went wrong in a route, as the refusal it is."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed(request)}
        return ApiError(exc.status_code, code, str(exc.detail), headers=headers)
    if isinstance(exc, RequestValidationError):
        fields = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        return ApiError(422, "invalid_request", "invalid request", fields)
    if isinstance(exc, Unavailable):
        return ApiError(503, "unavailable", str(exc), headers={"Retry-After": "1"})
    assert isinstance(exc, redis.RedisError)
    return ApiError(
        503, "unavailable", f"job store unavailable: {exc}", headers={"Retry-After": "1"}
    )


def install(app: FastAPI, shapes: dict[str, Renderer] | None = None) -> None:
    """Give every refusal the one shape, whoever raises it; under a path prefix of
    ``shapes``, the shape its renderer gives instead."""
    others = dict(shapes or {})

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        refusal = _translate(request, exc)
        for prefix, render in others.items():
            if request.url.path.startswith(prefix):
                return render(refusal)
        return error_response(refusal)

    for kind in (
        ApiError,
        StarletteHTTPException,
        RequestValidationError,
        Unavailable,
        redis.RedisError,
    ):
        app.add_exception_handler(kind, handle)
