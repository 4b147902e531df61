"""Every Prometheus metric of the gateway, in one place, on an injectable registry.

Names carry the ``neuroexplain_`` prefix and a unit suffix; labels are few and bounded: ``rpc`` (the five RPC names),
``model`` (served model names, anything else becomes ``unknown``), ``operation`` (predict, attribute, visualize),
``code`` (gRPC status code names). Never request ids, digests or anything from a scan.

Backends declare extra collectors (``Backend.collectors()``: the TorchServe backend re-exports TorchServe's own
metrics) and the server factory registers them on the same registry, so one scrape of ``/metrics`` sees both. The
interceptor that records per-RPC metrics is ``service.grpc.metrics.MetricsInterceptor`` (this module knows no gRPC).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds-to-minutes work: Predict takes tenths of a second, Visualize minutes; the last finite bucket is 10 minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SIZE_BUCKETS = tuple(float(1 << p) for p in range(10, 29, 2))  # 1 KiB .. 256 MiB

RPCS = ("ListModels", "GetModel", "Predict", "Attribute", "Visualize")
UNKNOWN = "unknown"


class Metrics:
    """The gateway's metrics, registered on ``registry`` (a fresh ``CollectorRegistry`` in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "neuroexplain_requests", "RPCs finished, by RPC, model and gRPC status code.", ["rpc", "model", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "neuroexplain_request_duration_seconds", "Time from receiving an RPC to its last response message.",
            ["rpc", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("neuroexplain_requests_in_flight", "RPCs being served now.", ["rpc"], registry=r)
        self.request_bytes = Histogram(
            "neuroexplain_request_size_bytes", "Serialized size of request messages.", ["rpc"],
            buckets=SIZE_BUCKETS, registry=r,
        )
        self.response_bytes = Histogram(
            "neuroexplain_response_size_bytes", "Serialized size of response messages (each streamed event).",
            ["rpc"], buckets=SIZE_BUCKETS, registry=r,
        )
        self.cache_hits = Counter(
            "neuroexplain_cache_hits", "Results served from the result cache.", ["operation"], registry=r
        )
        self.cache_misses = Counter(
            "neuroexplain_cache_misses", "Result cache lookups that found nothing.", ["operation"], registry=r
        )
        self.cache_errors = Counter(
            "neuroexplain_cache_errors",
            "Result cache reads or writes that failed (the request went on without the cache).", ["operation"],
            registry=r,
        )
        self.singleflight_joins = Counter(
            "neuroexplain_singleflight_joins",
            "Requests that waited for an identical computation already running instead of starting their own.",
            ["operation"], registry=r,
        )
        self.backend_duration = Histogram(
            "neuroexplain_backend_duration_seconds",
            "Time of one backend computation (its count is the number of computations).", ["operation", "model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.backend_errors = Counter(
            "neuroexplain_backend_errors", "Backend computations that raised, by error class family.",
            ["operation", "code"], registry=r,
        )
        self.computations_in_flight = Gauge(
            "neuroexplain_computations_in_flight", "Backend computations running now.", registry=r
        )
        self.rejected = Counter(
            "neuroexplain_rejected_requests", "Requests refused because the concurrency limit and queue were full.",
            ["operation"], registry=r,
        )
        self.visualize_steps = Counter(
            "neuroexplain_visualize_steps", "Feature-visualization optimisation steps completed.", ["model"],
            registry=r,
        )
        self.backend_ready = Gauge(
            "neuroexplain_backend_ready", "1 while the backend answers (readiness), else 0.", registry=r
        )
        self.scan_store_bytes = Gauge(
            "neuroexplain_scan_store_bytes", "Bytes of recently received scans held for digest references.",
            registry=r,
        )
        self.scan_store_entries = Gauge(
            "neuroexplain_scan_store_entries", "Scans held for digest references.", registry=r
        )
        self.input_checks = Counter(
            "neuroexplain_input_checks",
            "Input checks of Predict and Attribute results (cached ones included), by verdict: in_distribution or "
            "flagged (the scan is unlike the model's training data).", ["operation", "model", "verdict"], registry=r,
        )
        self.input_check_score = Histogram(
            "neuroexplain_input_check_score_ratio",
            "Input-check score divided by the model's threshold (above 1 = flagged).", ["model"],
            buckets=(0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0), registry=r,
        )
