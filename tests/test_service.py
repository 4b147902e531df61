"""End-to-end tests of the gateway: a real gRPC server on a free port, every interceptor installed, a tiny real model.

Every RPC; cache repeats with identical bytes; the digest path; singleflight; cancellation; deadlines; every error code
with its message; health; metrics.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_service_support are redefined as parameters)
from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import threading
from pathlib import Path
from typing import Any

import grpc
import nibabel as nib
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_service_support import (  # noqa: F401  (fixtures)
    TINY,
    TINY_GRID,
    GatedBackend,
    Running,
    backend,
    gated,
    gateway,
    make_scan,
    scan_msg,
    start_gateway,
    tiny_model_dir,
)

from neuroexplain import RESEARCH_NOTICE
from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain.models import load_model
from neuroexplain.precision import Precision
from neuroexplain.predict import predict
from neuroexplain.volumes import nifti_bytes, read_scan
from service.backends.inprocess import InProcessBackend
from service.grpc.server import SERVICE_NAME

SCAN = make_scan(0)
SLAB = nifti_bytes(np.pad(np.full((30, 36, 3), 100.0, np.float32), ((0, 0), (0, 0), (13, 14))),
                   np.diag([2.5, 2.5, 2.5, 1.0]))  # a slab: nothing for registration to align


def _image(nifti: bytes) -> Any:
    return nib.Nifti1Image.from_bytes(gzip.decompress(nifti))


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------------------------
# Every RPC


def test_list_and_get_model_describe_the_contract(gateway: Running) -> None:
    listed = gateway.stub.ListModels(pb.ListModelsRequest())
    assert listed.notice == RESEARCH_NOTICE
    assert [m.name for m in listed.models] == [TINY]
    info = gateway.stub.GetModel(pb.GetModelRequest(name=TINY))
    assert list(info.classes) == ["healthy", "lesion"]
    assert tuple(info.grid_shape) == TINY_GRID and list(info.voxel_mm) == [4.0, 4.0, 4.0]
    assert len(info.grid_affine) == 16 and len(info.weights_sha256) == 64
    assert [(layer.name, layer.channels) for layer in info.layers] == [(f"conv{i}", 2) for i in range(1, 5)]
    methods = {m.name: m for m in info.attribution_methods}
    assert "integrated_gradients" in methods and "gradcam" in methods
    n_steps = {o.name: o for o in methods["integrated_gradients"].options}["n_steps"]
    assert n_steps.default and n_steps.allowed and n_steps.description
    presets = {p.name: {o.name: o.default for o in p.options} for p in info.visualization_presets}
    assert presets["robust"]["param"] == "fourier" and presets["paper"]["param"] == "voxel"
    assert info.held_out_accuracy == 0.5 and info.notice == RESEARCH_NOTICE


def test_predict_matches_the_library_and_repeats_from_the_cache(gateway: Running, tiny_model_dir: Path) -> None:
    first = gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(SCAN)))
    expected = predict(load_model(TINY, model_dirs=(tiny_model_dir,)), [read_scan(SCAN)])[0]
    np.testing.assert_allclose(first.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert first.predicted_class == expected.predicted_class
    assert set(first.probabilities) == {"healthy", "lesion"}
    assert first.info.model == TINY and first.info.model_version == "0.1.0"
    assert first.info.notice == RESEARCH_NOTICE and not first.info.cached
    assert first.info.scan_digest == hashlib.sha256(SCAN).hexdigest()
    again = gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(SCAN)))
    assert again.info.cached
    assert list(again.logits) == list(first.logits) and dict(again.probabilities) == dict(first.probabilities)
    assert gateway.sample("neuroexplain_backend_duration_seconds_count", operation="predict", model=TINY) == 1
    assert gateway.sample("neuroexplain_cache_hits_total", operation="predict") == 1


def test_attribute_returns_a_map_on_the_scans_grid_and_repeats_byte_identical(gateway: Running) -> None:
    request = pb.AttributeRequest(model=TINY, scan=scan_msg(SCAN), method="gradient", target="lesion", png=True)
    first = gateway.stub.Attribute(request)
    scan = read_scan(SCAN)
    image = _image(first.nifti)
    assert image.shape == scan.shape
    np.testing.assert_allclose(image.affine, scan.affine, atol=1e-5)
    assert image.get_data_dtype() == np.float32
    assert first.method == "gradient" and first.target == "lesion"
    assert first.png[:8] == b"\x89PNG\r\n\x1a\n"
    assert first.summary.total_positive > 0 and first.summary.json
    assert not first.info.cached and first.info.notice == RESEARCH_NOTICE
    again = gateway.stub.Attribute(request)
    # a PNG overlay renders the scan itself: never cached (recomputed byte-identical instead)
    assert not again.info.cached
    assert again.nifti == first.nifti and again.png == first.png and again.summary == first.summary
    assert gateway.sample("neuroexplain_cache_hits_total", operation="attribute") == 0
    without_png = pb.AttributeRequest(model=TINY, scan=scan_msg(SCAN), method="gradient", target="lesion")
    assert not gateway.stub.Attribute(without_png).info.cached and gateway.stub.Attribute(without_png).info.cached
    # the same options spelled out at their defaults are the same computation
    plain = gateway.stub.Attribute(pb.AttributeRequest(model=TINY, scan=scan_msg(SCAN), method="gradcam"))
    spelled = gateway.stub.Attribute(pb.AttributeRequest(model=TINY, scan=scan_msg(SCAN), method="gradcam",
                                                         options={"relu": "true"}))
    assert not plain.info.cached and spelled.info.cached and spelled.nifti == plain.nifti


def test_a_scan_sent_once_is_explained_by_digest(gateway: Running) -> None:
    pred = gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(3))))
    by_digest = gateway.stub.Attribute(
        pb.AttributeRequest(model=TINY, scan=pb.Scan(digest=pred.info.scan_digest), method="gradient_x_input")
    )
    assert by_digest.info.scan_digest == pred.info.scan_digest
    assert _image(by_digest.nifti).shape == read_scan(make_scan(3)).shape
    with pytest.raises(grpc.RpcError) as unknown:
        gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(digest="ab" * 32)))
    assert _code(unknown.value) is grpc.StatusCode.NOT_FOUND and "send its bytes" in unknown.value.details()
    with pytest.raises(grpc.RpcError) as malformed:
        gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(digest="scan.nii.gz")))
    assert _code(malformed.value) is grpc.StatusCode.INVALID_ARGUMENT and "64 hex digits" in malformed.value.details()


def test_a_visualization_started_from_a_scan_is_never_cached(gateway: Running) -> None:
    """It starts as the patient's scan (preset none, few steps: nearly the scan itself), so no cache may hold it."""
    request = pb.VisualizeRequest(model=TINY, target="class:lesion", preset="none", steps=2, start="scan",
                                  scan=scan_msg(SCAN))
    for _ in range(2):
        (result,) = [e.result for e in gateway.stub.Visualize(request) if e.HasField("result")]
        assert not result.info.cached and result.native_nifti
    assert gateway.sample("neuroexplain_cache_hits_total", operation="visualize") == 0
    assert gateway.sample("neuroexplain_cache_misses_total", operation="visualize") == 0  # not even looked up


def test_visualize_streams_progress_then_the_result(gateway: Running) -> None:
    request = pb.VisualizeRequest(model=TINY, target="class:lesion", preset="none", steps=4, seed=1, png=True,
                                  preview_every=2)
    events = list(gateway.stub.Visualize(request))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == [1, 2, 3, 4] and all(p.steps == 4 for p in progress)
    # Previews at steps 2 and 4; a caller that falls behind may find step 2's dropped (only the newest event keeps
    # its PNG, so a slow reader cannot grow the gateway's memory), never the last one's.
    assert progress[3].preview_png[:4] == b"\x89PNG" and not progress[0].preview_png and not progress[2].preview_png
    assert progress[1].preview_png[:4] in (b"", b"\x89PNG")
    assert events[-1].HasField("result") and len({e.job_id for e in events}) == 1 and events[0].job_id
    result = events[-1].result
    assert _image(result.nifti).shape[:3] == TINY_GRID
    assert len(result.objective_curve) == 4 and result.png[:4] == b"\x89PNG"
    assert not result.info.cached and result.info.notice == RESEARCH_NOTICE
    assert gateway.sample("neuroexplain_visualize_steps_total", model=TINY) == 4
    again = list(gateway.stub.Visualize(request))
    assert len(again) == 1 and again[0].result.info.cached and again[0].result.nifti == result.nifti


# ---------------------------------------------------------------------------------------------------------------------
# Singleflight, cancellation, deadlines, limits


def test_concurrent_identical_calls_compute_once(gateway: Running, gated: GatedBackend) -> None:
    gated.gate.clear()
    n = 6
    request = pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(5)))
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(gateway.stub.Predict, request) for _ in range(n)]
        gateway.wait_for(lambda: gateway.sample("neuroexplain_singleflight_joins_total", operation="predict") == n - 1)
        gated.gate.set()
        results = [f.result(timeout=30) for f in futures]
    assert len({tuple(r.logits) for r in results}) == 1
    assert gateway.sample("neuroexplain_backend_duration_seconds_count", operation="predict", model=TINY) == 1
    assert gateway.sample("neuroexplain_requests_total", rpc="Predict", model=TINY, code="OK") == n


def test_a_scan_is_decoded_ahead_only_while_nothing_else_computes(
    gateway: Running, gated: GatedBackend, tiny_model_dir: Path
) -> None:
    # Idle: the core hints the backend to decode while it hashes; busy: no hint, the request decodes in its turn.
    first, second = make_scan(11), make_scan(12)
    gated.gate.clear()
    running = gateway.stub.Predict.future(pb.PredictRequest(model=TINY, scan=scan_msg(first)))
    assert gated.entered.acquire(timeout=20)
    queued = gateway.stub.Predict.future(pb.PredictRequest(model=TINY, scan=scan_msg(second)))
    assert gated.entered.acquire(timeout=20)
    gated.gate.set()
    answers = [running.result(timeout=30), queued.result(timeout=30)]
    assert gated.ahead == [hashlib.sha256(first).hexdigest()]
    # Decoded ahead or not, each answer is the library's on its own bytes.
    model = load_model(TINY, model_dirs=(tiny_model_dir,))
    for raw, answer in zip((first, second), answers, strict=True):
        np.testing.assert_allclose(answer.logits, predict(model, [read_scan(raw)])[0].logits, rtol=1e-5, atol=1e-6)


def test_a_shared_computation_survives_its_first_caller_leaving(gateway: Running, gated: GatedBackend) -> None:
    gated.gate.clear()
    request = pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(6)))
    leaving = gateway.stub.Predict.future(request)
    assert gated.entered.acquire(timeout=20)
    staying = gateway.stub.Predict.future(request)
    gateway.wait_for(lambda: gateway.sample("neuroexplain_singleflight_joins_total", operation="predict") == 1)
    leaving.cancel()
    gateway.wait_for(lambda: gateway.sample("neuroexplain_requests_total", rpc="Predict", model=TINY,
                                            code="CANCELLED") == 1)
    gated.gate.set()
    assert staying.result(timeout=30).predicted_class in ("healthy", "lesion")
    assert gateway.sample("neuroexplain_backend_duration_seconds_count", operation="predict", model=TINY) == 1


def test_cancelling_visualize_stops_the_optimisation_within_a_few_steps(gateway: Running, gated: GatedBackend) -> None:
    from torchserve_models import cancel_reports, next_cancel_report

    on_torchserve = not isinstance(gated.inner, InProcessBackend)
    before = cancel_reports(gated.inner, TINY, "visualize") if on_torchserve else {}
    gated.step_delay_s = 0.02
    stream = gateway.stub.Visualize(pb.VisualizeRequest(model=TINY, target="class:lesion", preset="none", steps=2000))
    seen = 0
    for event in stream:
        assert event.HasField("progress")
        seen = event.progress.step
        if seen >= 3:
            stream.cancel()
            break
    gateway.wait_for(lambda: gateway.sample("neuroexplain_computations_in_flight") == 0)
    done = gateway.sample("neuroexplain_visualize_steps_total", model=TINY)
    if on_torchserve:
        # A TorchServe worker runs ahead of the stream (the tiny model takes milliseconds a step, the test's delay
        # sleeps in the gateway), so the stream's steps do not say when it stopped; the worker reports the steps it
        # still ran after the gateway raised its cancel flag.
        after_flag = next_cancel_report(gated.inner, TINY, "visualize", before)
        assert after_flag <= 2, f"the worker ran {after_flag} steps after the cancel flag"
        assert seen <= done < 2000
    else:  # in process, the optimisation runs in step with the stream
        assert seen <= done <= seen + 3, f"optimisation ran {done} steps after the client left at step {seen}"
    assert gateway.sample("neuroexplain_backend_errors_total", operation="visualize", code="CANCELLED") == 1
    gateway.wait_for(lambda: gateway.sample("neuroexplain_requests_total", rpc="Visualize", model=TINY,
                                            code="CANCELLED") == 1)


def test_deadline_exceeded(gateway: Running, gated: GatedBackend) -> None:
    gated.gate.clear()
    with pytest.raises(grpc.RpcError) as exc:
        gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(7))), timeout=0.3)
    assert _code(exc.value) is grpc.StatusCode.DEADLINE_EXCEEDED
    gated.gate.set()
    gateway.wait_for(lambda: gateway.sample("neuroexplain_requests_total", rpc="Predict", model=TINY,
                                            code="DEADLINE_EXCEEDED") + gateway.sample(
        "neuroexplain_requests_total", rpc="Predict", model=TINY, code="CANCELLED") == 1)


def test_full_server_answers_resource_exhausted(gated: GatedBackend, tmp_path: Path) -> None:
    running = start_gateway(gated, tmp_path, max_concurrency=1, max_queue=0)
    try:
        gated.gate.clear()
        busy = running.stub.Predict.future(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(8))))
        assert gated.entered.acquire(timeout=20)
        with pytest.raises(grpc.RpcError) as exc:
            running.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(9))))
        assert _code(exc.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 running and 0 queued" in exc.value.details()
        assert running.sample("neuroexplain_rejected_requests_total", operation="predict") == 1
        gated.gate.set()
        assert busy.result(timeout=30).info.model == TINY
    finally:
        gated.gate.set()
        running.stop()


def test_the_queue_limit_is_the_cores_and_its_refusals_are_counted(gated: GatedBackend, tmp_path: Path) -> None:
    # 1 running + 64 queued fit; the 66th distinct computation is refused by the core (not by grpc's thread cap),
    # so the refusal carries the core's message and is counted.
    running = start_gateway(gated, tmp_path, max_concurrency=1, max_queue=64, workers=8)
    try:
        gated.gate.clear()
        waiting = [running.stub.Predict.future(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(100 + i))),
                                               timeout=120) for i in range(65)]
        assert gated.entered.acquire(timeout=20)
        running.wait_for(lambda: running.sample("neuroexplain_requests_in_flight", rpc="Predict") == 65, timeout=60)
        with pytest.raises(grpc.RpcError) as exc:
            running.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(99))), timeout=60)
        assert _code(exc.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 running and 64 queued" in exc.value.details()
        assert running.sample("neuroexplain_rejected_requests_total", operation="predict") == 1
        gated.gate.set()
        assert all(f.result(timeout=120).info.model == TINY for f in waiting)
    finally:
        gated.gate.set()
        running.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Errors: every code with its message


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.PredictRequest(model=TINY, scan=pb.Scan(data=b"not a scan at all")), "INVALID_ARGUMENT", "unrecognised"),
        (pb.PredictRequest(model=TINY), "INVALID_ARGUMENT", "scan is missing"),
        (pb.PredictRequest(scan=pb.Scan(data=SCAN)), "INVALID_ARGUMENT", "model is missing"),
        (pb.PredictRequest(model="nope", scan=pb.Scan(data=SCAN)), "NOT_FOUND", "served models: ['tiny']"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="magic"), "INVALID_ARGUMENT",
         "integrated_gradients"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="gradient", target="tumour"),
         "INVALID_ARGUMENT", "classes: ['healthy', 'lesion']"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="integrated_gradients",
                             options={"n_steps": "0"}), "INVALID_ARGUMENT", "n_steps"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="gradient", options={"bogus": "1"}),
         "INVALID_ARGUMENT", "has no option 'bogus'"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="gradcam", options={"layer": "conv9"}),
         "NOT_FOUND", "conv1"),
        (pb.VisualizeRequest(model=TINY, target="channel:conv1:7", steps=2), "INVALID_ARGUMENT", "channel"),
        (pb.VisualizeRequest(model=TINY, target="class:lesion", steps=100_000), "RESOURCE_EXHAUSTED", "at most"),
        (pb.VisualizeRequest(model=TINY, target="class:lesion", preset="glitter"), "INVALID_ARGUMENT", "robust"),
        # Wave-2 fields: each refusal names what is wrong and what is allowed.
        (pb.PredictRequest(model=TINY, scan=pb.Scan(dicom=pb.DicomSeries(instances=[b"x"]))), "INVALID_ARGUMENT",
         "no MR or CT image"),
        (pb.PredictRequest(model=TINY, scan=pb.Scan(data=SLAB, alignment=pb.ALIGNMENT_REGISTER)), "INVALID_ARGUMENT",
         "alignment=mni or center"),
        (pb.PredictRequest(model=TINY, scan=pb.Scan(data=SCAN, alignment=7)), "INVALID_ARGUMENT", "scan.alignment"),
        (pb.PredictRequest(model=TINY, scan=pb.Scan(data=SCAN), return_dicom=True), "INVALID_ARGUMENT",
         "needs a DICOM series input"),
        (pb.PredictRequest(model=TINY, scan=pb.Scan(data=SCAN), deidentify=True), "INVALID_ARGUMENT",
         "deidentify applies to DICOM results; set return_dicom"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="gradient", return_dicom=True),
         "INVALID_ARGUMENT", "needs a DICOM series input"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="gradient", dicom_extras=["seg"]),
         "INVALID_ARGUMENT", "dicom_extras applies to DICOM results"),
        (pb.VisualizeRequest(model=TINY, target="class:lesion", start="scan",
                             scan=pb.Scan(dicom=pb.DicomSeries(instances=[b"x"]))), "INVALID_ARGUMENT",
         "no MR or CT image"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_errors_map_to_codes_with_helpful_messages(gateway: Running, request_: Any, code: str, words: str) -> None:
    rpc = {pb.PredictRequest: gateway.stub.Predict, pb.AttributeRequest: gateway.stub.Attribute,
           pb.VisualizeRequest: lambda r: list(gateway.stub.Visualize(r))}[type(request_)]
    with pytest.raises(grpc.RpcError) as exc:
        rpc(request_)
    assert _code(exc.value).name == code, exc.value.details()
    assert words in exc.value.details()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="gradient", options={"bogus": "1"}),
         "options.bogus"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="magic"), "method"),
        (pb.AttributeRequest(model=TINY, scan=pb.Scan(data=SCAN), method="gradient", target="tumour"), "target"),
        (pb.PredictRequest(model=TINY), "scan"),
        (pb.PredictRequest(scan=pb.Scan(data=SCAN)), "model"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_refusals_name_the_wrong_field_in_a_bad_request_detail(gateway: Running, request_: Any, field: str) -> None:
    """google.rpc.Status details (grpcio-status): a program reads which field was wrong without parsing text."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    rpc = {pb.PredictRequest: gateway.stub.Predict, pb.AttributeRequest: gateway.stub.Attribute}[type(request_)]
    with pytest.raises(grpc.RpcError) as exc:
        rpc(request_)
    status = rpc_status.from_call(exc.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    [detail] = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    assert [v.field for v in bad.field_violations] == [field]
    assert bad.field_violations[0].description == exc.value.details()


def test_backend_down_is_unavailable_and_not_ready(gateway: Running, gated: GatedBackend) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    check = health_pb2.HealthCheckRequest
    assert health.Check(check(service=SERVICE_NAME)).status == health_pb2.HealthCheckResponse.SERVING
    gated.down = True
    gateway.server.update_health()
    assert health.Check(check(service=SERVICE_NAME)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health.Check(check(service="")).status == health_pb2.HealthCheckResponse.SERVING  # liveness
    assert gateway.sample("neuroexplain_backend_ready") == 0
    with pytest.raises(grpc.RpcError) as exc:
        gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(11))))
    assert _code(exc.value) is grpc.StatusCode.UNAVAILABLE and "retry" in exc.value.details()
    gated.down = False
    gateway.server.update_health()
    assert health.Check(check(service=SERVICE_NAME)).status == health_pb2.HealthCheckResponse.SERVING


def test_unexpected_errors_are_internal_without_details(gateway: Running, gated: GatedBackend,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    gated.fail_with = RuntimeError("secret path /data/patient-42.nii")
    with pytest.raises(grpc.RpcError) as exc:
        gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(12))))
    assert _code(exc.value) is grpc.StatusCode.INTERNAL
    assert "patient" not in exc.value.details() and "error id" in exc.value.details()
    error_id = exc.value.details().split("error id ")[1].split(")")[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


def test_oversized_messages_are_refused(gated: GatedBackend, tmp_path: Path) -> None:
    running = start_gateway(gated, tmp_path, max_message_bytes=4096)
    try:
        with pytest.raises(grpc.RpcError) as exc:
            running.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(SCAN)))
        assert _code(exc.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Reflection, disk cache across restarts


def test_reflection_lists_the_service(gateway: Running) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_disk_cache_survives_a_restart(gated: GatedBackend, tmp_path: Path) -> None:
    request = pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(13)))
    first = start_gateway(gated, tmp_path)
    try:
        assert not first.stub.Predict(request).info.cached
    finally:
        first.stop()
    second = start_gateway(gated, tmp_path)
    try:
        answer = second.stub.Predict(request)
        assert answer.info.cached
        assert second.sample("neuroexplain_backend_duration_seconds_count", operation="predict", model=TINY) == 0
        # the scan of a cached answer can still be referred to by digest
        by_digest = second.stub.Predict(pb.PredictRequest(model=TINY, scan=pb.Scan(digest=answer.info.scan_digest)))
        assert by_digest.logits == answer.logits
    finally:
        second.stop()


def test_request_threads_do_not_share_state(gateway: Running) -> None:
    """Different scans at once get their own answers (no per-request state on shared objects)."""
    scans = [make_scan(20 + i) for i in range(4)]
    expected = [gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(s))).logits for s in scans]
    barrier = threading.Barrier(4)

    def call(i: int) -> list[float]:
        barrier.wait()
        req = pb.AttributeRequest(model=TINY, scan=scan_msg(scans[i]), method="gradient")
        gateway.stub.Attribute(req)
        return list(gateway.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(scans[i]))).logits)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(call, range(4)))
    assert got == [list(e) for e in expected]


def test_progress_history_is_a_bounded_ring_with_one_preview() -> None:
    from neuroexplain.serving.types import Progress
    from service.core import PROGRESS_RING, Flight

    flight: Flight[object] = Flight(key="k")
    for step in range(1, 1001):
        flight.publish(Progress(step=step, steps=1000, objective=float(step), preview_png=b"png" * 1000))
    with flight.changed:
        late, seen = flight.events_after(0)
        caught_up, _ = flight.events_after(seen - 3)
    assert len(late) == PROGRESS_RING and late[-1].step == 1000 and late[0].step == 1000 - PROGRESS_RING + 1
    assert [e.step for e in caught_up] == [998, 999, 1000]
    assert sum(bool(e.preview_png) for e in late) == 1 and late[-1].preview_png


def test_served_reduced_precision_reaches_the_backend_and_has_its_own_cache_key(backend: Any, tmp_path: Path) -> None:
    """Both backends: the tiny model's spec holds a record (``test_service_support.TINY_PRECISION``) allowing float16
    for predict and gradient_x_input on the CPU, not for gradient. Two gateways share one disk cache."""
    plain = start_gateway(backend, tmp_path)
    half = start_gateway(backend, tmp_path, precision=Precision.FLOAT16)
    try:
        def run(g: Any) -> tuple[Any, ...]:
            p = g.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(SCAN)))
            maps = [g.stub.Attribute(pb.AttributeRequest(model=TINY, scan=scan_msg(SCAN), method=m))
                    for m in ("gradient_x_input", "gradient")]
            return p, maps[0], maps[1]

        p32, gradient_x_input32, gradient32 = run(plain)
        p16, gradient_x_input16, gradient16 = run(half)
        assert not (p16.info.cached or gradient_x_input16.info.cached)  # reduced results have their own cache keys
        assert list(p16.logits) != list(p32.logits)
        np.testing.assert_allclose(list(p16.logits), list(p32.logits), atol=1e-2)
        assert gradient_x_input16.nifti != gradient_x_input32.nifti
        assert gradient16.nifti == gradient32.nifti  # outside tolerance: float32, the same answer
        again = run(half)
        assert again[0].info.cached and list(again[0].logits) == list(p16.logits)
    finally:
        plain.stop()
        half.stop()
