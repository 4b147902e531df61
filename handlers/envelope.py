"""The wire contract between the TorchServe backend (gateway side) and the custom handler (worker side).

TorchServe's gRPC ``PredictionsRequest`` carries ``map<string, bytes> input``; gRPC metadata never reaches the
handler, so everything travels in that map. The gateway's domain request (``service.backend.PredictRequest``,
``AttributeRequest``, ``VisualizeRequest``) is sent as-is:

==================  ==============================================================================================
key                 value
==================  ==============================================================================================
``task``            ``predict`` | ``attribute`` | ``visualize`` (ASCII)
``request``         the domain request as JSON, every ``bytes`` field replaced by ``{"$blob": PATH}``
``blob-PATH``       the bytes of that field (the scan), raw, never inside JSON (no ``:`` in the name: TorchServe's
                    REST multipart decoding drops such parts)
``job_id``          the computation's id; for attribute and visualize, the name of the cancel flag
                    (``[A-Za-z0-9_-]{1,64}``)
==================  ==============================================================================================

Every answer (and every streamed intermediate answer) is one *envelope*::

    b"NXE1" | uint32 big-endian header length | JSON header (UTF-8) | blob bytes, concatenated

The header holds ``kind`` (``result``, ``progress`` or ``error``), ``value`` (the domain result / progress, bytes
fields replaced by blob references) and ``blobs`` (``[[PATH, LENGTH], ...]``). Errors travel as envelopes
(TorchServe's own error path knows only HTTP codes) with the exception's class name from :mod:`neuroexplain.errors`,
so the gateway raises the same typed error the in-process backend would. The same domain types on both sides mean
the two backends answer byte-for-byte the same. This module is pure Python: the gateway imports it without torch.

Cancel flags: TorchServe never tells a busy worker that its client left (pytorch/serve#2814), so the gateway raises a
flag — a file named after the job id in the cancel directory both sides share — holding the wall-clock time it was
raised (:func:`raise_flag`). The handler polls it before every step (visualize) or model pass (attribute), reads that
time (:func:`flag_raised_at`) to report how many steps ran after it, and removes the flag when the job ends.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import json
import os
import re
import struct
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from neuroexplain import errors
from service.backend import Operation

MAGIC = b"NXE1"
_HEAD = struct.Struct("!4sI")
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_HEADER_BYTES = 16 << 20
BLOB_PREFIX = "blob-"
T = TypeVar("T")


class Kind(enum.Enum):
    """What an envelope carries."""

    RESULT = "result"
    PROGRESS = "progress"
    ERROR = "error"


@dataclass(frozen=True)
class Envelope:
    """One decoded answer: the JSON ``value`` and the blobs it refers to."""

    kind: Kind
    value: Any
    blobs: dict[str, bytes]


# ---------------------------------------------------------------------------------------------------------------------
# Dataclasses <-> JSON + blobs


def dump(obj: Any) -> tuple[Any, dict[str, bytes]]:
    """A dataclass as JSON-able data plus its ``bytes`` fields as separate blobs (keyed by field path).

    Fields marked ``compare=False`` (e.g. ``ScanInput.decoded``, an in-process shortcut) are not sent.
    """
    blobs: dict[str, bytes] = {}

    def walk(value: Any, path: str) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {
                f.name: walk(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
                for f in dataclasses.fields(value)
                if f.compare
            }
        if isinstance(value, (bytes, bytearray, memoryview)):
            blobs[path] = bytes(value)
            return {"$blob": path}
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{path}[{k}]") for k, v in value.items()}
        return value

    return walk(obj, ""), blobs


def load(cls: type[T], data: Any, blobs: Mapping[str, bytes]) -> T:
    """Rebuild a dataclass of type ``cls`` from :func:`dump`'s output.

    Raises:
        InvalidInputError: the data does not fit the type (a client of another version, or a forged request).
    """
    try:
        return typing.cast(T, _load(cls, data, blobs))
    except KeyError as exc:  # the key is a field path of our own types, never data
        raise errors.InvalidInputError(f"malformed {cls.__name__} on the model-server wire: field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise errors.InvalidInputError(f"malformed {cls.__name__} on the model-server wire: {type(exc).__name__}") from None


class _Lenient(dict):  # type: ignore[type-arg]
    """Names only imported under TYPE_CHECKING (``Scan`` of ``ScanInput.decoded``) resolve to Any; such fields
    are never on the wire (``compare=False``)."""

    def __missing__(self, key: str) -> Any:
        return Any


def _load(tp: Any, data: Any, blobs: Mapping[str, bytes]) -> Any:
    if isinstance(data, dict) and set(data) == {"$blob"}:
        return blobs[data["$blob"]]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if data is None else _load(options[0], data, blobs)
    if dataclasses.is_dataclass(tp):
        namespace = _Lenient({**vars(builtins), **vars(sys.modules[tp.__module__])})
        hints = typing.get_type_hints(tp, localns=namespace)
        names = {f.name for f in dataclasses.fields(tp) if f.compare and f.init}
        unknown = set(data) - names
        if unknown:
            raise KeyError(min(unknown))
        return tp(**{k: _load(hints[k], v, blobs) for k, v in data.items()})  # type: ignore[operator]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_load(args[0], v, blobs) for v in data)
        return tuple(_load(a, v, blobs) for a, v in zip(args, data, strict=True))
    if origin in (dict, Mapping):
        _key, val = typing.get_args(tp)
        return {str(k): _load(val, v, blobs) for k, v in data.items()}
    if tp is float:
        return float(data)
    if tp in (int, str, bool) and not isinstance(data, tp):
        raise TypeError(tp.__name__)
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Requests


def encode_request(task: Operation, request: Any, job_id: str | None = None) -> dict[str, bytes]:
    """The ``input`` map of a TorchServe ``PredictionsRequest`` (or the form fields of a REST call).

    Raises:
        InvalidOptionError: ``job_id`` has characters outside ``[A-Za-z0-9_-]`` or is longer than 64.
    """
    value, blobs = dump(request)
    fields = {"task": task.value.encode(), "request": json.dumps(value, sort_keys=True).encode()}
    fields.update({BLOB_PREFIX + path: data for path, data in blobs.items()})
    if job_id is not None:
        if not JOB_ID_PATTERN.match(job_id):
            raise errors.InvalidOptionError("job id must be 1-64 characters from [A-Za-z0-9_-]")
        fields["job_id"] = job_id.encode()
    return fields


def _field(row: Mapping[str, Any], name: str) -> bytes | None:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (dict, list)):  # TorchServe decoded an application/json part for us
        return json.dumps(value).encode()
    raise errors.InvalidInputError(f"request field {name!r} has type {type(value).__name__}; expected bytes")


def decode_request(row: Mapping[str, Any], request_types: Mapping[Operation, type]) -> tuple[Operation, Any, str | None]:
    """Decode one request row as TorchServe hands it to a handler (field name -> bytes, bytearray or str).

    Args:
        row: the request's fields.
        request_types: the domain request class for each task.

    Returns:
        ``(task, domain request, job id or None)``.

    Raises:
        InvalidInputError: a field is missing, malformed or has an unknown value.
    """
    raw_task = _field(row, "task")
    allowed = [t.value for t in Operation]
    if raw_task is None:
        raise errors.InvalidInputError(f"request has no 'task' field; expected one of {allowed}")
    try:
        task = Operation(raw_task.decode("ascii", errors="replace").strip())
    except ValueError:
        raise errors.InvalidOptionError(f"unknown task; expected one of {allowed}") from None
    raw_request = _field(row, "request")
    if raw_request is None:
        raise errors.InvalidInputError("request has no 'request' field")
    try:
        value = json.loads(raw_request)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise errors.InvalidInputError("the 'request' field is not valid JSON") from None
    blobs = {k[len(BLOB_PREFIX) :]: _field(row, k) or b"" for k in row if k.startswith(BLOB_PREFIX)}
    request: Any = load(request_types[task], value, blobs)
    raw_job = _field(row, "job_id")
    job_id = None
    if raw_job is not None:
        job_id = raw_job.decode("ascii", errors="replace")
        if not JOB_ID_PATTERN.match(job_id):
            raise errors.InvalidOptionError("job id must be 1-64 characters from [A-Za-z0-9_-]")
    return task, request, job_id


# ---------------------------------------------------------------------------------------------------------------------
# Cancel flags


def raise_flag(flag: Path, at: float) -> None:
    """Raise a job's cancel flag, holding ``at`` (``time.time()``); written aside and renamed, so a reader never sees a
    half-written file."""
    aside = flag.with_name(f".{flag.name}.raising")
    aside.write_text(f"{at:.6f}")
    os.replace(aside, flag)


def flag_raised_at(flag: Path) -> float | None:
    """When a flag was raised (``time.time()``), or None while it is not raised.

    The later of the time the gateway wrote and the file's change time (set by the rename that made it visible,
    coarse: a clock tick): a gateway thread descheduled between the two does not count as time the flag was up.
    """
    try:
        text = flag.read_text()
        changed = flag.stat().st_ctime
    except OSError:
        return None
    try:
        return max(float(text), changed)
    except ValueError:  # a flag from an older gateway (an empty file)
        return changed


# ---------------------------------------------------------------------------------------------------------------------
# Answers


def encode(kind: Kind, value: Any) -> bytes:
    """Serialise one envelope around a dataclass (or plain JSON-able data)."""
    data, blobs = dump(value)
    header = {"kind": kind.value, "value": data, "blobs": [[k, len(v)] for k, v in blobs.items()]}
    body = json.dumps(header, sort_keys=True).encode()
    return _HEAD.pack(MAGIC, len(body)) + body + b"".join(blobs.values())


def encode_error(exc: BaseException) -> bytes:
    """An error envelope; classes outside the project's tree are reported as a generic internal error."""
    if isinstance(exc, errors.NeuroExplainError):
        # A library subclass (e.g. featvis' VisualizationCancelled) travels as its nearest class of the tree.
        name = next(c.__name__ for c in type(exc).__mro__ if _ERROR_TYPES.get(c.__name__) is c)
        return encode(Kind.ERROR, {"type": name, "message": str(exc)})
    return encode(Kind.ERROR, {"type": "InternalError", "message": "internal error in the model worker"})


def decode(raw: bytes) -> Envelope:
    """Parse one envelope.

    Raises:
        UnavailableError: the bytes are not an envelope (a worker of another version, or TorchServe's own error).
    """
    raw = bytes(raw)
    if len(raw) < _HEAD.size:
        raise errors.UnavailableError("the model worker sent a truncated answer")
    magic, length = _HEAD.unpack_from(raw)
    if magic != MAGIC or length > MAX_HEADER_BYTES or _HEAD.size + length > len(raw):
        raise errors.UnavailableError("the model worker sent an answer in an unknown format")
    header = json.loads(raw[_HEAD.size : _HEAD.size + length])
    blobs, offset = {}, _HEAD.size + length
    for path, size in header.get("blobs", []):
        blobs[str(path)] = raw[offset : offset + int(size)]
        offset += int(size)
    if offset != len(raw):
        raise errors.UnavailableError("the model worker sent an answer of inconsistent length")
    return Envelope(kind=Kind(header["kind"]), value=header.get("value"), blobs=blobs)


_ERROR_TYPES: dict[str, type[errors.NeuroExplainError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.NeuroExplainError)
}


def raise_if_error(envelope: Envelope) -> Envelope:
    """Re-raise an error envelope as the typed exception the worker raised; return any other envelope."""
    if envelope.kind is not Kind.ERROR:
        return envelope
    value = envelope.value if isinstance(envelope.value, dict) else {}
    message = str(value.get("message", "the model worker failed"))
    cls = _ERROR_TYPES.get(str(value.get("type")))
    if cls is None:
        raise RuntimeError(message)  # unmapped: the gateway's interceptor turns it into INTERNAL
    raise cls(message)
