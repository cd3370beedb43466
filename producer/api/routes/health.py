"""``/healthz``, ``/readyz``, ``/metrics``: for probes and scrapers, without a key."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producer.api.errors import ApiError
from producer.api.schemas import Health, refusals
from producer.api.state import StateDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, operation_id="healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Health,
    operation_id="readyz",
    responses=refusals(503),
    summary="Redis reachable",
)
def readyz(state: StateDep) -> dict[str, str]:
    try:
        state.store.redis.ping()
        state.up.broker.ping()
    except redis.RedisError as exc:
        raise ApiError(503, "unavailable", f"Redis unreachable: {exc}") from None
    return {"status": "ready"}


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition.",
        }
    },
)
def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
