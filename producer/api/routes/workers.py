"""``GET /v1/workers``: the live workers, for admin keys."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from producer.api.auth import AUTH_STATUSES, Auth, require_admin
from producer.api.schemas import WorkerList, refusals
from producer.api.state import StateDep
from producer.jobs.fleet import live_workers

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get(
    "",
    response_model=WorkerList,
    operation_id="list_workers",
    responses=refusals(*AUTH_STATUSES, 403),
    summary="Live workers (admin keys only)",
)
def workers(state: StateDep, who: Auth) -> JSONResponse:
    require_admin(who, "listing workers")
    return JSONResponse({"workers": live_workers(state.store.redis)})
