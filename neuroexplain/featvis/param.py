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
                 decay: float = 1.0, cutoff: float = 0.5) -> None:
        self.kind = kind
        self.range_map = range_map
        self.lo, self.hi = lo, hi
        self.shape = tuple(start.shape[2:])
        self.cutoff = cutoff
        self.residual: torch.Tensor | None = None
        raw = self._unmap(start)
        if kind is Param.VOXEL:
            self.raw = raw.clone().requires_grad_(True)
            self.scale: torch.Tensor | None = None
            return
        # Only the coefficients at |frequency| <= cutoff along every axis are free (a band-limited volume); the
        # inverse transform then skips the zeros axis by axis (:func:`_band_irfftn`), which makes it cheaper.
        self._keep = [_kept(n, cutoff, real=i == 2) for i, n in enumerate(self.shape)]
        freqs = self.frequencies(self.shape)[self._index()]
        self.scale = self._spectrum_scale(freqs, self.shape, decay).to(start)  # (d, h, w) kept coefficients
        full = torch.fft.rfftn(raw, dim=(-3, -2, -1), norm="ortho")
        spectrum = full[(..., *self._index())] / self.scale
        self.raw = torch.view_as_real(spectrum).clone().requires_grad_(True)  # (B, 1, d, h, w, 2)
        with torch.no_grad():  # what the band cannot represent stays fixed, so any start is reproduced exactly
            residual = raw - self._inverse(torch.view_as_complex(self.raw) * self.scale)
            if float(residual.abs().max()) > 1e-5:
                self.residual = residual

    def _index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kd, kh, kw = self._keep
        return kd[:, None, None], kh[None, :, None], kw[None, None, :]

    def _inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
        return _band_irfftn(spectrum, self.shape, self._keep)

    @staticmethod
    def frequencies(shape: tuple[int, ...]) -> torch.Tensor:
        """Radial frequency in cycles/voxel of each rfftn coefficient, ``(D, H, W//2+1)``."""
        fd = torch.fft.fftfreq(shape[0])[:, None, None]
        fh = torch.fft.fftfreq(shape[1])[None, :, None]
        fw = torch.fft.rfftfreq(shape[2])[None, None, :]
        return torch.sqrt(fd**2 + fh**2 + fw**2)

    @staticmethod
    def _spectrum_scale(f: torch.Tensor, shape: tuple[int, ...], decay: float) -> torch.Tensor:
        s = f.clamp(min=1.0 / max(shape)).pow(-decay)
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
        v = self._inverse(torch.view_as_complex(self.raw) * self.scale)
        return self._map(v if self.residual is None else v + self.residual)

    @torch.no_grad()
    def blur_(self, sigma: float) -> None:
        """Blur the volume in place: a Gaussian filter on voxels, its transfer function on the spectrum."""
        if self.kind is Param.VOXEL:
            self.raw.copy_(gaussian_blur3d(self.raw, sigma))
        else:
            f = self.frequencies(self.shape)[self._index()].to(self.raw)
            self.raw.mul_(torch.exp(-2 * (math.pi * sigma * f) ** 2)[..., None])
            if self.residual is not None:
                self.residual.copy_(gaussian_blur3d(self.residual, sigma))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project voxel parameters into ``[lo, hi]`` (Fourier volumes are clamped in :meth:`volume`'s caller)."""
        if self.kind is Param.VOXEL and self.range_map is RangeMap.NONE:
            self.raw.clamp_(self.lo, self.hi)


def _kept(n: int, cutoff: float, real: bool) -> torch.Tensor:
    """Indices of the (r)fft coefficients along an axis of length ``n`` with |frequency| <= ``cutoff``."""
    f = torch.fft.rfftfreq(n) if real else torch.fft.fftfreq(n)
    keep = torch.nonzero(f.abs() <= cutoff + 1e-9).flatten()
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long)


def _expand(x: torch.Tensor, dim: int, keep: torch.Tensor, n: int) -> torch.Tensor:
    """Put the kept coefficients of ``x`` along ``dim`` back at their places among ``n``, zeros elsewhere."""
    if keep.numel() == n:
        return x
    k = keep.numel()
    # Kept fft indices are 0..a-1 (non-negative frequencies) then n-(k-a)..n-1 (negative ones): zeros in between.
    a = int((keep < (n + 1) // 2).sum())
    zeros_shape = list(x.shape)
    zeros_shape[dim] = n - k
    zeros = x.new_zeros(zeros_shape)
    return torch.cat([x.narrow(dim, 0, a), zeros, x.narrow(dim, a, k - a)], dim)


def _band_irfftn(spectrum: torch.Tensor, shape: tuple[int, ...], keep: list[torch.Tensor]) -> torch.Tensor:
    """``irfftn`` (norm ``ortho``) of a spectrum whose coefficients outside ``keep`` are zero, given only the kept ones.

    The transform runs axis by axis on the smallest array possible (D on the kept H x W block, then H, then the real
    transform along W), which equals ``irfftn`` of the zero-filled spectrum at a fraction of its cost.
    """
    d, h, w = shape
    if all(k.numel() == n for k, n in zip(keep, (d, h, w // 2 + 1))):
        return torch.fft.irfftn(spectrum, s=shape, dim=(-3, -2, -1), norm="ortho")
    x = torch.fft.ifft(_expand(spectrum, -3, keep[0], d), dim=-3, norm="ortho")
    x = torch.fft.ifft(_expand(x, -2, keep[1], h), dim=-2, norm="ortho")
    return torch.fft.irfft(x, n=w, dim=-1, norm="ortho")  # irfft zero-fills the missing high W frequencies itself
