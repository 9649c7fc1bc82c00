"""capsa: risk-aware wrappers for any PyTorch model.

``wrapped = capsa.vote.Wrapper(n_voters=5)(model)``; ``y, risk = wrapped(x, return_risk=True)``.
Wrappers compose by nesting, ``capsa.vote.Wrapper()(capsa.sculpt.Wrapper()(model))``; a composed model's risk is a
`capsa.Risk` with named components.

Names are imported on first use, so that torch-free parts (``capsa.manifest``) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = {"neo", "sample", "sculpt", "vote", "bundle", "manifest"}
_NAMES = {
    "WrappedModel": "capsa._wrapper",
    "Wrapper": "capsa._wrapper",
    "from_spec": "capsa._wrapper",
    "Risk": "capsa._risk",
    "risk_score": "capsa._risk",
    "is_wrapped": "capsa._wrapper",
    "BundleError": "capsa.manifest",
    "Calibration": "capsa.calibration",
    "CalibrationError": "capsa.calibration",
    "calibrate": "capsa.calibration",
    "load_bundle": "capsa.bundle",
    "save_bundle": "capsa.bundle",
}

__all__ = [
    "BundleError",
    "Calibration",
    "CalibrationError",
    "Risk",
    "WrappedModel",
    "Wrapper",
    "__version__",
    "calibrate",
    "from_spec",
    "is_wrapped",
    "load_bundle",
    "neo",
    "risk_score",
    "sample",
    "save_bundle",
    "sculpt",
    "vote",
]

if TYPE_CHECKING:
    from capsa import neo, sample, sculpt, vote
    from capsa._risk import Risk, risk_score
    from capsa._wrapper import WrappedModel, Wrapper, from_spec, is_wrapped
    from capsa.bundle import load_bundle, save_bundle
    from capsa.calibration import Calibration, CalibrationError, calibrate
    from capsa.manifest import BundleError


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"capsa.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'capsa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
