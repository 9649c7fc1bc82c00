"""An importable test architecture whose construction misbehaves on request, for the supervision tests.

``build`` makes a one-layer linear model (so a bundle's weights fit), but while the file named
by ``crash_if`` exists it kills its process (a worker that dies while loading, as on an abort or OOM), and while the
file named by ``hang_if`` exists it waits (a load that takes long).
"""

import os
import time
from pathlib import Path

from torch import nn


def build(in_features: int = 4, crash_if: str = "", hang_if: str = "") -> nn.Module:
    """The factory recorded in the bundle."""
    if crash_if and Path(crash_if).exists():
        os._exit(70)
    while hang_if and Path(hang_if).exists():
        time.sleep(0.05)
    return nn.Sequential(nn.Linear(in_features, 1))
