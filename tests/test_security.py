"""Security components against a small real gRPC server: TLS, mTLS, tokens, rotation, health port, audit, caps.

Certificates are generated here with ``cryptography``. The end-to-end checks through the real gateway live in
``test_security_gateway.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from test_security_pki import Issued, issue, make_ca

from service.grpc.status import ErrorInterceptor
from service.security import audit
from service.security.errors import SecurityConfigError
from service.security.health import create_health_server
from service.security.interceptors import SecurityInterceptor
from service.security.tls import ReloadingServerCredentials, TlsFiles, load_material
from service.security.tokens import TokenStore

READINESS = "neuroexplain.v1.NeuroExplain"
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
TIMEOUT = 10


# ---------------------------------------------------------------------------------------------------------------------
# A tiny service: raw-bytes methods, so no generated code is needed.


class _Echo:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.stream_context: grpc.ServicerContext | None = None

    def say(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        audit.annotate(model="tiny", scan_digest=hashlib.sha256(request).hexdigest())
        return request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such model; known: tiny")

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.entered.release()
        self.release.wait(TIMEOUT)
        return b"done"

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.stream_context = context
        self.entered.release()
        yield b"1"
        self.release.wait(TIMEOUT)
        yield b"2"

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Say": grpc.unary_unary_rpc_method_handler(self.say),
                "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
                "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
                "Count": grpc.unary_stream_rpc_method_handler(self.count),
            },
        )


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


class _Server:
    def __init__(
        self, *, credentials: grpc.ServerCredentials | None = None, tokens: TokenStore | None = None,
        max_calls_per_caller: int = 8,
    ) -> None:
        self.echo = _Echo()
        self.audit_lines = _Lines()
        logger = logging.getLogger(f"test.audit.{id(self)}")
        logger.addHandler(self.audit_lines)
        self.interceptor = SecurityInterceptor(
            tokens=tokens, audit_log=audit.AuditLog(logger=logger), max_calls_per_caller=max_calls_per_caller
        )
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(READINESS, health_pb2.HealthCheckResponse.SERVING)
        # Refusals are raised as the error tree's classes: the error interceptor outside maps them (one table).
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  interceptors=[ErrorInterceptor(), self.interceptor])
        self.server.add_generic_rpc_handlers((self.echo.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def stop(self) -> None:
        self.echo.release.set()
        self.server.stop(None)


@pytest.fixture
def servers() -> Iterator[list[_Server]]:
    started: list[_Server] = []
    yield started
    for s in started:
        s.stop()


def _say(channel: grpc.Channel, payload: bytes = b"hello", token: str | None = None) -> bytes:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    return channel.unary_unary("/test.Echo/Say")(payload, timeout=TIMEOUT, metadata=metadata)


def _code(fn, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code()


def _check(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


def _tls_channel(target: str, ca: Issued, client: Issued | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(target, creds)


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    ca = make_ca("test server CA")
    client_ca = make_ca("test client CA")
    other_ca = make_ca("unknown CA")
    return {
        "ca": ca,
        "server": issue(ca, "localhost", server=True),
        "client_ca": client_ca,
        "client": issue(client_ca, "pacs-bridge", server=False),
        "unknown_client": issue(other_ca, "intruder", server=False),
        "expired_client": issue(client_ca, "old-bridge", server=False, not_before_days=-30, not_after_days=-1),
        "other_ca": other_ca,
    }


def _tls_files(tmp_path: Path, pki: dict[str, Issued], *, mtls: bool) -> TlsFiles:
    cert, key = pki["server"].write(tmp_path, "server")
    ca = None
    if mtls:
        ca = tmp_path / "client-ca.pem"
        ca.write_bytes(pki["client_ca"].cert_pem)
    return TlsFiles(cert, key, ca)


def _write_tokens(path: Path, text: str) -> None:
    # Write-then-rename, as an operator or a Secret update would; a new inode is what the store notices.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# TLS and mutual TLS


def test_tls_off_serves_plaintext(servers: list[_Server]) -> None:
    servers.append(s := _Server())
    with grpc.insecure_channel(s.target) as channel:
        assert _say(channel) == b"hello"
    (line,) = s.audit_lines.records()
    assert (line["caller"], line["auth"], line["code"]) == (None, "none", "OK")


def test_tls_on_needs_a_tls_client_that_trusts_the_ca(tmp_path: Path, pki: dict[str, Issued],
                                                        servers: list[_Server]) -> None:
    creds = ReloadingServerCredentials(_tls_files(tmp_path, pki, mtls=False))
    servers.append(s := _Server(credentials=creds.credentials))
    with _tls_channel(s.target, pki["ca"]) as channel:
        assert _say(channel) == b"hello"
    with grpc.insecure_channel(s.target) as channel:
        assert _code(_say, channel) == grpc.StatusCode.UNAVAILABLE
    with _tls_channel(s.target, pki["other_ca"]) as channel:
        assert _code(_say, channel) == grpc.StatusCode.UNAVAILABLE
    assert [r["code"] for r in s.audit_lines.records()] == ["OK"]  # refused handshakes never reach a handler


def test_mtls_accepts_a_valid_client_and_names_it_by_subject(tmp_path: Path, pki: dict[str, Issued],
                                                              servers: list[_Server]) -> None:
    creds = ReloadingServerCredentials(_tls_files(tmp_path, pki, mtls=True))
    servers.append(s := _Server(credentials=creds.credentials))
    with _tls_channel(s.target, pki["ca"], pki["client"]) as channel:
        assert _say(channel) == b"hello"
    (line,) = s.audit_lines.records()
    assert line["auth"] == "mtls"
    assert line["caller"] == line["cert_subject"] == "CN=pacs-bridge,O=neuroexplain tests"


@pytest.mark.parametrize("client", ["unknown_client", "expired_client", None])
def test_mtls_refuses_unknown_expired_and_missing_client_certificates(
    client: str | None, tmp_path: Path, pki: dict[str, Issued], servers: list[_Server]
) -> None:
    creds = ReloadingServerCredentials(_tls_files(tmp_path, pki, mtls=True))
    servers.append(s := _Server(credentials=creds.credentials))
    with _tls_channel(s.target, pki["ca"], pki[client] if client else None) as channel:
        assert _code(_say, channel) == grpc.StatusCode.UNAVAILABLE
    with _tls_channel(s.target, pki["ca"], pki["client"]) as channel:  # the same server still serves valid clients
        assert _say(channel) == b"hello"


def test_server_certificate_rotates_without_restart(tmp_path: Path, pki: dict[str, Issued],
                                                   servers: list[_Server]) -> None:
    files = _tls_files(tmp_path, pki, mtls=False)
    creds = ReloadingServerCredentials(files)
    servers.append(s := _Server(credentials=creds.credentials))
    with _tls_channel(s.target, pki["ca"]) as channel:
        assert _say(channel) == b"hello"

    new_ca = make_ca("next server CA")
    new_server = issue(new_ca, "localhost", server=True)
    # A half-finished rotation (new certificate, old key) is not used: the old pair keeps serving.
    files.cert.write_bytes(new_server.cert_pem)
    with _tls_channel(s.target, pki["ca"]) as channel:
        assert _say(channel) == b"hello"
    assert creds.reload_failures == 1
    files.key.write_bytes(new_server.key_pem)
    with _tls_channel(s.target, new_ca) as channel:
        assert _say(channel) == b"hello"
    with _tls_channel(s.target, pki["ca"]) as channel:
        assert _code(_say, channel) == grpc.StatusCode.UNAVAILABLE
    assert creds.reloads == 1


def test_client_ca_rotation_takes_effect_for_new_connections(tmp_path: Path, pki: dict[str, Issued],
                                                             servers: list[_Server]) -> None:
    files = _tls_files(tmp_path, pki, mtls=True)
    creds = ReloadingServerCredentials(files)
    servers.append(s := _Server(credentials=creds.credentials))
    with _tls_channel(s.target, pki["ca"], pki["unknown_client"]) as channel:
        assert _code(_say, channel) == grpc.StatusCode.UNAVAILABLE
    assert files.client_ca is not None
    files.client_ca.write_bytes(pki["client_ca"].cert_pem + pki["other_ca"].cert_pem)
    with _tls_channel(s.target, pki["ca"], pki["unknown_client"]) as channel:
        assert _say(channel) == b"hello"


def test_tls_material_is_checked_before_use(tmp_path: Path, pki: dict[str, Issued]) -> None:
    cert, key = pki["server"].write(tmp_path, "server")
    _other_cert, other_key = pki["client"].write(tmp_path, "other")
    with pytest.raises(SecurityConfigError, match="does not belong"):
        load_material(TlsFiles(cert, other_key))
    expired = issue(pki["ca"], "localhost", server=True, not_before_days=-10, not_after_days=-1)
    ecert, ekey = expired.write(tmp_path, "expired")
    with pytest.raises(SecurityConfigError, match="expired"):
        load_material(TlsFiles(ecert, ekey))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(SecurityConfigError, match="not a PEM certificate"):
        load_material(TlsFiles(tmp_path / "junk.pem", key))
    with pytest.raises(SecurityConfigError, match="not a PEM private key"):
        load_material(TlsFiles(cert, tmp_path / "junk.pem"))
    with pytest.raises(SecurityConfigError, match="cannot read"):
        load_material(TlsFiles(cert, tmp_path / "missing.key"))
    with pytest.raises(SecurityConfigError, match="client CA bundle"):
        load_material(TlsFiles(cert, key, tmp_path / "junk.pem"))
    assert load_material(TlsFiles(cert, key)).not_after == pki["server"].cert.not_valid_after_utc


# ---------------------------------------------------------------------------------------------------------------------
# Tokens


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    _write_tokens(path, f"# callers\nalice:{ALICE}\n\nbob:{BOB}\n")
    return path


def test_tokens_valid_invalid_missing_and_malformed(token_file: Path, servers: list[_Server]) -> None:
    servers.append(s := _Server(tokens=TokenStore.from_file(token_file)))
    with grpc.insecure_channel(s.target) as channel:
        assert _say(channel, token=ALICE) == b"hello"
        assert _say(channel, token=BOB) == b"hello"
        assert _code(_say, channel, token=ALICE[:-1] + "X") == grpc.StatusCode.UNAUTHENTICATED
        assert _code(_say, channel) == grpc.StatusCode.UNAUTHENTICATED
        call = channel.unary_unary("/test.Echo/Say")
        assert _code(call, b"x", timeout=TIMEOUT, metadata=(("authorization", f"Basic {ALICE}"),)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        with pytest.raises(grpc.RpcError) as info:
            _say(channel, token="wrong-token-but-long-enough")
        assert "wrong-token" not in (info.value.details() or "")
    records = s.audit_lines.records()
    assert [(r["caller"], r["auth"], r["code"]) for r in records] == [
        ("alice", "token", "OK"),
        ("bob", "token", "OK"),
        (None, "none", "UNAUTHENTICATED"),
        (None, "none", "UNAUTHENTICATED"),
        (None, "none", "UNAUTHENTICATED"),
        (None, "none", "UNAUTHENTICATED"),
    ]
    text = "\n".join(s.audit_lines.lines)
    assert ALICE not in text and BOB not in text


def test_token_rotation_while_serving(token_file: Path, servers: list[_Server]) -> None:
    store = TokenStore.from_file(token_file)
    servers.append(s := _Server(tokens=store))
    new_alice = "alice-NEW-token-fedcba9876543210"
    with grpc.insecure_channel(s.target) as channel:
        assert _say(channel, token=ALICE) == b"hello"
        # Step 1: add the new token beside the old; both work.
        _write_tokens(token_file, f"alice:{ALICE}\nalice:{new_alice}\nbob:{BOB}\n")
        assert _say(channel, token=new_alice) == b"hello"
        assert _say(channel, token=ALICE) == b"hello"
        # Step 2: remove the old one; it stops working at once, the new one goes on.
        _write_tokens(token_file, f"alice:{new_alice}\nbob:{BOB}\n")
        assert _code(_say, channel, token=ALICE) == grpc.StatusCode.UNAUTHENTICATED
        assert _say(channel, token=new_alice) == b"hello"
        # A broken file while serving keeps the last good set (no lock-out), and is counted.
        _write_tokens(token_file, "alice has no colon\n")
        assert _say(channel, token=new_alice) == b"hello"
        assert store.reload_failures == 1
        # An in-place rewrite (same inode) is noticed too.
        token_file.write_text(f"bob:{BOB}\n")
        assert _code(_say, channel, token=new_alice) == grpc.StatusCode.UNAUTHENTICATED
        assert _say(channel, token=BOB) == b"hello"
    assert store.names == ("bob",)


def test_token_store_rejects_bad_configuration(tmp_path: Path) -> None:
    secret = "s3cret-value-that-must-not-leak"
    cases = {
        f"alice {secret}": "expected 'name:token'",
        "alice:short": "at least 16",
        f"al ice:{secret}": "the name must be",
        f"alice:{secret}\nbob:{secret}": "repeats the token of line 1",
        "# only a comment\n": "no tokens configured",
    }
    for text, message in cases.items():
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(SecurityConfigError, match=message) as info:
            TokenStore.from_file(path)
        assert secret not in str(info.value)
    with pytest.raises(SecurityConfigError, match="cannot read tokens file"):
        TokenStore.from_file(tmp_path / "missing")
    with pytest.raises(SecurityConfigError, match="not both"):
        TokenStore.from_sources(tmp_path / "tokens", f"a:{ALICE}")
    store = TokenStore.from_sources(None, f"alice:{ALICE}, bob:{BOB}")
    assert store is not None and store.names == ("alice", "bob")
    assert store.authenticate(BOB) == "bob" and store.authenticate(BOB + "x") is None
    assert TokenStore.from_sources(None, None) is None


def test_health_needs_no_token_but_reflection_style_methods_do(token_file: Path, servers: list[_Server]) -> None:
    servers.append(s := _Server(tokens=TokenStore.from_file(token_file)))
    with grpc.insecure_channel(s.target) as channel:
        assert _check(channel, "") == health_pb2.HealthCheckResponse.SERVING
        assert _check(channel, READINESS) == health_pb2.HealthCheckResponse.SERVING
        assert _code(_say, channel) == grpc.StatusCode.UNAUTHENTICATED
    assert [r["rpc"] for r in s.audit_lines.records()] == ["/test.Echo/Say"]  # probes are not audited


# ---------------------------------------------------------------------------------------------------------------------
# Health-only port


def test_health_port_answers_plaintext_while_the_main_port_requires_tls(
    tmp_path: Path, pki: dict[str, Issued], servers: list[_Server]
) -> None:
    creds = ReloadingServerCredentials(_tls_files(tmp_path, pki, mtls=True))
    servers.append(s := _Server(credentials=creds.credentials))
    health_server, health_port = create_health_server(s.health, host="127.0.0.1", port=0)
    health_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            assert _check(channel, "") == health_pb2.HealthCheckResponse.SERVING
            assert _check(channel, READINESS) == health_pb2.HealthCheckResponse.SERVING
            # Same servicer: readiness flips on both ports together.
            s.health.set(READINESS, health_pb2.HealthCheckResponse.NOT_SERVING)
            assert _check(channel, READINESS) == health_pb2.HealthCheckResponse.NOT_SERVING
            with _tls_channel(s.target, pki["ca"], pki["client"]) as main:
                assert _check(main, READINESS) == health_pb2.HealthCheckResponse.NOT_SERVING
            # Nothing but health is served there.
            assert _code(_say, channel) == grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(s.target) as channel:
            assert _code(_check, channel, "") == grpc.StatusCode.UNAVAILABLE
    finally:
        health_server.stop(None)


# ---------------------------------------------------------------------------------------------------------------------
# Audit and per-caller concurrency


def test_audit_lines_for_allowed_and_refused_calls(token_file: Path, servers: list[_Server]) -> None:
    servers.append(s := _Server(tokens=TokenStore.from_file(token_file)))
    payload = b"pretend scan bytes"
    with grpc.insecure_channel(s.target) as channel:
        _say(channel, payload, token=ALICE)
        assert _code(channel.unary_unary("/test.Echo/Fail"), b"", timeout=TIMEOUT,
                     metadata=(("authorization", f"Bearer {BOB}"),)) == grpc.StatusCode.NOT_FOUND
        _code(_say, channel, payload, token="not-a-valid-token-at-all")
    ok, not_found, refused = s.audit_lines.records()
    assert set(ok) == {"time", "event", "rpc", "caller", "auth", "cert_subject", "peer", "model", "scan_digest",
                       "method", "target", "result_digest", "code", "duration_s"}
    assert ok["rpc"] == "/test.Echo/Say" and ok["caller"] == "alice" and ok["code"] == "OK"
    assert ok["model"] == "tiny" and ok["scan_digest"] == hashlib.sha256(payload).hexdigest()
    assert ok["time"].endswith("Z") and ok["duration_s"] >= 0 and ok["peer"].startswith("ipv4:127.0.0.1:")
    assert (not_found["caller"], not_found["code"]) == ("bob", "NOT_FOUND")
    assert (refused["caller"], refused["code"], refused["scan_digest"]) == (None, "UNAUTHENTICATED", None)


def test_audit_log_writes_json_lines_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    log = audit.AuditLog(str(path))
    logging.disable(logging.CRITICAL)  # someone silencing logging elsewhere must not silence the audit log
    try:
        record = audit.CallRecord(rpc="/x/Y", peer="ipv4:127.0.0.1:1", caller="alice", auth="token")
        log.write(record, "OK")
        log.write(record, "CANCELLED")
    finally:
        logging.disable(logging.NOTSET)
        log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["code"] for line in lines] == ["OK", "CANCELLED"]
    assert not logging.getLogger(audit.AUDIT_LOGGER).propagate  # never mixed into the operational log


def test_per_caller_concurrency_cap(token_file: Path, servers: list[_Server]) -> None:
    servers.append(s := _Server(tokens=TokenStore.from_file(token_file), max_calls_per_caller=1))
    auth = {n: (("authorization", f"Bearer {t}"),) for n, t in (("alice", ALICE), ("bob", BOB))}
    with grpc.insecure_channel(s.target) as channel:
        slow = channel.unary_unary("/test.Echo/Slow")
        count = channel.unary_stream("/test.Echo/Count")
        first = slow.future(b"", timeout=TIMEOUT, metadata=auth["alice"])
        assert s.echo.entered.acquire(timeout=TIMEOUT)
        assert _code(_say, channel, token=ALICE) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _say(channel, token=BOB) == b"hello"  # other callers are not affected
        s.echo.release.set()
        assert first.result() == b"done"
        assert _say(channel, token=ALICE) == b"hello"  # the slot came back
        # A streaming call holds its slot until its last message.
        s.echo.release.clear()
        stream = count(b"", timeout=TIMEOUT, metadata=auth["alice"])
        assert next(stream) == b"1"
        assert _code(_say, channel, token=ALICE) == grpc.StatusCode.RESOURCE_EXHAUSTED
        s.echo.release.set()
        assert list(stream) == [b"2"]
        deadline = time.monotonic() + TIMEOUT
        while s.interceptor.limiter.in_flight("caller:alice") and time.monotonic() < deadline:
            time.sleep(0.01)  # the server finishes the stream just after the client saw its end
        assert _say(channel, token=ALICE) == b"hello"
    codes = [(r["caller"], r["code"]) for r in s.audit_lines.records()]
    assert codes.count(("alice", "RESOURCE_EXHAUSTED")) == 2
    assert s.interceptor.limiter.in_flight("caller:alice") == 0


def test_redis_urls_are_redacted_before_they_reach_a_message() -> None:
    from service.security.redact import redact_url

    assert redact_url("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("rediss://app:s3cret@[::1]:6380/1?ssl_ca_certs=/etc/ca.pem&password=s3cret") == (
        "rediss://app:***@[::1]:6380/1?ssl_ca_certs=/etc/ca.pem&password=***"
    )
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"
    assert redact_url("redis://:s3cret@cache:notaport") == "***"  # unparsable: hide all of it


def test_settings_from_the_environment_turn_controls_on_and_keep_tokens_out_of_repr() -> None:
    from service.config import build_settings
    from service.security.setup import build_security

    settings = build_settings(environ={"NEUROEXPLAIN_TOKENS": f"alice:{ALICE},bob:{BOB}",
                                       "NEUROEXPLAIN_MAX_CALLS_PER_CALLER": "2", "NEUROEXPLAIN_AUDIT_LOG": "off"})
    layer = build_security(settings)
    assert layer.tokens is not None and layer.tokens.names == ("alice", "bob")
    assert layer.audit_log is None and layer.interceptor.limiter.limit == 2 and layer.credentials is None
    assert ALICE not in repr(settings) and ALICE not in layer.describe()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "server.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "needs --tls-cert and --tls-key"),
        (["--tokens-file", "tokens"], "at least 16"),
    ],
)
def test_serve_refuses_bad_security_settings_in_one_line_before_starting(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from neuroexplain.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokens").write_text("alice:too-short\n")
    assert main(["serve", "--backend", "inprocess", "--port", "0", "--metrics-port", "-1", "--health-port", "-1",
                 *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "too-short" not in err[0]


def test_streams_are_authenticated_and_release_their_slot_when_the_client_cancels(
    token_file: Path, servers: list[_Server]
) -> None:
    servers.append(s := _Server(tokens=TokenStore.from_file(token_file), max_calls_per_caller=1))
    with grpc.insecure_channel(s.target) as channel:
        count = channel.unary_stream("/test.Echo/Count")
        assert _code(lambda: list(count(b"", timeout=TIMEOUT))) == grpc.StatusCode.UNAUTHENTICATED
        stream = count(b"", timeout=TIMEOUT, metadata=(("authorization", f"Bearer {ALICE}"),))
        assert next(stream) == b"1"
        assert s.interceptor.limiter.in_flight("caller:alice") == 1
        stream.cancel()
        deadline = time.monotonic() + TIMEOUT
        while s.echo.stream_context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)  # the cancellation reaches the server asynchronously
        s.echo.release.set()  # the handler wakes up, finds its client gone, and the generator is closed
        while s.interceptor.limiter.in_flight("caller:alice") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.interceptor.limiter.in_flight("caller:alice") == 0
        assert _say(channel, token=ALICE) == b"hello"
    codes = [(r["rpc"], r["caller"], r["code"]) for r in s.audit_lines.records()]
    assert codes == [("/test.Echo/Count", None, "UNAUTHENTICATED"), ("/test.Echo/Count", "alice", "CANCELLED"),
                     ("/test.Echo/Say", "alice", "OK")]


def test_secret_files_readable_by_others_are_warned_about(tmp_path: Path, pki: dict[str, Issued],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    files = _tls_files(tmp_path, pki, mtls=False)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\n")
    for path in (files.key, tokens):
        path.chmod(0o640)  # owner and group (a Kubernetes fsGroup) only: fine
    with caplog.at_level(logging.WARNING, logger="neuroexplain.security"):
        ReloadingServerCredentials(files)
        TokenStore.from_file(tokens)
    assert not caplog.records
    for path in (files.key, tokens):
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="neuroexplain.security"):
        ReloadingServerCredentials(files)
        TokenStore.from_file(tokens)
    assert [r.getMessage().split(" ")[0:2] for r in caplog.records] == [["TLS", "key"], ["tokens", "file"]]
    assert ALICE not in caplog.text


def _kubelet_update(mount: Path, files: dict[str, bytes], generation: int) -> None:
    """Write ``files`` the way kubelet updates a Secret volume: a new timestamped folder, then swap ``..data``."""
    folder = mount / f"..2026_11_27_{generation:02d}"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    tmp_link = mount / "..data_tmp"
    tmp_link.symlink_to(folder.name)
    os.replace(tmp_link, mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")


def test_kubernetes_secret_volume_updates_rotate_tokens_and_certificates(
    tmp_path: Path, pki: dict[str, Issued], servers: list[_Server]
) -> None:
    tls_mount, token_mount = tmp_path / "tls", tmp_path / "tokens"
    tls_mount.mkdir()
    token_mount.mkdir()
    _kubelet_update(tls_mount, {"tls.crt": pki["server"].cert_pem, "tls.key": pki["server"].key_pem}, 1)
    _kubelet_update(token_mount, {"tokens": f"alice:{ALICE}\n".encode()}, 1)
    creds = ReloadingServerCredentials(TlsFiles(tls_mount / "tls.crt", tls_mount / "tls.key"))
    servers.append(s := _Server(credentials=creds.credentials, tokens=TokenStore.from_file(token_mount / "tokens")))
    with _tls_channel(s.target, pki["ca"]) as channel:
        assert _say(channel, token=ALICE) == b"hello"

    new_ca = make_ca("rotated CA")
    new_server = issue(new_ca, "localhost", server=True)
    _kubelet_update(tls_mount, {"tls.crt": new_server.cert_pem, "tls.key": new_server.key_pem}, 2)
    _kubelet_update(token_mount, {"tokens": f"bob:{BOB}\n".encode()}, 2)
    with _tls_channel(s.target, new_ca) as channel:
        assert _say(channel, token=BOB) == b"hello"
        assert _code(_say, channel, token=ALICE) == grpc.StatusCode.UNAUTHENTICATED
    assert creds.reloads == 1


def test_request_description_keeps_only_bounded_names_and_real_digests() -> None:
    from neuroexplain._proto import neuroexplain_pb2 as pb
    from service.security.setup import describe_request

    digest = "ab" * 32
    assert describe_request(pb.PredictRequest(model="lesion", scan=pb.Scan(digest=digest.upper()))) == (
        "lesion", digest)
    assert describe_request(pb.PredictRequest(model="x" * 1000, scan=pb.Scan(digest="Doe^Jane"))) == ("x" * 128, None)
    assert describe_request(pb.PredictRequest(model="lesion", scan=pb.Scan(data=b"bytes"))) == ("lesion", None)
    assert describe_request(pb.GetModelRequest(name="atrophy")) == ("atrophy", None)
    assert describe_request(pb.ListModelsRequest()) == (None, None)


def test_token_lines_may_carry_grants(tmp_path: Path) -> None:
    from service.security.tokens import TokenStore

    (tmp_path / "tokens").write_text("a:" + "x" * 20 + ":models=lesion,atrophy:ops=predict\nb:" + "y" * 20 + "\n")
    store = TokenStore.from_file(tmp_path / "tokens")
    limited, full = store.identify("x" * 20), store.identify("y" * 20)
    assert limited is not None and full is not None
    assert limited.models == {"lesion", "atrophy"} and limited.ops == {"predict"}
    assert limited.refusal("lesion", "predict") is None and "may not attribute" in str(limited.refusal("lesion", "attribute"))
    assert full.models is None and full.refusal("anything", "visualize") is None


@pytest.mark.parametrize("fields", [":ops=delete", ":models=", ":ops=predict:ops=attribute"])
def test_malformed_grants_are_refused_at_start(fields: str) -> None:
    # (NEUROEXPLAIN_TOKENS separates entries by commas, so there a grant lists one model or operation each.)
    from service.security.errors import SecurityConfigError
    from service.security.tokens import TokenStore

    with pytest.raises(SecurityConfigError, match="entry 1"):
        TokenStore.from_env_value("a:" + "x" * 20 + fields)
