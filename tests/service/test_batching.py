"""Unit tests of the dynamic batcher with fake workers (no processes): batching, splitting, bounds, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from service.batching import Batcher, DeadlineExceeded, ModelError, QueueFull, ServeError, Unavailable
from service.metrics import Metrics
from service.workers import Failed, Outputs, Split, WorkerGone


class FakeWorker:
    """Records the batches it is sent."""

    def __init__(self, wid: int) -> None:
        self.id = wid
        self.sent: list[tuple[int, np.ndarray, list[int]]] = []

    def send_batch(self, batch_id: int, array: np.ndarray, offsets: list[int]) -> None:
        self.sent.append((batch_id, array.copy(), list(offsets)))


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def make(**kw: Any) -> Batcher:
    options = {"max_batch_size": 8, "max_batch_delay_s": 0.0, "max_queue_size": 16, "timeout_s": 5.0}
    options.update(kw)
    return Batcher(metrics=Metrics().for_version("m", 1), **options)


def rows(n: int, start: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


def answer(batcher: Batcher, worker: FakeWorker) -> None:
    """Complete the worker's last batch with prediction = 2x, risk = x, score = x."""
    batch_id, array, _ = worker.sent[-1]
    batcher.complete(worker, batch_id, 0.001, Outputs(array * 2, array.copy(), array[:, 0].copy()))


def test_free_worker_takes_a_lone_request_at_once_then_queued_ones_together() -> None:
    async def scenario() -> None:
        batcher = make()
        worker = FakeWorker(1)
        batcher.add_worker(worker)
        first = batcher.submit(rows(1, 0))
        assert len(worker.sent) == 1  # no waiting for company
        later = [batcher.submit(rows(n, 10 * (i + 1))) for i, n in enumerate([3, 4, 2])]
        assert len(worker.sent) == 1  # busy: they queue
        answer(batcher, worker)
        assert (await first)[0].tolist() == [[0.0]]
        # the next batch takes 3 + 4 samples (the 2-sample request would exceed 8: it stays whole, for later)
        assert worker.sent[-1][2] == [0, 3, 7]
        answer(batcher, worker)
        assert worker.sent[-1][2] == [0, 2]
        answer(batcher, worker)
        for i, (fut, n) in enumerate(zip(later, [3, 4, 2], strict=True)):
            pred, risk, score, components = await fut
            assert components == {}
            expected = rows(n, 10 * (i + 1))
            np.testing.assert_array_equal(pred, expected * 2)
            np.testing.assert_array_equal(risk, expected)
            np.testing.assert_array_equal(score, expected[:, 0])
        assert batcher.metrics.exec_count._value.get() == 3
        assert batcher.metrics.count._value.get() == 10
        assert batcher.pending_requests() == 0

    run(scenario)


def test_bounded_queue_and_no_worker() -> None:
    async def scenario() -> None:
        batcher = make(max_queue_size=2)
        with pytest.raises(Unavailable, match="no worker is alive"):
            batcher.submit(rows(1, 0))
        worker = FakeWorker(1)
        batcher.add_worker(worker)
        batcher.submit(rows(1, 0))  # running
        batcher.submit(rows(1, 1))
        batcher.submit(rows(1, 2))
        with pytest.raises(QueueFull, match="queue is full"):
            batcher.submit(rows(1, 3))
        assert batcher.pending_requests() == 3

    run(scenario)


def test_deadline_expires_queued_request() -> None:
    async def scenario() -> None:
        batcher = make(timeout_s=0.05)
        worker = FakeWorker(1)
        batcher.add_worker(worker)
        running = batcher.submit(rows(1, 0))
        queued = batcher.submit(rows(1, 1))
        with pytest.raises(DeadlineExceeded):
            await queued
        assert not batcher.queue
        with pytest.raises(DeadlineExceeded):
            await running  # no answer within the deadline either
        answer(batcher, worker)  # a late answer is dropped quietly
        assert batcher.idle == [worker]

    run(scenario)


def test_dead_worker_batch_is_retried_once_elsewhere_else_503() -> None:
    async def scenario() -> None:
        batcher = make()
        a, b = FakeWorker(1), FakeWorker(2)
        batcher.add_worker(a)
        fut = batcher.submit(rows(2, 0))
        (busy,) = [w for w in (a,) if w.sent]
        batcher.add_worker(b)
        batcher.remove_worker(busy)  # died: retried on b
        assert len(b.sent) == 1
        batcher.remove_worker(b)  # died too: no second retry
        with pytest.raises(Unavailable, match="died"):
            await fut

    run(scenario)


def test_a_failing_request_fails_alone() -> None:
    async def scenario() -> None:
        batcher = make()
        worker = FakeWorker(1)
        batcher.add_worker(worker)
        batcher.submit(rows(1, 0))
        good = batcher.submit(rows(1, 1))
        bad = batcher.submit(rows(1, 2))
        answer(batcher, worker)
        batch_id, array, _ = worker.sent[-1]
        ok = Outputs(array[:1] * 2, array[:1], array[:1, 0])
        batcher.complete(worker, batch_id, 0.001, Split((ok, Failed("RuntimeError: boom"))))
        assert (await good)[0].tolist() == [[2.0]]
        with pytest.raises(ModelError, match="boom"):
            await bad

    run(scenario)


def test_max_batch_delay_waits_for_a_fuller_batch() -> None:
    async def scenario() -> None:
        batcher = make(max_batch_delay_s=0.05, max_batch_size=4)
        worker = FakeWorker(1)
        batcher.add_worker(worker)
        batcher.submit(rows(1, 0))
        assert not worker.sent  # waits up to 50 ms for company
        batcher.submit(rows(1, 1))
        await asyncio.sleep(0.1)
        assert worker.sent[-1][2] == [0, 1, 2]
        answer(batcher, worker)
        for i in range(4):  # a full batch goes at once
            batcher.submit(rows(1, i))
        assert worker.sent[-1][2] == [0, 1, 2, 3, 4]

    run(scenario)


def test_a_worker_stuck_past_every_deadline_is_reported() -> None:
    async def scenario() -> None:
        stuck: list[FakeWorker] = []
        batcher = make(timeout_s=0.01, on_stuck=stuck.append)
        batcher.stuck_grace_s = 0.05
        worker = FakeWorker(1)
        batcher.add_worker(worker)
        fut = batcher.submit(rows(1, 0))
        with pytest.raises(DeadlineExceeded):
            await fut
        await asyncio.sleep(0.2)  # the watchdog fires at 2 x timeout + grace
        assert stuck == [worker]

    run(scenario)


def test_a_stalled_worker_is_reported_at_about_the_request_timeout() -> None:
    """The watchdog is armed for timeout + a small grace from the batch's start (it was 2 x timeout + 5 s)."""

    async def scenario() -> None:
        batcher = make(timeout_s=30.0, on_stuck=lambda w: None)
        worker = FakeWorker(1)
        batcher.add_worker(worker)
        loop = asyncio.get_running_loop()
        before = loop.time()
        batcher.submit(rows(1, 0))
        (_, batch), = batcher.busy.values()
        assert batch.watchdog is not None
        assert batch.watchdog.when() - before <= 30.0 + batcher.stuck_grace_s + 1.0
        assert batcher.stuck_grace_s <= 2.0
        answer(batcher, worker)  # answered in time: the watchdog is disarmed
        assert batch.watchdog.cancelled()

    run(scenario)


class BrokenWorker(FakeWorker):
    """A worker whose send raises ``error``."""

    def __init__(self, wid: int, error: Exception) -> None:
        super().__init__(wid)
        self.error = error

    def send_batch(self, batch_id: int, array: np.ndarray, offsets: list[int]) -> None:
        raise self.error


def test_a_batch_that_cannot_be_sent_fails_at_once_and_the_worker_stays() -> None:
    """An error while sending is never swallowed into a wait for the deadline: the batch fails with 500."""

    async def scenario() -> None:
        batcher = make(timeout_s=600.0)
        worker = BrokenWorker(1, ValueError("cannot encode"))
        batcher.add_worker(worker)
        fut = batcher.submit(rows(1, 0))
        with pytest.raises(ServeError, match="could not be sent") as info:
            await asyncio.wait_for(fut, 5)
        assert info.value.status == 500
        assert batcher.idle == [worker] and not batcher.busy

    run(scenario)


def test_a_worker_going_away_as_it_is_sent_a_batch_gets_it_retried_elsewhere() -> None:
    async def scenario() -> None:
        batcher = make(timeout_s=600.0)
        gone = BrokenWorker(1, WorkerGone("exiting"))
        batcher.add_worker(gone)
        fut = batcher.submit(rows(1, 0))
        assert gone.id in batcher.busy  # its exit (on_exit -> remove_worker) decides the batch's fate
        good = FakeWorker(2)
        batcher.add_worker(good)
        batcher.remove_worker(gone)
        answer(batcher, good)
        assert (await asyncio.wait_for(fut, 5))[0].tolist() == [[0.0]]

    run(scenario)


def test_outputs_with_the_wrong_number_of_rows_are_never_split_among_requests() -> None:
    async def scenario() -> None:
        batcher = make()
        worker = FakeWorker(1)
        batcher.add_worker(worker)
        batcher.submit(rows(1, 0))
        futs = [batcher.submit(rows(2, 10)), batcher.submit(rows(2, 20))]
        answer(batcher, worker)
        batch_id, array, _ = worker.sent[-1]
        batcher.complete(worker, batch_id, 0.001, Outputs(array[:3], array[:3], array[:3, 0]))
        for fut in futs:
            with pytest.raises(ModelError, match="returned 3 rows for a batch of 4"):
                await fut

    run(scenario)
