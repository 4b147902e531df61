"""Memory per volume of the batched attribution methods, measured, against the estimate ``internal_batch_size``
auto is chosen by on a GPU (neuroexplain.attribution.batching).

Each method runs on one 2 mm scan of the bundled ``lesion`` model in a fresh process, at internal_batch_size 1 and
17 (32 evaluations: IG steps, SmoothGrad copies, GradientSHAP samples; occlusion with 8-voxel patches, 1,200 of
them); the measured cost of one more volume is the difference of the two processes' peak RSS over 16. The estimate is
``batching.volume_bytes`` (with its margin). On the CPU; a GPU's kernels keep other workspaces (bench/gpu.sh reports
the device's own peak). About 1 min on 2 cores.

Run: ``.venv/bin/python -m bench.bench_attribution_memory``.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from typing import Any

from bench.common import save

METHODS = ("integrated_gradients", "smoothgrad", "gradient_shap", "occlusion")
SMALL, LARGE = 1, 17
OPTIONS = {"integrated_gradients": {"n_steps": 32}, "smoothgrad": {"nt_samples": 32},
           "gradient_shap": {"n_samples": 32}, "occlusion": {"patch": 8, "stride": 8}}  # fmt: skip


def one(method_name: str, batch: int) -> float:
    """Peak RSS (MB) of this process after one attribution at ``batch``."""
    import torch

    from neuroexplain.attribution import Method, parse_options
    from neuroexplain.attribution.methods import attribute_tensor, private_copy
    from neuroexplain.models import load_model

    torch.set_num_threads(1)
    method = Method(method_name)
    model = load_model("lesion")
    x = torch.rand(1, 1, *model.spec.grid.shape, generator=torch.Generator().manual_seed(0))
    opts = parse_options(method, {**OPTIONS[method_name], "internal_batch_size": batch})
    attribute_tensor(private_copy(model.module, method), x, method, 0, opts, grid=model.spec.grid)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> dict[str, Any]:
    import torch

    from neuroexplain.attribution import Method
    from neuroexplain.attribution.batching import volume_bytes
    from neuroexplain.models import load_model

    model = load_model("lesion")
    x = torch.zeros(1, 1, *model.spec.grid.shape)
    out: dict[str, Any] = {"model": "lesion", "grid": list(model.spec.grid.shape), "batches": [SMALL, LARGE]}
    for name in METHODS:
        rss = [float(subprocess.run([sys.executable, "-m", "bench.bench_attribution_memory", name, str(b)], check=True,
                                    capture_output=True, text=True).stdout.split()[-1]) for b in (SMALL, LARGE)]
        measured = (rss[1] - rss[0]) / (LARGE - SMALL)
        estimate = volume_bytes(model.module, x, grad=Method(name) is not Method.OCCLUSION) / 2**20
        out[name] = {"peak_rss_mb": rss, "measured_mb_per_volume": round(measured, 1),
                     "estimate_mb_per_volume": round(estimate, 1), "estimate_over_measured": round(estimate / measured, 2)}
        print(name, out[name], flush=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(one(sys.argv[1], int(sys.argv[2])))
    else:
        save("attribution_memory", main())
