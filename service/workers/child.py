"""The worker process: load one model version with ``capsa.load_bundle`` on one device, then run batches.

It talks to the parent over its end of a socket pair with plain blocking I/O (:func:`send` writes a whole frame,
:func:`serve` reads with ``recv_into``); the parent's end is driven by its event loop (see :mod:`.handle`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import time
from typing import Any

import numpy as np

from service.busypoll import recv_into_polling
from service.workers.codec import FrameReader, ProtocolError, encode
from service.workers.messages import (
    Failed,
    LoadFailed,
    Message,
    Outputs,
    Ready,
    Result,
    RunBatch,
    Split,
    Stop,
    WorkerSpec,
)


def send(sock: socket.socket, message: Message) -> None:
    """Write one whole frame (blocking; raises OSError when the parent is gone)."""
    for buffer in encode(message):
        sock.sendall(buffer)


def _run(model: Any, torch: Any, device: Any, array: np.ndarray) -> Outputs:
    if not array.flags.writeable:
        array = array.copy()
    x = torch.from_numpy(array)
    if device.type != "cpu":
        x = x.to(device, non_blocking=True)
    import capsa  # loaded already with the model; one definition of the score

    components: dict[str, Any] = {}
    with torch.inference_mode():
        y, risk = model.predict(x)  # a capsa.Risk for every stack: risk_score ranks saturated classifiers by it
        score = capsa.risk_score(risk)
        if model.composed:  # a composed model: the served risk is the total, plus each component
            components = {f"risk_{kind}": value for kind, value in risk.components().items()}
        risk = risk.total
        if device.type != "cpu":
            y, risk, score = y.cpu(), risk.cpu(), score.cpu()
            components = {name: value.cpu() for name, value in components.items()}
    return Outputs(np.ascontiguousarray(y.numpy()), np.ascontiguousarray(risk.numpy()),
                   np.ascontiguousarray(score.numpy()),
                   tuple((name, np.ascontiguousarray(value.numpy())) for name, value in components.items()))


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_batch(model: Any, torch: Any, device: Any, message: RunBatch) -> Result:
    """Run one batch; if it fails as a whole, run each request alone so that one bad request fails alone."""
    start = time.perf_counter()
    outcome: Outputs | Split | Failed
    try:
        outcome = _run(model, torch, device, message.array)
    except Exception as exc:
        if len(message.offsets) <= 2:
            outcome = Failed(_error(exc))
        else:
            parts: list[Outputs | Failed] = []
            for lo, hi in itertools.pairwise(message.offsets):
                try:
                    parts.append(_run(model, torch, device, message.array[lo:hi]))
                except Exception as part_exc:
                    parts.append(Failed(_error(part_exc)))
            outcome = Split(tuple(parts))
    return Result(message.batch_id, time.perf_counter() - start, outcome)


def worker_main(sock: socket.socket, spec: WorkerSpec) -> None:
    """Entry point of a worker process: load, warm up, report ready, then serve batches until told to stop.

    Signals are ignored: the parent decides when workers stop (a Ctrl-C or a SIGTERM sent to the whole process
    group must not kill workers while the server drains). If the parent dies, the socket reaches EOF and we exit.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sock.setblocking(True)
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
        with contextlib.suppress(RuntimeError):  # only possible before the first parallel work
            torch.set_num_interop_threads(spec.interop_threads)
        allowed = list(spec.allowed_modules) if spec.allowed_modules is not None else None
        model = capsa.load_bundle(spec.bundle_path, device=str(device), allowed_modules=allowed)
        shape = tuple(1 if d == -1 else d for d in spec.input_shape[1:])
        for batch in sorted({1, max(1, spec.warmup_batch)}):
            _run(model, torch, device, np.zeros((batch, *shape), dtype=np.dtype(spec.input_dtype)))
    except BaseException as exc:  # report any load failure (import errors included) to the parent
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            send(sock, LoadFailed(_error(exc)))
        return
    send(sock, Ready(os.getpid(), str(device), torch.get_num_threads(), torch.get_num_interop_threads()))
    serve(sock, lambda message: run_batch(model, torch, device, message), spec.busy_poll_s)


def serve(sock: socket.socket, handle: Any, busy_poll_s: float = 0.0) -> None:
    """Answer each :class:`RunBatch` with ``handle(batch)`` until :class:`Stop` or the parent closes the socket;
    ``busy_poll_s``: how long to poll for the next batch before blocking (see :mod:`service.busypoll`)."""
    reader = FrameReader()
    while True:
        try:
            received = recv_into_polling(sock, reader.get_buffer(), busy_poll_s)
        except OSError:
            return  # the parent is gone
        if received == 0:
            if not reader.at_boundary:
                raise ProtocolError(f"the parent closed the socket {reader.pending_bytes} bytes into a frame")
            return
        for message in reader.feed(received):
            if isinstance(message, Stop):
                return
            if not isinstance(message, RunBatch):
                raise ProtocolError(f"a worker does not expect {type(message).__name__}")
            try:
                send(sock, handle(message))
            except OSError:
                return  # the parent is gone
