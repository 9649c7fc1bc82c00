"""The image running ``--demo`` the way the cpu overlay's pod runs: read-only root, every capability dropped, no
privilege escalation, UID 10001, the emptyDir volumes as tmpfs, the ConfigMap's ``CAPSA_*`` settings.

Checks: the image's HEALTHCHECK turns healthy; ready; V2 and V1 predictions carry risk; ``/metrics``; ``/docs``
works with no Internet access; Prometheus scrapes the live container with deploy/prometheus/prometheus.yml and
evaluates every alert rule, each on series that exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.helpers import PROMETHEUS, find_executable, missing_tool, promql_metric_names

from .helpers import Container, free_port, wait_for

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


def test_prometheus_scrapes_and_every_rule_evaluates_on_live_series(demo_container: Container,
                                                                     tmp_path: Path) -> None:
    prometheus = find_executable("prometheus")
    if not prometheus:
        missing_tool("promtool")  # same Debian package
    # Traffic that gives every series the rules select a sample: predictions (flagged ones too) and a failure.
    with httpx.Client(base_url=demo_container.url, timeout=30) as client:
        for _ in range(5):
            assert client.post("/v1/models/demo:predict", json={"instances": [[0.5], [9.0]]}).status_code == 200
        assert client.post("/v1/models/demo:predict", json={"instances": [[0.5, 1.0]]}).status_code == 400
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={_prometheus_config(tmp_path, f'127.0.0.1:{demo_container.port}')}",
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
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
