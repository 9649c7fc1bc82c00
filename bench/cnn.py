"""The compute-bound case: a vote(5)-wrapped CNN on 3x64x64 images, V2 binary requests of 8 images at c=16.

The reading is served images/s against the same wrapped model's in-process forward (``capsa.load_bundle``, same
device, same torch thread count as the worker) at the batch size the server actually formed (from its metrics),
measured alternately in rounds so drift hits both alike. The ratio is first; beside it the worker's thread count,
the worker's and the rest of the server's CPU use (cores busy) and the client's, so that on a small machine the
front end's and the client's share of the cores can be read off the ratio.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Server, batch_counters, cpu_seconds
from bench.models import images, v2_binary

IMAGES_PER_REQUEST = 8
CONCURRENCY = 16


def worker_pids(server: Server, model: str) -> list[int]:
    """The pids of ``model``'s workers, from the server's JSON log (``worker ready`` lines)."""
    pids = []
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"worker ready"' in line:
            entry = json.loads(line)
            if str(entry.get("worker", "")).startswith(f"{model}-"):
                pids.append(int(entry["pid"]))
    return pids[-1:] if pids else []  # the latest (a restarted worker replaces the earlier one)


def inprocess_images_per_s(bundle: Path, batch: int, device: str, threads: int, duration: float) -> float:
    """Images/s of the wrapped model's own forward (with risk, ``inference_mode``) at ``batch``, in this process."""
    import torch

    import capsa

    torch.set_num_threads(threads)
    model = capsa.load_bundle(bundle, device=device, allowed_modules=["architecture"])
    x = torch.from_numpy(images(max(1, batch))).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            model(x, return_risk=True)
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            model(x, return_risk=True)
            n += 1
        sync()
        elapsed = time.perf_counter() - start
    return n * x.shape[0] / elapsed


def run_cnn(server: Server, bundle: Path, drive: Callable[[Any, int, float], dict[str, float]], rounds: int,
            duration: float, device: str = "cpu", threads: int = 1, model: str = "cnn") -> dict[str, Any]:
    """Serve-vs-in-process rounds for the CNN; ``drive(request, concurrency, duration)`` runs the load (wrk or
    :mod:`bench.pyload`) and returns its summary."""
    request = v2_binary(model, images(IMAGES_PER_REQUEST))
    drive(request, CONCURRENCY, min(2.0, duration))  # warm-up
    served, inproc, batches = [], [], []
    front_cpu = worker_cpu = client_cpu = total_time = 0.0
    for _ in range(rounds):
        workers = worker_pids(server, model)
        pids = server.pids()
        others = [p for p in pids if p not in workers]
        s0, e0 = batch_counters(server.base, model)
        f0, w0 = cpu_seconds(others), cpu_seconds(workers)
        result = drive(request, CONCURRENCY, duration)
        f1, w1 = cpu_seconds(others), cpu_seconds(workers)
        s1, e1 = batch_counters(server.base, model)
        batch = (s1 - s0) / max(e1 - e0, 1.0)
        front_cpu += f1 - f0
        worker_cpu += w1 - w0
        client_cpu += result["client_cpu_s"]
        total_time += duration
        served.append(result["rps"] * IMAGES_PER_REQUEST)
        batches.append(batch)
        inproc.append(inprocess_images_per_s(bundle, round(batch), device, threads, duration / 2))
    served_mean, inproc_mean = sum(served) / len(served), sum(inproc) / len(inproc)
    return {
        "ratio": served_mean / inproc_mean, "served_images_per_s": served_mean,
        "inprocess_images_per_s": inproc_mean, "mean_batch": sum(batches) / len(batches),
        "worker_torch_threads": threads, "device": device, "images_per_request": IMAGES_PER_REQUEST,
        "concurrency": CONCURRENCY, "worker_cores": worker_cpu / total_time,
        "front_end_cores": front_cpu / total_time, "client_cores": client_cpu / total_time,
        "rounds": [{"served": s, "inprocess": i, "batch": b} for s, i, b in zip(served, inproc, batches, strict=True)],
    }


def markdown(result: dict[str, Any]) -> str:
    """The CNN reading as a short Markdown table."""
    return "\n".join([
        f"| CNN case ({result['device']}) | served / in-process | served images/s | in-process images/s "
        "(same batch) | mean batch | worker torch threads | worker cores | rest of server cores | client cores |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| vote(5) CNN, 3x64x64, {result['images_per_request']} images/request, c={result['concurrency']} | "
        f"{result['ratio']:.2f}x | {result['served_images_per_s']:,.0f} | {result['inprocess_images_per_s']:,.0f} | "
        f"{result['mean_batch']:.1f} | {result['worker_torch_threads']} | {result['worker_cores']:.2f} | "
        f"{result['front_end_cores']:.2f} | {result['client_cores']:.2f} |",
    ])
