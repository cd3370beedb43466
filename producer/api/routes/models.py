"""``GET /v1/models``: the registry's models, their defaults and limits, the ControlNets,
reference modes and LoRAs each model's requests may name (:meth:`Registry.view`), and the
aliases OpenAI clients may use (atelier's own shape, not OpenAI's model list)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from producer.api.auth import AUTH_STATUSES, Auth
from producer.api.schemas import ModelList, refusals
from producer.api.state import StateDep

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get(
    "",
    response_model=ModelList,
    operation_id="list_models",
    responses=refusals(*AUTH_STATUSES),
    summary="The model registry",
)
def models(state: StateDep, who: Auth) -> JSONResponse:
    return JSONResponse(
        {
            "models": [state.registry.view(spec) for spec in state.registry],
            "default_model": state.settings.default_model,
            "aliases": state.settings.model_aliases,
        }
    )
