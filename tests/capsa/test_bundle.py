"""Bundles: exact round trips in a fresh process, every failure named, allowed_modules refusing before import."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import capsa
from capsa import neo, sample, sculpt, vote
from capsa.bundle import (
    DATATYPES,
    BundleError,
    architecture_allowed,
    check_bundle,
    datatype_of,
    inspect_bundle,
    load_bundle,
    read_manifest,
    save_bundle,
)
from capsa.manifest import DATATYPE_NAMES
from tests.fixtures import archs

REPO = Path(__file__).resolve().parents[2]
ARCHS = "tests.fixtures.archs"

WRAPPERS: dict[str, Callable[[], capsa.Wrapper]] = {
    "sculpt": lambda: sculpt.Wrapper(distribution=sculpt.Normal),
    "sample": lambda: sample.Wrapper(n_samples=4, distribution=sample.Bernoulli(0.2)),
    "vote": lambda: vote.Wrapper(n_voters=3),
    "neo": lambda: neo.Wrapper(),
    "vote-classification": lambda: vote.Wrapper(n_voters=3, task="classification"),
    "sample-classification": lambda: sample.Wrapper(n_samples=3, task="classification"),
}
#: (wrapper, family) pairs of the round trip: every wrapper on every family, plus integer-token classifiers.
CASES = [(w, f) for w in ("sculpt", "sample", "vote", "neo") for f in archs.FAMILIES] + [
    ("vote-classification", "tokens"),
    ("sample-classification", "tokens"),
    ("neo", "tokens"),
]
TOKENS = ("TokenClassifier", {"vocab_size": 20, "dim": 8, "num_classes": 3}, (5,))


def family_input(family: str, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if family == "tokens":
        return torch.randint(0, 20, (batch, *TOKENS[2]), generator=generator)
    return torch.randn(batch, *archs.FAMILIES[family][2], generator=generator)


def build_wrapped(wrapper: str, family: str, seed: int = 0) -> tuple[nn.Module, str, dict[str, Any]]:
    """A wrapped model with non-trivial state everywhere: lazy params created, BN statistics updated, params moved."""
    factory, kwargs, _ = TOKENS if family == "tokens" else archs.FAMILIES[family]
    torch.manual_seed(seed)
    wrapped = WRAPPERS[wrapper]()(getattr(archs, factory)(**kwargs))
    wrapped.train()
    with torch.no_grad():
        for step in range(3):
            wrapped(family_input(family, 16, seed + step))
        for parameter in wrapped.parameters():
            if parameter.requires_grad:  # trainable ones only: running statistics may be frozen parameters
                parameter.add_(0.05 * torch.randn_like(parameter))
    return wrapped, f"{ARCHS}:{factory}", kwargs


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """Run ``code`` in a fresh interpreter (repository on sys.path); return stdout, fail with stderr."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


#: Loads every bundle named in argv[1] (a JSON list) in this fresh process, with pickle and torch.load disabled,
#: and writes prediction and risk for each bundle's inputs.safetensors into outputs.safetensors.
LOADER = textwrap.dedent(
    """
    import json, pickle, sys
    import torch
    from safetensors.torch import load_file, save_file

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle must never be unpickled")

    torch.load = pickle.load = pickle.loads = refuse
    from capsa.bundle import load_bundle

    for path in json.loads(sys.argv[1]):
        wrapped = load_bundle(path)
        assert not wrapped.training
        x = load_file(f"{path}/../inputs.safetensors")["x"]
        with torch.no_grad():
            y, risk = wrapped(x, return_risk=True)
        save_file({"y": y.contiguous(), "risk": risk.contiguous()}, f"{path}/../outputs.safetensors")
    print(json.dumps(sorted(m for m in sys.modules if m == "architecture" or m.startswith("capsa_bundle_"))))
    """
)


def _local_architecture(offset: float) -> str:
    return textwrap.dedent(
        f"""
        from torch import nn

        OFFSET = {offset}

        class Net(nn.Module):
            def __init__(self, width=6):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU())
                self.head = nn.Linear(width, 2)

            def forward(self, x):
                return self.head(self.body(x)) + OFFSET
        """
    )


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Save every case here, load all of them in one fresh process; return the expected and loaded outputs."""
    base = tmp_path_factory.mktemp("round_trip")
    expected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    bundles: list[str] = []

    def save_case(case: str, wrapped: nn.Module, x_example: torch.Tensor, x_test: torch.Tensor, **kwargs: Any) -> None:
        bundle = base / case / "bundle"
        save_bundle(wrapped, bundle, example_input=x_example, **kwargs)
        wrapped.eval()
        with torch.no_grad():
            expected[case] = wrapped(x_test, return_risk=True)
        save_file({"x": x_test.contiguous()}, base / case / "inputs.safetensors")
        bundles.append(str(bundle))

    for wrapper, family in CASES:
        wrapped, architecture, kwargs = build_wrapped(wrapper, family)
        save_case(
            f"{wrapper}-{family}",
            wrapped,
            family_input(family, 4, 10),
            family_input(family, 9, 11),
            architecture=architecture,
            kwargs=kwargs,
            metadata={"case": f"{wrapper}-{family}"},
        )
    # Two bundles carrying different code under the same file and factory names load side by side.
    for offset in (0.0, 100.0):
        code = base / f"arch-{offset}.py"
        code.write_text(_local_architecture(offset))
        module: dict[str, Any] = {}
        exec(compile(code.read_text(), str(code), "exec"), module)
        torch.manual_seed(1)
        wrapped = vote.Wrapper(n_voters=2)(module["Net"](width=6))
        save_case(
            f"local-{int(offset)}",
            wrapped,
            torch.randn(3, 4),
            torch.randn(5, 4),
            architecture="architecture:Net",
            kwargs={"width": 6},
            architecture_file=code,
        )
    stdout = run_python(LOADER, json.dumps(bundles))
    loaded = {case: load_file(base / case / "outputs.safetensors") for case in expected}
    return {
        "base": base,
        "expected": expected,
        "loaded": loaded,
        "modules": json.loads(stdout.strip().splitlines()[-1]),
    }


@pytest.mark.slow
@pytest.mark.parametrize(("wrapper", "family"), CASES, ids=[f"{w}-{f}" for w, f in CASES])
def test_round_trip_in_fresh_process(round_trip: dict[str, Any], wrapper: str, family: str) -> None:
    case = f"{wrapper}-{family}"
    y, risk = round_trip["expected"][case]
    loaded = round_trip["loaded"][case]
    torch.testing.assert_close(loaded["y"], y, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded["risk"], risk, rtol=0, atol=1e-6)
    assert read_manifest(round_trip["base"] / case / "bundle").metadata == {"case": case}


@pytest.mark.slow
def test_bundle_local_architectures_load_side_by_side(round_trip: dict[str, Any]) -> None:
    for case in ("local-0", "local-100"):
        y, risk = round_trip["expected"][case]
        torch.testing.assert_close(round_trip["loaded"][case]["y"], y, rtol=0, atol=1e-6)
        torch.testing.assert_close(round_trip["loaded"][case]["risk"], risk, rtol=0, atol=1e-6)
    difference = round_trip["loaded"]["local-100"]["y"] - round_trip["loaded"]["local-0"]["y"]
    assert difference.min() > 50  # each bundle ran its own code
    modules = round_trip["modules"]
    assert "architecture" not in modules and len(modules) == 2


def test_local_architectures_in_one_process(tmp_path: Path) -> None:
    outputs = []
    for offset in (0.0, 7.0):
        code = tmp_path / f"net{offset}.py"
        code.write_text(_local_architecture(offset))
        namespace: dict[str, Any] = {}
        exec(compile(code.read_text(), str(code), "exec"), namespace)
        torch.manual_seed(0)
        wrapped = neo.Wrapper()(namespace["Net"]())
        save_bundle(
            wrapped,
            tmp_path / f"b{offset}",
            architecture="Net",
            example_input=torch.randn(2, 4),
            architecture_file=code,
        )
        assert read_manifest(tmp_path / f"b{offset}").architecture == "architecture:Net"
        assert (tmp_path / f"b{offset}" / "architecture.py").read_text() == code.read_text()
    x = torch.randn(3, 4)
    for offset in (0.0, 7.0):
        with torch.no_grad():
            outputs.append(load_bundle(tmp_path / f"b{offset}")(x))
    torch.testing.assert_close(outputs[1] - outputs[0], torch.full_like(outputs[0], 7.0))
    assert "architecture" not in sys.modules


# ---------------------------------------------------------------------------------------------- what is saved
@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A vote-wrapped MLP bundle that failure tests copy and damage."""
    path = tmp_path_factory.mktemp("base") / "bundle"
    torch.manual_seed(0)
    wrapped = vote.Wrapper(n_voters=3)(archs.mlp(in_features=8, hidden=16, out_features=2))
    save_bundle(
        wrapped,
        path,
        architecture=f"{ARCHS}:mlp",
        kwargs={"in_features": 8, "hidden": 16, "out_features": 2},
        example_input=torch.randn(4, 8),
        metadata={"owner": "tests", "nested": {"a": [1, 2]}},
    )
    return path, wrapped


def test_manifest_content(base_bundle: tuple[Path, nn.Module]) -> None:
    path, wrapped = base_bundle
    manifest = json.loads((path / "capsa.json").read_text())
    assert set(manifest) == {
        "format_version",
        "architecture",
        "kwargs",
        "wrapper",
        "inputs",
        "outputs",
        "weights_sha256",
        "torch_version",
        "capsa_version",
        "metadata",
    }
    assert manifest["format_version"] == 1
    assert manifest["architecture"] == "tests.fixtures.archs:mlp"
    assert manifest["kwargs"] == {"in_features": 8, "hidden": 16, "out_features": 2}
    assert manifest["wrapper"] == wrapped.wrapper.to_spec() == {**manifest["wrapper"], "wrapper": "vote", "n_voters": 3}
    assert manifest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert manifest["outputs"] == [
        {"name": "prediction", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "risk", "datatype": "FP32", "shape": [-1, 2]},
    ]
    assert manifest["weights_sha256"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["torch_version"] == torch.__version__ and manifest["capsa_version"] == capsa.__version__
    assert manifest["metadata"] == {"owner": "tests", "nested": {"a": [1, 2]}}
    assert sorted(p.name for p in path.iterdir()) == ["capsa.json", "model.safetensors"]
    weights = load_file(path / "model.safetensors")
    assert weights.keys() == wrapped.state_dict().keys()
    assert any(k.startswith("capsa.") for k in weights) and "0.weight" in weights
    assert check_bundle(path).architecture == manifest["architecture"]


def test_state_dict_key_order_survives(round_trip: dict[str, Any]) -> None:
    """safetensors stores tensors in its own order; a loaded model sees the saved state dict's key order."""
    for wrapper, family in CASES:
        wrapped, _, _ = build_wrapped(wrapper, family)
        loaded = load_bundle(round_trip["base"] / f"{wrapper}-{family}" / "bundle")
        assert list(loaded.state_dict()) == list(wrapped.state_dict()), (wrapper, family)


def test_token_bundle_records_int64_input(round_trip: dict[str, Any]) -> None:
    manifest = read_manifest(round_trip["base"] / "vote-classification-tokens" / "bundle")
    assert [s.model_dump() for s in manifest.inputs] == [{"name": "input", "datatype": "INT64", "shape": [-1, 5]}]
    assert manifest.outputs[0].shape == [-1, 3] and DATATYPES[manifest.outputs[0].datatype] == torch.float32


def test_datatypes() -> None:
    assert set(DATATYPES) == {"FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL"}
    assert set(DATATYPES) == set(DATATYPE_NAMES)
    for name, dtype in DATATYPES.items():
        assert datatype_of(dtype) == name
    with pytest.raises(ValueError, match="no V2 datatype"):
        datatype_of(torch.complex64)


def test_save_creates_lazy_state_without_changing_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = archs.cnn()
    wrapped = sculpt.Wrapper(distribution=sculpt.Normal)(model)
    assert list(wrapped.capsa_parameters()) == []
    running_mean = model.stem[1].running_mean.clone()
    wrapped.train()
    model.block.bn1.eval()  # a user's frozen BatchNorm stays frozen
    save_bundle(wrapped, tmp_path / "b", architecture=f"{ARCHS}:cnn", example_input=torch.randn(2, 3, 8, 8))
    assert wrapped.training and model.stem[1].training and not model.block.bn1.training  # modes restored
    assert list(wrapped.capsa_parameters())
    assert torch.equal(model.stem[1].running_mean, running_mean)  # the example ran in eval mode


class TiedMLP(nn.Module):
    """Two layers sharing one weight tensor (safetensors refuses shared storage unless the saver clones)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_shared_and_non_contiguous_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wrapped = vote.Wrapper(n_voters=2)(TiedMLP())
    with torch.no_grad():
        wrapped.model.head.weight.data = wrapped.model.head.weight.data.t().contiguous().t()  # (1, 4) view
    save_bundle(wrapped, tmp_path / "b", architecture=f"{__name__}:TiedMLP", example_input=torch.randn(2, 4))
    loaded = load_bundle(tmp_path / "b")
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, return_risk=True), wrapped.eval()(x, return_risk=True), rtol=0, atol=0)
    assert loaded.model.a.weight is loaded.model.b.weight


def test_resave_replaces_files(tmp_path: Path) -> None:
    code = tmp_path / "net.py"
    code.write_text(_local_architecture(1.0))
    namespace: dict[str, Any] = {}
    exec(compile(code.read_text(), str(code), "exec"), namespace)
    wrapped = vote.Wrapper(n_voters=2)(namespace["Net"]())
    save_bundle(wrapped, tmp_path / "b", architecture="Net", example_input=torch.randn(2, 4), architecture_file=code)
    # the same directory re-saved with an importable architecture loses the stale architecture.py
    wrapped = vote.Wrapper(n_voters=2)(archs.mlp(in_features=4))
    save_bundle(
        wrapped, tmp_path / "b", architecture=f"{ARCHS}:mlp", kwargs={"in_features": 4}, example_input=torch.randn(2, 4)
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["capsa.json", "model.safetensors"]
    load_bundle(tmp_path / "b")


def test_never_unpickles(base_bundle: tuple[Path, nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("unpickling")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refuse)
    path, wrapped = base_bundle
    loaded = load_bundle(path)
    assert not loaded.training and capsa.is_wrapped(loaded)
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, return_risk=True), wrapped.eval()(x, return_risk=True), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- save refusals
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"wrapped": "plain"}, "expected a capsa-wrapped model"),
        ({"architecture": "tests.fixtures.archs"}, "is not of the form"),
        ({"architecture": "tests.fixtures.archs:mlp:x"}, "is not of the form"),
        ({"architecture": "tests/fixtures:mlp"}, "is not of the form"),
        ({"architecture": "tests.fixtures.nonexistent:mlp"}, "cannot import architecture.*ModuleNotFoundError"),
        ({"architecture": "tests.fixtures.archs:nonexistent"}, "cannot import architecture.*AttributeError"),
        ({"architecture": "tests.fixtures.archs:FAMILIES"}, "not a class or function"),
        ({"architecture": "architecture:mlp"}, "pass architecture_file"),
        ({"kwargs": {"in_features": 8, "hidden": 99}}, r"differs.*mis-shaped keys: '0.bias' is \[32\], the model has"),
        ({"kwargs": {"in_features": 8, "depth": 3}}, "state dict differs.*missing keys"),
        ({"kwargs": {"bogus": 1}}, "failed: TypeError"),
        ({"kwargs": {"x": object()}}, "kwargs must be JSON-serialisable"),
        ({"kwargs": [1]}, "kwargs must be a dict"),
        ({"metadata": {"x": float("nan")}}, "metadata must be JSON-serialisable"),
        ({"example_input": [1.0]}, "example_input must be a tensor"),
        ({"architecture_file": "nope.py", "architecture": "architecture:f"}, "cannot read architecture_file"),
        ({"architecture_file": __file__, "architecture": f"{ARCHS}:mlp"}, "must be 'architecture:factory'"),
    ],
)
def test_save_refuses(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    torch.manual_seed(0)
    model = archs.mlp(in_features=8, hidden=32)
    arguments: dict[str, Any] = {
        "architecture": f"{ARCHS}:mlp",
        "kwargs": {"in_features": 8, "hidden": 32},
        "example_input": torch.randn(2, 8),
    }
    wrapped = model if change.pop("wrapped", None) == "plain" else vote.Wrapper(n_voters=2)(model)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        save_bundle(wrapped, tmp_path / "b", **arguments)
    assert not (tmp_path / "b" / "capsa.json").exists()


# ---------------------------------------------------------------------------------------------- load failures
def _edit_manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        manifest = json.loads((path / "capsa.json").read_text())
        edit(manifest)
        (path / "capsa.json").write_text(json.dumps(manifest))

    return apply


def _write_weights(path: Path, data: bytes) -> None:
    (path / "model.safetensors").write_bytes(data)
    _edit_manifest(lambda m: m.update(weights_sha256=hashlib.sha256(data).hexdigest()))(path)


def _edit_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        weights = load_file(path / "model.safetensors")
        edit(weights)
        save_file(weights, path / "tmp.safetensors")
        _write_weights(path, (path / "tmp.safetensors").read_bytes())
        (path / "tmp.safetensors").unlink()

    return apply


def _capsa_key(weights: dict[str, torch.Tensor]) -> str:
    return sorted(k for k in weights if k.startswith("capsa."))[0]


def _set(key: str, value: Any) -> Callable[[Path], None]:
    return _edit_manifest(lambda m: m.update({key: value}))


def _flip_byte(path: Path) -> None:
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))


def _replace(name: str, content: str | None) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        (path / name).unlink()
        if content == "<dir>":
            (path / name).mkdir()
        elif content is not None:
            (path / name).write_text(content)

    return apply


def _local(code: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        (path / "architecture.py").write_text(code)
        _set("architecture", "architecture:mlp")(path)

    return apply


FAILURES: dict[str, tuple[Callable[[Path], None], dict[str, Any], str]] = {
    "missing-manifest": (_replace("capsa.json", None), {}, "missing capsa.json"),
    "unreadable-manifest": (_replace("capsa.json", "<dir>"), {}, "cannot read capsa.json"),
    "malformed-json": (_replace("capsa.json", '{"format_version": 1,'), {}, "capsa.json is not valid JSON"),
    "json-not-object": (_replace("capsa.json", "[1]"), {}, "must hold a JSON object"),
    "unknown-format-version": (_set("format_version", 2), {}, "format_version 2; this capsa reads format version 1"),
    "no-format-version": (_edit_manifest(lambda m: m.pop("format_version")), {}, "has no format_version"),
    "missing-key": (_edit_manifest(lambda m: m.pop("metadata")), {}, "metadata: missing key"),
    "extra-key": (_set("comment", "hi"), {}, "comment: unknown key"),
    "bad-datatype": (
        _edit_manifest(lambda m: m["inputs"][0].update(datatype="FP33")),
        {},
        "inputs.0.datatype: unknown datatype 'FP33'",
    ),
    "bad-shape": (_edit_manifest(lambda m: m["inputs"][0].update(shape=[-2, 8])), {}, "inputs.0.shape"),
    "bad-kwargs-type": (_set("kwargs", [1]), {}, "kwargs: "),
    "bad-sha-format": (_set("weights_sha256", "abc"), {}, "weights_sha256: expected 64 lowercase hex digits"),
    "bad-architecture-format": (_set("architecture", "no_colon"), {}, "architecture: 'no_colon' is not of the form"),
    "missing-weights": (_replace("model.safetensors", None), {}, "missing model.safetensors"),
    "unreadable-weights": (_replace("model.safetensors", "<dir>"), {}, "cannot read model.safetensors"),
    "checksum-mismatch": (_flip_byte, {}, "checksum mismatch"),
    "truncated-weights": (
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:100]),
        {},
        "checksum mismatch",
    ),
    "not-safetensors": (lambda p: _write_weights(p, b"\x00" * 64), {}, "not a valid safetensors file"),
    "missing-user-key": (_edit_weights(lambda w: w.pop("0.weight")), {}, "missing keys '0.weight'"),
    "extra-user-key": (
        _edit_weights(lambda w: w.update({"9.weight": torch.zeros(2)})),
        {},
        "unexpected keys '9.weight'",
    ),
    "misshaped-user-key": (
        _edit_weights(lambda w: w.update({"0.bias": torch.zeros(3)})),
        {},
        r"mis-shaped keys: '0.bias' is \[3\], the model has \[16\]",
    ),
    "missing-capsa-key": (_edit_weights(lambda w: w.pop(_capsa_key(w))), {}, "does not fit the wrapped model.*capsa"),
    "extra-capsa-key": (
        _edit_weights(lambda w: w.update({"capsa.bogus": torch.zeros(1)})),
        {},
        "does not fit the wrapped model.*bogus",
    ),
    "misshaped-capsa-key": (
        _edit_weights(lambda w: w.update({_capsa_key(w): torch.zeros(1, 1, 1, 1)})),
        {},
        "does not fit the wrapped model",
    ),
    "no-capsa-keys": (
        _edit_weights(lambda w: [w.pop(k) for k in [k for k in w if k.startswith("capsa.")]]),
        {},
        "does not fit the wrapped model.*no 'capsa.' keys",
    ),
    "other-wrapper": (
        _set("wrapper", {"wrapper": "sculpt", "version": 1}),
        {},
        "does not fit the wrapped model",
    ),
    "unknown-wrapper": (_set("wrapper", {"wrapper": "nope", "version": 1}), {}, "unknown wrapper 'nope'"),
    "bad-wrapper-spec": (
        _edit_manifest(lambda m: m["wrapper"].update(n_voters=0)),
        {},
        "wrapper spec .* is not usable",
    ),
    "wrapper-spec-not-named": (
        _set("wrapper", {"n_voters": 3}),
        {},
        'wrapper: the wrapper spec needs a string "wrapper"',
    ),
    "not-allowed": (lambda p: None, {"allowed_modules": ["acme"]}, "is not allowed: module 'tests.fixtures.archs'"),
    "not-allowed-prefix": (
        lambda p: None,
        {"allowed_modules": ["tests.fixtures.arch"]},
        "outside allowed_modules",
    ),
    "bad-allowed-modules": (lambda p: None, {"allowed_modules": ["a..b"]}, "is not a dotted module name"),
    "module-not-importable": (
        _set("architecture", "tests.fixtures.nonexistent:mlp"),
        {},
        "not importable: ModuleNotFoundError",
    ),
    "attribute-missing": (_set("architecture", f"{ARCHS}:nonexistent"), {}, "not importable: AttributeError"),
    "not-callable": (_set("architecture", f"{ARCHS}:FAMILIES"), {}, "the factory is a dict, not a class or function"),
    "factory-raises": (_set("architecture", f"{ARCHS}:broken"), {}, "failed: RuntimeError: this factory always fails"),
    "factory-not-module": (_set("architecture", f"{ARCHS}:not_a_module"), {}, "returned dict, not an nn.Module"),
    "bad-kwargs": (_edit_manifest(lambda m: m["kwargs"].update(bogus=1)), {}, "failed: TypeError"),
    "wrong-kwargs": (
        _edit_manifest(lambda m: m["kwargs"].update(hidden=17)),
        {},
        "does not fit tests.fixtures.archs:mlp: mis-shaped keys",
    ),
    "local-architecture-missing": (_set("architecture", "architecture:mlp"), {}, "missing architecture.py"),
    "local-architecture-broken": (_local("def mlp(:\n"), {}, "not importable: SyntaxError"),
    "local-architecture-raises": (_local("raise ImportError('boom')\n"), {}, "not importable: ImportError: boom"),
    "local-not-allowed": (
        _local("from tests.fixtures.archs import mlp\n"),
        {"allowed_modules": ["tests"]},
        "bundle-local code \\(module 'architecture'.* is outside allowed_modules \\['tests'\\]",
    ),
    "bad-device": (lambda p: None, {"device": "nodevice"}, "cannot move the model to 'nodevice'"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_load_failures_name_path_and_cause(tmp_path: Path, base_bundle: tuple[Path, nn.Module], case: str) -> None:
    damage, arguments, cause = FAILURES[case]
    path = tmp_path / "bundle"
    shutil.copytree(base_bundle[0], path)
    damage(path)
    with pytest.raises(BundleError) as info:
        load_bundle(path, **arguments)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(f"{path}: "), message
    assert re.search(cause, message), message


@pytest.mark.parametrize(
    ("make", "cause"),
    [(lambda p: None, "bundle directory does not exist"), (lambda p: p.write_text("x"), "not a directory")],
)
def test_load_failures_on_the_path_itself(tmp_path: Path, make: Callable[[Path], Any], cause: str) -> None:
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(BundleError, match=rf"^{re.escape(str(path))}: {cause}"):
        load_bundle(str(path))
    with pytest.raises(BundleError, match=rf"^{re.escape(str(path))}: {cause}"):
        inspect_bundle(path)


def test_local_architecture_allowed_as_architecture(tmp_path: Path, base_bundle: tuple[Path, nn.Module]) -> None:
    path = tmp_path / "bundle"
    shutil.copytree(base_bundle[0], path)
    _local("from tests.fixtures.archs import mlp\n")(path)
    # The factory is defined in tests.fixtures.archs, not in the bundle's code: that module must be allowed too.
    with pytest.raises(BundleError, match=r"defined in 'tests\.fixtures\.archs', which is outside allowed_modules"):
        load_bundle(path, allowed_modules=["architecture"])
    assert capsa.is_wrapped(load_bundle(path, allowed_modules=["architecture", "tests.fixtures.archs"]))


def test_architecture_allowed_prefixes() -> None:
    assert architecture_allowed("acme.models", ["acme.models"])
    assert architecture_allowed("acme.models.x", ["acme.models"])
    assert architecture_allowed("acme.models.x.y", ["other", "acme"])
    assert not architecture_allowed("acme.modelsx", ["acme.models"])
    assert not architecture_allowed("acme", ["acme.models"])
    assert not architecture_allowed("architecture", [])
    assert architecture_allowed("anything", None)
    assert not architecture_allowed("os", None) and not architecture_allowed("importlib.util", None)
    assert architecture_allowed("os", ["os"])  # the standard library only when a list names it
    assert architecture_allowed("acme.m", ["acme.m:build"], "build")
    assert not architecture_allowed("acme.m", ["acme.m:build"], "other")
    assert architecture_allowed("acme.x", "acme")
    with pytest.raises(ValueError, match="not a dotted module name"):
        architecture_allowed("x", ["acme."])


def test_reads_one_bundle_even_when_swapped_mid_read(tmp_path: Path, base_bundle: tuple[Path, nn.Module]) -> None:
    """A bundle replaced by rename while being read (a registry's --force) is read whole, never mixed."""
    from capsa.bundle import _BundleDir

    path = tmp_path / "bundle"
    shutil.copytree(base_bundle[0], path)
    other = tmp_path / "other"
    shutil.copytree(base_bundle[0], other)
    _edit_weights(lambda w: w.update({"0.bias": w["0.bias"] + 1}))(other)
    with _BundleDir(path) as reader:
        manifest = reader.read("capsa.json")
        os.rename(path, tmp_path / "aside")
        os.rename(other, path)
        weights = reader.read("model.safetensors")
    assert json.loads(manifest)["weights_sha256"] == hashlib.sha256(weights).hexdigest()


# ---------------------------------------------------------------------------------------------- allowed_modules
SENTINEL = "tests.fixtures.sentinel_pkg.archs:mlp"
PROBE = textwrap.dedent(
    """
    import json, os, sys
    from capsa.bundle import BundleError, load_bundle

    path, allowed = sys.argv[1], json.loads(sys.argv[2])
    result = {}
    try:
        load_bundle(path, allowed_modules=allowed)
        result["refused"] = None
    except BundleError as exc:
        result["refused"] = str(exc)
    result["modules"] = sorted(m for m in sys.modules if m == "tests" or m.startswith(("tests.", "capsa_bundle_")))
    log = os.environ["CAPSA_TEST_IMPORT_LOG"]
    result["log"] = open(log).read().split() if os.path.exists(log) else []
    print(json.dumps(result))
    """
)


def _probe(path: Path, allowed: list[str] | None, log: Path) -> dict[str, Any]:
    stdout = run_python(PROBE, str(path), json.dumps(allowed), env={"CAPSA_TEST_IMPORT_LOG": str(log)})
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_module_outside_allowed_modules_is_never_imported(tmp_path: Path) -> None:
    from tests.fixtures.sentinel_pkg import archs as sentinel

    torch.manual_seed(0)
    save_bundle(
        vote.Wrapper(n_voters=2)(sentinel.mlp()), tmp_path / "b", architecture=SENTINEL, example_input=torch.randn(2, 4)
    )
    code = tmp_path / "code.py"
    code.write_text(
        "import os\nif 'CAPSA_TEST_IMPORT_LOG' in os.environ:\n"
        "    open(os.environ['CAPSA_TEST_IMPORT_LOG'], 'a').write('architecture\\n')\n"
        "from tests.fixtures.archs import mlp\n"
    )
    save_bundle(
        vote.Wrapper(n_voters=2)(archs.mlp(in_features=4)),
        tmp_path / "local",
        architecture="mlp",
        kwargs={"in_features": 4},
        example_input=torch.randn(2, 4),
        architecture_file=code,
    )
    code.unlink()

    for allowed in (["tests.fixtures.archs"], ["tests.fixtures.sentinel"], ["architecture"], []):
        result = _probe(tmp_path / "b", allowed, tmp_path / f"log-{len(allowed)}-{allowed[:1]}")
        assert result["refused"] and "is not allowed" in result["refused"], result
        assert result["log"] == [] and result["modules"] == [], result  # nor any parent package
    result = _probe(tmp_path / "local", ["tests"], tmp_path / "log-local")
    assert result["refused"] and result["log"] == [] and result["modules"] == [], result

    # Positive controls: the sentinel does record its import when allowed.
    result = _probe(tmp_path / "b", ["tests.fixtures.sentinel_pkg"], tmp_path / "log-ok")
    assert result["refused"] is None
    assert result["log"] == ["tests.fixtures.sentinel_pkg", "tests.fixtures.sentinel_pkg.archs"]
    result = _probe(tmp_path / "local", ["architecture", "tests.fixtures.archs"], tmp_path / "log-local-ok")
    assert result["refused"] is None and result["log"] == ["architecture"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda(base_bundle: tuple[Path, nn.Module]) -> None:
    path, wrapped = base_bundle
    loaded = load_bundle(path, device="cuda")
    assert all(p.is_cuda for p in loaded.parameters())
    x = torch.randn(6, 8)
    with torch.no_grad():
        y, risk = loaded(x.cuda(), return_risk=True)
        y_cpu, risk_cpu = copy.deepcopy(wrapped).eval()(x, return_risk=True)
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(risk.cpu(), risk_cpu, rtol=1e-4, atol=1e-5)
