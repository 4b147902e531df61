"""alignment=register side by side with aligned scans: held-out synthetic scans moved by up to 15 deg, 25 mm and
+-8 % scale onto a 1 mm native grid, registered back, and compared with the same scans given in MNI space.

Per scan: registration seconds and this process's peak RSS (VmHWM), the input check after registration, the
prediction, and (for the first ``--n-attr`` positive scans) the share of positive relevance inside the lesion mask,
undilated and dilated by the evaluation's 2 voxels, for lrp_epsilon and integrated_gradients.
Targets (issue 19): input check passes >= 95 %; accuracy >= 0.95 x aligned; relevance share >= 0.9 x aligned;
<= 10 s per registration at 1 mm; peak RSS <= 2 GB.

    nice python -m bench.bench_registration [--n 40] [--n-attr 8] [--model lesion]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bench.common import save

METHODS = ("lrp_epsilon", "integrated_gradients")
DILATE_VOXELS = 2  # the attribution evaluation's dilation of the ground-truth mask


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def moved_native(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator, mm: float = 1.0
                 ) -> tuple[Any, list[np.ndarray], dict[str, Any]]:
    """A scan on MNI_2MM seen by a scanner: rotated <= 15 deg per axis, shifted <= 25 mm, scaled +-8 % per axis,
    on a ``mm`` axis-aligned grid of 200 x 230 x 200 mm. Masks follow with nearest-neighbour resampling.
    ``move["world"]`` is W, model world -> scanner world."""
    from neuroexplain.template import MNI_2MM, anatomy
    from neuroexplain.volumes import Scan, _affine_resample

    c = anatomy(MNI_2MM).com_mm
    angles = rng.uniform(-15, 15, 3)
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0, 25)
    scale = 1 + rng.uniform(-0.08, 0.08, 3)
    a = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scale)
    w = np.eye(4)
    w[:3, :3] = a
    w[:3, 3] = c - a @ c + shift
    shape = tuple(round(e / mm) for e in (200, 230, 200))
    affine = np.diag([mm, mm, mm, 1.0])
    affine[:3, 3] = (w @ np.append(c, 1.0))[:3] - np.asarray(shape) * mm / 2
    m = np.linalg.inv(MNI_2MM.affine) @ np.linalg.inv(w) @ affine
    data = _affine_resample(image, m, shape, 1)  # type: ignore[arg-type]
    native_masks = [_affine_resample(k.astype(np.float32), m, shape, 0) > 0.5 for k in masks]  # type: ignore[arg-type]
    move = {"angles_deg": angles.tolist(), "shift_mm": shift.tolist(), "scale": scale.tolist(), "world": w.tolist()}
    return Scan(data=data * 700.0, affine=affine, digest="0" * 64, format="nifti1"), native_masks, move


def _share(rel: np.ndarray, mask: np.ndarray) -> float:
    pos = np.clip(rel, 0, None)
    total = float(pos.sum())
    return float(pos[mask].sum() / total) if total > 0 else 0.0


def main(argv: list[str]) -> int:
    from neuroexplain.attribution.api import explain
    from neuroexplain.inputcheck import check_input
    from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task, make_sample
    from neuroexplain.models.registry import load_from_files, load_model
    from neuroexplain.predict import predict_arrays, prepare
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import Alignment, Scan, _affine_resample

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8, help="held-out scans (half positive)")
    p.add_argument("--n-attr", type=int, default=2, help="positive scans whose relevance share is compared")
    p.add_argument("--model", default="lesion")
    p.add_argument("--model-folder", type=Path, default=None,
                   help="a trained model folder (spec.json + weights.pt) instead of the bundled --model")
    args = p.parse_args(argv)
    model = (load_from_files(args.model_folder / "spec.json", args.model_folder / "weights.pt") if args.model_folder
             else load_model(args.model))
    args.model = model.spec.name
    task = Task(args.model)
    rng = np.random.default_rng(19)
    rows: list[dict[str, Any]] = []
    attr_done = 0
    for i in range(args.n):
        seed = HELD_OUT_SEED_START + 500_000 + i  # disjoint from the evaluation's and the calibration's seeds
        s = make_sample(task, seed, positive=bool(i % 2))
        dilated = ndimage.binary_dilation(s.mask, iterations=DILATE_VOXELS) & (s.image > 0)
        scan, _, move = moved_native(s.image, [], rng)
        aligned = Scan(data=s.image, affine=MNI_2MM.affine, digest="0" * 64, format="nifti1")
        t = time.perf_counter()
        reg = prepare(scan, model, Alignment.REGISTER)
        seconds = time.perf_counter() - t
        ali = prepare(aligned, model, Alignment.MNI)
        pr_reg, pr_ali = predict_arrays(model, [reg.array, ali.array], with_features=True)
        check = check_input(model, reg, pr_reg)
        row: dict[str, Any] = {
            "seed": seed, "label": s.label, "move": move, "seconds": seconds,
            "registration": reg.placement.registration.to_dict(),
            "input_check": check.to_dict(), "aligned_input_check": check_input(model, ali, pr_ali).to_dict(),
            "correct_registered": model.spec.classes.index(pr_reg.predicted_class) == s.label,
            "correct_aligned": model.spec.classes.index(pr_ali.predicted_class) == s.label,
        }
        if s.label == 1 and s.mask.any() and attr_done < args.n_attr:
            attr_done += 1
            for method in METHODS:
                target = model.spec.classes[1]
                r_ali = explain(model, aligned, method, target=target, alignment=Alignment.MNI)
                r_reg = explain(model, scan, method, target=target, alignment=Alignment.REGISTER)
                # both on the model grid; the masks go through (registration o W) in one nearest-neighbour step
                to_mni = (np.linalg.inv(MNI_2MM.affine) @ np.linalg.inv(np.asarray(move["world"]))
                          @ np.linalg.inv(reg.placement.registration.transform) @ MNI_2MM.affine)
                mask_r, dilated_r = (_affine_resample(k.astype(np.float32), to_mni, MNI_2MM.shape, 0) > 0.5
                                     for k in (s.mask, dilated))
                row[method] = {"aligned": _share(r_ali.model_map, s.mask),
                               "aligned_dilated": _share(r_ali.model_map, dilated),
                               "registered": _share(r_reg.model_map, mask_r),
                               "registered_dilated": _share(r_reg.model_map, dilated_r)}
        rows.append(row)
        print(f"{i + 1}/{args.n} seed {seed}: {seconds:.1f} s, corr {row['registration']['correlation']:.3f}, "
              f"in_distribution {check.in_distribution}, correct {row['correct_registered']}/"
              f"{row['correct_aligned']}", file=sys.stderr, flush=True)
    n = len(rows)
    acc_reg = sum(r["correct_registered"] for r in rows) / n
    acc_ali = sum(r["correct_aligned"] for r in rows) / n
    result: dict[str, Any] = {
        "model": args.model, "n": n, "native_mm": 1.0,
        "input_check_pass_registered": sum(r["input_check"]["in_distribution"] for r in rows) / n,
        "input_check_pass_aligned": sum(r["aligned_input_check"]["in_distribution"] for r in rows) / n,
        "accuracy_registered": acc_reg, "accuracy_aligned": acc_ali,
        "accuracy_ratio": acc_reg / acc_ali if acc_ali else float("nan"),
        "seconds_p50": float(np.median([r["seconds"] for r in rows])),
        "seconds_max": float(max(r["seconds"] for r in rows)),
        "peak_rss_mb": _hwm_mb(),
        "load_average_1min": float(Path("/proc/loadavg").read_text().split()[0]),
    }
    for method in METHODS:
        vals = [r[method] for r in rows if method in r]
        if vals:
            for kind in ("", "_dilated"):
                a = float(np.mean([v["aligned" + kind] for v in vals]))
                b = float(np.mean([v["registered" + kind] for v in vals]))
                result[f"{method}_share{kind}"] = {"n": len(vals), "aligned": a, "registered": b,
                                                   "ratio": b / a if a else float("nan")}
    result["rows"] = rows
    result["weights_sha256"] = model.spec.weights_sha256
    save("registration" + ("_folder" if args.model_folder else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
