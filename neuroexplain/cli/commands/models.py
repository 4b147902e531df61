"""``neuroexplain models [--json]``: the models available, with version, classes and input grid."""

from __future__ import annotations

import argparse
import json
from typing import Any



def register(sub: Any) -> None:
    p = sub.add_parser("models", help="list bundled and user models")
    p.add_argument("--json", action="store_true", help="one JSON object per model per line")
    p.set_defaults(func=run)


def summary(spec: Any) -> dict[str, Any]:
    return {
        "name": spec.name,
        "version": spec.version,
        "classes": list(spec.classes),
        "grid": {"shape": list(spec.grid.shape), "voxel_mm": list(spec.grid.zooms), "affine": spec.grid.affine.tolist()},
        "layers": {l.name: l.channels for l in spec.layers},
        "held_out_accuracy": spec.metrics.get("held_out_accuracy"),
    }


def run(args: argparse.Namespace) -> int:
    from neuroexplain.models import list_specs

    for spec in list_specs():
        s = summary(spec)
        if args.json:
            print(json.dumps(s))
        else:
            shape = "x".join(map(str, s["grid"]["shape"]))
            print(f"{s['name']:<12} {s['version']:<8} classes={','.join(s['classes'])}  grid={shape} @ {s['grid']['voxel_mm'][0]:g} mm")
    return 0
