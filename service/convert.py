"""Converters between the wire types (``neuroexplain.v1`` protobuf) and the domain types of ``service.backend``.

They live here, beside the generated stubs, so that neither the core nor the library ever imports ``*_pb2``. They
check the wire shape only (enum values, field presence); the core validates meaning.
"""

from __future__ import annotations

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain.errors import InvalidOptionError, UnimplementedError
from service.backend import (
    NOTICE,
    AttributeRequest,
    AttributeResult,
    MethodInfo,
    ModelInfo,
    PredictRequest,
    PredictResult,
    Progress,
    StartKind,
    VisualizeRequest,
    VisualizeResult,
)
from service.core import ScanRef

_ALIGNMENT = {
    pb.ALIGNMENT_UNSPECIFIED: "auto",
    pb.ALIGNMENT_AUTO: "auto",
    pb.ALIGNMENT_MNI: "mni",
    pb.ALIGNMENT_CENTER: "center",
}
_NONFINITE = {pb.NON_FINITE_UNSPECIFIED: "reject", pb.NON_FINITE_REJECT: "reject", pb.NON_FINITE_ZERO: "zero"}
_STARTS = {"": StartKind.NOISE, **{k.value: k for k in StartKind}}
DEFAULT_PRESET = "robust"


def _not_built(feature: str, allowed: str) -> UnimplementedError:
    return UnimplementedError(f"{feature} is not available on this server yet; use {allowed}")


def scan_ref(msg: pb.Scan) -> ScanRef:
    """Wire scan -> :class:`ScanRef` (bytes or digest, reading options)."""
    if msg.alignment == pb.ALIGNMENT_REGISTER:
        raise _not_built("scan.alignment ALIGNMENT_REGISTER (registration to the template)",
                         "ALIGNMENT_AUTO, ALIGNMENT_MNI or ALIGNMENT_CENTER")
    if msg.alignment not in _ALIGNMENT:
        raise InvalidOptionError(f"scan.alignment {msg.alignment} is unknown; allowed: {sorted(_ALIGNMENT)}")
    if msg.non_finite not in _NONFINITE:
        raise InvalidOptionError(f"scan.non_finite {msg.non_finite} is unknown; allowed: {sorted(_NONFINITE)}")
    source = msg.WhichOneof("source")
    if source == "dicom":
        raise _not_built("scan.dicom (DICOM series input)", "scan.data with a NIfTI-1/-2 or MGH file, or scan.digest")
    return ScanRef(
        data=msg.data if source == "data" else None,
        digest=msg.digest if source == "digest" else None,
        volume_index=msg.volume_index if msg.HasField("volume_index") else None,
        alignment=_ALIGNMENT[msg.alignment],
        nonfinite=_NONFINITE[msg.non_finite],
    )


def _method(m: MethodInfo) -> pb.MethodInfo:
    return pb.MethodInfo(
        name=m.name,
        description=m.description,
        options=[pb.OptionInfo(name=o.name, type=o.type, default=o.default, allowed=o.allowed,
                               description=o.description) for o in m.options],
    )


def model_info(info: ModelInfo) -> pb.ModelInfo:
    msg = pb.ModelInfo(
        name=info.name,
        version=info.version,
        task=info.task,
        classes=list(info.classes),
        grid_shape=list(info.grid_shape),
        grid_affine=list(info.grid_affine),
        voxel_mm=list(info.voxel_mm),
        weights_sha256=info.weights_sha256,
        layers=[pb.LayerInfo(name=l.name, channels=l.channels, shape=list(l.shape)) for l in info.layers],
        attribution_methods=[_method(m) for m in info.attribution_methods],
        visualization_presets=[_method(m) for m in info.visualization_presets],
        notice=NOTICE,
    )
    if info.held_out_accuracy is not None:
        msg.held_out_accuracy = info.held_out_accuracy
    return msg


def response_info(model: str, version: str, cached: bool, scan_digest: str = "") -> pb.ResponseInfo:
    return pb.ResponseInfo(model=model, model_version=version, cached=cached, notice=NOTICE, scan_digest=scan_digest)


def _refuse_dicom_results(msg: pb.PredictRequest | pb.AttributeRequest) -> None:
    if msg.return_dicom:
        raise _not_built("return_dicom (DICOM result objects)", "the NIfTI map and the summary in the response")
    if msg.deidentify:
        raise _not_built("deidentify (de-identified DICOM results)", "return_dicom unset")


def predict_request(msg: pb.PredictRequest) -> tuple[str, ScanRef]:
    _refuse_dicom_results(msg)
    return msg.model, scan_ref(msg.scan)


def predict_response(result: PredictResult, cached: bool, digest: str) -> pb.PredictResponse:
    return pb.PredictResponse(
        info=response_info(result.model, result.model_version, cached, digest),
        logits=list(result.logits),
        probabilities=dict(result.probabilities),
        predicted_class=result.predicted_class,
    )


def attribute_fields(msg: pb.AttributeRequest) -> dict[str, object]:
    """Everything of an AttributeRequest except the scan (resolved by the core)."""
    _refuse_dicom_results(msg)
    if msg.dicom_extras:
        raise _not_built("dicom_extras (Segmentation and Secondary Capture results)", "no dicom_extras")
    return {"model": msg.model, "method": msg.method, "target": msg.target, "options": dict(msg.options),
            "png": msg.png}


def attribute_response(result: AttributeResult, cached: bool, digest: str) -> pb.AttributeResponse:
    return pb.AttributeResponse(
        info=response_info(result.model, result.model_version, cached, digest),
        method=result.method,
        target=result.target,
        nifti=result.nifti,
        png=result.png,
        summary=pb.AttributionSummary(
            total_positive=result.total_positive,
            total_negative=result.total_negative,
            clusters=[pb.Cluster(peak_mm=list(c.peak_mm), center_mm=list(c.center_mm), voxels=c.voxels,
                                 volume_mm3=c.volume_mm3, relevance=c.relevance) for c in result.clusters],
            json=result.summary_json,
        ),
    )


def visualize_fields(msg: pb.VisualizeRequest) -> dict[str, object]:
    """Everything of a VisualizeRequest except the scan (resolved by the core)."""
    if msg.start not in _STARTS:
        raise InvalidOptionError(f"start {msg.start!r} is unknown; allowed: {[k.value for k in StartKind]}")
    return {"model": msg.model, "target": msg.target, "preset": msg.preset or DEFAULT_PRESET, "steps": msg.steps,
            "seed": msg.seed, "start": _STARTS[msg.start], "options": dict(msg.options),
            "preview_every": msg.preview_every, "png": msg.png}


def visualize_progress(job_id: str, p: Progress) -> pb.VisualizeEvent:
    return pb.VisualizeEvent(
        job_id=job_id,
        progress=pb.VisualizeProgress(step=p.step, steps=p.steps, objective=p.objective, preview_png=p.preview_png),
    )


def visualize_result(job_id: str, result: VisualizeResult, cached: bool, digest: str) -> pb.VisualizeEvent:
    return pb.VisualizeEvent(
        job_id=job_id,
        result=pb.VisualizeResult(
            info=response_info(result.model, result.model_version, cached, digest),
            nifti=result.nifti,
            native_nifti=result.native_nifti,
            png=result.png,
            objective_curve=list(result.objective_curve),
        ),
    )


__all__ = [
    "AttributeRequest",
    "PredictRequest",
    "VisualizeRequest",
    "attribute_fields",
    "attribute_response",
    "model_info",
    "predict_request",
    "predict_response",
    "scan_ref",
    "visualize_fields",
    "visualize_progress",
    "visualize_result",
]
