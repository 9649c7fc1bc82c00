"""The outermost ASGI layer: request ids, the body-size limit, access logs, and the inference fast path.

Every request gets a request id (``X-Request-ID`` if the client sent one, else the V2 ``id``, else a generated one),
echoed in the ``X-Request-ID`` response header and written in its JSON access line; an ``X-Request-ID`` over
:data:`~service.protocol.MAX_ID_LENGTH` characters or not printable ASCII gets 400 (neither echoed nor logged).
A ``Content-Length`` over the limit gets 413 before any body is read: ``CAPSA_MAX_REQUEST_BYTES`` for V2 requests
with binary tensor data, the lower ``CAPSA_MAX_JSON_REQUEST_BYTES`` for JSON bodies. An inference request for a
model version whose queue is full (or that failed to load) gets 503 before its body is read or decoded.

The inference routes (``POST /v2/models/{m}[/versions/{v}]/infer`` and ``POST /v1/models/{m}:predict``) are served
right here, without FastAPI's routing and dependency injection (which cost more per request than the whole rest
of the inference path): the body is read raw and handed to :mod:`service.inference`, the same code the FastAPI
routes of those paths call. Those routes stay registered, so the OpenAPI docs describe them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, body_too_large, internal_error
from service.inference import Accounted, body_limit, check_infer_token, lookup, v1_predict, v2_infer
from service.logging import AccessLog
from service.protocol import request_id_problem

_JSON_TYPE = (b"content-type", b"application/json")
_BINARY = (b"content-type", b"application/octet-stream")


class ServingMiddleware:
    """Request ids, body limits, access log and the inference fast path (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, state: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: settings, manager (set by the lifespan)
        self.settings = state.settings
        self.limit = self.settings.max_request_bytes
        self.json_limit, self.json_named = body_limit(self.settings, json=True)  # json_named: which setting a 413 names
        self.access: AccessLog | None = state.access_log
        #: Serve the inference paths right here (False: let the FastAPI routes of the same paths serve them; tests
        #: compare the two).
        self.fast_routes = True
        state.serving = self
        self._prefix = os.urandom(4).hex()
        self._counter = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        header_id = length = authorization = header_length = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value
            elif key == b"x-request-id":
                header_id = value.decode("latin-1")
            elif key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"inference-header-content-length":
                header_length = value.decode("latin-1")
        bad_id = None if header_id is None else request_id_problem(header_id, "X-Request-ID")
        if header_id is None or bad_id:
            self._counter += 1
            ctx: dict[str, Any] = {"request_id": f"{self._prefix}-{self._counter}"}
            header_id = None
        else:
            ctx = {"request_id": header_id}
        scope["capsa"] = ctx
        route = _fast_route(scope) if scope["method"] == "POST" and self.fast_routes else None
        status = 500
        try:
            if route is None:
                status = await self._other(scope, receive, send, ctx, header_id, bad_id, length)
            else:
                status = await self._infer(route, receive, send, ctx, header_id, bad_id, length, authorization,
                                           header_length, scope["path"])
        finally:
            if self.access is not None:
                self.access.log({
                    "request_id": ctx["request_id"], "method": scope["method"], "path": scope["path"],
                    "status": status, "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "client": scope["client"][0] if scope.get("client") else None,
                })

    async def _other(self, scope: Scope, receive: Receive, send: Send, ctx: dict[str, Any], header_id: str | None,
                     bad_id: str | None, length: bytes | None) -> int:
        """Every route but inference: the id, the body limit, then the FastAPI app; returns the status sent."""
        status = 500
        echo = (header_id or ctx["request_id"]).encode("latin-1")

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", echo)]
            await send(message)

        error = ApiError(400, bad_id) if bad_id else None
        if error is None and length is not None and length.isdigit() and int(length) > self.limit:
            error = body_too_large(self.limit, False)
        if error is not None:
            return await self._error(send, error, echo)
        await self.app(scope, receive, send_with_id)
        return status

    async def _infer(self, route: tuple[str, str, str | None], receive: Receive, send: Send, ctx: dict[str, Any],
                     header_id: str | None, bad_id: str | None, length: bytes | None, authorization: str | None,
                     header_length: str | None, path: str) -> int:
        """An inference route, served here; every outcome for a known model is counted once (:class:`Accounted`).
        Returns the status sent (the echoed id is the request's ``id`` when it has one and no X-Request-ID)."""
        mv = not_found = None
        try:
            mv = lookup(self.state.manager, route[1], route[2])
        except ApiError as exc:  # answered after the token check: no model names to strangers
            not_found = exc
        limit, json = self.limit, False
        if route[0] == "v1" or header_length is None:  # binary V2 may use the whole limit
            limit, json = self.json_limit, self.json_named
        try:
            with Accounted(mv, "rest") as request:
                if bad_id:
                    raise ApiError(400, bad_id)
                if length is not None and length.isdigit() and int(length) > limit:
                    raise body_too_large(limit, json)
                check_infer_token(self.settings, authorization)
                if mv is None:
                    assert not_found is not None
                    raise not_found
                body = await request.admit(mv, self.settings, ctx["request_id"], receive, limit, json)
                if route[0] == "v2":
                    content, json_length = await v2_infer(mv, self.settings, ctx, body, header_length)
                else:
                    content, json_length = await v1_predict(mv, self.settings, ctx, body), None
        except ApiError as exc:
            return await self._error(send, exc, (header_id or ctx["request_id"]).encode("latin-1"))
        except Exception as exc:  # a bug: answer 500 in the same JSON form, and log it
            return await self._error(send, internal_error(exc, ctx["request_id"], path),
                                     (header_id or ctx["request_id"]).encode("latin-1"))
        echo = (header_id or ctx["request_id"]).encode("latin-1")
        if json_length is None:
            headers = [_JSON_TYPE, (b"content-length", str(len(content)).encode()), (b"x-request-id", echo)]
        else:
            headers = [_BINARY, (b"inference-header-content-length", str(json_length).encode()),
                       (b"content-length", str(len(content)).encode()), (b"x-request-id", echo)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        return 200

    @staticmethod
    async def _error(send: Send, exc: ApiError, echo: bytes) -> int:
        """Answer ``exc`` in the JSON error form with the request id; returns its status."""
        body = exc.body()
        headers = [_JSON_TYPE, (b"content-length", str(len(body)).encode()), (b"x-request-id", echo)]
        for key, value in (exc.headers or {}).items():
            headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return exc.status


def _fast_route(scope: Scope) -> tuple[str, str, str | None] | None:
    """("v2", model, version) or ("v1", model, None) for the inference paths, else None."""
    path: str = scope["path"]
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        parts = path.split("/")
        if len(parts) == 5 and parts[3]:
            return "v2", parts[3], None
        if len(parts) == 7 and parts[4] == "versions" and parts[3] and parts[5]:
            return "v2", parts[3], parts[5]
    elif path.startswith("/v1/models/") and path.endswith(":predict"):
        parts = path.split("/")
        if len(parts) == 4 and len(parts[3]) > len(":predict"):
            return "v1", parts[3][: -len(":predict")], None
    return None
