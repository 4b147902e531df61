"""``neuroexplain evaluate-attribution --model NAME [--scans N] [--methods ...] [--resume]``, and ``--protocol``: the
validation-tuned protocol (:func:`neuroexplain.lab.evaluate_attribution.main`, docs/attribution-protocol-*)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from neuroexplain.cli.common import protocol_arguments

DOCS = Path("docs")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate-attribution",
        help="score attribution methods against synthetic ground truth; print the table and write it to docs/",
        description="Score every attribution method on held-out synthetic scans with ground-truth masks "
        "(localisation, deletion/insertion, cascading randomisation). Expensive: the costly parts run on "
        "documented subsets, per-scan results are cached so that --resume continues an interrupted run.",
    )
    p.add_argument("--model", required=True, help="a bundled model with synthetic ground truth: lesion or atrophy")
    p.add_argument("--scans", type=int, default=100, help="scans for the localisation of single-pass methods (100)")
    p.add_argument("--sampled-scans", type=int, default=8, help="scans for IG, SmoothGrad, GradientSHAP (8)")
    p.add_argument("--faithfulness-scans", type=int, default=8, help="scans for deletion/insertion curves (8)")
    p.add_argument("--occlusion-scans", type=int, default=4, help="scans for occlusion (4)")
    p.add_argument("--randomisation-scans", type=int, default=3,
                   help="scans for the randomisation test of every method (3; single-pass methods: the whole "
                   "cascade, many-pass methods and occlusion: the fully randomised model)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="methods to score (default: all, plus 'random')")
    p.add_argument("--resume", action="store_true", help="keep per-scan results already cached for these weights")
    p.add_argument("--report-only", action="store_true", help="only aggregate what the cache holds (no computing)")
    p.add_argument("--out-dir", type=Path, default=DOCS, help="where the table goes (default: docs/)")
    proto = protocol_arguments(p, "--protocol: ε tuned on a validation split, scored on a test split and on the "
                               "independently built shifted set, all and correctly classified scans, cascading "
                               "randomisation (docs/attribution-protocol-<model>.md)", "the table above", (12, 30, 30))
    proto.add_argument("--cascade-scans", type=int, default=3, help="scans per set for the cascade (3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neuroexplain.cli.main import CliError
    from neuroexplain.lab.evaluate_attribution import Plan, run_evaluation, to_json, to_markdown
    from neuroexplain.models import load_model

    if args.protocol:
        from neuroexplain.lab.evaluate_attribution import main

        return 1 if main(["--model", args.model, "--validation-scans", str(args.validation_scans),
                     "--test-scans", str(args.test_scans), "--shift-scans", str(args.shift_scans),
                     "--cascade-scans", str(args.cascade_scans), "--out-dir", str(args.out_dir)]) else 0
    sizes = [args.scans, args.sampled_scans, args.faithfulness_scans, args.occlusion_scans, args.randomisation_scans]
    if min(sizes) < 1:
        raise CliError("every subset size (--scans, --sampled-scans, ...) must be at least 1")
    model = load_model(args.model)
    plan = Plan(
        scans=args.scans, sampled_scans=args.sampled_scans, faithfulness_scans=min(args.faithfulness_scans, args.scans),
        occlusion_scans=args.occlusion_scans, randomisation_scans=args.randomisation_scans,
        sampled_randomisation_scans=args.randomisation_scans, occlusion_randomisation_scans=args.randomisation_scans,
    )
    stem = "attribution-evaluation" + ("" if model.spec.name == "lesion" else f"-{model.spec.name}")
    out: Path = args.out_dir
    ev = run_evaluation(
        model, methods=args.methods, plan=plan, cache=out / f"{stem}.jsonl", resume=args.resume,
        log=lambda line: print(line, file=sys.stderr, flush=True), compute=not args.report_only,
    )
    command = "neuroexplain evaluate-attribution " + " ".join(
        shlex.quote(a) for a in sys.argv[sys.argv.index("evaluate-attribution") + 1 :]
    ) if "evaluate-attribution" in sys.argv else f"neuroexplain evaluate-attribution --model {model.spec.name}"
    table = to_markdown(ev, command)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(to_json(ev), indent=2) + "\n")
    print(table)
    return 0
