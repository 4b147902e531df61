"""The gateway's side of the one error table: each exception class names its gRPC status in
:mod:`neuroexplain.errors` (``code``); :func:`status_for` turns it into a ``grpc.StatusCode``, and
:class:`ErrorInterceptor` applies it.

Servicer, core, backends and the security interceptor raise ``neuroexplain.errors`` exceptions and never call
``context.abort`` themselves. The interceptor turns them into a status with the exception's message (which says what
was wrong and what is allowed, and never holds patient data). Anything else is a bug: the caller gets INTERNAL with a
generic message and an error id, the log gets the traceback under the same id.

Where an exception names the request field or option that was wrong (``NeuroExplainError.field``), the status also
carries a ``google.rpc.BadRequest`` detail with that field (grpcio-status), so a program need not parse the message.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import grpc

from neuroexplain import errors
from service.grpc.wrap import Stream, Unary, WrappingInterceptor, wrap_handler

log = logging.getLogger("neuroexplain.service")

_MEMORY_MESSAGE = "the server ran out of memory for this request; try a smaller scan or fewer steps"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """Status code and message for a mapped exception, or None when the table has no entry for it."""
    name = errors.status_name(exc)
    if name is None:
        return None
    code = grpc.StatusCode[name]
    message = str(exc) if isinstance(exc, errors.NeuroExplainError) else _MEMORY_MESSAGE
    return code, message or type(exc).__name__


def status_code(exc: BaseException) -> grpc.StatusCode | None:
    """Just the code of :func:`status_for` (what the audit line shows)."""
    mapped = status_for(exc)
    return None if mapped is None else mapped[0]


def rich_status(code: grpc.StatusCode, message: str, exc: BaseException) -> grpc.Status | None:
    """A status with a ``google.rpc.BadRequest`` detail naming the wrong field, or None when ``exc`` names none."""
    field = exc.field if isinstance(exc, errors.NeuroExplainError) else None
    if not field:
        return None
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    mapped = status_for(exc)
    if mapped is None:
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error in %s (error id %s)", method, error_id, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}); the server log has details")
    else:
        code, message = mapped
        log.info("%s -> %s: %s", method, code.name, message)
        status = rich_status(code, message, exc)
        if status is not None:
            context.abort_with_status(status)
        context.abort(code, message)


def _already_aborted(context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code; let that one through untouched.
    return context.code() not in (None, grpc.StatusCode.OK)


class ErrorInterceptor(WrappingInterceptor):
    """Maps exceptions raised by handlers (and interceptors inside this one) through the one table."""

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method

        def unary(inner: Unary, _stream_in: bool) -> Unary:
            def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return inner(request, context)
                except Exception as exc:
                    if _already_aborted(context):
                        raise
                    _abort(context, method, exc)

            return behaviour

        def stream(inner: Stream, _stream_in: bool) -> Stream:
            def behaviour(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from inner(request, context)
                except GeneratorExit:
                    raise
                except Exception as exc:
                    if _already_aborted(context):
                        raise
                    _abort(context, method, exc)

            return behaviour

        return wrap_handler(handler, unary=unary, stream=stream)
