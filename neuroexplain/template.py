"""The MNI152 template and tissue maps that ship inside nilearn, on a model grid (no downloads).

Also anatomical regions the synthetic data needs and nilearn does not ship as masks: the lateral ventricles (dark
cerebrospinal fluid near the midline) and the hippocampi (grey matter inside ellipsoids around published MNI centres).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from neuroexplain.volumes import Grid, _affine_resample, center_of_mass_world

# The bundled models' grid: MNI152 2 mm, cropped to the brain's bounding box with a margin (80 x 96 x 80 voxels,
# x -80..78, y -112..78, z -72..86 mm). Cropping halves the voxel count of nilearn's 99 x 117 x 95 box.
MNI_2MM = Grid(
    shape=(80, 96, 80),
    affine=np.array([[2.0, 0, 0, -80.0], [0, 2.0, 0, -112.0], [0, 0, 2.0, -72.0], [0, 0, 0, 1.0]]),
)

# Hippocampal centres and semi-axes in MNI mm (after the Harvard-Oxford atlas' centroids), long axis along y.
_HIPPOCAMPI_MM = (((-26.0, -22.0, -14.0), (6.0, 16.0, 7.0)), ((26.0, -22.0, -14.0), (6.0, 16.0, 7.0)))


@dataclass(frozen=True)
class Anatomy:
    """Template maps on one grid; arrays are ``grid.shape`` float32 (probabilities in [0, 1]) or bool."""

    grid: Grid
    t1: np.ndarray  # T1 template scaled so its 99th brain percentile is 1
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # bool
    ventricles: np.ndarray  # bool
    hippocampi: np.ndarray  # bool
    com_mm: np.ndarray  # (3,) intensity centre of mass of the T1 template, world mm


#: A machine without nilearn (the GPU bench machine) reads the same images from a file made by
#: :func:`save_template_file`, named by this variable (read when the template is first used, not at import).
TEMPLATE_FILE_ENV = "NEUROEXPLAIN_TEMPLATE_FILE"
_IMAGE_KEYS = ("affine", "t1", "gm", "wm", "brain")


def save_template_file(path: str | Path) -> None:
    """Write nilearn's MNI152 2 mm template, GM, WM and brain mask to one compressed ``.npz`` (for machines that
    have no nilearn: set ``NEUROEXPLAIN_TEMPLATE_FILE`` to it)."""
    images: dict[str, Any] = dict(zip(_IMAGE_KEYS, _nilearn_images(), strict=True))
    np.savez_compressed(path, **images)


@functools.lru_cache(maxsize=4)
def _nilearn_images() -> tuple[np.ndarray, ...]:
    path = os.environ.get(TEMPLATE_FILE_ENV)
    if path:
        with np.load(path) as images:
            return tuple(np.asarray(images[k]) for k in _IMAGE_KEYS)
    from nilearn import datasets

    images = [
        datasets.load_mni152_template(resolution=2),
        datasets.load_mni152_gm_template(resolution=2),
        datasets.load_mni152_wm_template(resolution=2),
        datasets.load_mni152_brain_mask(resolution=2),
    ]
    affine = images[0].affine
    return (affine, *[np.asarray(im.get_fdata(), dtype=np.float32) for im in images])


def _world_grid(grid: Grid) -> np.ndarray:
    """World coordinates of every voxel centre. ``grid.shape + (3,)``."""
    idx = np.indices(grid.shape, dtype=np.float32).reshape(3, -1)
    world = grid.affine[:3, :3] @ idx + grid.affine[:3, 3:4]
    return world.T.reshape(*grid.shape, 3).astype(np.float32)


@functools.lru_cache(maxsize=4)
def anatomy(grid: Grid = MNI_2MM) -> Anatomy:
    """The template and its regions resampled onto ``grid`` (cached per grid)."""
    src_affine, t1, gm, wm, brain = _nilearn_images()
    m = np.linalg.inv(src_affine) @ grid.affine
    t1, gm, wm, brain_p = (_affine_resample(a, m, grid.shape, 1) for a in (t1, gm, wm, brain))
    brain_mask = brain_p > 0.5
    t1 = t1 * brain_mask  # skull-stripped: the synthetic scans and the normalisation look at brain only
    t1 = t1 / float(np.percentile(t1[brain_mask], 99))
    world = _world_grid(grid)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    central = (np.abs(x) < 28) & (y > -45) & (y < 30) & (z > -5) & (z < 32)
    csf = brain_mask & (gm < 0.25) & (wm < 0.5) & (t1 < 0.45)
    ventricles = ndimage.binary_opening(csf & central, iterations=1)
    labels, n = ndimage.label(ventricles)
    if n:
        sizes = ndimage.sum(ventricles, labels, range(1, n + 1))
        ventricles = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))
    hippocampi = np.zeros(grid.shape, dtype=bool)
    for centre, axes in _HIPPOCAMPI_MM:
        r = sum(((world[..., i] - centre[i]) / axes[i]) ** 2 for i in range(3))
        hippocampi |= (r <= 1.0) & (gm > 0.3)
    com = center_of_mass_world(t1, grid.affine)
    return Anatomy(grid, t1.astype(np.float32), gm, wm, brain_mask, ventricles, hippocampi, com)
