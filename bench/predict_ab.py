"""Predict from bytes, this checkout against another one, side by side (not part of ``make bench``).

    flock /tmp/neuroexplain-bench.lock .venv/bin/python -m bench.predict_ab OTHER_CHECKOUT [--n 40] [--other-env K=V]

Machine noise moves ``bench predict``'s p50 by more than most changes (73-80 ms for the same code within a minute), so
a change is judged here: two ``serve --backend inprocess`` processes (``bench_gateway.Gateway``, cache off), one from
each checkout, run at once; one client alternates between them on the same distinct 1 mm scans (twice over, the order
swapped every call) and times both inflates of each scan beside them (``bench.common.inflaters``). Prints p50s, ratios
to the floor and the paired median of this checkout's time over the other's. ``OTHER_CHECKOUT`` is e.g.
``git worktree add /tmp/old REV`` with its generated code copied in (``neuroexplain/_proto``, ``service/gen``), or
``.`` with ``--other-env`` to compare a setting (e.g. ``OMP_NUM_THREADS=1``) on the same code.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from bench.bench_gateway import Gateway, _model_env
from bench.bench_predict import MODEL, scans_by_dtype
from bench.common import inflaters

HERE = Path(__file__).resolve().parent.parent


def main() -> None:
    from neuroexplain.serving.tuning import tune_allocator

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path)
    parser.add_argument("--n", type=int, default=40, help="distinct scans per dtype")
    parser.add_argument("--other-env", action="append", default=[], metavar="K=V",
                        help="an environment variable for the other checkout's server (repeatable)")
    args = parser.parse_args()
    other_env = dict(item.split("=", 1) for item in args.other_env)
    tune_allocator(os.environ)
    inflate = inflaters()
    from neuroexplain.client import Client

    gateways = {"this": Gateway(["--cache", "none"], _model_env(), cwd=HERE),
                "other": Gateway(["--cache", "none"], {**_model_env(), **other_env}, cwd=args.other.resolve())}
    clients = {side: Client(f"127.0.0.1:{g.port}", timeout=600) for side, g in gateways.items()}
    try:
        for dtype, scans in scans_by_dtype(args.n).items():
            times: dict[str, list[float]] = {k: [] for k in ("inflate", "inflate_pieces", "this", "other")}
            for rep in range(2):
                for i, raw in enumerate(scans):
                    got = {}
                    for name, fn in (("inflate", inflate["whole"]), ("inflate_pieces", inflate["pieces"])):
                        t0 = time.perf_counter()
                        fn(raw)
                        got[name] = time.perf_counter() - t0
                    for side in ("this", "other") if (i + rep) % 2 else ("other", "this"):
                        t0 = time.perf_counter()
                        clients[side].predict(raw, model=MODEL, alignment="mni")
                        got[side] = time.perf_counter() - t0
                    if i:  # the first scan warms both servers up
                        for k, v in got.items():
                            times[k].append(v)
            p50 = {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()}
            floor = min(p50["inflate"], p50["inflate_pieces"])
            paired = statistics.median(a / b for a, b in zip(times["this"], times["other"], strict=True))
            print(f"{dtype}: p50 ms {p50}; ratio to the floor this {p50['this'] / floor:.2f}, other "
                  f"{p50['other'] / floor:.2f}; paired median this / other {paired:.3f} (n={len(times['this'])})",
                  flush=True)
    finally:
        for side, gateway in gateways.items():
            clients[side].close()
            gateway.stop()


if __name__ == "__main__":
    main()
