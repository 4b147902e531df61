"""In-process backend: the library called directly in the gateway's process (tests, laptops, no Java).

The computations are :class:`neuroexplain.serving.runner.Runner`'s — the same calls the TorchServe handler makes —
so torch is loaded only when this backend is chosen. Models are loaded once at :meth:`InProcessBackend.start`; each
call runs on the core's worker thread with no state kept on ``self`` besides the immutable model table.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client.registry import Collector

from neuroexplain.errors import NotFoundError, UnavailableError
from neuroexplain.serving.catalog import model_info_from_file
from neuroexplain.serving.types import (
    AttributeRequest,
    AttributeResult,
    CallContext,
    ModelInfo,
    PredictRequest,
    PredictResult,
    VisualizeRequest,
    VisualizeResult,
)

log = logging.getLogger("neuroexplain.service")


class InProcessBackend:
    """Runs predict, attribute and visualize with the library in this process.

    Args:
        model_dirs: model folders besides the bundled ones (the gateway's ``Settings.model_dirs``).
        device: torch device (``cpu``, ``cuda``, ``cuda:1``).
        models: names to serve; default every model found.
    """

    def __init__(self, model_dirs: tuple[Path, ...] = (), device: str = "cpu", models: tuple[str, ...] = ()) -> None:
        self.model_dirs = tuple(model_dirs)
        self.device = device
        self.only = tuple(models)
        self._runner: Any = None
        self._infos: list[ModelInfo] = []
        self._ready = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        from neuroexplain.models.registry import load_from_files, model_folders
        from neuroexplain.serving.runner import Runner

        folders = model_folders(self.model_dirs)
        if self.only:
            missing = sorted(set(self.only) - set(folders))
            if missing:
                raise NotFoundError(f"models {missing} not found; available: {sorted(folders)}")
            folders = {n: folders[n] for n in self.only}
        loaded = {n: load_from_files(f / "spec.json", f / "weights.pt", device=self.device) for n, f in folders.items()}
        self._infos = [model_info_from_file(f / "spec.json") for f in folders.values()]
        self._runner = Runner(loaded)
        self._ready.set()
        log.info("in-process backend: %d models loaded on %s", len(loaded), self.device)

    def close(self) -> None:
        self._ready.clear()

    def ready(self) -> bool:
        return self._ready.is_set()

    def models(self) -> list[ModelInfo]:
        return list(self._infos)

    def collectors(self) -> Sequence[Collector]:
        return ()

    def _run(self) -> Any:
        if self._runner is None:
            raise UnavailableError("the in-process backend has not loaded its models yet")
        return self._runner

    # -- operations ----------------------------------------------------------------------------------------------

    def predict(self, request: PredictRequest, ctx: CallContext) -> PredictResult:
        return self._run().predict(request, ctx)  # type: ignore[no-any-return]

    def attribute(self, request: AttributeRequest, ctx: CallContext) -> AttributeResult:
        return self._run().attribute(request, ctx)  # type: ignore[no-any-return]

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult:
        return self._run().visualize(request, ctx)  # type: ignore[no-any-return]


__all__ = ["InProcessBackend"]
