"""Attribution and feature visualization as the handler runs them (exactly the in-process backend's code), and the
cancel-flag watch of one job.

The worker wraps its one loaded model in :class:`ModelRunner`, an :class:`~service.backends.inprocess.InProcessBackend`
whose model table is that model, so both backends run the same library calls and build the same domain results —
a response does not depend on which backend computed it. Kept apart from the handler module because TorchServe's
loader requires the handler module to define exactly one class.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from handlers.envelope import flag_raised_at
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


class CancelWatch:
    """One job's cancel flag as the worker polls it, and how promptly the work honoured it.

    The library polls :meth:`is_cancelled` before every unit of work — an optimisation step (visualize) or a model
    pass (attribute). Units are counted where they really happen: visualize's finished steps arrive through
    :meth:`step_done` (its progress callback), independent of how often the flag is polled; attribute's passes are
    the polls themselves (the library polls before every pass). :meth:`units_after_flag` then says how many units
    ran after the flag was raised — the "stopped within k steps" of DESIGN's runtime contract.

    Args:
        flag: the flag's path, or None when the request has no job id (it can then not be cancelled).
        count_polls: count each poll that found no flag as a unit (attribute); else only :meth:`step_done` counts.
    """

    def __init__(self, flag: Path | None, *, count_polls: bool) -> None:
        self.flag = flag
        self.count_polls = count_polls
        self.unit_times: list[float] = []  # time.time() of every counted unit
        self.raised_at: float | None = None

    def is_cancelled(self) -> bool:
        if self.flag is None:
            return False
        if self.raised_at is None and self.flag.exists():
            self.raised_at = flag_raised_at(self.flag)
        if self.raised_at is not None:
            return True
        if self.count_polls:
            self.unit_times.append(time.time())
        return False

    def step_done(self) -> None:
        self.unit_times.append(time.time())

    @property
    def units(self) -> int:
        return len(self.unit_times)

    def units_after_flag(self) -> int | None:
        """Units that ran (visualize: finished; attribute: started) after the flag was raised; None if it was not."""
        if self.raised_at is None:
            return None
        return sum(1 for t in self.unit_times if t >= self.raised_at)

    def lower(self) -> None:
        """Remove the flag once the job has ended (whether or not it was raised)."""
        if self.flag is not None:
            with contextlib.suppress(OSError):
                self.flag.unlink()
