"""Named risks: what a composed capsa model returns, and the one per-sample score the server ranks by.

A single wrapper returns one tensor, of the kind its config names (``capsa.vote.Wrapper.risk_kind``). A composed
model (``vote(sculpt(model))``) returns a `Risk` whose components a calibration layer or a server can read by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["KINDS", "Risk", "risk_score"]

#: The components of a `Risk`, in the order the server lists them.
KINDS: tuple[str, ...] = ("aleatoric", "epistemic", "novelty")


@dataclass(frozen=True)
class Risk:
    """The risks of one prediction, each a tensor shaped like the prediction or None when no wrapper gives it.

    - ``aleatoric``: the noise in the data, a standard deviation in the target's units (sculpt).
    - ``epistemic``: what the model has not learned: the spread of its members (vote's voters, sample's passes),
      a standard deviation (of the output for regression, of the class probabilities for classification).
    - ``novelty``: how unlike the training data the input's hidden representation is (neo); a score, not a
      spread, so it stays out of ``total``.

    ``log_epistemic`` (classifiers from vote or sample; not a component, never served) is the natural log of
    ``epistemic``, computed from the members' log-probabilities: where probabilities saturate in float32 the spread
    itself underflows to 0 (a far-out input's runner-up classes have probabilities like 1e-400), its log does not,
    and `risk_score` ranks by it.
    """

    aleatoric: Tensor | None = None
    epistemic: Tensor | None = None
    novelty: Tensor | None = None
    task: Literal["regression", "classification"] = "regression"
    log_epistemic: Tensor | None = None

    @property
    def total(self) -> Tensor:
        """The predictive spread of the mixture.

        Regression: the predictive standard deviation, ``sqrt(aleatoric**2 + epistemic**2)`` (law of total
        variance: the mixture's variance is the mean of the members' variances plus the variance of their means).
        Classification: the spread of the mixture's class probabilities (the epistemic component; classifiers
        have no separate aleatoric head). Novelty alone (``neo``) is its own total.
        """
        parts = [t for t in (self.aleatoric, self.epistemic) if t is not None]
        if not parts:
            if self.novelty is None:
                raise ValueError("capsa.Risk has no component")
            return self.novelty
        if len(parts) == 1:
            return parts[0]
        return torch.hypot(parts[0], parts[1])

    def components(self) -> dict[str, Tensor]:
        """The components this risk has, by name (``aleatoric``, ``epistemic``, ``novelty``)."""
        return {k: v for k in KINDS if (v := getattr(self, k)) is not None}

    def replace(self, **changes: Tensor | None) -> Risk:
        """A copy with some components replaced (a new ``epistemic`` drops a ``log_epistemic`` not given with it)."""
        values = {k: getattr(self, k) for k in (*KINDS, "task", "log_epistemic")}
        if "epistemic" in changes:
            values["log_epistemic"] = None
        values.update(changes)
        return Risk(**values)


def risk_score(risk: Tensor | Risk, task: Literal["regression", "classification"] | None = None) -> Tensor:
    """One number per sample, ``[N]`` float32, for ranking and thresholds; larger means riskier. The server's
    ``risk_score`` output is this value, and calibration's risk percentiles rank it.

    - Regression (and a neo-only stack, whose total is its novelty): the mean of ``risk.total`` over the
      non-batch dims, in the risk's units.
    - Classification with a probability spread (vote, sample, and stacks with them): with ``s`` the mean over the
      non-batch dims (the classes) of the probability spread ``risk.epistemic``,
      ``risk_score = 1 / (1 + ln(0.5 / s))``: 1 at the largest spread probabilities can have (0.5), falling like
      ``1 / k`` for a spread ``0.5 * exp(-k)``, 0 only when the members agree exactly. It is computed from
      ``risk.log_epistemic`` (the log of the spread, from the members' log-probabilities), so it keeps its order
      where probabilities saturate in float32 and ``s`` itself would underflow to 0: inputs ever farther from the
      data (logit gaps of hundreds or thousands) still get distinct, decreasing scores, never 0, -inf or NaN.
      The transform is monotone, so it ranks exactly as ``s`` does wherever ``s`` is representable. One limit: a
      class whose probability rounds to 1.0 in every member keeps no spread in float32 (its true spread is that
      of the other classes' sum), so where the top class saturates ``s`` may come out up to half its exact value
      (``k`` up to ``ln 2`` larger); inputs whose exact ``k`` differ by more than that keep their order.

    ``risk`` is a `Risk` (its ``task`` decides) or a tensor: a single wrapper's risk, regression unless ``task`` says
    ``"classification"`` (then the tensor is the per-class probability spread, without its log, so saturated
    samples score 0). Pass the `Risk` (``wrapped.predict(x)``) to keep saturated classifiers ranked.
    """
    log_spread: Tensor | None = None
    if isinstance(risk, Risk):
        task = risk.task
        if task == "classification" and risk.epistemic is not None:
            log_spread = risk.log_epistemic if risk.log_epistemic is not None else risk.epistemic.log()
        total = risk.total
    else:
        total = risk
        if task == "classification":
            log_spread = total.log()
    if log_spread is not None:
        flat = log_spread.reshape(log_spread.shape[0], -1).float()
        log_mean = flat.logsumexp(dim=1) - math.log(flat.shape[1])
        return (1.0 - math.log(2.0) - log_mean).clamp_min(1.0).reciprocal()
    if total.dim() <= 1:
        return total.float()
    return total.reshape(total.shape[0], -1).float().mean(dim=1)
