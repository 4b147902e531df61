"""``neuroexplain evaluate-input-check --model lesion|atrophy``: fit and measure the input check and calibration.

Fits the feature statistics, the input check's threshold and the temperature on their own seed ranges
(:data:`neuroexplain.lab.evaluate_input_check.SEED_RANGES`), measures pass rates, ECE and NLL on the test range and
the independently built shifted set, runs every out-of-distribution case, and writes
``docs/input-check-<model>.{md,json}`` and ``docs/calibration-<model>.png``. With ``--write-spec`` it also writes the
model's new ``spec.json`` (temperature, input-check calibration, feature statistics, seed ranges; ``--version``
sets its version, default the model's own) into the model's folder (weights untouched).
Per-scan records are cached (``--cache-dir``), so an interrupted run resumes; an empty cache reproduces the figures.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuroexplain" / "input-check-eval"


def register(sub: Any) -> None:
    p = sub.add_parser("evaluate-input-check",
                       help="fit and measure the input check and temperature scaling (table + figure in docs/)")
    p.add_argument("--model", required=True, help="lesion or atrophy (a bundled model; its task picks the generator)")
    p.add_argument("--n", type=int, default=200, help="scans per seed range (default 200, 20 to 1000)")
    p.add_argument("--docs", type=Path, default=Path("docs"), help="output folder (default docs/)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"record cache (default {DEFAULT_CACHE})")
    p.add_argument("--write-spec", action="store_true",
                   help="write the model's spec.json beside its weights (weights untouched)")
    p.add_argument("--version", default=None,
                   help="the version --write-spec gives the spec (default: the model's own, e.g. 1.2.0 for new weights)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from neuroexplain import RESEARCH_NOTICE
    from neuroexplain.cli.main import CliError
    from neuroexplain.lab import evaluate_input_check as ev
    from neuroexplain.lab.synthetic import Task
    from neuroexplain.models.registry import BUNDLED_DIR, load_model

    if not 20 <= args.n <= 1000:
        raise CliError(f"--n {args.n} is out of range; expected 20 to 1000")
    if args.model not in ("lesion", "atrophy"):
        raise CliError(f"evaluate-input-check needs a bundled model (lesion or atrophy), not {args.model!r}")
    task = Task(args.model)
    model = load_model(args.model)
    t0 = time.perf_counter()
    cache = args.cache_dir / f"{model.spec.name}-{model.spec.weights_sha256[:12] or 'unsigned'}"
    print(f"evaluate-input-check: model {model.spec.name} {model.spec.version}, {args.n} scans per range; "
          f"cache {cache}", flush=True)
    report = ev.evaluate(model, task, cache, args.n, log=lambda s: print(s, flush=True))
    folder = BUNDLED_DIR / model.spec.name
    checked = ev.calibrated_model(model, report)
    rows = ev.ood_rows(checked, task)
    ranges = ev.SEED_RANGES
    evaluation = (
        f"Accuracy and calibration are measured on synthetic data only (MNI152-based, neuroexplain.lab): "
        f"trained on seeds {model.spec.training.get('train_seeds', [0, 599])}, feature statistics from training "
        f"seeds {list(ranges['statistics'])}, input-check threshold from seeds {list(ranges['calibration'])}, "
        f"temperature from seeds {list(ranges['validation'])}, reported on seeds {list(ranges['test'])} and on "
        f"seeds {list(ranges['shift'])} of an independently built generator (neuroexplain.lab.synthetic_shift)."
    )
    test, shift = report["calibration"]["test"], report["calibration"]["shift"]
    if args.write_spec:
        from dataclasses import replace

        metrics = {**model.spec.metrics, "calibration": {
            "test": test, "shift": shift, "validation_seeds": list(ranges["validation"]),
            "test_seeds": list(ranges["test"]), "shift_seeds": list(ranges["shift"])},
            "input_check": report["rates"]}
        version = args.version or model.spec.version
        spec = replace(checked.spec, version=version, evaluation=evaluation, metrics=metrics,
                       input_check={**checked.spec.input_check, "seed_ranges": {k: list(v) for k, v in ranges.items()},
                                    "alpha": ev.ALPHA, "false_alarm_target": ev.FALSE_ALARM_TARGET})
        spec.save(folder / "spec.json")
        print(f"wrote {folder}/spec.json (version {version}, with its feature statistics)")
    args.docs.mkdir(parents=True, exist_ok=True)
    name = model.spec.name
    ev.reliability_figure(args.docs / f"calibration-{name}.png", report,
                          f"{name}: reliability before/after temperature scaling (T = {report['temperature']:.3f}, "
                          f"fitted on seeds {list(ranges['validation'])})")
    out = {**ev.to_json(report), "ood": rows, "evaluation": evaluation, "seed_ranges": ranges,
           "model": name, "weights_sha256": model.spec.weights_sha256, "seconds": round(time.perf_counter() - t0, 1)}
    (args.docs / f"input-check-{name}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    md = _markdown(name, args.n, report, rows, evaluation) + f"\n_{RESEARCH_NOTICE}_\n"
    (args.docs / f"input-check-{name}.md").write_text(md)
    print(md)
    print(f"wrote {args.docs}/input-check-{name}.md, .json and calibration-{name}.png "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


def _markdown(name: str, n: int, report: dict[str, Any], rows: list[dict[str, Any]], evaluation: str) -> str:
    thr = report["calib"]["threshold"]
    lines = [f"# Input check and calibration: {name} model", "",
             f"Generated by `neuroexplain evaluate-input-check --model {name} --n {n}`. {evaluation}", "",
             f"Threshold {thr:.2f} (score = the largest calibrated check score; flagged above the threshold).", "",
             "| in-distribution range | seeds | n | passed | pass rate | largest score |", "| --- | --- | --- | --- | --- | --- |"]
    for w, r in report["rates"].items():
        lines.append(f"| {w} | {r['seeds'][0]}-{r['seeds'][1]} | {r['n']} | {r['passed']} | {r['pass_rate']:.1%} | "
                     f"{r['max_score']:.2f} |")
    lines += ["", ("Out-of-distribution cases read as `mni` (the check alone decides), and what the default path "
              "(`auto`: registration first) does with them:"), "",
              "| case | score | threshold | flagged | reason | default path |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['score']:.1f} | {thr:.2f} | {'yes' if r['flagged'] else '**no**'} | "
                     f"{r['reason']} | {r['default_path']} |")
    lines += ["", f"Temperature {report['temperature']:.3f} ({report['temperature_note']}; validation range).", "",
              "| set | n | ECE before [95 % CI] | ECE after [95 % CI] | NLL before | NLL after | accuracy |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for w, c in report["calibration"].items():
        b, a = c["before"], c["after"]
        lines.append(f"| {w} | {a['n']} | {b['ece']:.4f} [{b['ece_low']:.4f}, {b['ece_high']:.4f}] | "
                     f"{a['ece']:.4f} [{a['ece_low']:.4f}, {a['ece_high']:.4f}] | {b['nll']:.4f} | {a['nll']:.4f} | "
                     f"{a['accuracy']:.3f} |")
    lines += ["", f"ECE: 15 equal-width bins, 1000 bootstrap resamples. Figure: `calibration-{name}.png`.", ""]
    return "\n".join(lines)
