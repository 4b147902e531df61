"""OpenMP and allocator settings for the processes that run models (the TorchServe workers, the in-process gateway).

**OpenMP.** torch's CPU kernels run on libgomp, whose threads by default spin after each parallel region before they
sleep. A serving process shares its cores with the gateway's gRPC threads, TorchServe's Java frontend and other
workers, so that spinning takes the cores the next request needs: measured on 2 cores under load, a TorchServe
Predict of a 2 mm scan cost the worker 170 ms of CPU with the default and 28 ms with ``OMP_WAIT_POLICY=PASSIVE`` (p50
latency 281 ms → 63 ms). Several workers of one model split the cores between them (``OMP_NUM_THREADS``): on 2
cores, two workers of one thread each answered 16 clients at 45-48 req/s against 34 with two threads each (README,
Benchmarks). These must be in the environment before torch is imported.

**Allocator.** Every request allocates a few buffers of tens of MB (the inflated file, its float32 voxels) in a
thread other than the main one. glibc's malloc serves such threads from per-thread arenas built of 64 MB heaps that it
unmaps and trims as soon as they empty, so each request faulted its buffers in afresh from the kernel: measured on
2 cores, ~5,500 page faults and ~20 ms per 1 mm float32 Predict, and ``read_scan`` in a worker thread took 64 ms
against 46 ms in the main thread. One arena (``MALLOC_ARENA_MAX=1``), whose free memory up to
:data:`TRIM_THRESHOLD` stays mapped, with buffers up to :data:`MMAP_THRESHOLD` served from it instead of fresh
mappings, reuses the same pages: the faults drop to under 1,000 and ``read_scan`` in a thread matches the main thread.
glibc reads these variables when the process starts, so a child process gets them in its environment
(:func:`process_env`) and the running process sets them with ``mallopt`` (:func:`tune_allocator`).

An operator's own value of any of these variables wins.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

THREAD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
MMAP_THRESHOLD = 64 << 20  # bytes: larger buffers get their own mapping (a 1 mm float32 volume is 19.7 MB)
TRIM_THRESHOLD = 128 << 20  # bytes of free memory at the top of the heap kept mapped for the next request
ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
# glibc's mallopt() parameter numbers (malloc.h) for the variables of ALLOCATOR_ENV.
_MALLOPT = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def process_env(environ: Mapping[str, str], workers: int = 1, cores: int | None = None) -> dict[str, str]:
    """The settings a model-running child process gets that ``environ`` does not set itself: :data:`THREAD_ENV`,
    :data:`ALLOCATOR_ENV`, and with ``workers`` > 1 processes sharing the ``cores`` (default: :func:`usable_cores`),
    ``OMP_NUM_THREADS`` = cores // workers (at least 1)."""
    wanted = {**THREAD_ENV, **ALLOCATOR_ENV}
    if workers > 1:
        wanted["OMP_NUM_THREADS"] = str(max(1, (cores or usable_cores()) // workers))
    return {k: v for k, v in wanted.items() if k not in environ}


def tune_allocator(environ: Mapping[str, str]) -> dict[str, str]:
    """Apply :data:`ALLOCATOR_ENV` to this process with glibc's ``mallopt``, each setting ``environ`` does not set
    (glibc has read those itself); returns what was applied. Elsewhere than glibc: nothing, ``{}``. Call it before
    the process starts threads: arenas already made stay."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and macOS have no such mallopt parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for name, value in ALLOCATOR_ENV.items():
        if name not in environ and mallopt(_MALLOPT[name], int(value)) == 1:
            applied[name] = value
    return applied
