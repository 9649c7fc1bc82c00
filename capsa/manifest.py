"""The bundle manifest (``capsa.json``) and the checks that need no torch: parsing, checksum, allowed modules.

Split from `capsa.bundle` so that readers of a registry (the server's HTTP process, `capsa inspect`) can validate
bundles without importing torch or any model code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "ARCHITECTURE_FILE",
    "DATATYPE_NAMES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "BundleError",
    "BundleManifest",
    "TensorSpec",
    "architecture_allowed",
    "check_bundle",
    "parse_manifest",
    "read_manifest",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "capsa.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.py"
#: safetensors metadata entry holding the state dict's key order (JSON list).
KEY_ORDER = "capsa_key_order"
#: The module name bundle-local code has (for ``architecture`` strings and ``allowed_modules``).
LOCAL_MODULE = "architecture"

#: KServe V2 datatype names a bundle's signature may use.
DATATYPE_NAMES: tuple[str, ...] = ("FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL")

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ARCH_RE = re.compile(rf"^({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)$")
_MODULE_RE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    """A bundle cannot be read, verified or rebuilt; the message starts with the bundle path and names the cause."""


# ---------------------------------------------------------------------------------------------- the manifest
class TensorSpec(BaseModel):
    """One input or output of the signature: ``{"name", "datatype", "shape"}``, ``-1`` for variable dims."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(min_length=1)
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in DATATYPE_NAMES:
            raise ValueError(f"unknown datatype {value!r} (known: {', '.join(DATATYPE_NAMES)})")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < -1 for d in value):
            raise ValueError("dimensions are sizes >= 0 or -1 (variable)")
        return value


class BundleManifest(BaseModel):
    """The validated content of ``capsa.json`` (exactly these keys, all required)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format_version: int
    architecture: str
    kwargs: dict[str, Any]
    wrapper: dict[str, Any]
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    weights_sha256: str
    torch_version: str
    capsa_version: str
    metadata: dict[str, Any]

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, value: str) -> str:
        if not _ARCH_RE.match(value):
            raise ValueError(f"{value!r} is not of the form 'package.module:factory'")
        return value

    @field_validator("wrapper")
    @classmethod
    def _wrapper(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("wrapper"), str):
            raise ValueError('the wrapper spec needs a string "wrapper" (the wrapper name)')
        return value

    @field_validator("weights_sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if not _SHA_RE.match(value):
            raise ValueError("expected 64 lowercase hex digits")
        return value

    @property
    def module(self) -> str:
        """The architecture's module (``"architecture"`` for bundle-local code)."""
        return self.architecture.partition(":")[0]

    @property
    def factory(self) -> str:
        """The architecture's attribute path inside its module."""
        return self.architecture.partition(":")[2]

    @property
    def local_architecture(self) -> bool:
        """Whether the code travels inside the bundle as ``architecture.py``."""
        return self.module == LOCAL_MODULE

    def files(self) -> list[str]:
        """The bundle's files, ``capsa.json`` last (the order a publisher writes them in)."""
        return [WEIGHTS_FILE, *([ARCHITECTURE_FILE] if self.local_architecture else []), MANIFEST_FILE]


def parse_manifest(data: str | bytes, *, source: str) -> BundleManifest:
    """Parse and validate ``capsa.json`` content; `BundleError` messages start with ``source``."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{source}: {MANIFEST_FILE} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{source}: {MANIFEST_FILE} must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        what = "has no format_version" if "format_version" not in raw else f"has format_version {version!r}"
        raise BundleError(f"{source}: {MANIFEST_FILE} {what}; this capsa reads format version {FORMAT_VERSION} only")
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{source}: {MANIFEST_FILE}: {_format_validation_error(exc)}") from None


def read_manifest(path: str | os.PathLike[str]) -> BundleManifest:
    """Read and validate ``PATH/capsa.json`` (no weights, no code)."""
    with _BundleDir(path) as bundle:
        return parse_manifest(bundle.read(MANIFEST_FILE), source=bundle.source)


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "missing key"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- allowed modules
def _normalise_allowed(allowed_modules: Iterable[str] | str | None) -> list[str] | None:
    if allowed_modules is None:
        return None
    prefixes = [allowed_modules] if isinstance(allowed_modules, str) else list(allowed_modules)
    for prefix in prefixes:
        if not isinstance(prefix, str) or not _MODULE_RE.match(prefix):
            raise ValueError(f"allowed_modules: {prefix!r} is not a dotted module name")
    return prefixes


def architecture_allowed(module: str, allowed_modules: Iterable[str] | str | None) -> bool:
    """Whether ``module`` lies under one of the dotted prefixes (``"acme.models"`` allows ``acme.models.x``,
    not ``acme.modelsx``); ``None`` allows everything. Bundle-local code is the module ``"architecture"``."""
    prefixes = _normalise_allowed(allowed_modules)
    if prefixes is None:
        return True
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------------------------------------- reading files
class _BundleDir:
    """Reads a bundle's files through one handle on the directory.

    Files opened relative to the directory handle all come from the same directory even if the path is renamed
    to a newer version meanwhile (as a registry's ``--force`` publish does), so a reader never mixes two bundles.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.source = str(path)
        self._fd: int | None = None
        if not self.path.exists():
            raise BundleError(f"{self.source}: bundle directory does not exist")
        if not self.path.is_dir():
            raise BundleError(f"{self.source}: not a directory (a bundle is a directory)")
        if os.open in os.supports_dir_fd:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError as exc:
                raise BundleError(f"{self.source}: cannot open bundle directory: {exc.strerror}") from None

    def __enter__(self) -> _BundleDir:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, name: str, *, required: bool = True) -> bytes:
        """The whole file; `BundleError` if missing (when required) or unreadable; ``b""`` if optional and absent."""
        try:
            if self._fd is not None:
                fd = os.open(name, os.O_RDONLY, dir_fd=self._fd)
                with open(fd, "rb") as f:
                    return f.read()
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            if not required:
                return b""
            raise BundleError(f"{self.source}: missing {name}") from None
        except OSError as exc:
            raise BundleError(f"{self.source}: cannot read {name}: {exc.strerror or exc}") from None


def _check_weights(source: str, manifest: BundleManifest, weights: bytes) -> None:
    actual = hashlib.sha256(weights).hexdigest()
    if actual != manifest.weights_sha256:
        raise BundleError(
            f"{source}: checksum mismatch: {WEIGHTS_FILE} has SHA-256 {actual}, {MANIFEST_FILE} records "
            f"{manifest.weights_sha256} (the weights were changed or truncated)"
        )


def check_bundle(path: str | os.PathLike[str]) -> BundleManifest:
    """Validate a bundle without importing or running anything: manifest, files present, weights checksum."""
    with _BundleDir(path) as bundle:
        manifest = parse_manifest(bundle.read(MANIFEST_FILE), source=bundle.source)
        _check_weights(bundle.source, manifest, bundle.read(WEIGHTS_FILE))
        if manifest.local_architecture:
            bundle.read(ARCHITECTURE_FILE)
        return manifest


def _safetensors_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes), parsed without torch."""
    if len(data) < 8:
        raise ValueError("file shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("header length exceeds file size")
    header = json.loads(data[8 : 8 + length])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header
