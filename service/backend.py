"""The Backend protocol: where the gateway's computations run (in this process, or in TorchServe workers).

The request, result and context types are the serving contract's (:mod:`neuroexplain.serving.types`), shared with
the TorchServe worker; nothing here knows gRPC or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from prometheus_client.registry import Collector

from neuroexplain.serving.types import (
    AttributeRequest,
    AttributeResult,
    CallContext,
    ModelInfo,
    PredictRequest,
    PredictResult,
    ScanInput,
    VisualizeRequest,
    VisualizeResult,
)


@runtime_checkable
class Backend(Protocol):
    """Where the computation happens. Implementations: ``service.backends.inprocess.InProcessBackend`` and
    ``service.backends.torchserve.TorchServeBackend``.

    Methods raise ``neuroexplain.errors`` exceptions only (``UnavailableError`` when the backend is down,
    ``CancelledError`` when ``ctx.is_cancelled()`` turned True, ``InvalidInputError``/``NotFoundError`` for bad
    requests); the gateway maps them to gRPC codes with the one error table. Methods are called from many threads at
    once and keep no per-request state on ``self``. Every backend decodes scans where the model runs (the core never
    does), with the limits each ``ScanInput`` carries.
    """

    def start(self) -> None:
        """Load models / start and wait for the engine. Called once before serving."""

    def close(self) -> None:
        """Release everything; called once on shutdown after in-flight calls drained."""

    def ready(self) -> bool:
        """True while the backend can answer (readiness probe); False e.g. while TorchServe restarts."""

    def models(self) -> list[ModelInfo]:
        """Every served model."""

    def collectors(self) -> Sequence[Collector]:
        """Prometheus collectors the gateway registers on its ``/metrics`` registry (TorchServe: its re-export)."""

    def decode_ahead(self, scan: ScanInput, model: str) -> None:
        """A hint given while the core hashes ``scan`` (a file sent inline) for a request to ``model`` and nothing
        else is computing: a backend that decodes in this process may start decoding it now, so that the decode
        overlaps the digest, and hand the volume to the request that follows (the in-process backend); one that
        decodes elsewhere ignores it."""

    def predict(self, request: PredictRequest, ctx: CallContext) -> PredictResult: ...

    def attribute(self, request: AttributeRequest, ctx: CallContext) -> AttributeResult: ...

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult: ...
