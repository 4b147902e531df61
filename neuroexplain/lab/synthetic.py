"""Synthetic MRI built on the real MNI152 template, each sample with its ground-truth mask.

Tasks:
    lesion:  MS-like hyperintense white-matter lesions (1-10 per scan, 3-15 mm across, ellipsoidal to irregular,
             biased towards the ventricles), classes ``healthy`` / ``lesion``.
    atrophy: AD-like atrophy by deformation — enlarged ventricles, shrunken hippocampi, thinner cortex —
             classes ``healthy`` / ``atrophy``. Healthy scans get small natural variation of the same kind.

Every sample then gets subject variability so that no model wins on trivia: a small random affine, a smooth elastic
deformation, a multiplicative bias field, an intensity scale and noise. Pathology is drawn in template space first,
then the subject warp moves image and mask together, so the mask stays exact.

Generation is seeded: ``make_sample(task, seed)`` returns the same sample on every machine.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from neuroexplain.errors import InvalidOptionError
from neuroexplain.template import MNI_2MM, Anatomy, _world_grid, anatomy
from neuroexplain.volumes import Grid

HELD_OUT_SEED_START = 1_000_000  # training uses seeds below this, evaluation at or above it


class Task(enum.Enum):
    LESION = "lesion"
    ATROPHY = "atrophy"

    @classmethod
    def parse(cls, value: str) -> Task:
        try:
            return cls(value)
        except ValueError:
            raise InvalidOptionError(f"task {value!r} is unknown; expected one of {[t.value for t in cls]}") from None


CLASSES = {Task.LESION: ("healthy", "lesion"), Task.ATROPHY: ("healthy", "atrophy")}


@dataclass(frozen=True)
class Sample:
    """One synthetic scan on the grid (world = MNI mm)."""

    image: np.ndarray  # grid.shape float32, arbitrary intensity scale (like a real scan)
    mask: np.ndarray  # grid.shape bool: lesions, or voxels that atrophy changed; empty for healthy lesion scans
    label: int  # 0 healthy, 1 lesion/atrophy
    seed: int
    lesion_count: int = 0


@dataclass(frozen=True)
class _Fields:
    world: np.ndarray  # grid.shape + (3,)
    ventricle_dist_mm: np.ndarray
    hippocampus_dist_mm: np.ndarray
    outside_dist_mm: np.ndarray  # distance from non-brain, inside the brain
    ventricle_centre: np.ndarray  # (3,) mm
    hippocampus_centres: np.ndarray  # (2, 3) mm
    lesion_prior: np.ndarray  # probability over voxels of a lesion centre


@functools.lru_cache(maxsize=4)
def _fields(grid: Grid) -> _Fields:
    a = anatomy(grid)
    zooms = grid.zooms
    world = _world_grid(grid)
    vdist = ndimage.distance_transform_edt(~a.ventricles, sampling=zooms).astype(np.float32)
    hdist = ndimage.distance_transform_edt(~a.hippocampi, sampling=zooms).astype(np.float32)
    odist = ndimage.distance_transform_edt(a.brain, sampling=zooms).astype(np.float32)
    vc = world[a.ventricles].mean(axis=0)
    hc = np.stack([world[a.hippocampi & (world[..., 0] < 0)].mean(0), world[a.hippocampi & (world[..., 0] > 0)].mean(0)])
    # Lesion centres: deep white matter, three times likelier next to the ventricles (periventricular bias).
    deep_wm = (a.wm > 0.9) & (odist > 6)
    prior = np.where(deep_wm, a.wm**2 * (1 + 3 * np.exp(-vdist / 8.0)), 0).astype(np.float64)
    prior /= prior.sum()
    return _Fields(world, vdist, hdist, odist, vc, hc, prior.astype(np.float32))


def lesion_prior(grid: Grid = MNI_2MM) -> np.ndarray:
    """Where lesion centres are drawn from, as a probability map on ``grid`` (sums to 1)."""
    return _fields(grid).lesion_prior


def make_sample(task: Task, seed: int, positive: bool | None = None, grid: Grid = MNI_2MM) -> Sample:
    """Generate one scan. ``positive`` defaults to ``seed % 2 == 1`` so that consecutive seeds are balanced."""
    rng = np.random.default_rng([seed, 0 if task is Task.LESION else 1])
    label = int(seed % 2 == 1) if positive is None else int(positive)
    a = anatomy(grid)
    f = _fields(grid)
    if task is Task.LESION:
        image, mask, count = _lesions(a, f, rng, label)
    else:
        image, mask = _atrophy(a, f, rng, label)
        count = 0
    image, mask = _subject_variability(image, mask, a, rng)
    return Sample(image=image, mask=mask, label=label, seed=seed, lesion_count=count)


def _lesions(a: Anatomy, f: _Fields, rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray, int]:
    image = a.t1.copy()
    mask = np.zeros(a.grid.shape, dtype=bool)
    if not label:
        return image, mask, 0
    count = int(rng.integers(1, 11))
    flat = rng.choice(f.lesion_prior.size, size=count, p=f.lesion_prior.ravel().astype(np.float64))
    centres = np.stack(np.unravel_index(flat, a.grid.shape), axis=1)
    zoom = a.grid.zooms[0]
    for c in centres:
        diameter = float(np.exp(rng.uniform(np.log(3.0), np.log(15.0))))  # small lesions are commoner
        semi = diameter / 2 * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
        rot = _random_rotation(rng, np.pi)
        contrast = rng.uniform(0.6, 1.2)  # FLAIR-like: 60-120% brighter than the white matter around it
        half = int(np.ceil(semi.max() * 1.5 / zoom)) + 1
        lo = np.maximum(c - half, 0)
        hi = np.minimum(c + half + 1, a.grid.shape)
        box = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
        offset = (f.world[box] - f.world[tuple(c)]) @ rot  # (..., 3) in the lesion's own axes
        r = np.sqrt(((offset / semi) ** 2).sum(-1))
        # Irregular outline: the radius wobbles with smooth low-frequency noise.
        wobble = _upsample(rng.normal(0, 0.12, (3, 3, 3)), r.shape)
        profile = 1.0 / (1.0 + np.exp(-(1.0 + wobble - r) / 0.12))
        image[box] *= 1.0 + contrast * profile
        mask[box] |= profile > 0.5
    return image, mask & a.brain, count


def _atrophy(a: Anatomy, f: _Fields, rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    if label:
        expand, shrink, thin = rng.uniform(0.12, 0.25), rng.uniform(0.2, 0.35), rng.uniform(0.35, 0.7)
    else:  # healthy people vary too, but less
        expand, shrink, thin = rng.uniform(-0.04, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(0.0, 0.1)
    w = f.world
    # Backward map: the output voxel at x shows the template at x + u(x).
    u = -(w - f.ventricle_centre) * (expand * np.exp(-(f.ventricle_dist_mm**2) / (2 * 10.0**2)))[..., None]
    for side, centre in enumerate(f.hippocampus_centres):
        near = np.exp(-(f.hippocampus_dist_mm**2) / (2 * 6.0**2)) * ((w[..., 0] < 0) == (side == 0))
        u += (w - centre) * (shrink * near)[..., None]
    image = _warp_world(a.t1, a.grid, w + u, order=1)
    # Thinner cortex: the outer grey matter fades towards CSF intensity.
    fade = thin * np.clip(a.gm, 0, 1) * np.exp(-f.outside_dist_mm / 3.0)
    image = image * (1 - fade) + 0.3 * fade * a.brain
    mask = (np.abs(image - a.t1) > 0.15) & a.brain if label else np.zeros(a.grid.shape, dtype=bool)
    return image.astype(np.float32), mask


def _subject_variability(
    image: np.ndarray, mask: np.ndarray, a: Anatomy, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    grid = a.grid
    w = _world_grid(grid)
    rot = _random_rotation(rng, np.deg2rad(4.0))
    scale = rng.uniform(0.96, 1.04, 3)
    shift = rng.uniform(-4.0, 4.0, 3)
    src = (w - a.com_mm) @ (rot * scale).T + a.com_mm + shift
    coarse = rng.normal(0.0, 1.5, (3, 6, 7, 6))  # smooth elastic field, about 1.5 mm
    src = src + np.stack([_upsample(c, grid.shape) for c in coarse], axis=-1)
    warped = _warp_world(image, grid, src, order=1)
    warped_mask = _warp_world(mask.astype(np.float32), grid, src, order=1) > 0.5
    bias = np.exp(_upsample(rng.normal(0.0, 0.08, (4, 4, 4)), grid.shape))
    noise = rng.normal(0.0, rng.uniform(0.01, 0.04), grid.shape).astype(np.float32)
    out = np.clip(warped * bias + noise * (warped > 0.02), 0, None) * rng.uniform(300.0, 1200.0)
    return out.astype(np.float32), warped_mask


def _upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth trilinear upsampling of a small random field onto the grid."""
    t = torch.from_numpy(np.asarray(coarse, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()


def _warp_world(data: np.ndarray, grid: Grid, world: np.ndarray, order: int) -> np.ndarray:
    """Sample ``data`` (on ``grid``) at world coordinates ``world`` (``shape + (3,)``)."""
    inv = np.linalg.inv(grid.affine)
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    coords = np.moveaxis(vox, -1, 0)
    return ndimage.map_coordinates(data, coords, order=order, mode="constant", cval=0.0).astype(np.float32)


def _random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    ax, ay, az = rng.uniform(-max_angle, max_angle, 3)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx
