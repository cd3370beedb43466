"""Refusals on the OpenAI-compatible routes, in OpenAI's shape.

``{"error": {"message", "type", "param", "code"}}`` with the status OpenAI's SDKs map to
their exceptions (``openai._client.OpenAI._make_status_error``): 400
``BadRequestError``, 401 ``AuthenticationError``, 404 ``NotFoundError``, 409
``ConflictError``, 429 ``RateLimitError``, 5xx ``InternalServerError``. The SDKs read
``param`` and ``code`` from the body, and ``Retry-After`` (or ``retry-after-ms``) when
they retry 408, 409, 429 and 5xx; ``x-should-retry: false`` stops a retry where one
would only repeat a final outcome.

Every :class:`~producer.api.errors.ApiError` raised on these routes (auth, rate limit,
body limit, admission, idempotency) is rendered here by :func:`render` (see
:func:`producer.api.errors.install`); the routes raise :class:`OpenAIError` for what
only they know (a field's OpenAI name, a job's outcome).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from producer.api.errors import ApiError

#: Routes under this prefix answer refusals in OpenAI's shape.
PREFIX = "/v1/images/"

#: atelier's error codes as OpenAI names them.
CODES = {
    "unauthorized": "invalid_api_key",
    "rate_limited": "rate_limit_exceeded",
    "unknown_model": "model_not_found",
    "invalid_request": "invalid_value",
}


def error_type(status: int) -> str:
    """OpenAI's ``type`` for a status: ``requests`` for a rate limit (as OpenAI's own
    429s say), ``server_error`` for 5xx, ``invalid_request_error`` otherwise."""
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


class OpenAIError(Exception):
    """A refusal in OpenAI's shape: status, message, ``param`` (the OpenAI field name,
    or None), ``code`` and the headers it carries."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_api_error(exc: ApiError) -> OpenAIError:
    """An atelier refusal in OpenAI's terms: a 422 (invalid request) is OpenAI's 400."""
    status = 400 if exc.status == 422 else exc.status
    param = exc.fields[0]["field"] if exc.fields else None
    headers = dict(exc.headers or {})
    if exc.code == "idempotency_conflict":
        # The SDKs retry a 409; this one answers the same however often it is asked.
        headers["x-should-retry"] = "false"
    return OpenAIError(status, exc.message, param, CODES.get(exc.code, exc.code), headers)


def render(exc: ApiError) -> JSONResponse:
    return from_api_error(exc).response()
