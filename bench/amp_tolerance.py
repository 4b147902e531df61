"""Mixed precision against fp32 on the bundled models (README -> Benchmarks, "Mixed precision"): autocast to bf16 and
to fp16 on this machine's device, the largest difference of the class probabilities over held-out scans (issue 21's
tolerance for offering AMP: 1e-3). The number formats, not the device, set most of the difference: bf16 keeps 8
mantissa bits, fp16 10.

    .venv/bin/python -m bench.amp_tolerance [--n 12]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

TOLERANCE = 1e-3


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task, make_sample
    from neuroexplain.models import load_model
    from neuroexplain.predict import prepare
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import Alignment, Scan

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=12, help="held-out scans per model (seeds from 1,000,000)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {"device": device, "tolerance": TOLERANCE, "n": args.n}
    for name in ("lesion", "atrophy"):
        model = load_model(name, device=device)
        worst = {"bfloat16": 0.0, "float16": 0.0}
        for i in range(args.n):
            sample = make_sample(Task(name), HELD_OUT_SEED_START + i)
            x = prepare(Scan(sample.image, MNI_2MM.affine.copy(), "", "nifti1"), model, Alignment.MNI).array
            batch = torch.from_numpy(x)[None, None].to(device)
            with torch.inference_mode():
                p32 = torch.softmax(model.module(batch).float(), 1)
                for dtype, so_far in list(worst.items()):
                    with torch.autocast(device, dtype=getattr(torch, dtype)):
                        low = torch.softmax(model.module(batch).float(), 1)
                    worst[dtype] = max(so_far, float((p32 - low).abs().max()))
        out[name] = {d: {"max_abs_probability_difference": w, "within_tolerance": w <= TOLERANCE}
                     for d, w in worst.items()}
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
