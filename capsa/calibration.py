"""Calibration: turn a model's raw risk into numbers with a stated meaning, fitted on held-out data.

``cal = capsa.calibrate(wrapped, x_cal, y_cal, coverage=0.9)`` runs the wrapped model on calibration data it was
not trained on and fits:

- regression: a predictive standard deviation ``std = sqrt(a * risk**2 + b)`` per output element, by Gaussian
  likelihood (``b`` adds the data noise that epistemic risks - vote, sample - cannot see; ``a`` corrects a scale),
  then the split-conformal quantile ``q`` of ``|y - prediction| / std``, so that ``prediction +- q * std`` covers
  at least ``coverage`` of new samples;
- classification: a temperature ``T`` for the logits (by likelihood), then conformal prediction sets with the LAC
  score (``1 - p(true class)``): a class is in the set when its calibrated probability is at least ``1 - qhat``;
- for every model: 1,001 quantiles of ``risk_score`` on the calibration data, so that a new sample's
  ``risk_percentile`` (0 to 1) is the share of calibration (normal) data that was less risky.

The calibration samples are split at random (fixed seed) into two halves: the scale (``a``, ``b``) or temperature
is fitted on one, the conformal quantile taken on the other, so that the conformal score is fixed before the
samples that calibrate it are seen. The finite-sample guarantee (coverage at least ``coverage`` on average over
calibration sets) then holds for new samples exchangeable with the calibration data; it says nothing about
inputs unlike them (that is what ``risk_percentile`` is for).

A `Calibration` is numbers only (JSON plus arrays, stored with safetensors, never pickle) and applies with numpy,
so processes without torch (the server's HTTP process) use it too; torch tensors in give torch tensors out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from capsa.manifest import CALIBRATION_FILE

if TYPE_CHECKING:
    import torch

    from capsa._wrapper import WrappedModel

__all__ = [
    "CALIBRATION_FILE",
    "CALIBRATION_FORMAT",
    "Calibration",
    "CalibrationError",
    "calibrate",
    "min_samples",
]

#: Version of the calibration record's layout.
CALIBRATION_FORMAT = 1
#: The calibration record, in a calibration directory (a bundle keeps it in ``capsa.json``).
CALIBRATION_JSON_FILE = "calibration.json"
#: Quantile levels of the stored risk-score distribution: 0, 0.001, ..., 1.
RISK_LEVELS = 1001
_ECE_BINS = 15

Task = Literal["regression", "classification"]
_T = TypeVar("_T")


class CalibrationError(ValueError):
    """Calibration data or a calibration record that cannot be used; the message names what is wrong."""


def min_samples(coverage: float) -> int:
    """The fewest calibration samples `calibrate` accepts for ``coverage``.

    The conformal half must hold at least ``coverage / (1 - coverage)`` samples (so that the
    ``ceil((m + 1) * coverage)``-th smallest score exists), and it is half of the data.
    """
    _check_coverage(coverage)
    m = max(math.ceil(coverage / (1.0 - coverage) - 1e-9), 1)
    return max(2 * m - 1, 2)


def _check_coverage(coverage: float) -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0.0 < coverage < 1.0:
        raise CalibrationError(f"coverage must be a number strictly between 0 and 1, got {coverage!r}")
    return float(coverage)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------- the result
@dataclass(frozen=True, eq=False)
class Calibration:
    """A fitted calibration: what `calibrate` returns, `capsa.save_bundle(..., calibration=cal)` stores and a
    calibrated bundle's ``load_bundle(...).calibration`` holds.

    Arrays are numpy float64. Regression: ``scale_a``, ``scale_b`` and ``quantile`` are shaped like one sample of
    the prediction. Classification: ``temperature`` and ``set_threshold`` (a class is in the prediction set when
    its calibrated probability is ``>= set_threshold``).
    """

    task: Task
    coverage: float
    samples: int
    risk_quantiles: np.ndarray
    output_shape: tuple[int, ...]
    report: dict[str, Any] = field(default_factory=dict)
    scale_a: np.ndarray | None = None
    scale_b: np.ndarray | None = None
    quantile: np.ndarray | None = None
    temperature: float | None = None
    set_threshold: float | None = None
    class_dim: int = -1
    #: SHA-256 of the weights this calibration belongs to (set when stored in a bundle).
    weights_sha256: str | None = None

    @property
    def method(self) -> str:
        """How the calibration was made, in words (also in the record)."""
        if self.task == "regression":
            return "gaussian scale sqrt(a*risk^2+b) by likelihood + split-conformal |y-pred|/std"
        return "temperature scaling by likelihood + split-conformal sets (LAC score 1-p_true)"

    # ------------------------------------------------------------------ applying
    def predictive_std(self, risk: Any) -> Any:
        """Regression: the calibrated predictive standard deviation ``sqrt(a * risk**2 + b)``, shaped like risk."""
        self._need("regression", "predictive_std")
        r, back = _as_numpy(_total(risk))
        self._check_sample_shape("risk", r)
        a, b = self._fitted(self.scale_a, "scale_a"), self._fitted(self.scale_b, "scale_b")
        return back(np.sqrt(a * r.astype(np.float64) ** 2 + b))

    def interval(self, prediction: Any, risk: Any) -> tuple[Any, Any]:
        """Regression: ``(lower, upper) = prediction -+ q * std``, the interval at the calibrated coverage."""
        self._need("regression", "interval")
        p, back = _as_numpy(prediction)
        r, _ = _as_numpy(_total(risk))
        self._check_sample_shape("prediction", p)
        self._check_sample_shape("risk", r)
        a, b = self._fitted(self.scale_a, "scale_a"), self._fitted(self.scale_b, "scale_b")
        half = self._fitted(self.quantile, "quantile") * np.sqrt(a * r.astype(np.float64) ** 2 + b)
        p64 = p.astype(np.float64)
        return back(p64 - half), back(p64 + half)

    def probabilities(self, prediction: Any) -> Any:
        """Classification: the calibrated class probabilities ``softmax(prediction / T)`` along the class dim."""
        self._need("classification", "probabilities")
        p, back = _as_numpy(prediction)
        self._check_sample_shape("prediction", p)
        return back(self._probs(p))

    def prediction_set(self, prediction: Any) -> Any:
        """Classification: a boolean mask shaped like the prediction, True for the classes in the conformal set."""
        self._need("classification", "prediction_set")
        p, back = _as_numpy(prediction)
        self._check_sample_shape("prediction", p)
        return back(self._probs(p) >= self.set_threshold, dtype="bool")

    def risk_percentile(self, risk: Any) -> Any:
        """The share of calibration samples whose ``risk_score`` was below this sample's, in ``[0, 1]``, ``[N]``.

        ``risk`` is the model's risk, scored by ``capsa.risk_score`` (a `capsa.Risk`, best from
        ``model.predict(x)``; or a tensor, read as this calibration's task says) or, when 1-d, the ``risk_score``
        itself.
        """
        if (getattr(risk, "dim", None) is not None and risk.dim() > 1) or hasattr(risk, "components"):
            from capsa._risk import risk_score

            risk = risk_score(risk, task=self.task)
        r, back = _as_numpy(risk)
        if r.ndim == 0:
            raise CalibrationError("risk_percentile: expected a batch of risks or risk scores, got a scalar")
        if r.ndim > 1:  # an array of risks: without torch here, the mean (regression's score)
            if self.task == "classification":
                raise CalibrationError("risk_percentile: pass a classifier's capsa.Risk or its risk_score, "
                                       "not an array of risks")
            r = r.reshape(r.shape[0], -1).mean(axis=1)
        return back(_percentile(self.risk_quantiles, r.astype(np.float64)))

    def outputs(self, prediction: Any, risk: Any) -> dict[str, Any]:
        """Every calibrated output for a batch, by the names the server uses: ``risk_percentile`` and
        ``interval_lower``/``interval_upper`` (regression) or ``probabilities``/``prediction_set``."""
        out = {"risk_percentile": self.risk_percentile(risk)}
        if self.task == "regression":
            out["interval_lower"], out["interval_upper"] = self.interval(prediction, risk)
        else:
            out["probabilities"] = self.probabilities(prediction)
            out["prediction_set"] = self.prediction_set(prediction)
        return out

    def _probs(self, p: np.ndarray) -> np.ndarray:
        z = p.astype(np.float64) / self._fitted(self.temperature, "temperature")
        z = z - z.max(axis=self.class_dim, keepdims=True)
        e = np.exp(z)
        probs: np.ndarray = e / e.sum(axis=self.class_dim, keepdims=True)
        return probs

    def _fitted(self, value: _T | None, name: str) -> _T:
        """A fitted parameter of this calibration's task (None only in a record missing it)."""
        if value is None:
            raise CalibrationError(f"this {self.task} calibration has no {name}")
        return value

    def _need(self, task: str, what: str) -> None:
        if self.task != task:
            raise CalibrationError(f"{what} applies to {task} calibrations; this one is for {self.task}")

    def _check_sample_shape(self, what: str, array: np.ndarray) -> None:
        if array.ndim == 0 or tuple(array.shape[1:]) != self.output_shape:
            raise CalibrationError(
                f"{what} has shape {list(array.shape)}; this calibration is for outputs of shape "
                f"[N, {', '.join(map(str, self.output_shape))}]"
            )

    # ------------------------------------------------------------------ storing
    def record(self) -> dict[str, Any]:
        """The JSON part: everything but the arrays (which `tensors` returns)."""
        rec: dict[str, Any] = {
            "format": CALIBRATION_FORMAT,
            "task": self.task,
            "method": self.method,
            "coverage": self.coverage,
            "samples": self.samples,
            "output_shape": list(self.output_shape),
            "report": self.report,
        }
        if self.task == "classification":
            rec.update(temperature=self.temperature, set_threshold=self.set_threshold, class_dim=self.class_dim)
        if self.weights_sha256 is not None:
            rec["weights_sha256"] = self.weights_sha256
        return rec

    def tensors(self) -> dict[str, np.ndarray]:
        """The array part, by name (float64, contiguous)."""
        out = {"risk_quantiles": self.risk_quantiles}
        if self.task == "regression":
            out.update(scale_a=self._fitted(self.scale_a, "scale_a"), scale_b=self._fitted(self.scale_b, "scale_b"),
                       quantile=self._fitted(self.quantile, "quantile"))
        return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}

    def to_parts(self, *, weights_sha256: str | None = None) -> tuple[dict[str, Any], bytes]:
        """``(record, safetensors bytes)``; the record names the SHA-256 of those bytes (and of the weights)."""
        from safetensors.numpy import save

        data = save(self.tensors(), metadata={"format": "np"})
        rec = self.record()
        if weights_sha256 is not None:
            rec["weights_sha256"] = weights_sha256
        rec["tensors_sha256"] = hashlib.sha256(data).hexdigest()
        json.dumps(rec, allow_nan=False)  # fail here, not in a half-written bundle
        return rec, data

    @classmethod
    def from_parts(cls, record: Mapping[str, Any], data: bytes, *, source: str = "calibration") -> Calibration:
        """Rebuild from `to_parts` output, checking the checksum, every field and every array's shape."""
        from safetensors.numpy import load

        def bad(msg: str) -> CalibrationError:
            return CalibrationError(f"{source}: {msg}")

        if not isinstance(record, Mapping):
            raise bad(f"the calibration record must be a JSON object, got {type(record).__name__}")
        if record.get("format") != CALIBRATION_FORMAT:
            raise bad(f"calibration format {record.get('format')!r}; this capsa reads format {CALIBRATION_FORMAT}")
        digest = hashlib.sha256(data).hexdigest()
        if record.get("tensors_sha256") != digest:
            raise bad(
                f"checksum mismatch: {CALIBRATION_FILE} has SHA-256 {digest}, the record says "
                f"{record.get('tensors_sha256')!r}"
            )
        try:
            arrays = load(data)
        except Exception as exc:
            raise bad(f"{CALIBRATION_FILE} is not a valid safetensors file: {exc}") from None
        task = record.get("task")
        if task not in ("regression", "classification"):
            raise bad(f"task must be 'regression' or 'classification', got {task!r}")
        shape = record.get("output_shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"output_shape must be a list of sizes, got {shape!r}")
        coverage = record.get("coverage")
        samples = record.get("samples")
        if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage < 1:
            raise bad(f"coverage must be a number in (0, 1), got {coverage!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise bad(f"samples must be a positive integer, got {samples!r}")
        expected = {"risk_quantiles": (RISK_LEVELS,)}
        if task == "regression":
            expected.update(scale_a=tuple(shape), scale_b=tuple(shape), quantile=tuple(shape))
        got = {k: tuple(v.shape) for k, v in arrays.items()}
        if got != expected:
            raise bad(f"{CALIBRATION_FILE} holds {got}, expected {expected}")
        if any(not np.isfinite(v).all() for v in arrays.values()):
            raise bad(f"{CALIBRATION_FILE} holds non-finite values")
        kwargs: dict[str, Any] = {}
        if task == "classification":
            t, s, d = record.get("temperature"), record.get("set_threshold"), record.get("class_dim")
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
                raise bad(f"temperature must be a positive number, got {t!r}")
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s <= 1:
                raise bad(f"set_threshold must be a number in [0, 1], got {s!r}")
            if not isinstance(d, int) or isinstance(d, bool):
                raise bad(f"class_dim must be an integer, got {d!r}")
            kwargs.update(temperature=float(t), set_threshold=float(s), class_dim=d)
        else:
            kwargs.update(scale_a=arrays["scale_a"], scale_b=arrays["scale_b"], quantile=arrays["quantile"])
        report = record.get("report", {})
        return cls(
            task=task,
            coverage=float(coverage),
            samples=samples,
            risk_quantiles=arrays["risk_quantiles"],
            output_shape=tuple(shape),
            report=dict(report) if isinstance(report, Mapping) else {},
            weights_sha256=record.get("weights_sha256"),
            **kwargs,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``calibration.json`` and ``calibration.safetensors`` into directory ``path`` (created)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        rec, data = self.to_parts()
        (out / CALIBRATION_FILE).write_bytes(data)
        (out / CALIBRATION_JSON_FILE).write_text(json.dumps(rec, indent=2, allow_nan=False) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a directory written by `save`."""
        src = Path(path)
        try:
            rec = json.loads((src / CALIBRATION_JSON_FILE).read_text())
            data = (src / CALIBRATION_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{src}: cannot read the calibration: {exc}") from None
        return cls.from_parts(rec, data, source=str(src))


def _percentile(quantiles: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Where each score falls in the stored distribution, linearly within a quantile bin, clipped to [0, 1].

    Ties among the quantiles count as below (the right edge), so a score equal to most calibration scores is
    ranked above them, never below.
    """
    k = quantiles.shape[0]
    hi = np.searchsorted(quantiles, scores, side="right")  # quantiles <= score
    inside = (hi > 0) & (hi < k)
    lo_idx = np.clip(hi - 1, 0, k - 1)
    hi_idx = np.clip(hi, 0, k - 1)
    left, right = quantiles[lo_idx], quantiles[hi_idx]
    width = right - left
    frac = np.where(inside & (width > 0), (scores - left) / np.where(width > 0, width, 1.0), 0.0)
    level = np.where(hi >= k, k - 1.0, np.where(hi == 0, 0.0, lo_idx + frac))
    level = np.where(np.isnan(scores), np.nan, level)
    clipped: np.ndarray = np.clip(level / (k - 1), 0.0, 1.0)
    return clipped


def _total(risk: Any) -> Any:
    """The spread of a `capsa.Risk` (its ``total``) or the tensor/array itself."""
    return risk.total if hasattr(risk, "total") and hasattr(risk, "components") else risk


def _as_numpy(value: Any) -> tuple[np.ndarray, Any]:
    """``(array, back)``: a numpy view of a torch tensor or array-like, and a function that turns a float64/bool
    numpy result back into the caller's kind (a torch tensor on the same device, float32 if the input was;
    otherwise numpy, float32 if the input was)."""
    if hasattr(value, "detach") and hasattr(value, "device"):  # a torch tensor (torch is imported then)
        import torch

        device, dtype = value.device, value.dtype
        array = value.detach().to("cpu", torch.float64 if value.is_floating_point() else value.dtype).numpy()
        out_dtype = dtype if dtype.is_floating_point else torch.float32

        def back_torch(result: np.ndarray, dtype: str | None = None) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(result))
            return t.to(device, torch.bool if dtype == "bool" else out_dtype)

        return array, back_torch
    array = np.asarray(value)
    out = array.dtype if array.dtype in (np.float32, np.float16) else np.float64

    def back_numpy(result: np.ndarray, dtype: str | None = None) -> np.ndarray:
        return result.astype(bool if dtype == "bool" else (np.float32 if out == np.float16 else out), copy=False)

    return array, back_numpy


# ---------------------------------------------------------------------------------------------- fitting
def _task_of(model: Any) -> tuple[Task, int]:
    """Classification when any wrapper of the stack says so (with its class dim), else regression."""
    stack = model.stack() if hasattr(model, "stack") else [model]
    for wrapped in stack:
        wrapper = getattr(wrapped, "wrapper", None)
        if getattr(wrapper, "task", "regression") == "classification":
            return "classification", int(getattr(wrapper, "class_dim", -1))
    return "regression", -1


def _batches(
    x: Any, y: Any, batch_size: int
) -> tuple[Iterable[tuple[Any, Any]], int | None]:
    """(batches of (x, y), sample count if known in advance)."""
    import torch

    if y is None:
        if isinstance(x, torch.Tensor | np.ndarray):
            raise CalibrationError("calibrate: y is missing (pass targets, or a DataLoader of (x, y) batches as x)")
        return x, None
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    if xt.dim() == 0 or yt.dim() == 0:
        raise CalibrationError("calibrate: x and y need a batch dimension first (got a scalar)")
    if xt.shape[0] != yt.shape[0]:
        raise CalibrationError(f"calibrate: x has {xt.shape[0]} samples but y has {yt.shape[0]}")
    return ((xt[i : i + batch_size], yt[i : i + batch_size]) for i in range(0, xt.shape[0], batch_size)), xt.shape[0]


def _collect(model: Any, batches: Iterable[Any], task: Task, class_dim: int) -> dict[str, Any]:
    """Run the model over the data (eval mode, no grad): predictions, total risks, risk scores, targets."""
    import torch

    from capsa._risk import risk_score

    # user_parameters(): parameters() before the first call would tell capsa they went to an optimizer
    first = next(iter(model.user_parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    preds, totals, scores, targets = [], [], [], []
    seen = 0
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise CalibrationError(f"calibrate: batch {i} of the data is not an (x, y) pair")
                xb, yb = torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
                if xb.dim() == 0 or yb.dim() == 0 or xb.shape[0] != yb.shape[0]:
                    raise CalibrationError(
                        f"calibrate: batch {i}: x has shape {list(xb.shape)} and y {list(yb.shape)}; both need "
                        "the same batch size first"
                    )
                pred, risk = model.predict(xb.to(device))  # a capsa.Risk: what the server scores too
                total = risk.total
                _check_targets(pred, yb, task, class_dim, seen)
                preds.append(pred.detach().to("cpu", torch.float64))
                totals.append(total.detach().to("cpu", torch.float64))
                scores.append(risk_score(risk).detach().to("cpu", torch.float64))
                targets.append(yb.to("cpu", torch.float64 if task == "regression" else torch.long))
                seen += xb.shape[0]
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not preds:
        raise CalibrationError("calibrate: the data holds no samples")
    out = {k: torch.cat(v) for k, v in (("pred", preds), ("risk", totals), ("score", scores), ("y", targets))}
    for what in ("pred", "risk", "score"):
        if not torch.isfinite(out[what]).all():
            raise CalibrationError(f"calibrate: the model's {what} has non-finite values on the calibration data")
    return out


def _check_targets(pred: Any, y: Any, task: Task, class_dim: int, offset: int) -> None:
    import torch

    if task == "regression":
        if tuple(y.shape) != tuple(pred.shape):
            hint = ""
            if y.numel() == pred.numel():
                hint = f" (reshape y to {list(pred.shape)})"
            raise CalibrationError(
                f"calibrate: y has shape {list(y.shape)} but the model's prediction has shape "
                f"{list(pred.shape)}; targets must match the prediction{hint}"
            )
        if not y.is_floating_point() and y.dtype != torch.bool:
            y = y.double()
        bad = ~torch.isfinite(y.double())
        if bad.any():
            first = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0]) + offset
            raise CalibrationError(
                f"calibrate: y has {int(bad.sum())} NaN or infinite targets (first in sample {first}); "
                "drop those samples"
            )
        return
    dim = class_dim % pred.dim()
    expected = tuple(s for i, s in enumerate(pred.shape) if i != dim)
    if tuple(y.shape) != expected:
        raise CalibrationError(
            f"calibrate: y has shape {list(y.shape)} but a classifier with logits of shape {list(pred.shape)} "
            f"(classes on dim {class_dim}) needs class indices of shape {list(expected)}"
        )
    if y.is_floating_point():
        if not torch.isfinite(y).all():
            raise CalibrationError("calibrate: y has NaN or infinite class labels")
        if (y != y.round()).any():
            raise CalibrationError("calibrate: y holds non-integer class labels")
    n_classes = pred.shape[dim]
    if ((y < 0) | (y >= n_classes)).any():
        raise CalibrationError(f"calibrate: y holds class labels outside 0..{n_classes - 1}")


def _gaussian_nll(err2: Any, var: Any) -> Any:
    import torch

    return 0.5 * (torch.log(2 * math.pi * var) + err2 / var)


def _fit_scale(err2: Any, r2: Any) -> tuple[Any, Any]:
    """Per element: ``(a, b) >= 0`` maximising the Gaussian likelihood of the errors under ``var = a r^2 + b``."""
    import torch

    mean_e2 = err2.mean(dim=0).clamp_min(1e-300)
    mean_r2 = r2.mean(dim=0)
    floor = mean_e2 * 1e-12
    log_b = torch.log(0.5 * mean_e2)
    log_a = torch.where(mean_r2 > 0, torch.log(0.5 * mean_e2 / mean_r2.clamp_min(1e-300)), torch.full_like(log_b, -60))
    params = torch.stack([log_a, log_b]).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([params], lr=1, max_iter=300, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Any:
        optimizer.zero_grad()
        a, b = params.clamp(-60, 60).exp()
        var = a * r2 + b + floor
        loss = _gaussian_nll(err2, var).mean(dim=0).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # type: ignore[no-untyped-call]  # LBFGS.step is unannotated in torch
    a, b = params.detach().clamp(-60, 60).exp()
    return a, b + floor


def _fit_temperature(logits: Any, y: Any) -> float:
    """The temperature minimising the cross-entropy of ``logits / T`` (logits with classes last)."""
    import torch
    import torch.nn.functional as F

    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Any:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(-10, 10).exp(), y)
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # type: ignore[no-untyped-call]  # LBFGS.step is unannotated in torch
    return float(log_t.detach().clamp(-10, 10).exp())


def _ece(probs: Any, y: Any) -> float:
    """Expected calibration error of the top-label confidence, 15 equal-width bins."""
    import torch

    conf, guess = probs.max(dim=-1)
    right = (guess == y).double()
    bins = torch.clamp((conf * _ECE_BINS).long(), max=_ECE_BINS - 1)
    total = 0.0
    for b in range(_ECE_BINS):
        mask = bins == b
        if mask.any():
            total += float(mask.double().mean() * (conf[mask].mean() - right[mask].mean()).abs())
    return total


def _conformal_rank(m: int, coverage: float) -> int:
    """The 1-based rank of the conformal quantile among ``m`` scores: ``ceil((m + 1) * coverage)``."""
    return math.ceil((m + 1) * coverage - 1e-9)


def calibrate(
    model: WrappedModel,
    x: torch.Tensor | np.ndarray | Iterable[tuple[Any, Any]],
    y: torch.Tensor | np.ndarray | None = None,
    *,
    coverage: float = 0.9,
    batch_size: int = 1024,
    seed: int = 0,
) -> Calibration:
    """Calibrate a wrapped model on held-out data it was not trained on; see the module docstring for what is fit.

    ``x`` and ``y`` are tensors or arrays with the batch first (``y`` shaped like the prediction for regression,
    class indices for classification), or ``x`` is an iterable of ``(x, y)`` batches such as a
    ``torch.utils.data.DataLoader`` and ``y`` is omitted. ``coverage`` (in (0, 1)) is the intervals' / sets'
    target coverage. Raises `CalibrationError` (a ValueError) for a coverage outside (0, 1), fewer samples than
    `min_samples` (coverage) needs, NaN targets, or targets whose shape does not fit the model's output.
    """
    import torch

    coverage = _check_coverage(coverage)
    if not hasattr(model, "wrapper") or not hasattr(model, "stack"):
        raise CalibrationError(
            f"calibrate: expected a capsa-wrapped model (e.g. capsa.vote.Wrapper()(model)), got {type(model).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationError(f"calibrate: batch_size must be a positive integer, got {batch_size!r}")
    needed = min_samples(coverage)
    batches, known = _batches(x, y, batch_size)
    if known is not None and known < needed:
        raise CalibrationError(_too_few(known, needed, coverage))
    task, class_dim = _task_of(model)
    data = _collect(model, batches, task, class_dim)
    n = data["pred"].shape[0]
    if n < needed:
        raise CalibrationError(_too_few(n, needed, coverage))

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, conf = perm[: n // 2], perm[n // 2 :]
    quantiles = torch.quantile(data["score"], torch.linspace(0, 1, RISK_LEVELS, dtype=torch.float64))
    quantiles = torch.cummax(quantiles, dim=0).values  # exactly non-decreasing
    k = _conformal_rank(conf.numel(), coverage)
    common = {
        "coverage": coverage,
        "samples": n,
        "risk_quantiles": quantiles.numpy(),
        "output_shape": tuple(data["pred"].shape[1:]),
    }
    report: dict[str, Any] = {
        "samples": n,
        "fit_samples": int(fit.numel()),
        "conformal_samples": int(conf.numel()),
        "conformal_rank": k,
        "note": "before/after measured on the conformal half (not used to fit the scale or temperature)",
    }

    if task == "regression":
        pred, risk, target = data["pred"], data["risk"], data["y"]
        err2, r2 = (target - pred) ** 2, risk**2
        a, b = _fit_scale(err2[fit], r2[fit])
        std = torch.sqrt(a * r2[conf] + b)
        score = (target[conf] - pred[conf]).abs() / std
        q = torch.sort(score, dim=0).values[k - 1]
        z = statistics.NormalDist().inv_cdf(0.5 + coverage / 2)
        raw = risk[conf].clamp_min(1e-12)
        err = (target[conf] - pred[conf]).abs()
        report["before"] = {
            "coverage": float((err <= z * risk[conf]).double().mean()),
            "nll": _finite_or_none(float(_gaussian_nll(err2[conf], raw**2).mean())),
            "interval": f"prediction +- {z:.4g} * risk (risk taken as a standard deviation)",
        }
        report["after"] = {
            "coverage": float((score <= q).double().mean()),
            "nll": _finite_or_none(float(_gaussian_nll(err2[conf], std**2).mean())),
            "mean_interval_width": float((2 * q * std).mean()),
        }
        report["scale_a_mean"], report["scale_b_mean"] = float(a.mean()), float(b.mean())
        report["quantile_mean"] = float(q.mean())
        return Calibration(
            task="regression",
            report=report,
            scale_a=a.numpy(),
            scale_b=b.numpy(),
            quantile=q.numpy(),
            **common,
        )

    logits = data["pred"].movedim(class_dim, -1)
    logits = logits.reshape(-1, logits.shape[-1])
    labels = data["y"].reshape(-1) if data["y"].dim() > 1 else data["y"]
    per = logits.shape[0] // n  # elements (e.g. pixels) per sample
    index = torch.arange(logits.shape[0]).reshape(n, per)
    fit_e, conf_e = index[fit].reshape(-1), index[conf].reshape(-1)
    temperature = _fit_temperature(logits[fit_e], labels[fit_e])
    before = torch.softmax(logits[conf_e], dim=-1)
    after = torch.softmax(logits[conf_e] / temperature, dim=-1)
    true_p = after.gather(1, labels[conf_e, None]).squeeze(1)
    m = conf_e.numel()
    k = _conformal_rank(m, coverage)
    qhat = float(torch.sort(1 - true_p).values[k - 1])
    threshold = 1.0 - qhat
    sets = after >= threshold
    report["conformal_rank"] = k
    report["temperature"] = temperature
    report["before"] = {
        "nll": float(torch.nn.functional.cross_entropy(logits[conf_e], labels[conf_e])),
        "ece": _ece(before, labels[conf_e]),
        "accuracy": float((before.argmax(-1) == labels[conf_e]).double().mean()),
    }
    report["after"] = {
        "nll": float(torch.nn.functional.cross_entropy(logits[conf_e] / temperature, labels[conf_e])),
        "ece": _ece(after, labels[conf_e]),
        "coverage": float(sets.gather(1, labels[conf_e, None]).double().mean()),
        "mean_set_size": float(sets.double().sum(-1).mean()),
    }
    return Calibration(
        task="classification",
        report=report,
        temperature=temperature,
        set_threshold=threshold,
        class_dim=class_dim,
        **common,
    )


def _too_few(n: int, needed: int, coverage: float) -> str:
    return (
        f"calibrate: coverage {coverage} needs at least {needed} calibration samples (half fit the scale, and the "
        f"conformal half needs at least coverage/(1-coverage) = {coverage / (1 - coverage):.4g}); got {n}"
    )


# ---------------------------------------------------------------------------------------------- bundles
def write_calibration(
    path: str | os.PathLike[str], calibration: Calibration, *, out: str | os.PathLike[str] | None = None
) -> Path:
    """Store ``calibration`` in the bundle at ``path`` (or in a copy of it at ``out``) and return that bundle.

    The weights (and any ``architecture.py``) are left byte for byte as they were, so ``weights_sha256`` stays;
    ``capsa.json`` gains the calibration record and ``calibration.safetensors`` the arrays. As `save_bundle`
    does, ``capsa.json`` is removed first and written last, so a reader never sees a half-updated bundle.
    Raises `capsa.BundleError` for an unreadable bundle or a calibration for other outputs.
    """
    from capsa.bundle import _write_atomic, manifest_text
    from capsa.manifest import (
        ARCHITECTURE_FILE,
        MANIFEST_FILE,
        WEIGHTS_FILE,
        BundleError,
        _BundleDir,
        _check_weights,
        parse_manifest,
    )

    with _BundleDir(path) as bundle:
        manifest = parse_manifest(bundle.read(MANIFEST_FILE), source=bundle.source)
        weights = bundle.read(WEIGHTS_FILE)
        code = bundle.read(ARCHITECTURE_FILE) if manifest.local_architecture else b""
    source = str(path)
    _check_weights(source, manifest, weights)
    spec = next((o for o in manifest.outputs if o.name == "prediction"), manifest.outputs[0])
    wanted = calibration.output_shape
    if len(spec.shape) != len(wanted) + 1 or any(s not in (-1, w) for s, w in zip(spec.shape[1:], wanted, strict=True)):
        raise BundleError(
            f"{source}: the calibration is for outputs of shape [N, {', '.join(map(str, wanted))}], the bundle's "
            f"prediction has shape {spec.shape}"
        )
    record, data = calibration.to_parts(weights_sha256=manifest.weights_sha256)
    updated = manifest.model_copy(update={"calibration": record})
    target = Path(out) if out is not None else Path(path)
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST_FILE).unlink(missing_ok=True)
    if out is not None:
        _write_atomic(target / WEIGHTS_FILE, weights)
        if code:
            _write_atomic(target / ARCHITECTURE_FILE, code)
    _write_atomic(target / CALIBRATION_FILE, data)
    _write_atomic(target / MANIFEST_FILE, manifest_text(updated).encode())
    return target


def calibrate_bundle(
    path: str | os.PathLike[str],
    x: np.ndarray,
    y: np.ndarray,
    *,
    coverage: float = 0.9,
    out: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    allowed_modules: Iterable[str] | None = None,
    batch_size: int = 1024,
) -> Calibration:
    """What ``capsa calibrate`` does: load the bundle, `calibrate` it on ``(x, y)``, `write_calibration`.

    ``x`` is cast to the bundle's input datatype first (an ``.npz`` file often holds float64).
    """
    import torch

    from capsa.bundle import DATATYPES, load_bundle

    _check_coverage(coverage)
    model = load_bundle(path, device=device, allowed_modules=allowed_modules)
    from capsa.manifest import read_manifest

    dtype = DATATYPES[read_manifest(path).inputs[0].datatype]
    xt = torch.as_tensor(np.asarray(x))
    if xt.dtype != dtype:
        xt = xt.to(dtype)
    calibration = calibrate(model, xt, y, coverage=coverage, batch_size=batch_size)
    write_calibration(path, calibration, out=out)
    return calibration


def summary(record: Mapping[str, Any]) -> str:
    """One line about a calibration record, for ``capsa inspect``."""
    report = record.get("report", {})
    before, after = report.get("before", {}), report.get("after", {})

    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    parts = [f"{record.get('task')}, coverage {record.get('coverage')}, {record.get('samples')} samples"]
    if record.get("task") == "regression":
        parts.append(
            f"held-out coverage {fmt(before.get('coverage'))} -> {fmt(after.get('coverage'))}, "
            f"NLL {fmt(before.get('nll'))} -> {fmt(after.get('nll'))}"
        )
    else:
        parts.append(
            f"temperature {fmt(record.get('temperature'))}, NLL {fmt(before.get('nll'))} -> {fmt(after.get('nll'))}, "
            f"ECE {fmt(before.get('ece'))} -> {fmt(after.get('ece'))}, set coverage {fmt(after.get('coverage'))}, "
            f"mean set size {fmt(after.get('mean_set_size'))}"
        )
    parts.append(f"method: {record.get('method')}")
    return "; ".join(parts)
