"""DICOM results (issue 16): Parametric Map, TID 1500 SR, SEG, SC — validity, values, geometry, UIDs, identity, logs.

Real components only: series written by ``neuroexplain.lab.dicom_synth``, read by ``neuroexplain.dicom``, objects
built by highdicom and checked by dicom3tools' ``dciodvfy``.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from neuroexplain import RESEARCH_NOTICE
from neuroexplain.dicom import read_series_dir
from neuroexplain.dicom import reader as reader_module
from neuroexplain.dicom import results as R
from neuroexplain.dicom.deid import load_key
from neuroexplain.dicom.uids import RequestIdentity
from neuroexplain.errors import FailedPreconditionError, InvalidOptionError, NeuroExplainError, ScanGeometryError
from neuroexplain.lab.dicom_synth import write_series

NAME = "PLANTEDSURNAME^PLANTEDGIVEN"
PID = "PLANTEDID4711"
KEY = bytes(range(32))
CI = os.environ.get("CI") == "true"
DCIODVFY = shutil.which("dciodvfy")


def _series(tmp: Path, *, enhanced: bool = False, orientation: str = "axial", seed: str = "a",
            reverse: bool = False) -> Any:
    rng = np.random.default_rng(0)
    vol = rng.normal(300, 40, (20, 18, 10)).astype(np.float32)
    aff = np.array([[1.5, 0, 0, -12.0], [0, 1.2, 0, 25.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    out = tmp / f"src-{orientation}-{enhanced}-{seed}-{reverse}"
    write_series(vol, aff, out, enhanced=enhanced, orientation=orientation, reverse_slices=reverse,  # type: ignore[arg-type]
                 patient_name=NAME, patient_id=PID, uid_seed=seed)
    scan = read_series_dir(out)
    _DIRS[id(scan)] = out
    return scan


def _relevance(shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(1)
    rel = rng.normal(0, 0.2, shape).astype(np.float32)
    rel[3:7, 4:8, 2:5] += 5.0  # the strongest cluster
    rel[12:15, 10:13, 6:8] += 3.0  # a second one
    return rel


def _summary(scan: Any, rel: np.ndarray) -> dict[str, Any]:
    """Clusters as the summary gives them: centroids in the scan's world space (RAS mm)."""
    out = []
    for rank, (lo, hi) in enumerate([((3, 4, 2), (7, 8, 5)), ((12, 10, 6), (15, 13, 8))], start=1):
        idx = np.mgrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(3, -1).mean(axis=1)
        ras = scan.affine[:3, :3] @ idx + scan.affine[:3, 3]
        out.append({"rank": rank, "centroid_mm": [float(v) for v in ras], "peak_mm": [float(v) for v in ras],
                    "volume_ml": 0.1 * rank, "share_of_positive": 0.5 / rank})
    return {"clusters": out}


_DIRS: dict[int, Path] = {}


def scan_dir(scan: Any) -> list[Path]:
    """The instance files of a series written by :func:`_series`."""
    return [p for p in _DIRS[id(scan)].iterdir() if p.is_file()]


def _build(scan: Any, **kw: Any) -> list[R.ResultObject]:
    rel = kw.pop("relevance", None)
    rel = _relevance(scan.geometry.shape) if rel is None else rel
    args: dict[str, Any] = {
        "operation": "attribute", "model": "lesion", "version": "1.0.0", "predicted_class": "lesion",
        "probabilities": {"healthy": 0.25, "lesion": 0.75}, "relevance": rel, "image": scan.data,
        "method": "integrated_gradients", "target": "lesion", "summary": _summary(scan, rel),
        "input_check": R.InputCheckFinding(True, 0.42, 1.5, "within the training distribution"),
        "options": {"steps": 16},
    }
    args.update(kw)
    return R.build_results(scan.geometry, **args)


def _read(obj: R.ResultObject) -> Dataset:
    return pydicom.dcmread(io.BytesIO(obj.data))


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _series(tmp_path_factory.mktemp("dicom-out"))


@pytest.fixture(scope="module")
def objects(scan: Any) -> list[R.ResultObject]:
    return _build(scan, extras=["seg", "sc"])


def _by_class(objects: list[R.ResultObject], uid: str) -> list[R.ResultObject]:
    return [o for o in objects if o.sop_class_uid == uid]


def _dciodvfy(data: bytes, tmp: Path) -> list[str]:
    if DCIODVFY is None:
        if CI:
            pytest.fail("dciodvfy (dicom3tools) is missing; CI needs it")
        pytest.skip("dciodvfy (dicom3tools) not installed")
    path = tmp / "obj.dcm"
    path.write_bytes(data)
    proc = subprocess.run([DCIODVFY, "-new", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


# ---------------------------------------------------------------------------------------------------------------------
# Validity


def test_every_object_passes_dciodvfy_and_reads_back(objects: list[R.ResultObject], tmp_path: Path) -> None:
    classes = [o.sop_class_uid for o in objects]
    assert classes[:3] == [pydicom.uid.ParametricMapStorage, pydicom.uid.Comprehensive3DSRStorage,
                           pydicom.uid.SegmentationStorage]
    assert classes[3:] == [pydicom.uid.SecondaryCaptureImageStorage] * (len(objects) - 3)
    for obj in objects:
        assert _dciodvfy(obj.data, tmp_path) == [], obj.sop_class_uid
        ds = _read(obj)
        assert ds.SOPInstanceUID == obj.sop_instance_uid and ds.SeriesInstanceUID == obj.series_instance_uid
        assert RESEARCH_NOTICE in ds.SeriesDescription
        assert ds.Manufacturer == "neuroexplain"
        assert any("lesion 1.0.0" in v for v in ds.SoftwareVersions) or "lesion" in str(ds.get("ManufacturerModelName"))
    hd.seg.segread(io.BytesIO(_by_class(objects, pydicom.uid.SegmentationStorage)[0].data))
    hd.sr.srread(io.BytesIO(_by_class(objects, pydicom.uid.Comprehensive3DSRStorage)[0].data))
    hd.pm.ParametricMap.from_dataset(_read(objects[0]))
    hd.imread(io.BytesIO(objects[-1].data))


@pytest.mark.parametrize("enhanced,orientation,reverse", [(True, "sagittal", False), (False, "coronal", True)])
def test_pm_on_other_geometries(tmp_path: Path, enhanced: bool, orientation: str, reverse: bool) -> None:
    scan = _series(tmp_path, enhanced=enhanced, orientation=orientation, reverse=reverse)
    rel = _relevance(scan.geometry.shape)
    pm = R.build_parametric_map(scan.geometry, rel, model="lesion", version="1.0.0", method="gradient",
                                target="lesion")
    obj = R._encode(pm)
    assert _dciodvfy(obj.data, tmp_path) == []
    _check_pm(_read(obj), scan, rel)


def _check_pm(ds: Dataset, scan: Any, rel: np.ndarray) -> None:
    frames = scan.geometry.to_frames(rel)  # (slices, rows, columns)
    got = ds.pixel_array.astype(np.float64)
    assert got.shape == frames.shape
    # highdicom may store frames in another order (sorted by position): match each frame to its source slice.
    positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence],
                         dtype=np.float64)
    source = scan.geometry.positions
    order = [int(np.argmin(np.linalg.norm(source - p, axis=1))) for p in positions]
    assert sorted(order) == list(range(len(source)))  # every source slice exactly once
    np.testing.assert_allclose(positions, source[order], atol=1e-4)
    np.testing.assert_allclose(got, frames[order], rtol=1e-5, atol=1e-5 * float(np.abs(frames).max()))
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    np.testing.assert_allclose(iop, np.r_[scan.geometry.row_direction, scan.geometry.column_direction], atol=1e-6)
    src = scan.geometry.headers[0]
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    mapping = shared.RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert "relevance" in mapping.LUTExplanation


def test_pm_values_positions_frame_of_reference(objects: list[R.ResultObject], scan: Any) -> None:
    _check_pm(_read(objects[0]), scan, _relevance(scan.geometry.shape))


def _sr_items(ds: Dataset) -> list[Dataset]:
    out: list[Dataset] = []

    def walk(seq: Any) -> None:
        for item in seq:
            out.append(item)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def test_sr_holds_model_prediction_check_clusters_in_lps(objects: list[R.ResultObject], scan: Any) -> None:
    ds = _read(_by_class(objects, pydicom.uid.Comprehensive3DSRStorage)[0])
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    items = _sr_items(ds)
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in items if i.ValueType == "TEXT"}
    assert texts["Notice"] == RESEARCH_NOTICE and texts["Model"] == "lesion 1.0.0"
    assert texts["Attribution method"] == "integrated_gradients" and texts["Target class"] == "lesion"
    assert texts["Input check reason"] == "within the training distribution"
    nums = [(i.ConceptNameCodeSequence[0].CodeMeaning, float(i.MeasuredValueSequence[0].NumericValue))
            for i in items if i.ValueType == "NUM"]
    assert ("Probability of lesion", 0.75) in nums and ("Probability of healthy", 0.25) in nums
    assert ("Input check score", 0.42) in nums and ("Input check threshold", 1.5) in nums
    codes = {i.ConceptNameCodeSequence[0].CodeMeaning: i.ConceptCodeSequence[0].CodeMeaning
             for i in items if i.ValueType == "CODE"}
    assert codes["Predicted class"] == "lesion" and codes["In distribution"] == "Yes"
    points = [np.array(i.GraphicData, dtype=np.float64) for i in items if i.ValueType == "SCOORD3D"]
    summary = _summary(scan, _relevance(scan.geometry.shape))
    assert len(points) == 2
    for point, cluster, in zip(points, summary["clusters"]):
        x, y, z = cluster["centroid_mm"]
        np.testing.assert_allclose(point, [-x, -y, z], atol=0.01)  # RAS -> LPS
    # Independently: the planted blob's centre through the series' own LPS affine.
    idx = np.array([4.5, 5.5, 3.0, 1.0])
    np.testing.assert_allclose(points[0], (scan.geometry.affine_lps @ idx)[:3], atol=0.01)
    scoords = [i for i in items if i.ValueType == "SCOORD3D"]
    assert {i.ReferencedFrameOfReferenceUID for i in scoords} == {scan.geometry.headers[0].FrameOfReferenceUID}
    volumes = [v for name, v in nums if name == "Volume"]
    shares = [v for name, v in nums if name == "Share of positive relevance"]
    assert volumes == pytest.approx([0.1, 0.2]) and shares == pytest.approx([50.0, 25.0])


def test_predict_returns_the_sr_alone(scan: Any, tmp_path: Path) -> None:
    objs = R.build_results(scan.geometry, operation="predict", model="lesion", version="1.0.0",
                           predicted_class="healthy", probabilities={"healthy": 0.9, "lesion": 0.1})
    assert [o.sop_class_uid for o in objs] == [pydicom.uid.Comprehensive3DSRStorage]
    assert _dciodvfy(objs[0].data, tmp_path) == []


def test_segmentation_covers_the_top_clusters(objects: list[R.ResultObject], scan: Any) -> None:
    seg = hd.seg.segread(io.BytesIO(_by_class(objects, pydicom.uid.SegmentationStorage)[0].data))
    assert seg.number_of_segments >= 2
    # Segment 1 = the strongest planted blob: rebuild its mask in frame order from the source-referenced frames.
    mask = np.zeros((scan.geometry.n_slices, scan.geometry.rows, scan.geometry.columns), dtype=bool)
    positions = [tuple(np.round(p, 3)) for p in scan.geometry.positions]
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber != 1:
            continue
        k = positions.index(tuple(np.round(np.array(item.PlanePositionSequence[0].ImagePositionPatient,
                                                     dtype=np.float64), 3)))
        mask[k] |= seg.pixel_array[f].astype(bool) if seg.pixel_array.ndim == 3 else seg.pixel_array.astype(bool)
    expected = np.zeros(scan.geometry.shape, dtype=bool)
    expected[3:7, 4:8, 2:5] = True
    assert np.array_equal(mask, scan.geometry.to_frames(expected))


# ---------------------------------------------------------------------------------------------------------------------
# UIDs


def _uids(objs: list[R.ResultObject]) -> list[tuple[str, str]]:
    return [(o.series_instance_uid, o.sop_instance_uid) for o in objs]


def test_uids_deterministic_and_sensitive(scan: Any, objects: list[R.ResultObject], tmp_path: Path) -> None:
    again = _build(scan, extras=["seg", "sc"])
    assert _uids(again) == _uids(objects)
    assert all(u.startswith("2.25.") and len(u) <= 64 for pair in _uids(objects) for u in pair)
    # PM, SR, SEG: a series and an instance each; the SC images share one series.
    assert len({u for pair in _uids(objects) for u in pair}) == len(objects) + 4
    # Headers in another order: the same UIDs (sorted SOPInstanceUIDs).
    reordered = R.build_parametric_map(list(reversed(scan.geometry.headers)), _relevance(scan.geometry.shape),
                                       model="lesion", version="1.0.0", method="integrated_gradients",
                                       target="lesion", options={"steps": 16})
    assert reordered.SOPInstanceUID == objects[0].sop_instance_uid
    pm_uid = objects[0].sop_instance_uid
    # Headers parsed from the files without pixel data, shuffled (what a gateway holding only headers passes).
    files = sorted(Path(p) for p in scan_dir(scan))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    np.random.default_rng(3).shuffle(headers)  # type: ignore[arg-type]
    from_files = R.build_parametric_map(headers, _relevance(scan.geometry.shape), model="lesion", version="1.0.0",
                                        method="integrated_gradients", target="lesion", options={"steps": 16})
    assert from_files.SOPInstanceUID == pm_uid
    _check_pm(_read(R._encode(from_files)), scan, _relevance(scan.geometry.shape))
    assert _build(scan, method="gradient")[0].sop_instance_uid != pm_uid
    assert _build(scan, options={"steps": 17})[0].sop_instance_uid != pm_uid
    assert _build(scan, target="healthy")[0].sop_instance_uid != pm_uid
    assert _build(scan, version="1.0.1")[0].sop_instance_uid != pm_uid
    other = _series(tmp_path, seed="b")
    assert _build(other)[0].sop_instance_uid != pm_uid
    # Predict and attribute SRs of the same series differ.
    sr_predict = R.build_results(scan.geometry, operation="predict", model="lesion", version="1.0.0",
                                 predicted_class="lesion", probabilities={"healthy": 0.25, "lesion": 0.75},
                                 options={"steps": 16})
    assert sr_predict[0].sop_instance_uid != objects[1].sop_instance_uid


def test_uids_equal_in_another_process() -> None:
    ident = RequestIdentity("1.2.3", "1.2.3.4", ("1.2.3.4.6", "1.2.3.4.5"), "lesion", "1.0.0", "attribute", "{}")
    code = ("from neuroexplain.dicom.uids import RequestIdentity as R; "
            "print(R('1.2.3','1.2.3.4',('1.2.3.4.5','1.2.3.4.6'),'lesion','1.0.0','attribute','{}').uid('pm-instance'))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == ident.uid("pm-instance")
    assert ident.uid("pm-instance") != ident.uid("sr-instance") != ident.uid("pm-instance", frame=0)


# ---------------------------------------------------------------------------------------------------------------------
# Identity and de-identification


def _values(ds: Dataset, path: str = "") -> list[tuple[str, str]]:
    out = []
    for elem in ds:
        where = f"{path}/{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            for item in elem.value:
                out.extend(_values(item, where))
        elif elem.VR not in ("OB", "OW", "OF", "OD", "UN"):
            out.append((where, str(elem.value)))
    return out


def test_patient_data_only_in_the_patient_module(objects: list[R.ResultObject], scan: Any) -> None:
    for obj in objects:
        ds = _read(obj)
        hits = sorted({where for where, value in _values(ds) if "PLANTED" in value})
        assert hits == ["/PatientID", "/PatientName"], (obj.sop_class_uid, hits)
        assert obj.data.count(b"PLANTED") == 3  # two name components and the ID, once each
        assert ds.StudyInstanceUID == scan.geometry.headers[0].StudyInstanceUID


#: Source attributes a result may share with its source: the Patient and Study modules (identity, so that a PACS
#: files it), the Frame of Reference, and technical values that agree because the grid is the same.
_MAY_SHARE = {
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight", "PatientSize",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "Rows", "Columns", "SamplesPerPixel",
    "PhotometricInterpretation", "PixelSpacing", "InstanceNumber", "Laterality", "Manufacturer",
    "SpecificCharacterSet", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
}


def test_nothing_else_of_the_source_is_copied(objects: list[R.ResultObject], scan: Any) -> None:
    source = scan.geometry.headers[0]
    values = {e.keyword: e.value for e in source if e.VR not in ("SQ", "OB", "OW", "UN") and e.keyword}
    for obj in objects:
        ds = _read(obj)
        shared = {k for k, v in values.items() if k in ds and ds[k].value == v and v not in ("", None)}
        assert shared <= _MAY_SHARE, (obj.sop_class_uid, shared - _MAY_SHARE)
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID not in {
            str(h.SOPInstanceUID) for h in scan.geometry.headers}


def test_deidentified_objects_hold_no_identity(scan: Any, objects: list[R.ResultObject], tmp_path: Path) -> None:
    src = scan.geometry.headers
    secrets = [NAME.split("^")[0], NAME.split("^")[1], PID, str(src[0].StudyInstanceUID),
               str(src[0].SeriesInstanceUID), str(src[0].FrameOfReferenceUID), str(src[0].StudyDate),
               *(str(ds.SOPInstanceUID) for ds in src)]
    deid = _build(scan, extras=["seg", "sc"], deidentify=True, deidentify_key=KEY)
    plain = {o.sop_instance_uid for o in objects}
    studies, frames = set(), set()
    for obj in deid:
        for secret in secrets:
            assert secret.encode() not in obj.data, obj.sop_class_uid
        assert obj.sop_instance_uid not in plain
        ds = _read(obj)
        assert ds.PatientIdentityRemoved == "YES"
        assert "Basic" in ds.DeidentificationMethod[0]
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        studies.add(ds.StudyInstanceUID)
        frames.add(ds.get("FrameOfReferenceUID"))
    assert len(studies) == 1  # consistent within the study
    assert {f for f in frames if f} and len({f for f in frames if f}) == 1
    for obj in deid[:3] + deid[-1:]:
        assert _dciodvfy(obj.data, tmp_path) == [], obj.sop_class_uid
    # The SR still points at the (remapped) source consistently: its evidence is the remapped series.
    sr = _read(deid[1])
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID in studies
    # Another key: other UIDs.
    other = _build(scan, deidentify=True, deidentify_key=bytes(32))
    assert other[0].sop_instance_uid != deid[0].sop_instance_uid


# ---------------------------------------------------------------------------------------------------------------------
# Logs


def test_library_loggers_never_print_patient_data(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src_dir = tmp_path / "bad"
    scan = _series(tmp_path, seed="c")
    src_dir.mkdir()
    # Plant the name in a malformed element of every instance: PatientAge (AS) must look like "042Y"; pydicom's
    # validation warnings quote the value.
    for k, header in enumerate(scan.geometry.headers):
        ds = Dataset({tag: header.get_item(tag) for tag in header.keys()})  # noqa: SIM118
        ds.file_meta = header.file_meta
        ds[0x00101010] = RawDataElement(Tag(0x00101010), "AS", 14, b"PLANTEDSURNAME", 0, False, True)
        ds.PixelData = np.random.default_rng(k).integers(0, 500, (ds.Rows, ds.Columns), dtype=np.int16).tobytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
            ds.save_as(src_dir / f"{k}.dcm", enforce_file_format=True)

    def run() -> tuple[str, list[str]]:
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
            warnings.simplefilter("always")
            logging.getLogger("highdicom").setLevel(logging.DEBUG)
            pydicom.config.debug(True, default_handler=False)
            try:
                bad = read_series_dir(src_dir)
                objs = _build(bad, relevance=_relevance(bad.geometry.shape), image=bad.data, extras=["seg"])
                for o in objs:
                    pydicom.dcmread(io.BytesIO(o.data)).PatientAge  # noqa: B018 - reading the malformed value
            finally:
                pydicom.config.debug(False, default_handler=False)
        return caplog.text, [str(w.message) for w in caught]

    # Control: without the filters and with pydicom's validation on, the libraries do print patient data (names in
    # pydicom's debug records and validation warnings, UIDs in highdicom's info records): so this test can fail.
    loggers = [logging.getLogger(n) for n in ["highdicom", "pydicom", *logging.root.manager.loggerDict]
               if n.startswith(("highdicom", "pydicom"))]
    with monkeypatch.context() as patch:
        for logger in loggers:
            for f in list(logger.filters):
                patch.setattr(logger, "filters", [g for g in logger.filters if g is not f])
        patch.setattr(R, "quiet_dicom_loggers", lambda: None)
        patch.setattr(reader_module, "quiet_pydicom", lambda: None)
        patch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)
        text, messages = run()
    assert "PLANTED" in text or any("PLANTED" in m for m in messages), "control: pydicom should quote the name"
    assert str(scan.geometry.headers[0].SOPInstanceUID) in text, "control: highdicom should log a source UID"
    R.quiet_dicom_loggers()
    text, messages = run()
    assert "PLANTED" not in text and not any("PLANTED" in m for m in messages)
    for header in read_series_dir(src_dir).geometry.headers:
        assert str(header.SOPInstanceUID) not in text
        assert str(header.StudyInstanceUID) not in text


# ---------------------------------------------------------------------------------------------------------------------
# Bad requests


def test_bad_requests_are_typed_errors(scan: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match=r"dicom extra 'pdf' is unknown; expected any of \['seg', 'sc'\]"):
        _build(scan, extras=["seg", "pdf"])
    with pytest.raises(FailedPreconditionError, match="no de-identification key"):
        _build(scan, deidentify=True)
    with pytest.raises(FailedPreconditionError, match="cannot be read"):
        load_key(tmp_path / "missing.key")
    (tmp_path / "short.key").write_bytes(b"x" * 8)
    with pytest.raises(FailedPreconditionError, match="has 8 bytes; expected 16 to 4096"):
        load_key(tmp_path / "short.key")
    (tmp_path / "good.key").write_bytes(KEY)
    assert load_key(tmp_path / "good.key") == KEY
    with pytest.raises(InvalidOptionError, match="apply to attribute only"):
        R.build_results(scan.geometry, operation="predict", model="lesion", version="1.0.0", predicted_class="lesion",
                        probabilities={"lesion": 1.0}, extras=["sc"])
    with pytest.raises(ScanGeometryError, match="expected the scan's grid"):
        _build(scan, relevance=np.zeros((3, 3, 3), np.float32))
    with pytest.raises(NeuroExplainError, match="return_dicom needs a DICOM series input") as info:
        R.validate_request(source_is_dicom=False, operation="attribute")
    assert info.value.code == "INVALID_ARGUMENT" and info.value.field == "return_dicom"
    assert R.validate_request(source_is_dicom=True, operation="attribute", extras=["SC", "seg", "sc"]) == (
        R.Extra.SC, R.Extra.SEG)
    with pytest.raises(FailedPreconditionError) as refused:
        R.validate_request(source_is_dicom=True, operation="predict", deidentify=True)
    assert refused.value.code == "FAILED_PRECONDITION" and refused.value.field == "deidentify"
    bad = _relevance(scan.geometry.shape)
    bad[0, 0, 0] = np.nan
    with pytest.raises(NeuroExplainError, match="NaN or Inf"):
        _build(scan, relevance=bad)
