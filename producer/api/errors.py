"""The one shape of every refusal, ``{"error": {"code", "message", "fields"?}}``, and
the handlers that give it to whatever goes wrong in a route."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from producer.errors import Unavailable


class ApiError(Exception):
    """A refusal: its HTTP status, its error code, and the headers it carries."""

    def __init__(self, status: int, code: str, message: str,
                 fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields, self.headers = fields, headers


def error_response(exc: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.fields is not None:
        body["fields"] = exc.fields
    return JSONResponse({"error": body}, status_code=exc.status, headers=exc.headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


def _allowed(request: Request) -> str:
    """Every method the request's path answers: Starlette's 405 names only those of the
    first route with that path (``/v1/jobs`` has a POST route and a GET route)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed(request)}
    return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=headers))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
              for e in exc.errors()]
    return error_response(ApiError(422, "invalid_request", "invalid request", fields))


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(ApiError(503, "unavailable", str(exc), headers={"Retry-After": "1"}))


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    return error_response(ApiError(503, "unavailable", f"job store unavailable: {exc}",
                                   headers={"Retry-After": "1"}))


def install(app: FastAPI) -> None:
    """Give every refusal the one shape, whoever raises it."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(redis.RedisError, _redis_down)
