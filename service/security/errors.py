"""Errors of the security layer."""

from __future__ import annotations

from neuroexplain.errors import InvalidOptionError


class SecurityConfigError(InvalidOptionError):
    """A certificate, key, token file or security setting cannot be used; the server refuses to start."""
