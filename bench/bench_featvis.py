"""Feature visualization speed and memory at 2 mm.

Targets (issue 4): time per optimisation step <= 1.3x one forward+backward pass of the same model on the same input
size, measured in the same run; the seconds for 256 steps at 2 mm; peak RSS <= 2 GB for one visualization.

A step's time is the interval between progress reports (so setup and output encoding are excluded); the baseline is
a plain ``model(x)[0, c].backward()`` on a (1, 1, 80, 96, 80) random input, run inside every progress callback and
subtracted from that interval, so each step is paired with a baseline measured right next to it. The ratio is
sum(step times) / sum(baseline times) over the pairs (``BENCH_FEATVIS_STEPS`` - 1, default 32), so periodic work such
as a blur every 4 steps counts; the median pair ratio is reported beside it. The machine is shared with other jobs, so both are
timed in CPU time of the calling thread (``time.thread_time``; torch runs single-threaded here, so all compute is on
that thread and time spent waiting for a core does not count). The 256-step run reports wall and CPU seconds.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch

from bench.common import peak_rss_mb, save

STEPS_PER_PRESET = int(os.environ.get("BENCH_FEATVIS_STEPS", "33"))
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


def _paired(model, preset: str, steps: int, forward_backward) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """Per step: the step's CPU time and, right after it (inside the progress callback, excluded from the step), one
    plain forward+backward. Adjacent pairs see the same machine load, so their ratio is stable on a shared machine."""
    from neuroexplain.featvis import visualize

    stamps: list[float] = []
    fbs: list[float] = []

    def progress(_p) -> None:  # type: ignore[no-untyped-def]
        t = time.thread_time()
        stamps.append(t)
        forward_backward()
        fbs.append(time.thread_time() - t)

    visualize(model, "class:lesion", preset=preset, steps=steps, seed=0, progress=progress)
    step_times = [stamps[i + 1] - stamps[i] - fbs[i] for i in range(len(stamps) - 1)]
    return step_times, fbs[1:]


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
        steps, fbs = _paired(model, preset, STEPS_PER_PRESET, forward_backward)
        # Ratio of the sums: periodic work (paper's blur every 4 steps) counts; the median pair ratio would skip it.
        ratio = sum(steps) / sum(fbs)
        median_ratio = statistics.median(a / b for a, b in zip(steps, fbs))
        step, fb = sum(steps) / len(steps), sum(fbs) / len(fbs)
        results["presets"][preset] = {"step_s": round(step, 4), "forward_backward_s": round(fb, 4),
                                      "ratio": round(ratio, 3), "median_pair_ratio": round(median_ratio, 3),
                                      "pairs": len(steps)}
        print(f"{preset:>7}: step {step:.3f} s, forward+backward {fb:.3f} s (means of {len(steps)} paired steps), "
              f"ratio {ratio:.2f} (median pair {median_ratio:.2f})", flush=True)
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
