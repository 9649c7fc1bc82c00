"""Process and measurement helpers shared by the benchmarks: ports, readiness, the CPU time of a process tree,
wrk runs (with wrk's own CPU), and capsa-serve's batch counters from ``/metrics``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, timeout: float = 180.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not become ready in {timeout:.0f} s")


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port`` (for servers without an HTTP probe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited with status {proc.returncode} before it listened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"nothing listened on port {port} in {timeout:.0f} s")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants (Linux /proc; just ``[pid]`` elsewhere)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the given processes so far (0 for those gone or unreadable)."""
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, ValueError, IndexError):
            pass
    return total


@dataclass
class Server:
    """One server process under test: its name, process, base URL and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    extra: dict[str, object] = field(default_factory=dict)

    def pids(self) -> list[int]:
        """The server's process tree now (workers included)."""
        return process_tree(self.proc.pid)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group, wait, SIGKILL it if it does not stop; the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log (for error reports)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> Server:
    """Start ``argv`` in its own process group (so stop() reaches every child), logging to ``log_dir/name.log``."""
    log = log_dir / f"{name}.log"
    handle: IO[bytes]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=cwd,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, proc, "", log)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Request:
    """One prepared HTTP request for wrk: path, body bytes and headers."""

    path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Column:
    """One column of the table: which server, how it is driven, with what request, against which floor."""

    name: str
    label: str
    server: str
    driver: str  # "wrk" or "grpc"
    request: Request | bytes
    floor: str | None = "floor-asgi"
    model: str | None = None  # capsa-serve model whose batch counters to read


def wrk_script(request: Request, directory: Path) -> Path:
    """A wrk Lua script that POSTs ``request`` (the body is read from a file, so binary bodies work)."""
    body_file = directory / f"body-{abs(hash((request.path, request.body)))}.bin"
    body_file.write_bytes(request.body)
    lines = ['wrk.method = "POST"', f'local f = assert(io.open("{body_file}", "rb"))', "wrk.body = f:read('*a')",
             "f:close()"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in request.headers.items()]
    script = body_file.with_suffix(".lua")
    script.write_text("\n".join(lines) + "\n")
    return script


def run_wrk(url: str, script: Path, connections: int, duration: float, threads: int = 1) -> dict[str, float]:
    """One wrk run: requests/s, p50/p99 in ms, requests, and wrk's own CPU seconds (from its rusage).

    ``errors`` counts non-2xx answers and socket errors, so a failing server never silently reads as fast."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "30s", "-s", str(script), url]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: (.*)", text)
    errors = int(non2xx.group(1)) if non2xx else 0
    errors += sum(int(n) for n in re.findall(r"\d+", sockets.group(1))) if sockets else 0

    def find(pattern: str) -> str:
        match = re.search(pattern, text)
        if match is None:
            raise RuntimeError(f"wrk output without {pattern!r}:\n{text}")
        return match.group(1)

    requests = float(find(r"(\d+) requests in"))
    return {"rps": float(find(r"Requests/sec:\s+([\d.]+)")), "p50": _ms(find(r"\s50%\s+(\S+)")),
            "p99": _ms(find(r"\s99%\s+(\S+)")), "requests": requests,
            "client_cpu_s": usage.ru_utime + usage.ru_stime, "errors": float(errors)}


#: capsa-serve's counters the bench reads, by the name it gives them: samples and batches run, requests answered
#: and the seconds they spent in the server (from admission to the encoded answer), the workers' compute seconds.
CAPSA_COUNTERS = {
    "samples": "capsa_inference_count_total", "batches": "capsa_inference_exec_count_total",
    "answered": "capsa_inference_request_duration_seconds_count",
    "in_server_s": "capsa_inference_request_duration_seconds_sum",
    "compute_s": "capsa_inference_compute_duration_seconds_sum",
}


def capsa_counters(base: str, model: str) -> dict[str, float]:
    """:data:`CAPSA_COUNTERS` for ``model`` so far (summed over other labels), from capsa-serve's ``/metrics``."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    values = {}
    for name, metric in CAPSA_COUNTERS.items():
        found = re.findall(rf'^{metric}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)', text, re.M)
        values[name] = sum(float(v) for v in found)
    return values


def batch_counters(base: str, model: str) -> tuple[float, float]:
    """(samples, batches) capsa-serve has run for ``model`` so far."""
    counts = capsa_counters(base, model)
    return counts["samples"], counts["batches"]


def python() -> str:
    """The interpreter running the bench (servers under test use the same one)."""
    return sys.executable
