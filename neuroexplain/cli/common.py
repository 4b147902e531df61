"""Helpers shared by the client commands, importable without numpy or torch (the light install)."""

from __future__ import annotations

from pathlib import Path

from neuroexplain import errors

SCAN_SUFFIXES = (".nii", ".nii.gz", ".mgh", ".mgz")


def load_scan_arg(path: str | Path) -> Path:
    """Check a SCAN argument of the command line and return it as a path (the one place that does).

    A directory will become a DICOM series input; until that lands it is refused with a message that says so.

    Args:
        path: what the user typed.

    Returns:
        The path of an existing, readable file.

    Raises:
        UnimplementedError: ``path`` is a directory (DICOM series input is not available yet).
        NotFoundError: ``path`` does not exist or cannot be read.
    """
    p = Path(path)
    if p.is_dir():
        raise errors.UnimplementedError(
            f"{p} is a directory: DICOM series input is not available yet; give one {', '.join(SCAN_SUFFIXES)} file",
            field="scan")
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise errors.NotFoundError(f"cannot read scan file {p}: {exc.strerror or exc}", field="scan") from None
    return p


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
