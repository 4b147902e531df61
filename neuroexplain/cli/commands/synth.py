"""``neuroexplain synth --model lesion -n N -o DIR [--format nifti|dicom]``: synthetic scans with ground-truth masks.

``--format dicom`` writes each scan as an MR series in its own folder (``DIR/<task>_<seed>/``, int16 with a rescale);
the mask stays NIfTI beside it, on the same world coordinates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELD_OUT_SEED_START = 1_000_000  # neuroexplain.lab.synthetic.HELD_OUT_SEED_START, without importing numpy here
TASKS = ("lesion", "atrophy")


def register(sub: Any) -> None:
    p = sub.add_parser("synth", help="write synthetic scans and their ground-truth masks")
    p.add_argument("--model", "--task", dest="task", required=True, choices=TASKS,
                   help="which kind of finding to synthesise")
    p.add_argument("-n", type=int, default=10, help="number of scans (default 10, 1 to 10000)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED_START,
                   help=f"first seed (default {HELD_OUT_SEED_START}: the held-out range, never seen in training)")
    p.add_argument("--format", choices=("nifti", "dicom"), default="nifti",
                   help="nifti (default): NAME.nii.gz; dicom: a folder NAME/ holding one MR series")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neuroexplain.cli.main import CliError
    from neuroexplain.lab.synthetic import CLASSES, Task, make_sample
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import nifti_bytes

    if not 1 <= args.n <= 10_000:
        raise CliError(f"-n {args.n} is out of range; expected 1 to 10000")
    task = Task(args.task)
    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    for seed in range(args.seed, args.seed + args.n):
        s = make_sample(task, seed)
        name = f"{task.value}_{seed}"
        if args.format == "dicom":
            from neuroexplain.lab.dicom_synth import write_sample_series

            write_sample_series(s.image, MNI_2MM.affine, args.out / name, seed=seed)
            scan = name
        else:
            scan = f"{name}.nii.gz"
            (args.out / scan).write_bytes(nifti_bytes(s.image, MNI_2MM.affine))
        (args.out / f"{name}_mask.nii.gz").write_bytes(nifti_bytes(s.mask.astype("float32"), MNI_2MM.affine))
        index.append({"scan": scan, "mask": f"{name}_mask.nii.gz", "seed": seed,
                      "label": CLASSES[task][s.label], "lesion_count": s.lesion_count})
    (args.out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    kind = "DICOM series" if args.format == "dicom" else "scans"
    print(f"wrote {args.n} {task.value} {kind} with masks to {args.out}")
    return 0
