"""TorchServe backend: Predict latency and throughput, side by side in one run.

Latency (sequential, cache off, p50/p95 over ``N`` requests, each on a distinct scan):

- ``gateway_torchserve``: NeuroExplain.Predict through the gRPC gateway -> TorchServe gRPC -> custom handler;
- ``stock_rest``: TorchServe's stock REST ``POST /predictions/lesion`` with the same handler and the same payload
  (what a client would do without the gateway) — the baseline;
- ``gateway_inprocess``: NeuroExplain.Predict through the gateway with the in-process backend.

Throughput (requests/s through the gateway -> TorchServe at 1, 4 and 16 concurrent clients), with TorchServe
batching off (batch size 1) and on (batch size 8, 10 ms delay); one worker in both, so only batching differs.

Ratios: ``gateway_torchserve / stock_rest`` (target <= 1: the typed gRPC path no slower than stock REST) and
``batched / unbatched`` throughput. Bounded: ~5 min on 2 CPU cores. Model: the bundled ``lesion`` (80x96x80).
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import p50, p95, save

N = int(os.environ.get("BENCH_TS_N", "30"))
CLIENTS = (1, 4, 16)
MODEL = "lesion"


def _scans(count: int) -> list[bytes]:
    """Distinct scans (so neither singleflight nor the cache merges requests): one sample, rescaled per index."""
    from neuroexplain.synthetic import Task, make_sample
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import nifti_bytes

    image = make_sample(Task.LESION, 1_000_001).image
    return [nifti_bytes(image * (1.0 + 1e-3 * i), MNI_2MM.affine) for i in range(count)]


def _gateway(backend: Any) -> tuple[Any, Any]:
    from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
    from service.config import Settings
    from service.server import create_server

    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, cache="none",
                        max_concurrency=16, max_queue=64)
    gateway, port = create_server(settings, backend)
    gateway.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[*settings.grpc_options, ("grpc.enable_http_proxy", 0)])
    return gateway, pb_grpc.NeuroExplainStub(channel)


def _predict_fn(stub: Any) -> Any:
    from neuroexplain._proto import neuroexplain_pb2 as pb

    def call(scan: bytes) -> None:
        stub.Predict(pb.PredictRequest(model=MODEL, scan=pb.Scan(data=scan)), timeout=120)

    return call


def _rest_fn(backend: Any) -> Any:
    import requests

    from handlers import envelope as env
    from service.backend import Operation, PredictRequest, ScanInput

    url = f"{backend.supervisor.endpoints.rest_inference}/predictions/{MODEL}"
    session = requests.Session()
    session.trust_env = False  # loopback: no proxies

    def call(scan: bytes) -> None:
        request = PredictRequest(MODEL, ScanInput(data=scan, digest=hashlib.sha256(scan).hexdigest()))
        fields = env.encode_request(Operation.PREDICT, request)
        response = session.post(url, files={k: (None, v) for k, v in fields.items()}, timeout=120)
        response.raise_for_status()
        env.raise_if_error(env.decode(response.content))

    return call


def _latency(call: Any, scans: list[bytes]) -> dict[str, float]:
    call(scans[-1])  # warm-up
    times = []
    for scan in scans[:N]:
        t0 = time.perf_counter()
        call(scan)
        times.append(time.perf_counter() - t0)
    return {"p50_ms": round(p50(times) * 1e3, 1), "p95_ms": round(p95(times) * 1e3, 1), "n": len(times)}


def _throughput(call: Any, scans: list[bytes], clients: int) -> float:
    total = max(8, 2 * clients)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, scans[:clients]))  # warm-up: one per client
        t0 = time.perf_counter()
        list(pool.map(call, [scans[i % len(scans)] for i in range(total)]))
        return round(total / (time.perf_counter() - t0), 2)


def _torchserve_backend(store: Path) -> Any:
    from service.backends.torchserve import TorchServeBackend
    from service.config import Settings

    backend = TorchServeBackend(Settings(model_store=store), build_archives=False)
    backend.start()
    return backend


def main() -> None:
    import torch

    from handlers.archive import ArchiveConfig, build_archive
    from neuroexplain.models.registry import _model_folders
    from service.backends.inprocess import InProcessBackend

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    folder = _model_folders(())[MODEL]
    scans = _scans(max(N, 2 * max(CLIENTS)) + 1)
    result: dict[str, Any] = {"model": MODEL, "device": "cpu", "cpus": os.cpu_count(), "machine": platform.node(),
                              "latency": {}, "throughput_rps": {}}
    with tempfile.TemporaryDirectory(prefix="nx-bench-ts-") as tmp:
        for label, batch in (("unbatched", 1), ("batched", 8)):
            store = Path(tmp) / label
            store.mkdir()
            build_archive(folder / "spec.json", folder / "weights.pt", store / f"{MODEL}.mar",
                          config=ArchiveConfig(batch_size=batch, max_batch_delay_ms=10))
            backend = _torchserve_backend(store)
            gateway, stub = _gateway(backend)
            try:
                predict = _predict_fn(stub)
                if label == "unbatched":
                    result["latency"]["gateway_torchserve"] = _latency(predict, scans)
                    result["latency"]["stock_rest"] = _latency(_rest_fn(backend), scans)
                result["throughput_rps"][label] = {str(c): _throughput(predict, scans, c) for c in CLIENTS}
            finally:
                gateway.stop(None).wait()
                gateway.close()
                backend.close()
    inprocess = InProcessBackend()
    inprocess.start()
    gateway, stub = _gateway(inprocess)
    try:
        result["latency"]["gateway_inprocess"] = _latency(_predict_fn(stub), scans)
    finally:
        gateway.stop(None).wait()
        gateway.close()
    lat = result["latency"]
    result["ratios"] = {
        "gateway_torchserve_vs_stock_rest_p50": round(lat["gateway_torchserve"]["p50_ms"] / lat["stock_rest"]["p50_ms"], 3),
        "gateway_torchserve_vs_stock_rest_p95": round(lat["gateway_torchserve"]["p95_ms"] / lat["stock_rest"]["p95_ms"], 3),
        "gateway_torchserve_vs_inprocess_p50": round(lat["gateway_torchserve"]["p50_ms"] / lat["gateway_inprocess"]["p50_ms"], 3),
        "batched_vs_unbatched_at_16": round(
            result["throughput_rps"]["batched"]["16"] / result["throughput_rps"]["unbatched"]["16"], 3
        ),
    }
    result["scan_bytes"] = int(np.mean([len(s) for s in scans]))
    save("torchserve", result)


if __name__ == "__main__":
    main()
