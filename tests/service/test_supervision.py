"""Supervision per slot and readiness, over real ``capsa-serve`` processes.

One slot's failed restart leaves the other slots serving and is retried until it works; a worker that dies while
loading is a load failure after a few attempts (and the load route answers instead of waiting out the start
timeout); unload cancels a pending load; load re-validates the files a restart needs and reports a problem
without dropping the copy that serves; a bad ``config.json`` answers 400; readiness follows the documented policy
and the state metrics make failed versions and an empty registry visible.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import capsa
from service.manager import ModelManager, ModelVersion
from service.metrics import Metrics
from service.model_config import ModelConfig
from service.settings import Settings
from tests.service.conftest import IN_FEATURES, ServerProcess, add_model, metric
from tests.service.test_lifecycle import AUTH, Hammer, infer, rows, wait_until

CRASHY = "tests.service.crashy_arch:build"
ENV = {"CAPSA_ADMIN_TOKEN": AUTH["Authorization"].removeprefix("Bearer "), "CAPSA_ALLOWED_MODULES": "tests",
       "CAPSA_REQUEST_TIMEOUT_S": "10"}


def crashy_model(root: Path, work: Path, name: str, **markers: str) -> None:
    """Publish a model built by ``crashy_arch.build`` (crashing or hanging while its marker files exist)."""
    from service.registry import publish

    torch.manual_seed(0)
    kwargs = {"in_features": IN_FEATURES, **markers}
    wrapped = capsa.vote.Wrapper(n_voters=2)(torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 1)))
    x = torch.randn(4, IN_FEATURES)
    wrapped(x)
    bundle = capsa.save_bundle(wrapped, work / name, architecture=CRASHY, kwargs=kwargs, example_input=x)
    publish(bundle, str(root), name, 1)


def replace_file(path: Path, data: bytes) -> None:
    """Replace a file by a new one (a new inode: workers that mapped the old one keep their copy)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def index(url: str) -> dict[tuple[str, str], dict[str, Any]]:
    r = httpx.post(f"{url}/v2/repository/index", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return {(e["name"], e["version"]): e for e in r.json()}


def metrics_text(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def versions_gauge(text: str, state: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'capsa_model_versions{{state="{state}"}} '):
            return float(line.split()[-1])
    return None


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with: ``twin`` (two workers), ``reval`` and ``cfg`` (one each), ``broken`` (its bundle does not
    load), ``crashy`` (its worker dies while loading) and ``slow`` (loads normally, hangs while a marker exists)."""
    root = tmp_path_factory.mktemp("sup-registry")
    work = tmp_path_factory.mktemp("sup-bundles")
    marks = tmp_path_factory.mktemp("sup-marks")
    add_model(root, work, "twin", "vote", config={"instances": 2, "max_batch_size": 4})
    add_model(root, work, "reval", "vote")
    add_model(root, work, "cfg", "vote")
    add_model(root, work, "broken", "vote")
    manifest = root / "broken" / "1" / "capsa.json"
    meta = json.loads(manifest.read_text())
    meta["kwargs"]["hidden"] = 5  # the weights no longer fit: the worker reports a load error
    manifest.write_text(json.dumps(meta))
    crash = marks / "crash"
    crashy_model(root, work, "crashy", crash_if=str(crash))
    crashy_model(root, work, "slow", hang_if=str(marks / "hang"))
    crash.touch()  # after saving: save_bundle builds the model once
    proc = ServerProcess(root, tmp_path_factory.mktemp("sup-logs") / "server.log", env=ENV)
    try:
        proc.wait_ready(timeout=240)
        yield {"proc": proc, "root": root, "work": work, "marks": marks}
    finally:
        assert proc.stop() == 0


# ---------------------------------------------------------------------------------------------- readiness policy
@pytest.mark.slow
def test_readiness_default_policy_names_the_failed_versions(sup: dict[str, Any]) -> None:
    """Old code: one failed version kept /v2/health/ready at 503 for good, with no reason."""
    url = sup["proc"].url
    wait_until(lambda: index(url)[("crashy", "1")]["state"] == "UNAVAILABLE", 180, "crashy to fail")
    r = httpx.get(f"{url}/v2/health/ready", timeout=10)
    assert r.status_code == 200, r.text
    not_ready = {(m["name"], m["version"]): m["reason"] for m in r.json()["models"]}
    assert not_ready[("broken", "1")] == "failed to load" and not_ready[("crashy", "1")] == "failed to load"
    assert str(sup["root"]) not in r.text and "hidden" not in r.text  # details stay in the log and the index
    assert "does not fit" in index(url)[("broken", "1")]["reason"] or "size mismatch" in index(url)[
        ("broken", "1")]["reason"]
    text = metrics_text(url)
    assert metric(text, "capsa_model_load_failed", "broken") == 1
    assert metric(text, "capsa_model_load_failed", "crashy") == 1
    assert metric(text, "capsa_model_ready", "broken") == 0
    assert 'capsa_model_load_failed{model="twin",version="1"}' not in text
    assert versions_gauge(text, "failed") >= 2 and versions_gauge(text, "ready") >= 3


# ---------------------------------------------------------------------------------------------- crash loop
@pytest.mark.slow
def test_worker_dying_while_loading_is_a_load_failure_after_a_few_attempts(sup: dict[str, Any]) -> None:
    """Old code: restarted forever, never reported; the load route then held the model's lock for the start
    timeout (300 s by default)."""
    proc, url = sup["proc"], sup["proc"].url
    wait_until(lambda: index(url)[("crashy", "1")]["state"] == "UNAVAILABLE", 180, "crashy to fail")
    assert "exited with code 70 while loading" in index(url)[("crashy", "1")]["reason"]
    starts = [e for e in proc.log_entries() if e.get("msg") == "worker starting"
              and str(e.get("worker", "")).startswith("crashy-1-")]
    assert len(starts) == 3
    r = httpx.post(f"{url}/v2/repository/models/crashy/load", headers=AUTH, timeout=150)
    assert r.status_code == 400 and "crashy" in r.json()["error"] and "exited with code 70" in r.json()["error"]
    (sup["marks"] / "crash").unlink()  # the cause is gone: a new load works
    r = httpx.post(f"{url}/v2/repository/models/crashy/load", headers=AUTH, timeout=150)
    assert r.status_code == 200, r.text
    assert infer(url, "crashy", rows(2)).status_code == 200
    assert metric(metrics_text(url), "capsa_model_load_failed", "crashy") == 0


@pytest.mark.slow
def test_unload_cancels_a_pending_load(sup: dict[str, Any]) -> None:
    """Old code: unload waited for the model's lock, held by the load for up to the start timeout."""
    url, root = sup["proc"].url, sup["root"]
    hang = sup["marks"] / "hang"
    assert infer(url, "slow", rows(1)).status_code == 200
    hang.touch()
    (root / "slow" / "config.json").write_text(json.dumps({"max_batch_size": 8}))  # a changed config: reload
    result: dict[str, httpx.Response] = {}
    loader = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
        f"{url}/v2/repository/models/slow/load", headers=AUTH, timeout=150)))
    loader.start()
    try:
        wait_until(lambda: len([e for e in sup["proc"].log_entries() if e.get("msg") == "worker starting"
                                and str(e.get("worker", "")).startswith("slow-1-")]) == 2, 60, "the reload's worker")
        assert infer(url, "slow", rows(1)).status_code == 200  # the loaded copy serves meanwhile
        r = httpx.post(f"{url}/v2/repository/models/slow/unload", headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        loader.join(timeout=60)
        assert not loader.is_alive()
        assert result["r"].status_code == 409 and "cancelled" in result["r"].json()["error"]
        assert infer(url, "slow", rows(1)).status_code == 404
    finally:
        hang.unlink(missing_ok=True)
        loader.join(timeout=150)


# ---------------------------------------------------------------------------------------------- per-slot restarts
@pytest.mark.slow
def test_one_slot_failing_to_restart_leaves_the_other_serving(sup: dict[str, Any]) -> None:
    """Old code: the failed restart of one worker (weights briefly absent) marked the version unavailable and
    killed the healthy worker: the model answered 503 even after the file was back."""
    proc, url = sup["proc"], sup["proc"].url
    wait_until(lambda: len(proc.worker_pids("twin-1-")) == 2, 120, "two twin workers")
    pids = proc.worker_pids("twin-1-")
    weights = sup["root"] / "twin" / "1" / "model.safetensors"
    aside = weights.with_name("aside")
    os.rename(weights, aside)
    try:
        with Hammer(url, "twin") as load:
            os.kill(pids[0], signal.SIGKILL)
            wait_until(lambda: any(e.get("level") == "error" and "load" in e.get("msg", "")
                                   and str(e.get("worker", e.get("model", ""))).startswith("twin")
                                   for e in proc.log_entries()), 120, "the slot's failed restart")
            assert httpx.get(f"{url}/v2/models/twin/ready", timeout=10).status_code == 200
            os.rename(aside, weights)
            wait_until(lambda: len(proc.worker_pids("twin-1-")) == 3, 120, "the slot to come back")
        assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))
    finally:
        if aside.exists():
            os.rename(aside, weights)
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200


# ---------------------------------------------------------------------------------------------- re-validation
@pytest.mark.slow
def test_reload_with_corrupt_weights_is_reported_and_keeps_serving(sup: dict[str, Any]) -> None:
    """Old code: 200 (only capsa.json and config.json were compared); the next restart would fail."""
    url = sup["proc"].url
    weights = sup["root"] / "reval" / "1" / "model.safetensors"
    good = weights.read_bytes()
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF
    replace_file(weights, bytes(corrupt))
    try:
        r = httpx.post(f"{url}/v2/repository/models/reval/load", headers=AUTH, timeout=120)
        assert r.status_code == 400 and "checksum" in r.json()["error"].lower(), r.text
        assert infer(url, "reval", rows(2)).status_code == 200
        entry = index(url)[("reval", "1")]
        assert entry["state"] == "READY" and "checksum" in entry["reason"].lower()
        assert metric(metrics_text(url), "capsa_model_load_failed", "reval") == 1
    finally:
        replace_file(weights, good)
    r = httpx.post(f"{url}/v2/repository/models/reval/load", headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert index(url)[("reval", "1")]["reason"] == ""
    assert metric(metrics_text(url), "capsa_model_load_failed", "reval") == 0


def test_bad_config_on_the_load_route_is_a_400_naming_file_and_field(sup: dict[str, Any]) -> None:
    """Old code: 500 ``internal error: ConfigError`` and two tracebacks in the log."""
    proc, url = sup["proc"], sup["proc"].url
    config = sup["root"] / "cfg" / "config.json"
    config.write_text(json.dumps({"max_batch_size": 0}))
    try:
        before = len(proc.log().splitlines())
        r = httpx.post(f"{url}/v2/repository/models/cfg/load", headers=AUTH, timeout=60)
        assert r.status_code == 400, r.text
        assert f"{sup['root']}/cfg/config.json" in r.json()["error"] and "max_batch_size" in r.json()["error"]
        assert infer(url, "cfg", rows(2)).status_code == 200  # the loaded config keeps serving
        new = proc.log().splitlines()[before:]
        assert "Traceback" not in "\n".join(new)
        assert len([line for line in new if "max_batch_size" in line]) == 1
    finally:
        config.unlink()


# ---------------------------------------------------------------------------------------------- stuck workers
class _FakeWorker:
    _ids = iter(range(10_000, 20_000))

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.pid = self.id
        self.name = f"fake-{self.id}"
        self.killed = False

    def kill(self) -> None:
        self.killed = True


def test_a_stuck_worker_makes_readiness_say_so_until_replaced(tmp_path: Path) -> None:
    """Old code: readiness stayed green while a worker was declared stuck."""
    from tests.service.conftest import build_bundle

    bundle = build_bundle(tmp_path / "b", "vote")
    settings = Settings(model_repository=str(tmp_path), devices="cpu")

    async def scenario() -> None:
        manager = ModelManager(settings, Metrics())
        mv = ModelVersion("m", 1, bundle, ModelConfig(), settings, manager.metrics, ["cpu"])
        manager._publish("m", {1: mv})
        manager.started = True
        first = _FakeWorker()
        mv._slot_of[first.id] = mv.slots[0]
        mv._on_ready(first)  # type: ignore[arg-type]
        assert manager.readiness() == (True, {"ready": True})
        mv._on_stuck(first)
        ok, answer = manager.readiness()
        assert first.killed and not ok
        assert answer["models"] == [{"name": "m", "version": "1", "reason": "a worker is stuck; replacing it"}]
        assert "stuck" in mv.status()["reason"]
        mv.batcher.remove_worker(first)  # type: ignore[arg-type]
        second = _FakeWorker()
        mv._slot_of[second.id] = mv.slots[0]
        mv._on_ready(second)  # type: ignore[arg-type]
        assert manager.readiness() == (True, {"ready": True})

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_stopped_worker_makes_readiness_say_stuck_until_replaced(tmp_path: Path) -> None:
    """End to end with the transport's stall detection: SIGSTOP the only worker of a model whose replacement hangs
    while loading (a marker file); readiness names the stuck model until the replacement is ready."""
    root, work, hang = tmp_path / "registry", tmp_path / "bundles", tmp_path / "hang"
    crashy_model(root, work, "m", hang_if=str(hang))
    proc = ServerProcess(root, tmp_path / "server.log", env={**ENV, "CAPSA_REQUEST_TIMEOUT_S": "2"})
    try:
        proc.wait_ready()
        (pid,) = proc.worker_pids("m-1-")
        hang.touch()  # the replacement will wait in its load until the marker is gone
        os.kill(pid, signal.SIGSTOP)
        assert infer(proc.url, "m", rows(1)).status_code == 504

        def stuck() -> bool:
            r = httpx.get(f"{proc.url}/v2/health/ready", timeout=10)
            return r.status_code == 503 and r.json().get("models") == [
                {"name": "m", "version": "1", "reason": "a worker is stuck; replacing it"}]

        wait_until(stuck, 60, "readiness to report the stuck worker")
        hang.unlink()
        wait_until(lambda: httpx.get(f"{proc.url}/v2/health/ready", timeout=10).status_code == 200, 120,
                   "the replacement")
        assert infer(proc.url, "m", rows(1)).status_code == 200
    finally:
        hang.unlink(missing_ok=True)
        assert proc.stop() == 0  # stops (SIGKILLs if need be) its workers, the stopped one included


# ---------------------------------------------------------------------------------------------- empty registry
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_empty_or_mistyped_registry_is_not_ready_and_visible(where: str, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    """Old code: ready 200, no warning, and no series an alert could see."""
    env = dict(ENV)
    if where == "local":
        (tmp_path / "models").mkdir()
        root: Any = tmp_path / "models"
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        root, env["CAPSA_STORAGE_OPTIONS"] = f"{bucket}/typo", json.dumps(options)
    proc = ServerProcess(root, tmp_path / "server.log", env=env)
    try:
        proc.wait_ready(path="/v2/health/live")
        wait_until(lambda: any(e.get("level") == "warning" and "no model" in e.get("msg", "")
                               for e in proc.log_entries()), 60, "the warning")
        r = httpx.get(f"{proc.url}/v2/health/ready", timeout=10)
        assert r.status_code == 503 and r.json() == {"ready": False, "reason": "no model in the repository"}
        text = metrics_text(proc.url)
        assert versions_gauge(text, "ready") == 0 and versions_gauge(text, "failed") == 0
    finally:
        assert proc.stop() == 0


@pytest.mark.slow
def test_strict_readiness_needs_every_version_loaded(tmp_path: Path) -> None:
    root, work = tmp_path / "registry", tmp_path / "bundles"
    add_model(root, work, "good", "vote")
    add_model(root, work, "badcfg", "vote")
    (root / "badcfg" / "config.json").write_text('{"instances": 0}')
    proc = ServerProcess(root, tmp_path / "server.log", env={**ENV, "CAPSA_STRICT_READINESS": "true"})
    try:
        proc.wait_ready(path="/v2/health/live")
        wait_until(lambda: httpx.get(f"{proc.url}/v2/models/good/ready", timeout=10).status_code == 200, 120,
                   "good")
        r = httpx.get(f"{proc.url}/v2/health/ready", timeout=10)
        assert r.status_code == 503
        assert r.json()["models"] == [{"name": "badcfg", "version": "0", "reason": "failed to load"}]
        assert metric(metrics_text(proc.url), "capsa_model_load_failed", "badcfg", "0") == 1
        x = np.zeros((1, IN_FEATURES), np.float32)
        assert infer(proc.url, "good", x).status_code == 200
    finally:
        assert proc.stop() == 0


def test_state_metrics_contract() -> None:
    """The series the alerts read: counts always exported, load_failed 1 while failed, 0 once loaded, gone after."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(m.render().decode()) for s in family.samples}

    m = Metrics()
    got = samples(m)
    assert {got[("capsa_model_versions", (("state", st),))] for st in ("ready", "loading", "failed")} == {0}
    m.set_version_states({"ready": 1, "failed": 1}, failed=[("a", "2")], loaded=[("a", "1")])
    got = samples(m)
    assert got[("capsa_model_versions", (("state", "failed"),))] == 1
    assert got[("capsa_model_load_failed", (("model", "a"), ("version", "2")))] == 1
    assert ("capsa_model_load_failed", (("model", "a"), ("version", "1"))) not in got  # never failed: no series
    m.set_version_states({"ready": 2}, failed=[], loaded=[("a", "1"), ("a", "2")])
    assert samples(m)[("capsa_model_load_failed", (("model", "a"), ("version", "2")))] == 0
    m.set_version_states({"ready": 1}, failed=[], loaded=[("a", "1")])  # version 2 retired
    assert ("capsa_model_load_failed", (("model", "a"), ("version", "2"))) not in samples(m)
