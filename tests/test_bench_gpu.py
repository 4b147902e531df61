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


def test_the_template_file_replaces_nilearn(tmp_path: Path) -> None:
    """Where nilearn is missing (the GPU machine), the MNI152 images come from the file gpu.sh carries: the same
    anatomy, bit for bit, with nilearn unimportable."""
    import numpy as np

    from neuroexplain.template import MNI_2MM, TEMPLATE_FILE_ENV, anatomy, save_template_file

    path = tmp_path / "mni152.npz"
    save_template_file(path)
    code = (
        "import sys, numpy as np\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'nilearn':\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from neuroexplain.template import MNI_2MM, anatomy\n"
        "a = anatomy(MNI_2MM)\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, t1=a.t1, brain=a.brain, com=a.com_mm)\n"
    )
    env = {**os.environ, TEMPLATE_FILE_ENV: str(path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    here = anatomy(MNI_2MM)
    with np.load(tmp_path / "out.npz") as there:
        assert np.array_equal(there["t1"], here.t1) and np.array_equal(there["brain"], here.brain)
        assert np.array_equal(there["com"], here.com_mm)
