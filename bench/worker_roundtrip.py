"""The worker round trip at c=1, step by step: ``python -m bench.worker_roundtrip [--n 5000]``.

The parent's side of the real worker transport (``service.workers.handle._Protocol`` on uvloop, the frame codec)
talks to a real child (``service.workers.child.serve``) whose model does nothing, one batch of one 64-float sample at a
time, so what is printed is the transport's own cost: frame encode, write until the child has woken and decoded it,
and the child's reply until the parent has woken, decoded it and resolved the future (p50, us). The README's
"c=1 p50" paragraph quotes this script. ``--busy-poll-us N``: both sides poll as with ``CAPSA_BUSY_POLL_US=N``
(:mod:`service.busypoll`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import time
from typing import Any

import numpy as np


def _child(sock: socket.socket, busy_poll_s: float) -> None:
    from service.workers.child import serve
    from service.workers.messages import Outputs, Result, RunBatch

    def handle(message: RunBatch) -> Result:
        n = message.array.shape[0]
        zeros = np.zeros((n, 1), np.float32)
        return Result(message.batch_id, time.perf_counter(), Outputs(zeros, zeros, np.zeros(n, np.float32)))

    serve(sock, handle, busy_poll_s)


async def _main(n: int, busy_poll_us: int) -> None:
    from service.busypoll import LoopPoller
    from service.workers.codec import encode
    from service.workers.handle import _Protocol
    from service.workers.messages import RunBatch

    parent, child = socket.socketpair()
    proc = multiprocessing.get_context("spawn").Process(target=_child, args=(child, busy_poll_us / 1e6),
                                                        daemon=True)
    proc.start()
    child.close()
    loop = asyncio.get_running_loop()
    poller = LoopPoller.of(loop, busy_poll_us / 1e6) if busy_poll_us else None
    state: dict[str, Any] = {}

    class Handle:  # what _Protocol calls back on its handle
        def _connected(self, transport: asyncio.Transport) -> None:
            state["transport"] = transport

        def _received(self, message: Any) -> None:
            state["waiter"].set_result(message)

        def _fatal(self, why: str) -> None:
            raise SystemExit(why)

        def _eof(self, reader: Any) -> None:
            pass

        def _connection_lost(self, exc: Exception | None) -> None:
            pass

    await loop.create_unix_connection(lambda: _Protocol(Handle()), sock=parent)  # type: ignore[arg-type]
    x = np.zeros((1, 64), np.float32)
    total, legs = [], []
    for i in range(n):
        state["waiter"] = loop.create_future()
        t0 = time.perf_counter()
        frame = encode(RunBatch(i, x, (0, 1)))
        t1 = time.perf_counter()
        state["transport"].writelines(frame)
        if poller is not None:  # as the batcher does when a batch goes out
            poller.touch()
        message = await state["waiter"]
        t2 = time.perf_counter()
        total.append(t2 - t0)
        legs.append((t1 - t0, message.compute_s - t1, t2 - message.compute_s))  # compute_s: the child's clock
    skip = n // 10  # warm-up
    p50 = [statistics.median(leg[k] for leg in legs[skip:]) * 1e6 for k in range(3)]
    print(f"no-op model round trip p50 {statistics.median(total[skip:]) * 1e6:.0f} us: encode {p50[0]:.1f} | "
          f"write -> child woken and decoded {p50[1]:.1f} | child reply -> parent woken, decoded, resolved "
          f"{p50[2]:.1f} (n={n - skip}, busy-poll {busy_poll_us} us)")
    state["transport"].close()
    proc.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="round trips (the first tenth is warm-up)")
    parser.add_argument("--busy-poll-us", type=int, default=0, help="busy-poll window of both sides (default 0: off)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(_main(args.n, args.busy_poll_us))


if __name__ == "__main__":
    main()
