"""Dynamic batching for one model version, driven entirely by asyncio callbacks (no batching task, no threads).

Requests queue (bounded: beyond ``max_queue_size`` queued requests, :class:`QueueFull` at once). Whenever a worker
is free it takes what is queued, in order, up to ``max_batch_size`` samples, keeping multi-sample requests whole; so
at low load a request never waits for company, and while every worker is busy requests accumulate into the next
batch. ``max_batch_delay_ms`` lets a free worker wait that long for a fuller batch. The batch goes to the worker as
one contiguous array; its outputs come back as one array each and are split per request with zero-copy slices.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.busypoll import LoopPoller
from service.metrics import VersionMetrics, observe_many
from service.workers.handle import WorkerGone
from service.workers.messages import Failed, Outcome, Outputs, Split

log = logging.getLogger("capsa.serve.batching")

# One request's prediction, risk, risk_score and (composed models) risk components by output name.
Rows = tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]


class ServeError(Exception):
    """An inference that cannot be answered; ``status`` is the HTTP status to reply with."""

    status = 500


class QueueFull(ServeError):
    """The model version's queue is full (503)."""

    status = 503


class Unavailable(ServeError):
    """No worker is alive, or the one running the request died (503)."""

    status = 503


class DeadlineExceeded(ServeError):
    """The request waited past its deadline (504)."""

    status = 504


class ModelError(ServeError):
    """The model raised on this request (500)."""

    status = 500


class NonFiniteOutput(ServeError):
    """The model's output is not finite for some of this request's samples (``samples``: their indices in the
    request); the request is refused (400) rather than answered with a meaningless risk."""

    status = 400

    def __init__(self, samples: list[int]) -> None:
        super().__init__(f"the model's output is not finite for sample(s) {samples[:20]}"
                         + (" ..." if len(samples) > 20 else ""))
        self.samples = samples


def nonfinite_rows(outputs: Outputs) -> np.ndarray | None:
    """None when every row of ``outputs`` (prediction, risk, score, components) is finite, else the boolean mask
    of the rows that are not. Checked once per batch, not per request: all finite is the common case."""
    arrays = (outputs.prediction, outputs.risk, outputs.risk_score, *(a for _, a in outputs.components))
    floats = [a for a in arrays if a.dtype.kind == "f"]
    if all(np.isfinite(a).all() for a in floats):
        return None
    bad = np.zeros(outputs.risk_score.shape[0], dtype=bool)
    for a in floats:
        bad |= ~np.isfinite(a.reshape(bad.shape[0], -1)).all(axis=1)
    return bad


class BatchWorker(Protocol):
    """What the batcher needs of a worker."""

    id: int

    def send_batch(self, batch_id: int, array: np.ndarray, offsets: list[int]) -> None:
        """Start the batch; raise :class:`~service.workers.WorkerGone` if the worker is exiting."""




@dataclass(slots=True, eq=False)
class Pending:
    """One queued or running request."""

    array: np.ndarray
    future: asyncio.Future[Rows]
    enqueued: float
    timer: asyncio.TimerHandle | None = None
    retried: bool = False
    queued: bool = True


@dataclass(slots=True)
class Batch:
    """Requests running together on one worker."""

    id: int
    requests: list[Pending]
    offsets: list[int]
    started: float
    watchdog: asyncio.TimerHandle | None = None


class Batcher:
    """The queue, the free workers and the batches in flight of one model version."""

    _batch_ids = itertools.count(1)
    # A batch running longer than timeout_s + this is reported to on_stuck: by then every request in it has had
    # its 504 (deadlines count from enqueueing), so the worker is stalled (SIGSTOP, a hung device) or too slow to
    # ever answer in time; either way it is killed and restarted, detected at about the request timeout.
    stuck_grace_s = 1.0

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_size: int,
        timeout_s: float,
        metrics: VersionMetrics,
        on_stuck: Callable[[BatchWorker], None] | None = None,
        busy_poll_s: float = 0.0,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.on_stuck = on_stuck  # called with a worker whose batch outlives its requests' deadlines
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_size = max_queue_size
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.queue: deque[Pending] = deque()
        self.idle: list[BatchWorker] = []
        self.busy: dict[int, tuple[BatchWorker, Batch]] = {}
        self.closed = False
        self._delay_timer: asyncio.TimerHandle | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._loop = asyncio.get_running_loop()
        #: keeps the loop polling while and just after batches run (CAPSA_BUSY_POLL_US; None: off)
        self._poller = LoopPoller.of(self._loop, busy_poll_s) if busy_poll_s > 0 else None
        metrics.pending.set_function(self.pending_requests)

    def pending_requests(self) -> int:
        """Requests queued or running (the pending gauge reads this at scrape time: no per-request cost)."""
        return len(self.queue) + sum(len(batch.requests) for _, batch in self.busy.values())

    def full(self) -> bool:
        """A new request would get QueueFull (the HTTP edge sheds on this before reading or decoding a body)."""
        return len(self.queue) >= self.max_queue_size

    # ---------------------------------------------------------------- workers
    @property
    def live_workers(self) -> int:
        """Workers ready to take batches, idle or busy."""
        return len(self.idle) + len(self.busy)

    def add_worker(self, worker: BatchWorker) -> None:
        """A worker is ready (or free again): give it work."""
        self.idle.append(worker)
        self._dispatch()

    def remove_worker(self, worker: BatchWorker) -> None:
        """A worker died or is stopping: retry its batch once on another worker, or fail it with 503."""
        self.idle = [w for w in self.idle if w is not worker]
        entry = self.busy.pop(worker.id, None)
        if entry is not None:
            if entry[1].watchdog is not None:
                entry[1].watchdog.cancel()
            retry: list[Pending] = []
            for pending in entry[1].requests:
                if pending.future.done():
                    continue
                if not pending.retried and self.live_workers > 0 and not self.closed:
                    pending.retried = True
                    pending.queued = True
                    retry.append(pending)
                else:
                    self._fail(pending, Unavailable("the worker running this request died; retry later"))
            self.queue.extendleft(reversed(retry))
        self._dispatch()
        self._check_drained()

    # ---------------------------------------------------------------- requests
    def submit(self, array: np.ndarray) -> asyncio.Future[Rows]:
        """Queue one request (its batch dimension already checked); the future yields its three outputs."""
        if self.closed or self.live_workers == 0:
            raise Unavailable("no worker is alive for this model version; retry later")
        if len(self.queue) >= self.max_queue_size:
            raise QueueFull(f"the queue is full ({self.max_queue_size} requests); retry later")
        loop = self._loop
        pending = Pending(array, loop.create_future(), time.perf_counter())
        pending.timer = loop.call_later(self.timeout_s, self._expire, pending)
        self.queue.append(pending)
        self._drained.clear()
        if self.idle:
            self._dispatch()
        return pending.future

    def _expire(self, pending: Pending) -> None:
        if pending.future.done():
            return
        if pending.queued:
            with contextlib.suppress(ValueError):
                self.queue.remove(pending)
            pending.queued = False
        self._fail(pending, DeadlineExceeded(f"the request waited past its deadline ({self.timeout_s:g} s)"))
        self._check_drained()

    def _finish(self, pending: Pending) -> None:
        if pending.timer is not None:
            pending.timer.cancel()

    def _fail(self, pending: Pending, exc: ServeError) -> None:
        if not pending.future.done():
            self._finish(pending)
            pending.future.set_exception(exc)

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            if self.max_batch_delay_s > 0:
                samples = sum(p.array.shape[0] for p in self.queue)
                if samples < self.max_batch_size:
                    wait = self.queue[0].enqueued + self.max_batch_delay_s - time.perf_counter()
                    if wait > 0:
                        if self._delay_timer is None:
                            self._delay_timer = self._loop.call_later(wait, self._delay_over)
                        return
            requests: list[Pending] = []
            offsets = [0]
            total = 0
            while self.queue:
                if self.queue[0].future.done():  # cancelled by its caller (a gRPC deadline): never computed
                    stale = self.queue.popleft()
                    stale.queued = False
                    self._finish(stale)
                    continue
                n = self.queue[0].array.shape[0]
                if requests and total + n > self.max_batch_size:
                    break
                pending = self.queue.popleft()
                pending.queued = False
                requests.append(pending)
                total += n
                offsets.append(total)
            if not requests:
                break
            now = time.perf_counter()
            observe_many(self.metrics.queue_duration,
                         now - np.fromiter([p.enqueued for p in requests], float, len(requests)))
            array = requests[0].array if len(requests) == 1 else np.concatenate([p.array for p in requests])
            worker = self.idle.pop()
            batch = Batch(next(self._batch_ids), requests, offsets, now)
            if self.on_stuck is not None:
                batch.watchdog = self._loop.call_later(self.timeout_s + self.stuck_grace_s, self._stuck, worker,
                                                       batch)
            self.busy[worker.id] = (worker, batch)
            if self._poller is not None:
                self._poller.touch()
            try:
                worker.send_batch(batch.id, array, offsets)
            except WorkerGone as exc:  # it is exiting: its on_exit calls remove_worker, which retries the batch
                log.warning("a worker went away as it was given a batch", extra={"error": str(exc)})
            except Exception:  # cannot encode or write: a bug; fail this batch, keep the worker
                log.exception("cannot send a batch to a worker")
                self.busy.pop(worker.id, None)
                if batch.watchdog is not None:
                    batch.watchdog.cancel()
                for pending in requests:
                    self._fail(pending, ServeError("internal error: the batch could not be sent to a worker"))
                self.idle.append(worker)

    def _stuck(self, worker: BatchWorker, batch: Batch) -> None:
        entry = self.busy.get(worker.id)
        if entry is not None and entry[1] is batch and self.on_stuck is not None:
            log.error("a worker did not answer its batch within the request timeout",
                      extra={"batch_id": batch.id, "requests": len(batch.requests),
                             "running_s": round(time.perf_counter() - batch.started, 3)})
            self.on_stuck(worker)

    def _delay_over(self) -> None:
        self._delay_timer = None
        self._dispatch()

    def complete(self, worker: BatchWorker, batch_id: int, compute_s: float, outcome: Outcome) -> None:
        """A worker finished a batch: resolve each request with its own rows, and give the worker more work."""
        entry = self.busy.pop(worker.id, None)
        if entry is None or entry[1].id != batch_id:  # stale (should not happen)
            self.idle.append(worker)
            self._dispatch()
            return
        batch = entry[1]
        if self._poller is not None:
            self._poller.touch()
        if batch.watchdog is not None:
            batch.watchdog.cancel()
        self.metrics.exec_count.inc()
        self.metrics.count.inc(batch.offsets[-1])
        self.metrics.compute_duration.observe(compute_s)
        if isinstance(outcome, Outputs):
            rows = outcome.prediction.shape[0] if outcome.prediction.ndim else -1
            if (rows != batch.offsets[-1] or outcome.risk.shape[:1] != (rows,) or outcome.risk_score.shape != (rows,)
                    or any(a.shape[:1] != (rows,) for _, a in outcome.components)):
                for pending in batch.requests:  # never hand out rows that are not the request's own
                    self._fail(pending, ModelError(
                        f"the model returned {rows} rows for a batch of {batch.offsets[-1]} (prediction "
                        f"{outcome.prediction.shape}, risk {outcome.risk.shape}, score {outcome.risk_score.shape})"))
            else:
                self._resolve(batch.requests, outcome, batch.offsets)
        elif isinstance(outcome, Split):
            for pending, part in zip(batch.requests, outcome.parts, strict=True):
                if isinstance(part, Failed):
                    self._fail(pending, ModelError(f"the model failed on this request: {part.error}"))
                else:
                    self._resolve([pending], part, [0, part.prediction.shape[0]])
        else:
            for pending in batch.requests:
                self._fail(pending, ModelError(f"the model failed on this request: {outcome.error}"))
        self.idle.append(worker)
        self._dispatch()
        self._check_drained()

    def _resolve(self, requests: list[Pending], outputs: Outputs, offsets: list[int]) -> None:
        """Hand request ``i`` rows ``offsets[i]:offsets[i + 1]`` of ``outputs``, refusing those with non-finite
        rows (:class:`NonFiniteOutput`), and record the served risk scores: finiteness and the risk histogram are
        computed once per batch, not per request."""
        bad = nonfinite_rows(outputs)
        served: list[tuple[int, int]] = []
        for pending, lo, hi in zip(requests, offsets, offsets[1:], strict=False):
            if pending.future.done():  # past its deadline, or cancelled: not served
                continue
            self._finish(pending)
            if bad is not None and bad[lo:hi].any():
                pending.future.set_exception(NonFiniteOutput(np.flatnonzero(bad[lo:hi]).tolist()))
                continue
            pending.future.set_result(outputs.rows(lo, hi))
            served.append((lo, hi))
        scores = outputs.risk_score
        if len(served) != len(requests):
            scores = np.concatenate([scores[lo:hi] for lo, hi in served]) if served else scores[:0]
        self.metrics.observe_risk(scores)

    # ---------------------------------------------------------------- lifecycle
    def _check_drained(self) -> None:
        if not self.queue and not self.busy:
            self._drained.set()

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting; wait until queued and running requests are answered (True) or the timeout (False)."""
        self.closed = True
        self._check_drained()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self, reason: str) -> None:
        """Fail everything still queued or running with 503."""
        self.closed = True
        while self.queue:
            pending = self.queue.popleft()
            pending.queued = False
            self._fail(pending, Unavailable(reason))
        for _, batch in self.busy.values():
            if batch.watchdog is not None:
                batch.watchdog.cancel()
            for pending in batch.requests:
                self._fail(pending, Unavailable(reason))
        self.busy.clear()
        self.idle.clear()
        self._drained.set()
