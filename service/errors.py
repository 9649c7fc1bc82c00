"""The error type every route and RPC answers with: an HTTP status and ``{"error": "<message>"}`` over REST, the
status's gRPC code (:data:`GRPC_CODES`, the one table of both protocols) and the message over gRPC."""

from __future__ import annotations

import logging

import orjson

log = logging.getLogger("capsa.serve")


#: The one status table of both protocols (KServe's errors.py pattern): every HTTP status the server answers an
#: error with, and the name of the ``grpc.StatusCode`` the same error gets over gRPC.
GRPC_CODES: dict[int, str] = {
    400: "INVALID_ARGUMENT",  # a malformed or invalid request
    401: "UNAUTHENTICATED",  # a bearer token is missing or wrong
    403: "PERMISSION_DENIED",  # the repository routes are disabled (no admin token configured)
    404: "NOT_FOUND",  # no such model or version
    408: "DEADLINE_EXCEEDED",  # the body did not arrive in time
    409: "ABORTED",  # a load cancelled by an unload or a newer load
    413: "RESOURCE_EXHAUSTED",  # a request over the size limits
    431: "RESOURCE_EXHAUSTED",  # headers over the limit
    500: "INTERNAL",  # the model failed, or a bug
    503: "UNAVAILABLE",  # queue full, model version unavailable, worker died, draining
    504: "DEADLINE_EXCEEDED",  # the request's deadline passed
}


class ApiError(Exception):
    """An error answer: HTTP ``status`` with ``{"error": message}`` and optional extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

    @property
    def grpc_code(self) -> str:
        """The name of the ``grpc.StatusCode`` of this error (:data:`GRPC_CODES`)."""
        return GRPC_CODES.get(self.status, "INTERNAL" if self.status >= 500 else "INVALID_ARGUMENT")

    def body(self) -> bytes:
        """The JSON body."""
        return orjson.dumps({"error": self.message})


def body_too_large(limit: int, json: bool = False) -> ApiError:
    """The 413 answer for a body over ``limit`` bytes (``json``: the JSON body limit)."""
    setting = "CAPSA_MAX_JSON_REQUEST_BYTES" if json else "CAPSA_MAX_REQUEST_BYTES"
    return ApiError(413, f"the request body exceeds the limit of {limit} bytes ({setting})")


def internal_error(exc: BaseException, request_id: str | None, path: str) -> ApiError:
    """Log an unexpected exception with its details; the client gets a generic 500 naming the request id."""
    log.error("unhandled error", exc_info=exc, extra={"path": path, "request_id": request_id})
    return ApiError(500, f"internal error (request id {request_id}); the server log has the details")
