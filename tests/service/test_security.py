"""Publishers cannot run code the operator did not allow (issue 8, item 2), and the registry follows no symlink out.

The operator's list is ``CAPSA_ALLOWED_MODULES`` (default: the demo's factory only); a model's ``config.json``,
written by the publisher, can only narrow it. Refusals are decided from ``capsa.json`` before anything is fetched,
imported or run, and name the setting that would allow the module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.demo import ARCHITECTURE as DEMO_ARCHITECTURE
from service.model_config import ModelConfig
from service.registry import AVAILABLE, UNAVAILABLE, Registry, RegistryError, publish
from service.settings import Settings
from tests.capsa.test_bundle_security import SENTINEL, hostile, payload_code
from tests.service.conftest import ADMIN_TOKEN, IN_FEATURES, ServerProcess, build_bundle
from tests.service.test_registry import raw_bundle

SHELL = ["/bin/sh", "-c"]


def test_default_allows_only_the_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CAPSA_ALLOWED_MODULES", raising=False)
    assert Settings().allowed_module_list() == [DEMO_ARCHITECTURE]
    root = tmp_path / "registry"
    root.mkdir()
    publish(raw_bundle(tmp_path / "b"), str(root), "m")
    publish(raw_bundle(tmp_path / "d", architecture=DEMO_ARCHITECTURE), str(root), "demo")
    states = {s.name: s for s in Registry(str(root), allowed_modules=Settings().allowed_module_list()).index()}
    assert states["demo"].state == AVAILABLE
    assert states["m"].state == UNAVAILABLE
    assert states["m"].reason == (
        f"{root}/m/1: architecture 'tests.fixtures.archs:mlp' is not allowed: module 'tests.fixtures.archs' is "
        f"outside CAPSA_ALLOWED_MODULES ['{DEMO_ARCHITECTURE}']; add 'tests.fixtures.archs' to CAPSA_ALLOWED_MODULES "
        "to allow it"
    )


def test_setting_is_parsed_and_bad_entries_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSA_ALLOWED_MODULES", "acme.models, architecture,acme.other:build")
    assert Settings().allowed_module_list() == ["acme.models", "architecture", "acme.other:build"]
    monkeypatch.setenv("CAPSA_ALLOWED_MODULES", "acme.models,acme..x")
    with pytest.raises(ValidationError, match=r"CAPSA_ALLOWED_MODULES: 'acme\.\.x' is not a dotted module name"):
        Settings()
    assert Settings(allowed_modules="").allowed_module_list() == []  # explicitly nothing
    from service.cli import parse_args

    assert Settings(**parse_args(["--allowed-modules", "acme,architecture"])).allowed_module_list() == [
        "acme", "architecture"
    ]


def test_config_json_narrows_and_never_widens(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    models = {  # name: (architecture, config.json allowed_modules)
        "widen-local": ("architecture:factory", ["architecture", "subprocess", "tests.fixtures"]),
        "widen-popen": ("subprocess:Popen", ["subprocess"]),
        "walk": ("tests.fixtures.archs:nn.functional.torch.os.system", None),
        "narrowed": ("tests.fixtures.archs:mlp", [f"{SENTINEL}.archs"]),
        "exact": ("tests.fixtures.archs:mlp", ["tests.fixtures.archs:mlp"]),
        "plain": ("tests.fixtures.archs:mlp", None),
    }
    for name, (architecture, allowed) in models.items():
        publish(raw_bundle(tmp_path / name, architecture=architecture), str(root), name)
        if allowed is not None:
            (root / name / "config.json").write_text(json.dumps({"allowed_modules": allowed}))
    registry = Registry(str(root), allowed_modules=["tests.fixtures"])
    states = {s.name: s for s in registry.index()}
    assert "bundle-local code (module 'architecture'" in states["widen-local"].reason
    for name in ("widen-local", "widen-popen"):
        assert states[name].state == UNAVAILABLE
        assert "outside CAPSA_ALLOWED_MODULES ['tests.fixtures']" in states[name].reason
    assert "attribute path" in states["walk"].reason
    assert states["narrowed"].reason.endswith(
        f"module 'tests.fixtures.archs' is outside allowed_modules in {root}/narrowed/config.json "
        f"['{SENTINEL}.archs']; add 'tests.fixtures.archs' to allowed_modules in {root}/narrowed/config.json "
        "to allow it"
    )
    assert states["exact"].state == states["plain"].state == AVAILABLE
    # What a worker loads under: the intersection.
    assert registry.allowed_modules_for(registry.config("exact")) == ["tests.fixtures.archs:mlp"]
    assert registry.allowed_modules_for(registry.config("widen-local")) == ["tests.fixtures"]
    assert registry.allowed_modules_for(ModelConfig()) == ["tests.fixtures"]
    assert registry.architecture_problem("widen-popen", 1, registry.config("widen-popen")).startswith(
        f"{root}/widen-popen/1: architecture 'subprocess:Popen' is not allowed"
    )


@pytest.mark.parametrize("level", ["version", "model"])
def test_symlinks_out_of_the_registry_are_refused(tmp_path: Path, level: str) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    outside = tmp_path / "outside"
    publish(raw_bundle(tmp_path / "b"), str(outside), "m")  # a complete model outside the registry
    if level == "version":
        (root / "m").mkdir()
        (root / "m" / "1").symlink_to(outside / "m" / "1")
    else:
        (root / "m").symlink_to(outside / "m")
    with pytest.raises(RegistryError, match=rf"^{root}/m/1: is a symbolic link out of the registry"):
        Registry(str(root)).fetch("m", 1)
    # A link that stays inside the registry is followed.
    publish(raw_bundle(tmp_path / "b2"), str(root), "real")
    (root / "alias").mkdir()
    (root / "alias" / "1").symlink_to(root / "real" / "1")
    assert Registry(str(root)).fetch("alias", 1) == root / "alias" / "1"


@pytest.mark.slow
def test_server_runs_no_code_the_operator_did_not_allow(tmp_path: Path) -> None:
    """The attacks of the issue, published into a served registry: none runs, every one is reported with the
    setting that refuses it (in the token-protected index), and the allowed model serves."""
    root, work = tmp_path / "registry", tmp_path / "work"
    root.mkdir()
    good = build_bundle(work / "good", "vote")
    publish(good, str(root), "good")
    markers = {}

    def attack(name: str, architecture: str, kwargs: dict, code: str | None = None,
               config: dict | None = None) -> None:
        marker = tmp_path / f"ran-{name}"
        markers[name] = marker
        kwargs = json.loads(json.dumps(kwargs).replace("MARKER", str(marker)))
        bundle = hostile(good, work / name, architecture, kwargs, code and code.replace("MARKER", str(marker)))
        publish(bundle, str(root), name)
        if config is not None:
            (root / name / "config.json").write_text(json.dumps(config))

    attack("popen", "subprocess:Popen", {"args": [*SHELL, "touch MARKER"]})
    attack("system", "os:system", {"command": "touch MARKER"})
    attack("walk", "tests.fixtures.archs:nn.functional.torch.os.system", {"command": "touch MARKER"})
    attack("reexport", f"{SENTINEL}.reexport:Popen", {"args": [*SHELL, "touch MARKER"]})  # refused in the worker
    attack("local", "architecture:mlp", {"in_features": IN_FEATURES, "hidden": 16, "out_features": 1},
           code=payload_code(Path("MARKER")), config={"allowed_modules": ["architecture", "tests.fixtures"]})
    proc = ServerProcess(root, tmp_path / "server.log",
                         env={"CAPSA_ALLOWED_MODULES": "tests.fixtures", "CAPSA_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        proc.wait_ready(path="/v2/health/live")
        proc.wait_ready(path="/v2/models/good/ready")  # the attacks never become ready
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, IN_FEATURES], "data": [0.1] * 4}]}
        assert httpx.post(f"{proc.url}/v2/models/good/infer", json=body, timeout=30).status_code == 200
        refused = {name: httpx.post(f"{proc.url}/v2/models/{name}/infer", json=body, timeout=30) for name in markers}
        deadline = time.monotonic() + 120
        while True:  # the worker's refusal (reexport) arrives asynchronously: wait for every reason, with a deadline
            index = httpx.post(f"{proc.url}/v2/repository/index", timeout=30,
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
            reasons = {e["name"]: e["reason"] for e in index if e["state"] == "UNAVAILABLE" and e["reason"]}
            if set(reasons) >= set(markers) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        assert proc.stop() == 0
    assert set(reasons) == set(markers), index
    for name, answer in refused.items():  # unauthenticated clients learn that the model is unavailable, not why
        assert answer.status_code in (404, 503), (name, answer.text)
        assert not any(word in answer.text for word in ("subprocess", "CAPSA_ALLOWED", "os.system", str(root))), (
            name, answer.text)
    for name in ("popen", "system", "local"):
        assert "outside CAPSA_ALLOWED_MODULES ['tests.fixtures']" in reasons[name], reasons[name]
    assert "attribute path" in reasons["walk"]
    assert not any(marker.exists() for marker in markers.values()), [m for m in markers.values() if m.exists()]
    log = proc.log()
    assert "defined in 'subprocess'" in log or "defined in 'subprocess'" in reasons["reexport"], reasons["reexport"]
    shutil.rmtree(work)


def test_calibration_file_symlink_is_refused(tmp_path: Path) -> None:
    """The served calibration is read like every bundle file: a symlink is refused, and no digest of its target
    appears in the error."""
    from service.calibrated import CalibrationError, ServedCalibration

    secret = tmp_path / "secret"
    secret.write_text("not for publishers")
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "calibration.safetensors").symlink_to(secret)
    with pytest.raises(CalibrationError, match=r"calibration\.safetensors is a symbolic link") as info:
        ServedCalibration.load(bundle, {"calibration": {"format": 1}})
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in str(info.value)
