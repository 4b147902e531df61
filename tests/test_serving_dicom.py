"""DICOM in and out, registration and the input check through the real gateway, on both backends.

The library parts are tested in test_dicom_in.py, test_dicom_out.py, test_registration.py and test_inputcheck.py;
here: that the serving path uses them — a series sent as instances is read where the model runs and answers like the
same volume sent as NIfTI, DICOM results come back on the response and validate, ``register`` and the input check
are reported, ``--input-check reject`` refuses, and the CLI writes the objects.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_service_support are redefined as parameters)
from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from test_service_support import (  # noqa: F401  (fixtures)
    TINY,
    Running,
    backend,
    gated,
    gateway,
    make_scan,
    start_gateway,
    tiny_model_dir,
)

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain.cli.main import main
from neuroexplain.dicom.files import collect_instances, series_digest
from neuroexplain.lab.dicom_synth import write_series
from neuroexplain.volumes import read_scan

PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"
_UIDS_SEEN: dict[str, list[str]] = {}  # result UIDs by request, across the backend parameters
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A DICOM series of the same volume as a NIfTI scan (float values stored with a rescale), and that NIfTI."""
    nifti = make_scan(3)
    scan = read_scan(nifti)
    folder = tmp_path_factory.mktemp("series")
    write_series(scan.data, scan.affine, folder, rescale=(0.01, 0.0), orientation=None)
    return folder, nifti


def _instances(folder: Path) -> list[bytes]:
    return collect_instances(folder)


def test_a_series_is_predicted_like_the_same_volume_as_nifti_and_its_digest_ignores_order(
        gateway: Running, series: tuple[Path, bytes]) -> None:
    folder, nifti = series
    instances = _instances(folder)
    from_nifti = gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(data=nifti)))
    first = gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(dicom=pb.DicomSeries(instances=instances))))
    np.testing.assert_allclose(first.logits, from_nifti.logits, atol=1e-3)
    assert first.info.scan_digest == series_digest(instances) and not first.info.cached
    assert first.HasField("input_check") and first.input_check.threshold > 0 and first.input_check.reason
    assert first.info.alignment == pb.ALIGNMENT_MNI  # the series lies in the model's space
    shuffled = list(instances)
    random.Random(0).shuffle(shuffled)
    again = gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(dicom=pb.DicomSeries(instances=shuffled))))
    assert again.info.scan_digest == first.info.scan_digest and again.info.cached
    # a digest reference to a series the same caller sent resolves from the scan store
    by_digest = gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(digest=first.info.scan_digest)))
    assert list(by_digest.logits) == list(first.logits)


def test_attribute_returns_a_parametric_map_and_an_sr_that_file_into_the_source_study(
        gateway: Running, series: tuple[Path, bytes], tmp_path: Path) -> None:
    folder, _nifti = series
    instances = _instances(folder)
    source = pydicom.dcmread(io.BytesIO(instances[0]), stop_before_pixels=True)
    request = pb.AttributeRequest(model=TINY, scan=pb.Scan(dicom=pb.DicomSeries(instances=instances)),
                                  method="gradient", target="lesion", return_dicom=True)
    response = gateway.stub.Attribute(request)
    kinds = [o.sop_class_uid for o in response.dicom]
    assert kinds == [PM_SOP_CLASS, SR_SOP_CLASS]
    objects = [pydicom.dcmread(io.BytesIO(o.data)) for o in response.dicom]
    for obj, wire in zip(objects, response.dicom, strict=True):
        assert obj.StudyInstanceUID == source.StudyInstanceUID and obj.PatientID == source.PatientID
        assert obj.SOPInstanceUID == wire.sop_instance_uid and obj.SeriesInstanceUID == wire.series_instance_uid
        assert obj.SeriesInstanceUID != source.SeriesInstanceUID
    pm = objects[0]
    assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    relevance = np.asarray(read_scan(response.nifti).data, dtype=np.float64)
    frames = pm.pixel_array.astype(np.float64)  # float32 Parametric Map: the values themselves
    assert frames.size == relevance.size
    np.testing.assert_allclose(np.sort(frames.ravel()), np.sort(relevance.ravel()), rtol=1e-5, atol=1e-7)
    assert json.loads(response.summary.json)["predicted_class"] in ("healthy", "lesion")
    # the same request again: served from the cache, the objects rebuilt with the same UIDs (nothing duplicated)
    again = gateway.stub.Attribute(request)
    uids = [o.sop_instance_uid for o in response.dicom]
    assert again.info.cached and [o.sop_instance_uid for o in again.dicom] == uids
    # and the other backend (the parameters run in turn in one session) made the very same objects' UIDs
    assert _UIDS_SEEN.setdefault("attribute", uids) == uids
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    for i, wire in enumerate(response.dicom):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(wire.data)
        run = subprocess.run([dciodvfy, str(path)], check=False, capture_output=True, text=True, timeout=60)
        assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")], path


def test_series_refusals_name_the_problem(gateway: Running, series: tuple[Path, bytes]) -> None:
    folder, _nifti = series
    instances = _instances(folder)
    for bad, words in ((instances[:3] + instances[5:], "missing"),
                       (instances + instances[:1], "duplicate"),
                       (instances, "deidentify")):
        request = pb.PredictRequest(model=TINY, scan=pb.Scan(dicom=pb.DicomSeries(instances=bad)),
                                    return_dicom=True, deidentify=words == "deidentify")
        with pytest.raises(grpc.RpcError) as exc:
            gateway.stub.Predict(request)
        assert words in exc.value.details().lower(), exc.value.details()
        assert exc.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def test_register_is_reported_and_the_map_returns_to_the_scans_grid(tmp_path: Path) -> None:
    """The bundled lesion model (2 mm MNI grid) behind a gateway; a template brain whose header puts it 8 mm away."""
    from neuroexplain.template import MNI_2MM, anatomy
    from neuroexplain.volumes import nifti_bytes
    from service.backends.inprocess import InProcessBackend

    affine = MNI_2MM.affine.copy()
    affine[:3, 3] += (6.0, -4.0, 3.0)  # the same voxels, 8 mm away in world space
    data = nifti_bytes(anatomy(MNI_2MM).t1 * 800.0, affine)
    backend = InProcessBackend(models=("lesion",))
    backend.start()
    running = start_gateway(backend, tmp_path)
    try:
        response = running.stub.Attribute(pb.AttributeRequest(model="lesion", scan=pb.Scan(data=data),
                                                              method="gradient"))
        assert response.info.alignment == pb.ALIGNMENT_REGISTER  # auto: not in the model's space, so registered
        assert response.HasField("registration") and len(response.registration.transform) == 16
        assert response.registration.seconds > 0 and response.input_check.in_distribution
        t = np.asarray(response.registration.transform).reshape(4, 4)  # scan world -> model world undoes the move
        np.testing.assert_allclose(t[:3, 3], (-6.0, 4.0, -3.0), atol=1.5)
        out = read_scan(response.nifti)
        assert out.shape == MNI_2MM.shape and np.allclose(out.affine, affine)
        mni = running.stub.Predict(pb.PredictRequest(model="lesion", scan=pb.Scan(data=data,
                                                                                  alignment=pb.ALIGNMENT_MNI)))
        assert mni.info.alignment == pb.ALIGNMENT_MNI and not mni.HasField("registration")
    finally:
        running.stop()
        backend.close()


def _noise_scan() -> pb.Scan:
    from neuroexplain.volumes import nifti_bytes

    noise = np.random.default_rng(0).uniform(0, 100, (30, 36, 30)).astype(np.float32)
    return pb.Scan(data=nifti_bytes(noise, read_scan(make_scan(0)).affine), alignment=pb.ALIGNMENT_MNI)


def test_input_check_warn_answers_a_flagged_scan_and_says_so(gateway: Running) -> None:
    response = gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=_noise_scan()))
    check = response.input_check
    assert not check.in_distribution and check.score > check.threshold and check.reason
    assert "template" in check.checks
    assert gateway.sample("neuroexplain_input_checks_total", operation="predict", model=TINY, verdict="flagged") == 1


def test_input_check_reject_refuses_a_flagged_scan_and_counts_it(backend: object, tmp_path: Path) -> None:
    running = start_gateway(backend, tmp_path, input_check="reject")
    try:
        scan = _noise_scan()
        for rpc, request in ((running.stub.Predict, pb.PredictRequest(model=TINY, scan=scan)),
                             (running.stub.Attribute, pb.AttributeRequest(model=TINY, scan=scan, method="gradient"))):
            with pytest.raises(grpc.RpcError) as exc:
                rpc(request)
            assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "unlike the model's training data" in exc.value.details()
        assert running.sample("neuroexplain_input_checks_total", operation="predict", model=TINY,
                              verdict="flagged") == 1
        ok = running.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(data=make_scan(0))))
        assert ok.input_check.in_distribution
    finally:
        running.stop()


def test_cli_predicts_a_dicom_directory_and_writes_the_sr(gateway: Running, series: tuple[Path, bytes],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _nifti = series
    out = tmp_path / "results"
    out.mkdir()
    code = main(["predict", str(folder), "--model", TINY, "--server", f"127.0.0.1:{gateway.port}", "--json",
                 "--dicom-out", str(out)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, line
    assert line["alignment"] == "mni" and set(line["input_check"]) == {"in_distribution", "score", "threshold",
                                                                       "reason"}
    (written,) = line["dicom"]
    assert Path(written).parent == out and pydicom.dcmread(written).SOPClassUID == SR_SOP_CLASS


PLANTED_NAME, PLANTED_ID = "PLANTED^SECRETNAME", "PLANTEDID4711"


def _planted_series(folder: Path) -> list[bytes]:
    """A brain series whose Patient module carries a planted name and ID, also in a malformed element (an invalid
    date, which makes DICOM libraries warn and quote the value)."""
    scan = read_scan(make_scan(9))
    write_series(scan.data, scan.affine, folder, rescale=(0.01, 0.0), orientation=None, patient_name=PLANTED_NAME,
                 patient_id=PLANTED_ID)
    out = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.add_new(0x00100030, "DA", PLANTED_ID)  # PatientBirthDate holding text: malformed on purpose
        buffer = io.BytesIO()
        ds.save_as(buffer)
        out.append(buffer.getvalue())
    return out


def _without_patient_module(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for tag in [elem.tag for elem in ds if elem.tag.group == 0x0010]:
        del ds[tag]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_planted_identity_is_only_in_the_patient_module_and_nowhere_else(
        backend: object, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Hygiene on both backends: the name and ID go into the result objects' Patient module (DICOM needs them to
    file the objects) and nowhere else — not in logs, metrics, the disk cache, or TorchServe's files; with
    ``deidentify`` nowhere at all."""
    from prometheus_client import generate_latest

    key = tmp_path / "deid.key"
    key.write_bytes(b"k" * 32)
    instances = _planted_series(tmp_path / "series")
    running = start_gateway(backend, tmp_path, deidentify_key_file=str(key))
    caplog.set_level("DEBUG")
    caplog.clear()  # from here on: what the service logs (writing the planted series above made pydicom warn)
    try:
        scan = pb.Scan(dicom=pb.DicomSeries(instances=instances))
        objects = list(running.stub.Attribute(pb.AttributeRequest(
            model=TINY, scan=scan, method="gradient", return_dicom=True, dicom_extras=["seg"])).dicom)
        objects += list(running.stub.Predict(pb.PredictRequest(model=TINY, scan=scan, return_dicom=True)).dicom)
        anonymous = list(running.stub.Attribute(pb.AttributeRequest(
            model=TINY, scan=scan, method="gradient", return_dicom=True, deidentify=True)).dicom)
        with pytest.raises(grpc.RpcError):  # an error path too: a broken series, its header still readable
            running.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(dicom=pb.DicomSeries(
                instances=[i[:-100] for i in instances]))))
        metrics = generate_latest(running.registry)
    finally:
        running.stop()
    text = "\n".join(r.getMessage() for r in caplog.records).encode()  # before this test parses anything itself
    secrets = (PLANTED_NAME.encode(), b"SECRETNAME", PLANTED_ID.encode())
    assert any(PLANTED_ID.encode() in o.data for o in objects)  # the control: identity is copied where it belongs
    for obj in objects:
        rest = _without_patient_module(obj.data)
        assert not any(s in rest for s in secrets), obj.sop_class_uid
    for obj in anonymous:
        assert not any(s in obj.data for s in secrets), "a de-identified object still names the patient"
    assert not any(s in text for s in secrets) and not any(s in metrics for s in secrets)
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert not any(s in path.read_bytes() for s in secrets), f"the disk cache's {path.name}"
    supervisor = getattr(backend, "supervisor", None)
    if supervisor is not None:  # TorchServe: its logs and every other file it wrote
        files = [p for p in supervisor.work_dir.rglob("*") if p.is_file() and p.suffix not in (".mar", ".pt")]
        assert any("logs" in p.parts for p in files)
        for path in files:
            assert not any(s in path.read_bytes() for s in secrets), f"TorchServe's {path.name}"
