"""Helpers shared by the benchmarks: timing, peak RSS, a 1 mm test scan, JSON output."""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).parent / "out"


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def p50(times: list[float]) -> float:
    return statistics.median(times)


def p95(times: list[float]) -> float:
    return float(np.percentile(times, 95))


def inflaters() -> dict[str, Callable[[bytes], Any]]:
    """The reader's inflater (ISA-L; zlib without it) two ways, each timed as a candidate for a floor, whose p50 is
    the faster of the two: ``whole``, one call for the whole buffer; ``pieces``, the stream of cache-sized pieces
    the reader converts as they come (``volumes._Inflation``), which is 1-2 ms faster on these files."""
    import zlib

    from neuroexplain.volumes import _inflater, _Inflation

    def whole(raw: bytes) -> Any:
        return _inflater.decompressobj(16 + zlib.MAX_WBITS).decompress(raw)

    def pieces(raw: bytes) -> int:
        return sum(len(piece) for _, piece in _Inflation(raw).pieces(1 << 62, 0))

    return {"whole": whole, "pieces": pieces}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_mm_scan_bytes(seed: int = 1_000_001) -> bytes:
    """A synthetic lesion scan upsampled to 1 mm isotropic (182 x 218 x 182 world box), gzipped NIfTI."""
    from scipy import ndimage

    from neuroexplain.lab.synthetic import Task, make_sample
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import nifti_bytes

    sample = make_sample(Task.LESION, seed)
    fine = ndimage.zoom(sample.image, 2, order=1)
    affine = MNI_2MM.affine.copy()
    affine[:3, :3] /= 2
    affine[:3, 3] -= 0.5  # keep voxel centres aligned with the 2 mm grid's
    return nifti_bytes(fine, affine)


def save(name: str, result: dict[str, Any]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
