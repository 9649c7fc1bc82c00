"""Peer servers for ``python -m bench serve --peers``: MLServer, LitServe and Ray Serve, each serving the same
capsa bundle (``capsa.load_bundle``) from its own virtual environment.

Each peer's environment is created by the bench under ``--peers-cache`` on first use (``python -m venv`` and pip;
never a project dependency). After the peer's own packages are installed, a ``.pth`` file appends this checkout
(for ``capsa``) and the running interpreter's site-packages (for torch, safetensors, fsspec) to its ``sys.path``,
so the peer's own pins win and torch is not downloaded again. A peer that fails to install, to start or to answer
is reported unavailable with the reason; it never stops the run.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.harness import ROOT, Column, Request, Server, free_port, start
from bench.models import sample_row, v2_json

INSTALL_TIMEOUT_S = 1200.0
READY_TIMEOUT_S = 300.0

PACKAGES = {"mlserver": ["mlserver", "uvloop<0.22"],  # 1.7.1 calls asyncio.get_event_loop() in its workers
            "litserve": ["litserve"], "ray-serve": ["ray[serve]"]}
DISTRIBUTIONS = {"mlserver": "mlserver", "litserve": "litserve", "ray-serve": "ray"}

MLSERVER_RUNTIME = '''
import capsa, numpy as np, torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

class CapsaRuntime(MLModel):
    async def load(self) -> bool:
        torch.set_num_threads(1)
        self.model = capsa.load_bundle(self.settings.parameters.uri, allowed_modules=["architecture"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(np.ascontiguousarray(NumpyCodec.decode_input(payload.inputs[0]), np.float32))
        with torch.inference_mode():
            y, risk = self.model(x, return_risk=True)
        outputs = [NumpyCodec.encode_output("prediction", y.numpy()), NumpyCodec.encode_output("risk", risk.numpy())]
        return InferenceResponse(model_name=self.name, outputs=outputs)
'''

LITSERVE_SERVER = '''
import sys, capsa, litserve as ls, torch

class CapsaAPI(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(1)
        self.model = capsa.load_bundle(sys.argv[1], allowed_modules=["architecture"])

    def decode_request(self, request):
        return torch.tensor(request["input"], dtype=torch.float32).reshape(1, -1)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x, return_risk=True)

    def encode_response(self, output):
        y, risk = output
        return {"prediction": y.tolist(), "risk": risk.tolist()}

if __name__ == "__main__":
    ls.LitServer(CapsaAPI(), accelerator="cpu").run(port=int(sys.argv[2]))
'''

RAY_SERVER = '''
import sys, time, capsa, ray, torch
from ray import serve

@serve.deployment
class Capsa:
    def __init__(self, bundle):
        torch.set_num_threads(1)
        self.model = capsa.load_bundle(bundle, allowed_modules=["architecture"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def infer(self, rows):
        with torch.inference_mode():
            y, risk = self.model(torch.tensor(rows, dtype=torch.float32), return_risk=True)
        return [{"prediction": a, "risk": b} for a, b in zip(y.tolist(), risk.tolist())]

    async def __call__(self, request):
        return await self.infer((await request.json())["input"])

ray.init(include_dashboard=False, num_cpus=2)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
serve.run(Capsa.bind(sys.argv[1]), route_prefix="/")
while True:
    time.sleep(3600)
'''


def _input_json(path: str) -> Request:
    body = json.dumps({"input": [round(float(v), 6) for v in sample_row()[0]]}, separators=(",", ":"))
    return Request(path, body.encode(), {"Content-Type": "application/json"})


def venv(name: str, cache: Path) -> tuple[Path, str]:
    """The peer's virtual environment (created and installed on first use) and its installed version.

    Raises RuntimeError naming the step that failed."""
    directory = cache / "peers" / name
    stamp = directory / "installed.json"
    python = directory / "bin" / "python"
    if stamp.exists():
        return python, json.loads(stamp.read_text())["version"]
    directory.parent.mkdir(parents=True, exist_ok=True)
    print(f"peers: creating {directory} and installing {' '.join(PACKAGES[name])} (once) ...", flush=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(directory)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PACKAGES[name]]]
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(argv[2:5])} took over {INSTALL_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{' '.join(argv[2:5])} failed: {last[0][:200]}")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if Path(p).exists()]
    Path(purelib, "zz_capsa_bench.pth").write_text("\n".join([str(ROOT), *ours]) + "\n")
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                              f"print(m.version({DISTRIBUTIONS[name]!r}))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    stamp.write_text(json.dumps({"version": version}))
    return python, version


def _wait_answering(url: str, request: Request, server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"exited with status {server.proc.returncode}: {server.log_tail(300)!r}")
        try:
            answer = httpx.post(url, content=request.body, headers=request.headers, timeout=10)
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}: {answer.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise RuntimeError(f"not answering after {READY_TIMEOUT_S:.0f} s ({last})")


def start_peer(name: str, bundle: Path, cache: Path, logs: Path) -> tuple[Server, Column]:
    """Install (once), start and wait for one peer; its server and its column."""
    python, version = venv(name, cache)
    port = free_port()
    work = logs.parent / f"peer-{name}"
    work.mkdir(exist_ok=True)
    if name == "mlserver":
        (work / "capsa_runtime.py").write_text(MLSERVER_RUNTIME)
        model = work / "mlp"
        model.mkdir(exist_ok=True)
        (model / "model-settings.json").write_text(json.dumps({
            "name": "mlp", "implementation": "capsa_runtime.CapsaRuntime", "parameters": {"uri": str(bundle)},
            "max_batch_size": 32, "max_batch_time": 0.002}))
        (work / "settings.json").write_text(json.dumps({
            "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "host": "127.0.0.1"}))
        argv = [str(python.parent / "mlserver"), "start", str(work)]
        request = v2_json()
        label = f"MLServer {version} (batching 32)"
    elif name == "litserve":
        (work / "server.py").write_text(LITSERVE_SERVER)
        argv = [str(python), str(work / "server.py"), str(bundle), str(port)]
        request = _input_json("/predict")
        label = f"LitServe {version}"
    else:
        (work / "server.py").write_text(RAY_SERVER)
        argv = [str(python), str(work / "server.py"), str(bundle), str(port)]
        request = _input_json("/")
        label = f"Ray Serve {version} (batching 32)"
    server = start(name, argv, logs, env={"PYTHONPATH": str(work)}, cwd=work)
    server.base = f"http://127.0.0.1:{port}"
    try:
        _wait_answering(server.base + request.path, request, server)
    except BaseException:
        server.stop()
        raise
    return server, Column(name, label, name, "wrk", request)


def start_all(bundle: Path, cache: Path, logs: Path, servers: dict[str, Server],
              unavailable: dict[str, str]) -> list[Column]:
    """Start every peer that can be; the others go into ``unavailable`` with the reason."""
    columns = []
    for name in PACKAGES:
        try:
            server, column = start_peer(name, bundle, cache, logs)
        except (RuntimeError, OSError, subprocess.SubprocessError, TimeoutError) as exc:
            unavailable[name] = str(exc)
            print(f"peers: {name} unavailable: {exc}", flush=True)
            continue
        servers[name] = server
        columns.append(column)
    return columns
