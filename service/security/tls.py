"""Server TLS and mutual TLS, with certificates, key and client CA reloaded when their files change.

gRPC calls the fetcher below before every new TLS handshake; it compares the files' signatures (inode, mtime, size)
and, when they changed, loads and checks the new set: the key must match the certificate and the CA bundle must
parse. A set that fails the check (typically the moment between writing the new certificate and the new key) is
not used: the previous set stays in force and the next handshake tries again. Connections already open keep the
certificate they were made with; new connections get the new one.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from service.security._files import Signature, signature, warn_if_readable_by_others
from service.security.errors import SecurityConfigError

log = logging.getLogger("neuroexplain.security")


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's TLS material lives.

    Attributes:
        cert: PEM certificate chain, leaf first (``--tls-cert``).
        key: PEM private key of the leaf, unencrypted (``--tls-key``).
        client_ca: PEM bundle of CAs whose client certificates are accepted (``--tls-client-ca``); when set, every
            client must present a certificate signed by one of them (mutual TLS).
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


@dataclass(frozen=True)
class _Material:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None
    not_after: dt.datetime

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key_pem, self.cert_pem)], self.ca_pem)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror or exc.__class__.__name__}") from None


def load_material(files: TlsFiles) -> _Material:
    """Read and check the certificate chain, key and client CA bundle.

    Raises:
        SecurityConfigError: a file is missing or not PEM, the key does not belong to the certificate, or the
            certificate has expired.
    """
    cert_pem = _read(files.cert, "TLS certificate")
    key_pem = _read(files.key, "TLS key")
    ca_pem = _read(files.client_ca, "client CA bundle") if files.client_ca is not None else None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise SecurityConfigError(f"TLS certificate {files.cert} is not a PEM certificate chain") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise SecurityConfigError(f"TLS key {files.key} is encrypted; give the server an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SecurityConfigError(f"TLS key {files.key} is not a PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise SecurityConfigError(
            f"TLS key {files.key} does not belong to the first certificate in {files.cert}; "
            "the chain must start with the server's own certificate"
        )
    not_after = chain[0].not_valid_after_utc
    if not_after <= dt.datetime.now(dt.UTC):
        raise SecurityConfigError(f"TLS certificate {files.cert} expired on {not_after.isoformat()}")
    if ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise SecurityConfigError(f"client CA bundle {files.client_ca} is not a PEM certificate bundle") from None
    return _Material(cert_pem, key_pem, ca_pem, not_after)


class ReloadingServerCredentials:
    """Server credentials whose certificate, key and client CA follow their files.

    Use ``.credentials`` with ``server.add_secure_port``. ``reloads`` and ``reload_failures`` count what happened.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._signature: Signature = signature(files.paths)
        material = load_material(files)
        warn_if_readable_by_others(files.key, "TLS key", log)
        self._lock = threading.Lock()
        self.reloads = 0
        self.reload_failures = 0
        self.not_after = material.not_after
        self.credentials = grpc.dynamic_ssl_server_credentials(
            material.configuration(),
            self._fetch,
            require_client_authentication=files.client_ca is not None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before every handshake, on one of its own threads; it must not raise.
        sig = signature(self.files.paths)
        if sig == self._signature:
            return None
        with self._lock:
            if sig == self._signature:
                return None
            self._signature = sig
            try:
                material = load_material(self.files)
            except SecurityConfigError as exc:
                self.reload_failures += 1
                log.error("TLS files changed but were not loaded, the previous certificate stays in use: %s", exc)
                return None
            except Exception:  # a fetcher that raises would fail the handshake; keep serving with the old set
                self.reload_failures += 1
                log.exception("TLS reload failed unexpectedly; the previous certificate stays in use")
                return None
            self.reloads += 1
            self.not_after = material.not_after
            log.info("TLS certificate reloaded; valid until %s", material.not_after.isoformat())
            return material.configuration()


def client_subject(auth_context: dict[str, list[bytes]]) -> str | None:
    """The verified client certificate's subject (RFC 4514 string) from a call's auth context, if any.

    gRPC only fills ``x509_pem_cert`` after the certificate chain was verified against the client CA, so the
    subject returned here is authenticated.
    """
    pem = auth_context.get("x509_pem_cert")
    if not pem:
        return None
    return _subject(bytes(pem[0]))


@functools.lru_cache(maxsize=1024)
def _subject(pem: bytes) -> str | None:
    # Parsing a certificate costs ~75 us; a client presents the same one on every call of a connection.
    try:
        return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
    except ValueError:
        return None
