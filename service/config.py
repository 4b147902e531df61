"""The one settings object of the gateway, built once from flags and ``NEUROEXPLAIN_*`` environment variables.

Precedence: command-line flag > environment variable > default. Nothing reads argv or the environment at import
time; :func:`build_settings` (called by ``neuroexplain serve``) builds a :class:`Settings` and it is passed down.

Other parts of the service add their fields here (security: TLS and tokens; TorchServe: engine options) with a
default, an environment variable in :data:`ENV`, and a flag in ``neuroexplain/cli/commands/serve.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroexplain.errors import InvalidOptionError
from neuroexplain.precision import Precision
from neuroexplain.serving.types import ReadLimits

MiB = 1 << 20


class BackendKind(enum.Enum):
    TORCHSERVE = "torchserve"
    INPROCESS = "inprocess"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "neuroexplain"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ::1)."""
    bare = host.strip("[]")
    return bare == "localhost" or bare == "::1" or bare.startswith("127.")


@dataclass(frozen=True)
class Settings:
    """Gateway configuration (immutable).

    Attributes:
        host: address the gRPC (and health-only) port binds to. Default ``localhost``: loopback only, both
            127.0.0.1 and [::1]. Any other address needs TLS and tokens, or ``insecure``.
        insecure: allow a non-loopback ``host`` without TLS and tokens (plaintext, unauthenticated); must be
            written out (``--insecure``).
        metrics_host: address ``/metrics`` binds to (default loopback; the Kubernetes manifests set the pod's).
        port: gRPC port (0 = pick a free one; ``create_server`` returns the bound port).
        metrics_port: Prometheus ``/metrics`` port (0 = pick a free one, -1 = no metrics server).
        health_port: plaintext port serving only grpc.health.v1 (kubelet probes); -1 = none.
        backend: ``torchserve`` or ``inprocess``.
        cache: ``disk`` (default), ``none``, or a ``redis://[:password@]host:port/db`` URL.
        cache_dir: folder of the disk cache.
        cache_max_bytes: disk cache size cap (least recently used entries are evicted beyond it).
        cache_ttl_s: Redis entry time-to-live.
        cache_max_value_bytes: results larger than this are not cached.
        max_message_bytes: gRPC max send and receive message size.
        max_concurrency: computations running at once; more are refused with RESOURCE_EXHAUSTED.
        max_queue: requests that may wait for a computation slot before refusals start (0 = refuse at once).
        max_visualize_steps: cap on Visualize steps.
        scan_store_entries / scan_store_bytes / scan_store_ttl_s: the store of recently received scans that
            ``Scan.digest`` refers to.
        grace_s: how long SIGTERM waits for in-flight calls to finish.
        workers: gRPC handler threads at least; the server runs ``grpc_threads`` (enough for every running and
            queued computation plus cheap calls), so the queue limit is the core's, never grpc's.
        model_dirs: model folders besides the bundled ones (``NEUROEXPLAIN_MODEL_DIRS``, the same variable the
            library's registry reads): what both backends serve and what archives are built from.
        device: torch device of the in-process backend.
        model_store: TorchServe backend: folder of ``.mar`` archives; every archive in it is served, and archives
            of the bundled (and ``NEUROEXPLAIN_MODEL_DIRS``) models missing there are built at start.
        torchserve_startup_timeout_s: TorchServe backend: how long TorchServe and every model's first worker may
            take to become ready (at start and after each restart); also each archive's ``startupTimeout``.
        torchserve_workers: TorchServe backend: worker processes per model (each holds one copy of the model).
        torchserve_batch_size / torchserve_batch_delay_ms: TorchServe batching of Predict requests.
        torchserve_response_timeout_s: a request running longer gets its worker restarted (covers a Visualize).
        max_decompressed_bytes / max_voxels / max_header_bytes: caps on one scan, applied where it is decoded (the
            worker gets them with each request); ``max_message_bytes`` caps its compressed size.
        tls_cert / tls_key: PEM certificate chain and key of the main port (TLS); reloaded when the files change.
        tls_client_ca: PEM CA bundle; set, every client must present a certificate it signed (mutual TLS).
        tokens_file: ``name:token`` lines; every call needs ``authorization: Bearer <token>`` (reloaded on change).
        tokens: ``name:token,name:token`` (``NEUROEXPLAIN_TOKENS``), the alternative to ``tokens_file``.
        audit_log: ``stderr`` (default), ``stdout``, a file path, or ``off``: one JSON line per call.
        max_calls_per_caller: calls one caller (token name, certificate subject, else peer address) may have in
            flight; 0 = no cap.
        redis_password_file / redis_password: the Redis password, kept out of the ``--cache`` URL (and the logs).
        input_check: ``warn`` (default: answer, with the input check in the result) or ``reject`` (a scan unlike the
            model's training data is answered FAILED_PRECONDITION with the reason).
        deidentify_key_file: key (16-4096 bytes) of the keyed UID remapping of de-identified DICOM results; without
            it, ``deidentify`` requests are refused (FAILED_PRECONDITION).
        scan_store_key_file: AES keys (one 32-byte key per line, hex or base64; the last line encrypts, every line
            decrypts) of the scan store in Redis (``service.scans``); with a Redis cache and no key file, scans stay
            in each replica's memory.
        torchserve_token_auth: TorchServe backend: TorchServe's own key authorization on its loopback APIs (the
            gateway reads the keys from TorchServe's ``key_file.json`` and re-reads them when they expire).
        torchserve_token_expiration_min: TorchServe backend: lifetime of TorchServe's keys (its
            ``token_expiration_min``).
        precision: number format of Predict and attribution (``float32`` default). ``float16``/``bfloat16`` run
            only the computations a model's spec measured within tolerance on the device that runs them
            (:mod:`neuroexplain.precision`); everything else stays float32.
    """

    host: str = "localhost"
    insecure: bool = False
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    health_port: int = 50052
    backend: BackendKind = BackendKind.TORCHSERVE
    cache: str = "disk"
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_max_bytes: int = 2048 * MiB
    cache_ttl_s: int = 7 * 24 * 3600
    cache_max_value_bytes: int = 64 * MiB
    max_message_bytes: int = 256 * MiB
    max_concurrency: int = 4
    max_queue: int = 64
    max_visualize_steps: int = 4096
    scan_store_entries: int = 64
    scan_store_bytes: int = 2048 * MiB
    scan_store_ttl_s: int = 3600
    grace_s: float = 30.0
    workers: int = 32
    model_dirs: tuple[Path, ...] = ()
    device: str = "cpu"
    model_store: Path = Path("model_store")
    torchserve_startup_timeout_s: float = 300.0
    torchserve_workers: int = 1
    torchserve_batch_size: int = 1
    torchserve_batch_delay_ms: int = 20
    torchserve_response_timeout_s: int = 1800
    max_decompressed_bytes: int = 1 << 30
    max_voxels: int = 64 * MiB
    max_header_bytes: int = 16 * MiB
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens_file: str | None = None
    tokens: str | None = field(default=None, repr=False)
    audit_log: str = "stderr"
    max_calls_per_caller: int = 8
    redis_password_file: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    input_check: str = "warn"
    deidentify_key_file: str | None = None
    scan_store_key_file: str | None = None
    torchserve_token_auth: bool = True
    torchserve_token_expiration_min: float = 60.0
    precision: Precision = Precision.FLOAT32

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "health_port"):
            value = getattr(self, name)
            if not -1 <= value <= 65535:
                raise InvalidOptionError(f"{name} is {value}; allowed: 0..65535 (0 = any free port, -1 = off)")
        for name in ("max_message_bytes", "max_concurrency", "workers", "scan_store_entries", "max_visualize_steps",
                     "torchserve_workers", "torchserve_batch_size", "torchserve_response_timeout_s",
                     "max_decompressed_bytes", "max_voxels", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"{name} is {getattr(self, name)}; allowed: >= 1")
        if not self.torchserve_token_expiration_min > 0:
            raise InvalidOptionError(
                f"torchserve_token_expiration_min is {self.torchserve_token_expiration_min}; allowed: > 0")
        if self.torchserve_batch_delay_ms < 0:
            raise InvalidOptionError(f"torchserve_batch_delay_ms is {self.torchserve_batch_delay_ms}; allowed: >= 0")
        if self.max_queue < 0:
            raise InvalidOptionError(f"max_queue is {self.max_queue}; allowed: >= 0")
        if not is_loopback(self.host) and not self.insecure and not (self.tls_cert and (self.tokens_file or self.tokens)):
            raise InvalidOptionError(
                f"--host {self.host} listens beyond loopback without TLS and tokens; give --tls-cert/--tls-key and "
                "--tokens-file (or NEUROEXPLAIN_TOKENS), or write --insecure to serve plaintext without "
                "authentication"
            )
        if self.input_check not in ("warn", "reject"):
            raise InvalidOptionError(f"input_check is {self.input_check!r}; allowed: ['warn', 'reject']")
        if not (self.cache in ("disk", "none") or self.cache.startswith(("redis://", "rediss://"))):
            raise InvalidOptionError(
                "cache must be 'disk', 'none' or a redis://[:password@]host:port/db URL; got a value of another form"
            )

    @property
    def read_limits(self) -> ReadLimits:
        """The caps every scan is decoded with, in whichever process decodes it."""
        return ReadLimits(max_input_bytes=self.max_message_bytes, max_decompressed_bytes=self.max_decompressed_bytes,
                          max_voxels=self.max_voxels, max_header_bytes=self.max_header_bytes)

    @property
    def grpc_threads(self) -> int:
        """Handler threads: each waiting caller holds one, so running + queued computations + 16 for cheap calls."""
        return max(self.workers, self.max_concurrency + self.max_queue + 16)

    @property
    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options both sides must use (large scans and maps in both directions)."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]


# field name -> environment variable. Values are parsed with the field's type.
ENV: dict[str, str] = {f.name: "NEUROEXPLAIN_" + f.name.upper() for f in dataclasses.fields(Settings)}
ENV["cache"] = "NEUROEXPLAIN_CACHE"


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, enum.Enum):
            return type(default)(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, tuple):
            return tuple(Path(p) for p in raw.split(os.pathsep) if p)
        return raw
    except ValueError:
        allowed = [m.value for m in type(default)] if isinstance(default, enum.Enum) else type(default).__name__
        raise InvalidOptionError(f"{ENV.get(name, name)}={raw!r} is not valid; allowed: {allowed}") from None


def build_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults, then ``NEUROEXPLAIN_*`` variables, then ``overrides`` (flags; None values ignored).

    Args:
        overrides: field name -> value from the command line; ``None`` means "not given".
        environ: the environment to read (default ``os.environ``).

    Raises:
        InvalidOptionError: an unknown field, or a value of the wrong type or range.
    """
    env = os.environ if environ is None else environ
    defaults = Settings.__new__(Settings)  # field defaults without validation side effects
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        object.__setattr__(defaults, f.name, default)
        var = ENV.get(f.name)
        if var and var in env and env[var] != "":
            values[f.name] = _parse(f.name, env[var], default)
    for name, value in (overrides or {}).items():
        if name not in ENV:
            raise InvalidOptionError(f"unknown setting {name!r}; known: {sorted(ENV)}")
        if value is not None:
            values[name] = value
    return Settings(**values)

