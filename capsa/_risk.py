"""Named risks: what a composed capsa model returns, and the one per-sample score the server ranks by.

A single wrapper returns one tensor, of the kind its config names (``capsa.vote.Wrapper.risk_kind``). A composed
model (``vote(sculpt(model))``) returns a `Risk` whose components a calibration layer or a server can read by name.
"""

from __future__ import annotations

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
    """

    aleatoric: Tensor | None = None
    epistemic: Tensor | None = None
    novelty: Tensor | None = None
    task: Literal["regression", "classification"] = "regression"

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
        """A copy with some components replaced."""
        values = {k: getattr(self, k) for k in (*KINDS, "task")}
        values.update(changes)
        return Risk(**values)


def risk_score(risk: Tensor | Risk) -> Tensor:
    """One number per sample, for ranking and thresholds: the mean of the total risk over its non-batch dims.

    For classifiers this is the mean over classes of the probability spread. The server's ``risk_score`` output is
    this value (in float32).
    """
    total = risk.total if isinstance(risk, Risk) else risk
    if total.dim() <= 1:
        return total.float()
    return total.reshape(total.shape[0], -1).float().mean(dim=1)
