"""The model registry: layout, config, index with contained failures, fetch, atomic publish; local and S3."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_save

from capsa.bundle import BundleError, load_bundle, read_manifest, save_bundle
from service.model_config import ConfigError, ModelConfig
from service.registry import AVAILABLE, UNAVAILABLE, Registry, RegistryError, VersionState, publish

ARCH = "tests.fixtures.archs:mlp"


def raw_bundle(path: Path, *, generation: int = 0, architecture: str = ARCH, values: int = 16) -> Path:
    """A structurally valid bundle written without capsa (the registry never runs one)."""
    path.mkdir(parents=True, exist_ok=True)
    weights = safetensors_save({"w": torch.full((values,), float(generation))})
    (path / "model.safetensors").write_bytes(weights)
    if architecture.startswith("architecture:"):
        (path / "architecture.py").write_text("def factory():\n    raise RuntimeError('never run here')\n")
    manifest = {
        "format_version": 1,
        "architecture": architecture,
        "kwargs": {},
        "wrapper": {"wrapper": "vote", "version": 1, "n_voters": 2},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [
            {"name": "prediction", "datatype": "FP32", "shape": [-1, 1]},
            {"name": "risk", "datatype": "FP32", "shape": [-1, 1]},
        ],
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "torch_version": torch.__version__,
        "capsa_version": "0.1.0",
        "metadata": {"generation": generation},
    }
    (path / "capsa.json").write_text(json.dumps(manifest))
    return path


def generation_of(bundle: Path) -> int:
    return read_manifest(bundle).metadata["generation"]


def real_bundle(path: Path, generation: int, *, in_features: int = 8) -> Path:
    """A real vote-wrapped MLP whose shape and weights encode ``generation`` (hidden = 8 + generation)."""
    from capsa import vote
    from tests.fixtures import archs

    kwargs = {"in_features": in_features, "hidden": 8 + generation, "out_features": 1}
    torch.manual_seed(generation)
    wrapped = vote.Wrapper(n_voters=2)(archs.mlp(**kwargs))
    with torch.no_grad():
        wrapped.model[-1].bias.fill_(float(generation))
    save_bundle(
        wrapped,
        path,
        architecture=ARCH,
        kwargs=kwargs,
        example_input=torch.randn(2, in_features),
        metadata={"generation": generation},
    )
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "registry"
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------------- publish & layout
def test_publish_layout_and_versions(tmp_path: Path, root: Path) -> None:
    bundle = raw_bundle(tmp_path / "b")
    assert publish(bundle, str(root), "m") == 1
    assert publish(bundle, str(root), "m") == 2
    assert publish(bundle, str(root), "m", 7) == 7
    assert publish(bundle, str(root), "m") == 8
    assert publish(bundle, str(root), "other.model-2_x") == 1
    assert sorted(p.name for p in (root / "m" / "1").iterdir()) == ["capsa.json", "model.safetensors"]
    assert not [p for p in (root / "m").iterdir() if p.name.startswith(".")]  # no temporary leftovers
    registry = Registry(str(root))
    assert registry.model_names() == ["m", "other.model-2_x"]
    assert registry.versions("m") == [1, 2, 7, 8]
    assert registry.served_versions("m") == [8]
    assert registry.fetch("m", 7) == root / "m" / "7"
    assert registry.versions("absent") == []


def test_publish_existing_version_needs_force(tmp_path: Path, root: Path) -> None:
    publish(raw_bundle(tmp_path / "a", generation=1), str(root), "m", 1)
    with pytest.raises(RegistryError, match=r"m version 1 already exists.*--force"):
        publish(raw_bundle(tmp_path / "b", generation=2), str(root), "m", 1)
    assert generation_of(root / "m" / "1") == 1
    assert publish(tmp_path / "b", str(root), "m", 1, force=True) == 1
    assert generation_of(root / "m" / "1") == 2
    assert sorted(p.name for p in (root / "m").iterdir()) == ["1"]


def test_publish_copies_local_architecture(tmp_path: Path, root: Path) -> None:
    publish(raw_bundle(tmp_path / "b", architecture="architecture:factory"), str(root), "m")
    assert (root / "m" / "1" / "architecture.py").is_file()


def test_publish_over_incomplete_version(tmp_path: Path, root: Path) -> None:
    """A version directory without capsa.json does not exist for readers, and publishing replaces it."""
    (root / "m" / "3").mkdir(parents=True)
    (root / "m" / "3" / "model.safetensors").write_bytes(b"partial")
    registry = Registry(str(root))
    assert registry.versions("m") == []
    assert publish(raw_bundle(tmp_path / "b"), str(root), "m", 3) == 3
    assert registry.versions("m") == [3]
    # version=None never reuses a number taken by an incomplete directory
    (root / "m" / "4").mkdir()
    assert publish(tmp_path / "b", str(root), "m") == 5


def test_publish_creates_root_and_accepts_file_urls(tmp_path: Path) -> None:
    bundle = raw_bundle(tmp_path / "b")
    assert publish(bundle, f"file://{tmp_path}/new/reg", "m") == 1
    assert Registry(f"file://{tmp_path}/new/reg").versions("m") == [1]
    assert Registry(str(tmp_path / "new" / "reg")).fetch("m", 1) == tmp_path / "new" / "reg" / "m" / "1"


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "..", "a b", "é", "_x", "m:1"])
def test_invalid_model_names(tmp_path: Path, root: Path, name: str) -> None:
    with pytest.raises(RegistryError, match="invalid model name"):
        publish(raw_bundle(tmp_path / "b"), str(root), name)
    registry = Registry(str(root))
    for call in (registry.versions, registry.config):
        with pytest.raises(RegistryError, match="invalid model name"):
            call(name)


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1"])
def test_invalid_versions(tmp_path: Path, root: Path, version: Any) -> None:
    with pytest.raises(RegistryError, match="invalid version"):
        publish(raw_bundle(tmp_path / "b"), str(root), "m", version)
    with pytest.raises(RegistryError, match="invalid version"):
        Registry(str(root)).fetch("m", version)


def test_publish_refuses_a_bad_bundle(tmp_path: Path, root: Path) -> None:
    bundle = raw_bundle(tmp_path / "b")
    (bundle / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=rf"^{re.escape(str(tmp_path / 'b'))}: checksum mismatch"):
        publish(bundle, str(root), "m")
    with pytest.raises(BundleError, match="does not exist"):
        publish(tmp_path / "nothing", str(root), "m")
    assert not (root / "m").exists() or not list((root / "m").iterdir())


# ---------------------------------------------------------------------------------------------- config & index
def test_config_defaults_and_file(tmp_path: Path, root: Path) -> None:
    publish(raw_bundle(tmp_path / "b"), str(root), "m")
    registry = Registry(str(root))
    assert registry.config("m") == ModelConfig()
    (root / "m" / "config.json").write_text('{"max_batch_size": 4, "version_policy": {"all": {}}}')
    assert registry.config("m").max_batch_size == 4
    (root / "m" / "config.json").write_text('{"max_batch_size": 0}')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(root))}/m/config\.json: max_batch_size: "):
        registry.config("m")


def test_missing_root() -> None:
    with pytest.raises(RegistryError, match="not a directory"):
        Registry("/nonexistent/registry/root")


def test_index_contains_failures(tmp_path: Path, root: Path) -> None:
    good = raw_bundle(tmp_path / "good")
    for version in (1, 2, 3):
        publish(good, str(root), "good", version)
    (root / "good" / "config.json").write_text('{"version_policy": {"latest": {"num_versions": 2}}}')
    # bad config: the model's versions are unavailable, others unaffected
    publish(good, str(root), "badconfig", 1)
    (root / "badconfig" / "config.json").write_text('{"instances": 0}')
    # bad bundles: only that version is unavailable
    for version in (1, 2, 3, 4, 5):
        publish(good, str(root), "mixed", version)
    (root / "mixed" / "config.json").write_text('{"version_policy": {"all": {}}}')
    (root / "mixed" / "2" / "capsa.json").write_text("{not json")
    (root / "mixed" / "3" / "model.safetensors").unlink()
    (root / "mixed" / "4" / "capsa.json").write_text(
        json.dumps({**json.loads((root / "mixed" / "4" / "capsa.json").read_text()), "format_version": 9})
    )
    publish(raw_bundle(tmp_path / "acme", architecture="acme.models:net"), str(root), "mixed", 6)
    (root / "mixed" / "config.json").write_text(
        '{"version_policy": {"all": {}}, "allowed_modules": ["tests.fixtures", "architecture"]}'
    )
    # a model directory without versions, and stray entries that are not models or versions
    (root / "empty").mkdir()
    (root / ".tmp-stray").mkdir()
    (root / "mixed" / "notaversion").mkdir()
    (root / "mixed" / "07").mkdir()

    index = Registry(str(root)).index()
    by_key = {(s.name, s.version): s for s in index}
    assert all(isinstance(s, VersionState) for s in index)
    assert [(s.name, s.version) for s in index] == sorted(by_key)
    assert by_key[("good", 1)].state == UNAVAILABLE and "version policy (latest 2)" in by_key[("good", 1)].reason
    assert by_key[("good", 2)] == VersionState("good", 2, AVAILABLE, "")
    assert by_key[("good", 3)] == VersionState("good", 3, AVAILABLE, "")
    bad = by_key[("badconfig", 1)]
    assert bad.state == UNAVAILABLE and f"{root}/badconfig/config.json: instances:" in bad.reason
    assert by_key[("mixed", 1)].state == AVAILABLE
    assert by_key[("mixed", 2)].state == UNAVAILABLE and "not valid JSON" in by_key[("mixed", 2)].reason
    assert f"{root}/mixed/2" in by_key[("mixed", 2)].reason
    assert "missing model.safetensors" in by_key[("mixed", 3)].reason
    assert "format_version 9" in by_key[("mixed", 4)].reason
    assert by_key[("mixed", 5)].state == AVAILABLE
    assert "outside allowed_modules" in by_key[("mixed", 6)].reason
    assert by_key[("empty", 0)].state == UNAVAILABLE and "no versions" in by_key[("empty", 0)].reason
    assert {s.name for s in index} == {"good", "badconfig", "mixed", "empty"}


def test_fingerprint_changes_with_what_serving_depends_on(tmp_path: Path, root: Path) -> None:
    """Polling reloads a model only when its fingerprint changes: complete versions and config.json count."""
    bundle = raw_bundle(tmp_path / "b")
    publish(bundle, str(root), "m", 1)
    registry = Registry(str(root))
    first = registry.fingerprint("m")
    assert registry.fingerprint("m") == first
    (root / "m" / ".tmp-stray").mkdir()  # a publish in progress
    (root / "m" / "2").mkdir()  # a version without capsa.json does not exist yet
    (root / "m" / "2" / "model.safetensors").write_bytes(b"partial")
    assert registry.fingerprint("m") == first
    publish(bundle, str(root), "m", 3)
    second = registry.fingerprint("m")
    assert second != first
    (root / "m" / "config.json").write_text('{"max_batch_size": 4}')
    third = registry.fingerprint("m")
    assert third != second
    (root / "m" / "3" / "model.safetensors").write_bytes(b"x" * 3)  # a file replaced
    assert registry.fingerprint("m") != third
    assert registry.fingerprint("absent") == Registry(str(root)).fingerprint("other-absent")


def test_fetch_missing_version(tmp_path: Path, root: Path) -> None:
    publish(raw_bundle(tmp_path / "b"), str(root), "m")
    registry = Registry(str(root))
    with pytest.raises(RegistryError, match="model 'm' has no version 2"):
        registry.fetch("m", 2)
    with pytest.raises(RegistryError, match="model 'x' has no version 1"):
        registry.fetch("x", 1)


def test_round_trip_through_local_registry(tmp_path: Path, root: Path) -> None:
    bundle = real_bundle(tmp_path / "b", generation=3)
    publish(bundle, str(root), "m")
    registry = Registry(str(root))
    loaded = load_bundle(registry.fetch("m", 1))
    x = torch.randn(4, 8)
    reference = load_bundle(bundle)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, return_risk=True), reference(x, return_risk=True), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- concurrency (local)
def _reader_loop(registry: Registry, name: str, stop: threading.Event, outcome: dict[str, Any]) -> None:
    """Index, fetch and load every listed version until told to stop; record what was seen."""
    while not stop.is_set():
        try:
            registry.index()
            versions = registry.versions(name)
        except Exception as exc:  # listing must never fail
            outcome["errors"].append(f"listing: {type(exc).__name__}: {exc}")
            continue
        for version in versions:
            try:
                path = registry.fetch(name, version)
                wrapped = load_bundle(path)
            except RegistryError as exc:
                outcome["absent"].append(str(exc))
                continue
            except BundleError as exc:
                outcome["vanished" if _vanished(str(exc)) else "errors"].append(str(exc))
                continue
            except Exception as exc:
                outcome["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            generation = wrapped.model[0].out_features - 8
            if wrapped.model[-1].bias.detach().item() != generation:
                outcome["errors"].append(f"version {version}: weights of another generation")
            outcome["loads"] += 1


def _vanished(message: str) -> bool:
    """A bundle replaced by --force was removed while being read: an error, never a mixed or partial bundle."""
    return "does not exist" in message or "missing capsa.json" in message or "missing model.safetensors" in message


def _run_readers(registry: Registry, name: str, writer: Any, readers: int = 2) -> dict[str, Any]:
    outcome: dict[str, Any] = {"errors": [], "absent": [], "vanished": [], "loads": 0}
    stop = threading.Event()
    threads = [threading.Thread(target=_reader_loop, args=(registry, name, stop, outcome)) for _ in range(readers)]
    for thread in threads:
        thread.start()
    try:
        writer()
    finally:
        time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    return outcome


@pytest.mark.slow
def test_concurrent_publish_and_read_local(tmp_path: Path, root: Path) -> None:
    bundles = [real_bundle(tmp_path / f"b{g}", g, in_features=256) for g in range(4)]

    def write_new_versions() -> None:
        for i in range(12):
            publish(bundles[i % 4], str(root), "m")

    registry = Registry(str(root))
    outcome = _run_readers(registry, "m", write_new_versions)
    # Only complete versions are ever listed: every listed version fetches and loads.
    assert outcome["errors"] == [] and outcome["absent"] == [] and outcome["vanished"] == []
    assert outcome["loads"] > 0

    def force_same_version() -> None:
        for i in range(12):
            publish(bundles[i % 4], str(root), "m", 1, force=True)

    outcome = _run_readers(registry, "m", force_same_version)
    assert outcome["errors"] == [], outcome["errors"][:3]
    assert outcome["loads"] > 0
    assert registry.versions("m") == list(range(1, 13))
    assert not [p for p in (root / "m").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------- S3
@pytest.mark.slow
def test_s3_publish_index_fetch_round_trip(tmp_path: Path, s3_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = s3_bucket
    root = f"{bucket}/models"
    bundle = real_bundle(tmp_path / "b", generation=2)
    assert publish(bundle, root, "m", storage_options=options) == 1
    assert (
        publish(raw_bundle(tmp_path / "raw", architecture="architecture:factory"), root, "m", storage_options=options)
        == 2
    )
    with pytest.raises(RegistryError, match="already exists"):
        publish(bundle, root, "m", 1, storage_options=options)

    from fsspec.core import url_to_fs

    fs, base = url_to_fs(root, **options)
    fs.pipe_file(f"{base}/m/config.json", b'{"version_policy": {"all": {}}, "max_batch_size": 3}')
    fs.pipe_file(f"{base}/broken/1/capsa.json", b"{}")
    fs.pipe_file(f"{base}/broken/2/model.safetensors", b"partial upload: no capsa.json yet")

    registry = Registry(root, cache_dir=tmp_path / "cache", storage_options=options)
    assert registry.model_names() == ["broken", "m"]
    assert registry.versions("m") == [1, 2]
    assert registry.versions("broken") == [1]
    assert registry.config("m").max_batch_size == 3
    states = {(s.name, s.version): s for s in registry.index()}
    assert states[("m", 1)].state == AVAILABLE and states[("m", 2)].state == AVAILABLE
    assert states[("broken", 1)].state == UNAVAILABLE and "format_version" in states[("broken", 1)].reason
    assert ("broken", 2) not in states

    path = registry.fetch("m", 1)
    assert path.parent == tmp_path / "cache"
    assert sorted(p.name for p in path.iterdir()) == ["capsa.json", "model.safetensors"]
    assert registry.fetch("m", 1) == path  # cached
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            load_bundle(path)(x, return_risk=True), load_bundle(bundle)(x, return_risk=True), rtol=0, atol=0
        )
    local_code = registry.fetch("m", 2)
    assert (local_code / "architecture.py").is_file() and local_code != path

    # --force replaces the version; the new content gets its own cache entry
    publish(real_bundle(tmp_path / "b5", generation=5), root, "m", 1, force=True, storage_options=options)
    replaced = registry.fetch("m", 1)
    assert replaced != path and generation_of(replaced) == 5 and generation_of(path) == 2
    with pytest.raises(RegistryError, match="has no version 9"):
        registry.fetch("m", 9)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_s3_endpoint_from_environment(
    tmp_path: Path, s3_bucket: tuple[str, dict[str, Any]], s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, _ = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    # skip fsspec's instance cache so this filesystem is built from the environment just set
    options = {"skip_instance_cache": True}
    publish(raw_bundle(tmp_path / "b"), f"{bucket}/env", "m", storage_options=options)
    registry = Registry(f"{bucket}/env", cache_dir=tmp_path / "cache", storage_options=options)
    assert registry.versions("m") == [1]
    assert generation_of(registry.fetch("m", 1)) == 0


@pytest.mark.slow
def test_concurrent_publish_and_read_s3(tmp_path: Path, s3_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = s3_bucket
    root = f"{bucket}/concurrent"
    bundles = [real_bundle(tmp_path / f"b{g}", g, in_features=64) for g in range(3)]
    registry = Registry(root, cache_dir=tmp_path / "cache", storage_options=options)

    def writer() -> None:
        for i in range(6):
            publish(bundles[i % 3], root, "m", storage_options=options)
        for i in range(6):
            publish(bundles[i % 3], root, "m", 1, force=True, storage_options=options)

    outcome = _run_readers(registry, "m", writer, readers=1)
    # Readers see a version whole or not at all (RegistryError while --force replaces it), never a mix.
    assert outcome["errors"] == [] and outcome["vanished"] == [], (outcome["errors"] + outcome["vanished"])[:3]
    assert all("has no version" in m or "changed during" in m for m in outcome["absent"])
    assert outcome["loads"] > 0
    assert registry.versions("m") == list(range(1, 7))


def test_reading_a_registry_does_not_import_torch() -> None:
    """The HTTP process reads the registry; torch and model code belong to the workers alone."""
    code = "import sys, service.app, service.registry; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
