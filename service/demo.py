"""``capsa-serve --demo``: a small vote-wrapped MLP trained in seconds on a 1-D toy, published into a local
registry (``$CAPSA_CACHE_DIR/demo`` or ``~/.cache/capsa-serve/demo``) and served - no other set-up.

On a read-only root filesystem (``docker run --read-only``, Kubernetes' ``readOnlyRootFilesystem``) that folder may
not be writable: the demo then falls back to the system temporary directory (a tmpfs at ``/tmp``) with a warning,
and when nothing is writable it stops with one error line (`DemoError`) saying what to mount.

The toy: ``y = sin(x)`` plus a little noise, trained on ``x`` in [-3, 3]; the ensemble's risk grows outside that
range, so ``x = 0.5`` comes back with a low risk and ``x = 9`` with a high one (and ``flagged``). Training runs in a
child process, keeping torch and model code out of the HTTP process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("capsa.serve.demo")

DEMO_MODEL = "demo"
ARCHITECTURE = "service.demo:build_demo_model"
KWARGS = {"hidden": 64}
RISK_THRESHOLD = 0.05  # risk inside [-3, 3] stays well below it; |x| >= 4.5 goes above


def build_demo_model(*, hidden: int = 64) -> Any:
    """The demo architecture: an MLP from one input to one output (the user's model, before wrapping)."""
    from torch import nn

    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def train_demo(bundle_dir: Path, *, steps: int = 600, seed: int = 0) -> Path:
    """Train the demo model wrapped with ``capsa.vote`` on the toy and save it as a bundle."""
    import torch

    from capsa import save_bundle, vote

    torch.manual_seed(seed)
    x = torch.rand(2048, 1) * 6 - 3
    y = torch.sin(x) + 0.05 * torch.randn_like(x)
    wrapped = vote.Wrapper(n_voters=5)(build_demo_model(**KWARGS))
    wrapped(x[:2])  # creates the wrapper's lazy parameters
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=3e-3)
    wrapped.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,))
        loss = torch.nn.functional.mse_loss(wrapped(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        optimizer.step()
    wrapped.eval()
    # Calibrated on fresh samples of the same toy (capsa.calibrate): 90% intervals, risk percentiles, drift gauge.
    from capsa import calibrate

    x_cal = torch.rand(2000, 1) * 6 - 3
    calibration = calibrate(wrapped, x_cal, torch.sin(x_cal) + 0.05 * torch.randn_like(x_cal), coverage=0.9)
    return save_bundle(wrapped, bundle_dir, architecture=ARCHITECTURE, kwargs=KWARGS, example_input=x[:4],
                       calibration=calibration,
                       metadata={"description": "capsa-serve demo: y = sin(x), trained on x in [-3, 3]",
                                 "final_mse": float(loss.detach())})


class DemoError(RuntimeError):
    """The demo registry cannot be prepared (nowhere writable, or training failed); the message says why."""


def demo_root(cache_dir: str | None) -> Path:
    """Where the demo registry lives (when that folder is writable; see `writable_demo_root`)."""
    base = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return (base if cache_dir else base / "capsa-serve") / "demo"


def fallback_root() -> Path:
    """The demo registry in the system temporary directory: the fallback on a read-only root filesystem."""
    try:
        tmp = tempfile.gettempdir()
    except OSError:  # no usable temporary directory at all: name the usual one, so the error can say so
        tmp = os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp) / "capsa-serve" / "demo"


def _writable_reason(root: Path) -> str | None:
    """None when a file can be created in ``root`` (made if missing), else why not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def writable_demo_root(cache_dir: str | None) -> Path:
    """The demo registry to use: an already built one, else the first writable of the cache folder and the
    temporary-directory fallback; `DemoError` naming every folder tried (and why it failed) when none is."""
    candidates = list(dict.fromkeys([demo_root(cache_dir), fallback_root()]))
    for root in candidates:
        if (root / DEMO_MODEL / "1" / "capsa.json").is_file():
            return root  # built before (or baked into the image): reading is enough
    tried: list[str] = []
    for root in candidates:
        reason = _writable_reason(root)
        if reason is None:
            if tried:
                log.warning("demo: cache folder not writable, using the temporary directory",
                            extra={"root": str(root), "not_writable": "; ".join(tried)})
            return root
        tried.append(f"{root} ({reason})")
    raise DemoError(
        "--demo needs a writable folder for the demo model, and none is: " + "; ".join(tried)
        + ". Mount a volume at CAPSA_CACHE_DIR (e.g. docker run -v capsa-cache:/var/cache/capsa) or a tmpfs at "
        + "/tmp (docker run --tmpfs /tmp)"
    )


def build_registry(root: Path) -> None:
    """Train the demo model and publish it as ``demo`` version 1 with a risk threshold (if not there yet)."""
    from service.registry import Registry, publish

    root.mkdir(parents=True, exist_ok=True)
    if (root / DEMO_MODEL / "1" / "capsa.json").is_file():
        return
    # Trained inside the registry root (a dot-folder the registry ignores): the only place known to be writable.
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        bundle = train_demo(Path(tmp) / "bundle")
        publish(bundle, str(root), DEMO_MODEL, 1, force=True)
    (root / DEMO_MODEL / "config.json").write_text(
        json.dumps({"max_batch_size": 64, "risk_threshold": RISK_THRESHOLD}, indent=2) + "\n"
    )
    Registry(str(root)).config(DEMO_MODEL)  # validate what we wrote


def prepare_demo(settings: Any) -> str:
    """Make sure the demo registry exists (training in a child process if needed); return its root.

    `DemoError` when no folder is writable or the training fails (its output is on stderr)."""
    root = writable_demo_root(settings.cache_dir)
    if not (root / DEMO_MODEL / "1" / "capsa.json").is_file():
        log.info("building the demo model", extra={"root": str(root)})
        proc = subprocess.run([sys.executable, "-m", "service.demo", str(root)], check=False)
        if proc.returncode != 0:
            raise DemoError(f"training the demo model into {root} failed (exit status {proc.returncode})")
    log.info("demo registry ready", extra={"root": str(root), "model": DEMO_MODEL,
                                           "try": "curl -s -X POST localhost:PORT/v1/models/demo:predict "
                                                  "-d '{\"instances\": [[0.5], [6.0]]}'"})
    return str(root)


if __name__ == "__main__":
    build_registry(Path(sys.argv[1]))
