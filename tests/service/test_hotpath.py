"""Failure accounting in one place (issue 10): every inference request for a known model is counted exactly once,
as a success or a failure of its protocol, whichever way it fails (bad token, 413, shed 503, 400, 504) and over
REST and gRPC alike (:class:`service.inference.Accounted`).

Each check sends requests, waits for every answer, then compares the counters' change with the answers'
statuses: one failure per non-2xx answer (or non-OK gRPC status), one success per 200, nothing else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg

from tests.service.conftest import ServerProcess, add_model, metric
from tests.service.test_server import sample_input, sleepy_input, v2_body

pytestmark = pytest.mark.slow

TOKEN = "hot-path-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
T = 30.0
TIMEOUT_S = 2  # CAPSA_REQUEST_TIMEOUT_S of this server
JSON_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with an inference token, a 2 s request deadline, a 64 KiB JSON limit, ``vote`` (2 torch threads
    by config.json) and ``sleepy`` (one request at a time, one queued)."""
    root = tmp_path_factory.mktemp("hot-registry")
    work = tmp_path_factory.mktemp("hot-bundles")
    add_model(root, work, "vote", "vote", config={"torch_threads": 2, "interop_threads": 2})
    add_model(root, work, "sleepy", "sculpt", arch="sleepy", config={"max_batch_size": 1, "max_queue_size": 1})
    proc = ServerProcess(root, tmp_path_factory.mktemp("hot-logs") / "server.log", env={
        "CAPSA_INFER_TOKEN": TOKEN, "CAPSA_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "CAPSA_MAX_JSON_REQUEST_BYTES": str(JSON_LIMIT),
    })
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def counts(server: ServerProcess, model: str) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=T).text
    return {f"{protocol}_{outcome}": metric(text, f"capsa_inference_request_{outcome}_total", model,
                                            protocol=protocol)
            for protocol in ("rest", "grpc") for outcome in ("success", "failure")}


def pending(server: ServerProcess, model: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics", timeout=T).text, "capsa_inference_pending_requests", model)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def rest(server: ServerProcess, model: str, body: bytes | dict[str, Any], *, token: bool = True) -> int:
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    headers = {"content-type": "application/json", **(AUTH if token else {})}
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=content, headers=headers,
                      timeout=T).status_code


def grpc_call(server: ServerProcess, model: str, x: np.ndarray, *, token: bool = True,
              datatype: str = "FP32") -> str:
    """The gRPC status code name of one ModelInfer (``OK`` on success)."""
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        inp = tg.InferInput("input", list(x.shape), datatype)
        inp.set_data_from_numpy(x if datatype == "FP32" else x.astype(np.float64))
        client.infer(model, [inp], headers=AUTH if token else None, client_timeout=T)
        return "OK"
    except tg.InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")
    finally:
        client.close()


def expect(server: ServerProcess, model: str, before: dict[str, float], protocol: str, statuses: list[Any]) -> None:
    """Since ``before``, the answers ``statuses`` (HTTP ints or gRPC code names) changed the counters of their
    protocol by exactly one each, and the other protocol's not at all."""
    ok = sum(1 for s in statuses if s in (200, "OK"))
    after = counts(server, model)
    for key, value in (("success", ok), ("failure", len(statuses) - ok)):
        assert after[f"{protocol}_{key}"] - before[f"{protocol}_{key}"] == value, (protocol, key, statuses, after)
    other = "grpc" if protocol == "rest" else "rest"
    for key in ("success", "failure"):
        assert after[f"{other}_{key}"] == before[f"{other}_{key}"], (other, key, after)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_bad_token_and_bad_input_count_one_failure_each(server: ServerProcess, protocol: str) -> None:
    before = counts(server, "vote")
    x = sample_input(2)
    if protocol == "rest":
        statuses = [rest(server, "vote", v2_body(x), token=False),    # 401
                    rest(server, "vote", b"{not json"),               # 400 (decode)
                    rest(server, "vote", v2_body(x[:, :3])),          # 400 (shape)
                    rest(server, "vote", v2_body(x))]                 # 200
        assert statuses == [401, 400, 400, 200]
    else:
        statuses = [grpc_call(server, "vote", x, token=False), grpc_call(server, "vote", x[:, :3]),
                    grpc_call(server, "vote", x, datatype="FP64"), grpc_call(server, "vote", x)]
        assert statuses == ["UNAUTHENTICATED", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "OK"]
    expect(server, "vote", before, protocol, statuses)


def test_too_large_counts_one_failure(server: ServerProcess) -> None:
    before = counts(server, "vote")
    big = np.zeros((1, JSON_LIMIT // 2), np.float32)  # its JSON is over the JSON limit
    statuses = [rest(server, "vote", v2_body(big))]
    assert statuses == [413]
    expect(server, "vote", before, "rest", statuses)


def test_unknown_model_counts_nothing(server: ServerProcess) -> None:
    before = counts(server, "vote")
    assert rest(server, "nope", v2_body(sample_input(1))) == 404
    assert grpc_call(server, "nope", sample_input(1)) == "NOT_FOUND"
    expect(server, "vote", before, "rest", [])


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_shed_and_deadline_count_one_failure_each(server: ServerProcess, protocol: str) -> None:
    """One request runs (sleeping past the 2 s deadline: 504), one waits in the full queue, a third is shed (503).
    Whatever the waiting one gets on a busy machine, each answer is counted once."""
    wait_until(lambda: pending(server, "sleepy") == 0, "sleepy is idle")
    before = counts(server, "sleepy")
    answers: dict[str, Any] = {}

    def send(key: str, x: np.ndarray) -> None:
        answers[key] = (rest(server, "sleepy", v2_body(x)) if protocol == "rest"
                        else grpc_call(server, "sleepy", x))

    threads = [threading.Thread(target=send, args=("running", sleepy_input(TIMEOUT_S * 1000 + 500)))]
    threads[0].start()
    wait_until(lambda: pending(server, "sleepy") >= 1, "the first request is running")
    threads.append(threading.Thread(target=send, args=("queued", sleepy_input(0))))
    threads[1].start()
    wait_until(lambda: pending(server, "sleepy") >= 2, "the second request is queued")
    send("shed", sleepy_input(0))
    for thread in threads:
        thread.join(T)
    assert answers["running"] in (504, "DEADLINE_EXCEEDED"), answers
    assert answers["shed"] in (503, "UNAVAILABLE"), answers
    expect(server, "sleepy", before, protocol, list(answers.values()))
    wait_until(lambda: pending(server, "sleepy") == 0, "sleepy is idle again")


def test_worker_threads_come_from_config_json_and_are_logged(server: ServerProcess) -> None:
    """config.json's torch_threads/interop_threads reach vote's worker; sleepy's gets the default; the
    "worker ready" log line states both (the benchmark reports them from there)."""
    import os

    from service.model_config import worker_torch_threads

    ready = {e["worker"].split("-")[0]: e for e in server.log_entries() if e.get("msg") == "worker ready"}
    assert (ready["vote"]["torch_threads"], ready["vote"]["interop_threads"]) == (2, 2), ready["vote"]
    if "CAPSA_TORCH_THREADS" not in os.environ:
        assert ready["sleepy"]["torch_threads"] == worker_torch_threads(None, None, cpu_workers=1), ready["sleepy"]
    assert ready["sleepy"]["interop_threads"] == 1, ready["sleepy"]


def test_metrics_of_batched_requests_are_per_request(server: ServerProcess) -> None:
    """Queue times and risk scores are recorded per batch (service.metrics.observe_many) but still count every
    request and every served sample once."""
    text = httpx.get(f"{server.url}/metrics", timeout=T).text
    queue0, risk0 = (metric(text, name, "vote") for name in ("capsa_inference_queue_duration_seconds_count",
                                                               "capsa_risk_score_count"))
    sizes = [1, 3, 2, 5, 1, 4, 2, 2]
    statuses: list[int] = []

    def send(n: int) -> None:
        statuses.append(rest(server, "vote", v2_body(sample_input(n))))

    threads = [threading.Thread(target=send, args=(n,)) for n in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(T)
    assert statuses == [200] * len(sizes)
    text = httpx.get(f"{server.url}/metrics", timeout=T).text
    assert metric(text, "capsa_inference_queue_duration_seconds_count", "vote") - queue0 == len(sizes)
    assert metric(text, "capsa_risk_score_count", "vote") - risk0 == sum(sizes)
