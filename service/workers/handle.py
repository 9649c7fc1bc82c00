"""The parent's handle of one worker process, driven by the asyncio event loop (no threads, nothing blocking).

The worker's socket is an ``asyncio`` transport: writes are whole frames buffered by the transport (a write never
goes out in part and never raises ``BlockingIOError``), and reads go through :class:`~.codec.FrameReader` (a frame
may arrive in any number of pieces; a large array is received straight into its buffer). A worker is dead when its
process sentinel says so; the exit code is then reaped without blocking (``waitpid`` with ``WNOHANG``, retried on
a timer), never with ``join`` on the loop. An end of stream from a live process, a broken connection or a malformed
frame is an error: it is logged and the process is killed, so the usual exit path follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import socket
import time
from collections.abc import Callable

import numpy as np

from service.workers.child import worker_main
from service.workers.codec import FrameReader, encode
from service.workers.messages import LoadFailed, Message, Outcome, Ready, Result, RunBatch, Stop, WorkerSpec

log = logging.getLogger("capsa.serve.workers")

_EOF_GRACE_S = 5.0  # a worker that closed its socket must exit within this, else it is killed
_DRAIN_GRACE_S = 1.0  # after the process exited, how long to wait for the rest of what it wrote


class WorkerGone(ConnectionError):
    """The worker cannot take messages any more (it exited or is being torn down); ``on_exit`` follows."""


class _Protocol(asyncio.BufferedProtocol):
    """Feeds what arrives on the socket to the handle's frame reader."""

    def __init__(self, handle: WorkerProcess) -> None:
        self.handle = handle
        self.reader = FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handle._connected(transport)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            messages = self.reader.feed(nbytes)
        except Exception as exc:  # ProtocolError, or no memory for a frame: the stream is unusable
            self.handle._fatal(f"cannot read a frame from the worker: {type(exc).__name__}: {exc}")
            return
        for message in messages:
            self.handle._received(message)

    def eof_received(self) -> bool:
        self.handle._eof(self.reader)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.handle._connection_lost(exc)


class WorkerProcess:
    """Parent-side handle of one worker process.

    Callbacks (called on the loop): ``on_ready(worker)``, ``on_load_error(worker, message)``,
    ``on_result(worker, batch_id, compute_seconds, outcome)``, ``on_exit(worker, exitcode)`` - the last one exactly
    once, whether the worker stopped, crashed, stalled (and was killed) or failed to load.
    """

    _ids = 0

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        name: str,
        on_ready: Callable[[WorkerProcess], None],
        on_load_error: Callable[[WorkerProcess, str], None],
        on_result: Callable[[WorkerProcess, int, float, Outcome], None],
        on_exit: Callable[[WorkerProcess, int | None], None],
    ) -> None:
        WorkerProcess._ids += 1
        self.id = WorkerProcess._ids
        self.spec = spec
        self.name = name
        self._on_ready, self._on_load_error = on_ready, on_load_error
        self._on_result, self._on_exit = on_result, on_exit
        self.process: multiprocessing.process.BaseProcess | None = None
        self.state = "new"  # new -> starting -> ready -> (stopping) -> exited
        self.started_at = 0.0
        self.exitcode: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._reader: FrameReader | None = None
        self._exited = asyncio.Event()
        self._start_timer: asyncio.TimerHandle | None = None
        self._eof_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._stream_closed = False
        self._reaped = False
        self._reap_delay = 0.001
        self._outbox: list[Message] = []

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self.process.pid if self.process is not None else None

    # ---------------------------------------------------------------- start / send
    def start(self, start_timeout_s: float) -> None:
        """Spawn the process; ``on_ready`` or ``on_load_error``/``on_exit`` follows."""
        ctx = multiprocessing.get_context("spawn")
        parent_sock, child_sock = socket.socketpair()
        try:
            self.process = ctx.Process(
                target=worker_main, args=(child_sock, self.spec), name=f"capsa-worker-{self.name}", daemon=True
            )
            self.process.start()
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        self.state = "starting"
        self.started_at = time.monotonic()
        loop = self._loop = asyncio.get_running_loop()
        protocol = _Protocol(self)
        self._reader = protocol.reader
        loop.add_reader(self.process.sentinel, self._sentinel_ready)
        self._start_timer = loop.call_later(start_timeout_s, self._start_timed_out)
        task = loop.create_task(loop.create_unix_connection(lambda: protocol, sock=parent_sock))
        task.add_done_callback(self._connect_done)
        log.info("worker starting", extra={"worker": self.name, "pid": self.process.pid})

    def _connect_done(self, task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fatal(f"cannot attach the worker's socket to the event loop: {task.exception()!r}")

    def _connected(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        if self.state == "exited":
            transport.close()
            return
        for message in self._outbox:  # sent before the socket was attached (a stop right after the start)
            transport.writelines(encode(message))
        self._outbox.clear()

    def send_batch(self, batch_id: int, array: np.ndarray, offsets: list[int]) -> None:
        """Send a batch (the worker must be ready and idle); raises :class:`WorkerGone` if it is going away."""
        self._send(RunBatch(batch_id, array, tuple(offsets)))

    def _send(self, message: Message) -> None:
        transport = self._transport
        if transport is None and self.process is not None and not self._reaped and self.state != "exited":
            self._outbox.append(message)  # the socket is being attached to the loop: goes out once it is
            return
        if transport is None or transport.is_closing() or self.state in ("exited", "new"):
            raise WorkerGone(f"worker {self.name} cannot take messages (state {self.state})")
        transport.writelines(encode(message))  # the transport keeps what the socket does not take yet

    # ---------------------------------------------------------------- incoming
    def _received(self, message: Message) -> None:
        try:
            if isinstance(message, Result):
                self._on_result(self, message.batch_id, message.compute_s, message.outcome)
            elif isinstance(message, Ready):
                self._cancel_start_timer()
                if self.state == "stopping":  # told to stop while loading: the Stop message is on its way
                    return
                self.state = "ready"
                log.info("worker ready", extra={"worker": self.name, "pid": self.pid, "device": message.device,
                                                "torch_threads": message.threads,
                                                "interop_threads": message.interop_threads,
                                                "busy_poll_us": round(self.spec.busy_poll_s * 1e6)})
                self._on_ready(self)
            elif isinstance(message, LoadFailed):
                self._cancel_start_timer()
                self.state = "stopping"
                self._on_load_error(self, message.error)
            else:
                self._fatal(f"unexpected message from the worker: {type(message).__name__}")
        except Exception:  # a bug in a callback must not tear down the connection (asyncio would close it)
            log.exception("error handling a message from a worker", extra={"worker": self.name})

    def _start_timed_out(self) -> None:
        self._start_timer = None
        if self.state == "starting":
            log.error("worker did not become ready in time; killing it", extra={"worker": self.name})
            self.kill()

    def _cancel_start_timer(self) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None

    # ---------------------------------------------------------------- death
    def _fatal(self, why: str) -> None:
        """The connection cannot be used any more while the process may live: say why and kill it."""
        if self.state != "exited" and not self._reaped and self.process is not None and self.process.exitcode is None:
            log.error("worker connection failed; killing the worker", extra={"worker": self.name, "pid": self.pid,
                                                                              "error": why})
            if self._transport is not None:
                self._transport.abort()
            self.kill()

    def _eof(self, reader: FrameReader) -> None:
        if not reader.at_boundary:
            log.error("worker connection closed in the middle of a frame",
                      extra={"worker": self.name, "pid": self.pid, "received_bytes": reader.pending_bytes})

    def _connection_lost(self, exc: Exception | None) -> None:
        self._stream_closed = True
        if self._drain_timer is not None:  # the process is gone already: everything it wrote has been read
            self._finish()
            return
        if exc is not None:
            self._fatal(f"connection lost: {exc!r}")
        elif self.state != "exited" and self._loop is not None:  # closed its socket: it should be exiting
            self._eof_timer = self._loop.call_later(_EOF_GRACE_S, self._eof_timed_out)

    def _eof_timed_out(self) -> None:
        self._eof_timer = None
        if not self._reaped:
            self._fatal(f"the worker closed its connection but did not exit within {_EOF_GRACE_S:g} s")

    def _sentinel_ready(self) -> None:
        assert self._loop is not None and self.process is not None
        self._loop.remove_reader(self.process.sentinel)
        self._reap()

    def _reap(self) -> None:
        """Collect the exit code without blocking (the sentinel fires an instant before the process is reapable)."""
        assert self._loop is not None and self.process is not None
        code = self.process.exitcode  # waitpid(WNOHANG)
        if code is None:
            self._reap_delay = min(self._reap_delay * 2, 0.1)
            self._loop.call_later(self._reap_delay, self._reap)
            return
        self._reaped = True
        self.exitcode = code
        self._cancel_start_timer()
        if self._eof_timer is not None:
            self._eof_timer.cancel()
            self._eof_timer = None
        if self._stream_closed or self._transport is None:
            self._finish()
        else:  # read what the worker wrote before it exited (a result, a load error), then finish
            self._drain_timer = self._loop.call_later(_DRAIN_GRACE_S, self._finish)

    def _finish(self) -> None:
        if self.state == "exited":
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._transport is not None:
            self._transport.abort()
        expected = self.state == "stopping"
        self.state = "exited"
        (log.info if expected else log.error)(
            "worker exited", extra={"worker": self.name, "pid": self.pid, "exitcode": self.exitcode}
        )
        self._exited.set()
        self._on_exit(self, self.exitcode)

    # ---------------------------------------------------------------- control
    def kill(self) -> None:
        """Kill the process at once (SIGKILL, which also ends a stopped process); ``on_exit`` follows."""
        if self.process is not None and not self._reaped and self.process.exitcode is None:
            self.process.kill()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit, killing it if it does not within ``timeout_s``."""
        if self.state in ("exited", "new") or self.process is None:
            return
        self.state = "stopping"
        with contextlib.suppress(WorkerGone):  # already going: wait for the exit below
            self._send(Stop())
        try:
            await asyncio.wait_for(self._exited.wait(), timeout_s)
        except asyncio.TimeoutError:
            self.kill()
            await self._exited.wait()
