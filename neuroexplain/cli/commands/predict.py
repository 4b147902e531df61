"""``neuroexplain predict SCAN... --model NAME [--local | --server H:P] [--json] [--dicom-out DIR]``.

``SCAN`` is a NIfTI/MGH file or a directory holding a DICOM series. Without ``--local`` the scans go to a server
(``--server``, default ``localhost:50051``). With ``--json`` each scan gives one JSON object on its own line:
``scan``, ``model``, ``model_version``, ``predicted_class``, ``probabilities``, ``logits``, ``alignment`` (the one
used), ``input_check`` (``in_distribution``, ``score``, ``threshold``, ``reason``), ``registration`` (with
``register``), ``cached``, ``notice`` and, with ``--dicom-out``, ``dicom`` (the files written); a scan that fails
gives ``{"scan": ..., "error": {"code": ..., "message": ...}}`` (``code`` is the gRPC status name, also with
``--local``). The exit code is 1 if any scan failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from neuroexplain import RESEARCH_NOTICE
from neuroexplain.cli.common import add_scan_arguments, check_dicom_out, load_scan_arg, write_dicom_objects
from neuroexplain.errors import NeuroExplainError


def register(sub: Any) -> None:
    from neuroexplain.client import add_client_arguments

    p = sub.add_parser("predict", help="class probabilities for one or more scans")
    p.add_argument("scans", nargs="+", metavar="SCAN",
                   help=".nii, .nii.gz, .mgh or .mgz files, or directories holding one DICOM series")
    p.add_argument("--model", required=True, help="model name (see `neuroexplain models`)")
    p.add_argument("--json", action="store_true", help="one JSON object per scan per line")
    add_scan_arguments(p)
    add_client_arguments(p)
    p.set_defaults(func=run)


def _local(args: argparse.Namespace) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    from neuroexplain.cli.local import dicom_results, read_scan_arg, report
    from neuroexplain.inputcheck import check_input
    from neuroexplain.models import load_model
    from neuroexplain.predict import predict_arrays, prepare
    from neuroexplain.volumes import Alignment

    model = load_model(args.model)

    def one(path: str) -> dict[str, Any]:
        scan = read_scan_arg(load_scan_arg(path), args)
        placed = prepare(scan, model, Alignment.parse(args.alignment))
        pred = predict_arrays(model, [placed.array], with_features=True)[0]
        check = check_input(model, placed, pred)
        out = {
            "scan": path,
            "model": model.spec.name,
            "model_version": model.spec.version,
            "predicted_class": pred.predicted_class,
            "probabilities": pred.probabilities,
            "logits": list(pred.logits),
            **report(placed.placement, check),
            "cached": False,
            "notice": RESEARCH_NOTICE,
        }
        if args.dicom_out is not None:
            objects = dicom_results(scan, args, operation="predict", model=model, predicted_class=pred.predicted_class,
                                    probabilities=pred.probabilities, input_check=check)
            out["dicom"] = [str(p) for p in write_dicom_objects(args.dicom_out, objects)]
        return out

    for path in args.scans:
        yield path, lambda path=path: one(path)  # type: ignore[misc]


def _remote(args: argparse.Namespace) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    from neuroexplain.cli.remote import report
    from neuroexplain.client import client_from_args

    with client_from_args(args) as client:

        def one(path: str) -> dict[str, Any]:
            r = client.predict(load_scan_arg(path), model=args.model, alignment=args.alignment,
                               series_uid=args.series, volume_index=args.volume_index,
                               return_dicom=args.dicom_out is not None, deidentify=args.deidentify)
            out = {
                "scan": path,
                "model": r.info.model,
                "model_version": r.info.model_version,
                "predicted_class": r.predicted_class,
                "probabilities": dict(r.probabilities),
                "logits": list(r.logits),
                **report(r),
                "cached": r.info.cached,
                "notice": r.info.notice,
            }
            if args.dicom_out is not None:
                out["dicom"] = [str(p) for p in write_dicom_objects(args.dicom_out, r.dicom)]
            return out

        for path in args.scans:
            yield path, lambda path=path: one(path)  # type: ignore[misc]


def run(args: argparse.Namespace) -> int:
    from neuroexplain.client import error_code

    check_dicom_out(args)
    failed = 0
    for path, compute in (_local(args) if args.local else _remote(args)):
        try:
            result = compute()
        except NeuroExplainError as exc:
            failed += 1
            if args.json:
                print(json.dumps({"scan": path, "error": {"code": error_code(exc), "message": str(exc)}}), flush=True)
            else:
                print(f"{path}: error: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in result["probabilities"].items())
            check = result.get("input_check")
            flag = "" if check is None or check["in_distribution"] else f"  [input check: {check['reason']}]"
            print(f"{path}: {result['predicted_class']}  ({probs}){'  [cached]' if result['cached'] else ''}{flag}")
    if not args.json:
        print(RESEARCH_NOTICE, file=sys.stderr)
    return 1 if failed else 0
