"""Worker processes: each loads one model version with ``capsa.load_bundle`` on one device and runs batches.

The HTTP process never runs model code. It talks to each worker over a ``multiprocessing`` Pipe: one message per
batch each way, carrying one contiguous numpy array (a JSON header plus raw bytes, no pickle; large arrays go
out-of-band as raw frames, so nothing is copied per sample). The asyncio side reads replies with
``loop.add_reader`` on the connection's file descriptor, so there is no thread hop, and watches the process
sentinel to notice a worker that died (crash, OOM, ``kill -9``) even while it is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import orjson

log = logging.getLogger("capsa.serve.workers")

_INBAND_LIMIT = 64 * 1024  # arrays smaller than this travel in the message's one frame (one write)
_HEAD = struct.Struct("<II")  # JSON header length, number of out-of-band array frames
_ARRAY = "__ndarray__"


def _encode(obj: Any, arrays: list[np.ndarray]) -> Any:
    """JSON-able form of a message: arrays become placeholders, their bytes travel beside the JSON."""
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        arrays.append(array)
        return {_ARRAY: [array.dtype.str, list(array.shape), array.nbytes]}
    if isinstance(obj, (tuple, list)):
        return [_encode(item, arrays) for item in obj]
    if isinstance(obj, dict):
        return {key: _encode(value, arrays) for key, value in obj.items()}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj: Any, buffers: Iterator[memoryview | bytes | bytearray]) -> Any:
    if isinstance(obj, list):
        return [_decode(item, buffers) for item in obj]
    if isinstance(obj, dict):
        if _ARRAY in obj:
            dtype, shape, _ = obj[_ARRAY]
            return np.frombuffer(next(buffers), dtype=np.dtype(dtype)).reshape(shape)
        return {key: _decode(value, buffers) for key, value in obj.items()}
    return obj


def _array_specs(obj: Any) -> Iterator[list[Any]]:
    if isinstance(obj, list):
        for item in obj:
            yield from _array_specs(item)
    elif isinstance(obj, dict):
        if _ARRAY in obj:
            yield obj[_ARRAY]
        else:
            for value in obj.values():
                yield from _array_specs(value)


def send_message(conn: Connection, obj: Any) -> None:
    """Send ``obj`` (tuples, lists, dicts, scalars, strings, numpy arrays) without pickle.

    One frame holds a JSON header with the arrays' dtypes and shapes, followed by their raw bytes when they are small;
    large arrays follow as one raw frame each, so nothing large is copied. Tuples arrive as lists.
    """
    arrays: list[np.ndarray] = []
    head = orjson.dumps(_encode(obj, arrays))
    views = [memoryview(a).cast("B") for a in arrays]
    if sum(v.nbytes for v in views) < _INBAND_LIMIT:
        conn.send_bytes(b"".join([_HEAD.pack(len(head), 0), head, *views]))
        return
    conn.send_bytes(_HEAD.pack(len(head), len(views)) + head)
    for view in views:
        conn.send_bytes(view)


def recv_message(conn: Connection) -> Any:
    """Receive one message sent by :func:`send_message` (raises EOFError when the peer is gone)."""
    frame = memoryview(conn.recv_bytes())
    length, count = _HEAD.unpack_from(frame)
    body = orjson.loads(frame[_HEAD.size : _HEAD.size + length])
    if count:  # large arrays: received straight into writable buffers of the right size
        buffers: list[memoryview | bytes | bytearray] = []
        for _dtype, _shape, nbytes in _array_specs(body):
            buffers.append(bytearray(nbytes))
            conn.recv_bytes_into(buffers[-1])
    else:
        buffers, offset = [], _HEAD.size + length
        for _dtype, _shape, nbytes in _array_specs(body):
            buffers.append(frame[offset : offset + nbytes])
            offset += nbytes
    return _decode(body, iter(buffers))


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to load and warm up its model version."""

    bundle_path: str
    device: str
    input_shape: tuple[int, ...]  # the model's input shape, -1 for variable dimensions
    input_dtype: str  # numpy dtype string
    allowed_modules: tuple[str, ...] | None
    torch_threads: int = 1
    warmup_batch: int = 1


# --------------------------------------------------------------------------------------------- worker side


def _run(model: Any, torch: Any, device: Any, array: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not array.flags.writeable:
        array = array.copy()
    x = torch.from_numpy(array)
    if device.type != "cpu":
        x = x.to(device, non_blocking=True)
    with torch.inference_mode():
        y, risk = model(x, return_risk=True)
        n = risk.shape[0]
        score = risk.reshape(n, -1).float().mean(dim=1) if risk.dim() > 1 else risk.float()
        if device.type != "cpu":
            y, risk, score = y.cpu(), risk.cpu(), score.cpu()
    return (np.ascontiguousarray(y.numpy()), np.ascontiguousarray(risk.numpy()),
            np.ascontiguousarray(score.numpy()))


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process: load, warm up, report ready, then serve batches until told to stop.

    Signals are ignored: the parent decides when workers stop (a Ctrl-C or a SIGTERM sent to the whole process
    group must not kill workers while the server drains). If the parent dies, the pipe reaches EOF and we exit.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import torch

        import capsa

        device = torch.device(spec.device)
        if device.type == "cpu":
            torch.set_num_threads(spec.torch_threads)
        elif device.type == "cuda":
            torch.cuda.set_device(device)
            # Full float32: TF32 rounds differently per cuDNN/cuBLAS algorithm, and those are chosen by batch size,
            # so with it a sample's result would depend on the batch dynamic batching put it in.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        allowed = list(spec.allowed_modules) if spec.allowed_modules is not None else None
        model = capsa.load_bundle(spec.bundle_path, device=str(device), allowed_modules=allowed)
        shape = tuple(1 if d == -1 else d for d in spec.input_shape[1:])
        for batch in sorted({1, max(1, spec.warmup_batch)}):
            _run(model, torch, device, np.zeros((batch, *shape), dtype=np.dtype(spec.input_dtype)))
    except BaseException as exc:  # report any load failure (import errors included) to the parent
        with contextlib.suppress(Exception):
            send_message(conn, ("load_error", f"{type(exc).__name__}: {exc}"))
        return
    send_message(conn, ("ready", {"pid": os.getpid(), "device": str(device)}))
    while True:
        try:
            message = recv_message(conn)
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        _, batch_id, array, offsets = message
        start = time.perf_counter()
        try:
            payload: tuple = ("ok", *_run(model, torch, device, array))
        except Exception as exc:
            if len(offsets) <= 2:
                payload = ("error", f"{type(exc).__name__}: {exc}")
            else:  # isolate the request that fails: run each one alone, so one bad request fails alone
                parts: list[Any] = []
                for lo, hi in itertools.pairwise(offsets):
                    try:
                        parts.append(_run(model, torch, device, array[lo:hi]))
                    except Exception as part_exc:
                        parts.append(f"{type(part_exc).__name__}: {part_exc}")
                payload = ("split", parts)
        send_message(conn, ("result", batch_id, time.perf_counter() - start, payload))


# --------------------------------------------------------------------------------------------- parent side


class WorkerProcess:
    """Parent-side handle of one worker process, driven by the asyncio loop (no threads).

    Callbacks (called on the loop): ``on_ready(worker)``, ``on_load_error(worker, message)``,
    ``on_result(worker, batch_id, compute_seconds, payload)``, ``on_exit(worker, exitcode)`` - the last one exactly
    once, whether the worker stopped, crashed or failed to load.
    """

    _ids = 0

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        name: str,
        on_ready: Callable[[WorkerProcess], None],
        on_load_error: Callable[[WorkerProcess, str], None],
        on_result: Callable[[WorkerProcess, int, float, tuple], None],
        on_exit: Callable[[WorkerProcess, int | None], None],
    ) -> None:
        WorkerProcess._ids += 1
        self.id = WorkerProcess._ids
        self.spec = spec
        self.name = name
        self._on_ready, self._on_load_error = on_ready, on_load_error
        self._on_result, self._on_exit = on_result, on_exit
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.state = "new"  # new -> starting -> ready -> (stopping) -> exited
        self.started_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited = asyncio.Event()
        self._start_timer: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self.process.pid if self.process is not None else None

    def start(self, start_timeout_s: float) -> None:
        """Spawn the process; ``on_ready`` or ``on_load_error``/``on_exit`` follows."""
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=worker_main, args=(child_conn, self.spec), name=f"capsa-worker-{self.name}", daemon=True
        )
        self.process.start()
        child_conn.close()
        self.conn = parent_conn
        self.state = "starting"
        self.started_at = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(parent_conn.fileno(), self._readable)
        self._loop.add_reader(self.process.sentinel, self._died)
        self._start_timer = self._loop.call_later(start_timeout_s, self._start_timed_out)
        log.info("worker starting", extra={"worker": self.name, "pid": self.process.pid})

    def send_batch(self, batch_id: int, array: np.ndarray, offsets: list[int]) -> None:
        """Send a batch to the worker (it must be ready and idle). Raises OSError if the pipe is broken."""
        assert self.conn is not None
        send_message(self.conn, ("batch", batch_id, array, offsets))

    def _start_timed_out(self) -> None:
        if self.state == "starting":
            log.error("worker did not become ready in time; killing it", extra={"worker": self.name})
            self.kill()

    def _readable(self) -> None:
        assert self.conn is not None
        try:
            message = recv_message(self.conn)
        except (EOFError, OSError):
            self._died()
            return
        kind = message[0]
        if kind == "result":
            self._on_result(self, message[1], message[2], message[3])
        elif kind == "ready":
            self._cancel_start_timer()
            self.state = "ready"
            log.info("worker ready", extra={"worker": self.name, "pid": self.pid, "device": self.spec.device})
            self._on_ready(self)
        elif kind == "load_error":
            self._cancel_start_timer()
            self.state = "stopping"
            self._on_load_error(self, message[1])

    def _cancel_start_timer(self) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None

    def _died(self) -> None:
        if self.state == "exited":
            return
        self._cancel_start_timer()
        assert self._loop is not None and self.process is not None and self.conn is not None
        self._loop.remove_reader(self.conn.fileno())
        self._loop.remove_reader(self.process.sentinel)
        self.process.join(timeout=5)
        exitcode = self.process.exitcode
        expected = self.state == "stopping"
        self.state = "exited"
        self.conn.close()
        (log.info if expected else log.error)(
            "worker exited", extra={"worker": self.name, "pid": self.pid, "exitcode": exitcode}
        )
        self._exited.set()
        self._on_exit(self, exitcode)

    def kill(self) -> None:
        """Kill the process at once (SIGKILL); ``on_exit`` follows."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit, killing it if it does not within ``timeout_s``."""
        if self.state == "exited" or self.process is None:
            return
        self.state = "stopping"
        with contextlib.suppress(OSError, ValueError):
            assert self.conn is not None
            send_message(self.conn, ("stop",))
        try:
            await asyncio.wait_for(self._exited.wait(), timeout_s)
        except asyncio.TimeoutError:
            self.kill()
            await self._exited.wait()
