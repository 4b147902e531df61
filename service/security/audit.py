"""Audit log: one JSON object per line per call, on its own logger (``neuroexplain.audit``) and its own stream.

A line is written when a call ends, whether it was served or refused::

    {"time": "2026-11-27T00:12:03.512Z", "event": "rpc", "rpc": "/neuroexplain.v1.NeuroExplain/Predict",
     "caller": "pacs-bridge", "auth": "token", "cert_subject": null, "peer": "ipv4:10.0.3.7:52114",
     "model": "lesion", "scan_digest": "9f2c...", "method": "integrated_gradients", "target": "lesion",
     "result_digest": "41b7...", "code": "OK", "duration_s": 0.8421}

``time`` is when the call arrived (UTC), ``caller`` the token's name or, without tokens, the client certificate's
subject (``null`` when the caller could not be identified), ``auth`` how it was identified (``token``, ``mtls`` or
``none``). ``model`` and ``scan_digest`` are filled in by the service through :func:`annotate` (or read from the
request); the scan is only ever named by the SHA-256 of its bytes. ``method`` (Attribute's attribution method) and
``target`` (Attribute's class, Visualize's ``class:…``/``channel:…``/``neuron:…``) come from the request (``null``
where the RPC has none, or the field was left empty). ``result_digest`` is the SHA-256 of what the caller received:
the response message serialized deterministically (for Visualize, the last streamed message: the result), so a
result handed on later can be matched to the call that produced it; ``null`` when the call answered nothing.
Health checks are not audited: kubelet asks every few seconds.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import json
import logging
import logging.handlers
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUDIT_LOGGER = "neuroexplain.audit"
MAX_FIELD_CHARS = 128  # method/target come from the caller: a line stays one short line whatever was sent


@dataclass
class CallRecord:
    """What is known about one call while it runs; owned by the thread serving it."""

    rpc: str
    peer: str
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    caller: str | None = None
    auth: str = "none"
    cert_subject: str | None = None
    model: str | None = None
    scan_digest: str | None = None
    method: str | None = None
    target: str | None = None
    result_digest: str | None = None
    grant: Any = None  # the token's service.security.tokens.Grant (what it may use); not written to the line

    def line(self, code: str) -> str:
        when = dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(timespec="milliseconds")
        return json.dumps(
            {
                "time": when.replace("+00:00", "Z"),
                "event": "rpc",
                "rpc": self.rpc,
                "caller": self.caller,
                "auth": self.auth,
                "cert_subject": self.cert_subject,
                "peer": self.peer,
                "model": self.model,
                "scan_digest": self.scan_digest,
                "method": self.method,
                "target": self.target,
                "result_digest": self.result_digest,
                "code": code,
                "duration_s": round(time.monotonic() - self.started_monotonic, 4),
            },
            separators=(", ", ": "),
        )


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("neuroexplain_audit_call", default=None)


def annotate(*, model: str | None = None, scan_digest: str | None = None, method: str | None = None,
             target: str | None = None, result_digest: str | None = None) -> None:
    """Attach what the call used and produced to the call being served on this thread (no-op outside a call).

    Args:
        model: the model name the call asked for.
        scan_digest: SHA-256 hex digest of the scan's bytes; never a file name or header text.
        method: the attribution method.
        target: the class (Attribute) or the visualization target (Visualize), as the request named it; for an
            Attribute without one, the service may set the class it explained.
        result_digest: SHA-256 hex digest of the result; without it the interceptor digests the response message.
    """
    record = _current.get()
    if record is None:
        return
    if model is not None:
        record.model = model
    if scan_digest is not None:
        record.scan_digest = scan_digest
    if method is not None:
        record.method = method or None
    if target is not None:
        record.target = target or None
    if result_digest is not None:
        record.result_digest = result_digest


def message_digest(message: Any) -> str | None:
    """SHA-256 hex of a protobuf message serialized deterministically (map entries in a fixed order); None for
    anything that is not a message."""
    serialize = getattr(message, "SerializeToString", None)
    if serialize is None:
        return None
    return hashlib.sha256(serialize(deterministic=True)).hexdigest()


def describe_request(record: CallRecord, request: Any) -> None:
    """Fill ``method`` and ``target`` from a request message's fields of those names (only those it declares)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", {})
    for name in ("method", "target"):
        if name in fields and getattr(record, name) is None:
            value = getattr(request, name)
            if isinstance(value, str) and value:
                setattr(record, name, value[:MAX_FIELD_CHARS])


def current() -> CallRecord | None:
    """The record of the call being served on this thread, if any."""
    return _current.get()


def bind(record: CallRecord) -> contextvars.Token[CallRecord | None]:
    """Make ``record`` the current call's record; undo with :func:`unbind`."""
    return _current.set(record)


def unbind(token: contextvars.Token[CallRecord | None]) -> None:
    """Undo :func:`bind`; a no-op when called from another context (a stream closed by the garbage collector)."""
    try:
        _current.reset(token)
    except ValueError:
        pass


class AuditLog:
    """Writes call records to the ``neuroexplain.audit`` logger, which does not propagate to the root logger.

    Args:
        target: ``stderr`` (default), ``stdout``, or a file path (appended; reopened when logrotate moves it).
        logger: the logger to use; tests pass their own.
    """

    def __init__(self, target: str = "stderr", *, logger: logging.Logger | None = None) -> None:
        self.target = target
        self.logger = logger or logging.getLogger(AUDIT_LOGGER)
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        if logger is None:
            self._handler: logging.Handler | None = _handler_for(target)
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(self._handler)
        else:
            self._handler = None

    def write(self, record: CallRecord, code: str) -> None:
        """Write one line for a finished call; ``code`` is the gRPC status name (``OK``, ``UNAUTHENTICATED``...).

        The record goes straight to the logger's handlers: no level setting or ``logging.disable`` elsewhere in
        the process can silence the audit log.
        """
        self.logger.handle(
            self.logger.makeRecord(self.logger.name, logging.INFO, __file__, 0, record.line(code), (), None)
        )

    def close(self) -> None:
        """Detach and close this log's handler."""
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def _handler_for(target: str) -> logging.Handler:
    if target == "stdout":
        return logging.StreamHandler(sys.stdout)
    if target == "stderr":
        return logging.StreamHandler(sys.stderr)
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    return logging.handlers.WatchedFileHandler(path, encoding="utf-8")
