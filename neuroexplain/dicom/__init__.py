"""DICOM in the library: series -> scan (:mod:`.reader`, :mod:`.geometry`) and, beside it, DICOM results.

Serving code calls :func:`read_any` / :func:`read_series` (wire: ``Scan.dicom.instances``) or
:func:`read_series_dir` (CLI: a directory); they return a :class:`DicomScan`, a :class:`neuroexplain.volumes.Scan`
with its :class:`SeriesGeometry`. :mod:`.files` (``collect_instances``) needs only the standard library, so the
light client and the PACS bridge can send a folder without numpy or pydicom: names are resolved lazily here, and
importing ``neuroexplain.dicom.files`` imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuroexplain.dicom.errors import (
        DicomError,
        InconsistentSeriesError,
        NoImageError,
        PixelDataError,
        SeriesNotFoundError,
        SeveralSeriesError,
        TransferSyntaxError,
    )
    from neuroexplain.dicom.files import collect_instances, is_dicom, series_digest
    from neuroexplain.dicom.geometry import FrameHeader, SeriesGeometry, frame_headers, series_geometry
    from neuroexplain.dicom.reader import (
        DicomLimits,
        DicomScan,
        read_any,
        read_series,
        read_series_dir,
    )

_WHERE = {
    "DicomError": "errors",
    "InconsistentSeriesError": "errors",
    "NoImageError": "errors",
    "PixelDataError": "errors",
    "SeriesNotFoundError": "errors",
    "SeveralSeriesError": "errors",
    "TransferSyntaxError": "errors",
    "collect_instances": "files",
    "is_dicom": "files",
    "FrameHeader": "geometry",
    "SeriesGeometry": "geometry",
    "frame_headers": "geometry",
    "series_geometry": "geometry",
    "DicomLimits": "reader",
    "DicomScan": "reader",
    "read_any": "reader",
    "read_series": "reader",
    "read_series_dir": "reader",
    "series_digest": "files",
}

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
    "collect_instances",
    "frame_headers",
    "is_dicom",
    "read_any",
    "read_series",
    "read_series_dir",
    "series_digest",
    "series_geometry",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'neuroexplain.dicom' has no attribute {name!r}")
    return getattr(importlib.import_module(f"neuroexplain.dicom.{module}"), name)
