"""The FastAPI application: routers wired explicitly, JSON errors, request ids and access logs, and a lifespan
that loads the registry's models into worker processes and stops them at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from service import __version__
from service.docs import install_offline_docs
from service.errors import ApiError, internal_error
from service.fastpath import ServingMiddleware
from service.logging import AccessLog
from service.manager import ModelManager
from service.metrics import Metrics
from service.routes import health, repository, v1, v2
from service.schemas import DOC_MODELS
from service.settings import Settings

log = logging.getLogger("capsa.serve")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


class _ServingApp(FastAPI):
    """FastAPI with :class:`~service.fastpath.ServingMiddleware` outermost, in front of FastAPI's own per-request
    work (its telemetry check reads the environment on every request, then three middlewares): measured at about
    8% of the HTTP process's time per inference request at c=32, none of which the inference fast path needs.
    Every other route still goes through all of FastAPI, behind the same request ids, limits and access log."""

    serving: ServingMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.serving is not None and scope["type"] == "http":
            await self.serving(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    """Build the app for ``settings``; the lifespan starts the model workers and stops them on shutdown."""
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = ModelManager(settings, metrics)
        app.state.manager = manager
        # Keep the startup heap (torch and capsa come in with the registry) out of the garbage collector's
        # sweeps: a full collection over it stalls the event loop for tens of milliseconds, a p99 killer.
        gc.collect()
        gc.freeze()
        try:
            names = await manager.open()
        except Exception as exc:  # an unreadable registry fails the startup (exit status 3)
            log.error("cannot read the model repository", extra={"root": settings.model_repository,
                                                                  "error": str(exc)})
            raise
        if settings.grpc_port:
            from service.grpc.server import GrpcServer

            app.state.grpc = GrpcServer(app.state)
            try:
                await app.state.grpc.start()
            except Exception as exc:
                log.error("cannot listen (gRPC)", extra={"host": settings.host, "port": settings.grpc_port,
                                                         "error": str(exc)})
                await manager.close()
                raise
        startup = asyncio.get_running_loop().create_task(manager.start(names))
        log.info("server starting", extra={"model_repository": settings.model_repository,
                                           "devices": manager.devices})
        try:
            yield
        finally:
            startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await startup
            if app.state.grpc is not None:
                await app.state.grpc.stop()
            await manager.close()
            log.info("workers stopped")
            if app.state.access_log is not None:
                app.state.access_log.flush()

    app = _ServingApp(
        title="capsa-serve",
        version=__version__,
        description="Predictions with per-sample risk from capsa-wrapped PyTorch models, over the KServe V2 "
                    "(Open Inference) protocol, with dynamic batching on worker processes.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served from local assets below, not from a CDN
    )
    install_offline_docs(app)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.grpc = None  # the gRPC server (service.grpc.server), started by the lifespan unless CAPSA_GRPC_PORT=0
    app.state.access_log = AccessLog() if settings.access_log else None
    for router in (health.router, v2.router, v1.router, repository.router):
        app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()
        )
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def unhandled_error(request: Request, exc: Exception) -> Response:
        request_id = request.scope.get("capsa", {}).get("request_id")
        error = internal_error(exc, request_id, request.url.path)
        return _error(error.status, error.message, {"X-Request-ID": request_id} if request_id else None)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in DOC_MODELS:
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(doc.pop("$defs", {}))
                components[model.__name__] = doc
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # A plain ASGI middleware, outside all of FastAPI (see _ServingApp): request ids, limits, access log, and the
    # inference fast path (service.fastpath).
    app.serving = ServingMiddleware(functools.partial(FastAPI.__call__, app), state=app.state)
    return app
