"""A secondary HTTP front end (``python -m service.frontends.secondary``, started by the primary's
:class:`~service.frontends.primary.FrontendPool`, settings on stdin).

It listens on the server's port too (``SO_REUSEPORT``: the kernel spreads connections over the front ends) and
serves the inference routes itself with the same code as the primary (:class:`~service.fastpath.ServingMiddleware`
and :mod:`service.inference`: HTTP parsing, limits, request ids, decoding, validation, calibration, encoding,
access log, request metrics), against mirrors of the primary's model versions whose batcher is a
:class:`RemoteBatcher`: the checked input tensor goes to the primary, joins the version's one batcher there
(batches fill across front ends), and the request's own rows come back. Every other route (health, metrics,
repository, docs) is proxied to the primary over its private Unix socket, so those answers are the primary's. It
exits when the primary goes away, and drains its connections on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Hashable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import orjson
from prometheus_client import generate_latest
from starlette.types import Message, Receive, Scope, Send

from service.batching import (
    DeadlineExceeded,
    ModelError,
    NonFiniteOutput,
    QueueFull,
    Rows,
    ServeError,
    Unavailable,
)
from service.busypoll import LoopPoller
from service.errors import ApiError
from service.fastpath import ServingMiddleware
from service.frontends.channel import Channel
from service.frontends.messages import Catalog, Forward, Forwarded, Hello, MetricsRequest, MetricsText, Refused
from service.frontends.primary import FRONTEND_HEADER
from service.inference import read_body
from service.logging import AccessLog
from service.manager import LoadError, ModelManager, ModelVersion
from service.metrics import Metrics
from service.model_config import ConfigError, ModelConfig
from service.settings import Settings

log = logging.getLogger("capsa.serve.frontends")

_ERRORS: dict[str, type[ServeError]] = {cls.__name__: cls for cls in (
    ServeError, QueueFull, Unavailable, DeadlineExceeded, ModelError)}
_SAFETY_S = 5.0  # past the server's own deadline plus this, a forwarded request the primary never answered is 504
_CONNECT_TIMEOUT_S = 60.0
_PUSH_METRICS_S = 1.0  # how often the primary gets this front end's counts unasked (kept if this process dies)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"x-request-id",
               b"upgrade", b"te", b"trailer", b"proxy-connection", b"date", b"server"}


def _refusal(message: Refused) -> ServeError:
    """The primary batcher's error, rebuilt as the same ServeError class (so the answer has the same status)."""
    if message.error_kind == "NonFiniteOutput":
        return NonFiniteOutput(list(message.samples))
    return _ERRORS.get(message.error_kind, ServeError)(message.error)


class PrimaryLink:
    """This front end's connection to the primary: forwarded requests, catalog updates, metric scrapes."""

    def __init__(self, index: int, metrics: Metrics, busy_poll_s: float = 0.0) -> None:
        self.index = index
        self.metrics = metrics
        self.busy_poll_s = busy_poll_s  # CAPSA_BUSY_POLL_US: poll while forwarded requests are out (service.busypoll)
        self._poller: LoopPoller | None = None
        self.channel: Channel | None = None
        self.pending: dict[int, tuple[asyncio.Future[Rows], asyncio.TimerHandle]] = {}
        self._ids = itertools.count(1)
        self.catalog: Catalog | None = None
        self.first_catalog = asyncio.Event()
        self.on_catalog: Any = None
        self.on_lost: Any = None
        self._push_timer: asyncio.TimerHandle | None = None

    async def connect(self, path: str) -> None:
        """Connect to the primary and introduce this front end."""
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(lambda: Channel(self._received, self._lost), path)
        self.channel = channel
        if self.busy_poll_s > 0:
            self._poller = LoopPoller.of(loop, self.busy_poll_s)
        channel.send(Hello(self.index, os.getpid()))
        self._push_timer = loop.call_later(_PUSH_METRICS_S, self._push)

    def _push(self) -> None:
        self.push_metrics()
        if self.channel is not None:
            self._push_timer = asyncio.get_running_loop().call_later(_PUSH_METRICS_S, self._push)

    def push_metrics(self, token: int = 0) -> None:
        """Send this front end's exposition to the primary (``token``: the scrape asking for it; 0 unasked)."""
        if self.channel is not None:
            self.channel.send(MetricsText(token, generate_latest(self.metrics.registry).decode()))

    def forward(self, model: str, version: int, array: np.ndarray, timeout_s: float) -> asyncio.Future[Rows]:
        """Send a checked input to the primary's batcher; the future yields the request's own rows."""
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        if self.channel is None or not self.channel.open:
            raise Unavailable("the server's primary process is not reachable; retry later")
        self.channel.later((model, version, array.dtype.str, array.shape[1:]), (request_id, array), _send_requests)
        future: asyncio.Future[Rows] = loop.create_future()
        timer = loop.call_later(timeout_s + _SAFETY_S, self._expire, request_id)
        self.pending[request_id] = (future, timer)
        if self._poller is not None:
            self._poller.touch()
        return future

    def _expire(self, request_id: int) -> None:
        entry = self.pending.pop(request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(DeadlineExceeded("the server's primary process did not answer in time"))

    def _received(self, channel: Channel, message: Any) -> None:
        if self._poller is not None and isinstance(message, (Forwarded, Refused)):
            self._poller.touch()
        if isinstance(message, Forwarded):
            outputs, offsets = message.outputs, message.offsets
            for i, request_id in enumerate(message.request_ids):
                entry = self.pending.pop(request_id, None)
                if entry is not None:
                    entry[1].cancel()
                    if not entry[0].done():
                        entry[0].set_result(outputs.rows(offsets[i], offsets[i + 1]))
        elif isinstance(message, Refused):
            entry = self.pending.pop(message.request_id, None)
            if entry is not None:
                entry[1].cancel()
                if not entry[0].done():
                    entry[0].set_exception(_refusal(message))
        elif isinstance(message, Catalog):
            self.catalog = message
            if self.on_catalog is not None:
                self.on_catalog(message)
            self.first_catalog.set()
        elif isinstance(message, MetricsRequest):
            self.push_metrics(message.token)
        else:
            log.error("unexpected message from the primary", extra={"type": type(message).__name__})

    def _lost(self, channel: Channel) -> None:
        self.channel = None
        pending, self.pending = self.pending, {}
        for future, timer in pending.values():
            timer.cancel()
            if not future.done():
                future.set_exception(Unavailable("the server's primary process went away; retry later"))
        if self.on_lost is not None:
            self.on_lost()

    def close(self) -> None:
        """Send the final counts, then close the connection (what is queued is still written)."""
        if self._push_timer is not None:
            self._push_timer.cancel()
        self.push_metrics()
        if self.channel is not None:
            self.channel.close()


def _send_requests(channel: Channel, key: Hashable, requests: list[Any]) -> None:
    """One frame with every request of one version (and input shape) that arrived in this turn of the loop."""
    model, version = key[0], key[1]  # type: ignore[index]
    offsets = [0]
    for _, array in requests:
        offsets.append(offsets[-1] + array.shape[0])
    array = requests[0][1] if len(requests) == 1 else np.concatenate([a for _, a in requests])
    channel.send(Forward(model, version, tuple(r for r, _ in requests), array, tuple(offsets)))


class RemoteBatcher:
    """What :mod:`service.inference` needs of a version's batcher, served by the primary's real one."""

    def __init__(self, link: PrimaryLink, model: str, version: int, max_queue_size: int, timeout_s: float) -> None:
        self.link = link
        self.model = model
        self.version = version
        self.max_queue_size = max_queue_size
        self.timeout_s = timeout_s
        self.live_workers = 0  # the primary's count, from the catalog
        self.inflight = 0

    def full(self) -> bool:
        """This front end alone has a full queue's worth in flight (the primary's own queue answers 503 too)."""
        return self.inflight >= self.max_queue_size

    def pending_requests(self) -> int:
        """Requests this front end has forwarded and not yet had answered."""
        return self.inflight

    def submit(self, array: np.ndarray) -> asyncio.Future[Rows]:
        """Queue ``array`` on the primary's batcher of this version."""
        future = self.link.forward(self.model, self.version, array, self.timeout_s)
        self.inflight += 1
        future.add_done_callback(self._done)
        return future

    def _done(self, _: asyncio.Future[Rows]) -> None:
        self.inflight -= 1


class SecondaryApp:
    """The ASGI app of a secondary front end (see the module docstring)."""

    def __init__(self, settings: Settings, index: int, forward_path: str, http_path: str) -> None:
        self.settings = settings
        self.index = index
        self.tag = (FRONTEND_HEADER, str(index).encode())
        self.forward_path = forward_path
        self.http_path = http_path
        self.metrics = Metrics()
        self.link = PrimaryLink(index, self.metrics, settings.busy_poll_us / 1e6)
        self.state = SimpleNamespace(settings=settings, metrics=self.metrics, manager=None, grpc=None,
                                     access_log=AccessLog() if settings.access_log else None)
        self.serving = ServingMiddleware(self._proxy, state=self.state)
        self.client: httpx.AsyncClient | None = None
        self.mirrors: dict[tuple[str, int], tuple[int, ModelVersion]] = {}
        self.server: Any = None  # the uvicorn server, told to exit when the primary goes away
        self.stopping = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.tag]
            await send(message)

        await self.serving(scope, receive, tagged)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:
                    log.error("front end cannot start", extra={"frontend": self.index, "error": str(exc)})
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.stopping = True
                if self.client is not None:
                    await self.client.aclose()
                self.link.close()
                if self.state.access_log is not None:
                    self.state.access_log.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> None:
        self.state.manager = ModelManager(self.settings, self.metrics)
        self.link.on_catalog = self._apply
        self.link.on_lost = self._primary_lost
        await self.link.connect(self.forward_path)
        await asyncio.wait_for(self.link.first_catalog.wait(), _CONNECT_TIMEOUT_S)
        self.state.manager.started = True
        timeout = httpx.Timeout(self.settings.request_timeout_s + self.settings.drain_timeout_s + _SAFETY_S)
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=self.http_path),
                                        base_url="http://capsa-primary", timeout=timeout)
        log.info("front end serving", extra={"frontend": self.index, "pid": os.getpid()})

    def _primary_lost(self) -> None:
        if not self.stopping:
            log.error("the primary process went away; this front end exits", extra={"frontend": self.index})
            if self.server is not None:
                self.server.should_exit = True

    def _apply(self, catalog: Catalog) -> None:
        """Mirror the primary's served versions (rebuilt only when the primary replaced one)."""
        manager: ModelManager = self.state.manager
        by_name: dict[str, dict[int, ModelVersion]] = {}
        mirrors: dict[tuple[str, int], tuple[int, ModelVersion]] = {}
        for entry in catalog.versions:
            key = (entry.name, entry.version)
            known = self.mirrors.get(key)
            if known is not None and known[0] == entry.generation:
                mv = known[1]
            else:
                try:
                    config = ModelConfig.from_json(entry.config, source=f"{entry.name}/config.json")
                    mv = ModelVersion(entry.name, entry.version, Path(entry.path), config, self.settings,
                                      self.metrics, ["cpu"])
                except (LoadError, ConfigError, OSError) as exc:
                    log.error("front end cannot mirror a model version", extra={
                        "frontend": self.index, "model": entry.name, "version": entry.version, "error": str(exc)})
                    continue
                mv.batcher = RemoteBatcher(self.link, entry.name, entry.version,  # type: ignore[assignment]
                                           int(config.max_queue_size), self.settings.request_timeout_s)
                mv.metrics.pending.set_function(mv.batcher.pending_requests)
            mv.state = entry.state
            mv.batcher.live_workers = entry.live_workers  # type: ignore[misc]
            mirrors[key] = (entry.generation, mv)
            by_name.setdefault(entry.name, {})[entry.version] = mv
        for name in set(manager.models) - set(by_name):
            manager._publish(name, None)
        for name, versions in by_name.items():
            manager._publish(name, versions)
        self.mirrors = mirrors

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Everything but inference: the primary's own answer, over its Unix socket."""
        if scope["type"] != "http":
            return
        try:
            body = await read_body(receive, self.settings.max_request_bytes)
        except ApiError as exc:
            await _answer_error(send, exc)
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        headers.append((b"x-request-id", scope["capsa"]["request_id"].encode("latin-1")))
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        assert self.client is not None
        try:
            response = await self.client.request(scope["method"], target.decode("latin-1"), headers=headers,
                                                 content=body)
        except httpx.HTTPError as exc:
            await _answer_error(send, ApiError(
                503, f"the server's primary process did not answer ({type(exc).__name__}); retry later",
                {"Retry-After": str(self.settings.retry_after_s)}))
            return
        out = [(k, v) for k, v in response.headers.raw
               if k.lower() not in _HOP_BY_HOP and k.lower() != FRONTEND_HEADER]
        content = response.content
        out.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": content})


async def _answer_error(send: Send, exc: ApiError) -> None:
    """``exc`` in the JSON error form (the serving middleware's ``send`` adds the request id)."""
    body = exc.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> int:
    """Run one secondary front end (its configuration on stdin, from the primary); returns the exit status."""
    from service.cli import bind_tcp, run_server
    from service.logging import configure_logging

    config = orjson.loads(sys.stdin.buffer.read())
    settings = Settings(**config["settings"])
    configure_logging(settings.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied request (the access log has it)
    np.seterr(over="ignore")  # as in the primary (service.cli): an overflow is an inf to refuse, not a warning
    app = SecondaryApp(settings, int(config["index"]), config["forward_path"], config["http_path"])
    try:
        sock = bind_tcp(settings.host, settings.port, reuse_port=True)
    except OSError as exc:
        log.error("front end cannot listen", extra={"port": settings.port, "error": str(exc)})
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        started = run_server(app, settings, [sock], on_server=lambda server: setattr(app, "server", server))
    return 0 if started else 1


if __name__ == "__main__":
    sys.exit(main())
