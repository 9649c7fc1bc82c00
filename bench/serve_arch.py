"""The benchmark's model architectures (copied into each bundle as its ``architecture.py``)."""

from torch import nn


def build_mlp(in_features: int = 64, hidden: int = 256, out_features: int = 1) -> nn.Module:
    """An MLP ``in_features``-``hidden``-``hidden``-``out_features`` with ReLUs."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features))


def build_cnn(channels: int = 3, width: int = 32, classes: int = 10) -> nn.Module:
    """A small image classifier for 3x64x64 inputs: three stride-2 3x3 convolutions (``width``, 2x, 4x channels)
    with ReLUs, global average pooling and a linear head: about 10 M multiply-adds per image at width 32, so a
    request of 8 images costs milliseconds of compute on a CPU, far more than its HTTP handling."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )
