"""The HTTP edge against hostile or careless requests, on the shared server (issue 8, items 3, 6, 7, 8):
never fail open on extreme inputs, cheap refusals before any decoding, shedding before decoding when the queue is
full, strict parsing of numbers, versions, thresholds and request ids."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service.conftest import IN_FEATURES, ServerProcess
from tests.service.test_server import infer, sample_input, sleepy_input, v2_body

TIMEOUT = httpx.Timeout(30.0)


def post(server: ServerProcess, path: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=TIMEOUT, **kw)


# ---------------------------------------------------------------------------------------------- never fail open
HUGE = np.full((2, IN_FEATURES), 3.0e38, np.float32)  # finite in FP32; overflows inside the model


@pytest.mark.parametrize("model", ["vote", "neo"])
def test_overflowing_inputs_are_refused_in_json_never_null(server: ServerProcess, model: str) -> None:
    x = np.concatenate([sample_input(1), HUGE])
    r = infer(server, model, x, parameters={"risk_threshold": 0.0}, id="huge-1")
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert "not finite" in message and "sample" in message and "[1, 2]" in message, message
    assert b"null" not in r.content
    r = post(server, f"/v1/models/{model}:predict", {"instances": x.tolist()})
    assert r.status_code == 400 and "not finite" in r.json()["error"], r.text
    # the ordinary sample alone is still served
    assert infer(server, model, x[:1]).status_code == 200


def test_overflowing_inputs_are_refused_in_binary(server: ServerProcess) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}", connection_timeout=30, network_timeout=30)
    try:
        inp = triton.InferInput("input", list(HUGE.shape), "FP32")
        inp.set_data_from_numpy(HUGE, binary_data=True)
        with pytest.raises(InferenceServerException, match="not finite"):
            client.infer("vote", [inp], parameters={"risk_threshold": 0.0})
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------- cheap refusals
def test_duplicate_outputs_are_refused(server: ServerProcess) -> None:
    r = infer(server, "vote", sample_input(1), outputs=[{"name": "risk"}, {"name": "risk"}])
    assert r.status_code == 400 and "output 'risk' appears twice" in r.json()["error"], r.text


def test_shape_and_outputs_are_checked_before_the_data(server: ServerProcess) -> None:
    junk = ["x"] * (17 * IN_FEATURES)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [17, IN_FEATURES], "data": junk}]}
    r = post(server, "/v2/models/vote/infer", body)
    assert r.status_code == 400 and "exceeds the model's max_batch_size 16" in r.json()["error"], r.text
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, IN_FEATURES], "data": ["x"]}],
            "outputs": [{"name": "nope"}]}
    r = post(server, "/v2/models/vote/infer", body)
    assert r.status_code == 400 and "output 'nope' does not exist" in r.json()["error"], r.text
    # the declared shape bounds the data: more entries than the shape needs are refused by count
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, IN_FEATURES], "data": [0.5] * 5000}]}
    r = post(server, "/v2/models/vote/infer", body)
    assert r.status_code == 400 and "5000" in r.json()["error"] and "needs 4" in r.json()["error"], r.text
    r = post(server, "/v1/models/vote:predict", {"instances": [["x"] * IN_FEATURES] * 17})
    assert r.status_code == 400 and "max_batch_size 16" in r.json()["error"], r.text


def test_full_queue_sheds_before_decoding(server: ServerProcess) -> None:
    """With sleepy's queue full, even a malformed body gets the fast 503 (it is never parsed)."""
    results: dict[str, httpx.Response] = {}

    def send(key: str, x: np.ndarray) -> None:
        results[key] = infer(server, "sleepy", x)

    def pending() -> float:
        from tests.service.conftest import metric

        return metric(httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text,
                      "capsa_inference_pending_requests", "sleepy")

    # an earlier test's 504 (test_server) outlives the stuck-worker grace: sleepy's worker may be restarting
    _wait_for(lambda: httpx.get(f"{server.url}/v2/models/sleepy/ready", timeout=TIMEOUT).status_code == 200, 120)
    _wait_for(lambda: pending() == 0)
    threads = [threading.Thread(target=send, args=("running", sleepy_input(2000)))]
    threads[0].start()
    _wait_for(lambda: pending() >= 1)
    for key in ("queued-1", "queued-2"):
        threads.append(threading.Thread(target=send, args=(key, sleepy_input(0))))
        threads[-1].start()
    _wait_for(lambda: pending() >= 3)
    r = post(server, "/v2/models/sleepy/infer", b"{not json")
    shed = r.status_code, r.headers.get("retry-after"), r.json()["error"]
    r1 = post(server, "/v1/models/sleepy:predict", b"{not json")
    for t in threads:
        t.join()
    assert shed[0] == 503 and shed[1] == "1" and "queue is full" in shed[2], shed
    assert r1.status_code == 503, r1.text
    assert {k: v.status_code for k, v in results.items()} == {"running": 200, "queued-1": 200, "queued-2": 200}


def _wait_for(condition: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- strict parsing
@pytest.mark.parametrize(
    ("data", "what"),
    [
        (["0.5", "1", "2", "3"], "strings"),
        ([True, 1.0, 2.0, 3.0], "booleans"),
        ([[True, False, True, False]], "booleans"),
        ([0.5, None, 1.0, 2.0], "null"),
    ],
)
def test_fp32_data_must_be_numbers(server: ServerProcess, data: list, what: str) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, IN_FEATURES], "data": data}]}
    r = post(server, "/v2/models/vote/infer", body)
    assert r.status_code == 400 and "must be numbers" in r.json()["error"], (what, r.text)
    r = post(server, "/v1/models/vote:predict", {"instances": [data] if not isinstance(data[0], list) else data})
    assert r.status_code == 400 and "must be numbers" in r.json()["error"], (what, r.text)
    # tritonclient's JSON mode writes "binary_data": false in the outputs: numbers next to it are still fine
    ok = v2_body(sample_input(1), outputs=[{"name": "risk", "parameters": {"binary_data": False}}])
    assert post(server, "/v2/models/vote/infer", ok).status_code == 200


@pytest.mark.parametrize("version", ["01", "+1", "\uff11", "1_0", " 1", "1.0", "0x1"])
def test_versions_must_be_canonical_decimals(server: ServerProcess, version: str) -> None:
    for method, path in (("POST", f"/v2/models/vote/versions/{version}/infer"),
                         ("GET", f"/v2/models/vote/versions/{version}"),
                         ("GET", f"/v2/models/vote/versions/{version}/ready")):
        r = httpx.request(method, server.url + path, json=v2_body(sample_input(1)), timeout=TIMEOUT)
        assert r.status_code == 404, (version, path, r.text)
    assert httpx.get(f"{server.url}/v2/models/vote/versions/1", timeout=TIMEOUT).status_code == 200


def test_negative_risk_threshold_is_refused(server: ServerProcess) -> None:
    r = infer(server, "vote", sample_input(1), parameters={"risk_threshold": -0.5})
    assert r.status_code == 400 and "risk_threshold must be" in r.json()["error"], r.text
    r = post(server, "/v1/models/vote:predict",
             {"instances": sample_input(1).tolist(), "parameters": {"risk_threshold": -1}})
    assert r.status_code == 400 and "risk_threshold" in r.json()["error"], r.text


def test_long_request_ids_are_refused_not_echoed(server: ServerProcess) -> None:
    long_id = "L" * 100_000
    r = httpx.post(f"{server.url}/v2/models/vote/infer", json=v2_body(sample_input(1)),
                   headers={"X-Request-ID": long_id}, timeout=TIMEOUT)
    assert r.status_code == 400 and "X-Request-ID" in r.json()["error"], r.text[:300]
    assert len(r.headers["x-request-id"]) <= 128 and len(r.content) < 1000
    r = httpx.get(f"{server.url}/v2/health/live", headers={"X-Request-ID": long_id}, timeout=TIMEOUT)
    assert r.status_code == 400 and len(r.headers["x-request-id"]) <= 128
    r = infer(server, "vote", sample_input(1), id=long_id)
    assert r.status_code == 400 and "'id'" in r.json()["error"] and len(r.content) < 1000, r.text[:300]
    assert len(r.headers["x-request-id"]) <= 128
    ok_id = "i" * 128
    r = infer(server, "vote", sample_input(1), id=ok_id)
    assert r.status_code == 200 and r.json()["id"] == ok_id
    _wait_for(lambda: any(e.get("request_id") == ok_id for e in server.log_entries()))
    assert long_id[:129] not in server.log()


@pytest.mark.parametrize("bad_id", ["a\nb", "x\r\nSet-Cookie: a=b", "\u65e5\u672c", "tab\there"])
def test_request_ids_that_cannot_be_echoed_are_refused(server: ServerProcess, bad_id: str) -> None:
    """An id goes back in the X-Request-ID header: control or non-ASCII characters there would break the answer."""
    r = infer(server, "vote", sample_input(1), id=bad_id)
    assert r.status_code == 400 and "'id' must be printable ASCII" in r.json()["error"], r.text
    assert "set-cookie" not in r.headers and r.headers["x-request-id"].isprintable()
