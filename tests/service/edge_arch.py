"""Bundle-local architecture for the edge tests (copied into bundles as ``architecture.py``).

``Touchy`` is a linear model that raises, with a message full of internals, when the first input value is 666:
a model failure whose details must reach the log, never the client.
"""

import os

import torch
from torch import nn


class Touchy(nn.Module):
    """Linear ``in_features -> 1`` that fails on request (see the module docstring)."""

    def __init__(self, in_features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x[0, 0]) == 666:
            raise RuntimeError("cannot open /srv/internal/secret-weights.bin (sha256 deadbeef)")
        return self.linear(x)


def build(in_features: int = 4) -> nn.Module:
    """The factory recorded in the bundle."""
    return Touchy(in_features)


def build_broken(in_features: int = 4) -> nn.Module:
    """A factory that fails where ``EDGE_ARCH_BREAK`` is set (the server's workers: a load failure), with internals
    in its message; elsewhere (saving the bundle) it builds ``Touchy``."""
    if os.environ.get("EDGE_ARCH_BREAK"):
        raise RuntimeError(f"cannot open /srv/internal/weights-{in_features}.bin (sha256 deadbeef)")
    return Touchy(in_features)
