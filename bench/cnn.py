"""The compute-bound case: a vote(5)-wrapped CNN on 3x64x64 images, V2 binary requests of 8 images at c=16.

The reading is served images/s against the same wrapped model's in-process forward (``capsa.load_bundle``, same
device, same torch thread count as the worker) at the batch size the server actually formed (from its metrics),
measured alternately in rounds so drift hits both alike. The ratio is first; beside it the same ratio per CPU-second
(images per second of CPU the worker got, over images per CPU-second of the in-process forward: what the serving
path costs the worker itself, which other load on a shared machine cannot skew), the worker's thread count, the
worker's and the rest of the server's CPU use (cores busy) and the client's, so that on a small machine the front
end's and the client's share of the cores can be read off the ratio.
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


def worker_ready(server: Server, model: str) -> dict[str, Any]:
    """The latest ``worker ready`` log line of ``model``'s worker (pid, device, torch_threads), from the server's
    JSON log; empty when there is none."""
    found: dict[str, Any] = {}
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"worker ready"' in line:
            entry = json.loads(line)
            if str(entry.get("worker", "")).startswith(f"{model}-"):
                found = entry  # the latest (a restarted worker replaces the earlier one)
    return found


def worker_pids(server: Server, model: str) -> list[int]:
    """The pid of ``model``'s worker (empty when the log names none)."""
    entry = worker_ready(server, model)
    return [int(entry["pid"])] if "pid" in entry else []


def inprocess_images_per_s(bundle: Path, batch: int, device: str, threads: int,
                           duration: float) -> tuple[float, float]:
    """Images/s of the wrapped model's own forward (with risk, ``inference_mode``) at ``batch``, in this process:
    per second of wall time, and per CPU-second this process got (the reading that other load cannot skew)."""
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
        n, start, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < duration:
            model(x, return_risk=True)
            n += 1
        sync()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return n * x.shape[0] / elapsed, n * x.shape[0] / max(cpu, 1e-9)


def run_cnn(server: Server, bundle: Path, drive: Callable[[Any, int, float], dict[str, float]], rounds: int,
            duration: float, device: str = "cpu", threads: int | None = None, model: str = "cnn") -> dict[str, Any]:
    """Serve-vs-in-process rounds for the CNN; ``drive(request, concurrency, duration)`` runs the load (wrk or
    :mod:`bench.pyload`) and returns its summary. The in-process forward uses ``threads`` torch threads, by
    default the worker's own count (its ``worker ready`` log line)."""
    if threads is None:
        threads = int(worker_ready(server, model).get("torch_threads") or 1)
    request = v2_binary(model, images(IMAGES_PER_REQUEST))
    drive(request, CONCURRENCY, min(2.0, duration))  # warm-up
    served, inproc, batches, inproc_cpu = [], [], [], []
    served_images = 0.0
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
        served_images += s1 - s0
        batches.append(batch)
        wall, per_cpu = inprocess_images_per_s(bundle, round(batch), device, threads, duration)
        inproc.append(wall)
        inproc_cpu.append(per_cpu)
    served_mean, inproc_mean = sum(served) / len(served), sum(inproc) / len(inproc)
    served_per_cpu = served_images / max(worker_cpu, 1e-9)
    inproc_per_cpu = sum(inproc_cpu) / len(inproc_cpu)
    return {
        "ratio": served_mean / inproc_mean, "served_images_per_s": served_mean,
        "inprocess_images_per_s": inproc_mean, "mean_batch": sum(batches) / len(batches),
        "cpu_ratio": served_per_cpu / inproc_per_cpu, "served_images_per_worker_cpu_s": served_per_cpu,
        "inprocess_images_per_cpu_s": inproc_per_cpu,
        "worker_torch_threads": threads, "device": device, "images_per_request": IMAGES_PER_REQUEST,
        "concurrency": CONCURRENCY, "worker_cores": worker_cpu / total_time,
        "front_end_cores": front_cpu / total_time, "client_cores": client_cpu / total_time,
        "rounds": [{"served": s, "inprocess": i, "batch": b} for s, i, b in zip(served, inproc, batches, strict=True)],
    }


def markdown(result: dict[str, Any]) -> str:
    """The CNN reading as a short Markdown table."""
    return "\n".join([
        f"| CNN case ({result['device']}) | served / in-process | per CPU-second | served images/s | in-process "
        "images/s (same batch) | mean batch | worker torch threads | worker cores | rest of server cores | "
        "client cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| vote(5) CNN, 3x64x64, {result['images_per_request']} images/request, c={result['concurrency']} | "
        f"{result['ratio']:.2f}x | {result['cpu_ratio']:.2f}x | {result['served_images_per_s']:,.0f} | "
        f"{result['inprocess_images_per_s']:,.0f} | "
        f"{result['mean_batch']:.1f} | {result['worker_torch_threads']} | {result['worker_cores']:.2f} | "
        f"{result['front_end_cores']:.2f} | {result['client_cores']:.2f} |",
    ])
