"""The KServe V2 gRPC front-end end to end: ``tritonclient.grpc``, unchanged, against the shared real server (its
gRPC port), compared with the same server's REST answers: health (V2 and ``grpc.health.v1``), metadata, inference
with raw and typed contents, output selection, risk outputs, every error's status code, deadlines, request ids,
and gRPC and REST requests batched together.

Only this test process imports ``tritonclient.grpc``'s stubs; the server's own (``service.grpc``) live in the server
process (both register the protocol's ``inference.*`` messages in protobuf's default pool).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.service.conftest import (
    ADMIN_TOKEN,
    IN_FEATURES,
    WRAPPERS,
    ServerProcess,
    add_model,
    expected,
    metric,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}
T = 30.0  # every client call's timeout (seconds)


def sample_input(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN_FEATURES)).astype(np.float32)


def sleepy_input(sleep_ms: float, n: int = 1) -> np.ndarray:
    x = np.zeros((n, IN_FEATURES), np.float32)
    x[0, 0] = 100 + sleep_ms
    return x


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> tg.InferenceServerClient:
    c = tg.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def grpc_infer(client: tg.InferenceServerClient, model: str, x: np.ndarray, outputs: list[str] | None = None,
               timeout: float = T, **kwargs: Any) -> tg.InferResult:
    inp = tg.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    requested = None if outputs is None else [tg.InferRequestedOutput(name) for name in outputs]
    return client.infer(model, [inp], outputs=requested, client_timeout=timeout, **kwargs)


def rest_infer(server: ServerProcess, model: str, x: np.ndarray, **extra: Any) -> dict[str, np.ndarray]:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            **extra}
    r = httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=T)
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def status_of(call: Any) -> tuple[str, str]:
    """The gRPC status code name and message of a call that must fail."""
    with pytest.raises(tg.InferenceServerException) as info:
        call()
    return str(info.value.status()).removeprefix("StatusCode."), info.value.message() or ""


def stub(server: ServerProcess) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def pending(server: ServerProcess, model: str) -> float:
    """The model version's queued and running requests (the pending gauge)."""
    return metric(httpx.get(f"{server.url}/metrics", timeout=T).text, "capsa_inference_pending_requests", model)


def wait_idle(server: ServerProcess, model: str) -> None:
    """Wait until the model version has no pending request (its worker is free for the next test)."""
    deadline = time.monotonic() + 60
    while pending(server, model) > 0:
        assert time.monotonic() < deadline, f"{model} still has pending requests"
        time.sleep(0.1)


def wait_running(server: ServerProcess, model: str) -> None:
    """Wait until a request of the model version is pending (it reached the server)."""
    deadline = time.monotonic() + 60
    while pending(server, model) < 1:
        assert time.monotonic() < deadline, f"no request of {model} reached the server"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- health, metadata
def test_health_and_server_metadata(server: ServerProcess, client: tg.InferenceServerClient) -> None:
    assert client.is_server_live(client_timeout=T)
    server.wait_ready(timeout=120)  # an earlier test may have left a worker restarting: ready again over REST first
    assert client.is_server_ready(client_timeout=T)
    assert client.is_model_ready("vote", client_timeout=T)
    assert client.is_model_ready("vote", "1", client_timeout=T)
    meta = client.get_server_metadata(as_json=True, client_timeout=T)
    rest = httpx.get(f"{server.url}/v2", timeout=T).json()
    assert meta["name"] == rest["name"] and meta["version"] == rest["version"]
    assert meta["extensions"] == rest["extensions"]


def test_grpc_health_service_for_kubernetes_probes(server: ServerProcess) -> None:
    server.wait_ready(timeout=120)
    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=T)
            assert answer.status == serving, service
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=T)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_model_metadata_equals_rest(server: ServerProcess, client: tg.InferenceServerClient, wrapper: str) -> None:
    meta = client.get_model_metadata(wrapper, as_json=True, client_timeout=T)
    rest = httpx.get(f"{server.url}/v2/models/{wrapper}", timeout=T).json()
    assert meta["name"] == rest["name"] and meta["platform"] == rest["platform"]
    assert meta["versions"] == rest["versions"]
    for key in ("inputs", "outputs"):  # tritonclient's JSON renders int64 shapes as strings
        assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in meta[key]] == rest[key]


# ---------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_infer_raw_contents_equals_rest_and_the_model(server: ServerProcess, client: tg.InferenceServerClient,
                                                      reference: dict, wrapper: str) -> None:
    x = sample_input(5, seed=7)
    result = grpc_infer(client, wrapper, x, parameters={"risk_threshold": 0.05})
    rest = rest_infer(server, wrapper, x, parameters={"risk_threshold": 0.05})
    got = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
    assert list(got) == ["prediction", "risk", "risk_score", "flagged"]
    assert result.get_response().model_name == wrapper and result.get_response().model_version == "1"
    pred, risk, score = expected(reference[wrapper], x)
    for name, want in (("prediction", pred), ("risk", risk), ("risk_score", score)):
        assert got[name].dtype == np.float32 and got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, **TOL, err_msg=name)
        np.testing.assert_allclose(got[name], rest[name], **TOL, err_msg=name)
    assert got["flagged"].dtype == np.bool_
    np.testing.assert_array_equal(got["flagged"], got["risk_score"] > 0.05)
    np.testing.assert_array_equal(got["flagged"], rest["flagged"])


def test_infer_typed_contents_equals_raw(server: ServerProcess, client: tg.InferenceServerClient) -> None:
    x = sample_input(3, seed=11)
    raw = grpc_infer(client, "vote", x)
    request = service_pb2.ModelInferRequest(model_name="vote", id="typed-1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.parameters["risk_threshold"].double_param = 0.01
    channel, inference = stub(server)
    with channel:
        response = inference.ModelInfer(request, timeout=T)
    assert response.id == "typed-1"
    result = tg.InferResult(response)
    for name in ("prediction", "risk", "risk_score"):
        np.testing.assert_allclose(result.as_numpy(name), raw.as_numpy(name), **TOL, err_msg=name)
    np.testing.assert_array_equal(result.as_numpy("flagged"), result.as_numpy("risk_score") > 0.01)


def test_typed_contents_in_the_wrong_field_are_invalid(server: ServerProcess) -> None:
    request = service_pb2.ModelInferRequest(model_name="vote")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, IN_FEATURES])
    tensor.contents.int_contents.extend([1, 2, 3, 4])
    channel, inference = stub(server)
    with channel, pytest.raises(grpc.RpcError) as info:
        inference.ModelInfer(request, timeout=T)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents.fp32_contents" in info.value.details()


def test_outputs_selection_and_int_threshold(client: tg.InferenceServerClient) -> None:
    x = sample_input(2, seed=3)
    result = grpc_infer(client, "neo", x, outputs=["risk_score", "flagged"], parameters={"risk_threshold": 0})
    names = [o.name for o in result.get_response().outputs]
    assert names == ["risk_score", "flagged"]
    assert result.as_numpy("flagged").all()  # every risk is above 0
    # neo's config sets a threshold of 0.05: without a request parameter, flagged comes by default
    default = grpc_infer(client, "neo", x)
    assert [o.name for o in default.get_response().outputs] == ["prediction", "risk", "risk_score", "flagged"]
    np.testing.assert_array_equal(default.as_numpy("flagged"), default.as_numpy("risk_score") > 0.05)


def test_request_ids_come_back_in_trailing_metadata(server: ServerProcess) -> None:
    """The id in use (the request's ``id``, else ``x-request-id``, else a generated one) comes back as
    ``x-request-id`` trailing metadata, as REST's X-Request-ID header; an unusable one is INVALID_ARGUMENT."""
    channel, inference = stub(server)
    with channel:
        _, call = inference.ServerLive.with_call(service_pb2.ServerLiveRequest(), timeout=T,
                                                 metadata=(("x-request-id", "trace-7"),))
        assert dict(call.trailing_metadata())["x-request-id"] == "trace-7"
        _, call = inference.ServerLive.with_call(service_pb2.ServerLiveRequest(), timeout=T)
        assert dict(call.trailing_metadata())["x-request-id"]  # generated
        with pytest.raises(grpc.RpcError) as info:
            inference.ServerLive(service_pb2.ServerLiveRequest(), timeout=T, metadata=(("x-request-id", "x" * 200),))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "longer than 128" in info.value.details()


def test_request_id_is_echoed(client: tg.InferenceServerClient, server: ServerProcess) -> None:
    result = grpc_infer(client, "vote", sample_input(1), request_id="grpc-id-42")
    assert result.get_response().id == "grpc-id-42"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the access line is flushed within 50 ms
        lines = [e for e in server.log_entries() if e.get("request_id") == "grpc-id-42"]
        if lines:
            assert lines[0]["path"] == "/inference.GRPCInferenceService/ModelInfer" and lines[0]["status"] == "OK"
            return
        time.sleep(0.05)
    raise AssertionError("no access log line for the gRPC request")


# ---------------------------------------------------------------------------------------------- metrics
def by_protocol(text: str, model: str) -> dict[tuple[str, str], float]:
    """(metric, protocol) -> value of the per-request metrics of a model version."""
    names = ("capsa_inference_request_success_total", "capsa_inference_request_failure_total",
             "capsa_inference_request_duration_seconds_count")
    return {(name, protocol): metric(text, name, model, protocol=protocol)
            for name in names for protocol in ("rest", "grpc")}


def test_requests_are_counted_by_protocol(server: ServerProcess, client: tg.InferenceServerClient) -> None:
    """The per-request metrics carry protocol="rest" or "grpc"; the batch and sample ones are protocol-neutral."""
    wait_idle(server, "vote")
    before = by_protocol(httpx.get(f"{server.url}/metrics", timeout=T).text, "vote")
    x = sample_input(2)
    for _ in range(2):
        grpc_infer(client, "vote", x)
    assert status_of(lambda: grpc_infer(client, "vote", np.zeros((1, 5), np.float32)))[0] == "INVALID_ARGUMENT"
    rest_infer(server, "vote", x)
    bad = httpx.post(f"{server.url}/v2/models/vote/infer", timeout=T, json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 5], "data": [0.0] * 5}]})
    assert bad.status_code == 400
    text = httpx.get(f"{server.url}/metrics", timeout=T).text
    after = by_protocol(text, "vote")
    delta = {key: after[key] - before[key] for key in after}
    assert delta == {
        ("capsa_inference_request_success_total", "rest"): 1, ("capsa_inference_request_success_total", "grpc"): 2,
        ("capsa_inference_request_failure_total", "rest"): 1, ("capsa_inference_request_failure_total", "grpc"): 1,
        ("capsa_inference_request_duration_seconds_count", "rest"): 2,
        ("capsa_inference_request_duration_seconds_count", "grpc"): 3,
    }
    neutral = [line for line in text.splitlines()
               if line.startswith(("capsa_inference_count_total{", "capsa_inference_exec_count_total{",
                                   "capsa_inference_queue_duration_seconds_count{", "capsa_risk_score_count{"))]
    assert neutral and not [line for line in neutral if "protocol=" in line], neutral


# ---------------------------------------------------------------------------------------------- errors
def test_errors_are_invalid_argument_and_not_found(client: tg.InferenceServerClient) -> None:
    x = sample_input(1)
    assert status_of(lambda: grpc_infer(client, "nope", x)) == ("NOT_FOUND", "model 'nope' is not served")
    code, message = status_of(lambda: client.infer("vote", [], client_timeout=T))
    assert code == "INVALID_ARGUMENT" and "'inputs' must be a non-empty list" in message
    code, message = status_of(lambda: grpc_infer(client, "vote", np.zeros((1, 5), np.float32)))
    assert code == "INVALID_ARGUMENT" and "shape [1, 5] does not match the model's [-1, 4]" in message
    code, message = status_of(lambda: grpc_infer(client, "vote", np.zeros((17, 4), np.float32)))
    assert code == "INVALID_ARGUMENT" and "max_batch_size 16" in message
    code, message = status_of(lambda: grpc_infer(client, "vote", x, outputs=["flagged"]))
    assert code == "INVALID_ARGUMENT" and "needs parameters.risk_threshold" in message
    code, message = status_of(lambda: grpc_infer(client, "vote", x, outputs=["nope"]))
    assert code == "INVALID_ARGUMENT" and "output 'nope' does not exist" in message
    code, message = status_of(lambda: grpc_infer(client, "vote", x, parameters={"risk_threshold": -1}))
    assert code == "INVALID_ARGUMENT" and "risk_threshold must be a finite number >= 0" in message
    nan = np.full((1, 4), np.nan, np.float32)
    code, message = status_of(lambda: grpc_infer(client, "vote", nan))
    assert code == "INVALID_ARGUMENT" and "non-finite" in message


def test_over_the_size_limit_is_resource_exhausted(client: tg.InferenceServerClient) -> None:
    big = np.zeros((1, 300_000), np.float32)  # 1.2 MB, over the shared server's 1 MiB CAPSA_MAX_REQUEST_BYTES
    code, _ = status_of(lambda: grpc_infer(client, "vote", big))
    assert code == "RESOURCE_EXHAUSTED"


def test_repository_rpcs_need_the_admin_token(client: tg.InferenceServerClient) -> None:
    code, message = status_of(lambda: client.get_model_repository_index(client_timeout=T))
    assert code == "UNAUTHENTICATED" and "admin token" in message
    code, _ = status_of(lambda: client.get_model_repository_index(
        headers={"authorization": "Bearer wrong"}, client_timeout=T))
    assert code == "UNAUTHENTICATED"
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    index = client.get_model_repository_index(headers=auth, as_json=True, client_timeout=T)
    assert {"name": "vote", "version": "1", "state": "READY"} in [
        {k: m.get(k) for k in ("name", "version", "state")} for m in index["models"]]
    code, _ = status_of(lambda: client.load_model("no-such-model", headers=auth, client_timeout=T))
    assert code == "NOT_FOUND"
    code, _ = status_of(lambda: client.unload_model("no-such-model", headers=auth, client_timeout=T))
    assert code == "NOT_FOUND"


@pytest.mark.slow
def test_client_deadline_counts_and_drops_the_queued_request(server: ServerProcess,
                                                             client: tg.InferenceServerClient) -> None:
    """A request whose gRPC deadline passes while queued is answered DEADLINE_EXCEEDED and never computed."""
    wait_idle(server, "sleepy")
    blocker: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: blocker.setdefault("r", httpx.post(
        f"{server.url}/v2/models/sleepy/infer", timeout=T, json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": sleepy_input(1500).ravel().tolist()}]})))
    before = httpx.get(f"{server.url}/metrics", timeout=T).text
    thread.start()
    wait_running(server, "sleepy")
    code, _ = status_of(lambda: grpc_infer(client, "sleepy", sleepy_input(0), timeout=0.3))
    assert code == "DEADLINE_EXCEEDED"
    thread.join(T)
    assert blocker["r"].status_code == 200
    wait_idle(server, "sleepy")
    after = httpx.get(f"{server.url}/metrics", timeout=T).text
    samples = (metric(after, "capsa_inference_count_total", "sleepy")
               - metric(before, "capsa_inference_count_total", "sleepy"))
    assert samples == 1, f"{samples} samples computed: the expired gRPC request ran anyway"


def test_full_queue_is_unavailable(server: ServerProcess, client: tg.InferenceServerClient) -> None:
    """sleepy's queue holds 2 requests: while one runs and two wait, a gRPC request gets UNAVAILABLE."""
    wait_idle(server, "sleepy")
    failed_before = metric(httpx.get(f"{server.url}/metrics", timeout=T).text,
                           "capsa_inference_request_failure_total", "sleepy", protocol="grpc")

    async def scenario() -> tuple[list[int], tuple[str, str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=T) as http:
            def post(ms: float) -> Any:
                return http.post("/v2/models/sleepy/infer", json={"inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": sleepy_input(ms).ravel().tolist()}]})

            running = asyncio.ensure_future(post(2000))
            queued: list[asyncio.Future[httpx.Response]] = []
            deadline = time.monotonic() + 30
            while True:  # wait until one runs and two wait (pending counts both)
                text = (await http.get("/metrics")).text
                pending = metric(text, "capsa_inference_pending_requests", "sleepy")
                if pending >= 3:
                    break
                if pending >= len(queued) + 1 and len(queued) < 2:
                    queued.append(asyncio.ensure_future(post(0)))
                assert time.monotonic() < deadline, f"only {pending} pending"
                await asyncio.sleep(0.02)
            refused = await asyncio.to_thread(status_of, lambda: grpc_infer(client, "sleepy", sleepy_input(0)))
            answers = await asyncio.gather(running, *queued)
            return [a.status_code for a in answers], refused

    statuses, (code, message) = asyncio.run(scenario())
    assert statuses == [200, 200, 200]
    assert code == "UNAVAILABLE" and "queue is full" in message
    failed = metric(httpx.get(f"{server.url}/metrics", timeout=T).text,
                    "capsa_inference_request_failure_total", "sleepy", protocol="grpc") - failed_before
    assert failed == 1, "a gRPC request shed at admission counts as a gRPC failure"
    wait_idle(server, "sleepy")


@pytest.mark.slow
def test_concurrent_grpc_and_rest_requests_are_batched_together(server: ServerProcess,
                                                                client: tg.InferenceServerClient) -> None:
    """While sleepy's worker is busy, one REST and one gRPC request queue up: they run as one batch of 2."""
    wait_idle(server, "sleepy")
    before = httpx.get(f"{server.url}/metrics", timeout=T).text

    async def scenario() -> tuple[int, int, tg.InferResult]:
        async with httpx.AsyncClient(base_url=server.url, timeout=T) as http:
            def post(x: np.ndarray) -> Any:
                return http.post("/v2/models/sleepy/infer", json={"inputs": [
                    {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]})

            running = asyncio.ensure_future(post(sleepy_input(2000)))
            deadline = time.monotonic() + 30
            while metric((await http.get("/metrics")).text, "capsa_inference_pending_requests", "sleepy") < 1:
                assert time.monotonic() < deadline, "the blocking request never reached the server"
                await asyncio.sleep(0.02)
            rest = asyncio.ensure_future(post(sample_input(1, seed=1)))
            x = sample_input(2, seed=2)
            grpc_result = asyncio.ensure_future(asyncio.to_thread(grpc_infer, client, "sleepy", x))
            first, second, via_grpc = await asyncio.gather(running, rest, grpc_result)
            return first.status_code, second.status_code, via_grpc

    first, second, via_grpc = asyncio.run(scenario())
    assert (first, second) == (200, 200)
    assert via_grpc.as_numpy("prediction").shape == (2, 1)
    wait_idle(server, "sleepy")
    after = httpx.get(f"{server.url}/metrics", timeout=T).text
    execs = (metric(after, "capsa_inference_exec_count_total", "sleepy")
             - metric(before, "capsa_inference_exec_count_total", "sleepy"))
    samples = (metric(after, "capsa_inference_count_total", "sleepy")
               - metric(before, "capsa_inference_count_total", "sleepy"))
    assert samples == 4 and execs == 2, f"{execs} batches for 3 requests: REST and gRPC were not batched together"


@pytest.mark.slow
def test_sigterm_answers_in_flight_grpc_requests_and_exits_0(registry: dict[str, Any],
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """gRPC drains with REST on SIGTERM: a request running when the signal comes is answered, the exit status is 0."""
    proc = ServerProcess(registry["root"], tmp_path_factory.mktemp("logs") / "grpc-drain.log",
                         env={"CAPSA_DRAIN_TIMEOUT_S": "20", "CAPSA_REQUEST_TIMEOUT_S": "20"})
    try:
        proc.wait_ready()
        with tg.InferenceServerClient(proc.grpc_url) as c:
            result: dict[str, Any] = {}

            def call() -> None:
                try:
                    result["ok"] = grpc_infer(c, "sleepy", sleepy_input(1500))
                except Exception as exc:  # reported below
                    result["error"] = exc

            thread = threading.Thread(target=call)
            thread.start()
            wait_running(proc, "sleepy")
            code = proc.stop()
            thread.join(T)
        assert "error" not in result, result.get("error")
        assert result["ok"].as_numpy("prediction").shape == (1, 1)
        assert code == 0, proc.log()[-3000:]
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------- connection cap
def own_channel(server: ServerProcess) -> grpc.Channel:
    """A channel with its own TCP connection (channels to one address otherwise share the process's subchannel)."""
    return grpc.insecure_channel(server.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)])


def infer_request(x: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="vote")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


@pytest.mark.slow
def test_connection_cap_refuses_new_connections_and_keeps_serving(tmp_path_factory: pytest.TempPathFactory) -> None:
    """CAPSA_MAX_GRPC_CONNECTIONS=2: a third connection is closed at once (UNAVAILABLE) while the two open ones keep
    serving inference; REST is unaffected; once one closes, a new connection is served."""
    root, work = tmp_path_factory.mktemp("cap-registry"), tmp_path_factory.mktemp("cap-bundles")
    add_model(root, work, "vote", "vote")
    proc = ServerProcess(root, tmp_path_factory.mktemp("logs") / "grpc-cap.log",
                         env={"CAPSA_MAX_GRPC_CONNECTIONS": "2"})
    channels: list[grpc.Channel] = []
    try:
        proc.wait_ready()
        listening = [e for e in proc.log_entries() if e.get("msg") == "listening (gRPC)"]
        assert listening and listening[0]["max_connections"] == 2, listening
        x = sample_input(2)
        for _ in range(2):
            channels.append(own_channel(proc))
            assert service_pb2_grpc.GRPCInferenceServiceStub(channels[-1]).ServerLive(
                service_pb2.ServerLiveRequest(), timeout=T).live
        refused = own_channel(proc)
        channels.append(refused)
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(refused).ServerLive(service_pb2.ServerLiveRequest(), timeout=T)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        for channel in channels[:2]:  # the open connections are still served, inference included
            answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(x), timeout=T)
            assert answer.outputs[0].name == "prediction" and list(answer.outputs[0].shape) == [2, 1]
        assert httpx.get(f"{proc.url}/v2/health/live", timeout=T).status_code == 200  # REST has its own cap
        channels.pop(0).close()
        deadline = time.monotonic() + 60  # the server sees the close asynchronously: retry a fresh connection
        while True:
            fresh = own_channel(proc)
            try:
                live = service_pb2_grpc.GRPCInferenceServiceStub(fresh).ServerLive(
                    service_pb2.ServerLiveRequest(), timeout=T).live
                channels.append(fresh)
                break
            except grpc.RpcError as exc:
                fresh.close()
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < deadline, "no connection accepted after one of the two closed"
                time.sleep(0.1)
        assert live
    finally:
        for channel in channels:
            channel.close()
        code = proc.stop()
    assert code == 0, proc.log()[-3000:]
