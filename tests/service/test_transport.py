"""The worker transport under uvloop, as the server runs it: real worker processes, real bundles, every size.

Each test drives :class:`~service.workers.WorkerProcess` and :class:`~service.batching.Batcher` the way
``service.manager`` wires them, on a uvloop event loop, and checks every answer against the bundle run in this
process on the same rows. Sizes go from 1 KB to 64 MB per request, past every socket and pipe buffer; batches merge
many requests into one frame; results can be much larger than inputs; workers are killed mid-frame and stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import uvloop

import capsa
from service.batching import Batcher, DeadlineExceeded, Unavailable
from service.metrics import Metrics
from service.workers import WorkerProcess, WorkerSpec
from tests.service.conftest import expected, vote_bundle

pytestmark = [
    pytest.mark.slow,  # real worker processes that import torch
    # the bundles name tests.fixtures.archs, importable here and in the workers (which inherit sys.path)
    pytest.mark.filterwarnings("ignore:save_bundle.*importable only:UserWarning"),
]

ALLOWED = ("tests.fixtures.archs",)
WIDE = 256  # features of the "wide" model: one row is 1 KB of FP32


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``wide`` (1 KB per row in, 8 B out), ``fanout`` (16 B per row in, 32 KB out) and ``cnn`` (3x64x64 images)."""
    work = tmp_path_factory.mktemp("transport")
    return {
        "wide": vote_bundle(work / "wide", "mlp", {"in_features": WIDE, "hidden": 8, "out_features": 2},
                      torch.randn(4, WIDE), seed=0),
        "fanout": vote_bundle(work / "fanout", "mlp", {"in_features": 4, "hidden": 8, "out_features": 4096},
                        torch.randn(4, 4), seed=0),
        "cnn": vote_bundle(work / "cnn", "cnn", {"in_channels": 3, "width": 8, "num_outputs": 4},
                     torch.randn(2, 3, 64, 64), seed=0),
    }


@pytest.fixture(scope="module")
def reference(bundles: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {name: capsa.load_bundle(path, allowed_modules=list(ALLOWED)) for name, path in bundles.items()}


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` on a uvloop event loop (the server's loop)."""
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


@dataclass
class Pool:
    """One model's batcher and worker processes, wired as ``ModelVersion`` wires them (without restarts)."""

    batcher: Batcher
    spec: WorkerSpec
    workers: list[WorkerProcess] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exits: list[tuple[WorkerProcess, int | None]] = field(default_factory=list)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    load_errors: list[str] = field(default_factory=list)
    stuck: list[Any] = field(default_factory=list)

    def spawn(self) -> WorkerProcess:
        def on_ready(worker: WorkerProcess) -> None:
            self.batcher.add_worker(worker)
            self.ready.set()

        def on_exit(worker: WorkerProcess, code: int | None) -> None:
            self.batcher.remove_worker(worker)
            self.exits.append((worker, code))
            self.exited.set()

        worker = WorkerProcess(self.spec, name=f"t{len(self.workers)}", on_ready=on_ready,
                               on_load_error=lambda w, m: self.load_errors.append(m),
                               on_result=self.batcher.complete, on_exit=on_exit)
        worker.start(120.0)
        self.workers.append(worker)
        return worker

    async def wait_ready(self, count: int = 1, *, exits: int = 0) -> None:
        """Wait until ``count`` workers are ready, failing if more than ``exits`` workers exited meanwhile."""

        async def ready() -> None:
            while self.batcher.live_workers < count:
                assert not self.load_errors, self.load_errors
                assert len(self.exits) <= exits, f"a worker exited: {self.exits}"
                self.ready.clear()
                await self.ready.wait()

        await asyncio.wait_for(ready(), 180)

    async def close(self) -> None:
        await asyncio.gather(*(w.stop(30) for w in self.workers))


def pool(path: Path, input_shape: tuple[int, ...], *, timeout_s: float = 600.0,
         max_batch_size: int = 1 << 20) -> Pool:
    batcher = Batcher(max_batch_size=max_batch_size, max_batch_delay_s=0.0, max_queue_size=1024,
                      timeout_s=timeout_s, metrics=Metrics().for_version("t", 1))
    spec = WorkerSpec(bundle_path=str(path), device="cpu", input_shape=(-1, *input_shape), input_dtype="<f4",
                      allowed_modules=ALLOWED)
    result = Pool(batcher, spec)
    batcher.on_stuck = result.stuck.append
    return result


def check(model: torch.nn.Module, x: np.ndarray,
          got: tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]) -> None:
    """``got`` is exactly what ``model`` computes for ``x`` in this process (same rows, same order)."""
    want = expected(model, x)
    assert got[3] == {}  # single wrappers: no risk components
    for name, g, w in zip(("prediction", "risk", "risk_score"), got[:3], want, strict=True):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)


def rows(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)


# ------------------------------------------------------------------------------------------------------ tests


def test_single_requests_of_every_size_from_1_kb_to_64_mb(bundles: dict[str, Path],
                                                          reference: dict[str, torch.nn.Module]) -> None:
    async def scenario() -> None:
        p = pool(bundles["wide"], (WIDE,))
        p.spawn()
        try:
            await p.wait_ready()
            for seed, n in enumerate([1, 16, 63, 64, 65, 200, 256, 1024, 4096, 16384, 65536]):  # 1 KB .. 64 MB
                x = rows(n, (WIDE,), seed)
                got = await asyncio.wait_for(p.batcher.submit(x), 120)
                check(reference["wide"], x, got)
            assert not p.exits, f"a live worker was taken for dead: {p.exits}"
        finally:
            await p.close()

    run(scenario)


def test_results_much_larger_than_inputs(bundles: dict[str, Path], reference: dict[str, torch.nn.Module]) -> None:
    async def scenario() -> None:
        p = pool(bundles["fanout"], (4,))
        p.spawn()
        try:
            await p.wait_ready()
            for seed, n in enumerate([1, 8, 64, 1024]):  # up to 16 KB in, 2 x 16 MB out
                x = rows(n, (4,), seed)
                got = await asyncio.wait_for(p.batcher.submit(x), 120)
                check(reference["fanout"], x, got)
            assert not p.exits, f"a live worker was taken for dead: {p.exits}"
        finally:
            await p.close()

    run(scenario)


def test_concurrent_requests_merged_into_batches_past_every_buffer_size(
        bundles: dict[str, Path], reference: dict[str, torch.nn.Module]) -> None:
    async def scenario() -> None:
        p = pool(bundles["wide"], (WIDE,))
        p.spawn()
        p.spawn()
        try:
            await p.wait_ready(2)
            for wave in range(3):  # 32 concurrent 64 KB requests, merged by the batcher while workers are busy
                xs = [rows(64, (WIDE,), 1000 * wave + i) for i in range(32)]
                results = await asyncio.wait_for(asyncio.gather(*(p.batcher.submit(x) for x in xs)), 120)
                for x, got in zip(xs, results, strict=True):
                    check(reference["wide"], x, got)
            assert p.batcher.metrics.exec_count._value.get() < 96  # some requests did share a batch
            assert not p.exits, f"a live worker was taken for dead: {p.exits}"
        finally:
            await p.close()

    run(scenario)


def test_cnn_on_images_eight_per_request(bundles: dict[str, Path], reference: dict[str, torch.nn.Module]) -> None:
    async def scenario() -> None:
        p = pool(bundles["cnn"], (3, 64, 64), max_batch_size=64)
        p.spawn()
        try:
            await p.wait_ready()
            xs = [rows(8, (3, 64, 64), i) for i in range(16)]  # 393 KB each
            results = await asyncio.wait_for(asyncio.gather(*(p.batcher.submit(x) for x in xs)), 180)
            for x, got in zip(xs, results, strict=True):
                check(reference["cnn"], x, got)
            assert not p.exits, f"a live worker was taken for dead: {p.exits}"
        finally:
            await p.close()

    run(scenario)


@pytest.mark.parametrize("direction", ["request", "result"])
def test_worker_killed_mid_frame_fails_only_its_batch_and_is_reported_once(
        bundles: dict[str, Path], reference: dict[str, torch.nn.Module], direction: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 while a 64 MB batch is being written to the worker, or while its 64 MB result is being read.

    The death is handled without ``Process.join`` on the event loop (it used to block the loop for up to 5 s).
    """
    joins_on_loop: list[float | None] = []
    join = multiprocessing.process.BaseProcess.join

    def recording_join(self: multiprocessing.process.BaseProcess, timeout: float | None = None) -> None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            joins_on_loop.append(timeout)
        join(self, timeout)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "join", recording_join)

    async def scenario() -> None:
        name, shape, n = ("wide", (WIDE,), 65536) if direction == "request" else ("fanout", (4,), 4096)
        p = pool(bundles[name], shape)
        worker = p.spawn()
        try:
            await p.wait_ready()
            x = rows(n, shape, 7)
            fut = p.batcher.submit(x)
            if direction == "result":  # wait until the result is flowing in (the worker answered in part)
                await asyncio.wait_for(_wait_for(lambda: _received_bytes(worker) > 0), 120)
            os.kill(worker.pid, signal.SIGKILL)
            with pytest.raises(Unavailable, match="died"):
                await asyncio.wait_for(fut, 60)
            await asyncio.wait_for(p.exited.wait(), 60)
            assert [(w, code) for w, code in p.exits] == [(worker, -signal.SIGKILL)]
            assert not joins_on_loop, f"Process.join ran on the event loop: {joins_on_loop}"
            # the pool serves again once a new worker is up
            p.spawn()
            await p.wait_ready(exits=1)
            small = rows(3, shape, 8)
            check(reference[name], small, await asyncio.wait_for(p.batcher.submit(small), 120))
            assert len(p.exits) == 1
        finally:
            await p.close()

    run(scenario)


def test_stopped_worker_is_reported_stuck_and_its_request_answered_at_the_deadline(
        bundles: dict[str, Path]) -> None:
    """SIGSTOP: the request gets 504 at its deadline and the worker is reported stuck soon after."""

    async def scenario() -> None:
        p = pool(bundles["wide"], (WIDE,), timeout_s=2.0)
        worker = p.spawn()
        try:
            await p.wait_ready()
            os.kill(worker.pid, signal.SIGSTOP)
            fut = p.batcher.submit(rows(1, (WIDE,), 0))
            with pytest.raises(DeadlineExceeded):
                await asyncio.wait_for(fut, 60)
            await asyncio.wait_for(_wait_for(lambda: bool(p.stuck)), 60)
            assert p.stuck == [worker]
        finally:
            os.kill(worker.pid, signal.SIGCONT)
            await p.close()

    run(scenario)


async def _wait_for(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.002)


def _received_bytes(worker: WorkerProcess) -> int:
    """Bytes of the current incoming frame the parent holds (0 when between frames)."""
    reader = getattr(worker, "_reader", None)
    return reader.pending_bytes if reader is not None else 0


def test_a_worker_stopped_while_loading_exits_cleanly_without_serving(bundles: dict[str, Path]) -> None:
    async def scenario() -> None:
        p = pool(bundles["wide"], (WIDE,))
        worker = p.spawn()
        await asyncio.wait_for(worker.stop(120), 180)  # Stop waits in the socket until the model is loaded
        assert p.exits == [(worker, 0)]
        assert p.batcher.live_workers == 0 and worker.state == "exited"

    run(scenario)
