"""Prediction and risk from several members (voters or stochastic passes) of one model."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Task = Literal["regression", "classification"]


def reduce_members(outs: Tensor, task: Task, class_dim: int) -> tuple[Tensor, Tensor]:
    """Reduce member outputs `[M, B, ...]` to `(prediction, risk)`, each shaped like one member's output.

    Regression: mean and standard deviation across members. Classification: members' logits become probabilities
    first, since spread in logit space does not track uncertainty (a confident and an unsure member can have equally
    spread logits); the prediction is the log of the mean probability (still valid logits for argmax and
    cross-entropy) and the risk is the standard deviation of the probabilities.
    """
    if task == "classification":
        dim = class_dim + 1 if class_dim >= 0 else class_dim
        probs = outs.softmax(dim=dim)
        std, mean = torch.std_mean(probs, dim=0, correction=0)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log(), std
    std, mean = torch.std_mean(outs, dim=0, correction=0)
    return mean, std
