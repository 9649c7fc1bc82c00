"""The error type every route answers with: an HTTP status and ``{"error": "<message>"}``."""

from __future__ import annotations

import orjson


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


def body_too_large(limit: int) -> ApiError:
    """The 413 answer for a body over ``limit`` bytes."""
    return ApiError(413, f"the request body exceeds the limit of {limit} bytes (CAPSA_MAX_REQUEST_BYTES)")
