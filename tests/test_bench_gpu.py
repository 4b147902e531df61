"""bench/gpu.sh refuses to report CPU numbers as GPU numbers (its dry run is checked by hand: ~1 min on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run")
def test_gpu_script_refuses_without_cuda(tmp_path: Path) -> None:
    out = ROOT / "bench" / "out" / "gpu.json"
    before = out.stat().st_mtime_ns if out.exists() else None
    env = {**os.environ, "PYTHON": sys.executable, "NEUROEXPLAIN_GPU_SITE": str(tmp_path / "site")}
    done = subprocess.run([str(ROOT / "bench" / "gpu.sh")], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "refusing to report CPU numbers as GPU numbers" in done.stderr
    assert "[GPU:" not in done.stdout  # no figure line
    assert (out.stat().st_mtime_ns if out.exists() else None) == before  # and no GPU table written
