"""The torch resampler (Placement.to_model / to_native) against the scipy reference (_affine_resample)."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroexplain import volumes
from neuroexplain.errors import ScanGeometryError
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


def _nifti_gz(data: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes())


@pytest.mark.parametrize("piece", [4096, 100_000, 131_072])
def test_the_resampling_done_while_decoding_is_the_one_after_it(monkeypatch: pytest.MonkeyPatch, piece: int) -> None:
    # read_scan(onto=grid) resamples slab by slab as the pieces are converted; what prepare then uses must be what
    # resampling the decoded volume gives, bit for bit: 1 mm onto 2 mm (strided), 1.3 mm with x flipped and a
    # half-voxel offset (gathered), samples outside the scan at both ends, and a 4D file's second volume.
    monkeypatch.setattr(volumes, "_PIECE", piece)
    grid = Grid(shape=(46, 55, 46), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    grid.affine[:3, 3] = [-45.0, -63.0, -36.0]
    rng = np.random.default_rng(4)
    one_mm = np.diag([1.0, 1.0, 1.0, 1.0])
    one_mm[:3, 3] = [-40.0, -60.0, -30.0]
    flipped = np.diag([-1.3, 1.3, 1.3, 1.0])
    flipped[:3, 3] = [42.0, -65.5, -40.65]
    cases = {"1 mm": (rng.random((80, 100, 70)).astype(np.float32), one_mm),
             "1.3 mm, x flipped": ((rng.random((66, 80, 60)) * 300).astype(np.int16), flipped),
             "4D, volume 1": (rng.random((40, 50, 36, 2)).astype(np.float32), one_mm)}
    for name, (data, affine) in cases.items():
        index = 1 if data.ndim == 4 else None
        scan = volumes.read_scan(_nifti_gz(data, affine), volume_index=index, onto=grid)
        assert scan.resampled is not None, name
        placement = volumes.place(scan, grid, np.zeros(3), Alignment.MNI)
        after = placement.to_model(scan.data)
        np.testing.assert_array_equal(placement.scan_to_model(scan), after, err_msg=name)
        assert np.count_nonzero(after) not in (0, after.size), name  # some samples fall inside, some outside
        assert not placement.scan_to_model(scan).flags.writeable


def test_nothing_is_resampled_while_decoding_where_it_would_not_be_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # A file of two pieces or fewer (nothing to overlap), a rotation or a Z axis that runs backwards (resampled after
    # the decode as before), an uncompressed file (no inflate to overlap), zeroed non-finite voxels (another volume
    # than the one resampled), and a placement that is not the header's (center) all resample after the decode, with
    # the same result as without ``onto``.
    grid = Grid(shape=(20, 24, 20), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    rng = np.random.default_rng(5)
    data = (rng.random((30, 36, 30)) + 0.5).astype(np.float32)
    assert volumes.read_scan(_nifti_gz(data, np.eye(4)), onto=grid).resampled is None  # 130 KB: one 2 MiB piece
    monkeypatch.setattr(volumes, "_PIECE", 4096)  # the same volume in many pieces
    rotated = np.eye(4)
    rotated[:3, :3] = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    backwards = np.diag([1.0, 1.0, -1.0, 1.0])
    backwards[2, 3] = 29.0
    with_nan = data.copy()
    with_nan[3, 4, 5] = np.nan
    for name, raw, nonfinite in (("rotated", _nifti_gz(data, rotated), volumes.NonFinite.REJECT),
                                 ("z backwards", _nifti_gz(data, backwards), volumes.NonFinite.REJECT),
                                 ("uncompressed", nib.Nifti1Image(data, np.eye(4)).to_bytes(),
                                  volumes.NonFinite.REJECT),
                                 ("NaN zeroed", _nifti_gz(with_nan, np.eye(4)), volumes.NonFinite.ZERO)):
        scan = volumes.read_scan(raw, onto=grid, nonfinite=nonfinite)
        assert scan.resampled is None, name
    for row_y in ((0.0, 0.0, 0.0, -20.0), (0.0, 1e-38, 0.0, 0.0), (0.0, 3e38, 0.0, 0.0)):  # refused, as without onto
        image = nib.Nifti1Image(data, np.eye(4))
        image.header.set_qform(None, code=0)
        image.header.set_sform(np.eye(4), code=1)
        raw = bytearray(image.to_bytes())
        struct.pack_into("<4f", raw, 296, *row_y)  # the sform's y row (nibabel would not write these)
        with pytest.raises(ScanGeometryError) as without:
            volumes.read_scan(gzip.compress(raw))
        with pytest.raises(ScanGeometryError) as with_onto:
            volumes.read_scan(gzip.compress(raw), onto=grid)
        assert str(with_onto.value) == str(without.value)
    scan = volumes.read_scan(_nifti_gz(data, np.eye(4)), onto=grid)
    assert scan.resampled is not None
    centred = volumes.place(scan, grid, np.array([10.0, 12.0, 9.0]), Alignment.CENTER)
    np.testing.assert_array_equal(centred.scan_to_model(scan), centred.to_model(scan.data))
    assert centred.scan_to_model(scan).flags.writeable  # computed now, not the one resampled ahead


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 60_000), kind=st.sampled_from(["uniform", "ties", "descending", "float64", "constant"]),
       seed=st.integers(0, 2**32 - 1))
def test_the_99th_percentile_is_numpys_bit_for_bit(n: int, kind: str, seed: int) -> None:
    # normalise's p99 comes from a partition of the values above a sampled threshold, not of all of them; it must be
    # np.percentile's exact float, whatever the size, ties or order (and fall back to numpy where the sample misses).
    rng = np.random.default_rng(seed)
    x = {"uniform": lambda: rng.random(n).astype(np.float32),
         "ties": lambda: rng.integers(1, 20, n).astype(np.float32),
         "descending": lambda: np.sort(rng.random(n)).astype(np.float32)[::-1].copy(),
         "float64": lambda: rng.exponential(1.0, n),
         "constant": lambda: np.full(n, 3.0, dtype=np.float32)}[kind]()
    assert volumes.percentile_99(x) == float(np.percentile(x, 99))


def test_normalise_divides_by_the_99th_percentile_of_the_positive_voxels() -> None:
    rng = np.random.default_rng(6)
    data = (rng.random((40, 48, 40)) * 900 - 100).astype(np.float32)
    positive = data[data > 0]
    expected = (np.clip(data, 0, None) / float(np.percentile(positive, 99))).astype(np.float32)
    np.testing.assert_array_equal(volumes.normalise(data), expected)
    assert volumes.normalise(data.astype(np.float64)).dtype == np.float32


@pytest.mark.parametrize("failing", ["advance", "finish"])
def test_a_failure_of_the_resampling_while_decoding_leaves_the_read_and_prepare_as_without_it(
    monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # The resampling during the decode is only a head start: if it failed, the scan must still be read, and prepare
    # must resample it after the decode, giving what it gives without ``onto``.
    grid = Grid(shape=(20, 24, 20), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    data = (np.random.default_rng(7).random((30, 36, 30)) + 0.5).astype(np.float32)
    raw = _nifti_gz(data, np.eye(4))

    def broken(*_args: object) -> None:
        raise RuntimeError("a bug in the slab resampler")

    monkeypatch.setattr(volumes, "_SLAB_PLANES", 1)
    monkeypatch.setattr(volumes, "_PIECE", 4096)
    monkeypatch.setattr(volumes._SlabResampler, failing, broken)
    scan = volumes.read_scan(raw, onto=grid)
    assert scan.resampled is None
    np.testing.assert_array_equal(scan.data, volumes.read_scan(raw).data)
    placement = volumes.place(scan, grid, np.zeros(3), Alignment.MNI)
    np.testing.assert_array_equal(placement.scan_to_model(scan), placement.to_model(scan.data))
