"""PNG overlays: the relevance map over the scan in orthogonal slices (nilearn's ``plot_stat_map``)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def overlay_png(
    native_map: np.ndarray,
    scan_data: np.ndarray,
    affine: np.ndarray,
    *,
    title: str,
    cut_mm: Sequence[float] | None = None,
) -> bytes:
    """Orthogonal slices of the signed map over the scan, both on the scan's own grid; PNG bytes.

    Args:
        native_map: relevance on the scan's grid.
        scan_data: the scan's intensities (background).
        affine: the scan's affine (shared by both).
        title: figure title; must not carry patient data (method and class names only).
        cut_mm: slice position in the scan's world space (e.g. the top cluster's peak); default: nilearn's choice.
    """
    import nibabel as nib
    from matplotlib.figure import Figure
    from nilearn import plotting

    stat = nib.Nifti1Image(np.asarray(native_map, dtype=np.float32), affine)
    bg = nib.Nifti1Image(np.asarray(scan_data, dtype=np.float32), affine)
    vmax = float(np.percentile(np.abs(native_map[native_map != 0]), 99.5)) if np.any(native_map) else 1.0
    # A bare Figure renders with the Agg canvas and never touches pyplot's global state or backend.
    fig = Figure(figsize=(9, 3.4), facecolor="black")
    plotting.plot_stat_map(
        stat, bg_img=bg, display_mode="ortho", cut_coords=list(cut_mm) if cut_mm is not None else None,
        threshold=0.1 * vmax if vmax > 0 else None, vmax=vmax or None, title=title, figure=fig,
        colorbar=True, black_bg=True, draw_cross=True, annotate=True, symmetric_cbar=True,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, facecolor="black")
    return buf.getvalue()
