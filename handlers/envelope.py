"""The wire contract between the TorchServe backend (gateway side) and the custom handler (worker side).

TorchServe's gRPC ``PredictionsRequest`` carries ``map<string, bytes> input``; gRPC metadata never reaches the
handler, so everything travels in that map:

=============  =====================================================================================
key            value
=============  =====================================================================================
``task``       ``predict`` | ``attribute`` | ``visualize`` (ASCII)
``scan``       the scan's bytes (any format :func:`neuroexplain.volumes.read_scan` reads); optional for visualize
``options``    canonical JSON object of the operation's options (UTF-8)
``job_id``     visualize only: the id the gateway raises a cancel flag for (``[A-Za-z0-9_-]{1,64}``)
=============  =====================================================================================

Every answer (and every streamed intermediate answer) is one *envelope*::

    b"NXE1" | uint32 big-endian header length | JSON header (UTF-8) | payload bytes

The header's ``kind`` is ``result``, ``progress`` or ``error``. Errors travel as envelopes (TorchServe's own error
path knows only HTTP codes), with the exception class name from :mod:`neuroexplain.errors`, so the gateway raises
the same typed error the in-process backend would. This module is pure Python: the gateway imports it without torch.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from neuroexplain import errors

MAGIC = b"NXE1"
_HEAD = struct.Struct("!4sI")
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_HEADER_BYTES = 16 << 20


class Task(enum.Enum):
    """What a request asks the handler to do."""

    PREDICT = "predict"
    ATTRIBUTE = "attribute"
    VISUALIZE = "visualize"


class Kind(enum.Enum):
    """What an envelope carries."""

    RESULT = "result"
    PROGRESS = "progress"
    ERROR = "error"


@dataclass(frozen=True)
class Request:
    """One decoded request, as the handler sees it."""

    task: Task
    scan: bytes | None = None
    options: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None


@dataclass(frozen=True)
class Envelope:
    """One decoded answer: a JSON header and an optional binary payload (a NIfTI volume)."""

    kind: Kind
    header: dict[str, Any]
    payload: bytes = b""


def encode_request(
    task: Task, *, scan: bytes | None = None, options: dict[str, Any] | None = None, job_id: str | None = None
) -> dict[str, bytes]:
    """The ``input`` map of a TorchServe ``PredictionsRequest`` (or the form fields of a REST call).

    Args:
        task: the operation.
        scan: the scan's bytes, if the operation takes one.
        options: JSON-serialisable options; encoded canonically (sorted keys).
        job_id: the cancel-flag id, for visualize.

    Returns:
        Field name -> bytes.

    Raises:
        InvalidOptionError: ``job_id`` has characters outside ``[A-Za-z0-9_-]`` or is longer than 64.
    """
    fields = {"task": task.value.encode(), "options": json.dumps(options or {}, sort_keys=True).encode()}
    if scan is not None:
        fields["scan"] = bytes(scan)
    if job_id is not None:
        if not JOB_ID_PATTERN.match(job_id):
            raise errors.InvalidOptionError("job id must be 1-64 characters from [A-Za-z0-9_-]")
        fields["job_id"] = job_id.encode()
    return fields


def _field(row: dict[str, Any], name: str) -> bytes | None:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):  # TorchServe decoded an application/json part for us
        return json.dumps(value).encode()
    raise errors.InvalidInputError(f"request field {name!r} has type {type(value).__name__}; expected bytes")


def decode_request(row: dict[str, Any]) -> Request:
    """Decode one request row as TorchServe hands it to a handler (field name -> bytes, bytearray or str).

    Raises:
        InvalidInputError: a field is missing, malformed or has an unknown value.
    """
    raw_task = _field(row, "task")
    if raw_task is None:
        raise errors.InvalidInputError(f"request has no 'task' field; expected one of {[t.value for t in Task]}")
    try:
        task = Task(raw_task.decode("ascii", errors="replace").strip())
    except ValueError:
        raise errors.InvalidOptionError(f"unknown task; expected one of {[t.value for t in Task]}") from None
    raw_options = _field(row, "options") or b"{}"
    try:
        options = json.loads(raw_options)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise errors.InvalidOptionError("request options are not valid JSON") from None
    if not isinstance(options, dict):
        raise errors.InvalidOptionError("request options must be a JSON object")
    raw_job = _field(row, "job_id")
    job_id = None
    if raw_job is not None:
        job_id = raw_job.decode("ascii", errors="replace")
        if not JOB_ID_PATTERN.match(job_id):
            raise errors.InvalidOptionError("job id must be 1-64 characters from [A-Za-z0-9_-]")
    return Request(task=task, scan=_field(row, "scan"), options=options, job_id=job_id)


def encode(kind: Kind, header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Serialise one envelope."""
    body = json.dumps({**header, "kind": kind.value}, sort_keys=True).encode()
    return _HEAD.pack(MAGIC, len(body)) + body + payload


def encode_error(exc: BaseException) -> bytes:
    """An error envelope; classes outside the project's tree are reported as a generic internal error."""
    if isinstance(exc, errors.NeuroExplainError):
        return encode(Kind.ERROR, {"type": type(exc).__name__, "message": str(exc)})
    return encode(Kind.ERROR, {"type": "InternalError", "message": "internal error in the model worker"})


def decode(raw: bytes) -> Envelope:
    """Parse one envelope.

    Raises:
        UnavailableError: the bytes are not an envelope (a worker of another version, or TorchServe's own error).
    """
    if len(raw) < _HEAD.size:
        raise errors.UnavailableError("model worker sent a truncated answer")
    magic, length = _HEAD.unpack_from(raw)
    if magic != MAGIC or length > MAX_HEADER_BYTES or _HEAD.size + length > len(raw):
        raise errors.UnavailableError("model worker sent an answer in an unknown format")
    header = json.loads(raw[_HEAD.size : _HEAD.size + length])
    return Envelope(kind=Kind(header.pop("kind")), header=header, payload=bytes(raw[_HEAD.size + length :]))


_ERROR_TYPES: dict[str, type[errors.NeuroExplainError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.NeuroExplainError)
}


def raise_if_error(envelope: Envelope) -> Envelope:
    """Re-raise an error envelope as the typed exception the worker raised; return any other envelope."""
    if envelope.kind is not Kind.ERROR:
        return envelope
    message = str(envelope.header.get("message", "model worker failed"))
    cls = _ERROR_TYPES.get(str(envelope.header.get("type")))
    if cls is None:
        raise RuntimeError(message)  # unmapped: the gateway's interceptor turns it into INTERNAL
    raise cls(message)
