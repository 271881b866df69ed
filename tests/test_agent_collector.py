"""The agent's metrics registered into an application's own prometheus_client registry."""

from __future__ import annotations

import sys

import pytest
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from node_agent.drain import RequestRecord
from node_agent.metrics import Metrics, PrometheusCollector


def test_registered_next_to_the_standard_collectors_with_types_and_help() -> None:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # what an app's default registry already has
    PlatformCollector(registry=registry)
    metrics = Metrics(bounds=(0.01, 0.1))
    registry.register(PrometheusCollector(metrics, {"node": "n1"}))  # no duplicate names
    for duration, status in ((0.005, 200), (0.05, 200), (0.5, 503)):
        metrics.observe(RequestRecord(duration, status, None))
    metrics.set_gauge("queue_depth", 7)
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert families["hotfleet_requests"].type == "counter"
    assert families["hotfleet_requests"].documentation == "Requests through the drain guard."
    (requests,) = [s for s in families["hotfleet_requests"].samples if s.name.endswith("_total")]
    assert requests.value == 3 and requests.labels == {"node": "n1"}
    (errors,) = [
        s for s in families["hotfleet_request_errors"].samples if s.name.endswith("_total")
    ]
    assert errors.value == 1
    latency = families["hotfleet_request_duration_seconds"]
    assert latency.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.01": 1, "0.1": 2, "+Inf": 3}
    assert families["hotfleet_worker_resident_memory_bytes"].type == "gauge"
    (gauge,) = families["hotfleet_app_gauge"].samples
    assert gauge.labels == {"node": "n1", "name": "queue_depth"} and gauge.value == 7
    assert "process_cpu_seconds" in families  # the app's own, untouched


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'hotfleet\[prometheus\]'"):
        PrometheusCollector(Metrics())
