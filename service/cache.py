"""Result cache: content-addressed keys, a disk LRU (default) or Redis, and a safe value encoding.

Keys are SHA-256 digests of a canonical JSON document holding the package version, the model's name, version,
weights digest and spec digest, the operation, the canonical options and the scan digest (see :func:`cache_key`): no patient data,
and an upgrade or new weights never serve a stale result.

Values are the serving contract's result frames (:mod:`neuroexplain.serving.codec`, the codec the TorchServe worker
answers in): JSON plus the raw byte fields, never pickle (a shared Redis must never be able to run code here).

A cache never fails a request: every backend error is raised as :class:`CacheError`, which the core counts and
ignores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from neuroexplain import __version__, errors
from neuroexplain.serving import codec
from neuroexplain.serving.types import Operation, Result


class CacheError(Exception):
    """The cache could not be read or written (the request goes on without it)."""


class ResultCache(Protocol):
    """A byte store keyed by hex digests."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def close(self) -> None: ...


def cache_key(
    *, operation: Operation, model: str, model_version: str, weights_sha256: str, scan: dict[str, Any] | None,
    options: dict[str, Any], spec_sha256: str = "",
) -> str:
    """Hex SHA-256 of the canonical description of a computation.

    Args:
        operation: predict, attribute or visualize.
        model / model_version / weights_sha256 / spec_sha256: which model exactly (a recalibrated spec with the same
            weights is another model: its input check and probabilities may differ).
        scan: the scan digest and reading options, or None (Visualize without a scan).
        options: the request's options, canonical (defaults filled in by the caller where known; sorted here).
    """
    doc = {
        "package": __version__,
        "operation": operation.value,
        "model": [model, model_version, weights_sha256, spec_sha256],
        "scan": scan,
        "options": options,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Value encoding: the serving contract's one codec (the same frames the TorchServe worker answers)


def encode(result: Result) -> bytes:
    """A result as the cache stores it (:func:`neuroexplain.serving.codec.encode_result`)."""
    return codec.encode_result(result)


def decode(raw: bytes) -> Result:
    """Inverse of :func:`encode`; raises :class:`CacheError` on anything malformed."""
    try:
        return codec.decode_result(raw)  # type: ignore[no-any-return]
    except errors.NeuroExplainError as exc:
        raise CacheError(f"cached value is malformed ({type(exc).__name__})") from None


# ---------------------------------------------------------------------------------------------------------------------
# Implementations


class NullCache:
    """No caching (``--cache none``)."""

    def get(self, key: str) -> bytes | None:
        return None

    def put(self, key: str, value: bytes) -> None:
        return None

    def close(self) -> None:
        return None


class DiskCache:
    """A least-recently-used byte store in a folder, capped at ``max_bytes``, that survives restarts.

    One file per key (``ab/abcdef….bin``), written to a temporary file and renamed, so a crash never leaves a partial
    entry. Recency is the file's modification time, touched on every hit; the in-memory index is rebuilt from the
    folder at start.
    """

    def __init__(self, folder: Path, max_bytes: int, max_value_bytes: int | None = None) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.max_value_bytes = max_value_bytes if max_value_bytes is not None else max_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, least recent first
        self._total = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            entries = []
            for path in self.folder.glob("*/*.bin"):
                st = path.stat()
                entries.append((st.st_mtime, path.stem, st.st_size))
            for _mtime, key, size in sorted(entries):
                self._index[key] = size
                self._total += size
            for tmp in self.folder.glob("*/*.tmp*"):
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise CacheError(f"cache folder is not usable ({exc.strerror})") from None
        self._evict()

    @property
    def total_bytes(self) -> int:
        return self._total

    def _path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise CacheError("cache keys are 64 lower-case hex digits")
        return self.folder / key[:2] / f"{key}.bin"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        try:
            data = path.read_bytes()
            os.utime(path)
            return data
        except FileNotFoundError:
            with self._lock:
                self._total -= self._index.pop(key, 0)
            return None
        except OSError as exc:
            raise CacheError(f"cache read failed ({exc.strerror})") from None

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_value_bytes:
            return
        path = self._path(key)
        tmp: str | None = None
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(value)
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:  # a full disk must not fill up further with partial entries
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise CacheError(f"cache write failed ({exc.strerror})") from None
        with self._lock:
            self._total -= self._index.pop(key, 0)
            self._index[key] = len(value)
            self._total += len(value)
        self._evict()

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self._total <= self.max_bytes or not self._index:
                    return
                key, size = self._index.popitem(last=False)
                self._total -= size
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError:
                pass

    def close(self) -> None:
        return None


class RedisCache:
    """Redis shared by every replica: entries expire after ``ttl_s``; values above ``max_value_bytes`` are skipped.

    Short socket timeouts keep a dead Redis from holding a request for long; the connection pool reconnects by
    itself when Redis comes back.
    """

    def __init__(self, url: str, ttl_s: int, max_value_bytes: int, timeout_s: float = 0.5,
                 password: str | None = None) -> None:
        import redis

        self._redis = redis
        self.ttl_s = ttl_s
        self.max_value_bytes = max_value_bytes
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            **({"password": password} if password else {}),
        )
        self._prefix = "neuroexplain:result:"

    def get(self, key: str) -> bytes | None:
        try:
            value = self._client.get(self._prefix + key)
        except self._redis.RedisError as exc:
            raise CacheError(f"redis read failed ({type(exc).__name__})") from None
        return value if value is None else bytes(value)  # type: ignore[arg-type]

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_value_bytes:
            return
        try:
            self._client.set(self._prefix + key, value, ex=self.ttl_s)
        except self._redis.RedisError as exc:
            raise CacheError(f"redis write failed ({type(exc).__name__})") from None

    def close(self) -> None:
        try:
            self._client.close()
        except self._redis.RedisError:
            pass


def open_cache(
    spec: str, folder: Path, max_bytes: int, ttl_s: int, max_value_bytes: int, password: str | None = None
) -> ResultCache:
    """The cache a ``--cache`` value names: ``disk``, ``none`` or a Redis URL (``password`` overrides the URL's)."""
    if spec == "none":
        return NullCache()
    if spec == "disk":
        return DiskCache(folder, max_bytes, max_value_bytes)
    return RedisCache(spec, ttl_s, max_value_bytes, password=password)
