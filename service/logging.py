"""Structured logs: one JSON object per line on stderr, for access and error logs alike.

Fields passed with ``extra={...}`` become top-level keys, so an access line carries the request id, method, path,
status, duration and model.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line (timestamp, level, logger, message, extra fields, exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key != "color_message":
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "info") -> None:
    """Route the server's, uvicorn's and the root logger's records through the JSON formatter on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access log replaces it (it has the request id)


class AccessLog:
    """Access lines in the same JSON format, written in bulk: buffered and flushed every 50 ms or 64 lines.

    Going through ``logging`` costs tens of microseconds per request; this keeps the access log near free on the
    inference hot path (lines reach stderr at most 50 ms late; :meth:`flush` runs at shutdown).
    """

    def __init__(self, fd: int = 2, *, max_lines: int = 64, interval_s: float = 0.05) -> None:
        self.fd = fd
        self.max_lines = max_lines
        self.interval_s = interval_s
        self._lines: list[bytes] = []
        self._timer: Any = None
        self._second = -1
        self._stamp = ""

    def _ts(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def log(self, fields: dict[str, Any]) -> None:
        """Queue one access line (call on the event loop)."""
        entry = {"ts": self._ts(time.time()), "level": "info", "logger": "capsa.serve.access", "msg": "request"}
        entry.update(fields)
        self._lines.append(orjson.dumps(entry, default=str))
        if len(self._lines) >= self.max_lines:
            self.flush()
        elif self._timer is None:
            import asyncio

            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self.flush)

    def flush(self) -> None:
        """Write the buffered lines."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            data = b"\n".join(self._lines) + b"\n"
            self._lines.clear()
            try:
                while data:
                    data = data[os.write(self.fd, data) :]
            except OSError:
                pass
