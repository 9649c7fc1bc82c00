"""The image serving a registry on a real S3 endpoint (moto's server on 127.0.0.1), configured by the cpu overlay's
ConfigMap unchanged (``CAPSA_MODEL_REPOSITORY=s3://capsa-models/registry``), with the S3 credentials and endpoint
in the environment as the Secret gives them; then ``docker stop`` under load.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest

from .helpers import Container, docker, free_port, wait_for

pytestmark = pytest.mark.slow

MODEL = "regressor"
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
        name = client.get(f"/v2/models/{MODEL}").json()["inputs"][0]["name"]
        v2 = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": name, "shape": [2, 1], "datatype": "FP32", "data": [0.5, 9.0]}]})
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
        assert outputs["risk_score"][1] > outputs["risk_score"][0] and outputs["flagged"] == [False, True]
        v1 = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [[0.5], [9.0]]})
        assert v1.status_code == 200 and v1.json()["flagged"] == [False, True], v1.text
        assert f'model="{MODEL}"' in client.get("/metrics").text


def test_docker_stop_under_load_answers_every_accepted_request(s3_container: Container) -> None:
    """SIGTERM (``docker stop``) while clients keep sending: the container exits 0 and every request the server
    accepted (each one it wrote an access line for) was answered 200 and received by its client. Requests that
    found the port closed (connection refused) were never accepted."""
    received: dict[str, int] = {}
    refused: list[str] = []
    lock = threading.Lock()
    stop_sent = threading.Event()
    done = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=s3_container.url, timeout=60) as client:
            while not done.is_set():
                request_id = uuid.uuid4().hex
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
                if e.get("msg") == "request" and str(e.get("path", "")).endswith(":predict")}
    assert accepted, "no access lines"
    assert all(status == 200 for status in accepted.values()), {k: v for k, v in accepted.items() if v != 200}
    lost = set(accepted) - set(received)
    assert not lost, f"{len(lost)} accepted requests never reached their client ({len(refused)} refused)"
