"""Model repository routes (Triton's names): index, load, unload. They need the admin bearer token.

Bodies are optional and read raw (tritonclient sends JSON without a JSON content type); ``ready`` filters the index,
load/unload parameters are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request

from service.errors import ApiError
from service.inference import load_model, unload_model
from service.routes.deps import AdminAuth, ManagerDep, read_body
from service.schemas import ErrorResponse, RepositoryIndexEntry, RepositoryIndexRequest, RepositoryRequest, request_body

router = APIRouter(tags=["repository"], dependencies=[AdminAuth],
                   responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409)})

_SMALL = 1 << 20


async def _json_body(request: Request) -> dict[str, Any]:
    body = await read_body(request, _SMALL)
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return doc


@router.post("/v2/repository/index", response_model=list[RepositoryIndexEntry], summary="Repository index",
             openapi_extra=request_body(RepositoryIndexRequest, required=False))
async def index(request: Request, manager: ManagerDep) -> list[dict[str, Any]]:
    """Every model version in the repository and every served one, with its state and the reason if not ready."""
    ready = (await _json_body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise ApiError(400, "'ready' must be a boolean")
    return await manager.index(ready_only=ready)


@router.post("/v2/repository/models/{model_name}/load", response_model=dict[str, Any], summary="Load a model",
             openapi_extra=request_body(RepositoryRequest, required=False))
async def load(model_name: str, request: Request, manager: ManagerDep) -> dict[str, Any]:
    """(Re)load a model from the repository per its version policy; returns once its versions are warm.

    400 names what failed (``config.json`` and the field, a file, the load error) while what served keeps serving;
    409 when an unload (or a newer load) cancelled this one.
    """
    await _json_body(request)
    await load_model(manager, model_name)  # 404/409/400 as the gRPC RPC (service.inference)
    return {}


@router.post("/v2/repository/models/{model_name}/unload", response_model=dict[str, Any], summary="Unload a model",
             openapi_extra=request_body(RepositoryRequest, required=False))
async def unload(model_name: str, request: Request, manager: ManagerDep) -> dict[str, Any]:
    """Stop serving a model; its queued and running requests finish first (bounded by CAPSA_DRAIN_TIMEOUT_S)."""
    await _json_body(request)
    await unload_model(manager, model_name)
    return {}
