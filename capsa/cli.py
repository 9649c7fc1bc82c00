"""The ``capsa`` command: look into, verify and publish model bundles.

- ``capsa inspect PATH``: architecture, wrapper spec, signature, parameter counts and checksum state, without
  running the bundle's code (exit 1 when the checksum is not ok).
- ``capsa verify PATH``: load the bundle and run a dummy batch through it, checking the outputs against the
  signature, finite non-negative risk, determinism and batch invariance (exit 0 if all hold, else 1).
- ``capsa publish BUNDLE ROOT NAME [--version N] [--force]``: copy a bundle into a model registry.
- ``capsa calibrate BUNDLE DATA.npz [--coverage 0.9] [--out NEW_BUNDLE]``: calibrate a bundle on held-out arrays
  ``x`` and ``y`` (`capsa.calibrate`); the weights and their checksum stay as they were.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from capsa.bundle import DATATYPES, BundleManifest, TensorSpec, inspect_bundle, load_bundle, read_manifest


def _fmt_specs(specs: list[dict[str, Any]]) -> str:
    return "; ".join(f"{s['name']} {s['datatype']} {s['shape']}" for s in specs)


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_bundle(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["checksum"] == "ok" else 1
    local = " (code in the bundle: architecture.py)" if info["architecture_file"] else ""
    rows = [
        ("bundle", info["path"]),
        ("format", str(info["format_version"])),
        ("architecture", info["architecture"] + local),
        ("kwargs", json.dumps(info["kwargs"])),
        ("wrapper", json.dumps(info["wrapper"])),
        ("inputs", _fmt_specs(info["inputs"])),
        ("outputs", _fmt_specs(info["outputs"])),
    ]
    if info["parameters"] is not None:
        p, t = info["parameters"], info["tensors"]
        rows.append(
            (
                "parameters",
                f"user {p['user']:,} ({t['user']} tensors), capsa {p['capsa']:,} ({t['capsa']} tensors)"
                " [values in model.safetensors, buffers included]",
            )
        )
    rows += [
        ("checksum", f"{info['checksum']} ({info['checksum_detail']})"),
        ("versions", f"torch {info['torch_version']}, capsa {info['capsa_version']}"),
        ("metadata", json.dumps(info["metadata"])),
    ]
    if info.get("calibration") is not None:
        from capsa.calibration import summary

        rows.append(("calibration", summary(info["calibration"])))
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        print(f"{key + ':':<{width}}{value}")
    return 0 if info["checksum"] == "ok" else 1


def _dummy(spec: TensorSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A batch matching an input spec: random normal floats, zeros for integers and booleans."""
    shape = [batch, *(d if d >= 0 else 3 for d in spec.shape[1:])]
    dtype = DATATYPES[spec.datatype]
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def _check_output(what: str, tensor: Any, spec: TensorSpec, batch: int) -> str:
    if not isinstance(tensor, torch.Tensor):
        return f"{what} is a {type(tensor).__name__}, not a tensor"
    if tensor.dtype != DATATYPES[spec.datatype]:
        return f"{what} has dtype {tensor.dtype}, the signature says {spec.datatype}"
    expected = [batch, *spec.shape[1:]]
    if len(expected) != tensor.dim() or any(e not in (-1, a) for e, a in zip(expected, tensor.shape, strict=True)):
        return f"{what} has shape {list(tensor.shape)}, the signature says {spec.shape}"
    return ""


def verify_bundle(
    path: str, *, device: str = "cpu", batch_size: int = 4, allowed_modules: list[str] | None = None
) -> dict[str, Any]:
    """Load a bundle and exercise it on a dummy batch.

    Returns ``{"problems": [...], "wrapper": name, "user_parameters": n, "capsa_parameters": n}``; the bundle
    passes when ``problems`` is empty. Load failures raise `BundleError`.
    """
    manifest: BundleManifest = read_manifest(path)
    wrapped = load_bundle(path, device=device, allowed_modules=allowed_modules)
    report: dict[str, Any] = {
        "problems": [],
        "wrapper": wrapped.wrapper.name,
        "user_parameters": sum(p.numel() for p in wrapped.user_parameters()),
        "capsa_parameters": sum(p.numel() for p in wrapped.capsa_parameters()),
    }
    problems: list[str] = report["problems"]
    if len(manifest.inputs) != 1 or len(manifest.outputs) < 2:
        problems.append(
            f"expected 1 input and at least 2 outputs (prediction, risk) in the signature, got "
            f"{len(manifest.inputs)}/{len(manifest.outputs)}"
        )
        return report
    x = _dummy(manifest.inputs[0], batch_size, torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            y, risk = wrapped(x, return_risk=True)
            y_again, risk_again = wrapped(x, return_risk=True)
            y_one, risk_one = wrapped(x[:1], return_risk=True)
    except Exception as exc:
        problems.append(f"the dummy batch {list(x.shape)} fails: {type(exc).__name__}: {exc}")
        return report
    if not isinstance(risk, torch.Tensor):  # a composed model's capsa.Risk: its signature's risk is the total
        risk, risk_again, risk_one = risk.total, risk_again.total, risk_one.total
    for what, tensor, spec in (("prediction", y, manifest.outputs[0]), ("risk", risk, manifest.outputs[1])):
        problem = _check_output(what, tensor, spec, batch_size)
        if problem:
            problems.append(problem)
    if problems:
        return report
    if y.dtype.is_floating_point and not torch.isfinite(y).all():
        problems.append("prediction has non-finite values")
    if not torch.isfinite(risk).all() or (risk < 0).any():
        problems.append("risk has negative or non-finite values")
    for what, a, b in (("prediction", y, y_again), ("risk", risk, risk_again)):
        if not torch.equal(a, b):
            problems.append(f"{what} differs between two identical calls (not deterministic in eval mode)")
    for what, full, one in (("prediction", y[:1], y_one), ("risk", risk[:1], risk_one)):
        if full.dtype.is_floating_point and ((full - one).abs() > 1e-5 * full.abs().clamp(min=1.0)).any():
            problems.append(f"{what} of a sample differs alone and inside a batch (not batch-invariant)")
    return report


def _cmd_verify(args: argparse.Namespace) -> int:
    report = verify_bundle(
        args.path, device=args.device, batch_size=args.batch_size, allowed_modules=args.allowed_modules
    )
    if report["problems"]:
        for problem in report["problems"]:
            print(f"FAIL {args.path}: {problem}", file=sys.stderr)
        return 1
    print(
        f"OK {args.path}: {report['wrapper']} wrapper, {report['user_parameters']:,} user and "
        f"{report['capsa_parameters']:,} capsa parameters; a batch of {args.batch_size} on {args.device} gives "
        "outputs matching the signature, finite non-negative risk, deterministic and batch-invariant"
    )
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from capsa.registry import publish

    options = json.loads(args.storage_options) if args.storage_options else None
    version = publish(args.bundle, args.root, args.name, args.version, force=args.force, storage_options=options)
    print(f"published {args.bundle} as {args.name} version {version} in {args.root}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from capsa.calibration import calibrate_bundle, summary

    try:
        data = np.load(args.data, allow_pickle=False)  # never unpickles: object arrays are refused
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not named arrays")
        with data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise KeyError(f"{args.data} has no array {' or '.join(map(repr, missing))} (it has {data.files})")
            x, y = data["x"], data["y"]
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read {args.data} as an .npz file of arrays x and y: {exc}") from None
    calibration = calibrate_bundle(
        args.bundle, x, y, coverage=args.coverage, out=args.out, device=args.device,
        allowed_modules=args.allowed_modules,
    )
    print(f"calibrated {args.out or args.bundle}: {summary(calibration.record())}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsa", description="Inspect, verify and publish capsa model bundles.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("inspect", help="show a bundle's contents and checksum state (runs no code)")
    p.add_argument("path", metavar="PATH", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.set_defaults(run=_cmd_inspect)

    p = commands.add_parser("verify", help="load a bundle and run a dummy batch (exit 0 if it works)")
    p.add_argument("path", metavar="PATH", help="bundle directory")
    p.add_argument("--device", default="cpu", help="device to load on (default: cpu)")
    p.add_argument("--batch-size", type=int, default=4, help="dummy batch size (default: 4)")
    p.add_argument(
        "--allowed-module",
        dest="allowed_modules",
        action="append",
        metavar="PREFIX",
        help="allow only this module prefix or module:factory (repeatable; default: any module outside the "
        "standard library, bundle-local code included)",
    )
    p.set_defaults(run=_cmd_verify)

    p = commands.add_parser("publish", help="copy a bundle into a model registry, atomically")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    p.add_argument("root", metavar="ROOT", help="registry root: a directory or a URL such as s3://bucket/prefix")
    p.add_argument("name", metavar="NAME", help="model name")
    p.add_argument("--version", type=int, default=None, help="version number (default: latest + 1)")
    p.add_argument("--force", action="store_true", help="replace the version if it exists")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec storage options (JSON object)")
    p.set_defaults(run=_cmd_publish)

    p = commands.add_parser("calibrate", help="calibrate a bundle on held-out data (intervals, sets, percentiles)")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    p.add_argument("data", metavar="DATA.npz", help="held-out data: an .npz file with arrays x and y")
    p.add_argument("--coverage", type=float, default=0.9, help="target coverage of intervals/sets (default 0.9)")
    p.add_argument("--out", default=None, metavar="NEW_BUNDLE", help="write a calibrated copy here (default: in place)")
    p.add_argument("--device", default="cpu", help="device to run the model on (default: cpu)")
    p.add_argument(
        "--allowed-module", dest="allowed_modules", action="append", metavar="PREFIX",
        help="allow only this module prefix or module:factory (repeatable; default: any module outside the "
        "standard library, bundle-local code included)",
    )
    p.set_defaults(run=_cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``capsa`` console script; returns the exit code (0 ok, 1 failure, 2 usage)."""
    args = _parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("capsa: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except (ValueError, OSError) as exc:  # BundleError, RegistryError, bad --storage-options JSON
        print(f"capsa {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
