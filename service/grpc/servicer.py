"""The gRPC servicer: wire -> domain, one core call, domain -> wire. Nothing else happens here.

Errors are raised (``neuroexplain.errors``) and mapped to status codes by ``service.grpc.status.ErrorInterceptor``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from neuroexplain.errors import InvalidOptionError, PermissionDeniedError
from neuroexplain.serving.types import NOTICE, AttributeRequest, PredictRequest, Progress, ScanInput, VisualizeRequest
from service.core import Caller, Core, ScanRef
from service.grpc import convert
from service.security import audit


def caller(context: grpc.ServicerContext) -> Caller:
    """The transport's view of the client: still there? deadline?"""
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    return Caller(is_active=context.is_active, deadline=deadline, add_done_callback=context.add_callback)


def owner(context: grpc.ServicerContext) -> str:
    """Who a scan sent in this call belongs to: the authenticated caller (token name or certificate subject), else the
    peer's address without its port (connections from one host share scans; without authentication nothing finer
    is known)."""
    record = audit.current()
    if record is not None and record.caller:
        return f"id:{record.caller}"
    peer = context.peer() or ""
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
    return f"peer:{host}"


def _resolve(core: Core, ref: ScanRef, context: grpc.ServicerContext, model: str) -> ScanInput:
    scan = core.resolve_scan(ref, owner(context), model)
    audit.annotate(scan_digest=scan.digest)  # the audit line names the scan by its digest, never by anything else
    return scan


def _annotate(model: str, digest: str | None) -> None:
    """Tell the audit log which model and scan digest a call used (never the scan itself)."""
    audit.annotate(model=model, scan_digest=digest)


def _authorize(model: str, op: str) -> None:
    """PERMISSION_DENIED when the caller's token does not allow ``op`` on ``model`` (tokens file grants)."""
    record = audit.current()
    grant = None if record is None else record.grant
    refusal = None if grant is None else grant.refusal(model, op)
    if refusal is not None:
        raise PermissionDeniedError(refusal)


def _require(value: str, field: str) -> None:
    if not value:
        raise InvalidOptionError(f"{field} is missing", field=field)


class NeuroExplainServicer(pb_grpc.NeuroExplainServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in self.core.models()], notice=NOTICE)

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        _require(request.name, "name")
        return convert.model_info(self.core.model(request.name))

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        _require(request.model, "model")
        _authorize(request.model, "predict")
        fields = convert.predict_fields(request)
        scan = _resolve(self.core, convert.scan_ref(request.scan), context, request.model)
        domain = PredictRequest(scan=scan, **fields)  # type: ignore[arg-type]
        result, cached = self.core.predict(domain, caller(context))
        self.core.remember_scan(owner(context), scan)  # only scans that validated are kept
        return convert.predict_response(result, cached, scan.digest, self.core.dicom_objects(domain, result))

    def Attribute(self, request: pb.AttributeRequest, context: grpc.ServicerContext) -> pb.AttributeResponse:
        _require(request.model, "model")
        _authorize(request.model, "attribute")
        fields = convert.attribute_fields(request)
        scan = _resolve(self.core, convert.scan_ref(request.scan), context, request.model)
        domain = AttributeRequest(scan=scan, **fields)  # type: ignore[arg-type]
        result, cached = self.core.attribute(domain, caller(context))
        audit.annotate(target=result.target)  # the class explained (the predicted one when none was named)
        self.core.remember_scan(owner(context), scan)
        return convert.attribute_response(result, cached, scan.digest, self.core.dicom_objects(domain, result))

    def Visualize(self, request: pb.VisualizeRequest, context: grpc.ServicerContext) -> Iterator[pb.VisualizeEvent]:
        _require(request.model, "model")
        _require(request.target, "target")
        _authorize(request.model, "visualize")
        fields = convert.visualize_fields(request)
        scan = (_resolve(self.core, convert.scan_ref(request.scan), context, request.model)
                if request.HasField("scan") else None)
        digest = scan.digest if scan is not None else ""
        _annotate(request.model, digest or None)
        for job_id, event in self.core.visualize(VisualizeRequest(scan=scan, **fields), caller(context)):  # type: ignore[arg-type]
            if isinstance(event, Progress):
                yield convert.visualize_progress(job_id, event)
            else:
                result, cached = event
                if scan is not None:
                    self.core.remember_scan(owner(context), scan)
                yield convert.visualize_result(job_id, result, cached, digest)
