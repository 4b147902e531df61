"""Transformation robustness in 3D: a random jitter/scale/rotation per sample per step.

Scale, rotation and integer jitter are composed into one affine per transform. Resampling the whole volume with
trilinear ``grid_sample`` every step cost more than the model's own forward and backward pass on CPU (the bundled
models are cheap), so the transforms are nearest-neighbour lookups instead: :meth:`Robustness.bank` draws ``size``
random affines once per visualization from the seeded generator and turns each into a flat source index per output
voxel; every step then picks one entry per sample at random (same generator) and applies it with one ``gather``
(its backward is one ``scatter_add``). Over a few hundred steps each entry is used several times, which is what
transformation robustness asks for: the objective has to hold up under many small random moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BANK_SIZE = 16


@dataclass(frozen=True)
class Robustness:
    """Ranges of the random transforms; all 0 means the identity (no resampling at all).

    Attributes:
        pad: > 0: content moved in from outside the box is 0 (background); 0: it repeats the box's edge voxels.
            (Earlier versions padded the volume by this many voxels before resampling; with nearest-neighbour lookups
            only whether it is 0 matters.)
        jitter: maximum shift in whole voxels along each axis.
        scale: isotropic scale factor drawn from ``[1 - scale, 1 + scale]``.
        rotate: maximum rotation in degrees about each of the three axes.
    """

    pad: int = 0
    jitter: int = 0
    scale: float = 0.0
    rotate: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.jitter or self.scale or self.rotate)

    def affines(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``b`` random affines in voxel units of (D, H, W) order: matrices ``(b, 3, 3)`` about the box centre and
        integer shifts ``(b, 3)``."""
        def uniform(*size: int) -> torch.Tensor:
            return torch.rand(*size, generator=gen, dtype=torch.float64) * 2 - 1

        angles = uniform(b, 3) * math.radians(self.rotate)
        scales = 1 + uniform(b) * self.scale
        shifts = torch.round(uniform(b, 3) * self.jitter)
        mats = torch.empty(b, 3, 3, dtype=torch.float64)
        for i in range(b):  # b is the bank size: a few dozen 3x3 matrices once per visualization
            a, c, e = angles[i].tolist()
            r1 = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
            r2 = torch.tensor([[math.cos(c), 0, math.sin(c)], [0, 1, 0], [-math.sin(c), 0, math.cos(c)]])
            r3 = torch.tensor([[math.cos(e), -math.sin(e), 0], [math.sin(e), math.cos(e), 0], [0, 0, 1]])
            mats[i] = (r3 @ r2 @ r1).to(torch.float64) * float(scales[i])
        return mats, shifts

    def bank(self, shape: tuple[int, int, int], gen: torch.Generator, size: int = BANK_SIZE,
             device: torch.device | str = "cpu") -> TransformBank:
        """Draw ``size`` random transforms for volumes of ``shape`` (see the module doc)."""
        mats, shifts = self.affines(size, gen)
        n = shape[0] * shape[1] * shape[2]
        centre = [(s - 1) / 2 for s in shape]
        axes = [torch.arange(s, dtype=torch.float32) - c for s, c in zip(shape, centre)]
        index = torch.empty(size, n, dtype=torch.int64)
        for i in range(size):
            flat = torch.zeros(shape, dtype=torch.int64)
            outside = torch.zeros(shape, dtype=torch.bool)
            stride = n
            for ax in range(3):  # source coordinate along ax: sum_j a[ax, j] * (p_j - c_j) + c_ax + shift_ax
                m = mats[i, ax].tolist()
                q = (axes[0] * m[0] + (centre[ax] + float(shifts[i, ax])))[:, None, None] \
                    + (axes[1] * m[1])[None, :, None] + (axes[2] * m[2])[None, None, :]
                q = torch.round(q)
                outside |= (q < 0) | (q > shape[ax] - 1)
                stride //= shape[ax]
                flat += q.clamp_(0, shape[ax] - 1).long() * stride
            if self.pad:
                flat[outside] = n  # the zero appended in :meth:`TransformBank.apply`
            index[i] = flat.flatten()
        return TransformBank(index.to(device), n, bool(self.pad))

    def apply(self, volume: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Transform each sample of ``(B, 1, D, H, W)`` by a freshly drawn transform (a one-entry bank per sample).

        Slower than drawing a :meth:`bank` once; for tests and one-off use.
        """
        if not self.active:
            return volume
        b = volume.shape[0]
        d, h, w = volume.shape[2:]
        index = torch.cat([self.bank((d, h, w), gen, 1, volume.device).index for _ in range(b)])
        return TransformBank(index, index.shape[1], bool(self.pad)).apply(volume, gen, choice=torch.arange(b))


@dataclass(frozen=True)
class TransformBank:
    """Precomputed nearest-neighbour transforms: ``index[k, v]`` is the source voxel of output voxel ``v`` under
    transform ``k`` (``n`` = outside the box, read as 0)."""

    index: torch.Tensor  # (K, N) int64 (torch.gather's index type: converting every step costs more)
    n: int
    zero_outside: bool

    def apply(self, volume: torch.Tensor, gen: torch.Generator, choice: torch.Tensor | None = None) -> torch.Tensor:
        """Apply a randomly chosen transform (one per sample, drawn from ``gen``) to ``(B, 1, D, H, W)``."""
        b = volume.shape[0]
        if choice is None:
            choice = torch.randint(self.index.shape[0], (b,), generator=gen)
        flat = volume.reshape(b, self.n)
        if self.zero_outside:
            flat = torch.cat([flat, flat.new_zeros(b, 1)], 1)
        if b == 1:  # a view of the bank's row: no 5 MB copy per step
            k = int(choice[0])
            idx = self.index[k : k + 1]
        else:
            idx = self.index[choice.to(self.index.device)]
        return torch.gather(flat, 1, idx).reshape(volume.shape)
