"""PNG previews of a volume: three orthogonal slices through its brightest point, then an axial mosaic."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _window(volume: np.ndarray) -> tuple[float, float]:
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _to_u8(slice2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((slice2d - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _display(slice2d: np.ndarray) -> np.ndarray:
    """A (first axis, second axis) RAS slice as an image: second axis up, first axis to the right."""
    return slice2d.T[::-1]


def render_png(volume: np.ndarray, zoom: int = 2, mosaic_slices: int = 12) -> bytes:
    """Orthogonal slices (sagittal, coronal, axial) through the volume's maximum, and a mosaic of axial slices.

    Args:
        volume: ``(X, Y, Z)`` array on a RAS grid.
        zoom: integer upscaling of each voxel (nearest neighbour).
        mosaic_slices: number of evenly spaced axial slices in the mosaic.

    Returns:
        PNG bytes (8-bit greyscale, window: 0.5th to 99.5th percentile).
    """
    v = np.nan_to_num(np.asarray(volume, dtype=np.float32))
    lo, hi = _window(v)
    x, y, z = np.unravel_index(int(np.argmax(v)), v.shape)
    ortho = [_display(v[x, :, :]), _display(v[:, y, :]), _display(v[:, :, z])]
    row_h = max(s.shape[0] for s in ortho)
    top = np.zeros((row_h, sum(s.shape[1] for s in ortho) + 2 * (len(ortho) - 1)), dtype=np.float32) + lo
    col = 0
    for s in ortho:
        top[: s.shape[0], col : col + s.shape[1]] = s
        col += s.shape[1] + 2
    zs = np.linspace(0, v.shape[2] - 1, mosaic_slices + 2)[1:-1].round().astype(int)
    tiles = [_display(v[:, :, k]) for k in zs]
    per_row = max(1, top.shape[1] // (tiles[0].shape[1] + 2))
    rows = []
    for start in range(0, len(tiles), per_row):
        row = np.zeros((tiles[0].shape[0], top.shape[1]), dtype=np.float32) + lo
        for j, t in enumerate(tiles[start : start + per_row]):
            c = j * (t.shape[1] + 2)
            row[:, c : c + t.shape[1]] = t
        rows.append(row)
    gap = np.zeros((2, top.shape[1]), dtype=np.float32) + lo
    canvas = np.concatenate([top, gap] + [r for row in rows for r in (row, gap)][:-1], axis=0)
    img = _to_u8(canvas, lo, hi)
    if zoom > 1:
        img = np.kron(img, np.ones((zoom, zoom), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
