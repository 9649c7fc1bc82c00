"""The KServe V2 ``GRPCInferenceService`` and ``grpc.health.v1``, on ``grpc.aio`` in the REST server's process and
event loop (uvloop), over the same inference path (:func:`service.inference.infer`).

A thin adapter: each RPC decodes its message into the objects REST uses (:class:`~service.protocol.InferRequest`,
the model lookup, the token checks, the shedding, the accounting), and every error is an
:class:`~service.errors.ApiError` whose gRPC status code comes from :data:`service.errors.GRPC_CODES`, the table
the HTTP statuses come from. So batching (gRPC and REST requests share one queue per model version), metrics,
limits, logs and request ids behave the same; the client's gRPC deadline counts when it is shorter than
``CAPSA_REQUEST_TIMEOUT_S``.

Tensors: inputs as ``raw_input_contents`` (what ``tritonclient.grpc`` sends) or typed ``contents``; outputs always
as ``raw_output_contents`` (what Triton answers; ``tritonclient.grpc``'s ``as_numpy`` reads them).

The stubs (``grpc_predict_v2_pb2*``) register the protocol's message names (``inference.*``) in protobuf's default
descriptor pool, as ``tritonclient.grpc``'s do: the two cannot be imported in one process (clients and servers run
in separate processes anyway).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import __version__
from service.edge import grpc_connection_cap
from service.errors import ApiError, internal_error
from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.inference import (
    Accounted,
    check_admin_token,
    check_infer_token,
    infer,
    load_model,
    lookup,
    unload_model,
)
from service.manager import ModelManager, ModelVersion
from service.protocol import (
    DATATYPES,
    InferRequest,
    InputTensor,
    ProtocolError,
    RequestedOutput,
    check_request_id,
    datatype_of,
    request_id_problem,
)
from service.settings import Settings

log = logging.getLogger("capsa.serve")

SERVICE = "inference.GRPCInferenceService"
_T = TypeVar("_T")

#: The typed-contents field of each datatype (FP16 travels only as raw contents).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_ALL_CONTENTS = (*sorted(set(CONTENTS_FIELD.values())), "bytes_contents")


def _parameter(value: Any) -> Any:
    """The Python value of an ``InferParameter`` (None when unset)."""
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def decode_request(request: pb.ModelInferRequest) -> InferRequest:
    """A ``ModelInferRequest`` as the protocol-neutral :class:`~service.protocol.InferRequest` (data not decoded
    yet: the signature is checked first, as over REST)."""
    if request.id:
        check_request_id(request.id)
    parameters = {key: _parameter(value) for key, value in request.parameters.items()}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    if not request.inputs:
        raise ProtocolError("'inputs' must be a non-empty list")
    inputs: dict[str, InputTensor] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if name in inputs:
            raise ProtocolError(f"input '{name}' appears twice")
        if datatype not in DATATYPES:
            raise ProtocolError(f"input '{name}': datatype {datatype!r} is not supported")
        if any(d < 0 for d in tensor.shape):
            raise ProtocolError(f"input '{name}': shape must be a list of non-negative integers")
        shape = tuple(tensor.shape)
        given = [f for f in _ALL_CONTENTS if len(getattr(tensor.contents, f))]
        if raw:
            if given:
                raise ProtocolError(f"input '{name}': give its data as raw_input_contents or as contents, not both")
            inputs[name] = InputTensor(name, datatype, shape, raw=memoryview(raw[i]))
            continue
        field = CONTENTS_FIELD.get(datatype)
        if field is None:
            raise ProtocolError(f"input '{name}': {datatype} data must be sent as raw_input_contents")
        if any(f != field for f in given):
            raise ProtocolError(f"input '{name}': {datatype} data goes in contents.{field}, not "
                                f"{', '.join('contents.' + f for f in given if f != field)}")
        inputs[name] = InputTensor(name, datatype, shape, data=list(getattr(tensor.contents, field)),
                                   maybe_bools=False)
    outputs = None
    if request.outputs:
        outputs = []
        seen = set()
        for out in request.outputs:
            if out.name in seen:
                raise ProtocolError(f"output '{out.name}' appears twice")
            seen.add(out.name)
            outputs.append(RequestedOutput(out.name, True))
    return InferRequest(request.id or None, inputs, outputs, parameters, True)


def encode_response(mv: ModelVersion, request_id: str | None,
                    outputs: list[tuple[str, np.ndarray, bool]]) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` of the outputs :func:`~service.inference.infer` returned, as raw contents."""
    response = pb.ModelInferResponse(model_name=mv.name, model_version=mv.version_str, id=request_id or "")
    for name, array, _ in outputs:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The V2 RPCs over the app's manager and settings (``state``: the FastAPI app's state)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.settings: Settings = state.settings
        self._prefix = os.urandom(4).hex()
        self._counter = 0

    @property
    def manager(self) -> ModelManager:
        return self.state.manager  # type: ignore[no-any-return]

    async def _serve(self, method: str, context: grpc.aio.ServicerContext,
                     handler: Callable[[dict[str, Any], dict[str, str]], Awaitable[_T]]) -> _T:
        """Run one RPC: request id, errors as gRPC status codes (one table with HTTP), the access log line."""
        start = time.perf_counter()
        metadata = {key: value for key, value in (context.invocation_metadata() or ())
                    if isinstance(value, str)}
        header_id = metadata.get("x-request-id")
        bad_id = None if header_id is None else request_id_problem(header_id, "x-request-id")
        if header_id is None or bad_id:
            self._counter += 1
            ctx: dict[str, Any] = {"request_id": f"{self._prefix}-g{self._counter}"}
        else:
            ctx = {"request_id": header_id}
        code = "OK"
        try:
            if bad_id:
                raise ApiError(400, bad_id)
            answer = await handler(ctx, metadata)
            context.set_trailing_metadata((("x-request-id", ctx["request_id"]),))  # as REST's X-Request-ID header
            return answer
        except ApiError as exc:
            code = exc.grpc_code
            await self._abort(context, ctx, code, exc.message)
        except ProtocolError as exc:  # outside the inference accounting (e.g. a bad request id)
            code = "INVALID_ARGUMENT"
            await self._abort(context, ctx, code, str(exc))
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            code = "CANCELLED"
            raise
        except Exception as exc:  # a bug: INTERNAL with the request id, the details in the log
            code = "INTERNAL"
            await self._abort(context, ctx, code, internal_error(exc, ctx["request_id"], method).message)
        finally:
            access = self.state.access_log
            if access is not None:
                access.log({
                    "request_id": ctx["request_id"], "method": "gRPC", "path": f"/{SERVICE}/{method}",
                    "status": code, "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "client": context.peer(),
                })
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, ctx: dict[str, Any], code: str, message: str) -> None:
        await context.abort(grpc.StatusCode[code], message, (("x-request-id", ctx["request_id"]),))

    # ------------------------------------------------------------------ health and metadata
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)
        return await self._serve("ServerLive", context, run)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.manager.readiness()[0])
        return await self._serve("ServerReady", context, run)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=lookup(self.manager, request.name, request.version or None).ready)
        return await self._serve("ModelReady", context, run)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        from service.routes.v2 import EXTENSIONS

        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name="capsa-serve", version=__version__, extensions=EXTENSIONS)
        return await self._serve("ServerMetadata", context, run)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        from service.routes.v2 import model_metadata_of

        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.ModelMetadataResponse:
            meta = model_metadata_of(self.manager, lookup(self.manager, request.name, request.version or None))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta.name, versions=meta.versions, platform=meta.platform,
                inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
                outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
            )
        return await self._serve("ModelMetadata", context, run)

    # ------------------------------------------------------------------ inference
    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.ModelInferResponse:
            settings = self.settings
            mv = not_found = None
            try:
                mv = lookup(self.manager, request.model_name, request.model_version or None)
            except ApiError as exc:  # answered after the token check: no model names to strangers
                not_found = exc
            with Accounted(mv, "grpc") as accounted:  # counts every outcome for a known model once
                check_infer_token(settings, md.get("authorization"))
                if mv is None:
                    assert not_found is not None
                    raise not_found
                await accounted.admit(mv, settings, ctx["request_id"])
                req = decode_request(request)
                remaining = context.time_remaining()
                deadline = remaining if remaining is not None and remaining < settings.request_timeout_s else None
                outputs = await infer(mv, settings, ctx, req, deadline)
                return encode_response(mv, req.id, outputs)
        return await self._serve("ModelInfer", context, run)

    # ------------------------------------------------------------------ repository (admin token)
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.RepositoryIndexResponse:
            check_admin_token(self.settings, md.get("authorization"))
            entries = await self.manager.index(ready_only=request.ready)
            return pb.RepositoryIndexResponse(models=[
                pb.RepositoryIndexResponse.ModelIndex(name=e["name"], version=str(e["version"]),
                                                      state=e["state"], reason=e.get("reason") or "")
                for e in entries
            ])
        return await self._serve("RepositoryIndex", context, run)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.RepositoryModelLoadResponse:
            check_admin_token(self.settings, md.get("authorization"))
            await load_model(self.manager, request.model_name)
            return pb.RepositoryModelLoadResponse()
        return await self._serve("RepositoryModelLoad", context, run)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        async def run(ctx: dict[str, Any], md: dict[str, str]) -> pb.RepositoryModelUnloadResponse:
            check_admin_token(self.settings, md.get("authorization"))
            await unload_model(self.manager, request.model_name)
            return pb.RepositoryModelUnloadResponse()
        return await self._serve("RepositoryModelUnload", context, run)


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped generated base
    """``grpc.health.v1.Health/Check`` for Kubernetes gRPC probes: the overall service (``""``) is SERVING while
    the process answers (liveness) and until shutdown; ``inference.GRPCInferenceService`` is SERVING when the
    server is ready under the readiness policy (``/v2/health/ready``)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.stopping = False

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse
        if request.service == "":
            ok = not self.stopping
        elif request.service == SERVICE:
            ok = not self.stopping and self.state.manager.readiness()[0]
        else:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:64]!r}")
        return status(status=status.SERVING if ok else status.NOT_SERVING)


class GrpcServer:
    """The gRPC server of an app: started by the app's lifespan on the running loop, stopped on SIGTERM together
    with the HTTP server (in-flight RPCs get CAPSA_DRAIN_TIMEOUT_S)."""

    def __init__(self, state: Any) -> None:
        settings: Settings = state.settings
        self.settings = settings
        self.health = HealthServicer(state)
        #: The connection cap (service.edge.grpc_connection_cap: REST and gRPC share the open-file budget). gRPC
        #: core closes a connection beyond it as soon as it is accepted, so the client sees UNAVAILABLE and may
        #: retry (another replica); the connections already open keep being served.
        self.max_connections = grpc_connection_cap(settings)
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.max_allowed_incoming_connections", self.max_connections),
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated
            InferenceServicer(state), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self._stopped: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen on CAPSA_HOST:CAPSA_GRPC_PORT; returns the port (RuntimeError if it cannot bind)."""
        host = self.settings.host
        address = f"[{host}]:{self.settings.grpc_port}" if ":" in host else f"{host}:{self.settings.grpc_port}"
        self.port = self.server.add_insecure_port(address)  # raises RuntimeError when it cannot bind
        if not self.port:
            raise RuntimeError(f"cannot listen on {address} (gRPC)")
        await self.server.start()
        log.info("listening (gRPC)", extra={"host": host, "port": self.port, "max_connections": self.max_connections})
        return self.port

    def stop(self) -> Awaitable[None]:
        """Stop accepting RPCs and let in-flight ones finish (bounded by CAPSA_DRAIN_TIMEOUT_S); idempotent."""
        if self._stopped is None:
            self.health.stopping = True
            self._stopped = asyncio.get_running_loop().create_task(
                self.server.stop(self.settings.drain_timeout_s))
        return asyncio.shield(self._stopped)
