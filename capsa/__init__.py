"""capsa: risk-aware wrappers for any PyTorch model.

``wrapped = capsa.vote.Wrapper(n_voters=5)(model)``; ``y, risk = wrapped(x, return_risk=True)``.
"""

from capsa import neo, sample, sculpt, vote
from capsa._wrapper import WrappedModel, Wrapper, from_spec, is_wrapped
from capsa.bundle import BundleError, load_bundle, save_bundle

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "WrappedModel",
    "Wrapper",
    "__version__",
    "from_spec",
    "is_wrapped",
    "load_bundle",
    "neo",
    "sample",
    "save_bundle",
    "sculpt",
    "vote",
]
