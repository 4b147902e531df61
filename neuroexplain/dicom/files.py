"""Collect a DICOM series' files from a directory, with the standard library only (no numpy, no pydicom).

The light client and the PACS bridge use this to send a folder as ``Scan.dicom.instances``; the library's
:func:`neuroexplain.dicom.read_series_dir` uses it too, so both sides agree on which files count: regular files of
any name, in any subfolder, that start with the DICOM Part 10 preamble (128 bytes + ``DICM``). Everything else is
ignored. Counts and sizes are checked before a file is read whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from neuroexplain.errors import LimitExceededError, ScanFormatError

MiB = 1 << 20
PREAMBLE = 132


def is_dicom(raw: bytes) -> bool:
    """Whether bytes look like a DICOM Part 10 file (128-byte preamble + ``DICM``)."""
    return len(raw) >= PREAMBLE and raw[128:132] == b"DICM"


def series_digest(instances: Sequence[bytes]) -> str:
    """SHA-256 digest of a DICOM series that does not depend on the order of its instances.

    SHA-256 over the sorted SHA-256 digests of the instances (prefixed ``nx-dicom-series\\0``): the same value the
    gateway's scan store and cache use, computable before anything is decoded. Which series is read
    (``series_uid``) and which volume (``volume_index``) are reading options beside it, as for a 4D NIfTI.

    Args:
        instances: the instances' bytes, as sent (or every DICOM file of a directory).

    Returns:
        Lower-case hex digest.
    """
    parts = sorted(hashlib.sha256(bytes(raw)).digest() for raw in instances)
    return hashlib.sha256(b"nx-dicom-series\0" + b"".join(parts)).hexdigest()


def collect_instances(
    path: str | Path,
    *,
    max_files: int = 4 * 8192,
    max_instances: int = 8192,
    max_instance_bytes: int = 256 * MiB,
    max_total_bytes: int = 256 * MiB,
) -> list[bytes]:
    """The DICOM Part 10 files under a directory, as bytes, in path order.

    Args:
        path: the directory.
        max_files: at most this many files are examined.
        max_instances: at most this many DICOM files are accepted.
        max_instance_bytes: largest DICOM file accepted.
        max_total_bytes: total size of the DICOM files accepted.

    Returns:
        Each DICOM file's bytes.

    Raises:
        ScanFormatError: not a readable directory.
        LimitExceededError: a cap was exceeded (before the offending file is read whole).
        ScanFormatError: also when the directory holds no DICOM file at all.
    """
    root = Path(path)
    if not root.is_dir():
        raise ScanFormatError("DICOM input must be a directory holding one series; the path is not a directory")
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file())
    except OSError as exc:
        raise ScanFormatError(f"cannot list the DICOM directory: {exc.strerror}") from None
    if len(files) > max_files:
        raise LimitExceededError(f"directory holds {len(files)} files; at most {max_files} are examined")
    instances: list[bytes] = []
    total = 0
    for p in files:
        try:
            size = p.stat().st_size
            if size < PREAMBLE:
                continue
            with p.open("rb") as fh:
                if not is_dicom(fh.read(PREAMBLE)):
                    continue
                if size > max_instance_bytes:
                    raise LimitExceededError(
                        f"a file has {size} bytes; the limit is {max_instance_bytes} bytes per instance"
                    )
                total += size
                if total > max_total_bytes:
                    raise LimitExceededError(
                        f"directory holds more than {max_total_bytes} bytes of DICOM; that is the limit"
                    )
                if len(instances) >= max_instances:
                    raise LimitExceededError(
                        f"directory holds more than {max_instances} DICOM files; the limit is {max_instances}"
                    )
                fh.seek(0)
                instances.append(fh.read())
        except OSError as exc:
            raise ScanFormatError(f"cannot read a file in the DICOM directory: {exc.strerror}") from None
    if not instances:
        raise ScanFormatError(f"the directory holds no DICOM files ({len(files)} other files); give a NIfTI/MGH file "
                              "or a directory holding one DICOM series")
    return instances
