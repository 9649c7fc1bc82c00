"""``capsa-serve --demo`` on a read-only filesystem: where the demo registry goes, and the one-line error when
nothing is writable. (The real read-only container runs in tests/container.)

Tests run as root here, so "not writable" is made with a path below a regular file (mkdir fails with ENOTDIR),
which no permission bit can bypass.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest

from service import cli, demo


@pytest.fixture
def blocked(tmp_path: Path) -> Path:
    """A path nothing can be created under."""
    wall = tmp_path / "regular-file"
    wall.write_text("not a directory\n")
    return wall / "cache"


def test_writable_cache_dir_is_used(tmp_path: Path) -> None:
    root = demo.writable_demo_root(str(tmp_path / "cache"))
    assert root == tmp_path / "cache" / "demo"
    assert root.is_dir() and not any(root.iterdir()), "the write probe must not be left behind"


def test_unwritable_cache_dir_falls_back_to_the_temporary_directory(
    tmp_path: Path, blocked: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="capsa.serve.demo"):
        root = demo.writable_demo_root(str(blocked))
    assert root == tmp_path / "tmp" / "capsa-serve" / "demo"
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and str(blocked / "demo") in warning[0].not_writable  # type: ignore[attr-defined]


def test_a_built_demo_is_served_without_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A demo registry built earlier (or baked into an image) is used as it is: reading is enough."""
    cache = tmp_path / "cache"
    manifest = cache / "demo" / demo.DEMO_MODEL / "1" / "capsa.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    monkeypatch.setattr(demo, "_writable_reason", lambda root: pytest.fail(f"probed {root} for writing"))
    assert demo.writable_demo_root(str(cache)) == cache / "demo"


def test_nothing_writable_is_one_clear_error_line(
    tmp_path: Path, blocked: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: an OSError traceback from the training child, then a CalledProcessError traceback."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "regular-file" / "tmp"))
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(blocked))
    monkeypatch.setenv("CAPSA_LOG_LEVEL", "error")
    status = cli.main(["--demo", "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    # The JSON log goes to stderr too: keep only what is not a log line.
    plain = [line for line in err if not line.startswith("{")]
    assert status == 1
    assert len(plain) == 1, err
    assert str(blocked / "demo") in plain[0] and str(tmp_path / "regular-file" / "tmp") in plain[0], plain[0]
    assert "Not a directory" in plain[0] and "--tmpfs /tmp" in plain[0] and "CAPSA_CACHE_DIR" in plain[0]
    assert not any("Traceback" in line for line in err)
    for line in err:
        if line.startswith("{"):
            assert json.loads(line).get("level") != "error" or "exc" not in json.loads(line)
