"""Bearer tokens: several valid at once, each with a name (the caller's identity), rotated without a restart.

Sources (one of them, never both):

- a file (``--tokens-file F``), one ``name:token`` per line; blank lines and lines starting with ``#`` are ignored.
  The file is re-read when it changes (checked on every authentication, a ``stat`` call), so rotating a token is
  "add the new line, move the callers, delete the old line" with no restart.
- the environment (``NEUROEXPLAIN_TOKENS=name:token,name:token``), read once at start.

Only SHA-256 digests of the tokens are kept in memory, and a presented token is compared with every one of them with
``hmac.compare_digest``, so neither the comparison nor the number of entries checked depends on how much of a token
was right. Error messages name the line or entry that is wrong, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from service.security._files import Signature, signature, warn_if_readable_by_others
from service.security.errors import SecurityConfigError

log = logging.getLogger("neuroexplain.security")

TOKENS_ENV = "NEUROEXPLAIN_TOKENS"
MIN_TOKEN_LENGTH = 16
# A name becomes the caller's identity in the audit log: short, printable, no separators that break log parsing.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# gRPC metadata values must be printable ASCII; whitespace would not survive "Bearer <token>".
_TOKEN = re.compile(r"[\x21-\x7e]+")


OPERATIONS = ("predict", "attribute", "visualize")


@dataclass(frozen=True)
class Grant:
    """What a token's holder may use: ``None`` = everything (a plain ``name:token`` line)."""

    name: str
    models: frozenset[str] | None = None
    ops: frozenset[str] | None = None

    def refusal(self, model: str, op: str) -> str | None:
        """Why this caller may not run ``op`` on ``model``, or None when it may."""
        if self.ops is not None and op not in self.ops:
            return f"caller '{self.name}' may not {op}; its token allows: {', '.join(sorted(self.ops))}"
        if self.models is not None and model not in self.models:
            return f"caller '{self.name}' may not use model '{model}'; its token allows: {', '.join(sorted(self.models))}"
        return None


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes  # SHA-256 of the token; the token itself is not kept
    grant: Grant | None = None


def _grant(where: str, name: str, fields: list[str]) -> Grant | None:
    """``models=a,b`` and ``ops=predict,attribute`` fields after the token."""
    if not fields:
        return None
    values: dict[str, frozenset[str]] = {}
    for field_ in fields:
        key, _, listed = field_.partition("=")
        items = frozenset(x.strip() for x in listed.split(",") if x.strip())
        if key not in ("models", "ops") or key in values or not items:
            raise SecurityConfigError(
                f"{where}: after the token expected ':models=NAME,NAME' and/or ':ops=OP,OP' once each"
            )
        if key == "ops" and not items <= set(OPERATIONS):
            raise SecurityConfigError(f"{where}: ops may be {', '.join(OPERATIONS)}")
        values[key] = items
    return Grant(name, values.get("models"), values.get("ops"))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_entries(items: Iterable[tuple[str, str]]) -> tuple[_Entry, ...]:
    """Validate ``(where, "name:token")`` items and return the entries.

    Args:
        items: pairs of a location for error messages ("line 3", "entry 2") and the raw ``name:token`` text.

    Returns:
        The entries, in order. Several entries may share a name (two tokens of one caller during rotation).

    Raises:
        SecurityConfigError: an item is malformed, a token is too short, or a token appears twice.
    """
    entries: list[_Entry] = []
    seen: dict[bytes, str] = {}
    for where, raw in items:
        name, sep, rest = raw.partition(":")
        parts = rest.split(":")
        fields = [p.strip() for p in parts[1:] if p.strip().startswith(("models=", "ops="))]
        token = ":".join(parts[: len(parts) - len(fields)]) if fields else rest
        name, token = name.strip(), token.strip()
        if not sep:
            raise SecurityConfigError(f"{where}: expected 'name:token'")
        if not _NAME.fullmatch(name):
            raise SecurityConfigError(
                f"{where}: the name must be 1-64 characters of letters, digits, '.', '_', '@' or '-', "
                "starting with a letter or digit"
            )
        if len(token) < MIN_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            raise SecurityConfigError(
                f"{where}: the token of '{name}' must be at least {MIN_TOKEN_LENGTH} printable ASCII characters "
                "without spaces (e.g. `openssl rand -hex 32`)"
            )
        digest = _digest(token)
        if digest in seen:
            raise SecurityConfigError(f"{where}: repeats the token of {seen[digest]}; every token must be unique")
        seen[digest] = where
        entries.append(_Entry(name, digest, _grant(where, name, fields)))
    if not entries:
        raise SecurityConfigError("no tokens configured; expected at least one 'name:token'")
    return tuple(entries)


def _file_items(text: str) -> list[tuple[str, str]]:
    return [
        (f"line {i}", line)
        for i, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


class TokenStore:
    """The set of valid tokens; thread-safe, re-reads its file when the file changes.

    A file that becomes unreadable or malformed while serving keeps the last good set in force (logged at ERROR
    and counted in ``reload_failures``), so a half-written file never locks every caller out; remove a line to revoke
    a token.
    """

    def __init__(self, entries: tuple[_Entry, ...], *, path: Path | None = None, sig: Signature | None = None) -> None:
        self._entries = entries
        self._path = path
        self._signature = sig
        self._lock = threading.Lock()
        self.reload_failures = 0

    @classmethod
    def from_file(cls, path: str | Path) -> TokenStore:
        """Load ``name:token`` lines from ``path``; raises SecurityConfigError if it is missing or malformed."""
        path = Path(path)
        # The signature is taken *before* reading: a write that lands during the read is seen on the next check.
        sig = signature([path])
        store = cls(_read_file(path), path=path, sig=sig)
        warn_if_readable_by_others(path, "tokens file", log)
        return store

    @classmethod
    def from_env_value(cls, value: str) -> TokenStore:
        """Parse ``name:token,name:token`` (the value of ``NEUROEXPLAIN_TOKENS``)."""
        items = [(f"{TOKENS_ENV} entry {i}", part) for i, part in enumerate(value.split(","), start=1) if part.strip()]
        return cls(parse_entries(items))

    @classmethod
    def from_sources(cls, tokens_file: str | Path | None, env_value: str | None) -> TokenStore | None:
        """The store the settings ask for, or ``None`` when token authentication is off.

        Raises:
            SecurityConfigError: both sources are set, or the one that is set is invalid.
        """
        if tokens_file and env_value:
            raise SecurityConfigError(f"set either --tokens-file or {TOKENS_ENV}, not both")
        if tokens_file:
            return cls.from_file(tokens_file)
        if env_value:
            return cls.from_env_value(env_value)
        return None

    @property
    def names(self) -> tuple[str, ...]:
        """Caller names with at least one valid token, sorted, without repeats."""
        self.reload_if_changed()
        return tuple(sorted({e.name for e in self._entries}))

    def reload_if_changed(self) -> bool:
        """Re-read the token file if it changed since the last read; True when a new set took effect."""
        if self._path is None or signature([self._path]) == self._signature:
            return False
        with self._lock:
            sig = signature([self._path])
            if sig == self._signature:
                return False
            self._signature = sig
            try:
                entries = _read_file(self._path)
            except SecurityConfigError as exc:
                self.reload_failures += 1
                log.error("token file changed but was not loaded, the previous tokens stay valid: %s", exc)
                return False
            self._entries = entries
            log.info("token file reloaded: %d tokens for %d callers", len(entries), len({e.name for e in entries}))
            return True

    def authenticate(self, token: str) -> str | None:
        """The name the token belongs to, or ``None``; every entry is compared, in constant time each."""
        grant = self.identify(token)
        return None if grant is None else grant.name

    def identify(self, token: str) -> Grant | None:
        """The token's holder and what it may use, or ``None``; every entry is compared, in constant time each."""
        self.reload_if_changed()
        presented = _digest(token)
        match: _Entry | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented) and match is None:
                match = entry
        if match is None:
            return None
        return match.grant or Grant(match.name)


def _read_file(path: Path) -> tuple[_Entry, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityConfigError(f"cannot read tokens file {path}: {exc.__class__.__name__}") from None
    try:
        return parse_entries(_file_items(text))
    except SecurityConfigError as exc:
        raise SecurityConfigError(f"tokens file {path}: {exc}") from None
