"""Measure float16 and bfloat16 autocast against float32 for a model: the record :mod:`neuroexplain.precision` gates.

Held-out synthetic scans from :data:`SEED_START` (a range no other figure uses), placed as the serving path places
them (``mni`` alignment: they are generated in the template's space). For each reduced precision:

- Predict: the largest difference of any class probability from float32's, over ``n_predict`` scans;
- each attribution method (its default options, the predicted class): the smallest Spearman correlation of its
  model-grid map with float32's, over the first ``n_attribution`` scans. A method that raises under autocast or
  gives a non-finite value gets ``None`` (never run reduced) and its error's type in ``errors``.

The result is one device type's entry of a spec's ``mixed_precision``; times are recorded beside it (autocast on a
CPU is slower than float32: the figures say so).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from neuroexplain.attribution.api import explain
from neuroexplain.attribution.options import Method
from neuroexplain.lab.synthetic import Task, make_sample
from neuroexplain.models.registry import LoadedModel
from neuroexplain.precision import MIN_SPEARMAN, PREDICT, PROBABILITY_TOLERANCE, Precision
from neuroexplain.predict import ModelInput, predict_arrays, prepare
from neuroexplain.template import MNI_2MM
from neuroexplain.volumes import Alignment, Scan

SEED_START = 5_000_000  # precision figures only (disjoint from training, test, calibration, validation and OOD seeds)
REDUCED = (Precision.FLOAT16, Precision.BFLOAT16)


def measure(model: LoadedModel, task: Task, n_predict: int = 200, n_attribution: int = 4,
            methods: Sequence[Method] = tuple(Method), precisions: Sequence[Precision] = REDUCED,
            log: Callable[[str], None] = lambda s: None, seed_start: int = SEED_START) -> dict[str, Any]:
    """The ``mixed_precision`` entry for ``model.device``'s type (see the module docstring); ``seed_start`` another
    range for a check of the gate on scans it did not see."""
    count = max(n_predict, n_attribution)
    out: dict[str, Any] = {"seeds": [seed_start, seed_start + count - 1], "n_predict": n_predict,
                           "n_attribution": n_attribution, "torch": torch.__version__,
                           "tolerance": {PREDICT: PROBABILITY_TOLERANCE, "min_spearman": MIN_SPEARMAN}}
    worst = dict.fromkeys(precisions, 0.0)
    inputs = []  # only the scans attribution reuses are kept (200 placed scans would hold ~1.4 GB)
    for i in range(count):
        scan, x = _input(model, task, seed_start + i)
        if i < n_attribution:
            inputs.append((scan, x))
        if i < n_predict:
            reference = _probabilities(model, x, Precision.FLOAT32)
            for precision in precisions:
                diff = float(np.abs(_probabilities(model, x, precision) - reference).max())
                worst[precision] = max(worst[precision], diff)
    for precision in precisions:
        entry: dict[str, Any] = {PREDICT: worst[precision], "methods": {}, "errors": {}, "seconds": {}}
        log(f"{precision.value} predict: largest probability difference {worst[precision]:.5f}")
        for method in methods:
            rho: float | None = 1.0
            spent = {Precision.FLOAT32: 0.0, precision: 0.0}
            for scan, x in inputs[:n_attribution]:
                maps = {}
                for p in (Precision.FLOAT32, precision):
                    t0 = time.perf_counter()
                    try:
                        maps[p] = explain(model, scan, method, prepared=x, precision=p).model_map
                    except Exception as exc:  # noqa: BLE001 - any failure under autocast disqualifies the method
                        entry["errors"][method.value] = type(exc).__name__
                        break
                    finally:
                        spent[p] += time.perf_counter() - t0
                if precision not in maps or not np.isfinite(maps[precision]).all():
                    rho = None
                    break
                r = float(spearmanr(maps[Precision.FLOAT32].ravel(), maps[precision].ravel())[0])
                if rho is None or not np.isfinite(r):
                    rho = None
                    break
                rho = min(rho, r)
            entry["methods"][method.value] = rho
            entry["seconds"][method.value] = {"float32": round(spent[Precision.FLOAT32], 2),
                                              precision.value: round(spent[precision], 2)}
            log(f"{precision.value} {method.value}: smallest Spearman {rho if rho is None else round(rho, 4)}")
        out[precision.value] = entry
    return out


def markdown(name: str, device_type: str, entry: dict[str, Any], command: str) -> str:
    """The table of one device type's entry."""
    precisions = [p.value for p in REDUCED if p.value in entry]
    lines = [f"# Mixed precision: {name} model ({device_type})", "",
             (f"Generated by `{command}` (torch {entry['torch']}). Held-out synthetic scans, seeds "
             f"{entry['seeds'][0]}-{entry['seeds'][1]}: Predict on {entry['n_predict']}, attribution on the first "
             f"{entry['n_attribution']} (default options, the predicted class). A computation runs reduced only "
             f"within tolerance: probabilities within {PROBABILITY_TOLERANCE:g} of float32's, maps with Spearman "
             f"≥ {MIN_SPEARMAN} against float32's, on every scan. Seconds: float32 / reduced, all scans."), "",
             "| computation | " + " | ".join(precisions) + " |", "| --- |" + " --- |" * len(precisions)]
    row = [f"{entry[p][PREDICT]:.5f} ({'within' if entry[p][PREDICT] <= PROBABILITY_TOLERANCE else 'outside'})"
           for p in precisions]
    lines.append("| predict: largest probability difference | " + " | ".join(row) + " |")
    for method in entry[precisions[0]]["methods"]:
        cells = []
        for p in precisions:
            rho = entry[p]["methods"][method]
            secs = entry[p]["seconds"][method]
            verdict = (f"error: {entry[p]['errors'][method]}" if method in entry[p]["errors"]
                       else "non-finite" if rho is None else "within" if rho >= MIN_SPEARMAN else "outside")
            shown = "—" if rho is None else f"{rho:.4f}"
            cells.append(f"{shown} ({verdict}; {secs['float32']} / {secs[p]} s)")
        lines.append(f"| {method}: smallest Spearman | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _input(model: LoadedModel, task: Task, seed: int) -> tuple[Scan, ModelInput]:
    sample = make_sample(task, seed)
    scan = Scan(sample.image, MNI_2MM.affine.copy(), "", "nifti1")
    return scan, prepare(scan, model, Alignment.MNI)


def _probabilities(model: LoadedModel, x: ModelInput, precision: Precision) -> np.ndarray:
    (pred,) = predict_arrays(model, [x.array], 1, precision=precision)
    return np.array(list(pred.probabilities.values()))
