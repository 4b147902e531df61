"""Feature visualization speed and memory at 2 mm.

Targets (issue 4): time per optimisation step <= 1.3x one forward+backward pass of the same model on the same input
size, measured in the same run; the seconds for 256 steps at 2 mm; peak RSS <= 2 GB for one visualization.

Step time is the median interval between progress reports (so setup and output encoding are excluded); the baseline
is the median of plain ``model(x)[0, c].backward()`` calls on a (1, 1, 80, 96, 80) input. The machine is shared with
other jobs, so both are timed in CPU time of the calling thread (``time.thread_time``; torch runs single-threaded
here, so all compute is on that thread and time spent waiting for a core does not count), in alternating rounds
(``BENCH_FEATVIS_ROUNDS``, default 3), and the fastest round of each is used. The 256-step run reports both wall
and CPU seconds.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import sys
import time

import torch

from bench.common import p50, peak_rss_mb, save

STEPS_PER_PRESET = int(os.environ.get("BENCH_FEATVIS_STEPS", "12"))
ROUNDS = int(os.environ.get("BENCH_FEATVIS_ROUNDS", "3"))
FULL_RUN_STEPS = int(os.environ.get("BENCH_FEATVIS_FULL_STEPS", "256"))


def _model():  # type: ignore[no-untyped-def]
    from neuroexplain.errors import NotFoundError
    from neuroexplain.models import load_model

    try:
        return load_model("lesion"), "bundled lesion"
    except NotFoundError:  # weights not built yet: same architecture, random weights (timing does not depend on them)
        from neuroexplain.models.registry import LoadedModel
        from neuroexplain.models.spec import LayerInfo, ModelSpec
        from neuroexplain.models.zoo import ScanCNN
        from neuroexplain.template import MNI_2MM

        module = ScanCNN().eval()
        for p in module.parameters():
            p.requires_grad_(False)
        spec = ModelSpec("lesion", "0.0.0", "bench", ("healthy", "lesion"), MNI_2MM, "neuroexplain.models.zoo:ScanCNN",
                         layers=(LayerInfo("conv1", 8, (80, 96, 80)),))
        return LoadedModel(spec, module, torch.device("cpu")), "random-weight ScanCNN"


def _step_seconds(model, preset: str, steps: int) -> float:  # type: ignore[no-untyped-def]
    from neuroexplain.featvis import visualize

    stamps: list[float] = []
    visualize(model, "class:lesion", preset=preset, steps=steps, seed=0,
              progress=lambda _p: stamps.append(time.thread_time()))
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def _cpu_times(fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()
    out = []
    for _ in range(repeat):
        c0 = time.thread_time()
        fn()
        out.append(time.thread_time() - c0)
    return out


def main() -> int:
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    model, which = _model()
    shape = tuple(model.spec.grid.shape)
    x = torch.rand((1, 1, *shape), requires_grad=True)

    def forward_backward() -> None:
        x.grad = None
        model.module(x)[0, 1].backward()

    results: dict = {"model": which, "grid": list(shape), "torch_threads": threads, "machine": platform.processor()
                     or platform.machine(), "presets": {}}
    for preset in ("none", "paper", "robust", "full"):
        fbs, steps = [], []
        for _ in range(ROUNDS):  # alternating, beside each preset: the machine is shared
            fbs.append(p50(_cpu_times(forward_backward, repeat=5)))
            steps.append(_step_seconds(model, preset, STEPS_PER_PRESET))
        fb, step = min(fbs), min(steps)
        results["presets"][preset] = {"step_s": round(step, 4), "forward_backward_s": round(fb, 4),
                                      "ratio": round(step / fb, 3), "rounds_step_s": [round(t, 4) for t in steps],
                                      "rounds_forward_backward_s": [round(t, 4) for t in fbs]}
        print(f"{preset:>7}: step {step:.3f} s, forward+backward {fb:.3f} s, ratio {step / fb:.2f}", flush=True)
    from neuroexplain.featvis import visualize

    rss_before = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.thread_time()
    visualize(model, "class:lesion", preset="robust", steps=FULL_RUN_STEPS, seed=0)
    results["robust_full_run"] = {"steps": FULL_RUN_STEPS, "seconds": round(time.perf_counter() - t0, 1),
                                  "cpu_seconds": round(time.thread_time() - c0, 1)}
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    results["peak_rss_mb_before_full_run"] = round(rss_before, 1)
    worst = max(v["ratio"] for v in results["presets"].values())
    results["targets"] = {"step_ratio_max": worst, "step_ratio_ok": worst <= 1.3,
                          "peak_rss_ok": results["peak_rss_mb"] <= 2048}
    save("featvis", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
