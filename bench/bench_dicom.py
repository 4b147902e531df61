"""DICOM input cost: a 176-slice 1 mm series read from bytes in memory vs the same voxels as ``.nii.gz`` in memory.

The series is 176 sagittal single-frame MR images of 256 x 256 int16 pixels (an MPRAGE-like 1 mm whole head),
uncompressed; the NIfTI holds exactly the same int16 voxels and affine, gzip-compressed as nibabel writes it.
Both are read from bytes already in memory with the project's readers (``read_series`` / ``read_scan``), each in its
own child process so that its peak RSS is its own. Target: DICOM / NIfTI <= 1.5.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bench.common import p50, save, timeit

SHAPE = (176, 256, 256)  # sagittal slices (x), rows/columns (y, z) at 1 mm
REPEAT = 5


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in SHAPE], indexing="ij")
    head = np.clip(1.0 - (x**2 + y**2 + z**2), 0, None)
    vol = (900 * head + rng.normal(0, 20, SHAPE)).clip(0, 4095).astype(np.int16)
    affine = np.eye(4)
    affine[:3, 3] = -np.array(SHAPE) / 2.0
    return vol, affine


def _hwm_mb() -> float:
    """This process's peak RSS (VmHWM, MB): unlike getrusage's ru_maxrss it is not inherited across fork/exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(kind: str, folder: str, queue: Any) -> None:
    from neuroexplain.dicom import read_series
    from neuroexplain.volumes import read_scan

    root = Path(folder)
    if kind == "dicom":
        instances = [p.read_bytes() for p in sorted((root / "dicom").iterdir())]
        baseline = _hwm_mb()
        times = timeit(lambda: read_series(instances), repeat=REPEAT)
        size = sum(map(len, instances))
    else:
        raw = (root / "scan.nii.gz").read_bytes()
        baseline = _hwm_mb()
        times = timeit(lambda: read_scan(raw), repeat=REPEAT)
        size = len(raw)
    queue.put({"p50_s": p50(times), "times_s": times, "bytes": size, "rss_before_mb": baseline,
               "peak_rss_mb": _hwm_mb()})


def main() -> None:
    from neuroexplain.lab.dicom_synth import write_series
    from neuroexplain.volumes import read_scan

    vol, affine = _volume()
    with tempfile.TemporaryDirectory() as tmp:
        series = write_series(vol, affine, Path(tmp) / "dicom", orientation="sagittal")
        nii = nib.Nifti1Image(series.data.astype(np.int16), series.affine)
        nib.save(nii, Path(tmp) / "scan.nii.gz")
        # Same voxels and geometry, or the comparison means nothing.
        from neuroexplain.dicom import read_series_dir

        a, b = read_series_dir(Path(tmp) / "dicom"), read_scan(Path(tmp) / "scan.nii.gz")
        assert np.array_equal(a.data, b.data) and np.allclose(a.affine, b.affine, atol=1e-4)
        ctx = mp.get_context("spawn")
        results = {}
        for kind in ("dicom", "nifti"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(kind, tmp, queue))
            proc.start()
            results[kind] = queue.get()
            proc.join()
    ratio = results["dicom"]["p50_s"] / results["nifti"]["p50_s"]
    result = {
        "series": f"{SHAPE[0]} single-frame MR images {SHAPE[1]}x{SHAPE[2]} int16, uncompressed",
        "dicom": results["dicom"],
        "nifti_gz": results["nifti"],
        "ratio_dicom_over_nifti": ratio,
        "target_ratio": 1.5,
        "meets_target": ratio <= 1.5,
    }
    save("dicom", result)
    print(f"DICOM {results['dicom']['p50_s']:.3f} s vs .nii.gz {results['nifti']['p50_s']:.3f} s: {ratio:.2f}x "
          f"(target <= 1.5); peak RSS {results['dicom']['peak_rss_mb']:.0f} MB vs "
          f"{results['nifti']['peak_rss_mb']:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
