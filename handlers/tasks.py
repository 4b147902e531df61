"""Attribution and feature visualization as the handler runs them: exactly the in-process backend's code.

The worker wraps its one loaded model in :class:`ModelRunner`, an :class:`~service.backends.inprocess.InProcessBackend`
whose model table is that model, so both backends run the same library calls and build the same domain results —
a response does not depend on which backend computed it. Kept apart from the handler module because TorchServe's
loader requires the handler module to define exactly one class.
"""

from __future__ import annotations

from typing import Any

from service.backends.inprocess import InProcessBackend


class ModelRunner(InProcessBackend):
    """The in-process backend serving one already-loaded model (the worker's).

    Args:
        model: the worker's ``LoadedModel``.
    """

    def __init__(self, model: Any) -> None:
        super().__init__(device=str(model.device))
        self._models = {model.spec.name: model}
        self._ready.set()
