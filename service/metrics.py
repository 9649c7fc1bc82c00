"""Prometheus metrics of the server, in their own ``CollectorRegistry`` (one per app, so tests can run several).

Every per-version metric is labelled ``model`` and ``version``; :meth:`Metrics.for_version` returns the bound
children once, so the hot path does no label lookups. The per-request metrics (request success, failure and
duration) are labelled ``protocol`` too (``rest`` or ``grpc``, the front end the request came through): the two
differ in encoding cost and client population. What happens after admission (queueing, batches, samples, risk) is
protocol-neutral, since REST and gRPC requests share one queue and one batch, and is not labelled by protocol.
Alerts and panels about a model sum over ``protocol``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "PROTOCOLS", "VERSION_STATES", "Metrics", "Protocol", "RequestMetrics", "VersionMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LABELS = ("model", "version")
#: The front end a request came through: the ``protocol`` label of the per-request metrics.
Protocol = Literal["rest", "grpc"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
_REQUEST_LABELS = (*_LABELS, "protocol")
VERSION_STATES = ("ready", "loading", "failed")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: capsa_risk_percentile: uniform on normal traffic, so deciles, and finer where operators flag.
_PERCENTILE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
_RISK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0)


@dataclass(slots=True)
class RequestMetrics:
    """The per-request metric children of one model version over one protocol."""

    success: Counter
    failure: Counter
    duration: Histogram


@dataclass(slots=True)
class VersionMetrics:
    """The metric children of one model version; ``requests[protocol]``: its per-request ones."""

    requests: dict[Protocol, RequestMetrics]
    count: Counter
    exec_count: Counter
    queue_duration: Histogram
    compute_duration: Histogram
    pending: Gauge
    ready: Gauge
    risk_score: Histogram
    flagged: Counter

    def observe_risk(self, scores: np.ndarray) -> None:
        """Record served per-sample risk scores (non-finite ones are skipped)."""
        observe_many(self.risk_score, scores[np.isfinite(scores)])

    def flag(self, values: np.ndarray, threshold: float | None) -> np.ndarray | None:
        """``values > threshold`` per sample (None without a threshold), counting the flagged ones in
        ``capsa_flagged_total``: the one flagging rule, by risk score or by calibrated percentile."""
        if threshold is None:
            return None
        flagged: np.ndarray = values > threshold
        n_flagged = int(np.count_nonzero(flagged))
        if n_flagged:
            self.flagged.inc(n_flagged)
        return flagged


class Metrics:
    """All metrics of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.success = Counter("capsa_inference_request_success", "Successful inference requests, by protocol "
                               "(rest, grpc).", _REQUEST_LABELS, registry=r)
        self.failure = Counter("capsa_inference_request_failure",
                               "Failed inference requests (any non-2xx answer, or gRPC status other than OK, for a "
                               "known model), by protocol (rest, grpc).", _REQUEST_LABELS, registry=r)
        self.count = Counter("capsa_inference_count", "Inferred samples (batch elements).", _LABELS, registry=r)
        self.exec_count = Counter("capsa_inference_exec_count", "Executed model batches.", _LABELS, registry=r)
        self.request_duration = Histogram("capsa_inference_request_duration_seconds",
                                          "Inference request duration, from admission to answer, by protocol "
                                          "(rest, grpc).", _REQUEST_LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("capsa_inference_queue_duration_seconds",
                                        "Time a request waited in the queue before its batch started.",
                                        _LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_duration = Histogram("capsa_inference_compute_duration_seconds",
                                          "Model compute time per batch, measured in the worker.", _LABELS,
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.pending = Gauge("capsa_inference_pending_requests",
                             "Requests queued or in flight on a worker.", _LABELS, registry=r)
        self.ready = Gauge("capsa_model_ready", "1 when the model version is loaded and warmed up, else 0.",
                           _LABELS, registry=r)
        self.risk_score = Histogram("capsa_risk_score",
                                    "Served per-sample risk scores (mean risk over non-batch dimensions).",
                                    _LABELS, buckets=_RISK_BUCKETS, registry=r)
        self.risk_percentile = Histogram(
            "capsa_risk_percentile", "Calibrated models: served risk percentiles (the share of calibration data "
            "that was less risky; uniform on data like it).", _LABELS, buckets=_PERCENTILE_BUCKETS, registry=r)
        self.risk_drift = Gauge(
            "capsa_risk_drift", "Calibrated models: binomial z-score of the share of the last CAPSA_DRIFT_WINDOW "
            "samples above the 0.9 risk percentile against the expected 10% (about N(0, 1) on normal traffic; "
            "grows with drift and with the evidence for it).", _LABELS, registry=r)
        self.flagged = Counter("capsa_flagged", "Samples flagged as risky (risk_score above the threshold).",
                               _LABELS, registry=r)
        self.versions = Gauge("capsa_model_versions",
                              "Model versions that should be served, by state (ready, loading, failed); exported "
                              "even with an empty registry, so an alert can see that nothing is ready.",
                              ("state",), registry=r)
        for state in VERSION_STATES:
            self.versions.labels(state).set(0)
        self.load_failed = Gauge("capsa_model_load_failed",
                                 "1 while the model version failed to load (the reason is in the log and the "
                                 "repository index), 0 once it is loaded. Version 0 stands for the whole model.",
                                 _LABELS, registry=r)
        self._failed_labels: set[tuple[str, str]] = set()
        self._before_render: list[Callable[[], None]] = []

    def for_version(self, model: str, version: int | str) -> VersionMetrics:
        """The bound children for one model version, per protocol for the per-request ones (created at zero so
        they show up before traffic)."""
        labels = (model, str(version))
        return VersionMetrics(
            requests={protocol: RequestMetrics(success=self.success.labels(*labels, protocol),
                                               failure=self.failure.labels(*labels, protocol),
                                               duration=self.request_duration.labels(*labels, protocol))
                      for protocol in PROTOCOLS},
            count=self.count.labels(*labels),
            exec_count=self.exec_count.labels(*labels),
            queue_duration=self.queue_duration.labels(*labels),
            compute_duration=self.compute_duration.labels(*labels),
            pending=self.pending.labels(*labels),
            ready=self.ready.labels(*labels),
            risk_score=self.risk_score.labels(*labels),
            flagged=self.flagged.labels(*labels),
        )

    def before_render(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` before every exposition (state gauges computed at scrape time, not on every change)."""
        self._before_render.append(hook)

    def set_version_states(self, counts: dict[str, int], failed: Iterable[tuple[str, str]],
                           loaded: Iterable[tuple[str, str]]) -> None:
        """Export the model versions' states: counts per state, and ``capsa_model_load_failed`` per version.

        ``failed`` versions get 1; ``loaded`` ones that failed before get 0; failed ones that are gone (neither
        failed nor loaded now) lose their series, so retired versions do not accumulate.
        """
        for state in VERSION_STATES:
            self.versions.labels(state).set(counts.get(state, 0))
        failed, loaded = set(failed), set(loaded)
        for labels in failed:
            self.load_failed.labels(*labels).set(1)
        for labels in self._failed_labels - failed:
            if labels in loaded:
                self.load_failed.labels(*labels).set(0)
            else:
                self.load_failed.remove(*labels)
        self._failed_labels = failed | (self._failed_labels & loaded)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        for hook in self._before_render:
            hook()
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for each of ``values`` (a bound child; finite or infinite, never NaN), with one
    increment per bucket hit instead of one locked Python call per value: the batcher records a whole batch's
    queue times and risk scores at once. Small arrays take the plain loop (numpy's fixed cost is higher there)."""
    if values.size <= 4:
        for value in values.tolist():
            histogram.observe(value)
        return
    # prometheus_client has no batch observe: this does what Histogram.observe does for each value (its buckets
    # are per bucket, not cumulative; the value goes to the first bucket whose upper bound is >= it).
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        histogram._buckets[i].inc(int(counts[i]))
    histogram._sum.inc(float(values.sum()))
