"""TorchServe throughput by worker count and OpenMP threads (README -> Benchmarks, "After the OpenMP fix"):
the bench's own gateway, scans and measurements (:mod:`bench.bench_torchserve`), one TorchServe per setting, the
settings in the order given, each: the CPU budget over a single-client run and req/s at 1, 4 and 16 clients.

    flock /tmp/neuroexplain-bench.lock .venv/bin/python -m bench.torchserve_threads

The default settings: two workers with two threads each, two workers with one thread each (what ``serve`` gives
two workers on two cores), one worker with one thread; ``OMP_NUM_THREADS`` set in the workers' environment.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_torchserve import MODEL, _cpu_per_predict, _gateway, _predict_fn, _scans, _throughput, _wait_workers

SETTINGS = (("2 workers x 2 threads", 2, "2"), ("2 workers x 1 thread", 2, "1"), ("1 worker x 1 thread", 1, "1"))


def main() -> dict[str, Any]:
    from handlers.archive import ArchiveConfig, build_archive
    from neuroexplain.models.registry import model_folders
    from service.backends.torchserve import TorchServeBackend
    from service.backends.torchserve_supervisor import EngineOptions
    from service.config import Settings

    scans = _scans(41)
    folder = model_folders(())[MODEL]
    out: dict[str, Any] = {}
    for label, workers, threads in SETTINGS:
        with tempfile.TemporaryDirectory(prefix="nx-bench-threads-") as tmp:
            store = Path(tmp)
            build_archive(folder / "spec.json", folder / "weights.pt", store / f"{MODEL}.mar",
                          config=ArchiveConfig(batch_size=1, min_workers=workers, max_workers=workers))
            settings = Settings(model_store=store)
            engine = EngineOptions(model_store=store, max_message_bytes=settings.max_message_bytes,
                                   startup_timeout_s=180, number_of_gpu=0, workers_per_model=workers,
                                   extra_env={"OMP_NUM_THREADS": threads})
            backend = TorchServeBackend(settings, engine=engine, build_archives=False)
            backend.start()
            _wait_workers(backend, workers)
            gateway, stub = _gateway(backend)
            try:
                call = _predict_fn(stub)
                for scan in scans[:4]:
                    call(scan)
                budget = _cpu_per_predict(call, scans, backend)
                rps = {str(c): _throughput(call, scans, c, backend)["rps"] for c in (1, 4, 16)}
                out[label] = {"throughput_rps": rps, "cpu_s_per_predict": budget["cpu_s_per_predict"],
                              "rate_the_cores_allow_rps": budget["rate_the_cores_allow_rps"],
                              "at_16_vs_rate_the_cores_allow": round(rps["16"] / budget["rate_the_cores_allow_rps"], 3)}
                print(label, json.dumps(out[label]), file=sys.stderr, flush=True)
            finally:
                gateway.stop(None).wait()
                gateway.close()
                backend.close()
    return out


if __name__ == "__main__":
    from bench.common import save

    save("torchserve_threads", main())
