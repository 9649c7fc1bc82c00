"""Registry polling (``CAPSA_REPOSITORY_POLL_S``): a running server picks up what is published, local and S3.

While a load generator sends requests: version 2 is published and served with zero failed requests (loaded and
warmed before it takes traffic, version 1 retired after its requests finish); then a corrupt version 3 is rejected,
reported, and version 2 keeps serving; then a changed ``config.json`` is applied; then another model removed from the
registry is unloaded.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.registry import publish
from tests.service.conftest import ADMIN_TOKEN, IN_FEATURES, ServerProcess, build_bundle, metric

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class LoadGenerator:
    """Clients sending requests to a model without a version until stopped; records (status, served version)."""

    def __init__(self, url: str, model: str, clients: int = 2) -> None:
        self.url, self.model = url, model
        self.results: list[tuple[int, str | None, bool]] = []  # status, model_version, has a "flagged" output
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, seed: int) -> None:
        x = np.random.default_rng(seed).standard_normal((2, IN_FEATURES)).astype(np.float32)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.url}/v2/models/{self.model}/infer", json=body)
                except httpx.HTTPError as exc:
                    self.results.append((0, type(exc).__name__, False))
                    continue
                doc = r.json() if r.status_code == 200 else {}
                names = {o["name"] for o in doc.get("outputs", [])}
                self.results.append((r.status_code, doc.get("model_version"), "flagged" in names))

    def wait_for(self, condition: Any, timeout: float, what: str) -> None:
        """Wait until ``condition(latest result)`` holds for a result recorded from now on."""
        start = len(self.results)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(condition(r) for r in self.results[start:]):
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last results {self.results[-5:]}")

    def __enter__(self) -> LoadGenerator:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


class Store:
    """The registry under test, local or S3: publish, publish a corrupt copy, write config.json."""

    def __init__(self, root: str, options: dict[str, Any] | None, scratch: Path) -> None:
        self.root, self.options, self.scratch = root, options, scratch
        if options is not None:
            from fsspec.core import url_to_fs

            self.fs, self.base = url_to_fs(root, **options)

    def publish(self, bundle: Path, name: str, version: int) -> None:
        publish(bundle, self.root, name, version, storage_options=self.options)

    def publish_corrupt(self, bundle: Path, name: str, version: int) -> None:
        """Publish ``bundle`` with one byte of its weights flipped (capsa.json last / renamed into place)."""
        copy = self.scratch / f"corrupt-{uuid.uuid4().hex}"
        shutil.copytree(bundle, copy)
        weights = copy / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        files = sorted(copy.iterdir(), key=lambda p: p.name == "capsa.json")
        if self.options is None:
            tmp = Path(self.root) / name / f".tmp-{uuid.uuid4().hex}"
            shutil.copytree(copy, tmp)
            tmp.rename(Path(self.root) / name / str(version))
        else:
            for f in files:
                self.fs.put_file(str(f), f"{self.base}/{name}/{version}/{f.name}")

    def remove(self, name: str) -> None:
        if self.options is None:
            shutil.rmtree(Path(self.root) / name)
        else:
            self.fs.rm(f"{self.base}/{name}", recursive=True)

    def write_config(self, name: str, config: dict[str, Any]) -> None:
        data = json.dumps(config).encode()
        if self.options is None:
            path = Path(self.root) / name / "config.json"
            path.with_name("config.json.new").write_bytes(data)
            path.with_name("config.json.new").rename(path)
        else:
            self.fs.pipe_file(f"{self.base}/{name}/config.json", data)


def index(url: str) -> dict[tuple[str, str], dict[str, Any]]:
    r = httpx.post(f"{url}/v2/repository/index", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return {(e["name"], e["version"]): e for e in r.json()}


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_polling_serves_new_versions_without_failing_requests(where: str, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    """Old code: a running server never saw versions published after it started."""
    env = {"CAPSA_ADMIN_TOKEN": ADMIN_TOKEN, "CAPSA_REPOSITORY_POLL_S": "0.5", "CAPSA_ALLOWED_MODULES": "tests",
           "CAPSA_CACHE_DIR": str(tmp_path / "cache"), "CAPSA_REQUEST_TIMEOUT_S": "20"}
    if where == "local":
        (tmp_path / "registry").mkdir()
        store = Store(str(tmp_path / "registry"), None, tmp_path)
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        store = Store(f"{bucket}/models", options, tmp_path)
        env["CAPSA_STORAGE_OPTIONS"] = json.dumps(options)
    # distinct bundles: a remote registry's cache is keyed by capsa.json, so a copy of version 2 would be served
    # from the verified download of version 2
    bundles = {v: build_bundle(tmp_path / f"m-{v}", "vote", seed=v) for v in (1, 2, 3)}
    store.publish(bundles[1], "m", 1)
    store.publish(bundles[1], "other", 1)
    proc = ServerProcess(None, tmp_path / "server.log", env=env, args=["--model-repository", store.root])
    try:
        proc.wait_ready()
        with LoadGenerator(proc.url, "m") as load:
            load.wait_for(lambda r: r[1] == "1", 60, "version 1 answers")
            published = time.monotonic()
            store.publish(bundles[2], "m", 2)
            load.wait_for(lambda r: r[1] == "2", 180, "version 2 to be served")
            swap_s = time.monotonic() - published
            wait_until(lambda: index(proc.url)[("m", "1")]["state"] == "UNAVAILABLE", 60, "version 1 retired")

            store.publish_corrupt(bundles[3], "m", 3)
            wait_until(lambda: ("m", "3") in index(proc.url) and index(proc.url)[("m", "3")]["reason"] not in
                       ("", "not loaded"), 180, "version 3 rejected")
            assert "checksum" in index(proc.url)[("m", "3")]["reason"].lower() or "SHA-256" in index(
                proc.url)[("m", "3")]["reason"]
            assert metric(httpx.get(f"{proc.url}/metrics", timeout=30).text, "capsa_model_load_failed", "m",
                          "3") == 1
            load.wait_for(lambda r: r[1] == "2", 60, "version 2 still serving")
            ready = httpx.get(f"{proc.url}/v2/health/ready", timeout=10)
            assert ready.status_code == 200 and ready.json()["models"] == [
                {"name": "m", "version": "3", "reason": "failed to load"}]

            # a changed config.json is applied (a risk threshold adds the "flagged" output)
            store.write_config("m", {"risk_threshold": 0.0, "version_policy": {"specific": {"versions": [2]}}})
            load.wait_for(lambda r: r[2] and r[1] == "2", 180, "the new config to be applied")
            load.wait_for(lambda r: r[2], 10, "the new config to stay")

            # a model removed from the registry is unloaded; the others are not affected
            assert httpx.get(f"{proc.url}/v2/models/other/ready", timeout=10).status_code == 200
            store.remove("other")
            wait_until(lambda: httpx.get(f"{proc.url}/v2/models/other/ready", timeout=10).status_code == 404, 120,
                       "other to be unloaded")
            load.wait_for(lambda r: r[1] == "2", 60, "m still serving")
        statuses = [r[0] for r in load.results]
        print(f"\npolling ({where}): {len(statuses)} requests, {statuses.count(200)} answered 200; version 2 served "
              f"{swap_s:.1f} s after it was published (poll every 0.5 s, load and warm-up included)")
        assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert {r[1] for r in load.results} == {"1", "2"}
        assert sum(1 for r in load.results if r[1] == "2") > 10
        messages = [e.get("msg") for e in proc.log_entries()]
        assert "model loaded from the repository" in messages
    finally:
        assert proc.stop() == 0
