"""The runner: serving requests in, library calls, serving results out — wherever the model runs.

The in-process backend (``service/backends/inprocess.py``) and the TorchServe handler (``handlers/``) both call
:class:`Runner`, so a response does not depend on which backend computed it. This is the only serving module that
imports torch; the gateway in front of TorchServe never imports it.

Each scan is decoded here, once per process, with the limits the request carries (the gateway's ``Settings``).

Seams where wave-2 features plug in (each answers UNIMPLEMENTED, naming the feature, until it is wired):

- :func:`decode` — a DICOM series (``ScanInput.instances``) goes to the DICOM-series reader;
- :func:`library_alignment` — ``Alignment.REGISTER`` goes to registration (and fills ``Result.registration``);
- :func:`check_input` — the input check after placement (fills ``Result.input_check``); it returns None today.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from neuroexplain import errors
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
    ScanInput,
    VisualizeRequest,
    VisualizeResult,
)

DEFAULT_STEPS = 256  # the CLI's --steps default


# ---------------------------------------------------------------------------------------------------------------------
# Seams


def decode(scan: ScanInput) -> Any:
    """The scan's validated volume (``neuroexplain.volumes.Scan``), decoded with ``scan.limits``.

    Raises:
        InvalidInputError: (subclasses) the bytes are not a usable scan; LimitExceededError: a cap was hit;
        UnimplementedError: a DICOM series (until the DICOM-series reader is wired here).
    """
    from neuroexplain.volumes import NonFinite, ScanLimits, read_scan

    if scan.is_dicom:
        # Seam: the DICOM-series reader (issue: DICOM input) is called here with scan.instances, scan.series_uid,
        # scan.volume_index, the non-finite policy and the same limits.
        raise errors.UnimplementedError("scan.dicom (DICOM series input) is not available on this server yet; use "
                                        "scan.data with a NIfTI-1/-2 or MGH file, or scan.digest")
    limits = ScanLimits(**dataclasses.asdict(scan.limits))
    return read_scan(scan.data, volume_index=scan.volume_index, nonfinite=NonFinite(scan.nonfinite.value),
                     limits=limits)


def library_alignment(alignment: Alignment) -> Any:
    """The library's ``neuroexplain.volumes.Alignment`` for a serving alignment.

    Raises:
        UnimplementedError: ``register`` (until registration is wired here).
    """
    from neuroexplain.volumes import Alignment as LibraryAlignment

    if alignment is Alignment.REGISTER:
        raise errors.UnimplementedError("scan.alignment ALIGNMENT_REGISTER (registration to the template) is not "
                                        "available on this server yet; use ALIGNMENT_AUTO, ALIGNMENT_MNI or "
                                        "ALIGNMENT_CENTER")
    return LibraryAlignment(alignment.value)


def check_input(model: Any, scan: Any, placed: Any | None) -> InputCheck | None:
    """The input check of a decoded scan after placement on the model grid (seam; None until it is wired).

    Args:
        model: the ``LoadedModel`` (its spec holds the calibrated threshold).
        scan: the decoded scan.
        placed: the ``neuroexplain.predict.ModelInput`` (Predict), or None where the library places the scan itself.
    """
    return None


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

    Holds only the immutable model table: calls from many threads at once share nothing else.

    Args:
        models: ``LoadedModel`` by name.
    """

    def __init__(self, models: Mapping[str, Any]) -> None:
        self.models = dict(models)

    def model(self, name: str) -> Any:
        model = self.models.get(name)
        if model is None:
            raise errors.NotFoundError(f"model {name!r} is not served here; served models: {sorted(self.models)}")
        return model

    def predict(self, request: PredictRequest, ctx: CallContext | None = None) -> PredictResult:
        """One scan's prediction (raises the typed error instead of returning it)."""
        (out,) = self.predict_batch([request])
        if isinstance(out, BaseException):
            raise out
        return out

    def predict_batch(self, requests: Sequence[PredictRequest]) -> list[PredictResult | errors.NeuroExplainError]:
        """Decode and place each scan, then one forward pass per model over the valid ones (TorchServe batching).

        A bad scan fails alone: its slot holds the typed error, its neighbours are answered.
        """
        from neuroexplain.predict import predict_arrays, prepare

        out: list[PredictResult | errors.NeuroExplainError | None] = [None] * len(requests)
        groups: dict[str, list[tuple[int, Any, InputCheck | None]]] = {}
        for i, request in enumerate(requests):
            try:
                model = self.model(request.model)
                with memory_guard():
                    scan = decode(request.scan)
                    placed = prepare(scan, model, library_alignment(request.scan.alignment))
                groups.setdefault(request.model, []).append((i, placed.array, check_input(model, scan, placed)))
            except errors.NeuroExplainError as exc:
                out[i] = exc
        for name, members in groups.items():
            model = self.model(name)
            spec = model.spec
            try:
                with memory_guard():
                    predictions = predict_arrays(model, [a for _i, a, _c in members], batch_size=len(members))
            except errors.NeuroExplainError as exc:
                for i, _a, _c in members:
                    out[i] = exc
                continue
            for (i, _a, check), p in zip(members, predictions, strict=True):
                out[i] = PredictResult(model=spec.name, model_version=spec.version, logits=tuple(p.logits),
                                       probabilities=dict(p.probabilities), predicted_class=p.predicted_class,
                                       input_check=check)
        return [o if o is not None else errors.NeuroExplainError("no answer") for o in out]

    def attribute(self, request: AttributeRequest, ctx: CallContext) -> AttributeResult:
        from neuroexplain.attribution import explain

        model = self.model(request.model)
        with memory_guard():
            scan = decode(request.scan)
            alignment = library_alignment(request.scan.alignment)
            check = check_input(model, scan, None)
            out = explain(model, scan, request.method, target=request.target or None, options=dict(request.options),
                          alignment=alignment, png=request.png, should_cancel=ctx.is_cancelled)
        return dataclasses.replace(attribute_result(model.spec, out), input_check=check)

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult:
        from neuroexplain import featvis

        model = self.model(request.model)

        def progress(p: Any) -> None:
            ctx.on_progress(Progress(step=p.step, steps=p.total, objective=float(p.objective),
                                     preview_png=p.preview_png or b""))

        with memory_guard():
            start: Any = decode(request.scan) if request.scan is not None else request.start.value
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
        summary_json=json.dumps(summary, sort_keys=True, default=option_text), png=out.png or b"",
    )
