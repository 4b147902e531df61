"""Change detection for files that are rotated while the server runs (token files, certificates, keys)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

# (inode, mtime in ns, size) per file, following symlinks: Kubernetes updates mounted Secrets by swapping a symlink
# (`..data`), which changes the inode; an editor's in-place rewrite changes mtime and usually the size.
Signature = tuple[tuple[int, int, int] | None, ...]


def signature(paths: Sequence[Path]) -> Signature:
    """What identifies the current content of ``paths`` without reading them; ``None`` for a missing file."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def warn_if_readable_by_others(path: Path, what: str, log: logging.Logger) -> None:
    """Log a warning when a secret file is readable by every user on the host.

    Group read is fine: Kubernetes Secret volumes give the pod's ``fsGroup`` read access (``defaultMode: 0440``).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o007:
        log.warning(
            "%s %s is readable by every user (mode %s); use chmod 600 or 640, or defaultMode: 0440 on the "
            "Kubernetes Secret volume", what, path, oct(mode & 0o777),
        )
