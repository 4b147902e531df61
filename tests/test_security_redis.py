"""Redis behind a password and TLS (``rediss://``), through the real gateway: keys and values hold no patient data,
the password comes from a file and never shows in logs or errors, a wrong password slows nothing down to a failure.

The scan store in Redis (``service.scans.RedisScanStore``): shared by replicas, bound to the caller, encrypted
(AES-GCM; nothing of a scan, its digest or its owner in any Redis key or value), a wrong key is a missing scan and
counted, key rotation keeps older entries readable, TTL and caps hold.
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
from neuroexplain.errors import InvalidOptionError, NotFoundError
from neuroexplain.serving.types import ScanInput
from service.backends.inprocess import InProcessBackend
from service.config import BackendKind, Settings
from service.core import Core, ScanRef
from service.grpc.server import create_server
from service.metrics import Metrics
from service.scans import MemoryScanStore, RedisScanStore, make_scan_store

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


def _scan(data: bytes) -> pb.Scan:
    # The test scan is not on the tiny model's grid: say how to place it (auto would try to register it).
    return pb.Scan(data=data, alignment=pb.ALIGNMENT_CENTER)


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
            first = stub.Predict(pb.PredictRequest(model="tiny", scan=_scan(scan)), timeout=TIMEOUT)
            second = stub.Predict(pb.PredictRequest(model="tiny", scan=_scan(scan)), timeout=TIMEOUT)
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
                pb.PredictRequest(model="tiny", scan=_scan(scan)), timeout=TIMEOUT)
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


# ---------------------------------------------------------------------------------------------------------------------
# The scan store in Redis


def start_redis(tmp: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A plain redis-server on a free (or the given) loopback port, nothing saved; returns it once it answers."""
    binary = require_binary("redis-server", "the Redis scan store tests need a real Redis")
    port = port or _free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)


@pytest.fixture()
def plain_redis(tmp_path: Path) -> Iterator[str]:
    proc, port = start_redis(tmp_path / "redis")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _key_file(path: Path, *keys: bytes) -> Path:
    path.write_text("# scan store keys, newest last\n" + "".join(k.hex() + "\n" for k in keys))
    path.chmod(0o600)
    return path


def _core(url: str, key_file: Path, registry: CollectorRegistry | None = None, **kw: object) -> tuple[Core, Metrics]:
    settings = Settings(host="127.0.0.1", backend=BackendKind.INPROCESS, cache=url, scan_store_key_file=str(key_file),
                        **kw)  # type: ignore[arg-type]
    metrics = Metrics(registry or CollectorRegistry())
    backend = InProcessBackend(model_dirs=(), models=())
    from service.cache import NullCache

    core = Core(settings, backend, NullCache(), metrics)
    if not isinstance(core.scans, RedisScanStore):  # until service/core.py builds its store with make_scan_store
        core.scans = make_scan_store(settings, metrics)  # type: ignore[assignment]
    assert isinstance(core.scans, RedisScanStore)
    return core, metrics


def _errors(metrics: Metrics, reason: str) -> float:
    return sum(s.value for m in metrics.registry.collect() for s in m.samples
               if s.name == "neuroexplain_scan_store_errors_total" and s.labels.get("reason") == reason)


def _all_redis_bytes(url: str) -> list[bytes]:
    """Every key and everything stored under it (strings, hash fields and values, sorted-set members)."""
    import redis

    client = redis.Redis.from_url(url)
    out: list[bytes] = []
    for key in client.keys("*"):
        out.append(key)
        kind = client.type(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"hash":
            for field_name, value in client.hgetall(key).items():
                out += [field_name, value]
        elif kind == b"zset":
            out += [member for member, _score in client.zrange(key, 0, -1, withscores=True)]
        else:
            raise AssertionError(f"unexpected Redis type {kind!r}")
    return out


def assert_redis_holds_no_scan_data(url: str, scan: bytes, *, expect_scan_store: bool) -> None:
    """Hygiene over every Redis key and value (result cache and scan store): no patient name, no run of the scan's
    bytes (compressed or not), no scan digest; and, where expected, the scan store did hold the scan (encrypted)."""
    import gzip

    stored = _all_redis_bytes(url)
    digest = hashlib.sha256(scan).hexdigest()
    plain = gzip.decompress(scan)
    chunks = [scan[i:i + 32] for i in range(0, len(scan) - 32, 512)]
    chunks += [plain[i:i + 32] for i in range(348, len(plain) - 32, 4096)]  # header and voxels
    chunks = [c for c in chunks if len(set(c)) >= 12]  # runs of zeros occur in any NIfTI: only distinctive runs
    assert len(chunks) >= 5, "too few distinctive runs of the scan to search for"
    chunks += [digest.encode(), bytes.fromhex(digest)]
    if expect_scan_store:
        assert any(k.startswith(b"neuroexplain:scan:") for k in stored), "no scan store entry in Redis"
        assert any(len(b) > len(scan) for b in stored), "the scan store entry is not there; the checks would be empty"
    for blob in stored:
        assert_no_patient(blob, "a Redis key or value")
        for chunk in chunks:
            assert chunk not in blob, "scan bytes or the scan digest found in Redis"


def test_redis_scan_store_is_shared_by_replicas_bound_to_the_caller_and_encrypted(plain_redis: str,
                                                                                  tmp_path: Path) -> None:
    import gzip

    keys = _key_file(tmp_path / "scan.key", bytes(range(32)))
    replica_a, _ = _core(plain_redis, keys)
    replica_b, metrics_b = _core(plain_redis, keys)
    raw = identifying_scan()
    digest = hashlib.sha256(raw).hexdigest()
    replica_a.remember_scan("pacs-bridge", ScanInput(data=raw, digest=digest))
    series = (b"instance-one" * 50, b"instance-two" * 50)
    replica_a.remember_scan("pacs-bridge", ScanInput(data=b"", digest="e" * 64, instances=series))

    # Another replica resolves it for the same caller ...
    resolved = replica_b.resolve_scan(ScanRef(digest=digest), "pacs-bridge")
    assert resolved.data == raw and resolved.digest == digest
    assert replica_b.resolve_scan(ScanRef(digest="e" * 64), "pacs-bridge").instances == series
    # ... and for nobody else: the same answer as an unknown digest.
    with pytest.raises(NotFoundError) as other:
        replica_b.resolve_scan(ScanRef(digest=digest), "someone-else")
    with pytest.raises(NotFoundError) as unknown:
        replica_b.resolve_scan(ScanRef(digest="0" * 64), "pacs-bridge")
    assert str(other.value).replace(digest[:12], "X") == str(unknown.value).replace("0" * 12, "X")

    # Nothing of the scan, its digest or its owner in any Redis key or value.
    stored = _all_redis_bytes(plain_redis)
    assert any(len(b) > len(raw) for b in stored), "the scan is not in Redis; the checks below would be empty"
    plain = gzip.decompress(raw)
    chunks = [raw[i:i + 32] for i in range(0, len(raw) - 32, 512)] + [plain[i:i + 32] for i in range(0, len(plain) - 32, 4096)]
    chunks += [b"instance-one" * 2, digest.encode(), digest[:16].encode(), bytes.fromhex(digest)[:16], b"pacs-bridge"]
    for blob in stored:
        assert_no_patient(blob, "a Redis key or value")
        for chunk in chunks:
            assert chunk not in blob, "scan bytes, digest or owner found in Redis"
    import redis

    client = redis.Redis.from_url(plain_redis)
    entries = client.keys("neuroexplain:scan:*")
    assert len(entries) == 2
    assert all(0 < client.ttl(k) <= Settings().scan_store_ttl_s for k in entries)  # every entry expires
    assert _errors(metrics_b, "undecryptable") == 0


def test_a_wrong_key_is_a_missing_scan_and_counted(plain_redis: str, tmp_path: Path) -> None:
    import redis

    good = _key_file(tmp_path / "good.key", b"\x01" * 32)
    writer, _ = _core(plain_redis, good)
    raw = identifying_scan()
    digest = hashlib.sha256(raw).hexdigest()
    writer.remember_scan("alice", ScanInput(data=raw, digest=digest))
    # A replica with another key file ...
    wrong = _key_file(tmp_path / "wrong.key", b"\x02" * 32)
    reader, metrics = _core(plain_redis, wrong)
    with pytest.raises(NotFoundError):
        reader.resolve_scan(ScanRef(digest=digest), "alice")
    assert _errors(metrics, "undecryptable") == 0  # names are keyed too: a wrong key finds nothing at all
    # ... and a value that was tampered with (or copied from another caller's entry) under the right name.
    client = redis.Redis.from_url(plain_redis)
    (name,) = client.keys("neuroexplain:scan:*")
    value = bytearray(client.get(name) or b"")
    value[-1] ^= 1
    client.set(name, bytes(value))
    with pytest.raises(NotFoundError):
        writer.resolve_scan(ScanRef(digest=digest), "alice")
    assert _errors(writer.metrics, "undecryptable") == 1


def test_key_rotation_newest_encrypts_all_decrypt(plain_redis: str, tmp_path: Path) -> None:
    old, new = b"\x0a" * 32, b"\x0b" * 32
    path = _key_file(tmp_path / "scan.key", old)
    core, metrics = _core(plain_redis, path)
    first = b"first scan bytes" * 100
    core.remember_scan("alice", ScanInput(data=first, digest="1" * 64))
    time.sleep(0.01)
    _key_file(path, old, new)  # rotation: a new line at the end, read without a restart
    second = b"second scan bytes" * 100
    core.remember_scan("alice", ScanInput(data=second, digest="2" * 64))
    assert core.resolve_scan(ScanRef(digest="1" * 64), "alice").data == first  # stored under the old key
    assert core.resolve_scan(ScanRef(digest="2" * 64), "alice").data == second
    only_new, _ = _core(plain_redis, _key_file(tmp_path / "new-only.key", new))
    assert only_new.resolve_scan(ScanRef(digest="2" * 64), "alice").data == second  # the newest key encrypted it
    with pytest.raises(NotFoundError):
        only_new.resolve_scan(ScanRef(digest="1" * 64), "alice")  # old entries need the old key (until they expire)
    assert _errors(metrics, "undecryptable") == 0


def test_redis_scan_store_caps_and_ttl(plain_redis: str, tmp_path: Path) -> None:
    import redis

    path = _key_file(tmp_path / "scan.key", b"\x05" * 32)
    core, _ = _core(plain_redis, path, scan_store_entries=2, scan_store_bytes=5000, scan_store_ttl_s=1)
    for i in range(3):
        core.remember_scan("alice", ScanInput(data=bytes([i]) * 1000, digest=str(i) * 64))
    with pytest.raises(NotFoundError):
        core.resolve_scan(ScanRef(digest="0" * 64), "alice")  # the earliest went first (entry cap)
    assert core.resolve_scan(ScanRef(digest="2" * 64), "alice").data == b"\x02" * 1000
    core.remember_scan("alice", ScanInput(data=b"x" * 6000, digest="9" * 64))  # above the byte cap: not stored
    with pytest.raises(NotFoundError):
        core.resolve_scan(ScanRef(digest="9" * 64), "alice")
    client = redis.Redis.from_url(plain_redis)
    assert len(client.keys("neuroexplain:scan:*")) <= 2
    deadline = time.monotonic() + 10
    while client.keys("neuroexplain:scan:*"):  # TTL 1 s: Redis drops them (waiting, not timing)
        assert time.monotonic() < deadline, "scan store entries did not expire"
        time.sleep(0.2)
    with pytest.raises(NotFoundError):
        core.resolve_scan(ScanRef(digest="2" * 64), "alice")


def test_without_a_key_file_scans_stay_in_memory(tmp_path: Path) -> None:
    settings = Settings(host="127.0.0.1", backend=BackendKind.INPROCESS, cache="redis://127.0.0.1:1/0")
    assert isinstance(make_scan_store(settings, Metrics(CollectorRegistry())), MemoryScanStore)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(InvalidOptionError) as info:
        make_scan_store(Settings(host="127.0.0.1", cache="redis://127.0.0.1:1/0", scan_store_key_file=str(bad)))
    assert "not a key" not in str(info.value) and "line 1" in str(info.value)


def test_a_digest_sent_to_one_replica_resolves_on_another_over_grpc(plain_redis: str, tmp_path: Path) -> None:
    keys = _key_file(tmp_path / "scan.key", b"\x07" * 32)
    model_dir = _tiny_model(tmp_path / "models")
    gateways = []
    try:
        for i in range(2):
            settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1,
                                backend=BackendKind.INPROCESS, cache=plain_redis, scan_store_key_file=str(keys),
                                model_dirs=(model_dir,), workers=4, cache_dir=tmp_path / f"c{i}")
            backend = InProcessBackend(model_dirs=settings.model_dirs, models=("tiny",))
            backend.start()
            gateway, port = create_server(settings, backend, registry=CollectorRegistry())
            if not isinstance(gateway.core.scans, RedisScanStore):  # until core uses make_scan_store
                gateway.core.scans = make_scan_store(settings, gateway.metrics)  # type: ignore[assignment]
            gateway.start()
            gateways.append((gateway, port))
        scan = identifying_scan()
        with grpc.insecure_channel(f"127.0.0.1:{gateways[0][1]}") as channel:
            first = pb_grpc.NeuroExplainStub(channel).Predict(
                pb.PredictRequest(model="tiny", scan=_scan(scan)), timeout=TIMEOUT)
        with grpc.insecure_channel(f"127.0.0.1:{gateways[1][1]}") as channel:
            by_digest = pb_grpc.NeuroExplainStub(channel).Predict(
                pb.PredictRequest(model="tiny", scan=pb.Scan(digest=first.info.scan_digest,
                                                             alignment=pb.ALIGNMENT_CENTER)), timeout=TIMEOUT)
        assert by_digest.info.scan_digest == first.info.scan_digest
        assert dict(by_digest.probabilities) == dict(first.probabilities)
        assert_redis_holds_no_scan_data(plain_redis, scan, expect_scan_store=True)
    finally:
        for gateway, _port in gateways:
            gateway.stop(None).wait()  # type: ignore[attr-defined]
            gateway.close()  # type: ignore[attr-defined]
