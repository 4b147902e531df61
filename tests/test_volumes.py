"""Scan I/O: every validation path gives its typed error; geometry round-trips within one voxel."""

from __future__ import annotations

import gzip
import io
import struct
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuroexplain import volumes
from neuroexplain.errors import (
    InvalidOptionError,
    LimitExceededError,
    ScanDataError,
    ScanFormatError,
    ScanGeometryError,
)
from neuroexplain.template import MNI_2MM
from neuroexplain.volumes import Alignment, NonFinite, Placement, ScanLimits, nifti_bytes, place, read_scan

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _nifti(data: np.ndarray, affine: np.ndarray | None = None, cls: type = nib.Nifti1Image, **hdr: object) -> bytes:
    image = cls(data, np.eye(4) if affine is None else affine)
    for key, value in hdr.items():
        image.header[key] = value
    return image.to_bytes()


def _brain_like(shape: tuple[int, int, int] = (20, 22, 18)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 100 + 1).astype(np.float32)


# --- formats ------------------------------------------------------------------------------------------------------


def test_reads_nifti1_nifti2_gzip_and_mgh_alike() -> None:
    data = _brain_like()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    raws = {
        "nifti1": _nifti(data, affine),
        "nifti2": _nifti(data, affine, nib.Nifti2Image),
        "nifti1.gz": gzip.compress(_nifti(data, affine)),
        "mgh": nib.MGHImage(data, affine).to_bytes(),
        "mgz": gzip.compress(nib.MGHImage(data, affine).to_bytes()),
    }
    for name, raw in raws.items():
        scan = read_scan(raw)
        np.testing.assert_allclose(scan.data, data, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(scan.affine, affine, err_msg=name)
        assert scan.format == name.split(".")[0].replace("mgz", "mgh")
        assert len(scan.digest) == 64


def test_reads_from_path_and_applies_scaling(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) + 1
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(2.0, 10.0)
    path = tmp_path / "scaled.nii"
    nib.save(image, path)
    scan = read_scan(path)
    np.testing.assert_allclose(scan.data, data * 2.0 + 10.0)


@pytest.mark.parametrize("piece, piece_in", [(7, 5), (1000, 333), (2 << 20, 1 << 20)])
def test_pieces_of_any_size_decode_every_voxel_type_as_nibabel_does(
    monkeypatch: pytest.MonkeyPatch, piece: int, piece_in: int
) -> None:
    # The reader converts the stream piece by piece; a voxel split across two pieces, a big-endian file, scaling and
    # the second volume of a 4D series must come out exactly as nibabel reads the whole file.
    monkeypatch.setattr(volumes, "_PIECE", piece)
    monkeypatch.setattr(volumes, "_PIECE_IN", piece_in)
    rng = np.random.default_rng(1)
    cases: dict[str, nib.Nifti1Image] = {}
    for dtype in ("uint8", "int16", ">i4", "float32", ">f8"):
        cases[dtype] = nib.Nifti1Image((rng.random((9, 11, 7)) * 120 + 1).astype(dtype), np.eye(4))
    scaled = nib.Nifti1Image((rng.random((9, 11, 7)) * 1000).astype(np.int16), np.eye(4))
    scaled.header.set_slope_inter(0.5, -3.0)
    cases["scaled int16"] = scaled
    cases["4D, volume 1"] = nib.Nifti1Image((rng.random((6, 5, 4, 3)) * 50 + 1).astype(np.float32), np.eye(4))
    for name, image in cases.items():
        raw = image.to_bytes()
        expected = nib.Nifti1Image.from_bytes(raw).get_fdata()
        index = 1 if expected.ndim == 4 else None
        if index is not None:
            expected = expected[..., index]
        for label, blob in (("plain", raw), ("gzip", gzip.compress(raw))):
            scan = read_scan(blob, volume_index=index)
            assert scan.data.dtype == np.float32, (name, label)
            np.testing.assert_allclose(scan.data, expected, rtol=1e-6, err_msg=f"{name}, {label}")


def test_a_gzip_file_of_several_members_reads_as_python_gzip_reads_it() -> None:
    # Concatenated members and BGZF-style 64 KiB blocks are valid gzip files (RFC 1952): read them whole. Bytes after
    # the last member are ignored; a member cut short is truncation; a stream of endless empty members is refused.
    data = _brain_like((40, 44, 36))
    raw = _nifti(data)
    blocks = b"".join(gzip.compress(raw[i : i + 65536]) for i in range(0, len(raw), 65536))
    assert gzip.decompress(blocks) == raw
    for name, blob in (("two members", gzip.compress(raw[:5000]) + gzip.compress(raw[5000:])),
                       ("64 KiB blocks", blocks), ("trailing bytes", gzip.compress(raw) + b"\x00" * 100)):
        np.testing.assert_array_equal(read_scan(blob).data, data, err_msg=name)
    with pytest.raises(ScanFormatError, match="truncated"):
        read_scan(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:])[:-300])
    bgzf = blocks + gzip.compress(b"", mtime=0)  # bgzip ends a file with an empty block
    np.testing.assert_array_equal(read_scan(bgzf).data, data)
    with pytest.raises(LimitExceededError, match="members"):
        read_scan(gzip.compress(raw[:400]) + gzip.compress(b"", mtime=0) * 100_000)


def test_nibabel_real_images_read_or_fail_clearly() -> None:
    anatomical = read_scan(NIBABEL_DATA / "anatomical.nii")
    assert anatomical.data.ndim == 3
    nifti2 = read_scan(NIBABEL_DATA / "example_nifti2.nii.gz", volume_index=0)
    assert nifti2.format == "nifti2"
    with pytest.raises(ScanGeometryError, match=r"4 dimensions .*set volume_index \(0 to 1\)"):
        read_scan(NIBABEL_DATA / "example4d.nii.gz")
    assert read_scan(NIBABEL_DATA / "example4d.nii.gz", volume_index=1).data.shape == (128, 96, 24)
    with pytest.raises(InvalidOptionError, match="out of range"):
        read_scan(NIBABEL_DATA / "example4d.nii.gz", volume_index=2)
    mgz = read_scan(Path(nib.__file__).parents[1] / "nilearn" / "datasets" / "data" / "test.mgz", volume_index=1)
    assert mgz.format == "mgh"


# --- validation paths -----------------------------------------------------------------------------------------------


def test_wrong_magic() -> None:
    with pytest.raises(ScanFormatError, match="unrecognised file format"):
        read_scan(b"P5\n64 64\n255\n" + bytes(5000))


def test_truncated_gzip() -> None:
    raw = gzip.compress(_nifti(_brain_like()))
    with pytest.raises(ScanFormatError, match="truncated"):
        read_scan(raw[: len(raw) // 2])


def test_the_conversion_thread_ends_with_every_read_and_passes_its_errors_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # A gzip file's pieces are converted on a thread of their own while the next ones inflate. Whatever happens —
    # a stream cut short, a bomb, an error inside the conversion while its queue is full — the read returns or
    # raises, and no conversion thread is left behind.
    monkeypatch.setattr(volumes, "_PIECE", 1000)  # many pieces: the queue fills
    raw = gzip.compress(_nifti(_brain_like((40, 44, 36))))

    def converting() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "scan-convert"]

    with pytest.raises(ScanFormatError, match="truncated"):
        read_scan(raw[: len(raw) // 2])
    with pytest.raises(LimitExceededError, match="decompresses to more than"):
        read_scan(gzip.compress(_nifti(_brain_like((40, 44, 36))) + bytes(50_000)))
    calls = []

    def failing(self: object, chunk: memoryview) -> None:
        calls.append(len(chunk))
        if len(calls) == 2:
            raise MemoryError
    monkeypatch.setattr(volumes._Voxels, "feed", failing)
    with pytest.raises(MemoryError):
        read_scan(raw)
    assert len(calls) == 2  # nothing was converted after the error; the rest was drained
    assert converting() == []


def test_truncated_uncompressed_data() -> None:
    raw = _nifti(_brain_like())
    with pytest.raises(ScanFormatError, match="truncated"):
        read_scan(raw[:-100])


def test_two_dimensional_rejected() -> None:
    with pytest.raises(ScanGeometryError, match="2 dimensions"):
        read_scan(_nifti(np.ones((16, 16), dtype=np.float32)))
    with pytest.raises(ScanGeometryError, match="at least 2 voxels"):
        read_scan(_nifti(np.ones((16, 16, 1), dtype=np.float32)))


def test_five_dimensional_rejected() -> None:
    with pytest.raises(ScanGeometryError, match="5 dimensions"):
        read_scan(_nifti(np.ones((4, 4, 4, 2, 3), dtype=np.float32)))


def test_absurd_header_dimensions_rejected_before_allocation() -> None:
    raw = bytearray(_nifti(_brain_like((4, 4, 4))))
    struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[] of a NIfTI-1 header
    with pytest.raises(LimitExceededError, match=r"27000000000000 voxels .* limit is"):
        read_scan(bytes(raw))


def test_voxel_cap_is_configurable() -> None:
    with pytest.raises(LimitExceededError, match="limit is 100 voxels"):
        read_scan(_nifti(_brain_like((5, 5, 5))), limits=ScanLimits(max_voxels=100))


def test_input_bytes_cap() -> None:
    with pytest.raises(LimitExceededError, match="limit is 1000 bytes"):
        read_scan(_nifti(_brain_like()), limits=ScanLimits(max_input_bytes=1000))


def test_gzip_bomb_stops_at_declared_size() -> None:
    # A tiny valid header that declares 8 voxels, followed by 200 MB of zeros: decompression must stop early.
    header = _nifti(np.ones((2, 2, 2), dtype=np.uint8))
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=9) as gz:
        gz.write(header)
        chunk = bytes(1 << 20)
        for _ in range(200):
            gz.write(chunk)
    bomb = stream.getvalue()
    assert len(bomb) < 1 << 20
    with pytest.raises(LimitExceededError, match="decompression bomb"):
        read_scan(bomb)


def test_nan_rejected_or_zeroed() -> None:
    data = _brain_like()
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(ScanDataError, match="2 NaN or infinite voxels"):
        read_scan(_nifti(data))
    scan = read_scan(_nifti(data), nonfinite=NonFinite.ZERO)
    assert scan.data[3, 4, 5] == 0 and np.isfinite(scan.data).all()


def test_integer_voxels_that_overflow_float32_after_scaling_are_still_caught() -> None:
    # The finiteness check reads the extremes the reader took piece by piece: scaling can overflow integers too.
    data = np.full((4, 4, 4), 30000, dtype=np.int16)
    raw = bytearray(_nifti(data))
    struct.pack_into("<f", raw, 112, 3e35)  # scl_slope: 30000 * 3e35 overflows float32
    with pytest.raises(ScanDataError, match="64 NaN or infinite voxels"):
        read_scan(bytes(raw))
    struct.pack_into("<f", raw, 112, 2.0)
    assert read_scan(bytes(raw)).data.max() == 60000.0


def test_all_zero_rejected() -> None:
    with pytest.raises(ScanDataError, match="all zeros"):
        read_scan(_nifti(np.zeros((4, 4, 4), dtype=np.float32)))


def test_singular_affine_rejected() -> None:
    # nibabel refuses to build such an image, so overwrite the header's sform row y (offset 296) in the bytes.
    image = nib.Nifti1Image(_brain_like(), np.eye(4))
    image.header.set_qform(None, code=0)
    image.header.set_sform(np.eye(4), code=1)
    raw = bytearray(image.to_bytes())
    struct.pack_into("<4f", raw, 296, 0.0, 0.0, 0.0, -20.0)
    with pytest.raises(ScanGeometryError, match="singular"):
        read_scan(bytes(raw))


def test_unsupported_dtype_rejected() -> None:
    with pytest.raises(ScanFormatError, match="not supported"):
        read_scan(_nifti(np.ones((4, 4, 4), dtype=np.complex64)))


def test_analyze_pair_header_rejected() -> None:
    with pytest.raises(ScanFormatError, match="pairs"):
        read_scan((NIBABEL_DATA / "nifti1.hdr").read_bytes() + bytes(4096))


def test_error_messages_never_echo_header_text() -> None:
    data = _brain_like()
    data[0, 0, 0] = np.nan
    raw = _nifti(data, descrip=b"Jane Doe 1970-01-01")
    with pytest.raises(ScanDataError) as info:
        read_scan(raw)
    assert "Jane" not in str(info.value)


def test_output_header_carries_geometry_only() -> None:
    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
    out = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_bytes(np.ones((3, 3, 3)), affine)))
    np.testing.assert_allclose(out.affine, affine)
    assert out.header["descrip"].tobytes().strip(b"\x00") == b""
    assert len(out.header.extensions) == 0


# --- geometry round trips -----------------------------------------------------------------------------------------


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(linear: np.ndarray, shape: tuple[int, int, int], centre_mm: np.ndarray) -> np.ndarray:
    """An affine with the given linear part whose grid centre lands on ``centre_mm``."""
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = centre_mm - linear @ ((np.array(shape) - 1) / 2)
    return a


ORIENTATIONS = {
    "RAS": np.diag([1.0, 1.0, 1.0]),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "oblique": _rotation(0.3, -0.2, 0.25) * 1.2,
    "anisotropic": np.diag([0.9, 1.1, 3.0]),
    "oblique+anisotropic+permuted": (_rotation(0.1, 0.2, -0.15) @ np.diag([1.0, 1.3, 2.5]))[:, [1, 2, 0]],
}


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_blob_round_trip_lands_within_one_voxel(name: str) -> None:
    linear = ORIENTATIONS[name]
    shape = (120, 110, 70)
    target_mm = np.array([22.0, -14.0, 30.0])
    affine = _affine(linear, shape, centre_mm=np.array([0.0, -20.0, 10.0]))
    # Paint a Gaussian blob (sigma 4 mm) centred on target_mm in the scan's own world space.
    idx = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).T.reshape(*shape, 3)
    blob = np.exp(-((world - target_mm) ** 2).sum(-1) / (2 * 4.0**2)).astype(np.float32)

    placement = Placement(MNI_2MM, affine, shape, np.zeros(3), Alignment.MNI)
    in_model = placement.to_model(blob)
    peak_model = np.array(np.unravel_index(np.argmax(in_model), in_model.shape))
    peak_model_mm = (MNI_2MM.affine @ np.append(peak_model, 1))[:3]
    assert np.linalg.norm(peak_model_mm - target_mm) <= 2.0 * np.sqrt(3) / 2 + 1e-6  # within one 2 mm voxel

    back = placement.to_native(in_model)
    assert back.shape == shape
    peak_native = np.array(np.unravel_index(np.argmax(back), shape))
    peak_native_mm = (affine @ np.append(peak_native, 1))[:3]
    native_voxel = float(np.linalg.norm(affine[:3, :3], axis=0).max())
    assert np.linalg.norm(peak_native_mm - target_mm) <= max(native_voxel, 2.0)


def test_auto_alignment_registers_unregistered_scans_and_center_recovers_a_shift() -> None:
    from neuroexplain.lab.synthetic import Task, make_sample
    from neuroexplain.template import anatomy

    sample = make_sample(Task.LESION, 1_000_000)
    com = anatomy(MNI_2MM).com_mm
    registered = read_scan(nifti_bytes(sample.image, MNI_2MM.affine))
    assert place(registered, MNI_2MM, com).alignment is Alignment.MNI

    moved_affine = MNI_2MM.affine.copy()
    moved_affine[:3, 3] += [60.0, -40.0, 80.0]  # scanner coordinates far from MNI's origin
    moved = read_scan(nifti_bytes(sample.image, moved_affine))
    assert place(moved, MNI_2MM, com).alignment is Alignment.REGISTER  # auto: not in the model's space
    placement = place(moved, MNI_2MM, com, Alignment.CENTER)
    centred = place(registered, MNI_2MM, com, Alignment.CENTER)
    np.testing.assert_allclose(placement.shift_mm - centred.shift_mm, [-60.0, 40.0, -80.0], atol=0.5)
    # Centring recovers the same model-space image as the registered scan.
    registered_model = place(registered, MNI_2MM, com, Alignment.MNI).to_model(registered.data)
    assert np.corrcoef(placement.to_model(moved.data).ravel(), registered_model.ravel())[0, 1] > 0.95


# vox_offset and the header's other numeric fields are checked before use (security review: NaN gave INTERNAL, a huge
# offset in a small gzip upload made the server inflate 200 MB).
_VOX_OFFSET_AT = 108  # byte offset of vox_offset (float32) in a NIfTI-1 header


def _with_vox_offset(value: float, *, compress: bool) -> bytes:
    raw = bytearray(_nifti(_brain_like((4, 4, 4))))
    struct.pack_into("<f", raw, _VOX_OFFSET_AT, value)
    return gzip.compress(bytes(raw)) if compress else bytes(raw)


@pytest.mark.parametrize("compress", [False, True], ids=["nii", "nii.gz"])
@pytest.mark.parametrize(
    ("value", "words"),
    [(float("nan"), "vox_offset is nan"), (float("-inf"), "vox_offset is -inf"), (float("inf"), "vox_offset is inf"),
     (-352.0, "inside the 348-byte header"), (0.0, "inside the 348-byte header"), (352.5, "whole number")],
    ids=["nan", "-inf", "inf", "negative", "zero", "fraction"],
)
def test_invalid_vox_offset_is_a_format_error(value: float, words: str, compress: bool) -> None:
    with pytest.raises(ScanFormatError, match=words):
        read_scan(_with_vox_offset(value, compress=compress))


def test_huge_vox_offset_in_a_small_gzip_is_refused_before_inflating() -> None:
    # 200 MB of offset in a ~200 KB upload: refused from the header, so at most the header is ever inflated.
    upload = _with_vox_offset(200e6, compress=True)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError, match=r"vox_offset.*at most 16777216 bytes"):
            read_scan(upload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak allocation {peak} bytes while refusing a bad header"


def test_infinite_pixdim_or_scaling_rejected() -> None:
    for offset, name in ((80, "pixdim"), (112, "scl_slope"), (116, "scl_inter")):  # pixdim[1], scl_slope, scl_inter
        raw = bytearray(_nifti(_brain_like((4, 4, 4))))
        struct.pack_into("<f", raw, offset, float("inf"))
        with pytest.raises(ScanFormatError, match=name):
            read_scan(bytes(raw))
