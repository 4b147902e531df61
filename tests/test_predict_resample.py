"""The separable trilinear resampling of axis-aligned placements (Placement.to_model / to_native): the scipy
reference's samples and edges; grid_sample for every other placement."""

from __future__ import annotations

import numpy as np
import pytest

from neuroexplain import volumes
from neuroexplain.template import MNI_2MM
from neuroexplain.volumes import Alignment, Placement, Scan, place


def _scan(shape: tuple[int, int, int], affine: np.ndarray) -> Scan:
    rng = np.random.default_rng(3)
    data = np.asfortranarray(rng.random(shape, dtype=np.float32) * 900 + 50)  # Fortran order, as decoded
    return Scan(data=data, affine=affine, digest="0" * 64, format="nifti1")


def _reference(placement: Placement, data: np.ndarray) -> np.ndarray:
    m = np.linalg.inv(placement.scan_affine) @ np.linalg.inv(placement._scan_to_model_world()) @ placement.grid.affine
    return volumes._affine_resample(data, m, placement.grid.shape, 1)


def _one_mm() -> np.ndarray:
    a = MNI_2MM.affine.copy()
    a[:3, :3] /= 2
    a[:3, 3] -= 0.5
    return a


def _flipped_anisotropic() -> np.ndarray:
    a = np.diag([-1.3, 0.9, 2.5, 1.0])  # LAS-like flip, anisotropic voxels
    a[:3, 3] = [95.0, -120.0, -70.0]
    return a


@pytest.mark.parametrize("make,shape,alignment", [
    (_one_mm, (160, 192, 160), Alignment.MNI),
    (_one_mm, (150, 200, 130), Alignment.MNI),  # samples past the scan's far edges
    (_one_mm, (150, 200, 130), Alignment.CENTER),  # a fractional shift: every fraction, partial coverage
    (lambda: MNI_2MM.affine.copy(), (80, 96, 80), Alignment.MNI),
    (_flipped_anisotropic, (150, 230, 60), Alignment.MNI),
    (_flipped_anisotropic, (150, 230, 60), Alignment.CENTER),
])
def test_axis_aligned_placements_match_the_scipy_reference(make, shape, alignment) -> None:  # type: ignore[no-untyped-def]
    scan = _scan(shape, make())
    placement = place(scan, MNI_2MM, np.zeros(3), alignment)
    out = placement.to_model(scan.data)
    ref = _reference(placement, scan.data)
    value_range = float(scan.data.max() - scan.data.min())
    assert out.shape == tuple(MNI_2MM.shape) and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.abs(out - ref).max() <= 1e-5 * value_range  # the issue allows 1e-4 of the range
    assert np.array_equal(out == 0, ref == 0)  # the same voxels fall outside the scan


def test_rotated_placement_goes_to_grid_sample() -> None:
    angle = np.deg2rad(12)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    scan = _scan((90, 100, 80), rot @ MNI_2MM.affine)
    placement = place(scan, MNI_2MM, np.zeros(3), Alignment.MNI)
    m = np.linalg.inv(placement.scan_affine) @ np.linalg.inv(placement._scan_to_model_world()) @ placement.grid.affine
    assert np.array_equal(placement.to_model(scan.data), volumes.resample_torch(scan.data, m, MNI_2MM.shape).numpy())


@pytest.mark.parametrize("make,shape,alignment", [
    (_one_mm, (150, 200, 130), Alignment.CENTER),
    (_flipped_anisotropic, (150, 230, 60), Alignment.MNI),
])
def test_maps_go_back_onto_axis_aligned_scans_like_the_scipy_reference(make, shape, alignment) -> None:  # type: ignore[no-untyped-def]
    scan = _scan(shape, make())
    placement = place(scan, MNI_2MM, np.zeros(3), alignment)
    model_map = (np.random.default_rng(4).normal(size=MNI_2MM.shape) * 5).astype(np.float32)
    m = np.linalg.inv(placement.grid.affine) @ placement._scan_to_model_world() @ placement.scan_affine
    ref = volumes._affine_resample(model_map, m, shape, 1)
    out = placement.to_native(model_map)
    assert out.shape == shape and out.dtype == np.float32
    assert np.count_nonzero(ref) > 0.05 * ref.size
    assert np.abs(out - ref).max() <= 1e-5 * float(model_map.max() - model_map.min())
    assert np.array_equal(out == 0, ref == 0)
