"""Bounded clients and quiet errors (issue 8, items 4, 6, 7, 8), on a server of its own with small limits:
header and body read deadlines, the connection cap, the JSON body limit, generic client messages for load
failures and model errors, and ``Connection: close`` (not a reset) for keep-alive clients during a SIGTERM drain."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch

import capsa
from service.registry import publish
from tests.service.conftest import ADMIN_TOKEN, IN_FEATURES, ServerProcess, add_model

pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(30.0)
EDGE_ARCH = Path(__file__).with_name("edge_arch.py")
ENV = {
    "CAPSA_ADMIN_TOKEN": ADMIN_TOKEN, "CAPSA_HEADER_TIMEOUT_S": "5", "CAPSA_BODY_TIMEOUT_S": "2",
    "CAPSA_MAX_CONNECTIONS": "24", "CAPSA_MAX_JSON_REQUEST_BYTES": "4096", "CAPSA_REQUEST_TIMEOUT_S": "10",
    "CAPSA_ALLOWED_MODULES": "tests.fixtures.archs,architecture", "CAPSA_SHUTDOWN_GRACE_S": "5",
    "EDGE_ARCH_BREAK": "1",
}


@pytest.fixture(scope="module")
def edge_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``wide`` (a vote MLP taking batches of 512), ``touchy`` (raises with internals in the message on request)
    and ``broken`` (its factory raises in the worker: a load failure)."""
    root = tmp_path_factory.mktemp("edge-registry")
    work = tmp_path_factory.mktemp("edge-bundles")
    add_model(root, work, "wide", "vote", config={"max_batch_size": 512})
    import importlib.util

    spec = importlib.util.spec_from_file_location("edge_arch_for_tests", EDGE_ARCH)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.manual_seed(0)
    x = torch.randn(4, IN_FEATURES)
    wrapped = capsa.sculpt.Wrapper()(module.build(IN_FEATURES))
    wrapped(x)
    bundle = capsa.save_bundle(wrapped, work / "touchy", architecture="architecture:build",
                               kwargs={"in_features": IN_FEATURES}, example_input=x, architecture_file=EDGE_ARCH)
    publish(bundle, str(root), "touchy", 1)
    bundle = capsa.save_bundle(wrapped, work / "broken", architecture="architecture:build_broken",
                               kwargs={"in_features": IN_FEATURES}, example_input=x, architecture_file=EDGE_ARCH)
    publish(bundle, str(root), "broken", 1)
    return root


@pytest.fixture(scope="module")
def edge(edge_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(edge_registry, tmp_path_factory.mktemp("edge-logs") / "server.log", env=ENV)
    try:
        _wait_models_settled(proc)
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def _wait_models_settled(proc: ServerProcess, timeout: float = 180.0) -> None:
    """Wait until ``wide`` and ``touchy`` are ready (``broken`` never is, so /v2/health/ready stays 503)."""
    proc.wait_ready(timeout, path="/v2/models/wide/ready")
    proc.wait_ready(timeout, path="/v2/models/touchy/ready")
    deadline = time.monotonic() + timeout
    while True:
        index = httpx.post(f"{proc.url}/v2/repository/index", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                           timeout=TIMEOUT).json()
        states = {e["name"]: e["state"] for e in index}
        if states.get("broken") == "UNAVAILABLE":
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.2)


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(30)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails if it holds it past 30 s)."""
    data = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server held the connection open past 30 s (got {data[:200]!r})")


def _healthy(server: ServerProcess) -> bool:
    try:
        return httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------------------------- slow clients
def test_silent_and_slow_header_connections_are_closed(edge: ServerProcess) -> None:
    silent = _connect(edge)
    trickle = _connect(edge)
    trickle.sendall(b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\n")
    assert b"200" not in _read_until_closed(silent)
    assert b"200" not in _read_until_closed(trickle)
    silent.close()
    trickle.close()
    assert _healthy(edge)


def test_endless_headers_get_431(edge: ServerProcess) -> None:
    sock = _connect(edge)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    # 70 x 1 KiB of headers that never end, then nothing: the server reads it all and stops it at 64 KiB
    sock.sendall(b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(70)))
    answer = _read_until_closed(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"CAPSA_MAX_HEADER_BYTES" in answer
    assert _healthy(edge)


def test_a_body_slower_than_its_deadline_gets_408(edge: ServerProcess) -> None:
    sock = _connect(edge)
    sock.sendall(b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\": ")
    answer = _read_until_closed(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"CAPSA_BODY_TIMEOUT_S" in answer
    # a chunked body trickling a byte at a time never ends by itself; its deadline ends it
    sock = _connect(edge)
    sock.sendall(b"POST /v1/models/wide:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    deadline = time.monotonic() + 30
    closed = False
    sock.settimeout(0.2)
    while time.monotonic() < deadline and not closed:
        try:
            sock.sendall(b"1\r\n \r\n")
            closed = sock.recv(65536) == b""
        except TimeoutError:
            continue
        except OSError:
            closed = True
    sock.close()
    assert closed, "a trickling chunked body was held open past 30 s"
    assert _healthy(edge)


def test_connections_over_the_cap_are_refused_at_once(edge: ServerProcess) -> None:
    held = [_connect(edge) for _ in range(24)]
    try:
        extra = _connect(edge)
        answer = _read_until_closed(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"retry-after" in answer.lower() and b"CAPSA_MAX_CONNECTIONS" in answer
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30
    while not _healthy(edge):
        assert time.monotonic() < deadline, "the server did not accept connections again"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- body limits
def test_json_bodies_have_a_lower_limit_than_binary(edge: ServerProcess) -> None:
    x = np.random.default_rng(0).standard_normal((512, IN_FEATURES)).astype(np.float32)
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}
    r = httpx.post(f"{edge.url}/v2/models/wide/infer", content=orjson.dumps(doc), timeout=TIMEOUT)
    assert r.status_code == 413 and "CAPSA_MAX_JSON_REQUEST_BYTES" in r.json()["error"], r.text
    r = httpx.post(f"{edge.url}/v1/models/wide:predict", content=orjson.dumps({"instances": x.tolist()}),
                   timeout=TIMEOUT)
    assert r.status_code == 413 and "CAPSA_MAX_JSON_REQUEST_BYTES" in r.json()["error"], r.text
    raw = x.tobytes()  # 8 KiB: over the JSON limit, well under the binary one
    head = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": len(raw)}}]})
    r = httpx.post(f"{edge.url}/v2/models/wide/infer", content=head + raw, timeout=TIMEOUT,
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][2]["shape"] == [512]


# ---------------------------------------------------------------------------------------------- quiet errors
def test_load_failures_reach_clients_as_a_generic_message(edge: ServerProcess, edge_registry: Path) -> None:
    r = httpx.post(f"{edge.url}/v2/models/broken/infer", headers={"X-Request-ID": "rq-broken"}, timeout=TIMEOUT,
                   json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]})
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    message = r.json()["error"]
    assert "rq-broken" in message and "unavailable" in message, message
    for leak in (str(edge_registry), "/srv/internal", "sha256", "deadbeef", "build_broken"):
        assert leak not in r.text, (leak, r.text)
    index = httpx.post(f"{edge.url}/v2/repository/index", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                       timeout=TIMEOUT).json()
    reason = next(e["reason"] for e in index if e["name"] == "broken")
    assert reason and reason not in message  # the details are for the operator


def test_model_errors_reach_clients_as_a_generic_message(edge: ServerProcess) -> None:
    x = [[666.0, 0.0, 0.0, 0.0]]
    r = httpx.post(f"{edge.url}/v2/models/touchy/infer", headers={"X-Request-ID": "rq-touchy"}, timeout=TIMEOUT,
                   json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": x}]})
    assert r.status_code == 500, r.text
    assert "rq-touchy" in r.json()["error"] and "/srv/internal" not in r.text and "deadbeef" not in r.text
    r = httpx.post(f"{edge.url}/v1/models/touchy:predict", json={"instances": x}, timeout=TIMEOUT)
    assert r.status_code == 500 and "/srv/internal" not in r.text, r.text
    deadline = time.monotonic() + 10
    while "/srv/internal/secret-weights.bin" not in edge.log():
        assert time.monotonic() < deadline, "the model error's details are not in the log"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- SIGTERM
def test_keep_alive_clients_get_connection_close_during_a_sigterm_drain(edge_registry: Path,
                                                                       tmp_path: Path) -> None:
    proc = ServerProcess(edge_registry, tmp_path / "server.log", env=ENV)
    try:
        proc.wait_ready(180, path="/v2/models/wide/ready")
        body: dict[str, Any] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                            "data": [0.1, 0.2, 0.3, 0.4]}]}
        with httpx.Client(base_url=proc.url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=1)) as client:
            first = client.post("/v2/models/wide/infer", json=body)
            assert first.status_code == 200 and first.headers.get("connection") != "close"
            proc.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not any(str(e.get("msg")).lower() == "shutting down" for e in proc.log_entries()):
                assert time.monotonic() < deadline, proc.log()[-2000:]
                time.sleep(0.02)
            last = client.post("/v2/models/wide/infer", json=body)  # on the kept-alive connection
            assert last.status_code == 200, last.text
            assert last.headers["connection"] == "close"
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()
