"""The runner: serving requests in, library calls, serving results out — wherever the model runs.

The in-process backend (``service/backends/inprocess.py``) and the TorchServe handler (``handlers/``) both call
:class:`Runner`, so a response does not depend on which backend computed it. This is the only serving module that
imports torch; the gateway in front of TorchServe never imports it.

Each scan is decoded here, once per process, with the limits the request carries (the gateway's ``Settings``).

Per scan it decodes (a file with :func:`neuroexplain.volumes.read_scan`, a DICOM series with
:func:`neuroexplain.dicom.read_series`), places it on the model grid (``auto`` resolves to ``mni`` or ``register``),
runs the input check on the placed scan, and reports the alignment used and the registration in the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from neuroexplain import errors
from neuroexplain.precision import PREDICT, Precision, effective
from neuroexplain.serving.tuning import usable_cores
from neuroexplain.serving.types import (
    Alignment,
    AttributeRequest,
    AttributeResult,
    CallContext,
    Cluster,
    InputCheck,
    PredictRequest,
    PredictResult,
    Progress,
    Registration,
    ScanInput,
    VisualizeRequest,
    VisualizeResult,
)

DEFAULT_STEPS = 256  # the CLI's --steps default


# ---------------------------------------------------------------------------------------------------------------------
# Seams


def decode(scan: ScanInput, onto: Any = None) -> Any:
    """The scan's validated volume (``neuroexplain.volumes.Scan``), decoded with ``scan.limits``; with ``onto`` (a
    model grid, :meth:`Runner.onto`) a file is resampled onto it while it decodes (``read_scan``'s ``onto``).

    Raises:
        InvalidInputError: (subclasses) the bytes are not a usable scan; LimitExceededError: a cap was hit.
    """
    from neuroexplain.volumes import NonFinite, ScanLimits, read_scan

    limits = ScanLimits(**dataclasses.asdict(scan.limits))
    nonfinite = NonFinite(scan.nonfinite.value)
    if scan.is_dicom:
        from neuroexplain.dicom import read_series

        return read_series(scan.instances, series_uid=scan.series_uid or None, volume_index=scan.volume_index,
                           nonfinite=nonfinite, limits=limits)
    return read_scan(scan.data, volume_index=scan.volume_index, nonfinite=nonfinite, limits=limits,
                     digest=scan.digest or None, onto=onto)  # the core's digest of these bytes: not hashed twice


def library_alignment(alignment: Alignment) -> Any:
    """The library's ``neuroexplain.volumes.Alignment`` for a serving alignment (the same names)."""
    from neuroexplain.volumes import Alignment as LibraryAlignment

    return LibraryAlignment(alignment.value)


def input_check(check: Any) -> InputCheck:
    """Serving type of the library's ``neuroexplain.inputcheck.InputCheck``."""
    return InputCheck(in_distribution=bool(check.in_distribution), score=float(check.score),
                      threshold=float(check.threshold), reason=check.reason,
                      checks=tuple(c.name for c in check.checks))


def placement_report(placement: Any) -> tuple[Alignment, Registration | None]:
    """The alignment a placement used and, for ``register``, what the registration reported."""
    used = Alignment(placement.alignment.value)
    reg = placement.registration
    if reg is None:
        return used, None
    return used, Registration(metric=float(reg.metric), seconds=float(reg.seconds),
                              transform=tuple(float(v) for v in reg.transform.reshape(-1)))


def run_precision(model: Any, requested: Precision, operation: str) -> Precision:
    """The precision ``operation`` (``predict`` or a method name) runs at on ``model``: ``requested`` where the
    model's spec measured it within tolerance on this device type, else float32 (:mod:`neuroexplain.precision`)."""
    return effective(model.spec.mixed_precision, model.device.type, requested, operation)


@contextlib.contextmanager
def memory_guard() -> Iterator[None]:
    """The one place out-of-memory is handled: torch's OOM error (its real type) frees the CUDA cache and becomes
    ``OutOfMemoryError`` (RESOURCE_EXHAUSTED), as does a host ``MemoryError``."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise errors.OutOfMemoryError("the model ran out of accelerator memory for this request; try a smaller scan, "
                                      "fewer steps or a smaller internal batch size") from None
    except MemoryError:
        raise errors.OutOfMemoryError("the server ran out of memory for this request; try a smaller scan or fewer "
                                      "steps") from None


# ---------------------------------------------------------------------------------------------------------------------
# The runner


class Runner:
    """Runs predict, attribute and visualize with the library on already-loaded models.

    Holds only the immutable model table, its decoder and the threads that run the input check's image checks
    beside a forward pass: calls from many threads at once share nothing else.

    Args:
        models: ``LoadedModel`` by name.
        decoder: how a request's scan becomes a volume (default :func:`decode`; the in-process backend's picks up a
            decode it started ahead of the request).
    """

    def __init__(self, models: Mapping[str, Any], decoder: Callable[[ScanInput, Any], Any] = decode) -> None:
        self.models = dict(models)
        self.decode = decoder
        self._beside = ThreadPoolExecutor(usable_cores(), thread_name_prefix="input-check")

    def model(self, name: str) -> Any:
        model = self.models.get(name)
        if model is None:
            raise errors.NotFoundError(f"model {name!r} is not served here; served models: {sorted(self.models)}")
        return model

    def onto(self, name: str, scan: ScanInput) -> Any:
        """The grid to resample ``scan`` onto while it decodes: model ``name``'s, where the scan's alignment places
        it there by its header (``mni``, and ``auto``, which resolves to ``mni`` for a scan in the model's space;
        when it registers instead, the work is not used); else None."""
        model = self.models.get(name)
        if model is None or scan.is_dicom or scan.alignment not in (Alignment.MNI, Alignment.AUTO):
            return None
        return model.spec.grid

    def predict(self, request: PredictRequest, ctx: CallContext | None = None) -> PredictResult:
        """One scan's prediction (raises the typed error instead of returning it)."""
        (out,) = self.predict_batch([request])
        if isinstance(out, BaseException):
            raise out
        return out

    def predict_batch(self, requests: Sequence[PredictRequest]) -> list[PredictResult | errors.NeuroExplainError]:
        """Decode and place each scan, then one forward pass per model over the valid ones (TorchServe batching),
        then the input check of each on its placed scan and the features of that pass.

        A bad scan fails alone: its slot holds the typed error, its neighbours are answered.
        """
        from neuroexplain.inputcheck import check_input, image_check
        from neuroexplain.predict import predict_arrays, prepare

        out: list[PredictResult | errors.NeuroExplainError | None] = [None] * len(requests)
        groups: dict[tuple[str, Precision], list[tuple[int, Any]]] = {}
        for i, request in enumerate(requests):
            try:
                model = self.model(request.model)
                with memory_guard():
                    scan = self.decode(request.scan, self.onto(request.model, request.scan))
                    placed = prepare(scan, model, library_alignment(request.scan.alignment))
                groups.setdefault((request.model, run_precision(model, request.precision, PREDICT)), []).append(
                    (i, placed))
            except errors.NeuroExplainError as exc:
                out[i] = exc
        for (name, precision), members in groups.items():
            model = self.model(name)
            spec = model.spec
            # The image checks need only the placed scans: they run on other threads during the forward pass.
            images = [self._beside.submit(image_check, model, placed) for _i, placed in members]
            try:
                with memory_guard():
                    predictions = predict_arrays(model, [p.array for _i, p in members], batch_size=len(members),
                                                 with_features=True, precision=precision)
            except errors.NeuroExplainError as exc:
                for (i, _p), image in zip(members, images, strict=True):
                    image.cancel()
                    out[i] = exc
                continue
            for (i, placed), p, image in zip(members, predictions, images, strict=True):
                try:
                    check = input_check(check_input(model, placed, p, image=image.result()))
                except errors.NeuroExplainError as exc:
                    out[i] = exc
                    continue
                used, registration = placement_report(placed.placement)
                out[i] = PredictResult(model=spec.name, model_version=spec.version, logits=tuple(p.logits),
                                       probabilities=dict(p.probabilities), predicted_class=p.predicted_class,
                                       alignment=used, input_check=check, registration=registration)
        return [o if o is not None else errors.NeuroExplainError("no answer") for o in out]

    def attribute(self, request: AttributeRequest, ctx: CallContext) -> AttributeResult:
        """Attribution of one scan, with its input check; ``request.reject_flagged`` refuses a flagged scan
        (FAILED_PRECONDITION) before the attribution is computed."""
        from neuroexplain.attribution import explain
        from neuroexplain.inputcheck import InputCheckMode, check_input, enforce
        from neuroexplain.predict import prepare

        model = self.model(request.model)
        with memory_guard():
            scan = self.decode(request.scan, self.onto(request.model, request.scan))
            placed = prepare(scan, model, library_alignment(request.scan.alignment))
            library_check = check_input(model, placed)
            enforce(library_check, InputCheckMode.REJECT if request.reject_flagged else InputCheckMode.WARN)
            out = explain(model, scan, request.method, target=request.target or None, options=dict(request.options),
                          png=request.png, should_cancel=ctx.is_cancelled, prepared=placed,
                          precision=run_precision(model, request.precision, request.method))
        used, registration = placement_report(placed.placement)
        return dataclasses.replace(attribute_result(model.spec, out), alignment=used,
                                   input_check=input_check(library_check), registration=registration)

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult:
        from neuroexplain import featvis

        model = self.model(request.model)

        def progress(p: Any) -> None:
            ctx.on_progress(Progress(step=p.step, steps=p.total, objective=float(p.objective),
                                     preview_png=p.preview_png or b""))

        with memory_guard():
            start: Any = (self.decode(request.scan, self.onto(request.model, request.scan)) if request.scan is not None
                          else request.start.value)
            out = featvis.visualize(
                model, request.target, preset=request.preset, steps=request.steps or DEFAULT_STEPS,
                seed=request.seed, start=start, options=dict(request.options), progress=progress,
                should_cancel=ctx.is_cancelled, preview_every=request.preview_every,
            )
        return VisualizeResult(
            model=model.spec.name, model_version=model.spec.version, nifti=out.nifti,
            native_nifti=out.native_nifti or b"", png=out.png if request.png else b"",
            objective_curve=tuple(float(v) for v in out.curve),
        )


def attribute_result(spec: Any, out: Any) -> AttributeResult:
    """Serving result from the library's ``AttributionResult``."""
    from neuroexplain.serving.catalog import option_text

    summary = out.summary
    clusters = tuple(
        Cluster(peak_mm=tuple(float(v) for v in c["peak_mm"]), center_mm=tuple(float(v) for v in c["centroid_mm"]),  # type: ignore[arg-type]
                voxels=int(c["voxels"]), volume_mm3=float(c["volume_ml"]) * 1000.0, relevance=float(c["relevance"]))
        for c in summary.get("clusters", ())
    )
    return AttributeResult(
        model=spec.name, model_version=spec.version, method=out.method.value, target=out.target_class,
        nifti=out.nifti, total_positive=float(summary["totals"]["positive"]),
        total_negative=float(summary["totals"]["negative"]), clusters=clusters,
        summary_json=json.dumps({**summary, "predicted_class": out.predicted_class,
                                 "probabilities": dict(out.probabilities)}, sort_keys=True, default=option_text),
        png=out.png or b"",
        predicted_class=out.predicted_class, probabilities=dict(out.probabilities),
    )
