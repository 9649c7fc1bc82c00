"""Against a running server: the real `capsa-serve --demo` (the image's entrypoint) as a subprocess on a free
loopback port. After some traffic (good requests, flagged samples, a bad request), every metric that a Grafana
panel or an alert rule selects must be in its /metrics output, and SIGTERM must end it with status 0 within the
drain time the manifests' grace periods are sized for."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from .helpers import DASHBOARD, PROMETHEUS, dashboard_exprs, find_executable, grpc_probes, promql_metric_names

# Series that Prometheus itself makes, not the service: `up` (scrape health) is used by the target-down alerts.
PROMETHEUS_GENERATED = {"up"}
START_TIMEOUT_S = 180  # the demo trains a small model on first start (seconds on 2 cores)
DRAIN_TIMEOUT_S = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def grpc_port() -> int:
    """The server's gRPC port."""
    return _free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, grpc_port: int) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    executable = find_executable("capsa-serve")
    assert executable, "the capsa-serve console script is not installed (pip install -e .)"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSA_")}
    env.update({"CAPSA_HOST": "127.0.0.1", "CAPSA_PORT": str(port), "CAPSA_GRPC_PORT": str(grpc_port),
                "CAPSA_DEVICES": "cpu",
                "CAPSA_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "CAPSA_LOG_LEVEL": "warning",
                "CAPSA_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)})
    log = tmp_path_factory.mktemp("log") / "capsa-serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([executable, "--demo"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"capsa-serve --demo exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"capsa-serve --demo not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _samples(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        if not family.samples:
            # Exported with no series yet (e.g. capsa_model_load_failed while no version has failed): the name
            # exists, so a rule or panel selecting it is not misspelt.
            totals.setdefault(family.name, 0.0)
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _zeros(shape: list[int], fill: float) -> Any:
    if len(shape) == 1:
        return [fill] * shape[0]
    return [_zeros(shape[1:], fill) for _ in range(shape[0])]


@pytest.fixture(scope="module")
def metrics_after_traffic(server: tuple[str, subprocess.Popen[bytes]]) -> dict[str, float]:
    url, _ = server
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    models = sorted({s.labels["model"] for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "capsa_model_ready" and s.value == 1})
    assert models, "no model is ready (capsa_model_ready)"
    model = models[0]
    meta = httpx.get(f"{url}/v2/models/{model}", timeout=10).json()
    inp = meta["inputs"][0]
    shape = [3 if d == -1 else d for d in inp["shape"]]
    with httpx.Client(base_url=url, timeout=30) as client:
        for fill in (0.0, 6.0, -6.0):
            body = {"inputs": [{"name": inp["name"], "shape": shape, "datatype": inp["datatype"],
                                "data": _zeros(shape, fill)}],
                    "parameters": {"risk_threshold": 0.0}}  # every sample with a positive risk is flagged
            response = client.post(f"/v2/models/{model}/infer", content=json.dumps(body))
            assert response.status_code == 200, response.text
        bad = {"inputs": [{"name": inp["name"], "shape": [*shape[:-1], shape[-1] + 5], "datatype": inp["datatype"],
                           "data": _zeros([*shape[:-1], shape[-1] + 5], 0.0)}]}
        assert client.post(f"/v2/models/{model}/infer", content=json.dumps(bad)).status_code == 400
    return _samples(url)


@pytest.mark.slow
def test_dashboard_metrics_exist(metrics_after_traffic: dict[str, float]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    missing = {}
    for title, expr in dashboard_exprs(dashboard):
        for name in promql_metric_names(expr):
            if name not in metrics_after_traffic:
                missing.setdefault(title, set()).add(name)
    assert not missing, f"dashboard panels select metrics the service does not export: {missing}"


@pytest.mark.slow
def test_alert_rule_metrics_exist(metrics_after_traffic: dict[str, float]) -> None:
    groups = yaml.safe_load((PROMETHEUS / "rules" / "capsa-alerts.yml").read_text())["groups"]
    missing = {}
    for rule in (r for g in groups for r in g["rules"]):
        for name in promql_metric_names(rule["expr"]) - PROMETHEUS_GENERATED:
            if name not in metrics_after_traffic:
                missing.setdefault(rule["alert"], set()).add(name)
    assert not missing, f"alert rules select metrics the service does not export: {missing}"


@pytest.mark.slow
def test_the_panels_have_data(metrics_after_traffic: dict[str, float]) -> None:
    """The traffic above moved what the dashboard plots (so the names checked are the live ones)."""
    m = metrics_after_traffic
    assert m["capsa_inference_request_success_total"] >= 3 and m["capsa_inference_request_failure_total"] >= 1
    assert m["capsa_inference_count_total"] >= 9 and m["capsa_inference_exec_count_total"] >= 1
    assert m["capsa_risk_score_count"] >= 9 and m["capsa_flagged_total"] >= 1
    assert m["capsa_inference_request_duration_seconds_count"] >= 3


@pytest.mark.slow
def test_the_protocol_variable_has_values(server: tuple[str, subprocess.Popen[bytes]],
                                          metrics_after_traffic: dict[str, float]) -> None:
    """The dashboard's protocol variable (label_values of the request counter) finds rest and grpc, and the REST
    traffic above is counted under protocol="rest"."""
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server
    by_protocol: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "capsa_inference_request_success_total":
                by_protocol[sample.labels["protocol"]] = by_protocol.get(sample.labels["protocol"], 0) + sample.value
    assert set(by_protocol) == {"rest", "grpc"}
    assert by_protocol["rest"] >= 3 and by_protocol["grpc"] == 0


@pytest.mark.slow
def test_the_grpc_probes_pass_on_the_real_server(server: tuple[str, subprocess.Popen[bytes]], grpc_port: int,
                                                 rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Each native gRPC probe of the manifests, as the kubelet runs it (grpc.health.v1 Check of its service on
    the gRPC port), answers SERVING on the real server; an unknown service would be NOT_FOUND."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    probes = grpc_probes(rendered)
    assert probes, "no gRPC probe in the manifests"
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for place, probe in probes.items():
            answer = health.Check(health_pb2.HealthCheckRequest(service=probe.get("service", "")), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, place
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_metric_name_extraction_is_not_vacuous() -> None:
    """The extractor finds the names (and only the names) in typical panel queries."""
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(capsa_x_bucket{model=~"$model"}[$__rate_interval])))'
            ' / on (model) group_left sum without (version) (capsa_y_total offset 1w) > bool 2 and up{job="a"}')
    assert promql_metric_names(expr) == {"capsa_x_bucket", "capsa_y_total", "up"}


@pytest.mark.slow
def test_sigterm_exits_zero_within_the_drain(server: tuple[str, subprocess.Popen[bytes]],
                                            metrics_after_traffic: dict[str, float]) -> None:
    """What the grace periods rely on: SIGTERM -> drain (bounded by CAPSA_DRAIN_TIMEOUT_S) -> exit 0."""
    _, proc = server
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(DRAIN_TIMEOUT_S + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"capsa-serve still running {DRAIN_TIMEOUT_S + 15} s after SIGTERM")
    assert code == 0, f"capsa-serve exited {code} on SIGTERM (container runtimes expect 0)"
    assert time.monotonic() - start < DRAIN_TIMEOUT_S + 15

