"""The torch resampler (Placement.to_model / to_native) against the scipy reference (_affine_resample)."""

from __future__ import annotations

import numpy as np
import pytest

from neuroexplain.volumes import Alignment, Grid, Placement, _affine_resample, resample_torch


def _oblique(rng: np.random.Generator, zooms: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """A rotated, anisotropic affine whose centre voxel sits near the grid's centre (world (0, -18, 9) mm)."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a = np.eye(4)
    a[:3, :3] = q @ np.diag(zooms)
    a[:3, 3] = np.array([0.0, -18.0, 9.0]) + rng.normal(size=3) * 3 - a[:3, :3] @ (np.array(shape) / 2)
    return a


def _placement(rng: np.random.Generator, scan_shape: tuple[int, int, int]) -> Placement:
    grid_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    grid_affine[:3, 3] = [-45.0, -63.0, -36.0]
    grid = Grid(shape=(46, 55, 46), affine=grid_affine)
    return Placement(grid=grid, scan_affine=_oblique(rng, (1.2, 1.0, 1.5), scan_shape), scan_shape=scan_shape,
                     shift_mm=rng.normal(size=3) * 3, alignment=Alignment.CENTER)


def _reference(pl: Placement, data: np.ndarray, to_model: bool) -> np.ndarray:
    w = pl._scan_to_model_world()
    if to_model:
        m = np.linalg.inv(pl.scan_affine) @ np.linalg.inv(w) @ pl.grid.affine
        return _affine_resample(data, m, pl.grid.shape, 1)
    m = np.linalg.inv(pl.grid.affine) @ w @ pl.scan_affine
    return _affine_resample(data, m, pl.scan_shape, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_to_model_matches_scipy(seed: int, layout: str) -> None:
    rng = np.random.default_rng(seed)
    scan_shape = (70, 90, 60)
    data = (rng.random(scan_shape) * 1000).astype(np.float32)
    data = np.asfortranarray(data) if layout == "F" else data
    pl = _placement(rng, scan_shape)
    ref, got = _reference(pl, data, True), pl.to_model(data)
    assert got.shape == pl.grid.shape and got.dtype == np.float32
    assert np.count_nonzero(ref) > 0.2 * ref.size  # the test overlaps the two grids substantially
    assert np.abs(got - ref).max() <= 1e-4 * float(data.max() - data.min())


@pytest.mark.parametrize("seed", [0, 3])
def test_to_native_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scan_shape = (70, 90, 60)
    pl = _placement(rng, scan_shape)
    model_map = (rng.normal(size=pl.grid.shape) * 5).astype(np.float32)
    ref, got = _reference(pl, model_map, False), pl.to_native(model_map)
    assert got.shape == scan_shape and got.dtype == np.float32
    assert np.count_nonzero(ref) > 0.05 * ref.size
    assert np.abs(got - ref).max() <= 1e-4 * float(model_map.max() - model_map.min())


def test_identity_and_outside() -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    same = resample_torch(data, np.eye(4), (4, 5, 6)).numpy()  # float32 grid: within rounding of the input
    assert np.abs(same - data).max() <= 1e-4 * float(data.max() - data.min())
    shifted = np.eye(4)
    shifted[0, 3] = 10.0  # every sample lies beyond the input's first axis
    assert not resample_torch(data, shifted, (4, 5, 6)).numpy().any()


def test_nearest_order_stays_on_scipy() -> None:
    rng = np.random.default_rng(5)
    pl = _placement(rng, (30, 30, 30))
    data = (rng.random((30, 30, 30)) > 0.5).astype(np.float32)
    assert np.array_equal(pl.to_model(data, order=0), _reference_order0(pl, data))


def _reference_order0(pl: Placement, data: np.ndarray) -> np.ndarray:
    m = np.linalg.inv(pl.scan_affine) @ np.linalg.inv(pl._scan_to_model_world()) @ pl.grid.affine
    return _affine_resample(data, m, pl.grid.shape, 0)
