"""The published OpenAPI document (``/openapi.json``), complete enough for a generated
client and for schemathesis (``tests/test_openapi.py``).

FastAPI writes most of it from the routes. What it cannot see is added here:

- a request body a route reads itself (to count its bytes, and to name every bad field
  at once) is declared with :func:`request_body`; the schemas it refers to are lifted
  into ``components/schemas`` by :func:`install`, so every ``$ref`` resolves;
- OpenAPI links (:func:`job_links`) from a created job to the routes of that job;
- the limits of the running registry and settings (:mod:`producer.api.limits`);
- the 422 FastAPI documents for a route with parameters has the one error shape
  (``ErrorBody``), which is what :mod:`producer.api.errors` answers it with.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from producer.api import limits
from producer.core.registry import Registry
from producer.core.settings import Settings

_REF = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The ``requestBody`` of a route that reads ``model`` as JSON itself."""
    schema = model.model_json_schema(ref_template=_REF)
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def job_links() -> dict[str, Any]:
    """Links from a response whose body is a job record to the routes of that job."""
    job = {"job_id": "$response.body#/id"}
    return {
        "GetJob": {
            "operationId": "get_job",
            "parameters": job,
            "description": "The job's record (poll it).",
        },
        "CancelJob": {
            "operationId": "cancel_job",
            "parameters": job,
            "description": "Cancel the job.",
        },
        "JobEvents": {
            "operationId": "job_events",
            "parameters": job,
            "description": "Follow the job's events.",
        },
    }


def _lift_defs(spec: dict[str, Any]) -> None:
    """Move the ``$defs`` of hand-declared request bodies into ``components/schemas``."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            for media in content.values():
                for name, schema in media.get("schema", {}).pop("$defs", {}).items():
                    if components.setdefault(name, schema) != schema:
                        raise ValueError(f"two different schemas are named {name!r}")


def _one_error_shape(spec: dict[str, Any]) -> None:
    """Document FastAPI's own 422 (a parameter refused) as the error body it gets."""
    body = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}}
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            answer = operation.get("responses", {}).get("422")
            if answer and "HTTPValidationError" in str(answer.get("content")):
                answer["content"] = body
    schemas = spec.get("components", {}).get("schemas", {})
    if "HTTPValidationError" not in str(spec.get("paths")):
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)


def install(app: FastAPI, settings: Settings, registry: Registry) -> None:
    """Serve the document FastAPI writes, with the request bodies' schemas lifted and
    the limits of this registry and these settings in them (:mod:`producer.api.limits`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
            )
            spec = copy.deepcopy(spec)  # the routes' own declarations stay as they are
            _lift_defs(spec)
            _one_error_shape(spec)
            limits.apply(spec, settings, registry)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
