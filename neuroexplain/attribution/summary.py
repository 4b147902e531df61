"""A JSON summary of a relevance map: totals and the strongest clusters, located in the scan's own world space."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from neuroexplain.volumes import Placement

CLUSTER_THRESHOLD = 0.25  # a cluster is a connected region where positive relevance >= this share of the maximum
TOP_K = 5


def summarise(
    model_map: np.ndarray,
    placement: Placement,
    *,
    method: str,
    target: str,
    top_k: int = TOP_K,
    threshold: float = CLUSTER_THRESHOLD,
) -> dict[str, Any]:
    """Totals of positive, negative and absolute relevance and the ``top_k`` clusters of positive relevance.

    Clusters are found on the model grid (so they do not depend on the scan's resolution): voxels whose relevance is
    at least ``threshold`` times the map's maximum, connected through faces, edges or corners (26-connectivity),
    ranked by their summed relevance. Coordinates are in the scan's own world space (mm), so they can be looked up
    in a viewer on the original scan.

    Args:
        model_map: signed relevance on the model grid, ``grid.shape``.
        placement: where the scan sits on the model grid (maps coordinates back to the scan's world).
        method: method name, copied into the summary.
        target: class explained, copied into the summary.
        top_k: number of clusters reported.
        threshold: cluster threshold as a fraction of the maximum positive relevance.

    Returns:
        A JSON-serialisable dict: ``method``, ``target``, ``totals`` (``positive``, ``negative``, ``absolute``),
        ``cluster_threshold``, ``clusters`` (each: ``rank``, ``peak_mm``, ``centroid_mm``, ``voxels``,
        ``volume_ml``, ``relevance``, ``share_of_positive``, ``peak_value``), ``space`` and ``voxel_volume_ml``.
    """
    m = np.asarray(model_map, dtype=np.float64)
    pos = np.clip(m, 0, None)
    total_pos = float(pos.sum())
    grid = placement.grid
    voxel_ml = float(abs(np.linalg.det(grid.affine[:3, :3]))) / 1000.0
    clusters: list[dict[str, Any]] = []
    peak = float(pos.max()) if pos.size else 0.0
    if peak > 0:
        labels, n = ndimage.label(pos >= threshold * peak, structure=np.ones((3, 3, 3), dtype=bool))
        index = np.arange(1, n + 1)
        sums = np.asarray(ndimage.sum(pos, labels, index))
        sizes = np.asarray(ndimage.sum(np.ones_like(pos), labels, index))
        order = np.argsort(-sums, kind="stable")[:top_k]
        maxima = ndimage.maximum_position(pos, labels, index[order]) if len(order) else []
        centroids = ndimage.center_of_mass(pos, labels, index[order]) if len(order) else []
        for rank, (k, pk, cm) in enumerate(zip(order, maxima, centroids), start=1):
            vox = np.array([pk, cm], dtype=np.float64)  # (2, 3) model voxel indices
            world_model = vox @ grid.affine[:3, :3].T + grid.affine[:3, 3]
            world_scan = placement.world_to_native(world_model)
            clusters.append(
                {
                    "rank": rank,
                    "peak_mm": [round(float(v), 2) for v in world_scan[0]],
                    "centroid_mm": [round(float(v), 2) for v in world_scan[1]],
                    "voxels": int(sizes[k]),
                    "volume_ml": round(float(sizes[k]) * voxel_ml, 4),
                    "relevance": float(sums[k]),
                    "share_of_positive": float(sums[k] / total_pos) if total_pos else 0.0,
                    "peak_value": float(pos[tuple(int(i) for i in pk)]),
                }
            )
    return {
        "method": method,
        "target": target,
        "totals": {"positive": total_pos, "negative": float(np.clip(m, None, 0).sum()), "absolute": float(np.abs(m).sum())},
        "cluster_threshold": threshold,
        "clusters": clusters,
        "space": "scan world (mm), the input scan's own affine",
        "voxel_volume_ml": voxel_ml,
        "cluster_grid": "model grid",
    }
