"""Gateway benchmark: what the gRPC service costs on top of the library, what the cache saves, how it scales.

1. Predict over gRPC (in-process backend, cache off) against the library's own decode + preprocess + forward on the
   same 1 mm scan, p50 of each, in this run. Target: overhead <= 15 %.
2. Attribute (integrated gradients, defaults, scan by digest) served from the cache against computed (cache off).
   Target: hit >= 100x faster at p50.
3. Predict throughput and p95 latency at 1, 4 and 16 concurrent clients (cache off).
4. Peak RSS of each gateway process (VmHWM).

Gateways run as ``neuroexplain serve --backend inprocess`` subprocesses, as in production; the model is the bundled
``lesion`` (or ``NEUROEXPLAIN_BENCH_MODEL_DIR``, a folder holding a model folder, while it is being trained).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import one_mm_scan_bytes, p50, p95, save, timeit

MODEL = "lesion"
REPEAT = int(os.environ.get("NEUROEXPLAIN_BENCH_REPEAT", "7"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """``neuroexplain serve --backend inprocess`` in a subprocess (run from ``cwd``: another checkout's code)."""

    def __init__(self, cache_args: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "neuroexplain.cli.main", "serve", "--backend", "inprocess", "--host", "127.0.0.1",
             "--port", str(self.port), "--metrics-port", "-1", "--health-port", "-1", "--max-concurrency", "4",
             "--max-calls-per-caller", "0",  # one benchmark client opens up to 16 calls at once
             *cache_args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the gateway did not start")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def _model_env() -> dict[str, str]:
    env = {**os.environ, "NEUROEXPLAIN_AUDIT_LOG": "off"}
    extra = os.environ.get("NEUROEXPLAIN_BENCH_MODEL_DIR")
    if extra:
        env["NEUROEXPLAIN_MODEL_DIRS"] = extra
    return env


def main() -> dict[str, Any]:
    from neuroexplain.client import Client
    from neuroexplain.models import load_model
    from neuroexplain.predict import predict
    from neuroexplain.volumes import read_scan

    env = _model_env()
    if "NEUROEXPLAIN_MODEL_DIRS" in env:
        os.environ["NEUROEXPLAIN_MODEL_DIRS"] = env["NEUROEXPLAIN_MODEL_DIRS"]
    scan = one_mm_scan_bytes()
    model = load_model(MODEL)
    result: dict[str, Any] = {"model": MODEL, "model_version": model.spec.version, "scan_bytes": len(scan),
                              "repeat": REPEAT}

    uncached = Gateway(["--cache", "none"], env)
    try:
        with Client(f"127.0.0.1:{uncached.port}", timeout=600) as client:
            # 1. library (decode + preprocess + forward, in this process) and gRPC, interleaved so that both see
            # the same machine load
            library: list[float] = []
            remote: list[float] = []
            for i in range(REPEAT + 1):
                for fn, times in ((lambda: predict(model, [read_scan(scan)]), library),
                                  (lambda: client.predict(scan, model=MODEL), remote)):
                    t0 = time.perf_counter()
                    fn()
                    if i:  # the first round warms both up
                        times.append(time.perf_counter() - t0)
            result["predict"] = {
                "library_p50_s": p50(library), "grpc_p50_s": p50(remote),
                "overhead": p50(remote) / p50(library) - 1, "target_overhead": 0.15,
            }
            # 2a. Attribute computed every time (cache off), scan by digest as after a Predict
            digest = client.predict(scan, model=MODEL).info.scan_digest
            miss = timeit(lambda: client.attribute(model=MODEL, digest=digest, method="integrated_gradients"),
                          repeat=max(3, REPEAT // 2), warmup=0)
            # 3. throughput and p95 at 1, 4, 16 concurrent clients
            # Every request carries a different scan (same image, gzip header mtime differs), so that singleflight
            # and the scan store cannot share work between them.
            raw = gzip.decompress(scan)
            scaling = {}
            for clients in (1, 4, 16):
                total = max(6, clients * 2)
                latencies: list[float] = []
                scans = [gzip.compress(raw, compresslevel=1, mtime=1000 * clients + i) for i in range(total)]

                def one(i: int, latencies: list[float] = latencies, scans: list[bytes] = scans) -> None:
                    t0 = time.perf_counter()
                    client.predict(scans[i], model=MODEL)
                    latencies.append(time.perf_counter() - t0)

                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                    list(pool.map(one, range(total)))
                wall = time.perf_counter() - t0
                scaling[str(clients)] = {"requests": total, "throughput_per_s": total / wall,
                                         "p50_s": p50(latencies), "p95_s": p95(latencies)}
            result["concurrency"] = scaling
        result["peak_rss_mb_gateway_uncached"] = uncached.peak_rss_mb()
    finally:
        uncached.stop()

    with tempfile.TemporaryDirectory() as cache_dir:
        cached = Gateway(["--cache-dir", cache_dir], env)
        try:
            with Client(f"127.0.0.1:{cached.port}", timeout=600) as client:
                digest = client.predict(scan, model=MODEL).info.scan_digest
                first = client.attribute(model=MODEL, digest=digest, method="integrated_gradients")
                assert not first.info.cached
                hit = timeit(lambda: client.attribute(model=MODEL, digest=digest, method="integrated_gradients"),
                             repeat=REPEAT)
                result["attribute"] = {"method": "integrated_gradients", "miss_p50_s": p50(miss), "hit_p50_s": p50(hit),
                                       "speedup": p50(miss) / p50(hit), "target_speedup": 100,
                                       "map_bytes": len(first.nifti)}
            result["peak_rss_mb_gateway_cached"] = cached.peak_rss_mb()
        finally:
            cached.stop()
    return result


if __name__ == "__main__":
    save("gateway", main())
