"""The transport-neutral core: model lookup, scan validation and store, cache, singleflight, concurrency limit.

The servicer hands it domain requests and a :class:`Caller` (is the client still there, when is its deadline); the
core answers with results and whether they came from the cache. Each computation runs on the core's own worker
pool, not on the caller's thread, so that identical concurrent requests share it (singleflight) and it outlives any
one caller: it is cancelled only when the last caller waiting for it has gone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from neuroexplain.dicom.files import series_digest
from neuroexplain.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    InvalidOptionError,
    LimitExceededError,
    NeuroExplainError,
    NotFoundError,
    UnavailableError,
    status_name,
)
from neuroexplain.precision import Precision
from neuroexplain.serving.types import (
    Alignment,
    AttributeRequest,
    AttributeResult,
    CallContext,
    DicomObject,
    MethodInfo,
    ModelInfo,
    NonFinite,
    Operation,
    PredictRequest,
    PredictResult,
    Progress,
    ScanInput,
    StartKind,
    VisualizeRequest,
    VisualizeResult,
    new_job_id,
)
from service import cache as cache_mod
from service.backend import Backend
from service.config import Settings
from service.metrics import Metrics
from service.scans import make_scan_store

log = logging.getLogger("neuroexplain.service")

R = TypeVar("R")

_POLL_S = 0.05  # how often a waiting caller checks whether its client is still there
PROGRESS_RING = 64  # progress events a computation keeps for its callers


@dataclass(frozen=True)
class Caller:
    """One waiting client, as the transport sees it.

    Attributes:
        is_active: False once the client cancelled or disconnected.
        deadline: ``time.monotonic()`` value of the client's deadline, or None.
        add_done_callback: registers a function the transport calls when the call ends for any reason (gRPC:
            ``context.add_callback``), so that a cancelled client releases its computation at once instead of at
            the next poll.
    """

    is_active: Callable[[], bool] = lambda: True
    deadline: float | None = None
    add_done_callback: Callable[[Callable[[], None]], Any] | None = None


@dataclass(frozen=True)
class ScanRef:
    """A scan as a request names it: file bytes, a DICOM series' instances, or the digest of either received earlier."""

    data: bytes | None = None
    digest: str | None = None
    instances: tuple[bytes, ...] | None = None
    series_uid: str = ""
    volume_index: int | None = None
    alignment: Alignment = Alignment.AUTO
    nonfinite: NonFinite = NonFinite.REJECT


def _store_key(owner: str, digest: str) -> str:
    return f"{owner}\0{digest}"


@functools.cache
def registration_engine() -> str:
    """The registration library that places ``auto``/``register`` scans, read from its package metadata (the gateway
    never imports it): part of those scans' cache keys."""
    try:
        return "SimpleITK " + importlib.metadata.version("SimpleITK")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def check_dicom_request(request: PredictRequest | AttributeRequest, deidentify_key: bytes | None) -> None:
    """Refuse a DICOM-results request that cannot be answered, before anything is computed: ``return_dicom`` on a
    NIfTI/MGH scan, an unknown extra or extras on Predict, ``deidentify`` without the server's key, and
    ``deidentify`` / ``dicom_extras`` without ``return_dicom``."""
    extras = request.dicom_extras if isinstance(request, AttributeRequest) else ()
    if not request.return_dicom:
        if request.deidentify or extras:
            what = "deidentify" if request.deidentify else "dicom_extras"
            raise InvalidOptionError(f"{what} applies to DICOM results; set return_dicom too", field=what)
        return
    from neuroexplain.dicom.results import validate_request

    operation = Operation.PREDICT if isinstance(request, PredictRequest) else Operation.ATTRIBUTE
    validate_request(source_is_dicom=request.scan.is_dicom, operation=operation.value, extras=extras,
                     deidentify=request.deidentify, deidentify_key=deidentify_key)


def refuse_flagged(result: PredictResult | AttributeResult) -> None:
    """``--input-check reject``: FAILED_PRECONDITION for a result whose scan the input check flagged (also for a
    cached result: the mode is the server's, not part of the cache key)."""
    check = result.input_check
    if check is not None and not check.in_distribution:
        raise FailedPreconditionError.unlike_training(check.reason, check.score, check.threshold)


def canonical_options(described: MethodInfo | None, given: Mapping[str, str], what: str) -> dict[str, str]:
    """Options with the documented defaults filled in, so that spelling a default out hits the same cache entry.

    Unknown names are refused here; values are checked by the library (types and ranges).
    """
    if described is None:
        return dict(sorted(given.items()))
    defaults = {o.name: o.default for o in described.options}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise InvalidOptionError(f"{what} has no option {unknown[0]!r}; its options: {sorted(defaults) or 'none'}",
                                 field=f"options.{unknown[0]}")
    return {name: str(given.get(name, default)).strip() for name, default in sorted(defaults.items())}


# ---------------------------------------------------------------------------------------------------------------------
# Singleflight


@dataclass(eq=False)
class Flight(Generic[R]):
    """One computation and the callers waiting for it."""

    key: str
    job_id: str = field(default_factory=new_job_id)
    waiters: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: R | None = None
    error: BaseException | None = None
    # The latest PROGRESS_RING events only, and only the newest of them keeps its preview PNG: a long Visualize
    # with previews must not grow the gateway's memory; a caller that falls behind skips to the oldest kept event.
    progress: deque[Progress] = field(default_factory=lambda: deque(maxlen=PROGRESS_RING))
    published: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def publish(self, event: Progress) -> None:
        with self.changed:
            if event.preview_png:
                for i, old in enumerate(self.progress):
                    if old.preview_png:
                        self.progress[i] = dataclasses.replace(old, preview_png=b"")
            self.progress.append(event)
            self.published += 1
            self.changed.notify_all()

    def events_after(self, seen: int) -> tuple[list[Progress], int]:
        """Events published after the first ``seen`` (those still kept), and the new count seen. Call under ``changed``."""
        first_kept = self.published - len(self.progress)
        return list(self.progress)[max(seen - first_kept, 0):], self.published

    def finish(self, result: R | None, error: BaseException | None) -> None:
        with self.changed:
            self.result, self.error = result, error
            self.done.set()
            self.changed.notify_all()


# ---------------------------------------------------------------------------------------------------------------------
# Core


class Core:
    """Everything between the servicer and the backend.

    Args:
        settings: limits and sizes.
        backend: where computations run.
        cache: result cache (``service.cache``); failures are counted and ignored.
        metrics: where to record.
    """

    def __init__(self, settings: Settings, backend: Backend, cache: cache_mod.ResultCache, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.cache = cache
        self.metrics = metrics
        self.scans = make_scan_store(settings, metrics)  # in memory, or encrypted in Redis (shared by replicas)
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="compute")
        self._flights: dict[str, Flight[Any]] = {}
        self._lock = threading.Lock()
        self._pending = 0  # computations running or queued
        self._models: dict[str, ModelInfo] = {}
        self._models_lock = threading.Lock()
        self.deidentify_key: bytes | None = None
        if settings.deidentify_key_file:
            from neuroexplain.dicom.deid import load_key

            self.deidentify_key = load_key(Path(settings.deidentify_key_file))

    # -- models --------------------------------------------------------------------------------------------------

    def refresh_models(self) -> list[ModelInfo]:
        models = self.backend.models()
        with self._models_lock:
            self._models = {m.name: m for m in models}
        return models

    def models(self) -> list[ModelInfo]:
        """Every served model (asks the backend each time: cheap, and catches a restarted engine)."""
        self._require_ready()
        return self.refresh_models()

    def model_names(self) -> frozenset[str]:
        with self._models_lock:
            return frozenset(self._models)

    def model(self, name: str) -> ModelInfo:
        with self._models_lock:
            info = self._models.get(name)
        if info is None:
            self._require_ready()
            info = {m.name: m for m in self.refresh_models()}.get(name)
        if info is None:
            raise NotFoundError(f"model {name!r} is not served here; served models: {sorted(self.model_names())}")
        return info

    def _require_ready(self) -> None:
        if not self.backend.ready():
            raise UnavailableError("the model backend is not ready (starting or restarting); retry in a few seconds")

    # -- scans ---------------------------------------------------------------------------------------------------

    def remember_scan(self, owner: str, scan: ScanInput) -> None:
        """Keep a scan that validated (its request succeeded) for later digest references by the same ``owner``."""
        self.scans.put(_store_key(owner, scan.digest), scan.data, scan.instances)

    def resolve_scan(self, ref: ScanRef, owner: str, model: str = "") -> ScanInput:
        """Bytes and digest of a scan sent inline, or by a digest ``owner`` sent earlier (see :meth:`remember_scan`).

        The digest is computed here, once; the scan is decoded only where the model runs, with the limits of
        ``settings`` (carried by the returned :class:`ScanInput`) — while this thread hashes, where nothing else is
        computing, an in-process backend may already be decoding it for ``model`` (:meth:`Backend.decode_ahead`).
        Another caller's digest is NOT_FOUND with the same message as an unknown one, so a digest reveals nothing.
        """
        instances: tuple[bytes, ...] = ()
        if ref.data is not None:
            if not ref.data:
                raise InvalidOptionError("scan.data is empty; send the bytes of a NIfTI-1/-2 or MGH/MGZ file")
            data = ref.data
            if self._pending == 0:  # a core is idle: the backend may decode while this thread hashes
                self.backend.decode_ahead(self._scan_input(ref, data, "", ()), model)
            digest = hashlib.sha256(data).hexdigest()
        elif ref.instances is not None:
            if not ref.instances:
                raise InvalidOptionError("scan.dicom has no instances; send every instance of one DICOM series")
            digest, data, instances = series_digest(ref.instances), b"", tuple(ref.instances)  # order-independent
        elif ref.digest:
            digest = ref.digest.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise InvalidOptionError("scan.digest must be 64 hex digits (the SHA-256 of the scan's bytes)")
            stored = self.scans.get(_store_key(owner, digest))
            if stored is None:
                raise NotFoundError(
                    f"scan {digest[:12]}… is not held by this server (scans are kept for "
                    f"{self.settings.scan_store_ttl_s} s, at most {self.settings.scan_store_entries}); send its bytes"
                )
            data, instances = stored.data, stored.instances
        else:
            raise InvalidOptionError("scan is missing; set scan.data (file bytes), scan.dicom or scan.digest",
                                     field="scan")
        return self._scan_input(ref, data, digest, instances)

    def _scan_input(self, ref: ScanRef, data: bytes, digest: str, instances: tuple[bytes, ...]) -> ScanInput:
        return ScanInput(data=data, digest=digest, instances=instances, series_uid=ref.series_uid,
                         volume_index=ref.volume_index, alignment=ref.alignment, nonfinite=ref.nonfinite,
                         limits=self.settings.read_limits)

    def dicom_objects(self, request: PredictRequest | AttributeRequest,
                      result: PredictResult | AttributeResult) -> tuple[DicomObject, ...]:
        """The DICOM results of one response (``return_dicom``): built here, torch-free, after the result, from the
        request's series (for a request by digest, the caller-bound scan store's copy), and never cached.

        Predict: the Comprehensive 3D SR; Attribute: the Parametric Map and the SR, plus the requested extras.
        """
        if not request.return_dicom:
            return ()
        from pydicom.errors import BytesLengthException

        from neuroexplain.dicom import read_series
        from neuroexplain.dicom.results import build_results, relevance_from_nifti
        from neuroexplain.volumes import NonFinite as LibraryNonFinite
        from neuroexplain.volumes import ScanLimits

        try:
            scan = request.scan
            source = read_series(scan.instances, series_uid=scan.series_uid or None, volume_index=scan.volume_index,
                                 nonfinite=LibraryNonFinite(scan.nonfinite.value),
                                 limits=ScanLimits(**dataclasses.asdict(scan.limits)))
            common: dict[str, Any] = {"model": result.model, "version": result.model_version,
                                      "predicted_class": result.predicted_class, "probabilities": result.probabilities,
                                      "input_check": result.input_check, "deidentify": request.deidentify,
                                      "deidentify_key": self.deidentify_key}
            if isinstance(request, PredictRequest):
                objects = build_results(source.geometry, operation=Operation.PREDICT.value, options={}, **common)
            else:
                assert isinstance(result, AttributeResult)
                import json

                info = self.model(request.model)
                method = next((m for m in info.attribution_methods if m.name == request.method), None)
                options = {"method": request.method, "target": request.target,
                           "options": canonical_options(method, request.options, f"method {request.method!r}")}
                objects = build_results(
                    source.geometry, operation=Operation.ATTRIBUTE.value, options=options,
                    relevance=relevance_from_nifti(result.nifti, source.geometry), image=source.data,
                    method=result.method, target=result.target, summary=json.loads(result.summary_json),
                    extras=request.dicom_extras, **common,
                )
        except NeuroExplainError:
            raise
        except (ValueError, TypeError, LookupError, AttributeError, OverflowError, NotImplementedError,
                BytesLengthException) as exc:
            # pydicom/highdicom refusing a source value (pydicom converts elements lazily: a value of the wrong length
            # or an unknown VR raises only when the builder copies it); their messages quote the value (patient
            # data), so only the type is logged
            log.error("building DICOM results failed (%s); the source series digest is %s", type(exc).__name__,
                      request.scan.digest[:12])
            raise InvalidInputError("the source series holds a value that cannot be copied into a DICOM result (a "
                                    "malformed Patient or Study element); fix the series or omit return_dicom",
                                    field="return_dicom") from None
        return tuple(DicomObject(sop_class_uid=o.sop_class_uid, sop_instance_uid=o.sop_instance_uid,
                                 series_instance_uid=o.series_instance_uid, data=o.data) for o in objects)

    # -- operations ----------------------------------------------------------------------------------------------

    @property
    def rejects_flagged(self) -> bool:
        return self.settings.input_check == "reject"

    def predict(self, request: PredictRequest, caller: Caller) -> tuple[PredictResult, bool]:
        check_dicom_request(request, self.deidentify_key)
        request = dataclasses.replace(request, precision=self.settings.precision)
        info = self.model(request.model)
        key = self._key(Operation.PREDICT, info, request.scan, self._precision_key())
        out = self._run(Operation.PREDICT, info, key, caller, request.scan,
                        lambda scan, ctx: self.backend.predict(dataclasses.replace(request, scan=scan), ctx))
        self._record_input_check(Operation.PREDICT, info, out[0])
        return out

    def attribute(self, request: AttributeRequest, caller: Caller) -> tuple[AttributeResult, bool]:
        check_dicom_request(request, self.deidentify_key)
        request = dataclasses.replace(request, reject_flagged=self.rejects_flagged, precision=self.settings.precision)
        info = self.model(request.model)
        if not request.method:
            names = [m.name for m in info.attribution_methods]
            raise InvalidOptionError(f"method is missing; allowed: {names}", field="method")
        known = {m.name for m in info.attribution_methods}
        if known and request.method not in known:
            raise InvalidOptionError(f"attribution method {request.method!r} is unknown; allowed: {sorted(known)}",
                                     field="method")
        if request.target and request.target not in info.classes:
            raise InvalidOptionError(f"target class {request.target!r} is unknown; classes: {list(info.classes)}",
                                     field="target")
        method = next((m for m in info.attribution_methods if m.name == request.method), None)
        options = {"method": request.method, "target": request.target, "png": request.png,
                   "options": canonical_options(method, request.options, f"method {request.method!r}"),
                   **self._precision_key()}
        key = self._key(Operation.ATTRIBUTE, info, request.scan, options)
        out = self._run(Operation.ATTRIBUTE, info, key, caller, request.scan,
                        lambda scan, ctx: self.backend.attribute(dataclasses.replace(request, scan=scan), ctx),
                        cacheable=not request.png)
        self._record_input_check(Operation.ATTRIBUTE, info, out[0])
        return out

    def _record_input_check(self, op: Operation, info: ModelInfo, result: PredictResult | AttributeResult) -> None:
        """Count the input check's verdict and score, then apply ``--input-check reject``."""
        check = result.input_check
        if check is None:
            return
        verdict = "in_distribution" if check.in_distribution else "flagged"
        self.metrics.input_checks.labels(op.value, info.name, verdict).inc()
        self.metrics.input_check_score.labels(info.name).observe(check.score / max(check.threshold, 1e-12))
        if self.rejects_flagged:
            refuse_flagged(result)

    def visualize(self, request: VisualizeRequest, caller: Caller) -> Iterator[tuple[str, Progress | tuple[VisualizeResult, bool]]]:
        """Yields ``(job_id, Progress)`` events, then ``(job_id, (result, cached))``."""
        info = self.model(request.model)
        if request.steps > self.settings.max_visualize_steps:
            raise LimitExceededError(
                f"steps is {request.steps}; this server allows at most {self.settings.max_visualize_steps}"
            )
        if request.start is StartKind.SCAN and request.scan is None:
            raise InvalidOptionError("start 'scan' needs a scan; set scan.data or scan.digest")
        if request.start is not StartKind.SCAN and request.scan is not None:
            raise InvalidOptionError(f"a scan was sent but start is {request.start.value!r}; set start to 'scan'")
        known = {p.name for p in info.visualization_presets}
        if known and request.preset not in known:
            raise InvalidOptionError(f"preset {request.preset!r} is unknown; allowed: {sorted(known)}", field="preset")
        preset = next((p for p in info.visualization_presets if p.name == request.preset), None)
        options = {"target": request.target, "preset": request.preset, "steps": request.steps, "seed": request.seed,
                   "start": request.start.value,
                   "options": canonical_options(preset, request.options, f"preset {request.preset!r}"),
                   "preview_every": request.preview_every, "png": request.png}
        key = self._key(Operation.VISUALIZE, info, request.scan, options)
        model = info.name

        def compute(scan: ScanInput | None, ctx: CallContext) -> VisualizeResult:
            def on_progress(p: Progress) -> None:
                self.metrics.visualize_steps.labels(model).inc()
                ctx.on_progress(p)

            return self.backend.visualize(dataclasses.replace(request, scan=scan),
                                          dataclasses.replace(ctx, on_progress=on_progress))

        yield from self._run_streaming(Operation.VISUALIZE, info, key, caller, request.scan, compute,
                                       cacheable=request.scan is None)

    # -- machinery -----------------------------------------------------------------------------------------------

    def _precision_key(self) -> dict[str, str]:
        """The requested precision, when reduced (with the spec's digest in the key it fixes what ran; float32 keys
        stay as they were before precision existed)."""
        requested = self.settings.precision
        return {} if requested is Precision.FLOAT32 else {"precision": requested.value}

    def _key(self, op: Operation, info: ModelInfo, scan: ScanInput | None, options: dict[str, Any]) -> str:
        scan_doc = None if scan is None else {"digest": scan.digest, **scan.options_key()}
        if scan_doc is not None and scan.alignment in (Alignment.AUTO, Alignment.REGISTER):  # type: ignore[union-attr]
            scan_doc["registration"] = registration_engine()  # a new SimpleITK may place the scan differently
        return cache_mod.cache_key(operation=op, model=info.name, model_version=info.version,
                                   weights_sha256=info.weights_sha256, spec_sha256=info.spec_sha256, scan=scan_doc,
                                   options=options)

    def _cache_get(self, op: Operation, key: str) -> Any | None:
        try:
            raw = self.cache.get(key)
            value = None if raw is None else cache_mod.decode(raw)
        except cache_mod.CacheError as exc:
            self.metrics.cache_errors.labels(op.value).inc()
            log.warning("cache read failed for %s: %s", op.value, exc)
            return None
        (self.metrics.cache_hits if value is not None else self.metrics.cache_misses).labels(op.value).inc()
        return value

    def _cache_put(self, op: Operation, key: str, value: Any) -> None:
        try:
            self.cache.put(key, cache_mod.encode(value))
        except cache_mod.CacheError as exc:
            self.metrics.cache_errors.labels(op.value).inc()
            log.warning("cache write failed for %s: %s", op.value, exc)

    def _run(self, op: Operation, info: ModelInfo, key: str, caller: Caller, scan: ScanInput | None,
             compute: Callable[[Any, CallContext], R], cacheable: bool = True) -> tuple[R, bool]:
        for _job, event in self._run_streaming(op, info, key, caller, scan, compute, cacheable):
            if isinstance(event, tuple):
                return event
        raise AssertionError("unreachable: a flight always ends with a result or an error")

    def _run_streaming(self, op: Operation, info: ModelInfo, key: str, caller: Caller, scan: ScanInput | None,
                       compute: Callable[[Any, CallContext], R],
                       cacheable: bool = True) -> Iterator[tuple[str, Any]]:
        """``cacheable=False`` for results that render the scan itself (an Attribute PNG overlay, a Visualize started
        from a scan): they are never written to a cache another process or replica can read."""
        hit = self._cache_get(op, key) if cacheable else None
        if hit is not None:
            yield new_job_id(), (hit, True)
            return
        self._require_ready()
        flight, leader = self._join(op, key)
        left = threading.Event()  # this caller's membership, released exactly once

        def leave() -> None:
            with self._lock:
                if left.is_set():
                    return
                left.set()
            self._leave(flight)

        if caller.add_done_callback is not None:
            caller.add_done_callback(leave)
        try:
            if leader:
                self._start(op, info, key, flight, scan, compute, cacheable)
            seen = 0
            while True:
                with flight.changed:
                    if not flight.done.is_set() and flight.published == seen:
                        flight.changed.wait(_POLL_S)
                    events, seen = flight.events_after(seen)
                for ev in events:
                    yield flight.job_id, ev
                if flight.done.is_set() and seen == flight.published:
                    break
                if not caller.is_active():
                    raise CancelledError("the call was cancelled by the client")
                if caller.deadline is not None and time.monotonic() > caller.deadline:
                    raise DeadlineExceededError(f"the deadline passed before {op.value} finished")
            if flight.error is not None:
                raise flight.error
            yield flight.job_id, (flight.result, False)
        finally:
            leave()

    def _join(self, op: Operation, key: str) -> tuple[Flight[Any], bool]:
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None and not flight.cancelled.is_set():
                flight.waiters += 1
                self.metrics.singleflight_joins.labels(op.value).inc()
                return flight, False
            limit = self.settings.max_concurrency + self.settings.max_queue
            if self._pending >= limit:
                self.metrics.rejected.labels(op.value).inc()
                raise LimitExceededError(
                    f"the server is at its limit of {self.settings.max_concurrency} running and "
                    f"{self.settings.max_queue} queued computations; retry later"
                )
            flight = Flight(key=key, waiters=1)
            self._flights[key] = flight
            self._pending += 1
            return flight, True

    def _leave(self, flight: Flight[Any]) -> None:
        with self._lock:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.done.is_set():
                # the last caller has gone: stop the computation and let the next identical request start afresh
                flight.cancelled.set()
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]

    def _start(self, op: Operation, info: ModelInfo, key: str, flight: Flight[R], scan: ScanInput | None,
               compute: Callable[[Any, CallContext], R], cacheable: bool) -> None:
        ctx = CallContext(job_id=flight.job_id, is_cancelled=flight.cancelled.is_set, on_progress=flight.publish)

        def work() -> None:
            self.metrics.computations_in_flight.inc()
            start = time.perf_counter()
            result: R | None = None
            error: BaseException | None = None
            try:
                if flight.cancelled.is_set():
                    raise CancelledError("every caller went away before the computation started")
                result = compute(scan, ctx)  # the backend decodes where the model runs
                self.metrics.backend_duration.labels(op.value, info.name).observe(time.perf_counter() - start)
                if cacheable:
                    self._cache_put(op, key, result)
            except BaseException as exc:  # handed to every waiter, which re-raises it on its own thread
                error = exc
                mapped = status_name(exc)
                self.metrics.backend_errors.labels(op.value, mapped or "INTERNAL").inc()
                if mapped is None:
                    log.error("%s computation failed", op.value, exc_info=exc)
            finally:
                self.metrics.computations_in_flight.dec()
                with self._lock:
                    self._pending -= 1
                    if self._flights.get(key) is flight:
                        del self._flights[key]
                flight.finish(result, error)

        self._pool.submit(work)

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        self.cache.close()
        self.scans.close()
