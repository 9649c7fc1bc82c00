"""The inference path shared by the V2 and V1 routes: decode, validate, queue, await the batch, encode.

Framework-free (bytes in, bytes out, :class:`~service.errors.ApiError` for errors), so that the same code serves
the FastAPI routes and the pure-ASGI fast path of :mod:`service.fastpath`.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from service.batching import ServeError
from service.errors import ApiError
from service.manager import ModelManager, ModelVersion, NotFound
from service.protocol import DATATYPES, ProtocolError, check_input, decode_infer_request, encode_infer_response
from service.settings import Settings

OUTPUT_NAMES = ("prediction", "risk", "risk_score", "flagged")


def check_infer_token(settings: Settings, authorization: str | None) -> None:
    """When CAPSA_INFER_TOKEN is set, require ``Authorization: Bearer <it>`` (else 401)."""
    token = settings.infer_token
    if token is None:
        return
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                             token.get_secret_value().encode()):
        raise ApiError(401, "a valid 'Authorization: Bearer <inference token>' header is required",
                       {"WWW-Authenticate": "Bearer"})


def lookup(manager: ModelManager, name: str, version: str | None) -> ModelVersion:
    """The served model version, or 404."""
    try:
        return manager.resolve(name, version)
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None


def risk_threshold(mv: ModelVersion, parameters: dict[str, Any] | None) -> float | None:
    """The request's ``risk_threshold`` parameter, else the model's configured one, else None."""
    value = (parameters or {}).get("risk_threshold", mv.risk_threshold)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError("parameters.risk_threshold must be a finite number")
    return float(value)


async def _run(mv: ModelVersion, name: str, datatype: str, array: np.ndarray, threshold: float | None,
               retry_after_s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate one input, run it through the batcher, return its own rows and record per-sample metrics."""
    if mv.state == "UNAVAILABLE":
        raise ApiError(503, f"model '{mv.name}' version {mv.version} is unavailable: {mv.reason}",
                       {"Retry-After": str(retry_after_s)})
    check_input(name, datatype, array, mv.input.datatype, mv.input.shape,
                max_batch_size=mv.max_batch_size, allow_non_finite=mv.allow_non_finite)
    try:
        pred, risk, score = await mv.batcher.submit(array)
    except ServeError as exc:
        headers = {"Retry-After": str(retry_after_s)} if exc.status == 503 else None
        raise ApiError(exc.status, f"model '{mv.name}' version {mv.version}: {exc}", headers) from None
    m = mv.metrics
    m.observe_risk(score)
    flagged = None
    if threshold is not None:
        flagged = score > threshold
        n_flagged = int(np.count_nonzero(flagged))
        if n_flagged:
            m.flagged.inc(n_flagged)
    return pred, risk, score, flagged


async def v2_infer(manager: ModelManager, settings: Settings, ctx: dict[str, Any], name: str,
                   version: str | None, body: bytes, header_length: str | None) -> tuple[bytes, int | None]:
    """Serve a V2 infer request body; returns the response body and its JSON header length (binary outputs).

    ``ctx["request_id"]`` is set to the request's ``id`` when it has one (for the access log).
    """
    mv = lookup(manager, name, version)
    with _accounted(mv):
        try:
            req = decode_infer_request(body, int(header_length) if header_length is not None else None)
        except ValueError as exc:  # ProtocolError, or a malformed Inference-Header-Content-Length
            raise ProtocolError(str(exc)) from None
        if req.id is not None:
            ctx["request_id"] = req.id
        if len(req.inputs) != 1 or mv.input.name not in req.inputs:
            raise ProtocolError(
                f"model '{mv.name}' takes one input named '{mv.input.name}', the request has {sorted(req.inputs)}"
            )
        threshold = risk_threshold(mv, req.parameters)
        if req.outputs is None:
            wanted = [(n, req.binary_output) for n in OUTPUT_NAMES[: 4 if threshold is not None else 3]]
        else:
            wanted = [(o.name, o.binary) for o in req.outputs]
            for out_name, _ in wanted:
                if out_name not in OUTPUT_NAMES:
                    raise ProtocolError(f"output '{out_name}' does not exist; outputs are {list(OUTPUT_NAMES)}")
                if out_name == "flagged" and threshold is None:
                    raise ProtocolError("output 'flagged' needs parameters.risk_threshold (the model sets none)")
        datatype, array = req.inputs[mv.input.name]
        pred, risk, score, flagged = await _run(mv, mv.input.name, datatype, array, threshold,
                                                settings.retry_after_s)
        tensors = {"prediction": pred, "risk": risk, "risk_score": score, "flagged": flagged}
        return encode_infer_response(mv.name, mv.version_str, req.id,
                                     [(n, tensors[n], binary) for n, binary in wanted])


async def v1_predict(manager: ModelManager, settings: Settings, name: str, body: bytes) -> bytes:
    """Serve a V1 ``{"instances": [...]}`` body; returns ``{"predictions", "risk", "risk_score"[, "flagged"]}``."""
    mv = lookup(manager, name, None)
    with _accounted(mv):
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"malformed JSON: {exc}") from None
        if not isinstance(req, dict) or not isinstance(req.get("instances"), list) or not req["instances"]:
            raise ProtocolError("'instances' must be a non-empty list")
        parameters = req.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ProtocolError("'parameters' must be an object")
        threshold = risk_threshold(mv, parameters)
        try:
            array = np.asarray(req["instances"], dtype=DATATYPES[mv.input.datatype])
        except (ValueError, TypeError, OverflowError) as exc:
            raise ProtocolError(f"'instances' is not a regular array of {mv.input.datatype}: {exc}") from None
        pred, risk, score, flagged = await _run(mv, "instances", mv.input.datatype, array, threshold,
                                                settings.retry_after_s)
        result = {"predictions": pred, "risk": risk, "risk_score": score}
        if flagged is not None:
            result["flagged"] = flagged
        return orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)


@contextlib.contextmanager
def _accounted(mv: ModelVersion) -> Iterator[None]:
    """Count the request as a success or failure of its model version, time it, and answer 400 to bad input."""
    start = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    except ProtocolError as exc:
        raise ApiError(400, str(exc)) from None
    finally:
        m = mv.metrics
        (m.success if ok else m.failure).inc()
        m.request_duration.observe(time.perf_counter() - start)
