"""What the ``--local`` commands share: reading a SCAN argument, reporting placement and input check, DICOM results.

Imports the library (numpy, torch): only the ``--local`` paths of the commands import this module.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from neuroexplain.cli.common import dicom_extras
from neuroexplain.inputcheck import InputCheck
from neuroexplain.volumes import Placement, Scan


def read_scan_arg(path: Path, args: argparse.Namespace) -> Scan:
    """A NIfTI/MGH file or a DICOM directory (``--series``, ``--volume-index``), validated."""
    from neuroexplain.dicom import read_any

    return read_any(path, series_uid=getattr(args, "series", "") or None, volume_index=getattr(args, "volume_index", None))


def report(placement: Placement, check: InputCheck) -> dict[str, Any]:
    """``alignment`` (the one used), ``input_check`` and, after ``register``, ``registration`` — as on the wire."""
    out: dict[str, Any] = {"alignment": placement.alignment.value, "input_check": check.to_dict()}
    if placement.registration is not None:
        reg = placement.registration
        out["registration"] = {"metric": reg.metric, "seconds": reg.seconds,
                               "transform": [float(v) for v in reg.transform.reshape(-1)]}
    return out


def dicom_results(scan: Scan, args: argparse.Namespace, *, operation: str, model: Any, **fields: Any) -> list[Any]:
    """The DICOM result objects of a local run (the gateway builds the same ones: same UIDs for the same request).

    Raises:
        InvalidInputError: the scan is not a DICOM series; FailedPreconditionError: ``--deidentify`` without a key.
    """
    from neuroexplain.dicom import DicomScan
    from neuroexplain.dicom.deid import load_key
    from neuroexplain.dicom.results import build_results, validate_request

    key = load_key(args.deidentify_key_file) if args.deidentify and args.deidentify_key_file else None
    validate_request(source_is_dicom=isinstance(scan, DicomScan), operation=operation, extras=dicom_extras(args),
                     deidentify=args.deidentify, deidentify_key=key)
    assert isinstance(scan, DicomScan)
    return build_results(scan.geometry, operation=operation, model=model.spec.name, version=model.spec.version,
                         image=scan.data, extras=dicom_extras(args), deidentify=args.deidentify, deidentify_key=key,
                         **fields)
