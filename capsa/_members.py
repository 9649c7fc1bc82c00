"""Prediction and risk from several members (voters or stochastic passes) of one model."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from capsa._risk import Risk

Task = Literal["regression", "classification"]


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at 0 is 0, not NaN (members that agree exactly)."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), 0.0)


def mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) standard deviation over dim 0.

    Mean and centred square: several times cheaper than `torch.std_mean` over a short leading dim on CPU.
    """
    mean = x.mean(dim=0)
    return mean, safe_sqrt((x - mean).square().mean(dim=0))


def _probability_mixture(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Log of the mean and standard deviation over dim 0 of ``exp(log_probs)``, keeping tiny probabilities' order.

    Each class is scaled by its largest member probability ``m`` first (``std(p) = m * std(p / m)``), so no square
    underflows: a spread of 1e-30 stays 1e-30 (and ranks below 1e-25) instead of becoming 0, and the log of the
    mean probability is exact even where the probability itself underflows.
    """
    peak = log_probs.amax(dim=0)
    mean, spread = mean_std(torch.exp(log_probs - peak))
    return mean.log() + peak, spread * torch.exp(peak)


def reduce_members(
    outs: Tensor,
    task: Task,
    class_dim: int,
    scales: Tensor | None = None,
    pick: Tensor | None = None,
) -> tuple[Tensor, Risk]:
    """Reduce member outputs `[M, B, ...]` to `(prediction, risk)`, each shaped like one member's output.

    Regression: the prediction is the members' mean and the epistemic risk their standard deviation. With
    ``scales`` (each member's aleatoric standard deviation, `[M, B, ...]`, from sculpt inside the stack) the
    aleatoric risk is the root mean of the members' variances, so that ``Risk.total`` is the standard deviation of
    the members' mixture.

    Classification: members' logits become probabilities first, since spread in logit space does not track
    uncertainty (a confident and an unsure member can have equally spread logits); the prediction is the log of the
    mean probability (valid logits for argmax and cross-entropy) and the risk is the standard deviation of the
    probabilities, computed in log space so that saturated probabilities keep their ranking.

    ``pick`` (training): the index of the member that answers each sample; the prediction (and aleatoric risk) is
    that member's, so that the user's unchanged loss trains every member on its own share of the data.
    """
    aleatoric = None
    if task == "classification":
        dim = class_dim + 1 if class_dim >= 0 else class_dim
        # outs - logsumexp is log_softmax, several times faster than torch's kernel for few classes on CPU
        prediction, epistemic = _probability_mixture(outs - outs.logsumexp(dim=dim, keepdim=True))
    else:
        prediction, epistemic = mean_std(outs)
        if scales is not None:
            aleatoric = safe_sqrt(scales.square().mean(dim=0))
    if pick is not None:
        rows = torch.arange(outs.shape[1], device=outs.device)
        prediction = outs[pick, rows]
        if scales is not None:
            aleatoric = scales[pick, rows]
    return prediction, Risk(aleatoric=aleatoric, epistemic=epistemic, task=task)
