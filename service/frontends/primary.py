"""The primary process's side of ``CAPSA_HTTP_PROCESSES`` > 1: it starts and supervises the secondary HTTP front
ends, queues their forwarded tensors on the same batchers as its own requests, and sums everyone's metrics.

:class:`FrontendPool` is made by ``capsa-serve`` (service.cli) before uvicorn starts: it binds the private Unix
socket on which the primary also serves HTTP (the secondaries proxy every route but inference there), and
:meth:`FrontendPool.wrap` puts a thin ASGI layer around the app that starts the pool after the app's startup,
stops it (secondaries drained and exited) before the app's shutdown, answers ``/metrics`` with the sum over all
processes, and tags each response with ``X-Capsa-Frontend: 0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batching import NonFiniteOutput, ServeError
from service.frontends.channel import Channel
from service.frontends.messages import (
    Catalog,
    CatalogEntry,
    Forward,
    Forwarded,
    Hello,
    MetricsRequest,
    MetricsText,
    Refused,
)
from service.settings import Settings
from service.workers.messages import Outputs

log = logging.getLogger("capsa.serve.frontends")

FRONTEND_HEADER = b"x-capsa-frontend"
_CATALOG_EVERY_S = 0.1  # how often the primary looks for version changes to push to the secondaries
_METRICS_TIMEOUT_S = 5.0  # a secondary that does not answer a scrape within this is left out of it (and logged)
_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 10.0
_STABLE_AFTER_S = 30.0


def secondary_config(settings: Settings, *, index: int, port: int, forward_path: str, http_path: str) -> bytes:
    """What a secondary reads on its stdin: the settings (secrets included: a pipe, never the command line or the
    environment) and where to listen and connect."""
    values = settings.model_dump()
    for key, value in values.items():
        if hasattr(value, "get_secret_value"):
            values[key] = value.get_secret_value()
    values.update(port=port, http_processes=1, http_main_serves=True, grpc_port=0, devices="cpu", demo=False)
    return orjson.dumps({"settings": values, "index": index, "forward_path": forward_path, "http_path": http_path})


class FrontendPool:
    """The secondary front ends of one server, and the primary's end of their connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.http_processes - (1 if settings.http_main_serves else 0)  # secondaries
        self.dir = Path(tempfile.mkdtemp(prefix="capsa-frontends-"))  # 0700: only this user can connect
        self.forward_path = str(self.dir / "forward.sock")
        self.http_path = str(self.dir / "http.sock")
        self.http_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.http_socket.bind(self.http_path)
        self.http_socket.listen(256)
        self.http_socket.set_inheritable(False)
        self.port = 0  # the TCP port every front end binds (set by the CLI once the primary has bound it)
        self.state: Any = None
        self.stopping = False
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.channels: dict[int, Channel] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._catalog: tuple[CatalogEntry, ...] | None = None
        self._tokens = itertools.count(1)
        self._scrapes: dict[int, dict[int, asyncio.Future[str]]] = {}
        self._last: dict[Channel, str] = {}  # each connected secondary's latest exposition (pushed or scraped)
        self._retired = ""  # the counters and histograms of secondaries that exited, summed (see secondary_metrics)

    # ---------------------------------------------------------------- the app layer
    def wrap(self, app: ASGIApp) -> _PrimaryApp:
        """The app with the pool's ASGI layer around it (see the module docstring)."""
        return _PrimaryApp(app, self)

    # ---------------------------------------------------------------- lifecycle
    async def start(self, state: Any) -> None:
        """Listen for the secondaries, start them, and keep their catalog current."""
        self.state = state
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: Channel(self._received, self._lost),
                                                     path=self.forward_path)
        os.chmod(self.forward_path, 0o600)
        self._spawn(self._watch_catalog())
        for index in range(1, self.count + 1):
            self._spawn(self._supervise(index))
        log.info("HTTP front ends starting", extra={"processes": self.settings.http_processes, "port": self.port,
                                                    "main_serves": self.settings.http_main_serves})

    def signal(self, sig: int) -> None:
        """Pass a shutdown signal on to the secondaries (they drain their connections as the primary does)."""
        self.stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self) -> None:
        """Stop the secondaries (SIGTERM: they drain, while this process still batches for them), then close."""
        self.signal(signal.SIGTERM)
        limit = self.settings.drain_timeout_s + self.settings.shutdown_grace_s + 10.0
        waits = [proc.wait() for proc in self.procs.values()]
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=limit)
            for proc in self.procs.values():
                if proc.returncode is None:
                    log.error("a front end did not stop in time; killing it", extra={"pid": proc.pid})
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            self._server.close()
        for channel in list(self.channels.values()):
            channel.close()
        self.http_socket.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, index: int) -> None:
        """Run secondary ``index``; restart it (with backoff) whenever it exits, until the server stops."""
        loop = asyncio.get_running_loop()
        backoff = _BACKOFF_START_S
        while not self.stopping:
            started = loop.time()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "service.frontends.secondary", stdin=asyncio.subprocess.PIPE)
            except OSError as exc:
                log.error("cannot start a front end", extra={"frontend": index, "error": str(exc)})
            else:
                self.procs[index] = proc
                assert proc.stdin is not None
                proc.stdin.write(secondary_config(self.settings, index=index, port=self.port,
                                                  forward_path=self.forward_path, http_path=self.http_path))
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()
                proc.stdin.close()
                log.info("front end started", extra={"frontend": index, "pid": proc.pid})
                code = await proc.wait()
                if self.stopping:
                    return
                log.error("a front end exited; restarting it",
                          extra={"frontend": index, "pid": proc.pid, "exitcode": code, "backoff_s": backoff})
            if loop.time() - started > _STABLE_AFTER_S:
                backoff = _BACKOFF_START_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    # ---------------------------------------------------------------- the catalog
    def catalog(self) -> tuple[CatalogEntry, ...]:
        """The served versions as the secondaries need them."""
        entries = []
        for name, versions in self.state.manager.models.items():
            for version, mv in versions.items():
                config = mv.config.model_dump_json(exclude_none=True) if hasattr(mv.config, "model_dump_json") \
                    else "{}"
                entries.append(CatalogEntry(name, version, id(mv), str(mv.path), config, mv.state,
                                            mv.batcher.live_workers))
        return tuple(sorted(entries, key=lambda e: (e.name, e.version)))

    async def _watch_catalog(self) -> None:
        while True:
            current = self.catalog()
            if current != self._catalog:
                self._catalog = current
                for channel in self.channels.values():
                    channel.send(Catalog(current))
            await asyncio.sleep(_CATALOG_EVERY_S)

    # ---------------------------------------------------------------- messages
    def _received(self, channel: Channel, message: Any) -> None:
        if isinstance(message, Forward):
            self._forward(channel, message)
        elif isinstance(message, MetricsText):
            self._last[channel] = message.text
            future = self._scrapes.get(message.token, {}).get(channel.index)
            if future is not None and not future.done():
                future.set_result(message.text)
        elif isinstance(message, Hello):
            channel.index = message.index
            self.channels[message.index] = channel
            channel.send(Catalog(self.catalog()))
            log.info("front end connected", extra={"frontend": message.index, "pid": message.pid})
        else:
            log.error("unexpected message from a front end", extra={"type": type(message).__name__})

    def _lost(self, channel: Channel) -> None:
        if self.channels.get(channel.index) is channel:
            del self.channels[channel.index]
        last = self._last.pop(channel, "")
        if last:  # keep what it counted: a sum that went down would read as a counter reset
            self._retired = merge_expositions(self._retired, [last]).decode()
        for waiting in self._scrapes.values():
            future = waiting.get(channel.index)
            if future is not None and not future.done():
                future.set_result("")

    def _forward(self, channel: Channel, message: Forward) -> None:
        """Queue each forwarded request on its version's batcher, like a local one; answers go back gathered."""
        mv = self.state.manager.models.get(message.model, {}).get(message.version)
        for i, request_id in enumerate(message.request_ids):
            if mv is None:
                channel.send(Refused(request_id, "Unavailable", "this model version is no longer served; retry "
                                                                "later"))
                continue
            try:
                future = mv.batcher.submit(message.array[message.offsets[i]:message.offsets[i + 1]])
            except ServeError as exc:
                channel.send(Refused(request_id, type(exc).__name__, str(exc)))
                continue
            future.add_done_callback(functools.partial(self._answered, channel, id(mv), request_id))

    def _answered(self, channel: Channel, key: Hashable, request_id: int, future: asyncio.Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            kind = type(exc).__name__ if isinstance(exc, ServeError) else "ServeError"
            samples = tuple(exc.samples) if isinstance(exc, NonFiniteOutput) else ()
            channel.send(Refused(request_id, kind, str(exc), samples))
        else:
            channel.later(key, (request_id, future.result()), _send_answers)

    # ---------------------------------------------------------------- metrics
    async def secondary_metrics(self) -> list[str]:
        """Every connected secondary's own exposition, fresh (one that does not answer in time: its latest push,
        logged), plus what the secondaries that exited had counted.

        Secondaries push their exposition every second and at shutdown, and the primary keeps each one's latest,
        so a restarted front end's counts stay in the sum: exact after a clean stop, short of at most its last
        second's requests after a crash.
        """
        retired = [self._retired] if self._retired else []
        if not self.channels:
            return retired
        token = next(self._tokens)
        loop = asyncio.get_running_loop()
        waiting = {index: loop.create_future() for index in self.channels}
        self._scrapes[token] = waiting
        try:
            for index, channel in list(self.channels.items()):
                if not channel.send(MetricsRequest(token)):
                    waiting[index].set_result("")
            _, pending = await asyncio.wait(list(waiting.values()), timeout=_METRICS_TIMEOUT_S)
            if pending:
                log.warning("a front end did not send its metrics in time; this scrape has its latest push",
                            extra={"frontends": [i for i, f in waiting.items() if not f.done()]})
            return [text for text in self._last.values() if text] + retired
        finally:
            del self._scrapes[token]


def _send_answers(channel: Channel, key: Hashable, answers: list[Any]) -> None:
    """One frame with the rows of every request of one version answered in this turn of the loop."""
    ids = tuple(request_id for request_id, _ in answers)
    offsets = [0]
    for _, rows in answers:
        offsets.append(offsets[-1] + rows[0].shape[0])
    if len(answers) == 1:
        pred, risk, score, components = answers[0][1]
        outputs = Outputs(pred, risk, score, tuple(components.items()))
    else:
        names = list(answers[0][1][3])
        outputs = Outputs(np.concatenate([rows[0] for _, rows in answers]),
                          np.concatenate([rows[1] for _, rows in answers]),
                          np.concatenate([rows[2] for _, rows in answers]),
                          tuple((n, np.concatenate([rows[3][n] for _, rows in answers])) for n in names))
    channel.send(Forwarded(ids, outputs, tuple(offsets)))


def merge_expositions(primary: str, others: list[str]) -> bytes:
    """The primary's exposition with the counters and histograms of ``others`` added sample by sample.

    Gauges (states, readiness, pending requests, drift) are the primary's: it owns the model versions and every
    request's batch; counters and histograms (requests, failures, durations, risk scores) are counted where a
    request was served, so their sum over the processes is the server's truth.
    """
    families = {f.name: f for f in text_string_to_metric_families(primary)}
    index = {(s.name, tuple(sorted(s.labels.items()))): (f, i)
             for f in families.values() for i, s in enumerate(f.samples)}
    for text in others:
        for family in text_string_to_metric_families(text):
            if family.type not in ("counter", "histogram", "summary"):
                continue
            target = families.get(family.name)
            if target is None:
                families[family.name] = target = family
                for i, s in enumerate(family.samples):
                    index[(s.name, tuple(sorted(s.labels.items())))] = (family, i)
                continue
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                found = index.get(key)
                if found is None:
                    target.samples.append(sample)
                    index[key] = (target, len(target.samples) - 1)
                else:
                    fam, i = found
                    fam.samples[i] = fam.samples[i]._replace(value=fam.samples[i].value + sample.value)

    class _Merged:
        def collect(self) -> Any:
            return families.values()

    return generate_latest(_Merged())


class _PrimaryApp:
    """The pool's ASGI layer around the primary's app (see the module docstring)."""

    def __init__(self, app: ASGIApp, pool: FrontendPool) -> None:
        self.app = app
        self.pool = pool

    @property
    def state(self) -> Any:
        """The wrapped app's state (the edge server finds the gRPC server there)."""
        return self.app.state  # type: ignore[attr-defined]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            await self._metrics(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (FRONTEND_HEADER, b"0")]
            await send(message)

        await self.app(scope, receive, tagged)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the pool once the app has started (its manager exists); stop it before the app shuts down."""

        async def on_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    await self.pool.start(self.state)
                except Exception as exc:
                    log.error("cannot start the HTTP front ends", extra={"error": str(exc)})
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
            await send(message)

        async def on_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.pool.stop()
            return message

        await self.app(scope, on_receive, on_send)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's own ``/metrics`` answer (request id, access log), its body summed with the secondaries'."""
        others = await self.pool.secondary_metrics()
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200 and others:
            body = merge_expositions(body.decode(), others)
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
        headers += [(b"content-length", str(len(body)).encode()), (FRONTEND_HEADER, b"0")]
        await send({"type": "http.response.start", "status": start.get("status", 500), "headers": headers})
        await send({"type": "http.response.body", "body": body})
