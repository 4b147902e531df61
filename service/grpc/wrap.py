"""The one helper every server interceptor wraps handlers with (metrics, errors, security).

gRPC hands an interceptor an ``RpcMethodHandler`` of one of four shapes; rebuilding it with a wrapped behaviour and
the same (de)serializers is the same few lines for every interceptor, so they live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

Unary = Callable[[Any, grpc.ServicerContext], Any]
Stream = Callable[[Any, grpc.ServicerContext], Iterator[Any]]


Coder = Callable[[Any], Any]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    *,
    unary: Callable[[Unary, bool], Unary],
    stream: Callable[[Stream, bool], Stream],
    coders: Callable[[Coder | None, Coder | None], tuple[Coder | None, Coder | None]] | None = None,
) -> grpc.RpcMethodHandler:
    """Rebuild ``handler`` with its behaviour wrapped.

    Args:
        handler: the handler ``continuation`` returned.
        unary: ``(inner, stream_in) -> behaviour`` for unary responses (``stream_in``: the request is a stream).
        stream: the same for streamed responses (the behaviour is a generator).
        coders: ``(request_deserializer, response_serializer) -> (new ones)``, to see the messages' wire bytes;
            None keeps them.

    Returns:
        A handler of the same shape (and the same serializers unless ``coders`` replaced them).
    """
    des, ser = handler.request_deserializer, handler.response_serializer
    if coders is not None:
        des, ser = coders(des, ser)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, False), des, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, True), des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream, False), des, ser)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream, True), des, ser)


class WrappingInterceptor(grpc.ServerInterceptor):
    """A server interceptor that wraps every handler it sees: subclasses implement :meth:`wrap` (and may return the
    handler unchanged, e.g. for exempt methods)."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        return None if handler is None else self.wrap(handler, handler_call_details)

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        """The handler to run instead of ``handler`` (usually :func:`wrap_handler` around it)."""
        raise NotImplementedError
