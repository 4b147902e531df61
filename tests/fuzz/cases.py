"""Seeded, structure-aware fuzz cases: mutated NIfTI-1/-2 and MGH headers, gzip streams, DICOM headers, pixel data
and series composition.

A case is a pure function of ``(seed, index)``: :func:`make_case` draws from ``random.Random(f"{seed}:{index}")``,
so any case a run reports can be rebuilt exactly (``python tests/fuzz/run.py --replay SEED:INDEX``) and saved as a
regression file (:func:`save_case`, replayed by ``tests/fuzz/test_fuzz.py``).

The seeds are small real inputs: the tiny model's scans as NIfTI-1, NIfTI-2 and MGH (each raw and gzipped), a
synthetic DICOM series of the same volume (single-frame and Enhanced MR), and the small DICOM files pydicom ships
(compressed transfer syntaxes, other modalities, broken files). Mutations know the layouts: each NIfTI/MGH header
field is set to a value chosen for trouble (NaN, infinities, zero, negative, huge, out-of-range codes); gzip
mutations hit the deflate data, the header flags, the CRC/ISIZE trailer, member concatenation and compression
bombs; DICOM mutations set elements (raw, so that invalid values are written as they are), delete them, cut or grow
pixel data, flip bytes, and change the series (drop, duplicate, shuffle, mix series, foreign objects).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MAGIC = b"NXFUZZ1\n"
PATIENT_WORDS = ("FUZZ^PATIENT", "FUZZ0001")  # the synthetic series' identity: must never appear in an error


@dataclass(frozen=True)
class Case:
    """One fuzz input and how to send it.

    Attributes:
        name: the mutation chain, e.g. ``nifti1.gz/field:vox_offset=-inf`` (what a report prints).
        data: file bytes for ``Scan.data`` (empty for a DICOM series).
        instances: DICOM instances for ``Scan.dicom`` (empty for a file scan).
        rpc: ``predict``, ``attribute`` or ``visualize`` (started from the scan; never drawn by :func:`make_case`,
            chosen by the caller).
        return_dicom: ask for DICOM results (only meaningful for a series).
    """

    name: str
    data: bytes = b""
    instances: tuple[bytes, ...] = ()
    rpc: str = "predict"
    return_dicom: bool = False

    @property
    def is_dicom(self) -> bool:
        return bool(self.instances)


# ---------------------------------------------------------------------------------------------------------------------
# Seeds


@cache
def _base_volume() -> tuple[object, object]:
    """The tiny model's test scan (30 x 36 x 30 at 2.5 mm, in MNI space) as data and affine."""
    from test_service_support import make_scan

    from neuroexplain.volumes import read_scan

    scan = read_scan(make_scan(7))
    return scan.data, scan.affine


@cache
def file_seeds() -> dict[str, bytes]:
    import nibabel as nib
    import numpy as np

    data, affine = _base_volume()
    volume = np.asarray(data, dtype=np.float32)
    out: dict[str, bytes] = {}
    out["nifti1"] = nib.Nifti1Image(volume, affine).to_bytes()
    out["nifti1-int16"] = nib.Nifti1Image((volume * 10).astype(np.int16), affine).to_bytes()
    out["nifti2"] = nib.Nifti2Image(volume, affine).to_bytes()
    four = np.stack([volume, volume * 0.5], axis=-1)
    out["nifti1-4d"] = nib.Nifti1Image(four, affine).to_bytes()
    mgh = nib.MGHImage(volume, affine)
    out["mgh"] = mgh.to_bytes()
    for name in list(out):
        out[name + ".gz"] = gzip.compress(out[name], compresslevel=1, mtime=0)
    return out


@cache
def dicom_seeds() -> dict[str, tuple[bytes, ...]]:
    """Synthetic series of the base volume, and single pydicom test files (each one instance)."""
    import tempfile

    import numpy as np

    from neuroexplain.dicom.files import collect_instances
    from neuroexplain.lab.dicom_synth import write_series

    data, affine = _base_volume()
    volume = np.asarray(data, dtype=np.float32)
    out: dict[str, tuple[bytes, ...]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in (("series", {"orientation": None, "rescale": (0.01, 0.0)}),
                             ("series-sagittal", {"orientation": "sagittal"}),
                             ("series-enhanced", {"enhanced": True, "orientation": None}),
                             ("series-other", {"orientation": None, "uid_seed": "fuzz-other", "series_number": 2})):
            folder = Path(tmp) / name
            write_series(volume, affine, folder, patient_name=PATIENT_WORDS[0], patient_id=PATIENT_WORDS[1],
                         **kwargs)  # type: ignore[arg-type]
            out[name] = tuple(collect_instances(folder))
    for name, raw in pydicom_files().items():
        out["pydicom:" + name] = (raw,)
    return out


# Small files that ship inside pydicom (no download): compressed transfer syntaxes, big endian, other modalities,
# and broken files.
_PYDICOM_FILES = ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm", "MR_truncated.dcm",
                  "CT_small.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm", "SC_rgb_rle.dcm",
                  "rtdose_1frame.dcm", "rtplan.dcm", "test-SR.dcm", "image_dfl.dcm", "liver_1frame.dcm",
                  "emri_small.dcm", "no_meta.dcm", "badVR.dcm", "JPEGLSNearLossless_16.dcm")


@cache
def pydicom_files() -> dict[str, bytes]:
    import warnings

    from pydicom.data import get_testdata_file

    out: dict[str, bytes] = {}
    for name in _PYDICOM_FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                path = get_testdata_file(name, download=False)
            except Exception:  # noqa: BLE001 - a file this pydicom build does not ship is simply not a seed
                path = None
        if path:
            out[name] = Path(str(path)).read_bytes()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Values chosen for trouble

_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-38, -1.0, 1.0, 1e30, -1e30, 3.4e38, 65536.0, 0.5, 2.0 ** 31)
_INTS = (0, -1, 1, 2, 3, 4, 7, 8, 255, 256, 32767, -32768, 65535, 2 ** 31 - 1, -(2 ** 31), 1000, 100000)


def _float(rng: random.Random) -> float:
    return rng.choice(_FLOATS) if rng.random() < 0.8 else rng.uniform(-1e6, 1e6)


def _int(rng: random.Random, lo: int, hi: int) -> int:
    value = rng.choice(_INTS) if rng.random() < 0.8 else rng.randint(lo, hi)
    return max(lo, min(hi, value))


# (name, offset, struct format of one item, count)
NIFTI1_FIELDS = (
    ("sizeof_hdr", 0, "i", 1), ("dim_info", 39, "B", 1), ("dim", 40, "h", 8), ("intent_p", 56, "f", 3),
    ("intent_code", 68, "h", 1), ("datatype", 70, "h", 1), ("bitpix", 72, "h", 1), ("slice_start", 74, "h", 1),
    ("pixdim", 76, "f", 8), ("vox_offset", 108, "f", 1), ("scl_slope", 112, "f", 1), ("scl_inter", 116, "f", 1),
    ("slice_end", 120, "h", 1), ("slice_code", 122, "B", 1), ("xyzt_units", 123, "B", 1), ("cal_max", 124, "f", 1),
    ("cal_min", 128, "f", 1), ("slice_duration", 132, "f", 1), ("toffset", 136, "f", 1),
    ("qform_code", 252, "h", 1), ("sform_code", 254, "h", 1), ("quatern", 256, "f", 6), ("srow_x", 280, "f", 4),
    ("srow_y", 296, "f", 4), ("srow_z", 312, "f", 4), ("magic", 344, "4s", 1), ("extension", 348, "4s", 1),
)
NIFTI2_FIELDS = (
    ("sizeof_hdr", 0, "i", 1), ("magic", 4, "8s", 1), ("datatype", 12, "h", 1), ("bitpix", 14, "h", 1),
    ("dim", 16, "q", 8), ("intent_p", 80, "d", 3), ("pixdim", 104, "d", 8), ("vox_offset", 168, "q", 1),
    ("scl_slope", 176, "d", 1), ("scl_inter", 184, "d", 1), ("cal_max", 192, "d", 1), ("cal_min", 200, "d", 1),
    ("slice_duration", 208, "d", 1), ("toffset", 216, "d", 1), ("slice_start", 224, "q", 1),
    ("slice_end", 232, "q", 1), ("qform_code", 344, "i", 1), ("sform_code", 348, "i", 1), ("quatern", 352, "d", 6),
    ("srow_x", 400, "d", 4), ("srow_y", 432, "d", 4), ("srow_z", 464, "d", 4), ("slice_code", 496, "i", 1),
    ("xyzt_units", 500, "i", 1), ("intent_code", 504, "i", 1), ("extension", 540, "4s", 1),
)
MGH_FIELDS = (  # big endian
    ("version", 0, "i", 1), ("dims", 4, "i", 4), ("type", 20, "i", 1), ("dof", 24, "i", 1),
    ("goodRASFlag", 28, "h", 1), ("spacing", 30, "f", 3), ("Mdc", 42, "f", 9), ("Pxyz_c", 78, "f", 3),
)
_INT_RANGE = {"B": (0, 255), "h": (-32768, 32767), "i": (-(2 ** 31), 2 ** 31 - 1), "q": (-(2 ** 63), 2 ** 63 - 1)}


def _field_value(rng: random.Random, fmt: str, name: str) -> object:
    if fmt.endswith("s"):
        size = int(fmt[:-1])
        return bytes(rng.randrange(256) for _ in range(size)) if rng.random() < 0.5 else rng.choice(
            [b"n+1\0", b"ni1\0", b"n+2\0\r\n\x1a\n", b"\0" * size, b"\1\0\0\0"])[:size].ljust(size, b"\0")
    if fmt in "fd":
        return _float(rng)
    lo, hi = _INT_RANGE[fmt]
    if name in ("datatype", "type") and rng.random() < 0.5:
        return rng.choice([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 3, 5, 6])
    if name == "bitpix" and rng.random() < 0.5:
        return rng.choice([0, 1, 7, 8, 16, 24, 32, 64, 128, -8])
    if name in ("dim", "dims") and rng.random() < 0.5:
        return rng.choice([0, 1, 2, 3, 4, 5, 7, 8, -1, 30, 36, 60, 4096, 32767])
    return _int(rng, lo, hi)


def _set_field(raw: bytearray, endian: str, fields: tuple[tuple[str, int, str, int], ...],
               rng: random.Random) -> str:
    name, offset, fmt, count = rng.choice(fields)
    item = struct.calcsize(endian + fmt)
    if offset + item * count > len(raw):
        raw.extend(b"\0" * (offset + item * count - len(raw)))
    index = rng.randrange(count)
    value = _field_value(rng, fmt, name)
    struct.pack_into(endian + fmt, raw, offset + index * item, value)
    shown = value if not isinstance(value, bytes) else value[:8].hex()
    return f"field:{name}[{index}]={shown}"


def _flip(raw: bytearray, rng: random.Random, start: int = 0, end: int | None = None) -> str:
    end = len(raw) if end is None else min(end, len(raw))
    if end <= start:
        return "flip:none"
    n = rng.choice([1, 1, 2, 4, 16])
    for _ in range(n):
        pos = rng.randrange(start, end)
        raw[pos] = rng.randrange(256) if rng.random() < 0.5 else raw[pos] ^ (1 << rng.randrange(8))
    return f"flip:{n}@{start}-{end}"


def _resize(raw: bytearray, rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.6:
        cut = rng.choice([0, 1, 4, 100, 347, 348, 351, 352, 539, 540, 544, 284, 285]) if rng.random() < 0.5 else \
            rng.randrange(len(raw) + 1)
        del raw[cut:]
        return f"truncate:{cut}"
    extra = rng.choice([1, 4, 1000, 1 << 16])
    raw.extend(bytes(rng.randrange(256) for _ in range(min(extra, 64))) * max(1, extra // 64))
    return f"append:{extra}"


def _nifti_extension(kind: str, raw: bytearray, rng: random.Random) -> str:
    """Declare a NIfTI extension after the header: its esize may be negative, odd, huge or past vox_offset."""
    at = 348 if kind.startswith("nifti1") else 540
    if len(raw) < at + 16:
        raw.extend(b"\0" * (at + 16 - len(raw)))
    esize = rng.choice([0, 8, 15, 16, 32, -16, 1 << 20, 2 ** 31 - 1, len(raw)])
    struct.pack_into("<4B", raw, at, 1, 0, 0, 0)
    struct.pack_into("<ii", raw, at + 4, esize, rng.choice([0, 2, 4, 6, 40, -1]))
    return f"extension:esize={esize}"


def _header_mutation(kind: str, raw: bytearray, rng: random.Random) -> str:
    if kind.startswith("nifti") and rng.random() < 0.1:
        return _nifti_extension(kind, raw, rng)
    if kind.startswith("nifti1"):
        return _set_field(raw, "<", NIFTI1_FIELDS, rng)
    if kind.startswith("nifti2"):
        return _set_field(raw, "<", NIFTI2_FIELDS, rng)
    return _set_field(raw, ">", MGH_FIELDS, rng)


def _gzip_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Mutations of a gzip stream around (already mutated) uncompressed bytes."""
    stream = bytearray(gzip.compress(raw, compresslevel=rng.choice([0, 1, 6, 9]), mtime=0))
    choice = rng.randrange(8)
    if choice == 0:
        return bytes(stream), "gzip:valid"
    if choice == 1:  # inside the deflate data
        return bytes(stream), "gzip:" + _flip(stream, rng, 10, len(stream) - 8)
    if choice == 2:  # CRC or ISIZE
        return bytes(stream), "gzip:trailer:" + _flip(stream, rng, len(stream) - 8, len(stream))
    if choice == 3:
        cut = rng.randrange(1, len(stream))
        return bytes(stream[:cut]), f"gzip:truncate:{cut}"
    if choice == 4:  # two members: gzip readers concatenate them
        return bytes(stream) + gzip.compress(raw[: rng.randrange(len(raw) + 1)], mtime=0), "gzip:two-members"
    if choice == 5:  # header flags: FEXTRA/FNAME/FCOMMENT/FHCRC set without their fields
        stream[3] = rng.randrange(256)
        return bytes(stream), f"gzip:flags={stream[3]}"
    if choice == 6:  # trailing garbage after a valid member
        return bytes(stream) + bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100]))), "gzip:trailing"
    return _bomb(raw, rng)


def _bomb(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A small upload that inflates far beyond what its header declares (zeros after the voxels) or beyond the cap."""
    size = rng.choice([64 << 20, 1100 << 20])
    return _zeros_gzip(raw[:352], size), f"gzip:bomb:{size >> 20}MiB"


@cache
def _zero_block() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(b"\0" * (1 << 24)) + compressor.flush(zlib.Z_FULL_FLUSH)


def _zeros_gzip(head: bytes, size: int) -> bytes:
    """gzip of ``head`` followed by ``size`` zero bytes, built from one 16 MiB deflate block repeated (fast)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    body += _zero_block() * (size >> 24)
    body += zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    whole = zlib.crc32(head)
    zeros = b"\0" * (1 << 24)
    for _ in range(size >> 24):
        whole = zlib.crc32(zeros, whole)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + body + struct.pack("<II", whole, (len(head) + size) & 0xFFFFFFFF)


def file_case(rng: random.Random) -> Case:
    seeds = file_seeds()
    base = rng.choice(sorted(k for k in seeds if not k.endswith(".gz")))
    raw = bytearray(seeds[base])
    steps = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        r = rng.random()
        if r < 0.75:
            steps.append(_header_mutation(base, raw, rng))
        elif r < 0.9:
            steps.append(_flip(raw, rng, 0, 600 if rng.random() < 0.5 else None))
        else:
            steps.append(_resize(raw, rng))
    name = base
    data = bytes(raw)
    if rng.random() < 0.5:
        data, how = _gzip_mutation(data, rng)
        name += ".gz"
        steps.append(how)
    return Case(f"{name}/" + "/".join(steps), data=data, rpc=_rpc(rng))


# ---------------------------------------------------------------------------------------------------------------------
# DICOM

# (keyword, tag, VR, candidate raw values as text; numbers outside their VR's grammar are meant)
_DICOM_ELEMENTS: tuple[tuple[str, int, str, tuple[str, ...]], ...] = (
    ("Rows", 0x00280010, "US", ("0", "1", "2", "65535", "4096")),
    ("Columns", 0x00280011, "US", ("0", "1", "2", "65535", "4096")),
    ("BitsAllocated", 0x00280100, "US", ("0", "1", "7", "8", "12", "16", "32", "64", "65535")),
    ("BitsStored", 0x00280101, "US", ("0", "1", "8", "12", "16", "17", "32", "65535")),
    ("HighBit", 0x00280102, "US", ("0", "7", "15", "16", "31", "65535")),
    ("PixelRepresentation", 0x00280103, "US", ("0", "1", "2", "65535")),
    ("SamplesPerPixel", 0x00280002, "US", ("0", "1", "2", "3", "4", "65535")),
    ("PlanarConfiguration", 0x00280006, "US", ("0", "1", "2")),
    ("PhotometricInterpretation", 0x00280004, "CS", ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL_422",
                                                     "PALETTE COLOR", "", "JUNK")),
    ("NumberOfFrames", 0x00280008, "IS", ("0", "-1", "1", "2", "1000000", "x", "2147483648", "")),
    ("PixelSpacing", 0x00280030, "DS", ("0\\0", "-1\\1", "nan\\1", "inf\\inf", "1", "1\\1\\1", "abc\\1",
                                        "1e308\\1e308", "", "0.000001\\0.000001")),
    ("SliceThickness", 0x00180050, "DS", ("0", "-1", "nan", "inf", "", "1e308")),
    ("SpacingBetweenSlices", 0x00180088, "DS", ("0", "-1", "nan", "inf", "")),
    ("ImagePositionPatient", 0x00200032, "DS", ("0\\0\\0", "nan\\0\\0", "inf\\-inf\\0", "1\\2", "", "1e308\\0\\0",
                                                "a\\b\\c", "0\\0\\0\\0")),
    ("ImageOrientationPatient", 0x00200037, "DS", ("1\\0\\0\\0\\1\\0", "0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0",
                                                   "nan\\0\\0\\0\\1\\0", "1\\0\\0", "", "1\\0\\0\\0\\0.9\\0.1",
                                                   "inf\\0\\0\\0\\1\\0", "0.7071\\0.7071\\0\\0\\0\\1")),
    ("RescaleSlope", 0x00281053, "DS", ("0", "-1", "nan", "inf", "1e308", "", "x")),
    ("RescaleIntercept", 0x00281052, "DS", ("nan", "inf", "-1e308", "", "x")),
    ("WindowCenter", 0x00281050, "DS", ("nan", "", "x")),
    ("SeriesInstanceUID", 0x0020000E, "UI", ("1.2.3", "", "1.2.3.4.5.6.7.8.9")),
    ("SOPInstanceUID", 0x00080018, "UI", ("1.2.3", "")),
    ("SOPClassUID", 0x00080016, "UI", ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4.1",
                                       "1.2.840.10008.5.1.4.1.1.88.33", "1.2.3", "")),
    ("StudyInstanceUID", 0x0020000D, "UI", ("", "1.2.3")),
    ("FrameOfReferenceUID", 0x00200052, "UI", ("", "1.2.3")),
    ("Modality", 0x00080060, "CS", ("MR", "CT", "SR", "PT", "", "JUNK")),
    ("InstanceNumber", 0x00200013, "IS", ("", "-1", "x", "2147483648")),
    ("PatientName", 0x00100010, "PN", ("", "A" * 400, "\\\\\\")),
    ("PatientID", 0x00100020, "LO", ("", "B" * 200)),
    ("StudyDate", 0x00080020, "DA", ("", "20261399", "x")),
    ("SpecificCharacterSet", 0x00080005, "CS", ("ISO_IR 192", "ISO 2022 IR 87", "JUNK", "")),
    ("AcquisitionMatrix", 0x00181310, "US", ("0", "65535")),
)


def _encoding(ds: object) -> tuple[bool, bool]:
    implicit, little = getattr(ds, "original_encoding", (False, True))
    return bool(implicit), True if little is None else bool(little)


def _encode_value(text: str, vr: str, little: bool, rng: random.Random) -> bytes:
    if vr == "US":
        value = int(text) if text.lstrip("-").isdigit() else 0
        if rng.random() < 0.1:  # a US element of the wrong length
            return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 6])))
        return struct.pack("<H" if little else ">H", value & 0xFFFF)
    raw = text.encode("latin-1", "replace")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _dicom_element(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Rewrite one instance with one element set to a raw (possibly invalid) value, or deleted."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    keyword, tag, vr, values = rng.choice(_DICOM_ELEMENTS)
    implicit, little = _encoding(ds)
    target = ds
    if "PerFrameFunctionalGroupsSequence" in ds and rng.random() < 0.5:
        # Enhanced MR: geometry lives in the functional groups; mutate one frame's or the shared group's copy.
        for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            groups = ds.get(seq)
            if groups and rng.random() < 0.5:
                item = rng.choice(list(groups))
                holders = [item[t].value[0] for t in list(item.keys()) if item[t].VR == "SQ" and len(item[t].value)]
                if holders:
                    target = rng.choice(holders)
                break
    if rng.random() < 0.15:
        if Tag(tag) in target:
            del target[Tag(tag)]
        how = f"delete:{keyword}"
    else:
        text = rng.choice(values)
        value = _encode_value(text, vr, little, rng)
        target._dict[Tag(tag)] = RawDataElement(Tag(tag), None if implicit else vr, len(value), value, 0,
                                                implicit, little)
        how = f"set:{keyword}={text[:24]!r}"
    return _write(ds), how


def _write(ds: object) -> bytes:
    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False)  # type: ignore[arg-type]
    return buffer.getvalue()


def _pixel_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Cut, grow or scramble the pixel data element's value (the bytes after the last (7FE0,0010) tag)."""
    marker = raw.rfind(b"\xe0\x7f\x10\x00")
    if marker < 0:
        return _byte_mutation(raw, rng)
    body = bytearray(raw)
    start = marker + 4
    choice = rng.randrange(4)
    if choice == 0:
        cut = rng.randrange(start, len(body) + 1)
        return bytes(body[:cut]), f"pixels:truncate:{cut - start}"
    if choice == 1:
        return bytes(body) + b"\x00\x01" * rng.choice([1, 7, 512]), "pixels:grow"
    if choice == 2:  # the element's length field (explicit OB/OW: 4 bytes after 2 reserved, implicit: right after)
        pos = start + (4 if body[start:start + 2] in (b"OB", b"OW") else 0)
        if pos + 4 <= len(body):
            struct.pack_into("<I", body, pos, rng.choice([0, 1, 2, 0xFFFFFFFF, 0x7FFFFFFF, len(body)]))
        return bytes(body), "pixels:length"
    return bytes(body), "pixels:" + _flip(body, rng, start)


_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
             "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
             "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
             "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.5", "1.2.3.4", "")


def _transfer_syntax(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Another TransferSyntaxUID in the file meta, the dataset's bytes left as they are (codec/encoding mismatch)."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    if len(raw) < 144 or raw[128:132] != b"DICM":
        return _byte_mutation(raw, rng)
    (group_length,) = struct.unpack_from("<I", raw, 140)
    end = 144 + group_length
    meta = pydicom.dcmread(io.BytesIO(raw), force=True).file_meta
    syntax = rng.choice(_SYNTAXES)
    meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=False)
    return raw[:132] + buffer.getvalue() + raw[end:], f"syntax:{syntax or 'empty'}"


def _byte_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    body = bytearray(raw)
    if rng.random() < 0.3:
        cut = rng.randrange(0, len(body) + 1)
        return bytes(body[:cut]), f"bytes:truncate:{cut}"
    return bytes(body), "bytes:" + _flip(body, rng, 128 if rng.random() < 0.8 else 0)


def _replicate(raw: bytes, rng: random.Random) -> tuple[tuple[bytes, ...], str]:
    """A single pydicom test file made into a small series: copies at increasing ImagePositionPatient."""
    import pydicom
    from pydicom.uid import generate_uid

    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
        n = rng.choice([2, 3, 4])
        spacing = rng.choice([1.0, 1.0, 2.5, 0.0])
        out = []
        for k in range(n):
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(rng.random()), str(k)])
            ds.ImagePositionPatient = [0.0, 0.0, spacing * k]
            ds.InstanceNumber = k + 1
            out.append(_write(ds))
        return tuple(out), f"replicate:{n}x{spacing}"
    except Exception:  # noqa: BLE001 - an unreadable or unwritable seed is sent as it is
        return (raw,), "as-is"


def _composition(instances: tuple[bytes, ...], rng: random.Random) -> tuple[tuple[bytes, ...], str]:
    items = list(instances)
    choice = rng.randrange(9)
    if choice == 0 and len(items) > 2:
        for _ in range(min(rng.choice([1, 2, 5]), len(items) - 1)):
            items.pop(rng.randrange(len(items)))
        return tuple(items), "series:drop"
    if choice == 1:
        return tuple(items + [rng.choice(items)]), "series:duplicate"
    if choice == 2:
        rng.shuffle(items)
        return tuple(items), "series:shuffle"
    if choice == 3:
        other = dicom_seeds()["series-other"]
        return tuple(items + list(other[: rng.choice([1, 3, len(other)])])), "series:mixed"
    if choice == 4:
        foreign = rng.choice(list(pydicom_files().values()) or [b"x"])
        return tuple(items + [foreign]), "series:foreign-object"
    if choice == 5:
        return tuple(items + [rng.choice([b"", b"not dicom", b"\0" * 132, b"\0" * 128 + b"DICM"])]), "series:junk"
    if choice == 6:
        return (items[rng.randrange(len(items))],), "series:one-instance"
    if choice == 7:
        return tuple(items * rng.choice([2, 3])), "series:all-twice"
    return tuple(items), "series:as-is"


def dicom_case(rng: random.Random) -> Case:
    seeds = dicom_seeds()
    synthetic = [k for k in seeds if not k.startswith("pydicom:")]
    base = rng.choice(synthetic) if rng.random() < 0.7 or len(synthetic) == len(seeds) else \
        rng.choice(sorted(k for k in seeds if k.startswith("pydicom:")))
    instances = seeds[base]
    steps = []
    if base.startswith("pydicom:") and rng.random() < 0.6:
        instances, how = _replicate(instances[0], rng)
        steps.append(how)
    items = list(instances)
    for _ in range(rng.choice([1, 1, 2, 3])):
        r = rng.random()
        mutate: Callable[[bytes, random.Random], tuple[bytes, str]]
        if r < 0.5:
            mutate = _dicom_element
        elif r < 0.68:
            mutate = _pixel_mutation
        elif r < 0.76:
            mutate = _transfer_syntax
        elif r < 0.85:
            mutate = _byte_mutation
        else:
            items_t, how = _composition(tuple(items), rng)
            items = list(items_t)
            steps.append(how)
            continue
        everywhere = rng.random() < 0.3
        targets = range(len(items)) if everywhere else [rng.randrange(len(items))]
        hows = set()
        rng_state = rng.getstate()
        for i in targets:
            if everywhere:
                rng.setstate(rng_state)  # the same change in every instance
            try:
                items[i], how = mutate(items[i], rng)
            except Exception as exc:  # noqa: BLE001 - pydicom could not re-encode this one; keep it unmutated
                how = f"unmutated:{type(exc).__name__}"
            hows.add(how)
        steps.append(("all:" if everywhere else "one:") + ",".join(sorted(hows)))
    return Case(f"{base}/" + "/".join(steps), instances=tuple(items), rpc=_rpc(rng),
                return_dicom=rng.random() < 0.3)


def _rpc(rng: random.Random) -> str:
    return "attribute" if rng.random() < 0.2 else "predict"


def make_case(seed: int, index: int) -> Case:
    """The case ``index`` of the run seeded ``seed`` (pure: the same pair always gives the same case)."""
    rng = random.Random(f"{seed}:{index}")
    case = dicom_case(rng) if rng.random() < 0.45 else file_case(rng)
    return Case(f"{seed}:{index}/{case.name}", case.data, case.instances, case.rpc, case.return_dicom)


# ---------------------------------------------------------------------------------------------------------------------
# Regression files


def save_case(case: Case, path: Path, note: str) -> None:
    """One case as a file: a magic line, a JSON line, then length-prefixed blobs (the data, or each instance)."""
    meta = {"name": case.name, "rpc": case.rpc, "return_dicom": case.return_dicom, "dicom": case.is_dicom,
            "note": note}
    blobs = case.instances if case.is_dicom else (case.data,)
    with path.open("wb") as f:
        f.write(MAGIC + json.dumps(meta).encode() + b"\n")
        for blob in blobs:
            f.write(struct.pack("<Q", len(blob)) + blob)


def load_case(path: Path) -> tuple[Case, str]:
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise ValueError(f"{path.name} is not a fuzz regression file")
    end = raw.index(b"\n", len(MAGIC))
    meta = json.loads(raw[len(MAGIC):end])
    blobs, pos = [], end + 1
    while pos < len(raw):
        (n,) = struct.unpack_from("<Q", raw, pos)
        blobs.append(raw[pos + 8:pos + 8 + n])
        pos += 8 + n
    if meta["dicom"]:
        case = Case(meta["name"], instances=tuple(blobs), rpc=meta["rpc"], return_dicom=meta["return_dicom"])
    else:
        case = Case(meta["name"], data=blobs[0], rpc=meta["rpc"], return_dicom=meta["return_dicom"])
    return case, str(meta.get("note", ""))
