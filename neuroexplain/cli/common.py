"""Helpers shared by the client commands, importable without numpy or torch (the light install)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroexplain import errors

SCAN_SUFFIXES = (".nii", ".nii.gz", ".mgh", ".mgz")
ALIGNMENTS = ("auto", "mni", "center", "register")


def protocol_arguments(parser: Any, description: str, instead: str, scans: tuple[int, int, int]) -> Any:
    """The ``--protocol`` group of the evaluate commands: the flag and the validation / test / shifted split sizes
    (``scans``: their defaults); returns the group for a command's own protocol flags."""
    group = parser.add_argument_group("protocol", description)
    group.add_argument("--protocol", action="store_true", help=f"run the protocol instead of {instead}")
    for flag, what, default in zip(("--validation-scans", "--test-scans", "--shift-scans"),
                                   ("validation", "test", "shifted-set"), scans, strict=True):
        group.add_argument(flag, type=int, default=default, help=f"positive {what} scans ({default})")
    return group


def load_scan_arg(path: str | Path) -> Path:
    """Check a SCAN argument of the command line and return it as a path (the one place that does).

    Args:
        path: what the user typed: a NIfTI/MGH file, or a directory holding one DICOM series (or several, one of
            which ``--series`` chooses).

    Returns:
        The path of an existing, readable file or directory.

    Raises:
        NotFoundError: ``path`` does not exist or cannot be read.
    """
    p = Path(path)
    try:
        if p.is_dir():
            next(iter(p.iterdir()), None)
        else:
            with p.open("rb"):
                pass
    except OSError as exc:
        raise errors.NotFoundError(f"cannot read scan {p}: {exc.strerror or exc}", field="scan") from None
    return p


def add_scan_arguments(parser: Any, *, extras: bool = False) -> None:
    """How a scan is read and placed, and what DICOM results to write (``predict`` and ``attribute``)."""
    parser.add_argument("--alignment", default="auto", choices=ALIGNMENTS,
                        help="how the scan is placed on the model grid (default auto: mni when the scan is already "
                        "in the model's space, else register); see README 'Scans'")
    parser.add_argument("--series", default="", metavar="UID",
                        help="which series of a DICOM directory holding several (SeriesInstanceUID)")
    parser.add_argument("--volume-index", type=int, default=None, metavar="N",
                        help="volume of a 4D scan or multi-volume DICOM series (0-based)")
    parser.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                        help="DICOM input: write the DICOM result objects there as <SOPInstanceUID>.dcm")
    if extras:
        parser.add_argument("--dicom-extras", default="", metavar="seg,sc",
                            help="with --dicom-out: also a Segmentation of the top clusters (seg) and a Secondary "
                            "Capture overlay (sc)")
    parser.add_argument("--deidentify", action="store_true",
                        help="with --dicom-out: results de-identified under the PS3.15 Basic Profile (UIDs remapped "
                        "with the server's key, or --deidentify-key-file with --local)")
    parser.add_argument("--deidentify-key-file", type=Path, default=None, metavar="F",
                        help="with --local --deidentify: key of the UID remapping (16-4096 bytes)")


def dicom_extras(args: Any) -> tuple[str, ...]:
    return tuple(e.strip() for e in (getattr(args, "dicom_extras", "") or "").split(",") if e.strip())


def check_dicom_out(args: Any) -> None:
    """Refuse DICOM-result flags that cannot be honoured, before any work."""
    if args.dicom_out is None:
        if args.deidentify or dicom_extras(args):
            raise errors.InvalidOptionError("--deidentify and --dicom-extras go with --dicom-out DIR",
                                            field="dicom_out")
        return
    if not args.dicom_out.is_dir():
        raise errors.NotFoundError(f"--dicom-out folder {str(args.dicom_out)!r} does not exist", field="dicom_out")


def write_dicom_objects(folder: Path, objects: Any) -> list[Path]:
    """Write each result object as ``folder/<SOPInstanceUID>.dcm``; returns the paths."""
    paths = []
    for obj in objects:
        path = folder / f"{obj.sop_instance_uid}.dcm"
        try:
            path.write_bytes(obj.data)
        except OSError as exc:
            raise errors.NotFoundError(f"cannot write {path}: {exc.strerror or exc}", field="dicom_out") from None
        paths.append(path)
    return paths


def parse_key_values(pairs: list[str] | None, flag: str = "--option") -> dict[str, str]:
    """``["n_steps=32", "baseline=blur"]`` -> ``{"n_steps": "32", "baseline": "blur"}``, without importing torch.

    Args:
        pairs: the repeated flag's values.
        flag: the flag's name, for messages.

    Returns:
        The options as strings; the server (or the library with ``--local``) checks names and values.

    Raises:
        InvalidOptionError: a pair is not ``KEY=VALUE`` or a key is given twice.
    """
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise errors.InvalidOptionError(f"{flag} {pair!r} must look like KEY=VALUE, e.g. n_steps=32", field=flag)
        if key.strip() in out:
            raise errors.InvalidOptionError(f"{flag} {key.strip()!r} is given twice", field=flag)
        out[key.strip()] = value.strip()
    return out
