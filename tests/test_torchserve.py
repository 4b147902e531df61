"""The TorchServe backend against a real TorchServe (Java 17): serving, typed errors, metrics re-export, a user's
packaged model, Visualize and Attribute cancellation, crash recovery, and two instances side by side.

One TorchServe is shared by the module (it takes ~30 s to start on 2 busy cores); the crash test restarts it in
place and the side-by-side test starts a second one. With ``CI=true`` a missing Java fails instead of skipping.
"""

# ruff: noqa: F811  (pytest fixtures imported from torchserve_models are redefined as parameters)
from __future__ import annotations

import contextlib
import ipaddress
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import require_binary
from torchserve_models import (  # noqa: F401  (fixtures)
    cancel_reports,
    model_dirs,
    next_cancel_report,
    scan,
    scan_input,
)

from neuroexplain import errors
from neuroexplain.serving.types import (
    AttributeRequest,
    CallContext,
    PredictRequest,
    Progress,
    VisualizeRequest,
)

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]

STARTUP_S = 240.0


_scan = scan_input


@pytest.fixture(scope="module")
def store(model_dirs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from handlers.archive import build_archive
    from neuroexplain.cli.main import main

    require_binary("java", "TorchServe needs Java 17")
    store = tmp_path_factory.mktemp("store")
    build_archive(model_dirs / "tinyles" / "spec.json", model_dirs / "tinyles" / "weights.pt", store / "tinyles.mar")
    # The user's model goes through the documented command, exactly as the README shows.
    user = model_dirs / "mynet"
    assert main(["package", "--spec", str(user / "spec.json"), "--weights", str(user / "weights.pt"),
                 "--model-file", str(user / "mynet.py"), "-o", str(store / "mynet.mar")]) == 0
    return store


def _backend(store: Path, **settings_fields: Any) -> Any:
    from service.backends.torchserve import TorchServeBackend
    from service.config import Settings

    settings = Settings(model_store=store, torchserve_startup_timeout_s=STARTUP_S, **settings_fields)
    return TorchServeBackend(settings, build_archives=False)


@pytest.fixture(scope="module")
def backend(store: Path) -> Iterator[Any]:
    be = _backend(store)
    be.start()
    try:
        yield be
    finally:
        pgid = be.supervisor._proc.pid if be.supervisor._proc else None
        be.close()
        if pgid is not None:
            assert not _group_alive(pgid), "TorchServe or a worker outlived close()"


@pytest.fixture(scope="module")
def inprocess(model_dirs: Path) -> Any:
    from service.backends.inprocess import InProcessBackend

    be = InProcessBackend(model_dirs=(model_dirs,))
    be.start()
    return be


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_ready(backend: Any, timeout: float = STARTUP_S) -> None:
    deadline = time.monotonic() + timeout
    while not backend.ready():
        assert time.monotonic() < deadline, "TorchServe did not come back"
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------------------------


def test_models_come_from_the_archives(backend: Any) -> None:
    infos = {m.name: m for m in backend.models()}
    assert set(infos) == {"tinyles", "mynet"}
    assert infos["mynet"].classes == ("a", "b", "c") and infos["mynet"].version == "0.3.0"
    assert infos["tinyles"].grid_shape == (20, 24, 20)


def test_predict_matches_the_in_process_backend(backend: Any, inprocess: Any, scan: bytes) -> None:
    for model in ("tinyles", "mynet"):
        request = PredictRequest(model, _scan(scan))
        got, expected = backend.predict(request, CallContext()), inprocess.predict(request, CallContext())
        assert got.predicted_class == expected.predicted_class and got.model_version == expected.model_version
        assert got.logits == pytest.approx(expected.logits, abs=1e-5)


def test_attribute_matches_the_in_process_backend(backend: Any, inprocess: Any, scan: bytes) -> None:
    request = AttributeRequest("tinyles", _scan(scan), method="gradient", target="lesion")
    got, expected = backend.attribute(request, CallContext()), inprocess.attribute(request, CallContext())
    assert (got.method, got.target) == (expected.method, expected.target)
    assert got.total_positive == pytest.approx(expected.total_positive, rel=1e-4)
    assert got.nifti[:2] == b"\x1f\x8b"


def test_worker_errors_arrive_as_the_same_typed_errors(backend: Any, scan: bytes) -> None:
    with pytest.raises(errors.ScanFormatError):
        backend.predict(PredictRequest("tinyles", _scan(b"definitely not a scan")), CallContext())
    with pytest.raises(errors.InvalidOptionError):
        backend.attribute(AttributeRequest("tinyles", _scan(scan), method="no-such-method"), CallContext())
    with pytest.raises(errors.NotFoundError):
        backend.predict(PredictRequest("no-such-model", _scan(scan)), CallContext())


def test_a_visualization_refused_before_its_first_step_keeps_the_worker(backend: Any) -> None:
    """The worker's answer to a refused Visualize is the stream's last frame (``ts_stream_next: false``): TorchServe
    used to fail on the missing header and restart the worker for every such refusal."""
    deaths = backend.supervisor.worker_deaths
    for _ in range(2):
        with pytest.raises(errors.InvalidOptionError, match="out of range"):
            backend.visualize(VisualizeRequest("tinyles", "channel:conv1:99", steps=2), CallContext())
        assert backend.ready()
    time.sleep(1.0)  # the supervisor notices a dead worker within a poll
    assert backend.ready() and backend.supervisor.worker_deaths == deaths


def test_stock_rest_answers_a_predict_with_the_key(backend: Any, scan: bytes) -> None:
    """TorchServe's own REST API still answers the handler (what `python -m bench torchserve` compares against): the
    last-frame header is set on streamed answers only; on a unary answer it left the REST job without a response."""
    import hashlib
    import urllib.request

    from neuroexplain.serving import codec as env
    from neuroexplain.serving.types import Operation

    request = PredictRequest("tinyles", _scan(scan))
    fields = env.encode_request(Operation.PREDICT, request)
    boundary = hashlib.sha256(scan).hexdigest()
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
                    for k, v in fields.items()) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
               **(backend.supervisor.keys.header("inference") if backend.supervisor.keys else {})}
    url = f"{backend.supervisor.endpoints.rest_inference}/predictions/tinyles"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, data=body, headers=headers), timeout=60) as reply:
        answer = env.raise_if_error(env.decode(reply.read()))
    assert answer.kind is env.Kind.RESULT


def test_an_expired_deadline_never_reaches_torchserve(backend: Any, scan: bytes) -> None:
    with pytest.raises(errors.DeadlineExceededError):
        backend.predict(PredictRequest("tinyles", _scan(scan)), CallContext(deadline=time.monotonic() - 1))


def test_internal_is_a_full_queue_only_when_the_gateway_has_filled_it(backend: Any) -> None:
    """TorchServe answers INTERNAL for a full job queue, and for other failures: the gateway tells them apart by the
    calls it has outstanding there (it is TorchServe's only client), never by the message."""
    class Internal(grpc.RpcError, grpc.Call):  # type: ignore[misc]
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INTERNAL

        def details(self) -> str:
            return "the model's job queue is full"  # the text must not decide

    idle = backend.map_rpc_error(Internal(), "tinyles")
    assert isinstance(idle, errors.UnavailableError) and "queue not full" in str(idle)
    with contextlib.ExitStack() as calls:
        for _ in range(backend.engine.job_queue_size - 1):
            calls.enter_context(backend._outstanding_call("tinyles"))
        assert not isinstance(backend.map_rpc_error(Internal(), "tinyles"), errors.LimitExceededError)
        calls.enter_context(backend._outstanding_call("tinyles"))
        full = backend.map_rpc_error(Internal(), "tinyles")
        assert isinstance(full, errors.LimitExceededError) and "queue" in str(full)
        other = backend.map_rpc_error(Internal(), "not-registered")
        assert isinstance(other, errors.UnavailableError)
    assert isinstance(backend.map_rpc_error(Internal(), "tinyles"), errors.UnavailableError)


def test_torchserve_listens_on_loopback_only(backend: Any) -> None:
    import psutil

    java = psutil.Process(backend.supervisor._proc.pid)
    listening = [c.laddr for c in java.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 5  # REST inference, management, metrics, gRPC inference, gRPC management
    for addr in listening:
        ip = ipaddress.ip_address(addr.ip)
        ip = getattr(ip, "ipv4_mapped", None) or ip  # Java reports IPv4 sockets as ::ffff:127.0.0.1
        assert ip.is_loopback, f"TorchServe listens on {ip}:{addr.port}, outside loopback"


def test_workers_run_openmp_without_spinning_and_one_malloc_arena(backend: Any) -> None:
    # libgomp's spin-wait took the cores the next request needed, and per-thread malloc arenas faulted every request's
    # buffers in afresh (neuroexplain.serving.tuning); the workers get the settings unless the operator's
    # environment sets its own values.
    import psutil

    from neuroexplain.serving.tuning import ALLOCATOR_ENV, THREAD_ENV

    workers = psutil.Process(backend.supervisor._proc.pid).children(recursive=True)
    assert workers
    for worker in workers:
        env = worker.environ()
        for name, value in {**THREAD_ENV, **ALLOCATOR_ENV}.items():
            assert env.get(name) == os.environ.get(name, value), name


def test_metrics_are_re_exported_into_the_gateway_registry(backend: Any, scan: bytes) -> None:
    from prometheus_client import CollectorRegistry

    backend.predict(PredictRequest("tinyles", _scan(scan)), CallContext())
    registry = CollectorRegistry()
    for collector in backend.collectors():
        registry.register(collector)
    deadline = time.monotonic() + 20  # the frontend parses the worker's metric log lines asynchronously
    while True:
        samples = [s for family in registry.collect() for s in family.samples]
        # Re-exported counters follow the exposition convention: the ``_total`` suffix is added.
        handled = [s for s in samples if s.name == "NeuroExplainHandlerRequests_total"
                   and s.labels.get("ModelName") == "tinyles" and s.labels.get("Task") == "predict"
                   and s.labels.get("Outcome") == "ok"]
        if handled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert handled and handled[0].value >= 1
    assert any(s.name.startswith("ts_inference_requests") for s in samples)


# The worker reports, per cancelled job, how many steps (visualize) or model passes (attribute) still ran after the
# gateway raised the flag; DESIGN's runtime contract is "stopped within k steps". The one in flight when the flag
# rises always finishes; one more is allowed for the race between raising the flag and the worker's poll.
K_AFTER_FLAG = 2


def test_cancelled_visualize_stops_the_worker_within_a_few_steps(backend: Any, scan: bytes) -> None:
    seen: list[int] = []
    cancelled = threading.Event()

    def on_progress(p: Progress) -> None:
        seen.append(p.step)
        if p.step == 2:
            cancelled.set()

    before = cancel_reports(backend, "tinyles", "visualize")
    request = VisualizeRequest("tinyles", "class:lesion", preset="robust", steps=400)
    with pytest.raises(errors.CancelledError):
        backend.visualize(request, CallContext(is_cancelled=cancelled.is_set, on_progress=on_progress))
    # The stream lags the worker, so its steps do not say when the worker saw the flag; the worker's report does.
    after_flag = next_cancel_report(backend, "tinyles", "visualize", before)
    assert after_flag <= K_AFTER_FLAG, f"the worker ran {after_flag} steps after the cancel flag; allowed {K_AFTER_FLAG}"
    assert max(seen) < 400, "the worker ran the whole optimisation"
    assert not list(backend.supervisor.cancel_dir.iterdir()), "cancel flags must be cleaned up"
    # The worker is free again and serves the next requests.
    backend.predict(PredictRequest("tinyles", _scan(scan)), CallContext())
    result = backend.visualize(VisualizeRequest("tinyles", "class:lesion", steps=3), CallContext())
    assert len(result.objective_curve) == 3


def test_cancelled_attribute_stops_the_worker_within_a_few_passes(backend: Any, inprocess: Any, scan: bytes) -> None:
    # 64 noisy copies x 256 integration steps, one pass at a time (minutes of work); the caller leaves after 2 s.
    request = AttributeRequest("tinyles", _scan(scan), method="smoothgrad", options={
        "base": "integrated_gradients", "nt_samples": "64", "n_steps": "256", "internal_batch_size": "1"})  # fmt: skip
    cancelled = threading.Event()
    timer = threading.Timer(2.0, cancelled.set)
    before = cancel_reports(backend, "tinyles", "attribute")
    timer.start()
    try:
        with pytest.raises(errors.CancelledError):
            backend.attribute(request, CallContext(is_cancelled=cancelled.is_set))
    finally:
        timer.cancel()
    after_flag = next_cancel_report(backend, "tinyles", "attribute", before)
    assert after_flag <= K_AFTER_FLAG, f"the worker ran {after_flag} passes after the cancel flag; allowed {K_AFTER_FLAG}"
    assert not list(backend.supervisor.cancel_dir.iterdir()), "cancel flags must be cleaned up"
    # The worker is free again: the next attribution is answered, and equals the in-process one.
    quick = AttributeRequest("tinyles", _scan(scan), method="gradient", target="lesion")
    got = backend.attribute(quick, CallContext())
    assert got.total_positive == pytest.approx(inprocess.attribute(quick, CallContext()).total_positive, rel=1e-4)


def test_attribute_past_its_deadline_stops_the_worker_too(backend: Any, scan: bytes) -> None:
    # TorchServe drops the call at the deadline but not the worker's work: the gateway raises the flag as well, and the
    # worker, still running after the call ended, stops on it and removes it.
    request = AttributeRequest("tinyles", _scan(scan), method="smoothgrad", options={
        "base": "integrated_gradients", "nt_samples": "64", "n_steps": "256", "internal_batch_size": "1"})  # fmt: skip
    before = cancel_reports(backend, "tinyles", "attribute")
    with pytest.raises(errors.DeadlineExceededError):
        backend.attribute(request, CallContext(deadline=time.monotonic() + 2.0))
    after_flag = next_cancel_report(backend, "tinyles", "attribute", before)
    assert after_flag <= K_AFTER_FLAG, f"the worker ran {after_flag} passes after the cancel flag; allowed {K_AFTER_FLAG}"
    assert not list(backend.supervisor.cancel_dir.iterdir()), "the worker removes a flag the gateway left behind"
    assert backend.predict(PredictRequest("tinyles", _scan(scan)), CallContext()).model == "tinyles"


def test_torchserve_killed_mid_request_is_unavailable_then_recovers(backend: Any, inprocess: Any,
                                                                    scan: bytes) -> None:
    generation = backend.supervisor.generation
    old_group = backend.supervisor._proc.pid
    started = threading.Event()

    def on_progress(p: Progress) -> None:
        if p.step == 1:
            started.set()

    failure: list[BaseException] = []

    def long_call() -> None:
        try:
            backend.visualize(VisualizeRequest("tinyles", "class:lesion", steps=400), CallContext(on_progress=on_progress))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            failure.append(exc)

    readiness: list[bool] = []
    probing = threading.Event()

    def probe() -> None:  # what the gateway's health watcher sees, sampled every 20 ms
        while not probing.is_set():
            readiness.append(backend.ready())
            time.sleep(0.02)

    caller = threading.Thread(target=long_call)
    caller.start()
    assert started.wait(120), "the visualization never started"
    prober = threading.Thread(target=probe)
    prober.start()
    backend.supervisor.kill()
    caller.join(120)
    assert not caller.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], errors.UnavailableError), failure
    # The killed process closes its sockets (the call fails) a moment before it is reaped: wait for the restart itself.
    deadline = time.monotonic() + STARTUP_S
    while backend.supervisor.generation == generation:
        assert time.monotonic() < deadline, "TorchServe was not restarted"
        time.sleep(0.1)
    _wait_ready(backend)
    seen_back = time.monotonic() + 5  # the prober's next sample (every 20 ms) must see readiness back
    while readiness[-1] is not True and time.monotonic() < seen_back:
        time.sleep(0.02)
    probing.set()
    prober.join()
    assert False in readiness, "readiness never turned off while TorchServe restarted"
    assert readiness[-1] is True
    assert backend.supervisor.generation == generation + 1 and backend.supervisor.restarts >= 1
    assert not _group_alive(old_group), "workers of the killed TorchServe were left running"
    request = PredictRequest("tinyles", _scan(scan))
    assert backend.predict(request, CallContext()).logits == pytest.approx(
        inprocess.predict(request, CallContext()).logits, abs=1e-5
    )


def test_two_instances_side_by_side(backend: Any, store: Path, scan: bytes) -> None:
    import psutil

    from neuroexplain.serving.tuning import usable_cores

    # The second says its models have two workers each (the archives, built before, keep theirs): its workers'
    # torch threads are the cores split in two.
    second = _backend(store, torchserve_workers=2)
    second.start()
    group = second.supervisor._proc.pid
    try:
        for worker in psutil.Process(group).children(recursive=True):
            assert worker.environ().get("OMP_NUM_THREADS") == os.environ.get(
                "OMP_NUM_THREADS", str(max(1, usable_cores() // 2)))
        assert second.supervisor.work_dir != backend.supervisor.work_dir
        assert second.supervisor.endpoints.grpc_inference != backend.supervisor.endpoints.grpc_inference
        request = PredictRequest("mynet", _scan(scan))
        assert second.predict(request, CallContext()) == backend.predict(request, CallContext())
    finally:
        second.close()
    assert not _group_alive(group), "the second TorchServe left processes behind"
    assert not second.supervisor.work_dir.exists()
    assert backend.predict(PredictRequest("tinyles", _scan(scan)), CallContext()).model == "tinyles"


_GATEWAY_SCRIPT = """
import json, sys
from pathlib import Path
import grpc
from neuroexplain._proto import neuroexplain_pb2 as pb, neuroexplain_pb2_grpc as pb_grpc
from service.backends.torchserve import TorchServeBackend
from service.config import Settings
from service.grpc.server import create_server

store, scan = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
settings = Settings(model_store=store, port=0, metrics_port=-1, health_port=-1, cache="none",
                    torchserve_startup_timeout_s=240.0)
backend = TorchServeBackend(settings, build_archives=False)
backend.start()
gateway, port = create_server(settings, backend)
gateway.start()
try:
    stub = pb_grpc.NeuroExplainStub(grpc.insecure_channel(f"localhost:{port}"))
    answer = stub.Predict(pb.PredictRequest(model="tinyles", scan=pb.Scan(data=scan)), timeout=120)
    info = stub.GetModel(pb.GetModelRequest(name="tinyles"), timeout=30)
    maps = Path("/proc/self/maps").read_text()
    print(json.dumps({"predicted": answer.predicted_class, "methods": len(info.attribution_methods),
                      "spec_sha256": info.spec_sha256,
                      "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "captum")),
                      "libtorch": [line.split()[-1] for line in maps.splitlines() if "libtorch" in line][:3]}))
finally:
    gateway.stop(None)
    backend.close()
"""


def test_the_gateway_process_never_loads_torch(store: Path, scan: bytes, tmp_path: Path) -> None:
    """With the TorchServe backend, a gateway that served a Predict and a GetModel has neither torch nor captum
    imported, and no libtorch mapped (``/proc/self/maps``): model info comes from the archives' spec.json and the
    option tables, computations from the workers."""
    import json
    import subprocess

    (tmp_path / "scan.nii.gz").write_bytes(scan)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _GATEWAY_SCRIPT, str(store), str(tmp_path / "scan.nii.gz")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["predicted"] in ("healthy", "lesion") and report["methods"] > 0 and len(report["spec_sha256"]) == 64
    assert report["torch"] == [] and report["libtorch"] == []
