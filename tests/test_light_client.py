"""The light client as a new user installs it: ``pip install .`` (no extras) into a fresh venv, then every client
command against a real gateway. The venv must hold neither numpy nor torch, and the commands must still work."""

# ruff: noqa: F811  (pytest fixtures imported from test_service_support are redefined as parameters)
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_support import (  # noqa: F401  (fixtures)
    TINY,
    Running,
    backend,
    gated,
    gateway,
    make_scan,
    tiny_model_dir,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the base install only, from a copy of the tracked tree (the checkout is not written to)."""
    tmp = tmp_path_factory.mktemp("light")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    src = tmp / "src"
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(src)],
                         check=False, capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"the base install failed:\n{pip.stderr[-3000:]}")
        pytest.skip(f"the base install could not be made here (package index unreachable?): {pip.stderr[-300:]}")
    return venv


def _run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "neuroexplain"), *argv], check=False, capture_output=True, text=True,
                          timeout=300,
                          env=env, cwd=venv.parent)


def test_the_base_install_has_no_numpy_or_torch(light_venv: Path) -> None:
    listed = subprocess.run([str(light_venv / "bin" / "pip"), "list", "--format", "json"], check=True,
                            capture_output=True, text=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "neuroexplain" in names and "grpcio" in names
    assert not names & {"numpy", "torch", "scipy", "nibabel", "captum", "pydicom"}, sorted(names)


@pytest.mark.parametrize("backend", ["inprocess"], indirect=True)  # the client side is under test, not the backend
def test_every_client_command_runs_from_the_light_install(light_venv: Path, gateway: Running,
                                                          tmp_path: Path) -> None:
    server = ["--server", f"127.0.0.1:{gateway.port}"]
    models = _run(light_venv, "models", *server)
    assert models.returncode == 0 and TINY in models.stdout, models.stderr
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(make_scan(61))
    predict = _run(light_venv, "predict", str(scan), "--model", TINY, "--json", *server)
    assert predict.returncode == 0, predict.stderr
    line = json.loads(predict.stdout)
    assert line["predicted_class"] in ("healthy", "lesion") and "input_check" in line and line["alignment"] == "mni"
    out, summary = tmp_path / "map.nii.gz", tmp_path / "s.json"
    attribute = _run(light_venv, "attribute", str(scan), "--model", TINY, "--method", "gradient", "-o", str(out),
                     "--summary", str(summary), *server)
    assert attribute.returncode == 0, attribute.stderr
    assert gzip.decompress(out.read_bytes())[344:348] in (b"n+1\0", b"n+2\0") or out.read_bytes()[:2] == b"\x1f\x8b"
    assert json.loads(summary.read_text())["method"] == "gradient"
    vol = tmp_path / "v.nii.gz"
    visualize = _run(light_venv, "visualize", "--model", TINY, "--target", "class:lesion", "--preset", "none",
                     "--steps", "2", "-o", str(vol), "--no-progress", *server)
    assert visualize.returncode == 0, visualize.stderr
    assert vol.read_bytes()[:2] == b"\x1f\x8b"
    # --local needs the full install, and says so in one line
    local = _run(light_venv, "predict", str(scan), "--model", TINY, "--local")
    assert local.returncode != 0 and len(local.stderr.strip().splitlines()) == 1, local.stderr
