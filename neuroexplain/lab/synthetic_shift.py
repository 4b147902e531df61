"""A second synthetic test set, built independently of :mod:`neuroexplain.lab.synthetic` (dataset shift).

Same task and classes, same template, but every generative choice differs, so a figure measured here says how a
model and its calibration carry over to data it was not tuned on:

lesion:  clusters of 2-4 overlapping spheres (not ellipsoids with a wobbling outline), centres uniform over the
         white matter (no periventricular bias), 1-6 per scan, 40-100 % brighter (the training set: 60-120 %).
atrophy: a radial ventricular expansion with a wider profile (16 mm), hippocampi shrunk towards their centres and
         cortical thinning by a blur of the grey matter towards CSF; healthy scans vary half as much.
subject: a larger rigid motion (6 degrees, 6 mm) without the elastic field, a coarser bias field, Rician noise
         (magnitude of complex Gaussian noise, 1.5-5 %) instead of Gaussian, and intensity scales of 100-3000.

Seeds are drawn from their own stream (``[seed, task, 7]``), so seed 5 here and seed 5 of the training generator share
nothing. ``make_shifted_sample(task, seed)`` is deterministic.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neuroexplain.lab.synthetic import Sample, Task, _random_rotation, _upsample, _warp_world
from neuroexplain.template import MNI_2MM, _world_grid, anatomy
from neuroexplain.volumes import Grid

_STREAM = 7


def make_shifted_sample(task: Task, seed: int, positive: bool | None = None, grid: Grid = MNI_2MM) -> Sample:
    """One scan of the shifted set; ``positive`` defaults to ``seed % 2 == 1``."""
    rng = np.random.default_rng([seed, 0 if task is Task.LESION else 1, _STREAM])
    label = int(seed % 2 == 1) if positive is None else int(positive)
    a = anatomy(grid)
    world = _world_grid(grid)
    image = a.t1.astype(np.float32).copy()
    mask = np.zeros(grid.shape, dtype=bool)
    count = 0
    if task is Task.LESION and label:
        count = int(rng.integers(1, 7))
        candidates = np.flatnonzero(((a.wm > 0.7) & a.brain).ravel())
        for flat in rng.choice(candidates, size=count, replace=False):
            centre = world.reshape(-1, 3)[flat]
            contrast = rng.uniform(0.4, 1.0)
            for _ in range(int(rng.integers(2, 5))):
                c = centre + rng.normal(0, 2.5, 3)
                radius = rng.uniform(1.5, 4.0)
                d = np.sqrt(((world - c) ** 2).sum(-1))
                blob = d < radius
                image[blob & ~mask] *= 1.0 + contrast
                mask |= blob
        mask &= a.brain
    elif task is Task.ATROPHY:
        strength = 1.0 if label else 0.5
        expand = rng.uniform(0.10, 0.22) if label else rng.uniform(-0.03, 0.03)
        shrink = rng.uniform(0.15, 0.3) if label else rng.uniform(-0.03, 0.03)
        vc = world[a.ventricles].mean(0)
        vdist = ndimage.distance_transform_edt(~a.ventricles, sampling=grid.zooms)
        u = -(world - vc) * (expand * np.exp(-(vdist**2) / (2 * 16.0**2)))[..., None]
        for side in (-1, 1):
            hip = a.hippocampi & ((world[..., 0] > 0) == (side > 0))
            hc = world[hip].mean(0)
            hd = np.sqrt(((world - hc) ** 2).sum(-1))
            u += (world - hc) * (shrink * np.exp(-(hd**2) / (2 * 9.0**2)))[..., None]
        warped = _warp_world(image, grid, world + u, order=1)
        thin = strength * rng.uniform(0.3, 0.6) if label else rng.uniform(0.0, 0.05)
        blurred = ndimage.gaussian_filter(warped, 1.0)
        cortex = np.clip(a.gm, 0, 1) * (ndimage.distance_transform_edt(a.brain, sampling=grid.zooms) < 6)
        image = (warped * (1 - thin * cortex) + thin * cortex * 0.5 * blurred).astype(np.float32)
        if label:
            mask = (np.abs(image - a.t1) > 0.15) & a.brain
    # Subject: rigid motion, coarse bias, Rician noise, scale.
    rot = _random_rotation(rng, np.deg2rad(6.0))
    shift = rng.uniform(-6.0, 6.0, 3)
    src = (world - a.com_mm) @ rot.T + a.com_mm + shift
    image = _warp_world(image, grid, src, order=1)
    mask = _warp_world(mask.astype(np.float32), grid, src, order=1) > 0.5
    bias = np.exp(_upsample(rng.normal(0.0, 0.12, (3, 3, 3)), grid.shape))
    sigma = rng.uniform(0.015, 0.05)
    fg = image > 0.02
    re = image * bias + rng.normal(0, sigma, grid.shape)
    im = rng.normal(0, sigma, grid.shape)
    noisy = np.where(fg, np.sqrt(re**2 + im**2), 0.0)
    out = noisy * rng.uniform(100.0, 3000.0)
    return Sample(image=out.astype(np.float32), mask=mask, label=label, seed=seed, lesion_count=count)
