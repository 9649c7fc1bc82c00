"""A composed bundle (neo over vote over sculpt) is served like any other: its served risk is the total risk and its
risk_score the library's `capsa.risk_score`, equal to the in-process outputs within 1e-5."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import capsa
from service.registry import publish
from tests.fixtures.archs import mlp
from tests.service.conftest import ServerProcess

IN_FEATURES = 4
KWARGS = {"in_features": IN_FEATURES, "hidden": 16, "out_features": 2}


def composed_bundle(path: Path) -> Path:
    torch.manual_seed(0)
    wrapped = capsa.neo.Wrapper(latent_dim=4)(capsa.vote.Wrapper(n_voters=4)(capsa.sculpt.Wrapper()(mlp(**KWARGS))))
    x = torch.randn(64, IN_FEATURES)
    wrapped(x[:2])
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    wrapped.train()
    for _ in range(5):
        y, risk = wrapped(x, return_risk=True)
        loss = torch.nn.functional.gaussian_nll_loss(y, torch.zeros_like(y), risk.aleatoric**2) + risk.novelty.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return capsa.save_bundle(wrapped.eval(), path, architecture="tests.fixtures.archs:mlp", kwargs=KWARGS,
                             example_input=x[:2])


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("registry")
    bundle = composed_bundle(tmp_path_factory.mktemp("bundles") / "composed")
    publish(bundle, str(root), "composed", 1)
    proc = ServerProcess(root, tmp_path_factory.mktemp("logs") / "server.log")
    try:
        proc.wait_ready()
        yield proc, bundle
    finally:
        proc.stop()


@pytest.mark.slow
def test_served_composed_outputs_equal_in_process_outputs(composed: tuple[ServerProcess, Path]) -> None:
    server, bundle = composed
    x = np.random.default_rng(0).standard_normal((5, IN_FEATURES)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    response = httpx.post(f"{server.url}/v2/models/composed/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    got = {o["name"]: np.array(o["data"], dtype=np.float64).reshape(o["shape"]) for o in response.json()["outputs"]}

    model = capsa.load_bundle(bundle)
    with torch.inference_mode():
        y, risk = model(torch.from_numpy(x), return_risk=True)
    assert isinstance(risk, capsa.Risk)
    np.testing.assert_allclose(got["prediction"], y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["risk"], risk.total.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["risk_score"], capsa.risk_score(risk).numpy(), rtol=1e-5, atol=1e-5)
