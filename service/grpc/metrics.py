"""The interceptor that records the per-RPC metrics of :class:`service.metrics.Metrics`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from service.grpc.wrap import Coder, Stream, Unary, WrappingInterceptor, wrap_handler
from service.metrics import RPCS, UNKNOWN, Metrics


class MetricsInterceptor(WrappingInterceptor):
    """Counts RPCs by RPC, model and status code; times them; measures message sizes; tracks in-flight RPCs.

    Args:
        metrics: where to record.
        known_models: returns the served model names; any other name is recorded as ``unknown`` so a caller cannot
            grow the label set.
    """

    def __init__(self, metrics: Metrics, known_models: Callable[[], frozenset[str]]) -> None:
        self._m = metrics
        self._known = known_models

    def _model(self, request: Any) -> str:
        name = getattr(request, "model", None) or getattr(request, "name", None) or ""
        if not name:
            return ""
        return name if name in self._known() else UNKNOWN

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        rpc = method.rsplit("/", 1)[-1]
        if not method.startswith("/neuroexplain.v1.") or rpc not in RPCS:
            return handler
        m = self._m

        def begin(request: Any) -> tuple[str, float]:
            model = self._model(request)
            m.in_flight.labels(rpc).inc()
            return model, time.perf_counter()

        # Sizes from the wire bytes the (de)serializers see: a message's ByteSize() walks it again (1.6 ms for a
        # 7.4 MB scan here), len() of the bytes is free.
        def coders(des: Coder | None, ser: Coder | None) -> tuple[Coder, Coder]:
            def deserialize(raw: bytes) -> Any:
                m.request_bytes.labels(rpc).observe(len(raw))
                return des(raw) if des is not None else raw

            def serialize(message: Any) -> Any:
                raw = ser(message) if ser is not None else message
                m.response_bytes.labels(rpc).observe(len(raw))
                return raw

            return deserialize, serialize

        def finish(context: grpc.ServicerContext, model: str, start: float, failed: bool) -> None:
            code = context.code()
            if code is None:
                if not context.is_active():
                    code = grpc.StatusCode.CANCELLED  # the client went away (or its deadline passed)
                else:
                    code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            m.requests.labels(rpc, model, code.name).inc()
            m.request_duration.labels(rpc, model).observe(time.perf_counter() - start)
            m.in_flight.labels(rpc).dec()

        def unary(inner: Unary, _stream_in: bool) -> Unary:
            def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
                model, start = begin(request)
                failed = True
                try:
                    response = inner(request, context)
                    failed = False
                    return response
                finally:
                    finish(context, model, start, failed)

            return behaviour

        def stream(inner: Stream, _stream_in: bool) -> Stream:
            def behaviour(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                model, start = begin(request)
                failed = True
                try:
                    yield from inner(request, context)
                    failed = False
                finally:
                    finish(context, model, start, failed)

            return behaviour

        return wrap_handler(handler, unary=unary, stream=stream, coders=coders)
