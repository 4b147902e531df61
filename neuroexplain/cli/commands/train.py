"""``neuroexplain train --model lesion|atrophy``: reproduce a bundled model's weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from neuroexplain.cli.commands.synth import TASKS

# TrainConfig's defaults, repeated so that `neuroexplain --help` does not import torch.
_SAMPLES, _EPOCHS, _EVAL = 600, 10, 200


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a bundled model on synthetic data")
    p.add_argument("--model", "--task", dest="task", required=True, choices=TASKS)
    p.add_argument("--samples", type=int, default=_SAMPLES, help=f"training scans (default {_SAMPLES})")
    p.add_argument("--epochs", type=int, default=_EPOCHS, help=f"epochs (default {_EPOCHS})")
    p.add_argument("--eval", type=int, default=_EVAL, help=f"held-out scans (default {_EVAL})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed (default 0); training samples use seeds seed*100000 ..., which must stay below 1000000")
    p.add_argument("--blur-augment", action="store_true",
                   help="blur half the training scans (Gaussian, sigma up to 1 voxel), so resampled scans are not a class")
    p.add_argument("-o", "--out", type=Path, default=None, help="output folder (default: ./trained/MODEL)")
    p.add_argument("--overwrite-bundled", action="store_true",
                   help="write into the package's bundled model folder, replacing its weights (default: never)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neuroexplain.cli.main import CliError
    from neuroexplain.errors import InvalidOptionError
    from neuroexplain.lab.synthetic import Task
    from neuroexplain.lab.train import TrainConfig, check_config, is_bundled, train
    from neuroexplain.models.registry import BUNDLED_DIR

    if args.samples < 8 or args.epochs < 1 or args.eval < 1:
        raise CliError("--samples must be at least 8, --epochs and --eval at least 1")
    task = Task(args.task)
    out: Path = args.out or (BUNDLED_DIR / task.value if args.overwrite_bundled else Path("trained") / task.value)
    config = TrainConfig(n_train=args.samples, n_eval=args.eval, epochs=args.epochs, seed=args.seed,
                         blur_augment=args.blur_augment)
    try:
        check_config(config)
        if is_bundled(out) and not args.overwrite_bundled:
            raise InvalidOptionError(f"{out} holds the bundled models; pass --overwrite-bundled to replace them")
    except InvalidOptionError as exc:
        raise CliError(str(exc)) from None
    print(f"training {task.value}; the model will be written to {out.resolve()}", flush=True)
    spec = train(task, out, config, overwrite_bundled=args.overwrite_bundled)
    print(f"{spec.name} {spec.version}: held-out accuracy {spec.metrics['held_out_accuracy']:.3f} "
          f"on {spec.metrics['held_out_n']} scans; wrote {(out / 'weights.pt').resolve()} and "
          f"{(out / 'spec.json').resolve()}")
    return 0
