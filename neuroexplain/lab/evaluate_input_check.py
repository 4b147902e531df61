"""Fit and measure the input check and temperature scaling of a bundled model, on disjoint seed ranges.

Seed ranges (each used for one purpose only; :data:`SEED_RANGES`):

``statistics``   training seeds 0-199 (the model was trained on 0-599): the feature statistics (mean, shrunk
                 covariance of the penultimate activations) and the contrast reference (brain-intensity quantiles).
``calibration``  2_000_000-2_000_199: the input check's per-check centres, scales and threshold; nothing else.
``validation``   3_000_000-3_000_199: the temperature; nothing else.
``test``         1_000_000-1_000_199 (``HELD_OUT_SEED_START``, the reporting range): pass rate, ECE, NLL.
``shift``        seeds 0-199 of :mod:`neuroexplain.lab.synthetic_shift` (an independently built generator).
``ood``          :mod:`neuroexplain.lab.ood` (healthy base scan of seed 4_000_000, nibabel's files).

Every scan goes through the serving path: a :class:`~neuroexplain.volumes.Scan` on the template grid,
:func:`~neuroexplain.predict.prepare` with ``mni`` alignment (they are generated in the template's space), :func:`~neuroexplain.predict.predict_arrays` with its
features. Per-scan records (logits, features, raw image scores, brain quantiles) are cached on disk so an interrupted
run resumes; the cache is keyed by the model's weights digest and the range, and a run from an empty cache gives
the same numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain import calibration as cal
from neuroexplain import inputcheck as ic
from neuroexplain.lab.ood import OOD_BASE_SEED, cases
from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Sample, Task, make_sample
from neuroexplain.lab.synthetic_shift import make_shifted_sample
from neuroexplain.models.registry import LoadedModel
from neuroexplain.models.spec import FeatureStatistics
from neuroexplain.predict import predict_arrays, prepare
from neuroexplain.template import MNI_2MM
from neuroexplain.volumes import Alignment, Scan

SEED_RANGES: dict[str, tuple[int, int]] = {
    "statistics": (0, 199),
    "calibration": (2_000_000, 2_000_199),
    "validation": (3_000_000, 3_000_199),
    "test": (HELD_OUT_SEED_START, HELD_OUT_SEED_START + 199),
    "shift": (0, 199),
    "ood": (OOD_BASE_SEED, OOD_BASE_SEED),
}
FALSE_ALARM_TARGET = 0.01
#: The threshold is the k-th smallest calibration score, k = ceil((n + 1)(1 - alpha)) (split-conformal): the
#: expected false-alarm rate on new in-distribution scans is then at most alpha. alpha = 0.005 leaves a margin
#: under the 1 % target.
ALPHA = 0.005
SHRINKAGE = 0.1  # covariance shrinkage towards its mean variance (64 features from 200 scans)
SCALE_FLOOR = {"coverage": 0.005, "outside": 0.005, "template": 0.005, "contrast": 0.005, "features": 1.0}

Log = Callable[[str], None]


def _records(model: LoadedModel, task: Task, which: str, n: int, cache: Path, log: Log) -> dict[str, np.ndarray]:
    lo, _hi = SEED_RANGES[which]
    path = cache / f"{which}-{n}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    make: Callable[[Task, int], Sample] = make_shifted_sample if which == "shift" else make_sample
    rows: dict[str, list[Any]] = {k: [] for k in ("seed", "label", "logits", "features", "quantiles", *ic.IMAGE_CHECKS,
                                                  "corr")}
    t0 = time.perf_counter()
    for i, seed in enumerate(range(lo, lo + n)):
        s = make(task, seed)
        # MNI: the scans are generated in the template's space (what ``auto`` resolved to when these records were
        # first made; explicit, so the figures do not depend on how ``auto`` decides).
        prepared = prepare(Scan(s.image, MNI_2MM.affine.copy(), "", "nifti1"), model, Alignment.MNI)
        p = predict_arrays(model, [prepared.array], with_features=True)[0]
        raw = ic.image_scores(prepared.array, model.spec.grid, None)
        rows["seed"].append(seed)
        rows["label"].append(s.label)
        rows["logits"].append(p.logits)
        rows["features"].append(p.features)
        rows["quantiles"].append(ic.brain_quantiles(prepared.array, model.spec.grid))
        for k in (*ic.IMAGE_CHECKS, "corr"):
            rows[k].append(raw[k])
        if (i + 1) % 25 == 0:
            log(f"  {which}: {i + 1}/{n} scans ({time.perf_counter() - t0:.0f} s)")
    out = {k: np.asarray(v) for k, v in rows.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)  # type: ignore[arg-type]
    return out


def fit_statistics(features: np.ndarray) -> FeatureStatistics:
    """Mean and precision of ``(n, F)`` features, the covariance shrunk by :data:`SHRINKAGE` towards its mean variance."""
    f = np.asarray(features, dtype=np.float64)
    mean = f.mean(0)
    cov = np.cov(f, rowvar=False)
    target = np.eye(cov.shape[0]) * float(np.trace(cov)) / cov.shape[0]
    shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * target
    return FeatureStatistics(mean=mean, precision=np.linalg.inv(shrunk), n=len(f))


def _raw(rec: dict[str, np.ndarray], ref: np.ndarray, stats: FeatureStatistics) -> dict[str, np.ndarray]:
    out = {k: rec[k].astype(np.float64) for k in ("coverage", "outside", "template")}
    out["contrast"] = np.abs(rec["quantiles"] - ref[None]).mean(1)
    out["features"] = np.array([ic.feature_score(f, stats) for f in rec["features"]])
    return out


def _z(raw: dict[str, np.ndarray], centre: dict[str, float], scale: dict[str, float]) -> np.ndarray:
    return np.max(np.stack([(raw[k] - centre[k]) / scale[k] for k in ic.CHECKS]), axis=0)


def conformal_threshold(scores: np.ndarray, alpha: float = ALPHA) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest score (the largest if that exceeds ``n``)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = int(np.ceil((len(s) + 1) * (1 - alpha)))
    return float(s[min(k, len(s)) - 1])


def evaluate(model: LoadedModel, task: Task, cache: Path, n: int = 200, log: Log = print) -> dict[str, Any]:
    """Fit statistics, check calibration and temperature; measure them; return the report (nothing written)."""
    recs = {w: _records(model, task, w, n, cache, log) for w in ("statistics", "calibration", "validation", "test",
                                                                  "shift")}
    stats = fit_statistics(recs["statistics"]["features"])
    ref = recs["statistics"]["quantiles"].mean(0)
    raw_cal = _raw(recs["calibration"], ref, stats)
    centre = {k: float(np.median(v)) for k, v in raw_cal.items()}
    scale = {k: max(float(np.quantile(v, 0.99) - np.median(v)), SCALE_FLOOR[k]) for k, v in raw_cal.items()}
    z_cal = _z(raw_cal, centre, scale)
    threshold = conformal_threshold(z_cal)
    val_logits, val_labels = recs["validation"]["logits"], recs["validation"]["label"]
    separable = bool((val_logits.argmax(1) == val_labels).all())
    # With no validation error the NLL falls as T -> 0 without a minimum: the split cannot identify a temperature,
    # and sharpening a saturated model's probabilities would only hide its errors elsewhere. Leave T at 1.
    temperature = 1.0 if separable else cal.fit_temperature(val_logits, val_labels)
    calib = {"centre": centre, "scale": scale, "threshold": threshold,
             "reference_quantiles": [float(q) for q in ref]}
    rates = {}
    for w in ("calibration", "validation", "test", "shift"):
        z = _z(_raw(recs[w], ref, stats), centre, scale)
        rates[w] = {"n": len(z), "passed": int((z <= threshold).sum()), "pass_rate": float((z <= threshold).mean()),
                    "seeds": list(SEED_RANGES[w]), "max_score": float(z.max())}
    calibration = {w: cal.summary(recs[w]["logits"], recs[w]["label"], temperature) for w in ("validation", "test",
                                                                                              "shift")}
    reliab = {w: {k: cal.reliability(cal.scaled_probabilities(recs[w]["logits"], t), recs[w]["label"])
                  for k, t in (("before", 1.0), ("after", temperature))} for w in ("test", "shift")}
    return {"stats": stats, "calib": calib, "temperature": temperature, "rates": rates, "calibration": calibration,
            "reliability": reliab, "temperature_note": "validation split has no errors: temperature not identifiable, "
            "left at 1.0" if separable else "fitted by minimising the validation NLL"}


def ood_rows(model: LoadedModel, task: Task) -> list[dict[str, Any]]:
    """Each out-of-distribution case, twice: read as ``mni`` (the check alone decides: what a caller who says
    ``--alignment mni`` gets), and with the case's default path (``auto``: registration may refuse it first)."""
    from neuroexplain.errors import NeuroExplainError

    rows = []
    for case in cases(task):
        prepared = prepare(case.scan, model, Alignment.MNI)
        p = predict_arrays(model, [prepared.array], with_features=True)[0]
        check = ic.check_input(model, prepared, p)
        row: dict[str, Any] = {
            "case": case.name, "description": case.description, "score": check.score, "threshold": check.threshold,
            "flagged": not check.in_distribution, "reason": check.reason,
            "checks": {c.name: round(c.z, 2) for c in check.checks}, "probabilities": p.probabilities}
        if case.alignment is Alignment.MNI:
            row["default_path"] = "read as mni (the case)"
        else:
            try:
                placed = prepare(case.scan, model, case.alignment)
            except NeuroExplainError as exc:
                row["default_path"] = f"{case.alignment.value}: refused ({type(exc).__name__}: {exc})"
            except Exception as exc:  # noqa: BLE001 - a crash in a lower layer is reported in the table, not hidden
                row["default_path"] = f"{case.alignment.value}: CRASH {type(exc).__name__} (untyped; a bug)"
            else:
                c2 = ic.check_input(model, placed)
                row["default_path"] = (f"{case.alignment.value}→{placed.placement.alignment.value}: score "
                                       f"{c2.score:.2f}, {'flagged' if not c2.in_distribution else 'passed'}")
        rows.append(row)
    return rows


def calibrated_model(model: LoadedModel, report: dict[str, Any]) -> LoadedModel:
    """The model with its new spec (temperature, input check, statistics) without touching the weights."""
    spec = replace(model.spec, temperature=report["temperature"], feature_statistics=report["stats"],
                   input_check=dict(report["calib"]))
    return LoadedModel(spec=spec, module=model.module, device=model.device)


def reliability_figure(path: Path, report: dict[str, Any], title: str) -> None:
    """Reliability diagrams before/after temperature scaling, on the test split and on the shifted set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, w in zip(axes, ("test", "shift")):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for k, colour in (("before", "tab:red"), ("after", "tab:blue")):
            r = report["reliability"][w][k]
            centres = [(lo + hi) / 2 for lo, hi in zip(r.edges[:-1], r.edges[1:])]
            ok = [i for i, c in enumerate(r.count) if c]
            summ = report["calibration"][w][k]
            ax.plot([r.confidence[i] for i in ok], [r.accuracy[i] for i in ok], "o-", color=colour,
                    label=f"{k}: ECE {summ['ece']:.3f} [{summ['ece_low']:.3f}, {summ['ece_high']:.3f}], "
                          f"NLL {summ['nll']:.3f}")
            del centres
        n = report["calibration"][w]["after"]["n"]
        ax.set_title(f"{w} (n = {n}, 15 bins)")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0.45, 1.0)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(report: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a report."""
    return json.loads(json.dumps({k: report[k] for k in ("calib", "temperature", "temperature_note", "rates",
                                                         "calibration")}))


def overhead(model: LoadedModel, task: Task, repeats: int = 5, n_scans: int = 4) -> dict[str, float]:
    """Seconds per scan of predict from NIfTI bytes (decode, prepare, forward) without and with the input check.

    Interleaved and the median of ``repeats`` rounds taken, so a busy shared machine affects both sides alike.
    """
    from neuroexplain.volumes import nifti_bytes, read_scan

    raws = [nifti_bytes(make_sample(task, HELD_OUT_SEED_START + 500 + i).image, MNI_2MM.affine) for i in
            range(n_scans)]

    def plain() -> None:
        for raw in raws:
            prepared = prepare(read_scan(raw), model, Alignment.MNI)
            predict_arrays(model, [prepared.array])

    def checked() -> None:
        for raw in raws:
            prepared = prepare(read_scan(raw), model, Alignment.MNI)
            p = predict_arrays(model, [prepared.array], with_features=True)[0]
            ic.check_input(model, prepared, p)

    plain()
    checked()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, out in ((plain, a), (checked, b)):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) / n_scans)
    without, with_check = float(np.median(a)), float(np.median(b))
    return {"predict_s": without, "predict_with_check_s": with_check, "ratio": with_check / without,
            "repeats": repeats, "scans": n_scans}


if __name__ == "__main__":  # python -m neuroexplain.lab.evaluate_input_check lesion: the overhead, one run
    import sys

    from neuroexplain.models import load_model

    name = sys.argv[1] if len(sys.argv) > 1 else "lesion"
    print(json.dumps(overhead(load_model(name), Task(name)), indent=2))
