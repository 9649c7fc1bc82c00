"""Fixtures of the serving tests: real capsa bundles in a temporary registry, and ``capsa-serve`` subprocesses.

One shared server (session scope) serves every wrapper plus a few special models; the tests that need their
own server (shutdown, no admin token, the demo) start one themselves with :class:`ServerProcess`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import capsa
from service.registry import publish
from service.settings import DEMO_ARCHITECTURE
from tests.fixtures import archs
from tests.fixtures.archs import mlp

REPO = Path(__file__).resolve().parents[2]
SLEEPY_ARCH = Path(__file__).with_name("sleepy_arch.py")
ADMIN_TOKEN = "s3cret-admin"
#: The code the test servers may run (CAPSA_ALLOWED_MODULES): the demo, the test architectures and bundle-local
#: code (the tests' own bundles); a test that needs another list passes its own in ``env``.
TEST_ALLOWED_MODULES = f"{DEMO_ARCHITECTURE},tests.fixtures,tests.service,architecture"
IN_FEATURES = 4

WRAPPERS = {
    "vote": lambda: capsa.vote.Wrapper(n_voters=4),
    "sample": lambda: capsa.sample.Wrapper(n_samples=4),
    "sculpt": lambda: capsa.sculpt.Wrapper(),
    "neo": lambda: capsa.neo.Wrapper(latent_dim=4),
}
OUT_FEATURES = {"vote": 1, "sample": 3, "sculpt": 2, "neo": 1}


def vote_bundle(path: Path, factory: str, kwargs: dict[str, Any], example: torch.Tensor, *, seed: int) -> Path:
    """Save a vote(2)-wrapped ``tests.fixtures.archs`` model of any size (the transport and soak suites' models)."""
    torch.manual_seed(seed)
    wrapped = capsa.vote.Wrapper(n_voters=2)(getattr(archs, factory)(**kwargs))
    wrapped(example)
    wrapped.eval()
    return capsa.save_bundle(wrapped, path, architecture=f"tests.fixtures.archs:{factory}", kwargs=kwargs,
                             example_input=example)


def build_bundle(path: Path, wrapper: str, *, seed: int = 0, arch: str = "mlp") -> Path:
    """Save a real bundle: ``arch`` "mlp" (tests.fixtures.archs) or "sleepy" (bundle-local code)."""
    torch.manual_seed(seed)
    x = torch.randn(8, IN_FEATURES)
    if arch == "mlp":
        kwargs = {"in_features": IN_FEATURES, "hidden": 16, "out_features": OUT_FEATURES.get(wrapper, 1)}
        wrapped = WRAPPERS[wrapper]()(mlp(**kwargs))
        wrapped(x)
        if wrapper == "neo":  # give neo a signature of some data, so that its risk is not constant
            wrapped.train()
            for _ in range(3):
                wrapped(torch.randn(64, IN_FEATURES))
            wrapped.eval()
        return capsa.save_bundle(wrapped, path, architecture="tests.fixtures.archs:mlp", kwargs=kwargs,
                                 example_input=x)
    import importlib.util

    spec = importlib.util.spec_from_file_location("sleepy_arch_for_tests", SLEEPY_ARCH)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    wrapped = WRAPPERS[wrapper]()(module.build(IN_FEATURES))
    wrapped(x)
    return capsa.save_bundle(wrapped, path, architecture="architecture:build", kwargs={"in_features": IN_FEATURES},
                             example_input=x, architecture_file=SLEEPY_ARCH)


def add_model(root: Path, work: Path, name: str, wrapper: str, *, version: int = 1, seed: int = 0,
              arch: str = "mlp", config: dict[str, Any] | None = None) -> Path:
    """Build a bundle and publish it into the registry at ``root``; returns the bundle's source directory."""
    bundle = build_bundle(work / f"{name}-{version}", wrapper, seed=seed, arch=arch)
    publish(bundle, str(root), name, version)
    if config is not None:
        (root / name / "config.json").write_text(json.dumps(config))
    return bundle


def free_port() -> int:
    """A TCP port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """``capsa-serve`` (the console script next to this Python when installed), else ``python -m service``."""
    script = Path(sys.executable).with_name("capsa-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


class ServerProcess:
    """``capsa-serve`` in a subprocess on a free port; its stderr (JSON logs) goes to ``log_path``.

    The server may run the code in `TEST_ALLOWED_MODULES` unless ``env`` sets ``CAPSA_ALLOWED_MODULES``.
    """

    def __init__(self, root: Path | None, log_path: Path, *, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()  # every test server serves gRPC too, on its own port (not 8001)
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                    "CAPSA_DEVICES": "cpu", "CAPSA_LOG_LEVEL": "info", "CAPSA_ALLOWED_MODULES": TEST_ALLOWED_MODULES,
                    "CAPSA_GRPC_PORT": str(self.grpc_port), **(env or {})}
        cmd = [*serve_command(), "--port", str(self.port), *(args or [])]
        if root is not None:
            cmd += ["--model-repository", str(root)]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0, path: str = "/v2/health/ready") -> None:
        """Wait until ``path`` answers 200 (fails with the log if the process dies or time runs out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"capsa-serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"capsa-serve not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace")

    def log_entries(self) -> list[dict[str, Any]]:
        """The JSON log lines."""
        entries = []
        for line in self.log().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def worker_pids(self, worker_prefix: str) -> list[int]:
        """Pids of the workers whose name starts with ``worker_prefix`` that reported ready (latest last)."""
        return [e["pid"] for e in self.log_entries()
                if e.get("msg") == "worker ready" and str(e.get("worker", "")).startswith(worker_prefix)]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def metric(text: str, name: str, model: str, version: str = "1", protocol: str | None = None) -> float:
    """A sample of the Prometheus text for a model version (0 if absent), summed over its other labels (the
    per-request metrics' ``protocol``) unless ``protocol`` picks one."""
    only = "" if protocol is None else rf'(?=[^}}]*protocol="{protocol}")'
    pattern = (rf'^{re.escape(name)}\{{(?=[^}}]*model="{re.escape(model)}")(?=[^}}]*version="{version}"){only}'
               rf'[^}}]*\}} (\S+)$')
    return sum((float(value) for value in re.findall(pattern, text, re.M)), 0.0)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A registry with one model per wrapper plus special ones: ``sleepy`` (slow on request, tiny queue),
    ``killme`` (for the worker-kill test), ``swap`` (for load/unload)."""
    root = tmp_path_factory.mktemp("registry")
    work = tmp_path_factory.mktemp("bundles")
    bundles = {}
    for wrapper in WRAPPERS:
        config = {"max_batch_size": 16}
        if wrapper == "neo":
            config["risk_threshold"] = 0.05
        bundles[wrapper] = add_model(root, work, wrapper, wrapper, config=config)
    bundles["sleepy"] = add_model(root, work, "sleepy", "sculpt", arch="sleepy",
                                  config={"max_batch_size": 4, "max_queue_size": 2})
    bundles["killme"] = add_model(root, work, "killme", "vote", arch="sleepy")
    bundles["swap"] = add_model(root, work, "swap", "vote", seed=1)
    return {"root": root, "work": work, "bundles": bundles}


@pytest.fixture(scope="session")
def server(registry: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server: admin token set, 1 MiB body limit, 3 s request deadline."""
    proc = ServerProcess(registry["root"], tmp_path_factory.mktemp("logs") / "server.log", env={
        "CAPSA_ADMIN_TOKEN": ADMIN_TOKEN, "CAPSA_MAX_REQUEST_BYTES": str(1 << 20),
        "CAPSA_REQUEST_TIMEOUT_S": "3", "CAPSA_DRAIN_TIMEOUT_S": "10",
    })
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"capsa-serve exited with {code}:\n{proc.log()[-3000:]}"


@pytest.fixture(scope="session")
def reference(registry: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The registry's bundles loaded in this process with capsa.load_bundle (the expected outputs)."""
    return {name: capsa.load_bundle(path) for name, path in registry["bundles"].items()}


def expected(model: torch.nn.Module, x: Any) -> tuple[Any, Any, Any]:
    """prediction, risk and risk_score of ``model`` on the numpy array ``x``."""
    with torch.inference_mode():
        y, risk = model(torch.as_tensor(x), return_risk=True)
    score = risk.reshape(risk.shape[0], -1).mean(dim=1)
    return y.numpy(), risk.numpy(), score.numpy()


# ---------------------------------------------------------------------------------------------- S3 (registry tests)
# Used by test_registry.py: a moto S3 server on 127.0.0.1 started by the tests themselves.


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3-compatible server running in this process (a thread) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto_server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        moto_server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> tuple[str, dict[str, Any]]:
    """A fresh, empty bucket: ``("s3://<bucket>", storage_options)`` for fsspec/s3fs."""
    import uuid

    import boto3

    options: dict[str, Any] = {
        "key": "test", "secret": "test",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    bucket = f"capsa-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}", options
