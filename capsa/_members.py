"""Prediction and risk from several members (voters or stochastic passes) of one model."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from capsa._risk import Risk

Task = Literal["regression", "classification"]


def _needs_grad(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at 0 is 0, not NaN (members that agree exactly).

    Without autograd (inference) this is one ``sqrt``: the guard costs three more kernels, which matter on a GPU.
    """
    if not _needs_grad(x):
        return x.sqrt()
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), 0.0)


def safe_log(x: Tensor) -> Tensor:
    """``log(x)`` for ``x >= 0`` (-inf at 0), whose gradient at 0 is 0, not NaN (one ``log`` without autograd)."""
    if not _needs_grad(x):
        return x.log()
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(), -torch.inf)


def var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """(Population) variance and mean over dim 0 (the members).

    On CPU, mean and centred square: `torch.var_mean` over a short leading dim is about 40 times slower there.
    Elsewhere (CUDA) `torch.var_mean`: one kernel instead of four, where kernel launches dominate.
    """
    if x.device.type != "cpu":
        return torch.var_mean(x, dim=0, correction=0)
    mean = x.mean(dim=0)
    centred = x - mean
    return centred.square().mean(dim=0), mean


def mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) standard deviation over dim 0."""
    var, mean = var_mean(x)
    return mean, safe_sqrt(var)


def log_softmax(logits: Tensor, dim: int) -> Tensor:
    """`torch.log_softmax`; on CPU ``logits - logsumexp``, several times faster than torch's kernel for few classes."""
    if logits.device.type != "cpu":
        return torch.log_softmax(logits, dim=dim)
    return logits - logits.logsumexp(dim=dim, keepdim=True)


def probability_mixture(log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From members' log-probabilities ``[M, ...]``: the log of the mean probability, the standard deviation of
    the probabilities and its log, over dim 0, keeping tiny probabilities' order.

    Each class is scaled by its largest member probability ``m`` first (``std(p) = m * std(p / m)``), and the log
    of the spread is ``log(m) + 0.5 * log(var(p / m))``, where ``var(p / m)`` is never tiny unless the members agree
    exactly (the largest member is 1): so the log spread of a runner-up class with probability ``exp(-1000)``
    is about -1000 and keeps its order, though the spread itself underflows to 0 in float32, and the log of the mean
    probability is exact where the probability underflows.
    """
    peak = log_probs.amax(dim=0)
    var, mean = var_mean(torch.exp(log_probs - peak))
    log_spread = torch.add(peak, safe_log(var), alpha=0.5)
    return mean.log().add_(peak), log_spread.exp(), log_spread


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
    probabilities, computed in log space so that saturated probabilities keep their ranking; its log is kept as
    ``Risk.log_epistemic``, from which `capsa.risk_score` ranks where the spread itself underflows.

    ``pick`` (training): the index of the member that answers each sample; the prediction (and aleatoric risk) is
    that member's, so that the user's unchanged loss trains every member on its own share of the data.
    """
    aleatoric = log_spread = None
    if task == "classification":
        dim = class_dim + 1 if class_dim >= 0 else class_dim
        prediction, epistemic, log_spread = probability_mixture(log_softmax(outs, dim))
    else:
        prediction, epistemic = mean_std(outs)
        if scales is not None:
            aleatoric = safe_sqrt(scales.square().mean(dim=0))
    if pick is not None:
        rows = torch.arange(outs.shape[1], device=outs.device)
        prediction = outs[pick, rows]
        if scales is not None:
            aleatoric = scales[pick, rows]
    return prediction, Risk(aleatoric=aleatoric, epistemic=epistemic, task=task, log_epistemic=log_spread)
