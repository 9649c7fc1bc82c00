"""capsa-serve end to end over real sockets (one shared server): health, metadata, inference for every wrapper
with httpx and tritonclient (binary and JSON), batching, every error answer, request ids, metrics and docs."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.service.conftest import IN_FEATURES, OUT_FEATURES, WRAPPERS, ServerProcess, expected, metric

TOL = {"rtol": 1e-5, "atol": 1e-5}


def v2_body(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}], **extra}


def infer(server: ServerProcess, model: str, x: np.ndarray, **extra: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=v2_body(x, **extra), timeout=30)


def outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def sample_input(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN_FEATURES)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- health, metadata
def test_health_and_server_metadata(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    ready = httpx.get(f"{server.url}/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    meta = httpx.get(f"{server.url}/v2").json()
    assert meta["name"] == "capsa-serve" and "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_model_metadata(server: ServerProcess, wrapper: str) -> None:
    out = OUT_FEATURES[wrapper]
    for path in (f"/v2/models/{wrapper}", f"/v2/models/{wrapper}/versions/1"):
        meta = httpx.get(server.url + path).json()
        assert meta["name"] == wrapper and meta["versions"] == ["1"] and meta["platform"] == "pytorch_capsa"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, IN_FEATURES]}]
        assert meta["outputs"] == [
            {"name": "prediction", "datatype": "FP32", "shape": [-1, out]},
            {"name": "risk", "datatype": "FP32", "shape": [-1, out]},
            {"name": "risk_score", "datatype": "FP32", "shape": [-1]},
            {"name": "flagged", "datatype": "BOOL", "shape": [-1]},
        ]
        assert meta["parameters"]["wrapper"]["wrapper"] == wrapper
    assert httpx.get(f"{server.url}/v2/models/{wrapper}/ready").json() == {"name": wrapper, "ready": True}
    assert httpx.get(f"{server.url}/v2/models/{wrapper}/versions/1/ready").status_code == 200


def test_unknown_model_or_version_is_404(server: ServerProcess) -> None:
    x = sample_input(1)
    for method, path in [("GET", "/v2/models/nope"), ("GET", "/v2/models/vote/versions/7"),
                         ("GET", "/v2/models/nope/ready"), ("POST", "/v2/models/nope/infer"),
                         ("POST", "/v2/models/vote/versions/7/infer"), ("POST", "/v2/models/vote/versions/x/infer"),
                         ("POST", "/v1/models/nope:predict")]:
        r = httpx.request(method, server.url + path, json=v2_body(x))
        assert r.status_code == 404, (path, r.text)
        assert ("nope" in r.json()["error"]) or ("vote" in r.json()["error"]), r.text


# ---------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_infer_json_equals_in_process_outputs(server: ServerProcess, reference: dict, wrapper: str) -> None:
    x = sample_input(5, seed=1)
    pred, risk, score = expected(reference[wrapper], x)
    r = infer(server, wrapper, x, id="req-7")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "req-7" and doc["model_name"] == wrapper and doc["model_version"] == "1"
    got = outputs(r)
    names = ["prediction", "risk", "risk_score"] + (["flagged"] if wrapper == "neo" else [])
    assert [o["name"] for o in doc["outputs"]] == names
    np.testing.assert_allclose(got["prediction"], pred, **TOL)
    np.testing.assert_allclose(got["risk"], risk, **TOL)
    np.testing.assert_allclose(got["risk_score"], score, **TOL)
    assert got["risk_score"].shape == (5,)
    # flat data decodes the same (row-major); the versioned route too
    flat = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, IN_FEATURES], "data": x.ravel().tolist()}]}
    r2 = httpx.post(f"{server.url}/v2/models/{wrapper}/versions/1/infer", json=flat)
    np.testing.assert_allclose(outputs(r2)["prediction"], pred, **TOL)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_tritonclient(server: ServerProcess, reference: dict, wrapper: str, binary: bool) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(wrapper)
    assert client.get_model_metadata(wrapper)["inputs"][0]["shape"] == [-1, IN_FEATURES]
    x = sample_input(3, seed=2)
    pred, risk, score = expected(reference[wrapper], x)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    names = ["prediction", "risk", "risk_score", "flagged"]
    requested = [triton.InferRequestedOutput(n, binary_data=binary) for n in names]
    result = client.infer(wrapper, [inp], outputs=requested, parameters={"risk_threshold": float(np.median(score))},
                          request_id="tc-1")
    assert result.get_response()["id"] == "tc-1"
    np.testing.assert_allclose(result.as_numpy("prediction"), pred, **TOL)
    np.testing.assert_allclose(result.as_numpy("risk"), risk, **TOL)
    np.testing.assert_allclose(result.as_numpy("risk_score"), score, **TOL)
    np.testing.assert_array_equal(result.as_numpy("flagged"), score > np.median(score))
    # without an outputs list tritonclient asks for all of them in binary
    result = client.infer(wrapper, [inp])
    np.testing.assert_allclose(result.as_numpy("risk"), risk, **TOL)
    client.close()


def test_v1_predict(server: ServerProcess, reference: dict) -> None:
    x = sample_input(2, seed=3)
    for model in ("vote", "neo"):
        pred, risk, score = expected(reference[model], x)
        r = httpx.post(f"{server.url}/v1/models/{model}:predict", json={"instances": x.tolist()})
        assert r.status_code == 200, r.text
        doc = r.json()
        np.testing.assert_allclose(doc["predictions"], pred, **TOL)
        np.testing.assert_allclose(doc["risk"], risk, **TOL)
        np.testing.assert_allclose(doc["risk_score"], score, **TOL)
        assert ("flagged" in doc) == (model == "neo")  # neo's config sets a risk threshold
        if model == "neo":
            assert doc["flagged"] == (score > 0.05).tolist()
    r = httpx.post(f"{server.url}/v1/models/vote:predict",
                   json={"instances": x.tolist(), "parameters": {"risk_threshold": 0.0}})
    assert r.json()["flagged"] == [True, True]


def test_output_selection_and_thresholds(server: ServerProcess, reference: dict) -> None:
    x = sample_input(4, seed=4)
    _, _, score = expected(reference["sample"], x)
    threshold = float(np.sort(score)[1])
    r = infer(server, "sample", x, parameters={"risk_threshold": threshold},
              outputs=[{"name": "flagged"}, {"name": "risk_score"}])
    got = outputs(r)
    assert list(got) == ["flagged", "risk_score"]
    np.testing.assert_array_equal(got["flagged"], score > threshold)
    # risk_score is the mean of risk over the non-batch dimensions (sample's output has 3)
    assert reference["sample"] is not None and OUT_FEATURES["sample"] == 3
    r = infer(server, "neo", x, outputs=[{"name": "flagged"}])  # the model's configured threshold
    np.testing.assert_array_equal(outputs(r)["flagged"], expected(reference["neo"], x)[2] > 0.05)


def test_concurrent_mixed_batch_sizes_are_batched_and_get_their_own_rows(server: ServerProcess,
                                                                        reference: dict) -> None:
    sizes = [1, 3, 2, 5, 1, 4, 2, 1] * 6
    inputs = [sample_input(n, seed=100 + i) for i, n in enumerate(sizes)]
    before = httpx.get(f"{server.url}/metrics").text

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=len(sizes))) as client:
            return await asyncio.gather(*(client.post("/v2/models/vote/infer", json=v2_body(x, id=str(i)))
                                          for i, x in enumerate(inputs)))

    responses = asyncio.run(fire())
    after = httpx.get(f"{server.url}/metrics").text
    for i, (x, r) in enumerate(zip(inputs, responses, strict=True)):
        assert r.status_code == 200 and r.json()["id"] == str(i)
        pred, risk, score = expected(reference["vote"], x)
        got = outputs(r)
        np.testing.assert_allclose(got["prediction"], pred, **TOL)
        np.testing.assert_allclose(got["risk"], risk, **TOL)
        np.testing.assert_allclose(got["risk_score"], score, **TOL)
    execs = (metric(after, "capsa_inference_exec_count_total", "vote")
             - metric(before, "capsa_inference_exec_count_total", "vote"))
    samples = (metric(after, "capsa_inference_count_total", "vote")
               - metric(before, "capsa_inference_count_total", "vote"))
    assert samples == sum(sizes)
    assert 0 < execs < len(sizes), f"{execs} batches for {len(sizes)} requests: no batching"


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        ({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
         "input 'input': datatype FP64 does not match the model's FP32"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}]},
         "input 'input': shape [1, 5] does not match the model's [-1, 4]"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]}]},
         "input 'input': data has 3 elements"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [17, 4], "data": [0.0] * 68}]},
         "batch size 17 exceeds the model's max_batch_size 16"),
        ({"inputs": [{"name": "wrong", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
         "takes one input named 'input'"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
          "outputs": [{"name": "nope"}]}, "output 'nope' does not exist"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
          "outputs": [{"name": "flagged"}]}, "output 'flagged' needs parameters.risk_threshold"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
          "parameters": {"risk_threshold": "high"}}, "parameters.risk_threshold must be a finite number"),
    ],
)
def test_bad_requests_are_400_and_name_the_field(server: ServerProcess, body: Any, message: str) -> None:
    before = metric(httpx.get(f"{server.url}/metrics").text, "capsa_inference_request_failure_total", "vote")
    if isinstance(body, bytes):
        r = httpx.post(f"{server.url}/v2/models/vote/infer", content=body)
    else:
        r = httpx.post(f"{server.url}/v2/models/vote/infer", json=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]
    after = metric(httpx.get(f"{server.url}/metrics").text, "capsa_inference_request_failure_total", "vote")
    assert after == before + 1
    # a bad request never affects the others
    assert infer(server, "vote", sample_input(1)).status_code == 200


def test_non_finite_inputs_are_400_in_json_and_binary(server: ServerProcess) -> None:
    x = sample_input(2)
    x[1, 2] = np.nan
    raw = x.tobytes()
    head = httpx.Request("POST", "/", json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4],
                                                        "parameters": {"binary_data_size": len(raw)}}]}).content
    r = httpx.post(f"{server.url}/v2/models/vote/infer", content=head + raw,
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "input 'input': contains non-finite values" in r.json()["error"]
    overflow = b'{"instances": [[1, 2, 3, 1e39]]}'  # finite in JSON, infinite in FP32
    r = httpx.post(f"{server.url}/v1/models/vote:predict", content=overflow)
    assert r.status_code == 400 and "non-finite" in r.json()["error"]


def test_body_over_the_limit_is_413(server: ServerProcess) -> None:
    failures = metric(httpx.get(f"{server.url}/metrics").text, "capsa_inference_request_failure_total", "vote")
    big = b'{"inputs": [' + b" " * (1 << 20) + b"]}"
    r = httpx.post(f"{server.url}/v2/models/vote/infer", content=big)
    assert r.status_code == 413 and "CAPSA_MAX_REQUEST_BYTES" in r.json()["error"]
    after = metric(httpx.get(f"{server.url}/metrics").text, "capsa_inference_request_failure_total", "vote")
    assert after == failures + 1

    def chunks() -> Any:  # no Content-Length: the limit still holds
        for _ in range(20):
            yield b" " * (64 * 1024)

    r = httpx.post(f"{server.url}/v2/models/vote/infer", content=chunks())
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/v1/models/vote:predict", content=chunks())
    assert r.status_code == 413
    assert infer(server, "vote", sample_input(1)).status_code == 200


def sleepy_input(sleep_ms: float, n: int = 1) -> np.ndarray:
    x = np.zeros((n, IN_FEATURES), np.float32)
    x[0, 0] = 100 + sleep_ms
    return x


def pending(server: ServerProcess, model: str) -> float:
    """The model version's queued and running requests (the pending gauge)."""
    return metric(httpx.get(f"{server.url}/metrics", timeout=30).text, "capsa_inference_pending_requests", model)


def wait_pending(server: ServerProcess, model: str, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while pending(server, model) < at_least:
        assert time.monotonic() < deadline, f"{model}: fewer than {at_least} pending requests after 60 s"
        time.sleep(0.02)


def test_full_queue_is_503_with_retry_after(server: ServerProcess) -> None:
    """One request runs and two wait (sleepy's queue holds 2): the next gets 503 with Retry-After at once, before
    its body is read; the three are answered. Waits on the pending gauge, not on sleeps."""
    deadline = time.monotonic() + 60
    while pending(server, "sleepy") > 0:  # a previous test's request still running
        assert time.monotonic() < deadline
        time.sleep(0.05)
    results: dict[str, httpx.Response] = {}

    def send(key: str, x: np.ndarray) -> None:
        results[key] = infer(server, "sleepy", x)

    threads = [threading.Thread(target=send, args=("running", sleepy_input(2000)))]
    threads[0].start()
    wait_pending(server, "sleepy", 1)
    for i, key in enumerate(("queued-1", "queued-2")):
        threads.append(threading.Thread(target=send, args=(key, sleepy_input(0))))
        threads[-1].start()
        wait_pending(server, "sleepy", i + 2)
    r = infer(server, "sleepy", sleepy_input(0))
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
    for t in threads:
        t.join(30)
    assert {k: v.status_code for k, v in results.items()} == {"running": 200, "queued-1": 200, "queued-2": 200}


def test_request_past_its_deadline_is_504(server: ServerProcess) -> None:
    r = infer(server, "sleepy", sleepy_input(4500))  # the server's deadline is 3 s
    assert r.status_code == 504 and "deadline" in r.json()["error"]
    deadline = time.monotonic() + 60
    while pending(server, "sleepy") > 0:  # the worker finishes that batch before other tests use the model
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # 4.5 s is past the deadline plus the stuck-worker grace (4 s): the worker is replaced; wait until it is back
    while httpx.get(f"{server.url}/v2/models/sleepy/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline + 60
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- ids, logs, metrics
def test_request_ids_are_echoed_and_logged(server: ServerProcess) -> None:
    x = sample_input(1)
    r = httpx.post(f"{server.url}/v2/models/vote/infer", json=v2_body(x), headers={"X-Request-ID": "hdr-42"})
    assert r.headers["x-request-id"] == "hdr-42"
    r = infer(server, "vote", x, id="body-43")
    assert r.json()["id"] == "body-43" and r.headers["x-request-id"] == "body-43"
    r = httpx.get(f"{server.url}/v2/health/live")
    generated = r.headers["x-request-id"]
    assert generated
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = {e.get("request_id"): e for e in server.log_entries() if e.get("logger") == "capsa.serve.access"}
        if {"hdr-42", "body-43", generated} <= set(lines):
            break
        time.sleep(0.1)
    assert lines["hdr-42"]["status"] == 200 and lines["hdr-42"]["path"] == "/v2/models/vote/infer"
    assert lines["body-43"]["method"] == "POST" and lines[generated]["path"] == "/v2/health/live"


def test_metrics(server: ServerProcess) -> None:
    infer(server, "vote", sample_input(3), parameters={"risk_threshold": 0.0})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("capsa_inference_request_success_total", "capsa_inference_request_failure_total",
                 "capsa_inference_request_duration_seconds_count"):  # per request: labelled by protocol too
        assert f'{name}{{model="vote",protocol="rest",version="1"}}' in text, name
    for name in ("capsa_inference_count_total", "capsa_inference_exec_count_total",
                 "capsa_inference_queue_duration_seconds_count",
                 "capsa_inference_compute_duration_seconds_count", "capsa_inference_pending_requests",
                 "capsa_model_ready", "capsa_risk_score_count", "capsa_flagged_total"):
        assert f'{name}{{model="vote",version="1"}}' in text, name
    assert metric(text, "capsa_model_ready", "vote") == 1
    assert metric(text, "capsa_flagged_total", "vote") >= 3
    assert metric(text, "capsa_risk_score_count", "vote") >= 3
    assert metric(text, "capsa_inference_request_success_total", "vote") >= 1
    assert metric(text, "capsa_inference_pending_requests", "vote") == 0


def test_openapi_documents_every_route(server: ServerProcess) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}",
                 "/v2/models/{model_name}/versions/{model_version}", "/v2/models/{model_name}/ready",
                 "/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer",
                 "/v1/models/{model_name}:predict", "/v2/repository/index",
                 "/v2/repository/models/{model_name}/load", "/v2/repository/models/{model_name}/unload",
                 "/metrics"):
        assert path in paths, path
    infer_doc = paths["/v2/models/{model_name}/infer"]["post"]
    ref = infer_doc["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/InferRequestBody"
    schemas = doc["components"]["schemas"]
    assert "InferInputTensor" in schemas and "InferResponseBody" in schemas and "ErrorResponse" in schemas
    assert httpx.get(f"{server.url}/docs").status_code == 200
