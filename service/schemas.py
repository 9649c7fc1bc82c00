"""Pydantic models of the HTTP API, for the OpenAPI docs and the metadata routes.

The inference routes do not validate with these (they decode the raw body with orjson and numpy, see
:mod:`service.protocol`); the models document the same wire format.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Data = list[Any]


class ErrorResponse(BaseModel):
    """Every error answer: a message that names the field or model at fault."""

    error: str = Field(examples=["input 'x': shape [2, 3] does not match the model's [-1, 1]"])


class TensorMetadata(BaseModel):
    """An input or output of a model: name, V2 datatype and shape (-1 for variable dimensions)."""

    name: str
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[-1, 1]])


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{model}``: outputs are prediction, risk, risk_score and (with a threshold) flagged."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(default_factory=dict)


class LiveResponse(BaseModel):
    """``GET /v2/health/live``."""

    live: bool


class NotReadyModel(BaseModel):
    """A model version that is not ready, with a generic reason (details in the log and the repository index)."""

    name: str
    version: str
    reason: str


class ReadyResponse(BaseModel):
    """``GET /v2/health/ready``: 200 when ready under the readiness policy, else 503."""

    ready: bool
    reason: str | None = Field(None, description="Why the server is not ready, when no single model explains it.")
    models: list[NotReadyModel] | None = Field(None, description="The model versions that are not ready, and why.")


class ModelReadyResponse(BaseModel):
    """``GET /v2/models/{model}/ready``: 200 when ready, else 503."""

    name: str
    ready: bool


class InferInputTensor(BaseModel):
    """A request tensor: ``data`` flat or nested (row-major), or ``parameters.binary_data_size`` bytes after the
    JSON header (binary tensor data extension)."""

    name: str
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[2, 1]])
    parameters: dict[str, Any] | None = Field(None, examples=[{"binary_data_size": 8}])
    data: Data | None = Field(None, examples=[[0.5, 1.5]])


class InferRequestedOutput(BaseModel):
    """Selects an output (prediction, risk, risk_score, flagged); ``parameters.binary_data`` asks for binary."""

    name: str
    parameters: dict[str, Any] | None = None


class InferRequestBody(BaseModel):
    """A V2 inference request. ``parameters.risk_threshold`` adds the BOOL output ``flagged``;
    ``parameters.binary_data_output`` returns every output in binary."""

    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, examples=[{"risk_threshold": 0.5}])
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    """A response tensor, as JSON ``data`` or (``parameters.binary_data_size``) in binary after the header."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: Data | None = None


class InferResponseBody(BaseModel):
    """A V2 inference response."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutputTensor]


class PredictRequest(BaseModel):
    """``POST /v1/models/{model}:predict``: a list of samples (each one input row)."""

    instances: list[Any] = Field(examples=[[[0.5], [1.5]]])
    parameters: dict[str, Any] | None = Field(None, examples=[{"risk_threshold": 0.5}])


class PredictResponse(BaseModel):
    """Predictions with their per-element risk and per-sample risk score (and ``flagged`` with a threshold); a
    composed model adds its risk components (those its stack has: see ``service.components``)."""

    predictions: list[Any]
    risk: list[Any]
    risk_score: list[float]
    flagged: list[bool] | None = None
    risk_aleatoric: list[Any] | None = None
    risk_epistemic: list[Any] | None = None
    risk_novelty: list[Any] | None = None
    #: A calibrated bundle (capsa.calibrate): risk percentiles and intervals (regression) or sets (classification).
    risk_percentile: list[float] | None = None
    interval_lower: list[Any] | None = None
    interval_upper: list[Any] | None = None
    probabilities: list[Any] | None = None
    prediction_set: list[Any] | None = None


class RepositoryIndexRequest(BaseModel):
    """``POST /v2/repository/index``: ``ready`` true lists only the ready versions."""

    ready: bool = False


class RepositoryRequest(BaseModel):
    """Optional body of load/unload (Triton's ``parameters``; accepted and ignored)."""

    parameters: dict[str, Any] | None = None


class RepositoryIndexEntry(BaseModel):
    """A model version in the repository, with its state (READY, LOADING, UNAVAILABLE, UNLOADING)."""

    name: str
    version: str
    state: str
    reason: str = ""


def request_body(model: type[BaseModel], media_types: tuple[str, ...] = ("application/json",), *,
                 required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a request body that the route reads raw (the model goes in DOC_MODELS)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {mt: {"schema": schema} for mt in media_types}}}


DOC_MODELS: tuple[type[BaseModel], ...] = (InferRequestBody, PredictRequest, RepositoryIndexRequest,
                                           RepositoryRequest)
