"""``neuroexplain predict SCAN... --model NAME --local [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from neuroexplain import RESEARCH_NOTICE
from neuroexplain.errors import NeuroExplainError


def register(sub: Any) -> None:
    p = sub.add_parser("predict", help="class probabilities for one or more scans")
    p.add_argument("scans", nargs="+", metavar="SCAN", help=".nii, .nii.gz, .mgh or .mgz files")
    p.add_argument("--model", required=True, help="model name (see `neuroexplain models`)")
    p.add_argument("--local", action="store_true", help="run the library in this process")
    p.add_argument("--json", action="store_true", help="one JSON object per scan per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neuroexplain.models import load_model
    from neuroexplain.predict import predict
    from neuroexplain.volumes import read_scan

    model = load_model(args.model)
    failed = 0
    for path in args.scans:
        try:
            pred = predict(model, [read_scan(path)])[0]
        except NeuroExplainError as exc:
            failed += 1
            line: dict[str, Any] = {"scan": path, "error": {"code": type(exc).__name__, "message": str(exc)}}
            print(json.dumps(line) if args.json else f"{path}: error: {exc}", file=sys.stdout if args.json else sys.stderr)
            continue
        result = {
            "scan": path,
            "model": model.spec.name,
            "model_version": model.spec.version,
            "predicted_class": pred.predicted_class,
            "probabilities": pred.probabilities,
            "logits": list(pred.logits),
            "cached": False,
            "notice": RESEARCH_NOTICE,
        }
        if args.json:
            print(json.dumps(result))
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in pred.probabilities.items())
            print(f"{path}: {pred.predicted_class}  ({probs})")
    if not args.json:
        print(RESEARCH_NOTICE, file=sys.stderr)
    return 1 if failed else 0
