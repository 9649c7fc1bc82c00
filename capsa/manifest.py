"""The bundle manifest (``capsa.json``) and the checks that need no torch: parsing, checksum, allowed modules.

Split from `capsa.bundle` so that readers of a registry (the server's HTTP process, `capsa inspect`) can validate
bundles without importing torch or any model code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "ARCHITECTURE_FILE",
    "CALIBRATION_FILE",
    "DATATYPE_NAMES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "SERVED_DATATYPES",
    "V2_DATATYPES",
    "WEIGHTS_FILE",
    "BundleError",
    "BundleManifest",
    "Datatype",
    "TensorSpec",
    "architecture_allowed",
    "architecture_refusal",
    "check_allowed_entry",
    "check_bundle",
    "check_calibration_file",
    "narrow_allowed",
    "parse_allowed_modules",
    "parse_manifest",
    "read_manifest",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "capsa.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.py"
#: A calibrated bundle's calibration arrays (`capsa.calibration`); its record is ``capsa.json``'s ``calibration``.
CALIBRATION_FILE = "calibration.safetensors"
#: safetensors metadata entry holding the state dict's key order (JSON list).
KEY_ORDER = "capsa_key_order"
#: The module name bundle-local code has (for ``architecture`` strings and ``allowed_modules``).
LOCAL_MODULE = "architecture"



class Datatype(NamedTuple):
    """How capsa carries one KServe V2 datatype (`V2_DATATYPES`)."""

    #: The numpy dtype string of its little-endian elements on the wire; None: numpy has none (BF16).
    numpy: str | None
    #: The torch dtype's attribute name (``torch.<name>``); None: a bundle's signature may not use it.
    torch: str | None


#: The one table of KServe V2 datatypes (torch-free): `capsa.bundle` derives its torch dtypes from it, the server
#: (`service.protocol`) its numpy dtypes. A datatype without a numpy dtype can be saved in a bundle but not served.
V2_DATATYPES: dict[str, Datatype] = {
    "FP32": Datatype("<f4", "float32"),
    "FP64": Datatype("<f8", "float64"),
    "FP16": Datatype("<f2", "float16"),
    "BF16": Datatype(None, "bfloat16"),
    "INT64": Datatype("<i8", "int64"),
    "INT32": Datatype("<i4", "int32"),
    "INT16": Datatype("<i2", "int16"),
    "INT8": Datatype("|i1", "int8"),
    "UINT8": Datatype("|u1", "uint8"),
    "BOOL": Datatype("|b1", "bool"),
    "UINT16": Datatype("<u2", None),
    "UINT32": Datatype("<u4", None),
    "UINT64": Datatype("<u8", None),
}

#: KServe V2 datatype names a bundle's signature may use.
DATATYPE_NAMES: tuple[str, ...] = tuple(name for name, dt in V2_DATATYPES.items() if dt.torch is not None)
#: The datatypes the server can decode and encode (those with a numpy dtype).
SERVED_DATATYPES: tuple[str, ...] = tuple(name for name, dt in V2_DATATYPES.items() if dt.numpy is not None)

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ARCH_RE = re.compile(rf"^({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)$")
_IDENT_RE = re.compile(rf"^{_IDENT}$")
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
    """The validated content of ``capsa.json`` (exactly these keys, all required but ``calibration``, which only
    calibrated bundles have: the `capsa.Calibration` record, its arrays in ``calibration.safetensors``)."""

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
    calibration: dict[str, Any] | None = None

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
        calibration = [CALIBRATION_FILE] if self.calibration is not None else []
        return [WEIGHTS_FILE, *([ARCHITECTURE_FILE] if self.local_architecture else []), *calibration, MANIFEST_FILE]


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
# Which code a bundle may name. An allow-list entry is a dotted module prefix (``"acme.models"`` allows
# ``acme.models`` and ``acme.models.x``, not ``acme.modelsx``) or one exact factory (``"acme.models:build"``).
# Bundle-local code is the module ``"architecture"``. ``None`` is the library's default for a user's own process:
# any module except the standard library's. Whatever the list, the factory is one plain public name (no attribute
# walks such as ``m:nn.functional.torch.os.system``), and once imported it must be a class or function defined in
# an allowed module (`capsa.bundle` checks that), a class being an ``nn.Module`` subclass.
_ENTRY_RE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*(?::{_IDENT})?$")
_PUBLIC_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_allowed_entry(entry: object) -> str:
    """``entry`` if it is an allow-list entry (a dotted module name or ``"package.module:factory"``), else
    `ValueError` naming it."""
    if not isinstance(entry, str) or not _ENTRY_RE.match(entry):
        raise ValueError(f"{entry!r} is not a dotted module name (or 'package.module:factory')")
    return entry


def _normalise_allowed(allowed_modules: Iterable[str] | str | None) -> list[str] | None:
    if allowed_modules is None:
        return None
    entries = [allowed_modules] if isinstance(allowed_modules, str) else list(allowed_modules)
    try:
        return [check_allowed_entry(entry) for entry in entries]
    except ValueError as exc:
        raise ValueError(f"allowed_modules: {exc}") from None


def parse_allowed_modules(text: str, *, setting: str = "allowed_modules") -> list[str]:
    """A comma-separated allow-list (as in ``CAPSA_ALLOWED_MODULES``) as a list; `ValueError` names ``setting``."""
    entries = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return _normalise_allowed(entries) or []
    except ValueError as exc:
        raise ValueError(f"{setting}: {str(exc).removeprefix('allowed_modules: ')}") from None


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def is_stdlib(module: str) -> bool:
    """Whether ``module`` belongs to Python's standard library (``os``, ``subprocess``, ``importlib.util``...)."""
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def architecture_allowed(
    module: str, allowed_modules: Iterable[str] | str | None, factory: str | None = None
) -> bool:
    """Whether an allow-list lets ``module`` (and, for exact entries, ``module:factory``) be imported.

    A prefix entry allows the module and its submodules; an exact entry ``"m:f"`` allows ``m`` only for the
    factory ``f``. ``None`` allows everything but the standard library (which a list must name to allow).
    """
    entries = _normalise_allowed(allowed_modules)
    if entries is None:
        return not is_stdlib(module)
    for entry in entries:
        prefix, _, exact = entry.partition(":")
        if exact:
            if module == prefix and factory in (None, exact):
                return True
        elif _under(module, prefix):
            return True
    return False


def narrow_allowed(
    outer: Iterable[str] | str | None, inner: Iterable[str] | str | None
) -> list[str] | None:
    """The intersection of two allow-lists (what both allow), e.g. the operator's list narrowed by a model's
    ``config.json``: narrowing never widens. ``None`` (no list) leaves the other list as it is."""
    a, b = _normalise_allowed(outer), _normalise_allowed(inner)
    if a is None or b is None:
        return b if a is None else a
    result: list[str] = []
    for x in a:
        for y in b:
            (xm, _, xf), (ym, _, yf) = x.partition(":"), y.partition(":")
            if xf and yf:
                both = x if x == y else None
            elif xf:
                both = x if _under(xm, ym) else None
            elif yf:
                both = y if _under(ym, xm) else None
            else:
                both = x if _under(x, y) else y if _under(y, x) else None
            if both is not None and both not in result:
                result.append(both)
    return result


def _describe(entries: list[str] | None, setting: str) -> str:
    if entries is None:
        return f"{setting} (not set: any module outside the standard library)"
    return f"{setting} {entries}" if entries else f"{setting} (empty: nothing is allowed)"


def architecture_refusal(
    architecture: str, allowed_modules: Iterable[str] | str | None, *, setting: str = "allowed_modules"
) -> str:
    """Why ``architecture`` (``"module:factory"``) may not be imported under the allow-list ('' if it may).

    Decided from the string alone, before anything is imported. ``setting`` names where the list comes from
    (``CAPSA_ALLOWED_MODULES`` on a server), so that the message says what would allow the module.
    """
    entries = _normalise_allowed(allowed_modules)
    module, _, factory = architecture.partition(":")
    if not _IDENT_RE.match(factory):
        return (
            f"architecture {architecture!r} is not allowed: the factory {factory!r} is an attribute path; a factory "
            f"is one name defined in its module (e.g. 'acme.models:build'), attribute walks are refused"
        )
    if not _PUBLIC_RE.match(factory):
        return f"architecture {architecture!r} is not allowed: the factory {factory!r} is private (starts with '_')"
    if architecture_allowed(module, entries, factory):
        return ""
    if entries is None:
        return (
            f"architecture {architecture!r} is not allowed: module {module!r} is in Python's standard library, "
            f"which runs only when {setting} names it"
        )
    what = f"module {module!r}"
    if module == LOCAL_MODULE:
        what = f"bundle-local code ({what}, the bundle's {ARCHITECTURE_FILE})"
    return (
        f"architecture {architecture!r} is not allowed: {what} is outside {_describe(entries, setting)}; "
        f"add {module!r} to {setting} to allow it"
    )


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
        """The whole file; `BundleError` if missing (when required) or unreadable; ``b""`` if optional and absent.

        Only a regular file inside the bundle is read: a symbolic link is refused, never followed (it could
        point outside the registry, and a checksum message would then disclose a digest of that file), and so
        is anything else that is not a regular file (a FIFO would block the reader).
        """
        try:
            if self._fd is not None:
                flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                fd = os.open(name, flags, dir_fd=self._fd)
            else:
                if (self.path / name).is_symlink():
                    raise OSError(errno.ELOOP, "symbolic link")
                fd = os.open(self.path / name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise BundleError(f"{self.source}: {name} is not a regular file")
                return f.read()
        except FileNotFoundError:
            if not required:
                return b""
            raise BundleError(f"{self.source}: missing {name}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BundleError(
                    f"{self.source}: {name} is a symbolic link; bundle files must be regular files inside the "
                    "bundle (links are not followed)"
                ) from None
            raise BundleError(f"{self.source}: cannot read {name}: {exc.strerror or exc}") from None


def _check_weights(source: str, manifest: BundleManifest, weights: bytes) -> None:
    actual = hashlib.sha256(weights).hexdigest()
    if actual != manifest.weights_sha256:
        raise BundleError(
            f"{source}: checksum mismatch: {WEIGHTS_FILE} has SHA-256 {actual}, {MANIFEST_FILE} records "
            f"{manifest.weights_sha256} (the weights were changed or truncated)"
        )


def check_calibration_file(source: str, manifest: BundleManifest, data: bytes) -> None:
    """A calibrated bundle's ``calibration.safetensors`` must be the one its record names (SHA-256)."""
    recorded = (manifest.calibration or {}).get("tensors_sha256")
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise BundleError(
            f"{source}: checksum mismatch: {CALIBRATION_FILE} has SHA-256 {actual}, {MANIFEST_FILE} records "
            f"{recorded!r} (the calibration was changed or truncated)"
        )


def check_bundle(path: str | os.PathLike[str]) -> BundleManifest:
    """Validate a bundle without importing or running anything: manifest, files present, weights checksum."""
    with _BundleDir(path) as bundle:
        manifest = parse_manifest(bundle.read(MANIFEST_FILE), source=bundle.source)
        _check_weights(bundle.source, manifest, bundle.read(WEIGHTS_FILE))
        if manifest.local_architecture:
            bundle.read(ARCHITECTURE_FILE)
        if manifest.calibration is not None:
            check_calibration_file(bundle.source, manifest, bundle.read(CALIBRATION_FILE))
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
