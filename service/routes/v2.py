"""KServe V2 routes: server and model metadata, model readiness, and inference."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from service import __version__
from service.components import component_specs
from service.inference import Accounted, body_limit, lookup, v2_infer
from service.manager import ModelManager, ModelVersion
from service.protocol import HEADER_LENGTH
from service.routes.deps import InferAuth, ManagerDep, SettingsDep
from service.schemas import (
    ErrorResponse,
    InferRequestBody,
    InferResponseBody,
    ModelMetadata,
    ModelReadyResponse,
    ServerMetadata,
    TensorMetadata,
    request_body,
)
from service.settings import Settings

router = APIRouter(tags=["v2"])

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics:prometheus"]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503, 504)
}


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    """Name, version and supported protocol extensions of the server."""
    return ServerMetadata(name="capsa-serve", version=__version__, extensions=EXTENSIONS)


def model_metadata_of(manager: ModelManager, mv: ModelVersion) -> ModelMetadata:
    """The metadata of a model version (REST and gRPC)."""
    pred = mv.prediction
    batch_only = [pred.shape[0] if pred.shape else -1]
    outputs = [
        {"name": "prediction", "datatype": pred.datatype, "shape": pred.shape},
        {"name": "risk", "datatype": pred.datatype, "shape": pred.shape},
        {"name": "risk_score", "datatype": "FP32", "shape": batch_only},
        {"name": "flagged", "datatype": "BOOL", "shape": batch_only},
        *component_specs(mv.meta),  # a composed model's risk components (service.components)
    ]
    parameters = {"max_batch_size": mv.max_batch_size, "risk_threshold": mv.risk_threshold,
                  "wrapper": mv.meta.get("wrapper"), "state": mv.status()["state"]}
    if mv.calibration is not None:  # a calibrated bundle: its extra outputs, coverage and sample count
        outputs += mv.calibration.metadata(outputs[0])
        parameters.update(mv.calibration.parameters(), risk_percentile_threshold=mv.risk_percentile_threshold)
    versions = sorted(manager.models.get(mv.name, {}))
    return ModelMetadata(
        name=mv.name, versions=[str(v) for v in versions], platform="pytorch_capsa",
        inputs=[TensorMetadata.model_validate(mv.input.model_dump())],
        outputs=[TensorMetadata.model_validate(o) for o in outputs],
        parameters=parameters,
    )


@router.get("/v2/models/{model_name}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
async def model_metadata(model_name: str, manager: ManagerDep) -> ModelMetadata:
    """Inputs and outputs of the model's default (highest ready) version; ``flagged`` needs a risk threshold."""
    return model_metadata_of(manager, lookup(manager, model_name, None))


@router.get("/v2/models/{model_name}/versions/{model_version}", response_model=ModelMetadata,
            responses=ERRORS, summary="Model version metadata")
async def model_version_metadata(model_name: str, model_version: str, manager: ManagerDep) -> ModelMetadata:
    """Inputs and outputs of one model version."""
    return model_metadata_of(manager, lookup(manager, model_name, model_version))


def _ready(mv: ModelVersion) -> Response:
    body = orjson.dumps({"name": mv.name, "ready": mv.ready})
    return Response(body, status_code=200 if mv.ready else 503, media_type="application/json")


@router.get("/v2/models/{model_name}/ready", response_model=ModelReadyResponse, responses=ERRORS,
            summary="Model readiness")
async def model_ready(model_name: str, manager: ManagerDep) -> Response:
    """200 when the model's default version is loaded and warm, else 503."""
    return _ready(lookup(manager, model_name, None))


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", response_model=ModelReadyResponse,
            responses=ERRORS, summary="Model version readiness")
async def model_version_ready(model_name: str, model_version: str, manager: ManagerDep) -> Response:
    """200 when the model version is loaded and warm, else 503."""
    return _ready(lookup(manager, model_name, model_version))


_INFER_DOC: dict[str, Any] = {
    "response_model": InferResponseBody,
    "responses": ERRORS,
    "openapi_extra": request_body(InferRequestBody, ("application/json", "application/octet-stream")),
    "dependencies": [InferAuth],
}


async def _infer(request: Request, manager: ModelManager, settings: Settings, name: str,
                 version: str | None) -> Response:
    ctx = request.scope.setdefault("capsa", {"request_id": request.headers.get("x-request-id", "")})
    mv = lookup(manager, name, version)
    header_length = request.headers.get(HEADER_LENGTH)
    with Accounted(mv, "rest") as accounted:
        body = await accounted.admit(mv, settings, ctx["request_id"], request.receive,
                                     *body_limit(settings, json=header_length is None))
        content, json_length = await v2_infer(mv, settings, ctx, body, header_length)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(json_length)})


@router.post("/v2/models/{model_name}/infer", summary="Inference", **_INFER_DOC)
async def model_infer(model_name: str, request: Request, manager: ManagerDep, settings: SettingsDep) -> Response:
    """Run the model on the request's input; returns prediction, risk, risk_score (and flagged).

    Accepts JSON tensors and the binary tensor data extension (``Inference-Header-Content-Length``).
    """
    return await _infer(request, manager, settings, model_name, None)


@router.post("/v2/models/{model_name}/versions/{model_version}/infer", summary="Inference on a version",
             **_INFER_DOC)
async def model_version_infer(model_name: str, model_version: str, request: Request, manager: ManagerDep,
                              settings: SettingsDep) -> Response:
    """Like ``/v2/models/{model_name}/infer``, on one model version."""
    return await _infer(request, manager, settings, model_name, model_version)
