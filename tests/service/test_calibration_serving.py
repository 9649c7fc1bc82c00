"""Served calibrated outputs: intervals, sets, risk percentiles, flagging by percentile and the drift gauge.

One server: ``reg`` (a calibrated vote regressor), ``sculpt``, ``sample`` and ``composed`` (vote(sculpt(model)))
regressors, ``cls`` (a calibrated vote classifier), ``plain`` (the vote regressor, uncalibrated) and ``flagging``
(the vote regressor with ``risk_percentile_threshold`` in its config). The models are untrained on purpose: the
conformal guarantee holds whatever the model, so the checks need no training time. Sample sizes: 4,000 calibration
and 10,000 test samples, so a single split's coverage has sd ~0.0073 and 0.90 +- 0.03 is ~4 sd.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import capsa
from service.calibrated import DriftMonitor
from service.registry import publish
from tests.fixtures.archs import mlp
from tests.service.conftest import ServerProcess, metric

IN = 8
#: Subprocesses and servers get PYTHONPATH, so save_bundle's importability warning does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:save_bundle.*importable only:UserWarning")
TIMEOUT = 60.0


def regression_data(n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g) * scale
    y = x[:, :1].sin() + (0.2 + x[:, :1].abs()) * torch.randn(n, 1, generator=g)
    return x.numpy(), y.numpy()


def class_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = (x[:, :3].argmax(dim=1) + (torch.rand(n, generator=g) < 0.3).long()) % 3
    return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("registry")
    work = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    reg = capsa.vote.Wrapper(n_voters=4)(mlp(in_features=IN)).eval()
    cls = capsa.vote.Wrapper(n_voters=4, task="classification")(mlp(in_features=IN, out_features=3)).eval()
    reg_cal = capsa.calibrate(reg, *regression_data(4000, seed=1))
    others = {
        "sculpt": capsa.sculpt.Wrapper()(mlp(in_features=IN)).eval(),
        "sample": capsa.sample.Wrapper(n_samples=4)(mlp(in_features=IN)).eval(),
        "composed": capsa.vote.Wrapper(n_voters=3)(capsa.sculpt.Wrapper()(mlp(in_features=IN))).eval(),
    }
    cls_cal = capsa.calibrate(cls, *class_data(4000, seed=2))
    example = torch.zeros(2, IN)
    arch = "tests.fixtures.archs:mlp"
    bundles = {
        "reg": capsa.save_bundle(reg, work / "reg", architecture=arch, kwargs={"in_features": IN},
                                 example_input=example, calibration=reg_cal),
        "cls": capsa.save_bundle(cls, work / "cls", architecture=arch, kwargs={"in_features": IN, "out_features": 3},
                                 example_input=example, calibration=cls_cal),
        "plain": capsa.save_bundle(reg, work / "plain", architecture=arch, kwargs={"in_features": IN},
                                   example_input=example),
        "flagging": capsa.save_bundle(reg, work / "flagging", architecture=arch, kwargs={"in_features": IN},
                                      example_input=example, calibration=reg_cal),
    }
    for name, model in others.items():
        model(example)
        bundles[name] = capsa.save_bundle(model, work / name, architecture=arch, kwargs={"in_features": IN},
                                          example_input=example,
                                          calibration=capsa.calibrate(model, *regression_data(4000, seed=1)))
    for name, bundle in bundles.items():
        publish(bundle, str(root), name, 1)
        config = {"max_batch_size": 2048}
        if name == "flagging":
            config["risk_percentile_threshold"] = 0.99
        (root / name / "config.json").write_text(json.dumps(config))
    proc = ServerProcess(root, tmp_path_factory.mktemp("logs") / "server.log", env={"CAPSA_DRIFT_WINDOW": "1000"})
    try:
        proc.wait_ready()
        yield {"url": proc.url, "models": {"reg": reg, "cls": cls}, "cal": {"reg": reg_cal, "cls": cls_cal},
               "proc": proc}
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def infer(url: str, model: str, x: np.ndarray, **request: Any) -> dict[str, np.ndarray]:
    """V2 JSON inference in chunks of 2,000; outputs by name as numpy arrays (concatenated)."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(x), 2000):
        chunk = x[start : start + 2000]
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(chunk.shape),
                            "data": chunk.ravel().tolist()}], **request}
        answer = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=TIMEOUT)
        assert answer.status_code == 200, answer.text
        for out in answer.json()["outputs"]:
            dtype = bool if out["datatype"] == "BOOL" else np.float32
            parts.setdefault(out["name"], []).append(np.asarray(out["data"], dtype=dtype).reshape(out["shape"]))
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.mark.slow
def test_metadata_lists_the_calibrated_outputs(served: dict[str, Any]) -> None:
    reg = httpx.get(f"{served['url']}/v2/models/reg", timeout=TIMEOUT).json()
    outputs = {o["name"]: o for o in reg["outputs"]}
    assert outputs["risk_percentile"] == {"name": "risk_percentile", "datatype": "FP32", "shape": [-1]}
    assert outputs["interval_lower"] == {"name": "interval_lower", "datatype": "FP32", "shape": [-1, 1]}
    assert "interval_upper" in outputs and "prediction_set" not in outputs
    assert reg["parameters"]["calibration"]["coverage"] == 0.9
    assert reg["parameters"]["calibration"]["samples"] == 4000
    cls = {o["name"]: o for o in httpx.get(f"{served['url']}/v2/models/cls", timeout=TIMEOUT).json()["outputs"]}
    assert cls["prediction_set"] == {"name": "prediction_set", "datatype": "BOOL", "shape": [-1, 3]}
    assert cls["probabilities"]["datatype"] == "FP32"
    plain = httpx.get(f"{served['url']}/v2/models/plain", timeout=TIMEOUT).json()
    assert [o["name"] for o in plain["outputs"]] == ["prediction", "risk", "risk_score", "flagged"]  # as before
    assert "calibration" not in plain["parameters"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sculpt", "sample", "composed"])
def test_served_intervals_cover_for_every_wrapper(served: dict[str, Any], model: str) -> None:
    x, y = regression_data(10000, seed=3)
    got = infer(served["url"], model, x, outputs=[{"name": n} for n in ("interval_lower", "interval_upper",
                                                                       "risk_percentile")])
    inside = (y >= got["interval_lower"]) & (y <= got["interval_upper"])
    assert abs(float(inside.mean()) - 0.90) <= 0.03
    assert abs(float((got["risk_percentile"] > 0.9).mean()) - 0.10) <= 0.03


@pytest.mark.slow
def test_served_intervals_cover_and_match_the_library(served: dict[str, Any]) -> None:
    x, y = regression_data(10000, seed=3)
    got = infer(served["url"], "reg", x)
    assert set(got) == {"prediction", "risk", "risk_score", "risk_percentile", "interval_lower", "interval_upper"}
    inside = (y >= got["interval_lower"]) & (y <= got["interval_upper"])
    assert abs(float(inside.mean()) - 0.90) <= 0.03
    assert abs(float((got["risk_percentile"] > 0.9).mean()) - 0.10) <= 0.03
    with torch.no_grad():
        pred, risk = served["models"]["reg"](torch.from_numpy(x[:500]), return_risk=True)
    expected = served["cal"]["reg"].outputs(pred, risk)
    for name in ("interval_lower", "interval_upper", "risk_percentile"):
        np.testing.assert_allclose(got[name][:500], expected[name].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_served_prediction_sets_cover(served: dict[str, Any]) -> None:
    x, y = class_data(10000, seed=4)
    got = infer(served["url"], "cls", x, outputs=[{"name": "prediction_set"}, {"name": "probabilities"}])
    assert set(got) == {"prediction_set", "probabilities"}
    assert got["prediction_set"].dtype == bool and got["prediction_set"].shape == (10000, 3)
    coverage = float(got["prediction_set"][np.arange(len(y)), y].mean())
    assert abs(coverage - 0.90) <= 0.03
    np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_flagging_by_percentile_and_drift(served: dict[str, Any]) -> None:
    url = served["url"]
    normal, _ = regression_data(3000, seed=5)
    shifted, _ = regression_data(3000, seed=6, scale=6.0)  # inputs far wider than the calibration data
    got = infer(url, "flagging", normal)  # config.json: risk_percentile_threshold 0.99
    assert float(got["flagged"].mean()) <= 0.03
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    quiet = metric(text, "capsa_risk_drift", "flagging")
    assert abs(quiet) < 4.0
    assert metric(text, "capsa_risk_percentile_count", "flagging") == 3000
    got = infer(url, "flagging", shifted)
    assert float(got["flagged"].mean()) >= 0.3
    loud = metric(httpx.get(f"{url}/metrics", timeout=TIMEOUT).text, "capsa_risk_drift", "flagging")
    assert loud > 20.0  # the window (1,000) is full of shifted samples
    # The request's parameter overrides the config; V1 answers carry the calibrated outputs too.
    v1 = httpx.post(f"{url}/v1/models/reg:predict", timeout=TIMEOUT,
                    json={"instances": normal[:50].tolist(), "parameters": {"risk_percentile_threshold": 0.5}}).json()
    assert set(v1) >= {"predictions", "risk", "risk_score", "risk_percentile", "interval_lower", "interval_upper",
                       "flagged"}
    assert np.array_equal(np.array(v1["flagged"]), np.array(v1["risk_percentile"]) > 0.5)


@pytest.mark.slow
def test_uncalibrated_models_refuse_calibrated_requests(served: dict[str, Any]) -> None:
    url = served["url"]
    x = np.zeros((2, IN), np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, IN], "data": x.ravel().tolist()}]}
    answer = httpx.post(f"{url}/v2/models/plain/infer", json={**body, "outputs": [{"name": "risk_percentile"}]},
                        timeout=TIMEOUT)
    assert answer.status_code == 400 and "not calibrated" in answer.json()["error"]
    answer = httpx.post(f"{url}/v2/models/plain/infer", timeout=TIMEOUT,
                        json={**body, "parameters": {"risk_percentile_threshold": 0.9}})
    assert answer.status_code == 400 and "not calibrated" in answer.json()["error"]
    answer = httpx.post(f"{url}/v2/models/reg/infer", timeout=TIMEOUT,
                        json={**body, "parameters": {"risk_percentile_threshold": 1.5}})
    assert answer.status_code == 400 and "risk_percentile_threshold" in answer.json()["error"]
    plain = httpx.post(f"{url}/v2/models/plain/infer", json=body, timeout=TIMEOUT).json()
    assert [o["name"] for o in plain["outputs"]] == ["prediction", "risk", "risk_score"]
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    assert 'capsa_risk_drift{model="reg"' in text
    assert 'model="plain"' in text and 'capsa_risk_drift{model="plain"' not in text  # no series when uncalibrated
    assert 'capsa_risk_percentile_count{model="plain"' not in text


def test_drift_monitor_window() -> None:
    monitor = DriftMonitor(window=100)
    assert monitor.statistic() == 0.0
    z = monitor.add(np.full(100, 0.5))  # none above 0.9: k = 0, n = 100
    assert z == pytest.approx((0 - 10) / 3.0)
    z = monitor.add(np.full(30, 0.95))  # the oldest 30 replaced: k = 30
    assert z == pytest.approx((30 - 10) / 3.0)
    z = monitor.add(np.r_[np.full(250, 0.95), np.full(100, 0.1)])  # a batch larger than the window: its last 100
    assert z == pytest.approx((0 - 10) / 3.0)
    assert monitor.add(np.array([np.nan])) == pytest.approx((0 - 10) / 3.0)  # NaN skipped


def test_calibrated_version_with_a_damaged_calibration_is_unavailable(tmp_path: Path) -> None:
    from service.calibrated import ServedCalibration

    torch.manual_seed(0)
    reg = capsa.vote.Wrapper(n_voters=4)(mlp(in_features=IN)).eval()
    bundle = capsa.save_bundle(reg, tmp_path / "b", architecture="tests.fixtures.archs:mlp",
                               kwargs={"in_features": IN}, example_input=torch.zeros(2, IN),
                               calibration=capsa.calibrate(reg, *regression_data(100, seed=7)))
    meta = json.loads((bundle / "capsa.json").read_text())
    assert ServedCalibration.load(bundle, meta) is not None
    (bundle / "calibration.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checksum mismatch"):
        ServedCalibration.load(bundle, meta)


@pytest.mark.slow
def test_grpc_serves_the_calibrated_outputs(served: dict[str, Any]) -> None:
    import tritonclient.grpc as tg

    x, _ = class_data(20, seed=8)
    client = tg.InferenceServerClient(served["proc"].grpc_url)
    try:
        meta = client.get_model_metadata("cls", as_json=True)
        assert {"risk_percentile", "probabilities", "prediction_set"} <= {o["name"] for o in meta["outputs"]}
        inp = tg.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        wanted = [tg.InferRequestedOutput(n) for n in ("prediction_set", "risk_percentile")]
        result = client.infer("cls", [inp], outputs=wanted, client_timeout=TIMEOUT)
    finally:
        client.close()
    rest = infer(served["url"], "cls", x, outputs=[{"name": "prediction_set"}, {"name": "risk_percentile"}])
    assert np.array_equal(result.as_numpy("prediction_set"), rest["prediction_set"])
    np.testing.assert_allclose(result.as_numpy("risk_percentile"), rest["risk_percentile"], rtol=1e-6)
