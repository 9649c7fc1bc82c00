"""The FastAPI inference routes (which the fast path shadows in production) answer exactly like the fast path.

In-process: ``create_app`` under Starlette's TestClient (the lifespan starts a real worker process), then the same
requests with the fast path on and off.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import IN_FEATURES, TEST_ALLOWED_MODULES, add_model

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with warnings.catch_warnings():  # starlette's note that its TestClient will move off httpx
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient
    root = tmp_path_factory.mktemp("registry-inproc")
    add_model(root, tmp_path_factory.mktemp("bundles-inproc"), "m", "vote", config={"risk_threshold": 0.01})
    settings = Settings(model_repository=str(root), devices="cpu", infer_token="tok", max_request_bytes=4096,
                        access_log=False, allowed_modules=TEST_ALLOWED_MODULES, grpc_port=0)
    app = create_app(settings)
    with TestClient(app) as test_client:
        test_client.headers["Authorization"] = "Bearer tok"
        for _ in range(600):
            if test_client.get("/v2/health/ready").status_code == 200:
                break
            time.sleep(0.1)
        yield test_client


def both(client: TestClient, method: str, path: str, **kw: Any) -> tuple[Any, Any]:
    """The response via the fast path, then via the FastAPI route (an iterator ``content`` is sent twice)."""
    content = kw.pop("content", None)
    chunks = list(content) if content is not None and not isinstance(content, bytes) else None

    def send() -> Any:
        body = iter(chunks) if chunks is not None else content
        return client.request(method, path, content=body, **kw)

    serving = client.app.state.serving  # type: ignore[attr-defined]
    fast = send()
    serving.fast_routes = False
    try:
        slow = send()
    finally:
        serving.fast_routes = True
    return fast, slow


def test_v2_json_and_binary_and_v1_are_identical(client: TestClient) -> None:
    x = np.random.default_rng(0).standard_normal((3, IN_FEATURES)).astype(np.float32)
    doc = {"id": "a", "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, IN_FEATURES], "data": x.tolist()}]}
    fast, slow = both(client, "POST", "/v2/models/m/infer", content=orjson.dumps(doc))
    assert fast.status_code == slow.status_code == 200 and fast.content == slow.content
    assert [o["name"] for o in fast.json()["outputs"]] == ["prediction", "risk", "risk_score", "flagged"]

    raw = x.tobytes()
    head = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, IN_FEATURES],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}})
    headers = {"Inference-Header-Content-Length": str(len(head))}
    fast, slow = both(client, "POST", "/v2/models/m/versions/1/infer", content=head + raw, headers=headers)
    assert fast.status_code == slow.status_code == 200 and fast.content == slow.content
    assert fast.headers["inference-header-content-length"] == slow.headers["inference-header-content-length"]

    fast, slow = both(client, "POST", "/v1/models/m:predict", content=orjson.dumps({"instances": x.tolist()}))
    assert fast.status_code == slow.status_code == 200 and fast.json() == slow.json()


@pytest.mark.parametrize(
    ("path", "kwargs", "status"),
    [
        ("/v2/models/m/infer", {"content": b"{bad"}, 400),
        ("/v2/models/zz/infer", {"content": b"{}"}, 404),
        ("/v2/models/m/infer", {"content": b"x" * 5000}, 413),
        ("/v2/models/m/infer", {"content": iter([b"x" * 3000, b"x" * 3000])}, 413),
        ("/v1/models/m:predict", {"content": b'{"instances": [[1, 2]]}'}, 400),
        ("/v2/models/m/infer", {"content": b"{}", "headers": {"Authorization": "Bearer bad"}}, 401),
        ("/v2/models/m/versions/01/infer", {"content": b"{}"}, 404),
        ("/v2/models/m/infer", {"content": b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], '
                                           b'"data": ["1", "2", "3", "4"]}]}'}, 400),
        ("/v2/models/m/infer", {"content": b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], '
                                           b'"data": [1, 2, 3, 4]}], "outputs": [{"name": "risk"}, '
                                           b'{"name": "risk"}]}'}, 400),
        ("/v1/models/m:predict", {"content": b'{"instances": [[1, 2, 3, 4]], "parameters": '
                                             b'{"risk_threshold": -1}}'}, 400),
        ("/v2/models/m/infer", {"content": b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], '
                                           b'"data": [3e38, 3e38, 3e38, 3e38]}]}'}, 400),
    ],
)
def test_errors_are_identical(client: TestClient, path: str, kwargs: dict, status: int) -> None:
    fast, slow = both(client, "POST", path, **kwargs)
    assert fast.status_code == slow.status_code == status, (fast.text, slow.text)
    assert fast.json()["error"] == slow.json()["error"]
    if status == 401:
        assert fast.headers["www-authenticate"] == slow.headers["www-authenticate"] == "Bearer"


def test_every_response_has_a_request_id(client: TestClient) -> None:
    r = client.get("/v2/health/live", headers={"X-Request-ID": "abc"})
    assert r.headers["x-request-id"] == "abc"
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json() and r.headers["x-request-id"]
