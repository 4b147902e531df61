"""``neuroexplain evaluate-precision --model NAME``: float16 and bfloat16 autocast against float32, measured.

Measures Predict and every attribution method on held-out synthetic scans
(:mod:`neuroexplain.lab.evaluate_precision`) on ``--device`` and writes ``docs/precision-<model>-<device type>.md``
and ``.json``. With ``--write-spec`` it stores the figures in the model's ``spec.json`` under ``mixed_precision``
(this device type's entry; others are kept): ``serve --precision`` then runs reduced exactly what was measured within
tolerance there (:mod:`neuroexplain.precision`). Run it on the kind of device that will serve.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("evaluate-precision",
                       help="measure float16/bfloat16 autocast against float32 (table in docs/; --write-spec)")
    p.add_argument("--model", required=True, help="lesion or atrophy (a bundled model; its task picks the generator)")
    p.add_argument("--device", default="cpu", help="torch device to measure on (default cpu)")
    p.add_argument("--n", type=int, default=200, help="scans for Predict (default 200, 2 to 1000)")
    p.add_argument("--n-attribution", type=int, default=4, help="scans per attribution method (default 4, 1 to 50)")
    p.add_argument("--docs", type=Path, default=Path("docs"), help="output folder (default docs/)")
    p.add_argument("--write-spec", action="store_true",
                   help="store the figures in the model's spec.json (weights untouched)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from dataclasses import replace

    from neuroexplain.cli.main import CliError
    from neuroexplain.lab import evaluate_precision as ev
    from neuroexplain.lab.synthetic import Task
    from neuroexplain.models.registry import BUNDLED_DIR, load_model

    if not 2 <= args.n <= 1000:
        raise CliError(f"--n {args.n} is out of range; expected 2 to 1000")
    if not 1 <= args.n_attribution <= 50:
        raise CliError(f"--n-attribution {args.n_attribution} is out of range; expected 1 to 50")
    if args.model not in ("lesion", "atrophy"):
        raise CliError(f"evaluate-precision needs a bundled model (lesion or atrophy), not {args.model!r}")
    model = load_model(args.model, device=args.device)
    device_type = model.device.type
    t0 = time.perf_counter()
    entry = ev.measure(model, Task(args.model), args.n, args.n_attribution, log=lambda s: print(s, flush=True))
    entry["seconds_total"] = round(time.perf_counter() - t0, 1)
    command = (f"neuroexplain evaluate-precision --model {args.model} --device {args.device} --n {args.n} "
               f"--n-attribution {args.n_attribution}")
    md = ev.markdown(model.spec.name, device_type, entry, command)
    args.docs.mkdir(parents=True, exist_ok=True)
    stem = args.docs / f"precision-{model.spec.name}-{device_type}"
    stem.with_suffix(".json").write_text(json.dumps({"model": model.spec.name, "model_version": model.spec.version,
                                                     "device_type": device_type, "command": command, **entry},
                                                    indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)
    if args.write_spec:
        stored = {k: ({f: v for f, v in value.items() if f != "seconds"} if isinstance(value, dict) else value)
                  for k, value in entry.items() if k != "seconds_total"}
        spec = replace(model.spec, mixed_precision={**model.spec.mixed_precision, device_type: stored})
        spec.save(BUNDLED_DIR / model.spec.name / "spec.json")
        print(f"wrote {BUNDLED_DIR / model.spec.name}/spec.json ({device_type} entry of mixed_precision)")
    print(f"wrote {stem}.md and .json ({entry['seconds_total']:.0f} s)")
    return 0
