"""The DICOM input refusals: each a typed INVALID_ARGUMENT under :class:`neuroexplain.errors.InvalidInputError`.

Messages say what is wrong and what is allowed; they never contain UIDs, patient data, file names or header text
(counts, sizes, millimetres, degrees and transfer-syntax names only).
"""

from __future__ import annotations

from neuroexplain.errors import ScanDataError, ScanFormatError, ScanGeometryError


class DicomError(ScanFormatError):
    """The instances are not one readable DICOM image series (INVALID_ARGUMENT)."""


class NoImageError(DicomError):
    """No MR or CT image object among the instances (only reports, presentation states, non-DICOM files...)."""


class SeveralSeriesError(DicomError):
    """More than one series was sent or found, and none was chosen with ``series_uid`` / ``--series UID``."""


class SeriesNotFoundError(DicomError):
    """``series_uid`` names no series among the instances."""


class InconsistentSeriesError(ScanGeometryError):
    """Mixed orientation, size or spacing, missing or duplicate slices, uneven spacing, gantry tilt."""


class PixelDataError(ScanDataError):
    """Pixel data that cannot be used: missing, truncated, undecodable, colour, or of an unsupported layout."""


class TransferSyntaxError(PixelDataError):
    """A transfer syntax that no installed pixel-data plugin decodes."""
