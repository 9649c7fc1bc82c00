"""The model registry's layout and publishing into it (torch-free; ``capsa publish`` and the server share it).

Layout (as in Triton's model repositories)::

    ROOT/<model>/config.json        optional serving settings (read by the server: service.model_config)
    ROOT/<model>/<version>/         a capsa bundle; versions are positive integers

ROOT is a local directory or any fsspec URL (``s3://bucket/prefix``). A version exists only once its ``capsa.json``
does: `publish` writes it last (S3) or renames a complete directory into place (local), so readers never see a
half-written version. The server reads the registry (service.registry); the library never imports the server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from capsa.manifest import MANIFEST_FILE, check_bundle

__all__ = ["RegistryError", "check_name", "check_version", "publish"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")


class RegistryError(ValueError):
    """A registry operation failed: bad name or version, missing version, unreadable store, refused publish."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (``^[A-Za-z0-9][A-Za-z0-9_.-]*$``), else `RegistryError`."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


def check_version(version: int) -> int:
    """Return ``version`` if it is a positive integer, else `RegistryError`."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(f"invalid version {version!r}: versions are positive integers")
    return version


def _open_fs(root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> tuple[Any, str, bool]:
    """(filesystem, base path without trailing slash, is_local) for a registry root."""
    fs, base = url_to_fs(os.fspath(root), **dict(storage_options or {}))
    local = isinstance(fs, LocalFileSystem)
    base = base.rstrip("/") or base
    return fs, base, local


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------- publish
def publish(
    bundle: str | Path,
    root: str,
    name: str,
    version: int | None = None,
    *,
    force: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Copy a bundle into the registry as ``name``/``version`` (default: the highest version + 1); return it.

    The bundle is checked first (manifest, files, weights checksum; no code runs). Atomic for readers: locally
    the files go into ``ROOT/<name>/.tmp-<uuid>/`` which is then renamed to ``ROOT/<name>/<version>``; in an
    object store every file is uploaded with ``capsa.json`` last. An existing version is refused unless
    ``force`` (then locally the old directory is renamed aside and removed; remotely its ``capsa.json`` is
    deleted first, so readers see the version absent until the new one is complete).

    Remote stores cannot rename atomically: two processes publishing the same model at once with
    ``version=None`` may pick the same number there; give explicit versions when publishing concurrently.
    """
    check_name(name)
    if version is not None:
        check_version(version)
    manifest = check_bundle(bundle)
    sources = [Path(bundle) / f for f in manifest.files()]
    try:
        fs, base, local = _open_fs(root, storage_options)
    except (ValueError, ImportError) as exc:
        raise RegistryError(f"{root}: cannot open registry: {exc}") from None
    if local:
        return _publish_local(sources, Path(base), str(root), name, version, force)
    return _publish_remote(sources, fs, base, str(root), name, version, force)


def _int_dirs(names: list[str]) -> list[int]:
    return [int(n) for n in names if _VERSION_RE.match(n)]


def _publish_local(sources: list[Path], base: Path, root: str, name: str, version: int | None, force: bool) -> int:
    model_dir = base / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for src in sources:
            with open(src, "rb") as fin, open(tmp / src.name, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
        for _ in range(100):  # retries only when another publisher races us
            number = version if version is not None else max(_int_dirs(os.listdir(model_dir)), default=0) + 1
            target = model_dir / str(number)
            if (target / MANIFEST_FILE).exists() and not force:
                if version is None:
                    continue
                raise RegistryError(f"{root}: {name} version {number} already exists (use --force to replace it)")
            if os.path.lexists(target):
                # Replace: move the old directory aside, then the new one in (readers see old or new, whole).
                aside = model_dir / f".old-{uuid.uuid4().hex}"
                try:
                    os.rename(target, aside)
                except FileNotFoundError:
                    continue
                try:
                    os.rename(tmp, target)
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    continue
                finally:
                    shutil.rmtree(aside, ignore_errors=True)
                return number
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # someone else created it meanwhile: re-evaluate
            return number
        raise RegistryError(f"{root}: could not publish {name}: too many concurrent changes")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish_remote(
    sources: list[Path],
    fs: fsspec.AbstractFileSystem,
    base: str,
    root: str,
    name: str,
    version: int | None,
    force: bool,
) -> int:
    fs.invalidate_cache()
    model_dir = f"{base}/{name}"
    if version is None:
        try:
            names = [_basename(p) for p in fs.ls(model_dir, detail=False)]
        except FileNotFoundError:
            names = []
        version = max(_int_dirs(names), default=0) + 1
    version_dir = f"{model_dir}/{version}"
    manifest_path = f"{version_dir}/{MANIFEST_FILE}"
    if fs.exists(manifest_path) and not force:
        raise RegistryError(f"{root}: {name} version {version} already exists (use --force to replace it)")
    # Unpublish first (capsa.json goes first), then clear leftovers, so no reader mixes old and new files.
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(manifest_path)
    fs.invalidate_cache()
    try:
        old = fs.find(version_dir)
    except FileNotFoundError:
        old = []
    for path in old:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
    for src in sources:  # capsa.json is last
        fs.put_file(str(src), f"{version_dir}/{src.name}")
    fs.invalidate_cache()
    return version
