"""The image running ``--demo`` the way the cpu overlay's pod runs: read-only root, every capability dropped, no
privilege escalation, UID 10001, the emptyDir volumes as tmpfs, the ConfigMap's ``CAPSA_*`` settings.

Checks: the image's HEALTHCHECK turns healthy; ready; V2 and V1 predictions carry risk; ``/metrics``; ``/docs``
works with no Internet access. (Prometheus on a live container: test_s3_image.py.)
"""

from __future__ import annotations

import re

import httpx
import pytest

from .helpers import Container, wait_for

pytestmark = pytest.mark.slow


def test_healthcheck_turns_healthy(demo_container: Container) -> None:
    """The Dockerfile's HEALTHCHECK (its CMD, with the interval shortened at run time) reports healthy."""
    def healthy() -> bool:
        health = demo_container.inspect()["State"].get("Health") or {}
        assert health.get("Status") != "unhealthy", health
        return health.get("Status") == "healthy"

    wait_for("the HEALTHCHECK reports healthy", healthy, 120, demo_container.logs)


def test_runs_as_the_pod_runs(demo_container: Container) -> None:
    config = demo_container.inspect()
    host = config["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert config["Config"]["User"] == "10001:10001"


def test_v2_and_v1_predictions_with_risk(demo_container: Container) -> None:
    with httpx.Client(base_url=demo_container.url, timeout=30) as client:
        meta = client.get("/v2/models/demo")
        assert meta.status_code == 200, meta.text
        name = meta.json()["inputs"][0]["name"]
        v2 = client.post("/v2/models/demo/infer", json={"inputs": [
            {"name": name, "shape": [3, 1], "datatype": "FP32", "data": [0.5, 3.0, 9.0]}]})
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o for o in v2.json()["outputs"]}
        assert {"prediction", "risk", "risk_score", "flagged"} <= set(outputs), outputs
        scores = outputs["risk_score"]["data"]
        assert len(scores) == 3 and scores[2] > scores[0], scores  # far outside the training range: riskier
        assert outputs["flagged"]["data"][2] is True
        v1 = client.post("/v1/models/demo:predict", json={"instances": [[0.5], [9.0]]})
        assert v1.status_code == 200, v1.text
        body = v1.json()
        assert len(body["predictions"]) == len(body["risk"]) == len(body["risk_score"]) == 2
        assert body["flagged"] == [False, True]


def test_metrics(demo_container: Container) -> None:
    httpx.post(demo_container.url + "/v1/models/demo:predict", json={"instances": [[0.1]]}, timeout=30)
    text = httpx.get(demo_container.url + "/metrics", timeout=30).text
    assert re.search(r'^capsa_inference_request_success_total\{[^}]*model="demo"[^}]*\} [1-9]', text, re.M), text
    assert re.search(r'^capsa_model_ready\{[^}]*model="demo"[^}]*\} 1', text, re.M)


def test_docs_need_no_internet(demo_container: Container) -> None:
    """/docs loads Swagger UI from the server itself: every script and stylesheet it references is served here."""
    with httpx.Client(base_url=demo_container.url, timeout=30) as client:
        page = client.get("/docs")
        assert page.status_code == 200, page.text
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text)
        assert assets, page.text
        for asset in assets:
            assert not asset.startswith(("http://", "https://", "//")), f"/docs loads {asset} from the Internet"
            answer = client.get(asset)
            assert answer.status_code == 200 and len(answer.content) > 1000, (asset, answer.status_code)
        assert client.get("/openapi.json").status_code == 200
