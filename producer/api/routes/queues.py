"""``GET /v1/queues``: each model's queue depth and oldest waiting job."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from producer.api.auth import AUTH_STATUSES, Auth
from producer.api.schemas import QueueList, refusals
from producer.api.state import StateDep

router = APIRouter(prefix="/v1/queues", tags=["queues"])


@router.get(
    "",
    response_model=QueueList,
    operation_id="list_queues",
    responses=refusals(*AUTH_STATUSES),
    summary="Queue depth per model",
)
def queues(state: StateDep, who: Auth) -> JSONResponse:
    return JSONResponse({"queues": state.queue_report()})
