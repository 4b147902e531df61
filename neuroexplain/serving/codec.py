"""The one codec of the serving types: between the gateway and the TorchServe worker, and for cached results.

A *frame* wraps one value (a request, a result, a progress event or an error)::

    b"NXE1" | uint32 big-endian header length | JSON header (UTF-8) | blob bytes, concatenated

The header holds ``kind`` (``request``, ``result``, ``progress`` or ``error``), ``type`` (the dataclass' name),
``value`` (the dataclass as JSON, every ``bytes`` field replaced by ``{"$blob": PATH}``) and ``blobs``
(``[[PATH, LENGTH], ...]``): bytes never travel inside JSON, and nothing is pickled (a shared Redis must never be
able to run code in the gateway). Enums travel as their values. Errors carry the exception's class name from
:mod:`neuroexplain.errors`, so the receiver raises the same typed error the sender did.

TorchServe's gRPC request carries ``map<string, bytes> input`` and gRPC metadata never reaches the handler, so a
request travels as that map (:func:`encode_request`): ``task`` (the operation), ``request`` (a frame) and, for
cancellable work, ``job_id`` (the cancel flag's name, see :mod:`neuroexplain.serving.cancel`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
import struct
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from neuroexplain import errors
from neuroexplain.serving.types import REQUEST_TYPES, RESULT_TYPES, Operation, Progress

MAGIC = b"NXE1"
_HEAD = struct.Struct("!4sI")
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_HEADER_BYTES = 16 << 20
T = TypeVar("T")

_TYPES: dict[str, type] = {t.__name__: t for t in (*RESULT_TYPES.values(), *REQUEST_TYPES.values(), Progress)}


class Kind(enum.Enum):
    """What a frame carries."""

    REQUEST = "request"
    RESULT = "result"
    PROGRESS = "progress"
    ERROR = "error"


@dataclass(frozen=True)
class Frame:
    """One decoded frame: the JSON ``value``, its declared type name and the blobs it refers to."""

    kind: Kind
    type_name: str
    value: Any
    blobs: dict[str, bytes]

    def load(self, cls: type[T]) -> T:
        """The frame's value as ``cls`` (which must be the type the sender declared)."""
        if self.type_name and self.type_name != cls.__name__:
            raise errors.InvalidInputError(f"expected a {cls.__name__} on the model-server wire; got {self.type_name}")
        return load(cls, self.value, self.blobs)

    def typed(self) -> Any:
        """The frame's value as the serving type its header names."""
        cls = _TYPES.get(self.type_name)
        if cls is None:
            raise errors.InvalidInputError(f"unknown type {self.type_name!r} on the model-server wire")
        return load(cls, self.value, self.blobs)


# ---------------------------------------------------------------------------------------------------------------------
# Dataclasses <-> JSON + blobs


def dump(obj: Any) -> tuple[Any, dict[str, bytes]]:
    """A dataclass as JSON-able data plus its ``bytes`` fields as separate blobs (keyed by field path)."""
    blobs: dict[str, bytes] = {}

    def walk(value: Any, path: str) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: walk(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
                    for f in dataclasses.fields(value)}
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
        InvalidInputError: the data does not fit the type (a peer of another version, or a forged frame).
    """
    try:
        return typing.cast(T, _load(cls, data, blobs))
    except KeyError as exc:  # the key is a field path of our own types, never data
        raise errors.InvalidInputError(f"malformed {cls.__name__} on the model-server wire: field {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise errors.InvalidInputError(f"malformed {cls.__name__} on the model-server wire: {type(exc).__name__}") from None


@functools.cache
def _hints(tp: type) -> tuple[dict[str, Any], frozenset[str]]:
    return typing.get_type_hints(tp), frozenset(f.name for f in dataclasses.fields(tp) if f.init)


def _load(tp: Any, data: Any, blobs: Mapping[str, bytes]) -> Any:
    if isinstance(data, dict) and set(data) == {"$blob"}:
        return blobs[data["$blob"]]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if data is None else _load(options[0], data, blobs)
    if dataclasses.is_dataclass(tp):
        hints, names = _hints(tp)  # type: ignore[arg-type]
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
    if origin in (dict, Mapping, typing.get_origin(Mapping[str, str])):
        _key, val = typing.get_args(tp)
        return {str(k): _load(val, v, blobs) for k, v in data.items()}
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise TypeError(tp.__name__)
        return float(data)
    if tp in (int, str, bool) and not isinstance(data, tp):
        raise TypeError(tp.__name__)
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Frames


def encode(kind: Kind, value: Any) -> bytes:
    """Serialise one frame around a serving dataclass (or plain JSON-able data, for errors)."""
    data, blobs = dump(value)
    type_name = type(value).__name__ if dataclasses.is_dataclass(value) else ""
    header = {"kind": kind.value, "type": type_name, "value": data, "blobs": [[k, len(v)] for k, v in blobs.items()]}
    body = json.dumps(header, sort_keys=True).encode()
    return _HEAD.pack(MAGIC, len(body)) + body + b"".join(blobs.values())


def decode(raw: bytes) -> Frame:
    """Parse one frame.

    Raises:
        UnavailableError: the bytes are not a frame (a peer of another version, or TorchServe's own error).
    """
    raw = bytes(raw)
    if len(raw) < _HEAD.size:
        raise errors.UnavailableError("the model worker sent a truncated answer")
    magic, length = _HEAD.unpack_from(raw)
    if magic != MAGIC or length > MAX_HEADER_BYTES or _HEAD.size + length > len(raw):
        raise errors.UnavailableError("the model worker sent an answer in an unknown format")
    try:
        header = json.loads(raw[_HEAD.size : _HEAD.size + length])
        blobs, offset = {}, _HEAD.size + length
        for path, size in header.get("blobs", []):
            blobs[str(path)] = raw[offset : offset + int(size)]
            offset += int(size)
        kind = Kind(header["kind"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise errors.UnavailableError("the model worker sent a malformed answer") from None
    if offset != len(raw):
        raise errors.UnavailableError("the model worker sent an answer of inconsistent length")
    return Frame(kind=kind, type_name=str(header.get("type", "")), value=header.get("value"), blobs=blobs)


_ERROR_TYPES: dict[str, type[errors.NeuroExplainError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.NeuroExplainError)
}


def encode_error(exc: BaseException) -> bytes:
    """An error frame; classes outside the project's tree are reported as a generic internal error."""
    if isinstance(exc, errors.NeuroExplainError):
        # A library subclass (e.g. featvis' VisualizationCancelled) travels as its nearest class of the tree.
        name = next(c.__name__ for c in type(exc).__mro__ if _ERROR_TYPES.get(c.__name__) is c)
        return encode(Kind.ERROR, {"type": name, "message": str(exc)})
    return encode(Kind.ERROR, {"type": "InternalError", "message": "internal error in the model worker"})


def raise_if_error(frame: Frame) -> Frame:
    """Re-raise an error frame as the typed exception the worker raised; return any other frame."""
    if frame.kind is not Kind.ERROR:
        return frame
    value = frame.value if isinstance(frame.value, dict) else {}
    message = str(value.get("message", "the model worker failed"))
    cls = _ERROR_TYPES.get(str(value.get("type")))
    if cls is None:
        raise RuntimeError(message)  # unmapped: the gateway's interceptor turns it into INTERNAL
    raise cls(message)


def encode_result(result: Any) -> bytes:
    """A result frame (what the cache stores and the worker answers)."""
    return encode(Kind.RESULT, result)


def decode_result(raw: bytes) -> Any:
    """Inverse of :func:`encode_result`: the typed result.

    Raises:
        NeuroExplainError: ``UnavailableError`` for bytes that are no frame, ``InvalidInputError`` for a frame that
            does not fit its type.
    """
    frame = decode(raw)  # an error frame is not a result: refused below, never raised as the stored error
    if frame.kind is not Kind.RESULT or frame.type_name not in {t.__name__ for t in RESULT_TYPES.values()}:
        raise errors.InvalidInputError(f"expected a result frame; got {frame.kind.value} {frame.type_name!r}")
    return frame.typed()


# ---------------------------------------------------------------------------------------------------------------------
# TorchServe's request map


def encode_request(task: Operation, request: Any, job_id: str | None = None) -> dict[str, bytes]:
    """The ``input`` map of a TorchServe ``PredictionsRequest`` (or the form fields of a REST call).

    Raises:
        InvalidOptionError: ``job_id`` has characters outside ``[A-Za-z0-9_-]`` or is longer than 64.
    """
    fields = {"task": task.value.encode(), "request": encode(Kind.REQUEST, request)}
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
    raise errors.InvalidInputError(f"request field {name!r} has type {type(value).__name__}; expected bytes")


def decode_request(row: Mapping[str, Any]) -> tuple[Operation, Any, str | None]:
    """Decode one request row as TorchServe hands it to a handler (field name -> bytes, bytearray or str).

    Returns:
        ``(task, serving request, job id or None)``.

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
        frame = decode(raw_request)
    except errors.UnavailableError:
        raise errors.InvalidInputError("the 'request' field is not a request frame") from None
    if frame.kind is not Kind.REQUEST:
        raise errors.InvalidInputError(f"the 'request' field holds a {frame.kind.value} frame, not a request")
    request: Any = frame.load(REQUEST_TYPES[task])
    raw_job = _field(row, "job_id")
    job_id = None
    if raw_job is not None:
        job_id = raw_job.decode("ascii", errors="replace")
        if not JOB_ID_PATTERN.match(job_id):
            raise errors.InvalidOptionError("job id must be 1-64 characters from [A-Za-z0-9_-]")
    return task, request, job_id
