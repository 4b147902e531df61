"""Build the security layer from the gateway's settings: credentials, the interceptor, the health-only port.

``neuroexplain serve`` calls :func:`build_security` once; :func:`create_server` receives ``layer.credentials`` and
``layer.interceptor``; :func:`start_health_port` serves the main server's health servicer on the plaintext port.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from service.config import Settings
from service.security.audit import AuditLog
from service.security.errors import SecurityConfigError
from service.security.health import create_health_server
from service.security.interceptors import SecurityInterceptor, StatusOf
from service.security.tls import ReloadingServerCredentials, TlsFiles
from service.security.tokens import TokenStore

log = logging.getLogger("neuroexplain.security")

_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_MODEL_NAME = 128


@dataclass
class SecurityLayer:
    """What the server needs from the security settings.

    Attributes:
        tls: reloading TLS credentials, or ``None`` for a plaintext main port.
        tokens: the bearer-token store, or ``None`` when tokens are off.
        audit_log: the audit log, or ``None`` when it is off.
        interceptor: install it on the main server.
    """

    tls: ReloadingServerCredentials | None
    tokens: TokenStore | None
    audit_log: AuditLog | None
    interceptor: SecurityInterceptor

    @property
    def credentials(self) -> grpc.ServerCredentials | None:
        return self.tls.credentials if self.tls is not None else None

    def describe(self) -> str:
        """One line for the startup log: which controls are on (never a secret)."""
        tls = "off" if self.tls is None else ("mutual TLS" if self.tls.files.client_ca else "TLS")
        tokens = "off" if self.tokens is None else f"{len(self.tokens.names)} callers"
        cap = self.interceptor.limiter.limit or "none"
        audit = self.audit_log.target if self.audit_log is not None else "off"
        return f"security: transport {tls}, tokens {tokens}, per-caller cap {cap}, audit log {audit}"

    def close(self) -> None:
        if self.audit_log is not None:
            self.audit_log.close()


def describe_request(request: Any) -> tuple[str | None, str | None]:
    """``(model, scan digest)`` as far as a request names them without hashing anything.

    Inline scan bytes are hashed by the core anyway; the servicer passes that digest on through
    :func:`service.security.audit.annotate`.
    """
    model = getattr(request, "model", None) or getattr(request, "name", None) or None
    digest = None
    try:
        if request.HasField("scan") and request.scan.digest:
            digest = request.scan.digest.lower()
    except (AttributeError, ValueError):
        pass
    if digest is not None and not _HEX64.fullmatch(digest):
        digest = None  # not a digest: free text from the caller never reaches the audit log
    # A model name is the caller's free text too; bounded so that one request cannot write a huge audit line.
    return (model[:MAX_MODEL_NAME] if isinstance(model, str) else None), digest


def build_security(
    settings: Settings, *, audit_logger: logging.Logger | None = None, status_of: StatusOf | None = None
) -> SecurityLayer:
    """The security layer the settings ask for.

    Reads ``tls_cert``, ``tls_key``, ``tls_client_ca``, ``tokens_file``, ``tokens`` (``NEUROEXPLAIN_TOKENS``),
    ``audit_log`` and ``max_calls_per_caller`` from ``settings``.

    Args:
        settings: the gateway's ``Settings``.
        audit_logger: send audit lines to this logger instead of the ``audit_log`` target (tests).
        status_of: the service's exception -> status code table (``service.grpc.status``).

    Raises:
        SecurityConfigError: a certificate, key or token source cannot be used, or the settings contradict.
    """
    cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if ca and not cert:
        raise SecurityConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = None
    if cert or key:
        if not (cert and key):
            raise SecurityConfigError("--tls-cert and --tls-key go together; give both or neither")
        tls = ReloadingServerCredentials(TlsFiles(Path(cert), Path(key), Path(ca) if ca else None))
    tokens = TokenStore.from_sources(settings.tokens_file, settings.tokens)
    target = settings.audit_log or "off"
    audit_log: AuditLog | None
    if audit_logger is not None:
        audit_log = AuditLog(logger=audit_logger)
    elif target == "off":
        audit_log = None
    else:
        audit_log = AuditLog(target)
    cap = settings.max_calls_per_caller
    if cap < 0:
        raise SecurityConfigError(f"max_calls_per_caller is {cap}; allowed: 0 (no cap) or a positive number")
    if tokens is not None and tls is None:
        log.warning("bearer tokens are on but TLS is off: tokens travel in clear text; use --tls-cert/--tls-key")
    interceptor = SecurityInterceptor(
        tokens=tokens, audit_log=audit_log, max_calls_per_caller=cap, describe=describe_request, status_of=status_of
    )
    return SecurityLayer(tls=tls, tokens=tokens, audit_log=audit_log, interceptor=interceptor)


def start_health_port(settings: Settings, servicer: health.HealthServicer) -> tuple[grpc.Server, int] | None:
    """Start the plaintext health-only server on ``settings.health_port`` (``None`` when it is -1)."""
    if settings.health_port < 0:
        return None
    server, bound = create_health_server(servicer, host=settings.host, port=settings.health_port)
    server.start()
    log.info("health-only port %d (plaintext, grpc.health.v1 only)", bound)
    return server, bound
