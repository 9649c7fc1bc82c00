"""A KServe V1-style route for curl users: ``{"instances": [...]}`` in, predictions with risk out."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.inference import Accounted, body_limit, lookup, v1_predict
from service.routes.deps import InferAuth, ManagerDep, SettingsDep
from service.routes.v2 import ERRORS
from service.schemas import PredictRequest, PredictResponse, request_body

router = APIRouter(tags=["v1"])


@router.post("/v1/models/{model_name}:predict", summary="Predict (V1 style)", response_model=PredictResponse,
             responses=ERRORS, openapi_extra=request_body(PredictRequest), dependencies=[InferAuth])
async def predict(model_name: str, request: Request, manager: ManagerDep, settings: SettingsDep) -> Response:
    """Each instance is one sample (one row of the model's input); returns ``predictions``, ``risk``,
    ``risk_score`` (and ``flagged`` when a risk threshold is set; a composed model's risk components too)."""
    ctx = request.scope.setdefault("capsa", {"request_id": request.headers.get("x-request-id", "")})
    mv = lookup(manager, model_name, None)
    with Accounted(mv, "rest") as accounted:
        body = await accounted.admit(mv, settings, ctx["request_id"], request.receive,
                                     *body_limit(settings, json=True))
        content = await v1_predict(mv, settings, ctx, body)
    return Response(content, media_type="application/json")
