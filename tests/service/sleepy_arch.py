"""Bundle-local architecture for the serving tests (copied into bundles as ``architecture.py``).

``Sleepy`` is a linear model that, for test control, sleeps when told by its input: if the largest value of the
first input column is >= 100, the forward pass sleeps ``(value - 100)`` milliseconds. Zeros (the warm-up batch)
and ordinary inputs never sleep.
"""

import time

import torch
from torch import nn


class Sleepy(nn.Module):
    """Linear ``in_features -> 1``, sleeping on request (see the module docstring)."""

    def __init__(self, in_features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        control = float(x[:, 0].max())
        if control >= 100:
            time.sleep((control - 100) / 1000)
        return self.linear(x)


def build(in_features: int = 4) -> nn.Module:
    """The factory recorded in the bundle."""
    return Sleepy(in_features)
