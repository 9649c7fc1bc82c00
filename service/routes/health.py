"""Health probes (Kubernetes liveness/readiness) and the Prometheus endpoint."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Response

from service.metrics import CONTENT_TYPE
from service.routes.deps import ManagerDep, MetricsDep
from service.schemas import LiveResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/v2/health/live", response_model=LiveResponse, summary="Liveness")
async def live() -> LiveResponse:
    """200 while the server process answers."""
    return LiveResponse(live=True)


@router.get("/v2/health/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            summary="Readiness")
async def ready(manager: ManagerDep) -> Response:
    """200 when ready under the readiness policy (see the README), else 503; names each model version not ready."""
    ok, answer = manager.readiness()
    return Response(orjson.dumps(answer), status_code=200 if ok else 503, media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}})
async def metrics(m: MetricsDep) -> Response:
    """Every metric in the Prometheus text format, labelled by model and version."""
    return Response(m.render(), media_type=CONTENT_TYPE)
