"""Prometheus configuration and alert rules (promtool), the Grafana provisioning and dashboard, and the compose file
that ties them to the service. The dashboard's and the rules' metrics are checked against a live server's /metrics in
test_live_metrics.py."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import (
    COMPOSE,
    DASHBOARD,
    GRAFANA,
    PROMETHEUS,
    dashboard_exprs,
    promql_metric_names,
    run,
    tool,
)

RULES = PROMETHEUS / "rules" / "capsa-alerts.yml"
RULE_TESTS = PROMETHEUS / "tests" / "capsa-alerts.test.yml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# --- promtool ---------------------------------------------------------------------------------------------------------

def test_promtool_check_config() -> None:
    proc = run([tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    # The config's rule_files really found the rules (a glob matching nothing would pass silently).
    assert re.search(r"SUCCESS: [1-9]\d* rule files? found", proc.stdout + proc.stderr), proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    proc = run([tool("promtool"), "check", "rules", str(RULES)])
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_promtool_rule_unit_tests() -> None:
    """deploy/prometheus/tests: each alert fires on series that should trigger it, and not on healthy ones."""
    run([tool("promtool"), "test", "rules", str(RULE_TESTS)], timeout=120)


def test_every_alert_has_a_unit_test() -> None:
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in _rules()}
    assert alerts <= tested, f"alerts never shown to fire in {RULE_TESTS.name}: {sorted(alerts - tested)}"


def test_promtool_rejects_a_broken_rule() -> None:
    """promtool is live: a rule with a PromQL syntax error fails."""
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.yml"
        bad.write_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: sum by (model (x)\n")
        proc = run([tool("promtool"), "check", "rules", str(bad)], check=False)
    assert proc.returncode != 0


def test_the_alerts_the_issue_asks_for() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _rules()}
    metric_of = {name: promql_metric_names(expr) for name, expr in exprs.items()}
    assert {"capsa_inference_request_failure_total"} <= metric_of["CapsaHighFailureRate"]
    assert {"capsa_flagged_total", "capsa_inference_count_total"} <= metric_of["CapsaRiskDrift"]
    # An empty registry exports no per-version series: the alert must use the always-exported state counts.
    assert metric_of["CapsaNoModelReady"] == {"capsa_model_versions"}
    assert 'state="ready"' in exprs["CapsaNoModelReady"]
    assert metric_of["CapsaModelLoadFailed"] == {"capsa_model_load_failed"}
    assert {"capsa_inference_request_duration_seconds_bucket"} <= metric_of["CapsaHighP99Latency"]
    for rule in _rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheus_scrapes_the_compose_service() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "capsa-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    services = _compose()["services"]
    for target in targets:
        host, _, port = target.partition(":")
        assert host in services, f"scrape target {target}: no compose service {host}"
        assert services[host]["environment"]["CAPSA_PORT"] == port
    # The rules' job label matches this job (and the Kubernetes Service's name, which the Operator uses).
    for rule in _rules():
        for job_name in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job_name == job["job_name"], f"{rule['alert']} selects job {job_name!r}"


# --- Grafana ----------------------------------------------------------------------------------------------------------

def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_loads_and_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']} has no query"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"]["type"] == "prometheus"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"duplicate refId in {panel['title']}"
        for target in panel["targets"]:
            for used in re.findall(r"\$(?!__)(\w+)", target["expr"]):
                assert used in variables, f"{panel['title']}: ${used} is no dashboard variable"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    """Request rate, p50/p99 latency, queue time, batch size, risk-score distribution, flagged rate per model."""
    by_title = {title: [] for title, _ in dashboard_exprs(_dashboard())}
    for title, expr in dashboard_exprs(_dashboard()):
        by_title[title].append(re.sub(r"\s+", " ", expr))

    def having(*fragments: str) -> list[str]:
        return [t for t, exprs in by_title.items() if any(all(f in e for f in fragments) for e in exprs)]

    assert having("rate(capsa_inference_request_success_total", "by (model, protocol)"), "request rate per model"
    assert having("rate(capsa_inference_request_failure_total", "by (model, protocol)"), "failure rate per model"
    latency = "capsa_inference_request_duration_seconds_bucket"
    assert having("histogram_quantile(0.5,", latency, "by (model, protocol, le)")
    assert having("histogram_quantile(0.99,", latency, "by (model, protocol, le)")
    assert having("histogram_quantile(", "capsa_inference_queue_duration_seconds_bucket"), "queue time"
    assert having("capsa_inference_count_total", "/", "capsa_inference_exec_count_total"), "batch size"
    heatmaps = [p for p in _panels(_dashboard()) if p["type"] == "heatmap"]
    assert any("capsa_risk_score_bucket" in t["expr"] and t.get("format") == "heatmap"
               for p in heatmaps for t in p["targets"]), "risk-score distribution as a heatmap"
    assert having("histogram_quantile(", "capsa_risk_score_bucket"), "risk-score quantiles"
    assert having("rate(capsa_flagged_total", "by (model)"), "flagged rate per model"


#: The per-request metrics, labelled protocol="rest"|"grpc" (service.metrics); every other one is protocol-neutral.
PER_REQUEST = ("capsa_inference_request_success_total", "capsa_inference_request_failure_total",
               "capsa_inference_request_duration_seconds_bucket", "capsa_inference_request_duration_seconds_count",
               "capsa_inference_request_duration_seconds_sum")


def _selects_protocol(expr: str) -> set[str]:
    """The metrics an expression selects with a ``protocol`` matcher."""
    return {name for name, matchers in re.findall(r"(\w+)\{([^}]*)\}", expr)
            if re.search(r"\bprotocol\s*[=!]", matchers)}


def test_protocol_is_selected_only_on_the_per_request_metrics() -> None:
    """A protocol matcher on a protocol-neutral metric (samples, batches, risk) would select nothing."""
    exprs = [expr for _, expr in dashboard_exprs(_dashboard())] + [rule["expr"] for rule in _rules()]
    wrong = {name for expr in exprs for name in _selects_protocol(expr)} - set(PER_REQUEST)
    assert not wrong, f"protocol selected on protocol-neutral metrics: {sorted(wrong)}"
    assert _selects_protocol('rate(capsa_x_total{model=~"$m",protocol=~"$protocol"}[1m]) + y{a="b"}') == {
        "capsa_x_total"}


def test_dashboard_has_a_protocol_variable() -> None:
    (variable,) = [v for v in _dashboard()["templating"]["list"] if v["name"] == "protocol"]
    assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
    assert "capsa_inference_request_success_total, protocol" in variable["definition"]


def test_model_alerts_sum_over_protocol() -> None:
    """The request alerts are about the model: they aggregate the per-request metrics by model, dropping protocol
    (the promtool tests show a model whose failures are all gRPC firing once, without a protocol label)."""
    for rule in _rules():
        if any(name in rule["expr"] for name in PER_REQUEST):
            groupings = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
            assert groupings and all("protocol" not in g for g in groupings), rule["alert"]


def test_dashboard_exprs_are_valid_promql() -> None:
    """Each panel query, with Grafana's variables substituted, passes promtool's PromQL parser."""
    rules = []
    for number, (title, expr) in enumerate(dashboard_exprs(_dashboard())):
        concrete = re.sub(r"\$(?!__)\w+", ".*", expr.replace("$__rate_interval", "1m").replace("$__interval", "1m"))
        rules.append({"record": f"dashboard:query_{number}", "expr": concrete, "labels": {"panel": title}})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard-queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        run([tool("promtool"), "check", "rules", str(path)])


def test_grafana_provisioning_matches_compose() -> None:
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    services = _compose()["services"]
    assert "prometheus" in services
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "capsa.yml").read_text())["providers"]
    mounts = {}
    for volume in services["grafana"]["volumes"]:
        source, _, rest = volume.partition(":")
        mounts[rest.split(":")[0]] = (COMPOSE.parent / source).resolve()
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve(), "the provider's path is not mounted"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == provider["options"]["path"]
    assert (DASHBOARD.parent / Path(home).name).is_file()
    # The dashboard's datasource variable picks a Prometheus datasource, which provisioning supplies.
    (variable,) = [v for v in _dashboard()["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == datasource["type"]


# --- compose ----------------------------------------------------------------------------------------------------------

def test_compose_config_is_valid() -> None:
    """`docker-compose config` validates against the compose schema and resolves interpolation, with no engine."""
    compose = tool("docker-compose")
    proc = run([compose, "--project-directory", str(COMPOSE.parent), "-f", str(COMPOSE), "config"])
    resolved = yaml.safe_load(proc.stdout)
    assert set(resolved["services"]) == {"capsa", "prometheus", "grafana"}


def test_compose_wiring() -> None:
    compose = _compose()
    services = compose["services"]
    capsa = services["capsa"]
    assert capsa["build"]["context"] == "../.." and (COMPOSE.parent / capsa["build"]["context"] / capsa["build"][
        "dockerfile"]).resolve().is_file()
    env = capsa["environment"]
    assert env["CAPSA_HOST"] == "0.0.0.0"
    # The local registry volume, read-only, where CAPSA_MODEL_REPOSITORY points.
    registry = [v for v in capsa["volumes"] if re.search(r":/models(:ro)?$", v)]
    assert registry and registry[0].endswith(":ro") and "/models" in env["CAPSA_MODEL_REPOSITORY"]
    # Secrets are passed through from the caller's environment, never written here.
    for name, value in env.items():
        if re.search(r"TOKEN|SECRET|ACCESS_KEY", name):
            assert value is None, f"{name} has a value in compose.yaml: pass it through (no value) instead"
    # Prometheus gets its config and rules; the drain fits in the stop grace period.
    (prom_conf,) = [v for v in services["prometheus"]["volumes"] if v.split(":")[1] == "/etc/prometheus"]
    assert (COMPOSE.parent / prom_conf.split(":")[0]).resolve() == PROMETHEUS.resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grace = capsa["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > float(env["CAPSA_DRAIN_TIMEOUT_S"])
    for name, service in services.items():
        image = service["image"]
        if name != "capsa":
            assert re.search(r":v?\d+\.\d+", image), f"{name}: pin the image version ({image})"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: publish on loopback only ({port})"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(GRAFANA.parent)) for p in GRAFANA.rglob("*.yml")))
def test_grafana_yaml_loads(path: str) -> None:
    assert yaml.safe_load((GRAFANA.parent / path).read_text())["apiVersion"] == 1
