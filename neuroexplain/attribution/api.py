"""``explain``: one scan, one method, one target class -> maps, summary, NIfTI and PNG bytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neuroexplain.attribution.methods import attribute_tensor, private_copy
from neuroexplain.attribution.options import Method, parse_options
from neuroexplain.attribution.render import overlay_png
from neuroexplain.attribution.summary import summarise
from neuroexplain.models.registry import LoadedModel
from neuroexplain.precision import Precision, autocast
from neuroexplain.predict import ModelInput, prepare
from neuroexplain.volumes import Alignment, Placement, Scan, nifti_bytes


@dataclass(frozen=True, eq=False)
class AttributionResult:
    """What :func:`explain` returns.

    Attributes:
        method: the method used.
        target_class: the class explained (the predicted class unless the caller chose one).
        options: the options used, defaults filled in (the canonical form, e.g. for cache keys).
        model_map: signed, unnormalised relevance on the model grid, ``grid.shape`` float32.
        native_map: the same map resampled onto the scan's own grid, ``scan.shape`` float32.
        native_affine: the scan's affine (``native_map`` overlays the scan).
        summary: JSON-serialisable totals and top clusters (scan world coordinates); see ``summary.summarise``.
        nifti: gzipped NIfTI-1 of ``native_map`` with ``native_affine`` (geometry only, no header text).
        png: orthogonal-slice overlay of the map on the scan, or ``None`` unless requested.
        probabilities: the model's class probabilities for this scan (class -> p, temperature-scaled).
        predicted_class: the arg-max class (the explained class unless ``target`` chose another).
        placement: how the scan was placed on the model grid (the alignment used; the registration, if any).
    """

    method: Method
    target_class: str
    options: dict[str, Any]
    model_map: np.ndarray
    native_map: np.ndarray
    native_affine: np.ndarray
    summary: dict[str, Any]
    nifti: bytes
    png: bytes | None
    probabilities: dict[str, float]
    predicted_class: str = ""
    placement: Placement | None = None


def explain(
    model: LoadedModel,
    scan: Scan,
    method: Method | str,
    target: str | None = None,
    options: Mapping[str, str | int | float] | None = None,
    alignment: Alignment = Alignment.AUTO,
    png: bool = False,
    should_cancel: Callable[[], bool] | None = None,
    prepared: ModelInput | None = None,
    precision: Precision = Precision.FLOAT32,
) -> AttributionResult:
    """Explain the model's output for ``target`` on ``scan`` with ``method``.

    Deterministic: the same scan, method, target and options give the same map (stochastic methods take a
    ``seed`` option). The shared ``model`` is never modified: methods run on a private copy of its module.

    Args:
        model: a loaded model (``load_model``).
        scan: a validated scan (``read_scan``) in any orientation.
        method: a :class:`Method` or its name (``integrated_gradients``...).
        target: class name to explain; default: the predicted class.
        options: method options as strings or numbers (see ``METHOD_OPTIONS``); defaults fill the rest.
        alignment: how the scan maps onto the model grid (see :class:`~neuroexplain.volumes.Alignment`).
        png: also render an orthogonal-slice PNG overlay.
        should_cancel: polled before every model pass; returning True raises ``CancelledError``.
        prepared: ``scan`` already placed on the model grid (:func:`~neuroexplain.predict.prepare`), e.g. by a caller
            that ran the input check on it; ``alignment`` is then ignored and the scan is not placed twice.
        precision: the number format of the method's passes (torch autocast; :mod:`neuroexplain.precision` says
            where a reduced one stays within tolerance). The probabilities always come from a float32 pass.

    Raises:
        InvalidOptionError: unknown method, option or target class, or an option out of range.
        NotFoundError: unknown Grad-CAM layer.
        CancelledError: ``should_cancel`` returned True.
    """
    m = Method.parse(method)
    opts = parse_options(m, options)
    target_index = model.spec.class_index(target) if target is not None else None
    if prepared is None:
        prepared = prepare(scan, model, alignment)
    x = prepared.tensor(model.device)  # (1, 1, D, H, W)
    module = private_copy(model.module, m)
    with torch.inference_mode():
        logits = module(x).float()[0]
    probs = torch.softmax(logits / model.spec.temperature, dim=0).tolist()
    predicted_index = int(torch.argmax(logits).item())
    if target_index is None:
        target_index = predicted_index
    with autocast(model.device.type, precision):
        attr = attribute_tensor(
            module, x, m, target_index, opts, grid=model.spec.grid,
            layer_names=[layer.name for layer in model.spec.layers], should_cancel=should_cancel,
        )
    model_map = attr[0, 0].float().cpu().numpy()
    native_map = prepared.placement.to_native(model_map)
    target_class = model.spec.classes[target_index]
    summary = summarise(model_map, prepared.placement, method=m.value, target=target_class)
    summary["options"] = dict(opts)
    image = None
    if png:
        peak = summary["clusters"][0]["peak_mm"] if summary["clusters"] else None
        image = overlay_png(native_map, scan.data, scan.affine, title=f"{m.value} | {target_class}", cut_mm=peak)
    return AttributionResult(
        method=m,
        target_class=target_class,
        options=opts,
        model_map=model_map,
        native_map=native_map,
        native_affine=np.array(scan.affine, dtype=np.float64),
        summary=summary,
        nifti=nifti_bytes(native_map, scan.affine),
        png=image,
        probabilities=dict(zip(model.spec.classes, probs)),
        predicted_class=model.spec.classes[predicted_index],
        placement=prepared.placement,
    )
