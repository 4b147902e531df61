"""The PACS bridge as a process against a real gateway, a real Orthanc and dcmtk's storescu (no mocks)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require_binary
from orthanc import Orthanc, free_port, orthanc
from test_service_support import TINY, write_tiny_model

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

NAME, PID = "PLANTED^SECRETNAME", "PLANTEDID4711"
MR = "1.2.840.10008.5.1.4.1.1.4"
PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"


def write_series(folder: Path, study: str, series: str, n: int, image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
                 number: int = 1) -> list[Path]:
    """``n`` MR slices of 16 x 16 (no numpy: pixel bytes written directly)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.PatientName, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = NAME, PID, study, series
        ds.SOPClassUID, ds.SOPInstanceUID = MR, generate_uid()
        ds.Modality, ds.ImageType, ds.SeriesNumber, ds.InstanceNumber = "MR", image_type, number, i + 1
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ACC1"
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study])
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(i)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = bytes((i * 7 + k) % 251 for k in range(16 * 16 * 2))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"{number}_{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_for(cond: Callable[[], object], seconds: float, what: str) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def start_gateway(port: int, tmp: Path) -> subprocess.Popen[str]:
    """A real gateway (in-process backend, the tiny model) on ``port``; returns once it printed ``ready``."""
    models = write_tiny_model(tmp / "models")
    env = {**os.environ, "NEUROEXPLAIN_MODEL_DIRS": str(models), "NEUROEXPLAIN_AUDIT_LOG": "off"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroexplain.cli.main", "serve", "--backend", "inprocess", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "-1", "--health-port", "-1", "--cache-dir", str(tmp / "cache")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    proc = start_gateway(port, tmp_path_factory.mktemp("gateway"))
    yield port
    proc.terminate()
    proc.wait(60)


def brain_series(folder: Path, seed: str) -> tuple[list[Path], str, str]:
    """A brain in the tiny model's space as a 30 x 36 x 30 MR series (UIDs from ``seed``): files, study, series."""
    from test_service_support import make_scan

    from neuroexplain.lab.dicom_synth import write_series as write_volume
    from neuroexplain.volumes import read_scan

    volume = read_scan(make_scan(8))
    write_volume(volume.data, volume.affine, folder, orientation=None, rescale=(0.01, 0.0),
                 patient_name=NAME, patient_id=PID, uid_seed=seed)
    files = sorted(folder.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return files, str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class BridgeProc:
    def __init__(self, spool: Path, gateway: int, send_to: str, *extra: str, port: int | None = None) -> None:
        self.port, self.metrics = port or free_port(), free_port()
        self.log = spool.parent / f"bridge-{self.port}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "neuroexplain.pacs", "--spool", str(spool), "--host", "127.0.0.1",
             "--port", str(self.port), "--metrics-port", str(self.metrics), "--server", f"127.0.0.1:{gateway}",
             "--model", TINY, *(("--send-to", send_to) if send_to else ()), "--min-slices", "4",
             "--retry-base-seconds", "0.2", *extra],
            stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True)  # noqa: SIM115
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", self.log.read_text()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)


def storescu(port: int, files: list[Path], aet: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    binary = require_binary("storescu", "the sending modality of the bridge tests")
    return subprocess.run([binary, "-aet", aet, "-aec", "NEUROEXPLAIN", "127.0.0.1", str(port), *map(str, files)],
                          check=False, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with orthanc(tmp_path / "orthanc") as node:
        yield node


def test_unlisted_calling_ae_is_rejected_and_nothing_is_spooled(tmp_path: Path, gateway: int, pacs: Orthanc) -> None:
    spool = tmp_path / "spool"
    bridge = BridgeProc(spool, gateway, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow-ae", "MODALITY")
    try:
        files = write_series(tmp_path / "in", generate_uid(), generate_uid(), 4)
        result = storescu(bridge.port, files, aet="INTRUDER")
        assert result.returncode != 0
        assert not list(spool.rglob("*.dcm"))
    finally:
        bridge.stop()
    # and with no --allow-ae at all, the bridge says so at start
    quiet = BridgeProc(tmp_path / "spool2", gateway, f"ORTHANC@127.0.0.1:{pacs.dicom_port}")
    try:
        assert storescu(quiet.port, files).returncode != 0
    finally:
        quiet.stop()
    assert "every association will be rejected" in quiet.log.read_text()


def test_more_than_ten_modalities_may_send_at_once(tmp_path: Path, gateway: int, pacs: Orthanc) -> None:
    """pynetdicom accepts 10 associations at once by default; the bridge accepts --max-associations (32)."""
    from pynetdicom import AE

    bridge = BridgeProc(tmp_path / "spool", gateway, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow-ae", "MODALITY",
                        "--quiet-seconds", "600")
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(MR)
    assocs = [scu.associate("127.0.0.1", bridge.port, ae_title="NEUROEXPLAIN") for _ in range(16)]
    try:
        assert [a.is_established for a in assocs] == [True] * 16
    finally:
        for a in assocs:
            if a.is_established:
                a.release()
        bridge.stop()


def test_refusal_gives_failed_reason_and_not_analysed_sr_localizer_skipped_no_patient_data_in_logs(
        tmp_path: Path, gateway: int, pacs: Orthanc) -> None:
    """A series the gateway refuses (16 x 16 x 6 mm of ramps: nothing a brain model can place, INVALID_ARGUMENT): a
    permanent refusal, the whole failure path."""
    spool = tmp_path / "spool"
    study, series, loc = generate_uid(), generate_uid(), generate_uid()
    files = write_series(tmp_path / "in", study, series, 6) + write_series(
        tmp_path / "in", study, loc, 6, image_type="ORIGINAL\\PRIMARY\\LOCALIZER", number=2)
    bridge = BridgeProc(spool, gateway, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow-ae", "MODALITY",
                        "--quiet-seconds", "1")
    try:
        result = storescu(bridge.port, files)
        assert result.returncode == 0, result.stderr
        assert len(list(spool.rglob("*.dcm"))) <= 6  # the localizer never reaches the spool
        reasons = wait_for(lambda: list((spool / "failed").glob("*/reason.txt")), 60, "failed/ reason")
        assert isinstance(reasons, list) and len(reasons) == 1
        reason = reasons[0].read_text()
        assert reason.count("\n") == 1 and "INVALID_ARGUMENT" in reason
        srs = wait_for(lambda: [t for t in pacs.instances_tags() if t.get("Modality") == "SR"], 60, "SR in Orthanc")
        assert isinstance(srs, list) and len(srs) == 1
        assert srs[0]["StudyInstanceUID"] == study and srs[0]["PatientID"] == PID
        [sr] = [d for d in (pydicom.dcmread(io.BytesIO(b)) for b in pacs.instance_files()) if d.Modality == "SR"]
        text = sr.ContentSequence[0].TextValue  # the SR says "not analysed", and why
        assert text.startswith("Not analysed by neuroexplain") and "INVALID_ARGUMENT" in text
        metrics = bridge.metrics_text()
        assert "neuroexplain_pacs_instances_received_total 6.0" in metrics
        assert 'neuroexplain_pacs_instances_filtered_total{reason="image_type"} 6.0' in metrics
        assert 'neuroexplain_pacs_series_failed_total{stage="service"} 1.0' in metrics
    finally:
        bridge.stop()
    assert bridge.proc.returncode == 0
    logs = bridge.log.read_text()
    for secret in (NAME, "SECRETNAME", PID, study, series, loc):
        assert secret not in logs and secret not in metrics


def test_spool_full_refuses_with_a_dicom_status_and_keeps_what_it_acknowledged(
        tmp_path: Path, gateway: int, pacs: Orthanc) -> None:
    files = write_series(tmp_path / "in", generate_uid(), generate_uid(), 6)
    one = files[0].stat().st_size
    spool = tmp_path / "spool"
    bridge = BridgeProc(spool, gateway, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow-ae", "MODALITY",
                        "--quiet-seconds", "600", "--spool-max-bytes", str(int(one * 3.5)))
    try:
        result = storescu(bridge.port, files)
        assert bridge.proc.poll() is None  # never a crash
        assert "0xa700" in (result.stdout + result.stderr).lower() or result.returncode != 0
        assert len(list((spool / "series").glob("*/in/*.dcm"))) == 3
        # storescu stops at the first refusal; what was acknowledged is on disk, what was refused is counted
        assert 'neuroexplain_pacs_instances_refused_total{reason="spool_full"} 0.0' not in bridge.metrics_text()
        assert 'neuroexplain_pacs_instances_refused_total{reason="spool_full"}' in bridge.metrics_text()
    finally:
        bridge.stop()


def test_sigkill_after_acknowledging_resumes_after_restart(tmp_path: Path, gateway: int, pacs: Orthanc) -> None:
    study = generate_uid()
    files = write_series(tmp_path / "in", study, generate_uid(), 5)
    spool = tmp_path / "spool"
    send_to = f"ORTHANC@127.0.0.1:{pacs.dicom_port}"
    first = BridgeProc(spool, gateway, send_to, "--allow-ae", "MODALITY", "--quiet-seconds", "600")
    assert storescu(first.port, files).returncode == 0
    first.stop(signal.SIGKILL)
    assert len(list((spool / "series").glob("*/in/*.dcm"))) == 5
    second = BridgeProc(spool, gateway, send_to, "--allow-ae", "MODALITY", "--quiet-seconds", "0.5")
    try:
        wait_for(lambda: [t for t in pacs.instances_tags() if t.get("StudyInstanceUID") == study], 60,
                 "the result after restart")
    finally:
        second.stop()


def test_spool_full_refuses_a_second_series_which_is_delivered_when_sent_again(
        tmp_path: Path, gateway: int, pacs: Orthanc) -> None:
    """Nothing lost: series A fills the spool, series B is refused (0xA700) while A waits; once A's results are
    stored its files are gone, and B, sent again by the modality, is accepted in full and delivered too."""
    files_a, study_a, _ = brain_series(tmp_path / "a", "spool-full-a")
    files_b, study_b, _ = brain_series(tmp_path / "b", "spool-full-b")
    size_a = sum(f.stat().st_size for f in files_a)
    spool = tmp_path / "spool"
    bridge = BridgeProc(spool, gateway, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow-ae", "MODALITY",
                        "--quiet-seconds", "10", "--spool-max-bytes", str(size_a + files_b[0].stat().st_size // 2))
    try:
        assert storescu(bridge.port, files_a).returncode == 0
        refused = storescu(bridge.port, files_b)  # at once, while A is still in the spool (quiet for 10 s)
        assert refused.returncode != 0 or "0xa700" in (refused.stdout + refused.stderr).lower()
        assert metric(bridge.metrics_text(), "neuroexplain_pacs_series_stored_total") == 0, "A went too fast"
        assert metric(bridge.metrics_text(), 'neuroexplain_pacs_instances_refused_total{reason="spool_full"}') >= 1
        assert bridge.proc.poll() is None
        assert len(list((spool / "series").glob("*/in/*.dcm"))) == len(files_a)  # all of A, nothing of B
        wait_for(lambda: metric(bridge.metrics_text(), "neuroexplain_pacs_series_stored_total") == 1, 120,
                 "A's results")
        assert not list((spool / "series").glob("*/in/*.dcm"))  # A's files deleted: room again
        assert storescu(bridge.port, files_b).returncode == 0
        wait_for(lambda: metric(bridge.metrics_text(), "neuroexplain_pacs_series_stored_total") == 2, 120,
                 "B's results")
        assert [t["Modality"] for t in results_in(pacs, study_a)] == ["SR"]
        assert [t["Modality"] for t in results_in(pacs, study_b)] == ["SR"]
        assert metric(bridge.metrics_text(), "neuroexplain_pacs_instances_received_total") == 2 * len(files_a)
        assert not list((spool / "failed").glob("*"))
    finally:
        bridge.stop()


def test_sigkill_with_results_received_but_not_stored_delivers_them_after_restart(
        tmp_path: Path, gateway: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed in state ``sent`` (results fsynced in out/, the destination down): after a restart the bridge delivers
    the results it kept, without asking the service again, and exactly once."""
    import orthanc as orthanc_module

    dicom_port, http_port = free_port(), free_port()
    files, study, _ = brain_series(tmp_path / "in", "killed-when-sent")
    spool = tmp_path / "spool"
    send_to = f"ORTHANC@127.0.0.1:{dicom_port}"
    first = BridgeProc(spool, gateway, send_to, "--allow-ae", "MODALITY", "--quiet-seconds", "0.5",
                       "--max-tries", "100", "--retry-max-seconds", "1")
    assert storescu(first.port, files).returncode == 0
    wait_for(lambda: metric(first.metrics_text(), 'neuroexplain_pacs_series_retried_total{stage="destination"}') >= 1,
             120, "a failed delivery")
    first.stop(signal.SIGKILL)
    states = [json.loads(p.read_text())["state"] for p in (spool / "series").glob("*/state.json")]
    assert states == ["sent"] and list((spool / "series").glob("*/out/*.dcm"))
    ports = iter((dicom_port, http_port))
    monkeypatch.setattr(orthanc_module, "free_port", lambda: next(ports))
    with orthanc(tmp_path / "orthanc") as node:
        second = BridgeProc(spool, gateway, send_to, "--allow-ae", "MODALITY", "--quiet-seconds", "0.5")
        try:
            wait_for(lambda: metric(second.metrics_text(), "neuroexplain_pacs_series_stored_total") == 1, 60,
                     "the kept results stored after restart")
            assert [t["Modality"] for t in results_in(node, study)] == ["SR"]
            assert len(node.get("/instances")) == 1
        finally:
            second.stop()
    assert ": sent," not in second.log.read_text()  # delivered from the spool, not analysed again
    assert not list((spool / "series").glob("*/*/*.dcm")) and not list((spool / "failed").glob("*"))


def test_orthanc_routes_a_series_to_the_bridge(tmp_path: Path, gateway: int) -> None:
    """Orthanc as the PACS: it sends a stored brain series to the bridge, and the Parametric Map (on the series'
    geometry) and the SRs land in the study."""
    bridge_port = free_port()
    with orthanc(tmp_path / "orthanc", {"bridge": ("NEUROEXPLAIN", "127.0.0.1", bridge_port)}) as node:
        bridge = BridgeProc(tmp_path / "spool", gateway, f"ORTHANC@127.0.0.1:{node.dicom_port}",
                            "--allow-ae", "ORTHANC", "--quiet-seconds", "1", "--method", "gradient",
                            port=bridge_port)
        try:
            files, study, _ = brain_series(tmp_path / "in", "routes")
            for path in files:
                node.post("/instances", path.read_bytes())
            node.post("/modalities/bridge/store", node.get("/studies")[0])
            maps = wait_for(lambda: [t for t in node.instances_tags() if t.get("SOPClassUID") == PM_SOP_CLASS],
                            120, "the Parametric Map in Orthanc")
            assert isinstance(maps, list) and len(maps) == 1
            assert maps[0]["StudyInstanceUID"] == study
            assert int(maps[0]["Rows"]) == 36 and int(maps[0]["Columns"]) == 30
            assert int(maps[0]["NumberOfFrames"]) == 30
            wait_for(lambda: len([t for t in node.instances_tags() if t.get("Modality") == "SR"]) == 2, 60,
                     "both SRs")
        finally:
            bridge.stop()


def results_in(node: Orthanc, study: str) -> list[dict[str, object]]:
    """The result objects (anything but the source MR images) in ``study``."""
    return [t for t in node.instances_tags() if t.get("StudyInstanceUID") == study and t.get("Modality") != "MR"]


def test_gateway_down_for_a_while_is_retried_then_delivered(tmp_path: Path, pacs: Orthanc) -> None:
    """The bridge points at a port where the gateway starts only after the series came in and failed once."""
    port = free_port()
    files, study, _ = brain_series(tmp_path / "in", "gateway-down")
    bridge = BridgeProc(tmp_path / "spool", port, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow-ae", "MODALITY",
                        "--quiet-seconds", "0.5", "--max-tries", "100", "--retry-max-seconds", "1")
    late = None
    try:
        assert storescu(bridge.port, files).returncode == 0
        wait_for(lambda: metric(bridge.metrics_text(), 'neuroexplain_pacs_series_retried_total{stage="service"}')
                 >= 2, 60, "retries while the gateway is down")
        assert not results_in(pacs, study)
        late = start_gateway(port, tmp_path / "late-gateway")
        wait_for(lambda: metric(bridge.metrics_text(), "neuroexplain_pacs_series_stored_total") == 1, 120,
                 "results stored once the gateway is up")
        assert [t["Modality"] for t in results_in(pacs, study)] == ["SR"]  # predict only: its SR
        assert not list((tmp_path / "spool" / "failed").glob("*"))
    finally:
        bridge.stop()
        if late is not None:
            late.terminate()
            late.wait(60)


def test_destination_down_is_retried_then_delivered(tmp_path: Path, gateway: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Orthanc starts only after the bridge failed to reach it a few times, on the port the bridge was given."""
    import orthanc as orthanc_module

    dicom_port, http_port = free_port(), free_port()
    files, study, _ = brain_series(tmp_path / "in", "destination-down")
    bridge = BridgeProc(tmp_path / "spool", gateway, f"ORTHANC@127.0.0.1:{dicom_port}", "--allow-ae", "MODALITY",
                        "--quiet-seconds", "0.5", "--max-tries", "100", "--retry-max-seconds", "1")
    try:
        assert storescu(bridge.port, files).returncode == 0
        wait_for(lambda: metric(bridge.metrics_text(),
                                'neuroexplain_pacs_series_retried_total{stage="destination"}') >= 2,
                 120, "retries while the destination is down")
        ports = iter((dicom_port, http_port))
        monkeypatch.setattr(orthanc_module, "free_port", lambda: next(ports))
        with orthanc(tmp_path / "orthanc") as node:
            assert node.dicom_port == dicom_port
            wait_for(lambda: metric(bridge.metrics_text(), "neuroexplain_pacs_series_stored_total") == 1, 60,
                     "results stored once Orthanc is up")
            assert [t["Modality"] for t in results_in(node, study)] == ["SR"]
    finally:
        bridge.stop()
    assert not list((tmp_path / "spool" / "failed").glob("*"))


def test_destination_rejects_moves_the_series_to_failed_with_the_reason(tmp_path: Path, gateway: int) -> None:
    """A destination that answers every C-STORE with a failure status (a real pynetdicom SCP, 0xC000)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    scp = AE(ae_title="REJECTER")
    scp.supported_contexts = AllStoragePresentationContexts
    refused: list[int] = []

    def refuse(event: object) -> int:
        refused.append(1)
        return 0xC000

    dest_port = free_port()
    server = scp.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])
    files, _, _ = brain_series(tmp_path / "in", "destination-rejects")
    spool = tmp_path / "spool"
    bridge = BridgeProc(spool, gateway, f"REJECTER@127.0.0.1:{dest_port}", "--allow-ae", "MODALITY",
                        "--quiet-seconds", "0.5")
    try:
        assert storescu(bridge.port, files).returncode == 0
        reasons = wait_for(lambda: list((spool / "failed").glob("*/reason.txt")), 120, "failed/ reason")
        assert isinstance(reasons, list) and len(reasons) == 1
        reason = reasons[0].read_text()
        assert reason.count("\n") == 1 and "destination" in reason and "0xC000" in reason
        assert refused  # the results did reach the destination, which refused them
        assert list(reasons[0].parent.glob("out/*.dcm"))  # the refused results are kept beside the reason
        # the counter goes up just after reason.txt is written: wait for it rather than race it
        wait_for(lambda: metric(bridge.metrics_text(), 'neuroexplain_pacs_series_failed_total{stage="destination"}')
                 == 1, 30, "the destination failure counted")
        assert not list((spool / "series").glob("*/in/*.dcm"))
    finally:
        bridge.stop()
        server.shutdown()


def test_series_sent_again_in_full_gives_no_duplicate_results(tmp_path: Path, gateway: int, pacs: Orthanc) -> None:
    files, study, _ = brain_series(tmp_path / "in", "sent-twice")
    bridge = BridgeProc(tmp_path / "spool", gateway, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow-ae",
                        "MODALITY", "--quiet-seconds", "0.5", "--method", "gradient")
    try:
        assert storescu(bridge.port, files).returncode == 0
        wait_for(lambda: metric(bridge.metrics_text(), "neuroexplain_pacs_series_stored_total") == 1, 120,
                 "the first results")
        first = sorted(str(t["SOPInstanceUID"]) for t in results_in(pacs, study))
        assert len(first) == 3  # predict's SR, attribute's SR and the Parametric Map
        assert storescu(bridge.port, files).returncode == 0
        wait_for(lambda: metric(bridge.metrics_text(), "neuroexplain_pacs_series_stored_total") == 2, 120,
                 "the second results")
        again = sorted(str(t["SOPInstanceUID"]) for t in results_in(pacs, study))
        assert again == first
        assert len(pacs.get("/instances")) == 3  # Orthanc holds only the results: the same UIDs overwrote
    finally:
        bridge.stop()


def test_results_go_by_stow_rs_to_a_dicomweb_server(tmp_path: Path, gateway: int) -> None:
    """``--stow-url`` instead of ``--send-to``: the results are POSTed (STOW-RS) to Orthanc's DICOMweb plugin."""
    with orthanc(tmp_path / "orthanc", dicomweb=True) as node:
        files, study, _ = brain_series(tmp_path / "in", "stow")
        bridge = BridgeProc(tmp_path / "spool", gateway, "", "--allow-ae", "MODALITY",
                            "--quiet-seconds", "0.5", "--method", "gradient", "--max-tries", "2",
                            "--stow-url", f"http://127.0.0.1:{node.http_port}/dicom-web")
        try:
            assert storescu(bridge.port, files).returncode == 0
            wait_for(lambda: metric(bridge.metrics_text(), "neuroexplain_pacs_series_stored_total") == 1, 120,
                     "the results stored by STOW-RS")
            found = results_in(node, study)
            assert len(found) == 3  # predict's SR, attribute's SR and the Parametric Map
            assert sum(t.get("SOPClassUID") == PM_SOP_CLASS for t in found) == 1
            assert sum(t.get("Modality") == "SR" for t in found) == 2
            assert not list((tmp_path / "spool" / "failed").glob("*"))
        finally:
            bridge.stop()


def test_parametric_map_lands_in_the_source_study(tmp_path: Path, gateway: int, pacs: Orthanc) -> None:
    """Acceptance: the Parametric Map (on the series' geometry) and the SR are in the source study in Orthanc."""
    from test_service_support import make_scan

    from neuroexplain.lab.dicom_synth import write_series as write_volume
    from neuroexplain.volumes import read_scan

    volume = read_scan(make_scan(8))  # a brain in the tiny model's space, as a 30 x 36 x 30 series
    write_volume(volume.data, volume.affine, tmp_path / "in", orientation=None, rescale=(0.01, 0.0),
                 patient_name=NAME, patient_id=PID)
    files = sorted((tmp_path / "in").glob("*.dcm"))
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    bridge = BridgeProc(tmp_path / "spool", gateway, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--allow-ae",
                        "MODALITY", "--quiet-seconds", "1", "--method", "gradient", "--max-tries", "2")
    try:
        assert storescu(bridge.port, files).returncode == 0
        maps = wait_for(lambda: [t for t in pacs.instances_tags() if t.get("SOPClassUID") == PM_SOP_CLASS], 120,
                        "the Parametric Map in Orthanc")
        assert isinstance(maps, list) and len(maps) == 1
        assert maps[0]["StudyInstanceUID"] == study and maps[0]["PatientID"] == PID
        assert int(maps[0]["Rows"]) == 36 and int(maps[0]["Columns"]) == 30 and int(maps[0]["NumberOfFrames"]) == 30
        srs = wait_for(lambda: len(found := [t for t in pacs.instances_tags() if t.get("Modality") == "SR"]) >= 2
                       and found, 60, "both SRs")
        assert isinstance(srs, list) and len(srs) == 2  # predict's and attribute's, both in the source study
        assert {t["StudyInstanceUID"] for t in srs} == {study}
        assert not list((tmp_path / "spool" / "failed").glob("*"))
    finally:
        bridge.stop()
    logs = bridge.log.read_text()
    for secret in (NAME, "SECRETNAME", PID, study):
        assert secret not in logs


def test_bridge_imports_without_torch_or_numpy() -> None:
    """The bridge installs with the light client + [pacs]: importing it with torch and numpy blocked works."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('numpy', 'torch', 'service', 'nibabel'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import neuroexplain.cli.commands.pacs_bridge, neuroexplain.pacs.bridge\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('numpy', 'torch', 'grpc_tools')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
