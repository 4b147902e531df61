"""Redis behind a password and TLS (``rediss://``), through the real gateway: keys and values hold no patient data,
the password comes from a file and never shows in logs or errors, a wrong password slows nothing down to a failure.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import require_binary
from prometheus_client import CollectorRegistry
from test_security_gateway import _Records, _tiny_model, assert_no_patient, identifying_scan
from test_security_pki import issue, make_ca

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from neuroexplain.errors import InvalidOptionError
from service.backends.inprocess import InProcessBackend
from service.config import BackendKind, Settings
from service.grpc.server import create_server

PASSWORD = "redis-pw-7f3a9c2e41d0"
TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS and wants a password; yields its port and the CA file."""
    binary = require_binary("redis-server", "the Redis password/TLS tests need a real Redis")
    tmp = tmp_path_factory.mktemp("redis")
    ca = make_ca("redis CA")
    cert, key = issue(ca, "localhost", server=True).write(tmp, "redis")
    (tmp / "ca.pem").write_bytes(ca.cert_pem)
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(tmp / "ca.pem"), "--tls-auth-clients", "no", "--requirepass", PASSWORD,
         "--save", "", "--appendonly", "no", "--dir", str(tmp), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("redis-server with TLS did not start (is it built with TLS support?)")
                time.sleep(0.1)
        yield port, tmp / "ca.pem"
    finally:
        proc.terminate()
        proc.wait(10)


def _gateway(tmp: Path, url: str, password_file: Path) -> tuple[object, int, CollectorRegistry]:
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, backend=BackendKind.INPROCESS,
                        cache=url, redis_password_file=str(password_file),
                        model_dirs=(_tiny_model(tmp / "models"),), workers=4)
    backend = InProcessBackend(model_dirs=settings.model_dirs, models=("tiny",))
    backend.start()
    registry = CollectorRegistry()
    gateway, port = create_server(settings, backend, registry=registry)
    gateway.start()
    return gateway, port, registry


def test_rediss_with_password_file_caches_digests_only(tls_redis: tuple[int, Path], tmp_path: Path) -> None:
    import redis

    port, ca = tls_redis
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    (tmp_path / "redis-password").write_text(PASSWORD + "\n")
    logs = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(logs)
    gateway, grpc_port, _registry = _gateway(tmp_path, url, tmp_path / "redis-password")
    scan = identifying_scan()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.NeuroExplainStub(channel)
            first = stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(data=scan)), timeout=TIMEOUT)
            second = stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(data=scan)), timeout=TIMEOUT)
        assert not first.info.cached and second.info.cached  # the result went through the TLS+password Redis
    finally:
        gateway.stop(None).wait()  # type: ignore[attr-defined]
        gateway.close()  # type: ignore[attr-defined]
        root.removeHandler(logs)
        root.setLevel(old_level)

    client = redis.Redis.from_url(url, password=PASSWORD)
    keys = client.keys("*")
    assert keys, "nothing was cached; the checks below would be empty"
    for key in keys:
        assert key.startswith(b"neuroexplain:result:") and len(key) == len(b"neuroexplain:result:") + 64
        assert_no_patient(key, "a Redis key")
        assert_no_patient(client.get(key) or b"", "a Redis value")
        assert 0 < client.ttl(key) <= Settings().cache_ttl_s  # every entry expires
    log_text = "\n".join(logs.texts)
    assert PASSWORD not in log_text
    assert_no_patient(log_text.encode(), "the logs")
    assert hashlib.sha256(scan).hexdigest() not in {k.decode().rsplit(":", 1)[1] for k in keys}  # keys mix in more

    # Without the password the cache fails, the request does not.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).ping()
    (tmp_path / "wrong").write_text("not-the-password\n")
    gateway, grpc_port, registry = _gateway(tmp_path / "w", url, tmp_path / "wrong")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = pb_grpc.NeuroExplainStub(channel).Predict(
                pb.PredictRequest(model="tiny", scan=pb.Scan(data=scan)), timeout=TIMEOUT)
        assert not reply.info.cached
        errors = sum(s.value for m in registry.collect() for s in m.samples if s.name == "neuroexplain_cache_errors_total")
        assert errors >= 1
    finally:
        gateway.stop(None).wait()  # type: ignore[attr-defined]
        gateway.close()  # type: ignore[attr-defined]


def test_a_bad_redis_url_is_refused_without_showing_its_password(tmp_path: Path) -> None:
    backend = InProcessBackend(model_dirs=(_tiny_model(tmp_path / "models"),), models=("tiny",))
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, backend=BackendKind.INPROCESS,
                        cache=f"redis://:{PASSWORD}@cache:notaport/0")
    with pytest.raises(InvalidOptionError) as info:
        create_server(settings, backend, registry=CollectorRegistry())
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
