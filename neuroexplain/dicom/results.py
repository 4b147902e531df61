"""DICOM result objects that file into the source study (DESIGN.md, "Contracts, wave 2" -> "DICOM results").

For a DICOM input the gateway builds, per response and never cached:

* :func:`build_parametric_map` — the signed relevance, float32, on the source series' own frames (one frame per
  source slice, same ImagePositionPatient, orientation, spacing and Frame of Reference), with a real-world value
  mapping (unitless relevance of the named method), referencing the source series;
* :func:`build_sr` — a Comprehensive 3D SR, TID 1500 Measurement Report: the model (device observer, algorithm
  identification), method, target, predicted class and class probabilities, the input check, the strongest
  clusters (centre as a 3D point in patient coordinates LPS mm in the source Frame of Reference, volume in mL, share
  of positive relevance), and the research-use notice;
* :func:`build_segmentation` — a binary Segmentation of the top clusters on the source frames (``dicom_extras`` seg);
* :func:`build_secondary_capture` — RGB Secondary Capture images, one per source slice, relevance over the source
  image (``dicom_extras`` sc), for viewers without Parametric Map support.

:func:`build_results` is what serving calls: it checks the extras, builds the objects for the operation and returns
them as :class:`ResultObject` (Part 10 bytes and the three UIDs the wire's ``DicomObject`` carries).

Identity: the Patient and Study modules are copied from the source (highdicom copies exactly the Patient and Study
information entities' modules; nothing else of the source is copied besides its UIDs as references and its Frame of
Reference). UIDs are hashed from the request (:mod:`neuroexplain.dicom.uids`). With a de-identification key the
objects are de-identified under the PS3.15 Basic Profile (:mod:`neuroexplain.dicom.deid`).

Library roles: highdicom builds and checks every IOD (PM, SR TID 1500, SEG, SC); pydicom encodes the datasets;
numpy/scipy compute frames, clusters and the overlay. No torch: the torch-free gateway calls this.
"""

from __future__ import annotations

import copy
import enum
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from neuroexplain import RESEARCH_NOTICE
from neuroexplain.dicom.deid import check_key
from neuroexplain.dicom.deid import deidentify as deidentify_dataset
from neuroexplain.dicom.geometry import SeriesGeometry, frame_headers, series_geometry
from neuroexplain.dicom.uids import RequestIdentity, canonical_options
from neuroexplain.errors import InvalidInputError, InvalidOptionError, ScanGeometryError

try:
    from importlib.metadata import version as _pkg_version

    PACKAGE_VERSION = _pkg_version("neuroexplain")
except Exception:  # noqa: BLE001 - not installed (a plain checkout)
    PACKAGE_VERSION = "0"

MANUFACTURER = "neuroexplain"
#: Private coding scheme for concepts no standard terminology names (PS3.16: designators starting "99" are local).
SCHEME = "99NEUROX"
#: Series numbers of the result series (fixed, so a viewer lists them in the same place every time).
SERIES_NUMBERS = {"pm": 9101, "sr": 9102, "seg": 9103, "sc": 9104}
MAX_CLUSTERS = 10
OVERLAY_THRESHOLD = 0.25  # same share of the maximum positive relevance as the summary's clusters


class Extra(enum.Enum):
    """Optional result objects (``dicom_extras`` / ``--dicom-extras``)."""

    SEG = "seg"
    SC = "sc"

    @classmethod
    def parse_all(cls, values: Iterable[str]) -> tuple[Extra, ...]:
        """Parse the requested extras (order kept, duplicates dropped).

        Raises:
            InvalidOptionError: an unknown extra; the message lists the allowed ones.
        """
        out: list[Extra] = []
        for value in values:
            try:
                extra = cls(str(value).strip().lower())
            except ValueError:
                raise InvalidOptionError(
                    f"dicom extra {str(value)[:32]!r} is unknown; expected any of {[e.value for e in cls]}",
                    field="dicom_extras",
                ) from None
            if extra not in out:
                out.append(extra)
        return tuple(out)


@dataclass(frozen=True)
class ClusterFinding:
    """One cluster of positive relevance, as reported in the SR.

    Attributes:
        rank: 1 = strongest.
        center_ras_mm: centroid in the scan's world space (RAS mm, what the summary's ``centroid_mm`` holds).
        peak_ras_mm: peak in RAS mm.
        volume_ml: volume in millilitres.
        share: share of the map's positive relevance, 0..1.
    """

    rank: int
    center_ras_mm: tuple[float, float, float]
    peak_ras_mm: tuple[float, float, float]
    volume_ml: float
    share: float

    @property
    def center_lps_mm(self) -> tuple[float, float, float]:
        """The centre in DICOM patient coordinates (LPS): x and y change sign."""
        x, y, z = self.center_ras_mm
        return (-x, -y, z)


def clusters_from_summary(summary: Mapping[str, Any], *, limit: int = MAX_CLUSTERS) -> tuple[ClusterFinding, ...]:
    """The clusters of an attribution summary (``neuroexplain.attribution.summary.summarise``'s dict).

    Args:
        summary: the summary (``AttributeResult.summary_json`` decoded).
        limit: at most this many (strongest first).

    Returns:
        The clusters, strongest first.
    """
    out = []
    for c in list(summary.get("clusters", ()))[:limit]:
        out.append(ClusterFinding(
            rank=int(c["rank"]),
            center_ras_mm=tuple(float(v) for v in c["centroid_mm"]),  # type: ignore[arg-type]
            peak_ras_mm=tuple(float(v) for v in c["peak_mm"]),  # type: ignore[arg-type]
            volume_ml=float(c["volume_ml"]),
            share=float(c.get("share_of_positive", 0.0)),
        ))
    return tuple(out)


class InputCheckLike(Protocol):
    """What the SR needs of an input check (``neuroexplain.inputcheck.InputCheck`` and the serving type have it)."""

    @property
    def in_distribution(self) -> bool: ...
    @property
    def score(self) -> float: ...
    @property
    def threshold(self) -> float: ...
    @property
    def reason(self) -> str: ...


@dataclass(frozen=True)
class InputCheckFinding:
    """The input check, as the SR reports it (fields of ``InputCheck``)."""

    in_distribution: bool
    score: float
    threshold: float
    reason: str


@dataclass(frozen=True)
class ResultObject:
    """One built result object: what the wire's ``DicomObject`` carries."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    data: bytes


@dataclass(frozen=True)
class _Source:
    geometry: SeriesGeometry
    images: tuple[Dataset, ...]  # unique source instances, in slice order of their first frame
    identity: RequestIdentity


# ---------------------------------------------------------------------------------------------------------------------
# Logging hygiene


def quiet_dicom_loggers() -> None:
    """Keep patient data out of logs: redact pydicom's and highdicom's loggers (idempotent and cheap; every builder
    calls it before it builds).

    highdicom logs SOP Instance UIDs at INFO and pydicom quotes element values in DEBUG records and warnings. Every
    existing ``pydicom``/``highdicom`` logger gets a filter that drops DEBUG/INFO and blanks the rest (a filter on a
    parent does not see a child's records, so each logger gets its own; highdicom's submodules are imported above,
    so theirs exist). Python ``warnings`` from pydicom's value validation are silenced by turning validation off
    while parsing (:func:`neuroexplain.dicom.privacy.quiet_pydicom`) and by building with validation set to ignore.
    """
    from neuroexplain.dicom.privacy import quiet_pydicom, redact_loggers

    quiet_pydicom()
    redact_loggers("highdicom")
    # Loggers created later (a submodule imported afterwards) inherit this level, so their DEBUG/INFO never emit.
    for parent in ("highdicom", "pydicom"):
        if logging.getLogger(parent).level < logging.WARNING:
            logging.getLogger(parent).setLevel(logging.WARNING)
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


# ---------------------------------------------------------------------------------------------------------------------
# Source and common attributes


_DATE_VRS = {"DA": pydicom.valuerep.DA, "TM": pydicom.valuerep.TM, "DT": pydicom.valuerep.DT}


def _with_valid_dates(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy of it whose unparseable DA/TM/DT elements (e.g. a PatientBirthDate holding text) are
    emptied: highdicom copies them into every result and would fail on them, quoting the value (patient data)."""
    bad = []
    for elem in ds:
        convert = _DATE_VRS.get(elem.VR)
        if convert is None or elem.VM != 1 or elem.value in (None, ""):
            continue
        try:
            convert(str(elem.value))
        except (ValueError, TypeError):
            bad.append(elem.tag)
    if not bad:
        return ds
    out = Dataset(ds)  # a new element table: the source's headers stay as they are
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for tag in bad:
        out[tag] = pydicom.DataElement(tag, out[tag].VR, "")
    return out


def _source(
    source: SeriesGeometry | Sequence[Dataset], *, model: str, version: str, operation: str,
    options: Mapping[str, Any] | None, volume_index: int | None,
) -> _Source:
    if isinstance(source, SeriesGeometry):
        geometry = source
        if not geometry.headers:
            raise InvalidInputError("the source geometry carries no headers; DICOM results need the source headers")
        images: list[Dataset] = []
        for ds in geometry.headers:
            if not any(ds is seen for seen in images):
                images.append(ds)
    else:
        images = list(source)
        if not images:
            raise InvalidInputError("no source headers; DICOM results need the headers of a DICOM input series")
        frames = [f for i, ds in enumerate(images) for f in frame_headers(ds, i)]
        geometry = series_geometry(frames, volume_index=volume_index, headers=images)
        ordered: list[Dataset] = []
        for ds in geometry.headers:
            if not any(ds is seen for seen in ordered):
                ordered.append(ds)
        images = ordered
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        if not all(str(ds.get(keyword, "") or "") for ds in images):
            raise InvalidInputError(
                f"a source instance lacks {keyword}; DICOM results need Study, Series, SOP Instance and Frame of "
                "Reference UIDs on every source image"
            )
    images = [_with_valid_dates(ds) for ds in images]
    identity = RequestIdentity(
        study_uid=str(images[0].StudyInstanceUID), series_uid=str(images[0].SeriesInstanceUID),
        sop_uids=tuple(str(ds.SOPInstanceUID) for ds in images), model=model, version=version,
        operation=operation, options=canonical_options(options),
    )
    return _Source(geometry=geometry, images=tuple(images), identity=identity)


def _frames(geometry: SeriesGeometry, relevance: np.ndarray) -> np.ndarray:
    """Relevance on the scan grid ``(columns, rows, slices)`` or as frames ``(slices, rows, columns)`` -> frames."""
    arr = np.asarray(relevance)
    frames_shape = (geometry.n_slices, geometry.rows, geometry.columns)
    if arr.shape == geometry.shape:
        out = geometry.to_frames(arr)
    elif arr.shape == frames_shape:
        out = arr
    else:
        raise ScanGeometryError(
            f"relevance has shape {arr.shape}; expected the scan's grid {geometry.shape} (columns, rows, slices) or "
            f"its frames {frames_shape} (slices, rows, columns)"
        )
    out = np.ascontiguousarray(out, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise InvalidInputError("relevance holds NaN or Inf values; expected finite values")
    return out


def relevance_from_nifti(nifti: bytes, geometry: SeriesGeometry, *, atol_mm: float = 0.01) -> np.ndarray:
    """Decode an attribution NIfTI (``AttributeResult.nifti``) and check it lies on the source series' grid.

    Args:
        nifti: gzipped NIfTI bytes of the relevance map on the scan's grid.
        geometry: the source series' geometry.
        atol_mm: largest allowed difference between the two affines.

    Returns:
        The map as frames ``(slices, rows, columns)``, float32.

    Raises:
        ScanGeometryError: the map's grid is not the series' grid.
    """
    import nibabel as nib

    img = nib.Nifti1Image.from_bytes(_gunzip(nifti))
    if img.shape != geometry.shape or not np.allclose(img.affine, geometry.affine, atol=atol_mm):
        raise ScanGeometryError(
            f"the relevance map's grid {img.shape} does not match the source series' grid {geometry.shape}; "
            "DICOM results need the map on the scan's own grid and affine"
        )
    return _frames(geometry, np.asarray(img.dataobj, dtype=np.float32))


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_IMAGE_CLASSES = {str(pydicom.uid.ParametricMapStorage), str(pydicom.uid.SecondaryCaptureImageStorage)}


def _description(kind: str) -> str:
    return f"{kind} — {RESEARCH_NOTICE}"


def _software(model: str, version: str) -> tuple[str, str]:
    return (f"neuroexplain {PACKAGE_VERSION}"[:64], f"{model} {version}"[:64])


def _finish(ds: Dataset, src: _Source, *, kind: str, deidentify_key: bytes | None) -> Dataset:
    """Common tail: research notice, equipment, character set, de-identification."""
    # highdicom copies source elements by reference: give the result its own copies before anything is changed,
    # so the caller's source headers (shared by every object of a response) stay untouched.
    for tag in list(ds.keys()):
        if int(tag) not in _PIXEL_TAGS:
            ds[tag] = copy.deepcopy(ds[tag])
    ds.SeriesDescription = _description(kind)
    ds.SpecificCharacterSet = "ISO_IR 192"  # the notice's dash; copied names keep their characters
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = list(_software(src.identity.model, src.identity.version))
    if "Laterality" not in ds and str(ds.SOPClassUID) in _IMAGE_CLASSES:
        ds.Laterality = ""  # type 2C in General Series: the brain is unpaired, so present and empty
    if deidentify_key is not None:
        deidentify_dataset(ds, deidentify_key)
    return ds


def _algorithm(model: str, version: str, method: str | None) -> hd.AlgorithmIdentificationSequence:
    params = {"method": method} if method else None
    return hd.AlgorithmIdentificationSequence(
        name=model[:64], family=codes.cid7162.ArtificialIntelligence, version=version[:64], source=MANUFACTURER,
        parameters=params,
    )


def _plane_info(geometry: SeriesGeometry) -> tuple[hd.PixelMeasuresSequence, hd.PlaneOrientationSequence,
                                                   list[hd.PlanePositionSequence]]:
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=[float(geometry.pixel_spacing[0]), float(geometry.pixel_spacing[1])],
        slice_thickness=float(geometry.slice_spacing), spacing_between_slices=float(geometry.slice_spacing),
    )
    orientation = hd.PlaneOrientationSequence(
        coordinate_system="PATIENT",
        image_orientation=[*map(float, geometry.row_direction), *map(float, geometry.column_direction)],
    )
    positions = [hd.PlanePositionSequence(coordinate_system="PATIENT", image_position=[float(v) for v in f.position])
                 for f in geometry.frames]
    return measures, orientation, positions


def _key(deidentify_key: bytes | None, deid: bool) -> bytes | None:
    return check_key(deidentify_key) if deid else None


def _encode(ds: Dataset) -> ResultObject:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return ResultObject(sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                        series_instance_uid=str(ds.SeriesInstanceUID), data=buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------------
# Parametric Map


def build_parametric_map(
    source: SeriesGeometry | Sequence[Dataset],
    relevance: np.ndarray,
    *,
    model: str,
    version: str,
    method: str,
    target: str,
    options: Mapping[str, Any] | None = None,
    deidentify: bool = False,
    deidentify_key: bytes | None = None,
    volume_index: int | None = None,
) -> Dataset:
    """The signed relevance as a float32 Parametric Map on the source series' own frames.

    Args:
        source: the source series' geometry (``DicomScan.geometry``, which carries the headers) or its headers.
        relevance: the map on the scan's grid ``(columns, rows, slices)`` or as frames ``(slices, rows, columns)``.
        model: model name.
        version: model version.
        method: attribution method (named in the value mapping).
        target: class explained.
        options: the request's canonical options (hashed into the UIDs; method and target are added).
        deidentify: de-identify under the Basic Profile with ``deidentify_key``.
        deidentify_key: the server's key (required when ``deidentify``).
        volume_index: which volume of a multi-volume source (with headers as ``source``).

    Returns:
        The Parametric Map dataset.

    Raises:
        ScanGeometryError: ``relevance`` is not on the source grid.
        FailedPreconditionError: ``deidentify`` without a key.
    """
    quiet_dicom_loggers()
    key = _key(deidentify_key, deidentify)
    opts = {**(options or {}), "method": method, "target": target}
    src = _source(source, model=model, version=version, operation="attribute", options=opts, volume_index=volume_index)
    frames = _frames(src.geometry, relevance)  # (slices, rows, columns)
    lo, hi = float(frames.min()), float(frames.max())
    if lo == hi:
        hi = lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="relevance",
        lut_explanation=f"signed {method} relevance for class {target}"[:64],
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(lo, hi),
        slope=1.0,
        intercept=0.0,
        quantity_definition=hd.sr.CodedConcept("RELEVANCE", SCHEME, "Attribution relevance"),
    )
    measures, orientation, positions = _plane_info(src.geometry)
    amax = max(abs(lo), abs(hi))
    ident = src.identity
    pm = hd.pm.ParametricMap(
        source_images=list(src.images),
        pixel_array=frames,
        series_instance_uid=ident.uid("pm-series"),
        series_number=SERIES_NUMBERS["pm"],
        sop_instance_uid=ident.uid("pm-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model[:64],
        software_versions=_software(model, version),  # type: ignore[arg-type]  # highdicom hints tuple[str]
        device_serial_number=version[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        # LINEAR_EXACT: relevance values are often far below 1, and a LINEAR window must be at least 1 wide.
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.0, window_width=2.0 * amax or 1.0,
                                                         voi_lut_function="LINEAR_EXACT")],
        content_label="RELEVANCE",
        content_description=_description("Relevance map")[:64],
        pixel_measures=measures,
        plane_orientation=orientation,
        plane_positions=positions,
    )
    return _finish(pm, src, kind="Relevance map", deidentify_key=key)


# ---------------------------------------------------------------------------------------------------------------------
# Structured report


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value[:16], SCHEME, meaning[:64])


def _class_code(name: str) -> hd.sr.CodedConcept:
    return _code(name.upper(), name)


def build_sr(
    source: SeriesGeometry | Sequence[Dataset],
    *,
    model: str,
    version: str,
    operation: str,
    predicted_class: str,
    probabilities: Mapping[str, float],
    method: str | None = None,
    target: str | None = None,
    clusters: Sequence[ClusterFinding] = (),
    input_check: InputCheckLike | None = None,
    options: Mapping[str, Any] | None = None,
    deidentify: bool = False,
    deidentify_key: bytes | None = None,
    volume_index: int | None = None,
) -> Dataset:
    """A Comprehensive 3D SR, TID 1500 Measurement Report, of one Predict or Attribute result.

    Args:
        source: as for :func:`build_parametric_map`.
        model: model name (device observer, algorithm identification).
        version: model version.
        operation: ``predict`` or ``attribute`` (hashed into the UIDs).
        predicted_class: the class the model predicts.
        probabilities: class name -> probability.
        method: attribution method (Attribute only).
        target: class explained (Attribute only).
        clusters: strongest clusters first (:func:`clusters_from_summary`); centres are given in RAS and written in
            LPS.
        input_check: the input check, when the server ran it.
        options: canonical options (hashed into the UIDs).
        deidentify: de-identify under the Basic Profile.
        deidentify_key: the server's key.
        volume_index: as for :func:`build_parametric_map`.

    Returns:
        The SR dataset.
    """
    quiet_dicom_loggers()
    key = _key(deidentify_key, deidentify)
    opts = {**(options or {}), "method": method, "target": target}
    src = _source(source, model=model, version=version, operation=operation, options=opts, volume_index=volume_index)
    ident = src.identity
    for_uid = str(src.images[0].FrameOfReferenceUID)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ident.uid("device"), name=model[:64], manufacturer_name=MANUFACTURER,
            model_name=f"{model} {version}"[:64],
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=model[:64], version=version[:64], parameters=[p for p in (method, target) if p] or None,
    )
    groups: list[Any] = []
    prediction_measurements = [
        hd.sr.Measurement(name=_code(f"P_{name.upper()}", f"Probability of {name}"), value=float(p),
                          unit=hd.sr.CodedConcept("1", "UCUM", "no units"))
        for name, p in probabilities.items()
    ]
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ident.uid("track-prediction"), identifier="prediction"),
        finding_type=_code("PREDICTION", "Model prediction"),
        algorithm_id=algorithm,
        measurements=prediction_measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_code("PREDICTED", "Predicted class"),
                                                             value=_class_code(predicted_class))],
    ))
    if input_check is not None:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=ident.uid("track-input-check"), identifier="input check"),
            finding_type=_code("INPUT_CHECK", "Input check"),
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=_code("IC_SCORE", "Input check score"), value=float(input_check.score),
                                  unit=hd.sr.CodedConcept("1", "UCUM", "no units")),
                hd.sr.Measurement(name=_code("IC_THRESHOLD", "Input check threshold"),
                                  value=float(input_check.threshold), unit=hd.sr.CodedConcept("1", "UCUM", "no units")),
            ],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=_code("IN_DISTRIBUTION", "In distribution"),
                value=codes.SCT.Yes if input_check.in_distribution else codes.SCT.No,
            )],
        ))
    series = hd.sr.SourceSeriesForSegmentation(ident.series_uid)
    for c in clusters:
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=ident.uid("track-cluster", frame=c.rank),
                                                         identifier=f"relevance cluster {c.rank}"),
            referenced_volume_surface=hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.array([c.center_lps_mm], dtype=np.float64),
                frame_of_reference_uid=for_uid, source_series=series,
            ),
            finding_type=_code("RELEVANCE_CLUSTER", "Cluster of attribution relevance"),
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Volume, value=float(c.volume_ml),
                                  unit=hd.sr.CodedConcept("mL", "UCUM", "milliliter")),
                hd.sr.Measurement(name=_code("SHARE", "Share of positive relevance"), value=100.0 * float(c.share),
                                  unit=hd.sr.CodedConcept("%", "UCUM", "percent")),
            ],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    root = report[0]
    texts = [("NOTICE", "Notice", RESEARCH_NOTICE), ("MODEL", "Model", f"{model} {version}")]
    if method:
        texts.append(("METHOD", "Attribution method", method))
    if target:
        texts.append(("TARGET", "Target class", target))
    if input_check is not None:
        texts.append(("IC_REASON", "Input check reason", input_check.reason))
    for value, meaning, text in texts:
        root.ContentSequence.append(hd.sr.TextContentItem(
            name=_code(value, meaning), value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ))
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(src.images),
        content=root,
        series_instance_uid=ident.uid("sr-series"),
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=ident.uid("sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    return _finish(sr, src, kind="AI report", deidentify_key=key)


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation and Secondary Capture


def _cluster_labels(frames: np.ndarray, top_k: int) -> list[np.ndarray]:
    """Boolean masks (slices, rows, columns) of the ``top_k`` clusters of positive relevance on the source grid."""
    from scipy import ndimage

    pos = np.clip(frames, 0, None)
    peak = float(pos.max()) if pos.size else 0.0
    if peak <= 0:
        return []
    labels, n = ndimage.label(pos >= OVERLAY_THRESHOLD * peak, structure=np.ones((3, 3, 3), dtype=bool))
    sums = np.asarray(ndimage.sum(pos, labels, np.arange(1, n + 1)))
    order = np.argsort(-sums, kind="stable")[:top_k]
    return [labels == (int(k) + 1) for k in order]


def build_segmentation(
    source: SeriesGeometry | Sequence[Dataset],
    relevance: np.ndarray,
    *,
    model: str,
    version: str,
    method: str,
    target: str,
    options: Mapping[str, Any] | None = None,
    top_k: int = 3,
    deidentify: bool = False,
    deidentify_key: bytes | None = None,
    volume_index: int | None = None,
) -> Dataset:
    """A binary Segmentation of the ``top_k`` clusters of positive relevance, on the source frames.

    Clusters are found on the source grid with the summary's rule (connected voxels, 26-connectivity, at least
    0.25 of the maximum positive relevance, ranked by summed relevance). Arguments as :func:`build_parametric_map`.

    Raises:
        InvalidInputError: the map has no positive relevance (nothing to segment).
    """
    quiet_dicom_loggers()
    key = _key(deidentify_key, deidentify)
    opts = {**(options or {}), "method": method, "target": target}
    src = _source(source, model=model, version=version, operation="attribute", options=opts, volume_index=volume_index)
    frames = _frames(src.geometry, relevance)
    masks = _cluster_labels(frames, max(1, min(int(top_k), MAX_CLUSTERS)))
    if not masks:
        raise InvalidInputError("the relevance map has no positive relevance; a Segmentation needs at least one "
                                "cluster (ask without the seg extra)")
    ident = src.identity
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=f"relevance cluster {i}",
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
            segmented_property_type=_code("RELEVANCE_CLUSTER", "Cluster of attribution relevance"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(model, version, method),
            tracking_uid=ident.uid("track-cluster", frame=i),
            tracking_id=f"relevance cluster {i}",
        )
        for i in range(1, len(masks) + 1)
    ]
    measures, orientation, positions = _plane_info(src.geometry)
    pixels = np.stack(masks, axis=-1).astype(np.uint8)  # (slices, rows, columns, segments)
    seg = hd.seg.Segmentation(
        source_images=list(src.images),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=ident.uid("seg-series"),
        series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=ident.uid("seg-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model[:64],
        software_versions=_software(model, version),  # type: ignore[arg-type]  # highdicom hints tuple[str]
        device_serial_number=version[:64],
        content_description=_description("Relevance clusters")[:64],
        pixel_measures=measures,
        plane_orientation=orientation,
        plane_positions=positions,
    )
    return _finish(seg, src, kind="Relevance clusters", deidentify_key=key)


def _orientation_letters(direction: np.ndarray) -> str:
    """PatientOrientation letters of an LPS direction (dominant components, at most 3)."""
    letters = []
    for axis in np.argsort(-np.abs(direction))[:3]:
        if abs(direction[axis]) < 1e-3:
            break
        letters.append(("L", "P", "H")[axis] if direction[axis] > 0 else ("R", "A", "F")[axis])
    return "".join(letters)


def overlay_rgb(image: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """An RGB overlay: greyscale image, positive relevance above 0.25 of the maximum in red to yellow.

    Args:
        image: source frames ``(slices, rows, columns)``.
        relevance: relevance frames, same shape.

    Returns:
        ``(slices, rows, columns, 3)`` uint8.
    """
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    grey = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    pos = np.clip(np.asarray(relevance, dtype=np.float64), 0, None)
    peak = float(pos.max()) if pos.size else 0.0
    t = np.clip((pos / peak - OVERLAY_THRESHOLD) / (1 - OVERLAY_THRESHOLD), 0, 1) if peak > 0 else np.zeros_like(pos)
    alpha = np.where(t > 0, 0.35 + 0.5 * t, 0.0)
    colour = np.stack([np.ones_like(t), t, np.zeros_like(t)], axis=-1)
    rgb = grey[..., None] * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.round(rgb * 255).astype(np.uint8)


def build_secondary_capture(
    source: SeriesGeometry | Sequence[Dataset],
    image: np.ndarray,
    relevance: np.ndarray,
    *,
    model: str,
    version: str,
    method: str,
    target: str,
    options: Mapping[str, Any] | None = None,
    deidentify: bool = False,
    deidentify_key: bytes | None = None,
    volume_index: int | None = None,
) -> list[Dataset]:
    """RGB Secondary Capture images, one per source slice: the relevance over the source image.

    Args:
        source: as for :func:`build_parametric_map`.
        image: the source volume (``DicomScan.data``) on the scan grid, or as frames.
        relevance: the relevance map on the scan grid, or as frames.
        model: model name.
        version: model version.
        method: attribution method.
        target: class explained.
        options: canonical options (hashed into the UIDs).
        deidentify: de-identify under the Basic Profile.
        deidentify_key: the server's key.
        volume_index: as for :func:`build_parametric_map`.

    Returns:
        One dataset per slice, in slice order.
    """
    quiet_dicom_loggers()
    key = _key(deidentify_key, deidentify)
    opts = {**(options or {}), "method": method, "target": target}
    src = _source(source, model=model, version=version, operation="attribute", options=opts, volume_index=volume_index)
    rgb = overlay_rgb(_frames(src.geometry, image), _frames(src.geometry, relevance))
    ident = src.identity
    orient = (_orientation_letters(src.geometry.row_direction), _orientation_letters(src.geometry.column_direction))
    out = []
    for k, frame in enumerate(rgb):
        ref = src.geometry.headers[k] if src.geometry.headers else src.images[0]
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=frame,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=ident.uid("sc-series"),
            series_number=SERIES_NUMBERS["sc"],
            sop_instance_uid=ident.uid("sc-instance", frame=k),
            instance_number=k + 1,
            manufacturer=MANUFACTURER,
            pixel_spacing=(float(src.geometry.pixel_spacing[0]), float(src.geometry.pixel_spacing[1])),  # type: ignore[arg-type]
            patient_orientation=orient,
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        )
        sc.BurnedInAnnotation = "NO"
        sc.ImageComments = RESEARCH_NOTICE
        out.append(_finish(sc, src, kind="Relevance overlay", deidentify_key=key))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# What serving calls


def validate_request(
    *,
    source_is_dicom: bool,
    operation: str,
    extras: Iterable[str] = (),
    deidentify: bool = False,
    deidentify_key: bytes | None = None,
) -> tuple[Extra, ...]:
    """Refuse a DICOM-results request before any work is done (the gateway calls it when ``return_dicom`` is set).

    Args:
        source_is_dicom: whether the scan came as a DICOM series (``Scan.dicom``, or a digest of one).
        operation: ``predict`` or ``attribute``.
        extras: the requested ``dicom_extras``.
        deidentify: the request's ``deidentify``.
        deidentify_key: the server's key, if configured.

    Returns:
        The parsed extras.

    Raises:
        InvalidInputError: ``return_dicom`` for a NIfTI/MGH scan.
        InvalidOptionError: an unknown extra, or extras on Predict.
        FailedPreconditionError: ``deidentify`` without a server key.
    """
    if not source_is_dicom:
        raise InvalidInputError(
            "return_dicom needs a DICOM series input (Scan.dicom); this scan is a NIfTI/MGH file, whose results come "
            "back as NIfTI only", field="return_dicom",
        )
    wanted = Extra.parse_all(extras)
    if operation == "predict" and wanted:
        raise InvalidOptionError("dicom extras (seg, sc) apply to attribute only; predict returns the SR alone",
                                 field="dicom_extras")
    if operation not in ("predict", "attribute"):
        raise InvalidOptionError(f"DICOM results exist for predict and attribute; not for {operation[:32]!r}")
    if deidentify:
        check_key(deidentify_key)
    return wanted


def build_results(
    source: SeriesGeometry | Sequence[Dataset],
    *,
    operation: str,
    model: str,
    version: str,
    predicted_class: str,
    probabilities: Mapping[str, float],
    relevance: np.ndarray | None = None,
    image: np.ndarray | None = None,
    method: str | None = None,
    target: str | None = None,
    summary: Mapping[str, Any] | None = None,
    input_check: InputCheckLike | None = None,
    options: Mapping[str, Any] | None = None,
    extras: Iterable[str] = (),
    deidentify: bool = False,
    deidentify_key: bytes | None = None,
) -> list[ResultObject]:
    """Every DICOM result object of one response, encoded (Predict: the SR; Attribute: PM + SR [+ SEG] [+ SC]).

    Args:
        source: the source series' geometry (with headers) or its headers.
        operation: ``predict`` or ``attribute``.
        model: model name.
        version: model version.
        predicted_class: the predicted class.
        probabilities: class -> probability.
        relevance: Attribute: the map on the scan's grid (or as frames).
        image: the source volume (needed for the ``sc`` extra).
        method: Attribute: the method.
        target: Attribute: the class explained.
        summary: Attribute: the attribution summary (clusters).
        input_check: the input check.
        options: the request's canonical options.
        extras: ``seg``, ``sc`` (Attribute only).
        deidentify: de-identify under the Basic Profile.
        deidentify_key: the server's key.

    Returns:
        The objects, PM first.

    Raises:
        InvalidOptionError: an unknown extra, extras on Predict, an unknown operation.
        FailedPreconditionError: ``deidentify`` without a key.
    """
    wanted = validate_request(source_is_dicom=True, operation=operation, extras=extras, deidentify=deidentify,
                              deidentify_key=deidentify_key)
    common: dict[str, Any] = {"model": model, "version": version, "options": options, "deidentify": deidentify,
                              "deidentify_key": deidentify_key}
    if operation == "predict":
        sr = build_sr(source, operation="predict", predicted_class=predicted_class, probabilities=probabilities,
                      input_check=input_check, **common)
        return [_encode(sr)]
    if relevance is None or method is None or target is None:
        raise InvalidInputError("attribute DICOM results need the relevance map, method and target")
    objects = [build_parametric_map(source, relevance, method=method, target=target, **common)]
    objects.append(build_sr(source, operation="attribute", predicted_class=predicted_class,
                            probabilities=probabilities, method=method, target=target,
                            clusters=clusters_from_summary(summary or {}), input_check=input_check, **common))
    if Extra.SEG in wanted:
        objects.append(build_segmentation(source, relevance, method=method, target=target, **common))
    if Extra.SC in wanted:
        if image is None:
            raise InvalidInputError("the sc extra needs the source image volume")
        objects.extend(build_secondary_capture(source, image, relevance, method=method, target=target, **common))
    return [_encode(ds) for ds in objects]


def render_parametric_map_png(pm: Dataset, source_instances: Sequence[Dataset], *, slice_mm: float | None = None) -> bytes:
    """A PNG of a Parametric Map over its source, rendered from the DICOM objects alone (what a viewer shows).

    Each PM frame is matched to the source image at the same ImagePositionPatient; the slice shown is the one with
    the largest positive relevance unless ``slice_mm`` (position along the normal) is given. Needs matplotlib.

    Args:
        pm: a Parametric Map built by :func:`build_parametric_map` (read back with pydicom).
        source_instances: the source series' instances, pixel data included (single-frame images).
        slice_mm: optional slice position along the image normal (mm).

    Returns:
        PNG bytes.

    Raises:
        InvalidInputError: a PM frame has no source image at its position.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quiet_dicom_loggers()
    values = np.asarray(pm.pixel_array, dtype=np.float64)  # (frames, rows, columns), FloatPixelData as stored
    positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
                 for f in pm.PerFrameFunctionalGroupsSequence]
    by_position = [(np.array(ds.ImagePositionPatient, dtype=np.float64), ds) for ds in source_instances]
    iop = np.array(pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    if slice_mm is None:
        k = int(np.argmax(np.clip(values, 0, None).sum(axis=(1, 2))))
    else:
        k = int(np.argmin([abs(float(p @ normal) - slice_mm) for p in positions]))
    match = [ds for p, ds in by_position if np.linalg.norm(p - positions[k]) < 0.01]
    if not match:
        raise InvalidInputError("a Parametric Map frame has no source image at its position; pass the source series")
    src = match[0]
    image = np.asarray(src.pixel_array, dtype=np.float64) * float(src.get("RescaleSlope", 1) or 1) + float(
        src.get("RescaleIntercept", 0) or 0)
    rel = values[k]
    vmax = float(np.abs(values).max()) or 1.0
    spacing = [float(v) for v in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    extent = (0, rel.shape[1] * spacing[1], rel.shape[0] * spacing[0], 0)
    fig, ax = plt.subplots(figsize=(5, 5 * extent[2] / extent[1]), dpi=110)
    ax.imshow(image, cmap="gray", extent=extent)
    shown = np.ma.masked_where(np.abs(rel) < 0.05 * vmax, rel)
    im = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax, alpha=0.75, extent=extent)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="relevance (real-world value)")
    label = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTExplanation
    ax.set_title(f"{label}\nframe {k + 1}/{len(positions)} at {float(positions[k] @ normal):.1f} mm — "
                 f"{RESEARCH_NOTICE}", fontsize=7)
    ax.set_xlabel("mm (along rows)")
    ax.set_ylabel("mm (down columns)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
