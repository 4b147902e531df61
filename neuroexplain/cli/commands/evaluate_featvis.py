"""``neuroexplain evaluate-featvis --model lesion|atrophy``: the seed paper's feature-visualization findings in numbers.

Prints the table and writes it (Markdown + JSON) with figures to ``docs/``. Each visualization is cached on disk, so an
interrupted run resumes; ``--steps`` bounds the cost (default 128 per visualization). ``--protocol`` runs the
validation-tuned feature-amplification protocol instead (:func:`neuroexplain.lab.evaluate_featvis.main`,
docs/featvis_protocol_*).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from neuroexplain.cli.common import protocol_arguments

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuroexplain" / "featvis-eval"


def register(sub: Any) -> None:
    p = sub.add_parser("evaluate-featvis", help="feature-visualization findings in numbers (table + figures in docs/)")
    p.add_argument("--model", required=True, help="lesion or atrophy (or a model with the same classes)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per visualization (default 128, with --protocol 64; 8 to 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of every visualization (default 0)")
    p.add_argument("--channels", type=int, default=3, help="channels per layer in the channel figure (default 3, 0-8)")
    p.add_argument("--channel-steps", type=int, default=64, help="steps per channel visualization (default 64)")
    p.add_argument("--runs", help="comma-separated run names to compute (default all); to split the work over "
                   "processes that share the cache, then run once more without --runs for the table")
    p.add_argument("--docs", type=Path, default=Path("docs"), help="output folder (default docs/)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"run cache (default {DEFAULT_CACHE})")
    protocol_arguments(p, "--protocol: full's decay tuned on a validation split for feature amplification, scored on "
                       "a test split and the shifted set (docs/featvis_protocol_<model>.md)", "the findings table",
                       (2, 3, 3))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import platform
    import time

    import torch

    from neuroexplain import RESEARCH_NOTICE, __version__
    from neuroexplain.cli.main import CliError
    from neuroexplain.lab import evaluate_featvis as ev
    from neuroexplain.models import load_model

    if args.protocol:
        return 1 if ev.main(["--model", args.model, "--validation-scans", str(args.validation_scans),
                        "--test-scans", str(args.test_scans), "--shift-scans", str(args.shift_scans),
                        "--steps", str(args.steps or ev.PROTOCOL_STEPS), "--out-dir", str(args.docs),
                        "--cache-dir", str(args.cache_dir / "protocol")]) else 0
    args.steps = args.steps or 128
    if not 8 <= args.steps <= 4096 or not 8 <= args.channel_steps <= 4096:
        raise CliError("--steps and --channel-steps must be 8 to 4096")
    if not 0 <= args.channels <= 8:
        raise CliError(f"--channels {args.channels} is out of range; expected 0 to 8")
    model = load_model(args.model)
    classes = set(model.spec.classes)
    kind = "lesion" if "lesion" in classes else "atrophy" if "atrophy" in classes else None
    if kind is None:
        raise CliError(f"evaluate-featvis needs a model with a 'lesion' or 'atrophy' class; "
                       f"{args.model!r} has {sorted(classes)}")
    args.docs.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir / f"{model.spec.name}-{model.spec.weights_sha256[:12] or 'unsigned'}"
    t0 = time.perf_counter()
    print(f"evaluate-featvis: model {model.spec.name} {model.spec.version}, {args.steps} steps, seed {args.seed}; "
          f"cache {cache}", flush=True)
    all_runs = ev.LESION_RUNS if kind == "lesion" else ev.ATROPHY_RUNS
    if args.runs:
        wanted = [r.strip() for r in args.runs.split(",")]
        unknown = sorted(set(wanted) - {r.name for r in all_runs})
        if unknown:
            raise CliError(f"--runs {unknown} unknown; runs: {[r.name for r in all_runs]}")
        for run in all_runs:
            if run.name in wanted:
                ev.run_cached(model, run, run.target or f"class:{kind}", args.steps, args.seed, cache, log=_log)
        print(f"computed {len(wanted)} runs into {cache}; run again without --runs for the table")
        return 0
    if kind == "lesion":
        rows, context, volumes = ev.lesion_rows(model, args.steps, args.seed, cache, log=_log)
        columns = ev.LESION_COLUMNS
        figure = [(name, volumes[name]) for name in ("none", "paper", "robust", "full")]
        ev.figure_rows(args.docs / f"featvis_{model.spec.name}.png", figure,
                       f"{model.spec.name} model, class 'lesion', noise start, {args.steps} steps "
                       f"(slices through each volume's maximum)")
    else:
        rows, context, volumes = ev.atrophy_rows(model, args.steps, args.seed, cache, log=_log)
        columns = ev.ATROPHY_COLUMNS
        from neuroexplain.template import anatomy

        t1 = anatomy(model.spec.grid).t1
        ev.figure_rows(args.docs / f"featvis_{model.spec.name}.png",
                       [(f"{name} - template", v - t1) for name, v in volumes.items()],
                       f"{model.spec.name} model, class 'atrophy', template start, {args.steps} steps: "
                       f"change from the template", diverging=True)
    channels = ev.channel_volumes(model, args.channels, args.channel_steps, args.seed, cache, log=_log) \
        if args.channels else {}
    if channels:
        ev.figure_channels(args.docs / f"featvis_{model.spec.name}_channels.png", channels,
                           f"{model.spec.name}: channel visualizations, robust preset, {args.channel_steps} steps "
                           f"(axial slice through the maximum)")
    table = ev.markdown_table(rows, columns)
    provenance = {"model": model.spec.name, "model_version": model.spec.version,
                  "weights_sha256": model.spec.weights_sha256, "steps": args.steps, "seed": args.seed,
                  "channel_steps": args.channel_steps, "neuroexplain": __version__, "torch": torch.__version__,
                  "machine": platform.machine(), "seconds": round(time.perf_counter() - t0, 1)}
    (args.docs / f"featvis_{model.spec.name}.json").write_text(
        json.dumps({"provenance": provenance, "context": context, "rows": rows}, indent=2, default=str) + "\n")
    context_lines = "\n".join(f"- `{k}`: {ev._fmt(v) if not isinstance(v, list) else [ev._fmt(x) for x in v]}"
                              for k, v in context.items())
    (args.docs / f"featvis_{model.spec.name}.md").write_text(
        f"# Feature visualization: {model.spec.name} model\n\n"
        f"Generated by `neuroexplain evaluate-featvis --model {model.spec.name} --steps {args.steps}` "
        f"(model {model.spec.version}, weights {model.spec.weights_sha256[:12]}, seed {args.seed}).\n\n"
        f"{ev.NOTES.get(kind, '')}{table}\n\nContext:\n\n{context_lines}\n\n"
        f"Figures: `featvis_{model.spec.name}.png`"
        f"{f', `featvis_{model.spec.name}_channels.png`' if channels else ''}.\n\n_{RESEARCH_NOTICE}_\n")
    print(table)
    print("\n".join(f"{k}: {v}" for k, v in context.items()))
    print(f"wrote {args.docs}/featvis_{model.spec.name}.md, .json and figures")
    return 0


def _log(line: str) -> None:
    print(line, flush=True)
