"""Parametrizations of the volume being optimised: voxels or a 3D Fourier spectrum, optionally range-mapped.

Both produce a batch of volumes ``(B, 1, D, H, W)`` in the model's normalised intensity units and can start from any
volume (noise, the template, a user's scan) exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from neuroexplain.featvis.presets import Param, RangeMap

_EPS = 1e-4


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur3d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, D, H, W)`` with edge replication (sigma in voxels)."""
    if sigma <= 0:
        return x
    k = gaussian_kernel1d(sigma).to(x)
    r = (k.numel() - 1) // 2
    b, c = x.shape[:2]
    out = x.reshape(b * c, 1, *x.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out.reshape(x.shape)


def _logit(y: torch.Tensor) -> torch.Tensor:
    y = y.clamp(_EPS, 1 - _EPS)
    return torch.log(y) - torch.log1p(-y)


class Parametrization:
    """A batch of volumes as a function of free parameters.

    Args:
        kind: voxel or Fourier.
        start: initial volumes ``(B, 1, D, H, W)`` in normalised intensity units.
        range_map: optional sigmoid mapping into ``[lo, hi]``.
        lo: lower intensity bound (range mapping and clamp).
        hi: upper intensity bound.
        decay: Fourier only: the spectrum is scaled by ``1/f^decay``.
    """

    def __init__(self, kind: Param, start: torch.Tensor, range_map: RangeMap, lo: float, hi: float,
                 decay: float = 1.0) -> None:
        self.kind = kind
        self.range_map = range_map
        self.lo, self.hi = lo, hi
        self.shape = tuple(start.shape[2:])
        raw = self._unmap(start)
        if kind is Param.VOXEL:
            self.raw = raw.clone().requires_grad_(True)
            self.scale: torch.Tensor | None = None
        else:
            self.scale = self._spectrum_scale(self.shape, decay).to(start)  # (D, H, W//2+1)
            spectrum = torch.fft.rfftn(raw, dim=(-3, -2, -1), norm="ortho") / self.scale
            self.raw = torch.view_as_real(spectrum).clone().requires_grad_(True)  # (B, 1, D, H, W//2+1, 2)

    @staticmethod
    def frequencies(shape: tuple[int, ...]) -> torch.Tensor:
        """Radial frequency in cycles/voxel of each rfftn coefficient, ``(D, H, W//2+1)``."""
        fd = torch.fft.fftfreq(shape[0])[:, None, None]
        fh = torch.fft.fftfreq(shape[1])[None, :, None]
        fw = torch.fft.rfftfreq(shape[2])[None, None, :]
        return torch.sqrt(fd**2 + fh**2 + fw**2)

    @classmethod
    def _spectrum_scale(cls, shape: tuple[int, ...], decay: float) -> torch.Tensor:
        f = cls.frequencies(shape).clamp(min=1.0 / max(shape))
        s = f.pow(-decay)
        return s / s.pow(2).mean().sqrt()  # unit RMS: a Fourier step is about as large as a voxel step

    @torch.no_grad()
    def add_noise_(self, std: float, gen: torch.Generator) -> None:
        """Add seeded noise in parameter space: white for voxels, 1/f^decay-coloured (smoother) for Fourier.

        The unit-RMS spectrum scale keeps the volume's noise standard deviation close to ``std`` either way.
        """
        noise = torch.randn(self.raw.shape, generator=gen, dtype=torch.float32).to(self.raw)
        self.raw.add_(noise * (std if self.kind is Param.VOXEL else std / math.sqrt(2)))

    def parameters(self) -> list[torch.Tensor]:
        return [self.raw]

    def _map(self, raw: torch.Tensor) -> torch.Tensor:
        if self.range_map is RangeMap.SIGMOID:
            return self.lo + (self.hi - self.lo) * torch.sigmoid(raw)
        return raw

    def _unmap(self, volume: torch.Tensor) -> torch.Tensor:
        if self.range_map is RangeMap.SIGMOID:
            return _logit((volume - self.lo) / (self.hi - self.lo))
        return volume

    def volume(self) -> torch.Tensor:  # (B, 1, D, H, W)
        """The current volumes (differentiable in the parameters)."""
        if self.kind is Param.VOXEL:
            return self._map(self.raw)
        assert self.scale is not None
        spectrum = torch.view_as_complex(self.raw) * self.scale
        return self._map(torch.fft.irfftn(spectrum, s=self.shape, dim=(-3, -2, -1), norm="ortho"))

    @torch.no_grad()
    def blur_(self, sigma: float) -> None:
        """Blur the volume in place: a Gaussian filter on voxels, its transfer function on the spectrum."""
        if self.kind is Param.VOXEL:
            self.raw.copy_(gaussian_blur3d(self.raw, sigma))
        else:
            f = self.frequencies(self.shape).to(self.raw)
            self.raw.mul_(torch.exp(-2 * (math.pi * sigma * f) ** 2)[..., None])

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project voxel parameters into ``[lo, hi]`` (Fourier volumes are clamped in :meth:`volume`'s caller)."""
        if self.kind is Param.VOXEL and self.range_map is RangeMap.NONE:
            self.raw.clamp_(self.lo, self.hi)
