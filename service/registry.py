"""The model registry: named, versioned bundles plus per-model serving settings, on disk or in an object store.

Layout (as in Triton's model repositories)::

    ROOT/<model>/config.json        optional ModelConfig (see service.model_config)
    ROOT/<model>/<version>/         a capsa bundle; versions are positive integers

ROOT is a local directory or any fsspec URL (``s3://bucket/prefix``; S3 endpoints and credentials come from
``storage_options`` or the usual AWS environment variables such as ``AWS_ENDPOINT_URL``). A version exists only
once its ``capsa.json`` does: `publish` writes it last (S3) or renames a complete directory into place (local),
so readers never see a half-written version. A bad bundle or config makes only that model/version unavailable.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsa.manifest import (
    ARCHITECTURE_FILE,
    CALIBRATION_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    BundleError,
    BundleManifest,
    architecture_refusal,
    narrow_allowed,
    parse_manifest,
)
from capsa.registry import (  # the layout and publishing live in capsa (capsa publish); re-exported here
    _NAME_RE,
    _VERSION_RE,
    RegistryError,
    _basename,
    _open_fs,
    check_name,
    check_version,
    publish,
)
from service.model_config import ConfigError, ModelConfig

__all__ = ["AVAILABLE", "UNAVAILABLE", "Registry", "RegistryError", "VersionState", "publish"]

AVAILABLE = "AVAILABLE"
UNAVAILABLE = "UNAVAILABLE"
CONFIG_FILE = "config.json"
#: Where the operator's allow-list of code comes from (named in refusals).
ALLOWED_SETTING = "CAPSA_ALLOWED_MODULES"

_FETCH_ATTEMPTS = 3


@dataclass(frozen=True)
class VersionState:
    """One entry of `Registry.index`. ``version`` 0 stands for the model as a whole (no usable version)."""

    name: str
    version: int
    state: str  # AVAILABLE | UNAVAILABLE
    reason: str = ""


def _default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "capsa-registry-cache"


class Registry:
    """Read access to a registry at ``root`` (a local directory or an fsspec URL).

    Listings are read fresh on every call (no fsspec listing cache), so a polling server sees new versions.
    Bundles in a remote store are downloaded by `fetch` into ``cache_dir`` (default: a folder in the system
    temp directory), keyed by the content of their ``capsa.json`` and ``architecture.py``.
    ``allowed_modules`` is the operator's allow-list (``CAPSA_ALLOWED_MODULES``; see `architecture_problem`).
    """

    def __init__(
        self,
        root: str,
        *,
        cache_dir: str | Path | None = None,
        storage_options: dict[str, Any] | None = None,
        allowed_modules: list[str] | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.allowed_modules = allowed_modules
        try:
            self._fs, self._base, self._local = _open_fs(self.root, storage_options)
        except (ValueError, ImportError) as exc:
            raise RegistryError(f"{self.root}: cannot open registry: {exc}") from None
        if self._local and not os.path.isdir(self._base):
            raise RegistryError(f"{self.root}: registry root is not a directory")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    @property
    def is_local(self) -> bool:
        """Whether the registry is a local directory (fetch returns the version directory itself)."""
        return self._local

    # ------------------------------------------------------------------ paths
    def _url(self, *parts: str | int) -> str:
        """User-facing location for messages."""
        return "/".join([self.root.rstrip("/"), *map(str, parts)])

    def _path(self, *parts: str | int) -> str:
        return "/".join([self._base, *map(str, parts)])

    def _fresh(self) -> None:
        self._fs.invalidate_cache()

    # ------------------------------------------------------------------ listing
    def model_names(self) -> list[str]:
        """Names of the model directories under the root, sorted."""
        self._fresh()
        try:
            entries = self._fs.ls(self._base, detail=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RegistryError(f"{self.root}: cannot list registry: {exc}") from exc
        names = {
            _basename(e["name"])
            for e in entries
            if e.get("type") == "directory" and _NAME_RE.match(_basename(e["name"]))
        }
        return sorted(names)

    def _version_files(self, name: str) -> dict[int, dict[str, int]]:
        """version -> {file name: size} for every integer-named directory of the model (complete or not)."""
        check_name(name)
        self._fresh()
        model_dir = self._path(name)
        try:
            found = self._fs.find(model_dir, maxdepth=2, withdirs=True, detail=True)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RegistryError(f"{self._url(name)}: cannot list versions: {exc}") from exc
        versions: dict[int, dict[str, int]] = {}
        prefix = model_dir.rstrip("/") + "/"
        for path, entry in found.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].strip("/").split("/")
            if not _VERSION_RE.match(parts[0]):
                continue
            files = versions.setdefault(int(parts[0]), {})
            if len(parts) == 2 and entry.get("type") != "directory":
                files[parts[1]] = int(entry.get("size") or 0)
        return versions

    def fingerprint(self, name: str) -> str:
        """A digest of what serving ``name`` depends on, cheap enough to poll: its ``config.json`` and every file
        of its complete versions (name, size, modification time or ETag). It changes when a version is published,
        replaced or removed, or a file or the config is changed."""
        check_name(name)
        self._fresh()
        model_dir = self._path(name)
        try:
            found = self._fs.find(model_dir, maxdepth=2, withdirs=False, detail=True)
        except FileNotFoundError:
            found = {}
        except OSError as exc:
            raise RegistryError(f"{self._url(name)}: cannot list versions: {exc}") from exc
        prefix = model_dir.rstrip("/") + "/"
        rows = []
        for path, entry in found.items():
            rel = path[len(prefix) :] if path.startswith(prefix) else ""
            parts = rel.strip("/").split("/")
            if rel == CONFIG_FILE or (len(parts) == 2 and _VERSION_RE.match(parts[0])):
                stamp = entry.get("ETag") or entry.get("LastModified") or entry.get("mtime") or entry.get("created")
                rows.append(f"{rel}\0{entry.get('size')}\0{stamp}")
        complete = {r.split("/", 1)[0] for r in rows if r.split("\0", 1)[0].endswith("/" + MANIFEST_FILE)}
        rows = [r for r in rows if r.startswith(CONFIG_FILE) or r.split("/", 1)[0] in complete]
        return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()

    def versions(self, name: str) -> list[int]:
        """Versions of ``name`` present (integer directories holding ``capsa.json``), ascending; [] if none."""
        return sorted(v for v, files in self._version_files(name).items() if MANIFEST_FILE in files)

    def config(self, name: str) -> ModelConfig:
        """The model's `ModelConfig` (defaults without a ``config.json``); `ConfigError` if the file is invalid."""
        check_name(name)
        self._fresh()
        try:
            text = self._fs.cat_file(self._path(name, CONFIG_FILE))
        except FileNotFoundError:
            return ModelConfig()
        except IsADirectoryError:
            raise ConfigError(f"{self._url(name, CONFIG_FILE)}: is a directory, not a file") from None
        except OSError as exc:
            raise RegistryError(f"{self._url(name, CONFIG_FILE)}: cannot read: {exc}") from exc
        return ModelConfig.from_json(text, source=self._url(name, CONFIG_FILE))

    def served_versions(self, name: str) -> list[int]:
        """The present versions the model's version policy selects, ascending."""
        return self.config(name).select_versions(self.versions(name))

    def manifest(self, name: str, version: int) -> BundleManifest:
        """The validated ``capsa.json`` of a version (`BundleError` if invalid, `RegistryError` if missing)."""
        check_name(name)
        check_version(version)
        return parse_manifest(self._manifest_bytes(name, version), source=self._url(name, version))

    def _manifest_bytes(self, name: str, version: int) -> bytes:
        try:
            data: bytes = self._fs.cat_file(self._path(name, version, MANIFEST_FILE))  # fsspec is untyped
            return data
        except FileNotFoundError:
            raise RegistryError(f"{self.root}: model {name!r} has no version {version}") from None
        except OSError as exc:
            raise RegistryError(f"{self._url(name, version, MANIFEST_FILE)}: cannot read: {exc}") from exc

    def _problem(self, name: str, version: int, files: dict[str, int], config: ModelConfig) -> str:
        """Why a present version cannot be served ('' if it looks servable). Cheap: no weights are read."""
        try:
            manifest = self.manifest(name, version)
        except (BundleError, RegistryError) as exc:
            return str(exc)
        missing = [f for f in manifest.files() if f not in files]
        if missing:
            return f"{self._url(name, version)}: missing {', '.join(missing)}"
        if files.get(WEIGHTS_FILE, 0) == 0:
            return f"{self._url(name, version)}: {WEIGHTS_FILE} is empty"
        return self.architecture_problem(name, version, config, manifest)

    def architecture_problem(
        self, name: str, version: int, config: ModelConfig, manifest: BundleManifest | None = None
    ) -> str:
        """Why the allow-lists refuse this version's architecture ('' if they allow it); imports nothing.

        The operator's list (``allowed_modules``, i.e. ``CAPSA_ALLOWED_MODULES``) first, then the model's
        ``config.json``, which the publisher writes and which can therefore only narrow it; the message names the
        setting that refuses. An unreadable ``capsa.json`` is a problem too.
        """
        try:
            manifest = manifest or self.manifest(name, version)
        except (BundleError, RegistryError) as exc:
            return str(exc)
        lists: list[tuple[list[str] | None, str]] = [
            (self.allowed_modules, ALLOWED_SETTING),
            (config.allowed_modules, f"allowed_modules in {self._url(name, CONFIG_FILE)}"),
        ]
        default: list[tuple[list[str] | None, str]] = [(None, "allowed_modules")]
        chosen = [(a, s) for a, s in lists if a is not None] or default
        for allowed, setting in chosen:
            refusal = architecture_refusal(manifest.architecture, allowed, setting=setting)
            if refusal:
                return f"{self._url(name, version)}: {refusal}"
        return ""

    def allowed_modules_for(self, config: ModelConfig) -> list[str] | None:
        """The allow-list a worker loads this model under: the operator's, narrowed by ``config.json``."""
        return narrow_allowed(self.allowed_modules, config.allowed_modules)

    def index(self) -> list[VersionState]:
        """Every model/version with its state and reason, sorted by name and version.

        A version is AVAILABLE when the model's config is valid, the version policy selects it and its bundle
        looks servable (valid ``capsa.json``, files present, architecture inside ``allowed_modules``; the weights
        checksum is verified later, when the bundle is fetched/loaded). Problems are contained: a bad config
        marks that model's versions UNAVAILABLE, a bad bundle only its version. A model with no present version
        gets one entry with version 0.
        """
        states: list[VersionState] = []
        for name in self.model_names():
            try:
                files = self._version_files(name)
            except RegistryError as exc:
                states.append(VersionState(name, 0, UNAVAILABLE, str(exc)))
                continue
            present = sorted(v for v, f in files.items() if MANIFEST_FILE in f)
            try:
                config = self.config(name)
            except (ConfigError, RegistryError) as exc:
                states.extend(VersionState(name, v, UNAVAILABLE, str(exc)) for v in present or [0])
                continue
            if not present:
                states.append(
                    VersionState(name, 0, UNAVAILABLE, f"{self._url(name)}: no versions (no <N>/{MANIFEST_FILE})")
                )
                continue
            served = set(config.select_versions(present))
            for version in present:
                if version not in served:
                    reason = f"not selected by the version policy ({config.version_policy.describe()})"
                    states.append(VersionState(name, version, UNAVAILABLE, reason))
                    continue
                problem = self._problem(name, version, files[version], config)
                states.append(VersionState(name, version, UNAVAILABLE if problem else AVAILABLE, problem))
        return states

    # ------------------------------------------------------------------ fetch
    def fetch(self, name: str, version: int) -> Path:
        """A local directory holding the bundle of ``name``/``version``.

        Local registry: the version directory itself. Remote: a copy in ``cache_dir`` (downloaded once, moved
        into place atomically, weights checksum verified; retried if the version is replaced meanwhile).
        """
        check_name(name)
        check_version(version)
        if self._local:
            path = Path(self._path(name, version))
            if not (path / MANIFEST_FILE).is_file():
                raise RegistryError(f"{self.root}: model {name!r} has no version {version}")
            if os.path.commonpath([os.path.realpath(path), os.path.realpath(self._base)]) != os.path.realpath(
                self._base
            ):
                raise RegistryError(
                    f"{self._url(name, version)}: is a symbolic link out of the registry (refused, not followed)"
                )
            return path
        last = ""
        for _ in range(_FETCH_ATTEMPTS):
            try:
                return self._download(name, version)
            except _Changed as exc:
                last = str(exc)
        raise RegistryError(f"{self._url(name, version)}: changed during {_FETCH_ATTEMPTS} downloads: {last}")

    def _download(self, name: str, version: int) -> Path:
        self._fresh()
        source = self._url(name, version)
        manifest_bytes = self._manifest_bytes(name, version)
        try:
            manifest = parse_manifest(manifest_bytes, source=source)
        except BundleError as exc:
            raise RegistryError(str(exc)) from None
        code = b""
        if manifest.local_architecture:
            try:
                code = self._fs.cat_file(self._path(name, version, ARCHITECTURE_FILE))
            except FileNotFoundError:
                raise _Changed(f"{ARCHITECTURE_FILE} is missing") from None
        key = hashlib.sha256(manifest_bytes + b"\0" + code).hexdigest()[:32]
        target = self.cache_dir / key
        if (target / MANIFEST_FILE).is_file():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            try:
                self._fs.get_file(self._path(name, version, WEIGHTS_FILE), str(tmp / WEIGHTS_FILE))
            except FileNotFoundError:
                raise _Changed(f"{WEIGHTS_FILE} is missing") from None
            digest = _sha256_file(tmp / WEIGHTS_FILE)
            if digest != manifest.weights_sha256:
                raise _Changed(
                    f"{WEIGHTS_FILE} has SHA-256 {digest}, {MANIFEST_FILE} records {manifest.weights_sha256}"
                )
            if code:
                (tmp / ARCHITECTURE_FILE).write_bytes(code)
            if manifest.calibration is not None:  # a calibrated bundle (capsa.calibration)
                try:
                    calibration = self._fs.cat_file(self._path(name, version, CALIBRATION_FILE))
                except FileNotFoundError:
                    raise _Changed(f"{CALIBRATION_FILE} is missing") from None
                if hashlib.sha256(calibration).hexdigest() != manifest.calibration.get("tensors_sha256"):
                    raise _Changed(f"{CALIBRATION_FILE} is not the one {MANIFEST_FILE} records")
                (tmp / CALIBRATION_FILE).write_bytes(calibration)
            (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (target / MANIFEST_FILE).is_file():
                    raise
            return target
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class _Changed(Exception):
    """A remote version changed (was replaced) while being downloaded."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
