"""Helpers of the container tests: the engine, the image, and containers run the way Kubernetes runs them.

The engine and the image come from .ci/run (see .ci/container.sh), which exports ``CAPSA_DOCKER_HOST`` (the
engine's socket), ``CAPSA_IMAGE`` (the image it built from the unmodified Dockerfile) and ``CAPSA_DOCKER_CLI``.
Without them the tests fail in CI (CI=true) and are skipped elsewhere, saying what to run.

Containers use the host's network (the engine runs without a bridge), so each listens on free ports of
127.0.0.1: ``CAPSA_HOST``, ``CAPSA_PORT`` and ``CAPSA_GRPC_PORT`` are the only settings overridden from the ConfigMap.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.helpers import by_kind, in_ci, one, render_overlay

DOCKER_HOST = os.environ.get("CAPSA_DOCKER_HOST", "")
IMAGE = os.environ.get("CAPSA_IMAGE", "capsa-serve:ci")
HOW = ("run .ci/run (it starts the engine, builds the image and exports CAPSA_DOCKER_HOST, CAPSA_IMAGE and "
       "CAPSA_DOCKER_CLI), or source .ci/container.sh and call capsa_engine_start, capsa_base_image, "
       "capsa_wheelhouse and capsa_build_image")


def unavailable(message: str) -> None:
    """Fail in CI, skip elsewhere: the container tests must run in CI."""
    message = f"{message}; {HOW}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message + " (skipped because CI is not set; in CI this fails)")


def docker_cli() -> str:
    cli = os.environ.get("CAPSA_DOCKER_CLI") or shutil.which("docker")
    if not cli:
        unavailable("no docker client found")
    return cli  # type: ignore[return-value]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the docker client against the CI engine; on failure (when ``check``) fail with its output."""
    env = {**os.environ, "DOCKER_HOST": DOCKER_HOST}
    proc = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return proc


def check_engine() -> None:
    """The engine answers and the image exists (else fail in CI / skip)."""
    if not DOCKER_HOST:
        unavailable("CAPSA_DOCKER_HOST is not set (no container engine)")
    proc = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=30)
    if proc.returncode != 0:
        unavailable(f"the engine at {DOCKER_HOST} does not answer: {proc.stderr.strip()}")
    if docker("image", "inspect", IMAGE, check=False, timeout=30).returncode != 0:
        unavailable(f"the image {IMAGE} does not exist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe: Callable[[], Any], timeout: float, on_timeout: Callable[[], str] = lambda: "",
             interval: float = 0.5) -> Any:
    """Call ``probe`` until it returns something truthy (returned); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{on_timeout()}", pytrace=False)
        time.sleep(interval)


# --- the Kubernetes way of running the image ----------------------------------------------------------------------

def k8s_run_options(overlay: str = "cpu") -> tuple[list[str], dict[str, str]]:
    """``docker run`` options and the environment that reproduce the overlay's pod: its securityContext (read-only
    root, capabilities dropped, no privilege escalation, UID/GID), its emptyDir volumes (tmpfs; /dev/shm as the
    shm size) and its ConfigMap (every ``CAPSA_*`` value), as ``kubectl kustomize`` renders them."""
    resources = render_overlay(overlay)
    configmap = one(resources, "ConfigMap")
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    options: list[str] = []
    if security.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    for cap in security.get("capabilities", {}).get("drop", []):
        options += ["--cap-drop", cap]
    if security.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    options += ["--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        empty_dir = volumes[mount["name"]].get("emptyDir")
        assert empty_dir is not None, f"volume {mount['name']} is not an emptyDir: extend this helper"
        size = _bytes(empty_dir.get("sizeLimit", "1Gi"))
        if mount["mountPath"] == "/dev/shm":
            options += ["--shm-size", str(size)]
        else:
            # Kubernetes creates an emptyDir with mode 0777 (and group-owned by fsGroup): so is this tmpfs.
            options += ["--tmpfs", f"{mount['mountPath']}:rw,exec,nosuid,nodev,size={size},mode=0777"]
    env = {k: str(v) for k, v in configmap["data"].items() if k.startswith("CAPSA_")}
    assert env, "the ConfigMap has no CAPSA_* settings"
    return options, env


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


class Container:
    """A detached container on the host network, listening on 127.0.0.1:``port``."""

    def __init__(self, options: list[str], env: dict[str, str], args: list[str] | None = None,
                 *, port: int | None = None, name_prefix: str = "capsa-test") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
        # The gRPC port too: on the host network a fixed default would collide with anything else on the machine.
        env = {**env, "CAPSA_HOST": "127.0.0.1", "CAPSA_PORT": str(self.port), "CAPSA_GRPC_PORT": str(free_port())}
        env_args = [item for key, value in sorted(env.items()) for item in ("-e", f"{key}={value}")]
        proc = docker("run", "--detach", "--name", self.name, "--network", "host", *options, *env_args, IMAGE,
                      *(args or []), timeout=120)
        self.id = proc.stdout.strip()

    def inspect(self) -> dict[str, Any]:
        return json.loads(docker("inspect", self.id, timeout=30).stdout)[0]

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> str:
        proc = docker("logs", self.id, timeout=60, check=False)
        return proc.stdout + proc.stderr

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def wait_exit(self, timeout: float) -> int:
        """Wait until the container has exited; its exit code."""
        wait_for(f"container {self.name} exits", lambda: not self.running(), timeout, self.logs)
        return int(self.inspect()["State"]["ExitCode"])

    def wait_ready(self, timeout: float = 300, path: str = "/v2/health/ready") -> None:
        """Wait until ``path`` answers 200; fail with the logs if the container exits first."""
        def probe() -> bool:
            if not self.running():
                pytest.fail(f"container {self.name} exited ({self.inspect()['State']['ExitCode']}):\n"
                            f"{self.logs()[-6000:]}", pytrace=False)
            try:
                return httpx.get(self.url + path, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(f"{self.url}{path} answers 200", probe, timeout, lambda: self.logs()[-6000:], interval=1)

    def remove(self) -> None:
        docker("rm", "--force", "--volumes", self.id, timeout=120, check=False)


def write_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


__all__ = ["IMAGE", "Container", "by_kind", "check_engine", "docker", "free_port", "k8s_run_options",
           "unavailable", "wait_for", "write_file"]
