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

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from test_security_gateway import _tiny_model, identifying_scan
from test_security_redis import _key_file, start_redis

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from service.backends.inprocess import InProcessBackend
from service.config import BackendKind, Settings
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
def ts_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, CollectorRegistry, Any]]:
    """The TorchServe backend, the gateway's address, its metrics registry and its core."""
    from conftest import require_binary
    from torchserve_models import tiny_archive_store

    from service.backends.torchserve import TorchServeBackend

    require_binary("java", "TorchServe needs Java 17")
    store = tiny_archive_store(tmp_path_factory.mktemp("faults-ts"))
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, model_store=store, cache="none",
                        torchserve_startup_timeout_s=120.0, workers=8, max_queue=128)
    backend = TorchServeBackend(settings, build_archives=False)
    backend.start()
    registry = CollectorRegistry()
    gateway, port = create_server(settings, backend, registry=registry)
    gateway.start()
    try:
        yield backend, f"127.0.0.1:{port}", registry, gateway.core
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


@pytest.mark.torchserve
def test_torchserve_sigkilled_mid_attribute(ts_gateway: tuple[Any, str, CollectorRegistry, Any]) -> None:
    backend, target, _registry, _core = ts_gateway
    generation = backend.supervisor.generation
    _crash_mid_attribute(backend, target, lambda: os.kill(backend.supervisor._proc.pid, signal.SIGKILL),
                         "torchserve java SIGKILL mid-Attribute")
    assert backend.supervisor.generation == generation + 1


@pytest.mark.torchserve
def test_one_worker_sigkilled_mid_attribute(ts_gateway: tuple[Any, str, CollectorRegistry, Any]) -> None:
    backend, target, _registry, _core = ts_gateway
    workers = backend.supervisor.worker_pids()
    assert len(workers) == 1, workers
    deaths, generation = backend.supervisor.worker_deaths, backend.supervisor.generation
    _crash_mid_attribute(backend, target, lambda: os.kill(next(iter(workers)), signal.SIGKILL),
                         "torchserve worker SIGKILL mid-Attribute")
    assert backend.supervisor.worker_deaths == deaths + 1
    assert backend.supervisor.generation == generation  # TorchServe itself replaced the worker
    assert backend.supervisor.worker_pids() and not backend.supervisor.worker_pids() & workers


@pytest.mark.torchserve
def test_100_cancelled_visualize_calls_on_torchserve_free_the_worker(
        ts_gateway: tuple[Any, str, CollectorRegistry, Any]) -> None:
    backend, target, registry, core = ts_gateway
    deadline = time.monotonic() + 60
    while not backend.ready():  # after the crash tests above, TorchServe may still be replacing a worker
        assert time.monotonic() < deadline, "TorchServe is not ready"
        time.sleep(0.2)
    stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(target))
    workers = backend.supervisor.worker_pids()
    drained = cancelled_wave(stub, registry, core, "tinyles", 0)
    # The worker stopped on its cancel flags: the same process, free again, no flag left behind.
    assert backend.supervisor.worker_pids() == workers, "a worker was restarted (or leaked) by the cancellations"
    deadline = time.monotonic() + 20
    while list(backend.supervisor.cancel_dir.iterdir()):
        assert time.monotonic() < deadline, "cancel flags were left behind"
        time.sleep(0.1)
    started = time.monotonic()
    assert stub.Predict(pb.PredictRequest(model="tinyles", scan=_ts_scan()), timeout=TIMEOUT).predicted_class
    report("100 Visualize calls cancelled on TorchServe", in_flight_back_to_0_s=drained,
           next_predict_s=time.monotonic() - started)


@pytest.mark.torchserve
def test_a_visualize_the_worker_refuses_keeps_the_worker(ts_gateway: tuple[Any, str, CollectorRegistry, Any]) -> None:
    # An error before the first step (a channel the layer does not have): the stream's only answer is final, and
    # TorchServe 0.12 drops the worker unless that answer says ts_stream_next=false (the handler marks it).
    backend, target, _registry, _core = ts_gateway
    stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(target))
    workers, deaths = backend.supervisor.worker_pids(), backend.supervisor.worker_deaths
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Visualize(pb.VisualizeRequest(model="tinyles", target="channel:conv1:7", preset="none", steps=4),
                            timeout=TIMEOUT))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    time.sleep(1.0)
    assert backend.supervisor.worker_deaths == deaths and backend.supervisor.worker_pids() == workers


# ---------------------------------------------------------------------------------------------------------------------
# In-process gateways (tiny model): cache faults, cancellations


def _gateway(tmp: Path, **overrides: Any) -> tuple[Any, str, CollectorRegistry]:
    settings = Settings(**{"host": "127.0.0.1", "port": 0, "metrics_port": -1, "health_port": -1,
                           "backend": BackendKind.INPROCESS, "model_dirs": (_tiny_model(tmp / "models"),),
                           "workers": 8, "cache_dir": tmp / "cache", **overrides})
    backend = InProcessBackend(model_dirs=settings.model_dirs, models=("tiny",))
    backend.start()
    registry = CollectorRegistry()
    gateway, port = create_server(settings, backend, registry=registry)
    gateway.start()
    return gateway, f"127.0.0.1:{port}", registry


def _close(gateway: Any) -> None:
    gateway.stop(None).wait()
    gateway.close()


def _predict(stub: Any, deadline_s: float = 10.0) -> tuple[Any, float]:
    scan = pb.Scan(data=identifying_scan(), alignment=pb.ALIGNMENT_CENTER)
    start = time.monotonic()
    reply = stub.Predict(pb.PredictRequest(model="tiny", scan=scan), timeout=deadline_s)
    return reply, time.monotonic() - start


def _same(a: Any, b: Any) -> bool:
    return list(a.logits) == list(b.logits) and a.predicted_class == b.predicted_class


@pytest.mark.redis
def test_redis_stopped_paused_and_restarted(tmp_path: Path) -> None:
    proc, port = start_redis(tmp_path / "redis")
    url = f"redis://127.0.0.1:{port}/0"
    gateway, target, registry = _gateway(tmp_path, cache=url,
                                         scan_store_key_file=str(_key_file(tmp_path / "scan.key", b"\x03" * 32)))
    stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(target))

    def errors() -> float:
        return _metric(registry, "neuroexplain_cache_errors_total")

    try:
        reference, _ = _predict(stub)
        cached, _ = _predict(stub)
        assert not reference.info.cached and cached.info.cached and _same(reference, cached)

        # A hung cache (SIGSTOP): answered within the deadline, without the cache; the errors are counted.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            before = errors()
            paused, took_paused = _predict(stub, deadline_s=10.0)
            assert not paused.info.cached and _same(paused, reference)
            assert errors() > before
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        for _ in range(5):  # a connection that timed out is replaced on the next use
            again, _ = _predict(stub)
            assert _same(again, reference)
            if again.info.cached:
                break
        assert again.info.cached, "the cache was not used again after Redis resumed"
        resumed_s = time.monotonic() - resumed_at

        # Redis stopped: answered at once without the cache, errors counted.
        proc.terminate()
        proc.wait(10)
        before = errors()
        stopped, took_stopped = _predict(stub, deadline_s=10.0)
        assert not stopped.info.cached and _same(stopped, reference) and errors() > before

        # Redis restarted (empty) on the same port: the cache fills and is used again.
        proc, _ = start_redis(tmp_path / "redis2", port=port)
        restarted_at = time.monotonic()
        hits = []
        for _ in range(5):
            reply, _ = _predict(stub)
            assert _same(reply, reference)
            hits.append(reply.info.cached)
            if reply.info.cached:
                break
        assert hits[-1], f"the cache was not used again after Redis restarted: {hits}"
        report("redis SIGSTOP (hung)", answered_without_cache_s=took_paused, cache_used_again_after_resume_s=resumed_s)
        report("redis stopped then restarted", answered_without_cache_s=took_stopped,
               cache_used_again_after_restart_s=time.monotonic() - restarted_at)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        _close(gateway)
        proc.terminate()
        proc.wait(10)


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/*.bin"))


def test_disk_cache_corrupted_entries_are_recomputed(tmp_path: Path) -> None:
    gateway, target, registry = _gateway(tmp_path)
    stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(target))
    try:
        reference, _ = _predict(stub)
        (entry,) = _entries(tmp_path / "cache")
        good = entry.read_bytes()
        for broken in (os.urandom(len(good)), good[: len(good) // 2], b"", good[:-1] + bytes([good[-1] ^ 0xFF])):
            entry.write_bytes(broken)
            before = _metric(registry, "neuroexplain_cache_errors_total")
            reply, _ = _predict(stub)
            assert _same(reply, reference), "a corrupted cache entry gave a different answer"
            if reply.info.cached:  # only acceptable if the bytes still decode to the same result
                assert broken[:-1] == good[:-1]
            else:
                assert _metric(registry, "neuroexplain_cache_errors_total") > before or not broken
            again, _ = _predict(stub)  # the recomputed result replaced the broken entry
            assert again.info.cached and _same(again, reference)
        report("disk cache corrupted entries", outcome="recomputed, same answer; entry rewritten")
    finally:
        _close(gateway)


def test_disk_cache_unwritable_is_bypassed(tmp_path: Path) -> None:
    gateway, target, registry = _gateway(tmp_path)
    stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(target))
    try:
        reference, _ = _predict(stub)
        # Every read and write fails (root ignores file modes, so the folder itself goes: a file takes its place).
        import shutil

        shutil.rmtree(tmp_path / "cache")
        (tmp_path / "cache").write_bytes(b"not a folder")
        before = _metric(registry, "neuroexplain_cache_errors_total")
        reply, took = _predict(stub)
        assert not reply.info.cached and _same(reply, reference)
        assert _metric(registry, "neuroexplain_cache_errors_total") >= before + 2  # the read and the write
        report("disk cache unwritable", answered_without_cache_s=took)
    finally:
        _close(gateway)


def test_disk_cache_full_is_bypassed(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache_dir)],
                             capture_output=True, check=False).returncode == 0
    gateway, target, registry = _gateway(tmp_path)
    stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(target))
    patched = None
    try:
        # Load the model first (another request: its answer may be cached, the one measured below is not).
        stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(data=identifying_scan(),
                                                                  alignment=pb.ALIGNMENT_MNI)), timeout=TIMEOUT)
        stored_before = {p.name for p in cache_dir.rglob("*.bin")}
        if mounted:  # a real full file system: fill it up
            with contextlib.suppress(OSError), open(cache_dir / "filler", "wb", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * 4096)
        else:  # no tmpfs here: writes go to /dev/full, which the kernel answers with ENOSPC
            import service.cache as cache_module

            real = cache_module.tempfile.mkstemp

            def full_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
                fd, path = real(*args, **kwargs)
                os.close(fd)
                return os.open("/dev/full", os.O_WRONLY), path

            patched = (cache_module.tempfile, real)
            cache_module.tempfile.mkstemp = full_mkstemp  # type: ignore[assignment]
        before = _metric(registry, "neuroexplain_cache_errors_total")
        reply, took = _predict(stub)
        assert not reply.info.cached and _metric(registry, "neuroexplain_cache_errors_total") > before
        again, _ = _predict(stub)
        assert not again.info.cached and _same(again, reply)  # nothing half-written is ever served
        assert {p.name for p in cache_dir.rglob("*.bin")} <= stored_before  # nothing new, nothing partial
        assert not list(cache_dir.rglob("*.tmp"))
        report("disk cache full", answered_without_cache_s=took, how="tmpfs 64 KiB" if mounted else "/dev/full")
    finally:
        if patched is not None:
            patched[0].mkstemp = patched[1]  # type: ignore[assignment]
        _close(gateway)
        if mounted:
            subprocess.run(["umount", "-l", str(cache_dir)], check=False)


def cancelled_wave(stub: Any, registry: CollectorRegistry, core: Any, model: str, offset: int) -> float:
    """Start 100 long Visualize calls, cancel them all once every one reached the server; returns the seconds until
    nothing is in flight (computations, RPCs, the core's pending count)."""
    calls = [stub.Visualize(pb.VisualizeRequest(model=model, target="class:lesion", preset="none", steps=4096,
                                                seed=offset + i), timeout=TIMEOUT) for i in range(100)]
    steps = _metric(registry, "neuroexplain_visualize_steps_total")
    deadline = time.monotonic() + 30
    while (_metric(registry, "neuroexplain_requests_in_flight") < 100
           or _metric(registry, "neuroexplain_visualize_steps_total") <= steps):  # all arrived, some are running
        assert time.monotonic() < deadline, "not every Visualize call reached the server, or none ran"
        time.sleep(0.05)
    cancelled_at = time.monotonic()
    for call in calls:
        call.cancel()
    deadline = time.monotonic() + 40
    while (_metric(registry, "neuroexplain_computations_in_flight") or
           _metric(registry, "neuroexplain_requests_in_flight") or core._pending):
        assert time.monotonic() < deadline, "computations or RPCs stayed in flight after every caller left"
        time.sleep(0.05)
    drained = time.monotonic() - cancelled_at
    assert all(call.code() is grpc.StatusCode.CANCELLED for call in calls)
    return drained


def test_100_cancelled_visualize_calls_leave_nothing_in_flight(tmp_path: Path) -> None:
    gateway, target, registry = _gateway(tmp_path, cache="none", max_concurrency=4, max_queue=128)
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.NeuroExplainStub(channel)
    try:
        first = cancelled_wave(stub, registry, gateway.core, "tiny", 0)
        threads_after_first = threading.active_count()  # grpc's and the core's pools have grown to their size
        second = cancelled_wave(stub, registry, gateway.core, "tiny", 1000)
        time.sleep(0.5)
        threads_after_second = threading.active_count()
        assert threads_after_second <= threads_after_first + 4, "each wave of cancelled calls leaves threads behind"
        reply, _ = _predict(stub)  # the server is free and answers
        assert reply.predicted_class
        report("100 Visualize calls cancelled (twice)", in_flight_back_to_0_s=max(first, second),
               threads_after_first_wave=float(threads_after_first),
               threads_after_second_wave=float(threads_after_second))
    finally:
        channel.close()
        _close(gateway)


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM during a burst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_during_a_burst_finishes_in_flight_calls_and_refuses_new_ones(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "NEUROEXPLAIN_MODEL_DIRS": str(_tiny_model(tmp_path / "models")),
           "NEUROEXPLAIN_GRACE_S": "30", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "neuroexplain.cli.main", "serve", "--backend", "inprocess",
                             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1", "--health-port", "-1",
                             "--cache", "none", "--max-concurrency", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"serve did not become ready: {line!r}"
        stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        started = threading.Barrier(5)
        results: list[Any] = []

        def one(seed: int) -> None:
            events = stub.Visualize(pb.VisualizeRequest(model="tiny", target="class:lesion", preset="none",
                                                        steps=600, seed=seed), timeout=TIMEOUT)
            try:
                it = iter(events)
                next(it)  # running
                started.wait(30)
                last = None
                for last in it:
                    pass
                results.append(("OK", last.WhichOneof("event") if last is not None else None))
            except grpc.RpcError as exc:
                results.append((exc.code().name, exc.details()))

        burst = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in burst:
            t.start()
        started.wait(30)  # all four are computing
        term_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as refused:
            _predict(pb_grpc.NeuroExplainStub(grpc.insecure_channel(f"127.0.0.1:{port}")), deadline_s=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()
        for t in burst:
            t.join(TIMEOUT)
        assert proc.wait(TIMEOUT) == 0
        drained_s = time.monotonic() - term_at
        assert results == [("OK", "result")] * 4, results
        report("SIGTERM during a burst", in_flight_finished=4.0, new_calls="UNAVAILABLE", exited_after_s=drained_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
