"""Write a known volume as a DICOM MR or CT series: the test fixture for DICOM input, and ``synth --format dicom``.

The series represents the volume exactly (no resampling): voxel axis ``i`` becomes the columns of each image, ``j``
the rows and ``k`` the slices, so the geometry a reader must recover is known. :func:`write_series` first reorients
the volume (axis permutations and flips only, voxels unchanged) so that its slices lie in the requested anatomical
plane, optionally tilts that plane by ``oblique_deg`` (only the affine changes), and returns the volume and RAS
affine the written series stands for.

Everything here is synthetic: the patient name and ID are placeholders, the UIDs are ``2.25.`` UIDs hashed from
the voxel data, geometry and ``uid_seed`` (the same call writes the same UIDs on every machine). Research tooling only; the
serving path never imports this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from neuroexplain.errors import InvalidOptionError

Orientation = Literal["axial", "coronal", "sagittal"]

#: RAS axis codes each voxel axis (i = columns, j = rows, k = slices) points to, as DICOM viewers expect them:
#: rows run left-to-right on screen towards patient Left (axial, coronal) or Posterior (sagittal), columns run
#: top-to-bottom towards Posterior (axial) or Inferior (coronal, sagittal); slices run along the planes' normal
#: (row x column direction): Superior, Posterior, Right.
_AXCODES: dict[str, tuple[str, str, str]] = {
    "axial": ("L", "P", "S"),
    "coronal": ("L", "I", "P"),
    "sagittal": ("P", "I", "R"),
}
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


@dataclass(frozen=True)
class SyntheticSeries:
    """What :func:`write_series` wrote.

    Attributes:
        paths: the instance files, in InstanceNumber order.
        data: the volume the series represents, ``(columns, rows, slices)`` or ``(columns, rows, slices, volumes)``,
            float32, rescale applied (the exact values a correct reader must return).
        affine: voxel -> world (RAS, mm) for ``data``.
        series_uid: SeriesInstanceUID (synthetic).
        study_uid: StudyInstanceUID (synthetic).
    """

    paths: tuple[Path, ...]
    data: np.ndarray
    affine: np.ndarray
    series_uid: str
    study_uid: str


def reorient(
    volume: np.ndarray, affine: np.ndarray, orientation: Orientation, *, reverse_slices: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip a volume's axes (no resampling) so that its slices lie in an anatomical plane.

    Args:
        volume: ``(X, Y, Z)`` or ``(X, Y, Z, T)``.
        affine: voxel -> world (RAS) for ``volume``.
        orientation: ``axial``, ``coronal`` or ``sagittal``.
        reverse_slices: make the slice axis point the other way (a descending acquisition).

    Returns:
        The reoriented volume and its affine (the same voxels at the same world positions).
    """
    if orientation not in _AXCODES:
        raise InvalidOptionError(f"orientation {orientation!r} is unknown; expected one of {sorted(_AXCODES)}")
    codes = list(_AXCODES[orientation])
    if reverse_slices:
        codes[2] = {"S": "I", "I": "S", "P": "A", "A": "P", "L": "R", "R": "L"}[codes[2]]
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(codes))
    )
    data = nib.orientations.apply_orientation(volume, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, volume.shape[:3])
    return np.ascontiguousarray(data), new_affine


def hashed_uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID: the first 128 bits of SHA-256 over the parts, as a decimal integer.

    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and returns a random UUID.)
    """
    h = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return f"2.25.{int.from_bytes(h[:16], 'big')}"


def _rotation_x(degrees: float, centre: np.ndarray) -> np.ndarray:
    """A rotation about the world x axis (left-right) through ``centre``, ``(4, 4)``."""
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = -centre, centre
    return back @ rot @ shift


def _ds(value: float) -> str:
    """A Decimal String (at most 16 characters) that keeps as many significant digits as fit."""
    for digits in range(12, 4, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.4g}"


def write_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    enhanced: bool = False,
    orientation: Orientation | None = "axial",
    oblique_deg: float = 0.0,
    reverse_slices: bool = False,
    rescale: tuple[float, float] | None = None,
    dtype: type[np.integer] | np.dtype = np.int16,
    modality: Literal["MR", "CT"] = "MR",
    patient_name: str = "SYNTHETIC^VOLUME",
    patient_id: str = "SYNTH0001",
    uid_seed: str = "neuroexplain-synthetic",
    series_number: int = 1,
    prefix: str = "IM",
) -> SyntheticSeries:
    """Write a volume as one DICOM series (one file per slice, or one Enhanced MR file).

    Args:
        volume: ``(X, Y, Z)`` or ``(X, Y, Z, T)`` intensities (T volumes become a multi-volume series).
        affine: voxel -> world (RAS, mm) for ``volume``; its first two axes must be orthogonal.
        out_dir: folder to write into (created).
        enhanced: write one Enhanced MR Image (multi-frame) instead of single-frame MR/CT images.
        orientation: slice plane (``axial``, ``coronal``, ``sagittal``), or ``None`` to keep the volume's own axes
            (voxel k = slices), e.g. to write a sheared (gantry-tilted) series.
        oblique_deg: tilt the slice plane by this many degrees about the left-right axis (affine only).
        reverse_slices: slices run against the plane's normal (a descending acquisition).
        rescale: ``(slope, intercept)``: stored values are ``round((value - intercept) / slope)`` and the header
            carries RescaleSlope/RescaleIntercept; ``None`` stores rounded values (CT always gets a rescale).
        dtype: stored integer type, ``int16``, ``uint16`` or ``uint8`` (8 bits: what JPEG baseline encodes).
        modality: ``MR`` or ``CT`` (single-frame only for CT).
        patient_name: PatientName to write (synthetic).
        patient_id: PatientID to write (synthetic).
        uid_seed: mixed into every UID, so two calls with the same volume can still write distinct series.
        series_number: SeriesNumber.
        prefix: file name prefix (files are ``<prefix>0001.dcm`` ...).

    Returns:
        The files written, and the volume and affine the series represents.

    Raises:
        InvalidOptionError: an option is out of range.
    """
    stored_dtype = np.dtype(dtype)
    if stored_dtype not in (np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.uint8)):
        raise InvalidOptionError(f"dtype {stored_dtype} is not supported; expected int16, uint16 or uint8")
    if modality not in ("MR", "CT") or (enhanced and modality != "MR"):
        raise InvalidOptionError("modality must be MR or CT, and enhanced series are MR only")
    volume = np.asarray(volume)
    if volume.ndim not in (3, 4):
        raise InvalidOptionError(f"volume has {volume.ndim} dimensions; expected 3 or 4")
    affine = np.asarray(affine, dtype=np.float64)
    if orientation is not None:
        volume, affine = reorient(volume, affine, orientation, reverse_slices=reverse_slices)
    elif reverse_slices:
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1.0, volume.shape[2] - 1
        volume, affine = np.ascontiguousarray(volume[:, :, ::-1]), affine @ flip
    if oblique_deg:
        centre = (affine @ np.r_[(np.array(volume.shape[:3]) - 1) / 2.0, 1.0])[:3]
        affine = _rotation_x(oblique_deg, centre) @ affine
    if modality == "CT" and rescale is None:
        rescale = (1.0, -1024.0)
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    slope, intercept = float(_ds(slope)), float(_ds(intercept))  # what a reader gets back from the header
    info = np.iinfo(stored_dtype)
    stored = np.clip(np.rint((volume.astype(np.float64) - intercept) / slope), info.min, info.max).astype(stored_dtype)
    represented = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    if stored.ndim == 3:
        stored = stored[..., None]

    lps = _LPS @ affine
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing, row_spacing = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    row_cos, col_cos = col_step / col_spacing, row_step / row_spacing  # IOP: direction along a row, down a column
    if abs(float(row_cos @ col_cos)) > 1e-6:
        raise InvalidOptionError("affine's first two axes are not orthogonal; DICOM image planes need them to be")
    thickness = abs(float(slice_step @ np.cross(row_cos, col_cos)))

    digest = hashlib.sha256(stored.tobytes() + repr((affine.tolist(), uid_seed, enhanced)).encode()).hexdigest()

    def uid(*parts: object) -> str:
        return hashed_uid(digest, *parts)

    study_uid, series_uid, frame_uid = uid("study"), uid("series", series_number), uid("frame-of-reference")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_cols, n_rows, n_slices, n_vols = stored.shape
    iop = [_ds(float(v)) for v in (*row_cos, *col_cos)]

    def position(k: int) -> list[str]:
        return [_ds(float(v)) for v in lps[:3, 3] + k * slice_step]

    def frame_pixels(k: int, t: int) -> np.ndarray:
        return np.ascontiguousarray(stored[:, :, k, t].T)  # (rows, columns)

    common = _common(
        modality=modality,
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_uid,
        series_number=series_number,
        rows=n_rows,
        cols=n_cols,
        signed=stored_dtype.kind == "i",
        bits=8 * stored_dtype.itemsize,
    )
    paths: list[Path] = []
    if enhanced:
        ds = _enhanced(common, n_slices, n_vols, iop, (row_spacing, col_spacing), thickness, (slope, intercept))
        ds.SOPInstanceUID = uid("instance", 0)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        frames = []
        for t in range(n_vols):
            for k in range(n_slices):
                frame = Dataset()
                frame.PlanePositionSequence = Sequence([Dataset()])
                frame.PlanePositionSequence[0].ImagePositionPatient = position(k)
                content = Dataset()
                content.StackID = "1"
                content.FrameReferenceDateTime = "20260101120000"
                content.FrameAcquisitionDateTime = "20260101120000"
                content.FrameAcquisitionDuration = 8.1
                content.InStackPositionNumber = k + 1
                content.TemporalPositionIndex = t + 1
                content.DimensionIndexValues = [1, k + 1, t + 1]
                frame.FrameContentSequence = Sequence([content])
                frames.append(frame)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
        ds.PixelData = b"".join(frame_pixels(k, t).tobytes() for t in range(n_vols) for k in range(n_slices))
        path = out / f"{prefix}0001.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    else:
        number = 0
        for t in range(n_vols):
            for k in range(n_slices):
                number += 1
                ds = _copy(common)
                ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.SOPInstanceUID = uid("instance", t, k)
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.InstanceNumber = number
                ds.AcquisitionNumber = t + 1
                ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
                ds.ImagePositionPatient = position(k)
                ds.ImageOrientationPatient = iop
                ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
                ds.SliceThickness = _ds(thickness)
                ds.SliceLocation = _ds(float((lps[:3, 3] + k * slice_step) @ np.cross(row_cos, col_cos)))
                if n_vols > 1:
                    ds.TemporalPositionIdentifier = t + 1
                    ds.NumberOfTemporalPositions = n_vols
                if modality == "CT":
                    ds.KVP = "120"
                if rescale is not None or modality == "CT":
                    ds.RescaleSlope = _ds(slope)
                    ds.RescaleIntercept = _ds(intercept)
                    ds.RescaleType = "HU" if modality == "CT" else "US"
                if modality == "MR":
                    _mr_single(ds)
                ds.PixelData = frame_pixels(k, t).tobytes()
                path = out / f"{prefix}{number:04d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    data = represented if volume.ndim == 4 else represented.reshape(volume.shape)
    return SyntheticSeries(tuple(paths), data, affine, series_uid, study_uid)


def _copy(ds: Dataset) -> Dataset:
    out = Dataset()
    out.update(ds)
    out.file_meta = FileMetaDataset()
    out.file_meta.update(ds.file_meta)
    return out


def _common(
    *,
    modality: str,
    patient_name: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    rows: int,
    cols: int,
    signed: bool,
    bits: int,
) -> Dataset:
    """Patient, study, series, frame of reference, equipment and image pixel attributes shared by every instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "synthetic (neuroexplain)"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "synthetic volume"
    ds.Laterality = ""
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "neuroexplain"
    ds.ManufacturerModelName = "synthetic"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    return ds


def _mr_single(ds: Dataset) -> None:
    """The MR Image module's acquisition attributes (Type 1 and 2) for a synthetic T1 gradient echo."""
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SP"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = "8.1"
    ds.EchoTime = "3.7"
    ds.EchoTrainLength = "1"
    ds.MagneticFieldStrength = "3"


def _enhanced(
    common: Dataset,
    n_slices: int,
    n_vols: int,
    iop: list[str],
    spacing: tuple[float, float],
    thickness: float,
    rescale: tuple[float, float],
) -> Dataset:
    """An Enhanced MR Image header with the shared functional groups (per-frame positions are added by the caller)."""
    ds = _copy(common)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    del ds.Laterality  # Enhanced MR: only for paired body parts (FrameLaterality says "U")
    ds.DeviceSerialNumber = "0"
    ds.AcquisitionContextSequence = Sequence([])
    ds.PulseSequenceName = "SYNTH_GRE"
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.NumberOfKSpaceTrajectories = 1
    ds.CoverageOfKSpace = "FULL"
    ds.SoftwareVersions = "neuroexplain"
    ds.NumberOfFrames = n_slices * n_vols
    ds.AcquisitionDateTime = ds.StudyDate + ds.StudyTime
    ds.AcquisitionDuration = 0.0
    ds.ContentQualification = "RESEARCH"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = "3"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageComments = "synthetic"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    dim_uid = hashed_uid(ds.SeriesInstanceUID, "dimensions")
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    dims = []
    for index_tag, group_tag in ((0x00209056, 0x00209111), (0x00209057, 0x00209111), (0x00209128, 0x00209111)):
        d = Dataset()
        d.DimensionOrganizationUID = dim_uid
        d.DimensionIndexPointer = index_tag
        d.FunctionalGroupPointer = group_tag
        dims.append(d)
    ds.DimensionIndexSequence = Sequence(dims)

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [_ds(spacing[0]), _ds(spacing[1])]
    measures.SliceThickness = _ds(thickness)
    shared.PixelMeasuresSequence = Sequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = iop
    shared.PlaneOrientationSequence = Sequence([orient])
    transform = Dataset()
    transform.RescaleSlope = _ds(rescale[0])
    transform.RescaleIntercept = _ds(rescale[1])
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = Sequence([transform])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = "MAGNITUDE"
    frame_type.AcquisitionContrast = "T1"
    shared.MRImageFrameTypeSequence = Sequence([frame_type])
    timing = Dataset()
    timing.RepetitionTime = "8.1"
    timing.FlipAngle = "8"
    timing.EchoTrainLength = 1
    timing.RFEchoTrainLength = 1
    timing.GradientEchoTrainLength = 1
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = 3.7
    shared.MREchoSequence = Sequence([echo])
    anatomy = Dataset()
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "12738006", "SCT", "Brain"
    anatomy.AnatomicRegionSequence = Sequence([region])
    anatomy.FrameLaterality = "U"
    shared.FrameAnatomySequence = Sequence([anatomy])
    sar = Dataset()
    sar.SpecificAbsorptionRateDefinition = "IEC_WHOLE_BODY"
    sar.SpecificAbsorptionRateValue = 0.1
    timing.SpecificAbsorptionRateSequence = Sequence([sar])
    mode = Dataset()
    mode.OperatingModeType = "STATIC FIELD"
    mode.OperatingMode = "IEC_NORMAL"
    timing.OperatingModeSequence = Sequence([mode])
    modifier = Dataset()
    modifier.InversionRecovery = "NO"
    modifier.FlowCompensation = "NONE"
    modifier.T2Preparation = "NO"
    modifier.SpectrallySelectedExcitation = "NONE"
    modifier.SpatialPresaturation = "NONE"
    modifier.PartialFourier = "NO"
    modifier.ParallelAcquisition = "NO"
    shared.MRModifierSequence = Sequence([modifier])
    imaging = Dataset()
    imaging.PixelBandwidth = "200"
    imaging.MagnetizationTransfer = "NONE"
    imaging.BloodSignalNulling = "NO"
    imaging.Tagging = "NONE"
    imaging.TransmitterFrequency = 123.2
    shared.MRImagingModifierSequence = Sequence([imaging])
    receive = Dataset()
    receive.ReceiveCoilName = "HEAD"
    receive.ReceiveCoilManufacturerName = "neuroexplain"
    receive.ReceiveCoilType = "VOLUME"
    receive.QuadratureReceiveCoil = "NO"
    shared.MRReceiveCoilSequence = Sequence([receive])
    transmit = Dataset()
    transmit.TransmitCoilName = "BODY"
    transmit.TransmitCoilManufacturerName = "neuroexplain"
    transmit.TransmitCoilType = "BODY"
    shared.MRTransmitCoilSequence = Sequence([transmit])
    averages = Dataset()
    averages.NumberOfAverages = 1.0
    shared.MRAveragesSequence = Sequence([averages])
    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "ROW"
    fov.MRAcquisitionFrequencyEncodingSteps = int(ds.Columns)
    fov.MRAcquisitionPhaseEncodingStepsInPlane = int(ds.Rows)
    fov.PercentSampling = "100"
    fov.PercentPhaseFieldOfView = "100"
    fov.MRAcquisitionPhaseEncodingStepsOutOfPlane = n_slices
    shared.MRFOVGeometrySequence = Sequence([fov])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    return ds


def write_sample_series(
    image: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    seed: int,
    **kwargs: Any,
) -> SyntheticSeries:
    """Write a synthetic sample (float image, e.g. ``lab.synthetic.make_sample(...).image``) as an MR series.

    The float intensities are stored as int16 with a RescaleSlope that maps the image's maximum to 30000, so the
    series carries them to within half a slope step. The ground-truth mask needs no DICOM: it stays NIfTI on the
    sample's own affine, which overlays the series in world coordinates (``synth --format dicom`` writes both).

    Args:
        image: ``(X, Y, Z)`` float intensities (non-negative).
        affine: voxel -> world (RAS) for ``image``.
        out_dir: folder for the series' files.
        seed: the sample's seed, mixed into the UIDs (one series per sample, the same on every machine).
        **kwargs: passed to :func:`write_series` (``orientation``, ``enhanced``, ...).

    Returns:
        As :func:`write_series`.
    """
    peak = float(np.max(image)) if np.size(image) else 0.0
    slope = peak / 30000.0 if peak > 0 else 1.0
    kwargs.setdefault("rescale", (slope, 0.0))
    kwargs.setdefault("uid_seed", f"neuroexplain-synthetic-{seed}")
    return write_series(np.asarray(image, dtype=np.float32), affine, out_dir, **kwargs)
