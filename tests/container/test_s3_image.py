"""The image serving a registry on a real S3 endpoint (moto's server on 127.0.0.1), configured by the cpu overlay's
ConfigMap unchanged (``CAPSA_MODEL_REPOSITORY=s3://capsa-models/registry``), with the S3 credentials and endpoint
in the environment as the Secret gives them. The registry holds a good model and a broken one (its config.json
allows no module its architecture is in), as after one bad publish.

Checks: ready (the broken model does not take the replica out), V2 and V1 predictions with risk, ``/metrics``;
Prometheus scrapes the live container with deploy/prometheus/prometheus.yml and the rules: every rule evaluates,
on series that exist, and CapsaModelLoadFailed is raised for the broken model; then ``docker stop`` under load.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.helpers import PROMETHEUS, find_executable, missing_tool, promql_metric_names

from .helpers import Container, docker, free_port, wait_for

pytestmark = pytest.mark.slow

MODEL = "regressor"
BROKEN = "broken"  # its config.json narrows the allowed modules to one its architecture is not in
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_registry(k8s: tuple[list[str], dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 holding the ConfigMap's registry with one model; yields the endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    from service.demo import train_demo
    from service.registry import publish

    registry = k8s[1]["CAPSA_MODEL_REPOSITORY"]
    assert registry.startswith("s3://"), registry
    bucket = registry[len("s3://"):].split("/", 1)[0]
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        options = {"key": "test", "secret": "test",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        # The demo's architecture: the code the ConfigMap's CAPSA_ALLOWED_MODULES lets bundles run.
        bundle = train_demo(tmp_path_factory.mktemp("bundle") / "bundle", steps=200)
        publish(bundle, registry, MODEL, 1, storage_options=options)
        import fsspec

        with fsspec.open(f"{registry}/{MODEL}/config.json", "w", **options) as f:
            f.write(json.dumps({"max_batch_size": 32, "risk_threshold": 0.05}))
        publish(bundle, registry, BROKEN, 1, storage_options=options)
        with fsspec.open(f"{registry}/{BROKEN}/config.json", "w", **options) as f:
            f.write(json.dumps({"allowed_modules": ["acme.models"]}))
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_container(k8s: tuple[list[str], dict[str, str]], s3_registry: str) -> Iterator[Container]:
    options, env = k8s
    container = Container(options, {**env, **CREDENTIALS, "AWS_ENDPOINT_URL": s3_registry}, name_prefix="capsa-s3")
    try:
        container.wait_ready(timeout=300)
        yield container
    finally:
        container.remove()


def test_serves_the_s3_registry_with_risk(s3_container: Container) -> None:
    with httpx.Client(base_url=s3_container.url, timeout=30) as client:
        ready = client.get(f"/v2/models/{MODEL}/ready")
        assert ready.status_code == 200, ready.text
        assert client.get(f"/v2/models/{BROKEN}/ready").status_code != 200
        name = client.get(f"/v2/models/{MODEL}").json()["inputs"][0]["name"]
        v2 = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": name, "shape": [2, 1], "datatype": "FP32", "data": [0.5, 9.0]}]})
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
        assert outputs["risk_score"][1] > outputs["risk_score"][0] and outputs["flagged"] == [False, True]
        v1 = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [[0.5], [9.0]]})
        assert v1.status_code == 200 and v1.json()["flagged"] == [False, True], v1.text
        assert f'model="{MODEL}"' in client.get("/metrics").text


# --- Prometheus on the live container ------------------------------------------------------------------------------

def _prometheus_config(tmp: Path, target: str) -> Path:
    """deploy/prometheus/prometheus.yml with the target of the live container, 1 s intervals and the rule files
    by absolute path; nothing else changed."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS / rule) for rule in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "capsa-serve"]
    job["static_configs"] = [{"targets": [target]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _api(url: str, path: str, **params: str) -> Any:
    answer = httpx.get(url + path, params=params, timeout=10)
    answer.raise_for_status()
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_and_every_rule_evaluates_on_live_series(s3_container: Container,
                                                                     tmp_path: Path) -> None:
    prometheus = find_executable("prometheus")
    if not prometheus:
        missing_tool("promtool")  # same Debian package
    # Traffic that gives every series the rules select a sample: predictions (flagged ones too) and a failure.
    with httpx.Client(base_url=s3_container.url, timeout=30) as client:
        for _ in range(5):
            answer = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [[0.5], [9.0]]})
            assert answer.status_code == 200, answer.text
        assert client.post(f"/v1/models/{MODEL}:predict", json={"instances": [[0.5, 1.0]]}).status_code == 400
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={_prometheus_config(tmp_path, f'127.0.0.1:{s3_container.port}')}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def logs() -> str:
            return (tmp_path / "prometheus.log").read_text(errors="replace")[-4000:]

        def target_up() -> bool:
            assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{logs()}"
            try:
                targets = _api(url, "/api/v1/targets")["activeTargets"]
            except httpx.HTTPError:
                return False
            return any(t["labels"].get("job") == "capsa-serve" and t["health"] == "up" for t in targets)

        wait_for("prometheus scrapes the container", target_up, 120, logs)
        rules_file = yaml.safe_load(next((PROMETHEUS / "rules").glob("*.yml")).read_text())
        expected = {r.get("alert") or r.get("record") for g in rules_file["groups"] for r in g["rules"]}

        def rules_evaluated() -> list[dict[str, Any]] | None:
            rules = [r for g in _api(url, "/api/v1/rules")["groups"] for r in g["rules"]]
            done = [r for r in rules if not r.get("lastEvaluation", "").startswith("0001")]
            return rules if len(done) == len(rules) and {r["name"] for r in rules} == expected else None

        rules = wait_for("prometheus evaluates every rule", rules_evaluated, 120, logs)
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule

        def selected_series() -> dict[str, int]:
            counts = {}
            for rule in rules:
                for name in promql_metric_names(rule["query"]):
                    counts[name] = len(_api(url, "/api/v1/series", **{"match[]": name}))
            return counts

        missing: dict[str, int] = {}

        def every_selector_has_series() -> bool:
            nonlocal missing
            missing = {name: n for name, n in selected_series().items() if n == 0}
            return not missing

        wait_for("every metric a rule selects has series", every_selector_has_series, 60,
                 lambda: f"no series for {sorted(missing)}")

        def active_alerts() -> dict[str, list[dict[str, Any]]]:
            alerts: dict[str, list[dict[str, Any]]] = {}
            for alert in _api(url, "/api/v1/alerts")["alerts"]:
                alerts.setdefault(alert["labels"]["alertname"], []).append(alert)
            return alerts

        # The broken model's alert is raised (pending: its `for` has not elapsed); nothing says no model is ready.
        alerts = wait_for("CapsaModelLoadFailed is raised", lambda: active_alerts().get("CapsaModelLoadFailed"), 60,
                          lambda: json.dumps(active_alerts(), indent=1))
        assert {a["labels"]["model"] for a in alerts} == {BROKEN}, alerts
        assert "CapsaNoModelReady" not in active_alerts()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_docker_stop_under_load_answers_every_accepted_request(s3_container: Container) -> None:
    """SIGTERM (``docker stop``) while clients keep sending: the container exits 0 and every request the server
    accepted (each one it wrote an access line for) was answered 200 and received by its client. Requests that
    found the port closed (connection refused) were never accepted."""
    sent: set[str] = set()
    received: dict[str, int] = {}
    refused: list[str] = []
    lock = threading.Lock()
    stop_sent = threading.Event()
    done = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=s3_container.url, timeout=60) as client:
            while not done.is_set():
                request_id = uuid.uuid4().hex
                with lock:
                    sent.add(request_id)
                try:
                    answer = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [[0.5], [1.5]]},
                                         headers={"X-Request-ID": request_id})
                except httpx.TransportError as exc:
                    with lock:
                        refused.append(f"{type(exc).__name__}: {exc}")
                    if not stop_sent.is_set():
                        raise AssertionError(f"request failed before the stop: {exc!r}") from exc
                    continue
                with lock:
                    received[request_id] = answer.status_code

    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            client_loop()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        wait_for("load is flowing", lambda: len(received) >= 100 or errors, 120, s3_container.logs, interval=0.1)
        stop_sent.set()
        proc = docker("stop", "--time", "45", s3_container.id, timeout=120)
        assert proc.returncode == 0
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    state = s3_container.inspect()["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, s3_container.logs()[-4000:])
    bad = {rid: status for rid, status in received.items() if status != 200}
    assert not bad, f"answers other than 200: {bad}"
    accepted = {e["request_id"]: e["status"] for e in s3_container.log_entries()
                if e.get("msg") == "request" and e.get("request_id") in sent}
    assert accepted, "no access lines"
    assert all(status == 200 for status in accepted.values()), {k: v for k, v in accepted.items() if v != 200}
    lost = set(accepted) - set(received)
    assert not lost, f"{len(lost)} accepted requests never reached their client ({len(refused)} refused)"
