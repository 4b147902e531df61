"""Series geometry from DICOM headers: slice order, frame positions, orientation, spacing and the LPS -> RAS affine.

A series' volume uses the same conventions as :class:`neuroexplain.volumes.Scan`: ``data[i, j, k]`` with ``i`` the
column index of an image, ``j`` its row index and ``k`` the slice, slices ordered along the image plane's normal
(row direction x column direction), and an affine that maps ``(i, j, k)`` to RAS+ millimetres (DICOM's patient
coordinates are LPS, so x and y change sign). :meth:`SeriesGeometry.to_volume` and :meth:`SeriesGeometry.to_frames`
map between the decoded frames ``(slices, rows, columns)`` and that volume, so a result map on the scan's grid can be
written back frame by frame onto the source series (DICOM results).

Works for single-frame MR/CT (one instance per slice) and Enhanced (multi-frame) images alike: each frame is one
:class:`FrameHeader`, with its position, orientation, spacing and rescale taken from the per-frame or shared
functional groups. Every inconsistency is refused with an :class:`~neuroexplain.dicom.errors.InconsistentSeriesError`
that says what is wrong and what is allowed; messages carry counts and millimetres, never UIDs or patient data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from neuroexplain.dicom.errors import DicomError, InconsistentSeriesError
from neuroexplain.errors import InvalidOptionError, ScanGeometryError

#: Tolerances (documented in README "DICOM input").
ORIENTATION_TOLERANCE = 1e-4  # ImageOrientationPatient components, between frames
SPACING_TOLERANCE_MM = 1e-3  # PixelSpacing, between frames
SAME_POSITION_MM = 0.01  # two frames closer than this along the normal share a slice position
UNEVEN_SPACING_FRACTION = 0.01  # a gap may differ from the median gap by at most 1 % (+ 0.001 mm)
TILT_TOLERANCE_DEG = 0.1  # angle between the slice stacking direction and the image plane's normal

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class FrameHeader:
    """What geometry and decoding need of one frame (one image plane) of a series.

    Attributes:
        instance: index of the instance it comes from, in the order the instances were given.
        frame: frame index within a multi-frame instance (0-based), ``None`` for a single-frame instance.
        rows: Rows.
        columns: Columns.
        position: ImagePositionPatient (LPS mm), ``(3,)``.
        orientation: ImageOrientationPatient (row direction, column direction), ``(6,)``.
        spacing: PixelSpacing (between rows, between columns) in mm.
        slope: RescaleSlope (1 when absent).
        intercept: RescaleIntercept (0 when absent).
        order: sort key among frames at the same position (temporal position, instance number, frame).
    """

    instance: int
    frame: int | None
    rows: int
    columns: int
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    slope: float
    intercept: float
    order: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class SeriesGeometry:
    """The geometry of one volume of a series, in slice order.

    Attributes:
        rows: Rows of every frame.
        columns: Columns of every frame.
        row_direction: unit vector along a row (LPS), IOP[0:3].
        column_direction: unit vector down a column (LPS), IOP[3:6].
        pixel_spacing: (between rows, between columns), mm.
        slice_spacing: distance between neighbouring slices along the normal, mm.
        frames: the selected volume's frames, in slice order (k = 0 ... slices - 1).
        n_volumes: how many volumes the series holds (DWI, fMRI, multi-stack); 1 for a plain 3D series.
        volume_index: which volume ``frames`` belongs to.
        affine_lps: voxel ``(i, j, k)`` -> LPS mm, ``(4, 4)``.
        affine: voxel ``(i, j, k)`` -> RAS mm, ``(4, 4)`` (what :class:`~neuroexplain.volumes.Scan` carries).
        headers: one header per frame, in slice order, pixel data stripped (a multi-frame instance's header appears
            once per frame, the same object); for building result objects that reference the source.
    """

    rows: int
    columns: int
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    frames: tuple[FrameHeader, ...]
    n_volumes: int
    volume_index: int
    affine_lps: np.ndarray
    affine: np.ndarray
    headers: tuple[Dataset, ...] = field(default=(), repr=False)

    @property
    def n_slices(self) -> int:
        """Number of slices of one volume."""
        return len(self.frames)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The volume's shape ``(columns, rows, slices)``."""
        return (self.columns, self.rows, self.n_slices)

    @property
    def normal(self) -> np.ndarray:
        """The image plane's normal (LPS), the direction slices are ordered along."""
        return np.cross(self.row_direction, self.column_direction)

    @property
    def positions(self) -> np.ndarray:
        """ImagePositionPatient of each slice (LPS mm), ``(slices, 3)``, in slice order."""
        return np.stack([f.position for f in self.frames])

    def to_volume(self, frames: np.ndarray) -> np.ndarray:
        """Frames in slice order ``(slices, rows, columns)`` -> the scan's volume ``(columns, rows, slices)``."""
        frames = np.asarray(frames)
        expected = (self.n_slices, self.rows, self.columns)
        if frames.shape != expected:
            raise ScanGeometryError(f"frames have shape {frames.shape}; expected {expected} (slices, rows, columns)")
        return np.ascontiguousarray(frames.transpose(2, 1, 0))

    def to_frames(self, volume: np.ndarray) -> np.ndarray:
        """The scan's volume ``(columns, rows, slices)`` -> frames in slice order ``(slices, rows, columns)``."""
        volume = np.asarray(volume)
        if volume.shape != self.shape:
            raise ScanGeometryError(f"volume has shape {volume.shape}; expected {self.shape} (columns, rows, slices)")
        return np.ascontiguousarray(volume.transpose(2, 1, 0))


def _seq_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    if seq is None or len(seq) == 0:
        return None
    item = seq[0]
    return item if isinstance(item, Dataset) else None


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise DicomError(f"{what} is not a list of numbers; expected {n} decimal values") from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise DicomError(f"{what} has {out.size} values; expected {n} finite decimal values")
    return out


def _number(value: Any, default: float, what: str) -> float:
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DicomError(f"{what} is not a number; expected a decimal value") from None
    if not np.isfinite(out):
        raise DicomError(f"{what} is not finite; expected a finite decimal value")
    return out


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def frame_headers(ds: Dataset, instance: int) -> list[FrameHeader]:
    """The frames of one image instance (single-frame: one; Enhanced/multi-frame: NumberOfFrames).

    Args:
        ds: the instance's header (pixel data need not be loaded).
        instance: its index among the instances as given.

    Returns:
        One :class:`FrameHeader` per frame, in the instance's frame order.

    Raises:
        DicomError: a required geometry attribute is missing or not numeric.
    """
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if rows < 1 or columns < 1:
        raise DicomError("an image has no Rows/Columns; every image object needs both (at least 1)")
    number = _int(ds.get("InstanceNumber"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise DicomError(f"an image lacks {keyword}; geometry needs ImagePositionPatient, "
                                 "ImageOrientationPatient and PixelSpacing on every image")
        temporal = _int(ds.get("TemporalPositionIdentifier"))
        return [
            FrameHeader(
                instance=instance,
                frame=None,
                rows=rows,
                columns=columns,
                position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                spacing=tuple(_floats(ds.PixelSpacing, 2, "PixelSpacing")),  # type: ignore[arg-type]
                slope=_number(ds.get("RescaleSlope"), 1.0, "RescaleSlope"),
                intercept=_number(ds.get("RescaleIntercept"), 0.0, "RescaleIntercept"),
                order=(temporal, _int(ds.get("AcquisitionNumber")), number, 0),
            )
        ]
    n_frames = _int(ds.get("NumberOfFrames"), 1)
    if len(per_frame) != n_frames:
        raise DicomError(
            f"a multi-frame image declares {n_frames} frames but has {len(per_frame)} per-frame functional groups; "
            "expected one group per frame"
        )
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence") or Dataset()

    def group(item: Dataset, keyword: str) -> Dataset | None:
        return _seq_item(item, keyword) or _seq_item(shared, keyword)

    frames = []
    for f, item in enumerate(per_frame):
        plane, orient, measures = (
            group(item, "PlanePositionSequence"),
            group(item, "PlaneOrientationSequence"),
            group(item, "PixelMeasuresSequence"),
        )
        if plane is None or orient is None or measures is None or "PixelSpacing" not in measures:
            raise DicomError(
                "a frame of a multi-frame image lacks its plane position, plane orientation or pixel measures; "
                "geometry needs all three (per-frame or shared functional groups)"
            )
        transform = group(item, "PixelValueTransformationSequence") or Dataset()
        content = _seq_item(item, "FrameContentSequence") or Dataset()
        frames.append(
            FrameHeader(
                instance=instance,
                frame=f,
                rows=rows,
                columns=columns,
                position=_floats(plane.get("ImagePositionPatient"), 3, "ImagePositionPatient"),
                orientation=_floats(orient.get("ImageOrientationPatient"), 6, "ImageOrientationPatient"),
                spacing=tuple(_floats(measures.PixelSpacing, 2, "PixelSpacing")),  # type: ignore[arg-type]
                slope=_number(transform.get("RescaleSlope"), 1.0, "RescaleSlope"),
                intercept=_number(transform.get("RescaleIntercept"), 0.0, "RescaleIntercept"),
                order=(_int(content.get("TemporalPositionIndex")), 0, number, f),
            )
        )
    return frames


def series_geometry(
    frames: Sequence[FrameHeader],
    *,
    volume_index: int | None = None,
    headers: Sequence[Dataset] = (),
) -> SeriesGeometry:
    """Check a series' frames for consistency and compute the geometry of one of its volumes.

    Args:
        frames: every frame of the series (any order).
        volume_index: which volume to use when the series holds several (0-based, in temporal / instance order).
        headers: the instances' stripped headers, indexed by :attr:`FrameHeader.instance` (optional).

    Returns:
        The geometry, its frames in slice order.

    Raises:
        InconsistentSeriesError: mixed size, orientation or spacing; duplicate or missing slices; uneven spacing;
            gantry tilt.
        ScanGeometryError: fewer than 2 slices, rows or columns; several volumes and no ``volume_index``.
        InvalidOptionError: ``volume_index`` out of range.
    """
    if not frames:
        raise DicomError("the series has no image frames; expected at least 2 slices")
    first = frames[0]
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes)[:4])
        raise InconsistentSeriesError(
            f"series mixes {len(sizes)} image sizes (rows x columns: {shown}); every image of a series must have "
            "the same size"
        )
    iops = np.stack([f.orientation for f in frames])
    if np.max(np.abs(iops - iops[0])) > ORIENTATION_TOLERANCE:
        raise InconsistentSeriesError(
            "series mixes image orientations (ImageOrientationPatient differs by up to "
            f"{np.max(np.abs(iops - iops[0])):.3g}); every image must share one orientation (tolerance "
            f"{ORIENTATION_TOLERANCE}) — send each stack as its own series"
        )
    spacings = np.array([f.spacing for f in frames])
    if np.max(np.abs(spacings - spacings[0])) > SPACING_TOLERANCE_MM:
        raise InconsistentSeriesError(
            f"series mixes pixel spacings ({spacings.min():.4g} to {spacings.max():.4g} mm); every image must share "
            f"one PixelSpacing (tolerance {SPACING_TOLERANCE_MM} mm)"
        )
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(float(row_dir @ col_dir)) > 1e-3
    ):
        raise InconsistentSeriesError(
            "ImageOrientationPatient is not two orthogonal unit vectors; expected row and column direction "
            "cosines (unit length and orthogonal within 0.001)"
        )
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    if first.spacing[0] <= 0 or first.spacing[1] <= 0:
        raise InconsistentSeriesError(f"PixelSpacing is {first.spacing}; expected two positive values (mm)")
    normal = np.cross(row_dir, col_dir)

    # Group frames into slice positions along the normal; several frames at one position are several volumes.
    along = np.array([float(f.position @ normal) for f in frames])
    order = sorted(range(len(frames)), key=lambda n: (along[n], frames[n].order, n))
    groups: list[list[int]] = []
    for n in order:
        if groups and along[n] - along[groups[-1][0]] < SAME_POSITION_MM:
            groups[-1].append(n)
        else:
            groups.append([n])
    counts = {len(g) for g in groups}
    if len(counts) > 1:
        raise InconsistentSeriesError(
            f"series has duplicate or missing slices: its {len(groups)} slice positions hold between {min(counts)} "
            f"and {max(counts)} images each; every position must hold the same number of images (one per volume)"
        )
    n_volumes = counts.pop()
    for g in groups:
        spread = max(float(np.linalg.norm(frames[n].position - frames[g[0]].position)) for n in g)
        if spread > SAME_POSITION_MM * 10:
            raise InconsistentSeriesError(
                f"series has images at the same slice location but {spread:.3g} mm apart in-plane; "
                "every volume of a series must share the same slice positions"
            )
    if len(groups) < 2 or first.rows < 2 or first.columns < 2:
        raise ScanGeometryError(
            f"series has {len(groups)} slice position(s) of {first.rows}x{first.columns} pixels; a 3D scan needs "
            "at least 2 slices, rows and columns"
        )
    if n_volumes > 1 and volume_index is None:
        raise ScanGeometryError(
            f"series holds {n_volumes} volumes ({len(groups)} slices each); expected one volume, or set "
            f"volume_index (0 to {n_volumes - 1})"
        )
    index = volume_index or 0
    if not 0 <= index < n_volumes:
        raise InvalidOptionError(
            f"volume_index {index} is out of range; this series has volumes 0 to {n_volumes - 1}"
        )
    chosen = tuple(frames[sorted(g, key=lambda n: (frames[n].order, n))[index]] for g in groups)

    gaps = np.diff(along[[g[0] for g in groups]])
    median = float(np.median(gaps))
    allowed = UNEVEN_SPACING_FRACTION * median + 1e-3
    if np.max(np.abs(gaps - median)) > allowed:
        raise InconsistentSeriesError(
            f"series has uneven slice spacing: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm (median "
            f"{median:.4g} mm); at most {100 * UNEVEN_SPACING_FRACTION:g}% + 0.001 mm deviation is allowed "
            "(a missing slice, or several stacks in one series?)"
        )
    positions = np.stack([f.position for f in chosen])
    step = (positions[-1] - positions[0]) / (len(chosen) - 1)
    cos_tilt = float(step @ normal) / float(np.linalg.norm(step))
    tilt = float(np.degrees(np.arccos(np.clip(cos_tilt, -1.0, 1.0))))
    if tilt > TILT_TOLERANCE_DEG:
        raise InconsistentSeriesError(
            f"slices are stacked {tilt:.2f} degrees off their planes' normal (gantry tilt or sheared stack); at "
            f"most {TILT_TOLERANCE_DEG} degrees is allowed — resample the series without tilt first"
        )
    expected = positions[0] + np.arange(len(chosen))[:, None] * step
    if np.max(np.linalg.norm(positions - expected, axis=1)) > allowed:
        raise InconsistentSeriesError(
            "slice positions do not lie on one straight line; expected evenly stacked parallel slices "
            f"(tolerance {allowed:.3g} mm)"
        )

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * first.spacing[1]  # i: along a row, one column further
    affine_lps[:3, 1] = col_dir * first.spacing[0]  # j: down a column, one row further
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    frame_headers_ = tuple(headers[f.instance] for f in chosen) if headers else ()
    return SeriesGeometry(
        rows=first.rows,
        columns=first.columns,
        row_direction=row_dir,
        column_direction=col_dir,
        pixel_spacing=(float(first.spacing[0]), float(first.spacing[1])),
        slice_spacing=median,
        frames=chosen,
        n_volumes=n_volumes,
        volume_index=index,
        affine_lps=affine_lps,
        affine=_LPS_TO_RAS @ affine_lps,
        headers=frame_headers_,
    )
