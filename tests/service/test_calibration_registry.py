"""A calibrated bundle travels through a remote registry whole: calibration.safetensors is published and fetched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import capsa
from capsa import vote
from capsa.manifest import CALIBRATION_FILE, MANIFEST_FILE, WEIGHTS_FILE
from service.registry import Registry, RegistryError, publish
from tests.fixtures.archs import mlp

#: Subprocesses and servers get PYTHONPATH, so save_bundle's importability warning does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:save_bundle.*importable only:UserWarning")


def calibrated_bundle(path: Path) -> Path:
    torch.manual_seed(0)
    model = vote.Wrapper(n_voters=3)(mlp()).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    y = x[:, :1] + 0.1 * torch.randn(200, 1, generator=g)
    cal = capsa.calibrate(model, x, y)
    return capsa.save_bundle(model, path, architecture="tests.fixtures.archs:mlp", example_input=x[:2],
                             calibration=cal)


def test_s3_fetch_carries_the_calibration(tmp_path: Path, s3_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = s3_bucket
    root = f"{bucket}/models"
    bundle = calibrated_bundle(tmp_path / "b")
    assert publish(bundle, root, "m", storage_options=options) == 1
    registry = Registry(root, cache_dir=tmp_path / "cache", storage_options=options)
    path = registry.fetch("m", 1)
    assert sorted(p.name for p in path.iterdir()) == sorted([CALIBRATION_FILE, MANIFEST_FILE, WEIGHTS_FILE])
    loaded = capsa.load_bundle(path)
    assert loaded.calibration is not None
    assert loaded.calibration.record() == capsa.load_bundle(bundle).calibration.record()

    # A calibration file replaced under the manifest is refused, not served.
    from fsspec.core import url_to_fs

    fs, base = url_to_fs(root, **options)
    fs.pipe_file(f"{base}/m/2/{CALIBRATION_FILE}", b"not the recorded calibration")
    for name in (WEIGHTS_FILE, MANIFEST_FILE):
        fs.pipe_file(f"{base}/m/2/{name}", (bundle / name).read_bytes())
    fresh = Registry(root, cache_dir=tmp_path / "fresh", storage_options=options)  # the cache holds the good copy
    with pytest.raises(RegistryError, match=f"{CALIBRATION_FILE} is not the one {MANIFEST_FILE} records"):
        fresh.fetch("m", 2)
