"""DICOM in the library: series -> scan (:mod:`.reader`, :mod:`.geometry`) and, beside it, DICOM results.

Serving code calls :func:`read_series` (wire: ``Scan.dicom.instances``) or :func:`read_series_dir` (CLI: a
directory); both return a :class:`DicomScan`, a :class:`neuroexplain.volumes.Scan` with its :class:`SeriesGeometry`.
"""

from neuroexplain.dicom.errors import (
    DicomError,
    InconsistentSeriesError,
    NoImageError,
    PixelDataError,
    SeriesNotFoundError,
    SeveralSeriesError,
    TransferSyntaxError,
)
from neuroexplain.dicom.geometry import FrameHeader, SeriesGeometry, frame_headers, series_geometry
from neuroexplain.dicom.reader import (
    DicomLimits,
    DicomScan,
    is_dicom,
    read_any,
    read_series,
    read_series_dir,
    series_digest,
)

__all__ = [
    "DicomError",
    "DicomLimits",
    "DicomScan",
    "FrameHeader",
    "InconsistentSeriesError",
    "NoImageError",
    "PixelDataError",
    "SeriesGeometry",
    "SeriesNotFoundError",
    "SeveralSeriesError",
    "TransferSyntaxError",
    "frame_headers",
    "is_dicom",
    "read_any",
    "read_series",
    "read_series_dir",
    "series_digest",
    "series_geometry",
]
