"""Does a bundled model's answer survive the smoothing that any resampling brings? Held-out scans given on the
model's grid (``alignment=mni``, no interpolation) as they are, shifted by half a voxel along each axis (trilinear:
what a registration or a non-integer ``center`` shift does to a scan) and blurred with a Gaussian of 0.6 voxel.

Reports, per model and variant, the accuracy, the mean probability of the positive class on healthy scans and the
share the input check flags. A model
that keys on sharpness instead of anatomy calls every smoothed healthy scan positive (issue 19: the atrophy model
under ``alignment=register``). Not a timing benchmark.

    python -m bench.bench_resample_robustness [--n 16] [--models lesion atrophy] [--model-folder DIR]

``--model-folder`` scores a trained model folder (``spec.json`` + ``weights.pt``, e.g. ``neuroexplain train -o DIR``)
instead of the bundled models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from bench.common import save

SEED_START = 1_700_001  # held out; disjoint from the evaluation (1,000,001+), calibration and registration seeds


def main(argv: list[str]) -> int:
    from neuroexplain.inputcheck import check_input
    from neuroexplain.lab.synthetic import Task, make_sample
    from neuroexplain.models.registry import load_from_files, load_model
    from neuroexplain.predict import predict_arrays, prepare
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import Alignment, Scan, _affine_resample

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16, help="scans per model, half of them positive")
    p.add_argument("--models", nargs="+", default=["lesion", "atrophy"])
    p.add_argument("--model-folder", type=Path, default=None, help="a trained model folder instead of the bundled")
    args = p.parse_args(argv)
    loaded = ([load_from_files(args.model_folder / "spec.json", args.model_folder / "weights.pt")]
              if args.model_folder else [load_model(name) for name in args.models])
    half = np.eye(4)
    half[:3, 3] = 0.5
    variants = {
        "as is": lambda x: x,
        "half-voxel trilinear shift": lambda x: _affine_resample(x, half, x.shape, 1),
        "gaussian 0.6 voxel": lambda x: ndimage.gaussian_filter(x, 0.6),
    }
    result: dict[str, object] = {"n": args.n, "seeds": f"{SEED_START}..{SEED_START + 2 * (args.n - 1)} odd"}
    for model in loaded:
        name = model.spec.name
        task = Task(name)
        per: dict[str, dict[str, list[float]]] = {v: {"correct": [], "p_healthy": [], "flagged": []}
                                                  for v in variants}
        for i in range(args.n):
            sample = make_sample(task, SEED_START + 2 * i, positive=bool(i % 2))
            image = np.asarray(sample.image, dtype=np.float32)
            prepared = [prepare(Scan(data=fn(image) * 700.0, affine=MNI_2MM.affine, digest="0" * 64,
                                     format="nifti1"), model, Alignment.MNI) for fn in variants.values()]
            preds = predict_arrays(model, [m.array for m in prepared], with_features=True)
            for variant, prep, pred in zip(variants, prepared, preds):
                positive = list(pred.probabilities.values())[1]
                correct = (positive > 0.5) == bool(sample.label)
                per[variant]["correct"].append(float(correct))
                per[variant]["flagged"].append(float(not check_input(model, prep, pred).in_distribution))
                if not sample.label:
                    per[variant]["p_healthy"].append(positive)
        result[name] = {"version": model.spec.version, "weights_sha256": model.spec.weights_sha256[:16],
                        "training": model.spec.training.get("command", ""), **{v: {"accuracy": round(float(np.mean(d["correct"])), 3),
                            "mean_p_positive_on_healthy": round(float(np.mean(d["p_healthy"])), 3),
                            "flagged_by_input_check": round(float(np.mean(d["flagged"])), 3)}
                        for v, d in per.items()}}
    save("resample_robustness" + ("_folder" if args.model_folder else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
