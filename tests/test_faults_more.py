"""Fault injection (issue 20, item 2), what ``tests/test_faults.py`` leaves open: readiness goes NOT_SERVING *at once*
when TorchServe or a worker dies, "not after the next failed call".

``test_faults.py`` kills TorchServe mid-Attribute, so a call fails at the moment of the kill and readiness could as
well have followed that failure. Here TorchServe's Java frontend, and then one worker process, are SIGKILLed while the
gateway is idle: no RPC at all reaches the gateway (its request counter and in-flight gauge prove it) until readiness
(grpc.health.v1 on the gateway's port, sampled every 50 ms) has gone NOT_SERVING and come back to SERVING; then the
next call succeeds. Recovery times are printed and appended to ``$NEUROEXPLAIN_FAULTS_REPORT`` like those of
``test_faults.py``. Each test takes well under a minute; none asserts a duration.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from test_faults import TIMEOUT, Readiness, _metric, _ts_scan, report

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from service.config import Settings
from service.grpc.server import create_server

pytestmark = pytest.mark.torchserve


@pytest.fixture(scope="module")
def idle_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, CollectorRegistry]]:
    """The TorchServe backend (tiny model, one worker) behind a gateway, its address and its metrics registry."""
    from conftest import require_binary
    from torchserve_models import tiny_archive_store

    from service.backends.torchserve import TorchServeBackend

    require_binary("java", "TorchServe needs Java 17")
    store = tiny_archive_store(tmp_path_factory.mktemp("faults-idle"))
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, model_store=store, cache="none",
                        torchserve_startup_timeout_s=120.0, workers=8)
    backend = TorchServeBackend(settings, build_archives=False)
    backend.start()
    registry = CollectorRegistry()
    gateway, port = create_server(settings, backend, registry=registry)
    gateway.start()
    try:
        yield backend, f"127.0.0.1:{port}", registry
    finally:
        gateway.stop(None).wait()
        gateway.close()
        backend.close()


def _calls(registry: CollectorRegistry) -> float:
    """RPCs the gateway finished plus those in flight (health checks are not counted: another service)."""
    return _metric(registry, "neuroexplain_requests_total") + _metric(registry, "neuroexplain_requests_in_flight")


def _killed_while_idle(backend: Any, target: str, registry: CollectorRegistry, kill: Callable[[], None],
                       what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not backend.ready():  # a previous test's restart may still be under way
        assert time.monotonic() < deadline, "TorchServe is not ready"
        time.sleep(0.2)
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.NeuroExplainStub(channel)
    assert stub.Predict(pb.PredictRequest(model="tinyles", scan=_ts_scan()), timeout=TIMEOUT).predicted_class
    readiness = Readiness(target)
    try:
        readiness.wait_for(True, time.monotonic(), 10)
        calls = _calls(registry)
        killed_at = time.monotonic()
        kill()
        not_serving = readiness.wait_for(False, killed_at, 10)
        assert _calls(registry) == calls, "an RPC reached the gateway before readiness dropped"
        serving = readiness.wait_for(True, not_serving, 50)
        assert _calls(registry) == calls, "an RPC reached the gateway while it was NOT_SERVING"
        answered = stub.Predict(pb.PredictRequest(model="tinyles", scan=_ts_scan()), timeout=TIMEOUT)
        done_at = time.monotonic()
        assert answered.predicted_class in ("healthy", "lesion")
        report(what, not_serving_after_s=not_serving - killed_at, serving_again_after_s=serving - killed_at,
               next_call_ok_after_s=done_at - killed_at)
    finally:
        readiness.close()
        channel.close()


def test_torchserve_sigkilled_while_idle_drops_readiness_without_a_call(
        idle_gateway: tuple[Any, str, CollectorRegistry]) -> None:
    backend, target, registry = idle_gateway
    generation = backend.supervisor.generation
    _killed_while_idle(backend, target, registry, lambda: os.kill(backend.supervisor._proc.pid, signal.SIGKILL),
                       "torchserve java SIGKILL while idle")
    assert backend.supervisor.generation == generation + 1  # the supervisor restarted TorchServe


def test_one_worker_sigkilled_while_idle_drops_readiness_without_a_call(
        idle_gateway: tuple[Any, str, CollectorRegistry]) -> None:
    backend, target, registry = idle_gateway
    deadline = time.monotonic() + TIMEOUT
    while not backend.ready():
        assert time.monotonic() < deadline, "TorchServe is not ready"
        time.sleep(0.2)
    workers = backend.supervisor.worker_pids()
    assert len(workers) == 1, workers
    deaths, generation = backend.supervisor.worker_deaths, backend.supervisor.generation
    _killed_while_idle(backend, target, registry, lambda: os.kill(next(iter(workers)), signal.SIGKILL),
                       "torchserve worker SIGKILL while idle")
    assert backend.supervisor.worker_deaths == deaths + 1
    assert backend.supervisor.generation == generation  # TorchServe itself replaced the worker, no restart
    assert backend.supervisor.worker_pids() and not backend.supervisor.worker_pids() & workers
