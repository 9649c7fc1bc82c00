"""The ``capsa`` command: inspect, verify and publish."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsa import sample
from capsa.bundle import save_bundle
from capsa.cli import main
from tests.fixtures import archs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "bundle"
    torch.manual_seed(0)
    wrapped = sample.Wrapper(n_samples=3)(archs.cnn(num_outputs=3))
    save_bundle(
        wrapped,
        path,
        architecture="tests.fixtures.archs:cnn",
        kwargs={"num_outputs": 3},
        example_input=torch.randn(2, 3, 8, 8),
        metadata={"owner": "cli-test"},
    )
    return path


@pytest.fixture
def damaged(tmp_path: Path, bundle: Path) -> Path:
    path = tmp_path / "damaged"
    shutil.copytree(bundle, path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    return path


def test_inspect(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "architecture: tests.fixtures.archs:cnn" in out
    assert '"wrapper": "sample"' in out and '"n_samples": 3' in out
    assert "input FP32 [-1, 3, 8, 8]" in out
    assert "prediction FP32 [-1, 3]; risk FP32 [-1, 3]" in out
    assert "parameters:" in out and "user 1," in out and "capsa " in out
    assert "checksum:     ok" in out
    assert '"owner": "cli-test"' in out


def test_inspect_json(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(bundle)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checksum"] == "ok" and info["architecture_file"] is False
    assert info["parameters"]["user"] == sum(v.numel() for v in archs.cnn(num_outputs=3).state_dict().values())
    assert info["tensors"]["user"] == len(archs.cnn(num_outputs=3).state_dict())


def test_inspect_reports_checksum_mismatch(damaged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(damaged)]) == 1
    assert "checksum:     mismatch" in capsys.readouterr().out


def test_inspect_missing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert f"{tmp_path / 'nope'}: bundle directory does not exist" in capsys.readouterr().err


def test_verify(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {bundle}: sample wrapper")


def test_verify_failures(damaged: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(damaged)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["verify", str(bundle), "--allowed-module", "acme", "--allowed-module", "tests.fixtures.arch"]) == 1
    assert "is not allowed" in capsys.readouterr().err
    assert main(["verify", str(bundle), "--allowed-module", "tests.fixtures"]) == 0


def test_verify_reports_wrong_signature(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "b"
    shutil.copytree(bundle, path)
    manifest = json.loads((path / "capsa.json").read_text())
    manifest["outputs"][1]["shape"] = [-1, 7]
    (path / "capsa.json").write_text(json.dumps(manifest))
    assert main(["verify", str(path)]) == 1
    assert "risk has shape [4, 3], the signature says [-1, 7]" in capsys.readouterr().err


def test_publish(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "registry"
    assert main(["publish", str(bundle), str(root), "cnn"]) == 0
    assert "as cnn version 1" in capsys.readouterr().out
    assert main(["publish", str(bundle), str(root), "cnn"]) == 0
    assert "as cnn version 2" in capsys.readouterr().out
    assert main(["publish", str(bundle), str(root), "cnn", "--version", "2"]) == 1
    assert "already exists (use --force" in capsys.readouterr().err
    assert main(["publish", str(bundle), str(root), "cnn", "--version", "2", "--force"]) == 0
    assert main(["publish", str(bundle), str(root), "bad/name"]) == 1
    assert "invalid model name" in capsys.readouterr().err
    assert main(["publish", str(bundle), str(root), "cnn", "--storage-options", "{oops"]) == 1
    assert sorted(p.name for p in (root / "cnn").iterdir()) == ["1", "2"]


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["inspect"])
    assert main(["verify", "x", "--batch-size", "0"]) == 2


@pytest.mark.slow
def test_console_module_in_fresh_process(bundle: Path) -> None:
    environment = {**os.environ}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    for command, code in ((["verify", str(bundle)], 0), (["inspect", str(bundle)], 0), (["verify", "/nope"], 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "capsa.cli", *command], capture_output=True, text=True, env=environment, timeout=300
        )
        assert proc.returncode == code, proc.stderr
