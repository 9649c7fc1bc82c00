"""Serving benchmark (issue 4): capsa-serve against the HTTP floor, with ``wrk``.

The floor is a bare FastAPI/uvicorn endpoint that only echoes the same JSON (``bench/serve_floor.py``). capsa-serve
serves a vote-wrapped MLP (64-256-256-1, 5 voters) on the CPU. Both get single-sample V2 JSON requests at
concurrency 32 and 1; the script prints throughput, the ratio to the floor, p50/p99 latencies and the mean batch
size (from ``capsa_inference_count_total / capsa_inference_exec_count_total``).

Targets: at c=32 throughput >= 0.6x the floor and p99 < 50 ms; at c=1 p50 <= floor p50 + 1.5 ms.

Needs ``wrk`` on the PATH (``apt-get install -y wrk``). Run from the repository root::

    python bench/serve_bench.py [--duration 10] [--no-access-log]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IN_FEATURES = 64


def free_port() -> int:
    """A TCP port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 120.0) -> None:
    """Poll ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready")


def build_registry(root: Path, n_voters: int) -> None:
    """Publish a vote-wrapped MLP as model ``mlp`` version 1."""
    import torch

    import capsa
    from service.registry import publish

    sys.path.insert(0, str(HERE))
    from serve_arch import build_mlp

    torch.manual_seed(0)
    wrapped = capsa.vote.Wrapper(n_voters=n_voters)(build_mlp(in_features=IN_FEATURES))
    x = torch.randn(4, IN_FEATURES)
    wrapped(x)
    with tempfile.TemporaryDirectory() as tmp:
        capsa.save_bundle(wrapped, Path(tmp) / "b", architecture="architecture:build_mlp",
                          kwargs={"in_features": IN_FEATURES}, example_input=x,
                          architecture_file=HERE / "serve_arch.py")
        publish(Path(tmp) / "b", str(root), "mlp", 1)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def run_wrk(url: str, body: str, connections: int, duration: int, threads: int = 1,
            pid: int | None = None) -> dict[str, float]:
    """Run wrk with a POST of ``body``; return requests/s, p50/p99 latency in ms and the server's CPU us/request."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = [[{body}]]\n")
    try:
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script.name, url],
            check=True, capture_output=True, text=True,
        ).stdout
    finally:
        os.unlink(script.name)
    cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses:\n{out}")
    return {"rps": rps, "p50": p50, "p99": p99, "cpu_us": cpu / max(rps * duration, 1) * 1e6}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children that are alive (Linux /proc; 0 elsewhere)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
        for p in pids:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0
    return total


def counters(base: str) -> tuple[float, float]:
    """(samples, batches) served so far, from /metrics."""
    text = httpx.get(f"{base}/metrics").text
    count = float(re.search(r'^capsa_inference_count_total\{[^}]*\} (\S+)', text, re.M).group(1))  # type: ignore
    execs = float(re.search(r'^capsa_inference_exec_count_total\{[^}]*\} (\S+)', text, re.M).group(1))  # type: ignore
    return count, execs


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM and wait."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    """Run both servers in turn at c=32 and c=1 and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--voters", type=int, default=5)
    parser.add_argument("--no-access-log", action="store_true", help="run capsa-serve with CAPSA_ACCESS_LOG=false")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk)")

    import numpy as np

    rng = np.random.default_rng(0)
    row = [round(float(v), 6) for v in rng.standard_normal(IN_FEATURES)]
    data = str(row).replace(" ", "")
    body = f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":[1,{IN_FEATURES}],"data":{data}}}]}}'
    results: dict[str, dict[int, dict[str, float]]] = {"floor": {}, "capsa": {}}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    port = free_port()
    floor = subprocess.Popen([sys.executable, str(HERE / "serve_floor.py"), str(port)], env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}/docs")
        for c in (32, 1):
            run_wrk(f"http://127.0.0.1:{port}/echo", body, c, 2)  # warm-up
            results["floor"][c] = run_wrk(f"http://127.0.0.1:{port}/echo", body, c, args.duration, pid=floor.pid)
    finally:
        stop(floor)

    with tempfile.TemporaryDirectory() as tmp:
        build_registry(Path(tmp), args.voters)
        port = free_port()
        server_env = {**env, "CAPSA_ACCESS_LOG": "false" if args.no_access_log else "true",
                      "CAPSA_ALLOWED_MODULES": "architecture"}  # the bundle carries its code (serve_arch.py)
        with open(Path(tmp) / "server.log", "wb") as logfile:
            server = subprocess.Popen(
                [sys.executable, "-m", "service", "--model-repository", tmp, "--port", str(port), "--devices", "cpu"],
                env=server_env, stderr=logfile, stdout=logfile, cwd=ROOT,
            )
            base = f"http://127.0.0.1:{port}"
            try:
                wait_for(f"{base}/v2/health/ready")
                url = f"{base}/v2/models/mlp/infer"
                batch_sizes = {}
                for c in (32, 1):
                    run_wrk(url, body, c, 2)
                    n0, e0 = counters(base)
                    results["capsa"][c] = run_wrk(url, body, c, args.duration, pid=server.pid)
                    n1, e1 = counters(base)
                    batch_sizes[c] = (n1 - n0) / max(e1 - e0, 1)
            finally:
                stop(server)
            print(f"capsa-serve exit code after SIGTERM: {server.returncode}")

    print(f"\nmachine: {os.cpu_count()} CPUs; wrk -t1, {args.duration}s per run; single-sample JSON requests; "
          f"access log {'off' if args.no_access_log else 'on'}")
    print(f"{'':8}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/req':>12}{'batch':>7}")
    for c in (32, 1):
        f, s = results["floor"][c], results["capsa"][c]
        print(f"{'floor':8}{c:>4}{f['rps']:>10.0f}{f['p50']:>9.2f}{f['p99']:>9.2f}{f['cpu_us']:>12.0f}")
        print(f"{'capsa':8}{c:>4}{s['rps']:>10.0f}{s['p50']:>9.2f}{s['p99']:>9.2f}{s['cpu_us']:>12.0f}"
              f"{batch_sizes[c]:>7.1f}")
    print("(cpu us/req: the server's own processes - HTTP process and workers - per request served)")
    f32, s32, f1, s1 = results["floor"][32], results["capsa"][32], results["floor"][1], results["capsa"][1]
    ratio = s32["rps"] / f32["rps"]
    print(f"\nc=32: throughput {ratio:.2f}x the floor (target >= 0.6) - {'PASS' if ratio >= 0.6 else 'FAIL'}; "
          f"p99 {s32['p99']:.1f} ms (target < 50) - {'PASS' if s32['p99'] < 50 else 'FAIL'}")
    extra = s1["p50"] - f1["p50"]
    print(f"c=1:  p50 {s1['p50']:.2f} ms = floor + {extra:.2f} ms (target <= +1.5) - "
          f"{'PASS' if extra <= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
