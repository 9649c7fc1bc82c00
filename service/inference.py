"""The inference path shared by the V2 and V1 routes: decode, validate, queue, await the batch, encode.

Framework-free (bytes in, bytes out, :class:`~service.errors.ApiError` for errors), so that the same code serves
the FastAPI routes and the pure-ASGI fast path of :mod:`service.fastpath`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from types import TracebackType
from typing import Any

import numpy as np
import orjson
from pydantic import SecretStr
from starlette.types import Receive

from service.batching import ModelError, NonFiniteOutput, ServeError
from service.calibrated import apply_calibration, check_calibrated_output, percentile_threshold
from service.components import unknown_output
from service.errors import ApiError, body_too_large
from service.manager import LoadCancelled, LoadError, ModelManager, ModelVersion, NotFound
from service.metrics import Protocol
from service.protocol import (
    InferRequest,
    ProtocolError,
    check_finite,
    check_input,
    check_signature,
    encode_infer_response,
    json_array,
    parse_infer_request,
)
from service.settings import Settings

log = logging.getLogger("capsa.serve")

OUTPUT_NAMES = ("prediction", "risk", "risk_score", "flagged")


def _bearer_matches(authorization: str | None, token: SecretStr) -> bool:
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              token.get_secret_value().encode())


def check_infer_token(settings: Settings, authorization: str | None) -> None:
    """When CAPSA_INFER_TOKEN is set, require ``Authorization: Bearer <it>`` (else 401). ``authorization`` is the
    HTTP header or the gRPC ``authorization`` metadata."""
    token = settings.infer_token
    if token is not None and not _bearer_matches(authorization, token):
        raise ApiError(401, "a valid 'Authorization: Bearer <inference token>' header is required",
                       {"WWW-Authenticate": "Bearer"})


def check_admin_token(settings: Settings, authorization: str | None) -> None:
    """The repository routes and RPCs: 403 when no CAPSA_ADMIN_TOKEN is configured, 401 when the bearer token is
    missing or wrong."""
    if settings.admin_token is None:
        raise ApiError(403, "the repository routes are disabled: no admin token is configured (CAPSA_ADMIN_TOKEN)")
    if not _bearer_matches(authorization, settings.admin_token):
        raise ApiError(401, "a valid 'Authorization: Bearer <admin token>' header is required",
                       {"WWW-Authenticate": "Bearer"})


def json_body_limit(settings: Settings) -> int:
    """The body limit of JSON requests: CAPSA_MAX_JSON_REQUEST_BYTES, or CAPSA_MAX_REQUEST_BYTES if lower."""
    return min(settings.max_json_request_bytes, settings.max_request_bytes)


def body_limit(settings: Settings, json: bool) -> tuple[int, bool]:
    """``(limit, names_json)`` for a request body: JSON bodies (V1, V2 without binary data) get `json_body_limit`,
    binary V2 the whole CAPSA_MAX_REQUEST_BYTES; ``names_json``: a 413 names the JSON setting (the lower one)."""
    if not json:
        return settings.max_request_bytes, False
    limit = json_body_limit(settings)
    return limit, limit < settings.max_request_bytes


async def read_body(receive: Receive, limit: int, json: bool = False) -> bytes:
    """The whole body from the ASGI ``receive``, refusing (413) more than ``limit`` even without a Content-Length
    (``json``: the 413 names the JSON setting). The one body reader of the HTTP edge (middleware and routes).

    A client that sends too slowly is cut off by the connection's body deadline (:mod:`service.edge`): this
    loop then sees the disconnect.
    """
    message = await receive()
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise body_too_large(limit, json)
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit, json)
        chunks.append(chunk)
    return b"".join(chunks)


def lookup(manager: ModelManager, name: str, version: str | None) -> ModelVersion:
    """The served model version, or 404. A version is a canonical decimal: ``1``, never ``01``, ``+1`` or
    full-width digits."""
    if version is not None and not (version.isascii() and version.isdigit() and version[0] != "0"):
        raise ApiError(404, f"model '{name}' has no served version {version[:32]!r} (versions are positive "
                            "decimal integers without leading zeros)")
    try:
        return manager.resolve(name, version)
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None


async def load_model(manager: ModelManager, name: str) -> None:
    """(Re)load a model (the repository load route and RPC): 404 unknown, 409 cancelled by an unload or a newer
    load, 400 naming what failed (config.json and the field, a file, the load error)."""
    try:
        await manager.load(name)
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None
    except LoadCancelled as exc:
        raise ApiError(409, str(exc)) from None
    except LoadError as exc:
        raise ApiError(400, str(exc)) from None


async def unload_model(manager: ModelManager, name: str) -> None:
    """Stop serving a model (the repository unload route and RPC): 404 when it is unknown."""
    try:
        await manager.unload(name)
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None


def shed(mv: ModelVersion, settings: Settings, request_id: str) -> None:
    """Answer 503 at once, before the body is read or decoded, when the model version cannot take the request: it
    failed to load, or its queue is full. Cheap refusals keep goodput near capacity under overload."""
    if mv.batcher.full():
        raise ApiError(503, f"model '{mv.name}' version {mv.version}: the queue is full "
                            f"({mv.batcher.max_queue_size} requests); retry later",
                       {"Retry-After": str(settings.retry_after_s)})
    if mv.state == "UNAVAILABLE":
        raise _unavailable(mv, request_id, settings.retry_after_s)


def risk_threshold(mv: ModelVersion, parameters: dict[str, Any] | None) -> float | None:
    """The request's ``risk_threshold`` parameter, else the model's configured one, else None."""
    value = (parameters or {}).get("risk_threshold", mv.risk_threshold)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ProtocolError("parameters.risk_threshold must be a finite number >= 0 (risk is never negative)")
    return float(value)


def _unavailable(mv: ModelVersion, request_id: str, retry_after_s: int) -> ApiError:
    """The generic 503 for a version that failed to load; the reason goes to the log and the repository index."""
    log.warning("request to an unavailable model version", extra={
        "request_id": request_id, "model": mv.name, "version": mv.version, "reason": mv.reason})
    return ApiError(503, f"model '{mv.name}' version {mv.version} is unavailable (request id {request_id}); "
                         "the server log and the repository index say why", {"Retry-After": str(retry_after_s)})


async def _run(mv: ModelVersion, name: str, array: np.ndarray, threshold: float | None,
               request_id: str, retry_after_s: int, deadline_s: float | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Run one input (checked against the signature and for finiteness by the caller) through the batcher, return
    its own rows (prediction, risk, score, flagged, risk components by output name). The batcher refuses rows that
    are not finite and records the served risk scores, once per batch.

    ``deadline_s`` (the client's deadline, when it has one shorter than CAPSA_REQUEST_TIMEOUT_S): past it the
    request is dropped from the queue and answered 504 / DEADLINE_EXCEEDED."""
    if mv.state == "UNAVAILABLE":
        raise _unavailable(mv, request_id, retry_after_s)
    try:
        future = mv.batcher.submit(array)
        if deadline_s is None:
            pred, risk, score, components = await future
        else:
            pred, risk, score, components = await asyncio.wait_for(future, deadline_s)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        raise ApiError(504, f"model '{mv.name}' version {mv.version}: the request's own deadline "
                            f"({deadline_s:g} s) passed before the model answered") from None
    except NonFiniteOutput as exc:
        # A NaN score would compare False with any threshold (and be null in JSON): serving it would report the
        # most out-of-range input as the least risky, so the request is refused instead.
        raise ProtocolError(f"input '{name}': {exc} (the input is outside the range the model can compute, so its "
                            "risk is unbounded); the request is refused rather than answered with a meaningless "
                            "risk") from None
    except ModelError as exc:
        log.error("the model failed on a request", extra={
            "request_id": request_id, "model": mv.name, "version": mv.version, "error": str(exc)})
        raise ApiError(500, f"model '{mv.name}' version {mv.version} failed on this request (request id "
                            f"{request_id}); the server log has the details") from None
    except ServeError as exc:
        headers = {"Retry-After": str(retry_after_s)} if exc.status == 503 else None
        raise ApiError(exc.status, f"model '{mv.name}' version {mv.version}: {exc}", headers) from None
    flagged = mv.metrics.flag(score, threshold)
    missing = [n for n in mv.components if n not in components]
    if missing:  # capsa.json and the model disagree: a damaged or hand-edited bundle
        raise ApiError(500, f"model '{mv.name}' version {mv.version}: the model returned no {missing} although "
                            "its capsa.json lists them (re-save the bundle with capsa.save_bundle)")
    return pred, risk, score, flagged, components


async def v2_infer(mv: ModelVersion, settings: Settings, ctx: dict[str, Any], body: bytes,
                   header_length: str | None) -> tuple[bytes, int | None]:
    """Serve a V2 infer request body for ``mv`` (see :func:`lookup`); returns the response body and its JSON
    header length (binary outputs). The REST adapter of :func:`infer`; call it inside :class:`Accounted`."""
    try:
        length = int(header_length) if header_length is not None else None
    except ValueError:
        shown = (header_length or "")[:32]
        raise ProtocolError(f"Inference-Header-Content-Length {shown!r} is not an integer") from None
    if length is not None and length > json_body_limit(settings):
        raise ApiError(413, f"the JSON header exceeds the limit of {json_body_limit(settings)} bytes "
                            "(CAPSA_MAX_JSON_REQUEST_BYTES)")
    req = parse_infer_request(body, length)
    outputs = await infer(mv, settings, ctx, req)
    return encode_infer_response(mv.name, mv.version_str, req.id, outputs)


async def infer(mv: ModelVersion, settings: Settings, ctx: dict[str, Any], req: InferRequest,
                deadline_s: float | None = None) -> list[tuple[str, np.ndarray, bool]]:
    """The protocol-neutral inference path: a parsed request in (from REST or gRPC), ``(name, array, binary)``
    outputs out, in the order the request asked for (all outputs when it named none).

    Everything cheap is checked before the tensor data is decoded: the requested outputs, the threshold, the
    input's name, datatype, shape and batch size. ``ctx["request_id"]`` is set to the request's ``id`` when it has
    one (for the access log). ``deadline_s``: the client's own deadline (gRPC), when shorter than the server's.
    Call it inside :class:`Accounted`.
    """
    if req.id is not None:
        ctx["request_id"] = req.id
    if len(req.inputs) != 1 or mv.input.name not in req.inputs:
        raise ProtocolError(
            f"model '{mv.name}' takes one input named '{mv.input.name}', the request has {sorted(req.inputs)}"
        )
    threshold = risk_threshold(mv, req.parameters)
    where = f"model '{mv.name}' version {mv.version}"
    pthreshold = percentile_threshold(mv.calibration, mv.risk_percentile_threshold, req.parameters, where)
    if pthreshold is not None:  # a calibrated model flags by risk percentile instead (service.calibrated)
        threshold = None
    flagging = threshold is not None or pthreshold is not None
    components = mv.components
    calibrated = mv.calibration.outputs if mv.calibration is not None else ()
    if req.outputs is None:
        wanted = [(n, req.binary_output)
                  for n in (*OUTPUT_NAMES[: 4 if flagging else 3], *components, *calibrated)]
    else:
        wanted = [(o.name, o.binary) for o in req.outputs]
        for out_name, _ in wanted:
            if out_name not in OUTPUT_NAMES and out_name not in components and out_name not in calibrated:
                check_calibrated_output(mv.calibration, out_name, where)
                raise unknown_output(out_name, (*OUTPUT_NAMES, *components, *calibrated))
            if out_name == "flagged" and not flagging:
                raise ProtocolError("output 'flagged' needs parameters.risk_threshold (the model sets none)")
    tensor = req.inputs[mv.input.name]
    check_signature(tensor.name, tensor.datatype, tensor.shape, mv.input.datatype, mv.input.shape,
                    max_batch_size=mv.max_batch_size)
    array = tensor.decode()  # of the declared shape and datatype, which check_signature accepted
    if not mv.allow_non_finite:
        check_finite(tensor.name, array)
    pred, risk, score, flagged, served = await _run(mv, tensor.name, array, threshold,
                                                    ctx["request_id"], settings.retry_after_s, deadline_s)
    by_percentile, extra = apply_calibration(mv, pred, risk, score, pthreshold, frozenset(n for n, _ in wanted))
    flagged = flagged if by_percentile is None else by_percentile
    tensors = {"prediction": pred, "risk": risk, "risk_score": score, **served, **extra}
    if flagged is not None:  # else "flagged" is not wanted (checked above)
        tensors["flagged"] = flagged
    return [(n, tensors[n], binary) for n, binary in wanted]


async def v1_predict(mv: ModelVersion, settings: Settings, ctx: dict[str, Any], body: bytes) -> bytes:
    """Serve a V1 ``{"instances": [...]}`` body; returns ``{"predictions", "risk", "risk_score"[, "flagged"]}``
    and, for a composed model, its risk components (``risk_aleatoric``, ...). Call it inside :class:`Accounted`."""
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
    pthreshold = percentile_threshold(mv.calibration, mv.risk_percentile_threshold, parameters,
                                      f"model '{mv.name}' version {mv.version}")
    if pthreshold is not None:  # a calibrated model flags by risk percentile instead (service.calibrated)
        threshold = None
    instances = req["instances"]
    if len(instances) > mv.max_batch_size:
        raise ProtocolError(f"'instances': batch size {len(instances)} exceeds the model's max_batch_size "
                            f"{mv.max_batch_size}")
    array = json_array("instances", instances, mv.input.datatype,
                       maybe_bools=b"true" in body or b"false" in body)
    check_input("instances", mv.input.datatype, array, mv.input.datatype, mv.input.shape,
                max_batch_size=mv.max_batch_size, allow_non_finite=mv.allow_non_finite)
    pred, risk, score, flagged, served = await _run(mv, "instances", array, threshold,
                                                    ctx["request_id"], settings.retry_after_s)
    names = frozenset(mv.calibration.outputs) if mv.calibration is not None else frozenset()
    by_percentile, extra = apply_calibration(mv, pred, risk, score, pthreshold, names)
    flagged = flagged if by_percentile is None else by_percentile
    result = {"predictions": pred, "risk": risk, "risk_score": score, **extra}
    if flagged is not None:
        result["flagged"] = flagged
    result.update((n, served[n]) for n in mv.components)
    return orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)


class Accounted:
    """Counts one inference request's outcome for its model version exactly once, whatever the protocol and
    wherever it fails: ``with Accounted(mv, protocol) as request:`` around everything from the moment the model
    version is known (token, body limit, shedding, body, decode, the model, encode). A success when the block
    ends normally, else a failure (any error answer, a cancellation); ``mv`` None (an unknown model) counts
    nothing. :meth:`admit` marks admission, where the request duration starts. Bad input
    (:class:`~service.protocol.ProtocolError`) leaves as a 400 :class:`~service.errors.ApiError`.

    A plain class rather than a generator context manager: it runs on every request.
    """

    __slots__ = ("_metrics", "_start")

    def __init__(self, mv: ModelVersion | None, protocol: Protocol) -> None:
        self._metrics = mv.metrics.requests[protocol] if mv is not None else None
        self._start = 0.0

    def __enter__(self) -> Accounted:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        m = self._metrics
        if m is not None:
            (m.success if exc_type is None else m.failure).inc()
            if self._start:
                m.duration.observe(time.perf_counter() - self._start)
        if isinstance(exc, ProtocolError):
            raise ApiError(400, str(exc)) from None

    async def admit(self, mv: ModelVersion, settings: Settings, request_id: str, receive: Receive | None = None,
                    limit: int = 0, json: bool = False) -> bytes:
        """Admit the request to ``mv``: shed it (503) when the version is saturated or failed to load, then read
        its body from ``receive`` under ``limit`` (HTTP; gRPC has it already, and gets ``b""``)."""
        shed(mv, settings, request_id)
        body = b"" if receive is None else await read_body(receive, limit, json)
        self._start = time.perf_counter()
        return body
