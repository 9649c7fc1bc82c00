"""Shared pieces of the routes: typed dependencies, bearer-token checks and body reading."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import inference
from service.inference import check_admin_token, check_infer_token
from service.manager import ModelManager
from service.metrics import Metrics
from service.settings import Settings


async def get_manager(request: Request) -> ModelManager:
    """The app's model manager."""
    return cast(ModelManager, request.app.state.manager)


async def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return cast(Settings, request.app.state.settings)


async def get_metrics(request: Request) -> Metrics:
    """The app's metrics."""
    return cast(Metrics, request.app.state.metrics)


ManagerDep = Annotated[ModelManager, Depends(get_manager)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

_bearer = HTTPBearer(auto_error=False, description="Bearer token (CAPSA_ADMIN_TOKEN / CAPSA_INFER_TOKEN).")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def require_admin(settings: SettingsDep, credentials: BearerDep) -> None:
    """Repository routes: 403 when no admin token is configured, 401 when the bearer token is missing or wrong."""
    check_admin_token(settings, f"Bearer {credentials.credentials}" if credentials is not None else None)


async def require_infer_token(settings: SettingsDep, credentials: BearerDep) -> None:
    """Inference routes: when CAPSA_INFER_TOKEN is set, a matching bearer token is required (else 401)."""
    check_infer_token(settings, f"Bearer {credentials.credentials}" if credentials is not None else None)


AdminAuth = Depends(require_admin)
InferAuth = Depends(require_infer_token)


async def read_body(request: Request, limit: int, json: bool = False) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes even without a Content-Length (``json``: the
    limit is CAPSA_MAX_JSON_REQUEST_BYTES, for the message)."""
    return await inference.read_body(request.receive, limit, json)
