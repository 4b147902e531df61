"""TorchServe custom handler: a thin adapter from TorchServe's request rows to the neuroexplain library.

Requests dispatch on ``input["task"]`` (see :mod:`neuroexplain.serving.codec` for the wire contract): ``predict`` (batched
when TorchServe batches), ``attribute`` and ``visualize`` (which streams one progress envelope per step through
``send_intermediate_predict_response`` and checks the gateway's cancel flag every step).

The handler object holds only what ``initialize`` sets (device, model, cancel directory): nothing per request, so
one worker can be reused for any sequence of requests. The library calls are :class:`neuroexplain.serving.runner.Runner`'s,
exactly the in-process backend's; each scan is decoded once, here, with the limits the gateway sent. Errors are
answered per request as error frames, so one bad scan in a batch does not fail its neighbours.

Cancellation: TorchServe never tells a busy worker that its client left (pytorch/serve#2814). The gateway raises a
flag — a file named after the job id in the directory given by ``NEUROEXPLAIN_CANCEL_DIR`` (inherited from the
TorchServe process), holding the time it was raised — and the handler checks it before every optimisation step
(visualize) and every model pass (attribute). A cancelled job reports how many steps or passes still ran after the
flag was raised, in the worker log and as the ``NeuroExplainCancels`` metric's ``AfterFlag`` label (0-9, ``10+``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from ts.context import Context
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from neuroexplain import errors
from neuroexplain.serving import codec as env
from neuroexplain.serving.cancel import CancelWatch
from neuroexplain.serving.runner import Runner
from neuroexplain.serving.types import CallContext, Operation, Progress

log = logging.getLogger(__name__)

CANCEL_DIR_ENV = "NEUROEXPLAIN_CANCEL_DIR"
REQUESTS_METRIC = "NeuroExplainHandlerRequests"
SECONDS_METRIC = "NeuroExplainHandlerSeconds"
CANCELS_METRIC = "NeuroExplainCancels"
AFTER_FLAG_LABELS = 10  # AfterFlag label values: "0" .. "9", then "10+" (bounded)


class NeuroExplainHandler(BaseHandler):  # type: ignore[misc]
    """Serves one neuroexplain model (spec.json + weights.pt [+ architecture file]) inside a TorchServe worker."""

    def initialize(self, context: Context) -> None:
        """Device choice, model load, warm-up.

        Args:
            context: TorchServe's context; ``system_properties`` holds ``model_dir`` and ``gpu_id``.
        """
        properties = context.system_properties
        self.device = self._choose_device(properties.get("gpu_id"))
        self.model = self._load(Path(properties["model_dir"]), context.manifest)
        self._warm_up()
        self.runner = Runner({self.model.spec.name: self.model})
        cancel_dir = os.environ.get(CANCEL_DIR_ENV)
        self.cancel_dir = Path(cancel_dir) if cancel_dir else None
        self.initialized = True
        log.info("model %s %s ready on %s", self.model.spec.name, self.model.spec.version, self.device)

    @staticmethod
    def _choose_device(gpu_id: Any) -> torch.device:
        # TorchServe assigns gpu_id round-robin over visible GPUs; None on CPU-only hosts.
        if gpu_id is not None and torch.cuda.is_available():
            return torch.device(f"cuda:{int(gpu_id)}")
        return torch.device("cpu")

    def _load(self, model_dir: Path, manifest: dict[str, Any]) -> Any:
        from neuroexplain.models import load_from_files

        model_file = manifest.get("model", {}).get("modelFile")
        return load_from_files(
            model_dir / "spec.json",
            model_dir / "weights.pt",
            model_dir / model_file if model_file else None,
            device=str(self.device),
        )

    def _warm_up(self) -> None:
        # The template anatomy (used to place scans) is computed once per grid and cached; one forward pass
        # allocates the kernels' workspaces. Both before the first real request arrives.
        from neuroexplain.template import anatomy

        anatomy(self.model.spec.grid)
        with torch.inference_mode():
            self.model.module(torch.zeros((1, 1, *self.model.spec.grid.shape), device=self.device))

    # ---------------------------------------------------------------------------------------------------------------

    def handle(self, data: list[dict[str, Any]], context: Context) -> list[bytes]:
        """Answer one batch: one envelope per request row, in order."""
        started = time.perf_counter()
        answers: list[bytes | None] = [None] * len(data)
        parsed: dict[int, tuple[Operation, Any, str | None]] = {}
        for idx, row in enumerate(data):
            try:
                parsed[idx] = env.decode_request(row)
            except errors.NeuroExplainError as exc:
                answers[idx] = env.encode_error(exc)
        predicts = [i for i, (task, _r, _j) in parsed.items() if task is Operation.PREDICT]
        if predicts:
            for i, answer in zip(predicts, self._predict_batch([parsed[i][1] for i in predicts])):
                answers[i] = answer
        for idx, (task, request, job_id) in parsed.items():
            if task is Operation.PREDICT:
                continue
            flag = self.cancel_dir / job_id if (job_id and self.cancel_dir) else None  # job_id: [A-Za-z0-9_-] only
            watch = CancelWatch(flag, count_polls=task is Operation.ATTRIBUTE)
            ctx = self._call_context(job_id, idx, context, watch)
            run = self.runner.attribute if task is Operation.ATTRIBUTE else self.runner.visualize
            try:
                answers[idx] = self._guarded(lambda: env.encode_result(run(request, ctx)))  # noqa: B023
            finally:
                watch.lower()
            self._report_cancel(context, task, job_id, watch)
        self._record_metrics(context, parsed, answers, time.perf_counter() - started)
        _mark_last_frames(context, [i for i, row in enumerate(data) if _streamed(row, parsed.get(i))])
        return [a if a is not None else env.encode_error(RuntimeError()) for a in answers]

    @staticmethod
    def _guarded(fn: Any) -> bytes:
        try:
            return bytes(fn())
        except errors.NeuroExplainError as exc:  # out-of-memory included: the runner's memory_guard converts it
            return env.encode_error(exc)
        except Exception as exc:  # an unexpected bug: logged here (the worker log), answered as a generic error
            log.exception("handler failed")
            return env.encode_error(exc)

    def _predict_batch(self, requests: list[Any]) -> list[bytes]:
        """Decode and place each scan, then one forward pass over all valid ones (TorchServe batching)."""
        try:
            outcomes = self.runner.predict_batch(requests)
        except Exception:  # an unexpected bug: logged in the worker log, every row answered as a generic error
            log.exception("predict batch failed")
            return [env.encode_error(RuntimeError()) for _ in requests]
        return [env.encode_error(o) if isinstance(o, BaseException) else env.encode_result(o) for o in outcomes]

    def _call_context(self, job_id: str | None, idx: int, context: Context, watch: CancelWatch) -> CallContext:
        request_ids = {idx: context.request_ids[idx]} if getattr(context, "request_ids", None) else {}

        def on_progress(progress: Progress) -> None:
            watch.step_done()
            # Streamed on StreamPredictions (batch size 1); a unary Predictions call never sees these frames.
            if request_ids:
                message = env.encode(env.Kind.PROGRESS, progress)
                send_intermediate_predict_response([message], request_ids, "Intermediate response", 200, context)

        return CallContext(job_id=job_id or "-", is_cancelled=watch.is_cancelled, on_progress=on_progress)

    def _report_cancel(self, context: Context, task: Operation, job_id: str | None, watch: CancelWatch) -> None:
        """Log and count a job that stopped on its cancel flag, with the steps/passes that ran after the flag."""
        after = watch.units_after_flag()
        if after is None:
            return
        unit = "model passes" if task is Operation.ATTRIBUTE else "steps"
        log.info("job %s (%s) stopped on its cancel flag after %d %s, %d of them after the flag was raised",
                 job_id, task.value, watch.units, unit, after)  # fmt: skip
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        try:
            cancels = metrics.get_metric(CANCELS_METRIC, MetricTypes.COUNTER)
        except MetricsCacheKeyError:
            return
        label = str(after) if after < AFTER_FLAG_LABELS else f"{AFTER_FLAG_LABELS}+"
        cancels.add_or_update(1, [self.model.spec.name, task.value, label])

    def _record_metrics(
        self, context: Context, parsed: dict[int, tuple[Operation, Any, str | None]], answers: list[bytes | None],
        seconds: float,
    ) -> None:
        # Declared in handlers/metrics.yaml (TorchServe drops undeclared model metrics). Labels are bounded:
        # model name, task, outcome (ok | error).
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        try:
            requests = metrics.get_metric(REQUESTS_METRIC, MetricTypes.COUNTER)
            busy = metrics.get_metric(SECONDS_METRIC, MetricTypes.COUNTER)
        except MetricsCacheKeyError:  # a metrics.yaml without our declarations: skip, never fail a request
            return
        name = self.model.spec.name
        for idx, (task, _request, _job) in parsed.items():
            answer = answers[idx] or b""
            outcome = "error" if answer and env.decode(answer).kind is env.Kind.ERROR else "ok"
            requests.add_or_update(1, [name, task.value, outcome])
        busy.add_or_update(seconds, [name])


def _streamed(row: dict[str, Any], parsed: tuple[Operation, Any, str | None] | None) -> bool:
    """Whether a row is a Visualize (a streamed call): by its parsed task, or, for a row that did not parse, by its
    raw ``task`` field."""
    if parsed is not None:
        return parsed[0] is Operation.VISUALIZE
    raw = row.get("task") if isinstance(row, dict) else None
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("ascii", errors="replace")
    return isinstance(raw, str) and raw.strip() == Operation.VISUALIZE.value


def _mark_last_frames(context: Context, rows: list[int]) -> None:
    """Mark each streamed (Visualize) answer as its call's last frame where no progress frame did
    (``ts_stream_next: false``).

    TorchServe sets that header on a streamed call's final answer only after an intermediate one was sent; a
    Visualize refused before its first step would otherwise reach the frontend without it, which then fails on the
    missing header and kills the worker (a restart per refused visualization). Unary answers must not carry it:
    TorchServe's REST job then takes the only answer for a stream's last chunk and never sends the response head.
    """
    for idx in rows:
        try:
            headers = context.get_response_headers(idx)
        except (AttributeError, IndexError, KeyError, TypeError):  # a context without per-request headers (tests)
            return
        if "ts_stream_next" not in (headers or {}):
            context.set_response_header(idx, "ts_stream_next", "false")
