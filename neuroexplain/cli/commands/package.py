"""``neuroexplain package --spec S --weights W [--model-file F] -o NAME.mar``: a TorchServe archive of a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "package",
        help="build a TorchServe model archive (.mar) of your own model",
        description="Package spec.json + weights (+ the architecture file) with the neuroexplain handler into a "
        "TorchServe .mar. Put it in the model store of `neuroexplain serve --model-store DIR` to serve it.",
    )
    p.add_argument("--spec", type=Path, required=True, help="the model's spec.json")
    p.add_argument("--weights", type=Path, required=True, help="state dict saved with torch.save(model.state_dict())")
    p.add_argument("--model-file", type=Path, default=None,
                   help="architecture file (the spec's architecture 'file.py:Class'); default: beside the spec")
    p.add_argument("-o", "--output", type=Path, required=True, help="archive to write, NAME.mar")
    p.add_argument("--workers", type=int, default=1, help="TorchServe workers for the model (default 1)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="requests TorchServe may batch into one forward pass (default 1 = no batching)")
    p.add_argument("--max-batch-delay-ms", type=int, default=20, help="wait to fill a batch (default 20 ms)")
    p.add_argument("--response-timeout", type=int, default=1800,
                   help="seconds one request may run before TorchServe restarts the worker (default 1800)")
    p.add_argument("--startup-timeout", type=int, default=300,
                   help="seconds a worker may take to load the model (default 300)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from handlers.archive import ArchiveConfig, build_archive

    config = ArchiveConfig(
        min_workers=args.workers,
        max_workers=args.workers,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        response_timeout_s=args.response_timeout,
        startup_timeout_s=args.startup_timeout,
    )
    out = build_archive(args.spec, args.weights, args.output, model_file=args.model_file, config=config)
    print(out)
    return 0
