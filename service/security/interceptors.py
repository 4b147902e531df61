"""One server interceptor for authentication, the per-caller concurrency cap and the audit log.

Order inside a call: the audit record starts, the caller is identified (bearer token, else the verified client
certificate's subject), the caller's concurrency slot is taken, the service runs, the slot is released and one audit
line is written with the final status. Refusals are raised as the error tree's ``UnauthenticatedError`` and
``LimitExceededError``: the gateway installs this interceptor inside its metrics and error interceptors, so the one
error table maps them like any other status; ``status_of`` (that table, by default) lets the audit line show the
code the caller gets for an exception that the error interceptor maps only after this one has finished.

Health checks (``grpc.health.v1``) are exempt from all three: they reveal nothing but serving status, kubelet must
reach them without credentials, and auditing a probe every few seconds would drown the log. Reflection is not exempt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from neuroexplain.errors import LimitExceededError, UnauthenticatedError
from service.grpc.status import status_code
from service.grpc.wrap import Stream, Unary, WrappingInterceptor, wrap_handler
from service.security import audit
from service.security.tls import client_subject
from service.security.tokens import TokenStore

log = logging.getLogger("neuroexplain.security")

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
DEFAULT_MAX_CALLS_PER_CALLER = 8

# Optional: read the model name and the scan digest from a request when the service does not call annotate().
RequestDescriber = Callable[[Any], tuple[str | None, str | None]]
# The service's own exception -> status table, so the audit line shows the code the caller will get even though the
# error interceptor that applies it runs outside this one.
StatusOf = Callable[[BaseException], grpc.StatusCode | None]


class CallerLimiter:
    """At most ``limit`` calls in flight per caller; ``limit`` 0 means no cap."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"per-caller call limit is {limit}; expected 0 (no cap) or a positive number")
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def try_acquire(self, caller: str) -> bool:
        if self.limit == 0:
            return True
        with self._lock:
            n = self._in_flight.get(caller, 0)
            if n >= self.limit:
                return False
            self._in_flight[caller] = n + 1
            return True

    def release(self, caller: str) -> None:
        if self.limit == 0:
            return
        with self._lock:
            n = self._in_flight.get(caller, 0) - 1
            if n <= 0:
                self._in_flight.pop(caller, None)  # no entry per caller kept forever
            else:
                self._in_flight[caller] = n

    def in_flight(self, caller: str) -> int:
        with self._lock:
            return self._in_flight.get(caller, 0)


class SecurityInterceptor(WrappingInterceptor):
    """Authenticates callers, caps their concurrent calls and writes the audit log.

    Args:
        tokens: valid bearer tokens, or ``None`` for no token authentication (then the client certificate's subject,
            if mutual TLS is on, or nothing identifies the caller).
        audit_log: where audit lines go, or ``None`` for none.
        max_calls_per_caller: concurrent calls allowed per caller (0: no cap). Callers without an identity are
            counted per peer address.
        describe: reads ``(model, scan_digest)`` from a request message, for services that do not call
            :func:`service.security.audit.annotate`.
        status_of: the status code an exception raised by the service will be mapped to (``None``: unmapped, which
            the error interceptor turns into INTERNAL); default: the one error table.
    """

    def __init__(
        self,
        *,
        tokens: TokenStore | None = None,
        audit_log: audit.AuditLog | None = None,
        max_calls_per_caller: int = DEFAULT_MAX_CALLS_PER_CALLER,
        describe: RequestDescriber | None = None,
        status_of: StatusOf | None = None,
    ) -> None:
        self.tokens = tokens
        self.audit_log = audit_log
        self.limiter = CallerLimiter(max_calls_per_caller)
        self.describe = describe
        self.status_of = status_of or status_code

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(EXEMPT_PREFIXES):
            return handler
        metadata = tuple(details.invocation_metadata or ())
        return wrap_handler(
            handler,
            unary=lambda inner, stream_in: self._wrap_unary(inner, method, metadata, stream_in=stream_in),
            stream=lambda inner, stream_in: self._wrap_stream(inner, method, metadata, stream_in=stream_in),
        )

    # -- the steps --------------------------------------------------------------------------------------------------

    def _admit(self, record: audit.CallRecord, metadata: tuple[Any, ...], context: grpc.ServicerContext) -> str:
        """Identify the caller and take a concurrency slot; returns the limiter key. Raises when refused."""
        record.cert_subject = client_subject(context.auth_context())
        if self.tokens is not None:
            token = _bearer_token(metadata)
            grant = self.tokens.identify(token)
            if grant is None:
                raise UnauthenticatedError("invalid bearer token")
            record.caller, record.auth, record.grant = grant.name, "token", grant
        elif record.cert_subject is not None:
            record.caller, record.auth = record.cert_subject, "mtls"
        key = f"caller:{record.caller}" if record.caller is not None else f"peer:{_peer_host(record.peer)}"
        if not self.limiter.try_acquire(key):
            raise LimitExceededError(
                f"this caller already has {self.limiter.limit} calls in flight, the per-caller limit "
                "(--max-calls-per-caller); retry when one of them has finished",
            )
        return key

    def _finish(self, record: audit.CallRecord, context: grpc.ServicerContext, error: BaseException | None) -> None:
        if self.audit_log is None:
            return
        try:
            self.audit_log.write(record, _status_name(context, error, self.status_of))
        except Exception:  # an audit sink that fails must not turn a served call into an error
            log.exception("could not write the audit line")

    def _describe(self, record: audit.CallRecord, request: Any) -> None:
        audit.describe_request(record, request)
        if self.describe is None or (record.model is not None and record.scan_digest is not None):
            return
        try:
            model, digest = self.describe(request)
        except Exception:
            log.exception("audit: could not describe the request")
            return
        record.model = record.model or model
        record.scan_digest = record.scan_digest or digest

    # -- wrappers per call shape ------------------------------------------------------------------------------------

    def _wrap_unary(self, inner: Unary, method: str, metadata: tuple[Any, ...], *, stream_in: bool) -> Unary:
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            record = audit.CallRecord(rpc=method, peer=context.peer())
            error: BaseException | None = None
            try:
                key = self._admit(record, metadata, context)
                try:
                    if not stream_in:
                        self._describe(record, request)
                    token = audit.bind(record)
                    try:
                        response = inner(request, context)
                    finally:
                        audit.unbind(token)
                    if record.result_digest is None:
                        record.result_digest = audit.message_digest(response)
                    return response
                finally:
                    self.limiter.release(key)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(record, context, error)

        return behavior

    def _wrap_stream(self, inner: Stream, method: str, metadata: tuple[Any, ...], *, stream_in: bool) -> Stream:
        def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            return self._stream(inner, request, context, method, metadata, stream_in)

        return behavior

    def _stream(self, inner: Callable[..., Iterator[Any]], request: Any, context: grpc.ServicerContext, method: str,
                metadata: tuple[Any, ...], stream_in: bool) -> Iterator[Any]:
        # Admission happens inside the generator, so a slot is only ever taken by code that is sure to reach the
        # finally below; the slot and the record live until the last message was sent or the client went away.
        record = audit.CallRecord(rpc=method, peer=context.peer())
        error: BaseException | None = None
        key: str | None = None
        try:
            key = self._admit(record, metadata, context)
            if not stream_in:
                self._describe(record, request)
            token = audit.bind(record)
            last: Any = None
            try:
                for last in inner(request, context):  # the last message is the result
                    yield last
            finally:
                audit.unbind(token)
            if record.result_digest is None and last is not None:
                record.result_digest = audit.message_digest(last)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if key is not None:
                self.limiter.release(key)
            self._finish(record, context, error)


def _bearer_token(metadata: tuple[Any, ...]) -> str:
    values = [m.value for m in metadata if m.key == "authorization"]
    if not values:
        raise UnauthenticatedError(
            "missing bearer token; send the metadata 'authorization: Bearer <token>' (client: --token or "
            "NEUROEXPLAIN_TOKEN)",
        )
    if len(values) > 1:
        raise UnauthenticatedError("more than one authorization header; send exactly one")
    value = values[0] if isinstance(values[0], str) else ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError(
            "the authorization header must be 'Bearer <token>'; other schemes are "
            "not accepted"
        )
    return token.strip()


def _peer_host(peer: str) -> str:
    # "ipv4:10.0.0.7:5311" / "ipv6:[::1]:5311" -> the address without the port: one client, many connections.
    kind, _, rest = peer.partition(":")
    host, sep, _port = rest.rpartition(":")
    return f"{kind}:{host}" if sep else peer


def _status_name(context: grpc.ServicerContext, error: BaseException | None, status_of: StatusOf | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if not context.is_active() or isinstance(error, GeneratorExit):
        # The client went away (or its deadline passed) while the call ran; a stream may even have run to its end.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    if error is None:
        return "OK"
    if status_of is not None:
        mapped = status_of(error)
        return mapped.name if mapped is not None else grpc.StatusCode.INTERNAL.name
    return grpc.StatusCode.UNKNOWN.name  # what grpc itself answers for an exception nobody mapped
