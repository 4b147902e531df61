"""Deterministic result UIDs (DESIGN.md, "DICOM results": result UIDs).

A result object's UIDs are ``2.25.`` UIDs (PS3.5 B.2: the decimal value of a 128-bit number) hashed with SHA-256
from what identifies the request: the source Study and Series Instance UIDs, the sorted SOPInstanceUIDs of the
source instances, the model name and version, the operation and its canonical options, and the object kind and
frame index. The same request gives the same UIDs on any machine, backend or cache state, so a re-sent series never
duplicates results in a PACS; a different method, target or option gives different UIDs.

:func:`keyed_uid` is the de-identification counterpart: an HMAC-SHA-256 of one original UID under a secret key, so
that every object of a study maps the same source UID to the same new one, and nobody without the key can link them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Bumped if the hashing scheme ever changes (old results would then get new UIDs: never done lightly).
SCHEME = "neuroexplain-dicom-results/1"


def _uid_from_digest(digest: bytes) -> str:
    """``2.25.`` + the first 128 bits of ``digest`` as a decimal integer (at most 44 characters)."""
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def canonical_options(options: Mapping[str, Any] | None) -> str:
    """The options as canonical JSON (sorted keys, no spaces; enums and other objects by their ``value``/str).

    Args:
        options: option name -> value (already resolved to their effective values by the caller).

    Returns:
        A string that is equal for equal option sets.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        inner = getattr(value, "value", None)
        return plain(inner) if inner is not None else str(value)

    return json.dumps(plain(dict(options or {})), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class RequestIdentity:
    """What identifies one request for DICOM results: hashed into every UID of its objects.

    Attributes:
        study_uid: the source StudyInstanceUID.
        series_uid: the source SeriesInstanceUID.
        sop_uids: the source SOPInstanceUIDs (any order: sorted when hashed).
        model: model name.
        version: model version.
        operation: ``predict`` or ``attribute``.
        options: canonical options (:func:`canonical_options`), including method and target.
    """

    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    model: str
    version: str
    operation: str
    options: str

    def digest(self) -> bytes:
        """SHA-256 over every field (UIDs sorted), each length-prefixed so no two field lists collide."""
        h = hashlib.sha256()
        parts: Iterable[str] = (SCHEME, self.study_uid, self.series_uid, *sorted(self.sop_uids), "|",
                                self.model, self.version, self.operation, self.options)
        for part in parts:
            raw = part.encode()
            h.update(len(raw).to_bytes(4, "big"))
            h.update(raw)
        return h.digest()

    def uid(self, kind: str, *, frame: int | None = None) -> str:
        """The UID of one part of the result: ``kind`` names it (``pm-series``, ``pm-instance``, ...).

        Args:
            kind: which UID (series, instance, frame of reference ... of which object).
            frame: frame / slice index for per-slice objects.

        Returns:
            A ``2.25.`` UID.
        """
        h = hashlib.sha256(self.digest())
        h.update(kind.encode())
        if frame is not None:
            h.update(b"#" + str(int(frame)).encode())
        return _uid_from_digest(h.digest())


def keyed_uid(uid: str, key: bytes) -> str:
    """A de-identified replacement for ``uid``: ``2.25.`` + HMAC-SHA-256(key, uid), the same for the same key.

    Args:
        uid: the original UID.
        key: the server's de-identification key.

    Returns:
        A ``2.25.`` UID that cannot be linked to ``uid`` without ``key``.
    """
    return _uid_from_digest(hmac.new(key, b"uid\0" + uid.encode(), hashlib.sha256).digest())


def keyed_text(value: str, key: bytes, *, length: int = 16) -> str:
    """A de-identified replacement for an identifier such as PatientID: hex of HMAC-SHA-256(key, value)."""
    return hmac.new(key, b"text\0" + value.encode(), hashlib.sha256).hexdigest()[:length].upper()
