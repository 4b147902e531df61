"""``neuroexplain attribute SCAN --model NAME --method METHOD [--target CLASS] [--option key=value ...] -o OUT.nii.gz
[--png P] [--summary S.json] [--dicom-out DIR [--dicom-extras seg,sc] [--deidentify]] [--local | --server H:P]``.

``SCAN`` is a NIfTI/MGH file or a directory holding a DICOM series. ``OUT`` is the signed, unnormalised relevance
map on the scan's own grid and affine (float32). The summary holds the totals, the top clusters, the alignment used,
the input check and (after ``register``) the registration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The method names, duplicated from neuroexplain.attribution.options so that `--help` works without torch
# (tests/test_attribution_cli.py checks the two lists agree).
METHOD_NAMES = (
    "integrated_gradients", "smoothgrad", "gradient", "gradient_x_input", "guided_backprop", "gradcam", "occlusion",
    "lrp_epsilon", "lrp_alpha_beta", "lrp_composite", "deeplift", "gradient_shap",
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "attribute",
        help="relevance map of one scan (which voxels drove the decision), on the scan's own grid",
        description="Explain one scan: write the signed relevance map (float32, unnormalised) on the scan's own grid "
        "and affine, optionally a PNG overlay and a JSON summary (totals, top clusters in the scan's world mm). "
        "Research use only — not for diagnosis.",
    )
    p.add_argument("scan", metavar="SCAN", help=".nii, .nii.gz, .mgh or .mgz file, or a directory holding a DICOM series")
    p.add_argument("--model", required=True, help="model name (see `neuroexplain models`)")
    p.add_argument("--method", required=True, metavar="METHOD", help=f"one of: {', '.join(METHOD_NAMES)}")
    p.add_argument("--target", metavar="CLASS", help="class to explain (default: the predicted class)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="method option, repeatable (e.g. n_steps=64, baseline=blur, layer=conv3); see README 'Attribution'",
    )
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.nii.gz", help="relevance map (NIfTI)")
    p.add_argument("--png", type=Path, metavar="P", help="also write an orthogonal-slice overlay PNG")
    p.add_argument("--summary", type=Path, metavar="S.json", help="also write the JSON summary")
    from neuroexplain.cli.common import add_scan_arguments
    from neuroexplain.client import add_client_arguments

    add_scan_arguments(p, extras=True)
    add_client_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neuroexplain.cli.common import check_dicom_out, load_scan_arg
    from neuroexplain.cli.main import CliError

    args.scan = load_scan_arg(args.scan)
    check_dicom_out(args)
    if args.method not in METHOD_NAMES:
        raise CliError(f"method {args.method!r} is unknown; expected one of {list(METHOD_NAMES)}")
    for path in (args.output, args.png, args.summary):
        if path is not None and not path.parent.exists():
            raise CliError(f"output folder {str(path.parent)!r} does not exist")
    if not args.local:
        return _run_remote(args)
    return _run_local(args)


def _run_local(args: argparse.Namespace) -> int:
    import warnings

    from neuroexplain import RESEARCH_NOTICE
    from neuroexplain.attribution import explain, parse_option_pairs
    from neuroexplain.cli.common import write_dicom_objects
    from neuroexplain.cli.local import dicom_results, read_scan_arg, report
    from neuroexplain.inputcheck import check_input
    from neuroexplain.models import load_model
    from neuroexplain.predict import prepare
    from neuroexplain.volumes import Alignment

    options = parse_option_pairs(args.option)
    model = load_model(args.model)
    scan = read_scan_arg(args.scan, args)
    placed = prepare(scan, model, Alignment.parse(args.alignment))
    check = check_input(model, placed)
    with warnings.catch_warnings():
        # captum announces every hook it sets on activations; they are removed afterwards (and checked in tests).
        warnings.filterwarnings("ignore", message=r"Setting (forward, )?backward hooks", category=UserWarning)
        result = explain(model, scan, args.method, target=args.target, options=options, png=args.png is not None,
                         prepared=placed)
    args.output.write_bytes(result.nifti)
    if args.png is not None and result.png is not None:
        args.png.write_bytes(result.png)
    summary = {
        "model": model.spec.name,
        "model_version": model.spec.version,
        **result.summary,
        "predicted_class": result.predicted_class,
        "probabilities": result.probabilities,
        **report(placed.placement, check),
        "cached": False,
        "notice": RESEARCH_NOTICE,
    }
    if args.dicom_out is not None:
        objects = dicom_results(scan, args, operation="attribute", model=model, predicted_class=result.predicted_class,
                                probabilities=result.probabilities, relevance=result.native_map,
                                method=result.method.value, target=result.target_class, summary=result.summary,
                                input_check=check, options=_dicom_options(args, result.options))
        summary["dicom"] = [str(p) for p in write_dicom_objects(args.dicom_out, objects)]
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    top = summary["clusters"][0] if summary["clusters"] else None
    where = f"; strongest cluster at {top['peak_mm']} mm, {top['volume_ml']} mL" if top else ""
    print(f"{args.output}: {result.method.value} for class {result.target_class!r}{where}")
    print(RESEARCH_NOTICE, file=sys.stderr)
    return 0


def _run_remote(args: argparse.Namespace) -> int:
    """Ask a server (``--server``, default localhost:50051) and write the same files as ``--local``."""
    from neuroexplain.cli.common import dicom_extras, parse_key_values, write_dicom_objects
    from neuroexplain.cli.remote import report
    from neuroexplain.client import client_from_args

    options = parse_key_values(args.option)
    with client_from_args(args) as client:
        result = client.attribute(Path(args.scan), model=args.model, method=args.method, target=args.target or "",
                                  options=options, png=args.png is not None, alignment=args.alignment,
                                  series_uid=args.series, volume_index=args.volume_index,
                                  return_dicom=args.dicom_out is not None, dicom_extras=dicom_extras(args),
                                  deidentify=args.deidentify)
    args.output.write_bytes(result.nifti)
    if args.png is not None and result.png:
        args.png.write_bytes(result.png)
    summary = {
        "model": result.info.model,
        "model_version": result.info.model_version,
        **json.loads(result.summary.json or "{}"),  # holds predicted_class and probabilities
        **report(result),
        "cached": result.info.cached,
        "notice": result.info.notice,
    }
    if args.dicom_out is not None:
        summary["dicom"] = [str(p) for p in write_dicom_objects(args.dicom_out, result.dicom)]
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    top = summary.get("clusters", [None])[0] if summary.get("clusters") else None
    where = f"; strongest cluster at {top['peak_mm']} mm, {top['volume_ml']} mL" if top else ""
    cached = " (cached)" if result.info.cached else ""
    print(f"{args.output}: {result.method} for class {result.target!r}{where}{cached}")
    print(result.info.notice, file=sys.stderr)
    return 0


def _dicom_options(args: argparse.Namespace, used: dict[str, Any]) -> dict[str, Any]:
    """The request's options with defaults filled in, hashed into the result UIDs (a repeated run gives the same UIDs)."""
    return {"method": args.method, "target": args.target or "",
            "options": {k: str(v) for k, v in sorted(used.items())}}
