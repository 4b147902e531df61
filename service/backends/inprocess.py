"""In-process backend: the library called directly in the gateway's process (tests, laptops, no Java).

The only module of ``service/`` that touches torch. Models are loaded once at :meth:`InProcessBackend.start`; each
call runs on the core's worker thread with no state kept on ``self`` besides the immutable model table.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from neuroexplain.errors import CancelledError, InvalidOptionError, LimitExceededError, NotFoundError
from service.backend import (
    AttributeRequest,
    AttributeResult,
    CallContext,
    Cluster,
    LayerSummary,
    MethodInfo,
    ModelInfo,
    PredictRequest,
    PredictResult,
    ScanInput,
    VisualizeRequest,
    VisualizeResult,
)

log = logging.getLogger("neuroexplain.service")


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
        layers=tuple(LayerSummary(l.name, int(l.channels), tuple(int(s) for s in l.shape)) for l in spec.layers),  # type: ignore[misc]
        attribution_methods=attribution_methods(),
        visualization_presets=visualization_presets(),
        held_out_accuracy=spec.metrics.get("held_out_accuracy"),
    )


def attribution_methods() -> tuple[MethodInfo, ...]:
    """Attribution methods the library offers, with their options (wired in when the attribution package lands)."""
    return ()


def visualization_presets() -> tuple[MethodInfo, ...]:
    """Visualization presets the library offers, with their options (wired in when the featvis package lands)."""
    return ()


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
        try:
            from neuroexplain.attribution import explain_scan  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            raise InvalidOptionError("attribution is not available in this build of the server") from None
        model = self._model(request.model)
        with _oom_as_limit():
            out = explain_scan(
                model, self._scan(request.scan), method=request.method, target=request.target or None,
                options=dict(request.options), alignment=request.scan.alignment, png=request.png,
            )
        return attribute_result(model.spec, out)

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult:
        try:
            from neuroexplain.featvis import visualize_model  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            raise InvalidOptionError("feature visualization is not available in this build of the server") from None
        model = self._model(request.model)
        scan = self._scan(request.scan) if request.scan is not None else None

        def should_stop() -> bool:
            return ctx.is_cancelled()

        with _oom_as_limit():
            out = visualize_model(
                model, target=request.target, preset=request.preset, steps=request.steps or None, seed=request.seed,
                start=request.start.value, scan=scan, options=dict(request.options),
                preview_every=request.preview_every, png=request.png, on_progress=ctx.on_progress,
                should_stop=should_stop,
            )
        if ctx.is_cancelled():
            raise CancelledError("the visualization was cancelled: every caller went away")
        return visualize_result(model.spec, out)


def attribute_result(spec: Any, out: Any) -> AttributeResult:
    """Domain result from the library's attribution output (a mapping or an object with the same fields)."""
    get = out.get if isinstance(out, dict) else lambda k, d=None: getattr(out, k, d)
    summary = get("summary", {}) or {}
    clusters = tuple(
        Cluster(peak_mm=tuple(c.get("peak_mm", (0, 0, 0))), center_mm=tuple(c.get("center_mm", (0, 0, 0))),
                voxels=int(c.get("voxels", 0)), volume_mm3=float(c.get("volume_mm3", 0.0)),
                relevance=float(c.get("relevance", 0.0)))
        for c in summary.get("clusters", ())
    )
    return AttributeResult(
        model=spec.name, model_version=spec.version, method=str(get("method")), target=str(get("target")),
        nifti=bytes(get("nifti")), total_positive=float(summary.get("total_positive", 0.0)),
        total_negative=float(summary.get("total_negative", 0.0)), clusters=clusters,
        summary_json=json.dumps(summary, default=float), png=bytes(get("png", b"") or b""),
    )


def visualize_result(spec: Any, out: Any) -> VisualizeResult:
    get = out.get if isinstance(out, dict) else lambda k, d=None: getattr(out, k, d)
    return VisualizeResult(
        model=spec.name, model_version=spec.version, nifti=bytes(get("nifti")),
        native_nifti=bytes(get("native_nifti", b"") or b""), png=bytes(get("png", b"") or b""),
        objective_curve=tuple(float(v) for v in (get("objective_curve", ()) or ())),
    )


class _oom_as_limit:
    """Turn torch's out-of-memory error (the real type, not its message) into ``LimitExceededError``."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise LimitExceededError("the model ran out of accelerator memory for this request; try a smaller "
                                     "scan, fewer steps or a smaller internal batch size") from None
        return False


__all__ = ["InProcessBackend", "attribute_result", "model_info", "visualize_result"]
