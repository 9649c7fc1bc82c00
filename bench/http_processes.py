"""CAPSA_HTTP_PROCESSES=1 against N (and, with ``--hub``, N front ends with CAPSA_HTTP_MAIN_SERVES=false): the
same model, the same wrk load, interleaved rounds.

Both servers run side by side (an idle one costs next to nothing) and are measured in alternation, ``--rounds``
times, so that the machine's other load hits both alike. Per run: requests/s, p50/p99, the mean batch size, the CPU
each kind of process spent per request (primary, secondary front ends, model worker) and wrk's own CPU, which show
where the time goes and whether the client saturated. Run from the repository root::

    python -m bench.http_processes [--processes 2] [--rounds 3] [--duration 10] [--connections 32] [--hub]
        [--busy-poll-us N]

``--busy-poll-us N``: each configuration runs twice, without and with ``CAPSA_BUSY_POLL_US=N``, in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.harness import (
    Server,
    batch_counters,
    cpu_seconds,
    free_port,
    process_tree,
    python,
    run_wrk,
    start,
    wait_for,
    wrk_script,
)
from bench.models import build_registry, v2_json


def roles(server: Server) -> dict[str, list[int]]:
    """The server's processes by role: primary, frontend (secondary HTTP front ends), worker."""
    found: dict[str, list[int]] = {"primary": [server.proc.pid], "frontend": [], "worker": []}
    for pid in process_tree(server.proc.pid)[1:]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found["frontend" if b"service.frontends" in cmd else "worker"].append(pid)
    return found


def main() -> None:
    """Start the servers, run the interleaved rounds, print each run and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="CAPSA_HTTP_PROCESSES of the second server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--hub", action="store_true",
                        help="also N front ends with a main process that serves no HTTP (CAPSA_HTTP_MAIN_SERVES=false)")
    parser.add_argument("--busy-poll-us", type=int, default=0,
                        help="also each configuration with CAPSA_BUSY_POLL_US set to this (default 0: not)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        build_registry(registry)
        request = v2_json()
        script = wrk_script(request, Path(tmp))
        servers: dict[str, Server] = {}
        configs = [("N=1", 1, "true"), (f"N={args.processes}", args.processes, "true")]
        if args.hub:
            configs.append((f"N={args.processes} hub", args.processes, "false"))
        polls = [0, args.busy_poll_us] if args.busy_poll_us else [0]
        try:
            for (label, n, serves), poll in [(config, poll) for config in configs for poll in polls]:
                label += f" busy-poll {poll} us" if poll else ""
                port = free_port()
                server = start(f"capsa-{n}-{serves}-{poll}", [python(), "-m", "service", "--model-repository",
                                                              str(registry), "--port", str(port), "--devices", "cpu",
                                                              "--http-processes", str(n)],
                               Path(tmp), {"CAPSA_ALLOWED_MODULES": "architecture", "CAPSA_GRPC_PORT": "0",
                                           "CAPSA_HTTP_MAIN_SERVES": serves, "CAPSA_BUSY_POLL_US": str(poll)})
                server.base = f"http://127.0.0.1:{port}"
                servers[label] = server
            for server in servers.values():
                wait_for(f"{server.base}/v2/health/ready", proc=server.proc)
                run_wrk(server.base + request.path, script, args.connections, 2)  # warm-up
            results: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
            for _ in range(args.rounds):
                for n, server in servers.items():
                    pids = roles(server)
                    before = {role: cpu_seconds(p) for role, p in pids.items()}
                    n0, e0 = batch_counters(server.base, "mlp")
                    result = run_wrk(server.base + request.path, script, args.connections, args.duration)
                    n1, e1 = batch_counters(server.base, "mlp")
                    for role, p in pids.items():
                        result[f"{role}_us"] = (cpu_seconds(p) - before[role]) / max(result["requests"], 1) * 1e6
                    result["wrk_cores"] = result["client_cpu_s"] / args.duration
                    result["batch"] = (n1 - n0) / max(e1 - e0, 1)
                    result["load"] = os.getloadavg()[0]
                    results[n].append(result)
                    print(f"{n}: {result['rps']:.0f} req/s, p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} "
                          f"ms, errors {result['errors']:.0f}, batch {result['batch']:.1f}, CPU us/request: primary "
                          f"{result['primary_us']:.0f}, front ends {result['frontend_us']:.0f}, worker "
                          f"{result['worker_us']:.0f}; wrk {result['wrk_cores']:.2f} cores; load "
                          f"{result['load']:.1f}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    print(f"\n{os.cpu_count()} CPUs, c={args.connections}, {args.duration:g} s x {args.rounds} interleaved rounds, "
          "single-sample V2 JSON, vote(5) MLP 64-256-256-1")
    for n, runs in results.items():
        ratios = [r["rps"] / b["rps"] for r, b in zip(runs, results["N=1"], strict=True)]
        print(f"{n}: req/s {[round(r['rps']) for r in runs]}, ratio to N=1 {[round(x, 2) for x in ratios]}, "
              f"p99 ms {[round(r['p99'], 1) for r in runs]}")


if __name__ == "__main__":
    main()
