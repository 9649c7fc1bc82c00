"""Calibrated outputs and risk drift, in the server's HTTP process (numpy only, no torch).

A calibrated bundle (`capsa.calibrate`, ``capsa calibrate``) adds, next to ``prediction``/``risk``/``risk_score``:
``risk_percentile`` (FP32 ``[N]``: the share of calibration data that was less risky) and, for regression,
``interval_lower``/``interval_upper`` (shaped like ``prediction``, at the calibrated coverage) or, for
classification, ``probabilities`` (FP32, temperature-scaled) and ``prediction_set`` (BOOL, the conformal set).
The worker already returns the prediction, the total risk and the score, so these are a few numpy operations here.

Drift: for a calibrated model, risk percentiles of normal traffic are uniform, so about 10% of samples lie above
the 0.9 percentile. `DriftMonitor` keeps the last ``CAPSA_DRIFT_WINDOW`` percentiles and exports, as
``capsa_risk_drift``, the binomial z-score of the share above 0.9 against the expected 10%:
``(k - 0.1 n) / sqrt(0.09 n)`` for ``k`` of the ``n`` samples in the window. It is about N(0, 1) on normal traffic
(|z| > 4 by chance about once in 16,000 independent windows) and grows with both the size of the shift and the
evidence (``n``): a statistic, not a p-value.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from capsa.calibration import Calibration, CalibrationError
from capsa.manifest import CALIBRATION_FILE, BundleError, _BundleDir
from service.protocol import ProtocolError

__all__ = [
    "CALIBRATED_OUTPUTS",
    "DRIFT_LEVEL",
    "PERCENTILE_BUCKETS",
    "DriftMonitor",
    "ServedCalibration",
    "apply_calibration",
    "check_calibrated_output",
    "flag_by_percentile",
    "percentile_threshold",
]

#: Drift compares the share of samples above this percentile with what normal data gives (1 - DRIFT_LEVEL).
DRIFT_LEVEL = 0.9
#: Every output a calibrated bundle may add (which ones depends on its task).
CALIBRATED_OUTPUTS = ("risk_percentile", "interval_lower", "interval_upper", "probabilities", "prediction_set")
#: Buckets of the ``capsa_risk_percentile`` histogram: uniform in deciles, finer in the tail operators flag.
PERCENTILE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


class ServedCalibration:
    """A version's calibration as the HTTP process applies it: the extra output names, their metadata, values."""

    def __init__(self, calibration: Calibration) -> None:
        self.calibration = calibration
        self.task = calibration.task
        extra = ("interval_lower", "interval_upper") if self.task == "regression" else (
            "probabilities", "prediction_set")
        self.outputs: tuple[str, ...] = ("risk_percentile", *extra)
        self._histogram: Any = None
        self._gauge: Any = None
        self.drift: DriftMonitor | None = None

    def bind_metrics(self, histogram: Any, gauge: Any, window: int) -> None:
        """Export served percentiles to ``histogram`` and the drift statistic (over ``window`` samples) to
        ``gauge`` (the version's children of ``capsa_risk_percentile`` and ``capsa_risk_drift``)."""
        self._histogram, self._gauge = histogram, gauge
        self.drift = DriftMonitor(window)
        gauge.set(0.0)

    def observe(self, percentile: np.ndarray) -> None:
        """Record a request's served percentiles (histogram and drift window)."""
        if self._histogram is not None:
            for value in percentile[np.isfinite(percentile)].tolist():
                self._histogram.observe(value)
        if self.drift is not None:
            self._gauge.set(self.drift.add(percentile))

    @classmethod
    def load(cls, path: Path, meta: dict[str, Any]) -> ServedCalibration | None:
        """The calibration of the bundle at ``path`` (``meta`` is its parsed capsa.json), or None when uncalibrated.

        Raises `CalibrationError` naming the file when the calibration is damaged or belongs to other weights.
        """
        record = meta.get("calibration")
        if record is None:
            return None
        try:  # a regular file inside the bundle only: a symlink is refused, not followed (no digest oracle)
            with _BundleDir(path) as bundle:
                data = bundle.read(CALIBRATION_FILE)
        except BundleError as exc:
            raise CalibrationError(str(exc)) from None
        calibration = Calibration.from_parts(record, data, source=str(path))
        if calibration.weights_sha256 != meta.get("weights_sha256"):
            raise CalibrationError(
                f"{path}: the calibration was made for weights with SHA-256 {calibration.weights_sha256}, not these"
            )
        return cls(calibration)

    def metadata(self, prediction: dict[str, Any]) -> list[dict[str, Any]]:
        """V2 metadata of the extra outputs, given the ``prediction`` output's ``{name, datatype, shape}``."""
        shape = list(prediction["shape"])
        specs = {
            "risk_percentile": ("FP32", shape[:1]),
            "interval_lower": (prediction["datatype"], shape),
            "interval_upper": (prediction["datatype"], shape),
            "probabilities": ("FP32", shape),
            "prediction_set": ("BOOL", shape),
        }
        return [{"name": n, "datatype": specs[n][0], "shape": specs[n][1]} for n in self.outputs]

    def parameters(self) -> dict[str, Any]:
        """What the model metadata states about the calibration."""
        cal = self.calibration
        return {"calibration": {"task": cal.task, "coverage": cal.coverage, "samples": cal.samples,
                                "method": cal.method}}

    def percentile(self, score: np.ndarray) -> np.ndarray:
        """``risk_percentile`` (FP32 ``[N]``) of the served risk scores."""
        return np.asarray(self.calibration.risk_percentile(np.asarray(score, dtype=np.float64)), dtype=np.float32)

    def compute(self, names: set[str] | frozenset[str], prediction: np.ndarray, risk: np.ndarray,
                percentile: np.ndarray) -> dict[str, np.ndarray]:
        """The requested extra outputs (``risk_percentile`` passed in, it is computed once per request)."""
        out: dict[str, np.ndarray] = {}
        if "risk_percentile" in names:
            out["risk_percentile"] = percentile
        cal = self.calibration
        if names & {"interval_lower", "interval_upper"}:
            lower, upper = cal.interval(prediction, risk)
            dtype = prediction.dtype if prediction.dtype.kind == "f" else np.float32
            out["interval_lower"], out["interval_upper"] = lower.astype(dtype), upper.astype(dtype)
        if "probabilities" in names:
            out["probabilities"] = cal.probabilities(prediction).astype(np.float32)
        if "prediction_set" in names:
            out["prediction_set"] = cal.prediction_set(prediction)
        return out


def flag_by_percentile(value: Any) -> float:
    """A ``risk_percentile_threshold`` as a float in (0, 1), else `ValueError` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"risk_percentile_threshold must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _not_calibrated(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"{where} is not calibrated: {what} needs a calibrated bundle (capsa calibrate, or "
                         "capsa.save_bundle(..., calibration=capsa.calibrate(...)))")


def percentile_threshold(calibration: ServedCalibration | None, configured: float | None,
                         parameters: dict[str, Any] | None, where: str) -> float | None:
    """The percentile above which samples are flagged: the request's ``risk_percentile_threshold``, else the
    model's configured one unless the request sets an absolute ``risk_threshold`` (which then applies alone)."""
    parameters = parameters or {}
    if "risk_percentile_threshold" in parameters:
        if "risk_threshold" in parameters:
            raise ProtocolError("parameters: give risk_threshold or risk_percentile_threshold, not both")
        try:
            value = flag_by_percentile(parameters["risk_percentile_threshold"])
        except ValueError as exc:
            raise ProtocolError(f"parameters.{exc}") from None
        if calibration is None:
            raise _not_calibrated(where, "parameters.risk_percentile_threshold")
        return value
    if "risk_threshold" in parameters:
        return None
    return configured


def apply_calibration(mv: Any, pred: np.ndarray, risk: np.ndarray, score: np.ndarray, pthreshold: float | None,
                      names: frozenset[str]) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """For a calibrated version ``mv``: record the request's percentiles (histogram, drift) and return
    ``(flagged by percentile or None, the requested calibrated outputs)``; ``(None, {})`` when uncalibrated."""
    calibration: ServedCalibration | None = mv.calibration
    if calibration is None:
        return None, {}
    percentile = calibration.percentile(score)
    calibration.observe(percentile)
    flagged = mv.metrics.flag(percentile, pthreshold)
    return flagged, calibration.compute(names, pred, risk, percentile)


def check_calibrated_output(calibration: ServedCalibration | None, name: str, where: str) -> None:
    """Refuse (400) a calibrated output asked of an uncalibrated version, saying how to calibrate it."""
    if calibration is None and name in CALIBRATED_OUTPUTS:
        raise _not_calibrated(where, f"output '{name}'")


class DriftMonitor:
    """The last ``window`` risk percentiles of one model version, reduced to a drift z-score (see module doc)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"drift window must be at least 1 sample, got {window}")
        self.window = window
        self._above = np.zeros(window, dtype=bool)
        self._next = 0
        self._filled = 0
        self._count = 0  # samples above DRIFT_LEVEL in the window
        self._lock = threading.Lock()

    def add(self, percentiles: np.ndarray) -> float:
        """Record a batch's percentiles (NaN ones skipped); returns the statistic over the window."""
        values = np.asarray(percentiles, dtype=np.float64)
        above = values[np.isfinite(values)] > DRIFT_LEVEL
        with self._lock:
            if above.size >= self.window:
                above = above[-self.window :]
                self._above[:] = above
                self._next, self._filled, self._count = 0, self.window, int(above.sum())
            else:
                n = above.size
                idx = (self._next + np.arange(n)) % self.window
                self._count -= int(self._above[idx].sum())  # slots never written hold False
                self._above[idx] = above
                self._count += int(above.sum())
                self._next = (self._next + n) % self.window
                self._filled = min(self.window, self._filled + n)
            return self._statistic()

    def statistic(self) -> float:
        """``(k - 0.1 n) / sqrt(0.09 n)`` over the window (0 while it is empty)."""
        with self._lock:
            return self._statistic()

    def _statistic(self) -> float:
        n = self._filled
        if n == 0:
            return 0.0
        p = 1.0 - DRIFT_LEVEL
        return (self._count - p * n) / math.sqrt(p * (1 - p) * n)
