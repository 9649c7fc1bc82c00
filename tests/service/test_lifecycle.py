"""capsa-serve's lifecycle over real processes: worker kill -9 and restart, repository load/unload and its tokens,
a model that fails to load, the inference token, graceful shutdown with requests in flight, and ``--demo``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import capsa
from service.registry import publish
from tests.service.conftest import ADMIN_TOKEN, IN_FEATURES, ServerProcess, add_model, build_bundle, expected

TOL = {"rtol": 1e-5, "atol": 1e-5}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def v2_body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}


def infer(url: str, model: str, x: np.ndarray, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/infer", json=v2_body(x), timeout=30, **kw)


def rows(n: int = 2, first: float = 0.5) -> np.ndarray:
    x = np.random.default_rng(5).standard_normal((n, IN_FEATURES)).astype(np.float32)
    x[:, 0] = np.clip(x[:, 0], -5, 5)
    if first:
        x[0, 0] = first
    return x


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Hammer:
    """Sends requests to a model from a thread until stopped; records every status."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                r = client.post(f"{self.url}/v2/models/{self.model}/infer", json=v2_body(rows(1)))
                self.statuses.append(r.status_code)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- worker death
@pytest.mark.slow
def test_killed_worker_fails_its_request_with_503_and_is_restarted(server: ServerProcess) -> None:
    (pid,) = server.worker_pids("killme-1-")
    result: dict[str, httpx.Response] = {}
    x = np.zeros((1, IN_FEATURES), np.float32)
    x[0, 0] = 100 + 3000  # the sleepy architecture sleeps 3 s on this input
    sender = threading.Thread(target=lambda: result.setdefault("r", infer(server.url, "killme", x)))
    with Hammer(server.url, "vote") as other:
        sender.start()
        time.sleep(0.7)
        os.kill(pid, signal.SIGKILL)
        sender.join()
        r = result["r"]
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "died" in r.json()["error"], r.text
        # readiness reflects the dead worker, then the restart
        ready = httpx.get(f"{server.url}/v2/models/killme/ready", timeout=30)
        if ready.status_code == 200:  # restarted already: check the pid changed
            assert server.worker_pids("killme-1-")[-1] != pid
        wait_until(lambda: httpx.get(f"{server.url}/v2/models/killme/ready", timeout=30).status_code == 200, 60,
                   "restart")
    assert other.statuses and set(other.statuses) == {200}, "another model was affected"
    pids = server.worker_pids("killme-1-")
    assert len(pids) == 2 and pids[-1] != pid
    assert infer(server.url, "killme", rows(2)).status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200
    entries = [e for e in server.log_entries() if e.get("msg") == "worker exited" and e.get("pid") == pid]
    assert entries and entries[0]["level"] == "error" and entries[0]["exitcode"] == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------- repository
def test_repository_routes_need_the_admin_token(server: ServerProcess) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/swap/load", "/v2/repository/models/swap/unload"):
        r = httpx.post(server.url + path, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        r = httpx.post(server.url + path, headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert r.status_code == 401 and "admin token" in r.json()["error"]
    index = httpx.post(f"{server.url}/v2/repository/index", headers=AUTH, timeout=30)
    assert index.status_code == 200
    states = {(e["name"], e["version"]): e["state"] for e in index.json()}
    assert states[("vote", "1")] == "READY" and states[("swap", "1")] == "READY"
    ready_only = httpx.post(f"{server.url}/v2/repository/index", headers=AUTH, json={"ready": True}, timeout=30).json()
    assert all(e["state"] == "READY" for e in ready_only)
    r = httpx.post(f"{server.url}/v2/repository/index", headers=AUTH, content=b"{bad", timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    # Triton's own client (JSON bodies without a JSON content type)
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert {"name": "vote", "version": "1", "state": "READY", "reason": ""} in client.get_model_repository_index(
        headers=AUTH)
    client.load_model("vote", headers=AUTH)  # unchanged: kept as is
    with pytest.raises(InferenceServerException, match="401"):
        client.unload_model("vote")
    assert client.is_model_ready("vote")
    client.close()


@pytest.mark.slow
def test_unload_and_load_new_version_without_dropping_other_requests(server: ServerProcess,
                                                                     registry: dict[str, Any]) -> None:
    url = server.url
    x = rows(3)
    assert infer(url, "swap", x).status_code == 200
    with Hammer(url, "vote") as other:
        r = httpx.post(f"{url}/v2/repository/models/swap/unload", headers=AUTH, json={}, timeout=120)
        assert r.status_code == 200, r.text
        assert infer(url, "swap", x).status_code == 404
        assert httpx.get(f"{url}/v2/models/swap/ready", timeout=30).status_code == 404
        assert httpx.get(f"{url}/v2/health/ready", timeout=30).status_code == 200  # an unloaded model is not expected
        states = {(e["name"], e["version"]): e
                  for e in httpx.post(f"{url}/v2/repository/index", headers=AUTH, timeout=30).json()}
        assert states[("swap", "1")]["state"] == "UNAVAILABLE" and states[("swap", "1")]["reason"] == "not loaded"

        assert httpx.post(f"{url}/v2/repository/models/swap/load", headers=AUTH, timeout=120).status_code == 200
        assert infer(url, "swap", x).status_code == 200

        # publish version 2 and load it: the latest-1 policy serves 2 in place of 1
        bundle2 = build_bundle(registry["work"] / "swap-2", "vote", seed=7)
        publish(bundle2, str(registry["root"]), "swap", 2)
        assert httpx.post(f"{url}/v2/repository/models/swap/load", headers=AUTH, timeout=120).status_code == 200
        r = infer(url, "swap", x)
        assert r.status_code == 200 and r.json()["model_version"] == "2"
        pred, risk, _ = expected(capsa.load_bundle(bundle2), x)
        got = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
        np.testing.assert_allclose(got["prediction"], pred, **TOL)
        np.testing.assert_allclose(got["risk"], risk, **TOL)
        assert infer(url, "swap/versions/1", x).status_code == 404
        assert httpx.post(f"{url}/v2/repository/models/nope/load", headers=AUTH, timeout=120).status_code == 404
        assert httpx.post(f"{url}/v2/repository/models/nope/unload", headers=AUTH, timeout=120).status_code == 404
    assert other.statuses and set(other.statuses) == {200}, "loading/unloading swap affected another model"


# ---------------------------------------------------------------------------------------------- second server
@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No admin token, an inference token, a good model, one whose bundle cannot be loaded, and ``twin`` with two
    workers (sleepy architecture, batches of 1)."""
    root = tmp_path_factory.mktemp("registry2")
    work = tmp_path_factory.mktemp("bundles2")
    add_model(root, work, "good", "vote")
    add_model(root, work, "twin", "vote", arch="sleepy", config={"instances": 2, "max_batch_size": 1})
    add_model(root, work, "broken", "vote")
    manifest = root / "broken" / "1" / "capsa.json"
    meta = json.loads(manifest.read_text())
    meta["kwargs"]["hidden"] = 5  # the weights no longer fit: loading fails in the worker
    manifest.write_text(json.dumps(meta))
    proc = ServerProcess(root, tmp_path_factory.mktemp("logs2") / "server.log",
                         env={"CAPSA_INFER_TOKEN": "infer-tok"})
    try:
        proc.wait_ready(path="/v2/health/live")
        for model in ("good", "twin"):
            wait_until(lambda m=model: httpx.get(f"{proc.url}/v2/models/{m}/ready", timeout=30).status_code == 200,
                       120, model)
        yield proc
    finally:
        assert proc.stop() == 0


def test_without_admin_token_repository_routes_are_403(locked_server: ServerProcess) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/good/load", "/v2/repository/models/good/unload"):
        r = httpx.post(locked_server.url + path, headers={"Authorization": "Bearer anything"}, timeout=30)
        assert r.status_code == 403 and "CAPSA_ADMIN_TOKEN" in r.json()["error"]


def test_inference_token(locked_server: ServerProcess) -> None:
    url = locked_server.url
    assert infer(url, "good", rows()).status_code == 401
    assert infer(url, "good", rows(), headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.post(f"{url}/v1/models/good:predict", json={"instances": rows().tolist()}, timeout=30)
    assert r.status_code == 401
    assert infer(url, "good", rows(), headers={"Authorization": "Bearer infer-tok"}).status_code == 200
    assert httpx.get(f"{url}/v2/models/good", timeout=30).status_code == 200  # metadata stays open


def test_model_that_fails_to_load_is_reported_and_contained(locked_server: ServerProcess) -> None:
    url = locked_server.url
    wait_until(lambda: "failed to load" in locked_server.log(), 120, "the load failure")
    assert httpx.get(f"{url}/v2/models/broken/ready", timeout=30).status_code == 503
    # the default readiness policy: every version settled (loaded or failed with a reason) and one model serves
    ready = httpx.get(f"{url}/v2/health/ready", timeout=30)
    assert ready.status_code == 200 and ready.json() == {
        "ready": True, "models": [{"name": "broken", "version": "1", "reason": "failed to load"}]}
    r = infer(url, "broken", rows(), headers={"Authorization": "Bearer infer-tok"})
    assert r.status_code == 503 and "unavailable" in r.json()["error"] and r.headers["retry-after"]
    assert "does not fit" in locked_server.log() or "size mismatch" in locked_server.log()
    meta = httpx.get(f"{url}/v2/models/broken", timeout=30).json()
    assert meta["parameters"]["state"] == "UNAVAILABLE"
    assert infer(url, "good", rows(), headers={"Authorization": "Bearer infer-tok"}).status_code == 200


@pytest.mark.slow
def test_killed_worker_batch_is_retried_on_another_worker(locked_server: ServerProcess) -> None:
    url = locked_server.url
    wait_until(lambda: len(locked_server.worker_pids("twin-1-")) == 2, 60, "two twin workers")
    pids = locked_server.worker_pids("twin-1-")
    x = np.zeros((1, IN_FEATURES), np.float32)
    x[0, 0] = 100 + 1500
    results: list[httpx.Response] = []
    auth = {"Authorization": "Bearer infer-tok"}
    threads = [threading.Thread(target=lambda: results.append(infer(url, "twin", x, headers=auth))) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.6)  # both workers are busy, one request each
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    wait_until(lambda: len(locked_server.worker_pids("twin-1-")) == 3, 60, "the restarted worker")
    assert httpx.get(f"{url}/v2/models/twin/ready", timeout=30).status_code == 200


# ---------------------------------------------------------------------------------------------- shutdown, demo
@pytest.mark.slow
def test_graceful_shutdown_finishes_requests_in_flight(registry: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "registry"
    publish(registry["bundles"]["sleepy"], str(root), "sleepy", 1)
    proc = ServerProcess(root, tmp_path / "server.log", env={"CAPSA_DRAIN_TIMEOUT_S": "20"})
    proc.wait_ready()
    results: list[httpx.Response] = []
    x = np.zeros((1, IN_FEATURES), np.float32)
    x[0, 0] = 100 + 2000  # 2 s in the model

    threads = [threading.Thread(target=lambda: results.append(infer(proc.url, "sleepy", x))) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.7)
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(f"{proc.url}/v2/health/live", timeout=2)
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200, 200, 200]
    assert proc.proc.wait(30) == 0
    assert proc.stop() == 0
    messages = [e.get("msg") for e in proc.log_entries()]
    assert "workers stopped" in messages and messages[-1] == "server stopped"


@pytest.mark.slow
def test_demo_comes_up_and_answers_with_risk(tmp_path: Path) -> None:
    proc = ServerProcess(None, tmp_path / "server.log", env={"CAPSA_CACHE_DIR": str(tmp_path / "cache")},
                         args=["--demo"])
    try:
        proc.wait_ready(timeout=300)
        r = httpx.post(f"{proc.url}/v1/models/demo:predict", json={"instances": [[0.0], [1.0], [7.0]]}, timeout=30)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert len(doc["predictions"]) == 3 and len(doc["flagged"]) == 3
        assert abs(doc["predictions"][1][0] - 0.84) < 0.2  # y = sin(x)
        assert doc["risk_score"][2] > 3 * max(doc["risk_score"][0], doc["risk_score"][1])  # outside [-3, 3]
        assert doc["flagged"] == [False, False, True]  # the demo's configured risk threshold
        assert (tmp_path / "cache" / "demo" / "demo" / "1" / "capsa.json").is_file()
    finally:
        assert proc.stop() == 0
