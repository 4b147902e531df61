"""The deployment against a running gateway: the real `neuroexplain serve` process, configured by nothing but the
ConfigMap of k8s/ (ports, TLS, token and Redis password files and the Redis address swapped for test ones), checked the way
Kubernetes and Prometheus will use it:

- every metric the alerts, the dashboard and the HPA (through the prometheus-adapter rule) name is in its scrape;
- the Dockerfile's HEALTHCHECK command answers healthy against its plaintext health port (and unhealthy elsewhere);
- the main port wants TLS and a token, as the ConfigMap says; results land in a password-protected Redis;
- SIGTERM (what tini forwards) drains and exits 0.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import require_binary
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import configmap_env, dockerfile_stages, referenced_metric_names
from torchserve_models import tiny_scan_cnn

# Series Prometheus makes itself (not exported by the service).
PROMETHEUS_SYNTHETIC = {"up"}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "untyped": ("",),
    "unknown": ("",),
}
TOKEN = "deploy-test-token-0123456789abcdef"
REDIS_PASSWORD = "deploy-test-redis-password-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    crt, pem = folder / "tls.crt", folder / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem


@dataclass
class Gateway:
    process: subprocess.Popen[str]
    env: dict[str, str]
    port: int
    health_port: int
    metrics_port: int
    cert: Path
    stdout: list[str]
    redis_port: int = 0

    def scrape(self) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return str(response.read().decode())


def _redis(tmp: Path, password: str) -> tuple[subprocess.Popen[bytes], int]:
    """A real redis-server wanting a password, as k8s/redis.yaml runs it (in memory, no persistence)."""
    binary = require_binary("redis-server", "the ConfigMap's cache is Redis")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password, "--save", "",
         "--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("redis-server did not start")
        time.sleep(0.1)


def _start(tmp: Path, backend: str, startup_s: float, redis_port: int | None = None) -> Gateway:
    models = tmp / "models"
    tiny_scan_cnn(models / "tinyles")
    cert, key = _self_signed(tmp)
    tokens = tmp / "tokens"
    tokens.write_text(f"deploy-test:{TOKEN}\n")
    ports = {"NEUROEXPLAIN_PORT": _free_port(), "NEUROEXPLAIN_HEALTH_PORT": _free_port(),
             "NEUROEXPLAIN_METRICS_PORT": _free_port()}

    config = configmap_env()
    # Only what cannot be the same on a test machine changes; everything else is the ConfigMap's.
    swaps = {
        **{k: str(v) for k, v in ports.items()},
        "NEUROEXPLAIN_BACKEND": backend,
        "NEUROEXPLAIN_TLS_CERT": str(cert),
        "NEUROEXPLAIN_TLS_KEY": str(key),
        "NEUROEXPLAIN_TOKENS_FILE": str(tokens),
    }
    scan_key = tmp / "scan-store-key"
    scan_key.write_text(os.urandom(32).hex() + "\n")
    scan_key.chmod(0o600)
    swaps["NEUROEXPLAIN_SCAN_STORE_KEY_FILE"] = str(scan_key)
    if redis_port is None:
        swaps["NEUROEXPLAIN_CACHE"] = "disk"
    else:
        # The ConfigMap's URL with the test Redis's address; the password only in the file, as in the pod.
        url = config["NEUROEXPLAIN_CACHE"]
        assert url == "redis://neuroexplain-redis:6379/0"
        swaps["NEUROEXPLAIN_CACHE"] = url.replace("neuroexplain-redis:6379", f"127.0.0.1:{redis_port}")
        password = tmp / "redis-password"
        password.write_text(REDIS_PASSWORD + "\n")
        swaps["NEUROEXPLAIN_REDIS_PASSWORD_FILE"] = str(password)
    assert set(swaps) <= set(config), "the ConfigMap changed; update this test's swaps"
    config.update(swaps)
    if redis_port is None:
        del config["NEUROEXPLAIN_REDIS_PASSWORD_FILE"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROEXPLAIN_")}
    env.update(config)
    env.update({"NEUROEXPLAIN_CACHE_DIR": str(tmp / "cache"), "NEUROEXPLAIN_MODEL_DIRS": str(models),
                "NEUROEXPLAIN_MODEL_STORE": str(tmp / "model-store"),
                "XDG_CACHE_HOME": str(tmp / "xdg"), "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"})
    process = subprocess.Popen(
        [sys.executable, "-m", "neuroexplain.cli.main", "serve"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
    )
    lines: list[str] = []
    errors: list[str] = []
    ready = threading.Event()

    def read(stream: object, sink: list[str], signal_ready: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line.rstrip("\n"))
            if signal_ready and line.strip() == "ready":
                ready.set()

    threading.Thread(target=read, args=(process.stdout, lines, True), daemon=True).start()
    threading.Thread(target=read, args=(process.stderr, errors, False), daemon=True).start()
    deadline = time.monotonic() + startup_s
    while not ready.wait(0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            pytest.fail(f"neuroexplain serve --backend {backend} never printed 'ready':\n" + "\n".join(errors[-30:]))
    return Gateway(process, env, ports["NEUROEXPLAIN_PORT"], ports["NEUROEXPLAIN_HEALTH_PORT"],
                   ports["NEUROEXPLAIN_METRICS_PORT"], cert, lines)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("deploy-live")
    redis, redis_port = _redis(tmp, REDIS_PASSWORD)
    try:
        gw = _start(tmp, "inprocess", startup_s=240, redis_port=redis_port)
        gw.redis_port = redis_port
        try:
            yield gw
        finally:
            _stop(gw.process)
    finally:
        redis.terminate()
        redis.wait(timeout=30)


def _call_list_models(gw: Gateway, token: str | None) -> grpc.StatusCode:
    from neuroexplain._proto import neuroexplain_pb2 as pb
    from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=gw.cert.read_bytes())
    with grpc.secure_channel(f"localhost:{gw.port}", credentials) as channel:
        stub = pb_grpc.NeuroExplainStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _healthcheck_argv() -> list[str]:
    _, stages = dockerfile_stages()
    (check,) = stages[-1].args_of("HEALTHCHECK")
    argv: list[str] = json.loads(check[check.index("CMD") + 3 :].strip())
    assert argv[0] == "python", "the image's venv python is first on PATH"
    return [sys.executable, *argv[1:]]


def test_main_port_wants_tls_and_a_token(gateway: Gateway) -> None:
    assert _call_list_models(gateway, TOKEN) == grpc.StatusCode.OK
    assert _call_list_models(gateway, None) == grpc.StatusCode.UNAUTHENTICATED
    assert _call_list_models(gateway, "wrong-token") == grpc.StatusCode.UNAUTHENTICATED


def test_dockerfile_healthcheck_passes_on_the_health_port(gateway: Gateway) -> None:
    env = {**gateway.env, "NEUROEXPLAIN_HEALTH_PORT": str(gateway.health_port)}
    result = subprocess.run(_healthcheck_argv(), env=env, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr


def test_dockerfile_healthcheck_fails_where_nothing_answers(gateway: Gateway) -> None:
    env = {**gateway.env, "NEUROEXPLAIN_HEALTH_PORT": str(_free_port())}
    result = subprocess.run(_healthcheck_argv(), env=env, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0


def test_health_port_answers_plaintext_for_liveness_and_readiness(gateway: Gateway) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{gateway.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "neuroexplain.v1.NeuroExplain"):  # the k8s probes' two services
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service


def _exported(scrape: str) -> set[str]:
    """Every sample name a scrape can hold, from its families' types (a family may have no sample yet)."""
    exported: set[str] = set()
    for family in text_string_to_metric_families(scrape):
        exported.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
        exported.update(sample.name for sample in family.samples)
    return exported


def test_every_metric_in_alerts_dashboard_and_hpa_is_scraped(gateway: Gateway) -> None:
    assert _call_list_models(gateway, TOKEN) == grpc.StatusCode.OK  # labelled series exist once used
    exported = _exported(gateway.scrape())
    used = referenced_metric_names()
    assert "neuroexplain_requests_in_flight" in used and "neuroexplain_requests_total" in used
    missing = {
        name: sorted(where) for name, where in used.items()
        if name not in exported and name not in PROMETHEUS_SYNTHETIC and not name.startswith(("ts_", "neuroexplain_pacs_"))
    }  # the bridge's own series: test_deploy_pacs checks them against a running bridge
    assert not missing, f"named in k8s/ or docs but not exported by the gateway: {missing}"


def test_in_flight_series_carries_only_bounded_labels(gateway: Gateway) -> None:
    families = {f.name: f for f in text_string_to_metric_families(gateway.scrape())}
    samples = families["neuroexplain_requests_in_flight"].samples
    assert samples, "the HPA's metric has no series"
    for sample in samples:
        assert set(sample.labels) <= {"rpc"}, sample.labels


def test_results_are_cached_in_the_password_protected_redis(gateway: Gateway) -> None:
    """The ConfigMap's cache settings (URL without password + password file) reach a real Redis."""
    import redis
    from test_service_support import make_scan

    from neuroexplain._proto import neuroexplain_pb2 as pb
    from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=gateway.cert.read_bytes())
    request = pb.PredictRequest(model="tinyles", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, data=make_scan(seed=7)))
    metadata = [("authorization", f"Bearer {TOKEN}")]
    with grpc.secure_channel(f"localhost:{gateway.port}", credentials) as channel:
        stub = pb_grpc.NeuroExplainStub(channel)
        first = stub.Predict(request, metadata=metadata, timeout=120)
        second = stub.Predict(request, metadata=metadata, timeout=120)
    assert not first.info.cached and second.info.cached
    client = redis.Redis(host="127.0.0.1", port=gateway.redis_port, password=REDIS_PASSWORD)
    try:
        assert client.dbsize() >= 1
    finally:
        client.close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=gateway.redis_port, password="wrong").ping()
    families = {f.name: f for f in text_string_to_metric_families(gateway.scrape())}
    assert not [s for s in families["neuroexplain_cache_errors"].samples if s.value > 0]
    hits = [s for s in families["neuroexplain_cache_hits"].samples if s.name.endswith("_total")]
    assert sum(s.value for s in hits) >= 1


def test_sigterm_drains_and_exits_zero(gateway: Gateway) -> None:
    # Last in the module: it stops the shared gateway. tini forwards exactly this signal.
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=120) == 0


# --- TorchServe backend: its re-exported metrics ---------------------------------------------------------------------


@pytest.mark.torchserve
@pytest.mark.slow
def test_torchserve_metrics_the_dashboard_names_are_re_exported(tmp_path: Path) -> None:
    """The production configuration (TorchServe backend): after one Predict, every ``ts_*`` metric named in k8s/ is
    in the gateway's scrape; SIGTERM then stops the gateway and its TorchServe."""
    require_binary("java", "TorchServe needs Java 17")
    from test_service_support import make_scan

    from neuroexplain._proto import neuroexplain_pb2 as pb
    from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc

    used = {name for name in referenced_metric_names() if name.startswith("ts_")}
    assert used, "the dashboard shows TorchServe's own queue and inference time"
    gw = _start(tmp_path, "torchserve", startup_s=420)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=gw.cert.read_bytes())
        with grpc.secure_channel(f"localhost:{gw.port}", credentials) as channel:
            stub = pb_grpc.NeuroExplainStub(channel)
            response = stub.Predict(
                pb.PredictRequest(model="tinyles", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, data=make_scan())),
                metadata=[("authorization", f"Bearer {TOKEN}")], timeout=120,
            )
            assert set(response.probabilities) == {"healthy", "lesion"}
        missing = used - _exported(gw.scrape())
        assert not missing, f"TorchServe metrics named in k8s/ but not re-exported by the gateway: {sorted(missing)}"
    finally:
        _stop(gw.process)
    assert gw.process.returncode == 0
