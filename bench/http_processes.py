"""CAPSA_HTTP_PROCESSES=1 against 2 (or more): the same model, the same wrk load, interleaved rounds.

Both servers run side by side (an idle one costs next to nothing) and are measured in alternation, ``--rounds``
times, so that the machine's other load hits both alike. Per run: requests/s, p50/p99, the mean batch size, and the
CPU each process spent per request (primary, secondaries, model worker) and wrk's own CPU share, which shows where
the time goes and whether the client saturated. Run from the repository root::

    python bench/http_processes.py [--processes 2] [--rounds 3] [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_bench import IN_FEATURES, build_registry, counters, free_port, run_wrk, stop, wait_for  # noqa: E402


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def _tree(pid: int) -> dict[int, str]:
    """The server's processes: {pid: role} (primary, frontend, worker)."""
    roles = {pid: "primary"}
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return roles
    for child in map(int, children):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        roles[child] = "frontend" if b"service.frontends" in cmd else "worker"
    return roles


def main() -> None:
    """Start the servers, run the interleaved rounds, print the table."""
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--voters", type=int, default=5)
    args = parser.parse_args()

    import numpy as np

    rng = np.random.default_rng(0)
    data = str([round(float(v), 6) for v in rng.standard_normal(IN_FEATURES)]).replace(" ", "")
    body = f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":[1,{IN_FEATURES}],"data":{data}}}]}}'
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "CAPSA_ALLOWED_MODULES": "architecture",
           "CAPSA_GRPC_PORT": "0", "CAPSA_DEVICES": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        build_registry(Path(tmp), args.voters)
        servers = {}
        for n in (1, args.processes):
            port = free_port()
            log = open(Path(tmp) / f"server-{n}.log", "wb")  # noqa: SIM115 - lives as long as the server
            proc = subprocess.Popen([sys.executable, "-m", "service", "--model-repository", tmp, "--port", str(port),
                                     "--http-processes", str(n)], env=env, stdout=log, stderr=log,
                                    cwd=HERE.parent)
            servers[n] = (proc, f"http://127.0.0.1:{port}")
        results: dict[int, list[dict[str, float]]] = {n: [] for n in servers}
        try:
            for _, base in servers.values():
                wait_for(f"{base}/v2/health/ready")
                run_wrk(f"{base}/v2/models/mlp/infer", body, args.connections, 2)  # warm-up
            for n, (proc, base) in servers.items():  # wait until every front end has connected and served
                for _ in range(200):
                    if len(_tree(proc.pid)) >= n + 1:
                        break
                    httpx.get(f"{base}/v2/health/ready", timeout=5)
            for _ in range(args.rounds):
                for n, (proc, base) in servers.items():
                    roles = _tree(proc.pid)
                    before = {p: _cpu(p) for p in roles}
                    n0, e0 = counters(base)
                    wrk0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    result = run_wrk(f"{base}/v2/models/mlp/infer", body, args.connections, args.duration)
                    wrk1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    n1, e1 = counters(base)
                    requests = result["rps"] * args.duration
                    for role in ("primary", "frontend", "worker"):
                        spent = sum(_cpu(p) - before[p] for p, r in roles.items() if r == role)
                        result[f"{role}_us"] = spent / max(requests, 1) * 1e6
                    result["wrk_cores"] = ((wrk1.ru_utime + wrk1.ru_stime) - (wrk0.ru_utime + wrk0.ru_stime)) \
                        / args.duration
                    result["batch"] = (n1 - n0) / max(e1 - e0, 1)
                    results[n].append(result)
                    print(f"N={n}: {result['rps']:.0f} req/s, p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} "
                          f"ms, batch {result['batch']:.1f}, us/req primary {result['primary_us']:.0f} "
                          f"front ends {result['frontend_us']:.0f} worker {result['worker_us']:.0f}, "
                          f"wrk {result['wrk_cores']:.2f} cores", flush=True)
        finally:
            for proc, _ in servers.values():
                stop(proc)
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()}, c={args.connections}, {args.duration} s x "
          f"{args.rounds} interleaved rounds, single-sample V2 JSON, vote({args.voters}) MLP")
    base_rps = [r["rps"] for r in results[1]]
    for n, runs in results.items():
        ratios = [r["rps"] / b for r, b in zip(runs, base_rps, strict=True)]
        print(f"N={n}: req/s {[round(r['rps']) for r in runs]}, ratio to N=1 per round "
              f"{[round(x, 2) for x in ratios]}, p99 ms {[round(r['p99'], 1) for r in runs]}")


if __name__ == "__main__":
    main()
