"""What a bundle may run, and which files it may read: the attacks of issue 8 against `load_bundle`.

Each attack carries a payload that writes a marker file (the witness that code ran); the tests check that the
refusal names the cause and that no marker appeared. Whether a refused module was imported at all is checked in a
fresh interpreter with import markers (`tests.fixtures.sentinel_pkg` records its own import) and ``sys.modules``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import capsa
from capsa import vote
from capsa.bundle import BundleError, check_bundle, inspect_bundle, load_bundle, save_bundle
from capsa.manifest import architecture_refusal, narrow_allowed, parse_allowed_modules
from tests.capsa.test_bundle import run_python
from tests.fixtures import archs

KWARGS = {"in_features": 4, "hidden": 8, "out_features": 1}
SENTINEL = "tests.fixtures.sentinel_pkg"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle of ``tests.fixtures.archs:mlp`` that the attacks copy and rewrite."""
    torch.manual_seed(0)
    wrapped = vote.Wrapper(n_voters=2)(archs.mlp(**KWARGS))
    return save_bundle(wrapped, tmp_path_factory.mktemp("good") / "b", architecture="tests.fixtures.archs:mlp",
                       kwargs=KWARGS, example_input=torch.randn(2, 4))


def hostile(good: Path, path: Path, architecture: str, kwargs: dict[str, Any], code: str | None = None) -> Path:
    """``good`` with another architecture and kwargs in its capsa.json (and ``code`` as architecture.py)."""
    shutil.copytree(good, path)
    manifest = json.loads((path / "capsa.json").read_text())
    manifest.update(architecture=architecture, kwargs=kwargs)
    (path / "capsa.json").write_text(json.dumps(manifest))
    if code is not None:
        (path / "architecture.py").write_text(code)
    return path


def payload_code(marker: Path) -> str:
    """Bundle-local code that runs a payload, then returns the real model (loads and serves correctly)."""
    return textwrap.dedent(
        f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("payload ran")

        def mlp(**kwargs):
            from tests.fixtures.archs import mlp as real
            return real(**kwargs)
        """
    )


def attacks(good: Path, tmp: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (bundle, marker) for the attacks of the issue; each payload would create its marker."""
    result = {}

    def add(name: str, architecture: str, kwargs: dict[str, Any] | None = None, code: str | None = None) -> None:
        marker = tmp / f"ran-{name}"
        shell = ["/bin/sh", "-c", f"touch {marker}"]
        kw = kwargs if kwargs is not None else {"command": f"touch {marker}"}
        kw = json.loads(json.dumps(kw).replace("MARKER", str(marker)).replace('"SHELL"', json.dumps(shell)))
        result[name] = (hostile(good, tmp / name, architecture, kw, code and code.replace("MARKER", str(marker))),
                        marker)

    add("popen", "subprocess:Popen", {"args": "SHELL"})
    add("system", "os:system")
    add("walk", f"{SENTINEL}.archs:nn.functional.torch.os.system")
    add("reexport-system", f"{SENTINEL}.reexport:system")
    add("reexport-popen", f"{SENTINEL}.reexport:Popen", {"args": "SHELL"})
    add("local-payload", "architecture:mlp", KWARGS, code=payload_code(Path("MARKER")))
    return result


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("name", "allowed", "cause"),
    [
        # The library's default (no list): the standard library is refused before import.
        ("popen", None, r"module 'subprocess' is in Python's standard library.*nothing of it was imported"),
        ("system", None, r"module 'os' is in Python's standard library"),
        # An operator's list: only what it names.
        ("popen", ["tests.fixtures"], r"module 'subprocess' is outside allowed_modules \['tests.fixtures'\]; "
                                      r"add 'subprocess' to allowed_modules"),
        ("local-payload", ["tests.fixtures"], r"bundle-local code \(module 'architecture'.*nothing of it was imp"),
        # Even a list naming the module: a class that is not an nn.Module, a C function, are never called.
        ("popen", ["subprocess"], r"the factory is the class Popen, not an nn.Module \(imported, not called\)"),
        ("system", ["os"], r"the factory is a builtin_function_or_method, not a class or function"),
        # Attribute walks through other modules, from an allowed module: refused before import, whatever the list.
        ("walk", [SENTINEL], r"factory 'nn.functional.torch.os.system' is an attribute path"),
        ("walk", None, r"attribute walks are refused"),
        # Names an allowed module imported from elsewhere: imported, but not called.
        ("reexport-system", [SENTINEL], r"not a class or function"),
        ("reexport-popen", [SENTINEL], r"the factory is defined in 'subprocess', which is outside allowed_modules"),
        ("reexport-popen", None, r"the factory is defined in 'subprocess'"),
    ],
)
def test_attacks_are_refused_and_nothing_runs(good: Path, tmp_path: Path, name: str, allowed: list[str] | None,
                                               cause: str) -> None:
    path, marker = attacks(good, tmp_path)[name]
    with pytest.raises(BundleError, match=cause) as info:
        load_bundle(path, allowed_modules=allowed)
    assert str(info.value).startswith(f"{path}: architecture ")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("factory", "cause"),
    [
        ("NotAModel", "the factory is the class NotAModel, not an nn.Module"),
        ("_private", "the factory '_private' is private"),
        ("Linear", "defined in 'torch.nn.modules.linear', which is outside allowed_modules"),
    ],
)
def test_factory_must_be_a_public_model_factory_defined_in_an_allowed_module(
    good: Path, tmp_path: Path, factory: str, cause: str
) -> None:
    path = hostile(good, tmp_path / "b", f"{SENTINEL}.reexport:{factory}", {"in_features": 4, "out_features": 1})
    with pytest.raises(BundleError, match=cause):
        load_bundle(path, allowed_modules=[SENTINEL])


def test_local_code_runs_only_when_allowed(good: Path, tmp_path: Path) -> None:
    """The positive control of the witness: with 'architecture' allowed, the payload runs and the model loads
    (which is why allowing bundle-local code means trusting every publisher)."""
    path, marker = attacks(good, tmp_path)["local-payload"]
    with pytest.raises(BundleError, match="bundle-local code"):
        load_bundle(path, allowed_modules=["tests.fixtures"])
    assert not marker.exists()
    assert capsa.is_wrapped(load_bundle(path, allowed_modules=["architecture", "tests.fixtures"]))
    assert marker.read_text() == "payload ran"


def test_exact_factory_entries(good: Path, tmp_path: Path) -> None:
    assert capsa.is_wrapped(load_bundle(good, allowed_modules=["tests.fixtures.archs:mlp"]))
    other = hostile(good, tmp_path / "cnn", "tests.fixtures.archs:SmallCNN", {})
    with pytest.raises(BundleError, match=r"module 'tests.fixtures.archs' is outside allowed_modules "
                                          r"\['tests.fixtures.archs:mlp'\]"):
        load_bundle(other, allowed_modules=["tests.fixtures.archs:mlp"])


def test_save_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    wrapped = vote.Wrapper(n_voters=2)(archs.mlp(**KWARGS))
    x = torch.randn(2, 4)
    for architecture, cause in [("os:system", "standard library"), ("tests.fixtures.archs:torch.nn.Linear",
                                                                    "attribute path")]:
        with pytest.raises(ValueError, match=cause):
            save_bundle(wrapped, tmp_path / "b", architecture=architecture, example_input=x)
    assert not (tmp_path / "b" / "capsa.json").exists()


@pytest.mark.slow
def test_refusals_happen_before_any_import(good: Path, tmp_path: Path) -> None:
    """In a fresh interpreter: refused modules never reach sys.modules, and the sentinel package never records an
    import (neither the module named nor its parents); the positive controls show that the witnesses work."""
    found = attacks(good, tmp_path)
    smtp = hostile(good, tmp_path / "smtp", "smtplib:SMTP", {"host": "127.0.0.1"})
    cases = [
        (str(smtp), None), (str(found["popen"][0]), ["tests.fixtures"]),
        (str(found["walk"][0]), [SENTINEL]), (str(found["local-payload"][0]), [SENTINEL, "tests.fixtures"]),
        # positive controls, last: the allowed module is imported (and recorded), a walk-free factory is loaded
        (str(found["reexport-system"][0]), [SENTINEL]),
    ]
    probe = textwrap.dedent(
        """
        import json, os, sys
        from capsa.bundle import BundleError, load_bundle

        log, out = os.environ["CAPSA_TEST_IMPORT_LOG"], []
        for path, allowed in json.loads(sys.argv[1]):
            try:
                load_bundle(path, allowed_modules=allowed)
                refused = None
            except BundleError as exc:
                refused = str(exc)
            out.append({"refused": refused, "smtplib": "smtplib" in sys.modules,
                        "local": sorted(m for m in sys.modules if m.startswith("capsa_bundle_")),
                        "log": open(log).read().split() if os.path.exists(log) else []})
        print(json.dumps(out))
        """
    )
    stdout = run_python(probe, json.dumps(cases), env={"CAPSA_TEST_IMPORT_LOG": str(tmp_path / "imports.log")})
    smtp_case, popen_case, walk_case, local_case, reexport_case = json.loads(stdout.strip().splitlines()[-1])
    for case in (smtp_case, popen_case, walk_case, local_case):
        assert case["refused"] and "nothing of it was imported" in case["refused"], case
        assert case["log"] == [] and case["local"] == [] and not case["smtplib"], case
    assert reexport_case["refused"] and "imported, not called" in reexport_case["refused"]
    assert reexport_case["log"] == [SENTINEL, f"{SENTINEL}.reexport"]
    assert not any(marker.exists() for _, marker in found.values())


# ---------------------------------------------------------------------------------------------- the lists
def test_narrowing_never_widens() -> None:
    assert narrow_allowed(["tests.fixtures"], None) == ["tests.fixtures"]
    assert narrow_allowed(None, ["x"]) == ["x"]
    assert narrow_allowed(["tests"], ["tests.fixtures.archs", "architecture", "subprocess"]) == [
        "tests.fixtures.archs"
    ]
    assert narrow_allowed(["tests.fixtures.archs"], ["tests"]) == ["tests.fixtures.archs"]
    assert narrow_allowed(["acme"], ["acme.m:build", "other:f"]) == ["acme.m:build"]
    assert narrow_allowed(["acme.m:build"], ["acme"]) == ["acme.m:build"]
    assert narrow_allowed(["acme.m:build"], ["acme.m:other"]) == []
    assert narrow_allowed(["acme"], []) == []


def test_allow_list_text() -> None:
    assert parse_allowed_modules(" acme.models, architecture ,,x:f ") == ["acme.models", "architecture", "x:f"]
    assert parse_allowed_modules("") == []
    with pytest.raises(ValueError, match=r"^CAPSA_ALLOWED_MODULES: 'acme\.\.m' is not a dotted module name"):
        parse_allowed_modules("ok,acme..m", setting="CAPSA_ALLOWED_MODULES")
    assert architecture_refusal("acme:x", []).endswith("outside allowed_modules (empty: nothing is allowed); "
                                                        "add 'acme' to allowed_modules to allow it")
    assert architecture_refusal("os:system", ["os"]) == ""  # the standard library when a list names it


# ---------------------------------------------------------------------------------------------- files
@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside any bundle whose digest must not leak."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("root:x:0:0:the content of a local file\n")
    return path


@pytest.mark.parametrize("name", ["model.safetensors", "capsa.json"])
def test_symlinked_files_are_refused_not_followed(good: Path, tmp_path: Path, secret: Path, name: str) -> None:
    path = tmp_path / "b"
    shutil.copytree(good, path)
    target = secret if name == "model.safetensors" else good / name  # capsa.json: even a valid one elsewhere
    (path / name).unlink()
    (path / name).symlink_to(target)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    for read in (load_bundle, check_bundle):
        with pytest.raises(BundleError, match=rf"^{path}: {name} is a symbolic link; bundle files must be regular"):
            read(path)
    if name == "model.safetensors":
        info = inspect_bundle(path)
        assert info["checksum"] == "missing" and "symbolic link" in info["checksum_detail"]
        assert digest not in json.dumps(info)


def test_symlinked_architecture_file_is_refused(good: Path, tmp_path: Path) -> None:
    code = tmp_path / "elsewhere.py"
    code.write_text("from tests.fixtures.archs import mlp\n")
    path = hostile(good, tmp_path / "b", "architecture:mlp", KWARGS)
    (path / "architecture.py").symlink_to(code)
    with pytest.raises(BundleError, match=r"architecture\.py is a symbolic link"):
        load_bundle(path, allowed_modules=["architecture", "tests.fixtures"])
    assert inspect_bundle(path)["architecture_file"] is False  # inspect still answers (it runs no code)


def test_a_fifo_is_refused_without_blocking(good: Path, tmp_path: Path) -> None:
    path = tmp_path / "b"
    shutil.copytree(good, path)
    (path / "model.safetensors").unlink()
    os.mkfifo(path / "model.safetensors")
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            check_bundle(path)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "reading a FIFO blocked the reader"
    assert isinstance(outcome[0], BundleError) and "model.safetensors is not a regular file" in str(outcome[0])
