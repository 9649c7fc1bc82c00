"""The error type every route answers with: an HTTP status and ``{"error": "<message>"}``."""

from __future__ import annotations

import logging

import orjson

log = logging.getLogger("capsa.serve")


class ApiError(Exception):
    """An error answer: HTTP ``status`` with ``{"error": message}`` and optional extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

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
