"""The input check's cost on Predict: the same scans predicted with and without it, interleaved, in one process.

"without": decode, place, one forward pass. "with": the same plus the penultimate features of that pass (a forward
hook) and ``check_input`` (the four image checks and the feature distance) — what the serving runner does per scan.
Target (issue 18): p50 with ≤ 1.15 × p50 without. 1 mm scans from the held-out range, decoded from bytes each time.

    nice python -m bench.bench_inputcheck [--n 20] [--model lesion]
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import one_mm_scan_bytes, p50, p95, peak_rss_mb, save


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20, help="scans (distinct seeds of the held-out range)")
    p.add_argument("--model", default="lesion")
    args = p.parse_args(argv)

    from neuroexplain.inputcheck import check_input
    from neuroexplain.models import load_model
    from neuroexplain.predict import predict_arrays, prepare
    from neuroexplain.volumes import Alignment, read_scan

    model = load_model(args.model)
    scans = [one_mm_scan_bytes(1_000_100 + i) for i in range(args.n)]

    def without(raw: bytes) -> None:
        placed = prepare(read_scan(raw), model, Alignment.MNI)
        predict_arrays(model, [placed.array], batch_size=1)

    def with_check(raw: bytes) -> None:
        placed = prepare(read_scan(raw), model, Alignment.MNI)
        pred = predict_arrays(model, [placed.array], batch_size=1, with_features=True)[0]
        check_input(model, placed, pred)

    without(scans[0])
    with_check(scans[0])  # warm-up: template masks and quantiles are computed once per grid
    times: dict[str, list[float]] = {"without": [], "with": []}
    for i, raw in enumerate(scans):
        order = (("without", without), ("with", with_check)) if i % 2 == 0 else (("with", with_check),
                                                                                ("without", without))
        for name, fn in order:
            t0 = time.perf_counter()
            fn(raw)
            times[name].append(time.perf_counter() - t0)
    result = {
        "model": args.model, "scans": args.n,
        "p50_without_s": p50(times["without"]), "p50_with_s": p50(times["with"]),
        "p95_without_s": p95(times["without"]), "p95_with_s": p95(times["with"]),
        "ratio_p50": p50(times["with"]) / p50(times["without"]),
        "target_ratio": 1.15, "peak_rss_mb": peak_rss_mb(),
    }
    save("inputcheck", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
