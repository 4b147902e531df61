"""TorchServe behind the gateway, security: its loopback APIs want TorchServe's keys (which the gateway holds,
renews when they expire and re-reads when the key file changes), and patient-data hygiene: TorchServe's own logs
(access, model, worker, metrics; its whole working directory) and the results hold no header text or file name from
a scan, on success and on the error paths.

Needs Java 17 and TorchServe (a failure, not a skip, with ``CI=true``); one TorchServe start (~30-60 s), with keys
that expire after 12 s so that expiry happens during the module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import require_binary
from test_security_gateway import PATIENT, _Records, assert_no_patient, expand, identifying_scan
from torchserve_models import tiny_archive_store

from neuroexplain import errors
from neuroexplain.serving.types import Alignment, AttributeRequest, CallContext, PredictRequest, ScanInput

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]

EXPIRATION_MIN = 0.2  # TorchServe's keys live 12 s here (60 min by default)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from service.backends.torchserve import TorchServeBackend
    from service.config import Settings

    require_binary("java", "TorchServe needs Java 17")
    store = tiny_archive_store(tmp_path_factory.mktemp("ts-hygiene"))
    backend = TorchServeBackend(Settings(model_store=store, torchserve_startup_timeout_s=240.0,
                                         torchserve_token_expiration_min=EXPIRATION_MIN), build_archives=False)
    backend.start()
    try:
        yield backend
    finally:
        backend.close()


def test_torchserve_logs_and_results_hold_no_patient_data(torchserve: Any) -> None:
    raw = identifying_scan()
    assert PATIENT.encode() in expand(raw)
    scan = ScanInput(data=raw, digest=hashlib.sha256(raw).hexdigest(), alignment=Alignment.CENTER)
    logs = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(logs)
    try:
        predicted = torchserve.predict(PredictRequest("tinyles", scan), CallContext())
        attributed = torchserve.attribute(AttributeRequest("tinyles", scan, method="gradient", png=True),
                                          CallContext())
        # Error paths inside the worker: a bad option, and a header that breaks decoding after the name was read.
        with pytest.raises(errors.InvalidOptionError) as bad_option:
            torchserve.attribute(AttributeRequest("tinyles", scan, method="integrated_gradients",
                                                  options={"n_steps": "-3"}), CallContext())
        broken = raw[:-200]  # truncated gzip: the header (with the name) decodes, the data does not
        with pytest.raises(errors.NeuroExplainError) as truncated:
            torchserve.predict(PredictRequest("tinyles", ScanInput(broken, hashlib.sha256(broken).hexdigest(),
                                                                   alignment=Alignment.CENTER)), CallContext())
        ts_files = {p: p.read_bytes() for p in torchserve.supervisor.work_dir.rglob("*") if p.is_file()}
        ts_metrics = torchserve.supervisor.metrics_text()
    finally:
        root.removeHandler(logs)
        root.setLevel(old_level)

    assert predicted.predicted_class in ("healthy", "lesion")
    assert_no_patient(attributed.nifti, "the attribution NIfTI")
    assert_no_patient(attributed.png, "the attribution PNG")
    assert_no_patient(attributed.summary_json.encode(), "the attribution summary")
    for exc in (bad_option.value, truncated.value):
        assert_no_patient(str(exc).encode(), "an error message from a worker")
    logs_dir = [p for p in ts_files if "logs" in p.parts]
    assert logs_dir, "TorchServe wrote no logs; the check below would be empty"
    for path, blob in ts_files.items():
        if path.suffix in (".mar", ".pt"):
            continue
        assert_no_patient(path.name.encode(), f"a TorchServe file name ({path.name})")
        assert_no_patient(blob, f"TorchServe's {path.relative_to(torchserve.supervisor.work_dir)}")
    assert_no_patient(ts_metrics.encode(), "TorchServe's metrics")
    assert_no_patient("\n".join(logs.texts).encode(), "the gateway process's logs")


# ---------------------------------------------------------------------------------------------------------------------
# TorchServe's keys


def _key_file(backend: Any) -> dict[str, Any]:
    return json.loads((backend.supervisor.work_dir / "key_file.json").read_text())  # type: ignore[no-any-return]


def _http_status(url: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with NO_PROXY.open(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _grpc_predict_code(backend: Any, key: str | None) -> grpc.StatusCode:
    from google.protobuf import empty_pb2

    from service.backends.torchserve_proto import load

    _pb2, pb2_grpc = load()
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    with grpc.insecure_channel(backend.supervisor.endpoints.grpc_inference, options=[("grpc.enable_http_proxy", 0)]) as ch:
        try:
            pb2_grpc.InferenceAPIsServiceStub(ch).Ping(empty_pb2.Empty(), timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _grpc_management_code(backend: Any, key: str | None) -> grpc.StatusCode:
    from service.backends.torchserve_proto import load
    from service.gen.torchserve import management_pb2 as mpb2
    from service.gen.torchserve import management_pb2_grpc as mpb2_grpc

    load()  # generates the stubs if needed
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    with grpc.insecure_channel(backend.supervisor.endpoints.grpc_management,
                               options=[("grpc.enable_http_proxy", 0)]) as ch:
        try:
            mpb2_grpc.ManagementAPIsServiceStub(ch).ListModels(mpb2.ListModelsRequest(), timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_torchserve_apis_refuse_a_caller_without_the_key(torchserve: Any) -> None:
    ends = torchserve.supervisor.endpoints
    keys = _key_file(torchserve)
    # Without a key (or with a wrong one): refused, on every API and both protocols.
    for key in (None, "not-the-key"):
        assert _http_status(f"{ends.rest_inference}/ping", key) in (400, 401, 403)
        assert _http_status(f"{ends.management}/models", key) in (400, 401, 403)
        assert _grpc_predict_code(torchserve, key) is grpc.StatusCode.PERMISSION_DENIED
        assert _grpc_management_code(torchserve, key) is grpc.StatusCode.PERMISSION_DENIED
    # The API key renews keys but is no key to the inference or management APIs themselves.
    assert _http_status(f"{ends.management}/models", keys["API"]["key"]) in (400, 401, 403)
    # Control: the gateway's keys work (so the refusals above are about the key, not the calls).
    torchserve.supervisor.models()  # renews the management key if it has expired meanwhile
    keys = _key_file(torchserve)
    assert _http_status(f"{ends.management}/models", keys["management"]["key"]) == 200
    torchserve.supervisor.inference_metadata()
    assert _grpc_predict_code(torchserve, _key_file(torchserve)["inference"]["key"]) is grpc.StatusCode.OK


def _scan() -> ScanInput:
    from torchserve_models import scan_bytes

    raw = scan_bytes()
    return ScanInput(data=raw, digest=hashlib.sha256(raw).hexdigest(), alignment=Alignment.MNI)


def test_expired_keys_are_renewed_and_the_gateway_still_gets_answers(torchserve: Any) -> None:
    torchserve.predict(PredictRequest("tinyles", _scan()), CallContext())
    old = _key_file(torchserve)["inference"]
    give_up = time.monotonic() + 60 * EXPIRATION_MIN + 30
    while _grpc_predict_code(torchserve, old["key"]) is grpc.StatusCode.OK:  # wait for the expiry (not timed)
        assert time.monotonic() < give_up, "TorchServe's inference key never expired"
        time.sleep(1.0)
    renewals = torchserve.supervisor.keys.renewals
    result = torchserve.predict(PredictRequest("tinyles", _scan()), CallContext())
    assert result.predicted_class in ("healthy", "lesion")
    assert torchserve.supervisor.keys.renewals > renewals
    assert _key_file(torchserve)["inference"]["key"] != old["key"]


def test_a_key_torchserve_refuses_is_renewed_on_the_spot(torchserve: Any) -> None:
    # Someone rewrites the key file with a key TorchServe never issued, valid for a day: the gateway reads it (the
    # file changed), is refused (PERMISSION_DENIED), renews through the API key and retries: the caller sees nothing.
    path = torchserve.supervisor.work_dir / "key_file.json"
    doc = _key_file(torchserve)
    doc["inference"] = {"key": "bogus0000", "expiration time": "2099-01-01T00:00:00Z"}
    path.write_text(json.dumps(doc))
    renewals = torchserve.supervisor.keys.renewals
    result = torchserve.predict(PredictRequest("tinyles", _scan()), CallContext())
    assert result.predicted_class in ("healthy", "lesion")
    assert torchserve.supervisor.keys.renewals == renewals + 1
    assert _key_file(torchserve)["inference"]["key"] != "bogus0000"


def test_torchserve_gateway_with_redis_leaves_no_patient_data_in_redis_or_torchserve_logs(
        torchserve: Any, tmp_path: Any) -> None:
    # The whole path on this backend: the gateway (Redis result cache and encrypted scan store) in front of the
    # TorchServe above; afterwards every Redis key and value and every file TorchServe wrote are searched.
    from prometheus_client import CollectorRegistry
    from test_security_redis import _key_file, assert_redis_holds_no_scan_data, start_redis

    from neuroexplain._proto import neuroexplain_pb2 as pb
    from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
    from service.config import Settings
    from service.grpc.server import create_server
    from service.scans import RedisScanStore, make_scan_store

    redis_proc, redis_port = start_redis(tmp_path / "redis")
    url = f"redis://127.0.0.1:{redis_port}/0"
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, cache=url,
                        scan_store_key_file=str(_key_file(tmp_path / "scan.key", b"\x09" * 32)), workers=4,
                        model_store=torchserve.engine.model_store)
    logs = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(logs)
    gateway, port = create_server(settings, torchserve, registry=CollectorRegistry())
    if not isinstance(gateway.core.scans, RedisScanStore):  # until service/core.py uses make_scan_store
        gateway.core.scans = make_scan_store(settings, gateway.metrics)  # type: ignore[assignment]
    gateway.start()
    raw = identifying_scan()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.NeuroExplainStub(channel)
            scan = pb.Scan(data=raw, alignment=pb.ALIGNMENT_CENTER)
            first = stub.Predict(pb.PredictRequest(model="tinyles", scan=scan), timeout=120)
            by_digest = pb.Scan(digest=first.info.scan_digest, alignment=pb.ALIGNMENT_CENTER)
            attributed = stub.Attribute(pb.AttributeRequest(model="tinyles", scan=by_digest, method="gradient",
                                                            png=True), timeout=120)
            again = stub.Predict(pb.PredictRequest(model="tinyles", scan=scan), timeout=120)
        assert again.info.cached and attributed.info.scan_digest == first.info.scan_digest
        assert_redis_holds_no_scan_data(url, raw, expect_scan_store=True)
    finally:
        gateway.stop(None).wait()  # type: ignore[attr-defined]
        gateway.close()  # type: ignore[attr-defined]  (the core and its cache; the module's TorchServe stays)
        gateway.core.scans.close()
        root.removeHandler(logs)
        root.setLevel(old_level)
        redis_proc.terminate()
        redis_proc.wait(10)
    work_dir = torchserve.supervisor.work_dir
    files = [p for p in work_dir.rglob("*") if p.is_file() and p.suffix not in (".mar", ".pt")]
    assert any("logs" in p.parts for p in files)
    for path in files:
        assert_no_patient(path.name.encode(), f"a TorchServe file name ({path.name})")
        assert_no_patient(path.read_bytes(), f"TorchServe's {path.relative_to(work_dir)}")
    assert_no_patient("\n".join(logs.texts).encode(), "the gateway process's logs")


def test_concurrent_callers_share_one_renewal(torchserve: Any) -> None:
    # The key file says the inference key has expired: eight calls at once renew it once (a second renewal would
    # invalidate the key the first one fetched) and all are answered.
    import concurrent.futures

    path = torchserve.supervisor.work_dir / "key_file.json"
    doc = _key_file(torchserve)
    doc["inference"]["expiration time"] = "2000-01-01T00:00:00Z"
    path.write_text(json.dumps(doc))
    renewals = torchserve.supervisor.keys.renewals
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: torchserve.predict(PredictRequest("tinyles", _scan()), CallContext()),
                                range(8)))
    assert all(r.predicted_class in ("healthy", "lesion") for r in results)
    assert torchserve.supervisor.keys.renewals == renewals + 1
