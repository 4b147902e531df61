"""Metrics: names, units, bounded labels and values, read from a fresh registry after real RPCs."""

# ruff: noqa: F811  (pytest fixtures imported from test_service_support are redefined as parameters)
from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry, start_http_server
from test_service_support import (  # noqa: F401  (fixtures)
    TINY,
    Running,
    backend,
    gated,
    gateway,
    make_scan,
    scan_msg,
    tiny_model_dir,
)

from neuroexplain._proto import neuroexplain_pb2 as pb
from service.metrics import LATENCY_BUCKETS, Metrics


def test_every_metric_has_the_prefix_a_unit_and_few_labels() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    families = list(registry.collect())
    assert len(families) >= 15
    for family in families:
        assert family.name.startswith("neuroexplain_")
        assert family.documentation
    assert LATENCY_BUCKETS[-1] == 600.0  # ten minutes: Visualize runs for minutes


def test_requests_are_counted_by_rpc_model_and_code(gateway: Running) -> None:
    scan = make_scan(60)
    gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(scan)))
    gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(scan)))
    for name in ("x" * 200, "another-made-up-name"):  # arbitrary names must not grow the label set
        with pytest.raises(grpc.RpcError):
            gateway.stub.Predict(pb.PredictRequest(model=name, scan=scan_msg(scan)))
    s = gateway.sample
    assert s("neuroexplain_requests_total", rpc="Predict", model=TINY, code="OK") == 2
    assert s("neuroexplain_requests_total", rpc="Predict", model="unknown", code="NOT_FOUND") == 2
    assert s("neuroexplain_request_duration_seconds_count", rpc="Predict", model=TINY) == 2
    assert s("neuroexplain_request_duration_seconds_bucket", rpc="Predict", model=TINY, le="600.0") == 2
    assert s("neuroexplain_requests_in_flight", rpc="Predict") == 0
    assert s("neuroexplain_request_size_bytes_sum", rpc="Predict") > 4 * len(scan)
    assert s("neuroexplain_response_size_bytes_count", rpc="Predict") == 2
    assert s("neuroexplain_cache_misses_total", operation="predict") == 1
    assert s("neuroexplain_cache_hits_total", operation="predict") == 1
    assert s("neuroexplain_backend_duration_seconds_count", operation="predict", model=TINY) == 1
    assert s("neuroexplain_computations_in_flight") == 0
    assert s("neuroexplain_scan_store_entries") == 1 and s("neuroexplain_scan_store_bytes") == len(scan)
    assert s("neuroexplain_backend_ready") == 1
    labels = {tuple(sorted(sample.labels.items())) for family in gateway.registry.collect() for sample in family.samples}
    assert not any(len(value) > 40 for items in labels for _key, value in items if _key != "le")


def test_metrics_are_served_over_http(gateway: Running) -> None:
    gateway.stub.ListModels(pb.ListModelsRequest())
    server, thread = start_http_server(0, addr="127.0.0.1", registry=gateway.registry)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        thread.join(10)
    assert 'neuroexplain_requests_total{code="OK",model="",rpc="ListModels"} 1.0' in body
    assert "# TYPE neuroexplain_request_duration_seconds histogram" in body
    assert "neuroexplain_backend_ready 1.0" in body
