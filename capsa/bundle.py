"""Model bundles: a directory from which a wrapped model is rebuilt exactly, anywhere, without pickle.

A bundle holds

- ``model.safetensors``: the wrapped model's full state dict (user keys and ``capsa.`` keys);
- ``capsa.json``: how to rebuild it (architecture ``"package.module:factory"``, its ``kwargs``, the wrapper
  spec), the input/output signature (KServe V2 datatypes, ``-1`` for the batch dimension), the SHA-256 of the
  weights, versions and free-form metadata;
- optionally ``architecture.py``: the model code itself (then ``architecture`` is ``"architecture:factory"``).

`load_bundle` does the "wrap first, then load" rule by machine: import the architecture, build it, wrap it with
the recorded spec, load the weights strictly. It verifies the checksum before it parses the weights, reads each
file once (through a handle on the directory, so a bundle swapped in place is read whole or not at all) and
never unpickles anything. Every failure is a `BundleError` whose message starts with the bundle path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from capsa.manifest import (
    _ARCH_RE,
    ARCHITECTURE_FILE,
    CALIBRATION_FILE,
    FORMAT_VERSION,
    KEY_ORDER,
    LOCAL_MODULE,
    MANIFEST_FILE,
    V2_DATATYPES,
    WEIGHTS_FILE,
    BundleError,
    BundleManifest,
    TensorSpec,
    _BundleDir,
    _check_weights,
    _describe,
    _normalise_allowed,
    _safetensors_header,
    architecture_allowed,
    architecture_refusal,
    check_bundle,
    check_calibration_file,
    parse_manifest,
    read_manifest,
)

if TYPE_CHECKING:
    from capsa._wrapper import WrappedModel
    from capsa.calibration import Calibration

__all__ = [
    "ARCHITECTURE_FILE",
    "DATATYPES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "BundleError",
    "BundleManifest",
    "TensorSpec",
    "architecture_allowed",
    "check_bundle",
    "datatype_of",
    "inspect_bundle",
    "load_bundle",
    "parse_manifest",
    "read_manifest",
    "save_bundle",
]

#: The torch dtype of each KServe V2 datatype a signature may name (from `capsa.manifest.V2_DATATYPES`).
DATATYPES: dict[str, torch.dtype] = {
    name: getattr(torch, dt.torch) for name, dt in V2_DATATYPES.items() if dt.torch is not None
}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}

def datatype_of(dtype: torch.dtype) -> str:
    """The V2 datatype name of a torch dtype (``torch.float32`` -> ``"FP32"``); `ValueError` if unsupported."""
    try:
        return _DATATYPE_OF[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no V2 datatype (supported: {', '.join(DATATYPES)})") from None


def _in_saved_order(state: dict[str, Tensor], header: Mapping[str, Any]) -> dict[str, Tensor]:
    """The loaded tensors in the state dict's original key order (as recorded at save time), when known."""
    metadata = header.get("__metadata__") or {}
    try:
        order = json.loads(metadata.get(KEY_ORDER, "null"))
    except (TypeError, ValueError):
        return state
    if not isinstance(order, list) or sorted(order) != sorted(state):
        return state
    return {key: state[key] for key in order}


def inspect_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``capsa inspect`` shows, without importing or running the bundle's code.

    Returns the manifest fields plus ``checksum`` (``"ok"``, ``"mismatch"`` or ``"missing"``),
    ``checksum_detail``, ``architecture_file`` (whether ``architecture.py`` is present) and ``parameters`` /
    ``tensors`` (``{"user": n, "capsa": n}`` element and tensor counts from the weights file, buffers such as
    BatchNorm statistics included; ``None`` when the weights file is missing or unreadable).
    Raises `BundleError` only when ``capsa.json`` itself is missing or invalid.
    """
    with _BundleDir(path) as bundle:
        manifest = parse_manifest(bundle.read(MANIFEST_FILE), source=bundle.source)
        info: dict[str, Any] = {"path": bundle.source, **manifest.model_dump(mode="json")}
        try:  # a symlink or other non-regular file is not the bundle's code (load_bundle refuses it)
            info["architecture_file"] = bool(bundle.read(ARCHITECTURE_FILE, required=False))
        except BundleError:
            info["architecture_file"] = False
        info["parameters"] = info["tensors"] = None
        try:
            weights = bundle.read(WEIGHTS_FILE)
        except BundleError as exc:
            info["checksum"], info["checksum_detail"] = "missing", str(exc)
            return info
    actual = hashlib.sha256(weights).hexdigest()
    if actual == manifest.weights_sha256:
        info["checksum"], info["checksum_detail"] = "ok", f"sha256 {actual}"
    else:
        info["checksum"] = "mismatch"
        info["checksum_detail"] = (
            f"{WEIGHTS_FILE} has sha256 {actual}, {MANIFEST_FILE} records {manifest.weights_sha256}"
        )
    try:
        header = _safetensors_header(weights)
        counts = {"user": 0, "capsa": 0}
        tensors = {"user": 0, "capsa": 0}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            part = "capsa" if key.startswith("capsa.") else "user"
            counts[part] += math.prod(entry["shape"])
            tensors[part] += 1
        info["parameters"], info["tensors"] = counts, tensors
    except (ValueError, KeyError, TypeError) as exc:
        info["checksum_detail"] += f"; cannot read the safetensors header: {exc}"
    return info


# ---------------------------------------------------------------------------------------------- architecture code
def _local_module_name(code: bytes) -> str:
    """A module name unique to this code, so that bundles with different ``architecture.py`` never clash."""
    return f"capsa_bundle_{hashlib.sha256(code).hexdigest()[:20]}_architecture"


def _exec_local_architecture(code: bytes, file: Path) -> Any:
    """Execute bundle-local code (the bytes already read) as its own module, registered under a unique name."""
    name = _local_module_name(code)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None:
        raise ImportError(f"cannot make a module spec for {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(compile(code, str(file), "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _factory_refusal(
    obj: Any, architecture: str, allowed_modules: Iterable[str] | str | None, *, local_name: str | None = None
) -> str:
    """Why an imported factory may not be called ('' if it may): it must be a class or a Python function whose
    ``__module__`` is itself allowed (so an allowed module cannot re-export ``os.system``); a class must be an
    ``nn.Module`` subclass. ``local_name`` is the unique module name bundle-local code was executed under."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return f"architecture {architecture!r}: the factory is a {type(obj).__name__}, not a class or function"
    defined_in = getattr(obj, "__module__", None)
    if not isinstance(defined_in, str):
        return f"architecture {architecture!r}: the factory has no defining module"
    if local_name is not None and defined_in == local_name:
        defined_in = LOCAL_MODULE
    entries = _normalise_allowed(allowed_modules)
    prefixes = None if entries is None else [e.partition(":")[0] for e in entries]
    if not architecture_allowed(defined_in, prefixes):
        return (
            f"architecture {architecture!r} is not allowed: the factory is defined in {defined_in!r}, which is "
            f"outside {_describe(entries, 'allowed_modules')}"
        )
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        return f"architecture {architecture!r}: the factory is the class {obj.__name__}, not an nn.Module"
    return ""


class _Refused(Exception):
    """An imported factory the allow-list refuses to call (the message says why)."""


def _resolve_factory(
    module: Any, architecture: str, allowed: list[str] | None, *, local_name: str | None = None
) -> Callable[..., Any]:
    """The factory named by ``architecture`` (one plain name, already checked), if it may be called."""
    obj: Callable[..., Any] = getattr(module, architecture.partition(":")[2])  # callable: _factory_refusal
    problem = _factory_refusal(obj, architecture, allowed, local_name=local_name)
    if problem:
        raise _Refused(problem)
    return obj


def _state_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}


def _compare_keys(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]) -> str:
    """Human text naming missing, extra and mis-shaped keys ('' when they agree)."""

    def some(keys: Sequence[str]) -> str:
        shown = ", ".join(repr(k) for k in keys[:8])
        return shown + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    shaped = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    problems = []
    if missing:
        problems.append(f"missing keys {some(missing)}")
    if extra:
        problems.append(f"unexpected keys {some(extra)}")
    if shaped:
        shown = ", ".join(f"{k!r} is {list(actual[k])}, the model has {list(expected[k])}" for k in shaped[:8])
        problems.append(f"mis-shaped keys: {shown}" + (f" and {len(shaped) - 8} more" if len(shaped) > 8 else ""))
    return "; ".join(problems)


# ---------------------------------------------------------------------------------------------- save
def _tensors_for_saving(wrapped: nn.Module) -> dict[str, Tensor]:
    """The state dict as CPU tensors safetensors accepts: contiguous, and no two sharing storage."""
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in wrapped.state_dict().items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu")
        if tensor.is_meta:
            raise ValueError(f"state_dict entry {key!r} is a meta tensor (not materialised)")
        pointer = tensor.untyped_storage().data_ptr()
        if pointer and pointer in seen:
            tensor = tensor.clone()
        elif pointer:
            seen.add(pointer)
        tensors[key] = tensor.contiguous()
    return tensors


def _signature(name: str, tensor: Any) -> dict[str, Any]:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise ValueError(f"{name}: a 0-d tensor has no batch dimension")
    return {"name": name, "datatype": datatype_of(tensor.dtype), "shape": [-1, *tensor.shape[1:]]}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_object(what: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON round trip of ``value``: what the loading side will see (tuples become lists)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps(dict(value), allow_nan=False))  # a dict in, a dict out
        return copied
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


def save_bundle(
    wrapped: WrappedModel,
    path: str | os.PathLike[str],
    *,
    architecture: str,
    kwargs: Mapping[str, Any] | None = None,
    example_input: Tensor,
    metadata: Mapping[str, Any] | None = None,
    architecture_file: str | os.PathLike[str] | None = None,
    calibration: Calibration | None = None,
) -> Path:
    """Write ``wrapped`` as a bundle directory at ``path`` (created if needed) and return the path.

    ``architecture`` is ``"package.module:factory"`` such that ``factory(**kwargs)`` builds the user's model
    (before wrapping); with ``architecture_file`` that file is copied in as ``architecture.py`` and
    ``architecture`` is ``"architecture:factory"`` (or just ``"factory"``). ``example_input`` (batch first) runs
    through the model in eval mode without gradients, creating capsa's lazy parameters and recording the
    signature. Refuses (`ValueError`) a model that is not wrapped, an architecture that cannot be imported, or
    one whose ``factory(**kwargs)`` builds a model with other state-dict keys or shapes. ``calibration`` (from
    `capsa.calibrate` on this model) is stored too: its record in ``capsa.json``, its arrays in
    ``calibration.safetensors``, bound to these weights by their SHA-256.
    """
    import capsa  # the package imports this module

    if not capsa.is_wrapped(wrapped):
        raise ValueError(
            f"save_bundle: expected a capsa-wrapped model (e.g. capsa.vote.Wrapper()(model)), "
            f"got {type(wrapped).__name__}"
        )
    if not isinstance(example_input, Tensor):
        raise ValueError(f"save_bundle: example_input must be a tensor, got {type(example_input).__name__}")
    if architecture_file is not None and ":" not in architecture:
        architecture = f"{LOCAL_MODULE}:{architecture}"
    match = _ARCH_RE.match(architecture) if isinstance(architecture, str) else None
    if not match:
        raise ValueError(f"save_bundle: architecture {architecture!r} is not of the form 'package.module:factory'")
    module_name = match.group(1)
    kwargs = _json_object("save_bundle: kwargs", kwargs)
    metadata = _json_object("save_bundle: metadata", metadata)

    code = b""
    if architecture_file is not None:
        if module_name != LOCAL_MODULE:
            raise ValueError(
                f"save_bundle: with architecture_file the architecture must be '{LOCAL_MODULE}:factory', "
                f"got {architecture!r}"
            )
        try:
            code = Path(architecture_file).read_bytes()
        except OSError as exc:
            raise ValueError(f"save_bundle: cannot read architecture_file {architecture_file}: {exc}") from None
    elif module_name == LOCAL_MODULE:
        raise ValueError(f"save_bundle: architecture {architecture!r} names bundle-local code; pass architecture_file")
    refusal = architecture_refusal(architecture, None)  # what load_bundle would refuse by default
    if refusal:
        raise ValueError(f"save_bundle: {refusal}")
    try:
        if architecture_file is not None:
            module = _exec_local_architecture(code, Path(architecture_file).resolve())
        else:
            module = importlib.import_module(module_name)
        local = module.__name__ if architecture_file is not None else None
        factory = _resolve_factory(module, architecture, None, local_name=local)
    except _Refused as exc:
        raise ValueError(f"save_bundle: {exc}") from None
    except Exception as exc:
        raise ValueError(
            f"save_bundle: cannot import architecture {architecture!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if architecture_file is None:
        from capsa._locality import warn_if_only_importable_here

        warn_if_only_importable_here(module_name, architecture)

    # Record the signature; the first call also creates capsa's lazy parameters.
    first = next(itertools.chain(wrapped.user_parameters(), wrapped.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    modes = {module: module.training for module in wrapped.modules()}
    wrapped.eval()
    try:
        with torch.no_grad():
            result = wrapped(example_input.to(device), return_risk=True)
    finally:  # restore each module's mode; modules the call created take the wrapped model's
        for module in wrapped.modules():
            module.training = modes.get(module, modes[wrapped])
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError("save_bundle: wrapped(x, return_risk=True) did not return (prediction, risk)")
    inputs = [_signature("input", example_input)]
    prediction, risk = result
    if isinstance(risk, capsa.Risk):  # a composed model: risk is the total, each component is its own output
        outputs = [_signature("prediction", prediction), _signature("risk", risk.total)]
        outputs += [_signature(f"risk_{kind}", value) for kind, value in risk.components().items()]
    else:
        outputs = [_signature("prediction", prediction), _signature("risk", risk)]

    if calibration is not None:
        _check_calibration_fits(calibration, prediction, wrapped)

    tensors = _tensors_for_saving(wrapped)
    user_shapes = _state_shapes({k: v for k, v in tensors.items() if not k.startswith("capsa.")})
    try:
        built = factory(**kwargs)
    except Exception as exc:
        raise ValueError(f"save_bundle: {architecture}(**{kwargs}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(built, nn.Module):
        raise ValueError(f"save_bundle: {architecture}(**kwargs) returned {type(built).__name__}, not an nn.Module")
    differs = _compare_keys(_state_shapes(built.state_dict()), user_shapes)
    if differs:
        raise ValueError(
            f"save_bundle: {architecture}(**{kwargs}) builds a model whose state dict differs from the wrapped "
            f"model's: {differs} (keys as the checkpoint names them)"
        )

    from safetensors.torch import save as safetensors_save

    # safetensors stores tensors in its own order; the key order of the state dict travels in the metadata.
    weights = safetensors_save(tensors, metadata={"format": "pt", KEY_ORDER: json.dumps(list(tensors))})
    record, calibration_data = (None, b"")
    if calibration is not None:
        record, calibration_data = calibration.to_parts(weights_sha256=hashlib.sha256(weights).hexdigest())
    manifest = BundleManifest(
        format_version=FORMAT_VERSION,
        architecture=architecture,
        kwargs=kwargs,
        wrapper=wrapped.wrapper.to_spec(),
        inputs=[TensorSpec(**s) for s in inputs],
        outputs=[TensorSpec(**s) for s in outputs],
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        torch_version=str(torch.__version__),
        capsa_version=str(capsa.__version__),
        metadata=metadata,
        calibration=record,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # capsa.json goes first and comes back last: a half-written bundle has no manifest and reads as absent.
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST_FILE).unlink()
    _write_atomic(out / WEIGHTS_FILE, weights)
    if architecture_file is not None:
        _write_atomic(out / ARCHITECTURE_FILE, code)
    else:
        with contextlib.suppress(FileNotFoundError):
            (out / ARCHITECTURE_FILE).unlink()
    if calibration is not None:
        _write_atomic(out / CALIBRATION_FILE, calibration_data)
    else:
        with contextlib.suppress(FileNotFoundError):
            (out / CALIBRATION_FILE).unlink()
    text = manifest_text(manifest)
    _write_atomic(out / MANIFEST_FILE, text.encode())
    return out


def manifest_text(manifest: BundleManifest) -> str:
    """``capsa.json``'s text; an uncalibrated bundle's has no ``calibration`` key (as before calibration existed)."""
    exclude = {"calibration"} if manifest.calibration is None else set()
    return json.dumps(manifest.model_dump(mode="json", exclude=exclude), indent=2, allow_nan=False) + "\n"


def _check_calibration_fits(calibration: Calibration, prediction: Tensor, wrapped: WrappedModel) -> None:
    """Refuse (`ValueError`) a calibration made for another kind of model."""
    from capsa.calibration import Calibration, _task_of

    if not isinstance(calibration, Calibration):
        raise ValueError(f"save_bundle: calibration must be a capsa.Calibration, got {type(calibration).__name__}")
    task, _ = _task_of(wrapped)
    if calibration.task != task or calibration.output_shape != tuple(prediction.shape[1:]):
        raise ValueError(
            f"save_bundle: the calibration is for {calibration.task} outputs of shape [N, "
            f"{', '.join(map(str, calibration.output_shape))}], the model gives {task} outputs of shape "
            f"{[-1, *prediction.shape[1:]]}; calibrate this model (capsa.calibrate)"
        )


# ---------------------------------------------------------------------------------------------- load
def load_bundle(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    allowed_modules: Iterable[str] | None = None,
) -> WrappedModel:
    """Rebuild the wrapped model of a bundle: on ``device``, in eval mode, ready to call.

    Order of work, each step failing with a `BundleError` naming the path and the cause: read and validate
    ``capsa.json``; refuse an architecture outside ``allowed_modules`` (dotted prefixes; bundle-local code is
    the module ``"architecture"``) before anything of it is imported; verify the SHA-256 of the weights before
    parsing them; rebuild the wrapper from its spec; import the architecture and build it with ``kwargs``; wrap;
    load the weights strictly; move to ``device``. A calibrated bundle's calibration (checked against its own
    and the weights' SHA-256) is ``wrapped.calibration``; it is None for an uncalibrated bundle.
    """
    from safetensors.torch import load as safetensors_load

    import capsa  # the package imports this module

    source = str(path)
    try:
        allowed = _normalise_allowed(allowed_modules)
    except ValueError as exc:
        raise BundleError(f"{source}: {exc}") from None
    with _BundleDir(path) as bundle:
        manifest = parse_manifest(bundle.read(MANIFEST_FILE), source=source)
        refusal = architecture_refusal(manifest.architecture, allowed)
        if refusal:
            raise BundleError(f"{source}: {refusal} (nothing of it was imported)")
        weights = bundle.read(WEIGHTS_FILE)
        code = bundle.read(ARCHITECTURE_FILE) if manifest.local_architecture else b""
        calibration_data = bundle.read(CALIBRATION_FILE) if manifest.calibration is not None else b""
    _check_weights(source, manifest, weights)
    calibration = _restore_calibration(source, manifest, calibration_data)
    try:
        state = _in_saved_order(safetensors_load(weights), _safetensors_header(weights))
    except Exception as exc:
        raise BundleError(f"{source}: {WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    del weights

    try:
        wrapper = capsa.from_spec(manifest.wrapper)
    except Exception as exc:
        raise BundleError(f"{source}: wrapper spec {manifest.wrapper} is not usable: {exc}") from None

    try:
        if manifest.local_architecture:
            module = _exec_local_architecture(code, Path(path).resolve() / ARCHITECTURE_FILE)
        else:
            module = importlib.import_module(manifest.module)
        local = module.__name__ if manifest.local_architecture else None
        factory = _resolve_factory(module, manifest.architecture, allowed, local_name=local)
    except _Refused as exc:
        raise BundleError(f"{source}: {exc} (imported, not called)") from None
    except Exception as exc:
        raise BundleError(
            f"{source}: architecture {manifest.architecture!r} is not importable: {type(exc).__name__}: {exc}"
        ) from None
    try:
        model = factory(**manifest.kwargs)
    except Exception as exc:
        raise BundleError(
            f"{source}: building {manifest.architecture}(**{manifest.kwargs}) failed: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise BundleError(
            f"{source}: {manifest.architecture}(**kwargs) returned {type(model).__name__}, not an nn.Module"
        )

    user_state = {k: v for k, v in state.items() if not k.startswith("capsa.")}
    differs = _compare_keys(_state_shapes(model.state_dict()), _state_shapes(user_state))
    if differs:
        raise BundleError(f"{source}: {WEIGHTS_FILE} does not fit {manifest.architecture}: {differs}")
    try:
        wrapped = wrapper(model)
    except Exception as exc:
        raise BundleError(f"{source}: wrapping with {manifest.wrapper} failed: {type(exc).__name__}: {exc}") from None
    try:
        wrapped.load_state_dict(state, strict=True)
    except Exception as exc:
        raise BundleError(f"{source}: {WEIGHTS_FILE} does not fit the wrapped model: {exc}") from None
    try:
        wrapped.to(device)
    except Exception as exc:
        raise BundleError(f"{source}: cannot move the model to {device!r}: {type(exc).__name__}: {exc}") from None
    wrapped.calibration = calibration
    return wrapped.eval()


def _restore_calibration(source: str, manifest: BundleManifest, data: bytes) -> Calibration | None:
    """The bundle's `capsa.Calibration`, or None; a `BundleError` if it does not belong to these weights."""
    if manifest.calibration is None:
        return None
    from capsa.calibration import Calibration

    check_calibration_file(source, manifest, data)
    try:
        calibration = Calibration.from_parts(manifest.calibration, data, source=source)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    if calibration.weights_sha256 != manifest.weights_sha256:
        raise BundleError(
            f"{source}: the calibration was made for weights with SHA-256 {calibration.weights_sha256}, not these "
            f"({manifest.weights_sha256}); calibrate again (capsa calibrate)"
        )
    return calibration
