"""TorchServe backend: the gateway's computations run in TorchServe workers (custom handler ``handlers/``).

The gateway talks to its own supervised TorchServe over loopback gRPC (client generated from the protos inside the
installed torchserve package, see :mod:`service.backends.torchserve_proto`):

- Predict and Attribute: unary ``Predictions``; Visualize: ``StreamPredictions`` (one progress envelope per step,
  then the result). Requests and results are the serving types, in the one codec (:mod:`neuroexplain.serving.codec`).
- Archives: missing or stale archives of the registry's models are built by ``python -m handlers.archive`` run as a
  subprocess (it loads torch to validate each model; this process never does), with the archive options of
  ``Settings`` (workers, batch size, batch delay, timeouts). Model info comes from each archive's ``spec.json``
  (:mod:`neuroexplain.serving.catalog`).
- Deadlines travel as the gRPC timeout. Cancellation: a Predict is abandoned at once (milliseconds of work); an
  Attribute or Visualize raises the job's cancel flag (a file in the supervisor's cancel directory, which the handler
  checks before every model pass / optimisation step) and waits for the worker to stop, so the worker is free again
  when the call returns (pytorch/serve#2814). A deadline that expires raises the flag too.
- Errors: the handler answers typed error envelopes, re-raised here as the same ``neuroexplain.errors`` class.
  TorchServe's own failures map by state, never by message text: UNAVAILABLE or a dead TorchServe ->
  ``UnavailableError``; INTERNAL or RESOURCE_EXHAUSTED after a worker process died (TorchServe's answer then), or
  INTERNAL while the model has no ready worker ->
  ``UnavailableError``; INTERNAL while it has one -> ``LimitExceededError`` (TorchServe answers INTERNAL when the
  model's job queue is full).
- ``/metrics``: :class:`TorchServeCollector` re-exports TorchServe's Prometheus metrics (from its loopback metrics
  port) into the gateway's registry — declared by :meth:`TorchServeBackend.collectors`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.registry import Collector

from neuroexplain import errors
from neuroexplain.serving import codec as env
from neuroexplain.serving.cancel import raise_flag
from neuroexplain.serving.catalog import model_info_from_bytes
from neuroexplain.serving.types import (
    AttributeRequest,
    AttributeResult,
    CallContext,
    ModelInfo,
    Operation,
    PredictRequest,
    PredictResult,
    Progress,
    ScanInput,
    VisualizeRequest,
    VisualizeResult,
)
from service.backends.torchserve_supervisor import PROJECT_ROOT, EngineOptions, TorchServeSupervisor

log = logging.getLogger("neuroexplain.service")

POLL_S = 0.1
CANCEL_GRACE_S = 120.0  # how long a cancelled Visualize waits for its worker to notice the flag


class TorchServeBackend:
    """The :class:`service.backend.Backend` that runs models in a supervised TorchServe.

    Args:
        settings: the gateway's ``Settings`` (model store and directories, message size, timeouts, archive options).
        engine: override the TorchServe options (tests); default built from ``settings``.
        build_archives: build missing or stale archives of the registry's models into the store at start.
    """

    def __init__(self, settings: Any, *, engine: EngineOptions | None = None, build_archives: bool = True) -> None:
        self.settings = settings
        self.engine = engine or EngineOptions(
            model_store=Path(settings.model_store),
            max_message_bytes=settings.max_message_bytes,
            startup_timeout_s=settings.torchserve_startup_timeout_s,
            token_auth=settings.torchserve_token_auth,
            token_expiration_min=settings.torchserve_token_expiration_min,
            workers_per_model=settings.torchserve_workers,
        )
        self.build_archives = build_archives
        self.supervisor = TorchServeSupervisor(self.engine)
        self._lock = threading.Lock()
        # Calls this gateway has outstanding at TorchServe, per model: what it knows of TorchServe's job queue.
        self._outstanding: collections.Counter[str] = collections.Counter()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._channel_generation = -1
        self._infos: list[ModelInfo] = []
        from service.backends.torchserve_proto import load

        self._pb2, self._pb2_grpc = load()

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Build missing archives, start TorchServe and wait until every model has a ready worker."""
        store = self.engine.model_store
        if self.build_archives:
            build_archives(self.settings, store)
        archives = sorted(store.glob("*.mar")) if store.is_dir() else []
        if not archives:
            raise errors.UnavailableError(f"no model archives (.mar) in the model store {store}")
        self._infos = [archive_info(a) for a in archives]
        self.supervisor.start()

    def close(self) -> None:
        self.supervisor.close()
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None

    def ready(self) -> bool:
        return self.supervisor.ready()

    def models(self) -> list[ModelInfo]:
        return list(self._infos)

    def collectors(self) -> Sequence[Collector]:
        """TorchServe's own metrics, re-exported on the gateway's ``/metrics``."""
        return (TorchServeCollector(self.supervisor),)

    # -- operations --------------------------------------------------------------------------------------------------

    def decode_ahead(self, scan: ScanInput, model: str) -> None:
        """Nothing: the workers decode, after the bytes reach them with the request."""

    def predict(self, request: PredictRequest, ctx: CallContext) -> PredictResult:
        # A batched forward pass takes milliseconds: a cancelled Predict is abandoned at once, without a flag.
        answer = self._unary(Operation.PREDICT, request.model, request, ctx, flagged=False)
        return answer.load(PredictResult)

    def attribute(self, request: AttributeRequest, ctx: CallContext) -> AttributeResult:
        answer = self._unary(Operation.ATTRIBUTE, request.model, request, ctx, flagged=True)
        return answer.load(AttributeResult)

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult:
        self._check_model(request.model)
        job_id = _job_id(ctx)
        fields = env.encode_request(Operation.VISUALIZE, request, job_id=job_id)
        for attempt in range(2):
            try:
                with self._outstanding_call(request.model):
                    return self._visualize_once(request, ctx, job_id, fields)
            except _KeyRefused as refused:  # before any step ran: renew the key and send the request once more
                if attempt or not self.supervisor.inference_key_refused(refused.metadata):
                    raise errors.UnavailableError(
                        "the model server (TorchServe) refused the gateway's key; retry shortly") from None
        raise AssertionError("unreachable")

    def _visualize_once(self, request: VisualizeRequest, ctx: CallContext, job_id: str,
                        fields: dict[str, bytes]) -> VisualizeResult:
        flag = _Flag(self.supervisor.cancel_dir / job_id)
        stub = self._current_stub()
        metadata = self.supervisor.inference_metadata()
        deaths_before = self.supervisor.worker_deaths
        call = stub.StreamPredictions(
            self._pb2.PredictionsRequest(model_name=request.model, input=fields), timeout=_remaining(ctx),
            metadata=metadata,
        )
        stop = threading.Event()

        progressed = threading.Event()

        def watch() -> None:
            # Raise the worker's cancel flag once every caller has gone or the deadline passed, then give the worker
            # CANCEL_GRACE_S to notice it (it checks every step) before giving up on the stream. A job that has sent
            # no step yet (queued in TorchServe, or starting) is let go at once, flag raised: TorchServe 0.12 drops
            # the worker when a stream's only answer is final (GRPCJob.response reads a ts_stream_next header that
            # only intermediate answers set), unless the call was cancelled first. The worker still stops at its
            # first step.
            while not stop.wait(POLL_S):
                if flag.raise_if_stopped(ctx, "visualization"):
                    if not progressed.is_set() or not stop.wait(CANCEL_GRACE_S):
                        call.cancel()
                    return

        watcher = threading.Thread(target=watch, name=f"visualize-watch-{job_id[:8]}", daemon=True)
        watcher.start()
        result: VisualizeResult | None = None
        refused: errors.NeuroExplainError | None = None
        try:
            for message in _responses(call, self, request.model, flag, metadata, deaths_before):
                answer = env.decode(message.prediction)
                if answer.kind is env.Kind.PROGRESS:
                    progressed.set()
                    # Also after a cancel: the steps the worker still ran are observable (tests, logs).
                    ctx.on_progress(answer.load(Progress))
                    continue
                flag.answered = True
                if flag.reason is not None:
                    raise flag.reason
                try:
                    result = env.raise_if_error(answer).load(VisualizeResult)
                except errors.NeuroExplainError as exc:
                    # Read the stream to its end before raising: TorchServe restarts the worker of a stream whose
                    # client cancelled it, so leaving early would cost a worker per refused visualization.
                    refused = exc
        finally:
            stop.set()
            watcher.join()
            flag.lower()
        if flag.reason is not None:
            raise flag.reason
        if refused is not None:
            raise refused
        if result is None:
            raise errors.UnavailableError("the model server ended the visualization without a result")
        return result

    # -- internals ---------------------------------------------------------------------------------------------------

    def _current_stub(self) -> Any:
        endpoints = self.supervisor.endpoints  # raises UnavailableError while TorchServe (re)starts
        with self._lock:
            if self._channel_generation != self.supervisor.generation or self._stub is None:
                if self._channel is not None:
                    self._channel.close()
                self._channel = grpc.insecure_channel(
                    endpoints.grpc_inference,
                    options=[
                        ("grpc.max_send_message_length", self.engine.max_message_bytes),
                        ("grpc.max_receive_message_length", self.engine.max_message_bytes),
                        ("grpc.enable_http_proxy", 0),  # loopback: never through a proxy from the environment
                    ],
                )
                self._stub = self._pb2_grpc.InferenceAPIsServiceStub(self._channel)
                self._channel_generation = self.supervisor.generation
            return self._stub

    @contextlib.contextmanager
    def _outstanding_call(self, model: str) -> Iterator[None]:
        with self._lock:
            self._outstanding[model] += 1
        try:
            yield
        finally:
            with self._lock:
                self._outstanding[model] -= 1

    def _queue_may_be_full(self, model: str) -> bool:
        """Whether TorchServe's job queue for ``model`` can be full: this gateway (TorchServe's only client) has at
        least ``job_queue_size`` calls outstanding there, the one that failed included."""
        with self._lock:
            return self._outstanding[model] >= self.engine.job_queue_size

    def _check_model(self, model: str) -> None:
        served = sorted(m.name for m in self._infos)
        if model not in served:
            raise errors.NotFoundError(f"model {model!r} is not served here; served models: {served}")

    def _unary(self, task: Operation, model: str, request: Any, ctx: CallContext, *, flagged: bool) -> env.Frame:
        """One Predictions call. ``flagged``: send a job id and, on cancel or deadline, raise the worker's cancel flag
        and wait (CANCEL_GRACE_S at most) for the worker to stop, so it is free again when this returns.

        TorchServe refusing the inference key (PERMISSION_DENIED: it expired, or TorchServe restarted with new keys)
        never reached a worker: the key is renewed and the call sent once more."""
        self._check_model(model)
        job_id = _job_id(ctx) if flagged else None
        fields = env.encode_request(task, request, job_id=job_id)
        for attempt in range(2):
            try:
                with self._outstanding_call(model):
                    return self._unary_once(model, fields, ctx, job_id)
            except _KeyRefused as refused:
                if attempt or not self.supervisor.inference_key_refused(refused.metadata):
                    raise errors.UnavailableError(
                        "the model server (TorchServe) refused the gateway's key; retry shortly") from None
        raise AssertionError("unreachable")

    def _unary_once(self, model: str, fields: dict[str, bytes], ctx: CallContext, job_id: str | None) -> env.Frame:
        flag = _Flag(self.supervisor.cancel_dir / job_id) if job_id else None
        stub = self._current_stub()
        metadata = self.supervisor.inference_metadata()
        deaths_before = self.supervisor.worker_deaths
        future = stub.Predictions.future(
            self._pb2.PredictionsRequest(model_name=model, input=fields), timeout=_remaining(ctx), metadata=metadata
        )
        give_up_at = None
        try:
            while True:
                try:
                    response = future.result(timeout=POLL_S)
                    break
                except grpc.FutureTimeoutError:
                    if flag is None:
                        if ctx.is_cancelled():
                            future.cancel()
                            raise errors.CancelledError("the request was cancelled: every caller went away") from None
                    elif give_up_at is None:
                        if flag.raise_if_stopped(ctx, "request"):
                            give_up_at = time.monotonic() + CANCEL_GRACE_S
                    elif time.monotonic() >= give_up_at:
                        future.cancel()
                        raise flag.reason from None  # type: ignore[misc]
                except grpc.RpcError as exc:
                    if flag is not None and flag.reason is not None:
                        raise flag.reason from None
                    if _code(exc) is grpc.StatusCode.PERMISSION_DENIED:
                        raise _KeyRefused(metadata) from None
                    error = self.map_rpc_error(exc, model, deaths_before)
                    if flag is not None and isinstance(error, errors.DeadlineExceededError):
                        flag.raise_now(error)  # TorchServe let go of the call, not the worker: stop it too
                    raise error from None
            if flag is not None:
                flag.answered = True
                if flag.reason is not None:
                    raise flag.reason
        finally:
            if flag is not None:
                flag.lower()
        return env.raise_if_error(env.decode(response.prediction))

    def map_rpc_error(self, exc: grpc.RpcError, model: str, deaths_before: int | None = None) -> errors.NeuroExplainError:
        """The typed error for a failed call to TorchServe (decided by code and TorchServe's state).

        ``deaths_before``: the supervisor's ``worker_deaths`` when the call was sent; a worker that died since makes
        the failure UNAVAILABLE even if TorchServe already reports a replacement ready."""
        code = _code(exc)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return errors.DeadlineExceededError("the request ran past its deadline in the model server")
        if code is grpc.StatusCode.CANCELLED:
            return errors.CancelledError("the request was cancelled")
        if code is grpc.StatusCode.NOT_FOUND:
            return errors.NotFoundError(f"model {model!r} is not served by the model server")
        lost = self.supervisor.workers_lost()  # checks the worker processes now
        died = deaths_before is not None and self.supervisor.worker_deaths > deaths_before
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED) and (lost or died):
            # A worker process died under the call (TorchServe answers that RESOURCE_EXHAUSTED or INTERNAL): it is
            # being replaced, so the call is retryable, and neither "too large" nor "queue full".
            return errors.UnavailableError("a model server worker stopped during the request and is being "
                                           "restarted; retry shortly")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return errors.LimitExceededError("the request or its answer exceeds the model server's message size limit")
        if code is grpc.StatusCode.INTERNAL and self._queue_may_be_full(model):
            # TorchServe answers INTERNAL when the model's job queue is full (decided by what this gateway has
            # outstanding there, never by TorchServe's message text).
            return errors.LimitExceededError(f"the model server's queue for model {model!r} is full; retry later")
        if code is grpc.StatusCode.INTERNAL and self.supervisor.alive() and self.ready_workers(model) > 0:
            return errors.UnavailableError("the model server (TorchServe) failed the request with its queue not full "
                                           "and its workers ready; retry shortly")
        return errors.UnavailableError("the model server (TorchServe) is unavailable or restarting; retry shortly")

    def ready_workers(self, model: str) -> int:
        """How many of ``model``'s workers TorchServe's management API reports READY (0 when it cannot be asked)."""
        try:
            for described in self.supervisor.models():
                if described.get("modelName") == model:
                    workers: list[dict[str, Any]] = described.get("workers", [])  # type: ignore[assignment]
                    return sum(w.get("status") == "READY" for w in workers)
        except (errors.UnavailableError, OSError, ValueError, KeyError):
            return 0
        return 0


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN


class _KeyRefused(Exception):
    """TorchServe answered PERMISSION_DENIED: the inference key sent (``metadata``) is expired or outdated."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        super().__init__("TorchServe refused the inference key")
        self.metadata = metadata


def _responses(call: Any, backend: TorchServeBackend, model: str, flag: _Flag,
               metadata: tuple[tuple[str, str], ...], deaths_before: int) -> Iterator[Any]:
    received = False
    try:
        for message in call:
            received = True
            yield message
    except grpc.RpcError as exc:
        if flag.reason is not None:
            raise flag.reason from None
        if not received and _code(exc) is grpc.StatusCode.PERMISSION_DENIED:
            raise _KeyRefused(metadata) from None
        error = backend.map_rpc_error(exc, model, deaths_before)
        if isinstance(error, errors.DeadlineExceededError):
            flag.raise_now(error)
        raise error from None


class _Flag:
    """The gateway's side of one job's cancel flag (:func:`neuroexplain.serving.cancel.raise_flag`).

    Raised once, when every caller has gone or the deadline passed. Lowered when the call ends only if the worker
    answered; otherwise the worker may still be running, and it removes the flag itself once it has seen it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reason: errors.NeuroExplainError | None = None
        self.answered = False

    def raise_if_stopped(self, ctx: CallContext, what: str) -> bool:
        expired = ctx.deadline is not None and time.monotonic() >= ctx.deadline
        if expired:
            self.raise_now(errors.DeadlineExceededError(f"the {what} ran past its deadline"))
        elif ctx.is_cancelled():
            self.raise_now(errors.CancelledError(f"the {what} was cancelled: every caller went away"))
        return self.reason is not None

    def raise_now(self, reason: errors.NeuroExplainError) -> None:
        if self.reason is None:
            self.reason = reason
            with contextlib.suppress(OSError):  # TorchServe restarting: its worker is gone anyway
                raise_flag(self.path, time.time())

    def lower(self) -> None:
        if self.reason is None or self.answered:
            with contextlib.suppress(OSError):
                self.path.unlink()


def _job_id(ctx: CallContext) -> str:
    if not env.JOB_ID_PATTERN.match(ctx.job_id):
        raise errors.InvalidOptionError("job id must be 1-64 characters from [A-Za-z0-9_-]")
    return ctx.job_id


def _remaining(ctx: CallContext) -> float | None:
    if ctx.deadline is None:
        return None
    left = ctx.deadline - time.monotonic()
    if left <= 0:
        raise errors.DeadlineExceededError("the deadline passed before the request reached the model server")
    return left


def archive_info(archive: Path) -> ModelInfo:
    """The :class:`ModelInfo` of the ``spec.json`` inside a ``.mar`` (what its workers serve)."""
    try:
        with zipfile.ZipFile(archive) as z:
            raw = z.read("spec.json")
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise errors.InvalidInputError(f"{archive.name} is not a neuroexplain model archive ({type(exc).__name__})") from None
    return model_info_from_bytes(raw)


def archive_command(settings: Any, store: Path) -> list[str]:
    """The ``python -m handlers.archive`` command line that builds the store's archives with the Settings' options."""
    cmd = [sys.executable, "-m", "handlers.archive", str(store),
           "--workers", str(settings.torchserve_workers), "--batch-size", str(settings.torchserve_batch_size),
           "--batch-delay-ms", str(settings.torchserve_batch_delay_ms),
           "--response-timeout-s", str(settings.torchserve_response_timeout_s),
           "--startup-timeout-s", str(int(settings.torchserve_startup_timeout_s))]
    for folder in settings.model_dirs:
        cmd += ["--model-dir", str(folder)]
    return cmd


def build_archives(settings: Any, store: Path) -> None:
    """Build missing or stale archives in a subprocess (torch is loaded there, never in the gateway).

    Raises:
        InvalidInputError: a model does not package (the subprocess' one-line reason).
    """
    pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(archive_command(settings, store), capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": pythonpath})
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise errors.InvalidInputError(f"building the model archives failed: {lines[-1][:500]}")


class TorchServeCollector:
    """A Prometheus collector that re-exports TorchServe's own metrics (scraped from its loopback port).

    TorchServe's families keep their names (``ts_inference_requests_total``, ``ts_queue_latency_microseconds``,
    ``NeuroExplainHandlerRequests`` ...); nothing is collected while TorchServe is down.
    """

    def __init__(self, supervisor: TorchServeSupervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        text = self.supervisor.metrics_text()
        if not text:
            return
        try:
            yield from text_string_to_metric_families(text)
        except ValueError:
            log.warning("TorchServe's metrics could not be parsed; skipped")

    def describe(self) -> list[Any]:
        return []  # unknown until scraped; an empty describe keeps registration from scraping TorchServe
