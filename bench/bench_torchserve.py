"""TorchServe backend: Predict latency and throughput, side by side in one run.

Latency (cache off, p50/p95 over ``N`` requests, each on a distinct scan):

- ``gateway_torchserve``: NeuroExplain.Predict through the gRPC gateway -> TorchServe gRPC -> custom handler;
- ``stock_rest``: TorchServe's stock REST ``POST /predictions/lesion`` with the same handler and the same payload
  (what a client would do without the gateway) — the baseline;
- ``stock_grpc``: TorchServe's own gRPC ``Predictions`` with the same handler and payload (no gateway), the
  baseline whenever stock REST cannot answer (``stock_rest_problem`` says why);
- ``gateway_inprocess``: NeuroExplain.Predict through the gateway with the in-process backend.

The TorchServe paths are measured interleaved (one call of each per scan, in rotating order), so a change of machine
load affects them alike. ``gateway_parts_ms`` profiles what the gateway adds per request (median over the scans).

Throughput (requests/s through the gateway -> TorchServe at 1, 4 and 16 concurrent clients), with TorchServe
batching off (batch size 1) and on (batch size 8, 10 ms delay), one worker in both, so only batching differs; and
unbatched with two workers (``two_workers``: one scan decodes in one worker while the other computes).

CPU budget (``cpu_budget``): user + sys CPU seconds per Predict of the gateway (this process), TorchServe's Java
frontend and its workers, read from /proc over a single-client run of distinct scans; ``cores / that`` is the rate
the cores allow, and ``unbatched_at_16_vs_rate_the_cores_allow`` the 16-client throughput over it (target >= 0.85).
Each throughput figure is over ``max(40, 10 x clients)`` requests (160 at 16 clients), so that the fill and the drain
of the pipeline are a small part of it; ``under_load`` gives, per setting at 16 clients, the same CPU per Predict
under load and the fraction of the machine's cores busy meanwhile — where a ratio below 1 goes (cores left idle, or
each request costing more CPU under load than alone). ``two_workers_rounds``: the target for two workers measured
in three rounds on their TorchServe, each round a single-client CPU budget and then the 16-client run, the ratio the
median over rounds (``two_workers_at_16_vs_rate_the_cores_allow``; the same 16-client figure over the one-worker
run's budget, minutes earlier, is kept beside it).

Ratios: ``gateway_torchserve / stock_rest`` (target <= 1: the typed gRPC path no slower than stock REST) and
``batched / unbatched`` throughput; ``paired``: medians over scans of the per-scan difference and ratio between two
interleaved paths (what a shared, loaded machine can still resolve). Bounded: ~5 min on 2 CPU cores. Model: the bundled ``lesion`` (80x96x80).

``--device cuda`` runs the same on the GPU (TorchServe hands its workers a ``gpu_id``, the handler then runs on
CUDA; the in-process backend too) and saves ``bench/out/torchserve_cuda.json`` with the card's name. Without a CUDA
build of torch or without a visible GPU it stops at once with exit code 2 and says which is missing. ``--device cpu``
(default) keeps TorchServe off any GPU (``number_of_gpu=0``).

    python -m bench.bench_torchserve --device cuda     # one command, a few minutes
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import p50, p95, save

N = int(os.environ.get("BENCH_TS_N", "60"))
CLIENTS = (1, 4, 16)
MODEL = "lesion"


def _scans(count: int) -> list[bytes]:
    """Distinct scans (so neither singleflight nor the cache merges requests): one sample, rescaled per index."""
    from neuroexplain.lab.synthetic import Task, make_sample
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import nifti_bytes

    image = make_sample(Task.LESION, 1_000_001).image
    return [nifti_bytes(image * (1.0 + 1e-3 * i), MNI_2MM.affine) for i in range(count)]


def _gateway(backend: Any) -> tuple[Any, Any]:
    from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
    from service.config import Settings
    from service.grpc.server import create_server

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

    from neuroexplain.serving import codec as env
    from neuroexplain.serving.types import Operation, PredictRequest, ScanInput

    url = f"{backend.supervisor.endpoints.rest_inference}/predictions/{MODEL}"
    session = requests.Session()
    session.trust_env = False  # loopback: no proxies

    def call(scan: bytes, timeout: float = 120) -> None:
        request = PredictRequest(MODEL, ScanInput(data=scan, digest=hashlib.sha256(scan).hexdigest()))
        fields = env.encode_request(Operation.PREDICT, request)
        headers = backend.supervisor.keys.header("inference") if backend.supervisor.keys else {}
        response = session.post(url, files={k: (None, v) for k, v in fields.items()}, headers=headers, timeout=timeout)
        response.raise_for_status()
        env.raise_if_error(env.decode(response.content))

    return call


REST_PROBE_TIMEOUT_S = 20.0


def _rest_answers(call: Any, scan: bytes) -> str:
    """"" when stock REST answers a Predict; else why not. The handler marks unary answers ``ts_stream_next: false``
    (for refused Visualize streams); TorchServe 0.12's REST job then treats the only answer as a stream's last one and
    sends the body without ever sending the response head, so the client waits until its timeout."""
    import requests

    try:
        call(scan, timeout=REST_PROBE_TIMEOUT_S)
    except requests.exceptions.ReadTimeout:
        return (f"stock REST gave no response within {REST_PROBE_TIMEOUT_S:.0f} s (the handler sets ts_stream_next=false "
                "on unary answers; TorchServe's REST job then never sends the response head)")
    return ""


def _stock_grpc_fn(backend: Any) -> Any:
    """TorchServe's own gRPC ``Predictions`` with the same payload and the inference key (no gateway in between)."""
    from neuroexplain.serving import codec as env
    from neuroexplain.serving.types import Operation, PredictRequest, ScanInput
    from service.backends.torchserve_proto import load

    pb2, pb2_grpc = load()
    channel = grpc.insecure_channel(backend.supervisor.endpoints.grpc_inference,
                                    options=[("grpc.max_send_message_length", 1 << 30),
                                             ("grpc.max_receive_message_length", 1 << 30),
                                             ("grpc.enable_http_proxy", 0)])  # fmt: skip
    stub = pb2_grpc.InferenceAPIsServiceStub(channel)

    def call(scan: bytes) -> None:
        request = PredictRequest(MODEL, ScanInput(data=scan, digest=hashlib.sha256(scan).hexdigest()))
        fields = env.encode_request(Operation.PREDICT, request)
        reply = stub.Predictions(pb2.PredictionsRequest(model_name=MODEL, input=fields), timeout=120,
                                 metadata=backend.supervisor.inference_metadata())
        env.raise_if_error(env.decode(reply.prediction))

    return call


def _summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(p50(times) * 1e3, 1), "p95_ms": round(p95(times) * 1e3, 1), "n": len(times)}


def _latency(calls: dict[str, Any], scans: list[bytes], raw: dict[str, list[float]] | None = None) -> dict[str, dict[str, float]]:
    """Each call once per scan; with several calls, interleaved in rotating order (load drift hits all alike).
    ``raw`` receives every call's times, in scan order (for paired comparisons)."""
    names = list(calls)
    for name in names:
        calls[name](scans[-1])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, scan in enumerate(scans[:N]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            calls[name](scan)
            times[name].append(time.perf_counter() - t0)
    if raw is not None:
        raw.update(times)
    return {name: _summary(t) for name, t in times.items()}


def _paired(raw: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """Median over scans of a's time minus (and over) b's time for the same scan, measured back to back: robust to
    the load drift that moves p50s of separate runs on a shared machine."""
    pairs = list(zip(raw[a], raw[b], strict=True))
    return {"median_diff_ms": round(statistics.median(x - y for x, y in pairs) * 1e3, 1),
            "median_ratio": round(statistics.median(x / y for x, y in pairs), 3)}  # fmt: skip


def _gateway_parts(scans: list[bytes]) -> dict[str, float]:
    """What the gateway does per Predict besides forwarding, timed alone (median ms over the scans)."""
    from neuroexplain._proto import neuroexplain_pb2 as pb
    from neuroexplain.serving import codec as env
    from neuroexplain.serving.types import Operation, PredictRequest, ScanInput
    from neuroexplain.volumes import ScanLimits, read_scan
    from service.backends.torchserve_proto import load

    pb2, _ = load()

    def median_ms(fn: Any) -> float:
        times = []
        for scan in scans[:N]:
            t0 = time.perf_counter()
            fn(scan)
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1e3, 2)

    def forward(scan: bytes) -> None:
        fields = env.encode_request(Operation.PREDICT, PredictRequest(MODEL, ScanInput(scan, "0" * 64)))
        pb2.PredictionsRequest(model_name=MODEL, input=fields).SerializeToString()

    return {
        "parse_client_request": median_ms(lambda s: pb.PredictRequest.FromString(
            pb.PredictRequest(model=MODEL, scan=pb.Scan(data=s)).SerializeToString())),
        "sha256": median_ms(lambda s: hashlib.sha256(s).hexdigest()),
        # Never done by the gateway: scans are decoded once, where the model runs (here: the worker).
        "decode_scan_skipped": median_ms(lambda s: read_scan(s, limits=ScanLimits())),
        "encode_for_torchserve": median_ms(forward),
    }


def _cpu_seconds(pids: list[int]) -> float:
    """user + sys CPU seconds of these processes so far (from /proc/PID/stat; a process gone counts 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return total


def _processes(backend: Any) -> dict[str, list[int]]:
    """The pids whose CPU a Predict costs: this process (the gateway; the bench's client threads too, which only
    serialise requests), TorchServe's Java frontend and its worker processes."""
    import psutil

    java = backend.supervisor._proc.pid
    return {"gateway_and_client": [os.getpid()], "java": [java],
            "workers": [c.pid for c in psutil.Process(java).children(recursive=True)]}  # fmt: skip


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat (idle and iowait count as not busy)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def _timed_run(call: Any, work: list[bytes], clients: int, procs: dict[str, list[int]]) -> dict[str, Any]:
    """``work`` through ``clients`` concurrent callers: wall seconds, CPU ms per call of each process group, and the
    fraction of the machine's cores busy meanwhile (with anything else running on it)."""
    before = {k: _cpu_seconds(v) for k, v in procs.items()}
    busy0, total0 = _busy_jiffies()
    t0 = time.perf_counter()
    if clients == 1:
        for scan in work:
            call(scan)
    else:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(call, work))
    wall = time.perf_counter() - t0
    busy1, total1 = _busy_jiffies()
    per = {k: round((_cpu_seconds(v) - before[k]) / len(work) * 1e3, 2) for k, v in procs.items()}
    return {"requests": len(work), "seconds": round(wall, 2), "rps": round(len(work) / wall, 2),
            "cpu_ms_per_predict": per, "cpu_ms_per_predict_total": round(sum(per.values()), 2),
            "machine_busy_fraction": round((busy1 - busy0) / max(1, total1 - total0), 3)}


def _cpu_per_predict(call: Any, scans: list[bytes], backend: Any) -> dict[str, Any]:
    """CPU seconds per Predict over a single-client run (every scan twice, one after the other finished: nothing to
    merge; 80+ calls average out the Java frontend's garbage collections)."""
    run = _timed_run(call, [scans[i % len(scans)] for i in range(2 * len(scans))], 1, _processes(backend))
    per = {k: round(v / 1e3, 4) for k, v in run["cpu_ms_per_predict"].items()}
    total = sum(per.values())
    cores = os.cpu_count() or 1
    return {"cpu_s_per_predict": per, "cpu_s_per_predict_total": round(total, 4), "requests": run["requests"],
            "single_client_rps": run["rps"], "cores": cores,
            "rate_the_cores_allow_rps": round(cores / total, 2) if total else None}


THROUGHPUT_MIN_REQUESTS = 40
THROUGHPUT_REQUESTS_PER_CLIENT = 10  # 160 at 16 clients, 4-5 s here: the steady state, not the fill and drain


def _throughput(call: Any, scans: list[bytes], clients: int, backend: Any) -> dict[str, Any]:
    """Requests/s at ``clients`` concurrent callers, over enough requests that the pipeline's fill (every client's
    first request arriving at once) and drain (the last ones finishing while the rest of the machine idles) are a
    small part of the window; with the CPU per Predict and the machine's busy fraction meanwhile."""
    total = max(THROUGHPUT_MIN_REQUESTS, THROUGHPUT_REQUESTS_PER_CLIENT * clients)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, scans[:clients]))  # warm-up: one per client
    return _timed_run(call, [scans[i % len(scans)] for i in range(total)], clients, _processes(backend))


ROUNDS = 3


def _rounds_at_16(call: Any, scans: list[bytes], backend: Any) -> dict[str, Any]:
    """The throughput target measured in rounds on one TorchServe: each round the CPU budget over a single-client run,
    then the 16-client throughput right after it, so both see the same machine (on this shared machine the CPU per
    Predict drifts by +-20 % over minutes, the same amount for every process); the ratio is the median over rounds."""
    clients = max(CLIENTS)
    rounds = []
    for _ in range(ROUNDS):
        budget = _cpu_per_predict(call, scans, backend)
        load = _throughput(call, scans, clients, backend)
        rounds.append({"rate_the_cores_allow_rps": budget["rate_the_cores_allow_rps"],
                       "cpu_ms_per_predict_alone": round(budget["cpu_s_per_predict_total"] * 1e3, 2),
                       "rps": load["rps"], "cpu_ms_per_predict_under_load": load["cpu_ms_per_predict_total"],
                       "machine_busy_fraction": load["machine_busy_fraction"],
                       "ratio": round(load["rps"] / budget["rate_the_cores_allow_rps"], 3)})  # fmt: skip
    return {"clients": clients, "rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds)}


def _torchserve_backend(store: Path, device: str, workers: int = 1) -> Any:
    from service.backends.torchserve import TorchServeBackend
    from service.backends.torchserve_supervisor import EngineOptions
    from service.config import Settings

    settings = Settings(model_store=store)
    engine = EngineOptions(model_store=store, max_message_bytes=settings.max_message_bytes,
                           startup_timeout_s=settings.torchserve_startup_timeout_s,
                           number_of_gpu=None if device == "cuda" else 0, workers_per_model=workers)  # fmt: skip
    backend = TorchServeBackend(settings, engine=engine, build_archives=False)
    backend.start()
    worker = _worker_device(backend)
    if not worker.startswith(device):
        backend.close()
        raise SystemExit(f"bench torchserve: the TorchServe worker runs on {worker!r}, not on {device}")
    return backend


def _wait_workers(backend: Any, count: int, timeout_s: float = 180.0) -> None:
    """Until ``count`` workers of the model are READY (the backend is ready with the first one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if backend.ready_workers(MODEL) >= count:
            return
        time.sleep(0.5)
    raise SystemExit(f"bench torchserve: {count} workers of {MODEL} were not ready within {timeout_s:.0f} s")


def _worker_device(backend: Any) -> str:
    """The device the handler reported at start (its ``ready on DEVICE`` log line)."""
    for path in sorted((backend.supervisor.work_dir / "logs").glob("*")):
        for line in path.read_text(errors="replace").splitlines():
            if f"model {MODEL} " in line and " ready on " in line:
                return line.rsplit(" ready on ", 1)[1].strip()
    return "unknown"


def check_device(device: str) -> str:
    """The card's name for ``cuda`` (``cpu`` for cpu); exits with a clear message where CUDA cannot run."""
    import torch

    if device == "cpu":
        return "cpu"
    if torch.version.cuda is None:
        raise SystemExit(
            f"bench torchserve --device cuda: this torch ({torch.__version__}) is a CPU build; install the CUDA build "
            "of the same release: .venv/bin/pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0"
        )
    if not torch.cuda.is_available():
        raise SystemExit("bench torchserve --device cuda: torch sees no CUDA device (no GPU, or no NVIDIA driver)")
    return str(torch.cuda.get_device_name(0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_torchserve", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    args = parser.parse_args(argv)
    try:
        card = check_device(args.device)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    run(args.device, card)


def run(device: str, card: str) -> None:
    import torch

    from handlers.archive import ArchiveConfig, build_archive
    from neuroexplain.models.registry import model_folders
    from service.backends.inprocess import InProcessBackend

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    folder = model_folders(())[MODEL]
    scans = _scans(max(N, 2 * max(CLIENTS)) + 1)
    result: dict[str, Any] = {"model": MODEL, "device": device, "card": card, "cpus": os.cpu_count(),
                              "machine": platform.node(), "latency": {}, "throughput_rps": {},
                              "under_load": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nx-bench-ts-") as tmp:
        for label, batch, workers in (("unbatched", 1, 1), ("batched", 8, 1), ("two_workers", 1, 2)):
            store = Path(tmp) / label
            store.mkdir()
            build_archive(folder / "spec.json", folder / "weights.pt", store / f"{MODEL}.mar",
                          config=ArchiveConfig(batch_size=batch, max_batch_delay_ms=10, min_workers=workers,
                                               max_workers=workers))
            backend = _torchserve_backend(store, device, workers)
            _wait_workers(backend, workers)
            result["worker_device"] = _worker_device(backend)
            gateway, stub = _gateway(backend)
            try:
                predict = _predict_fn(stub)
                if label == "unbatched":
                    rest = _rest_fn(backend)
                    result["stock_rest_problem"] = _rest_answers(rest, scans[-1])
                    paths = {"gateway_torchserve": predict, "stock_grpc": _stock_grpc_fn(backend)}
                    if not result["stock_rest_problem"]:
                        paths["stock_rest"] = rest
                    raw: dict[str, list[float]] = {}
                    result["latency"].update(_latency(paths, scans, raw))
                    result["paired"] = {f"gateway_torchserve_vs_{b}": _paired(raw, "gateway_torchserve", b)
                                        for b in paths if b != "gateway_torchserve"}
                if label == "unbatched":
                    result["cpu_budget"] = _cpu_per_predict(predict, scans, backend)
                runs = {str(c): _throughput(predict, scans, c, backend) for c in CLIENTS}
                result["throughput_rps"][label] = {c: r["rps"] for c, r in runs.items()}
                result["under_load"][label] = runs[str(max(CLIENTS))]
                if label == "two_workers":
                    result["two_workers_rounds"] = _rounds_at_16(predict, scans, backend)
            finally:
                gateway.stop(None).wait()
                gateway.close()
                backend.close()
    inprocess = InProcessBackend(device=device)
    inprocess.start()
    gateway, stub = _gateway(inprocess)
    try:
        result["latency"].update(_latency({"gateway_inprocess": _predict_fn(stub)}, scans))
    finally:
        gateway.stop(None).wait()
        gateway.close()
    lat = result["latency"]
    result["ratios"] = {
        **{f"gateway_torchserve_vs_{b}_{q}": round(lat["gateway_torchserve"][f"{q}_ms"] / lat[b][f"{q}_ms"], 3)
           for b in ("stock_rest", "stock_grpc") if b in lat for q in ("p50", "p95")},
        "gateway_torchserve_vs_inprocess_p50": round(lat["gateway_torchserve"]["p50_ms"] / lat["gateway_inprocess"]["p50_ms"], 3),
        "unbatched_at_16_vs_rate_the_cores_allow": round(
            result["throughput_rps"]["unbatched"]["16"] / result["cpu_budget"]["rate_the_cores_allow_rps"], 3
        ),
        "two_workers_at_16_vs_rate_the_cores_allow": result["two_workers_rounds"]["median_ratio"],
        "two_workers_at_16_vs_rate_the_cores_allow_of_the_one_worker_run": round(
            result["throughput_rps"]["two_workers"]["16"] / result["cpu_budget"]["rate_the_cores_allow_rps"], 3
        ),
        "batched_vs_unbatched_at_16": round(
            result["throughput_rps"]["batched"]["16"] / result["throughput_rps"]["unbatched"]["16"], 3
        ),
    }
    result["scan_bytes"] = int(np.mean([len(s) for s in scans]))
    result["gateway_parts_ms"] = _gateway_parts(scans)
    save("torchserve" if device == "cpu" else f"torchserve_{device}", result)


if __name__ == "__main__":
    main()
