"""Several HTTP front-end processes on one port (CAPSA_HTTP_PROCESSES=2, service.frontends): every request gets its
own rows, batches fill across processes, limits, deadlines and errors hold on every front end, metrics are summed
over the processes, a killed front end is restarted, and SIGTERM stops everything with status 0.

Which process answered is in the ``X-Capsa-Frontend`` header (0: the primary). The kernel spreads new connections
over the processes, so the tests open one connection per request and repeat (bounded) until both served.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import capsa
from tests.service.conftest import ServerProcess, add_model, expected, metric

slow = pytest.mark.slow

TIMEOUT = 60.0  # every client call's own timeout
GATHER = 8  # the "gather" model's batch size: a batch starts only once this many samples are queued


def post(url: str, body: Any, timeout: float = TIMEOUT) -> httpx.Response:
    """One request on its own connection (so the kernel picks a front end for it)."""
    with httpx.Client(timeout=timeout) as client:
        return client.post(url, json=body)


def frontend(response: httpx.Response) -> str:
    """Which front end answered ("0" is the primary)."""
    value = response.headers.get("x-capsa-frontend")
    assert value is not None, f"no X-Capsa-Frontend header: {dict(response.headers)}"
    return value


def v2(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def until_both(send: Callable[[], list[httpx.Response]], rounds: int = 8) -> list[httpx.Response]:
    """Call ``send`` (a round of requests on fresh connections) until both front ends answered some."""
    seen: list[httpx.Response] = []
    for _ in range(rounds):
        seen += send()
        if {frontend(r) for r in seen} >= {"0", "1"}:
            return seen
    raise AssertionError(f"after {rounds} rounds only front ends {sorted({frontend(r) for r in seen})} answered")


def scrape(server: ServerProcess) -> str:
    return post_get(server.url + "/metrics").text


def post_get(url: str) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.get(url)
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A two-front-end server: ``vote`` (rows), ``gather`` (waits for full batches), ``tiny`` (a 2-request
    queue), ``slow`` (for deadlines); 64 KiB body limit, 8 s request deadline."""
    root = tmp_path_factory.mktemp("registry")
    work = tmp_path_factory.mktemp("bundles")
    bundles = {
        "vote": add_model(root, work, "vote", "vote", config={"max_batch_size": 64}),
        "gather": add_model(root, work, "gather", "sculpt", arch="sleepy", config={
            "max_batch_size": GATHER, "max_batch_delay_ms": 6000.0}),
        "tiny": add_model(root, work, "tiny", "sculpt", arch="sleepy",
                          config={"max_batch_size": 1, "max_queue_size": 2}),
        "slow": add_model(root, work, "slow", "sculpt", arch="sleepy", config={"max_batch_size": 1}),
        "touchy": add_touchy(root, work),
    }
    server = ServerProcess(root, tmp_path_factory.mktemp("logs") / "server.log", env={
        "CAPSA_HTTP_PROCESSES": "2", "CAPSA_MAX_REQUEST_BYTES": str(64 * 1024), "CAPSA_REQUEST_TIMEOUT_S": "8",
        "CAPSA_DRAIN_TIMEOUT_S": "10",
    })
    try:
        server.wait_ready()
        wait_for(lambda: len(secondaries(server)) >= 1, "the secondary front end to connect", server)
        yield {"server": server, "bundles": bundles}
    finally:
        pids = [p for p in (e.get("pid") for e in server.log_entries() if e.get("msg") == "front end started") if p]
        code = server.stop()
        assert code == 0, f"capsa-serve exited with {code}:\n{server.log()[-3000:]}"
        for pid in pids:  # every front end stopped with the primary
            wait_for(lambda pid=pid: not alive(pid), f"front end {pid} to exit", server)


def add_touchy(root: Path, work: Path) -> Path:
    """``touchy``: a vote-wrapped linear model that raises when the first input value is 666 (tests/service/
    edge_arch.py)."""
    import importlib.util

    import torch

    from service.registry import publish

    arch = Path(__file__).with_name("edge_arch.py")
    spec = importlib.util.spec_from_file_location("edge_arch_for_frontends", arch)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.manual_seed(0)
    wrapped = capsa.vote.Wrapper(n_voters=2)(module.build(4))
    x = torch.randn(4, 4)
    wrapped(x)
    bundle = capsa.save_bundle(wrapped, work / "touchy", architecture="architecture:build", kwargs={"in_features": 4},
                               example_input=x, architecture_file=arch)
    publish(bundle, str(root), "touchy", 1)
    return bundle


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by the primary) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def secondaries(server: ServerProcess) -> list[int]:
    """Pids of the secondary front ends that connected to the primary (latest last)."""
    return [e["pid"] for e in server.log_entries() if e.get("msg") == "front end connected"]


def wait_for(condition: Callable[[], bool], what: str, server: ServerProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{server.log()[-3000:]}")


@slow
def test_rows_are_each_requests_own_across_front_ends(fleet: dict[str, Any]) -> None:
    server: ServerProcess = fleet["server"]
    reference = capsa.load_bundle(fleet["bundles"]["vote"])
    rng = np.random.default_rng(0)
    url = server.url + "/v2/models/vote/infer"

    def one(i: int) -> tuple[np.ndarray, httpx.Response]:
        x = rng.standard_normal((1 + i % 3, 4)).astype(np.float32) + i
        return x, post(url, v2(x))

    def round_() -> list[httpx.Response]:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(32)))
        for x, response in results:
            assert response.status_code == 200, response.text
            outputs = {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
                       for o in response.json()["outputs"]}
            pred, risk, score = expected(reference, x)
            np.testing.assert_allclose(outputs["prediction"], pred, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(outputs["risk"], risk, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(outputs["risk_score"], score, rtol=1e-4, atol=1e-5)
        return [r for _, r in results]

    until_both(round_)


@slow
def test_batches_fill_across_front_ends(fleet: dict[str, Any]) -> None:
    """``gather`` starts a batch only once 8 samples are queued (or after 6 s): a round of 8 single-sample requests
    that runs as one batch while both front ends answered proves one batch held requests from both."""
    server: ServerProcess = fleet["server"]
    url = server.url + "/v2/models/gather/infer"
    for _ in range(8):
        before = metric(scrape(server), "capsa_inference_exec_count_total", "gather")
        with ThreadPoolExecutor(GATHER) as pool:
            responses = list(pool.map(lambda i: post(url, v2(np.full((1, 4), i, np.float32))), range(GATHER)))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        batches = metric(scrape(server), "capsa_inference_exec_count_total", "gather") - before
        assert batches >= 1
        if batches == 1 and {frontend(r) for r in responses} == {"0", "1"}:
            return
    raise AssertionError("no round ran as one batch holding requests from both front ends")


@slow
def test_limits_and_errors_on_every_front_end(fleet: dict[str, Any]) -> None:
    server: ServerProcess = fleet["server"]
    big = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4096, 4], "data": [0.0] * 16384}]}

    def statuses(body: Any, path: str, status: int) -> Callable[[], list[httpx.Response]]:
        def send() -> list[httpx.Response]:
            with ThreadPoolExecutor(6) as pool:
                responses = list(pool.map(lambda _: post(server.url + path, body), range(6)))
            for r in responses:
                assert r.status_code == status, (r.status_code, r.text)
                assert r.json()["error"]
                assert r.headers.get("x-request-id")
            return responses
        return send

    for r in until_both(statuses(big, "/v2/models/vote/infer", 413)):
        assert "CAPSA_MAX" in r.json()["error"]
    for r in until_both(statuses(v2(np.zeros((1, 3), np.float32)), "/v2/models/vote/infer", 400)):
        assert "shape" in r.json()["error"]
    until_both(statuses(v2(np.zeros((1, 4), np.float32)), "/v2/models/nope/infer", 404))


@slow
def test_model_failures_and_non_finite_outputs_on_every_front_end(fleet: dict[str, Any]) -> None:
    """The primary's batcher's verdicts reach every front end with the same status: a model that raises is 500
    without its internals, an output that is not finite is 400 naming the sample."""
    server: ServerProcess = fleet["server"]

    def send(path: str, x: np.ndarray, status: int) -> Callable[[], list[httpx.Response]]:
        def round_() -> list[httpx.Response]:
            with ThreadPoolExecutor(6) as pool:
                responses = list(pool.map(lambda _: post(server.url + path, v2(x)), range(6)))
            for r in responses:
                assert r.status_code == status, (r.status_code, r.text)
            return responses
        return round_

    for r in until_both(send("/v2/models/touchy/infer", np.full((1, 4), 666, np.float32), 500)):
        assert "secret" not in r.text and "request id" in r.json()["error"]
    huge = np.array([[1.0, 2.0, 3.0, 4.0], [3e38, 3e38, 3e38, 3e38]], np.float32)  # finite in, inf out
    for r in until_both(send("/v2/models/vote/infer", huge, 400)):
        assert "not finite for sample(s) [1]" in r.json()["error"]


@slow
def test_queue_full_is_503_with_retry_after(fleet: dict[str, Any]) -> None:
    """``tiny`` runs one 2 s request at a time and queues 2: of 8 at once, some are shed with 503 by the primary's
    batcher, whichever front end took them (a queued one may also pass its deadline on a busy machine: 504); the
    failure metric sums them over the processes."""
    server: ServerProcess = fleet["server"]
    url = server.url + "/v2/models/tiny/infer"
    before = metric(scrape(server), "capsa_inference_request_failure_total", "tiny")
    failed = 0
    for _ in range(4):
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: post(url, v2(np.full((1, 4), 2100, np.float32))), range(8)))
        assert {r.status_code for r in responses} <= {200, 503, 504}, [r.text for r in responses]
        refused = [r for r in responses if r.status_code == 503]
        assert refused and len(refused) < 8
        for r in refused:
            assert r.headers.get("retry-after") == "1" and "queue is full" in r.json()["error"]
        failed += sum(r.status_code != 200 for r in responses)
        if {frontend(r) for r in refused} == {"0", "1"}:
            break
    wait_for(lambda: metric(scrape(server), "capsa_inference_request_failure_total", "tiny") - before == failed,
             f"{failed} failures counted for 'tiny'", server)


@slow
def test_deadline_is_504_on_every_front_end(fleet: dict[str, Any]) -> None:
    server: ServerProcess = fleet["server"]
    url = server.url + "/v2/models/slow/infer"

    def send() -> list[httpx.Response]:
        with ThreadPoolExecutor(6) as pool:  # one at a time, each 8.5 s, past the 8 s deadline: all 504
            responses = list(pool.map(lambda _: post(url, v2(np.full((1, 4), 8600, np.float32))), range(6)))
        for r in responses:
            assert r.status_code == 504, (r.status_code, r.text)
            assert "deadline" in r.json()["error"]
        return responses

    until_both(send, rounds=4)


@slow
def test_metrics_are_summed_over_front_ends(fleet: dict[str, Any]) -> None:
    """Every scrape, whichever process answers it, counts every request sent to ``vote``, whichever process served
    it: successes, samples, 400s (timed) and 413s (refused before the body: not timed)."""
    server: ServerProcess = fleet["server"]
    names = ("capsa_inference_request_success_total", "capsa_inference_request_failure_total",
             "capsa_inference_count_total", "capsa_inference_request_duration_seconds_count")
    text = scrape(server)
    before = {n: metric(text, n, "vote") for n in names}
    url = server.url + "/v2/models/vote/infer"
    bodies = [v2(np.ones((2, 4), np.float32))] * 24 + [v2(np.zeros((1, 3), np.float32))] * 6
    bodies += [{"inputs": [{"name": "input", "datatype": "FP32", "shape": [4096, 4], "data": [0.0] * 16384}]}] * 6
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda body: post(url, body), bodies))
    assert sorted(r.status_code for r in responses) == [200] * 24 + [400] * 6 + [413] * 6
    assert {frontend(r) for r in responses} == {"0", "1"}, "one process served everything: rerun"
    want = {names[0]: 24, names[1]: 12, names[2]: 48, names[3]: 30}
    scrapes = []
    for _ in range(12):
        with httpx.Client(timeout=TIMEOUT) as client:
            response = client.get(server.url + "/metrics")
        assert response.status_code == 200
        scrapes.append(response)
        for name in names:
            assert metric(response.text, name, "vote") - before[name] == want[name], name
        assert response.text.count("# TYPE capsa_inference_request_success_total counter") == 1
        if {frontend(r) for r in scrapes} == {"0", "1"}:
            break
    assert {frontend(r) for r in scrapes} == {"0", "1"}, "every scrape was answered by one process"


@slow
def test_killed_front_end_is_restarted_and_serves(fleet: dict[str, Any]) -> None:
    """A secondary killed with SIGKILL is restarted and serves again, and what it had counted stays in the sums
    (a total that went down would read as a counter reset)."""
    server: ServerProcess = fleet["server"]
    x = np.ones((1, 4), np.float32)

    def send() -> list[httpx.Response]:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: post(server.url + "/v2/models/vote/infer", v2(x)), range(8)))
        for r in responses:
            assert r.status_code == 200, r.text
        return responses

    until_both(send)
    before = metric(scrape(server), "capsa_inference_request_success_total", "vote")  # nothing in flight: exact
    victim = secondaries(server)[-1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: secondaries(server)[-1] != victim, "a new secondary front end", server)
    assert metric(scrape(server), "capsa_inference_request_success_total", "vote") == before
    served = len(until_both(send))
    assert metric(scrape(server), "capsa_inference_request_success_total", "vote") == before + served


@slow
def test_primary_killed_takes_the_front_ends_with_it(tmp_path: Path) -> None:
    """A primary that dies without a chance to stop them (SIGKILL): its secondaries exit on their own."""
    root, work = tmp_path / "registry", tmp_path / "bundles"
    add_model(root, work, "vote", "vote")
    server = ServerProcess(root, tmp_path / "server.log", env={"CAPSA_HTTP_PROCESSES": "3"})
    try:
        server.wait_ready()
        wait_for(lambda: len(set(secondaries(server))) == 2, "two secondary front ends", server)
        pids = set(secondaries(server))
        server.proc.kill()
        server.proc.wait(TIMEOUT)
        for pid in pids:
            wait_for(lambda pid=pid: not alive(pid), f"front end {pid} to exit", server)
    finally:
        server.stop()


def test_settings_and_option() -> None:
    """One process by default (exactly the single-process server); ``--http-processes`` sets it; 0 is refused."""
    from pydantic import ValidationError

    from service.cli import parse_args
    from service.settings import Settings

    assert Settings().http_processes == 1
    assert Settings(**parse_args(["--http-processes", "3"])).http_processes == 3
    with pytest.raises(ValidationError, match="http_processes"):
        Settings(http_processes=0)


def test_merged_metrics_sum_counters_and_histograms_keep_the_primarys_gauges() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from service.frontends.primary import merge_expositions

    def exposition(requests: int, latency: float, pending: int, model: str = "m") -> str:
        registry = CollectorRegistry()
        Counter("capsa_requests", "r", ["model"], registry=registry).labels(model).inc(requests)
        Histogram("capsa_latency", "l", ["model"], buckets=(0.1, 1.0), registry=registry).labels(model).observe(latency)
        Gauge("capsa_pending", "p", ["model"], registry=registry).labels(model).set(pending)
        return generate_latest(registry).decode()

    merged = merge_expositions(exposition(2, 0.05, 7),
                               [exposition(3, 0.5, 100), exposition(1, 5.0, 100), exposition(4, 0.5, 100, "s")])
    lines = dict(line.rsplit(" ", 1) for line in merged.decode().splitlines() if line and not line.startswith("#"))
    assert float(lines['capsa_requests_total{model="m"}']) == 6
    assert float(lines['capsa_requests_total{model="s"}']) == 4  # a series only a secondary has
    assert float(lines['capsa_latency_bucket{le="0.1",model="m"}']) == 1
    assert float(lines['capsa_latency_bucket{le="1.0",model="m"}']) == 2
    assert float(lines['capsa_latency_bucket{le="+Inf",model="m"}']) == 3
    assert float(lines['capsa_latency_count{model="m"}']) == 3
    assert float(lines['capsa_latency_sum{model="m"}']) == pytest.approx(5.55)
    assert float(lines['capsa_pending{model="m"}']) == 7  # gauges are the primary's
    assert 'capsa_pending{model="s"}' not in lines
    assert merged.decode().count("# TYPE capsa_requests_total counter") == 1


@slow
def test_sigterm_drains_requests_in_flight_on_every_front_end(tmp_path: Path) -> None:
    """SIGTERM while requests are running on every front end: each is answered 200, then the server exits 0."""
    root, work = tmp_path / "registry", tmp_path / "bundles"
    add_model(root, work, "slow", "sculpt", arch="sleepy", config={"max_batch_size": 1})
    server = ServerProcess(root, tmp_path / "server.log", env={"CAPSA_HTTP_PROCESSES": "3",
                                                               "CAPSA_DRAIN_TIMEOUT_S": "30"})
    try:
        server.wait_ready()
        wait_for(lambda: len(set(secondaries(server))) == 2, "two secondary front ends", server)
        url = server.url + "/v2/models/slow/infer"
        def arrived() -> bool:  # every request reached the primary's batcher (queued, running or answered)
            text = scrape(server)
            return (metric(text, "capsa_inference_pending_requests", "slow")
                    + metric(text, "capsa_inference_request_success_total", "slow")) == 10

        with ThreadPoolExecutor(10) as pool:  # one at a time on the one worker: 4 s, then 0.1 s each
            futures = [pool.submit(post, url, v2(np.full((1, 4), 4100 if i == 0 else 200, np.float32)))
                       for i in range(10)]
            wait_for(arrived, "ten requests at the primary", server)
            server.proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
        # 10 connections over 3 processes: all on the primary has odds 3^-10
        assert {frontend(r) for r in responses} - {"0"}, "no request went to a secondary front end"
        assert server.proc.wait(TIMEOUT) == 0, server.log()[-3000:]
    finally:
        server.stop()


@slow
def test_main_process_can_leave_http_to_the_front_ends(tmp_path: Path) -> None:
    """CAPSA_HTTP_MAIN_SERVES=false: every request is served by one of the N front ends (never the main process),
    with its own rows, and the metrics sum both front ends. With busy polling on (CAPSA_BUSY_POLL_US; the fleet's
    tests run without it), so that the front ends' polling loops serve too."""
    root, work = tmp_path / "registry", tmp_path / "bundles"
    bundle = add_model(root, work, "vote", "vote")
    server = ServerProcess(root, tmp_path / "server.log", env={"CAPSA_HTTP_PROCESSES": "2",
                                                               "CAPSA_HTTP_MAIN_SERVES": "false",
                                                               "CAPSA_BUSY_POLL_US": "2000"})
    try:
        server.wait_ready()
        wait_for(lambda: len(set(secondaries(server))) == 2, "two secondary front ends", server)
        reference = capsa.load_bundle(bundle)
        url = server.url + "/v2/models/vote/infer"
        xs = [np.full((1, 4), i, np.float32) for i in range(24)]
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda x: post(url, v2(x)), xs))
        for x, r in zip(xs, responses, strict=True):
            assert r.status_code == 200, r.text
            got = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}
            np.testing.assert_allclose(got["prediction"], expected(reference, x)[0], rtol=1e-4, atol=1e-5)
        assert {frontend(r) for r in responses} == {"1", "2"}
        assert metric(scrape(server), "capsa_inference_request_success_total", "vote") == 24
    finally:
        assert server.stop() == 0, server.log()[-3000:]
