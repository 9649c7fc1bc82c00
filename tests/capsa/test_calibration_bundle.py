"""Calibration in bundles: stored beside the weights, restored in a fresh process, added by ``capsa calibrate``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import capsa
from capsa import sculpt, vote
from capsa.calibration import Calibration
from capsa.cli import main
from capsa.manifest import CALIBRATION_FILE, MANIFEST_FILE, WEIGHTS_FILE, BundleError, check_bundle
from tests.fixtures.archs import mlp

ARCHS = "tests.fixtures.archs"
#: Subprocesses and servers get PYTHONPATH, so save_bundle's importability warning does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:save_bundle.*importable only:UserWarning")
ROOT = Path(__file__).parents[2]


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :1].sin() + 0.3 * torch.randn(n, 1, generator=g)


@pytest.fixture
def model() -> capsa.WrappedModel:
    torch.manual_seed(0)
    wrapped = vote.Wrapper(n_voters=3)(sculpt.Wrapper()(mlp()))  # composed: risk is a capsa.Risk
    return wrapped.eval()


def save(wrapped: capsa.WrappedModel, path: Path, **kwargs: object) -> Path:
    return capsa.save_bundle(wrapped, path, architecture=f"{ARCHS}:mlp", example_input=torch.zeros(2, 8), **kwargs)


def test_uncalibrated_bundles_are_as_before(model: capsa.WrappedModel, tmp_path: Path) -> None:
    bundle = save(model, tmp_path / "b")
    assert "calibration" not in json.loads((bundle / MANIFEST_FILE).read_text())
    assert sorted(p.name for p in bundle.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]
    assert capsa.load_bundle(bundle).calibration is None


def test_round_trip_in_a_fresh_process(model: capsa.WrappedModel, tmp_path: Path) -> None:
    cal = capsa.calibrate(model, *data(400, seed=1))
    bundle = save(model, tmp_path / "b", calibration=cal)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["calibration"]["coverage"] == 0.9 and manifest["calibration"]["samples"] == 400
    assert manifest["calibration"]["weights_sha256"] == manifest["weights_sha256"]
    assert check_bundle(bundle).calibration is not None
    x = data(16, seed=2)[0]
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import json, sys, numpy as np, torch, capsa\n"
        f"m = capsa.load_bundle({str(bundle)!r})\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        "    p, r = m(x, return_risk=True)\n"
        "out = m.calibration.outputs(p, r)\n"
        "print(json.dumps({'record': m.calibration.record(), **{k: v.tolist() for k, v in out.items()}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    restored = json.loads(done.stdout)
    with torch.no_grad():
        pred, risk = model(x, return_risk=True)
    expected = cal.outputs(pred, risk)
    for name in ("interval_lower", "interval_upper", "risk_percentile"):
        np.testing.assert_allclose(np.array(restored[name]), expected[name].numpy(), rtol=1e-6, atol=1e-7)
    assert {k: v for k, v in restored["record"].items() if k != "weights_sha256"} == cal.record()


def test_tampered_or_foreign_calibration_is_refused(model: capsa.WrappedModel, tmp_path: Path) -> None:
    cal = capsa.calibrate(model, *data(300, seed=3))
    bundle = save(model, tmp_path / "b", calibration=cal)
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    blob = bytearray((damaged / CALIBRATION_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (damaged / CALIBRATION_FILE).write_bytes(bytes(blob))
    for check in (capsa.load_bundle, check_bundle):
        with pytest.raises(BundleError, match=f"checksum mismatch: {CALIBRATION_FILE}"):
            check(damaged)
    (damaged / CALIBRATION_FILE).unlink()
    with pytest.raises(BundleError, match=f"missing {CALIBRATION_FILE}"):
        capsa.load_bundle(damaged)

    # The calibration of other weights: retrain a little, keep the old record.
    other = tmp_path / "other"
    with torch.no_grad():
        for p in model.user_parameters():
            p.add_(0.01)
    save(model, other)
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    manifest["calibration"] = json.loads((bundle / MANIFEST_FILE).read_text())["calibration"]
    (other / MANIFEST_FILE).write_text(json.dumps(manifest))
    shutil.copy(bundle / CALIBRATION_FILE, other / CALIBRATION_FILE)
    with pytest.raises(BundleError, match="the calibration was made for weights with SHA-256"):
        capsa.load_bundle(other)


def test_save_refuses_a_calibration_of_another_model(model: capsa.WrappedModel, tmp_path: Path) -> None:
    cal = capsa.calibrate(model, *data(300, seed=4))
    wide = vote.Wrapper()(mlp(out_features=2)).eval()
    with pytest.raises(ValueError, match=r"the calibration is for regression outputs of shape \[N, 1\], the model "
                                         r"gives regression outputs of shape \[-1, 2\]"):
        capsa.save_bundle(wide, tmp_path / "w", architecture=f"{ARCHS}:mlp", kwargs={"out_features": 2},
                          example_input=torch.zeros(2, 8), calibration=cal)
    with pytest.raises(ValueError, match=r"calibration must be a capsa\.Calibration"):
        save(model, tmp_path / "x", calibration={"coverage": 0.9})


def test_capsa_calibrate_keeps_the_weights(model: capsa.WrappedModel, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bundle = save(model, tmp_path / "b")
    weights = (bundle / WEIGHTS_FILE).read_bytes()
    sha = json.loads((bundle / MANIFEST_FILE).read_text())["weights_sha256"]
    x, y = data(300, seed=5)
    np.savez(tmp_path / "held_out.npz", x=x.double().numpy(), y=y.numpy())  # float64 x: cast to the signature's

    assert main(["calibrate", str(bundle), str(tmp_path / "held_out.npz"), "--coverage", "0.8",
                 "--out", str(tmp_path / "cal")]) == 0
    assert "coverage 0.8, 300 samples" in capsys.readouterr().out
    assert not (bundle / CALIBRATION_FILE).exists()  # --out leaves the original alone
    out = tmp_path / "cal"
    assert (out / WEIGHTS_FILE).read_bytes() == weights
    assert json.loads((out / MANIFEST_FILE).read_text())["weights_sha256"] == sha
    loaded = capsa.load_bundle(out)
    assert isinstance(loaded.calibration, Calibration) and loaded.calibration.coverage == 0.8
    expected = capsa.calibrate(model, x, y, coverage=0.8)
    np.testing.assert_allclose(loaded.calibration.quantile, expected.quantile, rtol=1e-6)

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "calibration:" in shown and "regression, coverage 0.8, 300 samples" in shown and "NLL" in shown

    assert main(["calibrate", str(bundle), str(tmp_path / "held_out.npz")]) == 0  # in place
    assert (bundle / WEIGHTS_FILE).read_bytes() == weights
    assert capsa.load_bundle(bundle).calibration.coverage == 0.9


def test_capsa_calibrate_errors(model: capsa.WrappedModel, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    bundle = save(model, tmp_path / "b")
    x, y = data(100, seed=6)
    np.savez(tmp_path / "no_y.npz", x=x.numpy())
    assert main(["calibrate", str(bundle), str(tmp_path / "no_y.npz")]) == 1
    assert "has no array 'y'" in capsys.readouterr().err
    np.savez(tmp_path / "ok.npz", x=x.numpy(), y=y.numpy())
    assert main(["calibrate", str(bundle), str(tmp_path / "ok.npz"), "--coverage", "1.5"]) == 1
    assert "coverage must be a number strictly between 0 and 1" in capsys.readouterr().err
    assert main(["calibrate", str(bundle), str(tmp_path / "ok.npz"), "--coverage", "0.995"]) == 1
    assert "needs at least 397 calibration samples" in capsys.readouterr().err
    np.savez(tmp_path / "flat.npz", x=x.numpy(), y=y[:, 0].numpy())
    assert main(["calibrate", str(bundle), str(tmp_path / "flat.npz")]) == 1
    assert "y has shape [100] but the model's prediction has shape [100, 1]" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["calibrate", str(bundle), str(tmp_path / "junk.npz")]) == 1
    assert "cannot read " + str(tmp_path / "junk.npz") + " as an .npz file" in capsys.readouterr().err
    assert sorted(p.name for p in bundle.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]  # nothing written


def test_publish_carries_the_calibration(model: capsa.WrappedModel, tmp_path: Path) -> None:
    from service.registry import publish

    bundle = save(model, tmp_path / "b", calibration=capsa.calibrate(model, *data(200, seed=7)))
    publish(bundle, tmp_path / "registry", "m")
    published = tmp_path / "registry" / "m" / "1"
    assert (published / CALIBRATION_FILE).read_bytes() == (bundle / CALIBRATION_FILE).read_bytes()
    assert capsa.load_bundle(published).calibration is not None
