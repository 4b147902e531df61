"""Scan I/O: safe decoding of NIfTI-1, NIfTI-2 and MGH/MGZ, and the mapping between a scan and a model's grid.

Everything a caller sends is checked before anything large is allocated: the compressed size, the header's
dimensions, data type and voxel count, and the decompressed size (a gzip bomb stops at the size its header declares).
Only then does nibabel parse the whole file.

Geometry is handled exactly through affines: a scan in any orientation (RAS, LAS, LPS, oblique, anisotropic voxels)
is resampled straight onto the model's RAS+ grid, and any map on the model grid goes back onto the scan's own grid
and affine with the inverse transform, so it overlays the scan in any viewer.
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import io
import itertools
import math
import queue
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from neuroexplain.errors import (
    InvalidOptionError,
    LimitExceededError,
    ScanDataError,
    ScanFormatError,
    ScanGeometryError,
)

try:  # ISA-L's inflater (python-isal): ~1.5-2x zlib's speed, the same decompressobj API; zlib when not installed
    from isal import isal_zlib

    _inflater: Any = isal_zlib
except ImportError:  # pragma: no cover - isal is a runtime dependency; zlib is the fallback
    _inflater = zlib

INFLATER = _inflater.__name__

if TYPE_CHECKING:  # torch is imported where it resamples: the gateway decodes DICOM results without loading it
    import torch

MiB = 1 << 20
GiB = 1 << 30

_ALLOWED_DTYPES = {
    np.dtype(t).newbyteorder("=")
    for t in ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")
}
_MGH_DTYPES: dict[int, np.dtype] = {0: np.dtype(">u1"), 1: np.dtype(">i4"), 3: np.dtype(">f4"), 4: np.dtype(">i2")}
_MGH_HEADER_BYTES = 284
# Geometry sanity bounds (far beyond any scanner): larger values are header corruption, not anatomy.
MAX_VOXEL_MM = 1000.0
MAX_ORIGIN_MM = 1e6
_HEAD_BYTES = 1024  # enough for any NIfTI-2 (540) or MGH (284) header
# The decoder's pieces: at most _PIECE bytes out of the inflater per call, fed _PIECE_IN bytes of the gzip stream at a
# time (what is left over is copied once per call). A piece and its float32 copy stay in the CPU's cache; smaller
# pieces cost more in Python's per-call overhead than they save (measured: README, Benchmarks).
_PIECE = 2 << 20
_PIECE_IN = 1 << 20
_CONVERT_QUEUE = 4  # inflated pieces waiting for their conversion (at most 8 MiB)
# With at most this many pieces of voxel data the conversion thread is not started: there is little to overlap, and
# under load its hand-offs cost more (a 2 mm scan of 2.4 MB: the TorchServe worker's CPU per Predict 15.4 ms without
# it against 16.3 with it, medians of three and five runs).
_CONVERT_AHEAD_PIECES = 2
_SLAB_PLANES = 8  # output planes resampled at a time while a scan decodes (read_scan's ``onto``)
_GZIP_MAGIC = b"\x1f\x8b"
# A gzip file may hold several members (BGZF, bgzip's format, writes one per 64 KiB block of data, then an empty one).
# Each member costs ~17 us to start, so members must keep producing data: at most 16 plus one per 32 KiB so far.
_GZIP_MEMBER_SLACK = 16
_GZIP_BYTES_PER_MEMBER = 32 * 1024


@dataclass(frozen=True)
class ScanLimits:
    """Caps checked before decoding. Defaults fit a 0.5 mm whole-head scan, not a gzip bomb."""

    max_input_bytes: int = 256 * MiB
    max_decompressed_bytes: int = 1 * GiB
    max_voxels: int = 64 * MiB
    # Header + extensions before the voxel data (vox_offset). NIfTI extensions (e.g. embedded DICOM headers) are
    # small; a large offset in a small gzip upload would otherwise make us inflate up to the offset for nothing.
    max_header_bytes: int = 16 * MiB


class NonFinite(enum.Enum):
    """What to do with NaN or infinite voxels."""

    REJECT = "reject"  # refuse the scan (default: a scan with NaNs usually means a broken pipeline upstream)
    ZERO = "zero"  # replace them by 0 (background), e.g. for SPM outputs that mask with NaN


class Alignment(enum.Enum):
    """How a scan's world coordinates relate to the model grid's (MNI for the bundled models)."""

    AUTO = "auto"  # MNI if the scan, taken untransformed, matches the template (registration.in_model_space), else REGISTER
    MNI = "mni"  # trust the affine: the scan is already in MNI space (e.g. registered by fMRIPrep or SPM)
    CENTER = "center"  # translate so the scan's intensity centre of mass lands on the template's; no rotation/scale
    REGISTER = "register"  # affine registration to the model's template (neuroexplain.registration), skull masked off

    @classmethod
    def parse(cls, value: str) -> Alignment:
        """The alignment named ``value``, or :class:`InvalidOptionError` listing the allowed names."""
        try:
            return cls(value)
        except ValueError:
            raise InvalidOptionError(f"alignment {value!r} is unknown; expected one of {[a.value for a in cls]}",
                                     field="alignment") from None


@dataclass(frozen=True)
class Resampled:
    """A scan's voxels already resampled onto a grid as its header places them there (``mni``), by :func:`read_scan`
    while it decoded the file (``onto``); :meth:`Placement.scan_to_model` takes it when its own mapping is ``m``."""

    m: np.ndarray  # (4, 4) grid voxel -> scan voxel
    array: np.ndarray  # grid.shape float32, read-only


@dataclass(frozen=True)
class Scan:
    """A decoded, validated 3D volume on its own grid.

    Attributes:
        data: voxel intensities, scaling applied, ``(X, Y, Z)`` float32.
        affine: voxel index -> world (mm) transform, ``(4, 4)`` float64.
        digest: SHA-256 hex digest of the bytes as received; the only identifier logs and caches may use.
        format: ``nifti1``, ``nifti2`` or ``mgh``.
        resampled: the voxels on a model grid, where :func:`read_scan` was asked for them (``onto``).
    """

    data: np.ndarray
    affine: np.ndarray
    digest: str
    format: str
    resampled: Resampled | None = field(default=None, repr=False, compare=False, kw_only=True)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Grid:
    """A model's input grid: shape and voxel -> world affine (RAS+)."""

    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)

    def _key(self) -> tuple[tuple[int, int, int], bytes]:
        return self.shape, np.asarray(self.affine, dtype=np.float64).tobytes()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grid) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "affine": np.asarray(self.affine).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        return cls(shape=tuple(int(s) for s in d["shape"]), affine=np.asarray(d["affine"], dtype=np.float64))  # type: ignore[arg-type]

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def digest_bytes(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


def read_scan(
    source: bytes | str | Path,
    *,
    volume_index: int | None = None,
    nonfinite: NonFinite = NonFinite.REJECT,
    limits: ScanLimits = ScanLimits(),
    digest: str | None = None,
    onto: Grid | None = None,
) -> Scan:
    """Decode and validate a scan from bytes or a path; the format is detected from the content, not the name.

    Args:
        source: the file's bytes, or a path to a ``.nii``, ``.nii.gz``, ``.mgh`` or ``.mgz`` file.
        volume_index: which volume of a 4D series to use (0-based); required for 4D input with more than one volume.
        nonfinite: what to do with NaN/Inf voxels.
        limits: size caps, all checked before the data is decompressed or allocated.
        digest: the SHA-256 of ``source``'s bytes where the caller has computed it already (the serving core does,
            once per request); otherwise it is computed here.
        onto: a model grid the caller will place the scan on as its header places it (``mni``, or ``auto`` that
            resolves to it): a gzipped NIfTI of more than two pieces of voxel data (4 MiB) is then resampled onto it
            slab by slab while it inflates, on the conversion thread, and :func:`neuroexplain.predict.prepare` takes
            that (``Scan.resampled``) instead of resampling after the decode. Where the mapping has a rotation (or
            the voxels are not finite) nothing is done ahead.

    Raises:
        ScanFormatError, ScanGeometryError, ScanDataError, LimitExceededError.
    """
    raw = _read_source(source, limits)
    # The digest is computed in another thread while the main one inflates (both release the GIL on large buffers).
    digest_box: list[str] = [digest] if digest else []
    hasher = None if digest else threading.Thread(target=lambda: digest_box.append(digest_bytes(raw)), daemon=True)
    if hasher is not None:
        hasher.start()
    try:
        stream = _Inflation(raw)
        head = stream.head(_HEAD_BYTES)
        kind, shape, dtype, data_offset = _parse_header(head)
        if data_offset > limits.max_header_bytes:
            raise LimitExceededError(
                f"header declares its voxel data at byte {data_offset} (vox_offset); at most "
                f"{limits.max_header_bytes} bytes of header and extensions are accepted"
            )
        _check_shape(shape, volume_index, limits)
        needed = data_offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
        if needed > limits.max_decompressed_bytes:
            raise LimitExceededError(
                f"scan would decompress to {needed} bytes; the limit is {limits.max_decompressed_bytes} bytes"
            )
        extremes, resampled = None, None
        if kind == "mgh":  # optional trailing fields follow the data; nibabel parses the whole file
            image = _nibabel_image(kind, stream.read(needed, slack=64 * 1024))
            data = _select_volume(image, shape[:3], volume_index)
            affine = np.asarray(image.affine, dtype=np.float64)
        else:
            data, affine, extremes, resampled = _nifti_voxels(kind, head, stream, shape, dtype, data_offset,
                                                              volume_index, needed, onto)
        _check_affine(affine)
        voxels, data = data, _check_finite(data, nonfinite, extremes)
        if data is not voxels:  # non-finite voxels zeroed: what was resampled ahead is not this volume
            resampled = None
    finally:
        if hasher is not None:
            hasher.join()
    return Scan(data=data, affine=affine, digest=digest_box[0], format=kind, resampled=resampled)


class _Inflation:
    """A scan file's decompressed bytes as a stream of pieces of at most :data:`_PIECE` bytes, each small enough to
    stay in the CPU's cache while it is converted: a gzip stream is inflated piece by piece (a bomb is caught at its
    cap having allocated one piece more), an uncompressed file is served as views of its own bytes."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.compressed = raw[:2] == _GZIP_MAGIC
        self._buffered: list[bytes | memoryview] = []
        self._rest = self._inflate() if self.compressed else self._views()

    def head(self, size: int) -> bytes:
        """The first ``size`` bytes (fewer if the file is shorter); they are handed out again by :meth:`pieces`."""
        held = 0
        for piece in self._rest:
            self._buffered.append(piece)
            held += len(piece)
            if held >= size:
                break
        return b"".join(memoryview(piece)[:size] for piece in self._buffered)[:size]  # not whole 2 MiB pieces

    def pieces(self, cap: int, declared: int) -> Iterator[tuple[int, bytes | memoryview]]:
        """``(offset, piece)`` from the start of the file; more than ``cap`` bytes in a gzip stream is an error (the
        header declares ``declared``), an uncompressed file ends at ``cap``."""
        offset = 0
        for piece in itertools.chain(self._buffered, self._rest):
            if offset + len(piece) > cap:
                if self.compressed:
                    raise LimitExceededError(
                        f"gzip stream decompresses to more than {cap} bytes, but the header declares {declared} "
                        "bytes (a decompression bomb or a corrupt file)"
                    )
                piece = piece[: cap - offset]
            yield offset, piece
            offset += len(piece)
            if offset >= cap and not self.compressed:
                break
        self._buffered = []
        if offset < declared:
            raise ScanFormatError(
                f"scan is truncated: its header declares {declared} bytes of header and data, but only {offset} "
                "arrived"
            )

    def read(self, declared: int, slack: int = 0) -> bytes:
        """The whole file: at least ``declared`` bytes, at most ``slack`` more."""
        return b"".join(piece for _, piece in self.pieces(declared + slack, declared))

    def _views(self) -> Iterator[memoryview]:
        view = memoryview(self.raw)
        for start in range(0, len(view), _PIECE):
            yield view[start : start + _PIECE]

    def _inflate(self) -> Iterator[bytes]:
        """The gzip stream's output. A file of several gzip members (concatenated files, BGZF blocks) is read member
        after member, as Python's gzip and nibabel read it; bytes after the last member that do not start another are
        ignored."""
        view = memoryview(self.raw)
        start = members = produced = 0
        try:
            while view[start : start + 2] == _GZIP_MAGIC:
                members += 1
                if members > _GZIP_MEMBER_SLACK + produced // _GZIP_BYTES_PER_MEMBER:
                    raise LimitExceededError(
                        f"gzip stream has more than {members - 1} members for {produced} bytes of data; expected one "
                        f"member, or blocks of at least {_GZIP_BYTES_PER_MEMBER} bytes each (BGZF)"
                    )
                d = _inflater.decompressobj(16 + zlib.MAX_WBITS)
                at = start
                while not d.eof and at < len(view):
                    tail: bytes | memoryview = view[at : at + _PIECE_IN]
                    at += len(tail)
                    while True:  # a full piece may leave output pending inside the inflater even with no input left
                        piece = d.decompress(tail, _PIECE)
                        if piece:
                            produced += len(piece)
                            yield piece
                        tail = d.unconsumed_tail
                        if not tail and len(piece) < _PIECE:
                            break
                if not d.eof:
                    raise ScanFormatError("gzip stream is truncated; expected a complete .nii.gz or .mgz file")
                start = at - len(d.unused_data)  # where this member ended: the next may begin there
        except (zlib.error, _inflater.error):
            raise ScanFormatError("gzip stream is corrupt; expected a valid .nii.gz or .mgz file") from None


def _nifti_voxels(
    kind: str, head: bytes, stream: _Inflation, shape: tuple[int, ...], dtype: np.dtype, offset: int,
    volume_index: int | None, needed: int, onto: Grid | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], Resampled | None]:
    """The selected volume, converted to float32 (scaling applied as nibabel does: ``scl_slope`` 0 or NaN means none)
    piece by piece as the stream delivers it — no second copy of the file —, and the header's best affine (sform,
    else qform)."""
    cls: Any = nib.Nifti1Header if kind == "nifti1" else nib.Nifti2Header
    try:
        hdr = cls.from_fileobj(io.BytesIO(head[: 348 if kind == "nifti1" else 540]), check=False)
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
        slope, inter = hdr.get_slope_inter()
    except Exception:  # noqa: BLE001 - nibabel raises several types for invalid headers
        raise ScanFormatError(f"{kind} file could not be parsed; expected a valid {kind} volume") from None
    spatial = (int(shape[0]), int(shape[1]), int(shape[2]))
    voxels = _Voxels(spatial, dtype, None if slope is None or (slope == 1.0 and not inter) else (slope, inter or 0.0))
    start = offset + (volume_index or 0) * voxels.nbytes
    end = start + voxels.nbytes
    converter, slabs = None, None
    if stream.compressed and voxels.nbytes > _CONVERT_AHEAD_PIECES * _PIECE:
        if onto is not None:
            try:  # only an affine the checks accept (read_scan refuses the others after the voxels, as without onto)
                _check_affine(affine)
                m = Placement(grid=onto, scan_affine=affine, scan_shape=spatial, shift_mm=np.zeros(3),
                              alignment=Alignment.MNI).voxel_map()
                slabs = _SlabResampler.start(m, onto.shape, spatial)
            except (ScanGeometryError, np.linalg.LinAlgError):
                slabs = None

        def consume(chunk: memoryview) -> None:
            nonlocal slabs
            voxels.feed(chunk)
            if slabs is not None:
                try:
                    slabs.advance(voxels.data, voxels.filled)
                except Exception:  # noqa: BLE001 - the scan is still read; prepare resamples it after the decode
                    slabs = None

        converter = _Converter(consume)
    try:
        for at, piece in stream.pieces(needed, needed):
            lo, hi = max(at, start), min(at + len(piece), end)
            if lo < hi:
                (converter.put if converter is not None else voxels.feed)(memoryview(piece)[lo - at : hi - at])
    finally:
        if converter is not None:
            converter.join()
    resampled = None
    if slabs is not None and math.isfinite(voxels.lo) and math.isfinite(voxels.hi):
        try:
            resampled = Resampled(slabs.m, slabs.finish(voxels.data))
        except Exception:  # noqa: BLE001 - as in consume(): resampled after the decode instead
            resampled = None
    return voxels.data.reshape(spatial, order="F"), affine, (voxels.lo, voxels.hi), resampled


class _Converter:
    """Feeds inflated pieces to a consumer on a thread of its own, in order, so that converting one piece overlaps
    inflating the next (both release the GIL): the inflate is the reader's floor, and the conversion no longer adds
    to it. At most :data:`_CONVERT_QUEUE` pieces wait, so a slow consumer holds the inflater back instead of
    buffering the file."""

    def __init__(self, consume: Callable[[memoryview], None]) -> None:
        self._queue: queue.Queue[memoryview | None] = queue.Queue(_CONVERT_QUEUE)
        self._consume = consume
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="scan-convert", daemon=True)
        self._thread.start()

    def put(self, piece: memoryview) -> None:
        self._queue.put(piece)

    def join(self) -> None:
        """Wait until every piece put so far is consumed (also after the producer failed); a consumer's error is
        raised here."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            if self._error is None:  # after an error the rest is only drained: the producer never blocks
                try:
                    self._consume(piece)
                except BaseException as exc:  # noqa: BLE001 - raised again in the producer's thread by join()
                    self._error = exc


class _Voxels:
    """A float32 volume filled from the file's bytes in order (the file's own Fortran voxel order: every consumer
    indexes by (X, Y, Z), and the torch resampler reads this layout without a copy), each piece converted and scaled
    while it is in cache, its extremes kept so that the finiteness check needs no pass of its own."""

    def __init__(self, spatial: tuple[int, int, int], dtype: np.dtype, scaling: tuple[float, float] | None) -> None:
        self.dtype, self.scaling = dtype, scaling
        self.data = np.empty(spatial[0] * spatial[1] * spatial[2], dtype=np.float32)
        self.nbytes = self.data.size * dtype.itemsize
        self.filled = 0
        self.lo, self.hi = math.inf, -math.inf  # NaN once any piece holds a NaN or infinity
        self._partial = b""  # a voxel split across two pieces

    def feed(self, chunk: memoryview) -> None:
        size = self.dtype.itemsize
        if self._partial:
            take = size - len(self._partial)
            self._partial += bytes(chunk[:take])
            chunk = chunk[take:]
            if len(self._partial) < size:
                return
            self._convert(self._partial)
            self._partial = b""
        whole = len(chunk) - len(chunk) % size
        if whole:
            self._convert(chunk[:whole])
        self._partial = bytes(chunk[whole:])

    def _convert(self, chunk: bytes | memoryview) -> None:
        values = np.frombuffer(chunk, dtype=self.dtype)
        part = self.data[self.filled : self.filled + values.size]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to infinity is reported below, by count
            np.copyto(part, values, casting="unsafe")
            if self.scaling is not None:
                part *= np.float32(self.scaling[0])
                if self.scaling[1]:
                    part += np.float32(self.scaling[1])
        self.filled += values.size
        lo, hi = float(part.min()), float(part.max())
        if math.isfinite(lo) and math.isfinite(hi):
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        else:
            self.lo = self.hi = math.nan


def _read_source(source: bytes | str | Path, limits: ScanLimits) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ScanFormatError(f"cannot read scan file: {exc.strerror}") from None
        if path.is_dir():
            raise ScanFormatError(
                "scan is a directory; expected a NIfTI-1/-2 or MGH/MGZ file (DICOM series directories are not "
                "accepted yet: convert the series to NIfTI)"
            )
        if size > limits.max_input_bytes:
            raise LimitExceededError(f"scan file is {size} bytes; the limit is {limits.max_input_bytes} bytes")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ScanFormatError(f"cannot read scan file: {exc.strerror}") from None
    if len(raw) > limits.max_input_bytes:
        raise LimitExceededError(f"scan is {len(raw)} bytes; the limit is {limits.max_input_bytes} bytes")
    if len(raw) < 4:
        raise ScanFormatError(f"scan is {len(raw)} bytes long; expected a NIfTI-1, NIfTI-2 or MGH/MGZ file")
    return raw


def _parse_header(head: bytes) -> tuple[str, tuple[int, ...], np.dtype, int]:
    """Read only the header: format, full shape, on-disk dtype, data offset. Nothing large is allocated."""
    if len(head) >= 348:
        for endian in "<>":
            (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
            if sizeof_hdr == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                if head[344:348] == b"ni1\x00":
                    raise ScanFormatError("NIfTI header/image pairs (.hdr/.img) are not accepted; send a single .nii")
                return _nifti_header(nib.Nifti1Header, head[:348], "nifti1")
            if sizeof_hdr == 540 and len(head) >= 540 and head[4:8] == b"n+2\x00":
                return _nifti_header(nib.Nifti2Header, head[:540], "nifti2")
    if len(head) >= _MGH_HEADER_BYTES and struct.unpack(">i", head[:4])[0] == 1:
        width, height, depth, frames, type_code = struct.unpack(">iiiii", head[4:24])
        if type_code not in _MGH_DTYPES:
            raise ScanFormatError(f"MGH data type code {type_code} is not supported; expected one of 0, 1, 3, 4")
        return "mgh", (width, height, depth, frames), _MGH_DTYPES[type_code], _MGH_HEADER_BYTES
    raise ScanFormatError("unrecognised file format (no NIfTI-1, NIfTI-2 or MGH magic); expected .nii, .nii.gz, .mgh or .mgz")


def _nifti_header(cls: Any, head: bytes, kind: str) -> tuple[str, tuple[int, ...], np.dtype, int]:
    try:
        hdr = cls.from_fileobj(io.BytesIO(head), check=False)
        dtype = hdr.get_data_dtype()
    except Exception:  # noqa: BLE001 - nibabel raises several types for unknown datatype codes
        raise ScanFormatError(f"{kind} header is invalid (unknown data type code); expected a numeric volume") from None
    dims = [int(x) for x in hdr["dim"]]
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise ScanFormatError(f"{kind} header declares {ndim} dimensions; a NIfTI file has 1 to 7")
    if dtype.newbyteorder("=") not in _ALLOWED_DTYPES:
        raise ScanFormatError(f"voxel data type {dtype.name} is not supported; expected an integer or real type")
    return kind, tuple(dims[1 : ndim + 1]), dtype, _vox_offset(hdr, kind, len(head))


def _vox_offset(hdr: Any, kind: str, header_bytes: int) -> int:
    """The data offset, checked before use: finite, a whole number, not inside the header; and the header's other
    numeric fields finite (pixdim, scl_slope/scl_inter: NaN scaling means "none" in NIfTI, infinity is invalid)."""
    offset = float(hdr["vox_offset"])
    if not math.isfinite(offset) or offset != int(offset):
        raise ScanFormatError(
            f"{kind} header field vox_offset is {offset!r}; expected a whole number of bytes from {header_bytes + 4}"
        )
    if int(offset) < header_bytes:
        raise ScanFormatError(
            f"{kind} header field vox_offset is {int(offset)}, inside the {header_bytes}-byte header; expected at "
            f"least {header_bytes + 4} for a single-file NIfTI"
        )
    ndim = int(hdr["dim"][0])
    pixdim = [float(x) for x in hdr["pixdim"][: ndim + 1]]
    if not all(math.isfinite(x) for x in pixdim):
        raise ScanFormatError(f"{kind} header field pixdim holds NaN or infinite voxel sizes; expected finite values")
    for name in ("scl_slope", "scl_inter"):
        value = float(hdr[name])
        if math.isinf(value):
            raise ScanFormatError(f"{kind} header field {name} is infinite; expected a finite number (or 0/NaN: none)")
    return int(offset)


def _check_shape(shape: tuple[int, ...], volume_index: int | None, limits: ScanLimits) -> None:
    if any(s < 1 for s in shape):
        raise ScanGeometryError(f"header declares shape {shape}; every dimension must be at least 1")
    trailing = [s for s in shape[4:] if s != 1]
    if len(shape) < 3 or trailing:
        raise ScanGeometryError(
            f"volume has {len(shape)} dimensions {shape}; expected 3, or 4 with volume_index "
            "(dimensions past the fourth must be 1)"
        )
    if min(shape[:3]) < 2:
        raise ScanGeometryError(f"volume has shape {shape[:3]}; a 3D scan needs at least 2 voxels along each axis")
    nvox = int(np.prod(shape, dtype=object))
    if nvox > limits.max_voxels:
        raise LimitExceededError(f"volume has {nvox} voxels {shape}; the limit is {limits.max_voxels} voxels")
    volumes = shape[3] if len(shape) >= 4 else 1
    if volumes > 1 and volume_index is None:
        raise ScanGeometryError(
            f"volume has 4 dimensions {shape[:4]}; expected 3, or set volume_index (0 to {volumes - 1})"
        )
    if volume_index is not None and not 0 <= volume_index < volumes:
        raise InvalidOptionError(f"volume_index {volume_index} is out of range; this scan has volumes 0 to {volumes - 1}")


def _nibabel_image(kind: str, raw: bytes) -> Any:
    cls: Any = {"nifti1": nib.Nifti1Image, "nifti2": nib.Nifti2Image, "mgh": nib.MGHImage}[kind]
    try:
        return cls.from_bytes(raw)
    except Exception:  # noqa: BLE001 - nibabel's parse errors have no common base class
        raise ScanFormatError(f"{kind} file could not be parsed; expected a valid {kind} volume") from None


def _select_volume(image: Any, spatial: tuple[int, ...], volume_index: int | None) -> np.ndarray:
    proxy = image.dataobj  # reads only the selected volume of a 4D series
    index: tuple[Any, ...] = (slice(None),) * 3 + (volume_index or 0,) * (len(proxy.shape) - 3)
    try:
        data = np.asarray(proxy[index], dtype=np.float32)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - truncated or corrupt data fails in zlib, numpy or nibabel
        raise ScanFormatError("voxel data could not be read; the file is truncated or corrupt") from None
    return np.ascontiguousarray(data.reshape(spatial))


def _check_affine(affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)):
        raise ScanGeometryError("affine contains NaN or infinite values; expected a finite voxel-to-world transform")
    det = float(np.linalg.det(affine[:3, :3]))
    if abs(det) < 1e-6:
        raise ScanGeometryError(
            f"affine is singular (determinant {det:.3g}); expected non-zero voxel sizes along three independent axes"
        )
    # Finite is not enough: a 1e308 mm voxel overflows every extent computed from it (registration, resampling).
    step = float(np.abs(affine[:3, :3]).max())  # the largest step along any axis, in mm
    if step > MAX_VOXEL_MM:
        raise ScanGeometryError(f"affine steps {step:.3g} mm between neighbouring voxels; the most allowed is "
                                f"{MAX_VOXEL_MM:g} mm")
    origin = float(np.abs(affine[:3, 3]).max())
    if origin > MAX_ORIGIN_MM:
        raise ScanGeometryError(f"affine puts the first voxel {origin:.3g} mm from the origin; the most allowed is "
                                f"{MAX_ORIGIN_MM:g} mm")


def _check_finite(data: np.ndarray, nonfinite: NonFinite, extremes: tuple[float, float] | None = None) -> np.ndarray:
    """``extremes``: the data's minimum and maximum where the caller has them already (NaN where it holds a NaN or an
    infinity), so this costs no pass over the data.

    The usual case costs two reductions and no mask: a NaN makes the minimum NaN and an infinity is an extreme, and
    finite extremes that are not both 0 also prove the scan is not all zeros."""
    lo, hi = extremes if extremes is not None else (data.min(), data.max())
    if np.isfinite(lo) and np.isfinite(hi):
        if lo == 0 and hi == 0:
            raise ScanDataError("scan is all zeros; expected an MRI volume with signal")
        return data
    bad = ~np.isfinite(data)
    if nonfinite is NonFinite.REJECT:
        raise ScanDataError(
            f"scan has {int(np.count_nonzero(bad))} NaN or infinite voxels (after scl_slope/scl_inter); "
            "fix the file or pass nonfinite='zero' to treat them as background"
        )
    data = np.where(bad, np.float32(0), data)
    if not np.any(data):
        raise ScanDataError("scan is all zeros; expected an MRI volume with signal")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Writing results


def nifti_bytes(data: np.ndarray, affine: np.ndarray, *, compress: bool = True) -> bytes:
    """Encode a float32 NIfTI-1 with a fresh header: only geometry travels, never text fields or extensions."""
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


# ---------------------------------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Placement:
    """Where a scan sits relative to a model grid: a world transform applied to the scan before resampling.

    ``world`` (scan world mm -> model world mm, ``(4, 4)``) is set by registration; without it the transform is the
    translation ``shift_mm``. ``model_mask`` (``grid.shape`` bool, registration only) zeroes everything outside the
    template's dilated brain in :meth:`to_model` (a skull on the input). ``registration`` is what
    :func:`neuroexplain.registration.register` reported.
    """

    grid: Grid
    scan_affine: np.ndarray
    scan_shape: tuple[int, int, int]
    shift_mm: np.ndarray  # (3,)
    alignment: Alignment  # the alignment actually used (AUTO resolved)
    world: np.ndarray | None = None  # (4, 4) scan world -> model world; overrides shift_mm
    model_mask: np.ndarray | None = field(default=None, repr=False)
    registration: Any = None  # neuroexplain.registration.RegistrationResult (not imported here: no import cycle)

    def _scan_to_model_world(self) -> np.ndarray:
        if self.world is not None:
            return np.asarray(self.world, dtype=np.float64)
        t = np.eye(4)
        t[:3, 3] = self.shift_mm
        return t

    def voxel_map(self) -> np.ndarray:
        """Model voxel -> model world -> scan world -> scan voxel, ``(4, 4)``."""
        return np.linalg.inv(self.scan_affine) @ np.linalg.inv(self._scan_to_model_world()) @ self.grid.affine

    def to_model(self, data: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Resample a scan-grid array onto the model grid (masked by ``model_mask``). ``(X, Y, Z)`` -> ``grid.shape``."""
        out = _affine_resample_fast(data, self.voxel_map(), self.grid.shape, order)
        return out * self.model_mask if self.model_mask is not None else out

    def scan_to_model(self, scan: Scan) -> np.ndarray:
        """:meth:`to_model` of ``scan.data`` — the resampling :func:`read_scan` did while decoding (``onto``) when it
        is this very mapping (read-only then), else computed now."""
        ahead = scan.resampled
        if (ahead is not None and self.model_mask is None and ahead.array.shape == tuple(self.grid.shape)
                and np.array_equal(ahead.m, self.voxel_map())):
            return ahead.array
        return self.to_model(scan.data)

    def to_native(self, data: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Resample a model-grid array back onto the scan's own grid. ``grid.shape`` -> ``(X, Y, Z)``."""
        m = np.linalg.inv(self.grid.affine) @ self._scan_to_model_world() @ self.scan_affine
        return _affine_resample_fast(data, m, self.scan_shape, order)

    def world_to_native(self, model_world: np.ndarray) -> np.ndarray:
        """Model-space world coordinates (mm) -> the scan's own world coordinates. ``(N, 3)`` -> ``(N, 3)``."""
        p = np.asarray(model_world, dtype=np.float64)
        if self.world is None:
            return p - self.shift_mm
        inv = np.linalg.inv(np.asarray(self.world, dtype=np.float64))
        return p @ inv[:3, :3].T + inv[:3, 3]


def _affine_resample(data: np.ndarray, m: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    out = ndimage.affine_transform(
        np.asarray(data, dtype=np.float32), m[:3, :3], offset=m[:3, 3], output_shape=shape, order=order,
        mode="constant", cval=0.0, prefilter=False,
    )
    return out.astype(np.float32, copy=False)


def _affine_resample_fast(data: np.ndarray, m: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    """:func:`_affine_resample` (the scipy reference) for ``order=1`` in torch, the same geometry (output voxel ``o``
    samples input index ``m @ o``) and the same edge rule (``mode="constant"``: a sample outside ``[0, n-1]`` along
    any axis is 0). Where ``m`` has no rotation or shear (``mni``/``center`` placements of scans stored along the
    grid's axes, e.g. a 1 mm MNI scan onto a 2 mm grid, and the maps going back), trilinear interpolation is
    separable: three 1D passes (:func:`_separable_trilinear`), a fraction of the 3D ``grid_sample``'s time (which runs
    on one thread for one volume); any other ``m`` goes to ``grid_sample``. Other orders go to scipy."""
    if order != 1:
        return _affine_resample(data, m, shape, order)
    if data.ndim == 3 and _is_diagonal(m):
        return _separable_trilinear(data, m, shape)
    return resample_torch(data, m, shape).numpy()


def _is_diagonal(m: np.ndarray) -> bool:
    """Whether the mapping's linear part has no rotation or shear (to rounding): trilinear is then separable."""
    linear = np.asarray(m, dtype=np.float64)[:3, :3]
    return bool(np.abs(linear - np.diag(np.diag(linear))).max() <= 1e-9 * np.abs(linear).max())


def _separable_trilinear(data: np.ndarray, m: np.ndarray, shape: tuple[int, ...],
                         axes: tuple[int, ...] | None = None, *, into: np.ndarray | None = None) -> np.ndarray:
    """``out[o] = data[m @ o]`` with trilinear weights for a diagonal ``m``; 0 where a sample falls outside
    ``[0, n-1]`` along any axis (scipy's ``mode="constant"``, ``cval=0``). ``axes``: the order of the passes (data
    axes; default :func:`_pass_order`'s). ``into``: an array of ``shape`` to write the result into (a slab of a
    larger output: one copy instead of a C-ordered result copied again), else a new C-ordered array."""
    import torch

    array = np.asarray(data, dtype=np.float32)
    perm = _view_perm(array)
    out = torch.from_numpy(array).permute(perm)
    for axis in axes if axes is not None else _pass_order(array.shape, shape, perm):
        view_axis = perm.index(axis)
        n = int(array.shape[axis])
        strided = _strided_lerp(out, view_axis, n, float(m[axis, axis]), float(m[axis, 3]), int(shape[axis]))
        if strided is not None:
            out = strided
            continue
        pos = m[axis, axis] * np.arange(shape[axis], dtype=np.float64) + m[axis, 3]
        inside = (pos >= 0) & (pos <= n - 1)
        p = np.clip(pos, 0, n - 1)
        lo = np.minimum(np.floor(p).astype(np.int64), max(n - 2, 0))
        hi = np.minimum(lo + 1, n - 1)
        w_hi = np.where(inside, p - lo, 0.0).astype(np.float32)
        w_lo = np.where(inside, 1.0 - (p - lo), 0.0).astype(np.float32)
        view = [1, 1, 1]
        view[view_axis] = -1
        a = out.index_select(view_axis, torch.from_numpy(lo))
        b = out.index_select(view_axis, torch.from_numpy(hi))
        out = a.mul_(torch.from_numpy(w_lo).view(view)).add_(b.mul_(torch.from_numpy(w_hi).view(view)))
    result = out.permute(perm).numpy()
    if into is None:
        return np.ascontiguousarray(result)
    into[...] = result
    return into


def _view_perm(array: np.ndarray) -> tuple[int, int, int]:
    """The passes work on a C-ordered view (a scan read from NIfTI is Fortran-ordered: its view reversed), so each
    pass writes in the layout it reads."""
    return (2, 1, 0) if array.flags.f_contiguous and not array.flags.c_contiguous else (0, 1, 2)


def _pass_order(in_shape: tuple[int, ...], shape: tuple[int, ...], perm: tuple[int, int, int]) -> tuple[int, ...]:
    """The data axes in the order :func:`_separable_trilinear` resamples them: the one that shrinks the volume most
    first (every later pass reads less), and among those that shrink alike the outermost of the C-ordered view
    (``perm``: whole contiguous planes are read with a stride; a stride along the contiguous axis does not
    vectorise)."""
    return tuple(perm[p] for p in sorted(range(3), key=lambda p: (shape[perm[p]] / max(int(in_shape[perm[p]]), 1), p)))


class _SlabResampler:
    """:func:`_separable_trilinear` of a volume while it is being decoded (``read_scan(onto=...)``): the output
    planes along the file's slowest axis (Z) are computed slab by slab on the conversion thread, each slab as soon
    as every input plane it reads has been converted, with the whole volume's pass order, so that only the last slab
    is left when the inflate ends. Only for a diagonal ``m`` whose Z step is positive (:meth:`start`)."""

    def __init__(self, m: np.ndarray, shape: tuple[int, int, int], spatial: tuple[int, int, int]) -> None:
        self.m, self.shape, self.spatial = m, shape, spatial
        n = spatial[2]
        pos = m[2, 2] * np.arange(shape[2], dtype=np.float64) + m[2, 3]
        lo = np.minimum(np.floor(np.clip(pos, 0, n - 1)).astype(np.int64), max(n - 2, 0))
        self._first, self._last = lo, np.minimum(lo + 1, n - 1)  # the input planes each output plane reads
        self._axes = _pass_order(spatial, shape, (2, 1, 0))  # the whole volume's: it is decoded in Fortran order
        self.out = np.empty(shape, dtype=np.float32)
        self._done = 0

    @classmethod
    def start(cls, m: np.ndarray, shape: tuple[int, int, int], spatial: tuple[int, int, int]) -> _SlabResampler | None:
        """The resampler of this mapping, or None where it has a rotation or shear, a Z axis that runs backwards, or
        is not finite."""
        if not np.isfinite(m).all() or not _is_diagonal(m):
            return None
        return cls(m, shape, spatial) if m[2, 2] > 0 else None

    def advance(self, data: np.ndarray, filled: int) -> None:
        """``filled`` voxels of ``data`` (flat, Fortran order) are converted: compute the slab they complete."""
        planes = filled // (self.spatial[0] * self.spatial[1])
        ready = int(np.searchsorted(self._last, planes - 1, side="right"))
        if ready - self._done >= _SLAB_PLANES:
            self._compute(data, ready)

    def finish(self, data: np.ndarray) -> np.ndarray:
        self._compute(data, self.shape[2])
        self.out.flags.writeable = False
        return self.out

    def _compute(self, data: np.ndarray, ready: int) -> None:
        j0, j1 = self._done, ready
        if j1 <= j0:
            return
        s, e = int(self._first[j0]), int(self._last[j1 - 1]) + 1
        sub = self.m.copy()
        sub[2, 3] = self.m[2, 2] * j0 + self.m[2, 3] - s  # output plane j0 is the slab's plane 0
        volume = data.reshape(self.spatial, order="F")[:, :, s:e]
        _separable_trilinear(volume, sub, (self.shape[0], self.shape[1], j1 - j0), self._axes,
                             into=self.out[:, :, j0:j1])
        self._done = j1


def _strided_lerp(x: torch.Tensor, axis: int, n: int, step: float, offset: float, size: int) -> torch.Tensor | None:
    """One axis of :func:`_separable_trilinear` where the samples are ``step * j + offset`` with a positive whole
    ``step`` (e.g. 1 mm onto 2 mm): every sample has the same fractional position, so the two neighbours are strided
    views (no gather); None for any other step."""
    import torch

    k = round(step)
    if k < 1 or abs(step - k) > 1e-9:
        return None
    j = np.arange(size, dtype=np.float64)
    pos = step * j + offset
    valid = np.flatnonzero((pos >= 0) & (pos <= n - 1))
    out_shape = list(x.shape)
    out_shape[axis] = size
    if valid.size == 0:
        return torch.zeros(out_shape, dtype=x.dtype)
    j0, count = int(valid[0]), int(valid.size)
    out = torch.empty(out_shape, dtype=x.dtype)
    out.narrow(axis, 0, j0).zero_()  # samples outside the scan are 0; the valid run is written below
    out.narrow(axis, j0 + count, size - j0 - count).zero_()
    first = float(pos[j0])
    lo = int(np.floor(first))
    frac = first - lo
    if abs(frac) <= 1e-9 * max(1.0, abs(first)):  # samples on voxel centres: a strided copy
        frac = 0.0
    a = x.narrow(axis, lo, k * (count - 1) + 1)[(slice(None),) * axis + (slice(None, None, k),)]
    target = out.narrow(axis, j0, count)
    if frac == 0.0:
        target.copy_(a)
        return out
    b = x.narrow(axis, lo + 1, k * (count - 1) + 1)[(slice(None),) * axis + (slice(None, None, k),)]
    torch.lerp(a, b, frac, out=target)  # a + frac (b - a): one pass, no temporary
    return out


def resample_torch(
    data: np.ndarray | torch.Tensor, m: np.ndarray, shape: tuple[int, int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Trilinear resampling of a 3D array: ``out[o] = data[m @ o]`` (voxel indices, ``m`` ``(4, 4)``), 0 outside.

    Runs on ``device`` (the CPU with all its threads, or a GPU); returns a ``shape`` float32 tensor there. An input in
    Fortran order (as decoded) is read in place as its C-ordered transpose.
    """
    import torch
    if isinstance(data, np.ndarray):
        arr = np.asarray(data, dtype=np.float32)
        fortran = arr.ndim == 3 and arr.flags.f_contiguous and not arr.flags.c_contiguous
        x = torch.from_numpy(arr.T if fortran else np.ascontiguousarray(arr))
    else:
        fortran, x = False, data.contiguous()
    in_shape = tuple(int(n) for n in (x.shape[::-1] if fortran else x.shape))  # (X, Y, Z)
    vol = x.to(device=device, dtype=torch.float32)

    def norm(n: tuple[int, ...]) -> np.ndarray:  # voxel index -> normalised coordinate (align_corners=True)
        a = np.eye(4)
        for k, size in enumerate(n):
            a[k, k] = 2.0 / max(size - 1, 1)
            a[k, 3] = -1.0
        return a

    # t: output normalised -> input normalised, both in (X, Y, Z) order. affine_grid feeds theta the output's
    # coordinates in (W, H, D) = (Z, Y, X) order (p reverses them) and grid_sample reads the components as the
    # input's (W, H, D): (Z, Y, X) for a C-ordered (X, Y, Z) input, (X, Y, Z) for a Fortran-ordered one, read in
    # place as its C-ordered (Z, Y, X) transpose.
    t = norm(in_shape) @ np.asarray(m, dtype=np.float64) @ np.linalg.inv(norm(shape))
    p = np.eye(4)[[2, 1, 0, 3]]
    theta = t @ p if fortran else p @ t @ p
    # The grid in float64: scipy's edge test is exact, and a sample within float32 rounding of an edge would
    # otherwise fall on the wrong side of it (0 in scipy, the edge voxel here).
    theta_t = torch.as_tensor(theta[:3], dtype=torch.float64, device=device)[None]
    grid64 = torch.nn.functional.affine_grid(theta_t, [1, 1, *shape], align_corners=True)
    inside = (grid64.abs() <= 1.0 + 1e-12).all(dim=-1)[0]
    grid = grid64.to(torch.float32)
    del grid64
    out = torch.nn.functional.grid_sample(vol[None, None], grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)[0, 0]
    return out * inside


def center_of_mass_world(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre of mass of the foreground (above 10% of the 99th percentile), in world mm."""
    sub = np.asarray(data[::2, ::2, ::2], dtype=np.float32)  # every 8th voxel: plenty for a centroid
    positive = sub[sub > 0]
    if positive.size == 0:
        raise ScanDataError("scan has no positive intensities; expected an MRI volume with signal")
    threshold = 0.1 * float(np.percentile(positive, 99))
    weights = np.where(sub > threshold, sub, 0).astype(np.float64)
    com_vox = np.array(ndimage.center_of_mass(weights)) * 2
    return (affine @ np.append(com_vox, 1.0))[:3]


def place(scan: Scan, grid: Grid, template_com_mm: np.ndarray, alignment: Alignment = Alignment.AUTO) -> Placement:
    """Decide how the scan maps onto the grid (see :class:`Alignment`).

    ``AUTO`` resolves to ``MNI`` when the scan sits on the model's grid exactly (shape and affine) or, taken
    untransformed, matches the template (:func:`neuroexplain.registration.in_model_space`), else to ``REGISTER``;
    ``placement.alignment`` says which.

    Raises:
        InvalidOptionError: ``alignment`` is not an :class:`Alignment`.
        ScanDataError: no signal (``CENTER``), or :class:`neuroexplain.registration.RegistrationError` (``REGISTER``).
    """
    if not isinstance(alignment, Alignment):
        raise InvalidOptionError(f"alignment {alignment!r} is unknown; expected one of {[a.value for a in Alignment]}")
    from neuroexplain import registration  # registration imports this module

    used = alignment
    if alignment is Alignment.AUTO:
        # A scan written on the model's own grid (same shape and affine) is in the model's space by its header;
        # anything else must also look like the template untransformed, or it is registered.
        on_grid = scan.shape == tuple(grid.shape) and np.allclose(scan.affine, grid.affine, atol=1e-3)
        used = Alignment.MNI if on_grid or registration.in_model_space(scan, grid) else Alignment.REGISTER
    if used is Alignment.REGISTER:
        result = registration.register(scan, grid)
        return Placement(grid=grid, scan_affine=scan.affine, scan_shape=scan.shape, shift_mm=np.zeros(3),
                         alignment=used, world=result.transform, model_mask=registration.dilated_brain(grid),
                         registration=result)
    shift = np.zeros(3)
    if used is Alignment.CENTER:
        shift = np.asarray(template_com_mm) - center_of_mass_world(scan.data, scan.affine)
    return Placement(grid=grid, scan_affine=scan.affine, scan_shape=scan.shape, shift_mm=shift, alignment=used)


def normalise(data: np.ndarray) -> np.ndarray:
    """Scale intensities so the 99th percentile of the foreground is 1 (what the bundled models were trained on)."""
    positive = data[data > 0]
    if positive.size == 0:
        raise ScanDataError("scan has no positive intensities inside the model's field of view; is it aligned?")
    scale = percentile_99(positive[:: max(1, positive.size // 200_000)])
    out = np.clip(data, 0, None)
    np.divide(out, scale, out=out)
    return out.astype(np.float32, copy=False)


def percentile_99(values: np.ndarray) -> float:
    """``float(np.percentile(values, 99))`` (linear interpolation), bit for bit, in a quarter of its time for a
    volume's voxels: the two order statistics it interpolates are found among the values at or above a threshold
    taken from a sample (every 16th value), which hold them whenever fewer values than the lower one's rank lie
    below it (else all values are partitioned, as numpy does); the interpolation is numpy's own arithmetic."""
    x = np.asarray(values).reshape(-1)
    n = x.size
    virtual = (n - 1) * np.true_divide(99, 100)
    if n == 0 or virtual >= n - 1:
        return float(np.percentile(x, 99))
    i = int(np.floor(virtual))
    sample = x[::16]
    rank = sample.size - 3 * (-(-sample.size * (n - i) // n)) - 8  # about three times the tail above rank i
    pair = None
    if rank > 0:
        top = x[x >= np.partition(sample, rank)[rank]]
        below = n - top.size
        if below <= i:
            pair = np.partition(top, (i - below, i - below + 1))[i - below : i - below + 2]
    if pair is None:
        pair = np.partition(x, (i, i + 1))[i : i + 2]
    a, b = pair[0], pair[1]
    gamma = float(virtual - i)
    diff = b - a
    return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)  # numpy's _lerp
