"""DICOM series -> :class:`~neuroexplain.volumes.Scan`: safe, limited, decoded once.

Order of work, so that nothing large is allocated before it is known to fit:

1. counts and sizes of the raw instances (``DicomLimits``, ``ScanLimits.max_input_bytes``);
2. headers only (pydicom), non-image objects set aside, one series chosen;
3. rows x columns x frames, voxels and decoded bytes checked against the limits, the transfer syntax against the
   installed decoders;
4. geometry (:mod:`neuroexplain.dicom.geometry`) checked for consistency;
5. only then the selected volume's frames are decoded (pydicom's pixel-data plugins) and rescaled.

Which library decodes what: pydicom itself reads uncompressed (implicit/explicit VR little endian, big endian) and
RLE Lossless; pylibjpeg-rle decodes RLE faster when installed; Pillow decodes JPEG baseline/extended and JPEG 2000;
pylibjpeg-openjpeg decodes JPEG 2000 and HTJ2K; pyjpegls decodes JPEG-LS; python-gdcm decodes JPEG Lossless
(process 14) and is a fallback for the others. None is GPL (pylibjpeg-libjpeg is, and is never used).
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException
from pydicom.pixels import get_decoder
from pydicom.pixels import pixel_array as _pixel_array
from pydicom.uid import UID, JPEGExtended12Bit, RLELossless

from neuroexplain.dicom import codestream
from neuroexplain.dicom.errors import (
    DicomError,
    NoImageError,
    PixelDataError,
    SeriesNotFoundError,
    SeveralSeriesError,
    TransferSyntaxError,
)
from neuroexplain.dicom.files import collect_instances, is_dicom, series_digest
from neuroexplain.dicom.geometry import FrameHeader, SeriesGeometry, frame_headers, series_geometry
from neuroexplain.dicom.privacy import quiet_pydicom
from neuroexplain.errors import InvalidOptionError, LimitExceededError
from neuroexplain.volumes import NonFinite, Scan, ScanLimits, _check_affine, _check_finite, read_scan

MiB = 1 << 20

#: SOP classes read as images. Everything else (reports, presentation states, secondary captures...) is set aside.
IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
}
_DEFLATED = b"1.2.840.10008.1.2.1.99"
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # PixelData, FloatPixelData, DoubleFloatPixelData


@dataclass(frozen=True)
class DicomLimits:
    """Caps on a series, checked from sizes and headers before any pixel data is decoded.

    Voxels, total bytes and decoded bytes use :class:`~neuroexplain.volumes.ScanLimits` (the same caps as NIfTI).
    """

    max_instances: int = 8192
    max_instance_bytes: int = 256 * MiB
    max_frames: int = 16384  # frames of the whole series (all volumes)
    max_image_pixels: int = 4096 * 4096  # rows x columns of one frame


@dataclass(frozen=True)
class DicomScan(Scan):
    """A :class:`~neuroexplain.volumes.Scan` read from a DICOM series (``format == "dicom"``), with its geometry.

    Attributes:
        geometry: slice order, positions, orientation, spacing, affine and the source headers (pixel data
            stripped) of the volume that was read.
    """

    geometry: SeriesGeometry = field(repr=False, compare=False)


_SCAN_LIMITS = ScanLimits()
_DICOM_LIMITS = DicomLimits()


def _meta_is_deflated(raw: bytes) -> bool:
    """Whether the file meta group names the Deflated transfer syntax (inflating it would be unbounded)."""
    try:
        (group_length,) = struct.unpack_from("<I", raw, 140)  # (0002,0000) UL, explicit VR: tag 4 + VR 2 + len 2
    except struct.error:
        return False
    return _DEFLATED in raw[132 : 144 + min(group_length, 1 << 16)]


def _parse(raw: bytes, index: int, total: int) -> Dataset:
    if _meta_is_deflated(raw):
        raise TransferSyntaxError(
            "an instance uses the Deflated Explicit VR Little Endian transfer syntax, which is not accepted; "
            "send it uncompressed or with an image codec (JPEG, JPEG-LS, JPEG 2000, RLE)"
        )
    try:
        return pydicom.dcmread(io.BytesIO(raw), force=False)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - pydicom raises many unrelated types for malformed files
        raise DicomError(
            f"instance {index + 1} of {total} could not be parsed as DICOM; expected valid DICOM Part 10 files"
        ) from None


def _stripped(ds: Dataset) -> Dataset:
    """The header without pixel data (elements shared, not copied), file meta kept."""
    # keys() + get_item: iterating a Dataset would convert every raw element; this keeps them raw.
    out = Dataset({tag: ds.get_item(tag) for tag in ds.keys() if int(tag) not in _PIXEL_TAGS})  # noqa: SIM118
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _refuse_unreadable_elements(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """pydicom converts elements lazily, when first used: an element whose value cannot be converted (an unknown VR
    after a corrupt length, a value of the wrong byte length) raises then, far from ``dcmread``. Those two types are
    refused here as malformed input (nothing else is caught)."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, BytesLengthException):
            raise DicomError("an instance holds an element that cannot be read (unknown value representation or a "
                             "value of the wrong length); expected valid DICOM Part 10 files") from None

    return wrapper


@_refuse_unreadable_elements
def read_series(
    instances: Sequence[bytes],
    *,
    series_uid: str | None = None,
    volume_index: int | None = None,
    nonfinite: NonFinite = NonFinite.REJECT,
    limits: ScanLimits = _SCAN_LIMITS,
    dicom_limits: DicomLimits = _DICOM_LIMITS,
) -> DicomScan:
    """Decode one DICOM series (single-frame MR/CT or Enhanced MR, any instance order) into a scan.

    Args:
        instances: the instances' bytes (DICOM Part 10). Non-DICOM items and non-image objects are set aside.
        series_uid: which series to read when the instances hold several.
        volume_index: which volume of a multi-volume series (DWI, fMRI, multi-stack) to read (0-based).
        nonfinite: what to do with NaN/Inf voxels after rescale.
        limits: voxel, total-byte and decoded-byte caps (shared with NIfTI input).
        dicom_limits: instance count, bytes per instance, frames and image size caps.

    Returns:
        A :class:`DicomScan`: float32 ``(columns, rows, slices)`` with rescale applied, RAS affine, the
        order-independent :func:`~neuroexplain.dicom.files.series_digest` of ``instances`` (as received, like
        NIfTI's digest of its bytes; ``series_uid`` and ``volume_index`` are reading options beside it), ``format="dicom"``, and the geometry with source headers.

    Raises:
        LimitExceededError: a cap was exceeded (checked before decoding).
        NoImageError, SeveralSeriesError, SeriesNotFoundError, DicomError: not one readable image series.
        InconsistentSeriesError, ScanGeometryError: the series' geometry cannot be used.
        PixelDataError, TransferSyntaxError: pixel data missing, broken or not decodable here.
        ScanDataError: NaN/Inf (with ``nonfinite=REJECT``) or an all-zero volume.
    """
    quiet_pydicom()
    if len(instances) > dicom_limits.max_instances:
        raise LimitExceededError(
            f"series has {len(instances)} instances; the limit is {dicom_limits.max_instances} instances"
        )
    total = 0
    for n, raw in enumerate(instances):
        if len(raw) > dicom_limits.max_instance_bytes:
            raise LimitExceededError(
                f"instance {n + 1} has {len(raw)} bytes; the limit is {dicom_limits.max_instance_bytes} bytes "
                "per instance"
            )
        total += len(raw)
    if total > limits.max_input_bytes:
        raise LimitExceededError(f"series has {total} bytes; the limit is {limits.max_input_bytes} bytes in total")
    digest = series_digest(instances)

    images: list[Dataset] = []
    not_dicom = not_image = 0
    for n, raw in enumerate(instances):
        if not is_dicom(bytes(raw[:132])):
            not_dicom += 1
            continue
        ds = _parse(bytes(raw), n, len(instances))
        if str(ds.get("SOPClassUID", "")) not in IMAGE_SOP_CLASSES or "PixelData" not in ds:
            not_image += 1
            continue
        images.append(ds)
    if not images:
        raise NoImageError(
            f"no MR or CT image among {len(instances)} instance(s) ({not_dicom} not DICOM Part 10, {not_image} "
            f"DICOM without image pixel data or of another kind); accepted: {', '.join(IMAGE_SOP_CLASSES.values())}"
        )
    series: dict[str, list[Dataset]] = {}
    for ds in images:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if series_uid is not None:
        if series_uid not in series:
            raise SeriesNotFoundError(
                f"the requested series UID matches none of the {len(series)} series found; choose one of them "
                "with --series UID (series_uid)"
            )
        images = series[series_uid]
    elif len(series) > 1:
        raise SeveralSeriesError(
            f"found {len(series)} series ({', '.join(str(len(v)) for v in series.values())} images); send one "
            "series, or choose one with --series UID (series_uid)"
        )

    frames: list[FrameHeader] = []
    for n, ds in enumerate(images):
        _check_pixel_header(ds, dicom_limits, limits)
        frames.extend(frame_headers(ds, n))
        if len(frames) > dicom_limits.max_frames:
            raise LimitExceededError(
                f"series has more than {dicom_limits.max_frames} frames; the limit is {dicom_limits.max_frames}"
            )
    headers = [_stripped(ds) for ds in images]
    geometry = series_geometry(frames, volume_index=volume_index, headers=headers)
    nvox = geometry.rows * geometry.columns * geometry.n_slices
    if nvox > limits.max_voxels:
        raise LimitExceededError(f"volume has {nvox} voxels {geometry.shape}; the limit is {limits.max_voxels} voxels")
    decoded = nvox * (4 + max(_header_int(ds, "BitsAllocated", 0) for ds in images) // 8)
    if decoded > limits.max_decompressed_bytes:
        raise LimitExceededError(
            f"volume would decode to {decoded} bytes; the limit is {limits.max_decompressed_bytes} bytes"
        )

    _check_codestreams(images, geometry)
    out = np.empty((geometry.n_slices, geometry.rows, geometry.columns), dtype=np.float32)  # (slices, rows, cols)
    for k, frame in enumerate(geometry.frames):
        pixels = _decode(images[frame.instance], frame.frame)
        if pixels.shape != (geometry.rows, geometry.columns):
            raise PixelDataError(
                f"a frame decoded to shape {pixels.shape}; its header declares {(geometry.rows, geometry.columns)}"
            )
        if frame.slope == 1.0 and frame.intercept == 0.0:
            out[k] = pixels
        else:  # in float64, then rounded once: the value nibabel and dcm2niix's scl_slope/scl_inter give
            out[k] = pixels * frame.slope + frame.intercept
    data = geometry.to_volume(out)
    _check_affine(geometry.affine)
    data = _check_finite(data, nonfinite)
    return DicomScan(data=data, affine=geometry.affine, digest=digest, format="dicom", geometry=geometry)


def _header_int(ds: Dataset, keyword: str, default: int) -> int:
    """A pixel-layout element as one non-negative integer (``default`` when absent or empty), else a typed refusal
    naming the element (its value is never shown)."""
    try:
        value = ds.get(keyword)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - pydicom converts raw values on access and raises many types for bad ones
        value = _UNREADABLE
    if value is None or value == "":
        return default
    try:
        out = int(value) if value is not _UNREADABLE else -1
    except (TypeError, ValueError, OverflowError):
        out = -1
    if out < 0:
        raise PixelDataError(f"{keyword} is not a single non-negative integer; expected one whole number")
    return out


_UNREADABLE = object()


def _check_pixel_header(ds: Dataset, dicom_limits: DicomLimits, limits: ScanLimits) -> None:
    """Refuse unsupported pixel layouts and transfer syntaxes, and oversized images, from the header alone."""
    samples = _header_int(ds, "SamplesPerPixel", 1) or 1
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME2", "MONOCHROME1"):
        raise PixelDataError(
            f"images have {samples} samples per pixel ({photometric or 'no photometric interpretation'}); "
            "expected greyscale (SamplesPerPixel 1, MONOCHROME2)"
        )
    if photometric == "MONOCHROME1":
        raise PixelDataError("images are MONOCHROME1 (inverted greyscale); expected MONOCHROME2 as MR and CT use")
    bits = _header_int(ds, "BitsAllocated", 0)
    if bits not in (8, 16, 32):
        raise PixelDataError(f"images have BitsAllocated {bits}; expected 8, 16 or 32")
    rows, columns = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
    n_frames = _header_int(ds, "NumberOfFrames", 1) or 1
    if rows * columns > dicom_limits.max_image_pixels:
        raise LimitExceededError(
            f"images are {rows}x{columns} pixels; the limit is {dicom_limits.max_image_pixels} pixels per image"
        )
    if rows * columns * n_frames * bits // 8 > limits.max_decompressed_bytes:
        raise LimitExceededError(
            f"an instance of {n_frames} frames of {rows}x{columns} would decode to "
            f"{rows * columns * n_frames * bits // 8} bytes; the limit is {limits.max_decompressed_bytes} bytes"
        )
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if hasattr(ds, "file_meta") else UID("")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise TransferSyntaxError(
            f"transfer syntax {syntax.name if syntax.is_valid else 'missing'} has no installed decoder; accepted: "
            "uncompressed, RLE Lossless, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K"
        )
    if syntax == JPEGExtended12Bit and (_header_int(ds, "BitsStored", 8) or 8) > 8:
        # Pillow and python-gdcm decode only 8-bit JPEG Extended; the one 12-bit decoder (pylibjpeg-libjpeg) is GPL.
        raise TransferSyntaxError(
            "12-bit JPEG Extended (lossy) has no installed decoder; accepted: uncompressed, RLE Lossless, JPEG "
            "baseline, 8-bit JPEG extended, JPEG lossless, JPEG-LS, JPEG 2000, HTJ2K"
        )
    if not syntax.is_compressed:
        needed = rows * columns * n_frames * bits // 8
        pixels = ds.get("PixelData")
        if not isinstance(pixels, bytes | bytearray):
            raise PixelDataError("pixel data is empty; expected the image's pixel values")
        if len(pixels) < needed:
            raise PixelDataError(f"pixel data is truncated: {len(pixels)} bytes where the header declares {needed}")


def _check_codestreams(images: Sequence[Dataset], geometry: SeriesGeometry) -> None:
    """Refuse a compressed frame whose codestream declares another size than Rows x Columns, before decoding."""
    wanted: dict[int, set[int]] = {}
    for frame in geometry.frames:
        wanted.setdefault(frame.instance, set()).add(frame.frame or 0)
    for instance, indices in wanted.items():
        ds = images[instance]
        syntax = str(ds.file_meta.TransferSyntaxUID)
        rle = syntax == RLELossless
        if not (rle or codestream.checks(syntax)):
            continue
        # RLE decoders grow their output with the input (up to 64x): a frame may not be larger than its raw size
        # plus RLE's worst-case overhead, which bounds what decoding it can allocate.
        rle_cap = geometry.rows * geometry.columns * (_header_int(ds, "BitsAllocated", 0) // 8) * 130 // 128 + 64 + 16
        n_frames = _header_int(ds, "NumberOfFrames", 1) or 1
        try:
            frames = generate_frames(ds.PixelData, number_of_frames=n_frames)
            for index, data in enumerate(frames):
                if index > max(indices):
                    break
                if index not in indices:
                    continue
                if rle:
                    if len(data) > rle_cap:
                        raise PixelDataError(
                            f"an RLE frame has {len(data)} bytes, more than any {geometry.rows}x{geometry.columns} "
                            f"image needs ({rle_cap}); expected a valid RLE Lossless frame"
                        )
                    continue
                size = codestream.declared_size(data, syntax)
                if size is None:
                    raise PixelDataError(
                        "a compressed frame has no readable codestream header; expected a codestream of the "
                        "transfer syntax its file declares"
                    )
                if size != (geometry.rows, geometry.columns):
                    raise PixelDataError(
                        f"a compressed frame declares {size[0]}x{size[1]} pixels in its codestream, but the header "
                        f"says {geometry.rows}x{geometry.columns}; both must agree"
                    )
        except PixelDataError:
            raise
        except Exception:  # noqa: BLE001 - pydicom's encapsulation parser raises several types for broken items
            raise PixelDataError(
                "encapsulated pixel data is broken (item tags or lengths); expected one item per frame"
            ) from None


def _decode(ds: Dataset, frame: int | None) -> np.ndarray:
    """One frame's stored values, ``(rows, columns)``, through pydicom's pixel-data plugins."""
    try:
        if not ds.file_meta.TransferSyntaxUID.is_compressed and frame is None:
            return ds.pixel_array
        return _pixel_array(ds, index=frame if frame is not None else None)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - each plugin raises its own types for broken codestreams
        raise PixelDataError(
            "pixel data could not be decoded (broken or truncated codestream); expected pixel data matching its "
            "header and transfer syntax"
        ) from None


def read_series_dir(
    path: str | Path,
    series_uid: str | None = None,
    *,
    volume_index: int | None = None,
    nonfinite: NonFinite = NonFinite.REJECT,
    limits: ScanLimits = _SCAN_LIMITS,
    dicom_limits: DicomLimits = _DICOM_LIMITS,
) -> DicomScan:
    """Read the DICOM series in a directory (files with any names, in any order, subfolders included).

    Files that are not DICOM Part 10 are ignored; limits on file count and sizes apply before files are read.

    Args:
        path: the directory.
        series_uid: which series to read when the directory holds several (``--series UID``).
        volume_index: which volume of a multi-volume series.
        nonfinite: what to do with NaN/Inf voxels.
        limits: as for :func:`read_series`.
        dicom_limits: as for :func:`read_series`.

    Returns:
        As :func:`read_series`.

    Raises:
        ScanFormatError: the path is not a readable directory; otherwise as :func:`read_series`.
    """
    instances = collect_instances(
        path,
        max_files=4 * dicom_limits.max_instances,
        max_instances=dicom_limits.max_instances,
        max_instance_bytes=dicom_limits.max_instance_bytes,
        max_total_bytes=limits.max_input_bytes,
    )
    return read_series(
        instances,
        series_uid=series_uid,
        volume_index=volume_index,
        nonfinite=nonfinite,
        limits=limits,
        dicom_limits=dicom_limits,
    )


def read_any(
    source: bytes | str | Path | Sequence[bytes],
    *,
    series_uid: str | None = None,
    volume_index: int | None = None,
    nonfinite: NonFinite = NonFinite.REJECT,
    limits: ScanLimits = _SCAN_LIMITS,
    dicom_limits: DicomLimits = _DICOM_LIMITS,
) -> Scan:
    """Any scan a hospital has: NIfTI/MGH bytes or file, a DICOM directory, or a list of DICOM instances.

    The one entry point for the CLI (``SCAN`` may be a file or a directory) and for the serving path (``Scan.data``
    -> bytes, ``Scan.dicom.instances`` -> a list).

    Args:
        source: file bytes or path (NIfTI-1/2, MGH/MGZ, detected from content), a directory holding one DICOM
            series, or the instances of a series as a list of bytes.
        series_uid: for DICOM, which series to read when several are present (``--series UID``).
        volume_index: which volume of a 4D NIfTI or multi-volume series.
        nonfinite: what to do with NaN/Inf voxels.
        limits: size caps (shared by every format).
        dicom_limits: DICOM-only caps.

    Returns:
        A :class:`~neuroexplain.volumes.Scan` (a :class:`DicomScan` for DICOM input).

    Raises:
        InvalidOptionError: ``series_uid`` given for a NIfTI/MGH scan; otherwise as the readers.
    """
    if isinstance(source, (list, tuple)):
        return read_series(source, series_uid=series_uid, volume_index=volume_index, nonfinite=nonfinite,
                           limits=limits, dicom_limits=dicom_limits)
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return read_series_dir(source, series_uid, volume_index=volume_index, nonfinite=nonfinite, limits=limits,
                               dicom_limits=dicom_limits)
    if series_uid is not None:
        raise InvalidOptionError("series_uid (--series) applies to DICOM input only; this scan is a single file")
    if isinstance(source, (bytes, bytearray, memoryview)) and is_dicom(bytes(source[:132])):
        return read_series([bytes(source)], volume_index=volume_index, nonfinite=nonfinite, limits=limits,
                           dicom_limits=dicom_limits)
    return read_scan(source, volume_index=volume_index, nonfinite=nonfinite, limits=limits)  # type: ignore[arg-type]
