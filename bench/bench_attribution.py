"""Attribution speed: each method on one 2 mm scan against its compute floor measured in the same run.

The floor of a method is the bare model passes it cannot avoid, at the same batch size: e.g. integrated gradients
with 32 steps and internal_batch_size 4 against 8 forward+backward passes on batches of 4. Target: method / floor
<= 1.3 for every method, on CPU seconds of this process (the machine is shared; wall times are reported too). Also reported: the end-to-end ``explain`` time (prediction pass, resampling back to the
scan, summary, NIfTI encoding; measured once, it is the same for every method) and the process's peak RSS with default options (target <= 3 GB).

Run: ``.venv/bin/python -m bench.bench_attribution`` (uses the bundled ``lesion`` model).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from bench.common import p50, peak_rss_mb, save

RATIO_TARGET = 1.3
RSS_TARGET_MB = 3 * 1024


def _floor_plan(method: Any, opts: dict[str, Any], shape: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(kind, batch size, count) of the passes a method needs at least, on a volume of ``shape``.

    kind: ``fb`` forward + backward to the input, ``f`` forward only, ``fl`` forward + backward to the last layer.
    """
    from neuroexplain.attribution import Method
    from neuroexplain.attribution.batching import evaluations

    b = opts.get("internal_batch_size", 1)  # as resolved (attribution.batching.resolved), never 0
    if method in (Method.INTEGRATED_GRADIENTS, Method.SMOOTHGRAD, Method.GRADIENT_SHAP):
        # SmoothGrad's floor is its noisy copies' gradients (the default base)
        n = opts["nt_samples"] if method is Method.SMOOTHGRAD else evaluations(method, opts, shape)
        return [("fb", b, n // b)] + ([("fb", n % b, 1)] if n % b else [])
    if method is Method.OCCLUSION:
        n = evaluations(method, opts, shape)  # the patch positions
        return [("f", 1, 1), ("f", b, n // b)] + ([("f", n % b, 1)] if n % b else [])
    if method is Method.DEEPLIFT:
        return [("fb", 2, 1)]  # captum runs the scan and its baseline together, as one batch of 2
    if method is Method.GRADCAM:
        return [("fl", 1, 1)]  # forward (no graph below the layer), backward only down to the explained layer
    if method in (Method.LRP_ALPHA_BETA, Method.LRP_COMPOSITE):
        return [("f", 1, 1), ("fb", 1, 1)]  # captum's LRP: one pass to set weights, one with relevance hooks
    return [("fb", 1, 1)]


def _floor(
    module: torch.nn.Module, x: torch.Tensor, plan: list[tuple[str, int, int]], target: int, layer: torch.nn.Module
) -> Callable[[], None]:
    def run() -> None:
        for kind, b, count in plan:
            xb = x.expand(b, -1, -1, -1, -1).clone()
            for _ in range(count):
                if kind == "fl":
                    seen: list[torch.Tensor] = []

                    def keep(_m: Any, _i: Any, out: torch.Tensor, seen: list[torch.Tensor] = seen) -> None:
                        seen.append(out.requires_grad_(True))  # the graph starts at the layer, as in Grad-CAM

                    handle = layer.register_forward_hook(keep)
                    try:
                        out = module(xb)[:, target].sum()
                    finally:
                        handle.remove()
                    torch.autograd.grad(out, seen[0])
                elif kind == "fb":
                    xi = xb.clone().requires_grad_(True)
                    module(xi)[:, target].sum().backward()
                else:
                    with torch.no_grad():
                        module(xb)
    return run


def main() -> None:
    from neuroexplain.attribution import Method, explain, parse_options
    from neuroexplain.attribution.batching import resolved
    from neuroexplain.attribution.methods import attribute_tensor, private_copy
    from neuroexplain.lab.synthetic import Task, make_sample
    from neuroexplain.models import load_model
    from neuroexplain.predict import prepare
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import Alignment, Scan

    warnings.filterwarnings("ignore", message=r"Setting (forward, )?backward hooks", category=UserWarning)
    # One thread: CPU seconds then count work only (idle OpenMP workers spin and would be billed to whichever call
    # happened to run beside a busy neighbour).
    torch.set_num_threads(int(os.environ.get("NEUROEXPLAIN_BENCH_THREADS", "1")))
    model = load_model("lesion")
    sample = make_sample(Task.LESION, 1_000_001)
    scan = Scan(sample.image, MNI_2MM.affine, "0" * 64, "nifti1")
    x = prepare(scan, model, Alignment.MNI).tensor()
    target = model.spec.class_index("lesion")
    layer_names = [layer.name for layer in model.spec.layers]
    results: dict[str, Any] = {}
    for method in Method:
        opts = resolved(method, parse_options(method, None), model.module, x)  # the batch size it runs with
        plan = _floor_plan(method, opts, tuple(x.shape[2:]))
        # p50 of interleaved rounds: 41 for the single-pass methods (tens of ms each, at the mercy of the neighbours),
        # 7 for the many-pass ones (seconds each; with 3, integrated gradients once measured 0.94x its own floor).
        repeat = 7 if sum(c for _, _, c in plan) > 2 else 41
        floor_module = private_copy(model.module)
        floor_fn = _floor(floor_module, x, plan, target, dict(floor_module.named_modules())[layer_names[-1]])

        def method_fn(method: Method = method, opts: dict[str, Any] = opts) -> None:
            # The request's private copy is part of the method's time (structural for all but LRP, see private_copy).
            attribute_tensor(
                private_copy(model.module, method), x, method, target, opts, grid=model.spec.grid, layer_names=layer_names
            )

        if not results:  # one warm-up for the whole run (allocator, captum import)
            floor_fn()
            method_fn()
        t_method: list[float] = []
        t_floor: list[float] = []
        c_method: list[float] = []
        c_floor: list[float] = []
        for _ in range(repeat):  # interleaved, so that load from other processes hits both alike
            for fn, wall, cpu in ((method_fn, t_method, c_method), (floor_fn, t_floor, c_floor)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        # The ratio uses CPU seconds of this process: on a shared machine wall time mostly measures the neighbours.
        ratio = p50(c_method) / p50(c_floor)
        results[method.value] = {
            "method_cpu_s": round(p50(c_method), 3),
            "floor_cpu_s": round(p50(c_floor), 3),
            "ratio": round(ratio, 3),
            "method_wall_s": round(p50(t_method), 3),
            "floor_wall_s": round(p50(t_floor), 3),
            "wall_ratio": round(p50(t_method) / p50(t_floor), 3),
            "floor": [{"pass": k, "batch": b, "count": c} for k, b, c in plan],
            "repeats": repeat,
            "meets_target": ratio <= RATIO_TARGET,
        }
        print(f"{method.value:22s} cpu: method {p50(c_method):7.2f}s floor {p50(c_floor):7.2f}s ratio {ratio:5.2f} | "
              f"wall: method {p50(t_method):7.2f}s floor {p50(t_floor):7.2f}s", flush=True)
    # What explain() adds to any method: the prediction pass, resampling back to the scan, summary, NIfTI encoding.
    c0 = time.process_time()
    explain(model, scan, Method.GRADIENT, target="lesion", alignment=Alignment.MNI)
    explain_cpu = time.process_time() - c0
    overhead = explain_cpu - results[Method.GRADIENT.value]["method_cpu_s"]
    print(f"explain(gradient) end to end: {explain_cpu:.2f} CPU s (overhead over the method: {overhead:.2f} s)")
    rss = peak_rss_mb()
    save("attribution", {
        "model": f"{model.spec.name} {model.spec.version}",
        "grid": list(model.spec.grid.shape),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "ratio_target": RATIO_TARGET,
        "methods": results,
        "worst_ratio": max(r["ratio"] for r in results.values()),
        "explain_gradient_cpu_s": round(explain_cpu, 3),
        "explain_overhead_cpu_s": round(overhead, 3),
        "peak_rss_mb": round(rss, 1),
        "peak_rss_target_mb": RSS_TARGET_MB,
        "peak_rss_meets_target": rss <= RSS_TARGET_MB,
    })


if __name__ == "__main__":
    main()
