"""OpenMP settings for the processes that run models (the TorchServe workers, the in-process gateway).

torch's CPU kernels run on libgomp, whose threads by default spin after each parallel region before they sleep. A
serving process shares its cores with the gateway's gRPC threads, TorchServe's Java frontend and other workers, so
that spinning takes the cores the next request needs: measured on 2 cores under load, a TorchServe Predict of a
2 mm scan cost the worker 170 ms of CPU with the default and 28 ms with ``OMP_WAIT_POLICY=PASSIVE`` (p50 latency
281 ms → 63 ms; README, Performance). The settings must be in the environment before torch is imported; an
operator's own value wins.
"""

from __future__ import annotations

from collections.abc import Mapping

THREAD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def thread_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings of :data:`THREAD_ENV` that ``environ`` does not set itself."""
    return {k: v for k, v in THREAD_ENV.items() if k not in environ}
