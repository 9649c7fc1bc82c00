"""The metric families and their labels (service.metrics), without a server: which metrics carry ``protocol``."""

from __future__ import annotations

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import PROTOCOLS, Metrics

#: The per-request metrics: labelled by the front end the request came through.
PER_REQUEST = {"capsa_inference_request_success", "capsa_inference_request_failure",
               "capsa_inference_request_duration_seconds"}


def labels_by_family(metrics: Metrics) -> dict[str, list[dict[str, str]]]:
    """Family name -> its samples' labels (the text parser's separate ``*_created`` families folded in)."""
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        out.setdefault(family.name.removesuffix("_created"), []).extend(s.labels for s in family.samples)
    return out


def test_protocols_are_rest_and_grpc() -> None:
    assert PROTOCOLS == ("rest", "grpc")


def test_per_request_metrics_exist_per_protocol_before_traffic() -> None:
    """Every protocol's series exists at zero from the start, so rate() and the alerts see them at once."""
    m = Metrics()
    m.for_version("mlp", 3)
    families = labels_by_family(m)
    for name in PER_REQUEST:
        series = {(s["model"], s["version"], s["protocol"]) for s in families[name] if "le" not in s}
        assert series == {("mlp", "3", "rest"), ("mlp", "3", "grpc")}, name


def test_only_the_per_request_metrics_carry_protocol() -> None:
    """Queueing, batches, samples and risk are shared by REST and gRPC requests (one queue, one batch)."""
    m = Metrics()
    m.for_version("mlp", 1)
    labelled = {name for name, samples in labels_by_family(m).items() if any("protocol" in s for s in samples)}
    assert labelled == PER_REQUEST


def test_each_protocol_counts_on_its_own_series() -> None:
    m = Metrics()
    v = m.for_version("mlp", 1)
    v.requests["grpc"].success.inc(2)
    v.requests["rest"].failure.inc()
    v.requests["grpc"].duration.observe(0.01)
    text = m.render().decode()
    assert 'capsa_inference_request_success_total{model="mlp",protocol="grpc",version="1"} 2.0' in text
    assert 'capsa_inference_request_success_total{model="mlp",protocol="rest",version="1"} 0.0' in text
    assert 'capsa_inference_request_failure_total{model="mlp",protocol="rest",version="1"} 1.0' in text
    assert 'capsa_inference_request_duration_seconds_count{model="mlp",protocol="grpc",version="1"} 1.0' in text


def test_observe_many_equals_one_observe_per_value() -> None:
    """`observe_many` writes prometheus_client's histogram internals directly (it has no batch observe): the exposed
    buckets, count and sum must equal one ``observe`` per value, bucket bounds and infinities included."""
    from prometheus_client import CollectorRegistry, Histogram

    from service.metrics import observe_many

    values = np.array([0.0, 0.005, 0.0051, 0.1, 0.25, 0.3, 7.5, 10.0, 11.0, np.inf, 0.005, 2.5])
    registry = CollectorRegistry()
    batched = Histogram("batched", "h", registry=registry)
    single = Histogram("single", "h", registry=registry)
    observe_many(batched, values)
    for value in values.tolist():
        single.observe(value)

    def samples(name: str) -> dict[tuple[str, str], float]:
        return {(s.name.removeprefix(name), s.labels.get("le", "")): s.value
                for family in text_string_to_metric_families(generate_latest(registry).decode())
                if family.name == name for s in family.samples if not s.name.endswith("_created")}

    assert samples("batched") == samples("single")
    assert samples("batched")[("_count", "")] == len(values)
