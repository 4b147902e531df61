"""Security end to end through the real gateway (in-process backend, tiny model, disk cache, metrics).

- mutual TLS + tokens on the main port, the plaintext health-only port beside it, audit lines, refusals counted;
- patient-data hygiene: a scan whose header carries a patient name (``descrip``, ``db_name``, ``aux_file``,
  ``intent_name``, a NIfTI extension) and whose gzip header carries a file name made of it: the name appears in no
  response, no output volume, no log record, no audit line, no metric and no cache file or key.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from test_security_pki import Issued, issue, make_ca

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from service.backends.inprocess import InProcessBackend
from service.config import BackendKind, Settings
from service.grpc.server import SERVICE_NAME, create_server
from service.grpc.status import status_for
from service.security.setup import build_security, start_health_port

TIMEOUT = 60
OTHER_TOKEN = "b" * 40
LIMITED_TOKEN = "c" * 40
FOREIGN_TOKEN = "d" * 40
PATIENT = "ZQDOEJANE4711"  # a name plus record number, unique enough to grep for
TOKEN = "pacs-bridge-token-000111222333"

TINY_MODEL = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, width: int = 2):
        super().__init__()
        self.conv = nn.Conv3d(1, width, 3, padding=1)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.conv(x)).mean((2, 3, 4)), 1))
'''


def _tiny_model(parent: Path) -> Path:
    folder = parent / "tiny"
    folder.mkdir(parents=True)
    (folder / "tiny.py").write_text(TINY_MODEL)
    module_spec = importlib.util.spec_from_file_location(f"tiny_{id(folder)}", folder / "tiny.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the same class the registry will import from the file
    torch.manual_seed(0)
    torch.save(module.Tiny(width=2).state_dict(), folder / "weights.pt")
    spec = {
        "name": "tiny", "version": "0.1.0", "task": "test", "classes": ["healthy", "lesion"],
        "grid": {"shape": [12, 14, 10], "affine": [[4, 0, 0, -24], [0, 4, 0, -30], [0, 0, 4, -18], [0, 0, 0, 1]]},
        "architecture": "tiny.py:Tiny", "architecture_kwargs": {"width": 2},
        "layers": [{"name": "conv", "channels": 2, "shape": [12, 14, 10]}],
        "weights_sha256": hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest(),
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return parent


def identifying_scan() -> bytes:
    """A .nii.gz whose header text, extension and gzip file name all carry the patient's name."""
    rng = np.random.default_rng(0)
    data = np.zeros((20, 24, 18), np.float32)
    data[4:16, 5:19, 4:14] = 100 + 10 * rng.standard_normal((12, 14, 10), dtype=np.float32)
    image = nib.Nifti1Image(data, np.diag([2.5, 2.5, 2.5, 1.0]) @ np.array(
        [[1, 0, 0, -10], [0, 1, 0, -12], [0, 0, 1, -9], [0, 0, 0, 1]], float))
    header = image.header
    header["descrip"] = f"Patient {PATIENT} DOB 1950".encode()
    header["db_name"] = PATIENT.encode()
    header["aux_file"] = f"{PATIENT}.lut".encode()
    header["intent_name"] = PATIENT.encode()
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", f"(0010,0010) PN {PATIENT}".encode()))
    raw = image.to_bytes()
    assert raw.count(PATIENT.encode()) == 5
    buffer = io.BytesIO()
    with gzip.GzipFile(filename=f"{PATIENT}_t1.nii", mode="wb", fileobj=buffer, mtime=0) as gz:
        gz.write(raw)
    return buffer.getvalue()


def expand(blob: bytes) -> bytes:
    """``blob`` plus the decompressed content of every gzip or zlib stream inside it (NIfTI .gz, PNG data)."""
    parts = [blob]
    for magic, wbits in ((b"\x1f\x8b\x08", 31), (b"\x78\x01", 15), (b"\x78\x9c", 15), (b"\x78\xda", 15)):
        start = blob.find(magic)
        while start != -1:
            try:
                inner = zlib.decompressobj(wbits).decompress(blob[start:], 512 << 20)
            except zlib.error:
                inner = b""
            if inner:
                parts.append(expand(inner) if inner[:3] == b"\x1f\x8b\x08" else inner)
            start = blob.find(magic, start + 1)
    return b"".join(parts)


def assert_no_patient(blob: bytes, where: str) -> None:
    text = expand(blob)
    for needle in (PATIENT, PATIENT.lower(), "DOEJANE", "DOE^JANE"):
        assert needle.encode() not in text, f"patient name found in {where}"
        assert needle.encode("utf-16-le") not in text, f"patient name (UTF-16) found in {where}"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Everything a formatter could print: message, arguments, traceback, extra fields.
        self.texts.append(logging.Formatter().format(record))
        self.texts.append(repr(record.__dict__))


@dataclass
class Stack:
    target: str
    health_port: int
    registry: CollectorRegistry
    cache_dir: Path
    audit: _Records
    logs: _Records
    pki: dict[str, Issued]
    channel: grpc.Channel

    def stub(self) -> pb_grpc.NeuroExplainStub:
        return pb_grpc.NeuroExplainStub(self.channel)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("secure")
    ca, client_ca = make_ca("server CA"), make_ca("client CA")
    pki = {"ca": ca, "server": issue(ca, "localhost", server=True), "client": issue(client_ca, "pacs-bridge",
                                                                                         server=False)}
    cert, key = pki["server"].write(tmp, "server")
    (tmp / "client-ca.pem").write_bytes(client_ca.cert_pem)
    (tmp / "tokens").write_text(f"pacs-bridge:{TOKEN}\nresearcher:{OTHER_TOKEN}\n"
                                f"viewer:{LIMITED_TOKEN}:models=tiny:ops=predict\n"
                                f"other-team:{FOREIGN_TOKEN}:models=lesion\n")

    logs, audit_lines = _Records(), _Records()
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(logs)
    audit_logger = logging.getLogger("test.gateway.audit")
    audit_logger.addHandler(audit_lines)

    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=0, backend=BackendKind.INPROCESS,
                        cache="disk", cache_dir=tmp / "cache", model_dirs=(_tiny_model(tmp / "models"),),
                        max_concurrency=2, workers=8, tls_cert=str(cert), tls_key=str(key),
                        tls_client_ca=str(tmp / "client-ca.pem"), tokens_file=str(tmp / "tokens"),
                        max_calls_per_caller=4)
    security = build_security(
        settings,
        audit_logger=audit_logger,
        status_of=lambda exc: (status_for(exc) or (None,))[0],
    )
    backend = InProcessBackend(model_dirs=settings.model_dirs, models=("tiny",))
    backend.start()
    registry = CollectorRegistry()
    gateway, port = create_server(settings, backend, registry=registry, extra_interceptors=[security.interceptor],
                                  credentials=security.credentials)
    gateway.start()
    health = start_health_port(settings, gateway.health)
    assert health is not None
    health_server, health_port = health
    channel = grpc.secure_channel(
        f"localhost:{port}",
        grpc.ssl_channel_credentials(ca.cert_pem, pki["client"].key_pem, pki["client"].cert_pem),
        options=settings.grpc_options,
    )
    try:
        yield Stack(f"localhost:{port}", health_port, registry, tmp / "cache", audit_lines, logs, pki, channel)
    finally:
        channel.close()
        health_server.stop(None)
        gateway.stop(None).wait()
        gateway.close()
        backend.close()
        root.removeHandler(logs)
        root.setLevel(old_level)
        audit_logger.removeHandler(audit_lines)


AUTH = (("authorization", f"Bearer {TOKEN}"),)
OTHER_AUTH = (("authorization", f"Bearer {OTHER_TOKEN}"),)


def test_a_digest_resolves_only_for_the_caller_that_sent_the_scan(stack: Stack) -> None:
    # Digests are written to the audit log; they must not be keys to the patient's scan (security review).
    stub = stack.stub()
    scan = identifying_scan()
    sent = stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, data=scan)), metadata=AUTH, timeout=TIMEOUT)
    digest = sent.info.scan_digest
    again = stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, digest=digest)), metadata=AUTH, timeout=TIMEOUT)
    assert again.predicted_class == sent.predicted_class
    unknown = "0" * 64
    messages = []
    for ref in (digest, unknown):
        for request in (pb.PredictRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, digest=ref)),
                        pb.VisualizeRequest(model="tiny", target="class:lesion", preset="none", steps=1,
                                            start="scan", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, digest=ref))):
            call = stub.Predict if isinstance(request, pb.PredictRequest) else (
                lambda r, **kw: list(stub.Visualize(r, **kw)))
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=OTHER_AUTH, timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            messages.append(info.value.details().replace(ref[:12], "<digest>"))
    # another caller's digest reads exactly like an unknown one
    assert messages[0] == messages[2] and messages[1] == messages[3]


def test_a_scan_that_fails_validation_is_not_stored(stack: Stack) -> None:
    stub = stack.stub()
    junk = b"\x00" * 4096
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, data=junk)), metadata=AUTH, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    import hashlib

    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, digest=hashlib.sha256(junk).hexdigest())),
                     metadata=AUTH, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_secure_gateway_serves_authenticated_callers_and_refuses_the_rest(stack: Stack) -> None:
    stub = stack.stub()
    models = stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=TIMEOUT)
    assert [m.name for m in models.models] == ["tiny"]
    with pytest.raises(grpc.RpcError) as info:
        stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(pb.GetModelRequest(name="nope"), metadata=AUTH, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The main port's health answers too, without a token (but with mTLS, like every call on that port).
    main_health = health_pb2_grpc.HealthStub(stack.channel)
    assert main_health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    # Reflection is not exempt: without a token it is refused like any other call.
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(stack.channel).ServerReflectionInfo
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with pytest.raises(grpc.RpcError) as info:
        list(reflect(iter(ask), timeout=TIMEOUT))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (listing,) = list(reflect(iter(ask), metadata=AUTH, timeout=TIMEOUT))
    assert SERVICE_NAME in {s.name for s in listing.list_services_response.service}
    # The health-only port: plaintext, no certificate, no token; nothing else is served there.
    with grpc.insecure_channel(f"127.0.0.1:{stack.health_port}") as plain:
        probe = health_pb2_grpc.HealthStub(plain)
        for service in ("", SERVICE_NAME):
            assert probe.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.NeuroExplainStub(plain).ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The main port refuses plaintext outright.
    with grpc.insecure_channel(stack.target) as plain:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.NeuroExplainStub(plain).ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    lines = [json.loads(t) for t in stack.audit.texts[::2]]
    by_rpc = [(r["rpc"].rsplit("/", 1)[1], r["caller"], r["code"]) for r in lines[-5:]]
    assert by_rpc == [("ListModels", "pacs-bridge", "OK"), ("ListModels", None, "UNAUTHENTICATED"),
                      ("GetModel", "pacs-bridge", "NOT_FOUND"), ("ServerReflectionInfo", None, "UNAUTHENTICATED"),
                      ("ServerReflectionInfo", "pacs-bridge", "OK")]
    assert all(r["cert_subject"] == "CN=pacs-bridge,O=neuroexplain tests" for r in lines[-5:])
    # Refusals are counted by the gateway's own metrics (the security interceptor runs inside them).
    assert stack.registry.get_sample_value(
        "neuroexplain_requests_total", {"rpc": "ListModels", "model": "", "code": "UNAUTHENTICATED"}
    ) == 1.0


def test_no_patient_data_in_outputs_logs_audit_metrics_or_cache(stack: Stack) -> None:
    scan = identifying_scan()
    digest = hashlib.sha256(scan).hexdigest()
    assert PATIENT.encode() in expand(scan)  # the needle is really in the input
    stub = stack.stub()
    responses: list[bytes] = []
    predict = stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, data=scan)), metadata=AUTH, timeout=TIMEOUT)
    responses.append(predict.SerializeToString())
    again = stub.Predict(pb.PredictRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, digest=digest)), metadata=AUTH,
                         timeout=TIMEOUT)
    assert again.info.cached and again.info.scan_digest == digest
    responses.append(again.SerializeToString())
    attribution = stub.Attribute(
        pb.AttributeRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, data=scan), method="gradient", png=True),
        metadata=AUTH, timeout=TIMEOUT,
    )
    responses.append(attribution.SerializeToString())
    # An error path that involves the scan: a bad option must not echo header text either.
    with pytest.raises(grpc.RpcError) as info:
        stub.Attribute(pb.AttributeRequest(model="tiny", scan=pb.Scan(alignment=pb.ALIGNMENT_CENTER, data=scan), method="no_such_method"),
                       metadata=AUTH, timeout=TIMEOUT)
    assert_no_patient((info.value.details() or "").encode(), "an error message")

    # Outputs: the attribution map keeps the scan's geometry and nothing else from its header.
    out = nib.Nifti1Image.from_bytes(gzip.decompress(attribution.nifti))
    assert out.shape == (20, 24, 18) and np.allclose(out.affine, nib.Nifti1Image.from_bytes(
        gzip.decompress(scan)).affine)
    assert out.header["descrip"].item() in (b"",) and not out.header.extensions
    for field in ("db_name", "aux_file", "intent_name"):
        assert out.header[field].item() == b""
    for i, blob in enumerate(responses):
        assert_no_patient(blob, f"response {i}")

    # Logs, audit, metrics, cache.
    assert_no_patient("\n".join(stack.logs.texts).encode(), "the logs")
    audit_text = "\n".join(stack.audit.texts[::2])
    assert_no_patient(audit_text.encode(), "the audit log")
    scan_lines = [json.loads(t) for t in stack.audit.texts[::2] if '"/neuroexplain.v1.NeuroExplain/Predict"' in t]
    assert [(r["model"], r["scan_digest"]) for r in scan_lines[-2:]] == [("tiny", digest)] * 2  # inline, by digest
    assert_no_patient(generate_latest(stack.registry), "the metrics")
    files = [p for p in stack.cache_dir.rglob("*") if p.is_file()]
    assert files, "the disk cache stored nothing; the check below would be empty"
    for path in files:
        assert_no_patient(str(path.relative_to(stack.cache_dir)).encode(), "a cache key")
        assert_no_patient(path.read_bytes(), "a cache value")


def test_library_outputs_and_errors_carry_only_geometry(tmp_path: Path) -> None:
    """The same guarantee below the gateway: what the library writes and raises (the TorchServe handler uses it)."""
    from neuroexplain.attribution import explain
    from neuroexplain.errors import NeuroExplainError
    from neuroexplain.models import load_model
    from neuroexplain.volumes import Alignment, ScanLimits, nifti_bytes, read_scan

    scan_bytes = identifying_scan()
    scan = read_scan(scan_bytes)
    model = load_model("tiny", model_dirs=(_tiny_model(tmp_path / "models"),))
    result = explain(model, scan, "gradient", png=True, alignment=Alignment.CENTER)
    for name, blob in (("attribution NIfTI", result.nifti), ("attribution PNG", result.png or b""),
                       ("nifti_bytes", nifti_bytes(scan.data, scan.affine)),
                       ("summary", json.dumps(result.summary, default=float).encode())):
        assert_no_patient(blob, name)
    header = nib.Nifti1Image.from_bytes(gzip.decompress(result.nifti)).header
    assert not header.extensions and header["descrip"].item() == b""
    # Refusals name sizes and rules, never header text.
    for limits in (ScanLimits(max_voxels=100), ScanLimits(max_input_bytes=100), ScanLimits(max_decompressed_bytes=100)):
        with pytest.raises(NeuroExplainError) as info:
            read_scan(scan_bytes, limits=limits)
        assert_no_patient(str(info.value).encode(), "a scan error")


def test_cli_client_with_mtls_and_token_sends_no_file_name(stack: Stack, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroexplain.cli.main import main

    scan_path = tmp_path / f"{PATIENT}_t1.nii.gz"  # the file name itself identifies the patient
    scan_path.write_bytes(identifying_scan())
    (tmp_path / "ca.pem").write_bytes(stack.pki["ca"].cert_pem)
    cert, key = stack.pki["client"].write(tmp_path, "client")
    common = ["predict", str(scan_path), "--model", "tiny", "--server", stack.target, "--json", "--alignment", "center",
              "--tls", "--ca", str(tmp_path / "ca.pem"), "--cert", str(cert), "--key", str(key)]
    logs_before, audit_before = len(stack.logs.texts), len(stack.audit.texts)

    monkeypatch.delenv("NEUROEXPLAIN_TOKEN", raising=False)
    assert main(common) == 1
    refused = json.loads(capsys.readouterr().out)
    assert refused["error"]["code"] == "UNAUTHENTICATED"

    assert main([*common, "--token", TOKEN]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["model"] == "tiny" and line["predicted_class"] in ("healthy", "lesion")
    monkeypatch.setenv("NEUROEXPLAIN_TOKEN", TOKEN)
    assert main(common) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True

    new_logs = "\n".join(stack.logs.texts[logs_before:])
    new_audit = "\n".join(stack.audit.texts[audit_before:])
    assert_no_patient(new_logs.encode(), "the logs of CLI calls")
    assert_no_patient(new_audit.encode(), "the audit lines of CLI calls")
    codes = [json.loads(t)["code"] for t in stack.audit.texts[audit_before:][::2]]
    assert codes == ["UNAUTHENTICATED", "OK", "OK"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_command_with_every_control_on(tmp_path: Path) -> None:
    """``neuroexplain serve`` as a process: flags wired, health port plaintext, audit to its file, SIGTERM drains."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    ca, client_ca = make_ca("serve CA"), make_ca("serve client CA")
    cert, key = issue(ca, "localhost", server=True).write(tmp_path, "server")
    client = issue(client_ca, "cli", server=False)
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem)
    (tmp_path / "tokens").write_text(f"cli:{TOKEN}\n")
    port, health_port = _free_port(), _free_port()
    env = {**os.environ, "NEUROEXPLAIN_MODEL_DIRS": str(_tiny_model(tmp_path / "models"))}
    command = [sys.executable, "-m", "neuroexplain.cli.main", "serve", "--backend", "inprocess", "--host", "127.0.0.1",
               "--port", str(port), "--health-port", str(health_port), "--metrics-port", "-1", "--cache", "none",
               "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(tmp_path / "client-ca.pem"),
               "--tokens-file", str(tmp_path / "tokens"), "--audit-log", str(tmp_path / "audit.jsonl")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr: list[str] = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr or ()), daemon=True)
    drain.start()
    try:
        first = proc.stdout.readline() if proc.stdout else ""  # blocks until "ready" or exit
        assert first.strip() == "ready", f"serve did not become ready: {first!r} {''.join(stderr)[-2000:]}"
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as plain:
            probe = health_pb2_grpc.HealthStub(plain)
            assert probe.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        creds = grpc.ssl_channel_credentials(ca.cert_pem, client.key_pem, client.cert_pem)
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = pb_grpc.NeuroExplainStub(channel)
            assert "tiny" in [m.name for m in stub.ListModels(pb.ListModelsRequest(), metadata=AUTH,
                                                              timeout=TIMEOUT).models]
            with pytest.raises(grpc.RpcError) as info:
                stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    drain.join(10)
    rest = proc.stdout.read() if proc.stdout else ""
    assert rest.strip() == "", "only 'ready' belongs on stdout when the audit log has its own file"
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["caller"], r["code"]) for r in lines] == [("cli", "OK"), (None, "UNAUTHENTICATED")]
    log_text = "".join(stderr)
    assert "security: transport mutual TLS, tokens 1 callers" in log_text and TOKEN not in log_text


def test_token_grants_limit_models_and_operations_and_are_audited(stack: Stack) -> None:
    stub = stack.stub()
    scan = pb.Scan(alignment=pb.ALIGNMENT_CENTER, data=identifying_scan())
    limited = (("authorization", f"Bearer {LIMITED_TOKEN}"),)
    foreign = (("authorization", f"Bearer {FOREIGN_TOKEN}"),)
    assert stub.Predict(pb.PredictRequest(model="tiny", scan=scan), metadata=limited, timeout=TIMEOUT).predicted_class
    refusals = [
        (lambda: stub.Attribute(pb.AttributeRequest(model="tiny", scan=scan, method="gradient"), metadata=limited,
                                timeout=TIMEOUT), "may not attribute; its token allows: predict"),
        (lambda: list(stub.Visualize(pb.VisualizeRequest(model="tiny", target="class:lesion", steps=1),
                                     metadata=limited, timeout=TIMEOUT)), "may not visualize"),
        (lambda: stub.Predict(pb.PredictRequest(model="tiny", scan=scan), metadata=foreign, timeout=TIMEOUT),
         "may not use model 'tiny'; its token allows: lesion"),
    ]
    before = len(stack.audit.texts)
    for call, words in refusals:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert words in info.value.details()
    audited = [json.loads(t) for t in stack.audit.texts[before:] if t.startswith("{\"")]
    denied = [a for a in audited if a.get("event") == "rpc" and a["code"] == "PERMISSION_DENIED"]
    assert sorted(a["caller"] for a in denied) == ["other-team", "viewer", "viewer"], audited
