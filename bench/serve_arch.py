"""The benchmark's model architecture (copied into the bundle as its ``architecture.py``)."""

from torch import nn


def build_mlp(in_features: int = 64, hidden: int = 256, out_features: int = 1) -> nn.Module:
    """An MLP ``in_features``-``hidden``-``hidden``-``out_features`` with ReLUs."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features))
