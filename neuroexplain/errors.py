"""One exception tree for the whole project, and the one table of gRPC status codes.

Every message says what was wrong and what is allowed. Messages never contain patient data: no file names from a
scan's header, no header text, no voxel values.

Each class names its gRPC status once, as a plain string in ``code`` (the library never imports grpc). The gateway
maps an exception to a status with :func:`status_name`; the client inverts the same table with :func:`error_class`.
An optional ``field`` names the request field or option that was wrong, so a gateway can attach a
``google.rpc.BadRequest`` detail.
"""

from __future__ import annotations

from typing import ClassVar


class NeuroExplainError(Exception):
    """Root of every error the library raises on purpose (UNKNOWN unless a subclass says otherwise).

    Args:
        message: what was wrong and what is allowed; never patient data.
        field: optional name of the request field or option that was wrong (e.g. ``"options.steps"``).
    """

    code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str = "", *args: object, field: str | None = None) -> None:
        super().__init__(message, *args)
        self.field = field


class InvalidInputError(NeuroExplainError):
    """The caller sent something malformed or out of range (INVALID_ARGUMENT)."""

    code: ClassVar[str] = "INVALID_ARGUMENT"


class ScanFormatError(InvalidInputError):
    """The bytes are not a readable NIfTI-1, NIfTI-2 or MGH/MGZ volume."""


class ScanGeometryError(InvalidInputError):
    """The volume's dimensions or affine cannot be used (2D, 5D, singular affine, ...)."""


class ScanDataError(InvalidInputError):
    """The voxel data cannot be used (NaN/Inf, constant image, ...)."""


class InvalidOptionError(InvalidInputError):
    """An option is unknown, out of range or contradicts another option."""


class FailedPreconditionError(NeuroExplainError):
    """The request is well formed but the system is not in a state to run it (FAILED_PRECONDITION).

    For example an input check run with ``--input-check reject`` found the scan unlike the model's training data.
    """

    code: ClassVar[str] = "FAILED_PRECONDITION"

    @classmethod
    def unlike_training(cls, reason: str, score: float, threshold: float) -> FailedPreconditionError:
        """The refusal of ``--input-check reject`` (library and gateway say it the same way). ``reason`` is built
        from check names and fractions only, never from patient data."""
        return cls(f"input check: the scan is unlike the model's training data: {reason} (score {score:.2f} above "
                   f"threshold {threshold:.2f}); send a skull-stripped T1 scan in the model's space, or ask for a "
                   "server running with --input-check warn", field="input_check")


class ResourceExhaustedError(NeuroExplainError):
    """A resource ran out (RESOURCE_EXHAUSTED): memory (host or CUDA), queue slots."""

    code: ClassVar[str] = "RESOURCE_EXHAUSTED"


class LimitExceededError(ResourceExhaustedError):
    """A configured size limit was hit (RESOURCE_EXHAUSTED): voxels, bytes, steps, concurrency."""


class OutOfMemoryError(ResourceExhaustedError):
    """The computation ran out of host or accelerator memory (RESOURCE_EXHAUSTED); a smaller request may succeed."""


class NotFoundError(NeuroExplainError):
    """A named thing does not exist (NOT_FOUND): model, layer, scan digest."""

    code: ClassVar[str] = "NOT_FOUND"


class CancelledError(NeuroExplainError):
    """The computation was cancelled because its caller went away (CANCELLED)."""

    code: ClassVar[str] = "CANCELLED"


class DeadlineExceededError(NeuroExplainError):
    """The caller's deadline passed before the work finished (DEADLINE_EXCEEDED)."""

    code: ClassVar[str] = "DEADLINE_EXCEEDED"


class UnavailableError(NeuroExplainError):
    """A backend is not ready or went away; retrying later may succeed (UNAVAILABLE)."""

    code: ClassVar[str] = "UNAVAILABLE"


class UnimplementedError(NeuroExplainError):
    """The request uses a field or mode this server does not offer yet (UNIMPLEMENTED); the message names it."""

    code: ClassVar[str] = "UNIMPLEMENTED"


class UnauthenticatedError(NeuroExplainError):
    """The caller sent no credentials or unknown ones (UNAUTHENTICATED)."""

    code: ClassVar[str] = "UNAUTHENTICATED"


class PermissionDeniedError(NeuroExplainError):
    """The caller is known but its credentials do not allow this model or operation (PERMISSION_DENIED)."""

    code: ClassVar[str] = "PERMISSION_DENIED"


#: For each status name, the class the client raises: the most general class that names it. LimitExceededError
#: stays the RESOURCE_EXHAUSTED class on the client side, as before (it is a ResourceExhaustedError).
_CLIENT_CLASS: dict[str, type[NeuroExplainError]] = {}


def _is_memory_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a host MemoryError or an accelerator out-of-memory error (recognised without torch).

    Args:
        exc: any exception.

    Returns:
        True for MemoryError and for ``torch.cuda.OutOfMemoryError`` / ``torch.OutOfMemoryError`` (by class name).
    """
    if isinstance(exc, MemoryError):
        return True
    return any(cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch") for cls in type(exc).__mro__)


def status_name(exc: BaseException) -> str | None:
    """The gRPC status name for an exception, from the one table (each class's ``code``).

    Args:
        exc: any exception.

    Returns:
        The status name (``"INVALID_ARGUMENT"``, ...) for the project's errors, ``"RESOURCE_EXHAUSTED"`` for a
        MemoryError or a CUDA out-of-memory error, else ``None`` (the caller reports INTERNAL without details).
    """
    if isinstance(exc, NeuroExplainError):
        return exc.code
    if _is_memory_error(exc):
        return "RESOURCE_EXHAUSTED"
    return None


def error_class(code: str) -> type[NeuroExplainError] | None:
    """The inverse of the table: the class a client raises for a status name.

    Args:
        code: a gRPC status name such as ``"NOT_FOUND"``.

    Returns:
        The most general project class whose ``code`` is ``code`` (``LimitExceededError`` for RESOURCE_EXHAUSTED,
        so callers that catch it keep working), or ``None`` if no class names that status.
    """
    if not _CLIENT_CLASS:
        for cls in _all_classes(NeuroExplainError):
            if cls.code != "UNKNOWN":
                _CLIENT_CLASS.setdefault(cls.code, cls)
        _CLIENT_CLASS["RESOURCE_EXHAUSTED"] = LimitExceededError
    return _CLIENT_CLASS.get(code)


def _all_classes(root: type[NeuroExplainError]) -> list[type[NeuroExplainError]]:
    """Every subclass of ``root`` (breadth first, so general classes come before their subclasses).

    Args:
        root: the class to start from.

    Returns:
        The subclasses, root excluded.
    """
    found: list[type[NeuroExplainError]] = []
    queue = list(root.__subclasses__())
    while queue:
        cls = queue.pop(0)
        found.append(cls)
        queue.extend(cls.__subclasses__())
    return found


def from_status(code: str, message: str) -> NeuroExplainError | None:
    """Rebuild an exception from a status name and message (client side, or ``--local`` JSON codes).

    Args:
        code: a gRPC status name.
        message: the server's message.

    Returns:
        An instance of :func:`error_class`'s class, or ``None`` if no class names ``code``.
    """
    cls = error_class(code)
    return None if cls is None else cls(message)
