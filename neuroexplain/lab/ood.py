"""Out-of-distribution cases for the input check: scans a model must not answer as if they were its training data.

None of these was used to fit the check: its thresholds come from in-distribution calibration scans only. Each case
is built from a healthy synthetic scan of seed :data:`OOD_BASE_SEED` (a seed of no other range) or from files that
nibabel ships (``nibabel/tests/data``: a real T1 head and an EPI series), and comes with the alignment it is read with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from neuroexplain.lab.synthetic import Task, make_sample
from neuroexplain.template import MNI_2MM, anatomy
from neuroexplain.volumes import Alignment, Scan, read_scan

OOD_BASE_SEED = 4_000_000  # the healthy scan the synthetic cases are made from (seed range 4_000_000 + ...)


@dataclass(frozen=True)
class OodCase:
    """One case: a name, what it is, the scan and the alignment it is read with."""

    name: str
    description: str
    scan: Scan
    alignment: Alignment = Alignment.AUTO


def _scan(data: np.ndarray, affine: np.ndarray | None = None) -> Scan:
    return Scan(data=np.asarray(data, dtype=np.float32), affine=MNI_2MM.affine.copy() if affine is None else affine,
                digest="", format="nifti1")


def _nibabel_data() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


def _rigid(angle_deg: float, shift_mm: tuple[float, float, float], centre: np.ndarray) -> np.ndarray:
    """A world transform: rotate ``angle_deg`` about x through ``centre``, then shift."""
    a = np.deg2rad(angle_deg)
    r = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    t = np.eye(4)
    t[:3, :3] = r
    t[:3, 3] = centre - r @ centre + np.asarray(shift_mm)
    return t


def cases(task: Task, seed: int = OOD_BASE_SEED) -> list[OodCase]:
    """Every out-of-distribution case for a task (the synthetic ones from a healthy scan of that task)."""
    base = make_sample(task, seed, positive=False).image
    rng = np.random.default_rng([seed, 99])
    a = anatomy(MNI_2MM)
    p99 = float(np.percentile(base[base > 0], 99))
    fg = base > 0.05 * p99
    out: list[OodCase] = []

    def add(name: str, description: str, make: Callable[[], Scan], alignment: Alignment = Alignment.AUTO) -> None:
        out.append(OodCase(name, description, make(), alignment))

    add("constant", "a constant volume (500 everywhere)", lambda: _scan(np.full(MNI_2MM.shape, 500.0)))
    add("uniform_noise", "uniform noise 0-1000", lambda: _scan(rng.uniform(0, 1000, MNI_2MM.shape)))
    add("inverted", "the healthy scan with inverted contrast inside its foreground",
        lambda: _scan(np.where(fg, p99 - np.clip(base, 0, p99) + 0.05 * p99, 0.0)))
    dist = ndimage.distance_transform_edt(~a.brain, sampling=MNI_2MM.zooms)
    shell = ((dist > 4) & (dist < 12)).astype(np.float32)
    add("skull_shell", "a bright 8 mm scalp shell around the brain (an un-skull-stripped T1)",
        lambda: _scan(base + 1.1 * p99 * ndimage.gaussian_filter(shell, 1.0)))
    centre = a.com_mm
    add("misregistered_30mm", "shifted 30 mm (affine unchanged) and read as mni",
        lambda: _scan(base, _rigid(0.0, (0.0, 30.0, 0.0), centre) @ MNI_2MM.affine), Alignment.MNI)
    add("misregistered_20deg", "rotated 20 degrees about x and read as mni",
        lambda: _scan(base, _rigid(20.0, (0.0, 0.0, 0.0), centre) @ MNI_2MM.affine), Alignment.MNI)
    z0 = MNI_2MM.shape[2] // 2 - 4
    slab_affine = MNI_2MM.affine.copy()
    slab_affine[:3, 3] += slab_affine[:3, 2] * z0
    add("slab_8_slices", "8 axial slices through the middle of the brain",
        lambda: _scan(base[:, :, z0 : z0 + 8], slab_affine))
    add("binary_mask", "a binary brain mask (1 inside, 0 outside)", lambda: _scan(fg.astype(np.float32)))
    crop = MNI_2MM.shape[2] // 2
    crop_affine = MNI_2MM.affine.copy()
    crop_affine[:3, 3] += crop_affine[:3, 2] * crop
    add("cropped_fov", "the top half of the head only (field of view cropped at z = 8 mm)",
        lambda: _scan(base[:, :, crop:], crop_affine))
    t2 = 1.0 * np.clip(1 - a.gm - a.wm, 0, 1) + 0.65 * a.gm + 0.35 * a.wm
    t2 = np.where(a.brain, t2, 0.0)
    add("t2_like", "a synthetic T2-like scan (CSF bright, white matter dark)",
        lambda: _scan(np.clip(t2 * 800 + rng.normal(0, 15, MNI_2MM.shape) * (t2 > 0), 0, None)))
    data = _nibabel_data()
    add("nibabel_anatomical", "nibabel's anatomical.nii (a real T1 head, not skull-stripped, not in MNI)",
        lambda: read_scan(data / "anatomical.nii"))
    add("nibabel_example4d_vol0", "volume 0 of nibabel's example4d.nii.gz (a small EPI series)",
        lambda: read_scan(data / "example4d.nii.gz", volume_index=0))
    return out
