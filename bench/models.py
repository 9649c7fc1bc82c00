"""The benchmark's models and requests: the capsa-wrapped vote(5) MLP 64-256-256-1 every server serves, the
vote(5)-wrapped CNN of the compute-bound case, and the request bodies of each protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.harness import Request

HERE = Path(__file__).resolve().parent
IN_FEATURES = 64
IMAGE = (3, 64, 64)
VOTERS = 5


def build_bundle(directory: Path, kind: str = "mlp", n_voters: int = VOTERS) -> Path:
    """Save a vote-wrapped ``mlp`` (64-256-256-1) or ``cnn`` (3x64x64 images) bundle under ``directory``; its
    architecture is ``bench/serve_arch.py`` carried in the bundle (``allowed_modules`` must allow
    ``architecture``)."""
    import torch

    import capsa
    from bench import serve_arch

    torch.manual_seed(0)
    if kind == "mlp":
        model, factory, x = serve_arch.build_mlp(in_features=IN_FEATURES), "build_mlp", torch.randn(4, IN_FEATURES)
        kwargs: dict[str, int] = {"in_features": IN_FEATURES}
    else:
        model, factory, x, kwargs = serve_arch.build_cnn(), "build_cnn", torch.randn(4, *IMAGE), {}
    wrapped = capsa.vote.Wrapper(n_voters=n_voters)(model)
    wrapped(x)  # builds the voters
    return Path(capsa.save_bundle(wrapped, directory / kind, architecture=f"architecture:{factory}", kwargs=kwargs,
                                  example_input=x, architecture_file=HERE / "serve_arch.py"))


def build_registry(root: Path, kinds: tuple[str, ...] = ("mlp",)) -> dict[str, Path]:
    """A registry under ``root`` serving each kind as model ``<kind>`` version 1; the bundles' paths by kind."""
    from service.registry import publish

    bundles = {}
    for kind in kinds:
        bundles[kind] = build_bundle(root.parent / f"{root.name}-bundles", kind)
        publish(bundles[kind], str(root), kind, 1)
    return bundles


def sample_row() -> np.ndarray:
    """The one input sample every single-sample request carries (fixed seed)."""
    return np.random.default_rng(0).standard_normal((1, IN_FEATURES)).astype(np.float32)


def v2_json(model: str = "mlp", x: np.ndarray | None = None, path: str | None = None) -> Request:
    """A V2 JSON inference request (``data`` as a flat list)."""
    x = sample_row() if x is None else x
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": [round(float(v), 6) for v in x.ravel()]}]}, separators=(",", ":"))
    return Request(path or f"/v2/models/{model}/infer", body.encode(), {"Content-Type": "application/json"})


def v2_binary(model: str = "mlp", x: np.ndarray | None = None) -> Request:
    """A V2 request with the binary tensor extension, asking for binary outputs too."""
    x = sample_row() if x is None else x
    raw = np.ascontiguousarray(x, np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    return Request(f"/v2/models/{model}/infer", head + raw,
                   {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})


def v1(model: str = "mlp") -> Request:
    """A V1 ``:predict`` request of one instance."""
    body = json.dumps({"instances": [[round(float(v), 6) for v in sample_row()[0]]]}, separators=(",", ":"))
    return Request(f"/v1/models/{model}:predict", body.encode(), {"Content-Type": "application/json"})


def grpc_infer(model: str = "mlp", x: np.ndarray | None = None) -> bytes:
    """A serialized KServe V2 ``ModelInferRequest`` with the tensor in ``raw_input_contents``."""
    from tritonclient.grpc import service_pb2 as pb

    x = sample_row() if x is None else x
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return bytes(request.SerializeToString())


def images(n: int = 8) -> np.ndarray:
    """``n`` random 3x64x64 float32 images (fixed seed)."""
    return np.random.default_rng(1).standard_normal((n, *IMAGE)).astype(np.float32)
