"""DICOM input: geometry against dcm2niix, compressed twins against their uncompressed read, every refusal, limits.

Series are written by ``neuroexplain.lab.dicom_synth`` from known volumes; compressed twins are made with dcmtk
(``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``) and, for JPEG 2000 (no dcmtk encoder), with pydicom's openjpeg encoder.
"""

from __future__ import annotations

import io
import logging
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import require_binary
from pydicom.uid import UID, JPEG2000Lossless, generate_uid

from neuroexplain.dicom import (
    DicomLimits,
    DicomScan,
    InconsistentSeriesError,
    NoImageError,
    PixelDataError,
    SeriesNotFoundError,
    SeveralSeriesError,
    TransferSyntaxError,
    collect_instances,
    read_any,
    read_series,
    read_series_dir,
    series_digest,
)
from neuroexplain.errors import (
    InvalidInputError,
    InvalidOptionError,
    LimitExceededError,
    ScanDataError,
    ScanGeometryError,
)
from neuroexplain.lab.dicom_synth import SyntheticSeries, write_sample_series, write_series
from neuroexplain.volumes import ScanLimits, nifti_bytes

PATIENT = "DOE^JANE"
PATIENT_ID = "PID-77123"


def _phantom(
    shape: tuple[int, ...] = (14, 12, 9), seed: int = 0, high: float = 1000.0, noise: float = 0.2
) -> np.ndarray:
    """A smooth blob plus noise: distinct values everywhere, so any axis flip or permutation shows."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[:3]], indexing="ij")
    blob = np.exp(-2.0 * sum((g - 0.2 * i) ** 2 for i, g in enumerate(grid)))
    vol = high * (1 - noise) * blob + rng.uniform(0, high * noise, shape[:3])
    if len(shape) == 4:
        vol = np.stack([vol + 10 * t for t in range(shape[3])], axis=-1)
    return vol.astype(np.float32)


_AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.2, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])


def _write(tmp_path: Path, name: str = "series", **kwargs: Any) -> SyntheticSeries:
    kwargs.setdefault("patient_name", PATIENT)
    kwargs.setdefault("patient_id", PATIENT_ID)
    volume = kwargs.pop("volume", None)
    return write_series(_phantom() if volume is None else volume, _AFFINE, tmp_path / name, **kwargs)  # type: ignore[arg-type]


def _bytes(series: SyntheticSeries) -> list[bytes]:
    return [p.read_bytes() for p in series.paths]


def _canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine))


def _assert_same_world(a_data: np.ndarray, a_aff: np.ndarray, b_data: np.ndarray, b_aff: np.ndarray) -> None:
    a, b = _canonical(a_data, a_aff), _canonical(b_data, b_aff)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=0.01)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def _assert_clean(exc: BaseException, series: SyntheticSeries | None = None) -> None:
    """A refusal names no patient data and no UID."""
    text = str(exc)
    assert PATIENT not in text and PATIENT_ID not in text and "DOE" not in text
    assert "2.25." not in text
    if series is not None:
        assert series.series_uid not in text and series.study_uid not in text


GEOMETRY_CASES = [
    pytest.param({"orientation": "axial"}, id="axial"),
    pytest.param({"orientation": "axial", "reverse_slices": True}, id="axial-descending"),
    pytest.param({"orientation": "sagittal"}, id="sagittal"),
    pytest.param({"orientation": "coronal", "reverse_slices": True}, id="coronal-descending"),
    pytest.param({"orientation": "axial", "oblique_deg": 10.0}, id="oblique10"),
    pytest.param({"orientation": "sagittal", "oblique_deg": 10.0, "reverse_slices": True}, id="sagittal-oblique10"),
    pytest.param({"orientation": "axial", "rescale": (0.5, -100.0)}, id="axial-rescale"),
    pytest.param({"enhanced": True}, id="enhanced-axial"),
    pytest.param({"enhanced": True, "orientation": "coronal", "oblique_deg": 10.0}, id="enhanced-coronal-oblique10"),
    pytest.param({"enhanced": True, "orientation": "sagittal", "reverse_slices": True, "rescale": (2.0, 5.0)},
                 id="enhanced-sagittal-descending-rescale"),
    pytest.param({"modality": "CT"}, id="ct-rescale"),
]


@pytest.mark.parametrize("kwargs", GEOMETRY_CASES)
def test_geometry_equals_dcm2niix_and_source(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    dcm2niix = require_binary("dcm2niix", "the reference for DICOM geometry")
    series = _write(tmp_path, "series", **kwargs)
    scan = read_series(_bytes(series))
    assert isinstance(scan, DicomScan) and scan.format == "dicom"
    # Our read is what was written: the same voxels at the same world positions; slices are ordered along the
    # planes' normal, so a descending series comes back with its slice axis flipped, otherwise in the same order.
    _assert_same_world(scan.data, scan.affine, series.data, series.affine)
    if not kwargs.get("reverse_slices"):
        np.testing.assert_array_equal(scan.data, series.data)
        np.testing.assert_allclose(scan.affine, series.affine, atol=1e-4)
    out = tmp_path / "nii"
    out.mkdir()
    subprocess.run([dcm2niix, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(series.paths[0].parent)],
                   check=True, capture_output=True)
    (ref,) = sorted(out.glob("*.nii"))
    image = nib.Nifti1Image.from_filename(ref)
    _assert_same_world(scan.data, scan.affine, image.get_fdata(dtype=np.float32), image.affine)


def test_geometry_object(tmp_path: Path) -> None:
    series = _write(tmp_path, orientation="axial", oblique_deg=10.0, reverse_slices=True)
    scan = read_series(_bytes(series))
    g = scan.geometry
    assert g.shape == scan.shape == (g.columns, g.rows, g.n_slices)
    frames = g.to_frames(scan.data)
    assert frames.shape == (g.n_slices, g.rows, g.columns)
    np.testing.assert_array_equal(g.to_volume(frames), scan.data)
    # Slices are in order along the normal, and each header is that slice's (pixel data stripped).
    along = g.positions @ g.normal
    assert np.all(np.diff(along) > 0)
    assert len(g.headers) == g.n_slices
    for header, position in zip(g.headers, g.positions, strict=True):
        assert "PixelData" not in header
        np.testing.assert_allclose([float(v) for v in header.ImagePositionPatient], position)
    np.testing.assert_allclose(g.affine_lps[:3, 3], g.positions[0])
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ g.affine_lps, scan.affine)
    with pytest.raises(ScanGeometryError, match="expected"):
        g.to_volume(frames[:-1])


def test_digest_independent_of_order_and_dir_ignores_other_files(tmp_path: Path) -> None:
    series = _write(tmp_path)
    raw = _bytes(series)
    shuffled = raw[::-1]
    random.Random(0).shuffle(shuffled)
    a, b = read_series(raw), read_series(shuffled)
    assert a.digest == b.digest == series_digest(shuffled)
    np.testing.assert_array_equal(a.data, b.data)
    assert series_digest(raw[:-1]) != a.digest
    folder = series.paths[0].parent
    (folder / "README.txt").write_text("not dicom")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"\0" * 300)
    c = read_series_dir(folder)
    assert c.digest == a.digest


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced"])
def test_multi_volume_takes_volume_index(tmp_path: Path, enhanced: bool) -> None:
    series = _write(tmp_path, volume=_phantom((10, 9, 6, 3)), enhanced=enhanced)
    raw = _bytes(series)
    with pytest.raises(ScanGeometryError, match=r"3 volumes .*volume_index \(0 to 2\)"):
        read_series(raw)
    for t in range(3):
        scan = read_series(raw, volume_index=t)
        np.testing.assert_array_equal(scan.data, series.data[..., t])
    with pytest.raises(InvalidOptionError, match="volumes 0 to 2"):
        read_series(raw, volume_index=3)


# ---------------------------------------------------------------------------------------------------------------------
# Compressed twins


def _dcmtk_twin(series: SyntheticSeries, out: Path, tool: str, *args: str) -> list[bytes]:
    binary = require_binary(tool, "dcmtk makes the compressed twins")
    out.mkdir()
    for p in series.paths:
        subprocess.run([binary, *args, str(p), str(out / p.name)], check=True, capture_output=True)
    return [p.read_bytes() for p in sorted(out.iterdir())]


LOSSLESS = [
    pytest.param("dcmcjpeg", (), "1.2.840.10008.1.2.4.70", id="jpeg-lossless-sv1"),
    pytest.param("dcmcjpeg", ("+el",), "1.2.840.10008.1.2.4.57", id="jpeg-lossless"),
    pytest.param("dcmcjpls", (), "1.2.840.10008.1.2.4.80", id="jpeg-ls-lossless"),
    pytest.param("dcmcrle", (), "1.2.840.10008.1.2.5", id="rle"),
]


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced"])
@pytest.mark.parametrize(("tool", "args", "syntax"), LOSSLESS)
def test_lossless_twin_is_bit_exact(tmp_path: Path, tool: str, args: tuple[str, ...], syntax: str,
                                    enhanced: bool) -> None:
    series = _write(tmp_path, enhanced=enhanced, orientation="sagittal", rescale=(0.5, 3.0))
    reference = read_series(_bytes(series))
    twin = _dcmtk_twin(series, tmp_path / "twin", tool, *args)
    assert str(pydicom.dcmread(io.BytesIO(twin[0])).file_meta.TransferSyntaxUID) == syntax
    scan = read_series(twin)
    np.testing.assert_array_equal(scan.data, reference.data)
    np.testing.assert_array_equal(scan.affine, reference.affine)


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced"])
def test_jpeg2000_twin_is_bit_exact(tmp_path: Path, enhanced: bool) -> None:
    # dcmtk has no JPEG 2000 encoder; pydicom's (through pylibjpeg-openjpeg) makes the twin.
    series = _write(tmp_path, enhanced=enhanced, volume=_phantom((40, 36, 4)))  # openjpeg needs >= 32 pixels
    reference = read_series(_bytes(series))
    twin = []
    for p in series.paths:
        ds = pydicom.dcmread(p)
        ds.compress(JPEG2000Lossless)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        twin.append(buf.getvalue())
    scan = read_series(twin)
    np.testing.assert_array_equal(scan.data, reference.data)


def test_jpeg_baseline_twin_within_codec_error(tmp_path: Path) -> None:
    series = _write(tmp_path, volume=_phantom((40, 36, 6), high=250.0, noise=0.02), dtype=np.uint8)
    reference = read_series(_bytes(series))
    twin = _dcmtk_twin(series, tmp_path / "twin", "dcmcjpeg", "+eb", "+q", "95")
    assert str(pydicom.dcmread(io.BytesIO(twin[0])).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.50"
    scan = read_series(twin)
    error = scan.data - reference.data
    assert not np.array_equal(scan.data, reference.data)  # it is lossy...
    psnr = 20 * np.log10(255.0 / np.sqrt(np.mean(error**2)))
    assert psnr > 40.0 and np.abs(error).max() <= 16  # ... within the codec's error at quality 95 (8 bits)


def test_jpeg_extended_12bit_has_no_installed_decoder(tmp_path: Path) -> None:
    series = _write(tmp_path, volume=_phantom(high=4000.0), dtype=np.uint16)
    twin = _dcmtk_twin(series, tmp_path / "twin", "dcmcjpeg", "+ee")
    with pytest.raises(TransferSyntaxError, match="12-bit JPEG Extended .* accepted") as info:
        read_series(twin)
    _assert_clean(info.value, series)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals


def _edit(raw: bytes, change: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(raw))
    change(ds)  # type: ignore[operator]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_several_series_says_how_many_and_how_to_choose(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", uid_seed="a", series_number=1)
    b = _write(tmp_path, "b", uid_seed="b", series_number=2)
    c = _write(tmp_path, "c", uid_seed="c", series_number=3)
    raw = _bytes(a) + _bytes(b) + _bytes(c)
    with pytest.raises(SeveralSeriesError, match=r"found 3 series.*--series UID") as info:
        read_series(raw)
    for s in (a, b, c):
        _assert_clean(info.value, s)
    scan = read_series(raw, series_uid=b.series_uid)
    np.testing.assert_array_equal(scan.data, b.data)
    with pytest.raises(SeriesNotFoundError, match="none of the 3 series") as info2:
        read_series(raw, series_uid="1.2.3.4")
    _assert_clean(info2.value)
    for s in (a, b, c):
        for p in s.paths:
            p.rename(tmp_path / f"{s.series_uid[-6:]}-{p.name}")
    with pytest.raises(SeveralSeriesError, match="found 3 series"):
        read_series_dir(tmp_path)
    chosen = read_series_dir(tmp_path, series_uid=c.series_uid)
    np.testing.assert_array_equal(chosen.data, c.data)
    assert chosen.digest == series_digest(raw)  # the bytes as received; series_uid is a reading option beside it


def test_missing_slice_is_uneven_spacing(tmp_path: Path) -> None:
    series = _write(tmp_path)
    raw = _bytes(series)
    del raw[4]
    with pytest.raises(InconsistentSeriesError, match=r"uneven slice spacing: gaps from 2 to 4 mm.*missing slice") as info:
        read_series(raw)
    _assert_clean(info.value, series)


def test_duplicate_slice(tmp_path: Path) -> None:
    series = _write(tmp_path)
    raw = _bytes(series)
    raw.append(_edit(raw[3], lambda ds: setattr(ds, "SOPInstanceUID", generate_uid())))
    with pytest.raises(InconsistentSeriesError, match="duplicate or missing slices.*between 1 and 2") as info:
        read_series(raw)
    _assert_clean(info.value, series)


def test_mixed_orientation(tmp_path: Path) -> None:
    series = _write(tmp_path)
    raw = _bytes(series)
    raw[2] = _edit(raw[2], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9950042, -0.0998334]))
    with pytest.raises(InconsistentSeriesError, match="mixes image orientations") as info:
        read_series(raw)
    _assert_clean(info.value, series)


def test_mixed_size(tmp_path: Path) -> None:
    big = _write(tmp_path, "big")
    small = _write(tmp_path, "small", volume=_phantom((8, 8, 9)))
    raw = _bytes(big)
    raw[0] = _edit(_bytes(small)[0], lambda ds: setattr(ds, "SeriesInstanceUID", big.series_uid))
    with pytest.raises(InconsistentSeriesError, match=r"mixes 2 image sizes \(rows x columns: 8x8, 12x14\)") as info:
        read_series(raw)
    _assert_clean(info.value, big)


def test_mixed_spacing(tmp_path: Path) -> None:
    series = _write(tmp_path)
    raw = _bytes(series)
    raw[5] = _edit(raw[5], lambda ds: setattr(ds, "PixelSpacing", [1.0, 1.0]))
    with pytest.raises(InconsistentSeriesError, match="mixes pixel spacings"):
        read_series(raw)


def test_gantry_tilt(tmp_path: Path) -> None:
    sheared = _AFFINE.copy()
    sheared[1, 2] = 0.35  # each slice shifted 0.35 mm along y: stacked ~10 degrees off the normal
    series = write_series(_phantom(), sheared, tmp_path / "tilt", orientation=None, patient_name=PATIENT)
    with pytest.raises(InconsistentSeriesError, match=r"stacked 9.9\d degrees off .*at most 0.1 degrees") as info:
        read_series(_bytes(series))
    _assert_clean(info.value, series)


def test_no_image_objects(tmp_path: Path) -> None:
    series = _write(tmp_path)
    def to_report(ds: pydicom.Dataset) -> None:
        del ds.PixelData
        ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.34")  # Comprehensive 3D SR: no pixels

    report = _edit(_bytes(series)[0], to_report)
    with pytest.raises(NoImageError, match=r"no MR or CT image among 2 instance\(s\) \(1 not DICOM Part 10, 1 DICOM"):
        read_series([b"hello, not DICOM" * 20, report])
    with pytest.raises(NoImageError):
        read_series([])


def test_truncated_pixel_data(tmp_path: Path) -> None:
    series = _write(tmp_path)
    raw = _bytes(series)
    raw[1] = _edit(raw[1], lambda ds: setattr(ds, "PixelData", ds.PixelData[:50]))
    with pytest.raises(PixelDataError, match="pixel data is truncated: 50 bytes where the header declares 336"):
        read_series(raw)


def test_broken_codestream(tmp_path: Path) -> None:
    series = _write(tmp_path)
    twin = _dcmtk_twin(series, tmp_path / "twin", "dcmcjpls")

    def corrupt(ds: pydicom.Dataset) -> None:
        frames = [bytes(f) for f in pydicom.encaps.generate_frames(ds.PixelData)]
        ds.PixelData = pydicom.encaps.encapsulate([frames[0][:20] + b"\xff\x00" * 8])

    twin[3] = _edit(twin[3], corrupt)
    with pytest.raises(PixelDataError, match="could not be decoded") as info:
        read_series(twin)
    _assert_clean(info.value, series)


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    series = _write(tmp_path)
    raw = _bytes(series)

    def mpeg(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video: nobody decodes it here
        ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])

    raw[0] = _edit(raw[0], mpeg)
    with pytest.raises(TransferSyntaxError, match="MPEG2.* has no installed decoder; accepted: uncompressed"):
        read_series(raw)


def test_deflated_refused_without_inflating(tmp_path: Path) -> None:
    series = _write(tmp_path)
    ds = pydicom.dcmread(series.paths[0])
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1.99")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(TransferSyntaxError, match="Deflated .* not accepted"):
        read_series([buf.getvalue()])


def test_all_zero_series(tmp_path: Path) -> None:
    series = _write(tmp_path, volume=np.zeros((6, 6, 4), dtype=np.float32))
    with pytest.raises(ScanDataError, match="all zeros"):
        read_series(_bytes(series))


def test_single_slice_is_not_a_volume(tmp_path: Path) -> None:
    series = _write(tmp_path)
    with pytest.raises(ScanGeometryError, match="1 slice position"):
        read_series(_bytes(series)[:1])


def test_every_refusal_is_invalid_argument() -> None:
    for cls in (NoImageError, SeveralSeriesError, SeriesNotFoundError, InconsistentSeriesError, PixelDataError,
                TransferSyntaxError):
        assert issubclass(cls, InvalidInputError) and cls.code == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------------------------------------------------------
# Limits before pixels


def test_limits_on_counts_and_bytes(tmp_path: Path) -> None:
    series = _write(tmp_path)
    raw = _bytes(series)
    with pytest.raises(LimitExceededError, match="9 instances; the limit is 8"):
        read_series(raw, dicom_limits=DicomLimits(max_instances=8))
    with pytest.raises(LimitExceededError, match="bytes per instance"):
        read_series(raw, dicom_limits=DicomLimits(max_instance_bytes=1000))
    with pytest.raises(LimitExceededError, match="bytes in total"):
        read_series(raw, limits=ScanLimits(max_input_bytes=sum(map(len, raw)) - 1))
    with pytest.raises(LimitExceededError, match=r"1512 voxels \(14, 12, 9\); the limit is 1000"):
        read_series(raw, limits=ScanLimits(max_voxels=1000))
    with pytest.raises(LimitExceededError, match="would decode to"):
        read_series(raw, limits=ScanLimits(max_decompressed_bytes=5000))
    with pytest.raises(LimitExceededError, match="more than 5 frames"):
        read_series(raw, dicom_limits=DicomLimits(max_frames=5))
    with pytest.raises(LimitExceededError, match="bytes per instance"):
        read_series_dir(series.paths[0].parent, dicom_limits=DicomLimits(max_instance_bytes=1000))


def test_huge_declared_image_refused_before_allocating(tmp_path: Path) -> None:
    series = _write(tmp_path)

    def huge(ds: pydicom.Dataset) -> None:
        ds.Rows = 65535
        ds.Columns = 65535
        ds.NumberOfFrames = 1000  # 8 TB declared, a few hundred bytes sent

    raw = [_edit(r, huge) for r in _bytes(series)]
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError, match="65535x65535 pixels; the limit is"):
            read_series(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * (1 << 20)


def test_pydicom_logs_carry_no_patient_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    series = _write(tmp_path)
    pydicom.config.debug(True, default_handler=False)  # pydicom now logs every element it reads, values included
    try:
        with caplog.at_level(logging.DEBUG):
            read_series(_bytes(series))
            logging.getLogger("pydicom").warning("value %s is odd", PATIENT)
            logging.getLogger("pydicom.pixels.decoders.base").error("failed on %s", PATIENT_ID)
    finally:
        pydicom.config.debug(False, default_handler=False)
    assert PATIENT not in caplog.text and PATIENT_ID not in caplog.text and series.series_uid not in caplog.text
    assert "record withheld" in caplog.text  # the records still say that something happened


def test_read_any_dispatches_on_the_input(tmp_path: Path) -> None:
    single = _write(tmp_path, "single")
    enhanced = _write(tmp_path, "enhanced", enhanced=True)
    folder = single.paths[0].parent
    np.testing.assert_array_equal(read_any(folder).data, single.data)
    np.testing.assert_array_equal(read_any(str(folder)).data, single.data)
    np.testing.assert_array_equal(read_any(_bytes(single)).data, single.data)
    one_file = read_any(enhanced.paths[0].read_bytes())  # one Enhanced MR instance sent as plain scan bytes
    assert isinstance(one_file, DicomScan)
    np.testing.assert_array_equal(one_file.data, enhanced.data)
    nifti = tmp_path / "scan.nii.gz"
    nifti.write_bytes(nifti_bytes(single.data, single.affine))
    scan = read_any(nifti)
    assert scan.format == "nifti1" and not isinstance(scan, DicomScan)
    np.testing.assert_allclose(scan.data, single.data)
    with pytest.raises(InvalidOptionError, match="DICOM input only"):
        read_any(nifti, series_uid=single.series_uid)


def test_sample_series_keeps_intensities(tmp_path: Path) -> None:
    image = _phantom(high=3.7, noise=0.1)  # float intensities on an arbitrary scale, as lab.synthetic makes them
    series = write_sample_series(image, _AFFINE, tmp_path / "s", seed=5, orientation=None)  # voxel order kept
    scan = read_series(_bytes(series))
    assert np.max(np.abs(scan.data - image)) <= 0.5 * 3.7 / 30000 * 1.001
    again = write_sample_series(image, _AFFINE, tmp_path / "t", seed=5, orientation=None)
    other = write_sample_series(image, _AFFINE, tmp_path / "u", seed=6, orientation=None)
    assert again.series_uid == series.series_uid != other.series_uid  # deterministic per seed


def test_prediction_equals_that_of_the_source_nifti(tmp_path: Path) -> None:
    from neuroexplain.lab.synthetic import Task, make_sample
    from neuroexplain.models import load_model
    from neuroexplain.predict import predict
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import Alignment, read_scan

    sample = make_sample(Task.LESION, 1_000_003, positive=True)
    model = load_model("lesion")
    source = read_scan(nifti_bytes(sample.image, MNI_2MM.affine))
    series = write_sample_series(sample.image, MNI_2MM.affine, tmp_path / "s", seed=3, orientation="sagittal",
                                 oblique_deg=0.0, reverse_slices=True)
    scan = read_series(_bytes(series))
    _assert_same_world(scan.data, scan.affine, series.data, series.affine)
    # MNI alignment: the series is in MNI world like its source; registration's own tolerance is not tested here.
    a, b = predict(model, [source, scan], alignment=Alignment.MNI)
    assert a.predicted_class == b.predicted_class
    for name, p in a.probabilities.items():
        assert abs(b.probabilities[name] - p) < 1e-3
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-2)


def test_collecting_a_folder_needs_neither_numpy_nor_pydicom(tmp_path: Path) -> None:
    series = _write(tmp_path)
    (series.paths[0].parent / "notes.txt").write_text("x" * 500)
    code = (
        "import sys; sys.modules['numpy'] = None; sys.modules['pydicom'] = None\n"
        "from neuroexplain.dicom.files import collect_instances\n"
        f"print(len(collect_instances({str(series.paths[0].parent)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == str(len(series.paths))
    with pytest.raises(LimitExceededError, match="more than 3 DICOM files"):
        collect_instances(series.paths[0].parent, max_instances=3)


def test_series_digest_is_the_gateways(tmp_path: Path) -> None:
    # One digest for a series everywhere: the gateway's scan store and cache compute it before decoding.
    import hashlib

    raw = _bytes(_write(tmp_path))
    parts = sorted(hashlib.sha256(r).digest() for r in raw)
    assert series_digest(raw) == hashlib.sha256(b"nx-dicom-series\0" + b"".join(parts)).hexdigest()
    assert read_series(raw).digest == series_digest(raw[::-1])


@pytest.mark.parametrize("tool", ["dcmcjpls", "dcmcjpeg"])
def test_codestream_declaring_a_huge_image_is_refused_before_decoding(tmp_path: Path, tool: str) -> None:
    series = _write(tmp_path)
    twin = _dcmtk_twin(series, tmp_path / "twin", tool)

    def inflate_header(ds: pydicom.Dataset) -> None:
        (frame,) = [bytes(f) for f in pydicom.encaps.generate_frames(ds.PixelData)]
        sof = max(frame.find(b"\xff\xf7"), frame.find(b"\xff\xc3"))  # JPEG-LS SOF55 / lossless SOF3
        assert sof > 0
        frame = frame[: sof + 5] + b"\xff\xff\xff\xff" + frame[sof + 9 :]  # 65535 x 65535
        ds.PixelData = pydicom.encaps.encapsulate([frame])

    twin[4] = _edit(twin[4], inflate_header)
    tracemalloc.start()
    try:
        with pytest.raises(PixelDataError, match="declares 65535x65535 pixels in its codestream, but the header says 12x14"):
            read_series(twin)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * (1 << 20)


def test_rle_frame_larger_than_any_image_is_refused(tmp_path: Path) -> None:
    series = _write(tmp_path)
    twin = _dcmtk_twin(series, tmp_path / "twin", "dcmcrle")

    def pad(ds: pydicom.Dataset) -> None:
        (frame,) = [bytes(f) for f in pydicom.encaps.generate_frames(ds.PixelData)]
        ds.PixelData = pydicom.encaps.encapsulate([frame + b"\x81\x00" * 4000])  # runs that would decode to 512 kB

    twin[2] = _edit(twin[2], pad)
    with pytest.raises(PixelDataError, match=r"an RLE frame has \d+ bytes, more than any 12x14 image needs"):
        read_series(twin)
