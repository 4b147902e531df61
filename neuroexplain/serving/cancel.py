"""Cancel flags: how the gateway stops a busy TorchServe worker whose callers have all gone.

TorchServe never tells a busy worker that its client left (pytorch/serve#2814), so the gateway raises a flag — a
file named after the job id in the cancel directory both sides share — holding the wall-clock time it was raised
(:func:`raise_flag`). The worker polls it (:class:`CancelWatch`) before every step (visualize) or model pass
(attribute), reads that time (:func:`flag_raised_at`) to report how many units ran after it, and removes the flag
when the job ends.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def raise_flag(flag: Path, at: float) -> None:
    """Raise a job's cancel flag, holding ``at`` (``time.time()``); written aside and renamed, so a reader never sees a
    half-written file."""
    aside = flag.with_name(f".{flag.name}.raising")
    aside.write_text(f"{at:.6f}")
    os.replace(aside, flag)


def flag_raised_at(flag: Path) -> float | None:
    """When a flag was raised (``time.time()``), or None while it is not raised.

    The later of the time the gateway wrote and the file's change time (set by the rename that made it visible,
    coarse: a clock tick): a gateway thread descheduled between the two does not count as time the flag was up.
    """
    try:
        text = flag.read_text()
        changed = flag.stat().st_ctime
    except OSError:
        return None
    try:
        return max(float(text), changed)
    except ValueError:  # a flag from an older gateway (an empty file)
        return changed


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
