"""The light client and the CLI against a real gateway; ``neuroexplain serve`` as a process (ready line, /metrics,
SIGTERM drains in-flight calls)."""

# ruff: noqa: F811  (pytest fixtures imported from test_service_support are redefined as parameters)
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_service_support import (  # noqa: F401  (fixtures)
    TINY,
    TINY_GRID,
    Running,
    backend,
    gated,
    gateway,
    make_scan,
    tiny_model_dir,
)

from neuroexplain import RESEARCH_NOTICE
from neuroexplain.cli.main import main
from neuroexplain.client import Client, error_code
from neuroexplain.errors import InvalidInputError, NotFoundError, UnavailableError


def test_client_runs_every_rpc(gateway: Running, tmp_path: Path) -> None:
    client = gateway.client
    assert [m.name for m in client.list_models()] == [TINY]
    assert client.get_model(TINY).classes == ["healthy", "lesion"]
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(make_scan(50))
    pred = client.predict(path, model=TINY)
    assert pred.info.notice == RESEARCH_NOTICE and pred.predicted_class in ("healthy", "lesion")
    attr = client.attribute(model=TINY, digest=pred.info.scan_digest, method="gradient", png=True)
    assert attr.nifti[:2] == b"\x1f\x8b" and attr.png[:4] == b"\x89PNG"
    steps: list[int] = []
    job_id, result = client.visualize(model=TINY, target="class:lesion", preset="none", steps=3,
                                      on_progress=lambda job, p: steps.append(p.step))
    assert steps == [1, 2, 3] and job_id and result.nifti[:2] == b"\x1f\x8b"


def test_client_raises_the_projects_errors(gateway: Running) -> None:
    with pytest.raises(NotFoundError) as missing:
        gateway.client.get_model("nope")
    assert error_code(missing.value) == "NOT_FOUND" and "tiny" in str(missing.value)
    with pytest.raises(InvalidInputError) as bad:
        gateway.client.predict(b"garbage", model=TINY)
    assert error_code(bad.value) == "INVALID_ARGUMENT"
    with pytest.raises(InvalidInputError):
        gateway.client.predict(model=TINY)  # neither scan nor digest: refused before sending
    with Client(f"127.0.0.1:{_free_port()}", timeout=2) as nowhere, pytest.raises(UnavailableError):
        nowhere.list_models()


def test_light_client_imports_without_torch_or_numpy() -> None:
    code = ("import sys; import neuroexplain.client, neuroexplain.cli.commands.predict, neuroexplain.cli.commands.models;"
            "heavy = [m for m in ('torch', 'numpy', 'nibabel', 'service') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_cli_predict_and_models_talk_to_the_server(gateway: Running, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.nii.gz", tmp_path / "bad.nii.gz"
    good.write_bytes(make_scan(51))
    bad.write_bytes(b"not a scan")
    server = f"127.0.0.1:{gateway.port}"
    code = main(["predict", str(good), str(bad), "--model", TINY, "--server", server, "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and len(lines) == 2
    ok, failed = lines
    assert set(ok) == {"scan", "model", "model_version", "predicted_class", "probabilities", "logits", "alignment",
                       "input_check", "cached", "notice"}
    assert ok["scan"] == str(good) and ok["model"] == TINY and ok["notice"] == RESEARCH_NOTICE and not ok["cached"]
    assert abs(sum(ok["probabilities"].values()) - 1) < 1e-6 and len(ok["logits"]) == 2
    assert failed["scan"] == str(bad) and failed["error"]["code"] == "INVALID_ARGUMENT"
    assert "NIfTI" in failed["error"]["message"]
    assert main(["predict", str(good), "--model", TINY, "--server", server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True
    assert main(["models", "--json", "--server", server]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["name"] == TINY and row["grid"]["shape"] == list(TINY_GRID) and row["layers"]["conv1"] == 2
    assert len(row["grid"]["affine"]) == 4 and row["held_out_accuracy"] == 0.5


def test_cli_local_and_remote_use_the_same_error_codes(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(tiny_model_dir))
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"nope")
    assert main(["predict", str(bad), "--model", TINY, "--local", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------------------------------------------------------
# The serve command as a process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def served(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    port, metrics = _free_port(), _free_port()
    env = {**os.environ, "NEUROEXPLAIN_MODEL_DIRS": str(tiny_model_dir), "NEUROEXPLAIN_AUDIT_LOG": "off",
           "NEUROEXPLAIN_GRACE_S": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroexplain.cli.main", "serve", "--backend", "inprocess", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", str(metrics), "--health-port", "-1",
         "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until "ready" (or EOF when serve fails)
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield proc, port, metrics
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.mark.slow
def test_serve_prints_ready_exposes_metrics_and_drains_on_sigterm(
    served: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, port, metrics_port = served
    with Client(f"127.0.0.1:{port}", timeout=60) as client:
        assert TINY in [m.name for m in client.list_models()]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'neuroexplain_requests_total{code="OK",model="",rpc="ListModels"} 1.0' in text
        assert "neuroexplain_backend_ready 1.0" in text
        # SIGTERM while a visualization streams: it finishes, then the process exits 0
        stream = client.visualize_events(model=TINY, target="class:lesion", preset="none", steps=10)
        first = next(iter(stream))
        assert first.HasField("progress")
        proc.send_signal(signal.SIGTERM)
        events = list(stream)
        assert [e.progress.step for e in events[:-1]] == list(range(2, 11))
        assert events[-1].HasField("result") and events[-1].result.nifti[:2] == b"\x1f\x8b"
    assert proc.wait(60) == 0
    # after the drain the port is closed
    with Client(f"127.0.0.1:{port}", timeout=2) as late, pytest.raises(UnavailableError):
        late.list_models()


def test_scans_above_grpcs_default_4_mib_limit_are_accepted(gateway: Running) -> None:
    big = make_scan(52, shape=(120, 140, 120), voxel_mm=0.75)  # noisy: gzip cannot shrink it below 4 MiB
    assert len(big) > 4 << 20
    result = gateway.client.attribute(big, model=TINY, method="gradient")
    assert result.info.scan_digest and result.nifti[:2] == b"\x1f\x8b"


def test_cli_attribute_and_visualize_talk_to_the_server(gateway: Running, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    import nibabel as nib

    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(make_scan(53))
    server = f"127.0.0.1:{gateway.port}"
    out, summary, png = tmp_path / "map.nii.gz", tmp_path / "s.json", tmp_path / "map.png"
    code = main(["attribute", str(scan), "--model", TINY, "--method", "gradcam", "--option", "layer=conv2",
                 "-o", str(out), "--summary", str(summary), "--png", str(png), "--server", server])
    assert code == 0
    assert nib.Nifti1Image.from_bytes(gzip.decompress(out.read_bytes())).shape == (30, 36, 30)
    s = json.loads(summary.read_text())
    assert s["method"] == "gradcam" and s["options"]["layer"] == "conv2" and s["cached"] is False
    assert s["notice"] == RESEARCH_NOTICE and png.read_bytes()[:4] == b"\x89PNG"
    vol, curve = tmp_path / "v.nii.gz", tmp_path / "c.json"
    code = main(["visualize", "--model", TINY, "--target", "class:lesion", "--preset", "none", "--steps", "3",
                 "-o", str(vol), "--curve", str(curve), "--no-progress", "--server", server])
    assert code == 0
    assert nib.Nifti1Image.from_bytes(gzip.decompress(vol.read_bytes())).shape[:3] == TINY_GRID
    assert len(json.loads(curve.read_text())["curve"]) == 3
    assert "research use only" in capsys.readouterr().err


def test_cli_without_a_server_says_how_to_get_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--server", f"127.0.0.1:{_free_port()}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neuroexplain serve" in err and "use --local" in err


# ---------------------------------------------------------------------------------------------------------------------
# The one error table (neuroexplain.errors): each class names its status once; the client inverts it


def test_every_error_class_names_a_grpc_status_and_the_client_inverts_the_same_table() -> None:
    import grpc

    from neuroexplain import errors
    from neuroexplain.client import RemoteError, error_from_rpc

    statuses = {code.name for code in grpc.StatusCode}
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.NeuroExplainError)]
    assert len(classes) >= 17
    for cls in classes:
        assert cls.code in statuses, cls  # a real gRPC status name, spelled once in the class
    for name in ("UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION", "UNIMPLEMENTED",
                 "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE"):
        cls = errors.error_class(name)
        assert cls is not None and cls.code == name
    assert errors.error_class("RESOURCE_EXHAUSTED") is errors.LimitExceededError  # what callers already catch
    assert errors.error_class("INVALID_ARGUMENT") is errors.InvalidInputError
    assert errors.error_class("INTERNAL") is None
    assert errors.status_name(MemoryError()) == "RESOURCE_EXHAUSTED"
    assert errors.status_name(errors.OutOfMemoryError("cuda")) == "RESOURCE_EXHAUSTED"
    assert errors.status_name(ValueError("x")) is None
    assert error_code(MemoryError()) == "RESOURCE_EXHAUSTED" and error_code(ValueError()) == "INTERNAL"
    refused = errors.InvalidOptionError("steps 0 is out of range; allowed 1..4096", field="options.steps")
    assert refused.field == "options.steps" and str(refused).startswith("steps 0")
    assert errors.InvalidOptionError("no field").field is None

    class _Failed(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return "said the server"

    for status in grpc.StatusCode:
        if status is grpc.StatusCode.OK:
            continue
        out = error_from_rpc(_Failed(status))
        expected = errors.error_class(status.name) or RemoteError
        assert type(out) is expected and error_code(out) == status.name
