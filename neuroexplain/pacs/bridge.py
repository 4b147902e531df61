"""The bridge: Storage SCP into a crash-safe spool, a worker that calls the service, and result delivery.

Spool layout (``--spool DIR``)::

    DIR/series/<digest>/state.json      state: receiving | complete | sent | stored, attempts, next try
    DIR/series/<digest>/in/<sha>.dcm    received instances (fsynced before the C-STORE is acknowledged)
    DIR/series/<digest>/out/<n>.dcm     result objects from the service, until they are stored at the PACS
    DIR/failed/<digest>/reason.txt      one line; the series' files are kept for ``failed_retention_days``

``<digest>`` is the first 16 hex digits of SHA-256 of the SeriesInstanceUID: logs and metrics name series by it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import http.server
import io
import json
import logging
import os
import random
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client as prom
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)

from neuroexplain import errors

log = logging.getLogger("neuroexplain.pacs")

STORAGE_CLASSES = (MRImageStorage, EnhancedMRImageStorage, CTImageStorage, EnhancedCTImageStorage)
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_DUPLICATE = 0x0111
# gRPC status names the bridge retries; RESOURCE_EXHAUSTED only when it is a load refusal, not a size limit.
TRANSIENT_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
_SIZE_WORDS = ("at most", "too large", "exceeds", "larger than", "limit of")


def series_digest(series_uid: str) -> str:
    """The name of a series in logs, metrics and the spool (never the UID itself)."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync of the folder)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Config:
    """Everything the bridge is told on its command line (see ``neuroexplain pacs-bridge --help``)."""

    spool: Path
    ae_title: str = "NEUROEXPLAIN"
    host: str = "0.0.0.0"
    port: int = 11112
    allow_ae: Sequence[str] = ()
    model: str = "lesion"
    methods: Sequence[str] = ()
    send_to: str | None = None
    stow_url: str | None = None
    quiet_seconds: float = 10.0
    max_associations: int = 32
    spool_max_bytes: int = 10 << 30
    failed_retention_days: float = 30.0
    modalities: Sequence[str] = ("MR", "CT")
    min_slices: int = 8
    skip_image_types: Sequence[str] = ("LOCALIZER", "SCOUT", "DERIVED")
    max_tries: int = 8
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9465
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    extras: Sequence[str] = field(default_factory=tuple)


class Metrics:
    """The bridge's Prometheus metrics (own registry; no series or patient data in any label)."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.received = prom.Counter("neuroexplain_pacs_instances_received_total", "instances stored in the spool",
                                     registry=r)
        self.refused = prom.Counter("neuroexplain_pacs_instances_refused_total", "C-STOREs refused, by reason",
                                    ["reason"], registry=r)
        self.filtered = prom.Counter("neuroexplain_pacs_instances_filtered_total",
                                     "instances acknowledged but skipped by the filters", ["reason"], registry=r)
        self.completed = prom.Counter("neuroexplain_pacs_series_completed_total", "series complete (quiet)",
                                      registry=r)
        self.stored = prom.Counter("neuroexplain_pacs_series_stored_total", "series whose results are stored",
                                   registry=r)
        self.failed = prom.Counter("neuroexplain_pacs_series_failed_total", "series moved to failed/", ["stage"],
                                   registry=r)
        self.retried = prom.Counter("neuroexplain_pacs_series_retried_total", "transient failures retried",
                                    ["stage"], registry=r)
        self.spool_bytes = prom.Gauge("neuroexplain_pacs_spool_bytes", "bytes in the spool", registry=r)
        self.spool_max = prom.Gauge("neuroexplain_pacs_spool_max_bytes", "--spool-max-bytes", registry=r)
        self.latency = prom.Histogram(
            "neuroexplain_pacs_results_stored_seconds", "seconds from the last instance to results stored",
            buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        for stage in ("service", "destination"):  # exported at 0 from the start, so alerts' rate() has a series
            self.failed.labels(stage)
            self.retried.labels(stage)


class Spool:
    """The on-disk spool: instances, per-series state, results and failed series."""

    def __init__(self, root: Path, max_bytes: int, metrics: Metrics) -> None:
        self.root = root
        self.series_dir = root / "series"
        self.failed_dir = root / "failed"
        self.series_dir.mkdir(parents=True, exist_ok=True)
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.lock = threading.RLock()
        self.bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        metrics.spool_bytes.set(self.bytes)
        metrics.spool_max.set(max_bytes)

    def _adjust(self, delta: int) -> None:
        self.bytes += delta
        self.metrics.spool_bytes.set(self.bytes)

    def state(self, digest: str) -> dict[str, Any]:
        path = self.series_dir / digest / "state.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {"state": "receiving", "last": time.time(), "attempts": 0, "next_try": 0.0}

    def set_state(self, digest: str, **changes: Any) -> dict[str, Any]:
        with self.lock:
            st = self.state(digest)
            st.update(changes)
            _fsync_write(self.series_dir / digest / "state.json", json.dumps(st).encode())
            return st

    def add_instance(self, series_uid: str, sop_uid: str, data: bytes) -> str | None:
        """Store one instance durably; the series digest, or None when the spool is full."""
        digest = series_digest(series_uid)
        with self.lock:
            if self.bytes + len(data) > self.max_bytes:
                return None
            folder = self.series_dir / digest / "in"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{hashlib.sha256(sop_uid.encode()).hexdigest()[:32]}.dcm"
            old = target.stat().st_size if target.exists() else 0
            _fsync_write(target, data)
            self._adjust(len(data) - old)
            st = self.state(digest)
            # a new instance after completion re-runs the series (its results replace the earlier ones)
            self.set_state(digest, state="receiving", last=time.time(), attempts=0, next_try=0.0,
                           first_last=st.get("first_last", time.time()))
            return digest

    def instances(self, digest: str) -> list[bytes]:
        folder = self.series_dir / digest / "in"
        return [p.read_bytes() for p in sorted(folder.glob("*.dcm"))] if folder.is_dir() else []

    def write_results(self, digest: str, objects: Sequence[bytes]) -> None:
        folder = self.series_dir / digest / "out"
        with self.lock:
            if folder.exists():
                self._drop_tree(folder)
            folder.mkdir(parents=True)
            for i, data in enumerate(objects):
                _fsync_write(folder / f"{i:04d}.dcm", data)
                self._adjust(len(data))

    def results(self, digest: str) -> list[bytes]:
        folder = self.series_dir / digest / "out"
        return [p.read_bytes() for p in sorted(folder.glob("*.dcm"))] if folder.is_dir() else []

    def _drop_tree(self, folder: Path) -> None:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        self._adjust(-size)

    def clear_files(self, digest: str) -> None:
        """Delete a series' instances and results once its results are stored (its state stays)."""
        with self.lock:
            for sub in ("in", "out"):
                if (self.series_dir / digest / sub).exists():
                    self._drop_tree(self.series_dir / digest / sub)

    def fail(self, digest: str, reason: str) -> None:
        """Move a series to ``failed/`` with a one-line reason."""
        with self.lock:
            src = self.series_dir / digest
            dst = self.failed_dir / digest
            if dst.exists():
                shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
            _fsync_write(dst / "reason.txt", (" ".join(reason.split()) + "\n").encode())
            self.bytes = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
            self.metrics.spool_bytes.set(self.bytes)

    def purge_failed(self, retention_days: float) -> None:
        cutoff = time.time() - retention_days * 86400
        with self.lock:
            for folder in self.failed_dir.iterdir():
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    self._drop_tree(folder)

    def digests(self) -> list[str]:
        return sorted(p.name for p in self.series_dir.iterdir() if p.is_dir())


def classify(exc: BaseException) -> str:
    """``transient`` (retry with backoff), ``resend`` (digest gone: send the bytes) or ``permanent``."""
    code = getattr(exc, "code", "") or ""
    if code == "NOT_FOUND" and "digest" in str(exc).lower():
        return "resend"
    if code == "RESOURCE_EXHAUSTED":
        return "permanent" if any(w in str(exc).lower() for w in _SIZE_WORDS) else "transient"
    if code in TRANSIENT_CODES:
        return "transient"
    return "permanent"


class DeliveryError(Exception):
    """Delivery of results failed; ``permanent`` says whether retrying can help."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def parse_send_to(value: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` → (ae, host, port); InvalidOptionError otherwise."""
    try:
        ae, rest = value.split("@", 1)
        host, port = rest.rsplit(":", 1)
        port_n = int(port)
    except ValueError:
        raise errors.InvalidOptionError(f"--send-to {value!r}: expected AE@HOST:PORT, e.g. ORTHANC@pacs:4242") from None
    if not 1 <= len(ae) <= 16 or not 0 < port_n < 65536 or not host:
        raise errors.InvalidOptionError("--send-to: AE title 1-16 characters, port 1-65535")
    return ae, host.strip("[]"), port_n


def cstore(objects: Sequence[bytes], send_to: str, calling_ae: str) -> None:
    """C-STORE each object to ``send_to``; success or "duplicate SOP instance" counts as delivered."""
    ae_title, host, port = parse_send_to(send_to)
    datasets = [dcmread(io.BytesIO(b)) for b in objects]
    scu = AE(ae_title=calling_ae)
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        scu.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = scu.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise DeliveryError("association with the destination failed", permanent=False)
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status:
                raise DeliveryError("destination did not answer the C-STORE", permanent=False)
            code = int(status.Status)
            if code in (0x0000, STATUS_DUPLICATE) or 0xB000 <= code <= 0xBFFF:
                continue
            transient = 0xA700 <= code <= 0xA7FF  # out of resources: try again later
            raise DeliveryError(f"destination refused the result with DICOM status 0x{code:04X}",
                                permanent=not transient)
    finally:
        assoc.release()


def stow(objects: Sequence[bytes], url: str, timeout: float = 60.0) -> None:
    """STOW-RS (PS3.18) the objects to ``url``/studies with the standard library."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n" for data in objects
    ) + b"--" + boundary.encode() + b"--\r\n"
    req = urllib.request.Request(
        url.rstrip("/") + "/studies", data=body, method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                 "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 409:  # conflict: every instance already there counts as delivered? Only if all are.
            raise DeliveryError("STOW-RS destination answered 409 (some instances refused)", permanent=True) from None
        raise DeliveryError(f"STOW-RS destination answered HTTP {exc.code}", permanent=exc.code < 500) from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(f"STOW-RS destination unreachable ({type(exc).__name__})", permanent=False) from None


def not_analysed_sr(source: bytes, reason: str, calling_ae: str) -> bytes:
    """A Basic Text SR in the source study saying the series was not analysed, and why (built with pydicom).

    Its UIDs derive from the source series, so a second "not analysed" for the same series replaces the first.
    """
    src = dcmread(io.BytesIO(source), stop_before_pixels=True)
    series_uid = str(src.SeriesInstanceUID)
    ds = Dataset()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if kw in src:
            setattr(ds, kw, getattr(src, kw))
    now = dt.datetime.now(dt.UTC)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, "neuroexplain-not-analysed-sr"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[series_uid, "neuroexplain-not-analysed-series"])
    ds.Modality = "SR"
    ds.SeriesNumber = 9901
    ds.InstanceNumber = 1
    ds.SeriesDescription = "neuroexplain: not analysed"
    ds.Manufacturer = "neuroexplain"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "121130", "DCM", "Summary"
    ds.ConceptNameCodeSequence = [title]
    ref = Dataset()
    ref.ReferencedSeriesInstanceUID = series_uid
    ref.StudyInstanceUID = ds.get("StudyInstanceUID", "")
    ds.CurrentRequestedProcedureEvidenceSequence = []
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = [name]
    item.TextValue = f"Not analysed by neuroexplain (research use only - not for diagnosis): {reason}"[:1024]
    ds.ContentSequence = [item]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# Analysis is a callable so the gRPC part stays in one swappable place (see :func:`grpc_analyse`).
Analyse = Callable[[list[bytes]], list[bytes]]


def grpc_analyse(client: Any, model: str, methods: Sequence[str], extras: Sequence[str] = ()) -> Analyse:
    """Predict, then each method's Attribute, with ``return_dicom``; the series is uploaded once.

    Args:
        client: a :class:`neuroexplain.client.Client`.
        model: model name.
        methods: attribution methods (none = predict only).
        extras: ``dicom_extras`` of each Attribute.
    """
    from neuroexplain._proto import neuroexplain_pb2 as pb

    def scan(instances: list[bytes], digest: str | None) -> Any:
        if digest:
            return pb.Scan(digest=digest)
        return pb.Scan(dicom=pb.DicomSeries(instances=instances))

    def run(instances: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        pred = client._call(client._stub.Predict,
                            pb.PredictRequest(model=model, scan=scan(instances, None), return_dicom=True), None)
        out += [o.data for o in pred.dicom]
        digest = pred.info.scan_digest
        for method in methods:
            try:
                attr = client._call(client._stub.Attribute, pb.AttributeRequest(
                    model=model, scan=scan(instances, digest), method=method, return_dicom=True,
                    dicom_extras=list(extras)), None)
            except errors.NeuroExplainError as exc:
                if classify(exc) != "resend":
                    raise
                attr = client._call(client._stub.Attribute, pb.AttributeRequest(
                    model=model, scan=scan(instances, None), method=method, return_dicom=True,
                    dicom_extras=list(extras)), None)
                digest = attr.info.scan_digest
            out += [o.data for o in attr.dicom]
        return out

    return run


class Bridge:
    """The running bridge: Storage SCP, worker thread and the metrics/ready HTTP server."""

    def __init__(self, config: Config, analyse: Analyse) -> None:
        if not config.send_to and not config.stow_url:
            raise errors.InvalidOptionError("give --send-to AE@HOST:PORT or --stow-url URL: where results go")
        if config.send_to:
            parse_send_to(config.send_to)
        self.config = config
        self.analyse = analyse
        self.metrics = Metrics()
        self.spool = Spool(config.spool, config.spool_max_bytes, self.metrics)
        self.stopping = threading.Event()
        self.ready = False
        self._server: Any = None
        self._http: http.server.ThreadingHTTPServer | None = None
        self._worker = threading.Thread(target=self._work, name="pacs-worker", daemon=True)

    # -- Storage SCP -----------------------------------------------------------------------------------------------

    def _skip_reason(self, ds: Dataset) -> str | None:
        modality = str(ds.get("Modality", "")).upper()
        if modality not in {m.upper() for m in self.config.modalities}:
            return "modality"
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        skip = {t.upper() for t in self.config.skip_image_types}
        if image_type and ((image_type[0] in skip) or any(v in skip for v in image_type[2:])):
            return "image_type"
        return None

    def _on_store(self, event: Any) -> int:
        if self.stopping.is_set():
            self.metrics.refused.labels("stopping").inc()
            return STATUS_OUT_OF_RESOURCES
        try:
            ds = event.dataset
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - untrusted bytes from the network: refuse with a DICOM status
            self.metrics.refused.labels("unreadable").inc()
            return STATUS_CANNOT_UNDERSTAND
        reason = self._skip_reason(ds)
        if reason is not None:
            self.metrics.filtered.labels(reason).inc()
            return 0x0000
        data = event.encoded_dataset(include_meta=True)
        digest = self.spool.add_instance(series_uid, sop_uid, data)
        if digest is None:
            self.metrics.refused.labels("spool_full").inc()
            log.warning("spool full (%d of %d bytes): store refused", self.spool.bytes, self.spool.max_bytes)
            return STATUS_OUT_OF_RESOURCES
        self.metrics.received.inc()
        return 0x0000

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        if self.config.tls_ca:
            ctx.load_verify_locations(self.config.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def start(self) -> None:
        """Accept associations, start the worker and the HTTP server; prints nothing (the CLI prints ``ready``)."""
        ae = AE(ae_title=self.config.ae_title)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid)
        for ctx in StoragePresentationContexts:  # every storage class is accepted; filters decide what is kept
            if ctx.abstract_syntax and ctx.abstract_syntax not in STORAGE_CLASSES and len(ae.supported_contexts) < 120:
                ae.add_supported_context(ctx.abstract_syntax)
        ae.add_supported_context(Verification)
        # pynetdicom's default is 10 at once; more modalities sending together get "local limit exceeded"
        ae.maximum_associations = self.config.max_associations
        if self.config.allow_ae:
            ae.require_calling_aet = list(self.config.allow_ae)
        else:
            # no calling AE title is ever empty: every association is rejected
            ae._require_calling_aet = [" "]
            log.warning("no --allow-ae given: every association will be rejected")
        self._http = http.server.ThreadingHTTPServer((self.config.metrics_host, self.config.metrics_port),
                                                     self._http_handler())
        threading.Thread(target=self._http.serve_forever, name="pacs-http", daemon=True).start()
        self._worker.start()
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, ssl_context=self._ssl_context(),
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.ready = True

    @property
    def metrics_port(self) -> int:
        return int(self._http.server_address[1]) if self._http else 0

    def _http_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        bridge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, ctype, code = prom.generate_latest(bridge.metrics.registry), prom.CONTENT_TYPE_LATEST, 200
                elif self.path == "/ready":
                    ok = bridge.ready and not bridge.stopping.is_set()
                    body, ctype, code = (b"ready\n" if ok else b"not ready\n"), "text/plain", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def stop(self) -> None:
        """Graceful stop: refuse new stores, finish the C-STOREs in flight, keep the spool."""
        self.stopping.set()
        self.ready = False
        if self._server is not None:
            self._server.shutdown()
        self._worker.join(timeout=60)
        if self._http is not None:
            self._http.shutdown()

    # -- worker ----------------------------------------------------------------------------------------------------

    def _backoff(self, attempts: int) -> float:
        base = min(self.config.retry_max_seconds, self.config.retry_base_seconds * 2 ** max(0, attempts - 1))
        return base * random.uniform(0.5, 1.0)

    def _work(self) -> None:
        last_purge = 0.0
        while not self.stopping.is_set():
            try:
                for digest in self.spool.digests():
                    if self.stopping.is_set():
                        break
                    self._step(digest)
                if time.time() - last_purge > 3600:
                    self.spool.purge_failed(self.config.failed_retention_days)
                    last_purge = time.time()
            except Exception:
                log.exception("worker step failed; retrying")
            self.stopping.wait(0.5)

    def _retry_or_fail(self, digest: str, st: dict[str, Any], stage: str, message: str) -> None:
        attempts = int(st.get("attempts", 0)) + 1
        if attempts >= self.config.max_tries:
            self._fail(digest, f"{stage}: {message} (after {attempts} tries)", stage, send_sr=stage == "service")
            return
        delay = self._backoff(attempts)
        self.metrics.retried.labels(stage).inc()
        log.info("series %s: %s failed (%s); retry %d in %.1f s", digest, stage, message, attempts, delay)
        self.spool.set_state(digest, attempts=attempts, next_try=time.time() + delay)

    def _fail(self, digest: str, reason: str, stage: str, send_sr: bool) -> None:
        sr = None
        if send_sr:
            instances = self.spool.instances(digest)
            if instances:
                with contextlib.suppress(Exception):
                    sr = not_analysed_sr(instances[0], reason, self.config.ae_title)
        self.spool.fail(digest, reason)
        self.metrics.failed.labels(stage).inc()
        log.warning("series %s: failed (%s)", digest, reason)
        if sr is not None:
            try:
                self._deliver([sr])
                log.info("series %s: 'not analysed' SR stored", digest)
            except DeliveryError as exc:
                log.warning("series %s: 'not analysed' SR not delivered (%s)", digest, exc)

    def _deliver(self, objects: Sequence[bytes]) -> None:
        if self.config.send_to:
            cstore(objects, self.config.send_to, self.config.ae_title)
        if self.config.stow_url:
            stow(objects, self.config.stow_url)

    def _step(self, digest: str) -> None:
        st = self.spool.state(digest)
        now = time.time()
        if st.get("state") == "receiving":
            if now - float(st.get("last", now)) < self.config.quiet_seconds:
                return
            with self.spool.lock:  # no new instance may slip in between the check and the change
                st = self.spool.state(digest)
                if st.get("state") != "receiving" or time.time() - float(st["last"]) < self.config.quiet_seconds:
                    return
                st = self.spool.set_state(digest, state="complete", attempts=0, next_try=0.0)
            self.metrics.completed.inc()
            log.info("series %s: complete", digest)
        if now < float(st.get("next_try", 0.0)):
            return
        if st["state"] == "complete":
            instances = self.spool.instances(digest)
            frames = sum(self._frames(b) for b in instances)
            if frames < self.config.min_slices:
                self.metrics.filtered.labels("min_slices").inc() if instances else None
                log.info("series %s: %d slices < --min-slices %d: skipped", digest, frames, self.config.min_slices)
                self.spool.clear_files(digest)
                self.spool.set_state(digest, state="stored")
                return
            try:
                results = self.analyse(instances)
            except errors.NeuroExplainError as exc:
                kind = classify(exc)
                msg = f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"
                if kind == "transient":
                    self._retry_or_fail(digest, st, "service", msg)
                else:
                    self._fail(digest, f"service refused: {msg}", "service", send_sr=True)
                return
            self.spool.write_results(digest, results)
            st = self.spool.set_state(digest, state="sent", attempts=0, next_try=0.0)
            log.info("series %s: sent, %d result objects", digest, len(results))
        if st["state"] == "sent":
            try:
                self._deliver(self.spool.results(digest))
            except DeliveryError as exc:
                if exc.permanent:
                    self._fail(digest, f"destination: {exc}", "destination", send_sr=False)
                else:
                    self._retry_or_fail(digest, st, "destination", str(exc))
                return
            self.metrics.latency.observe(max(0.0, time.time() - float(st.get("last", time.time()))))
            self.spool.clear_files(digest)
            self.spool.set_state(digest, state="stored", attempts=0)
            self.metrics.stored.inc()
            log.info("series %s: results stored", digest)

    @staticmethod
    def _frames(data: bytes) -> int:
        try:
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(ds.get("NumberOfFrames", 1) or 1)
        except Exception:  # noqa: BLE001 - an unreadable instance counts for nothing
            return 0
