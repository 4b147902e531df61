"""Converters between the wire types (``neuroexplain.v1`` protobuf) and the serving types
(:mod:`neuroexplain.serving.types`).

They live here, beside the generated stubs, so that neither the core nor the library ever imports ``*_pb2``. They
check the wire shape only (enum values, field presence) and convert every field, wave-2 ones included; the core
validates meaning, and a feature not built yet is refused (UNIMPLEMENTED, naming it) where it would run.
"""

from __future__ import annotations

from collections.abc import Sequence

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain.errors import InvalidOptionError
from neuroexplain.serving.types import (
    NOTICE,
    Alignment,
    AttributeResult,
    DicomObject,
    InputCheck,
    MethodInfo,
    ModelInfo,
    NonFinite,
    PredictResult,
    Progress,
    Registration,
    StartKind,
    VisualizeResult,
)
from service.core import ScanRef

ALIGNMENT_FROM_WIRE = {
    pb.ALIGNMENT_UNSPECIFIED: Alignment.AUTO,
    pb.ALIGNMENT_AUTO: Alignment.AUTO,
    pb.ALIGNMENT_MNI: Alignment.MNI,
    pb.ALIGNMENT_CENTER: Alignment.CENTER,
    pb.ALIGNMENT_REGISTER: Alignment.REGISTER,
}
ALIGNMENT_TO_WIRE = {a: w for w, a in ALIGNMENT_FROM_WIRE.items() if w != pb.ALIGNMENT_UNSPECIFIED}
NONFINITE_FROM_WIRE = {pb.NON_FINITE_UNSPECIFIED: NonFinite.REJECT, pb.NON_FINITE_REJECT: NonFinite.REJECT,
                       pb.NON_FINITE_ZERO: NonFinite.ZERO}
_STARTS = {"": StartKind.NOISE, **{k.value: k for k in StartKind}}
DEFAULT_PRESET = "robust"


def scan_ref(msg: pb.Scan) -> ScanRef:
    """Wire scan -> :class:`ScanRef` (bytes, DICOM instances or digest; reading options)."""
    if msg.alignment not in ALIGNMENT_FROM_WIRE:
        raise InvalidOptionError(f"scan.alignment {msg.alignment} is unknown; allowed: {sorted(ALIGNMENT_FROM_WIRE)}",
                                 field="scan.alignment")
    if msg.non_finite not in NONFINITE_FROM_WIRE:
        raise InvalidOptionError(f"scan.non_finite {msg.non_finite} is unknown; allowed: {sorted(NONFINITE_FROM_WIRE)}",
                                 field="scan.non_finite")
    source = msg.WhichOneof("source")
    return ScanRef(
        data=msg.data if source == "data" else None,
        digest=msg.digest if source == "digest" else None,
        instances=tuple(msg.dicom.instances) if source == "dicom" else None,
        series_uid=msg.dicom.series_instance_uid if source == "dicom" else "",
        volume_index=msg.volume_index if msg.HasField("volume_index") else None,
        alignment=ALIGNMENT_FROM_WIRE[msg.alignment],
        nonfinite=NONFINITE_FROM_WIRE[msg.non_finite],
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
        evaluation=info.evaluation,
        spec_sha256=info.spec_sha256,
        temperature=info.temperature,
        has_feature_statistics=info.has_feature_statistics,
    )
    if info.held_out_accuracy is not None:
        msg.held_out_accuracy = info.held_out_accuracy
    return msg


def response_info(model: str, version: str, cached: bool, scan_digest: str = "",
                  alignment: Alignment | None = None) -> pb.ResponseInfo:
    return pb.ResponseInfo(model=model, model_version=version, cached=cached, notice=NOTICE, scan_digest=scan_digest,
                           alignment=ALIGNMENT_TO_WIRE.get(alignment, pb.ALIGNMENT_UNSPECIFIED)  # type: ignore[arg-type]
                           if alignment is not None else pb.ALIGNMENT_UNSPECIFIED)


def input_check(check: InputCheck | None) -> pb.InputCheck | None:
    if check is None:
        return None
    return pb.InputCheck(in_distribution=check.in_distribution, score=check.score, threshold=check.threshold,
                         reason=check.reason, checks=list(check.checks))


def registration(reg: Registration | None) -> pb.Registration | None:
    if reg is None:
        return None
    return pb.Registration(metric=reg.metric, seconds=reg.seconds, transform=list(reg.transform))


def dicom_objects(objects: Sequence[DicomObject]) -> list[pb.DicomObject]:
    return [pb.DicomObject(sop_class_uid=o.sop_class_uid, sop_instance_uid=o.sop_instance_uid,
                           series_instance_uid=o.series_instance_uid, data=o.data) for o in objects]


def predict_fields(msg: pb.PredictRequest) -> dict[str, object]:
    """Everything of a PredictRequest except the scan (resolved by the core)."""
    return {"model": msg.model, "return_dicom": msg.return_dicom, "deidentify": msg.deidentify}


def predict_response(result: PredictResult, cached: bool, digest: str,
                     dicom: Sequence[DicomObject] = ()) -> pb.PredictResponse:
    return pb.PredictResponse(
        info=response_info(result.model, result.model_version, cached, digest, result.alignment),
        logits=list(result.logits),
        probabilities=dict(result.probabilities),
        predicted_class=result.predicted_class,
        input_check=input_check(result.input_check),
        registration=registration(result.registration),
        dicom=dicom_objects(dicom),
    )


def attribute_fields(msg: pb.AttributeRequest) -> dict[str, object]:
    """Everything of an AttributeRequest except the scan (resolved by the core)."""
    return {"model": msg.model, "method": msg.method, "target": msg.target, "options": dict(msg.options),
            "png": msg.png, "return_dicom": msg.return_dicom, "dicom_extras": tuple(msg.dicom_extras),
            "deidentify": msg.deidentify}


def attribute_response(result: AttributeResult, cached: bool, digest: str,
                       dicom: Sequence[DicomObject] = ()) -> pb.AttributeResponse:
    return pb.AttributeResponse(
        info=response_info(result.model, result.model_version, cached, digest, result.alignment),
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
        input_check=input_check(result.input_check),
        registration=registration(result.registration),
        dicom=dicom_objects(dicom),
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
