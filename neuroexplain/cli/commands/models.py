"""``neuroexplain models [--json] [--local | --server H:P]``: models with version, classes and input grid.

Without ``--local`` the list comes from a server (``--server``, default ``localhost:50051``); with ``--local`` from
the bundled models and ``NEUROEXPLAIN_MODEL_DIRS``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


def register(sub: Any) -> None:
    from neuroexplain.client import add_client_arguments

    p = sub.add_parser("models", help="list bundled and user models")
    p.add_argument("--json", action="store_true", help="one JSON object per model per line")
    add_client_arguments(p)
    p.set_defaults(func=run)


def summary(spec: Any) -> dict[str, Any]:
    """What ``models`` shows of a library ``ModelSpec``."""
    return {
        "name": spec.name,
        "version": spec.version,
        "classes": list(spec.classes),
        "grid": {"shape": list(spec.grid.shape), "voxel_mm": list(spec.grid.zooms), "affine": spec.grid.affine.tolist()},
        "layers": {layer.name: layer.channels for layer in spec.layers},
        "held_out_accuracy": spec.metrics.get("held_out_accuracy"),
    }


def remote_summary(info: Any) -> dict[str, Any]:
    """The same fields from a server's ``ModelInfo`` message."""
    affine = list(info.grid_affine)
    return {
        "name": info.name,
        "version": info.version,
        "classes": list(info.classes),
        "grid": {"shape": list(info.grid_shape), "voxel_mm": list(info.voxel_mm),
                 "affine": [affine[i : i + 4] for i in range(0, len(affine), 4)]},
        "layers": {layer.name: layer.channels for layer in info.layers},
        "held_out_accuracy": info.held_out_accuracy if info.HasField("held_out_accuracy") else None,
    }


def run(args: argparse.Namespace) -> int:
    if args.local:
        from neuroexplain.models import list_specs

        rows = [summary(spec) for spec in list_specs()]
    else:
        from neuroexplain.client import client_from_args

        with client_from_args(args) as client:
            rows = [remote_summary(info) for info in client.list_models()]
    for s in rows:
        if args.json:
            print(json.dumps(s))
        else:
            shape = "x".join(map(str, s["grid"]["shape"]))
            acc = s["held_out_accuracy"]
            acc_text = f"  held-out accuracy={acc:.3f}" if isinstance(acc, float) and math.isfinite(acc) else ""
            print(f"{s['name']:<12} {s['version']:<8} classes={','.join(s['classes'])}  grid={shape} @ "
                  f"{s['grid']['voxel_mm'][0]:g} mm{acc_text}")
    return 0
