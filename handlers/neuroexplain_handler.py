"""TorchServe custom handler: a thin adapter from TorchServe's request rows to the neuroexplain library.

Requests dispatch on ``input["task"]`` (see :mod:`handlers.envelope` for the wire contract): ``predict`` (batched
when TorchServe batches), ``attribute`` and ``visualize`` (which streams one progress envelope per step through
``send_intermediate_predict_response`` and checks the gateway's cancel flag every step).

The handler object holds only what ``initialize`` sets (device, model, cancel directory): nothing per request, so
one worker can be reused for any sequence of requests. Errors are answered per request as error envelopes, so one
bad scan in a batch does not fail its neighbours.

Cancellation: TorchServe never tells a busy worker that its client left (pytorch/serve#2814). The gateway raises a
flag — an empty file named after the job id in the directory given by ``NEUROEXPLAIN_CANCEL_DIR`` (inherited from
the TorchServe process) — and the handler checks it before every optimisation step.
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
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers import envelope as env
from neuroexplain import errors

log = logging.getLogger(__name__)

CANCEL_DIR_ENV = "NEUROEXPLAIN_CANCEL_DIR"
REQUESTS_METRIC = "NeuroExplainHandlerRequests"
SECONDS_METRIC = "NeuroExplainHandlerSeconds"


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
        parsed: dict[int, env.Request] = {}
        for idx, row in enumerate(data):
            try:
                parsed[idx] = env.decode_request(row)
            except errors.NeuroExplainError as exc:
                answers[idx] = env.encode_error(exc)
        predicts = [i for i, r in parsed.items() if r.task is env.Task.PREDICT]
        if predicts:
            for i, answer in zip(predicts, self._predict_batch([parsed[i] for i in predicts])):
                answers[i] = answer
        for idx, request in parsed.items():
            if request.task is env.Task.ATTRIBUTE:
                answers[idx] = self._guarded(self._attribute, request)
            elif request.task is env.Task.VISUALIZE:
                answers[idx] = self._guarded(self._visualize, request, idx=idx, context=context)
        self._record_metrics(context, parsed, answers, time.perf_counter() - started)
        return [a if a is not None else env.encode_error(RuntimeError()) for a in answers]

    @staticmethod
    def _guarded(fn: Any, *args: Any, **kwargs: Any) -> bytes:
        try:
            return bytes(fn(*args, **kwargs))
        except errors.NeuroExplainError as exc:
            return env.encode_error(exc)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return env.encode_error(errors.LimitExceededError("the model worker ran out of GPU memory; retry later"))
        except Exception as exc:  # an unexpected bug: log it here (the worker log), answer a generic error
            log.exception("handler failed")
            return env.encode_error(exc)

    def _read(self, request: env.Request) -> Any:
        from neuroexplain.volumes import NonFinite, read_scan

        if request.scan is None:
            raise errors.InvalidInputError(f"task {request.task.value!r} needs a scan")
        opts = request.options
        try:
            nonfinite = NonFinite(opts.get("nonfinite", "reject"))
        except ValueError:
            raise errors.InvalidOptionError(f"nonfinite must be one of {[n.value for n in NonFinite]}") from None
        return read_scan(request.scan, volume_index=opts.get("volume_index"), nonfinite=nonfinite)

    @staticmethod
    def _alignment(request: env.Request) -> Any:
        from neuroexplain.volumes import Alignment

        try:
            return Alignment(request.options.get("alignment", "auto"))
        except ValueError:
            raise errors.InvalidOptionError(f"alignment must be one of {[a.value for a in Alignment]}") from None

    def _predict_batch(self, requests: list[env.Request]) -> list[bytes]:
        """Decode and place each scan, then one forward pass over all that are valid (TorchServe batching)."""
        from neuroexplain.predict import predict_arrays, prepare

        out: list[bytes | None] = [None] * len(requests)
        arrays, slots = [], []
        for i, request in enumerate(requests):
            try:
                arrays.append(prepare(self._read(request), self.model, self._alignment(request)).array)
                slots.append(i)
            except errors.NeuroExplainError as exc:
                out[i] = env.encode_error(exc)
        if arrays:
            spec = self.model.spec
            try:
                predictions = predict_arrays(self.model, arrays, batch_size=len(arrays))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                oom = env.encode_error(errors.LimitExceededError("the model worker ran out of GPU memory"))
                predictions, out = [], [o if o is not None else oom for o in out]
            for i, p in zip(slots, predictions):
                out[i] = env.encode(
                    env.Kind.RESULT,
                    {
                        "model": spec.name,
                        "model_version": spec.version,
                        "logits": list(p.logits),
                        "probabilities": p.probabilities,
                        "predicted_class": p.predicted_class,
                    },
                )
        return [o if o is not None else env.encode_error(RuntimeError()) for o in out]

    def _attribute(self, request: env.Request) -> bytes:
        from handlers import tasks

        scan = self._read(request)
        header, payload = tasks.attribute(self.model, scan, self._alignment(request), request.options)
        return env.encode(env.Kind.RESULT, header, payload)

    def _visualize(self, request: env.Request, *, idx: int, context: Context) -> bytes:
        from handlers import tasks

        scan = self._read(request) if request.scan is not None else None
        job_flag = self._cancel_flag(request.job_id)
        request_ids = {idx: context.request_ids[idx]} if context.request_ids else {}

        def should_cancel() -> bool:
            return job_flag is not None and job_flag.exists()

        def progress(step: int, steps: int, objective: float, preview: bytes = b"") -> None:
            message = env.encode(env.Kind.PROGRESS, {"step": step, "steps": steps, "objective": objective}, preview)
            # Only meaningful on StreamPredictions (batch size 1); a unary call just ignores intermediate frames.
            if request_ids:
                send_intermediate_predict_response([message], request_ids, "Intermediate response", 200, context)

        header, payload = tasks.visualize(
            self.model, scan, self._alignment(request), request.options, progress=progress, should_cancel=should_cancel
        )
        return env.encode(env.Kind.RESULT, header, payload)

    def _cancel_flag(self, job_id: str | None) -> Path | None:
        if job_id is None or self.cancel_dir is None:
            return None
        return self.cancel_dir / job_id  # job_id is restricted to [A-Za-z0-9_-] by the envelope decoder

    def _record_metrics(
        self, context: Context, parsed: dict[int, env.Request], answers: list[bytes | None], seconds: float
    ) -> None:
        # Declared in handlers/metrics.yaml (TorchServe drops undeclared model metrics). Labels are bounded:
        # model name, task, outcome (ok | error).
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        try:
            requests = metrics.get_metric(REQUESTS_METRIC, MetricTypes.COUNTER)
            busy = metrics.get_metric(SECONDS_METRIC, MetricTypes.COUNTER)
        except Exception:  # metric cache without our declarations (e.g. a default metrics.yaml): skip, never fail
            return
        name = self.model.spec.name
        for idx, request in parsed.items():
            answer = answers[idx] or b""
            outcome = "error" if answer and env.decode(answer).kind is env.Kind.ERROR else "ok"
            requests.add_or_update(1, [name, request.task.value, outcome])
        busy.add_or_update(seconds, [name])
