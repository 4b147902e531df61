"""In-process backend: the library called directly in the gateway's process (tests, laptops, no Java).

The only module of ``service/`` that touches torch. Models are loaded once at :meth:`InProcessBackend.start`; each
call runs on the core's worker thread with no state kept on ``self`` besides the immutable model table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neuroexplain.errors import LimitExceededError, NotFoundError
from service.backend import (
    AttributeRequest,
    AttributeResult,
    CallContext,
    Cluster,
    LayerSummary,
    MethodInfo,
    ModelInfo,
    OptionInfo,
    PredictRequest,
    PredictResult,
    Progress,
    ScanInput,
    VisualizeRequest,
    VisualizeResult,
)

log = logging.getLogger("neuroexplain.service")

DEFAULT_STEPS = 256  # the CLI's --steps default


def model_info(spec: Any) -> ModelInfo:
    """Domain :class:`ModelInfo` from a library ``ModelSpec`` (also used by the TorchServe backend)."""
    return ModelInfo(
        name=spec.name,
        version=spec.version,
        task=spec.task,
        classes=tuple(spec.classes),
        grid_shape=tuple(int(s) for s in spec.grid.shape),  # type: ignore[arg-type]
        grid_affine=tuple(float(v) for v in spec.grid.affine.ravel()),
        voxel_mm=tuple(float(z) for z in spec.grid.zooms),  # type: ignore[arg-type]
        weights_sha256=spec.weights_sha256,
        layers=tuple(LayerSummary(l.name, int(l.channels), tuple(int(s) for s in l.shape)) for l in spec.layers),  # type: ignore[misc,arg-type]
        attribution_methods=attribution_methods(),
        visualization_presets=visualization_presets(),
        held_out_accuracy=spec.metrics.get("held_out_accuracy"),
    )


def attribution_methods() -> tuple[MethodInfo, ...]:
    """Attribution methods the library offers, with each option's default and allowed values."""
    from neuroexplain.attribution import METHOD_OPTIONS

    return tuple(
        MethodInfo(
            name=method.value,
            options=tuple(
                OptionInfo(name=o.name, type=o.type, default=_text(o.default), allowed=o.allowed(), description=o.doc)
                for o in options
            ),
        )
        for method, options in METHOD_OPTIONS.items()
    )


def visualization_presets() -> tuple[MethodInfo, ...]:
    """Visualization presets with every option's value under that preset (none while featvis is absent)."""
    try:
        from neuroexplain.featvis import OPTIONS, PRESETS
    except ImportError:
        return ()

    return tuple(
        MethodInfo(
            name=preset.value,
            options=tuple(
                OptionInfo(name=o.name, type=o.type, default=_text(values.get(o.name, o.default)),
                           allowed=o.allowed(), description=o.doc)
                for o in OPTIONS
            ),
        )
        for preset, values in PRESETS.items()
    )


def _text(value: Any) -> str:
    """An option value as the wire and the CLI write it (``true``, ``0.05``; ``""`` = decided by the model)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value.value if hasattr(value, "value") else value)


class InProcessBackend:
    """Runs predict, attribute and visualize with the library in this process.

    Args:
        model_dirs: extra model folders besides the bundled ones and ``NEUROEXPLAIN_MODEL_DIRS``.
        device: torch device (``cpu``, ``cuda``, ``cuda:1``).
        models: names to serve; default every model found.
    """

    def __init__(self, model_dirs: tuple[Path, ...] = (), device: str = "cpu", models: tuple[str, ...] = ()) -> None:
        self.model_dirs = tuple(model_dirs)
        self.device = device
        self.only = tuple(models)
        self._models: dict[str, Any] = {}
        self._infos: list[ModelInfo] = []
        self._ready = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        from neuroexplain.models import list_specs, load_model

        names = [s.name for s in list_specs(self.model_dirs)]
        if self.only:
            missing = sorted(set(self.only) - set(names))
            if missing:
                raise NotFoundError(f"models {missing} not found; available: {sorted(names)}")
            names = list(self.only)
        loaded = {n: load_model(n, device=self.device, model_dirs=self.model_dirs) for n in names}
        self._models = loaded
        self._infos = [model_info(m.spec) for m in loaded.values()]
        self._ready.set()
        log.info("in-process backend: %d models loaded on %s", len(loaded), self.device)

    def close(self) -> None:
        self._ready.clear()

    def ready(self) -> bool:
        return self._ready.is_set()

    def models(self) -> list[ModelInfo]:
        return list(self._infos)

    def _model(self, name: str) -> Any:
        model = self._models.get(name)
        if model is None:
            raise NotFoundError(f"model {name!r} is not served here; served models: {sorted(self._models)}")
        return model

    @staticmethod
    def _scan(scan: ScanInput) -> Any:
        if scan.decoded is not None:
            return scan.decoded
        from neuroexplain.volumes import NonFinite, read_scan

        return read_scan(scan.data, volume_index=scan.volume_index, nonfinite=NonFinite(scan.nonfinite))

    # -- operations ----------------------------------------------------------------------------------------------

    def predict(self, request: PredictRequest, ctx: CallContext) -> PredictResult:
        from neuroexplain.predict import predict
        from neuroexplain.volumes import Alignment

        model = self._model(request.model)
        with _oom_as_limit():
            pred = predict(model, [self._scan(request.scan)], alignment=Alignment(request.scan.alignment))[0]
        return PredictResult(model=model.spec.name, model_version=model.spec.version, logits=tuple(pred.logits),
                             probabilities=dict(pred.probabilities), predicted_class=pred.predicted_class)

    def attribute(self, request: AttributeRequest, ctx: CallContext) -> AttributeResult:
        from neuroexplain.attribution import explain
        from neuroexplain.volumes import Alignment

        model = self._model(request.model)
        with _oom_as_limit():
            out = explain(
                model, self._scan(request.scan), request.method, target=request.target or None,
                options=dict(request.options), alignment=Alignment(request.scan.alignment), png=request.png,
                should_cancel=ctx.is_cancelled,
            )
        return attribute_result(model.spec, out)

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult:
        from neuroexplain import featvis

        model = self._model(request.model)
        start: Any = self._scan(request.scan) if request.scan is not None else request.start.value

        def progress(p: Any) -> None:
            ctx.on_progress(Progress(step=p.step, steps=p.total, objective=float(p.objective),
                                     preview_png=p.preview_png or b""))

        with _oom_as_limit():
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
    """Domain result from the library's ``AttributionResult`` (also used by the TorchServe backend)."""
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
        summary_json=json.dumps(summary, sort_keys=True, default=_text), png=out.png or b"",
    )


@contextlib.contextmanager
def _oom_as_limit() -> Iterator[None]:
    """Turn torch's out-of-memory error (the real type, not its message) into ``LimitExceededError``."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise LimitExceededError("the model ran out of accelerator memory for this request; try a smaller scan, "
                                 "fewer steps or a smaller internal batch size") from None


__all__ = ["InProcessBackend", "attribute_result", "model_info"]
