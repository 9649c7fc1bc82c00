"""Kubernetes manifests: every overlay rendered with kustomize, validated against the Kubernetes schemas
(kubernetes-validate, strict), scanned by checkov, and checked for what the issue asks of them (probes, GPU,
grace period, security context, secrets by reference, selectors that really select)."""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import (
    K8S,
    KSERVE,
    OVERLAYS,
    PROMETHEUS,
    by_kind,
    kserve_doc,
    one,
    run,
    tool,
)

# Oldest Kubernetes we support (native sidecars, HPA v2, PDB v1 are all older) and the newest schemas shipped.
K8S_VERSIONS = ("1.30.0", "latest")
# Custom resources: kubernetes-validate has no schema for them; each is checked by the dedicated tests named here.
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "test_servicemonitor_selects_the_service",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "test_prometheusrule_is_the_rules_file + promtool",
    ("serving.kserve.io/v1beta1", "InferenceService"): "test_kserve_predictor_is_a_valid_pod_spec",
}
EXPECTED_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                  "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"}
SENSITIVE_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL)", re.I)
REASON_MIN = 20


def _pod(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return one(resources, "Deployment")["spec"]["template"]


def _container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _pod(resources)["spec"]["containers"]
    assert len(containers) == 1, "one container per pod: the server (its workers are its own processes)"
    return containers[0]


def _configmap(resources: list[dict[str, Any]]) -> dict[str, str]:
    return one(resources, "ConfigMap")["data"]


def _subset(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- rendering and schemas ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_resource(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    kinds = {r["kind"] for r in rendered[overlay]}
    assert kinds == EXPECTED_KINDS, f"{overlay}: missing {EXPECTED_KINDS - kinds}, unexpected {kinds - EXPECTED_KINDS}"
    for resource in rendered[overlay]:
        if resource["kind"] != "Namespace":
            assert resource["metadata"].get("namespace") == "capsa", f"{resource['kind']} outside namespace capsa"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_schema_valid(rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    for resource in rendered[overlay]:
        name = f"{overlay}: {resource['kind']}/{resource['metadata']['name']} (Kubernetes {version})"
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert (resource["apiVersion"], resource["kind"]) in CRDS, f"{name}: no schema and not a known CRD"
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {'.'.join(map(str, exc.path))}", pytrace=False)


def test_schema_validation_catches_mistakes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validator is live: a misspelt field and a wrong type are rejected."""
    import kubernetes_validate

    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --- what the issue asks of the Deployment ---------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    container = _container(rendered[overlay])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Liveness: a native gRPC probe (grpc.health.v1, overall service "") on the gRPC port, a number (Kubernetes'
    # grpc probes take no port name) equal to the container port named grpc and to CAPSA_GRPC_PORT.
    liveness = container["livenessProbe"]
    assert set(liveness) & {"httpGet", "grpc", "tcpSocket", "exec"} == {"grpc"}
    assert liveness["grpc"]["port"] == ports["grpc"] == int(_configmap(rendered[overlay])["CAPSA_GRPC_PORT"])
    assert liveness["grpc"].get("service", "") == ""
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    # A slow model load (a big bundle from S3, warm-up) must not get the pod killed: give it minutes.
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 300, f"startup probe allows only {budget} s"
    for probe in ("readinessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert port in ports or port in ports.values(), f"{probe} targets port {port!r}, not a container port"


def test_gpu_overlay_requests_one_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gpu = _container(rendered["gpu"])["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert _configmap(rendered["gpu"])["CAPSA_DEVICES"].startswith("cuda")
    assert _container(rendered["gpu"])["image"].endswith("-cu128"), "the GPU overlay must run the CUDA image"
    tolerations = _pod(rendered["gpu"])["spec"].get("tolerations", [])
    assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)


def test_cpu_overlay_requests_no_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = _container(rendered["cpu"])["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {}) and "nvidia.com/gpu" not in resources.get("requests", {})
    assert _configmap(rendered["cpu"])["CAPSA_DEVICES"] == "cpu"
    assert "cu1" not in _container(rendered["cpu"])["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_requested_and_limited(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    resources = _container(rendered[overlay])["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"], f"{overlay}: {kind} request/limit"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_exceeds_drain(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    pod = _pod(rendered[overlay])["spec"]
    drain = float(_configmap(rendered[overlay])["CAPSA_DRAIN_TIMEOUT_S"])
    pre_stop = _container(rendered[overlay]).get("lifecycle", {}).get("preStop", {})
    sleep = 0.0
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop {command}"
        sleep = float(command[1])
    elif "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > sleep + drain, f"{overlay}: terminationGracePeriodSeconds {grace} <= preStop {sleep} + drain {drain}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    pod = _pod(rendered[overlay])["spec"]
    container = _container(rendered[overlay])
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_mounted(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """With a read-only root filesystem, every place the server writes must be a volume."""
    mounts = {m["mountPath"] for m in _container(rendered[overlay])["volumeMounts"]}
    cache_dir = _configmap(rendered[overlay])["CAPSA_CACHE_DIR"]
    for path in (cache_dir, "/tmp", "/home/capsa", "/dev/shm"):
        assert path in mounts, f"{overlay}: {path} is written to but not mounted (read-only root filesystem)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_by_reference_only(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    assert not by_kind(rendered[overlay], "Secret"), "no Secret in the manifests: they are created out of band"
    container = _container(rendered[overlay])
    referenced = set()
    for env in container.get("env", []):
        if SENSITIVE_ENV.search(env["name"]):
            assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                f"{env['name']} must come from a Secret (valueFrom.secretKeyRef)")
            referenced.add(env["name"])
    assert {"CAPSA_ADMIN_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= referenced
    for key in _configmap(rendered[overlay]):
        assert not SENSITIVE_ENV.search(key), f"ConfigMap key {key} looks like a secret"
    # The README tells operators which Secrets to create.
    readme = (K8S.parents[1] / "README.md").read_text()
    for env in container.get("env", []):
        if "secretKeyRef" in env.get("valueFrom", {}):
            assert env["valueFrom"]["secretKeyRef"]["name"] in readme


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_pods(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    resources = rendered[overlay]
    deployment = one(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _subset(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(resources, "Service")
    assert _subset(service["spec"]["selector"], pod_labels), "the Service selects no pod"
    assert _subset(one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert _subset(one(resources, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    container_ports = {p["name"] for p in _container(resources)["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports, f"Service targetPort {port['targetPort']} is no container port"
    for rule in one(resources, "NetworkPolicy")["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in container_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_and_disruption_budget(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    resources = rendered[overlay]
    hpa = one(resources, "HorizontalPodAutoscaler")["spec"]
    deployment = one(resources, "Deployment")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; a fixed one fights it on apply"
    pdb = one(resources, "PodDisruptionBudget")["spec"]
    # A drain must always leave a replica serving.
    assert hpa["minReplicas"] >= 2 and pdb.get("maxUnavailable", 0) < hpa["minReplicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    if overlay == "gpu":
        names = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
        assert names == {"capsa_inference_pending_requests"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_selects_the_service(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    resources = rendered[overlay]
    monitor = one(resources, "ServiceMonitor")
    service = one(resources, "Service")
    assert _subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] or monitor["spec"].get(
        "namespaceSelector")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # The alert rules use job="capsa-serve": the Prometheus Operator names the job after the Service.
    assert service["metadata"]["name"] == "capsa-serve"


def test_prometheusrule_is_the_rules_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "capsa-alerts.yml").read_text())
    for overlay in OVERLAYS:
        assert one(rendered[overlay], "PrometheusRule")["spec"] == rules, (
            "deploy/kubernetes/base/prometheusrule.yaml differs from deploy/prometheus/rules/capsa-alerts.yml: "
            "copy the groups over")


def test_prometheusrule_passes_promtool(rendered: dict[str, list[dict[str, Any]]]) -> None:
    promtool = tool("promtool")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yml"
        path.write_text(yaml.safe_dump(one(rendered["gpu"], "PrometheusRule")["spec"]))
        run([promtool, "check", "rules", str(path)])


# --- KServe -----------------------------------------------------------------------------------------------------------

_KSERVE_COMPONENT_FIELDS = {  # ComponentExtensionSpec: KServe's own fields beside the PodSpec ones
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy",
    "autoScaling",
}


def _kserve_pod() -> dict[str, Any]:
    """The predictor as the Pod KServe makes of it (its PodSpec fields, the InferenceService's annotations)."""
    doc = kserve_doc()
    predictor = dict(doc["spec"]["predictor"])
    spec = {key: value for key, value in predictor.items() if key not in _KSERVE_COMPONENT_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": doc["metadata"]["name"] + "-predictor", "namespace": doc["metadata"]["namespace"],
                         "annotations": doc["metadata"].get("annotations", {})},
            "spec": spec}


def test_kserve_predictor_is_a_valid_pod_spec() -> None:
    import kubernetes_validate

    doc = kserve_doc()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert set(doc["spec"]) == {"predictor"}
    for version in K8S_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        kubernetes_validate.validate(_kserve_pod(), version, strict=True)


def test_kserve_predictor_agrees_with_the_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    container = _kserve_pod()["spec"]["containers"]
    assert [c["name"] for c in container] == ["kserve-container"], "KServe's custom predictor container name"
    kserve, deployment = container[0], _container(rendered["cpu"])
    assert kserve["image"].split(":")[0] == deployment["image"].split(":")[0]
    assert kserve["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert kserve["livenessProbe"]["grpc"] == deployment["livenessProbe"]["grpc"]
    assert kserve["securityContext"] == deployment["securityContext"]
    env = {e["name"]: e for e in kserve["env"]}
    assert env["CAPSA_HOST"]["value"] == "0.0.0.0"
    assert int(env["CAPSA_PORT"]["value"]) == kserve["ports"][0]["containerPort"]
    # Both protocols: REST first (KServe's main port), then a port whose name says gRPC (KServe routes
    # application/grpc there), the one the liveness probe checks.
    assert kserve["ports"][0]["name"] == "http1" and "grpc" in kserve["ports"][1]["name"]
    assert int(env["CAPSA_GRPC_PORT"]["value"]) == kserve["ports"][1]["containerPort"] == kserve["livenessProbe"][
        "grpc"]["port"]
    assert env["CAPSA_MODEL_REPOSITORY"]["value"].startswith("s3://")
    grace = _kserve_pod()["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["CAPSA_DRAIN_TIMEOUT_S"]["value"])
    for name, entry in env.items():
        if SENSITIVE_ENV.search(name):
            assert "secretKeyRef" in entry.get("valueFrom", {}), f"KServe {name} must come from a Secret"


# --- checkov ----------------------------------------------------------------------------------------------------------

def _checkov(directory: Path) -> dict[str, Any]:
    checkov = tool("checkov")
    proc = run([checkov, "--directory", str(directory), "--framework", "kubernetes", "--skip-download",
                "--output", "json"], check=False, timeout=300)
    assert proc.returncode in (0, 1), f"checkov crashed:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.mark.slow
def test_checkov_no_failed_checks(rendered: dict[str, list[dict[str, Any]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for overlay in OVERLAYS:
            (Path(tmp) / f"{overlay}.yaml").write_text(yaml.safe_dump_all(rendered[overlay], sort_keys=False))
        # checkov has no policies for InferenceService: scan the Pod it becomes instead.
        (Path(tmp) / "kserve-predictor.yaml").write_text(yaml.safe_dump(_kserve_pod(), sort_keys=False))
        report = _checkov(Path(tmp))
    results = report["results"]
    failed = [f"{c['check_id']} {c['check_name']} on {c['resource']}" for c in results["failed_checks"]]
    assert not failed, "checkov failed checks (fix them, or skip with checkov.io/skipN: ID=reason):\n" + "\n".join(
        failed)
    scanned = {c["resource"].split(".")[0] for c in results["passed_checks"]}
    assert {"Deployment", "Pod", "Service"} <= scanned, f"checkov scanned too little: {scanned}"
    assert any(c["resource"].startswith("Pod.capsa.capsa-predictor") for c in results["passed_checks"]), (
        "checkov did not scan the KServe predictor")
    for check in results["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason) >= REASON_MIN, f"{check['check_id']} on {check['resource']} is skipped without a reason"
    assert report["summary"]["parsing_errors"] == 0


@pytest.mark.slow
def test_checkov_really_checks() -> None:
    """The scanner is live: a privileged, root, probe-less pod fails."""
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace": "capsa"},
           "spec": {"containers": [{"name": "c", "image": "x:latest", "securityContext": {"privileged": True}}]}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bad.yaml").write_text(yaml.safe_dump(bad))
        failed = {c["check_id"] for c in _checkov(Path(tmp))["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_8", "CKV_K8S_9"} <= failed, failed


def test_every_checkov_skip_in_the_sources_is_justified() -> None:
    for path in [*K8S.rglob("*.yaml"), KSERVE]:
        for doc in yaml.safe_load_all(path.read_text()):
            for key, value in ((doc or {}).get("metadata", {}).get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check_id, sep, reason = str(value).partition("=")
                    assert sep and re.fullmatch(r"CKV2?_\w+", check_id), f"{path}: malformed {key}: {value}"
                    assert len(reason) >= REASON_MIN, f"{path}: {check_id} skipped without a reason"
                    assert "=" not in reason, f"{path}: checkov splits skip annotations on '=': reword {check_id}"
