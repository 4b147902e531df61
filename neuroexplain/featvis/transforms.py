"""Transformation robustness in 3D: a random pad/jitter/scale/rotation per sample per step.

All random draws come from a seeded ``torch.Generator``. Scale, rotation and jitter are composed into one affine per
sample and applied with one ``grid_sample`` (trilinear), so the cost is one resampling pass whatever is enabled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Robustness:
    """Ranges of the random transforms; all 0 means the identity (no resampling at all).

    Attributes:
        pad: zero margin (voxels) around the volume while it is transformed; content moved in from beyond the margin
            repeats the margin's edge, i.e. background.
        jitter: maximum shift in voxels along each axis.
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

    def _theta(self, b: int, shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:  # (B, 3, 4)
        """Affines in grid_sample's normalised (x=W, y=H, z=D) coordinates, built in voxel units so that rotations
        stay rotations on anisotropic grids."""
        def uniform(*size: int) -> torch.Tensor:
            return torch.rand(*size, generator=gen, dtype=torch.float64) * 2 - 1

        angles = uniform(b, 3) * math.radians(self.rotate)
        scales = 1 + uniform(b) * self.scale
        shifts = torch.round(uniform(b, 3) * self.jitter)  # whole voxels, in (D, H, W) order
        theta = torch.zeros(b, 3, 4, dtype=torch.float64)
        size_xyz = torch.tensor([shape[2], shape[1], shape[0]], dtype=torch.float64)
        for i in range(b):
            ax, ay, az = angles[i].tolist()
            rx = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
            ry = torch.tensor([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
            rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
            a = (rz @ ry @ rx).to(torch.float64) * float(scales[i])
            n = torch.diag(2.0 / size_xyz)  # voxel offsets from the centre -> normalised coordinates
            theta[i, :, :3] = n @ a @ torch.linalg.inv(n)
            theta[i, :, 3] = n @ shifts[i].flip(0)
        return theta

    def apply(self, volume: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Transform each sample of ``(B, 1, D, H, W)`` randomly; the output has the input's shape."""
        if not self.active:
            return volume
        p = self.pad
        x = F.pad(volume, [p] * 6) if p else volume
        b, _, d, h, w = x.shape
        theta = self._theta(b, (d, h, w), gen).to(device=x.device, dtype=x.dtype)  # drawn on the CPU generator
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[:, :, p : d - p, p : h - p, p : w - p] if p else out
