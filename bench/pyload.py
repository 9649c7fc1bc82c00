"""A multi-process Python load generator, for what wrk cannot drive (gRPC) or where wrk is missing (the GPU box).

``concurrency`` requests are kept in flight, split over ``processes`` spawned processes, each an asyncio loop over
one connection (``grpc.aio`` channel, or an ``httpx.AsyncClient``) sending the same prebuilt request bytes. Every
process warms up, then all start at the same instant and run for ``duration`` seconds. Returns requests/s, p50/p99
and the client processes' own CPU seconds (so a saturated client shows), like :func:`bench.harness.run_wrk`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import time
from typing import Any

import numpy as np

GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def _loop(kind: str, target: str, body: bytes, headers: dict[str, str], concurrency: int, start_at: float,
                duration: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    if kind == "grpc":
        import grpc

        channel = grpc.aio.insecure_channel(target)
        call = channel.unary_unary(GRPC_METHOD, request_serializer=None, response_deserializer=None)

        async def send() -> bool:
            try:
                await call(body, timeout=30)
                return True
            except grpc.aio.AioRpcError:
                return False
    else:
        import httpx

        client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency))

        async def send() -> bool:
            try:
                return (await client.post(target, content=body, headers=headers)).status_code == 200
            except httpx.HTTPError:
                return False

    await send()  # connect and warm up
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0 = _cpu()
    end = time.perf_counter() + duration

    async def one() -> None:
        nonlocal errors
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            ok = await send()
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    await asyncio.gather(*(one() for _ in range(concurrency)))
    cpu = _cpu() - cpu0
    if kind == "grpc":
        await channel.close()
    else:
        await client.aclose()
    return latencies, errors, cpu


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(args: tuple[Any, ...]) -> tuple[np.ndarray, int, float]:
    latencies, errors, cpu = asyncio.run(_loop(*args))
    return np.asarray(latencies, np.float64), errors, cpu


def run(kind: str, target: str, body: bytes, concurrency: int, duration: float, processes: int = 2,
        headers: dict[str, str] | None = None) -> dict[str, float]:
    """Drive ``target`` (``host:port`` for gRPC, a URL for HTTP) with ``concurrency`` requests in flight."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    start_at = time.time() + 2.0 + 0.5 * processes  # after every process has started and warmed up
    jobs = [(kind, target, body, headers or {}, share, start_at, duration) for share in shares]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_child, jobs)
    latencies = np.concatenate([r[0] for r in results]) * 1e3
    count = float(latencies.size)
    return {"rps": count / duration, "p50": float(np.percentile(latencies, 50)) if count else float("nan"),
            "p99": float(np.percentile(latencies, 99)) if count else float("nan"), "requests": count,
            "client_cpu_s": float(sum(r[2] for r in results)), "errors": float(sum(r[1] for r in results))}
