"""capsa.calibrate: intervals, sets and risk percentiles that keep their promise on data the model never saw.

Margins follow the sample sizes. Regression: 4,000 calibration samples (2,000 for the conformal quantile) and
10,000 test samples, so a single split's coverage has a standard deviation of about
sqrt(0.09/2000 + 0.09/10000) = 0.0073 and 0.90 +- 0.03 is about 4 sd. The share of test samples above the 0.9
risk percentile has about the same spread. Classification (scikit-learn's digits, 1,797 samples): a single split
leaves 250 conformal and about 500 test samples (sd about 0.023), so each of 20 random splits is held to
+- 0.08 and their mean to +- 0.03.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import capsa
from capsa import sample, sculpt, vote
from capsa.calibration import Calibration, CalibrationError, min_samples
from tests.fixtures.archs import mlp

_spec = importlib.util.spec_from_file_location("cubic", Path(__file__).parents[2] / "examples" / "cubic.py")
cubic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cubic)


def covered(y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> float:
    return float(((y >= lower) & (y <= upper)).double().mean())


# ------------------------------------------------------------------ fast: an untrained model, synthetic targets
def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets with noise that grows with the first feature (the model never learns them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :1].sin() + (0.2 + x[:, :1].abs()) * torch.randn(n, 1, generator=g)
    return x, y


@pytest.fixture(scope="module")
def untrained() -> capsa.WrappedModel:
    torch.manual_seed(0)
    return vote.Wrapper(n_voters=4)(mlp()).eval()


def test_conformal_interval_covers_new_samples_whatever_the_model(untrained: capsa.WrappedModel) -> None:
    # The guarantee needs no good model: an untrained one still gets 90% intervals (wide ones).
    cal = capsa.calibrate(untrained, *synthetic(4000, seed=1), coverage=0.9)
    x, y = synthetic(10000, seed=2)
    with torch.no_grad():
        pred, risk = untrained(x, return_risk=True)
    lower, upper = cal.interval(pred, risk)
    assert abs(covered(y, lower, upper) - 0.9) <= 0.03
    assert cal.report["samples"] == 4000 and cal.report["conformal_samples"] == 2000
    assert cal.report["after"]["coverage"] >= 0.9


def test_dataloader_gives_the_same_calibration(untrained: capsa.WrappedModel) -> None:
    x, y = synthetic(500, seed=3)
    from_tensors = capsa.calibrate(untrained, x, y, coverage=0.8)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    from_loader = capsa.calibrate(untrained, loader, coverage=0.8)
    for name, value in from_tensors.tensors().items():
        np.testing.assert_allclose(from_loader.tensors()[name], value, rtol=1e-12, atol=0)
    assert from_loader.record() == from_tensors.record()


def test_numpy_and_torch_application_agree(untrained: capsa.WrappedModel) -> None:
    cal = capsa.calibrate(untrained, *synthetic(400, seed=4))
    with torch.no_grad():
        pred, risk = untrained(synthetic(50, seed=5)[0], return_risk=True)
    lower_t, upper_t = cal.interval(pred, risk)
    lower_n, upper_n = cal.interval(pred.numpy(), risk.numpy())
    assert lower_t.dtype == torch.float32 and isinstance(lower_n, np.ndarray) and lower_n.dtype == np.float32
    np.testing.assert_allclose(lower_t.numpy(), lower_n, rtol=1e-6)
    np.testing.assert_allclose(upper_t.numpy(), upper_n, rtol=1e-6)
    assert torch.all(lower_t <= pred) and torch.all(upper_t >= pred)
    pct_t = cal.risk_percentile(risk)
    pct_n = cal.risk_percentile(capsa.risk_score(risk).numpy())  # a 1-d input is the risk score itself
    assert pct_t.shape == (50,)
    np.testing.assert_allclose(pct_t.numpy(), pct_n, rtol=1e-6)
    outputs = cal.outputs(pred.numpy(), risk.numpy())
    assert sorted(outputs) == ["interval_lower", "interval_upper", "risk_percentile"]


def test_risk_percentile_is_the_share_below() -> None:
    scores = np.arange(1001, dtype=np.float64)  # quantiles 0..1000 at levels 0, 0.001, ..., 1
    cal = Calibration(task="regression", coverage=0.9, samples=1001, risk_quantiles=scores, output_shape=(1,),
                      scale_a=np.ones(1), scale_b=np.zeros(1), quantile=np.ones(1))
    got = cal.risk_percentile(np.array([-5.0, 0.0, 250.0, 500.5, 1000.0, 1e9]))
    np.testing.assert_allclose(got, [0.0, 0.0, 0.25, 0.5005, 1.0, 1.0])
    tied = Calibration(task="regression", coverage=0.9, samples=1001, risk_quantiles=np.zeros(1001),
                       output_shape=(1,), scale_a=np.ones(1), scale_b=np.zeros(1), quantile=np.ones(1))
    assert tied.risk_percentile(np.array([0.0, 1.0])).tolist() == [1.0, 1.0]  # ties rank above, never below


def test_round_trip_through_files_and_tampering_is_refused(untrained: capsa.WrappedModel, tmp_path: Path) -> None:
    cal = capsa.calibrate(untrained, *synthetic(300, seed=6))
    cal.save(tmp_path)
    again = Calibration.load(tmp_path)
    assert again.record() == cal.record()
    for name, value in cal.tensors().items():
        assert np.array_equal(again.tensors()[name], value)
    assert not any(p.suffix in (".pt", ".pkl", ".pickle") for p in tmp_path.iterdir())
    data = bytearray((tmp_path / "calibration.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "calibration.safetensors").write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match="checksum mismatch"):
        Calibration.load(tmp_path)


@pytest.mark.parametrize("coverage", [0, 1, 1.5, -0.1, True, "0.9", math.nan])
def test_coverage_outside_the_open_unit_interval_is_refused(untrained: capsa.WrappedModel, coverage: object) -> None:
    with pytest.raises(CalibrationError, match="coverage must be a number strictly between 0 and 1"):
        capsa.calibrate(untrained, *synthetic(100, seed=7), coverage=coverage)


def test_too_few_samples_for_the_coverage(untrained: capsa.WrappedModel) -> None:
    assert min_samples(0.9) == 17  # 9 conformal samples: the ceil(10 * 0.9) = 9th smallest score exists
    assert min_samples(0.99) == 197
    with pytest.raises(CalibrationError, match=r"coverage 0\.99 needs at least 197 calibration samples.*got 100"):
        capsa.calibrate(untrained, *synthetic(100, seed=8), coverage=0.99)
    loader = DataLoader(TensorDataset(*synthetic(16, seed=8)), batch_size=5)  # counted only while running
    with pytest.raises(CalibrationError, match=r"needs at least 17 calibration samples.*got 16"):
        capsa.calibrate(untrained, loader, coverage=0.9)
    capsa.calibrate(untrained, *synthetic(17, seed=8), coverage=0.9)  # the minimum works


def test_nan_targets_are_refused_naming_the_sample(untrained: capsa.WrappedModel) -> None:
    x, y = synthetic(100, seed=9)
    y[37, 0] = math.nan
    with pytest.raises(CalibrationError, match=r"y has 1 NaN or infinite targets \(first in sample 37\)"):
        capsa.calibrate(untrained, x, y)


def test_shapes_that_do_not_fit_the_model_are_refused(untrained: capsa.WrappedModel) -> None:
    x, y = synthetic(100, seed=10)
    with pytest.raises(CalibrationError, match=r"y has shape \[100\] but the model's prediction has shape \[100, 1\]"):
        capsa.calibrate(untrained, x, y[:, 0])
    with pytest.raises(CalibrationError, match="x has 100 samples but y has 99"):
        capsa.calibrate(untrained, x, y[:99])
    with pytest.raises(CalibrationError, match="y is missing"):
        capsa.calibrate(untrained, x)
    with pytest.raises(CalibrationError, match="expected a capsa-wrapped model"):
        capsa.calibrate(mlp(), x, y)
    cal = capsa.calibrate(untrained, x, y)
    with pytest.raises(CalibrationError, match=r"prediction has shape \[4, 2\]; this calibration is for outputs "
                                               r"of shape \[N, 1\]"):
        cal.interval(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(CalibrationError, match="prediction_set applies to classification calibrations"):
        cal.prediction_set(torch.zeros(4, 1))


def test_classifier_labels_are_checked() -> None:
    model = vote.Wrapper(task="classification")(mlp(out_features=3)).eval()
    x = torch.randn(60, 8)
    with pytest.raises(CalibrationError, match=r"y holds class labels outside 0\.\.2"):
        capsa.calibrate(model, x, torch.full((60,), 3))
    with pytest.raises(CalibrationError, match=r"needs class indices of shape \[60\]"):
        capsa.calibrate(model, x, torch.zeros(60, 3))


# ------------------------------------------------------------------ slow: trained models, held-out data
def _train_composed(steps: int = 1500, seed: int = 0) -> capsa.WrappedModel:
    """vote(sculpt(mlp)) on the cubic toy: each voter's mean and scale heads by Gaussian likelihood."""
    torch.manual_seed(seed)
    x, y = cubic.make_data(2000, -4.0, 4.0, seed)
    model = vote.Wrapper(n_voters=8)(sculpt.Wrapper()(cubic.mlp()))
    _ = model(x[:8])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _step in range(steps):
        idx = torch.randint(0, len(x), (128,))
        pred, risk = model(x[idx], return_risk=True)
        loss = F.gaussian_nll_loss(pred, y[idx], risk.aleatoric**2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def cubic_split() -> dict[str, torch.Tensor]:
    """Calibration and test data drawn fresh (other seeds than training), plus inputs beyond the training range."""
    x_cal, y_cal = cubic.make_data(4000, -4.0, 4.0, seed=101)
    x_test, y_test = cubic.make_data(10000, -4.0, 4.0, seed=102)
    shifted = torch.rand(2000, 1, generator=torch.Generator().manual_seed(103)) * 1.5 + 4.5  # |x| in [4.5, 6]
    return {"x_cal": x_cal, "y_cal": y_cal, "x_test": x_test, "y_test": y_test, "shifted": shifted * torch.sign(
        torch.randn(2000, 1, generator=torch.Generator().manual_seed(104)))}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sculpt", "vote", "sample", "vote(sculpt)"])
def test_held_out_intervals_and_percentiles_on_the_cubic_toy(kind: str, cubic_split: dict[str, torch.Tensor]) -> None:
    model = _train_composed() if kind == "vote(sculpt)" else cubic.train(kind, steps=1500)
    s = cubic_split
    cal = capsa.calibrate(model, s["x_cal"], s["y_cal"], coverage=0.9)
    with torch.no_grad():
        pred, risk = model(s["x_test"], return_risk=True)
        _, shifted_risk = model(s["shifted"], return_risk=True)
    assert isinstance(risk, capsa.Risk) == (kind == "vote(sculpt)")
    lower, upper = cal.interval(pred, risk)
    assert abs(covered(s["y_test"], lower, upper) - 0.90) <= 0.03
    percentile = cal.risk_percentile(risk)
    assert abs(float((percentile > 0.9).double().mean()) - 0.10) <= 0.03
    flagged_normal = float((percentile > 0.99).double().mean())
    assert flagged_normal <= 0.03
    if kind != "sculpt":  # aleatoric risk says nothing about inputs unlike the training data
        assert float((cal.risk_percentile(shifted_risk) > 0.99).double().mean()) >= 0.3
    # Calibration fixes the raw risk's meaning: as a standard deviation it misses for vote and sample.
    if kind in ("vote", "sample"):
        assert cal.report["before"]["coverage"] < 0.6
        assert cal.report["after"]["nll"] < cal.report["before"]["nll"]


@pytest.fixture(scope="module")
def digits_model() -> tuple[capsa.WrappedModel, torch.Tensor, torch.Tensor]:
    """A vote classifier trained on 800 of scikit-learn's digits; returns it and the 997 held-out samples."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = order[:800], order[800:]
    torch.manual_seed(0)
    model = vote.Wrapper(n_voters=5, task="classification")(mlp(in_features=64, hidden=32, out_features=10))
    _ = model(x[:8])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _step in range(300):
        idx = train[torch.randint(0, len(train), (64,))]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), x[held], y[held]


@pytest.mark.slow
def test_conformal_sets_cover_held_out_digits(
    digits_model: tuple[capsa.WrappedModel, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = digits_model
    coverages, sizes = [], []
    for split in range(20):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split))
        cal_idx, test_idx = order[:500], order[500:]
        cal = capsa.calibrate(model, x[cal_idx], y[cal_idx], coverage=0.9, seed=split)
        with torch.no_grad():
            logits = model(x[test_idx])
        sets = cal.prediction_set(logits)
        assert sets.dtype == torch.bool and sets.shape == logits.shape
        coverage = float(sets[torch.arange(len(test_idx)), y[test_idx]].double().mean())
        assert abs(coverage - 0.9) <= 0.08
        coverages.append(coverage)
        sizes.append(float(sets.double().sum(1).mean()))
        probs = cal.probabilities(logits)
        torch.testing.assert_close(probs.sum(1), torch.ones(len(test_idx)))
    assert abs(float(np.mean(coverages)) - 0.9) <= 0.03
    assert float(np.mean(sizes)) < 2.0  # informative sets, not every class
    report = cal.report
    assert report["after"]["nll"] <= report["before"]["nll"] + 1e-9  # temperature is fit by the same likelihood
    assert set(report["before"]) >= {"nll", "ece", "accuracy"} and {"nll", "ece", "coverage"} <= set(report["after"])
    record = json.loads(json.dumps(cal.record()))
    assert record["task"] == "classification" and "LAC" in record["method"]


def test_application_needs_no_torch(untrained: capsa.WrappedModel, tmp_path: Path) -> None:
    """The server's HTTP process has no torch: a stored calibration loads and applies with numpy alone."""
    capsa.calibrate(untrained, *synthetic(300, seed=11)).save(tmp_path)
    code = (
        "import sys, numpy as np\n"
        "from capsa.calibration import Calibration\n"
        f"cal = Calibration.load({str(tmp_path)!r})\n"
        "lo, hi = cal.interval(np.zeros((3, 1), np.float32), np.ones((3, 1), np.float32))\n"
        "p = cal.risk_percentile(np.ones(3, np.float32))\n"
        "assert lo.dtype == np.float32 and (lo < hi).all() and p.shape == (3,)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_sample_wrapper_calibrates_too() -> None:
    model = sample.Wrapper(n_samples=4)(mlp()).eval()
    cal = capsa.calibrate(model, *synthetic(200, seed=12))
    assert cal.task == "regression" and cal.quantile.shape == (1,)
