"""Bounded clients: the connection layer under the app (uvicorn's httptools protocol and server, extended).

uvicorn by itself never times out a connection that has not finished sending a request (a client may trickle
headers or a body forever), does not cap connections (each holds a file descriptor: at the open-file limit the
server can neither answer health probes nor open a worker's pipe), and on SIGTERM closes idle keep-alive
connections at once (a request already on its way meets a reset). Here:

- **Header deadline** (``CAPSA_HEADER_TIMEOUT_S``): a connection must deliver a request's complete headers within
  this time from its start, or from the first byte of a request after a previous one; else 408 and close. Headers
  larger than ``CAPSA_MAX_HEADER_BYTES`` get 431 and close.
- **Body deadline** (``CAPSA_BODY_TIMEOUT_S``): the whole body must arrive within this time after the headers; else
  408 and close (the app's body reader sees the disconnect).
- **Connection cap** (``CAPSA_MAX_CONNECTIONS``): beyond it, a new connection gets 503 with ``Retry-After`` and is
  closed; the default leaves part of the open-file limit for worker pipes, registry files and logs, and the gRPC
  server's share (``CAPSA_MAX_GRPC_CONNECTIONS``, see :func:`grpc_connection_cap`).
- **Keep-alive**: idle connections close after ``CAPSA_KEEP_ALIVE_TIMEOUT_S`` (uvicorn's timer).
- **SIGTERM**: listening stops; idle keep-alive connections stay open for ``CAPSA_SHUTDOWN_GRACE_S`` and every
  answer from then on carries ``Connection: close``, so a client learns to go elsewhere from an answer, not a reset;
  then uvicorn's own drain (bounded by ``CAPSA_DRAIN_TIMEOUT_S``) runs.

Deadlines are enforced by one sweep over the connections twice a second (no timer per request): the hot path pays
for a few attribute stores per request.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger("capsa.serve")

#: File descriptors kept out of the connection cap's default: worker pipes and process handles, registry files,
#: logs, the listening socket (a quarter of the limit, between 64 and 1024).
FD_RESERVE_MIN, FD_RESERVE_MAX = 64, 1024

# Connection phases.
_HEAD, _BODY, _APP, _IDLE, _DONE = range(5)


def fd_connection_cap() -> int:
    """The largest connection cap the open-file limit allows, keeping :data:`FD_RESERVE_MIN`..
    :data:`FD_RESERVE_MAX` descriptors (a quarter of the limit) for everything else; also the default cap."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 16
    return max(8, soft - min(FD_RESERVE_MAX, max(FD_RESERVE_MIN, soft // 4)))


def grpc_connection_cap(settings: Settings, warn: bool = True) -> int:
    """The gRPC server's connection cap (0 when gRPC is off), the same budget rule as REST's: REST and gRPC
    connections together stay within :func:`fd_connection_cap`. CAPSA_MAX_GRPC_CONNECTIONS, by default a quarter of
    the budget (gRPC multiplexes any number of calls over one connection: ``tritonclient.grpc`` holds one per
    client), at most half of it (``warn``: log when a larger value is lowered); REST gets the rest."""
    if not settings.grpc_port:
        return 0
    budget = fd_connection_cap()
    largest = max(1, budget // 2)
    cap = settings.max_grpc_connections or max(1, budget // 4)
    if cap > largest:
        if warn:
            log.warning("CAPSA_MAX_GRPC_CONNECTIONS lowered to keep file descriptors for REST and the workers",
                        extra={"requested": cap, "max_grpc_connections": largest})
        cap = largest
    return cap


@dataclass(slots=True)
class EdgeLimits:
    """What the connection layer enforces (from :class:`~service.settings.Settings`)."""

    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_connections: int
    retry_after_s: int
    draining: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        """The limits of ``settings``; a connection cap above what the open-file limit allows, less the gRPC
        server's share, is lowered to it."""
        largest = fd_connection_cap() - grpc_connection_cap(settings, warn=False)
        cap = settings.max_connections or largest
        if cap > largest:
            log.warning("CAPSA_MAX_CONNECTIONS lowered to keep file descriptors for the workers",
                        extra={"requested": cap, "max_connections": largest})
            cap = largest
        return cls(settings.header_timeout_s, settings.body_timeout_s, settings.max_header_bytes, cap,
                   settings.retry_after_s)


def _answer(status: int, reason: bytes, message: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps({"error": message})
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n"
            % (status, reason, len(body), extra)) + body


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines, header size limit and connection cap of :mod:`service.edge`.

    ``limits`` is set on the subclass that :func:`protocol_class` makes for one server.
    """

    limits: EdgeLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _HEAD
        self._since = 0.0
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = self.loop.time()
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, b"Service Unavailable",
                         f"too many open connections (CAPSA_MAX_CONNECTIONS={self.limits.max_connections}); "
                         "retry later", b"retry-after: %d\r\n" % self.limits.retry_after_s)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _DONE:
            return
        if phase == _IDLE or (phase == _APP and self.cycle is not None and self.cycle.response_complete):
            self._phase = phase = _HEAD  # a new request on a kept-alive (or pipelined) connection
            self._since = self.loop.time()
            self._head_bytes = 0
        if phase == _HEAD:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._phase == _HEAD and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, b"Request Header Fields Too Large",
                         f"the request line and headers exceed {self.limits.max_header_bytes} bytes "
                         "(CAPSA_MAX_HEADER_BYTES)")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = _BODY
        self._since = self.loop.time()
        if self.limits.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # the answer says Connection: close

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._phase == _BODY:
            self._phase = _APP

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase == _APP:
            self._phase = _IDLE

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = _DONE
        super().connection_lost(exc)

    # ---------------------------------------------------------------- enforcement
    def idle(self) -> bool:
        """Between requests (or before the first byte): closing now loses no answer."""
        return self.cycle is None or self.cycle.response_complete

    def check_deadlines(self, now: float) -> None:
        """Close the connection if it is past its header or body deadline (called by the server's sweep)."""
        phase = self._phase
        if phase == _HEAD and now - self._since > self.limits.header_timeout_s:
            if self._head_bytes or self.cycle is not None:
                self._refuse(408, b"Request Timeout", f"the request headers did not arrive within "
                                                      f"{self.limits.header_timeout_s:g} s (CAPSA_HEADER_TIMEOUT_S)")
            else:  # never sent a byte: nothing to answer
                self._phase = _DONE
                self.transport.close()
        elif phase == _BODY and now - self._since > self.limits.body_timeout_s:
            self._refuse(408, b"Request Timeout", f"the request body did not arrive within "
                                                  f"{self.limits.body_timeout_s:g} s (CAPSA_BODY_TIMEOUT_S)")

    def _refuse(self, status: int, reason: bytes, message: str, extra: bytes = b"") -> None:
        """Answer ``status`` (unless a response already started) and close; the app, if running, sees a
        disconnect."""
        self._phase = _DONE
        cycle = self.cycle
        if not self.transport.is_closing():
            if cycle is None or not cycle.response_started:
                self.transport.write(_answer(status, reason, message, extra))
            self.transport.close()
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        _log_refusal(self.loop.time(), status, message, self.client[0] if self.client else None)


_last_refusal_log = -1e9
_refusals_not_logged = 0


def _log_refusal(now: float, status: int, message: str, client: str | None) -> None:
    """Log a refused connection, at most once a second (a flood must not flood the log); counts the others."""
    global _last_refusal_log, _refusals_not_logged
    if now - _last_refusal_log < 1.0:
        _refusals_not_logged += 1
        return
    log.warning("connection refused or closed", extra={"status": status, "why": message, "client": client,
                                                       "similar_since_last_line": _refusals_not_logged})
    _last_refusal_log = now
    _refusals_not_logged = 0


def protocol_class(limits: EdgeLimits) -> type[EdgeProtocol]:
    """An :class:`EdgeProtocol` subclass bound to ``limits`` (uvicorn instantiates the class it is given)."""
    return type("BoundEdgeProtocol", (EdgeProtocol,), {"limits": limits})


class EdgeServer(uvicorn.Server):
    """uvicorn's server plus the deadline sweep and the keep-alive-friendly SIGTERM (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, limits: EdgeLimits, shutdown_grace_s: float) -> None:
        super().__init__(config)
        self.limits = limits
        self.shutdown_grace_s = shutdown_grace_s

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s), plus the deadline sweep every 0.5 s."""
        if counter % 5 == 0:
            self.sweep()
        return await super().on_tick(counter)

    def sweep(self) -> None:
        """Close every connection past its header or body deadline."""
        now = asyncio.get_running_loop().time()
        for connection in list(self.server_state.connections):
            if isinstance(connection, EdgeProtocol):
                connection.check_deadlines(now)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop listening; answer what idle keep-alive connections still send, for a short grace, with
        ``Connection: close``; then uvicorn's drain."""
        connections = self.server_state.connections
        log.info("shutting down", extra={"connections": len(connections), "grace_s": self.shutdown_grace_s})
        self.limits.draining = True
        grpc_server = getattr(getattr(self.config.app, "state", None), "grpc", None)
        grpc_stopped = grpc_server.stop() if grpc_server is not None else None  # gRPC drains alongside HTTP
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(connections):
            cycle = getattr(connection, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
        sweeper = asyncio.get_running_loop().create_task(self._sweep_until_done())  # on_tick has stopped
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.shutdown_grace_s
            while (not self.force_exit and loop.time() < deadline
                   and any(isinstance(c, EdgeProtocol) and c.idle() for c in connections)):
                await asyncio.sleep(0.05)
            await super().shutdown(sockets)
            if grpc_stopped is not None:
                await grpc_stopped
        finally:
            sweeper.cancel()

    async def _sweep_until_done(self) -> None:
        """Keep enforcing the deadlines during the drain (a trickling body must not hold the shutdown)."""
        while True:
            self.sweep()
            await asyncio.sleep(0.5)
