"""Busy polling (``CAPSA_BUSY_POLL_US``): trade idle CPU for latency, as Linux's ``net.core.busy_poll`` does.

A request crosses two processes: the HTTP process hands the batch to a worker and waits for its answer; the worker
waits for the next batch. Each wait that sleeps costs a wake-up when the data arrives, and on a virtual machine an
idle vCPU halts, so the wake-up goes through the hypervisor and the code after it runs on cold caches: measured
on a 2-vCPU firecracker VM (``python -m bench.wake_cost``), a small model's forward took 100 us back to back, 130 us
after spinning 0.5 ms and 200-240 us after sleeping 0.5 ms, and a served request at one client paid that on both
sides.

With a window ``W`` (seconds):

- a worker that finished a batch keeps reading its socket without blocking for up to ``W`` before it sleeps
  (:func:`recv_into_polling`), yielding the CPU between tries so that other runnable processes on its core go
  first;
- the HTTP process's event loop (and each front end's, with ``CAPSA_HTTP_PROCESSES`` > 1) keeps polling (a callback
  that re-schedules itself, so the loop's ``epoll`` does not sleep) until ``W`` after the last batch (or forwarded
  request) was sent or answered (:class:`LoopPoller`), yielding the CPU on each turn too: without that, at one
  client on 2 vCPUs the client process and the worker queued behind the polling loop (worker round trip at c=1,
  p50 over three alternations, timed with temporary timestamps in the server: 280-370 us without the yield,
  220-300 us with it).

The cost is CPU: at a steady trickle of requests both processes stay busy, and under a CPU quota (Kubernetes
``limits.cpu``) that time counts against the quota. So it is off by default; turn it on where latency at low load
matters and cores are not metered.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import weakref


class LoopPoller:
    """Keeps one event loop polling until ``window_s`` after the last :meth:`touch` (one per loop: :meth:`of`)."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPoller] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"the busy-poll window must be positive, got {window_s}")
        self.loop = loop
        self.window_s = window_s
        self.last = 0.0
        #: True while the polling callback is scheduled (tests wait on it turning False).
        self.active = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, window_s: float) -> LoopPoller:
        """The loop's poller (created on first use; a later call's longer window widens it)."""
        poller = cls._by_loop.get(loop)
        if poller is None:
            poller = cls._by_loop[loop] = cls(loop, window_s)
        poller.window_s = max(poller.window_s, window_s)
        return poller

    def touch(self) -> None:
        """Something just happened that another process will answer soon: keep polling for the window."""
        self.last = time.perf_counter()
        if not self.active:
            self.active = True
            self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        if time.perf_counter() - self.last < self.window_s:
            os.sched_yield()  # another runnable process on this core (the client, the worker) goes first
            self.loop.call_soon(self._poll)  # a ready callback makes the loop's next epoll non-blocking
        else:
            self.active = False


def recv_into_polling(sock: socket.socket, buffer: memoryview, window_s: float) -> int:
    """``sock.recv_into(buffer)`` on a blocking socket that first polls (``MSG_DONTWAIT``) for up to ``window_s``;
    OSError propagates as from ``recv_into``."""
    if window_s > 0:
        end = time.perf_counter() + window_s
        while True:
            try:
                return sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= end:
                    break
                os.sched_yield()
    return sock.recv_into(buffer)
