"""One exception tree for the whole project.

Every message says what was wrong and what is allowed. Messages never contain patient data: no file names from a
scan's header, no header text, no voxel values. The gateway maps these classes to gRPC status codes in one table.
"""

from __future__ import annotations


class NeuroExplainError(Exception):
    """Root of every error the library raises on purpose."""


class InvalidInputError(NeuroExplainError):
    """The caller sent something malformed or out of range (INVALID_ARGUMENT)."""


class ScanFormatError(InvalidInputError):
    """The bytes are not a readable NIfTI-1, NIfTI-2 or MGH/MGZ volume."""


class ScanGeometryError(InvalidInputError):
    """The volume's dimensions or affine cannot be used (2D, 5D, singular affine, ...)."""


class ScanDataError(InvalidInputError):
    """The voxel data cannot be used (NaN/Inf, constant image, ...)."""


class InvalidOptionError(InvalidInputError):
    """An option is unknown, out of range or contradicts another option."""


class LimitExceededError(NeuroExplainError):
    """A configured size limit was hit (RESOURCE_EXHAUSTED): voxels, bytes, steps, concurrency."""


class NotFoundError(NeuroExplainError):
    """A named thing does not exist (NOT_FOUND): model, layer, scan digest."""


class CancelledError(NeuroExplainError):
    """The computation was cancelled because its caller went away (CANCELLED)."""


class DeadlineExceededError(NeuroExplainError):
    """The caller's deadline passed before the work finished (DEADLINE_EXCEEDED)."""


class UnavailableError(NeuroExplainError):
    """A backend is not ready or went away; retrying later may succeed (UNAVAILABLE)."""


class UnimplementedError(NeuroExplainError):
    """The request uses a field or mode this server does not offer yet (UNIMPLEMENTED); the message names it."""


class PermissionDeniedError(NeuroExplainError):
    """The caller is known but its credentials do not allow this model or operation (PERMISSION_DENIED)."""
