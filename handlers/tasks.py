"""Attribution and feature visualization as the handler runs them: library calls in, (JSON header, bytes) out.

Kept apart from the handler class so the handler module defines exactly one class (TorchServe's loader requires it)
and so these adapters can be unit-tested without TorchServe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from neuroexplain import errors


def attribute(model: Any, scan: Any, alignment: Any, options: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Run one attribution; returns the result header and the map as gzipped NIfTI on the scan's grid."""
    raise errors.UnavailableError("attribution is not available in this model worker build")


def visualize(
    model: Any,
    scan: Any,
    alignment: Any,
    options: dict[str, Any],
    *,
    progress: Callable[..., None],
    should_cancel: Callable[[], bool],
) -> tuple[dict[str, Any], bytes]:
    """Run one feature visualization; returns the result header and the volume(s) as payload."""
    raise errors.UnavailableError("feature visualization is not available in this model worker build")
