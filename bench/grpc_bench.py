"""gRPC beside REST (issue 10): capsa-serve over ``ModelInfer`` and over V2 REST (binary), against a bare
``grpc.aio`` echo server (the floor: it answers a fixed ``ModelInferResponse`` without decoding anything).

The model is serve_bench's vote-wrapped MLP (64-256-256-1, 5 voters) on the CPU. Requests of 1 and 8 samples, at
concurrency 1 and 32, from one asyncio client process (prebuilt request bytes, identity serializers: the client
does as little as possible). Prints requests/s, p50/p99 and the ratios capsa-gRPC / floor and capsa-gRPC / REST,
all from one run. Run from the repository root::

    python bench/grpc_bench.py [--duration 5]

On a shared or small machine the client competes with the servers for the CPUs: compare ratios of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import IN_FEATURES, build_registry, free_port, stop, wait_for  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"

FLOOR = '''
import asyncio, sys, grpc
from tritonclient.grpc import service_pb2 as pb
RESPONSE = pb.ModelInferResponse(model_name="mlp", model_version="1")
for name, shape in (("prediction", [1, 1]), ("risk", [1, 1]), ("risk_score", [1])):
    RESPONSE.outputs.add(name=name, datatype="FP32", shape=shape)
    RESPONSE.raw_output_contents.append(b"\\0" * 4)
BODY = RESPONSE.SerializeToString()
async def echo(request, context):
    return BODY
async def main():
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
'''


def grpc_request(n: int) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    x = np.random.default_rng(0).standard_normal((n, IN_FEATURES)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[n, IN_FEATURES])
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def rest_request(n: int) -> tuple[bytes, dict[str, str]]:
    import orjson

    x = np.random.default_rng(0).standard_normal((n, IN_FEATURES)).astype(np.float32)
    raw = x.tobytes()
    head = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [n, IN_FEATURES],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}})
    return head + raw, {"Inference-Header-Content-Length": str(len(head)),
                        "Content-Type": "application/octet-stream"}


async def load_grpc(target: str, body: bytes, concurrency: int, duration: float) -> list[float]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        await call(body, timeout=30)  # warm the connection
        end = time.perf_counter() + duration

        async def one() -> None:
            while time.perf_counter() < end:
                start = time.perf_counter()
                await call(body, timeout=30)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies


async def load_rest(url: str, body: bytes, headers: dict[str, str], concurrency: int,
                    duration: float) -> list[float]:
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        (await client.post(url, content=body, headers=headers)).raise_for_status()
        end = time.perf_counter() + duration

        async def one() -> None:
            while time.perf_counter() < end:
                start = time.perf_counter()
                r = await client.post(url, content=body, headers=headers)
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies


def summary(latencies: list[float], duration: float) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {"rps": len(latencies) / duration, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    port, grpc_port, floor_port = free_port(), free_port(), free_port()
    floor = subprocess.Popen([sys.executable, "-c", FLOOR, str(floor_port)], env=env)
    results: dict[tuple[str, int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_registry(Path(tmp), 5)
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "--model-repository", tmp, "--port", str(port),
             "--grpc-port", str(grpc_port), "--devices", "cpu"],
            env={**env, "CAPSA_ACCESS_LOG": "false", "CAPSA_ALLOWED_MODULES": "architecture",
                 "CAPSA_LOG_LEVEL": "warning"})
        try:
            wait_for(f"http://127.0.0.1:{port}/v2/health/ready")
            for n in (1, 8):
                body = grpc_request(n)
                rest_body, headers = rest_request(n)
                for c in (1, 32):
                    for kind in ("floor", "grpc", "rest"):
                        if kind == "rest":
                            lat = asyncio.run(load_rest(f"http://127.0.0.1:{port}/v2/models/mlp/infer", rest_body,
                                                        headers, c, args.duration))
                        else:
                            target = f"127.0.0.1:{floor_port if kind == 'floor' else grpc_port}"
                            lat = asyncio.run(load_grpc(target, body, c, args.duration))
                        results[(kind, n, c)] = summary(lat, args.duration)
        finally:
            stop(server)
            stop(floor)
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.duration:g} s per run; "
          "one Python asyncio client process")
    print(f"{'':8}{'n':>3}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs floor':>10}{'vs REST':>9}")
    for n in (1, 8):
        for c in (1, 32):
            for kind in ("floor", "grpc", "rest"):
                r = results[(kind, n, c)]
                vs_floor = r["rps"] / results[("floor", n, c)]["rps"]
                vs_rest = r["rps"] / results[("rest", n, c)]["rps"]
                print(f"{kind:8}{n:>3}{c:>4}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}"
                      f"{vs_floor:>10.2f}{vs_rest:>9.2f}")


if __name__ == "__main__":
    main()
