"""``neuroexplain visualize --model NAME --target ... -o OUT.nii.gz``: feature visualization (activation maximization).

Without ``--local`` the command asks a server (``--server``, default localhost:50051); the progress bar is fed
by the server's stream. ``--local`` runs the library in this process.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PRESETS = ("none", "paper", "robust", "full", "amplify")  # neuroexplain.featvis.Preset, without importing torch here


def register(sub: Any) -> None:
    p = sub.add_parser(
        "visualize",
        help="generate a volume that maximally activates a class, channel or neuron",
        description="Feature visualization by activation maximization. OUT is on the model grid (MNI for the "
        "bundled models); with --start SCAN, --native-out also writes it on the scan's own grid.",
    )
    p.add_argument("--model", required=True, help="model name (see `neuroexplain models`)")
    p.add_argument("--target", required=True,
                   help="class:CLASS | channel:LAYER:C | neuron:LAYER:C:X:Y:Z | layer:LAYER")
    p.add_argument("--preset", default="robust", choices=PRESETS, help="regularization preset (default robust; amplify for --start SCAN)")
    p.add_argument("--steps", type=int, default=256, help="optimisation steps (default 256, 1 to 4096)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same volume")
    p.add_argument("--start", default="noise", metavar="noise|template|SCAN",
                   help="starting volume: seeded noise (default), the MNI template, or a scan file")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset option (repeatable), e.g. --option lr=0.02")
    p.add_argument("-o", "--out", type=Path, required=True, help="output NIfTI on the model grid (.nii.gz)")
    p.add_argument("--png", type=Path, help="also write a PNG preview (orthogonal slices + axial mosaic)")
    p.add_argument("--native-out", type=Path, help="with --start SCAN: the volume on the scan's own grid")
    p.add_argument("--curve", type=Path, help="also write the objective per step as JSON")
    from neuroexplain.client import add_client_arguments

    add_client_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _parse_options(pairs: list[str]) -> dict[str, str]:
    from neuroexplain.cli.main import CliError

    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--option {pair!r} must look like KEY=VALUE")
        if key in options:
            raise CliError(f"--option {key} is given twice")
        options[key] = value
    return options


def _check_args(args: argparse.Namespace) -> None:
    from neuroexplain.cli.main import CliError

    start_is_scan = args.start not in ("noise", "template")
    if start_is_scan and Path(args.start).is_dir():
        from neuroexplain.cli.common import load_scan_arg

        load_scan_arg(args.start)  # a directory (DICOM series) is refused there, with the same words
    if args.native_out is not None and not start_is_scan:
        raise CliError("--native-out needs --start SCAN (a scan file); noise and template starts live on the model grid")
    if start_is_scan and not Path(args.start).is_file():
        raise CliError("--start must be noise, template or an existing scan file; the given scan file was not found")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    options = _parse_options(args.option)
    if not args.local:
        return _run_remote(args, options)
    return _run_local(args, options)


def _run_remote(args: argparse.Namespace, options: dict[str, str]) -> int:
    """Ask a server (``--server``, default localhost:50051); the progress bar is fed by the stream."""
    import json
    import sys

    from tqdm import tqdm

    from neuroexplain.client import client_from_args

    scan_start = args.start not in ("noise", "template")
    bar = tqdm(total=args.steps, desc="visualize", unit="step", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)

    def on_progress(_job_id: str, p: Any) -> None:
        bar.update(p.step - bar.n)
        bar.set_postfix(objective=f"{p.objective:.4g}", refresh=False)

    with client_from_args(args) as client:
        try:
            # Ctrl-C cancels the stream (Client.visualize), which stops the optimisation on the server
            _job_id, result = client.visualize(
                on_progress=on_progress, model=args.model, target=args.target, preset=args.preset, steps=args.steps,
                seed=args.seed, start="scan" if scan_start else args.start,
                scan=Path(args.start) if scan_start else None, options=options, png=args.png is not None,
            )
        finally:
            bar.close()
    args.out.write_bytes(result.nifti)
    if args.png:
        args.png.write_bytes(result.png)
    if args.native_out and result.native_nifti:
        args.native_out.write_bytes(result.native_nifti)
    curve = list(result.objective_curve)
    if args.curve:
        args.curve.write_text(json.dumps({"target": args.target, "preset": args.preset, "seed": args.seed,
                                          "curve": curve, "cached": result.info.cached}) + "\n")
    change = f"objective {curve[0]:.4g} -> {curve[-1]:.4g} " if curve else ""
    print(f"{args.target}: {change}after {args.steps} steps (preset {args.preset}, seed {args.seed}, model "
          f"{result.info.model} {result.info.model_version}{', cached' if result.info.cached else ''}); "
          f"wrote {args.out}")
    print(result.info.notice, file=sys.stderr)
    return 0


def _run_local(args: argparse.Namespace, options: dict[str, str]) -> int:
    import json
    import sys

    from tqdm import tqdm

    from neuroexplain import RESEARCH_NOTICE
    from neuroexplain.featvis import Progress, check_steps, parse_target, resolve, visualize
    from neuroexplain.models import load_model
    from neuroexplain.volumes import read_scan

    model = load_model(args.model)
    # Validate before the progress bar appears, so that a bad request prints exactly one line on stderr.
    check_steps(args.steps)
    parse_target(model.spec, args.target)
    resolve(args.preset, options, tuple(layer.name for layer in model.spec.layers))
    start: Any = args.start if args.start in ("noise", "template") else read_scan(Path(args.start))
    bar = tqdm(total=args.steps, desc="visualize", unit="step", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)

    def on_progress(p: Progress) -> None:
        bar.update(1)
        bar.set_postfix(objective=f"{p.objective:.4g}", refresh=False)

    try:
        result = visualize(model, args.target, preset=args.preset, steps=args.steps, seed=args.seed, start=start,
                           options=options, progress=on_progress)
    finally:
        bar.close()
    args.out.write_bytes(result.nifti)
    if args.png:
        args.png.write_bytes(result.png)
    if args.native_out and result.native_nifti is not None:
        args.native_out.write_bytes(result.native_nifti)
    if args.curve:
        args.curve.write_text(json.dumps({"target": result.target, "preset": result.preset, "seed": result.seed,
                                          "settings": result.settings, "curve": result.curve,
                                          "objective_final": result.objective_final}) + "\n")
    print(f"{result.target}: objective {result.curve[0]:.4g} -> {result.objective_final:.4g} after {args.steps} steps "
          f"(preset {result.preset}, seed {result.seed}); wrote {args.out}")
    print(RESEARCH_NOTICE, file=sys.stderr)
    return 0
