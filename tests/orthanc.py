"""A real Orthanc (Debian's ``Orthanc`` binary) on free loopback ports with its own config and temp storage."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def require_file(path: Path, why: str) -> str:
    """``path`` if it exists; else skip (or fail under CI=true, where .ci/run installs it)."""
    import os

    import pytest

    if path.exists():
        return str(path)
    if os.environ.get("CI") == "true":
        pytest.fail(f"{path} is missing ({why}); .ci/run installs it")
    pytest.skip(f"{path} is missing ({why})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc: its AE title, DICOM and HTTP ports."""

    aet: str
    dicom_port: int
    http_port: int
    proc: subprocess.Popen[bytes]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes | str) -> Any:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def instances_tags(self) -> list[dict[str, Any]]:
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]

    def instance_files(self) -> list[bytes]:
        """Every stored instance as its DICOM file (simplified-tags shows long text values as null)."""
        out = []
        for i in self.get("/instances"):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/instances/{i}/file", timeout=30) as r:
                out.append(r.read())
        return out


@contextmanager
def orthanc(tmp: Path, modalities: Mapping[str, tuple[str, str, int]] | None = None,
            aet: str = "ORTHANC", dicomweb: bool = False) -> Iterator[Orthanc]:
    """Start Orthanc; ``modalities`` = name -> (AE, host, port) it may send to; ``dicomweb``: with Debian's DICOMweb
    plugin (``orthanc-dicomweb``) serving STOW-RS at ``/dicom-web``."""
    from conftest import require_binary  # a missing Orthanc skips, or fails under CI=true

    binary = require_binary("Orthanc", "the PACS of the bridge tests")
    plugins = []
    if dicomweb:
        plugins = [require_file(DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian orthanc-dicomweb), for STOW-RS")]
    dicom_port, http_port = free_port(), free_port()
    (tmp / "storage").mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "neuroexplain-test", "StorageDirectory": str(tmp / "storage"), "IndexDirectory": str(tmp / "storage"),
        "DicomAet": aet, "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True, "Plugins": plugins, "HttpServerEnabled": True, "StorageCompression": False,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "DicomScpTimeout": 30, "OverwriteInstances": True,
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
    }
    cfg = tmp / "orthanc.json"
    cfg.write_text(json.dumps(config))
    proc = subprocess.Popen([binary, str(cfg)], stdout=subprocess.DEVNULL, stderr=open(tmp / "orthanc.log", "wb"))  # noqa: SIM115 (the child keeps it)
    node = Orthanc(aet, dicom_port, http_port, proc)
    try:
        for _ in range(300):
            try:
                node.get("/system")
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((tmp / "orthanc.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield node
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
