"""The PACS bridge's Verification (C-ECHO), DICOM TLS with client certificates, and the failed/ retention — each
against a running bridge process, with pynetdicom as the calling node."""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path

import pytest
from orthanc import free_port
from test_pacs import BridgeProc
from test_security_pki import issue, make_ca

pynetdicom = pytest.importorskip("pynetdicom")
from pynetdicom.sop_class import Verification


def _echo(port: int, aet: str = "MODALITY", tls: ssl.SSLContext | None = None) -> int | None:
    """The C-ECHO status, or None when no association was established."""
    ae = pynetdicom.AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="NEUROEXPLAIN", tls_args=(tls, "localhost") if tls else None)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def test_c_echo_answers_listed_callers_only(tmp_path: Path) -> None:
    bridge = BridgeProc(tmp_path / "spool", free_port(), "", "--allow-ae", "MODALITY", "--stow-url",
                        f"http://127.0.0.1:{free_port()}/dicom-web")
    try:
        assert _echo(bridge.port) == 0x0000
        assert _echo(bridge.port, aet="STRANGER") is None
    finally:
        bridge.stop()


def test_dicom_tls_requires_a_client_certificate_from_the_ca(tmp_path: Path) -> None:
    ca, other_ca = make_ca("bridge test CA"), make_ca("another CA")
    cert, key = issue(ca, "bridge", server=True).write(tmp_path, "bridge")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    bridge = BridgeProc(tmp_path / "spool", free_port(), "", "--allow-ae", "MODALITY", "--stow-url",
                        f"http://127.0.0.1:{free_port()}/dicom-web", "--dicom-tls-cert", str(cert),
                        "--dicom-tls-key", str(key), "--dicom-tls-ca", str(ca_file))

    def client(issuer: object | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        if issuer is not None:
            c, k = issue(issuer, "modality", server=False).write(tmp_path, f"modality-{id(issuer)}")  # type: ignore[arg-type]
            ctx.load_cert_chain(str(c), str(k))
        return ctx

    try:
        assert _echo(bridge.port, tls=client(ca)) == 0x0000
        assert _echo(bridge.port, tls=client(None)) is None  # no client certificate
        assert _echo(bridge.port, tls=client(other_ca)) is None  # a certificate from another CA
        assert _echo(bridge.port) is None  # plaintext
        assert bridge.proc.poll() is None
    finally:
        bridge.stop()


def test_failed_series_are_kept_for_the_retention_days_then_removed(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    old, recent = spool / "failed" / "0123456789abcdef", spool / "failed" / "fedcba9876543210"
    for folder in (old, recent):
        (folder / "in").mkdir(parents=True)
        (folder / "in" / "1.dcm").write_bytes(b"\0" * 128)
        (folder / "reason.txt").write_text("service refused: INVALID_ARGUMENT: test\n")
    forty_days_ago = time.time() - 40 * 86400
    for path in (old / "in" / "1.dcm", old / "reason.txt", old / "in", old):
        os.utime(path, (forty_days_ago, forty_days_ago))
    bridge = BridgeProc(spool, free_port(), "", "--allow-ae", "MODALITY", "--failed-retention-days", "30",
                        "--stow-url", f"http://127.0.0.1:{free_port()}/dicom-web")
    try:
        deadline = time.monotonic() + 30
        while old.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not old.exists()
        assert (recent / "reason.txt").read_text().startswith("service refused")
    finally:
        bridge.stop()
