"""The mixed-precision gate checked on scans it did not see (README -> Benchmarks, "Mixed precision").

``neuroexplain evaluate-precision`` measured each bundled model on seeds 5,000,000+ and stored the record that
decides what ``serve --precision`` runs reduced. This measures the computations that record lets run reduced again,
on the test range (seeds 1,000,000+), and says whether each is still within tolerance there.

    nice .venv/bin/python -m bench.precision_holdout [--n 200] [--n-attribution 4]
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from neuroexplain.attribution.options import Method
    from neuroexplain.lab.evaluate_precision import measure
    from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task
    from neuroexplain.models import load_model
    from neuroexplain.precision import PREDICT, Precision, reduced_operations, within_tolerance

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200, help="scans for Predict (seeds from 1,000,000)")
    p.add_argument("--n-attribution", type=int, default=4, help="scans per attribution method")
    args = p.parse_args(argv)
    out: dict[str, Any] = {"seed_start": HELD_OUT_SEED_START, "n_predict": args.n, "n_attribution": args.n_attribution}
    for name in ("lesion", "atrophy"):
        model = load_model(name)
        record = model.spec.mixed_precision
        rows: dict[str, Any] = {}
        for precision in (Precision.FLOAT16, Precision.BFLOAT16):
            allowed = reduced_operations(record, "cpu", precision)
            if not allowed:
                rows[precision.value] = {"allowed": [], "note": "nothing runs reduced"}
                continue
            methods = [Method(op) for op in allowed if op != PREDICT]
            holdout = {"cpu": measure(model, Task(name), n_predict=args.n if PREDICT in allowed else 1,
                                      n_attribution=args.n_attribution if methods else 0, methods=methods,
                                      precisions=[precision], seed_start=HELD_OUT_SEED_START)}
            entry = holdout["cpu"][precision.value]
            rows[precision.value] = {
                "allowed": allowed,
                "holdout": {op: entry[PREDICT] if op == PREDICT else entry["methods"][op] for op in allowed},
                "still_within": {op: within_tolerance(holdout, "cpu", precision, op) for op in allowed},
            }
            print(name, precision.value, json.dumps(rows[precision.value]), flush=True)
        out[name] = rows
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
