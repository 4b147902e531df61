"""Fault injection (issue 20, item 2): every fault is injected into a real running gateway and survived.

- TorchServe's Java frontend SIGKILLed mid-Attribute, and one worker process SIGKILLed mid-Attribute: the call ends
  UNAVAILABLE, readiness (grpc.health.v1 on the gateway's port) goes NOT_SERVING and comes back, the next call is OK;
- Redis stopped, paused (SIGSTOP: a hung cache) and restarted: calls are answered within their deadline without the
  cache, cache errors are counted, the cache is used again afterwards;
- disk cache corrupted, unwritable or full (a real full file system where tmpfs can be mounted, else writes that
  fail with ENOSPC from the kernel's /dev/full): recomputed, never a wrong answer;
- 100 Visualize calls cancelled: in-flight computations and RPCs back to 0, no thread left behind;
- SIGTERM during a burst (``neuroexplain serve`` as a process): in-flight calls finish OK, new ones are refused
  cleanly (UNAVAILABLE), the process exits 0.

Each test takes at most about a minute. Recovery times are measured and printed (``FAULT ...`` lines, ``-s``); with
``NEUROEXPLAIN_FAULTS_REPORT=FILE`` they are also appended to FILE as JSON lines (the README's table comes from
there). No test asserts a duration: they wait with generous bounds and assert outcomes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from service.config import Settings
from service.grpc.server import SERVICE_NAME, create_server

TIMEOUT = 60


def report(fault: str, **figures: float | str) -> None:
    """Print a measured figure (and append it to $NEUROEXPLAIN_FAULTS_REPORT)."""
    line = {"fault": fault, **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}}
    print("FAULT", json.dumps(line))
    target = os.environ.get("NEUROEXPLAIN_FAULTS_REPORT")
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps(line) + "\n")


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class Readiness:
    """Samples the gateway's readiness (grpc.health.v1, service name) every 50 ms in a thread."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.samples: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2).status
                ok = status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                ok = False
            self.samples.append((time.monotonic(), ok))
            self._stop.wait(0.05)

    def first(self, value: bool, after: float) -> float | None:
        return next((t for t, ok in self.samples if t >= after and ok is value), None)

    def wait_for(self, value: bool, after: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while (t := self.first(value, after)) is None:
            assert time.monotonic() < deadline, f"readiness never became {'SERVING' if value else 'NOT_SERVING'}"
            time.sleep(0.05)
        return t

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.channel.close()


# ---------------------------------------------------------------------------------------------------------------------
# TorchServe crashes


@pytest.fixture(scope="module")
def ts_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from conftest import require_binary
    from torchserve_models import tiny_scan_cnn

    from handlers.archive import build_archive
    from service.backends.torchserve import TorchServeBackend

    require_binary("java", "TorchServe needs Java 17")
    root = tmp_path_factory.mktemp("faults-ts")
    folder = tiny_scan_cnn(root / "models" / "tinyles")
    store = root / "store"
    store.mkdir()
    build_archive(folder / "spec.json", folder / "weights.pt", store / "tinyles.mar")
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, model_store=store, cache="none",
                        torchserve_startup_timeout_s=120.0, workers=8)
    backend = TorchServeBackend(settings, build_archives=False)
    backend.start()
    gateway, port = create_server(settings, backend, registry=CollectorRegistry())
    gateway.start()
    try:
        yield backend, f"127.0.0.1:{port}"
    finally:
        gateway.stop(None).wait()
        gateway.close()
        backend.close()


def _ts_scan() -> pb.Scan:
    from torchserve_models import scan_bytes

    return pb.Scan(data=scan_bytes(), alignment=pb.ALIGNMENT_MNI)


SLOW_ATTRIBUTE = {"base": "integrated_gradients", "nt_samples": "64", "n_steps": "256", "internal_batch_size": "1"}


def _crash_mid_attribute(backend: Any, target: str, kill: Any, what: str) -> None:
    stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(target))
    assert stub.Predict(pb.PredictRequest(model="tinyles", scan=_ts_scan()), timeout=TIMEOUT).predicted_class
    readiness = Readiness(target)
    outcome: list[Any] = []

    def long_call() -> None:
        try:
            stub.Attribute(pb.AttributeRequest(model="tinyles", scan=_ts_scan(), method="smoothgrad",
                                               options=SLOW_ATTRIBUTE), timeout=TIMEOUT)
            outcome.append("OK")
        except grpc.RpcError as exc:
            outcome.append((exc.code(), time.monotonic(), exc.details()))

    try:
        caller = threading.Thread(target=long_call)
        caller.start()
        time.sleep(2.0)  # the worker is inside the attribution (minutes of work): now the fault
        assert not outcome, "the slow attribution ended before the fault was injected"
        killed_at = time.monotonic()
        kill()
        caller.join(TIMEOUT)
        assert not caller.is_alive() and len(outcome) == 1 and outcome[0] != "OK", outcome
        code, ended_at, details = outcome[0]
        assert code is grpc.StatusCode.UNAVAILABLE, (code, details)  # retryable, and not "queue full"
        not_serving = readiness.wait_for(False, killed_at, 10)
        serving = readiness.wait_for(True, not_serving, 50)
        answered = stub.Predict(pb.PredictRequest(model="tinyles", scan=_ts_scan()), timeout=TIMEOUT)
        done_at = time.monotonic()
        assert answered.predicted_class in ("healthy", "lesion")
        report(what, call_ended_s=ended_at - killed_at, not_serving_after_s=not_serving - killed_at,
               serving_again_after_s=serving - killed_at, next_call_ok_after_s=done_at - killed_at)
    finally:
        readiness.close()


def test_torchserve_sigkilled_mid_attribute(ts_gateway: tuple[Any, str]) -> None:
    backend, target = ts_gateway
    generation = backend.supervisor.generation
    _crash_mid_attribute(backend, target, lambda: os.kill(backend.supervisor._proc.pid, signal.SIGKILL),
                         "torchserve java SIGKILL mid-Attribute")
    assert backend.supervisor.generation == generation + 1


def test_one_worker_sigkilled_mid_attribute(ts_gateway: tuple[Any, str]) -> None:
    backend, target = ts_gateway
    workers = backend.supervisor.worker_pids()
    assert len(workers) == 1, workers
    deaths, generation = backend.supervisor.worker_deaths, backend.supervisor.generation
    _crash_mid_attribute(backend, target, lambda: os.kill(next(iter(workers)), signal.SIGKILL),
                         "torchserve worker SIGKILL mid-Attribute")
    assert backend.supervisor.worker_deaths == deaths + 1
    assert backend.supervisor.generation == generation  # TorchServe itself replaced the worker
    assert backend.supervisor.worker_pids() and not backend.supervisor.worker_pids() & workers
