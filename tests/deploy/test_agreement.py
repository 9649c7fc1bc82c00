"""The Dockerfile, the Kubernetes/KServe manifests and the compose file agree with the service itself: the port, the
probe and metrics paths (routes of the real FastAPI app), the environment variables the service really reads
(service.settings.Settings), their values (accepted by Settings), the user, and the entrypoint (pyproject.toml)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.settings import Settings

from .helpers import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    OVERLAYS,
    PROMETHEUS,
    ROOT,
    dockerfile_env,
    dockerfile_instructions,
    exec_form,
    grpc_probes,
    kserve_doc,
    one,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _env_prefix() -> str:
    return Settings.model_config.get("env_prefix", "")


def _setting_vars() -> dict[str, str]:
    """CAPSA_<FIELD> -> field name, for every field of the real Settings."""
    return {(_env_prefix() + name).upper(): name for name in Settings.model_fields}


def _interpolate_default(value: str) -> str:
    """compose's ${VAR:-default} / ${VAR-default} with VAR unset."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


def _kserve_container() -> dict[str, Any]:
    (container,) = kserve_doc()["spec"]["predictor"]["containers"]
    return container


def _environments(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str | None]]:
    """Every place that sets the service's environment: name -> {VAR: value (None: from a Secret/the caller)}."""
    places: dict[str, dict[str, str | None]] = {"Dockerfile": dict(dockerfile_env())}
    for overlay in OVERLAYS:
        env: dict[str, str | None] = dict(one(rendered[overlay], "ConfigMap")["data"])
        (container,) = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]["containers"]
        for entry in container.get("env", []):
            env[entry["name"]] = entry.get("value")
        places[f"kubernetes/{overlay}"] = env
    places["kserve"] = {e["name"]: e.get("value") for e in _kserve_container()["env"]}
    compose_env = yaml.safe_load(COMPOSE.read_text())["services"]["capsa"]["environment"]
    places["compose"] = {k: None if v is None else _interpolate_default(str(v)) for k, v in compose_env.items()}
    return places


#: Variables read by .ci/run, .ci/container.sh and the tests (never by the server), which the README may name.
CI_VARIABLES = ("CAPSA_DOCKER_HOST", "CAPSA_DOCKER_CLI", "CAPSA_IMAGE", "CAPSA_CI_DIR", "CAPSA_INDEX_PORT",
                "CAPSA_CHECKOV_VENV", "CAPSA_CHECKOV", "CAPSA_SOAK_S")


def test_settings_contract() -> None:
    """The contract these files are written against: prefix CAPSA_, and the fields they use."""
    assert _env_prefix() == "CAPSA_"
    assert {"model_repository", "host", "port", "devices", "admin_token", "infer_token", "drain_timeout_s",
            "cache_dir", "log_level", "demo"} <= set(Settings.model_fields)


def test_every_capsa_variable_is_a_setting(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every CAPSA_* name set anywhere, or even mentioned in the deployment files and docs, is one the service
    reads: a typo would otherwise be ignored silently (Settings has extra="ignore")."""
    known = _setting_vars()
    for place, env in _environments(rendered).items():
        for name in env:
            if name.startswith(_env_prefix()):
                assert name in known, f"{place} sets {name}, which service.settings.Settings does not read"
    files = [DOCKERFILE, ROOT / ".dockerignore", ROOT / "README.md", *(p for p in DEPLOY.rglob("*") if p.is_file())]
    for path in files:
        # The README also documents the variables of the tests and of CI, which the server does not read.
        allowed = set(known) | set(CI_VARIABLES) if path.name == "README.md" else set(known)
        for name in set(re.findall(r"\bCAPSA_[A-Z0-9_]+\b", path.read_text(errors="replace"))):
            assert name in allowed, f"{path.relative_to(ROOT)} mentions {name}, which is not a setting"


def test_every_environment_is_accepted_by_settings(rendered: dict[str, list[dict[str, Any]]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The values, too: each place's CAPSA_* values validate in the real Settings (devices, log level, numbers)."""
    for place, env in _environments(rendered).items():
        with monkeypatch.context() as m:
            for name in list(_setting_vars()):
                m.delenv(name, raising=False)
            for name, value in env.items():
                if name.startswith(_env_prefix()) and value is not None:
                    m.setenv(name, value)
            try:
                Settings()
            except Exception as exc:  # pydantic's ValidationError, named for the place
                pytest.fail(f"{place}: its CAPSA_* values are rejected by Settings: {exc}", pytrace=False)


def test_host_is_all_interfaces(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The service binds 127.0.0.1 by default, which nothing outside a container can reach."""
    assert Settings.model_fields["host"].default != "0.0.0.0"
    for place, env in _environments(rendered).items():
        if place == "Dockerfile" or "CAPSA_HOST" in env:
            assert env["CAPSA_HOST"] == "0.0.0.0", f"{place}: CAPSA_HOST must be 0.0.0.0 in a container"


def test_port_agrees_everywhere(rendered: dict[str, list[dict[str, Any]]]) -> None:
    port, grpc_port = Settings.model_fields["port"].default, Settings.model_fields["grpc_port"].default
    assert (port, grpc_port) == (8000, 8001)  # REST and gRPC, as Triton's
    exposed = [int(p.split("/")[0]) for k, a in dockerfile_instructions() if k == "EXPOSE" for p in a.split()]
    assert exposed == [port, grpc_port], f"EXPOSE {exposed}"
    for place, env in _environments(rendered).items():
        if "CAPSA_PORT" in env:
            assert int(env["CAPSA_PORT"]) == port, f"{place}: CAPSA_PORT"
        if "CAPSA_GRPC_PORT" in env:
            assert int(env["CAPSA_GRPC_PORT"]) == grpc_port, f"{place}: CAPSA_GRPC_PORT"
    for overlay in OVERLAYS:
        (container,) = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]["containers"]
        assert [p["containerPort"] for p in container["ports"]] == [port, grpc_port]
        assert [p["port"] for p in one(rendered[overlay], "Service")["spec"]["ports"]] == [port, grpc_port]
    assert [p["containerPort"] for p in _kserve_container()["ports"]] == [port, grpc_port]
    capsa = yaml.safe_load(COMPOSE.read_text())["services"]["capsa"]
    assert [int(p.split("#")[0].rsplit(":", 1)[1]) for p in capsa["ports"]] == [port, grpc_port]
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert [int(t.rsplit(":", 1)[1]) for t in targets] == [port]


def test_entrypoint_is_the_console_script() -> None:
    entrypoints = [exec_form(a) for k, a in dockerfile_instructions() if k == "ENTRYPOINT"]
    assert entrypoints == [["capsa-serve"]], entrypoints
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "capsa-serve" in scripts, "pyproject.toml has no capsa-serve console script"
    module, _, function = scripts["capsa-serve"].partition(":")
    assert callable(getattr(importlib.import_module(module), function)), scripts["capsa-serve"]


def test_user_agrees(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (user,) = [a for k, a in dockerfile_instructions() if k == "USER"]
    uid, _, gid = user.partition(":")
    contexts = [kserve_doc()["spec"]["predictor"]["securityContext"], _kserve_container()["securityContext"]]
    for overlay in OVERLAYS:
        pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
        contexts += [pod["securityContext"], pod["containers"][0]["securityContext"]]
    for context in contexts:
        assert str(context["runAsUser"]) == uid and (not gid or str(context["runAsGroup"]) == gid)


def test_cache_dir_agrees(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The image's cache dir is the one the manifests mount writable."""
    places = _environments(rendered)
    cache = places["Dockerfile"]["CAPSA_CACHE_DIR"]
    for place, env in places.items():
        if "CAPSA_CACHE_DIR" in env:
            assert env["CAPSA_CACHE_DIR"] == cache, place
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["capsa"]["volumes"]
    assert any(v.endswith(":" + cache) for v in compose), "compose: the cache dir is not a volume (read_only root)"


# --- routes of the real app -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from service.app import create_app

    registry = tmp_path_factory.mktemp("registry")
    return create_app(Settings(model_repository=str(registry)))


def _serves_get(app: Any, path: str) -> bool:
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def _probe_paths(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    paths = {}
    containers = {f"kubernetes/{o}": one(rendered[o], "Deployment")["spec"]["template"]["spec"]["containers"][0]
                  for o in OVERLAYS}
    containers["kserve"] = _kserve_container()
    for place, container in containers.items():
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if "httpGet" in container[probe]:  # the gRPC ones: test_grpc_probes_agree, test_live_metrics
                paths[f"{place} {probe}"] = container[probe]["httpGet"]["path"]
    for overlay in OVERLAYS:
        for endpoint in one(rendered[overlay], "ServiceMonitor")["spec"]["endpoints"]:
            paths[f"kubernetes/{overlay} ServiceMonitor"] = endpoint["path"]
    for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]:
        paths[f"prometheus job {job['job_name']}"] = job.get("metrics_path", "/metrics")
    (health,) = [a for k, a in dockerfile_instructions() if k == "HEALTHCHECK"]
    urls = re.findall(r"https?://[^'\"\s]+", health)
    assert urls, "HEALTHCHECK has no URL"
    for url in urls:
        paths["Dockerfile HEALTHCHECK"] = urlsplit(url.replace("%s", "8000")).path
    return paths


def test_probe_and_metrics_paths_are_routes(app: Any, rendered: dict[str, list[dict[str, Any]]]) -> None:
    for place, path in _probe_paths(rendered).items():
        assert _serves_get(app, path), f"{place}: GET {path} is not a route of service.app"
    assert not _serves_get(app, "/v2/health/alive"), "route matching is broken: it accepts any path"


def test_grpc_probes_agree(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The gRPC probes target the gRPC port (CAPSA_GRPC_PORT) and a service the server's grpc.health.v1 knows
    (test_live_metrics asks the real server what each returns)."""
    probes = grpc_probes(rendered)
    assert {place.split()[0] for place in probes} == {*(f"kubernetes/{o}" for o in OVERLAYS), "kserve"}
    grpc_port = Settings.model_fields["grpc_port"].default
    for place, probe in probes.items():
        assert probe["port"] == grpc_port, place
        assert probe.get("service", "") in ("", "inference.GRPCInferenceService"), place


def test_healthcheck_port_is_the_setting() -> None:
    """The HEALTHCHECK follows CAPSA_PORT (so a changed port does not make a healthy container unhealthy)."""
    (health,) = [a for k, a in dockerfile_instructions() if k == "HEALTHCHECK"]
    assert "CAPSA_PORT" in health and "'8000'" in health


def test_readme_names_real_paths() -> None:
    """README.md points at deploy and test files that exist."""
    readme = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"`((?:deploy|tests)/[\w./-]+)`", readme)):
        assert (ROOT / path.rstrip(".")).exists(), f"README.md names {path}, which does not exist"
    assert Path(ROOT / "Dockerfile").is_file()
