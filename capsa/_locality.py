"""Whether an architecture module can be imported by another process (``capsa verify``, the server), not only here."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import warnings

_PROBE = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 3)"


def importable_elsewhere(module_name: str, timeout: float = 60.0) -> bool | None:
    """Whether a fresh interpreter started in another directory (same environment) finds ``module_name``'s top-level
    package; None when that cannot be told (the probe failed or timed out). Asked once per package and environment."""
    return _probe(module_name.partition(".")[0], os.environ.get("PYTHONPATH", ""), timeout)


@functools.lru_cache(maxsize=64)
def _probe(top: str, pythonpath: str, timeout: float) -> bool | None:
    with tempfile.TemporaryDirectory() as elsewhere:
        try:
            done = subprocess.run([sys.executable, "-c", _PROBE, top], cwd=elsewhere,
                                  env=dict(os.environ), capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
    return {0: True, 3: False}.get(done.returncode)


def warn_if_only_importable_here(module_name: str, architecture: str) -> None:
    """A `UserWarning` saying what to do when the bundle's architecture module is found only from this process's
    current directory (or script directory), so that ``capsa verify`` and the server would fail with
    ``No module named ...``."""
    if importable_elsewhere(module_name) is False:
        warnings.warn(
            f"save_bundle: architecture {architecture!r}: module {module_name.partition('.')[0]!r} is importable "
            "only from this process's current or script directory, so `capsa verify` and the server (started "
            "elsewhere) will fail with \"No module named ...\". Install it as a package (pip install -e .), put "
            "its directory on PYTHONPATH where the bundle is loaded, or ship the code in the bundle with "
            "save_bundle(..., architecture_file='path/to/models.py', architecture='architecture:<factory>')",
            UserWarning,
            stacklevel=3,
        )
