"""Soak and fault suite: a real ``capsa-serve`` serving two models (a tabular MLP and an image CNN) under load.

Many concurrent clients send requests of mixed sizes for about a minute; every answer is checked against the same
bundle run in this process on that request's own inputs, so an answer computed for another request (a mix-up) or
lost on the way is counted. Faults are injected under load: ``kill -9`` of one worker, ``SIGSTOP`` of another,
offered load far above capacity, and finally ``SIGTERM`` of the server. Each phase prints its figures (sent, 200,
503, 504, lost, mixed-up, latencies, RSS per process, recovery times); the README's "Reliability" section quotes
them. ``CAPSA_SOAK_S`` sets the steady phase's length (default 60 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import capsa
from service.registry import publish
from tests.service.conftest import ServerProcess, expected, vote_bundle

pytestmark = [
    pytest.mark.slow,  # real worker processes that import torch
    # the bundles name tests.fixtures.archs, importable here and in the workers (which inherit sys.path)
    pytest.mark.filterwarnings("ignore:save_bundle.*importable only:UserWarning"),
]

SOAK_S = float(os.environ.get("CAPSA_SOAK_S", "60"))
CLIENTS = 48
REQUEST_TIMEOUT_S = 5.0  # the server's deadline: a stalled worker is detected at about this
OUTPUTS = ("prediction", "risk", "risk_score")
DTYPES = {"FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_, "INT64": np.int64}


@dataclass
class Model:
    """A served model: its request pool (pre-encoded bodies) and the in-process outputs for each."""

    name: str
    sample_shape: tuple[int, ...]
    max_rows: int
    inputs: list[np.ndarray] = field(default_factory=list)
    bodies: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    want: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def encode_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A V2 request with binary input and binary outputs (the binary data extension, as tritonclient sends it)."""
    header = json.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in OUTPUTS],
    }).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def decode_response(response: httpx.Response) -> dict[str, np.ndarray]:
    """The outputs of a V2 response, binary or JSON."""
    content = response.content
    length = response.headers.get("Inference-Header-Content-Length")
    head = json.loads(content[:int(length)] if length else content)
    offset = int(length) if length else 0
    out = {}
    for item in head["outputs"]:
        dtype = DTYPES[item["datatype"]]
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[item["name"]] = np.frombuffer(content[offset:offset + size], dtype=dtype).reshape(item["shape"])
            offset += size
        else:
            out[item["name"]] = np.asarray(item["data"], dtype=dtype).reshape(item["shape"])
    return out


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, Model]]]:
    root = tmp_path_factory.mktemp("soak-registry")
    work = tmp_path_factory.mktemp("soak-bundles")
    specs = {  # name: factory, kwargs, sample shape, rows per request up to, config
        "tab": ("mlp", {"in_features": 32, "hidden": 32, "out_features": 3}, (32,), 16,
                {"max_batch_size": 64, "instances": 2, "max_queue_size": 256}),
        "img": ("cnn", {"in_channels": 3, "width": 8, "num_outputs": 4}, (3, 64, 64), 8,
                {"max_batch_size": 32, "instances": 2, "max_queue_size": 64}),
    }
    models: dict[str, Model] = {}
    rng = np.random.default_rng(0)
    for name, (factory, kwargs, shape, max_rows, config) in specs.items():
        bundle = vote_bundle(work / name, factory, kwargs, torch.randn(2, *shape), seed=1)
        publish(bundle, str(root), name, 1)
        (root / name / "config.json").write_text(json.dumps(config))
        reference = capsa.load_bundle(bundle)
        model = Model(name, shape, max_rows)
        for _ in range(64 if name == "tab" else 32):  # distinct random inputs: a mix-up cannot match by chance
            x = rng.standard_normal((int(rng.integers(1, max_rows + 1)), *shape), dtype=np.float32)
            model.inputs.append(x)
            model.bodies.append(encode_request(x))
            model.want.append(expected(reference, x))
        models[name] = model
    server = ServerProcess(root, tmp_path_factory.mktemp("soak-logs") / "server.log", env={
        "CAPSA_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S), "CAPSA_DRAIN_TIMEOUT_S": "20",
        "CAPSA_ACCESS_LOG": "false", "CAPSA_ALLOWED_MODULES": "tests.fixtures.archs",
    })
    try:
        server.wait_ready(timeout=300)
        _wait(lambda: len(server.worker_pids("tab-")) >= 2 and len(server.worker_pids("img-")) >= 2, 300,
              "every worker ready")
        yield server, models
    finally:
        if server.proc.poll() is None:
            server.stop()


# ------------------------------------------------------------------------------------------------ the load


@dataclass
class Tally:
    """What the clients saw."""

    sent: Counter = field(default_factory=Counter)  # per model
    status: Counter = field(default_factory=Counter)  # (model, status)
    lost: list[tuple[str, float, str]] = field(default_factory=list)  # sent, no HTTP answer: (model, t, error)
    refused: int = 0  # the connection was refused: nothing was sent (only after SIGTERM)
    mixed: list[tuple[str, int]] = field(default_factory=list)  # a 200 whose outputs are not its inputs'
    latency: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    events: list[tuple[float, str, int]] = field(default_factory=list)  # (t, model, status) of every non-200

    def record(self, model: str, status: int, seconds: float, t: float) -> None:
        self.status[(model, status)] += 1
        self.latency.setdefault((model, status), []).append(seconds)
        if status != 200:
            self.events.append((t, model, status))

    def count(self, status: int, model: str | None = None) -> int:
        return sum(n for (m, s), n in self.status.items() if s == status and model in (None, m))

    def p(self, q: float, status: int = 200) -> float:
        values = [v for (_, s), vs in self.latency.items() if s == status for v in vs]
        return float(np.percentile(values, q)) if values else float("nan")


async def _client(http: httpx.AsyncClient, server: ServerProcess, models: list[Model], weights: list[float],
                  tally: Tally, stop: Callable[[], bool], seed: int) -> None:
    rng = np.random.default_rng(seed)
    while not stop():
        model = models[int(rng.choice(len(models), p=weights))]
        k = int(rng.integers(len(model.bodies)))
        body, headers = model.bodies[k]
        tally.sent[model.name] += 1
        start = time.perf_counter()
        try:
            response = await http.post(f"{server.url}/v2/models/{model.name}/infer", content=body, headers=headers,
                                       timeout=REQUEST_TIMEOUT_S * 6)
        except httpx.ConnectError:
            tally.sent[model.name] -= 1  # never sent: the server was not listening any more
            tally.refused += 1
            await asyncio.sleep(0.05)
            continue
        except httpx.HTTPError as exc:
            tally.lost.append((model.name, time.monotonic(), f"{type(exc).__name__}: {exc}"))
            continue
        tally.record(model.name, response.status_code, time.perf_counter() - start, time.monotonic())
        if response.status_code == 200:
            got = decode_response(response)
            want = model.want[k]
            try:
                for name, w in zip(OUTPUTS, want, strict=True):
                    np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5)
            except (AssertionError, KeyError):
                tally.mixed.append((model.name, k))
        elif response.status_code == 503:
            await asyncio.sleep(0.01)  # a client that honours being told to back off, a little


async def _load(server: ServerProcess, models: list[Model], weights: list[float], clients: int,
                stop: Callable[[], bool], tally: Tally) -> None:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(_client(http, server, models, weights, tally, stop, seed)
                               for seed in range(clients)))


def rss_mb(pid: int) -> float:
    """Resident memory of a process (MB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.05)


async def _await(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait (on the loop) until ``condition``; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def exited(server: ServerProcess, pid: int) -> bool:
    return any(e.get("msg") == "worker exited" and e.get("pid") == pid for e in server.log_entries())


def _report(capsys: pytest.CaptureFixture[str], title: str, lines: list[str]) -> None:
    with capsys.disabled():
        print(f"\n== soak: {title}")
        for line in lines:
            print(f"   {line}")


def _figures(tally: Tally, models: list[str]) -> list[str]:
    lines = []
    for m in models:
        other = sum(n for (mm, s), n in tally.status.items() if mm == m and s not in (200, 503, 504))
        lost = sum(1 for x in tally.lost if x[0] == m)
        mixed = sum(1 for x in tally.mixed if x[0] == m)
        lines.append(f"{m}: sent {tally.sent[m]}, 200 {tally.count(200, m)}, 503 {tally.count(503, m)}, "
                     f"504 {tally.count(504, m)}, other {other}, lost {lost}, mixed-up {mixed}")
    lines.append(f"latency of 200s: p50 {tally.p(50) * 1000:.0f} ms, p99 {tally.p(99) * 1000:.0f} ms, "
                 f"max {tally.p(100) * 1000:.0f} ms; of 503s: p50 {tally.p(50, 503) * 1000:.0f} ms, "
                 f"p99 {tally.p(99, 503) * 1000:.0f} ms")
    return lines


# ------------------------------------------------------------------------------------------------ the phases


def test_soak_two_models_with_kill_and_stop_of_workers_under_load(
        soak: tuple[ServerProcess, dict[str, Model]], capsys: pytest.CaptureFixture[str]) -> None:
    """~60 s, 48 clients, both models; kill -9 a tab worker at 1/4, SIGSTOP an img worker at 1/2."""
    server, models = soak
    tally = Tally()
    tab_pid = server.worker_pids("tab-1-cpu-0")[-1]
    img_pid = server.worker_pids("img-1-cpu-1")[-1]
    figures: dict[str, float] = {}
    rss: dict[str, tuple[float, float]] = {}

    async def scenario() -> None:
        end = time.monotonic() + SOAK_S
        load = asyncio.ensure_future(_load(server, list(models.values()), [0.7, 0.3], CLIENTS,
                                           lambda: time.monotonic() > end, tally))
        await asyncio.sleep(min(5.0, SOAK_S / 10))  # warm: the RSS baseline is taken under load
        pids = {"server": server.proc.pid, **{f"worker {p}": p for p in server.worker_pids("tab-")
                                               + server.worker_pids("img-")}}
        start_rss = {k: rss_mb(p) for k, p in pids.items()}

        await asyncio.sleep(max(0.0, SOAK_S / 4 - 5))
        ready_before = len(server.worker_pids("tab-1-cpu-0"))
        os.kill(tab_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        figures["kill9_restart_ready_s"] = await _await(
            lambda: len(server.worker_pids("tab-1-cpu-0")) > ready_before, 120, "a new tab worker after kill -9")
        figures["kill9_failed"] = sum(1 for t, m, s in tally.events if m == "tab" and t >= killed_at)

        await asyncio.sleep(max(0.0, end - SOAK_S / 2 - time.monotonic()))
        ready_before = len(server.worker_pids("img-1-cpu-1"))
        os.kill(img_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            figures["sigstop_detected_s"] = await _await(lambda: exited(server, img_pid), 120,
                                                         "the stopped img worker to be killed")
        finally:
            if not exited(server, img_pid):
                os.kill(img_pid, signal.SIGCONT)
        figures["sigstop_restart_ready_s"] = await _await(
            lambda: len(server.worker_pids("img-1-cpu-1")) > ready_before, 120,
            "a new img worker after SIGSTOP") + figures["sigstop_detected_s"]
        figures["sigstop_failed"] = sum(1 for t, m, s in tally.events if m == "img" and t >= stopped_at)
        await load
        for key, pid in pids.items():
            if pid in (tab_pid, img_pid):
                continue
            rss[key] = (start_rss[key], rss_mb(pid))

    asyncio.run(scenario())
    lines = [f"{CLIENTS} clients, {SOAK_S:g} s, request timeout {REQUEST_TIMEOUT_S:g} s",
             *_figures(tally, ["tab", "img"])]
    lines += [f"kill -9 of a tab worker: replacement ready after {figures['kill9_restart_ready_s']:.1f} s, "
              f"{figures['kill9_failed']} tab requests failed since",
              f"SIGSTOP of an img worker: killed as stalled after {figures['sigstop_detected_s']:.1f} s, "
              f"replacement ready after {figures['sigstop_restart_ready_s']:.1f} s, "
              f"{figures['sigstop_failed']} img requests failed since"]
    lines += [f"RSS {key}: {a:.0f} MB -> {b:.0f} MB" for key, (a, b) in rss.items()]
    _report(capsys, "steady load with faults", lines)

    assert not tally.lost, tally.lost[:5]
    assert not tally.mixed, tally.mixed[:5]
    assert tally.count(200, "tab") > 0 and tally.count(200, "img") > 0
    assert {s for (_, s) in tally.status} <= {200, 503, 504}, tally.status
    assert tally.count(503) + tally.count(504) <= 0.05 * sum(tally.sent.values()), tally.status
    assert figures["kill9_failed"] <= 64, "more tab requests failed than one worker's batch can hold"
    for key, (before, after) in rss.items():  # flat: no growth with the number of requests served
        assert after - before < 100, f"RSS of {key} grew from {before:.0f} to {after:.0f} MB"


def test_soak_offered_load_far_above_capacity(soak: tuple[ServerProcess, dict[str, Model]],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """256 clients on the image model (queue 64): quick 503s, 200s within the deadline, bounded memory."""
    server, models = soak
    tally = Tally()
    before = rss_mb(server.proc.pid)
    peak = [before]

    async def scenario() -> None:
        end = time.monotonic() + 15

        async def sample() -> None:
            while time.monotonic() < end:
                peak[0] = max(peak[0], rss_mb(server.proc.pid))
                await asyncio.sleep(0.5)

        await asyncio.gather(_load(server, [models["img"]], [1.0], 256, lambda: time.monotonic() > end, tally),
                             sample())

    asyncio.run(scenario())
    after = rss_mb(server.proc.pid)
    _report(capsys, "overload (256 clients on img, queue 64)", [
        *_figures(tally, ["img"]), f"RSS server: {before:.0f} MB -> peak {peak[0]:.0f} MB -> {after:.0f} MB"])
    assert not tally.lost, tally.lost[:5]
    assert not tally.mixed, tally.mixed[:5]
    assert tally.count(200) > 0 and tally.count(503) > 0
    assert {s for (_, s) in tally.status} <= {200, 503, 504}, tally.status
    assert peak[0] - before < 500, f"server RSS rose from {before:.0f} to {peak[0]:.0f} MB under overload"


def test_soak_sigterm_under_load_answers_what_was_sent(soak: tuple[ServerProcess, dict[str, Model]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM while 32 clients keep sending: every request sent is answered; then the server exits 0."""
    server, models = soak
    tally = Tally()

    async def scenario() -> None:
        exited_at: list[float] = []

        def stop() -> bool:
            if server.proc.poll() is not None and not exited_at:
                exited_at.append(time.monotonic())
            return bool(exited_at)

        load = asyncio.ensure_future(_load(server, list(models.values()), [0.7, 0.3], 32, stop, tally))
        await asyncio.sleep(3)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(load, 120)

    asyncio.run(scenario())
    code = server.stop()
    _report(capsys, "SIGTERM under load (32 clients)", [
        *_figures(tally, ["tab", "img"]), f"refused after close: {tally.refused}, exit code {code}"])
    assert code == 0
    assert not tally.mixed, tally.mixed[:5]
    assert not tally.lost, tally.lost[:5]
    assert {s for (_, s) in tally.status} <= {200, 503}, tally.status
