"""OpenMP settings for the processes that run models (the TorchServe workers, the in-process gateway).

torch's CPU kernels run on libgomp, whose threads by default spin after each parallel region before they sleep. A
serving process shares its cores with the gateway's gRPC threads, TorchServe's Java frontend and other workers, so
that spinning takes the cores the next request needs: measured on 2 cores under load, a TorchServe Predict of a
2 mm scan cost the worker 170 ms of CPU with the default and 28 ms with ``OMP_WAIT_POLICY=PASSIVE`` (p50 latency
281 ms → 63 ms). Several workers of one model split the cores between them (``OMP_NUM_THREADS``): on 2 cores, two
workers of one thread each answered 16 clients at 45-48 req/s against 34 with two threads each (README,
Benchmarks). The settings must be in the environment before torch is imported; an operator's own value wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

THREAD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def thread_env(environ: Mapping[str, str], workers: int = 1, cores: int | None = None) -> dict[str, str]:
    """The settings ``environ`` does not set itself: :data:`THREAD_ENV`, and with ``workers`` > 1 processes
    sharing the ``cores`` (default: :func:`usable_cores`), ``OMP_NUM_THREADS`` = cores // workers (at least 1)."""
    wanted = dict(THREAD_ENV)
    if workers > 1:
        wanted["OMP_NUM_THREADS"] = str(max(1, (cores or usable_cores()) // workers))
    return {k: v for k, v in wanted.items() if k not in environ}
