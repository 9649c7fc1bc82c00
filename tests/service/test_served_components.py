"""A composed bundle's risk components served as ``risk_aleatoric`` / ``risk_epistemic`` / ``risk_novelty``.

Unit tests (no processes) of the worker message and the batcher's per-request split, then one real server with
vote(sculpt) ("vs"), neo(vote(sculpt)) ("nvs") and a single vote ("vote") regressor: the served components equal
the in-process `capsa.Risk` components within 1e-5 over JSON, binary (tritonclient.http), V1 and gRPC
(tritonclient.grpc); the metadata lists them; a single component can be selected; a component the model lacks is
a 400 naming it; the single wrapper serves exactly its usual outputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.http as triton

import capsa
from capsa._risk import KINDS
from service.batching import Batcher, ModelError
from service.components import COMPONENT_OUTPUTS, component_names
from service.metrics import Metrics
from service.registry import publish
from service.workers.codec import FrameReader, encode
from service.workers.messages import Outputs, Result
from tests.fixtures.archs import mlp
from tests.service.conftest import ServerProcess

IN = 4
KWARGS = {"in_features": IN, "hidden": 16, "out_features": 2}
TIMEOUT = 60.0
TOL = {"rtol": 1e-5, "atol": 1e-5}
pytestmark = pytest.mark.filterwarnings("ignore:save_bundle.*importable only:UserWarning")  # the server has PYTHONPATH
BASE = ["prediction", "risk", "risk_score"]
STACKS = {
    "vs": (["risk_aleatoric", "risk_epistemic"],
           lambda m: capsa.vote.Wrapper(n_voters=3)(capsa.sculpt.Wrapper()(m))),
    "nvs": (["risk_aleatoric", "risk_epistemic", "risk_novelty"],
            lambda m: capsa.neo.Wrapper(latent_dim=4)(capsa.vote.Wrapper(n_voters=3)(capsa.sculpt.Wrapper()(m)))),
}


# ------------------------------------------------------------------------------------------------ unit tests


def test_component_outputs_are_named_after_the_library_kinds() -> None:
    assert tuple(f"risk_{kind}" for kind in KINDS) == COMPONENT_OUTPUTS


def test_component_names_come_from_the_manifest_in_kind_order() -> None:
    outputs = [{"name": n, "datatype": "FP32", "shape": [-1, 2]} for n in
               ("prediction", "risk", "risk_novelty", "risk_aleatoric", "risk_other")]
    assert component_names({"outputs": outputs}) == ("risk_aleatoric", "risk_novelty")
    assert component_names({"outputs": outputs[:2]}) == ()


def test_outputs_with_components_cross_the_worker_codec() -> None:
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    message = Result(1, 0.0, Outputs(a, a, a[:, 0].copy(), (("risk_aleatoric", a + 1), ("risk_novelty", a + 2))))
    reader = FrameReader()
    data = b"".join(bytes(b) for b in encode(message))
    got: list[Any] = []
    for start in range(0, len(data), 7):  # in pieces, as a socket may deliver them
        chunk = data[start:start + 7]
        buffer = reader.get_buffer()
        buffer[:len(chunk)] = chunk
        got += reader.feed(len(chunk))
    [result] = got
    names = [name for name, _ in result.outcome.components]
    assert names == ["risk_aleatoric", "risk_novelty"]
    np.testing.assert_array_equal(result.outcome.rows(1, 3)[3]["risk_novelty"], (a + 2)[1:3])


class _Worker:
    id = 1

    def __init__(self) -> None:
        self.sent: list[tuple[int, np.ndarray, list[int]]] = []

    def send_batch(self, batch_id: int, array: np.ndarray, offsets: list[int]) -> None:
        self.sent.append((batch_id, array.copy(), list(offsets)))


def test_the_batcher_splits_components_per_request_and_refuses_misshaped_ones() -> None:
    async def scenario() -> None:
        batcher = Batcher(max_batch_size=8, max_batch_delay_s=0.0, max_queue_size=16, timeout_s=5.0,
                          metrics=Metrics().for_version("m", 1))
        worker = _Worker()
        batcher.add_worker(worker)
        first = batcher.submit(np.zeros((1, 1), np.float32))
        later = [batcher.submit(np.full((n, 1), float(n), np.float32)) for n in (2, 3)]
        batch_id, array, _ = worker.sent[-1]
        batcher.complete(worker, batch_id, 0.0, Outputs(array, array, array[:, 0], (("risk_epistemic", array),)))
        assert (await asyncio.wait_for(first, 5))[3]["risk_epistemic"].tolist() == [[0.0]]
        batch_id, array, offsets = worker.sent[-1]
        assert offsets == [0, 2, 5]
        batcher.complete(worker, batch_id, 0.0, Outputs(array, array, array[:, 0], (("risk_epistemic", 3 * array),)))
        for fut, n in zip(later, (2, 3), strict=True):
            components = (await asyncio.wait_for(fut, 5))[3]
            assert components["risk_epistemic"].tolist() == [[3.0 * n]] * n
        bad = batcher.submit(np.zeros((2, 1), np.float32))
        batch_id, array, _ = worker.sent[-1]
        batcher.complete(worker, batch_id, 0.0, Outputs(array, array, array[:, 0], (("risk_epistemic", array[:1]),)))
        with pytest.raises(ModelError, match="returned 2 rows for a batch of 2"):
            await asyncio.wait_for(bad, 5)

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------ real server


def _bundle(path: Path, stack: str) -> Path:
    torch.manual_seed(0)
    wrapped = STACKS[stack][1](mlp(**KWARGS))
    x = torch.randn(64, IN)
    wrapped(x[:2])
    wrapped.train()
    for _ in range(3):  # neo: a signature of some data, so that its novelty is not constant
        wrapped(x)
    return capsa.save_bundle(wrapped.eval(), path, architecture="tests.fixtures.archs:mlp", kwargs=KWARGS,
                             example_input=x[:2])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("registry")
    work = tmp_path_factory.mktemp("bundles")
    bundles = {stack: _bundle(work / stack, stack) for stack in STACKS}
    torch.manual_seed(0)
    single = capsa.vote.Wrapper(n_voters=3)(mlp(**KWARGS)).eval()
    single(torch.zeros(2, IN))
    bundles["vote"] = capsa.save_bundle(single, work / "vote", architecture="tests.fixtures.archs:mlp",
                                        kwargs=KWARGS, example_input=torch.zeros(2, IN))
    for name, bundle in bundles.items():
        publish(bundle, str(root), name, 1)
    proc = ServerProcess(root, tmp_path_factory.mktemp("logs") / "server.log")
    try:
        proc.wait_ready()
        models = {name: capsa.load_bundle(bundle) for name, bundle in bundles.items()}
        yield {"server": proc, "models": models}
    finally:
        proc.stop()


def sample(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


def in_process(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """What the server should answer, by output name, computed with the library in this process."""
    with torch.inference_mode():
        y, risk = model(torch.from_numpy(x), return_risk=True)
    out = {"prediction": y.numpy(), "risk_score": capsa.risk_score(risk).numpy()}
    if isinstance(risk, capsa.Risk):
        out["risk"] = risk.total.numpy()
        out.update((f"risk_{kind}", value.numpy()) for kind, value in risk.components().items())
    else:
        out["risk"] = risk.numpy()
    return out


def rest(server: ServerProcess, model: str, x: np.ndarray, outputs: list[str] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                        "data": x.ravel().tolist()}]}
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=TIMEOUT)


def arrays(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {o["name"]: np.asarray(o["data"], dtype=np.float64).reshape(o["shape"])
            for o in response.json()["outputs"]}


@pytest.mark.slow
@pytest.mark.parametrize("stack", list(STACKS))
def test_metadata_lists_the_components_the_stack_has(served: dict[str, Any], stack: str) -> None:
    meta = httpx.get(f"{served['server'].url}/v2/models/{stack}", timeout=TIMEOUT).json()
    names = [o["name"] for o in meta["outputs"]]
    assert names == [*BASE, "flagged", *STACKS[stack][0]]
    for out in meta["outputs"]:
        if out["name"].startswith("risk_") and out["name"] != "risk_score":
            assert out == {"name": out["name"], "datatype": "FP32", "shape": [-1, 2]}


@pytest.mark.slow
@pytest.mark.parametrize("stack", list(STACKS))
def test_served_components_equal_in_process_risk_components(served: dict[str, Any], stack: str) -> None:
    x = sample(5, seed=1)
    want = in_process(served["models"][stack], x)
    assert sorted(want) == sorted([*BASE, *STACKS[stack][0]])
    got = arrays(rest(served["server"], stack, x))  # no outputs named: all of them, in metadata order
    assert list(got) == [*BASE, *STACKS[stack][0]]
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, **TOL, err_msg=name)
    # the components are the parts of the served total (law of total variance: novelty stays out)
    np.testing.assert_allclose(got["risk"], np.hypot(got["risk_aleatoric"], got["risk_epistemic"]), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_gets_the_components(served: dict[str, Any], binary: bool) -> None:
    x = sample(3, seed=2)
    want = in_process(served["models"]["nvs"], x)
    client = triton.InferenceServerClient(f"127.0.0.1:{served['server'].port}", network_timeout=TIMEOUT)
    try:
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        names = ["risk_novelty", "prediction", "risk_epistemic"]
        result = client.infer("nvs", [inp], outputs=[triton.InferRequestedOutput(n, binary_data=binary)
                                                     for n in names])
        assert [o["name"] for o in result.get_response()["outputs"]] == names
        for name in names:
            np.testing.assert_allclose(result.as_numpy(name), want[name], **TOL, err_msg=name)
        result = client.infer("nvs", [inp])  # no outputs named: tritonclient asks for all, in binary
        for name, value in want.items():
            np.testing.assert_allclose(result.as_numpy(name), value, **TOL, err_msg=name)
    finally:
        client.close()


@pytest.mark.slow
def test_grpc_gets_the_components(served: dict[str, Any]) -> None:
    x = sample(4, seed=3)
    want = in_process(served["models"]["vs"], x)
    client = tg.InferenceServerClient(served["server"].grpc_url)
    try:
        meta = client.get_model_metadata("vs", as_json=True, client_timeout=TIMEOUT)
        assert [o["name"] for o in meta["outputs"]] == [*BASE, "flagged", *STACKS["vs"][0]]
        inp = tg.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("vs", [inp], outputs=[tg.InferRequestedOutput("risk_aleatoric")],
                              client_timeout=TIMEOUT)
        assert [o.name for o in result.get_response().outputs] == ["risk_aleatoric"]
        np.testing.assert_allclose(result.as_numpy("risk_aleatoric"), want["risk_aleatoric"], **TOL)
        result = client.infer("vs", [inp], client_timeout=TIMEOUT)
        for name, value in want.items():
            np.testing.assert_allclose(result.as_numpy(name), value, **TOL, err_msg=name)
        with pytest.raises(tg.InferenceServerException, match="risk_novelty"):
            client.infer("vs", [inp], outputs=[tg.InferRequestedOutput("risk_novelty")], client_timeout=TIMEOUT)
    finally:
        client.close()


@pytest.mark.slow
def test_v1_answer_has_the_components(served: dict[str, Any]) -> None:
    x = sample(2, seed=4)
    want = in_process(served["models"]["nvs"], x)
    answer = httpx.post(f"{served['server'].url}/v1/models/nvs:predict", json={"instances": x.tolist()},
                        timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert sorted(got) == sorted(["predictions", "risk", "risk_score", *STACKS["nvs"][0]])
    np.testing.assert_allclose(got["predictions"], want["prediction"], **TOL)
    for name in ("risk", "risk_score", *STACKS["nvs"][0]):
        np.testing.assert_allclose(got[name], want[name], **TOL, err_msg=name)


@pytest.mark.slow
def test_a_single_component_can_be_selected(served: dict[str, Any]) -> None:
    x = sample(3, seed=5)
    got = arrays(rest(served["server"], "vs", x, outputs=["risk_epistemic"]))
    assert list(got) == ["risk_epistemic"]
    np.testing.assert_allclose(got["risk_epistemic"], in_process(served["models"]["vs"], x)["risk_epistemic"], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "output"), [("vs", "risk_novelty"), ("vote", "risk_aleatoric"),
                                               ("vote", "risk_epistemic"), ("nvs", "risk_bogus")])
def test_a_component_the_model_lacks_is_a_400_naming_it(served: dict[str, Any], model: str, output: str) -> None:
    answer = rest(served["server"], model, sample(1, seed=6), outputs=["prediction", output])
    assert answer.status_code == 400
    assert f"output '{output}' does not exist" in answer.json()["error"]


@pytest.mark.slow
def test_a_single_wrapper_serves_exactly_as_before(served: dict[str, Any]) -> None:
    x = sample(3, seed=7)
    meta = httpx.get(f"{served['server'].url}/v2/models/vote", timeout=TIMEOUT).json()
    assert [o["name"] for o in meta["outputs"]] == [*BASE, "flagged"]
    got = arrays(rest(served["server"], "vote", x))
    want = in_process(served["models"]["vote"], x)
    assert list(got) == BASE and sorted(want) == sorted(BASE)
    for name in BASE:
        np.testing.assert_allclose(got[name], want[name], **TOL, err_msg=name)
    v1 = httpx.post(f"{served['server'].url}/v1/models/vote:predict", json={"instances": x.tolist()},
                    timeout=TIMEOUT).json()
    assert sorted(v1) == ["predictions", "risk", "risk_score"]
