"""Safe defaults (DESIGN.md, wave 2): without TLS and tokens the gateway listens on loopback only — 127.0.0.1 and
[::1] both — and says so; any other address needs TLS and tokens or ``--insecure`` written out; /metrics binds
loopback unless told otherwise."""

# ruff: noqa: F811  (pytest fixtures imported from test_service_support are redefined as parameters)
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_service_support import backend, start_gateway, tiny_model_dir  # noqa: F401  (fixtures)

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from neuroexplain.cli.main import main
from neuroexplain.errors import InvalidOptionError
from service.config import Settings, build_settings, is_loopback


def test_defaults_are_loopback_for_grpc_and_metrics() -> None:
    s = Settings()
    assert is_loopback(s.host) and is_loopback(s.metrics_host) and not s.insecure


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.1.2.3"])
def test_open_bind_without_tls_and_tokens_is_refused_naming_insecure(host: str) -> None:
    with pytest.raises(InvalidOptionError, match="--insecure"):
        Settings(host=host)
    with pytest.raises(InvalidOptionError, match="--insecure"):  # TLS alone is not enough: tokens too
        Settings(host=host, tls_cert="c.pem", tls_key="k.pem")
    assert Settings(host=host, insecure=True).host == host
    assert Settings(host=host, tls_cert="c.pem", tls_key="k.pem", tokens="a:b" * 16).host == host


def test_the_environment_and_flags_reach_the_check() -> None:
    with pytest.raises(InvalidOptionError, match="--insecure"):
        build_settings(environ={"NEUROEXPLAIN_HOST": "0.0.0.0"})
    assert build_settings(environ={"NEUROEXPLAIN_HOST": "0.0.0.0", "NEUROEXPLAIN_INSECURE": "true"}).insecure


def test_serve_refuses_an_open_bind_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--backend", "inprocess", "--host", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--insecure" in err


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_default_host_answers_on_both_loopback_addresses(backend: Any, tmp_path: Path) -> None:
    running = start_gateway(backend, tmp_path, host=Settings().host)
    try:
        targets = [f"127.0.0.1:{running.port}", f"localhost:{running.port}"]
        if _ipv6_loopback():
            targets.append(f"[::1]:{running.port}")
        for target in targets:
            with grpc.insecure_channel(target) as channel:
                listed = pb_grpc.NeuroExplainStub(channel).ListModels(pb.ListModelsRequest(), timeout=20)
                assert listed.models, target
    finally:
        running.stop()
