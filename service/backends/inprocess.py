"""In-process backend: the library called directly in the gateway's process (tests, laptops, no Java).

The computations are :class:`neuroexplain.serving.runner.Runner`'s — the same calls the TorchServe handler makes —
so torch is loaded only when this backend is chosen. Models are loaded once at :meth:`InProcessBackend.start`; each
call runs on the core's worker thread with no state kept on ``self`` besides the immutable model table and the one
scan being decoded ahead (:class:`DecodeAhead`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    ScanInput,
    VisualizeRequest,
    VisualizeResult,
)

log = logging.getLogger("neuroexplain.service")
_DIGEST_FOLLOWS = "digest-follows"  # the digest of a scan decoded ahead: the core's replaces it when it is picked up


class DecodeAhead:
    """At most one scan file decoded on a thread of its own while the core hashes the same bytes, so that the decode
    overlaps the digest instead of following it; the request's own decode picks it up (:meth:`take`).

    The core starts one only when nothing else is computing (``Core.resolve_scan``): an idle core's time, never
    taken from queued work. A decode nobody picks up (the answer came from the cache or a shared computation, or the
    request was refused after its scan was read) is dropped by the next :meth:`start` or the next :meth:`take` of
    another scan; it holds one decoded volume until then. What the caller gets is exactly what decoding on its own
    thread would give, the same errors included.

    Args:
        decode: the decoder (``neuroexplain.serving.runner.decode``).
    """

    def __init__(self, decode: Callable[[ScanInput, Any], Any]) -> None:
        self._decode = decode
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="decode-ahead")
        self._lock = threading.Lock()
        self._entry: tuple[ScanInput, Any, Future[Any]] | None = None

    def start(self, scan: ScanInput, onto: Any = None) -> None:
        """Begin decoding ``scan`` (a file sent inline; its digest is not known yet), resampled onto grid ``onto``
        as it decodes where one is given, unless a decode is still running."""
        with self._lock:
            if self._entry is not None and not self._entry[2].done():
                return
            ahead = dataclasses.replace(scan, digest=_DIGEST_FOLLOWS)
            self._entry = (scan, onto, self._pool.submit(self._decode, ahead, onto))

    def take(self, scan: ScanInput, onto: Any = None) -> Any:
        """``scan``'s volume: the decode started ahead for these very bytes, reading options and grid, else decoded
        now."""
        with self._lock:
            entry, self._entry = self._entry, None
        if entry is not None:
            if _same_read(entry[0], scan) and entry[1] == onto:
                return dataclasses.replace(entry[2].result(), digest=scan.digest)  # its error, if it failed, is raised
            entry[2].cancel()  # another scan's: not decoded at all if it has not started yet
        return self._decode(scan, onto)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _same_read(a: ScanInput, b: ScanInput) -> bool:
    """Whether decoding ``a`` gives ``b``'s volume: the same bytes object (not compared byte by byte) and options."""
    return (a.data is b.data and not b.is_dicom and a.volume_index == b.volume_index and a.nonfinite == b.nonfinite
            and a.limits == b.limits)


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
        self._ahead: DecodeAhead | None = None
        self._infos: list[ModelInfo] = []
        self._ready = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        from neuroexplain.models.registry import load_from_files, model_folders
        from neuroexplain.serving.runner import Runner, decode

        folders = model_folders(self.model_dirs)
        if self.only:
            missing = sorted(set(self.only) - set(folders))
            if missing:
                raise NotFoundError(f"models {missing} not found; available: {sorted(folders)}")
            folders = {n: folders[n] for n in self.only}
        loaded = {n: load_from_files(f / "spec.json", f / "weights.pt", device=self.device) for n, f in folders.items()}
        self._infos = [model_info_from_file(f / "spec.json") for f in folders.values()]
        self._ahead = DecodeAhead(decode)
        self._runner = Runner(loaded, decoder=self._ahead.take)
        self._ready.set()
        log.info("in-process backend: %d models loaded on %s", len(loaded), self.device)

    def close(self) -> None:
        self._ready.clear()
        if self._ahead is not None:
            self._ahead.close()

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

    def decode_ahead(self, scan: ScanInput, model: str) -> None:
        if self._ahead is not None:  # set with the runner, at start()
            self._ahead.start(scan, self._runner.onto(model, scan))

    def predict(self, request: PredictRequest, ctx: CallContext) -> PredictResult:
        return self._run().predict(request, ctx)  # type: ignore[no-any-return]

    def attribute(self, request: AttributeRequest, ctx: CallContext) -> AttributeResult:
        return self._run().attribute(request, ctx)  # type: ignore[no-any-return]

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult:
        return self._run().visualize(request, ctx)  # type: ignore[no-any-return]


__all__ = ["InProcessBackend"]
