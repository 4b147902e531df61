"""``neuroexplain synth --model lesion -n N -o DIR``: synthetic scans with ground-truth masks, as NIfTI."""

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
        (args.out / f"{name}.nii.gz").write_bytes(nifti_bytes(s.image, MNI_2MM.affine))
        (args.out / f"{name}_mask.nii.gz").write_bytes(nifti_bytes(s.mask.astype("float32"), MNI_2MM.affine))
        index.append({"scan": f"{name}.nii.gz", "mask": f"{name}_mask.nii.gz", "seed": seed,
                      "label": CLASSES[task][s.label], "lesion_count": s.lesion_count})
    (args.out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    print(f"wrote {args.n} {task.value} scans with masks to {args.out}")
    return 0
