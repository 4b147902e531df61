"""The one table from the project's exception tree to gRPC status codes, and the interceptor that applies it.

Servicer, core and backends raise ``neuroexplain.errors`` exceptions and never call ``context.abort`` themselves.
The interceptor turns them into a status with the exception's message (which says what was wrong and what is
allowed, and never holds patient data). Anything else is a bug: the caller gets INTERNAL with a generic message and an
error id, the log gets the traceback under the same id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from neuroexplain import errors

log = logging.getLogger("neuroexplain.service")

# Most specific first is not needed: lookup walks the exception's MRO, so a subclass maps like its parent unless
# listed itself.
STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.CancelledError: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.UnimplementedError: grpc.StatusCode.UNIMPLEMENTED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    MemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

_GENERIC: dict[type[BaseException], str] = {
    MemoryError: "the server ran out of memory for this request; try a smaller scan or fewer steps",
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """Status code and message for a mapped exception, or None when the exception is not in the table."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code, _GENERIC.get(cls, str(exc) or cls.__name__)
    return None


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    mapped = status_for(exc)
    if mapped is None:
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error in %s (error id %s)", method, error_id, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}); the server log has details")
    else:
        code, message = mapped
        log.info("%s -> %s: %s", method, code.name, message)
        context.abort(code, message)


def _already_aborted(context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code; let that one through untouched.
    return context.code() not in (None, grpc.StatusCode.OK)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by unary and server-streaming handlers through :data:`STATUS_CODES`."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return inner(request, context)
                except Exception as exc:
                    if _already_aborted(context):
                        raise
                    _abort(context, method, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from inner_stream(request, context)
                except GeneratorExit:
                    raise
                except Exception as exc:
                    if _already_aborted(context):
                        raise
                    _abort(context, method, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
