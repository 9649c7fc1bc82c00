"""``python -m bench serve``: capsa-serve against its floors (and optionally its peers), interleaved in one run.

Every server runs for the whole run; each round measures every (server, concurrency) point once, the servers'
order rotated per round so that drift (other load, thermal) hits every column alike. Columns:

- ``floor-asgi``: bare ASGI app on the same uvicorn stack, fixed answer (:mod:`bench.floors`): the HTTP limit.
- ``floor-fastapi``: FastAPI route echoing the JSON body.
- ``v2-json-poll``, ``v2-binary-poll``: a second capsa-serve with ``CAPSA_BUSY_POLL_US`` (``--busy-poll-us``,
  default 2000; see :mod:`service.busypoll`).
- ``v2-json``, ``v2-binary``, ``v1``: capsa-serve REST, one sample per request (binary: the binary tensor
  extension for inputs and outputs).
- ``floor-grpc`` and ``grpc``: a bare ``grpc.aio`` echo and capsa-serve's ``ModelInfer``, driven by
  :mod:`bench.pyload` (wrk cannot speak gRPC).
- with ``--peers``: MLServer, LitServe and Ray Serve serving the same bundle (:mod:`bench.peers`).

All capsa columns and peers serve the same capsa-wrapped vote(5) MLP 64-256-256-1 bundle. Per point: req/s,
p50/p99, ratio to the bare floor, mean batch size (capsa-serve's metrics), server CPU per request (the server's
process tree in /proc) and the client's own CPU share. Then the compute-bound CNN case (:mod:`bench.cnn`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import pyload
from bench.harness import (
    Column,
    Request,
    Server,
    capsa_counters,
    cpu_seconds,
    free_port,
    python,
    run_wrk,
    start,
    wait_for,
    wait_for_port,
    wrk_script,
)
from bench.models import build_registry, grpc_infer, sample_row, v1, v2_binary, v2_json

CONCURRENCY = (1, 32, 128)
PEER_SERVERS = ("mlserver", "litserve", "ray-serve")  # bench.peers.PACKAGES' names, without importing it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options."""
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s per point (default: 3 rounds of 10 s)")
    parser.add_argument("--rounds", type=int, help="rounds (each measures every point once)")
    parser.add_argument("--duration", type=float, help="seconds per point per round")
    parser.add_argument("--concurrency", type=lambda s: tuple(int(c) for c in s.split(",")), default=CONCURRENCY,
                        help="comma-separated concurrencies (default 1,32,128)")
    parser.add_argument("--samples", type=int, default=1,
                        help="samples per request (default 1; the floors get the same JSON body, peers 1 sample)")
    parser.add_argument("--peers", action="store_true",
                        help="also MLServer, LitServe and Ray Serve, each in its own virtual environment under "
                             "--peers-cache (created on first use; a peer that fails to install is reported "
                             "unavailable)")
    parser.add_argument("--peers-cache", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capsa-bench",
                        help="where the peers' virtual environments live")
    parser.add_argument("--cnn", action="store_true", help="run only the compute-bound CNN case")
    parser.add_argument("--no-cnn", action="store_true", help="skip the compute-bound CNN case")
    parser.add_argument("--threads", type=int,
                        help="CAPSA_TORCH_THREADS for capsa-serve's workers (default: the server's own default); "
                             "the CNN's in-process forward uses the worker's count, read from its log")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument("--grpc-processes", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="processes of the gRPC load generator")
    parser.add_argument("--busy-poll-us", type=int, default=2000,
                        help="also a second capsa-serve with CAPSA_BUSY_POLL_US set to this (its V2 JSON and binary "
                             "columns, 'busy-poll'); 0: no second server (default 2000)")
    parser.add_argument("--access-log", choices=("on", "off"), default="off",
                        help="capsa-serve's access log (default off, as the floors have none)")
    parser.add_argument("--capsa-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra CAPSA_* settings for capsa-serve (repeatable), e.g. CAPSA_TORCH_THREADS=2")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for serve.md/json/png")


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = f"{os.cpu_count()} CPUs" + (f", {model}" if model else "")
    return f"{platform.node()} ({cpus}, Python {platform.python_version()})"


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def start_capsa(registry: Path, logs: Path, args: argparse.Namespace, name: str = "capsa",
                busy_poll_us: int = 0) -> Server:
    """capsa-serve on the registry, REST and gRPC on free ports, CPU workers (``busy_poll_us``: its
    CAPSA_BUSY_POLL_US, unless ``--capsa-env`` sets it)."""
    port, grpc_port = free_port(), free_port()
    env = {"CAPSA_ACCESS_LOG": "true" if args.access_log == "on" else "false", "CAPSA_ALLOWED_MODULES": "architecture",
           "CAPSA_BUSY_POLL_US": str(busy_poll_us)}
    if args.threads:
        env["CAPSA_TORCH_THREADS"] = str(args.threads)
    for item in args.capsa_env:
        key, _, value = item.partition("=")
        env[key] = value
    server = start(name, [python(), "-m", "service", "--model-repository", str(registry), "--port", str(port),
                             "--grpc-port", str(grpc_port), "--devices", "cpu"], logs, env)
    server.base, server.extra["grpc"] = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    wait_for(f"{server.base}/v2/health/ready", proc=server.proc)
    return server


def start_floor(kind: str, logs: Path) -> Server:
    """One of :mod:`bench.floors`' servers."""
    port = free_port()
    server = start(f"floor-{kind}", [python(), "-m", "bench.floors", kind, str(port)], logs)
    server.base = f"http://127.0.0.1:{port}"
    server.extra["grpc"] = f"127.0.0.1:{port}"
    wait_for_port(port, proc=server.proc)
    return server


def measure(column: Column, server: Server, c: int, duration: float, args: argparse.Namespace,
            scripts: dict[str, Path], idle: Sequence[Server] = ()) -> dict[str, float]:
    """One point: the load run, the server's CPU over it and (capsa-serve) the mean batch it formed; also the CPU
    the ``idle`` servers (those not under load) used meanwhile, which the point competed with."""
    pids = server.pids()
    idle_pids = [p for other in idle for p in other.pids()]
    cpu0, idle0 = cpu_seconds(pids), cpu_seconds(idle_pids)
    counts0 = capsa_counters(server.base, column.model) if column.model else {}
    if column.driver == "grpc":
        assert isinstance(column.request, bytes)
        result = pyload.run("grpc", str(server.extra["grpc"]), column.request, c, duration, args.grpc_processes)
    else:
        assert isinstance(column.request, Request)
        result = run_wrk(server.base + column.request.path, scripts[column.name], c, duration, args.wrk_threads)
    result["server_cpu_s"] = cpu_seconds(pids) - cpu0
    result["idle_servers_cpu_s"] = cpu_seconds(idle_pids) - idle0
    result["duration"] = duration
    if column.model:
        counts1 = capsa_counters(server.base, column.model)
        result.update((name, counts1[name] - counts0[name]) for name in counts1)
    return result


def aggregate(column: Column, c: int, rounds: list[dict[str, float]]) -> dict[str, Any]:
    """One table cell from its rounds: mean req/s, median p50/p99, pooled CPU and batch counts, and (capsa-serve)
    the mean time a request spent in the server and the worker's mean compute time per batch."""
    import statistics

    requests = sum(r["requests"] for r in rounds)
    wall = sum(r["duration"] for r in rounds)
    point: dict[str, Any] = {
        "column": column.name, "label": column.label, "c": c, "floor": column.floor,
        "rps": statistics.mean(r["rps"] for r in rounds),
        "p50": statistics.median(r["p50"] for r in rounds), "p99": statistics.median(r["p99"] for r in rounds),
        "server_cpu_us": 1e6 * sum(r["server_cpu_s"] for r in rounds) / max(requests, 1.0),
        "client_cpu_share": sum(r["client_cpu_s"] for r in rounds) / wall,
        "idle_servers_cpu_share": sum(r.get("idle_servers_cpu_s", 0.0) for r in rounds) / wall,
        "errors": sum(r["errors"] for r in rounds), "rounds": rounds,
    }
    if column.model:
        batches = max(sum(r["batches"] for r in rounds), 1.0)
        point["batch"] = sum(r["samples"] for r in rounds) / batches
        if all("in_server_s" in r for r in rounds):  # where a request's time went, from the server's metrics
            point["in_server_ms"] = 1e3 * sum(r["in_server_s"] for r in rounds) / max(
                sum(r["answered"] for r in rounds), 1.0)
            point["compute_ms"] = 1e3 * sum(r["compute_s"] for r in rounds) / batches
    return point


def columns(peer_columns: list[Column], samples: int = 1, busy_poll_us: int = 0) -> list[Column]:
    """The columns of the run, floors first; capsa's requests carry ``samples`` samples each; with
    ``busy_poll_us``, V2 JSON and binary columns of the second capsa-serve (server ``capsa-poll``) too."""
    x = sample_row(samples)
    poll = f"busy-poll {busy_poll_us / 1000:g} ms"
    polled = [Column("v2-json-poll", f"capsa V2 JSON, {poll}", "capsa-poll", "wrk", v2_json(x=x), model="mlp"),
              Column("v2-binary-poll", f"capsa V2 binary, {poll}", "capsa-poll", "wrk", v2_binary(x=x), model="mlp")]
    return [
        Column("floor-asgi", "bare ASGI floor", "floor-asgi", "wrk", v2_json(x=x, path="/")),
        Column("floor-fastapi", "FastAPI echo floor", "floor-fastapi", "wrk", v2_json(x=x, path="/echo")),
        Column("v2-json", "capsa V2 JSON", "capsa", "wrk", v2_json(x=x), model="mlp"),
        Column("v2-binary", "capsa V2 binary", "capsa", "wrk", v2_binary(x=x), model="mlp"),
        Column("v1", "capsa V1", "capsa", "wrk", v1(n=samples), model="mlp"),
        Column("floor-grpc", "bare grpc.aio floor", "floor-grpc", "grpc", grpc_infer(x=x), floor="floor-grpc"),
        Column("grpc", "capsa gRPC", "capsa", "grpc", grpc_infer(x=x), floor="floor-grpc", model="mlp"),
        *(polled if busy_poll_us else []),
        *peer_columns,
    ]


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The whole serving benchmark; writes and prints the report; the exit status."""
    from bench import report

    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    rounds = args.rounds or (2 if args.quick else 3)
    duration = args.duration or (3.0 if args.quick else 10.0)
    tmp = Path(tempfile.mkdtemp(prefix="capsa-bench-"))
    logs = tmp / "logs"
    logs.mkdir()
    meta = {"command": "python -m bench " + " ".join(argv), "machine": _machine(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_before": _load(), "rounds": rounds,
            "duration": duration, "wrk_threads": args.wrk_threads, "grpc_processes": args.grpc_processes,
            "capsa_torch_threads": args.threads, "capsa_access_log": args.access_log,
            "capsa_env": args.capsa_env, "busy_poll_us": args.busy_poll_us, "samples_per_request": args.samples,
            "logs": str(logs)}
    print(f"bench: {meta['command']}; logs in {logs}", flush=True)
    kinds = ("mlp",) if args.no_cnn else ("cnn",) if args.cnn else ("mlp", "cnn")
    bundles = build_registry(tmp / "registry", kinds)
    servers: dict[str, Server] = {}
    unavailable: dict[str, str] = {}
    result: dict[str, Any] = {"meta": meta, "points": [], "unavailable": unavailable}
    try:
        servers["capsa"] = start_capsa(tmp / "registry", logs, args)
        if not args.cnn:
            for kind in ("asgi", "fastapi", "grpc"):
                servers[f"floor-{kind}"] = start_floor(kind, logs)
            if args.busy_poll_us:
                servers["capsa-poll"] = start_capsa(tmp / "registry", logs, args, "capsa-poll", args.busy_poll_us)
            peer_columns: list[Column] = []
            if args.peers:
                from bench import peers

                peer_columns = peers.start_all(bundles["mlp"], args.peers_cache, logs, servers, unavailable)
            cols = columns(peer_columns, args.samples, args.busy_poll_us)
            scripts = {col.name: wrk_script(col.request, tmp) for col in cols if isinstance(col.request, Request)}
            for col in cols:  # warm-up: every server, every code path
                measure(col, servers[col.server], 8, 1.0, args, scripts)
            measured: dict[tuple[str, int], list[dict[str, float]]] = {}
            for r in range(rounds):
                for c in args.concurrency:
                    order = cols[r % len(cols):] + cols[: r % len(cols)]
                    for col in order:
                        if col.name in unavailable:
                            continue
                        idle = [s for name, s in servers.items() if name != col.server]
                        try:
                            point = measure(col, servers[col.server], c, duration, args, scripts, idle)
                        except (RuntimeError, OSError, ValueError) as exc:
                            if col.server not in PEER_SERVERS:
                                raise
                            unavailable[col.name] = f"failed during the run: {str(exc)[:300]}"  # a peer: drop it
                            continue
                        measured.setdefault((col.name, c), []).append(point)
                        print(f"round {r + 1}/{rounds} c={c:<4} {col.label:24} {point['rps']:>9,.0f} req/s  "
                              f"p99 {point['p99']:7.2f} ms", flush=True)
            cols = [col for col in cols if col.name not in unavailable]
            points = [aggregate(col, c, measured[(col.name, c)]) for c in args.concurrency for col in cols]
            by = {(p["column"], p["c"]): p for p in points}
            for p in points:
                if p["floor"]:
                    p["vs_floor"] = p["rps"] / by[(p["floor"], p["c"])]["rps"]
            result["points"] = points
        if not args.no_cnn:
            from bench.cnn import run_cnn

            script_dir = tmp

            def drive(request: Request, c: int, seconds: float) -> dict[str, float]:
                return run_wrk(servers["capsa"].base + request.path, wrk_script(request, script_dir), c, seconds,
                               args.wrk_threads)

            print("CNN case ...", flush=True)
            result["cnn"] = run_cnn(servers["capsa"], bundles["cnn"], drive, rounds, duration * 2, "cpu")
    finally:
        for server in servers.values():
            server.stop()
        for built in ("registry", "registry-bundles"):  # the logs stay, for reading after the run
            shutil.rmtree(tmp / built, ignore_errors=True)
    meta["load_after"] = _load()
    result["targets"] = report.targets(result["points"], result.get("cnn"))
    written = report.write(result, args.out)
    print()
    print(report.markdown(result))
    print("written:", ", ".join(str(p) for p in written))
    return 0
