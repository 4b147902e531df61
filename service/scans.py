"""The store of recently received scans that ``Scan.digest`` refers to: in memory, or in Redis shared by replicas.

Both stores are keyed by what the core hands them (``owner + NUL + digest``): a digest resolves only for the caller
that sent those bytes. A scan is stored only after its request succeeded (the core's decision, not the store's).

:class:`MemoryScanStore` keeps scans in this process (one replica). :class:`RedisScanStore` keeps them in the Redis
that holds the result cache, so every replica behind a load balancer resolves a digest any of them received:

- values are encrypted with AES-256-GCM (``cryptography``); the Redis key is bound in as associated data, so a value
  copied under another key does not decrypt;
- Redis keys are ``neuroexplain:scan:`` + HMAC-SHA-256 of ``owner + NUL + digest``: neither the digest (which is
  written to audit lines) nor the caller's name appears in Redis;
- every entry expires after ``ttl_s``; at most ``max_entries`` entries and ``max_bytes`` bytes of ciphertext are
  kept (the earliest-expiring go first), enforced atomically by one Lua script; a scan larger than ``max_bytes`` is
  not stored;
- a value that does not decrypt (a wrong or retired key, a tampered value) is treated as missing and counted in
  ``neuroexplain_scan_store_errors_total{reason="undecryptable"}``; a Redis failure is treated as missing (the
  caller gets NOT_FOUND and sends the bytes again) and counted with ``reason="redis"``.

Key file (``scan_store_key_file``): one key per line, 32 random bytes written as 64 hex digits or base64 (``#``
comments and blank lines ignored), e.g. ``openssl rand -hex 32 >> scan-store.key``. **Rotation**: append a new
line; the *last* line encrypts, every line decrypts (and names: a lookup tries the Redis key of each), so scans
stored under an older key stay readable until they expire; remove the old line after ``ttl_s``. The file is re-read
when it changes (a Kubernetes Secret update), without a restart. Every replica must hold the same file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import struct
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from neuroexplain.errors import InvalidOptionError
from service.config import Settings
from service.metrics import Metrics
from service.security._files import Signature, signature, warn_if_readable_by_others

log = logging.getLogger("neuroexplain.service")

KEY_BYTES = 32
REDIS_PREFIX = "neuroexplain:scan:"
INDEX_KEY = "neuroexplain:scan-index"  # sorted set: entry key -> expiry time (unix seconds)
SIZES_KEY = "neuroexplain:scan-sizes"  # hash: entry key -> stored size in bytes
_MAGIC = b"NXS1"
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12


@dataclass(frozen=True)
class StoredScan:
    """A stored scan: file bytes, or a DICOM series' instances."""

    data: bytes
    instances: tuple[bytes, ...] = ()

    @property
    def size(self) -> int:
        return len(self.data) + sum(len(i) for i in self.instances)


class ScanStore(Protocol):
    """What the core needs of a scan store."""

    def put(self, key: str, data: bytes, instances: tuple[bytes, ...] = ()) -> None: ...

    def get(self, key: str) -> StoredScan | None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


_ERRORS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()
_ERRORS_LOCK = threading.Lock()


def _errors_counter(metrics: Metrics | None) -> Counter | None:
    """``neuroexplain_scan_store_errors_total{reason}`` on the metrics' registry (created once per registry)."""
    if metrics is None:
        return None
    with _ERRORS_LOCK:
        counter = _ERRORS.get(metrics.registry)
        if counter is None:
            counter = Counter(
                "neuroexplain_scan_store_errors",
                "Scan store reads or writes that failed and were treated as a missing scan, by reason: redis "
                "(Redis unreachable or failing) or undecryptable (a value no key in the key file decrypts).",
                ["reason"], registry=metrics.registry,
            )
            _ERRORS[metrics.registry] = counter
        return counter


# ---------------------------------------------------------------------------------------------------------------------
# In memory


class MemoryScanStore:
    """Recently received scans in this process: bounded in entries and bytes, each kept at most ``ttl_s``.

    Least recently used entries are evicted first; ``neuroexplain_scan_store_entries`` / ``_bytes`` follow the
    content.
    """

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float, metrics: Metrics | None = None) -> None:
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[float, StoredScan]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._metrics = metrics

    def put(self, key: str, data: bytes, instances: tuple[bytes, ...] = ()) -> None:
        stored = StoredScan(data, tuple(instances))
        if stored.size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1].size
            self._items[key] = (time.monotonic() + self.ttl_s, stored)
            self._bytes += stored.size
            self._trim()

    def get(self, key: str) -> StoredScan | None:
        with self._lock:
            self._trim()
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[1]

    def close(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def _trim(self) -> None:
        now = time.monotonic()
        for key in [k for k, (expires, _) in self._items.items() if expires <= now]:
            self._bytes -= self._items.pop(key)[1].size
        while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
            _key, (_expires, stored) = self._items.popitem(last=False)  # least recently used
            self._bytes -= stored.size
        if self._metrics is not None:
            self._metrics.scan_store_bytes.set(self._bytes)
            self._metrics.scan_store_entries.set(len(self._items))


# ---------------------------------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class _Key:
    key_id: bytes  # names the key in a value, so decryption picks the right one (not secret)
    aead: Any  # cryptography AESGCM
    name_key: bytes  # HMAC key of Redis key names


def _derive(master: bytes) -> _Key:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(master)

    return _Key(key_id=hashlib.sha256(b"neuroexplain scan-store key id\0" + master).digest()[:_KEY_ID_BYTES],
                aead=AESGCM(hkdf(b"neuroexplain scan-store aes-256-gcm")),
                name_key=hkdf(b"neuroexplain scan-store key names"))


def parse_key_file(text: str) -> list[bytes]:
    """The keys of a key file, oldest first (the last one encrypts).

    Raises:
        InvalidOptionError: no key, or a line that is not 32 bytes in hex or base64 (the line number is named, never
            its content).
    """
    keys: list[bytes] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key: bytes | None = None
        if len(line) == 2 * KEY_BYTES:
            try:
                key = bytes.fromhex(line)
            except ValueError:
                key = None
        if key is None:
            try:
                key = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                key = None
        if key is None or len(key) != KEY_BYTES:
            raise InvalidOptionError(
                f"scan_store_key_file line {number} is not a {KEY_BYTES}-byte key in hex or base64 "
                "(make one with: openssl rand -hex 32)"
            )
        keys.append(key)
    if not keys:
        raise InvalidOptionError("scan_store_key_file holds no key (make one with: openssl rand -hex 32)")
    return keys


class KeyRing:
    """The keys of ``scan_store_key_file``, re-read when the file changes (rotation without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: Signature | None = None
        self._keys: list[_Key] = []
        warn_if_readable_by_others(self.path, "scan store key file", log)
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        sig = signature([self.path])
        if not force and sig == self._signature:
            return
        try:
            text = self.path.read_text()
        except OSError:
            if force:
                raise InvalidOptionError("scan_store_key_file cannot be read") from None
            log.warning("scan store key file cannot be read; keeping the keys read before")
            return
        try:
            keys = [_derive(k) for k in parse_key_file(text)]
        except InvalidOptionError:
            if force:
                raise
            log.warning("scan store key file holds no valid key now; keeping the keys read before")
            return
        with self._lock:
            self._keys, self._signature = keys, sig

    def keys(self) -> list[_Key]:
        """Newest first."""
        self._reload()
        with self._lock:
            return list(reversed(self._keys))


# ---------------------------------------------------------------------------------------------------------------------
# Redis

# KEYS: index, sizes, entry. ARGV: value, ttl_s, now, max_entries, max_bytes. Stores the entry, drops expired ones,
# then the earliest-expiring until both caps hold. Atomic: replicas never see a half-trimmed index.
_PUT_SCRIPT = """
local index, sizes, entry = KEYS[1], KEYS[2], KEYS[3]
local ttl, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_entries, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('SET', entry, ARGV[1], 'EX', math.max(1, math.ceil(ttl)))
redis.call('ZADD', index, now + ttl, entry)
redis.call('HSET', sizes, entry, string.len(ARGV[1]))
for _, old in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now)) do
  redis.call('ZREM', index, old); redis.call('HDEL', sizes, old); redis.call('DEL', old)
end
local total = 0
for _, size in ipairs(redis.call('HVALS', sizes)) do total = total + tonumber(size) end
while redis.call('ZCARD', index) > max_entries or total > max_bytes do
  local popped = redis.call('ZPOPMIN', index)
  if #popped == 0 then break end
  local old = popped[1]
  total = total - tonumber(redis.call('HGET', sizes, old) or '0')
  redis.call('HDEL', sizes, old); redis.call('DEL', old)
end
redis.call('EXPIRE', index, math.ceil(ttl)); redis.call('EXPIRE', sizes, math.ceil(ttl))
return total
"""


def _pack(stored: StoredScan) -> bytes:
    parts = (stored.data, *stored.instances)
    return struct.pack(">I", len(parts)) + b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def _unpack(blob: bytes) -> StoredScan:
    (count,) = struct.unpack_from(">I", blob, 0)
    offset, parts = 4, []
    for _ in range(count):
        (size,) = struct.unpack_from(">Q", blob, offset)
        offset += 8
        if offset + size > len(blob):
            raise ValueError("truncated")
        parts.append(blob[offset:offset + size])
        offset += size
    if count < 1 or offset != len(blob):
        raise ValueError("malformed")
    return StoredScan(parts[0], tuple(parts[1:]))


class RedisScanStore:
    """Scans in Redis, shared by replicas, encrypted (AES-256-GCM), under HMAC-named keys, with a TTL and caps.

    Args:
        url: ``redis://`` or ``rediss://`` URL (the result cache's).
        key_ring: the encryption keys (:class:`KeyRing`).
        max_entries / max_bytes / ttl_s: caps (entries, ciphertext bytes in all) and lifetime of an entry.
        password: overrides the URL's password.
        timeout_s: socket timeouts: a dead or hung Redis holds a request this long at most (then: missing).
        metrics: where failures are counted.
    """

    def __init__(self, url: str, key_ring: KeyRing, *, max_entries: int, max_bytes: int, ttl_s: int,
                 password: str | None = None, timeout_s: float = 0.5, metrics: Metrics | None = None) -> None:
        import redis

        self._redis = redis
        self.key_ring = key_ring
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, max(int(ttl_s), 1)
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            **({"password": password} if password else {}),
        )
        self._put = self._client.register_script(_PUT_SCRIPT)
        self._errors = _errors_counter(metrics)
        self._metrics = metrics

    @staticmethod
    def redis_key(key: _Key, store_key: str) -> str:
        return REDIS_PREFIX + hmac.new(key.name_key, store_key.encode(), hashlib.sha256).hexdigest()

    def put(self, key: str, data: bytes, instances: tuple[bytes, ...] = ()) -> None:
        stored = StoredScan(data, tuple(instances))
        if stored.size > self.max_bytes:
            return
        newest = self.key_ring.keys()[0]
        name = self.redis_key(newest, key)
        nonce = os.urandom(_NONCE_BYTES)
        value = _MAGIC + newest.key_id + nonce + newest.aead.encrypt(nonce, _pack(stored), name.encode())
        if len(value) > self.max_bytes:
            return
        try:
            total = self._put(keys=[INDEX_KEY, SIZES_KEY, name],
                              args=[value, self.ttl_s, f"{time.time():.6f}", self.max_entries, self.max_bytes])
        except self._redis.RedisError as exc:
            self._count("redis")
            log.warning("scan store write failed (%s); digest references to this scan will be NOT_FOUND",
                        type(exc).__name__)
            return
        if self._metrics is not None:
            self._metrics.scan_store_bytes.set(int(total))  # type: ignore[arg-type]

    def get(self, key: str) -> StoredScan | None:
        keys = self.key_ring.keys()
        by_id = {k.key_id: k for k in keys}
        for candidate in keys:  # the newest key names new entries; older ones name entries stored before a rotation
            name = self.redis_key(candidate, key)
            try:
                value = self._client.get(name)
            except self._redis.RedisError as exc:
                self._count("redis")
                log.warning("scan store read failed (%s); treated as missing", type(exc).__name__)
                return None
            if value is None:
                continue
            stored = self._open(bytes(value), name, by_id)  # type: ignore[arg-type]
            if stored is None:
                self._count("undecryptable")
                log.warning("a scan store value does not decrypt with any key of the key file; treated as missing")
            return stored
        return None

    @staticmethod
    def _open(value: bytes, name: str, by_id: dict[bytes, _Key]) -> StoredScan | None:
        from cryptography.exceptions import InvalidTag

        head = len(_MAGIC) + _KEY_ID_BYTES + _NONCE_BYTES
        if len(value) < head or not value.startswith(_MAGIC):
            return None
        key = by_id.get(value[len(_MAGIC):len(_MAGIC) + _KEY_ID_BYTES])
        if key is None:
            return None
        nonce = value[len(_MAGIC) + _KEY_ID_BYTES:head]
        try:
            return _unpack(key.aead.decrypt(nonce, value[head:], name.encode()))
        except (InvalidTag, ValueError, struct.error):
            return None

    def _count(self, reason: str) -> None:
        if self._errors is not None:
            self._errors.labels(reason).inc()

    def close(self) -> None:
        try:
            self._client.close()
        except self._redis.RedisError:
            pass


# ---------------------------------------------------------------------------------------------------------------------
# Choice


def redis_password(settings: Settings) -> str | None:
    """The Redis password from ``redis_password`` or the first line of ``redis_password_file`` (never logged)."""
    password = settings.redis_password
    path = settings.redis_password_file
    if not password and path:
        try:
            password = Path(path).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            raise InvalidOptionError("redis_password_file cannot be read or is empty") from None
    return password or None


def make_scan_store(settings: Settings, metrics: Metrics | None = None) -> ScanStore:
    """The scan store ``settings`` call for: Redis (encrypted, shared by replicas) when the cache is Redis and
    ``scan_store_key_file`` is set; in memory otherwise.

    A Redis cache without a key file keeps scans in memory (nothing of a scan goes to Redis unencrypted) and says
    so once: digest references then resolve only on the replica that received the scan.

    Raises:
        InvalidOptionError: the key file cannot be read or holds no valid key.
    """
    is_redis = settings.cache.startswith(("redis://", "rediss://"))
    if is_redis and settings.scan_store_key_file:
        return RedisScanStore(settings.cache, KeyRing(Path(settings.scan_store_key_file)), max_entries=settings.scan_store_entries,
                              max_bytes=settings.scan_store_bytes, ttl_s=settings.scan_store_ttl_s,
                              password=redis_password(settings), metrics=metrics)
    if is_redis:
        log.warning("the result cache is Redis but no scan_store_key_file is set: scans are kept in this replica's "
                    "memory only, so a digest resolves only on the replica that received the scan")
    return MemoryScanStore(settings.scan_store_entries, settings.scan_store_bytes, settings.scan_store_ttl_s, metrics)
