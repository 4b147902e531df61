"""Audit lines name the attribution method, the target and a SHA-256 digest of the result the caller received,
through the real gateway (in-process backend, tiny model, bearer tokens on loopback)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from test_security_gateway import _Records, _tiny_model, identifying_scan

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from service.backends.inprocess import InProcessBackend
from service.config import BackendKind, Settings
from service.grpc.server import create_server
from service.grpc.status import status_for
from service.security.setup import build_security

TOKEN = "audit-test-token-0123456789abcdef"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT = 60


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pb_grpc.NeuroExplainStub, _Records]]:
    tmp = tmp_path_factory.mktemp("audit")
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, backend=BackendKind.INPROCESS,
                        cache="none", model_dirs=(_tiny_model(tmp / "models"),), workers=4, tokens=f"alice:{TOKEN}")
    lines = _Records()
    audit_logger = logging.getLogger("test.audit.fields")
    audit_logger.addHandler(lines)
    security = build_security(settings, audit_logger=audit_logger,
                              status_of=lambda exc: (status_for(exc) or (None,))[0])
    backend = InProcessBackend(model_dirs=settings.model_dirs, models=("tiny",))
    backend.start()
    server, port = create_server(settings, backend, registry=CollectorRegistry(),
                                 extra_interceptors=[security.interceptor])
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.NeuroExplainStub(channel), lines
    finally:
        channel.close()
        server.stop(None).wait()  # type: ignore[attr-defined]
        server.close()  # type: ignore[attr-defined]
        backend.close()
        audit_logger.removeHandler(lines)


def _last_line(lines: _Records, rpc: str) -> dict[str, Any]:
    found = [json.loads(t) for t in lines.texts[::2] if f'"/neuroexplain.v1.NeuroExplain/{rpc}"' in t]
    assert found, f"no audit line for {rpc}"
    return found[-1]  # type: ignore[no-any-return]


def _digest(message: Any) -> str:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def test_audit_lines_carry_method_target_and_the_result_digest(gateway: tuple[Any, _Records]) -> None:
    stub, lines = gateway
    scan = pb.Scan(data=identifying_scan(), alignment=pb.ALIGNMENT_CENTER)

    predicted = stub.Predict(pb.PredictRequest(model="tiny", scan=scan), metadata=AUTH, timeout=TIMEOUT)
    line = _last_line(lines, "Predict")
    assert {"method", "target", "result_digest"} <= set(line)
    assert (line["method"], line["target"], line["code"]) == (None, None, "OK")
    assert line["result_digest"] == _digest(predicted)

    attributed = stub.Attribute(pb.AttributeRequest(model="tiny", scan=scan, method="gradient", target="lesion"),
                                metadata=AUTH, timeout=TIMEOUT)
    line = _last_line(lines, "Attribute")
    assert (line["method"], line["target"], line["code"]) == ("gradient", "lesion", "OK")
    assert line["result_digest"] == _digest(attributed)
    assert line["scan_digest"] == attributed.info.scan_digest

    events = list(stub.Visualize(pb.VisualizeRequest(model="tiny", target="class:lesion", preset="none", steps=2),
                                 metadata=AUTH, timeout=TIMEOUT))
    line = _last_line(lines, "Visualize")
    assert (line["method"], line["target"], line["code"]) == (None, "class:lesion", "OK")
    assert line["result_digest"] == _digest(events[-1])  # the result, the last message
    assert line["result_digest"] != _digest(events[0])


def test_a_refused_call_has_no_result_digest(gateway: tuple[Any, _Records]) -> None:
    stub, lines = gateway
    scan = pb.Scan(data=identifying_scan(), alignment=pb.ALIGNMENT_CENTER)
    with pytest.raises(grpc.RpcError) as info:
        stub.Attribute(pb.AttributeRequest(model="tiny", scan=scan, method="no_such_method", target="lesion"),
                       metadata=AUTH, timeout=TIMEOUT)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    line = _last_line(lines, "Attribute")
    assert (line["code"], line["method"], line["result_digest"]) == ("INVALID_ARGUMENT", "no_such_method", None)


def test_audit_line_fields_are_strings_from_the_request_only(tmp_path: Path) -> None:
    # Unit level: fields are read only where the request message declares them, empty ones stay null.
    from service.security import audit

    record = audit.CallRecord(rpc="/x", peer="ipv4:127.0.0.1:1")
    audit.describe_request(record, pb.PredictRequest(model="tiny"))
    assert (record.method, record.target) == (None, None)
    audit.describe_request(record, pb.AttributeRequest(model="tiny", method="gradient"))
    assert (record.method, record.target) == ("gradient", None)
    assert audit.message_digest(b"raw bytes") is None
    long = pb.AttributeRequest(model="tiny", method="m" * 5000)
    record = audit.CallRecord(rpc="/x", peer="ipv4:127.0.0.1:1")
    audit.describe_request(record, long)
    assert record.method == "m" * audit.MAX_FIELD_CHARS
